"""Log-probabilities of given tokens under a causal LM, without the ``(tokens, vocab)`` logits.

Every preference method needs ``log π(y | x)``: the sum over the response tokens of each
token's log-probability. Computed the usual way that is ``log_softmax(logits)`` gathered
at the labels -- a ``(batch, seq, vocab)`` tensor (and its gradient) for one number per
token. Here the backbone's final hidden states go straight into
``fastft.ops.linear_cross_entropy(reduction="none")``, which returns each labelled row's
cross-entropy ``-log p(label)`` computed a chunk of rows at a time (prompt and padding
rows cost nothing), so only ``(tokens, H)`` hidden states are ever held:

    hidden = backbone(input_ids)                    (N, T, H)   the LM head's input
    -nll   = -linear_cross_entropy(hidden[:, :-1], W, labels[:, 1:], reduction="none")
    log π(y | x) = sum over response tokens          (N,)

This is exact for causal LMs whose head is ``logits = lm_head(hidden)`` with nothing in
between (``FUSED_CLASSES``); any other causal LM takes the full-logits path
(``logprob_path`` says which and why).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F

from fastft.data.collators import IGNORE_INDEX
from fastft.models.loss import _matching_dtypes
from fastft.ops.linear_cross_entropy import linear_cross_entropy

__all__ = ["FUSED_CLASSES", "check_causal_lm", "evaluation_mode", "full_logits_sequence_logprobs", "logprob_path",
           "sequence_logprobs", "token_logprobs"]

# Causal LMs whose forward is ``logits = lm_head(backbone(...)[0])``: no logit scaling or
# soft-capping (Gemma-2, Cohere), no extra projection after the backbone's final norm.
FUSED_CLASSES = ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                 "Phi3ForCausalLM", "GPTNeoXForCausalLM", "OPTForCausalLM", "GemmaForCausalLM")
_warned: set[str] = set()


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DDP / torch.compile wrappers keep the model as .module


def check_causal_lm(model: torch.nn.Module) -> None:
    """Raises ``ValueError`` unless ``model`` is a Hugging Face causal LM (``*ForCausalLM`` /
    ``*LMHeadModel`` with output embeddings): preference tuning scores responses by their
    next-token probabilities."""
    model = _unwrapped(model)
    name = type(model).__name__
    if not name.endswith(("ForCausalLM", "LMHeadModel")) or getattr(model, "get_output_embeddings", lambda: None)() is None:
        raise ValueError(f"preference tuning needs a causal language model (AutoModelForCausalLM, e.g. GPT2LMHeadModel, "
                         f"LlamaForCausalLM); got {name}")


def logprob_path(model: torch.nn.Module) -> tuple[str, str | None]:
    """``("fused", None)`` when ``model``'s log-probs come from its backbone's hidden states
    through ``linear_cross_entropy``, else ``("logits", reason)``."""
    model = _unwrapped(model)
    known = next((c for c in type(model).__mro__ if c.__name__ in FUSED_CLASSES), None)
    if known is None:
        return "logits", f"{type(model).__name__} is not a head fastft knows to be plain (known: {', '.join(FUSED_CLASSES)})"
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return "logits", f"its output embeddings are a {type(head).__name__}, not an nn.Linear"
    if not hasattr(model, getattr(model, "base_model_prefix", "") or "-"):
        return "logits", f"{type(model).__name__} has no backbone attribute {model.base_model_prefix!r}"
    return "fused", None


def token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   labels: torch.Tensor) -> torch.Tensor:
    """``log p(labels[:, t + 1] | input_ids[:, :t + 1])`` for every labelled position.

    Args:
        model: a causal LM (see ``check_causal_lm``).
        input_ids, attention_mask: ``(N, T)``, right-padded.
        labels: ``(N, T)`` int64; ``-100`` where nothing is scored (prompt, padding).

    Returns: ``(N, T - 1)`` fp32: the log-probability of ``labels[:, 1:]``, 0 where it is -100.
    Differentiable with respect to the model's parameters.
    """
    model = _unwrapped(model)
    targets = labels[:, 1:]  # (N, T-1): logits at t score the token at t+1
    path, reason = logprob_path(model)
    if path == "logits":
        name = type(model).__name__
        if name not in _warned:
            _warned.add(name)
            warnings.warn(f"log-probs of {name} from full logits ({reason})", stacklevel=2)
        return _full_logits_token_logprobs(model, input_ids, attention_mask, labels)
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]  # (N, T, H)
    if hidden.shape[:2] != input_ids.shape:
        raise ValueError(f"the backbone returned {tuple(hidden.shape[:2])} positions for inputs of {tuple(input_ids.shape)} "
                         "(virtual tokens: prefix / prompt tuning are not supported for preference tuning)")
    head = model.get_output_embeddings()
    hidden, weight, bias = _matching_dtypes(hidden[:, :-1], head.weight, head.bias)
    nll = linear_cross_entropy(hidden, weight, targets, bias=bias, reduction="none")  # (N, T-1) fp32, 0 on -100
    return -nll


def sequence_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log π(y | x) summed over each row's labelled tokens (N,) fp32, their count (N,))``
    for a batch with ``input_ids``, ``attention_mask`` and ``labels``."""
    logps = token_logprobs(model, batch["input_ids"], batch.get("attention_mask"), batch["labels"])
    counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1)
    return logps.sum(-1), counts


@contextlib.contextmanager
def evaluation_mode(model: torch.nn.Module):
    """``model.eval()`` and no autograd inside the block; the previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def _full_logits_token_logprobs(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """``token_logprobs`` from ``model(...).logits``: the ``(N, T, V)`` logits and their
    log-softmax, what a plain implementation computes."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]  # (N, T-1, V)
    targets = labels[:, 1:]
    logps = F.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logps.masked_fill(targets == IGNORE_INDEX, 0.0)


def full_logits_sequence_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``sequence_logprobs``' sums through the full logits (the comparison of benchmarks/bench_dpo.py)."""
    return _full_logits_token_logprobs(model, batch["input_ids"], batch.get("attention_mask"), batch["labels"]).sum(-1)
