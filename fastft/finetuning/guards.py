"""Forgetting guards for fine-tuning, and the measurement of forgetting itself.

Fine-tuning on a small labelled set can erase what pretraining taught ("catastrophic
forgetting"). Three guards, chosen with the typed options ``Replay(...)``, ``L2SP(...)``,
``EWC(...)`` (or their names), each building an ``extra_loss`` of the training loop
(``fn(model) -> 0-dim tensor``, added once per optimizer step):

- ``ReplayGuard``: a fraction of the steps also take the pretraining loss (masked-LM or
  causal-LM) on a batch of unlabeled text (rehearsal, as in ULMFiT-style mixed objectives);
- ``L2SPGuard``: Li, Grandvalet & Davoine 2018, "Explicit inductive bias for transfer
  learning with convolutional networks": α/2 · ‖w − w⁰‖² pulls the pretrained weights back
  to their starting point w⁰ (instead of to 0 as weight decay does), β/2 · ‖w_head‖² for
  the new head;
- ``EWCGuard``: Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural
  networks": λ/2 · Σ F_i (w_i − w⁰_i)², with F the diagonal Fisher information of the
  *pretraining* objective, estimated on unlabeled text before fine-tuning starts.

Measuring forgetting: the pretraining objective's perplexity on held-out unlabeled text,
before and after fine-tuning (``lm_perplexity``). A causal LM fine-tuned with SFT *is*
still its LM, so that is direct. An encoder with a fresh classification head has lost its
masked-LM head; ``lm_view`` borrows it back: it loads (or takes) the pretrained
``*ForMaskedLM`` model, swaps that model's backbone for the fine-tuned model's backbone
*module* (the same object, so it always sees the current weights), and re-ties its output
projection to the fine-tuned input embeddings when the config ties them. The borrowed
head's own parameters (transform + bias) stay at their pretrained values and frozen, so
the perplexity change measures the backbone's drift alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import torch
from torch import nn

from fastft.data.batching import fetch, to_device
from fastft.data.pipeline import prepare_lm_data
from fastft.models.loading import load_pretrained, new_head_weights
from fastft.train.config import Option
from fastft.train.evaluation import evaluate
from fastft.train.objectives import model_inputs, objective_for

__all__ = ["EWC", "L2SP", "EWCGuard", "Guard", "L2SPGuard", "Replay", "ReplayGuard", "lm_perplexity", "lm_view"]


def _backbone_name(model: nn.Module) -> str:
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or not hasattr(model, prefix):
        raise ValueError(f"{type(model).__name__} has no base model attribute (base_model_prefix={prefix!r})")
    return prefix


def lm_view(task_model: nn.Module, lm_model: nn.Module | str | None = None) -> nn.Module:
    """A pretraining-objective model that shares ``task_model``'s backbone.

    Args:
        task_model: the model being fine-tuned. A causal LM is returned as is.
        lm_model: the pretrained ``*ForMaskedLM`` (object or path), whose head is borrowed;
            None: load ``AutoModelForMaskedLM`` from ``task_model.config._name_or_path``.

    Returns: ``lm_model`` with its backbone replaced by ``task_model``'s (shared, not a
    copy); its own head parameters frozen. The caller must not train it except through
    the shared backbone.

    Raises:
        ValueError: no pretrained LM head available (none given, or the checkpoint has
            none and it would be initialised at random) / backbones of different types.
    """
    name = type(task_model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel", "ForMaskedLM")):
        return task_model
    if lm_model is None or isinstance(lm_model, str):
        path = lm_model or getattr(task_model.config, "_name_or_path", None)
        if not path:
            raise ValueError(
                f"cannot measure forgetting for {name}: pass lm_model= (the pretrained *ForMaskedLM or its path)"
            )
        import transformers

        lm_model, missing = load_pretrained(transformers.AutoModelForMaskedLM, path, what="lm_model")
        fresh = new_head_weights(lm_model, missing)
        if fresh:
            raise ValueError(
                f"{path} has no pretrained masked-LM head ({', '.join(fresh[:3])}{' ...' if len(fresh) > 3 else ''} "
                "missing): perplexity through a random head measures nothing; pass lm_model= (a *ForMaskedLM with "
                "its head), or measure_forgetting=False and no replay / EWC guard"
            )
    prefix = _backbone_name(lm_model)
    backbone = getattr(task_model, _backbone_name(task_model))
    if type(backbone) is not type(getattr(lm_model, prefix)):
        raise ValueError(
            f"lm_model's backbone is a {type(getattr(lm_model, prefix)).__name__}, the task model's a {type(backbone).__name__}"
        )
    for param in lm_model.parameters():
        param.requires_grad_(False)
    lm_model.__dict__.pop("_fastft_forward_parameters", None)
    setattr(lm_model, prefix, backbone)  # shared module: the view always sees the fine-tuned weights
    if getattr(lm_model.config, "tie_word_embeddings", False):
        lm_model.get_output_embeddings().weight = backbone.get_input_embeddings().weight
    lm_model.to(next(task_model.parameters()).device)
    lm_model.train(task_model.training)
    return lm_model


def lm_perplexity(lm_model: nn.Module, texts, tokenizer, *, block_size: int = 64, batch_size: int = 8,
                  seed: int = 0) -> float:
    """Perplexity of the pretraining objective (masked-LM for encoders, causal-LM for
    decoders) on ``texts`` — the same masks at every call (fixed ``seed``)."""
    metrics = evaluate(lm_model, list(texts), objective_for(lm_model), tokenizer=tokenizer, batch_size=batch_size,
                       block_size=block_size, seed=seed)
    return float(metrics["perplexity"])


def _lm_batches(lm_model, texts, tokenizer, *, block_size: int, batch_size: int, seed: int):
    """An endless stream of pretraining batches (collated, on the model's device)."""
    data, collator = prepare_lm_data(list(texts), tokenizer, objective_for(lm_model), seed=seed, block_size=block_size)
    generator = torch.Generator().manual_seed(seed)
    device = next(lm_model.parameters()).device
    while True:
        order = torch.randperm(len(data), generator=generator).tolist()
        for start in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            yield to_device(collator(fetch(data, order[start : start + batch_size])), device)


def _mean_lm_loss(lm_model, batch) -> torch.Tensor:
    return lm_model(**model_inputs(lm_model, batch)).loss.float()


class ReplayGuard:
    """Pretraining-loss replay: on a ``fraction`` of optimizer steps (spread evenly: step s
    replays when ⌊(s+1)·f⌋ > ⌊s·f⌋) add ``weight`` × the mean masked-LM / causal-LM loss of
    one batch of unlabeled ``texts``, computed through ``lm_view`` (shared backbone)."""

    def __init__(self, lm_model, texts, tokenizer, *, fraction: float = 0.5, weight: float = 1.0,
                 block_size: int = 64, batch_size: int = 8, seed: int = 0):
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"replay fraction must be in (0, 1], got {fraction}")
        self.lm_model, self.fraction, self.weight = lm_model, fraction, weight
        self.batches = _lm_batches(lm_model, texts, tokenizer, block_size=block_size, batch_size=batch_size, seed=seed)
        self.calls = 0
        self.replayed = 0

    def __call__(self, model) -> torch.Tensor:
        step = self.calls
        self.calls += 1
        if int((step + 1) * self.fraction) == int(step * self.fraction):
            return torch.zeros((), device=next(model.parameters()).device)
        self.replayed += 1
        self.lm_model.train(model.training)
        return self.weight * _mean_lm_loss(self.lm_model, next(self.batches))


