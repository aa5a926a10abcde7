"""linear_cross_entropy against the fp32 full-logits reference, every backend.

Tolerance rule (DESIGN.md, tests/_tolerance.py): the fused result's error against the
fp32 reference is at most 2x the error of the same-dtype plain-torch computation against
that reference, plus a small atol. Fresh random inputs every time, outputs and every
gradient. The CUDA backend's pieces (fastft/ops/linear_cross_entropy_cuda.py: the
softmax-grad kernel of csrc/linear_cross_entropy/ against float64 torch, and its rows
function) are also tested directly on a GPU (marker ``gpu``); their tensor checks and
refusal reasons run on the CPU.
"""

import importlib
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from _cuda_stand_in import cuda_tensor, stand_in_gpu
from _tolerance import assert_tolerance_rule

from fastft.ops import linear_cross_entropy, linear_cross_entropy_cuda, linear_cross_entropy_ref
from fastft.ops.linear_cross_entropy import LossOutput, _rows_torch, backend_reasons
from fastft.ops.linear_cross_entropy_cuda import linear_cross_entropy_rows, linear_cross_entropy_softmax_grad

LCE_MODULE = importlib.import_module("fastft.ops.linear_cross_entropy")  # fastft.ops.linear_cross_entropy is the function
BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("triton", id="triton", marks=pytest.mark.interpret),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def device_for(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def make_inputs(rows, hidden_size, vocab, dtype, device, *, bias=False, ignored="some", batch_shape=None):
    """Random inputs at a realistic scale (hidden ~ N(0,1), weight ~ N(0, 1/H)) so logits
    are O(1) and the softmax is neither flat nor one-hot."""
    shape = batch_shape or (rows,)
    hidden = torch.randn(*shape, hidden_size, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, device=device) / hidden_size**0.5).to(dtype).requires_grad_()
    b = (0.5 * torch.randn(vocab, device=device)).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, shape, device=device)
    if ignored == "some":
        labels[torch.rand(shape, device=device) < 0.4] = -100
    elif ignored == "all":
        labels.fill_(-100)
    return hidden, weight, b, labels


def run(fn, hidden, weight, bias, labels, reduction, **kwargs):
    """Loss and the gradients of a random projection of it w.r.t. every input."""
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    for t in inputs:
        t.grad = None
    loss = fn(hidden, weight, labels, bias=bias, reduction=reduction, **kwargs)
    upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1)).to(loss.device)
    grads = torch.autograd.grad((loss.float() * upstream).sum(), inputs, allow_unused=True)
    return [loss.detach().float()] + [g.float() if g is not None else None for g in grads]


def assert_loss_and_grads_within_rule(fused, same_dtype, reference, dtype, what):
    for name, f, s, r in zip(["loss", "grad_hidden", "grad_weight", "grad_bias"], fused, same_dtype, reference):
        if r is not None:
            assert_tolerance_rule(f"{what} {name}", f, r, s, atol=ATOL[dtype], relative_atol=True)


