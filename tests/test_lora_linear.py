"""fastft.ops.lora_linear against lora_linear_ref: outputs and every gradient, torch backend
on the CPU, Triton under the interpreter, CUDA / Triton on a GPU (marker gpu).

Tolerance rule (DESIGN.md, tests/_tolerance.py): error of the op vs the fp32 reference
<= 2 x error of the same computation in plain torch at the input dtype vs that reference,
+ a small atol.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from _cuda_stand_in import cuda_tensor, stand_in_gpu
from _tolerance import assert_tolerance_rule

from fastft import _extension
from fastft.kernels._common import dropout_params, mix32
from fastft.ops.lora_linear import (
    backend_reasons,
    dequantize_weight_int8,
    dropout_keep_mask,
    lora_linear,
    lora_linear_ref,
    quantize_weight_int8,
)

# The module itself: the attribute fastft.ops.lora_linear is the function of that name.
lora_module = importlib.import_module("fastft.ops.lora_linear")

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
SCALING = 0.75


def make_inputs(tokens, in_features, out_features, rank, dtype, *, device="cpu", bias=True,
                weight_grad=False, bias_grad=False, int8=False, batch_shape=()):
    """Fresh random leaves (never zeros: B is random too, unlike LoRA's init)."""
    x = torch.randn(*batch_shape, tokens, in_features, device=device, dtype=dtype)
    weight = torch.randn(out_features, in_features, device=device) / in_features**0.5
    weight_scale = None
    if int8:
        weight, weight_scale = quantize_weight_int8(weight)
    else:
        weight = weight.to(dtype).requires_grad_(weight_grad)
    b = (torch.randn(out_features, device=device, dtype=dtype).requires_grad_(bias_grad) if bias else None)
    lora_a = (torch.randn(rank, in_features, device=device, dtype=dtype) / in_features**0.5)
    lora_b = torch.randn(out_features, rank, device=device, dtype=dtype) / rank**0.5
    return dict(x=x.requires_grad_(), weight=weight, bias=b, lora_a=lora_a.requires_grad_(),
                lora_b=lora_b.requires_grad_(), weight_scale=weight_scale)


def _leaves(inputs):
    return [t for name, t in inputs.items() if t is not None and name != "weight_scale" and t.requires_grad]


def _clone_as(inputs, dtype):
    out = {}
    for name, t in inputs.items():
        if t is None or name == "weight_scale" or (name == "weight" and t.dtype == torch.int8):
            out[name] = t
        else:
            out[name] = t.detach().to(dtype).requires_grad_(t.requires_grad)
    return out


def _run(fn, inputs, grad_out):
    y = fn(inputs)
    grads = torch.autograd.grad(y, _leaves(inputs), grad_out.to(y.dtype))
    return [y, *grads]


def assert_matches_reference(inputs, scaling=SCALING, dropout_p=0.0, seed=0, backend="torch", atol_scale=1.0):
    """The op (backend) vs the fp32 reference with the explicit mask, outputs and grads."""
    x = inputs["x"]
    dtype = x.dtype
    mask = None
    if dropout_p > 0:
        mask = dropout_keep_mask(seed, dropout_p, x.numel() // x.shape[-1], x.shape[-1],
                                 device=x.device).reshape(x.shape)

    def fast(t):
        return lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], scaling,
                           dropout_p=dropout_p, seed=seed, weight_scale=t["weight_scale"], backend=backend)

    def ref(upcast):
        def fn(t):
            return lora_linear_ref(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], scaling,
                                   dropout_mask=mask, dropout_p=dropout_p, weight_scale=t["weight_scale"],
                                   upcast=upcast)
        return fn

    grad_out = torch.randn(*x.shape[:-1], (inputs["lora_b"].shape[0]), device=x.device)
    got = _run(fast, inputs, grad_out)
    same_dtype = _run(ref(False), _clone_as(inputs, dtype), grad_out)
    exact = _run(ref(True), _clone_as(inputs, torch.float32), grad_out)
    names = ["y"] + [n for n, t in inputs.items() if t is not None and n != "weight_scale" and t.requires_grad]
    assert got[0].dtype == dtype and got[0].shape == exact[0].shape
    for name, g, s, e in zip(names, got, same_dtype, exact):
        assert_tolerance_rule(name, g, e, s, atol=ATOL[dtype] * atol_scale, relative_atol=True)
    return got


