"""The CUDA C++ extension fastft._cuda: it loaded, and its kernels match torch.

Kernel-level tests of ``linear_cross_entropy_softmax_grad`` (csrc/linear_cross_entropy/)
against torch in float64 on random fp32 logits, and of the CUDA rows function against
the fp32 reference with DESIGN.md's tolerance rule. These need a GPU (``gpu`` marker);
the op-level comparison of ``backend="cuda"`` is in tests/test_linear_cross_entropy.py.
The few unmarked tests check, on the CPU, what must hold without any GPU: the tensor
checks that run before a pointer crosses into C++, and the architecture matching.
"""

import pytest
import torch
import torch.nn.functional as F

from fastft.ops import _cuda
from fastft.ops.linear_cross_entropy import _rows_torch

gpu = pytest.mark.gpu


def _random_logits(rows, vocab, *, offset=0, device="cuda"):
    """(rows, vocab) fp32 logits of scale ~3 (a peaked but not one-hot softmax); with
    ``offset`` > 0 they start that many floats into their buffer, so no row is 16-byte
    aligned and the kernel's scalar head/tail paths run."""
    buffer = torch.randn(offset + rows * vocab, device=device) * 3
    return buffer[offset:].view(rows, vocab)


def _reference(logits, labels, bias, label_smoothing, row_scale):
    """float64 loss, lse and d(sum(row_scale * loss)) / d logits, as torch computes them."""
    z = logits.double()
    if bias is not None:
        z = z + bias.double()
    z.requires_grad_()
    loss = F.cross_entropy(z, labels, reduction="none", label_smoothing=label_smoothing)
    (grad,) = torch.autograd.grad((loss * row_scale.double()).sum(), z)
    return loss.detach(), torch.logsumexp(z.detach(), dim=1), grad


# ---------------------------------------------------------------------------- GPU tests


@gpu
def test_extension_loaded_for_this_gpu():
    assert _cuda.load_error() is None, _cuda.load_error()
    info = _cuda.build_info()
    assert info.get("built") is True, info
    assert _cuda.device_reasons(torch.device("cuda")) == []
    assert hasattr(_cuda.module(), "linear_cross_entropy_softmax_grad")


@gpu
@pytest.mark.parametrize("vocab", [1, 50, 30522])
@pytest.mark.parametrize("rows", [1, 7, 113])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_softmax_grad_kernel_matches_torch(vocab, rows, bias_dtype, label_smoothing):
    offset = rows % 3  # rows 1, 7 misalign the buffer (offset 1); 113 -> offset 2
    logits = _random_logits(rows, vocab, offset=offset)
    original = logits.clone()
    labels = torch.randint(0, vocab, (rows,), device="cuda")
    bias = None if bias_dtype is None else torch.randn(vocab, device="cuda").to(bias_dtype)
    row_scale = torch.rand(rows, device="cuda") + 0.5
    grad_16 = torch.empty(rows, vocab, device="cuda", dtype=torch.bfloat16)

    loss, lse = _cuda.linear_cross_entropy_softmax_grad(
        logits, labels, bias=bias, label_smoothing=label_smoothing, row_scale=row_scale,
        write_in_place=True, grad_logits_16=grad_16)
    torch.cuda.synchronize()
    ref_loss, ref_lse, ref_grad = _reference(original, labels, bias, label_smoothing, row_scale)

    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.double(), ref_grad, rtol=1e-4, atol=1e-6)  # fp32 in place
    # The 16-bit copy is the fp32 gradient rounded once: within bf16's half-ulp (2^-9).
    torch.testing.assert_close(grad_16.double(), ref_grad.to(torch.bfloat16).double(), rtol=2 ** -7, atol=1e-6)


@gpu
@pytest.mark.parametrize("vocab", [7, 4099])
def test_softmax_grad_kernel_loss_only_leaves_logits_untouched(vocab):
    logits = _random_logits(5, vocab, offset=1)
    original = logits.clone()
    labels = torch.randint(0, vocab, (5,), device="cuda")
    bias = torch.randn(vocab, device="cuda", dtype=torch.float16)
    loss, _ = _cuda.linear_cross_entropy_softmax_grad(logits, labels, bias=bias, label_smoothing=0.2)
    ref_loss, _, _ = _reference(original, labels, bias, 0.2, torch.ones(5, device="cuda"))
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits, original)


@gpu
def test_softmax_grad_kernel_masked_vocab_and_fp16_copy():
    """-inf logits (a masked vocab entry) contribute nothing, without NaNs."""
    rows, vocab = 9, 1027
    logits = _random_logits(rows, vocab)
    labels = torch.randint(0, vocab, (rows,), device="cuda")
    bias = torch.randn(vocab, device="cuda")
    bias[torch.rand(vocab, device="cuda") < 0.3] = float("-inf")
    bias[labels] = 0.0  # targets stay finite
    row_scale = torch.rand(rows, device="cuda")
    original = logits.clone()
    grad_16 = torch.empty(rows, vocab, device="cuda", dtype=torch.float16)
    loss, _ = _cuda.linear_cross_entropy_softmax_grad(logits, labels, bias=bias, row_scale=row_scale,
                                                      grad_logits_16=grad_16)
    ref_loss, _, ref_grad = _reference(original, labels, bias, 0.0, row_scale)
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_16.double(), ref_grad.half().double(), rtol=2 ** -9, atol=1e-7)
    assert torch.equal(logits, original)  # only the 16-bit copy was asked for


