"""Python face of the CUDA C++ extension ``fastft._cuda``.

The extension takes raw device pointers, sizes and the caller's CUDA stream, and links
only the CUDA runtime. Every check on tensors (device, dtype, contiguity, shape) happens
here, before a pointer crosses into C++.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

_module = None
_load_error: str | None = None

try:  # the package must import and work without the extension
    from fastft import _cuda as _module  # type: ignore[attr-defined]
except ImportError as err:
    info_path = Path(__file__).resolve().parent.parent / "_build_info.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        why = info.get("error") or f"import failed: {err}"
    else:
        why = "not built (installed with FASTFT_CUDA=0, or no nvcc at install time)"
    _load_error = why

# dtype codes shared with csrc/common.h
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def load_error() -> str | None:
    """None when the extension is importable, else why it is not."""
    return _load_error


def module():
    if _module is None:
        raise RuntimeError(f"fastft CUDA extension unavailable: {_load_error}")
    return _module


def build_info() -> dict:
    path = Path(__file__).resolve().parent.parent / "_build_info.json"
    return json.loads(path.read_text()) if path.exists() else {}


def stream_handle(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def check_cuda_tensor(name: str, t: torch.Tensor, *, dtype=None, contiguous: bool = True, device=None) -> None:
    if not t.is_cuda:
        raise ValueError(f"{name} must be a CUDA tensor, got device {t.device}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    if dtype is not None and t.dtype not in (dtype if isinstance(dtype, tuple) else (dtype,)):
        raise TypeError(f"{name} has dtype {t.dtype}, expected {dtype}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