class L2SPGuard:
    """α/2 · Σ‖w − w⁰‖² over the pretrained parameters that train, + β/2 · Σ‖w‖² over the
    new head's (Li et al. 2018, eq. 3). ``w⁰`` is snapshot at construction, so build the
    guard right before training."""

    def __init__(self, model: nn.Module, *, alpha: float = 0.01, beta: float = 0.0, head_names: Sequence[str] = ()):
        self.alpha, self.beta = alpha, beta
        self.head: list[str] = []
        self.anchors: dict[str, torch.Tensor] = {}
        for name, param in model.named_parameters():
            if any(part in head_names for part in name.split(".")[:-1]):
                self.head.append(name)
            else:
                self.anchors[name] = param.detach().clone()

    def __call__(self, model) -> torch.Tensor:
        named = dict(model.named_parameters())
        total = torch.zeros((), device=next(model.parameters()).device)
        for name, anchor in self.anchors.items():
            param = named[name]
            if param.requires_grad:  # frozen weights cannot drift: skip their (zero) terms
                total = total + 0.5 * self.alpha * (param.float() - anchor.float()).pow(2).sum()
        if self.beta:
            for name in self.head:
                param = named[name]
                if param.requires_grad:
                    total = total + 0.5 * self.beta * param.float().pow(2).sum()
        return total


