"""The CUDA C++ extension fastft._cuda as fastft._extension loads it: it loaded for this GPU,
and the device checks every op's CUDA backend starts from (driver and architecture
against the build record, the extension's bindings) answer right, on the CPU against a
stand-in GPU. Each op's kernels are tested in tests/test_<op>.py.
"""

import re

import pytest
import torch
from _cuda_stand_in import BINDINGS, BINDINGS_CPP, check_call, cuda_tensor, parse_bindings, stand_in_gpu

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


# ---------------------------------------------------------------------------- the bindings as csrc/ writes them


def test_stand_in_knows_every_binding_of_csrc():
    """The parse of csrc/<op>/bindings.h finds each function the wrappers call, and its
    py::arg list names the bound C++ parameters in order: a re-ordered parameter would
    silently receive another argument's value."""
    assert set(BINDINGS_CPP) == set(BINDINGS)
    for binding in BINDINGS_CPP.values():
        assert binding.args, binding.name
        assert binding.args == tuple(name for _, name in binding.params), binding


def test_bindings_parse_catches_a_reordered_parameter(tmp_path):
    (tmp_path / "op").mkdir()
    (tmp_path / "op" / "op.h").write_text("void op_run(std::uintptr_t a, int rows, bool flag);\n")
    (tmp_path / "op" / "bindings.h").write_text(
        'm.def("op_run", &op_run, py::arg("a"), py::arg("flag"), py::arg("rows"));\n')
    binding = parse_bindings(tmp_path)["op_run"]
    assert binding.args != tuple(name for _, name in binding.params)


def test_a_call_that_does_not_fit_the_binding_fails(monkeypatch):
    good = dict(logits=8, rows=1, vocab=3, bias=0, bias_dtype=0, labels=16, label_smoothing=0.0, row_scale=0,
                write_in_place=False, grad_logits_16=0, grad_logits_16_dtype=0, loss=32, lse=0, stream=0)
    check_call("linear_cross_entropy_softmax_grad", good)
    renamed = {("vocab_size" if k == "vocab" else k): v for k, v in good.items()}
    reordered = dict(reversed(list(good.items())))
    wrong_type = {**good, "write_in_place": 1}
    for bad in (renamed, reordered, wrong_type):
        with pytest.raises(AssertionError):
            check_call("linear_cross_entropy_softmax_grad", bad)


def test_fastft_info_on_a_stand_in_gpu(monkeypatch):
    """`fastft info` on a CUDA machine: every op's reasons for every backend run with CUDA
    tensors (an undefined name on that path, like issue 15's `arch_reasons`, raised here)."""
    from fastft import info

    stand_in_gpu(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "stand-in H200")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)

    def typical_inputs(op_name, device):
        if op_name == "attention":
            q = cuda_tensor(1, 2, 16, 64, dtype=torch.bfloat16)
            return q, q, q
        return cuda_tensor(8, 64, dtype=torch.bfloat16), cuda_tensor(32, 64, dtype=torch.bfloat16)

    monkeypatch.setattr(info, "_typical_inputs", typical_inputs)
    text = info.report()
    assert "device: stand-in H200" in text and "CUDA extension: loaded" in text
    for op in ("attention", "linear_cross_entropy", "lora_linear"):
        section = text.split(f"  {op}:")[1].split("\n  ")[0:4]
        assert any(line.strip().startswith("cuda    yes") for line in section), text


def test_built_extension_has_the_parsed_signatures():
    """Where the extension is built (CI builds it: FASTFT_CUDA=1), the signatures pybind11
    reports are the argument lists the stand-in checks every call against."""
    if _extension.load_error() is not None:
        pytest.skip(f"fastft._cuda not built here: {_extension.load_error()}")
    module = _extension.module()
    for name, binding in BINDINGS_CPP.items():
        signature = getattr(module, name).__doc__.splitlines()[0]
        assert signature.startswith(f"{name}("), signature
        names = re.findall(r"[(,] ?([A-Za-z_][A-Za-z_0-9]*):", signature)
        assert tuple(names) == binding.args, (name, names)