def check_against_reference(backend, dtype, rows, hidden_size, vocab, reduction, *, bias=False,
                            ignored="some", label_smoothing=0.0, batch_shape=None, device=None):
    device = device or device_for(backend)
    hidden, weight, b, labels = make_inputs(rows, hidden_size, vocab, dtype, device, bias=bias,
                                            ignored=ignored, batch_shape=batch_shape)
    kwargs = dict(label_smoothing=label_smoothing)
    fused = run(lambda *a, **k: linear_cross_entropy(*a, backend=backend, **k), hidden, weight, b, labels, reduction, **kwargs)
    reference = run(linear_cross_entropy_ref, hidden, weight, b, labels, reduction, **kwargs)
    same_dtype = run(lambda *a, **k: linear_cross_entropy_ref(*a, upcast=False, **k), hidden, weight, b, labels, reduction, **kwargs)
    # On CPU, fp16/bf16 plain torch is often exact to fp32 on tiny problems: measure its
    # error in fp32 instead would hide nothing, the atol covers the 16-bit rounding.
    assert_loss_and_grads_within_rule(fused, same_dtype, reference, dtype, f"{backend}/{dtype}/{reduction}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("rows,hidden_size,vocab", [(1, 16, 50), (7, 40, 1), (113, 32, 333)])
def test_matches_reference_fp32(backend, reduction, rows, hidden_size, vocab):
    check_against_reference(backend, torch.float32, rows, hidden_size, vocab, reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matches_reference_16bit(backend, dtype):
    check_against_reference(backend, dtype, 113, 48, 257, "mean", bias=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignored", ["none", "some", "all"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ignored_rows_and_smoothing_and_bias(backend, ignored, reduction):
    check_against_reference(backend, torch.float32, 37, 24, 90, reduction, bias=True, ignored=ignored,
                            label_smoothing=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_hidden_shape(backend):
    check_against_reference(backend, torch.float32, None, 16, 64, "none", batch_shape=(3, 5))


def test_bert_vocab_size_torch():
    check_against_reference("torch", torch.float32, 7, 32, 30522, "mean", bias=True, label_smoothing=0.1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_backend_16bit_sizes(dtype):
    for rows, vocab in [(1, 1), (7, 50), (113, 30522)]:
        check_against_reference("torch", dtype, rows, 32, vocab, "sum", bias=True, label_smoothing=0.05)


def test_all_ignored_mean_is_nan_with_zero_grads_like_cross_entropy():
    hidden, weight, _, labels = make_inputs(5, 8, 11, torch.float32, "cpu", ignored="all")
    loss = linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    expected = F.cross_entropy(F.linear(hidden, weight), labels)
    assert torch.isnan(loss) and torch.isnan(expected)
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0


def test_empty_batch():
    hidden, weight, _, labels = make_inputs(0, 8, 11, torch.float32, "cpu")
    assert linear_cross_entropy(hidden, weight, labels, reduction="sum").item() == 0.0
    assert linear_cross_entropy(hidden, weight, labels, reduction="none").shape == (0,)
    assert torch.isnan(linear_cross_entropy(hidden, weight, labels))


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_gets_no_gradient_and_hidden_still_does(backend):
    hidden, weight, _, labels = make_inputs(9, 8, 11, torch.float32, device_for(backend))
    weight.requires_grad_(False)
    linear_cross_entropy(hidden, weight, labels, backend=backend).backward()
    expected = torch.autograd.grad(linear_cross_entropy_ref(hidden, weight, labels), hidden)[0]
    assert weight.grad is None
    torch.testing.assert_close(hidden.grad, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_labels_transposed_weight_and_smoothing_without_reduction(backend):
    """A weight stored transposed (e.g. a tied embedding viewed as (V, H)) and int32 labels."""
    device = device_for(backend)
    hidden, _, _, labels = make_inputs(23, 16, 40, torch.float32, device)
    weight = (torch.randn(16, 40, device=device) / 4).T.requires_grad_()  # (V, H), not contiguous
    fused = run(lambda *a, **k: linear_cross_entropy(*a, backend=backend, **k), hidden, weight, None,
                labels.int(), "none", label_smoothing=0.1)
    reference = run(linear_cross_entropy_ref, hidden, weight, None, labels, "none", label_smoothing=0.1)
    for f, r in zip(fused, reference):
        if r is not None:
            torch.testing.assert_close(f, r, rtol=1e-4, atol=1e-5)


def test_no_grad_forward_matches():
    hidden, weight, _, labels = make_inputs(9, 8, 11, torch.float32, "cpu")
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels),
                                   linear_cross_entropy_ref(hidden, weight, labels))


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda h, w, y: (h, w[:, :-1], y), ValueError, "weight must have shape"),
        (lambda h, w, y: (h, w.double(), y), TypeError, "weight dtype"),
        (lambda h, w, y: (h, w, y.float()), TypeError, "labels must be int64"),
        (lambda h, w, y: (h, w, y[:-1]), ValueError, "labels must have shape"),
        (lambda h, w, y: (h, w, torch.where(y >= 0, y + 11, y)), ValueError, r"labels must be in \[0, 11\)"),
        (lambda h, w, y: (h, w, y.clone().fill_(-5)), ValueError, "found -5"),
        (lambda h, w, y: (h.long(), w, y), TypeError, "hidden must be a floating-point"),
        (lambda h, w, y: (h, w[:0], y), ValueError, "at least one row"),
    ],
)
def test_bad_input_is_named(change, error, match):
    hidden, weight, _, labels = make_inputs(6, 8, 11, torch.float32, "cpu", ignored="none")
    with pytest.raises(error, match=match):
        linear_cross_entropy(*change(hidden.detach(), weight.detach(), labels))


def test_bad_options_and_backend():
    hidden, weight, _, labels = make_inputs(6, 8, 11, torch.float32, "cpu")
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, labels, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        linear_cross_entropy(hidden, weight, labels, label_smoothing=1.5)
    with pytest.raises(ValueError, match="bias must have shape"):
        linear_cross_entropy(hidden, weight, labels, bias=torch.zeros(3))
    with pytest.raises(ValueError, match="backend must be one of"):
        linear_cross_entropy(hidden, weight, labels, backend="fast")
    # The CUDA backend cannot take CPU tensors: an explicit request raises with its reasons.
    with pytest.raises(ValueError, match="backend='cuda' cannot run.*not on a CUDA device"):
        linear_cross_entropy(hidden, weight, labels, backend="cuda")


def test_env_override_selects_backend(monkeypatch):
    hidden, weight, _, labels = make_inputs(6, 8, 11, torch.float32, "cpu")
    monkeypatch.setenv("FASTFT_BACKEND", "cuda")
    with pytest.raises(ValueError, match="backend='cuda'"):
        linear_cross_entropy(hidden, weight, labels)
    monkeypatch.setenv("FASTFT_BACKEND", "torch")
    torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels), linear_cross_entropy_ref(hidden, weight, labels))


def test_opcheck():
    hidden, weight, bias, labels = make_inputs(13, 8, 21, torch.float32, "cpu", bias=True)
    op = torch.ops.fastft.linear_cross_entropy.default
    for reduction, grad_mask in [("mean", [True, True, True]), ("none", [True, True, True]), ("sum", [False, False, False])]:
        # grad_mask says which inputs require grad, as the public function derives it
        h, w, b = (t.detach().requires_grad_(need) for t, need in zip((hidden, weight, bias), grad_mask))
        torch.library.opcheck(op, (h.reshape(-1, 8), w, b, labels.reshape(-1), -100, reduction, 0.1, "torch", grad_mask,
                                   "ieee", None, 0.0, 0.0, False, False))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(reduction):
    hidden, weight, bias, labels = make_inputs(17, 8, 21, torch.float32, "cpu", bias=True)
    compiled = torch.compile(lambda h, w, y, b: linear_cross_entropy(h, w, y, bias=b, reduction=reduction),
                             fullgraph=True, backend="aot_eager")
    got = run(lambda h, w, y, bias, reduction: compiled(h, w, y, bias), hidden, weight, bias, labels, reduction)
    want = run(linear_cross_entropy_ref, hidden, weight, bias, labels, reduction)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_torch_backend_peak_memory_is_bounded_by_a_chunk():
    """In a fresh process, read the kernel's peak-RSS counter around each call. Doubling
    the tokens doubles naive's peak (it holds the full logits) but must leave the torch
    backend's peak where it was (it holds one chunk), far below one copy of the logits."""
    script = textwrap.dedent("""
        import re, torch
        from fastft.ops import linear_cross_entropy, linear_cross_entropy_ref
        def rss(field):
            return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
        def peak_extra(fn):
            open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS counter
            before = rss("VmRSS")
            fn()
            return rss("VmHWM") - before
        torch.manual_seed(0)
        hidden_size, vocab = 64, 8192
        w = (torch.randn(vocab, hidden_size) / 8).requires_grad_()
        for tokens in (2048, 4096):
            h = torch.randn(tokens, hidden_size, requires_grad=True)
            y = torch.randint(0, vocab, (tokens,))
            for f in (linear_cross_entropy, linear_cross_entropy_ref):  # warm up allocator and kernels
                f(h[:64], w, y[:64]).backward()
            h.grad = w.grad = None
            fused = peak_extra(lambda: linear_cross_entropy(h, w, y).backward())
            h.grad = w.grad = None
            naive = peak_extra(lambda: linear_cross_entropy_ref(h, w, y).backward())
            print(tokens, fused, naive)
    """)
    # A fixed mmap threshold makes glibc return every large freed block to the OS, so the
    # resident-set peak tracks live tensors instead of the allocator's caching.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    (_, fused_small, naive_small), (_, fused_large, naive_large) = [
        tuple(map(int, line.split())) for line in out.stdout.split("\n") if line.strip()]
    logits_small = 2048 * 8192 * 4  # 64 MiB
    assert naive_small >= logits_small and naive_large >= 2 * logits_small, out.stdout
    assert fused_large < fused_small + logits_small / 8, f"fused peak grew with tokens: {out.stdout}"
    assert fused_large < naive_large / 5, f"fused peak not far below naive: {out.stdout}"


