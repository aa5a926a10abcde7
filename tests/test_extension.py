"""The CUDA C++ extension fastft._cuda as fastft._extension loads it: it loaded for this GPU,
and the device checks every op's CUDA backend starts from (driver and architecture
against the build record, the extension's bindings) answer right, on the CPU against a
stand-in GPU. Each op's kernels are tested in tests/test_<op>.py.
"""

import pytest
import torch
from _cuda_stand_in import BINDINGS, cuda_tensor, stand_in_gpu

from fastft import _extension

# ---------------------------------------------------------------------------- GPU tests


@pytest.mark.gpu
def test_extension_loaded_for_this_gpu():
    assert _extension.load_error() is None, _extension.load_error()
    info = _extension.build_info()
    assert info.get("built") is True, info
    assert _extension.device_reasons(torch.device("cuda")) == []
    assert _extension.reasons([torch.empty(1, device="cuda")], *BINDINGS) == []


# ---------------------------------------------------------------------------- CPU tests


@pytest.mark.parametrize(
    "archs,capability,runs",
    [
        (["80", "90a"], (8, 0), True),
        (["80", "90a"], (8, 9), True),  # sm_80 SASS runs on any 8.x at or above 8.0
        (["80", "90a"], (9, 0), True),
        (["80", "90a"], (10, 0), False),  # no SASS for Blackwell, no PTX to JIT
        (["90a"], (8, 6), False),
        (["80+PTX"], (12, 0), True),  # PTX JITs forward
        (["86"], (8, 0), False),  # SASS does not run on an older minor
    ],
)
def test_device_reasons_match_architectures(monkeypatch, archs, capability, runs):
    monkeypatch.setattr(_extension, "build_info", lambda: {"archs": archs, "cuda_version": "13.0"})
    monkeypatch.setattr(_extension, "_driver_cuda_version", lambda: (13, 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    reasons = _extension.device_reasons(torch.device("cuda"))
    assert (reasons == []) == runs, reasons


@pytest.mark.parametrize("driver,runs", [((12, 8), False), ((13, 0), True), ((13, 2), True), (None, True)])
def test_device_reasons_match_driver(monkeypatch, driver, runs):
    monkeypatch.setattr(_extension, "build_info", lambda: {"archs": ["90a"], "cuda_version": "13.0"})
    monkeypatch.setattr(_extension, "_driver_cuda_version", lambda: driver)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    reasons = _extension.device_reasons(torch.device("cuda"))
    assert (reasons == []) == runs, reasons
    if not runs:
        assert "driver supports CUDA 12.8" in reasons[0]


def test_reasons_list_everything_that_blocks_a_launch(monkeypatch):
    stand_in_gpu(monkeypatch, bindings=("attention_forward",))
    assert _extension.reasons([cuda_tensor(2, 3)], "attention_forward") == []
    found = _extension.reasons([cuda_tensor(2, 3), torch.randn(2)], "attention_forward", "lora_fused_linear")
    assert found == ["the CUDA extension was built without lora_fused_linear (csrc/bindings.cpp does not bind it)",
                     "tensors are not on a CUDA device"]
    monkeypatch.setattr(_extension, "_module", None)
    monkeypatch.setattr(_extension, "_load_error", "not built")
    assert _extension.reasons([cuda_tensor(2, 3)], "attention_forward") == ["CUDA extension unavailable: not built"]


def test_reasons_check_the_device_against_the_build(monkeypatch):
    stand_in_gpu(monkeypatch, capability=(12, 0), archs=("80", "90a"))
    found = _extension.reasons([cuda_tensor(2, 3)])
    assert len(found) == 1 and "not for compute capability 12.0" in found[0]