class EWCGuard:
    """λ/2 · Σ F_i (w_i − w⁰_i)² with F the diagonal Fisher of the pretraining objective.

    F is estimated as the mean over ``num_batches`` unlabeled batches of the squared
    gradient of the mean LM loss (the "empirical Fisher" at batch granularity: cheaper
    than per-example squares, same diagonal up to a scale the λ absorbs), computed with
    the model in eval mode (no dropout), then normalised so that its mean over all the
    backbone's elements is 1 (λ comparable across models). ``fisher`` and ``anchors``
    map parameter names of ``model`` shared with ``lm_model`` to tensors."""

    def __init__(self, model: nn.Module, lm_model: nn.Module, texts, tokenizer, *, strength: float = 1.0,
                 num_batches: int = 8, block_size: int = 64, batch_size: int = 8, seed: int = 0):
        self.strength = strength
        named = dict(model.named_parameters())
        lm_named = {id(p): n for n, p in lm_model.named_parameters()}
        shared = [n for n, p in named.items() if id(p) in lm_named]
        flags = {n: named[n].requires_grad for n in shared}
        for n in shared:
            named[n].requires_grad_(True)
        fisher = {n: torch.zeros_like(named[n], dtype=torch.float32) for n in shared}
        batches = _lm_batches(lm_model, texts, tokenizer, block_size=block_size, batch_size=batch_size, seed=seed)
        was_training = lm_model.training
        lm_model.eval()  # no dropout: the Fisher of the deterministic model
        for _ in range(num_batches):
            lm_model.zero_grad(set_to_none=True)
            model.zero_grad(set_to_none=True)
            _mean_lm_loss(lm_model, next(batches)).backward()
            for n in shared:
                if named[n].grad is not None:
                    fisher[n] += named[n].grad.float().pow(2) / num_batches
        model.zero_grad(set_to_none=True)
        lm_model.zero_grad(set_to_none=True)
        lm_model.train(was_training)
        for n, flag in flags.items():
            named[n].requires_grad_(flag)
        # Mean over every backbone *element* (not the mean of per-tensor means, which would
        # weigh a 384-entry LayerNorm bias like a 30k x 384 embedding matrix).
        total = sum(float(f.double().sum()) for f in fisher.values())
        count = sum(f.numel() for f in fisher.values())
        mean = max(total / max(count, 1), 1e-30)
        self.fisher = {n: f / mean for n, f in fisher.items()}
        self.anchors = {n: named[n].detach().clone() for n in shared}

    def __call__(self, model) -> torch.Tensor:
        named = dict(model.named_parameters())
        total = torch.zeros((), device=next(model.parameters()).device)
        for n, anchor in self.anchors.items():
            param = named[n]
            if param.requires_grad:
                total = total + 0.5 * self.strength * (self.fisher[n] * (param.float() - anchor.float()).pow(2)).sum()
        return total


# ------------------------------------------------------------------------ the options


class Guard(Option):
    """A forgetting guard: ``build(...)`` returns the loop's extra loss ``fn(model) -> tensor``."""

    kind: ClassVar[str] = "guard"

    needs_text: ClassVar[bool] = False  # needs unlabeled pretraining text (and the LM view)

    def build(self, model, *, lm_model, texts, tokenizer, head_names, seed: int, block_size: int) -> Callable:
        raise NotImplementedError


@dataclass
class Replay(Guard):
    """Replay the pretraining loss on a ``fraction`` of the steps, times ``weight``."""

    name: ClassVar[str] = "replay"
    needs_text: ClassVar[bool] = True
    fraction: float = 0.5
    weight: float = 1.0
    batch_size: int = 8

    def build(self, model, *, lm_model, texts, tokenizer, head_names, seed, block_size):
        return ReplayGuard(lm_model, texts, tokenizer, fraction=self.fraction, weight=self.weight,
                           block_size=block_size, batch_size=self.batch_size, seed=seed)


@dataclass
class L2SP(Guard):
    """α/2 · ‖w − w⁰‖² towards the pretrained weights, β/2 · ‖w_head‖² on the new head."""

    name: ClassVar[str] = "l2sp"
    alpha: float = 0.01
    beta: float = 0.0

    def build(self, model, *, lm_model, texts, tokenizer, head_names, seed, block_size):
        return L2SPGuard(model, alpha=self.alpha, beta=self.beta, head_names=head_names)


@dataclass
class EWC(Guard):
    """λ/2 · Σ F (w − w⁰)² with the pretraining objective's diagonal Fisher F."""

    name: ClassVar[str] = "ewc"
    needs_text: ClassVar[bool] = True
    strength: float = 1.0
    num_batches: int = 8
    batch_size: int = 8

    def build(self, model, *, lm_model, texts, tokenizer, head_names, seed, block_size):
        return EWCGuard(model, lm_model, texts, tokenizer, strength=self.strength, num_batches=self.num_batches,
                        block_size=block_size, batch_size=self.batch_size, seed=seed)
