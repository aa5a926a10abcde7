"""``LoRALinear``: a frozen linear layer plus a trainable low-rank update (Hu et al. 2021)."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from fastft.ops.lora_linear import lora_linear

__all__ = ["LoRALinear", "is_linear_like", "compute_dtype"]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer computes ``x`` in: the autocast dtype inside
    ``torch.autocast`` (where ``nn.Linear`` would cast its operands), else ``x.dtype``.

    The fused op is a custom op that autocast does not cast, so callers cast for it."""
    device_type = x.device.type
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # older torch: no device argument (CUDA only)
        enabled = device_type == "cuda" and torch.is_autocast_enabled()
    if enabled and hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 family): a linear layer whose weight is stored
    transposed, ``(in_features, out_features)``. Recognised by duck typing so fastft.nn
    does not import transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_linear_like(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and transformers' transposed-weight ``Conv1D``."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


class LoRALinear(nn.Module):
    r"""A frozen linear layer with a trainable rank-``r`` update (LoRA, Hu et al. 2021,
    arXiv:2106.09685):

    .. math::

        y = x W_0^\top + b + \frac{\alpha}{r}\,\big(\mathrm{dropout}(x)\,A^\top\big)\,B^\top

    ``W₀`` ``(out, in)`` and ``b`` stay frozen; only ``A`` (``lora_a``, ``(r, in)``) and ``B``
    (``lora_b``, ``(out, r)``) train, so a layer costs ``r · (in + out)`` trainable
    parameters instead of ``in · out``. The forward pass runs through the fused op
    ``fastft.ops.lora_linear`` (one GEMM epilogue, dropout mask never stored).

    Initialisation: ``A`` is Kaiming-uniform (as ``nn.Linear`` initialises its weight) and
    ``B`` is zero. ``B A = 0`` therefore, and **the adapted model starts exactly equal to
    the base model**: fine-tuning begins from the pretrained function, not from a random
    perturbation of it. ``A`` must not be zero as well, or the gradient of ``B``
    (``∝ (x Aᵀ)ᵀ g``) would be zero and nothing would ever train.

    Scaling: ``α / r`` (Hu et al.), or with ``use_rslora=True`` the rank-stabilised
    ``α / √r`` (Kalajdzievski 2023, arXiv:2312.03732), which keeps the update's magnitude
    from collapsing as ``r`` grows, so large ranks actually help.

    Args:
        base_layer: the ``nn.Linear`` to adapt (or transformers' ``Conv1D``, whose weight is
            ``(in, out)``; it is handled as its transpose). Its parameters are frozen here.
        rank: ``r >= 1``.
        alpha: ``α``; the update is scaled by ``α / r`` (or ``α / √r``).
        dropout: probability in ``[0, 1)`` of dropping elements of the LoRA branch's input
            (the base path never sees dropout), active in training mode only.
        use_rslora: use ``α / √r`` instead of ``α / r``.

    Shapes:
        input ``(..., in_features)`` → output ``(..., out_features)``, in the input's dtype
        (``A`` and ``B`` are created in the base weight's dtype and device). Inside
        ``torch.autocast`` every operand is cast to the autocast dtype first, as
        ``nn.Linear`` would be; otherwise the input must have the weight's dtype.

    Methods ``merge()`` / ``unmerge()`` fold ``scaling · B A`` into ``W₀`` and back (for
    inference without the extra matmuls); ``disabled = True`` gives the base layer alone.

    Raises:
        TypeError: ``base_layer`` is not linear-like.
        ValueError: ``rank < 1``, ``dropout`` outside ``[0, 1)``, non-positive ``alpha``.
    """

    def __init__(self, base_layer: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        if not is_linear_like(base_layer):
            raise TypeError(f"base_layer must be nn.Linear or transformers Conv1D, got {type(base_layer).__name__}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0 or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.base_layer = base_layer
        self.fan_in_fan_out = _is_conv1d(base_layer)  # weight stored (in, out)
        weight = base_layer.weight
        if self.fan_in_fan_out:
            self.in_features, self.out_features = weight.shape
        else:
            self.out_features, self.in_features = weight.shape
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.alpha = float(alpha)
        self.use_rslora = bool(use_rslora)
        self.dropout = float(dropout)
        self.scaling = self.alpha / (math.sqrt(rank) if use_rslora else rank)
        factory = dict(dtype=weight.dtype, device=weight.device)
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, **factory))  # (r, in)
        self.lora_b = nn.Parameter(torch.empty(self.out_features, rank, **factory))  # (out, r)
        self.merged = False
        self.disabled = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A: Kaiming-uniform (a=√5, nn.Linear's rule); B: zeros, so B A = 0 (see class doc)."""
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight as ``(out_features, in_features)`` (a view for Conv1D)."""
        weight = self.base_layer.weight
        return weight.t() if self.fan_in_fan_out else weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    def delta_weight(self) -> torch.Tensor:
        """``scaling · B A`` as ``(out_features, in_features)`` fp32 (no autograd)."""
        with torch.no_grad():
            return self.scaling * (self.lora_b.float() @ self.lora_a.float())

    def _lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        """``scaling · (x Aᵀ) Bᵀ`` without dropout, in x's dtype."""
        return self.scaling * ((x @ self.lora_a.to(x.dtype).t()) @ self.lora_b.to(x.dtype).t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in_features) -> (..., out_features)`` (see the class docstring)."""
        if self.merged:
            out = self.base_layer(x)  # W₀ + scaling·B A
            return out - self._lora_branch(x) if self.disabled else out
        if self.disabled:
            return self.base_layer(x)
        dtype = compute_dtype(x)  # every operand in one dtype, as nn.Linear under autocast
        bias = None if self.bias is None else self.bias.to(dtype)
        return lora_linear(x.to(dtype), self.weight.to(dtype), bias, self.lora_a.to(dtype), self.lora_b.to(dtype),
                           self.scaling, dropout_p=self.dropout if self.training else 0.0)

    def _add_to_weight(self, delta: torch.Tensor) -> None:
        weight = self.base_layer.weight
        if self.fan_in_fan_out:
            delta = delta.t()
        with torch.no_grad():
            # In fp32, then one rounding to the storage dtype: merge followed by unmerge
            # returns W₀ up to that rounding.
            weight.copy_((weight.float() + delta).to(weight.dtype))

    def merge(self) -> None:
        """``W₀ ← W₀ + scaling · B A``: the layer then costs one plain matmul.

        Raises:
            RuntimeError: already merged (merging twice would add the update twice).
        """
        if self.merged:
            raise RuntimeError("LoRALinear is already merged; call unmerge() before merging again")
        self._add_to_weight(self.delta_weight())
        self.merged = True

    def unmerge(self) -> None:
        """``W₀ ← W₀ - scaling · B A``, undoing ``merge()`` (exact up to fp rounding).

        Raises:
            RuntimeError: not merged.
        """
        if not self.merged:
            raise RuntimeError("LoRALinear is not merged; nothing to unmerge")
        self._add_to_weight(-self.delta_weight())
        self.merged = False

    def extra_repr(self) -> str:
        kind = "rsLoRA α/√r" if self.use_rslora else "α/r"
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha:g}, scaling={self.scaling:g} ({kind}), dropout={self.dropout:g}, "
                f"merged={self.merged}")
