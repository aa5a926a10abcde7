"""The CUDA C++ extension ``fastft._cuda``, loaded once, and what every op's wrapper shares.

The extension takes raw device pointers, sizes and the caller's CUDA stream, and links
only the CUDA runtime. Each op's wrapper (``fastft/ops/<op>_cuda.py``) checks its tensors
(device, dtype, contiguity, shape) with the helpers here before a pointer crosses into
C++, and answers why it cannot run given inputs, starting from :func:`reasons`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

_BUILD_INFO = Path(__file__).resolve().parent / "_build_info.json"

_module = None
_load_error: str | None = None

try:  # the package must import and work without the extension
    from fastft import _cuda as _module  # type: ignore[attr-defined]
except ImportError as err:
    if _BUILD_INFO.exists():
        _load_error = json.loads(_BUILD_INFO.read_text()).get("error") or f"import failed: {err}"
    else:
        _load_error = "not built (installed with FASTFT_CUDA=0, or no nvcc at install time)"

# dtype codes shared with csrc/common.h
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def load_error() -> str | None:
    """None when the extension is importable, else why it is not."""
    return _load_error


def module():
    """The loaded ``fastft._cuda``; raises ``RuntimeError`` saying why when it is unavailable."""
    if _module is None:
        raise RuntimeError(f"fastft CUDA extension unavailable: {_load_error}")
    return _module


def build_info() -> dict:
    """What setup.py recorded about the build (archs, CUDA version, error); {} without a record."""
    return json.loads(_BUILD_INFO.read_text()) if _BUILD_INFO.exists() else {}


def _driver_cuda_version() -> tuple[int, int] | None:
    """CUDA version the installed NVIDIA driver supports, e.g. (12, 8); None if unknown."""
    getter = getattr(torch._C, "_cuda_getDriverVersion", None)  # private, absent on CPU builds
    try:
        version = int(getter()) if getter is not None else 0
    except (RuntimeError, OSError, TypeError, ValueError):
        return None
    return (version // 1000, version % 1000 // 10) if version > 0 else None


def _has_kernel_image(archs: Sequence[str], capability: tuple[int, int]) -> bool:
    """Whether a build for ``archs`` (FASTFT_CUDA_ARCHS entries) runs on ``capability``.

    SASS built for sm_XY runs on compute capability X.Y' with Y' >= Y; an ``a`` variant
    (sm_90a) only on exactly X.Y; ``+PTX`` entries JIT on any capability >= X.Y.
    """
    for arch in archs:
        ptx = arch.endswith("+PTX")
        number = arch.removesuffix("+PTX")
        exact = number.endswith("a")
        digits = number.removesuffix("a")
        built_for = (int(digits[:-1]), int(digits[-1]))
        if exact and capability == built_for:
            return True
        if not exact and capability[0] == built_for[0] and capability[1] >= built_for[1]:
            return True
        if ptx and capability >= built_for:
            return True
    return False


def device_reasons(device: torch.device) -> list[str]:
    """Why the built extension cannot run kernels on ``device`` (empty when it can).

    Two things the import cannot tell: the driver must support the CUDA major version
    the extension's static runtime was built with (a CUDA 13 build needs a 580+ driver),
    and the build must hold a kernel image for the GPU's compute capability.
    """
    info = build_info()
    found = []
    built_with = info.get("cuda_version")  # "13.0"
    driver = _driver_cuda_version()
    if built_with and driver is not None and driver[0] < int(built_with.split(".")[0]):
        found.append(f"the NVIDIA driver supports CUDA {driver[0]}.{driver[1]} but the extension was built "
                     f"with CUDA {built_with} (update the driver or rebuild with an older toolkit)")
    archs = info.get("archs") or []
    if not archs:  # no record (e.g. built by hand): let the launch itself report
        return found
    capability = tuple(torch.cuda.get_device_capability(device))
    if not _has_kernel_image(archs, capability):
        found.append(f"extension built for archs {';'.join(archs)}, not for compute capability "
                     f"{capability[0]}.{capability[1]} (rebuild with FASTFT_CUDA_ARCHS)")
    return found


def reasons(tensors: Sequence[torch.Tensor], *bindings: str) -> list[str]:
    """Why the extension's functions ``bindings`` cannot run on ``tensors`` (empty when they
    can): the extension is missing or was built without them, the tensors are not on a
    CUDA device, or the device's driver / architecture does not fit the build. Each op's
    wrapper adds what its own kernels support."""
    found = []
    if _module is None:
        found.append(f"CUDA extension unavailable: {_load_error}")
    else:
        found += [f"the CUDA extension was built without {name} (csrc/bindings.cpp does not bind it)"
                  for name in bindings if not hasattr(_module, name)]
    if not all(t.is_cuda for t in tensors):
        found.append("tensors are not on a CUDA device")
    if not found and tensors:
        found += device_reasons(tensors[0].device)
    return found


def stream_handle(device: torch.device) -> int:
    """The caller's current CUDA stream on ``device``, as the integer the bindings take."""
    return torch.cuda.current_stream(device).cuda_stream


def pointer(t: torch.Tensor | None) -> int:
    """Device address of ``t``'s data, 0 for an absent optional tensor."""
    return 0 if t is None else t.data_ptr()


def check_cuda_tensor(name: str, t: torch.Tensor, *, dtype=None, contiguous: bool = True, device=None) -> None:
    """Raise ``ValueError`` / ``TypeError`` naming ``name`` unless ``t`` is a CUDA tensor
    (on ``device`` when given) of ``dtype`` (one dtype or a tuple), contiguous when asked."""
    if not t.is_cuda:
        raise ValueError(f"{name} must be a CUDA tensor, got device {t.device}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    if dtype is not None and t.dtype not in (dtype if isinstance(dtype, tuple) else (dtype,)):
        raise TypeError(f"{name} has dtype {t.dtype}, expected {dtype}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