def test_reduced_loss_backward_holds_one_weight_gradient():
    """loss.backward() of a reduced loss: the gradients computed in the forward pass are
    scaled in place and become .grad, and autograd gets no zero-filled gradients for the
    op's other outputs; so forward+backward needs the gradients plus one chunk of logits,
    not a second (V, H) weight gradient (measured in a fresh process, as above)."""
    script = textwrap.dedent("""
        import importlib, re, torch
        from fastft.ops import linear_cross_entropy
        module = importlib.import_module("fastft.ops.linear_cross_entropy")
        module.CHUNK_LOGITS = 1 << 20  # 4 MiB chunks
        def rss(field):
            return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
        torch.manual_seed(0)
        tokens, hidden_size, vocab = 512, 256, 32768  # weight gradient: 32 MiB
        h = torch.randn(tokens, hidden_size, requires_grad=True)
        w = (torch.randn(vocab, hidden_size) / 16).requires_grad_()
        y = torch.randint(0, vocab, (tokens,))
        for _ in range(2):  # warm up, then measure
            h.grad = w.grad = None
            open("/proc/self/clear_refs", "w").write("5")
            before = rss("VmRSS")
            (2.0 * linear_cross_entropy(h, w, y)).backward()
            print(rss("VmHWM") - before - (h.numel() + w.numel()) * 4)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    extra = int(out.stdout.split()[-1])
    chunk, weight_gradient = 4 << 20, 32 << 20
    assert extra < chunk + weight_gradient / 4, f"{extra / 2**20:.1f} MiB beyond the gradients (chunk: 4 MiB)"


# --------------------------------------------------------------------------- CUDA backend, directly


def _random_logits(rows, vocab, *, offset=0, device="cuda"):
    """(rows, vocab) fp32 logits of scale ~3 (a peaked but not one-hot softmax); with
    ``offset`` > 0 they start that many floats into their buffer, so no row is 16-byte
    aligned and the kernel's scalar head/tail paths run."""
    buffer = torch.randn(offset + rows * vocab, device=device) * 3
    return buffer[offset:].view(rows, vocab)


def _softmax_grad_reference(logits, labels, bias, label_smoothing, row_scale):
    """float64 loss, lse and d(sum(row_scale * loss)) / d logits, as torch computes them."""
    z = logits.double()
    if bias is not None:
        z = z + bias.double()
    z.requires_grad_()
    loss = F.cross_entropy(z, labels, reduction="none", label_smoothing=label_smoothing)
    (grad,) = torch.autograd.grad((loss * row_scale.double()).sum(), z)
    return loss.detach(), torch.logsumexp(z.detach(), dim=1), grad


@pytest.mark.gpu
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

    loss, lse = linear_cross_entropy_softmax_grad(
        logits, labels, bias=bias, label_smoothing=label_smoothing, row_scale=row_scale,
        write_in_place=True, grad_logits_16=grad_16)
    torch.cuda.synchronize()
    ref_loss, ref_lse, ref_grad = _softmax_grad_reference(original, labels, bias, label_smoothing, row_scale)

    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.double(), ref_grad, rtol=1e-4, atol=1e-6)  # fp32 in place
    # The 16-bit copy is the fp32 gradient rounded once: within bf16's half-ulp (2^-9).
    torch.testing.assert_close(grad_16.double(), ref_grad.to(torch.bfloat16).double(), rtol=2 ** -7, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [7, 4099])
def test_softmax_grad_kernel_loss_only_leaves_logits_untouched(vocab):
    logits = _random_logits(5, vocab, offset=1)
    original = logits.clone()
    labels = torch.randint(0, vocab, (5,), device="cuda")
    bias = torch.randn(vocab, device="cuda", dtype=torch.float16)
    loss, _ = linear_cross_entropy_softmax_grad(logits, labels, bias=bias, label_smoothing=0.2)
    ref_loss, _, _ = _softmax_grad_reference(original, labels, bias, 0.2, torch.ones(5, device="cuda"))
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits, original)


@pytest.mark.gpu
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
    loss, _ = linear_cross_entropy_softmax_grad(logits, labels, bias=bias, row_scale=row_scale,
                                                      grad_logits_16=grad_16)
    ref_loss, _, ref_grad = _softmax_grad_reference(original, labels, bias, 0.0, row_scale)
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_16.double(), ref_grad.half().double(), rtol=2 ** -9, atol=1e-7)
    assert torch.equal(logits, original)  # only the 16-bit copy was asked for


@pytest.mark.gpu
def test_softmax_grad_kernel_runs_on_the_current_stream():
    logits = _random_logits(64, 30522)
    labels = torch.randint(0, 30522, (64,), device="cuda")
    expected, _ = linear_cross_entropy_softmax_grad(logits.clone(), labels)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        loss, _ = linear_cross_entropy_softmax_grad(logits, labels)
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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk_logits", [None, 1000])  # 1000: many chunks of a few rows
def test_cuda_rows_function_within_tolerance_rule(monkeypatch, dtype, chunk_logits):
    if chunk_logits is not None:
        monkeypatch.setattr(linear_cross_entropy_cuda, "CHUNK_LOGITS", chunk_logits)
        monkeypatch.setattr(linear_cross_entropy_cuda, "MIN_CHUNK_ROWS", 1)
    rows, hidden_size, vocab = 113, 64, 333
    hidden = torch.randn(rows, hidden_size, device="cuda").to(dtype)
    weight = (torch.randn(vocab, hidden_size, device="cuda") / hidden_size ** 0.5).to(dtype)
    bias = (0.5 * torch.randn(vocab, device="cuda")).to(dtype)
    labels = torch.randint(0, vocab, (rows,), device="cuda", dtype=torch.int32)
    row_scale = torch.rand(rows, device="cuda")
    mask = [True, True, True]

    fused = linear_cross_entropy_rows(hidden, weight, bias, labels, 0.1, row_scale, mask)
    # _rows_torch computes in fp32 (TF32 is off by default): the fp32 reference.
    reference = _rows_torch(hidden.float(), weight.float(), bias.float(), labels.long(), 0.1, row_scale, mask)
    same_dtype = _same_dtype_rows(hidden, weight, bias, labels, 0.1, row_scale)
    assert all(f is not None and f.dtype == torch.float32 for f in fused)
    assert_loss_and_grads_within_rule(fused, same_dtype, reference, dtype, "cuda rows")

    # Loss only (no row_scale): no gradients, same loss.
    loss_only = linear_cross_entropy_rows(hidden, weight, bias, labels, 0.1, None, mask)
    assert loss_only[1:] == (None, None, None)
    torch.testing.assert_close(loss_only[0], fused[0])