@gpu
def test_softmax_grad_kernel_runs_on_the_current_stream():
    logits = _random_logits(64, 30522)
    labels = torch.randint(0, 30522, (64,), device="cuda")
    expected, _ = _cuda.linear_cross_entropy_softmax_grad(logits.clone(), labels)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        loss, _ = _cuda.linear_cross_entropy_softmax_grad(logits, labels)
        loss = loss * 1.0  # a torch op queued behind the kernel on the same stream
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)


def _same_dtype_rows(hidden, weight, bias, labels, label_smoothing, row_scale):
    """Plain torch in the input dtype (what an unfused model computes): the error baseline."""
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight)] + (
        [] if bias is None else [bias.detach().clone().requires_grad_()])
    logits = F.linear(leaves[0], leaves[1], leaves[2] if bias is not None else None)
    loss = F.cross_entropy(logits, labels.long(), reduction="none", label_smoothing=label_smoothing)
    grads = torch.autograd.grad((loss.float() * row_scale).sum(), leaves)
    return [loss.float()] + [g.float() for g in grads] + ([] if bias is not None else [None])


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk_logits", [None, 1000])  # 1000: many chunks of a few rows
def test_rows_function_within_tolerance_rule(monkeypatch, dtype, chunk_logits):
    if chunk_logits is not None:
        monkeypatch.setattr(_cuda, "LINEAR_CROSS_ENTROPY_CUDA_CHUNK_LOGITS", chunk_logits)
    rows, hidden_size, vocab = 113, 64, 333
    hidden = torch.randn(rows, hidden_size, device="cuda").to(dtype)
    weight = (torch.randn(vocab, hidden_size, device="cuda") / hidden_size ** 0.5).to(dtype)
    bias = (0.5 * torch.randn(vocab, device="cuda")).to(dtype)
    labels = torch.randint(0, vocab, (rows,), device="cuda", dtype=torch.int32)
    row_scale = torch.rand(rows, device="cuda")
    mask = [True, True, True]

    fused = _cuda.linear_cross_entropy_rows(hidden, weight, bias, labels, 0.1, row_scale, mask)
    # _rows_torch computes in fp32 (TF32 is off by default): the fp32 reference.
    reference = _rows_torch(hidden.float(), weight.float(), bias.float(), labels.long(), 0.1, row_scale, mask)
    same_dtype = _same_dtype_rows(hidden, weight, bias, labels, 0.1, row_scale)
    atol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    for name, f, s, r in zip(["loss", "grad_hidden", "grad_weight", "grad_bias"], fused, same_dtype, reference):
        assert f is not None and f.dtype == torch.float32 and f.shape == r.shape, name
        fused_err = (f - r).abs().max().item()
        baseline_err = (s - r).abs().max().item()
        bound = 2 * baseline_err + atol * max(1.0, r.abs().max().item())
        assert fused_err <= bound, f"{dtype} {name}: error {fused_err:.3g} > bound {bound:.3g}"

    # Loss only (no row_scale): no gradients, same loss.
    loss_only = _cuda.linear_cross_entropy_rows(hidden, weight, bias, labels, 0.1, None, mask)
    assert loss_only[1:] == (None, None, None)
    torch.testing.assert_close(loss_only[0], fused[0])


@gpu
@pytest.mark.slow
def test_softmax_grad_kernel_beyond_2_to_the_31_elements():
    """rows * V > 2^31 (8.6 GB of fp32 logits): offsets must be 64-bit. Only the last
    rows are compared, that is where 32-bit offsets would have wrapped around."""
    rows, vocab = 70_000, 30_720  # 2.15e9 elements
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2 ** 30:
        pytest.skip("needs ~18 GB of GPU memory")
    logits = torch.randn(rows, vocab, device="cuda")
    labels = torch.randint(0, vocab, (rows,), device="cuda")
    row_scale = torch.rand(rows, device="cuda")
    tail = logits[-3:].clone()
    loss, _ = _cuda.linear_cross_entropy_softmax_grad(logits, labels, row_scale=row_scale, write_in_place=True)
    ref_loss, _, ref_grad = _reference(tail, labels[-3:], None, 0.0, row_scale[-3:])
    torch.testing.assert_close(loss[-3:].double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[-3:].double(), ref_grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- CPU tests


def test_tensor_checks_run_before_any_pointer_crosses():
    logits, labels = torch.randn(3, 5), torch.randint(0, 5, (3,))
    with pytest.raises(ValueError, match="logits must be a CUDA tensor"):
        _cuda.linear_cross_entropy_softmax_grad(logits, labels)
    hidden, weight = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="hidden must be a CUDA tensor"):
        _cuda.linear_cross_entropy_rows(hidden, weight, None, labels, 0.0, None, [False] * 3)


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
    monkeypatch.setattr(_cuda, "build_info", lambda: {"archs": archs, "cuda_version": "13.0"})
    monkeypatch.setattr(_cuda, "_driver_cuda_version", lambda: (13, 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    reasons = _cuda.device_reasons(torch.device("cuda"))
    assert (reasons == []) == runs, reasons


@pytest.mark.parametrize("driver,runs", [((12, 8), False), ((13, 0), True), ((13, 2), True), (None, True)])
def test_device_reasons_match_driver(monkeypatch, driver, runs):
    monkeypatch.setattr(_cuda, "build_info", lambda: {"archs": ["90a"], "cuda_version": "13.0"})
    monkeypatch.setattr(_cuda, "_driver_cuda_version", lambda: driver)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    reasons = _cuda.device_reasons(torch.device("cuda"))
    assert (reasons == []) == runs, reasons
    if not runs:
        assert "driver supports CUDA 12.8" in reasons[0]
