"""``PrefixEncoder``: per-layer key/value prefixes for prefix tuning (Li & Liang 2021)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

__all__ = ["PrefixEncoder"]


class PrefixEncoder(nn.Module):
    r"""Trainable key/value prefixes for every attention layer (Li & Liang 2021,
    "Prefix-Tuning: Optimizing Continuous Prompts for Generation", arXiv:2101.00190).

    Each of the ``L`` attention layers attends to ``p`` extra key/value vectors in front of
    the real ones, as if ``p`` virtual tokens preceded the input:

    .. math::

        \mathrm{head} = \mathrm{softmax}\!\Big(\frac{q\,[P_K;\,K]^\top}{\sqrt{d_h}}\Big)\,[P_V;\,V]

    Only the prefixes train. Li & Liang found optimising them directly unstable and
    reparametrise them during training through an MLP over a smaller matrix ``P'``:

    .. math::

        [P_K; P_V]_{\ell} = \mathrm{MLP}(P')_{\ell}, \quad
        \mathrm{MLP}(z) = W_2 \tanh(W_1 z + b_1) + b_2, \quad P' \in \mathbb{R}^{p \times e}

    After training the MLP is not needed: ``materialize()`` evaluates it once and keeps
    the resulting prefixes as plain parameters (``p · L · 2 · h_kv · d_h`` numbers).

    Args:
        num_virtual_tokens: ``p >= 1``.
        num_layers: ``L``.
        num_kv_heads: key/value heads per layer ``h_kv`` (grouped-query models have fewer
            than query heads).
        head_dim: ``d_h``.
        projection_hidden_size: the MLP's hidden width; None stores the prefixes directly
            (no reparametrisation).
        token_dim: ``e``, the width of ``P'`` (default ``h_kv · d_h``).

    Shapes:
        ``forward(batch_size)`` → a tuple of ``L`` pairs ``(key, value)``, each
        ``(batch_size, h_kv, p, d_h)`` — the layout of a Hugging Face key/value cache.

    Raises:
        ValueError: a size below 1.
    """

    def __init__(self, num_virtual_tokens: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 projection_hidden_size: Optional[int] = None, token_dim: Optional[int] = None, *,
                 dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        sizes = dict(num_virtual_tokens=num_virtual_tokens, num_layers=num_layers, num_kv_heads=num_kv_heads,
                     head_dim=head_dim, projection_hidden_size=projection_hidden_size or 1, token_dim=token_dim or 1)
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.num_virtual_tokens = num_virtual_tokens
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.prefix_size = num_layers * 2 * num_kv_heads * head_dim  # numbers per virtual token
        factory = dict(dtype=dtype, device=device)
        if projection_hidden_size is None:
            self.prefixes = nn.Parameter(torch.randn(num_virtual_tokens, self.prefix_size, **factory))  # (p, L·2·h·d)
            self.prefix_tokens = None
            self.mlp = None
        else:
            token_dim = token_dim or num_kv_heads * head_dim
            self.prefixes = None
            self.prefix_tokens = nn.Parameter(torch.randn(num_virtual_tokens, token_dim, **factory))  # P' (p, e)
            self.mlp = nn.Sequential(
                nn.Linear(token_dim, projection_hidden_size, **factory),
                nn.Tanh(),
                nn.Linear(projection_hidden_size, self.prefix_size, **factory),
            )

    @property
    def reparametrized(self) -> bool:
        """True while the prefixes come out of the MLP (before ``materialize()``)."""
        return self.mlp is not None

    def flat_prefixes(self) -> torch.Tensor:
        """All prefixes as one ``(p, L · 2 · h_kv · d_h)`` matrix."""
        return self.mlp(self.prefix_tokens) if self.mlp is not None else self.prefixes

    def forward(self, batch_size: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """Per-layer ``(key, value)`` prefixes, each ``(batch_size, h_kv, p, d_h)``."""
        p, L, h, d = self.num_virtual_tokens, self.num_layers, self.num_kv_heads, self.head_dim
        flat = self.flat_prefixes()  # (p, L·2·h·d)
        per_layer = flat.view(p, L, 2, h, d).permute(1, 2, 3, 0, 4)  # (L, 2, h, p, d)
        per_layer = per_layer.unsqueeze(2).expand(L, 2, batch_size, h, p, d)  # (L, 2, B, h, p, d)
        return tuple((per_layer[layer, 0], per_layer[layer, 1]) for layer in range(L))

    @torch.no_grad()
    def materialize(self) -> None:
        """Replace the MLP reparametrisation by the prefixes it currently produces.

        The forward output is unchanged; the MLP and ``P'`` are dropped, leaving only the
        ``(p, L · 2 · h_kv · d_h)`` prefixes as a trainable parameter. No-op when there is
        no MLP.
        """
        if self.mlp is None:
            return
        flat = self.flat_prefixes().detach().clone()
        del self.mlp, self.prefix_tokens  # unregister, then keep plain None attributes
        self.mlp = None
        self.prefix_tokens = None
        del self.prefixes
        self.prefixes = nn.Parameter(flat)

    def extra_repr(self) -> str:
        return (f"num_virtual_tokens={self.num_virtual_tokens}, num_layers={self.num_layers}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, reparametrized={self.reparametrized}")