@pytest.mark.gpu
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
    loss, _ = linear_cross_entropy_softmax_grad(logits, labels, row_scale=row_scale, write_in_place=True)
    ref_loss, _, ref_grad = _softmax_grad_reference(tail, labels[-3:], None, 0.0, row_scale[-3:])
    torch.testing.assert_close(loss[-3:].double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[-3:].double(), ref_grad, rtol=1e-4, atol=1e-6)


def test_cuda_tensor_checks_run_before_any_pointer_crosses():
    logits, labels = torch.randn(3, 5), torch.randint(0, 5, (3,))
    with pytest.raises(ValueError, match="logits must be a CUDA tensor"):
        linear_cross_entropy_softmax_grad(logits, labels)
    hidden, weight = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="hidden must be a CUDA tensor"):
        linear_cross_entropy_rows(hidden, weight, None, labels, 0.0, None, [False] * 3)


@pytest.mark.parametrize("capability,dtype,runs", [
    ((9, 0), torch.bfloat16, True),
    ((8, 0), torch.float32, True),
    ((10, 0), torch.bfloat16, False),  # no kernel image in the build (archs 80;90a)
])
def test_cuda_reasons_on_a_stand_in_gpu(monkeypatch, capability, dtype, runs):
    """The CUDA backend's reasons (what `auto` asks first on a GPU) run here against a
    stand-in GPU and extension."""
    stand_in_gpu(monkeypatch, capability=capability)
    hidden, weight = cuda_tensor(8, 64, dtype=dtype), cuda_tensor(32, 64, dtype=dtype)
    found = backend_reasons(hidden, weight)["cuda"]()
    assert (found == []) == runs, found
    stand_in_gpu(monkeypatch, bindings=("attention_forward",))
    assert any("built without linear_cross_entropy_softmax_grad" in r for r in backend_reasons(hidden, weight)["cuda"]())


# --------------------------------------------------------------------------- CUDA backend on a CPU
# The emulating stand-in (tests/_cuda_stand_in.py) runs every line of
# fastft/ops/linear_cross_entropy_cuda.py on CPU tensors, checks each launch against the
# binding in csrc/, and computes what the kernel would (fp32 math, 16-bit rounding of the
# gradient copy), so the wrapper's chunking and scaling are checked by the numbers.


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_backend_on_the_stand_in(monkeypatch, dtype, reduction):
    stand_in = stand_in_gpu(monkeypatch, emulate=True)
    check_against_reference("cuda", dtype, 113, 48, 257, reduction, bias=True, label_smoothing=0.1, device="cpu")
    assert {name for name, _ in stand_in.calls} == {"linear_cross_entropy_softmax_grad"}


@pytest.mark.parametrize("plan", [(True, "addmm"), (True, "baddbmm"), (True, "mm_add"), (False, "mm_add")],
                         ids=["addmm", "baddbmm", "mm_add", "upcast"])
def test_cuda_backend_each_gemm_form_on_the_stand_in(monkeypatch, plan):
    """Every way the wrapper can run its fp32-output GEMMs (what _gemm_plan probes on a
    GPU), forced in turn: fp32 accumulation into dW with 16-bit inputs, or fp32 GEMMs on
    upcast copies when the torch build has no fp32-output 16-bit GEMM."""
    stand_in_gpu(monkeypatch, emulate=True)
    monkeypatch.setattr(linear_cross_entropy_cuda, "_gemm_plan",
                        lambda device, dtype: linear_cross_entropy_cuda._GemmPlan(*plan))
    check_against_reference("cuda", torch.float16, 113, 48, 257, "mean", bias=True, device="cpu")


def test_cuda_chunks_keep_the_weight_gradient_gemm_compute_bound(monkeypatch):
    """Each chunk read-modify-writes the fp32 (V, H) weight gradient: chunks of 2^24
    logits were 130 rows at V = 128256 (8 B·V·H of traffic per 130 rows, ~8x the GEMM).
    At least 1024 rows per chunk whatever V, in whole 128-row tiles."""
    for tokens, vocab in [(8192, 128256), (8192, 30522), (2458, 30522), (300, 128256)]:
        chunks = linear_cross_entropy_cuda.chunk_plan(tokens, vocab)
        assert chunks[0][0] == 0 and chunks[-1][1] == tokens
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
        assert chunks[0][1] - chunks[0][0] >= min(tokens, 1024)
        assert all((end - start) % 128 == 0 for start, end in chunks[:-1])
    assert len(linear_cross_entropy_cuda.chunk_plan(8192, 128256)) <= 8
    # The launches the wrapper makes: one per chunk, 1024 rows then the rest.
    stand_in = stand_in_gpu(monkeypatch, emulate=True)
    hidden, weight, _, labels = make_inputs(1100, 8, 20000, torch.float32, "cpu", ignored="none")
    linear_cross_entropy(hidden, weight, labels, backend="cuda").backward()
    assert [kwargs["rows"] for _, kwargs in stand_in.calls] == [1024, 76]


def _grad_scaler_fp16_grads(hidden, weight, labels, scale=2.0**16):
    """What fp16 training with torch autocast computes: fp16 logits, the cross-entropy in
    fp32, the loss times GradScaler's initial scale, backward in fp16, gradients divided
    by the scale in fp32."""
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
    loss = F.cross_entropy(F.linear(*leaves).float(), labels)
    grads = torch.autograd.grad(loss * scale, leaves)
    return [loss.detach().float()] + [g.float() / scale for g in grads]


