"""Backend choice shared by every op (the xformers pattern).

Each backend answers, for the given inputs, the list of reasons it cannot run them; an
empty list means it can. ``backend="auto"`` (or the ``FASTFT_BACKEND`` environment
variable) takes the first backend with no reasons in the op's priority order; an
explicit backend that cannot run raises with its reasons.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence

import torch

BACKENDS = ("cuda", "triton", "torch")


def interpreting_triton() -> bool:
    """True when Triton kernels run on the CPU through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_reasons(tensors: Sequence[torch.Tensor]) -> list[str]:
    """Why the Triton backend cannot run on these tensors (shared by every op)."""
    reasons = []
    if importlib.util.find_spec("triton") is None:
        return ["triton is not installed"]
    on_cuda = all(t.is_cuda for t in tensors)
    if not on_cuda and not interpreting_triton():
        reasons.append("tensors are not on a CUDA device (set TRITON_INTERPRET=1 to run Triton on the CPU)")
    return reasons


def cuda_reasons(tensors: Sequence[torch.Tensor]) -> list[str]:
    """Why the CUDA C++ extension cannot run on these tensors (shared by every op)."""
    from fastft.ops import _cuda

    reasons = []
    if _cuda.load_error() is not None:
        reasons.append(f"CUDA extension unavailable: {_cuda.load_error()}")
    if not all(t.is_cuda for t in tensors):
        reasons.append("tensors are not on a CUDA device")
    if not reasons and tensors:  # a too-old driver or a GPU the build has no kernels for
        reasons += _cuda.device_reasons(tensors[0].device)
    return reasons


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
