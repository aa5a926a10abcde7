"""Masked-LM / causal-LM losses on the final hidden states, through ``linear_cross_entropy``.

A Hugging Face LM head computes ``logits = decoder(transform(hidden))`` for every token,
a ``(tokens, vocab)`` tensor, and only then the loss. Here each family's loss is written
against the hidden states that enter the output-embedding layer
(``model.get_output_embeddings()``, an ``nn.Linear``) and that layer's weight and bias,
so ``fastft.ops.linear_cross_entropy`` never builds the logits.

One small function per loss kind, and a table naming the HF classes whose head is
exactly "prediction transform, then the output embeddings" with that loss.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastft.ops.linear_cross_entropy import linear_cross_entropy

__all__ = ["masked_lm_loss", "causal_lm_loss", "LOSS_BY_CLASS", "loss_for"]


def _matching_dtypes(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """Cast as ``F.linear`` would: to the autocast dtype when autocast is on for this device.

    Not needed before ``linear_cross_entropy``, which handles autocast itself (and keeps an
    fp32 master weight's gradient fp32 without copying the weight); kept for callers that
    still cast (fastft.alignment.logprobs).
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return hidden, weight, bias


def _reduced_cross_entropy(hidden, head, labels, num_items_in_batch, ignore_index):
    """Mean over labelled tokens, or sum / ``num_items_in_batch`` when given.

    The second form is ``transformers.loss.loss_utils.fixed_cross_entropy``: with gradient
    accumulation the trainer counts the labelled tokens of all micro-batches and each
    micro-batch's loss is its sum divided by that count.
    """
    # Under autocast the hidden states may be bf16 while the head's weight is the fp32
    # master: linear_cross_entropy takes both as they are (fp32 logits and weight gradient;
    # bf16 matmuls where the device does them fast), where casting the weight here would
    # copy it and round its gradient to bf16.
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = linear_cross_entropy(
        hidden, head.weight, labels.to(hidden.device), bias=head.bias, ignore_index=ignore_index, reduction=reduction
    )
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def masked_lm_loss(
    hidden: torch.Tensor,
    head: torch.nn.Linear,
    labels: torch.Tensor,
    *,
    num_items_in_batch=None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Masked-LM cross-entropy (BERT, RoBERTa): ``labels[b, t]`` is the target at position t.

    Args:
        hidden: ``(batch, seq, H)`` output of the prediction-head transform (the decoder's input).
        head: the decoder ``nn.Linear`` with weight ``(V, H)`` and optional bias ``(V,)``.
        labels: ``(batch, seq)`` int targets, ``ignore_index`` for unmasked tokens.
        num_items_in_batch: optional labelled-token count for gradient accumulation.

    Returns:
        The fp32 scalar loss (``BertForMaskedLM``'s ``CrossEntropyLoss()``, or HF's
        ``ForMaskedLMLoss`` when ``num_items_in_batch`` is given).
    """
    return _reduced_cross_entropy(hidden, head, labels, num_items_in_batch, ignore_index)


def causal_lm_loss(
    hidden: torch.Tensor,
    head: torch.nn.Linear,
    labels: torch.Tensor,
    *,
    num_items_in_batch=None,
    ignore_index: int = -100,
    shift_labels: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Causal-LM cross-entropy (GPT-2, Llama): position t predicts ``labels[b, t + 1]``.

    Mirrors ``transformers.loss.loss_utils.ForCausalLMLoss``: labels are padded with
    ``ignore_index`` on the right and shifted left by one (so the last position predicts
    nothing) unless the caller passes ``shift_labels`` already shifted.

    Args:
        hidden: ``(batch, seq, H)`` final hidden states (the LM head's input).
        head: the LM head ``nn.Linear`` with weight ``(V, H)`` (tied to the input embeddings).
        labels: ``(batch, seq)`` int, usually ``input_ids`` with ``ignore_index`` on padding.
        num_items_in_batch: optional labelled-token count for gradient accumulation.
        shift_labels: optional ``(batch, seq)`` labels already shifted.

    Returns:
        The fp32 scalar loss.
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # (batch, seq)
    return _reduced_cross_entropy(hidden, head, shift_labels, num_items_in_batch, ignore_index)


# HF class name -> loss. Each of these forwards computes `logits = get_output_embeddings()(x)`
# once, with x the head's transformed hidden states, and its loss from those logits alone
# (no soft-capping or scaling of the logits in between), which is what makes the
# substitution exact. Checked in tests/test_models.py for every entry.
LOSS_BY_CLASS = {
    "BertForMaskedLM": masked_lm_loss,
    "RobertaForMaskedLM": masked_lm_loss,
    "GPT2LMHeadModel": causal_lm_loss,
    "LlamaForCausalLM": causal_lm_loss,
}


def loss_for(model: torch.nn.Module):
    """``(loss function, None)`` for a supported head, or ``(None, reason)`` when the loss stays HF's."""
    name = type(model).__name__
    # Walk the class hierarchy (FSDP2's fully_shard swaps in a subclass of the model's class),
    # but only trust a subclass that keeps the known class's forward: an overridden forward
    # may do anything to the logits.
    known = next((c for c in type(model).__mro__ if c.__name__ in LOSS_BY_CLASS), None)
    loss = LOSS_BY_CLASS[known.__name__] if known is not None and type(model).forward is known.forward else None
    if loss is None:
        supported = ", ".join(sorted(LOSS_BY_CLASS))
        return None, f"{name} is not a head fastft knows how to fuse (supported: {supported})"
    head = model.get_output_embeddings()
    if head is None:
        return None, f"{name} has no output embeddings (no language-model head)"
    if not isinstance(head, torch.nn.Linear):
        return None, f"{name}.get_output_embeddings() is {type(head).__name__}, not an nn.Linear"
    return loss, None