def check_fp16_mean_gradients(backend, device, rows=600, hidden_size=32, vocab=30522):
    """The mean's 1/count row scale must not be applied before dlogits are rounded to
    fp16: softmax / count is ~1e-8 here, below fp16's smallest subnormal (6e-8), so 90+%
    of the logit gradients flushed to zero (dH, dW ~1% off). The bar is plain fp16 torch
    with GradScaler's loss scaling, the way fp16 training is actually run."""
    hidden, weight, _, labels = make_inputs(rows, hidden_size, vocab, torch.float16, device, ignored="none")
    fused = run(lambda *a, **k: linear_cross_entropy(*a, backend=backend, **k), hidden, weight, None, labels, "mean")
    reference = run(linear_cross_entropy_ref, hidden, weight, None, labels, "mean")
    # run() backpropagates a random multiple of the loss: give the baseline the same upstream.
    upstream = torch.randn((), generator=torch.Generator().manual_seed(1)).item()
    scaled = _grad_scaler_fp16_grads(hidden, weight, labels)
    baseline = [scaled[0]] + [g * upstream for g in scaled[1:]]
    for name, f, r, b in zip(["loss", "grad_hidden", "grad_weight"], fused, reference, baseline):
        assert_tolerance_rule(f"fp16 mean {name}", f, r, b, atol=1e-3 if name == "loss" else 1e-6,
                              relative_atol=True)