# --------------------------------------------------------------------------- torch backend

SHAPES = [  # (tokens, in, out, rank): odd sizes, not multiples of 16
    (1, 16, 8, 1),
    (7, 37, 29, 8),
    (113, 50, 70, 8),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_torch_matches_reference(dtype, shape, dropout_p):
    assert_matches_reference(make_inputs(*shape, dtype), dropout_p=dropout_p, seed=1234)


@pytest.mark.parametrize("weight_grad,bias,bias_grad", [
    (True, True, True), (True, True, False), (False, True, True), (False, False, False), (True, False, False),
])
def test_weight_and_bias_gradients(weight_grad, bias, bias_grad):
    inputs = make_inputs(7, 24, 20, 4, torch.float32, bias=bias, weight_grad=weight_grad, bias_grad=bias_grad)
    assert_matches_reference(inputs, dropout_p=0.2, seed=7)
    y = lora_linear(inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_a"], inputs["lora_b"], 1.0)
    y.sum().backward()
    assert (inputs["weight"].grad is not None) == weight_grad
    if bias:
        assert (inputs["bias"].grad is not None) == bias_grad


def test_batched_input_shape():
    inputs = make_inputs(5, 24, 12, 4, torch.float32, batch_shape=(2, 3))
    got = assert_matches_reference(inputs, dropout_p=0.1, seed=3)
    assert got[0].shape == (2, 3, 5, 12)


def test_rank_one_and_zero_tokens():
    assert_matches_reference(make_inputs(9, 33, 17, 1, torch.float32))
    inputs = make_inputs(0, 16, 8, 2, torch.float32)
    y = lora_linear(inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_a"], inputs["lora_b"], 1.0)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert inputs["lora_a"].grad.abs().sum() == 0 and inputs["lora_b"].grad.shape == (8, 2)


# --------------------------------------------------------------------------- dropout


def _forward(inputs, **kwargs):
    return lora_linear(inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_a"], inputs["lora_b"],
                       SCALING, **kwargs)


def test_dropout_reproducible_for_a_seed():
    inputs = make_inputs(31, 40, 24, 8, torch.float32)
    first = _forward(inputs, dropout_p=0.4, seed=99)
    again = _forward(inputs, dropout_p=0.4, seed=99)
    other = _forward(inputs, dropout_p=0.4, seed=100)
    no_dropout = _forward(inputs)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert not torch.allclose(first, no_dropout)
    # seed=None draws from torch's generator (or the one given): reproducible under manual_seed.
    torch.manual_seed(5)
    drawn = _forward(inputs, dropout_p=0.4)
    torch.manual_seed(5)
    assert torch.equal(drawn, _forward(inputs, dropout_p=0.4))
    gen_a, gen_b = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    assert torch.equal(_forward(inputs, dropout_p=0.4, generator=gen_a),
                       _forward(inputs, dropout_p=0.4, generator=gen_b))


@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 0.9])
def test_dropout_mask_keep_rate_and_independence(dropout_p):
    keep = dropout_keep_mask(2024, dropout_p, 300, 700).float()
    n = keep.numel()
    sigma = (dropout_p * (1 - dropout_p) / n) ** 0.5
    assert abs(keep.mean().item() - (1 - dropout_p)) < 5 * sigma
    # Neighbouring rows / columns and nearby seeds are not correlated (hash, not a counter).
    other_seed = dropout_keep_mask(2025, dropout_p, 300, 700).float()
    agree = (keep == other_seed).float().mean().item()
    expected = dropout_p**2 + (1 - dropout_p) ** 2
    assert abs(agree - expected) < 5 * (expected * (1 - expected) / n) ** 0.5
    assert not torch.equal(keep[1:], keep[:-1]) and not torch.equal(keep[:, 1:], keep[:, :-1])


def _python_keep(seed, dropout_p, token, feature):
    """The documented mask definition, in plain Python integers."""
    key, threshold = dropout_params(dropout_p, seed)
    return (mix32(mix32(key ^ token) ^ feature) >> 8) >= threshold


def _check_mask_against_python(device):
    seed, dropout_p = 0xDEADBEEF1234, 0.37  # a seed above 2^32: only seed mod 2^32 matters
    keep = dropout_keep_mask(seed, dropout_p, 40, 300, row_offset=1000, device=device).cpu()
    picks = torch.randint(0, 40 * 300, (400,)).tolist()
    for flat in picks:
        token, feature = divmod(flat, 300)
        assert bool(keep[token, feature]) == _python_keep(seed, dropout_p, 1000 + token, feature)


def test_dropout_mask_matches_its_definition():
    _check_mask_against_python("cpu")


@pytest.mark.gpu
def test_dropout_mask_matches_its_definition_on_gpu():
    _check_mask_against_python("cuda")


def test_dropout_mask_offset_is_a_slice():
    full = dropout_keep_mask(8, 0.5, 20, 33)
    assert torch.equal(full[5:12], dropout_keep_mask(8, 0.5, 7, 33, row_offset=5))


def test_backward_saves_no_mask_and_no_activation_copy():
    inputs = make_inputs(64, 48, 40, 4, torch.float32)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = _forward(inputs, dropout_p=0.5, seed=1)
    x = inputs["x"]
    assert any(t.data_ptr() == x.data_ptr() for t in saved)  # the hook does see what is saved
    big = [t for t in saved if t.numel() >= x.numel()]
    # Only x itself (by reference) and the frozen weight are activation-sized; no mask.
    assert all(t.data_ptr() in (x.data_ptr(), inputs["weight"].data_ptr()) for t in big)
    assert all(t.dtype != torch.bool for t in saved)
    y.sum().backward()


# --------------------------------------------------------------------------- int8 weights


def test_quantize_weight_int8_error_bound():
    weight = torch.randn(37, 129) * torch.rand(37, 1) * 3
    weight[3] = 0.0  # an all-zero row stays exact
    q, scale = quantize_weight_int8(weight)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (37,)
    assert int(q.abs().max()) <= 127
    error = (dequantize_weight_int8(q, scale) - weight).abs()
    bound = weight.abs().amax(dim=1, keepdim=True) / 254 * (1 + 1e-6) + 1e-12
    assert bool((error <= bound).all())
    assert error[3].max() == 0
    # Half of bf16 plus one fp32 scale per output channel.
    assert q.element_size() * q.numel() + scale.numel() * 4 == weight.numel() + 4 * weight.shape[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_int8_weight_matches_dequantised_reference(dtype, dropout_p):
    inputs = make_inputs(13, 45, 27, 8, dtype, int8=True)
    assert_matches_reference(inputs, dropout_p=dropout_p, seed=42)
    assert inputs["weight"].grad is None


# --------------------------------------------------------------------------- errors


def _bad(**changes):
    inputs = make_inputs(4, 12, 10, 3, torch.float32)
    inputs.update(changes)
    return inputs


@pytest.mark.parametrize("changes,error,match", [
    (dict(lora_a=torch.randn(0, 12), lora_b=torch.randn(10, 0)), ValueError, "rank >= 1"),
    (dict(lora_a=torch.randn(3, 11)), ValueError, "lora_a must have shape"),
    (dict(lora_b=torch.randn(10, 4)), ValueError, "lora_b must have shape"),
    (dict(lora_b=torch.randn(9, 3)), ValueError, "lora_b must have shape"),
    (dict(x=torch.randn(4, 13)), ValueError, "last dimension"),
    (dict(bias=torch.randn(9)), ValueError, "bias must have shape"),
    (dict(x=torch.randn(4, 12, dtype=torch.float64)), TypeError, "dtype"),
    (dict(lora_a=torch.randn(3, 12, dtype=torch.float16)), TypeError, "lora_a dtype"),
    (dict(weight=torch.randn(10, 12, dtype=torch.bfloat16)), TypeError, "weight dtype"),
    (dict(x=torch.ones(4, 12, dtype=torch.int64)), TypeError, "floating-point"),
    (dict(weight=torch.ones(10, 12, dtype=torch.int8)), ValueError, "weight_scale is None"),
    (dict(weight=torch.ones(10, 12, dtype=torch.int8), weight_scale=torch.ones(9)), ValueError,
     "weight_scale must have shape"),
    (dict(weight_scale=torch.ones(10)), ValueError, "only for int8"),
    (dict(x=torch.randn(4, 12, device="meta")), ValueError, "different devices"),
])
def test_bad_inputs_raise_clear_errors(changes, error, match):
    inputs = _bad(**changes)
    with pytest.raises(error, match=match):
        lora_linear(inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_a"], inputs["lora_b"], 1.0,
                    weight_scale=inputs["weight_scale"])


def test_bad_scalars_and_backends():
    inputs = _bad()
    args = (inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_a"], inputs["lora_b"])
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(*args, 1.0, dropout_p=1.0)
    with pytest.raises(TypeError, match="scaling"):
        lora_linear(*args, float("nan"))
    with pytest.raises(ValueError, match="backend must be one of"):
        lora_linear(*args, 1.0, backend="fast")
    with pytest.raises(ValueError, match="backend='cuda' cannot run.*CUDA"):
        lora_linear(*args, 1.0, backend="cuda")


# --------------------------------------------------------------------------- torch.library


def test_opcheck():
    inputs = make_inputs(7, 20, 12, 4, torch.float32, weight_grad=True, bias_grad=True)
    args = (inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_a"], inputs["lora_b"], None,
            0.5, 0.2, 17, "torch")
    torch.library.opcheck(lora_module._lora_linear_op, args)
    q, scale = quantize_weight_int8(torch.randn(12, 20))
    torch.library.opcheck(lora_module._lora_linear_op,
                          (inputs["x"], q, None, inputs["lora_a"], inputs["lora_b"], scale, 2.0, 0.0, 0, "torch"))


def test_torch_compile_fullgraph():
    inputs = make_inputs(9, 20, 12, 4, torch.float32, weight_grad=False, bias_grad=True)

    def step(x, weight, bias, lora_a, lora_b):
        return lora_linear(x, weight, bias, lora_a, lora_b, 0.5, dropout_p=0.3, seed=21).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = (inputs["x"], inputs["bias"], inputs["lora_a"], inputs["lora_b"])
    args = (inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_a"], inputs["lora_b"])
    expected = torch.autograd.grad(step(*args), leaves)
    got = torch.autograd.grad(compiled(*args), leaves)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


# --------------------------------------------------------------------------- Triton (interpreter)


@pytest.fixture(params=["cublas", "triton"])
def base_gemm(request, monkeypatch):
    """Both designs of the 16-bit base GEMM (int8 always uses the fused Triton kernel)."""
    from fastft.kernels import lora_linear as triton_kernels

    monkeypatch.setattr(triton_kernels, "BASE_GEMM", request.param)
    return request.param


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,dropout_p", [((7, 37, 29, 8), 0.3), ((20, 24, 33, 1), 0.0), ((5, 19, 17, 70), 0.5)])
def test_triton_matches_reference(dtype, shape, dropout_p, base_gemm):
    assert_matches_reference(make_inputs(*shape, dtype, bias_grad=True), dropout_p=dropout_p, seed=77,
                             backend="triton")


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_int8_matches_dequantised_reference(dtype):
    assert_matches_reference(make_inputs(17, 40, 23, 8, dtype, int8=True), dropout_p=0.2, seed=5,
                             backend="triton")


@pytest.mark.interpret
def test_triton_split_reduction_for_lora_a_grad():
    """dA's token reduction is split in slices when there are many tokens."""
    from fastft.kernels import lora_linear as triton_kernels

    grad_xa = torch.randn(70, 8)
    x = torch.randn(70, 20)
    got = triton_kernels.masked_matmul(grad_xa.T, x, 0.3, 9, mask_p=False, num_splits=3)
    keep = dropout_keep_mask(9, 0.3, 70, 20)
    torch.testing.assert_close(got, grad_xa.T @ (x * keep), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- GPU


def _gpu_backends():
    return ["cuda", "triton", "torch"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("shape,dropout_p", [((113, 96, 200, 8), 0.0), ((300, 256, 130, 16), 0.1),
                                             ((1, 64, 64, 1), 0.5), ((1030, 512, 384, 64), 0.05)])
def test_gpu_backends_match_reference(backend, dtype, int8, shape, dropout_p):
    if backend == "cuda":
        if _extension.load_error() is not None:
            pytest.skip(f"CUDA extension unavailable: {_extension.load_error()}")
        if dtype == torch.float32:
            pytest.skip("the CUDA kernels are fp16/bf16 only (fp32 goes to triton under auto)")
    inputs = make_inputs(*shape, dtype, device="cuda", int8=int8, bias_grad=not int8)
    assert_matches_reference(inputs, dropout_p=dropout_p, seed=3, backend=backend)


@pytest.mark.gpu
def test_gpu_auto_and_compile():
    inputs = make_inputs(64, 128, 96, 16, torch.bfloat16, device="cuda")
    args = (inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_a"], inputs["lora_b"])
    eager = lora_linear(*args, 2.0, dropout_p=0.1, seed=4)
    compiled = torch.compile(lambda *a: lora_linear(*a, 2.0, dropout_p=0.1, seed=4), fullgraph=True)(*args)
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("capability,dtype,runs", [
    ((9, 0), torch.bfloat16, True),
    ((10, 0), torch.bfloat16, False),  # no kernel image in the build (archs 80;90a)
    ((9, 0), torch.float32, False),  # the kernel is 16-bit only
])
def test_cuda_reasons_on_a_stand_in_gpu(monkeypatch, capability, dtype, runs):
    """The CUDA backend's reasons (what `auto` asks first on a GPU) run here against a
    stand-in GPU and extension."""
    stand_in_gpu(monkeypatch, capability=capability)
    x, weight, lora_a = (cuda_tensor(*shape, dtype=dtype) for shape in ((8, 64), (32, 64), (4, 64)))
    found = backend_reasons(x, weight, lora_a)["cuda"]()
    assert (found == []) == runs, found
    stand_in_gpu(monkeypatch, bindings=("attention_forward",))
    assert any("built without lora_fused_linear" in r for r in backend_reasons(x, weight, lora_a)["cuda"]())


# --------------------------------------------------------------------------- CUDA backend on a CPU
# The emulating stand-in (tests/_cuda_stand_in.py) runs fastft/ops/lora_linear_cuda.py on CPU
# tensors, checks each launch against csrc/lora_linear/bindings.h, and computes what the
# kernel would, so the wrapper's arguments (strides, masks, split-K, dtype codes) are
# checked by the numbers.

lora_cuda = importlib.import_module("fastft.ops.lora_linear_cuda")


@pytest.mark.parametrize("int8,int8_gemm", [(False, "dequant"), (True, "dequant"), (True, "fused")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_cuda_backend_on_the_stand_in(monkeypatch, int8, int8_gemm, dtype, dropout_p):
    monkeypatch.setattr(lora_cuda, "INT8_GEMM", int8_gemm)
    monkeypatch.setattr(lora_cuda.LoRALinearBackend, "GRAD_A_TOKENS_PER_SPLIT", 16)  # several split-K partials
    stand_in = stand_in_gpu(monkeypatch, emulate=True)
    inputs = make_inputs(37, 40, 29, 8, dtype, int8=int8, bias_grad=not int8)
    assert_matches_reference(inputs, dropout_p=dropout_p, seed=11, backend="cuda")
    launched = [name for name, _ in stand_in.calls]
    # cuBLAS does every product the kernel is not needed for: int8 is dequantised first
    # unless the fused kernel is asked for; only dropout needs the kernel otherwise.
    uses_kernel = dropout_p > 0 or (int8 and int8_gemm == "fused")
    assert bool(launched) == uses_kernel, launched


def test_cuda_launches_on_the_tensors_device(monkeypatch):
    """A layer on cuda:1 (device_map sharding) must launch on cuda:1 with cuda:1's stream,
    whatever the current device is: every launch happens inside a guard for its tensors."""
    monkeypatch.setattr(lora_cuda, "INT8_GEMM", "fused")
    stand_in = stand_in_gpu(monkeypatch, emulate=True)
    inputs = make_inputs(19, 24, 17, 4, torch.bfloat16, int8=True)
    y = lora_linear(inputs["x"], inputs["weight"], None, inputs["lora_a"], inputs["lora_b"], 2.0, dropout_p=0.2,
                    seed=1, weight_scale=inputs["weight_scale"], backend="cuda")
    y.float().sum().backward()
    assert len(stand_in.calls) >= 4
    assert stand_in.guards == [inputs["x"].device] * len(stand_in.calls)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_tensors_on_a_non_current_device(backend):
    inputs = make_inputs(64, 96, 80, 8, torch.bfloat16, device="cuda:1", int8=True)
    with torch.cuda.device(0):
        assert_matches_reference(inputs, dropout_p=0.1, seed=2, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_on_a_non_default_stream(backend):
    """The kernels run on the caller's current stream: on a side stream the result is the
    one of the default stream, bit for bit (no launch slips onto another stream)."""
    inputs = make_inputs(300, 256, 130, 16, torch.bfloat16, device="cuda", int8=True)
    args = (inputs["x"].detach(), inputs["weight"], None, inputs["lora_a"].detach(), inputs["lora_b"].detach(), 2.0)
    kwargs = dict(dropout_p=0.1, seed=4, weight_scale=inputs["weight_scale"], backend=backend)
    expected = lora_linear(*args, **kwargs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = lora_linear(*args, **kwargs) * 1  # a torch op queued behind the kernels
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got, expected)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_beyond_2_to_the_31_elements(backend):
    """tokens x features > 2^31 (x of 150k tokens x 14336): 32-bit offsets would wrap. Only
    the last tokens are compared, where a wrapped offset would read the wrong rows."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs ~30 GB of GPU memory")
    tokens, in_features, out_features, rank = 150_000, 14336, 64, 16
    x = torch.randn(tokens, in_features, device="cuda", dtype=torch.bfloat16)
    weight, weight_scale = quantize_weight_int8(torch.randn(out_features, in_features, device="cuda") / 100)
    lora_a = torch.randn(rank, in_features, device="cuda", dtype=torch.bfloat16) / 100
    lora_b = torch.randn(out_features, rank, device="cuda", dtype=torch.bfloat16)
    y = lora_linear(x, weight, None, lora_a, lora_b, 2.0, dropout_p=0.1, seed=6, weight_scale=weight_scale,
                    backend=backend)
    tail = slice(tokens - 7, tokens)
    mask = dropout_keep_mask(6, 0.1, 7, in_features, row_offset=tokens - 7, device="cuda")
    expected = lora_linear_ref(x[tail], weight, None, lora_a, lora_b, 2.0, dropout_mask=mask, dropout_p=0.1,
                               weight_scale=weight_scale)
    plain = lora_linear_ref(x[tail], weight, None, lora_a, lora_b, 2.0, dropout_mask=mask, dropout_p=0.1,
                            weight_scale=weight_scale, upcast=False)
    assert_tolerance_rule("y tail", y[tail], expected, plain, atol=1e-2, relative_atol=True)
