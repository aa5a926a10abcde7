"""``Adapter``: the Houlsby et al. (2019) bottleneck adapter."""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Adapter"]

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
}


class Adapter(nn.Module):
    r"""Bottleneck adapter (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for
    NLP", arXiv:1902.00751), inserted after a sublayer's output projection:

    .. math::

        \mathrm{Adapter}(h) = h + W_{up}\,\sigma(W_{down}\, h + b_{down}) + b_{up}

    ``W_down`` ``(m, d)`` projects the hidden size ``d`` down to a bottleneck ``m ≪ d``,
    ``σ`` is a nonlinearity, ``W_up`` ``(d, m)`` projects back, and the residual keeps the
    input. Trainable parameters: ``2·m·d + m + d`` per adapter.

    Initialisation: the down-projection uses ``nn.Linear``'s default (so the bottleneck
    carries signal from the first step), the up-projection is drawn from
    ``N(0, up_init_std²)`` with ``up_init_std`` small (default 1e-3) and zero bias. The
    adapter thus starts as (almost) the identity and the model as (almost) the pretrained
    one, which Houlsby et al. found necessary for stable training; a small nonzero ``W_up``
    rather than exact zeros keeps the down-projection's gradient nonzero from step one.

    Args:
        hidden_size: ``d``, the feature size of the sublayer output.
        bottleneck_size: ``m >= 1``.
        activation: ``"gelu" | "relu" | "silu" | "tanh"`` or a callable.
        up_init_std: standard deviation of the up-projection's initial weights (>= 0).

    Shapes:
        ``(..., d) -> (..., d)``; parameters take the given ``dtype`` / ``device``.

    Raises:
        ValueError: non-positive sizes, unknown activation name, negative ``up_init_std``.
    """

    def __init__(self, hidden_size: int, bottleneck_size: int, activation: Union[str, Callable] = "gelu",
                 up_init_std: float = 1e-3, *, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("bottleneck_size", bottleneck_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(activation, str):
            if activation not in _ACTIVATIONS:
                raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)} or a callable, got {activation!r}")
            self.activation_name = activation
            self.activation = _ACTIVATIONS[activation]
        elif callable(activation):
            self.activation_name = getattr(activation, "__name__", type(activation).__name__)
            self.activation = activation
        else:
            raise ValueError(f"activation must be a name or a callable, got {activation!r}")
        if not up_init_std >= 0:
            raise ValueError(f"up_init_std must be >= 0, got {up_init_std!r}")
        self.hidden_size = hidden_size
        self.bottleneck_size = bottleneck_size
        self.down = nn.Linear(hidden_size, bottleneck_size, dtype=dtype, device=device)  # W_down (m, d)
        self.up = nn.Linear(bottleneck_size, hidden_size, dtype=dtype, device=device)  # W_up (d, m)
        with torch.no_grad():
            self.up.weight.normal_(0.0, up_init_std)
            self.up.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., d) -> (..., d)``: ``hidden + up(σ(down(hidden)))``."""
        return hidden + self.up(self.activation(self.down(hidden)))  # (..., d)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, bottleneck_size={self.bottleneck_size}, activation={self.activation_name}"
