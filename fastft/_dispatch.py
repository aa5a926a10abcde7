"""Backend choice shared by every op (the xformers pattern).

Each backend answers, for the given inputs, the list of reasons it cannot run them; an
empty list means it can. Those answers live with the backends (``fastft/ops/<op>_cuda.py``
for CUDA, the op's file for Triton and torch); each op hands them here as a dict.
``backend="auto"`` (or the ``FASTFT_BACKEND`` environment variable) takes the first
backend with no reasons in the op's priority order; an explicit backend that cannot run
raises with its reasons. This module only walks that list: it knows no backend.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

BACKENDS = ("cuda", "triton", "torch")


def choose_backend(
    op_name: str,
    requested: str,
    reasons: dict[str, Callable[[], list[str]]],
    priority: Sequence[str],
    device: torch.device,
) -> str:
    """Return the backend to run ``op_name`` with, or raise ``ValueError`` listing why none can.

    ``reasons`` maps each backend name to a zero-argument function returning the reasons
    that backend cannot run the current inputs. Under ``auto``, inputs on ``device`` CPU
    always get ``torch`` (the Triton interpreter is for testing, never a default).
    """
    if requested == "auto":
        requested = os.environ.get("FASTFT_BACKEND", "auto").strip().lower() or "auto"
    if requested not in ("auto", *BACKENDS):
        raise ValueError(f"{op_name}: backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {requested!r}")
    if requested != "auto":
        refusal = reasons[requested]()
        if refusal:
            raise ValueError(f"{op_name}: backend={requested!r} cannot run these inputs: " + "; ".join(refusal))
        return requested
    if device.type == "cpu":
        return "torch"
    collected = {}
    for name in priority:
        refusal = reasons[name]()
        if not refusal:
            return name
        collected[name] = refusal
    detail = "; ".join(f"{name}: {', '.join(r)}" for name, r in collected.items())
    raise ValueError(f"{op_name}: no backend can run these inputs ({detail})")
