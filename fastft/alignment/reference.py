"""The reference policy: where ``log ref(y | x)`` comes from.

    CachedReference     computed once before training, with the model as it starts, and
                        stored with each pair (``ref_chosen_logp`` / ``ref_rejected_logp``):
                        no second model in memory, one extra forward pass per pair in all
    AdaptersDisabled    LoRA: the same model with its LoRA layers switched off *is* the
                        starting model (the base weights never change); one no-grad forward
                        per step, no copy. Works for samples drawn during training (online RL)
    FrozenCopy          an explicit frozen copy of the starting model: a second model in
                        memory (full fine-tuning with online RL needs it)

Each gives ``logps(model, batch) -> (N,)`` summed over the labelled tokens, and the online
methods use ``token_logps`` ``(N, T-1)``. All run without autograd, in eval mode.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Sequence

import torch

from fastft.alignment.logprobs import evaluation_mode, sequence_logprobs, token_logprobs
from fastft.data.batching import to_device
from fastft.peft import lora_layers
from fastft.peft.state import peft_state

__all__ = ["AdaptersDisabled", "CachedReference", "FrozenCopy", "Reference", "adapters_disabled", "cache_reference_logps"]


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Every LoRA layer of ``model`` computes its frozen base layer alone inside the block.

    Raises:
        ValueError: the model has no LoRA layers, or also other PEFT modules (adapters,
            virtual tokens) that cannot be switched off.
    """
    layers = list(lora_layers(model).values())
    if not layers:
        raise ValueError("reference='adapters' needs a model with LoRA layers (strategy=LoRA(...))")
    others = [m for m in peft_state(model).methods if m != "lora"]
    if others:
        raise ValueError(f"reference='adapters' switches off LoRA only; this model also has {others}: use reference='cache'")
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous):
            layer.disabled = was


class Reference:
    """Where the reference log-probs come from (see the module docstring)."""

    name = "reference"

    def logps(self, model, batch) -> torch.Tensor:
        raise NotImplementedError

    def token_logps(self, model, batch) -> torch.Tensor:
        raise ValueError(f"reference {self.name!r} cannot score new samples (online methods need 'adapters' or 'copy')")


class CachedReference(Reference):
    """Reads the ``ref_logps`` that ``cache_reference_logps`` stored with the pairs."""

    name = "cache"

    def logps(self, model, batch):
        if "ref_logps" not in batch:
            raise ValueError("reference='cache': the batch has no ref_logps (run cache_reference_logps on the features)")
        return batch["ref_logps"]


class AdaptersDisabled(Reference):
    """The policy itself with its LoRA layers switched off."""

    name = "adapters"

    def logps(self, model, batch):
        with adapters_disabled(model), evaluation_mode(model):
            return sequence_logprobs(model, batch)[0]

    def token_logps(self, model, batch):
        with adapters_disabled(model), evaluation_mode(model):
            return token_logprobs(model, batch["input_ids"], batch.get("attention_mask"), batch["labels"])


class FrozenCopy(Reference):
    """A frozen deep copy of ``model`` as it is now."""

    name = "copy"

    def __init__(self, model: torch.nn.Module):
        self.model = copy.deepcopy(model).eval()
        for param in self.model.parameters():
            param.requires_grad_(False)

    def logps(self, model, batch):
        with evaluation_mode(self.model):
            return sequence_logprobs(self.model, batch)[0]

    def token_logps(self, model, batch):
        with evaluation_mode(self.model):
            return token_logprobs(self.model, batch["input_ids"], batch.get("attention_mask"), batch["labels"])


def cache_reference_logps(model: torch.nn.Module, features: Sequence[dict], collator, *, batch_size: int = 8) -> None:
    """Store ``log ref`` of each pair's responses in its feature (``ref_chosen_logp`` /
    ``ref_rejected_logp``, floats), computed with ``model`` as it is now, in eval mode."""
    device = next(model.parameters()).device
    with evaluation_mode(model):
        for start in range(0, len(features), batch_size):
            chunk = features[start : start + batch_size]
            batch = to_device(collator([{k: v for k, v in f.items() if not k.startswith("ref_")} for f in chunk]), device)
            logps = sequence_logprobs(model, batch)[0].double().cpu().tolist()  # (2B,): chosen, then rejected
            for i, feature in enumerate(chunk):
                feature["ref_chosen_logp"], feature["ref_rejected_logp"] = logps[i], logps[len(chunk) + i]
