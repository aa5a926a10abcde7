"""A stand-in GPU and ``fastft._cuda`` so that the CUDA backends' reasons run on a CPU.

``stand_in_gpu`` makes ``fastft._extension`` see a loaded extension with the given
bindings, built for ``archs`` with CUDA 13.0, a driver that supports it, and a device of
compute capability ``capability``. ``cuda_tensor`` makes tensors that say they live on a
CUDA device (fake tensors: metadata only, no storage), which is all a reasons function
reads. Import as ``from _cuda_stand_in import cuda_tensor, stand_in_gpu``.
"""

from __future__ import annotations

import types

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastft import _extension

BINDINGS = ("attention_forward", "attention_backward", "linear_cross_entropy_softmax_grad", "lora_fused_linear")


def _not_callable_here(name):
    def binding(**kwargs):
        raise AssertionError(f"the stand-in fastft._cuda cannot launch {name}")

    return binding


def stand_in_gpu(monkeypatch, *, capability=(9, 0), archs=("80", "90a"), bindings=BINDINGS) -> None:
    """Patch (through pytest's ``monkeypatch``, undone after the test) what the reasons read."""
    stand_in = types.SimpleNamespace(**{name: _not_callable_here(name) for name in bindings})
    monkeypatch.setattr(_extension, "_module", stand_in)
    monkeypatch.setattr(_extension, "_load_error", None)
    monkeypatch.setattr(_extension, "build_info", lambda: {"archs": list(archs), "cuda_version": "13.0"})
    monkeypatch.setattr(_extension, "_driver_cuda_version", lambda: (13, 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


_FAKE_MODE = FakeTensorMode()


def cuda_tensor(*shape: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """A tensor on ``cuda:0`` with this shape and dtype, and no data."""
    with _FAKE_MODE:
        return torch.empty(*shape, dtype=dtype, device="cuda")