def test_cuda_fp16_gradients_of_a_mean_do_not_underflow(monkeypatch):
    stand_in_gpu(monkeypatch, emulate=True)
    check_fp16_mean_gradients("cuda", "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_fp16_gradients_of_a_mean_do_not_underflow(backend):
    """The real 1/count scale of a mean over 2458 rows at BERT's vocabulary, on the GPU."""
    probe = torch.empty(1, 8, device="cuda", dtype=torch.float16)
    if backend_reasons(probe, probe)[backend]():
        pytest.skip(f"{backend}: " + "; ".join(backend_reasons(probe, probe)[backend]()))
    check_fp16_mean_gradients(backend, "cuda", rows=2458, hidden_size=768)


# --------------------------------------------------------------------------- loss options (issue 17)
# class_weights, softcap, z-loss (lse_square_scale / return_z_loss) and return_accuracy,
# on the torch backend and Triton (interpreter), against materialised logits +
# F.cross_entropy in float64 with the tolerance rule (the plain-torch baseline is the same
# reference in fp32). The CUDA backend refuses them (auto skips it).

LOSS_BACKENDS = BACKENDS[:2]
OPTION_SETS = {
    "softcap": dict(softcap=2.0),
    "zloss": dict(lse_square_scale=1e-2, return_z_loss=True),
    "weights": dict(class_weights="random"),
    "weights+smoothing": dict(class_weights="random", label_smoothing=0.1),
    "accuracy": dict(return_accuracy=True),
    "all": dict(class_weights="random", label_smoothing=0.1, softcap=3.0, lse_square_scale=1e-2,
                return_z_loss=True, return_accuracy=True),
}


def run_options(fn, hidden, weight, bias, labels, reduction, **kwargs):
    """[loss, z_loss, accuracy, grad_hidden, grad_weight, grad_bias] of ``fn`` (z_loss /
    accuracy None when not asked); the gradients of a random projection of the loss."""
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    out = fn(hidden, weight, labels, bias=bias, reduction=reduction, **kwargs)
    out = out if isinstance(out, LossOutput) else LossOutput(out)
    upstream = torch.randn(out.loss.shape, generator=torch.Generator().manual_seed(1)).to(out.loss.device)
    grads = list(torch.autograd.grad((out.loss * upstream.to(out.loss.dtype)).sum(), inputs))
    grads += [None] * (3 - len(grads))
    return [out.loss.detach(), out.z_loss, out.accuracy] + grads


def check_options(backend, reduction, rows, hidden_size, vocab, *, bias=True, ignored="some", dtype=torch.float32,
                  **options):
    device = device_for(backend)
    hidden, weight, b, labels = make_inputs(rows, hidden_size, vocab, dtype, device, bias=bias, ignored=ignored)
    if options.get("class_weights") == "random":
        options["class_weights"] = torch.rand(vocab, device=device) * 2 + 0.05
    fused = run_options(lambda *a, **k: linear_cross_entropy(*a, backend=backend, **k), hidden, weight, b, labels,
                        reduction, **options)
    leaves64 = [None if t is None else t.detach().double().requires_grad_() for t in (hidden, weight, b)]
    options64 = {**options, "class_weights": None if options.get("class_weights") is None
                 else options["class_weights"].double()}
    reference = run_options(linear_cross_entropy_ref, *leaves64[:2], leaves64[2], labels, reduction, **options64)
    plain = run_options(lambda *a, **k: linear_cross_entropy_ref(*a, upcast=False, **k), hidden, weight, b, labels,
                        reduction, **options)
    what = f"{backend}/{dtype}/{reduction}/{sorted(options)}"
    names = ["loss", "z_loss", "accuracy", "grad_hidden", "grad_weight", "grad_bias"]
    for name, f, r, p in zip(names, fused, reference, plain):
        if r is None:
            assert f is None, f"{what}: {name} returned but not asked for"
            continue
        if name == "accuracy":  # argmax == label of the materialised logits: exactly
            assert f.dtype == (torch.bool if reduction == "none" else torch.float32), f.dtype
            assert f.shape == r.shape and (torch.equal(f, r) if reduction == "none" else
                                           (math.isnan(f) and math.isnan(r)) or abs(f.item() - r.item()) < 1e-6), \
                f"{what}: accuracy {f} != {r}"
            continue
        assert f.dtype == torch.float32 if name in ("loss", "z_loss") else f.dtype == dtype
        assert_tolerance_rule(f"{what} {name}", f.float(), r, p.float(), atol=ATOL[dtype], relative_atol=True)
    return fused


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", ["softcap", "zloss", "weights+smoothing", "all"])
def test_loss_options_match_reference(backend, reduction, options):
    check_options(backend, reduction, 37, 40, 133, **OPTION_SETS[options])


@pytest.mark.parametrize("options", list(OPTION_SETS))
@pytest.mark.parametrize("rows,hidden_size,vocab", [(1, 16, 50), (7, 40, 1), (113, 32, 333)])
def test_loss_options_odd_sizes_torch(options, rows, hidden_size, vocab):
    for reduction in ("mean", "sum", "none"):
        check_options("torch", reduction, rows, hidden_size, vocab, **OPTION_SETS[options])


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("ignored", ["none", "all"])
def test_loss_options_with_no_or_all_rows_ignored(backend, ignored):
    for reduction in ("mean", "none"):
        check_options(backend, reduction, 23, 24, 90, ignored=ignored, bias=False, **OPTION_SETS["all"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_loss_options_16bit_torch(dtype):
    check_options("torch", "mean", 113, 48, 257, dtype=dtype, **OPTION_SETS["all"])


@pytest.mark.interpret
def test_loss_options_fp16_triton():
    check_options("triton", "sum", 37, 40, 133, dtype=torch.float16, **OPTION_SETS["all"])


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_loss_options_on_the_batched_shape(backend):
    device = device_for(backend)
    hidden, weight, _, labels = make_inputs(None, 16, 64, torch.float32, device, batch_shape=(3, 5))
    out = linear_cross_entropy(hidden, weight, labels, reduction="none", lse_square_scale=0.1, return_z_loss=True,
                               return_accuracy=True, backend=backend)
    ref = linear_cross_entropy_ref(hidden, weight, labels, reduction="none", lse_square_scale=0.1, return_z_loss=True,
                                   return_accuracy=True)
    assert out.loss.shape == out.z_loss.shape == out.accuracy.shape == (3, 5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.z_loss, ref.z_loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.accuracy, ref.accuracy)


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_z_loss_is_scale_times_lse_squared_and_included_in_the_loss(backend):
    device = device_for(backend)
    hidden, weight, _, labels = make_inputs(29, 16, 70, torch.float32, device)
    scale = 1e-3
    logits = F.linear(hidden.detach().double(), weight.detach().double())
    labelled = labels != -100
    z_rows = scale * torch.logsumexp(logits, dim=1) ** 2 * labelled
    ce = F.cross_entropy(logits, labels, reduction="none")
    for reduction, reduce in [("none", lambda t: t), ("sum", torch.sum), ("mean", lambda t: t.sum() / labelled.sum())]:
        out = linear_cross_entropy(hidden, weight, labels, reduction=reduction, lse_square_scale=scale,
                                   return_z_loss=True, backend=backend)
        assert isinstance(out, LossOutput) and out.accuracy is None
        torch.testing.assert_close(out.z_loss.double(), reduce(z_rows), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out.loss.double(), reduce(ce + z_rows), rtol=1e-5, atol=1e-5)
        assert not out.z_loss.requires_grad  # for logging: the loss carries its gradient
    # return_z_loss without a scale: a zero z-loss, the plain loss.
    out = linear_cross_entropy(hidden, weight, labels, return_z_loss=True, backend=backend)
    assert out.z_loss.item() == 0.0
    torch.testing.assert_close(out.loss, linear_cross_entropy_ref(hidden, weight, labels))


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_class_weights_match_cross_entropy_weight(backend):
    """mean divides by the sum of the labelled rows' target weights, smoothing is weighted
    as F.cross_entropy does; a zero weight silences its class."""
    device = device_for(backend)
    hidden, weight, _, labels = make_inputs(41, 16, 30, torch.float32, device)
    class_weights = torch.rand(30, device=device) + 0.1
    class_weights[3] = 0.0
    logits = F.linear(hidden.detach().double(), weight.detach().double())
    for reduction in ("mean", "sum", "none"):
        for smoothing in (0.0, 0.2):
            got = linear_cross_entropy(hidden, weight, labels, reduction=reduction, label_smoothing=smoothing,
                                       class_weights=class_weights, backend=backend)
            want = F.cross_entropy(logits, labels, weight=class_weights.double(), reduction=reduction,
                                   label_smoothing=smoothing)
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_accuracy_is_argmax_of_the_softcapped_logits(backend):
    device = device_for(backend)
    hidden, weight, _, labels = make_inputs(57, 16, 40, torch.float32, device)
    # Make about half the labels the argmax, so the accuracy is neither 0 nor 1.
    logits = F.linear(hidden.detach(), weight.detach())
    hit = torch.rand(57, device=device) < 0.5
    labels = torch.where(hit & (labels != -100), logits.argmax(dim=1), labels)
    labelled = labels != -100
    correct = (logits.argmax(dim=1) == labels) & labelled
    for softcap in (None, 1.5):
        rows = linear_cross_entropy(hidden, weight, labels, reduction="none", softcap=softcap, return_accuracy=True,
                                    backend=backend)
        assert rows.z_loss is None and rows.accuracy.dtype == torch.bool
        assert torch.equal(rows.accuracy, correct)
        for reduction in ("mean", "sum"):
            frac = linear_cross_entropy(hidden, weight, labels, reduction=reduction, softcap=softcap,
                                        return_accuracy=True, backend=backend).accuracy
            assert frac.dtype == torch.float32 and frac.shape == ()
            assert abs(frac.item() - correct.sum().item() / labelled.sum().item()) < 1e-6
    assert 0 < correct.sum() < labelled.sum()


def test_softcap_gradient_goes_through_the_tanh():
    hidden, weight, bias, labels = make_inputs(5, 6, 9, torch.float64, "cpu", bias=True, ignored="none")
    torch.autograd.gradcheck(
        lambda h, w, b: linear_cross_entropy_ref(h, w, labels, bias=b, softcap=1.5, upcast=False),
        (hidden, weight, bias))  # the float64 reference itself is right
    leaves = [t.detach().float().requires_grad_() for t in (hidden, weight, bias)]
    got = torch.autograd.grad(linear_cross_entropy(leaves[0], leaves[1], labels, bias=leaves[2], softcap=1.5),
                              leaves)
    want = torch.autograd.grad(linear_cross_entropy_ref(hidden, weight, labels, bias=bias, softcap=1.5),
                               (hidden, weight, bias))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "options,error,match",
    [
        (dict(class_weights=torch.ones(10)), ValueError, r"class_weights must have shape \(11,\)"),
        (dict(class_weights=torch.ones(11, dtype=torch.int64)), TypeError, "class_weights must be a floating-point"),
        (dict(class_weights=torch.ones(11, device="meta")), ValueError, "class_weights is on meta"),
        (dict(class_weights=torch.ones(11).index_fill_(0, torch.tensor([4]), -1.0)), ValueError,
         "class_weights must be finite and >= 0; found -1"),
        (dict(class_weights=torch.ones(11).index_fill_(0, torch.tensor([2]), math.nan)), ValueError,
         "class_weights must be finite and >= 0; found nan"),
        (dict(class_weights=[1.0] * 11), TypeError, "class_weights must be a torch.Tensor"),
        (dict(softcap=0.0), ValueError, "softcap must be a finite number > 0"),
        (dict(softcap=-2.0), ValueError, "softcap must be a finite number > 0"),
        (dict(softcap=math.inf), ValueError, "softcap must be a finite number > 0"),
        (dict(lse_square_scale=-1e-4), ValueError, "lse_square_scale must be a finite number >= 0"),
        (dict(lse_square_scale=math.nan), ValueError, "lse_square_scale must be a finite number >= 0"),
    ],
)
def test_bad_loss_options_are_named(options, error, match):
    hidden, weight, _, labels = make_inputs(6, 8, 11, torch.float32, "cpu")
    with pytest.raises(error, match=match) as raised:
        linear_cross_entropy(hidden, weight, labels, **options)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("options,named", [
    (dict(softcap=30.0), "softcap"),
    (dict(lse_square_scale=1e-4), "z-loss"),
    (dict(class_weights="ones"), "class_weights"),
    (dict(return_accuracy=True), "return_accuracy"),
])
def test_cuda_backend_refuses_the_loss_options_and_auto_takes_triton(monkeypatch, options, named):
    """On a (stand-in) GPU where the CUDA backend runs plain calls, a call with any of the
    new options: its reasons name the option, an explicit backend="cuda" raises one line,
    and auto picks Triton without ever calling the CUDA rows function."""
    stand_in_gpu(monkeypatch, emulate=True)
    hidden, weight, _, labels = make_inputs(9, 8, 20, torch.float32, "cpu")
    if options.get("class_weights") == "ones":
        options = {**options, "class_weights": torch.ones(20)}
    assert backend_reasons(hidden, weight)["cuda"]() == []  # plain calls: CUDA can
    reasons = backend_reasons(hidden, weight, **options)["cuda"]()
    assert len(reasons) == 1 and "no softcap / z-loss / class weights / accuracy yet" in reasons[0]
    assert named in reasons[0]
    with pytest.raises(ValueError, match=f"backend='cuda' cannot run.*{named}") as raised:
        linear_cross_entropy(hidden, weight, labels, backend="cuda", **options)
    assert "\n" not in str(raised.value)

    # auto, as on a GPU (these CPU tensors pass for CUDA ones here): record what runs.
    ran = []

    def cuda_rows(*args):
        ran.append("cuda")
        raise AssertionError("auto tried the CUDA backend")

    def triton_rows(hidden, weight, bias, labels, smoothing, row_scale, grad_mask, extras=None):
        ran.append("triton")
        args = (hidden, weight, bias, labels, smoothing, row_scale, grad_mask, "ieee")
        return _rows_torch(*args) if extras is None else _rows_torch(*args, extras)

    real_choose = LCE_MODULE.choose_backend
    monkeypatch.setattr(LCE_MODULE, "choose_backend",
                        lambda op, requested, reasons, priority, device: real_choose(
                            op, requested, reasons, priority, torch.device("cuda")))
    monkeypatch.setitem(LCE_MODULE.ROWS, "cuda", cuda_rows)
    monkeypatch.setitem(LCE_MODULE.ROWS, "triton", triton_rows)
    out = linear_cross_entropy(hidden, weight, labels, **options)
    loss = out.loss if isinstance(out, LossOutput) else out
    loss.backward()
    assert ran == ["triton"]
    ref = linear_cross_entropy_ref(hidden, weight, labels, **options)
    torch.testing.assert_close(loss, ref.loss if isinstance(ref, LossOutput) else ref)
    ran.clear()
    with pytest.raises(AssertionError, match="auto tried the CUDA backend"):  # plain calls still go to CUDA
        linear_cross_entropy(hidden, weight, labels)


def test_opcheck_with_loss_options():
    hidden, weight, bias, labels = make_inputs(13, 8, 21, torch.float32, "cpu", bias=True)
    class_weights = torch.rand(21) + 0.1
    op = torch.ops.fastft.linear_cross_entropy.default
    for reduction in ("mean", "none"):
        h, w, b = (t.detach().requires_grad_() for t in (hidden, weight, bias))
        torch.library.opcheck(op, (h.reshape(-1, 8), w, b, labels.reshape(-1), -100, reduction, 0.1, "torch",
                                   [True, True, True], "ieee", class_weights, 2.0, 1e-2, True, True))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph_with_loss_options(reduction):
    hidden, weight, bias, labels = make_inputs(17, 8, 21, torch.float32, "cpu", bias=True)
    options = dict(class_weights=torch.rand(21) + 0.1, softcap=2.0, lse_square_scale=1e-2, label_smoothing=0.1,
                   return_z_loss=True, return_accuracy=True)

    def fn(h, w, y, b):
        return linear_cross_entropy(h, w, y, bias=b, reduction=reduction, **options)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = run_options(lambda h, w, y, bias, reduction: compiled(h, w, y, bias), hidden, weight, bias, labels, reduction)
    want = run_options(lambda h, w, y, bias, reduction: fn(h, w, y, bias), hidden, weight, bias, labels, reduction)
    for g, w in zip(got, want):
        if g.dtype == torch.bool:
            assert torch.equal(g, w)
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- gradient filtering (Triton, opt-in)
#
# FASTFT_LOSS_GRAD_FILTER=on: the Triton backward skips every (row block, vocab block) tile
# whose |dlogits| are all at most eps x the row's scale (Cut Cross-Entropy's gradient
# filtering; kernels/linear_cross_entropy.py, _grad_filter_eps).

FILTER_ENV = "FASTFT_LOSS_GRAD_FILTER"


def _triton_kernels():
    return importlib.import_module("fastft.kernels.linear_cross_entropy")


def _peaked_inputs(dtype, *, rows=113, hidden_size=64, vocab=333, confidence=20.0, seed=0):
    """A softmax as peaked as a trained LM's: unit-norm weight rows, hidden = c * W[t] + a
    little noise, so the logit of the predicted token t is ~c and the others ~N(0, (c/8)^2):
    the tail probabilities are ~1e-6, below bf16's 2^-12. Most rows predict their label
    (nothing in any tile is significant); the rows of the first row block whose labels are
    1, 2, 3 predict token 0 instead (p_0 ~ 1, dlogit ~ -1 at the label): only the tile
    (row block 0, vocab block 0) holds significant gradients."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden_size, generator=g)
    weight /= weight.norm(dim=1, keepdim=True)
    labels = torch.randint(4, vocab, (rows,), generator=g)
    labels[[3, 17, 40]] = torch.tensor([1, 2, 3])
    predicted = labels.clone()
    predicted[[3, 17, 40]] = 0
    hidden = confidence * weight[predicted] + 0.05 * torch.randn(rows, hidden_size, generator=g)
    bias = 0.1 * torch.randn(vocab, generator=g)
    row_scale = 0.5 + torch.rand(rows, generator=g)
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype), labels, row_scale


def _triton_rows(monkeypatch, switch, hidden, weight, bias, labels, row_scale, label_smoothing=0.0):
    monkeypatch.setenv(FILTER_ENV, switch)
    return _triton_kernels().linear_cross_entropy_rows(hidden, weight, bias, labels, label_smoothing, row_scale,
                                                       [True, True, True])


@pytest.mark.interpret
def test_grad_filter_skips_negligible_tiles_within_the_bound(monkeypatch):
    """bf16, peaked softmax: the filtered gradients differ from the unfiltered ones by
    exactly the skipped tiles' contributions (recomputed in float64), and by less than
    the bound ``sum over skipped columns of eps * scale * |W|`` (|h| for dW, 1 for dbias)."""
    kernels = _triton_kernels()
    hidden, weight, bias, labels, row_scale = _peaked_inputs(torch.bfloat16)
    eps = kernels._grad_filter_eps(torch.bfloat16, 0.0)
    assert eps == 2.0**-12
    off = _triton_rows(monkeypatch, "off", hidden, weight, bias, labels, row_scale)
    on = _triton_rows(monkeypatch, "on", hidden, weight, bias, labels, row_scale)
    assert torch.equal(on[0], off[0])  # the loss is the forward's: untouched

    # Which tiles the kernel must skip: the interpreter's one config gives the tile shape.
    block = kernels.BWD_CONFIGS[0].kwargs
    block_m, block_v = block["BLOCK_M"], block["BLOCK_V"]
    rows, vocab = labels.numel(), weight.shape[0]
    h64, w64, b64 = hidden.double(), weight.double(), bias.double()
    probs = torch.softmax(h64 @ w64.T + b64, dim=1)
    dlogits = row_scale.double()[:, None] * (probs - F.one_hot(labels, vocab).double())  # (M, V)
    relative = dlogits.abs() / row_scale.double()[:, None]
    tile_max = F.pad(relative, (0, -vocab % block_v, 0, -rows % block_m)).reshape(
        -(-rows // block_m), block_m, -(-vocab // block_v), block_v).amax(dim=(1, 3))  # (row blocks, vocab blocks)
    # No tile within a factor 2 of the threshold, so the kernel's fp32 decision is this one.
    assert ((tile_max < eps / 2) | (tile_max > 2 * eps)).all(), tile_max
    skipped = tile_max < eps
    assert skipped.sum() == skipped.numel() - 1 and not skipped[0, 0], skipped  # 11 of 12 tiles
    skip_elements = skipped.repeat_interleave(block_m, 0)[:rows].repeat_interleave(block_v, 1)[:, :vocab]  # (M, V)
    dropped = torch.where(skip_elements, dlogits, 0.0)

    # Bound: |sum_{j skipped} d_ij W_jk| <= sum_j |d_ij| |W_jk| <= eps * r_i * sum_j |W_jk|
    # (x (1 + 2^-8): the kernel rounds dlogits to bf16 for the dot), plus fp32 slack for
    # the atomics summing a different set of terms.
    scale_bound = eps * (1 + 2.0**-8) * torch.where(skip_elements, row_scale.double()[:, None], 0.0)
    bounds = (scale_bound @ w64.abs(), scale_bound.T @ h64.abs(), scale_bound.sum(dim=0))
    expected_drops = (dropped @ w64, dropped.T @ h64, dropped.sum(dim=0))
    for name, g_off, g_on, bound, expected in zip(("hidden", "weight", "bias"), off[1:], on[1:], bounds,
                                                  expected_drops):
        diff = (g_off.double() - g_on.double())
        slack = 2.0**-22 * g_off.abs().max().item()  # a few fp32 ulps of the largest partial sum
        assert (diff.abs() <= bound + slack).all(), (name, (diff.abs() - bound).max())
        assert diff.abs().max() > 8 * slack, name  # skipping happened and changed the result
        # ... by the skipped tiles' share. Not to 2^-8 (the bf16 rounding of dlogits): a row
        # predicting its label has p_y - 1 ~ -1.5e-5 from exp(z_y - lse) with lse ~ 20 in
        # fp32 (steps of 2^-19), ~10% uncertain. A wrong tile skipped would differ by
        # >= eps * scale ~ 2.4e-4, 16x the largest share, and fail the bound above anyway.
        assert (diff - expected).abs().max() <= 2.0**-3 * expected.abs().max() + slack, name
        print(f"{name}: max |filtered - unfiltered| {diff.abs().max():.3g}, bound (max) {bound.max():.3g}, "
              f"gradient max {g_off.abs().max():.3g}")


@pytest.mark.interpret
def test_grad_filter_never_touches_fp32_or_smoothing(monkeypatch):
    """fp32 inputs never filter, nor does a smoothed loss (its -e/V term is systematic):
    bitwise equal to the switch off."""
    hidden, weight, bias, labels, row_scale = _peaked_inputs(torch.float32)
    assert _triton_kernels()._grad_filter_eps(torch.float32, 0.0) == 0.0
    off = _triton_rows(monkeypatch, "off", hidden, weight, bias, labels, row_scale)
    on = _triton_rows(monkeypatch, "on", hidden, weight, bias, labels, row_scale)
    for a, b in zip(off, on):
        assert torch.equal(a, b)
    hidden, weight, bias = (t.to(torch.bfloat16) for t in (hidden, weight, bias))
    off = _triton_rows(monkeypatch, "off", hidden, weight, bias, labels, row_scale, label_smoothing=0.1)
    on = _triton_rows(monkeypatch, "on", hidden, weight, bias, labels, row_scale, label_smoothing=0.1)
    for a, b in zip(off, on):
        assert torch.equal(a, b)


@pytest.mark.parametrize("value", ["1", "ON", "true", ""])
def test_grad_filter_bad_switch_raises(monkeypatch, value):
    hidden, weight, bias, labels, row_scale = _peaked_inputs(torch.float32)  # raises before any kernel runs
    with pytest.raises(ValueError, match=f"{FILTER_ENV}=.*expected 'off'.*or 'on'"):
        _triton_rows(monkeypatch, value, hidden, weight, bias, labels, row_scale)
