"""Objectives: what the loop minimises, as *summed* losses and the counts that normalise them.

The loop never averages inside a micro-batch. An objective returns, per loss term, the
sum over its supervised items (tokens, sequences, examples) and, separately and before
any forward pass, how many items each batch supervises. The loop adds up the counts of
all micro-batches of an optimizer step first and divides every micro-batch's sums by
those totals, so k accumulated micro-batches give the gradient of one k-times-larger
batch, however unevenly the supervised tokens fall (a mean of per-micro-batch means
would over-weight micro-batches with few masked tokens).

To add a task (classification, QA, SFT ...), subclass ``Objective``:

    class Classification(Objective):
        name = "cls"
        def counts(self, batch):             # before forward, once per micro-batch
            return {"cls": batch["labels"].numel()}
        def loss(self, model, batch, counts):  # summed loss per term, and the model output
            out = model(**model_inputs(model, batch, exclude=("labels",)))
            return {"cls": F.cross_entropy(out.logits.float(), batch["labels"], reduction="sum")}, out
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

from fastft.data.collators import IGNORE_INDEX

__all__ = ["OBJECTIVES", "CausalLM", "MaskedLM", "MaskedLMWithNSP", "Objective", "get_objective", "model_inputs", "objective_for"]

def _forward_parameters(model) -> set[str]:
    cached = getattr(model, "_fastft_forward_parameters", None)
    if cached is None:
        cached = set(inspect.signature(model.forward).parameters)
        try:
            model._fastft_forward_parameters = cached
        except AttributeError:
            pass
    return cached


def model_inputs(model, batch: dict[str, Any], *, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The entries of ``batch`` that ``model.forward`` names as parameters.

    Bookkeeping keys (``cu_seqlens``, ``max_seqlen``, ``word_starts``...) are passed only to
    models whose forward names them, never through a ``**kwargs`` catch-all.
    """
    accepted = _forward_parameters(model)
    return {k: v for k, v in batch.items() if k in accepted and k not in exclude}


class Objective:
    """Base class. ``counts(batch)`` -> {term: int}; ``loss(model, batch, counts)`` -> ({term:
    summed loss (0-dim tensor)}, model output), where ``counts`` is what ``counts(batch)``
    returned (computed once per micro-batch by the loop). ``perplexity_term`` names the
    term whose per-item mean is a token cross-entropy (evaluation reports exp of it), or None."""

    name = "objective"
    perplexity_term: str | None = None

    def counts(self, batch: dict[str, Any]) -> dict[str, int]:
        raise NotImplementedError

    def loss(self, model, batch: dict[str, Any], counts: dict[str, int]) -> tuple[dict[str, torch.Tensor], Any]:
        raise NotImplementedError


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half-precision losses to fp32; keep fp64 (exactness tests run in fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _summed_token_loss(mean_loss: torch.Tensor, count: int) -> torch.Tensor:
    """A Hugging Face head's mean token loss times its token count = the summed loss.

    Going through the model's own ``labels=`` path keeps fastft.patch's fused loss in use.
    A batch with nothing to predict gives 0 (the model's 0/0 mean would be NaN).
    """
    mean_loss = _at_least_fp32(mean_loss)
    if count == 0:
        return mean_loss.new_zeros(())
    return mean_loss * count


class MaskedLM(Objective):
    """Masked-LM: cross-entropy at positions whose label is not -100 (no shift)."""

    name = "mlm"
    perplexity_term = "mlm"

    def counts(self, batch):
        return {"mlm": int((batch["labels"] != IGNORE_INDEX).sum())}

    def loss(self, model, batch, counts):
        out = model(**model_inputs(model, batch))
        return {"mlm": _summed_token_loss(out.loss, counts["mlm"])}, out


class CausalLM(Objective):
    """Causal-LM: the model shifts (logits[:, t] predict labels[:, t + 1]), so the counted
    tokens are ``labels[:, 1:] != -100``."""

    name = "clm"
    perplexity_term = "clm"

    def counts(self, batch):
        return {"clm": int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())}

    def loss(self, model, batch, counts):
        out = model(**model_inputs(model, batch))
        return {"clm": _summed_token_loss(out.loss, counts["clm"])}, out


class MaskedLMWithNSP(Objective):
    """Masked-LM plus next-sentence prediction (``BertForPreTraining``): two terms, masked
    tokens normalised by their count and sentence pairs by theirs.

    The model returns ``loss = mlm_mean + nsp_mean``; the NSP part is recomputed from the
    small ``seq_relationship_logits`` (B, 2) and subtracted, so the masked-LM part still
    comes from the model's own (possibly fused) loss path.
    """

    name = "mlm+nsp"
    perplexity_term = "mlm"

    def counts(self, batch):
        return {"mlm": int((batch["labels"] != IGNORE_INDEX).sum()), "nsp": int(batch["next_sentence_label"].numel())}

    def loss(self, model, batch, counts):
        if "next_sentence_label" not in _forward_parameters(model):
            raise ValueError("objective 'mlm+nsp' needs a model with a next-sentence head (e.g. BertForPreTraining)")
        out = model(**model_inputs(model, batch))
        nsp_logits = _at_least_fp32(out.seq_relationship_logits)  # (B, 2)
        nsp_sum = F.cross_entropy(nsp_logits, batch["next_sentence_label"], reduction="sum")
        if counts["mlm"] == 0:
            mlm_sum = nsp_sum.new_zeros(())
        else:
            mlm_mean = _at_least_fp32(out.loss) - nsp_sum / counts["nsp"]  # the model's sum minus its NSP mean
            mlm_sum = mlm_mean * counts["mlm"]
        return {"mlm": mlm_sum, "nsp": nsp_sum}, out


OBJECTIVES = {"mlm": MaskedLM, "clm": CausalLM, "mlm+nsp": MaskedLMWithNSP}


def get_objective(objective: str | Objective) -> Objective:
    """An ``Objective`` instance from a name (``"mlm"``, ``"clm"``, ``"mlm+nsp"``) or itself.

    Raises:
        ValueError: unknown name.
    """
    if isinstance(objective, Objective):
        return objective
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVES)} or an Objective, got {objective!r}")
    return OBJECTIVES[objective]()


def objective_for(model_or_config) -> str:
    """The pretraining objective of a Hugging Face model (or its config) by architecture:
    ``"clm"`` for ``*ForCausalLM`` / ``*LMHeadModel`` (or ``is_decoder``), ``"mlm+nsp"``
    for ``*ForPreTraining``, else ``"mlm"``."""
    config = getattr(model_or_config, "config", model_or_config)
    names = list(getattr(config, "architectures", None) or [])
    if hasattr(model_or_config, "config"):  # a model: its class is the truth, whatever config.json says
        names = [type(model_or_config).__name__]
    if any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names) or getattr(config, "is_decoder", False):
        return "clm"
    if any(n.endswith("ForPreTraining") for n in names):
        return "mlm+nsp"
    return "mlm"
