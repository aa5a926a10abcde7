"""Learning-rate schedules: a registry of multipliers of each parameter group's peak lr.

A schedule is ``fn(step, *, total_steps, warmup_steps, min_lr_ratio, **options) -> float``
(the multiplier for optimizer step ``step``, counted from 0). ``build_scheduler`` wraps
it in ``torch.optim.lr_scheduler.LambdaLR``, so each parameter group keeps its own peak
lr (discriminative / layer-wise learning rates) and the scheduler's state is a step
counter that checkpoints save and restore. New schedules register with
``@register_schedule("name")``; ``slanted_triangular`` is ULMFiT's, for fine-tuning.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch

__all__ = ["SCHEDULES", "build_scheduler", "register_schedule", "warmup_steps_for"]

SCHEDULES: dict[str, Callable[..., float]] = {}


def register_schedule(name: str):
    """Decorator adding a schedule function to ``SCHEDULES`` under ``name``."""

    def add(fn):
        SCHEDULES[name] = fn
        return fn

    return add


def _warmup(step: int, warmup_steps: int) -> float | None:
    """Linear warmup 1/w, 2/w, ..., 1 over the first ``warmup_steps`` steps (None after)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return None


@register_schedule("constant")
def constant(step: int, *, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> float:
    warm = _warmup(step, warmup_steps)
    return 1.0 if warm is None else warm


@register_schedule("linear")
def linear(step: int, *, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> float:
    """Warmup, then a straight line from 1 to ``min_lr_ratio`` at ``total_steps``."""
    warm = _warmup(step, warmup_steps)
    if warm is not None:
        return warm
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(min_lr_ratio, 1.0 - (1.0 - min_lr_ratio) * progress)


@register_schedule("cosine")
def cosine(step: int, *, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> float:
    """Warmup, then half a cosine from 1 down to ``min_lr_ratio`` (Loshchilov & Hutter, SGDR)."""
    warm = _warmup(step, warmup_steps)
    if warm is not None:
        return warm
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@register_schedule("slanted_triangular")
def slanted_triangular(
    step: int, *, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0, cut_frac: float = 0.1,
    ratio: float = 32.0,
) -> float:
    """ULMFiT's slanted triangular multiplier (Howard & Ruder 2018, eq. 3):

        cut = floor(T · cut_frac)
        p   = t / cut                                   if t < cut
              1 − (t − cut) / (cut · (1/cut_frac − 1))  otherwise
        η_t = η_max · (1 + p · (ratio − 1)) / ratio

    A short linear rise over the first ``cut_frac`` of the steps, then a long linear decay,
    from ``η_max / ratio`` up to ``η_max`` and back. ``warmup_steps`` and ``min_lr_ratio``
    are ignored (the shape has its own rise and floor)."""
    if not 0.0 < cut_frac < 1.0:
        raise ValueError(f"slanted_triangular: cut_frac must be in (0, 1), got {cut_frac}")
    if ratio < 1.0:
        raise ValueError(f"slanted_triangular: ratio must be >= 1, got {ratio}")
    cut = max(1, math.floor(total_steps * cut_frac))
    if step < cut:
        p = step / cut
    else:
        p = 1.0 - (step - cut) / (cut * (1.0 / cut_frac - 1.0))
    return (1.0 + max(p, 0.0) * (ratio - 1.0)) / ratio


def warmup_steps_for(total_steps: int, warmup_steps: int = 0, warmup_ratio: float = 0.0) -> int:
    """``warmup_steps`` if set, else ``warmup_ratio`` of ``total_steps`` (rounded up)."""
    if warmup_steps:
        return int(warmup_steps)
    return int(math.ceil(warmup_ratio * total_steps))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    **options,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying schedule ``name`` to every parameter group.

    Raises:
        KeyError: unknown ``name``, listing the registered ones.
    """
    if name not in SCHEDULES:
        raise KeyError(f"unknown schedule {name!r}; registered: {sorted(SCHEDULES)}")
    multiplier = functools.partial(
        SCHEDULES[name], total_steps=total_steps, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, **options
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
