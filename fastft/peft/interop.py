"""Run a Hugging Face PEFT model's LoRA layers through fastft's fused op, in place."""

from __future__ import annotations

import torch
import torch.nn as nn

from fastft.nn.lora import _is_conv1d, compute_dtype
from fastft.ops.lora_linear import lora_linear

__all__ = ["accelerate"]


def _fast_path_weights(layer, x: torch.Tensor, args: tuple, kwargs: dict):
    """(weight (out, in), bias, A, B, scaling, dropout_p) when ``layer`` can take the fused
    path for this call, else None (the layer's own forward then runs unchanged)."""
    if args or any(value is not None for value in kwargs.values()):  # adapter_names, variant kwargs
        return None
    if layer.disable_adapters or layer.merged:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1 or active[0] in getattr(layer, "lora_variant", {}):  # several adapters, DoRA, ...
        return None
    name = active[0]
    base = layer.get_base_layer()
    if not (isinstance(base, nn.Linear) or _is_conv1d(base)):
        return None
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    if getattr(lora_a, "bias", None) is not None or getattr(lora_b, "bias", None) is not None:
        return None
    weight = base.weight.t() if getattr(layer, "fan_in_fan_out", False) else base.weight  # (out, in)
    bias = base.bias
    dtype = compute_dtype(x)
    if not weight.is_floating_point():  # quantised bases keep PEFT's path
        return None
    if dtype == x.dtype and (weight.dtype != dtype or (bias is not None and bias.dtype != dtype)):
        return None  # mixed dtypes without autocast: PEFT's own casting rules apply
    dropout = layer.lora_dropout[name]
    if not isinstance(dropout, (nn.Dropout, nn.Identity)):
        return None
    dropout_p = float(dropout.p) if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    # PEFT keeps adapters in fp32 under 16-bit bases and casts x up; the fused op runs in
    # the layer's compute dtype instead (x's, or autocast's), casting A and B to it (their
    # gradients flow back through the cast).
    return (weight.to(dtype), None if bias is None else bias.to(dtype), lora_a.weight.to(dtype),
            lora_b.weight.to(dtype), float(layer.scaling[name]), dropout_p)


class _FusedForward:
    """A PEFT LoRA layer's ``forward`` once accelerated: ``lora_linear`` when the call can
    take the fused path, else the forward it had before (the class's, or an instance-level
    one that was there already). An object holding the layer rather than a bound method,
    so that ``pickle`` / ``torch.save(model)`` store it by class and state (a bound method
    of a module function pickles as ``getattr(layer, name)``, which fails on load) and
    ``copy.deepcopy`` points the copy's forward at the copied layer."""

    def __init__(self, layer: nn.Module, previous=None):
        self.layer = layer
        self.previous = previous  # an instance-level forward the layer had, or None

    def original(self):
        return self.previous if self.previous is not None else type(self.layer).forward.__get__(self.layer)

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        fused = _fast_path_weights(self.layer, x, args, kwargs)
        if fused is None:
            return self.original()(x, *args, **kwargs)
        weight, bias, lora_a, lora_b, scaling, dropout_p = fused
        return lora_linear(x.to(weight.dtype), weight, bias, lora_a, lora_b, scaling, dropout_p=dropout_p)


def accelerate(peft_model: nn.Module) -> nn.Module:
    """Make every PEFT ``lora.Linear`` layer of ``peft_model`` run ``fastft.ops.lora_linear``.

    The model stays a PEFT model (same parameters, state dict, save/load, merge); only the
    layers' ``forward`` is replaced on the instances. A call takes the fused path when
    the layer has exactly one active plain-LoRA adapter, is not merged or disabled, has an
    ``nn.Linear`` / ``Conv1D`` base in ``x``'s dtype and plain dropout; anything else
    (several adapters, DoRA, mixed-batch ``adapter_names``, quantised bases) runs PEFT's
    own forward. Outputs equal PEFT's up to floating-point rounding (dropout masks differ:
    fastft draws its own).

    Returns:
        ``peft_model`` (modified in place). Calling it again is a no-op.

    Raises:
        ImportError: peft is not installed.
        ValueError: the model has no PEFT LoRA linear layers.
    """
    from peft.tuners.lora import Linear as PeftLoraLinear

    layers = [module for module in peft_model.modules() if isinstance(module, PeftLoraLinear)]
    if not layers:
        raise ValueError(f"{type(peft_model).__name__} has no PEFT LoRA Linear layers to accelerate")
    for layer in layers:
        if isinstance(layer.__dict__.get("forward"), _FusedForward):
            continue
        layer.forward = _FusedForward(layer, layer.__dict__.get("forward"))
    return peft_model
