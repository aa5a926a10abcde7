"""Run an encoder's last layer for the first token only, when nothing else reads it.

A BERT-family sequence classifier reads one position of the last hidden state: position
0, the [CLS] token (``BertPooler`` and RoBERTa's / ELECTRA's classification heads take
``hidden_states[:, 0]``). The last layer's outputs at the other L − 1 positions are
computed, back-propagated through, and thrown away. Only their keys and values matter to
position 0, and those come from the layer's *input*.

So in the last layer we keep self-attention as it is (every position's keys and values;
the model's own attention function, so ``fastft.patch`` / prefix tuning still apply) and
cut the sequence to position 0 right after it: the attention output projection, both
LayerNorms and the feed-forward block run on one token instead of L. Per token a BERT
layer's matmuls are 12·d² (q, k, v, out: 4·d²; FFN with 4·d: 8·d²), so this skips 9/12 of
the last layer, ≈ 9/(12·n_layers) of the encoder's matmul work (≈ 12% for a 6-layer
MiniLM), forward and backward, with the same loss and gradients (the cut positions have
no path to the logits). Per-token LayerNorm and dropout make the cut exact.

Applied by ``fastft.finetune`` for classification / regression while it trains and
evaluates, and removed afterwards (the model's structure and state dict never change).
Only the model's own forward is affected: another module sharing the backbone (the
masked-LM view that replay and forgetting measurements use) sees the full last layer.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FIRST_TOKEN_CLASSES", "FirstTokenLastLayer", "first_token_last_layer"]

# Sequence classifiers whose head reads hidden_states[:, 0] and only that.
FIRST_TOKEN_CLASSES = (
    "BertForSequenceClassification",
    "RobertaForSequenceClassification",
    "XLMRobertaForSequenceClassification",
    "CamembertForSequenceClassification",
    "ElectraForSequenceClassification",
)


def _last_layer(model: nn.Module) -> nn.Module | None:
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    layers = getattr(getattr(backbone, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return None
    return layers[-1]


class FirstTokenLastLayer:
    """The hooks that cut the last layer to position 0; ``remove()`` takes them out.

    A forward pre-hook on the whole model marks "inside the classifier's forward" (so a
    masked-LM view sharing the backbone is left alone); a forward pre-hook on the last
    layer's attention-output block (``BertSelfOutput``: dense → dropout → LayerNorm with
    the residual) slices its two inputs, the self-attention output and the residual, to
    position 0. Everything after it in the layer then runs on one token."""

    def __init__(self, model: nn.Module, attention_output: nn.Module):
        self._active = False
        self._handles = [
            model.register_forward_pre_hook(self._enter),
            model.register_forward_hook(self._leave, always_call=True),  # also when forward raises
            attention_output.register_forward_pre_hook(self._cut),
        ]

    def _enter(self, module, args):
        self._active = True

    def _leave(self, module, args, output):
        self._active = False

    def _cut(self, module, args):
        if not self._active:
            return None
        # (self-attention output (B, L, d), residual input (B, L, d)) -> (B, 1, d) each
        return tuple(a[:, :1] if isinstance(a, torch.Tensor) and a.dim() == 3 else a for a in args)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def first_token_last_layer(model: nn.Module) -> tuple[FirstTokenLastLayer | None, str]:
    """Cut ``model``'s last encoder layer to the first token while ``model`` runs.

    Returns ``(hooks, "")``, or ``(None, reason)`` when the model is not a known
    first-token classifier (its head might read other positions) or its last layer is not
    BERT-shaped (``layer.attention.output``). The caller must not ask the model for its
    hidden states while the hooks are in (the last one has length 1)."""
    name = type(model).__name__
    if name not in FIRST_TOKEN_CLASSES:
        return None, f"{name} is not a known first-token classifier"
    layer = _last_layer(model)
    attention_output = getattr(getattr(layer, "attention", None), "output", None)
    if not isinstance(attention_output, nn.Module):
        return None, f"{name}'s last encoder layer has no attention.output block"
    if getattr(model.config, "add_cross_attention", False):
        return None, f"{name} has cross-attention in its layers"
    return FirstTokenLastLayer(model, attention_output), ""
