"""fastft.ops.attention against attention_ref: every backend, outputs and all gradients.

Tolerance rule (DESIGN.md, tests/_tolerance.py): the fast path's error against the fp32
reference is at most 2x the error of the same-dtype plain-torch computation
(``attention_ref(upcast=False)``) against that reference, plus a small atol. Inputs are
fresh random normals with odd sizes. Triton cases run under the interpreter on the CPU
(marker ``interpret``): tiny grids. The CUDA kernels (csrc/attention/, wrapped by
fastft/ops/attention_cuda.py) are also tested directly, log-sum-exp included (marker
``gpu``); their refusal reasons run on the CPU against a stand-in GPU.
"""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from _cuda_stand_in import cuda_tensor, stand_in_gpu
from _tolerance import assert_tolerance_rule

from fastft import _extension
from fastft.kernels._common import attention_dropout_threshold
from fastft.kernels.attention import _keep_mask, _key_range, _query_range, head_dim_blocks
from fastft.ops import attention_cuda
from fastft.ops.attention import (
    attention,
    attention_dropout_mask,
    attention_ref,
    backend_reasons,
    draw_dropout_seed,
    torch_dropout_mask,
    varlen_dropout_mask,
)

ATOL = {torch.float32: 2e-5, torch.float16: 5e-4, torch.bfloat16: 2e-3}
CUDA = torch.cuda.is_available()
# The `interpret` tests run the Triton kernels through the interpreter on a CPU-only
# machine and compiled on a GPU machine (conftest sets TRITON_INTERPRET only without one).
TRITON_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" or not CUDA else "cuda"


def triton_dtype(dtype):
    """The Triton backend runs fp32 only in the interpreter: bf16 stands in on a GPU."""
    return torch.bfloat16 if TRITON_DEVICE == "cuda" and dtype == torch.float32 else dtype


# --------------------------------------------------------------------------- helpers


def make_qkv(batch, heads_q, heads_kv, seq_q, seq_k, head_dim, dtype, device="cpu", lengths=None):
    """Random (B, H, S, D) q, k, v, or packed (total, H, D) ones when ``lengths`` is given."""
    if lengths is not None:
        total = sum(lengths)
        shapes = [(total, heads_q, head_dim), (total, heads_kv, head_dim), (total, heads_kv, head_dim)]
    else:
        shapes = [(batch, heads_q, seq_q, head_dim), (batch, heads_kv, seq_k, head_dim),
                  (batch, heads_kv, seq_k, head_dim)]
    return [torch.randn(s, dtype=dtype, device=device).requires_grad_() for s in shapes]


def cu_seqlens_of(lengths, device="cpu"):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def forward_backward(fn, tensors, grad_out):
    out = fn(*tensors)
    grads = torch.autograd.grad(out, tensors, grad_out)
    return [out, *grads]


def forward_backward_lse(fn, tensors, grad_out, grad_lse):
    """``fn`` returns (out, lse): both, then dq, dk, dv with an upstream gradient for each."""
    out, lse = fn(*tensors)
    grads = torch.autograd.grad([out, lse], tensors, [grad_out, grad_lse])
    return [out, lse, *grads]


def check_against_reference(backend, qkv, dtype, *, dropout_seed=None, dropout_p=0.0, with_lse=False, **kwargs):
    """Run ``attention`` with ``backend`` and compare output and dq, dk, dv with the fp32 and
    same-dtype references. With dropout, the references get the mask replayed explicitly.
    With ``with_lse``, the call returns the lse too: it is compared as well, and a random
    upstream gradient flows back through it into dq and dk."""
    grad_out = torch.randn_like(qkv[0])
    generator = None
    mask = None
    if dropout_p:
        generator = torch.Generator().manual_seed(dropout_seed)
        seed = int(draw_dropout_seed(torch.Generator().manual_seed(dropout_seed)))
        q, k = qkv[0], qkv[1]
        mask_fn = torch_dropout_mask if backend == "torch" else attention_dropout_mask
        cu_q = kwargs.get("cu_seqlens", kwargs.get("cu_seqlens_q"))
        if cu_q is not None:
            mask = varlen_dropout_mask(seed, cu_q, q.shape[1], dropout_p, mask_fn, kwargs.get("cu_seqlens_k"))
        else:
            mask = mask_fn(seed, q.shape[0], q.shape[1], q.shape[2], k.shape[2], dropout_p, q.device)
    ref_kwargs = dict(kwargs, dropout_mask=mask, dropout_p=dropout_p)
    for name in ("max_seqlen", "max_seqlen_q", "max_seqlen_k"):
        ref_kwargs.pop(name, None)
    qkv32 = [t.detach().float().requires_grad_() for t in qkv]
    names = ("out", "dq", "dk", "dv")
    if with_lse:
        _, lse = attention_ref(*qkv32, return_lse=True, **ref_kwargs)
        grad_lse = torch.randn_like(lse).masked_fill(lse.isinf(), 0.0)  # rows with no key: lse -inf, no gradient
        fast = forward_backward_lse(
            lambda q, k, v: attention(q, k, v, backend=backend, dropout_p=dropout_p, generator=generator,
                                      return_lse=True, **kwargs), qkv, grad_out, grad_lse)
        ref32 = forward_backward_lse(lambda q, k, v: attention_ref(q, k, v, return_lse=True, **ref_kwargs), qkv32,
                                     grad_out.float(), grad_lse)
        plain = forward_backward_lse(lambda q, k, v: attention_ref(q, k, v, upcast=False, return_lse=True,
                                                                   **ref_kwargs), qkv, grad_out, grad_lse)
        names = ("out", "lse", "dq", "dk", "dv")
    else:
        fast = forward_backward(
            lambda q, k, v: attention(q, k, v, backend=backend, dropout_p=dropout_p, generator=generator, **kwargs),
            qkv, grad_out)
        ref32 = forward_backward(lambda q, k, v: attention_ref(q, k, v, **ref_kwargs), qkv32, grad_out.float())
        plain = forward_backward(lambda q, k, v: attention_ref(q, k, v, upcast=False, **ref_kwargs), qkv, grad_out)
    for name, f, r, p in zip(names, fast, ref32, plain):
        assert_tolerance_rule(name, f, r, p, atol=ATOL[dtype])
    return fast


# --------------------------------------------------------------------------- torch backend

SHAPES = [  # (batch, heads_q, heads_kv, seq_q, seq_k, head_dim)
    (2, 2, 2, 1, 1, 16),
    (2, 4, 2, 7, 7, 80),
    (1, 4, 1, 113, 113, 64),
    (2, 2, 2, 7, 33, 128),
    (2, 3, 3, 40, 9, 24),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_matches_reference(shape, causal, padded, dtype):
    batch, *_, seq_k, _ = shape
    qkv = make_qkv(*shape, dtype)
    mask = torch.rand(batch, seq_k) > 0.3 if padded else None
    check_against_reference("torch", qkv, dtype, causal=causal, key_padding_mask=mask)


@pytest.mark.parametrize("seq_q,seq_k", [(3, 5), (5, 3), (7, 7)])
def test_causal_alignment_is_sdpa_top_left(seq_q, seq_k):
    """causal=True with seq_q != seq_k equals SDPA's is_causal (and so the reference)."""
    q, k, v = (t.detach() for t in make_qkv(2, 2, 2, seq_q, seq_k, 16, torch.float32))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    for backend_out in (attention(q, k, v, causal=True), attention_ref(q, k, v, causal=True)):
        torch.testing.assert_close(backend_out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_torch_backend_varlen(causal, dtype):
    lengths = [5, 0, 17, 1, 9]  # includes an empty and a one-token document
    cu = cu_seqlens_of(lengths)
    qkv = make_qkv(0, 4, 2, 0, 0, 32, dtype, lengths=lengths)
    check_against_reference("torch", qkv, dtype, causal=causal, cu_seqlens=cu, max_seqlen=17)


def test_varlen_has_no_attention_across_documents():
    """Changing one document's keys/values leaves every other document's output unchanged."""
    lengths = [6, 4, 7]
    cu = cu_seqlens_of(lengths)
    q, k, v = (t.detach() for t in make_qkv(0, 2, 2, 0, 0, 16, torch.float32, lengths=lengths))
    out = attention(q, k, v, cu_seqlens=cu)
    k2, v2 = k.clone(), v.clone()
    k2[6:10] += 1.0
    v2[6:10] -= 2.0
    out2 = attention(q, k2, v2, cu_seqlens=cu)
    assert torch.equal(out[:6], out2[:6]) and torch.equal(out[10:], out2[10:])
    assert not torch.allclose(out[6:10], out2[6:10])


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpret)])
def test_rows_without_keys_output_zero_and_zero_gradient(backend):
    device, dtype = (TRITON_DEVICE, triton_dtype(torch.float32)) if backend == "triton" else ("cpu", torch.float32)
    # batch 0: left padding + causal -> queries 0, 1 see only padded keys; batch 1: all padded.
    mask = torch.tensor([[False, False, True, True, True], [False] * 5], device=device)
    qkv = make_qkv(2, 2, 2, 5, 5, 16, dtype, device)
    out = attention(*qkv, causal=True, key_padding_mask=mask, backend=backend)
    grads = torch.autograd.grad(out, qkv, torch.randn_like(out))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert out[0, :, :2].abs().max() == 0 and out[1].abs().max() == 0
    assert out[0, :, 2:].abs().min() > 0
    assert grads[0][0, :, :2].abs().max() == 0 and grads[0][1].abs().max() == 0
    assert grads[1][1].abs().max() == 0 and grads[2][1].abs().max() == 0  # padded keys get no gradient
    # The rows that do have keys match the reference.
    ref = attention_ref(*qkv, causal=True, key_padding_mask=mask)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, atol=tolerance, rtol=tolerance)


# --------------------------------------------------------------------------- triton (interpreter)

TRITON_CASES = [  # (shape, dtype, causal, padded)
    ((2, 2, 2, 7, 7, 16), torch.float32, False, False),
    ((1, 2, 2, 1, 1, 128), torch.float16, True, False),
    ((1, 4, 2, 113, 113, 64), torch.float16, True, False),
    ((1, 2, 1, 113, 20, 16), torch.float32, False, True),
    ((2, 4, 2, 33, 40, 80), torch.float32, True, True),
    ((1, 2, 2, 7, 70, 128), torch.float16, True, True),
    ((2, 2, 2, 70, 7, 16), torch.float16, True, True),
    ((1, 2, 2, 20, 20, 48), torch.bfloat16, False, True),
]


@pytest.mark.interpret
@pytest.mark.parametrize("shape,dtype,causal,padded", TRITON_CASES,
                         ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else str(c))
def test_triton_matches_reference(shape, dtype, causal, padded):
    batch, *_, seq_k, _ = shape
    dtype = triton_dtype(dtype)
    qkv = make_qkv(*shape, dtype, TRITON_DEVICE)
    mask = torch.rand(batch, seq_k, device=TRITON_DEVICE) > 0.3 if padded else None
    check_against_reference("triton", qkv, dtype, causal=causal, key_padding_mask=mask)


@pytest.mark.interpret
@pytest.mark.parametrize("varlen", [False, True])
def test_triton_gqa_split_over_query_heads(monkeypatch, varlen):
    """With few (key block, kv head) programs the dK/dV kernel splits each GQA group's query
    heads over a third grid axis and sums fp32 partials: the same gradients as one program
    looping over the whole group, and as the reference."""
    from fastft.kernels import attention as kernels

    lengths = [50, 7, 64] if varlen else None
    qkv = make_qkv(2, 6, 2, 50, 50, 32, torch.float32, lengths=lengths)
    kwargs = dict(causal=True, dropout_p=0.2, dropout_seed=9)
    if varlen:
        kwargs["cu_seqlens"] = cu_seqlens_of(lengths)
    split_calls = []
    monkeypatch.setattr(kernels, "_kv_splits", lambda *a: split_calls.append(3) or 3)
    torch.manual_seed(1)  # the same upstream gradient for both
    split = check_against_reference("triton", qkv, torch.float32, **kwargs)
    monkeypatch.setattr(kernels, "_kv_splits", lambda *a: 1)
    torch.manual_seed(1)
    whole = check_against_reference("triton", qkv, torch.float32, **kwargs)
    assert split_calls
    for name, a, b in zip(("dk", "dv"), split[2:], whole[2:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.interpret
def test_triton_strided_inputs():
    """(batch, seq, heads, dim) storage viewed as (batch, heads, seq, dim), as HF passes it."""
    dtype = triton_dtype(torch.float32)
    q, k, v = (torch.randn(2, 9, 2, 16, device=TRITON_DEVICE, dtype=dtype).transpose(1, 2).requires_grad_()
               for _ in range(3))
    check_against_reference("triton", [q, k, v], dtype, causal=True)


@pytest.mark.interpret
@pytest.mark.parametrize("causal,dtype,head_dim", [(True, torch.float32, 64), (False, torch.float16, 80)])
def test_triton_varlen(causal, dtype, head_dim):
    lengths = [5, 0, 37, 1, 9]
    cu = cu_seqlens_of(lengths, TRITON_DEVICE)
    dtype = triton_dtype(dtype)
    qkv = make_qkv(0, 2, 1, 0, 0, head_dim, dtype, TRITON_DEVICE, lengths=lengths)
    check_against_reference("triton", qkv, dtype, causal=causal, cu_seqlens=cu)


# --------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("mask_fn", [attention_dropout_mask, torch_dropout_mask])
def test_dropout_mask_keeps_one_minus_p(mask_fn):
    keep = mask_fn(1234, 2, 4, 32, 48, 0.3)
    assert keep.shape == (2, 4, 32, 48)
    assert abs(keep.float().mean().item() - 0.7) < 0.015  # 12k draws: std 0.004
    # Heads and batch elements get different masks, and so do seeds.
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    assert not torch.equal(keep, mask_fn(1235, 2, 4, 32, 48, 0.3))
    # A document slice (first_batch) is the same as that batch row of a larger mask.
    assert torch.equal(mask_fn(1234, 1, 4, 32, 48, 0.3, first_batch=1)[0], keep[1])


@pytest.mark.interpret
def test_torch_philox_twin_matches_triton_rand():
    """The torch Philox reproduces tl.rand and all four words of tl.randint4x bit for bit
    (keys with high bits, wrapped counters)."""
    import triton
    import triton.language as tl

    @triton.jit
    def rand_kernel(Out, Words, Keys, Offsets, n, BLOCK: tl.constexpr):
        idx = tl.arange(0, BLOCK)
        ok = idx < n
        offset = tl.load(Offsets + idx, mask=ok, other=0).to(tl.uint32)
        for i in range(0, 3):  # tl.rand takes one scalar key per call
            key = tl.load(Keys + i)
            tl.store(Out + i * n + idx, tl.rand(key, offset), mask=ok)
            w0, w1, w2, w3 = tl.randint4x(key, offset)
            words = Words + i * 4 * n + idx
            tl.store(words, w0.to(tl.int64), mask=ok)
            tl.store(words + n, w1.to(tl.int64), mask=ok)
            tl.store(words + 2 * n, w2.to(tl.int64), mask=ok)
            tl.store(words + 3 * n, w3.to(tl.int64), mask=ok)

    from fastft.ops.attention import _philox4x32, _philox_uniform

    keys = torch.tensor([7, 123456789 + (5 << 32), 2**31 - 2 + (77 << 32)], dtype=torch.int64)
    offsets = torch.cat([torch.arange(40), torch.randint(0, 2**32, (24,))])  # int64 in [0, 2**32)
    n = offsets.numel()
    out = torch.empty(3, n, device=TRITON_DEVICE)
    words = torch.empty(3, 4, n, dtype=torch.int64, device=TRITON_DEVICE)
    rand_kernel[(1,)](out, words, keys.to(TRITON_DEVICE), offsets.to(TRITON_DEVICE), n, BLOCK=64)
    key_grid, offset_grid = keys[:, None].expand(3, n), offsets[None].expand(3, -1)
    assert torch.equal(out.cpu(), _philox_uniform(key_grid, offset_grid))
    assert torch.equal(words.cpu() & 0xFFFFFFFF, torch.stack(_philox4x32(key_grid, offset_grid), dim=1))


@triton.jit
def _keep_mask_kernel(Out, seed, bh, seq_q, seq_k, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Stores fastft.kernels.attention._keep_mask for every key block of a block of rows."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    for start_n in range(0, seq_k, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        keep = _keep_mask(seed, bh, rows, start_n, seq_k, threshold, BLOCK_M, BLOCK_N)
        tl.store(Out + rows[:, None] * seq_k + cols[None, :], keep.to(tl.int8),
                 mask=(rows[:, None] < seq_q) & (cols[None, :] < seq_k))


@pytest.mark.interpret
@pytest.mark.parametrize("seq_k", [8, 37, 100])
def test_triton_keep_mask_is_attention_dropout_mask(seq_k):
    """The kernels' keep-mask (8 decisions per Philox call, ragged key lengths, key blocks
    that start mid-row) is the torch twin's, bit for bit."""
    seed, heads, head, seq_q, p = 987654, 3, 2, 19, 0.3
    out = torch.zeros(seq_q, seq_k, dtype=torch.int8, device=TRITON_DEVICE)
    _keep_mask_kernel[(triton.cdiv(seq_q, 16),)](out, seed, 1 * heads + head, seq_q, seq_k, attention_dropout_threshold(p),
                                           BLOCK_M=16, BLOCK_N=32)
    expected = attention_dropout_mask(seed, 2, heads, seq_q, seq_k, p)[1, head]
    assert torch.equal(out.cpu().bool(), expected)


def test_dropout_draws_are_independent_within_a_philox_call():
    """8 neighbouring keys share one Philox call: their decisions must still be independent
    (neighbours agree with probability p^2 + (1-p)^2, not more)."""
    keep = attention_dropout_mask(42, 4, 4, 64, 64, 0.5).float()
    agree = (keep[..., 1:] == keep[..., :-1]).float().mean().item()
    assert abs(agree - 0.5) < 0.02  # 64k pairs: std 0.002


@pytest.mark.parametrize("causal,padded", [(False, False), (True, True)])
def test_torch_dropout_gradients_with_explicit_mask(causal, padded):
    qkv = make_qkv(2, 4, 2, 23, 31, 16, torch.float32)
    mask = torch.rand(2, 31) > 0.2 if padded else None
    check_against_reference("torch", qkv, torch.float32, causal=causal, key_padding_mask=mask,
                            dropout_p=0.25, dropout_seed=11)


def test_torch_dropout_varlen_gradients():
    lengths = [7, 0, 12]
    qkv = make_qkv(0, 2, 2, 0, 0, 16, torch.float32, lengths=lengths)
    check_against_reference("torch", qkv, torch.float32, causal=True, cu_seqlens=cu_seqlens_of(lengths),
                            dropout_p=0.4, dropout_seed=3)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpret)])
def test_dropout_reproducible_for_a_seed(backend):
    device, dtype = (TRITON_DEVICE, triton_dtype(torch.float32)) if backend == "triton" else ("cpu", torch.float32)
    q, k, v = (t.detach() for t in make_qkv(1, 2, 2, 9, 9, 16, dtype, device))

    def run(seed):
        return attention(q, k, v, dropout_p=0.5, generator=torch.Generator().manual_seed(seed), backend=backend)

    torch.testing.assert_close(run(5), run(5), atol=0, rtol=0)
    assert not torch.allclose(run(5), run(6))
    torch.manual_seed(9)  # the default generator works the same way
    first = attention(q, k, v, dropout_p=0.5, backend=backend)
    torch.manual_seed(9)
    torch.testing.assert_close(attention(q, k, v, dropout_p=0.5, backend=backend), first, atol=0, rtol=0)


@pytest.mark.interpret
@pytest.mark.parametrize("varlen", [False, True])
def test_triton_dropout(varlen):
    """Triton dropout drops exactly the Philox mask replayed in torch: outputs and gradients
    vs the explicit-mask reference (the torch backend uses its own cheaper mask)."""
    if varlen:
        lengths = [9, 40, 3]
        qkv = make_qkv(0, 4, 2, 0, 0, 16, torch.float16, TRITON_DEVICE, lengths=lengths)
        kwargs = dict(cu_seqlens=cu_seqlens_of(lengths, TRITON_DEVICE), causal=True)
    else:
        qkv = make_qkv(2, 2, 1, 37, 41, 32, torch.float16, TRITON_DEVICE)
        kwargs = dict(key_padding_mask=torch.rand(2, 41, device=TRITON_DEVICE) > 0.2)
    check_against_reference("triton", qkv, torch.float16, dropout_p=0.3, dropout_seed=21, **kwargs)


# --------------------------------------------------------------------------- windows, alignment, softcap, ALiBi, lse
# Every option against the reference, outputs and every gradient (and the lse with a
# gradient through it where asked): causal in both alignments, sliding windows on one or
# both sides, soft-capping, ALiBi slopes per head or per batch element, and all of them at
# once, on odd sizes, rows with no key included (bottom-right with seq_q > seq_k).

SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625])


def option_case(shape, padded=False, per_batch_slopes=False, **kwargs):
    """(shape, kwargs) with a padding mask / ALiBi slopes built for the shape."""
    batch, heads_q = shape[0], shape[1]
    if padded:
        kwargs["key_padding_mask"] = torch.rand(batch, shape[4]) > 0.3
    if kwargs.pop("alibi", False):
        slopes = SLOPES[:heads_q].repeat((heads_q + 3) // 4)[:heads_q]
        kwargs["alibi_slopes"] = (slopes[None] * torch.rand(batch, 1) * 2) if per_batch_slopes else slopes
    return shape, kwargs


OPTION_CASES = {  # name -> ((batch, heads_q, heads_kv, seq_q, seq_k, head_dim), attention kwargs)
    "causal bottom-right, seq_q < seq_k": dict(shape=(2, 4, 2, 7, 33, 16), causal=True,
                                               causal_alignment="bottom-right"),
    "causal bottom-right, seq_q > seq_k": dict(shape=(2, 2, 1, 40, 9, 24), causal=True,
                                               causal_alignment="bottom-right", padded=True),
    "sliding window, causal": dict(shape=(1, 4, 2, 113, 113, 64), causal=True, window=(7, -1)),
    "window on both sides": dict(shape=(2, 2, 2, 70, 33, 32), window=(3, 5)),
    "window, right only": dict(shape=(1, 2, 2, 1, 7, 16), window=(-1, 2)),
    "window bottom-right + padding": dict(shape=(2, 2, 1, 33, 70, 16), causal=True, window=(20, -1),
                                          causal_alignment="bottom-right", padded=True),
    "softcap": dict(shape=(2, 3, 3, 7, 7, 16), softcap=2.0),
    "softcap causal padded": dict(shape=(2, 4, 2, 33, 40, 80), softcap=1.5, causal=True, padded=True),
    "alibi per head": dict(shape=(2, 4, 2, 33, 40, 32), alibi=True, causal=True),
    "alibi per batch, bidirectional": dict(shape=(2, 4, 4, 20, 17, 16), alibi=True, per_batch_slopes=True),
    "everything": dict(shape=(2, 4, 2, 37, 50, 96), causal=True, window=(9, -1), causal_alignment="bottom-right",
                       softcap=3.0, alibi=True, padded=True),
}


def _option_case(name):
    spec = dict(OPTION_CASES[name])
    return option_case(spec.pop("shape"), **spec)


@pytest.mark.parametrize("with_lse", [False, True], ids=["out", "lse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(OPTION_CASES))
def test_torch_backend_options(name, dtype, with_lse):
    shape, kwargs = _option_case(name)
    check_against_reference("torch", make_qkv(*shape, dtype), dtype, with_lse=with_lse, **kwargs)


TRITON_OPTION_CASES = [  # (name, dtype, with_lse): the interpreter is slow, so a selection
    ("causal bottom-right, seq_q > seq_k", torch.float32, True),
    ("sliding window, causal", torch.float16, False),
    ("window on both sides", torch.float32, False),
    ("window bottom-right + padding", torch.float16, True),
    ("softcap causal padded", torch.float32, False),
    ("alibi per batch, bidirectional", torch.float32, False),
    ("everything", torch.float16, True),
]


@pytest.mark.interpret
@pytest.mark.parametrize("name,dtype,with_lse", TRITON_OPTION_CASES, ids=[c[0] for c in TRITON_OPTION_CASES])
def test_triton_options(name, dtype, with_lse):
    shape, kwargs = _option_case(name)
    dtype = triton_dtype(dtype)
    kwargs = {k: (v.to(TRITON_DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    check_against_reference("triton", make_qkv(*shape, dtype, TRITON_DEVICE), dtype, with_lse=with_lse, **kwargs)


def _packed_case(device="cpu"):
    """Queries and keys packed with their own offsets: documents with more queries than
    keys, fewer, none, and keys but no query."""
    lengths_q, lengths_k = [5, 0, 17, 3, 9], [8, 4, 11, 0, 30]
    q = torch.randn(sum(lengths_q), 4, 32, device=device)
    k, v = (torch.randn(sum(lengths_k), 2, 32, device=device) for _ in range(2))
    return [t.requires_grad_() for t in (q, k, v)], cu_seqlens_of(lengths_q, device), cu_seqlens_of(lengths_k, device)


PACKED_OPTIONS = {
    "causal bottom-right": dict(causal=True, causal_alignment="bottom-right"),
    "window, softcap, alibi": dict(window=(3, 2), softcap=2.0, alibi_slopes=torch.rand(5, 4)),
    "causal top-left, dropout": dict(causal=True, dropout_p=0.3, dropout_seed=4),
}


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpret)])
@pytest.mark.parametrize("name", list(PACKED_OPTIONS))
def test_separate_query_and_key_packing(backend, name):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    qkv, cu_q, cu_k = _packed_case(device)
    kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in PACKED_OPTIONS[name].items()}
    check_against_reference(backend, qkv, torch.float32, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=17,
                            with_lse=True, **kwargs)


def test_separate_packing_is_cu_seqlens_when_equal():
    lengths = [6, 0, 11]
    qkv = [t.detach() for t in make_qkv(0, 2, 1, 0, 0, 16, torch.float32, lengths=lengths)]
    cu = cu_seqlens_of(lengths)
    same = attention(*qkv, causal=True, window=(2, -1), cu_seqlens=cu)
    torch.testing.assert_close(attention(*qkv, causal=True, window=(2, -1), cu_seqlens_q=cu, cu_seqlens_k=cu.clone()),
                               same, atol=0, rtol=0)


def test_alignments_agree_when_lengths_are_equal_and_match_sdpa():
    q, k, v = (t.detach() for t in make_qkv(2, 2, 2, 9, 9, 16, torch.float32))
    top = attention(q, k, v, causal=True)
    torch.testing.assert_close(attention(q, k, v, causal=True, causal_alignment="bottom-right"), top, atol=0, rtol=0)
    # Bottom-right with seq_q < seq_k: SDPA's top-left mask shifted by seq_k - seq_q.
    q = q[:, :, :4]
    shift = 9 - 4
    mask = torch.ones(4, 9, dtype=torch.bool).tril(diagonal=shift)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(attention(q, k, v, causal=True, causal_alignment="bottom-right"), expected,
                               atol=1e-5, rtol=1e-5)


def test_lse_merges_attention_over_key_chunks():
    """What the lse is for: attention over all keys from attention over two key chunks,
    ``out = Σ_c exp(lse_c - lse) out_c`` with ``lse = logsumexp_c lse_c`` (ring / context
    parallelism, split-KV decoding), gradients included."""
    q, k, v = make_qkv(2, 4, 2, 9, 20, 16, torch.float32)
    full, full_lse = attention(q, k, v, return_lse=True)
    parts = [attention(q, k[:, :, s], v[:, :, s], return_lse=True) for s in (slice(0, 7), slice(7, 20))]
    lse = torch.logsumexp(torch.stack([p[1] for p in parts]), dim=0)
    merged = sum(torch.exp(p[1] - lse)[..., None] * p[0] for p in parts)
    torch.testing.assert_close(merged, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, full_lse, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(full)
    expected = torch.autograd.grad(full, (q, k, v), grad_out)
    for got, want in zip(torch.autograd.grad(merged, (q, k, v), grad_out), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- tiles outside the window are skipped


@triton.jit
def _ranges_kernel(KeyRange, QueryRange, seq_q, seq_k, shift, window_left, window_right, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr):
    """Stores the kernels' [lo, hi) loop bounds for every query block and key block."""
    block = tl.program_id(0)
    lo, hi = _key_range(block, shift, seq_q, seq_k, window_left, window_right, BLOCK_M, BLOCK_N, WINDOW_LEFT,
                        WINDOW_RIGHT)
    tl.store(KeyRange + 2 * block, lo)
    tl.store(KeyRange + 2 * block + 1, hi)
    lo, hi = _query_range(block, shift, seq_q, seq_k, window_left, window_right, BLOCK_M, BLOCK_N, WINDOW_LEFT,
                          WINDOW_RIGHT)
    tl.store(QueryRange + 2 * block, lo)
    tl.store(QueryRange + 2 * block + 1, hi)


@pytest.mark.interpret
def test_triton_loop_bounds_visit_exactly_the_tiles_in_the_window():
    """The Triton kernels' key range per query block (forward, dQ) and query range per key
    block (dK/dV): every allowed (query, key) pair inside, no tile without one."""
    for (seq_q, seq_k), (left, right), bottom_right, (block_m, block_n) in itertools.product(
            [(7, 7), (33, 70), (70, 33), (5, 130)], [(-1, 0), (4, 0), (17, 3), (3, -1), (-1, 5), (0, 0)],
            [False, True], [(16, 32), (32, 16)]):
        shift = seq_k - seq_q if bottom_right else 0
        allowed = [(i, j) for i in range(seq_q) for j in range(seq_k)
                   if (right < 0 or j <= i + shift + right) and (left < 0 or j >= i + shift - left)]
        blocks = max(triton.cdiv(seq_q, block_m), triton.cdiv(seq_k, block_n))
        key_range = torch.zeros(blocks, 2, dtype=torch.int32, device=TRITON_DEVICE)
        query_range = torch.zeros(blocks, 2, dtype=torch.int32, device=TRITON_DEVICE)
        _ranges_kernel[(blocks,)](key_range, query_range, seq_q, seq_k, shift, max(left, 0), max(right, 0),
                                  BLOCK_M=block_m, BLOCK_N=block_n, WINDOW_LEFT=left >= 0, WINDOW_RIGHT=right >= 0)
        where = (seq_q, seq_k, left, right, bottom_right, block_m, block_n)
        for block in range(triton.cdiv(seq_q, block_m)):
            lo, hi = key_range[block].tolist()
            visited = set(range(lo // block_n, triton.cdiv(hi, block_n))) if hi > lo else set()
            assert lo % block_n == 0 or lo >= hi, where
            assert visited == {j // block_n for i, j in allowed if i // block_m == block}, (where, block)
        for block in range(triton.cdiv(seq_k, block_n)):
            lo, hi = query_range[block].tolist()
            visited = set(range(lo // block_m, triton.cdiv(hi, block_m))) if hi > lo else set()
            assert lo % block_m == 0 or lo >= hi, where
            assert visited == {i // block_m for i, j in allowed if j // block_n == block}, (where, block)


@pytest.mark.interpret
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the poison, where it is read
def test_triton_skips_tiles_outside_the_window():
    """Keys far outside every window of a query block are never read: with them and their
    values set to NaN, those queries' outputs and dq are finite and bit-identical to a clean
    run (a masked-but-loaded tile would give NaN through 0 · NaN in P V); likewise dK / dV of
    keys no poisoned query can see. Holds for any tiles of at most 64 rows / keys."""
    seq, window = 256, 16
    q, k, v = (t.detach() for t in make_qkv(1, 2, 1, seq, seq, 16, torch.float32, TRITON_DEVICE))
    grad_out = torch.randn_like(q)

    def run(q, k, v, grad_out):
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        out = attention(q, k, v, causal=True, window=(window, -1), backend="triton")
        return [out, *torch.autograd.grad(out, (q, k, v), grad_out)]

    def poisoned(t, rows):
        t = t.clone()
        t[:, :, rows] = float("nan")
        return t

    clean = run(q, k, v, grad_out)
    far_keys = slice(0, 100)  # queries >= 192 sit in blocks whose windows start at key >= 128
    out, dq, _, _ = run(q, poisoned(k, far_keys), poisoned(v, far_keys), grad_out)
    assert torch.equal(out[:, :, 192:], clean[0][:, :, 192:]) and torch.equal(dq[:, :, 192:], clean[1][:, :, 192:])
    far_queries = slice(150, 256)  # keys < 64 are seen by queries < 64 + window + 1 only
    _, _, dk, dv = run(poisoned(q, far_queries), k, v, poisoned(grad_out, far_queries))
    assert torch.equal(dk[:, :, :64], clean[2][:, :, :64]) and torch.equal(dv[:, :, :64], clean[3][:, :, :64])
    assert torch.isnan(dk[:, :, 192:]).all()  # (the poison does reach the keys those queries see)


# --------------------------------------------------------------------------- head dim blocks


def test_head_dim_blocks():
    assert {d: head_dim_blocks(d) for d in (8, 16, 24, 48, 64, 65, 72, 80, 81, 96, 97, 112, 128, 192, 256)} == {
        8: (16, 0), 16: (16, 0), 24: (32, 0), 48: (64, 0), 64: (64, 0), 65: (64, 16), 72: (64, 16), 80: (64, 16),
        81: (64, 32), 96: (64, 32), 97: (128, 0), 112: (128, 0), 128: (128, 0), 192: (256, 0), 256: (256, 0)}
    for head_dim in range(1, 257):  # every split covers the head and does less work than padding
        main, tail = head_dim_blocks(head_dim)
        padded = max(16, triton.next_power_of_2(head_dim))
        assert main + tail >= head_dim and main + tail <= padded and (tail == 0 or main + tail < padded)


@pytest.mark.interpret
@pytest.mark.parametrize("head_dim", [96, 72])
def test_triton_split_head_dim(head_dim):
    """head_dim 96 = 64 + 32 and 72 = 64 + 16 (two dot products per product), GQA, causal."""
    dtype = triton_dtype(torch.float16)
    check_against_reference("triton", make_qkv(1, 4, 2, 37, 37, head_dim, dtype, TRITON_DEVICE), dtype, causal=True)


# --------------------------------------------------------------------------- dispatch, errors


def test_cpu_auto_is_torch_and_reasons_are_given():
    q, k, v = (t.detach() for t in make_qkv(1, 2, 2, 5, 5, 300, torch.float32))
    reasons = backend_reasons(q, k, v)
    assert reasons["torch"]() == []
    assert any("head_dim=300" in r for r in reasons["triton"]())
    assert reasons["cuda"]()  # no CUDA tensors (and no extension) here
    with pytest.raises(ValueError, match="head_dim=300"):
        attention(q, k, v, backend="triton")
    if not CUDA:
        with pytest.raises(ValueError, match="backend='cuda' cannot run"):
            attention(q, k, v, backend="cuda")
    torch.testing.assert_close(attention(q, k, v), attention_ref(q, k, v), atol=1e-5, rtol=1e-5)


def _dense():
    return [t.detach() for t in make_qkv(2, 4, 2, 5, 6, 16, torch.float32)]


def _packed():
    return [t.detach() for t in make_qkv(0, 4, 2, 0, 0, 16, torch.float32, lengths=[3, 4])]


BAD_INPUTS = [  # (name, build (q, k, v, kwargs), exception, message)
    ("q not a tensor", lambda q, k, v: ((q.tolist(), k, v), {}), TypeError, "q must be a torch.Tensor"),
    ("int dtype", lambda q, k, v: ((q.long(), k, v), {}), TypeError, "q must be fp32, fp16 or bf16"),
    ("dtype mismatch", lambda q, k, v: ((q, k.half(), v), {}), TypeError, "k dtype"),
    ("3-d q", lambda q, k, v: ((q[0], k, v), {}), ValueError, "q must have shape"),
    ("v shape", lambda q, k, v: ((q, k, v[:, :, :3]), {}), ValueError, "v must have the shape of k"),
    ("head_dim mismatch", lambda q, k, v: ((q, k[..., :8], v[..., :8]), {}), ValueError, "head_dim"),
    ("heads do not divide", lambda q, k, v: ((q, k[:, :1].expand(2, 3, 6, 16), v[:, :1].expand(2, 3, 6, 16)), {}),
     ValueError, "must divide q heads"),
    ("batch mismatch", lambda q, k, v: ((q, k[:1], v[:1]), {}), ValueError, "batch"),
    ("mask dtype", lambda q, k, v: ((q, k, v), dict(key_padding_mask=torch.ones(2, 6))), TypeError, "bool"),
    ("mask shape", lambda q, k, v: ((q, k, v), dict(key_padding_mask=torch.ones(2, 5, dtype=torch.bool))),
     ValueError, r"key_padding_mask must have shape \(batch, seq_k\)"),
    ("dropout 1", lambda q, k, v: ((q, k, v), dict(dropout_p=1.0)), ValueError, "dropout_p"),
    ("dropout negative", lambda q, k, v: ((q, k, v), dict(dropout_p=-0.1)), ValueError, "dropout_p"),
    ("causal not bool", lambda q, k, v: ((q, k, v), dict(causal=1)), TypeError, "causal"),
    ("max_seqlen without cu_seqlens", lambda q, k, v: ((q, k, v), dict(max_seqlen=4)), ValueError, "max_seqlen"),
    ("unknown backend", lambda q, k, v: ((q, k, v), dict(backend="flash")), ValueError, "backend must be one of"),
    ("window below -1", lambda q, k, v: ((q, k, v), dict(window=(-2, 0))), ValueError, "window"),
    ("window not a pair", lambda q, k, v: ((q, k, v), dict(window=4)), ValueError, "window"),
    ("window of floats", lambda q, k, v: ((q, k, v), dict(window=(1.5, 0))), ValueError, "window"),
    ("unknown alignment", lambda q, k, v: ((q, k, v), dict(causal=True, causal_alignment="bottom")), ValueError,
     "causal_alignment"),
    ("negative softcap", lambda q, k, v: ((q, k, v), dict(softcap=-1.0)), ValueError, "softcap"),
    ("infinite softcap", lambda q, k, v: ((q, k, v), dict(softcap=math.inf)), ValueError, "softcap"),
    ("alibi fp16", lambda q, k, v: ((q, k, v), dict(alibi_slopes=torch.ones(4, dtype=torch.float16))), TypeError,
     "alibi_slopes must be an fp32"),
    ("alibi shape", lambda q, k, v: ((q, k, v), dict(alibi_slopes=torch.ones(2))), ValueError,
     r"alibi_slopes must have shape \(heads_q,\)"),
    ("max_seqlen_q without packing", lambda q, k, v: ((q, k, v), dict(max_seqlen_q=4)), ValueError, "max_seqlen"),
]

BAD_VARLEN = [
    ("cu_seqlens int64", dict(cu_seqlens=torch.tensor([0, 3, 7])), TypeError, "int32"),
    ("cu_seqlens start", dict(cu_seqlens=torch.tensor([1, 3, 7], dtype=torch.int32)), ValueError, "start at 0"),
    ("cu_seqlens decreasing", dict(cu_seqlens=torch.tensor([0, 5, 4, 7], dtype=torch.int32)), ValueError,
     "non-decreasing"),
    ("cu_seqlens end", dict(cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32)), ValueError,
     "end at total_tokens=7"),
    ("cu_seqlens 2-d", dict(cu_seqlens=torch.tensor([[0, 3, 7]], dtype=torch.int32)), ValueError, "cu_seqlens"),
    ("varlen with padding mask", dict(cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32),
                                      key_padding_mask=torch.ones(1, 7, dtype=torch.bool)), ValueError,
     "key_padding_mask cannot be combined"),
    ("max_seqlen too small", dict(cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32), max_seqlen=3), ValueError,
     "max_seqlen=3"),
    ("cu_seqlens and cu_seqlens_q", dict(cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32),
                                         cu_seqlens_q=torch.tensor([0, 3, 7], dtype=torch.int32)), ValueError,
     "either cu_seqlens or"),
    ("cu_seqlens_q alone", dict(cu_seqlens_q=torch.tensor([0, 3, 7], dtype=torch.int32)), ValueError,
     "go together"),
    ("max_seqlen with separate offsets", dict(cu_seqlens_q=torch.tensor([0, 3, 7], dtype=torch.int32),
                                              cu_seqlens_k=torch.tensor([0, 3, 7], dtype=torch.int32), max_seqlen=4),
     ValueError, "max_seqlen_q"),
    ("cu_seqlens_k end", dict(cu_seqlens_q=torch.tensor([0, 3, 7], dtype=torch.int32),
                              cu_seqlens_k=torch.tensor([0, 3, 6], dtype=torch.int32)), ValueError,
     "cu_seqlens_k must end at total_tokens=7"),
    ("document counts differ", dict(cu_seqlens_q=torch.tensor([0, 3, 7], dtype=torch.int32),
                                    cu_seqlens_k=torch.tensor([0, 3, 5, 7], dtype=torch.int32)), ValueError,
     "same documents"),
    ("max_seqlen_k too small", dict(cu_seqlens_q=torch.tensor([0, 3, 7], dtype=torch.int32),
                                    cu_seqlens_k=torch.tensor([0, 2, 7], dtype=torch.int32), max_seqlen_k=4),
     ValueError, "max_seqlen_k=4"),
    ("alibi slopes per document", dict(cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32),
                                       alibi_slopes=torch.ones(3, 4)), ValueError, r"\(batch, heads_q\) = \(2, 4\)"),
]


@pytest.mark.parametrize("name,build,error,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises(name, build, error, message):
    args, kwargs = build(*_dense())
    with pytest.raises(error, match=message):
        attention(*args, **kwargs)


@pytest.mark.parametrize("name,kwargs,error,message", BAD_VARLEN, ids=[c[0] for c in BAD_VARLEN])
def test_bad_varlen_input_raises(name, kwargs, error, message):
    with pytest.raises(error, match=message):
        attention(*_packed(), **kwargs)


def test_varlen_k_tokens_must_match():
    q, k, v = _packed()
    with pytest.raises(ValueError, match="total_tokens"):
        attention(q, k[:5], v[:5], cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32))


# --------------------------------------------------------------------------- torch.library / compile


def _op_args(backend, dropout):
    device, dtype = (TRITON_DEVICE, triton_dtype(torch.float32)) if backend == "triton" else ("cpu", torch.float32)
    q, k, v = (t.detach().requires_grad_() for t in make_qkv(2, 4, 2, 7, 9, 16, dtype, device))
    mask = torch.rand(2, 9, device=device) > 0.2
    seed = draw_dropout_seed() if dropout else None
    # (q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, alibi_slopes, seed, max_seqlen_q, max_seqlen_k,
    #  window_left, window_right, bottom_right, softcap, softmax_scale, dropout_p, return_lse, backend)
    return (q, k, v, mask, None, None, None, seed, 0, 0, 3, 0, True, 2.5, 0.25, 0.2 if dropout else 0.0, True,
            backend)


@pytest.mark.parametrize("backend,dropout", [("torch", False), ("torch", True),
                                             pytest.param("triton", True, marks=pytest.mark.interpret)])
def test_opcheck(backend, dropout):
    from fastft.ops.attention import _attention_op

    # The op's registration is backend independent (checked in full on torch); for triton
    # check that its real outputs (lse included) match the fake ones, with few interpreter runs.
    utils = ("test_schema", "test_faketensor") if backend == "triton" else None
    torch.library.opcheck(_attention_op, _op_args(backend, dropout), test_utils=utils or
                          ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_opcheck_backward_op():
    from fastft.ops.attention import _attention_backward_op

    q, k, v, mask, cu_q, cu_k, slopes, seed, *arguments, return_lse, backend = _op_args("torch", True)
    out = torch.randn_like(q)
    lse = q.new_empty(0)  # the torch backend keeps no lse unless asked for it
    for grad_lse in (None, torch.randn(q.shape[:3])):
        args = (torch.randn_like(q), grad_lse, q, k, v, out, lse, mask, cu_q, cu_k, slopes, seed, *arguments, backend)
        torch.library.opcheck(_attention_backward_op, args, test_utils=("test_schema", "test_faketensor"))


def test_opcheck_varlen():
    from fastft.ops.attention import _attention_op

    lengths, key_lengths = [3, 0, 6], [5, 2, 4]
    q = torch.randn(sum(lengths), 2, 16, requires_grad=True)
    k, v = (torch.randn(sum(key_lengths), 1, 16, requires_grad=True) for _ in range(2))
    cu = cu_seqlens_of(lengths)
    for return_lse in (False, True):  # the torch backend's lse is empty unless asked for
        torch.library.opcheck(_attention_op, (q, q, q, None, cu, cu, None, None, 6, 6, -1, 0, False, 0.0, 0.25, 0.0,
                                              return_lse, "torch"))
        torch.library.opcheck(_attention_op, (q, k, v, None, cu, cu_seqlens_of(key_lengths), torch.rand(3, 2), None,
                                              6, 5, 2, -1, True, 1.5, 0.25, 0.0, return_lse, "torch"))


@pytest.mark.parametrize("backend,varlen,dropout", [
    ("torch", False, False),  # plain differentiable torch (SDPA)
    ("torch", False, True),
    ("torch", True, False),  # through the custom op
    pytest.param("triton", False, True, marks=pytest.mark.interpret),
])
def test_torch_compile_fullgraph(backend, varlen, dropout):
    """No graph break (fullgraph=True), and the same output and gradients as eager."""
    torch._dynamo.reset()
    device, dtype = (TRITON_DEVICE, triton_dtype(torch.float32)) if backend == "triton" else ("cpu", torch.float32)
    if varlen:
        lengths = [4, 0, 9]
        q, k, v = make_qkv(0, 4, 2, 0, 0, 16, dtype, device, lengths=lengths)
        kwargs = dict(cu_seqlens=cu_seqlens_of(lengths, device), max_seqlen=9)
    else:
        q, k, v = make_qkv(2, 4, 2, 7, 9, 16, dtype, device)
        kwargs = dict(key_padding_mask=torch.rand(2, 9, device=device) > 0.2)

    def block(q, k, v):
        out = attention(q * 1.5, k, v, causal=True, dropout_p=0.3 if dropout else 0.0, backend=backend, **kwargs)
        return out.sin()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.manual_seed(4)
    out = compiled(q, k, v)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    torch.manual_seed(4)
    eager = block(q, k, v)
    eager_grads = torch.autograd.grad(eager.sum(), (q, k, v))
    torch.testing.assert_close(out, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


# --------------------------------------------------------------------------- GPU


GPU_CASES = [  # (shape, causal, padded)
    ((2, 8, 8, 113, 113, 64), False, False),
    ((2, 8, 2, 257, 257, 128), True, True),
    ((1, 4, 4, 77, 300, 64), True, False),
    ((1, 4, 4, 300, 77, 128), True, True),
    ((2, 4, 1, 1023, 1023, 128), True, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,causal,padded", GPU_CASES, ids=lambda c: "x".join(map(str, c))
                         if isinstance(c, tuple) else str(c))
def test_gpu_backends_match_reference(backend, dtype, shape, causal, padded):
    batch, *_, seq_k, _ = shape
    qkv = make_qkv(*shape, dtype, device="cuda")
    mask = torch.rand(batch, seq_k, device="cuda") > 0.2 if padded else None
    if backend == "cuda":
        reasons = backend_reasons(*qkv, key_padding_mask=mask)["cuda"]()
        if reasons:
            pytest.skip("cuda backend: " + "; ".join(reasons))
    check_against_reference(backend, qkv, dtype, causal=causal, key_padding_mask=mask)


GPU_OPTIONS = {  # the GPU grid: windows of many tiles, both alignments, softcap, ALiBi, lse
    "sliding window 256": dict(causal=True, window=(255, -1)),
    "bottom-right, seq_q < seq_k": dict(causal=True, causal_alignment="bottom-right"),
    "window both sides + softcap": dict(window=(100, 30), softcap=30.0),
    "everything": dict(causal=True, window=(127, -1), causal_alignment="bottom-right", softcap=20.0, alibi=True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(GPU_OPTIONS))
def test_gpu_options_match_reference(backend, dtype, name):
    shape, kwargs = option_case((2, 8, 2, 517, 1031, 128), padded=True, **GPU_OPTIONS[name])
    kwargs = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    qkv = make_qkv(*shape, dtype, device="cuda")
    if backend == "cuda":
        reasons = backend_reasons(*qkv, kwargs.get("key_padding_mask"), None, 0.0, kwargs.get("alibi_slopes"))["cuda"]()
        if reasons:
            pytest.skip("cuda backend: " + "; ".join(reasons))
    check_against_reference(backend, qkv, dtype, with_lse=True, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [16, 80, 96, 256])
def test_gpu_triton_head_dims_varlen_dropout(head_dim):
    lengths = [100, 1, 517, 64]
    qkv = make_qkv(0, 8, 2, 0, 0, head_dim, torch.bfloat16, device="cuda", lengths=lengths)
    cu = cu_seqlens_of(lengths, "cuda")
    check_against_reference("triton", qkv, torch.bfloat16, causal=True, cu_seqlens=cu)
    check_against_reference("triton", qkv, torch.bfloat16, causal=True, cu_seqlens=cu, dropout_p=0.1,
                            dropout_seed=5)


@pytest.mark.gpu
def test_gpu_auto_prefers_fast_backend():
    qkv = [t.detach() for t in make_qkv(1, 2, 2, 64, 64, 64, torch.float16, device="cuda")]
    reasons = backend_reasons(*qkv)
    chosen = next(name for name in ("cuda", "triton", "torch") if not reasons[name]())
    assert chosen in ("cuda", "triton")


# --------------------------------------------------------------------------- CUDA kernels, directly

CUDA_DTYPES = (torch.float16, torch.bfloat16)
CUDA_SEQLENS = [(1, 1), (7, 7), (113, 113), (1023, 1023), (113, 203), (203, 113), (1, 300), (300, 7)]
CUDA_HEADS = [(2, 2), (6, 2), (4, 1)]  # MHA, GQA, MQA


def _require_extension():
    if _extension.load_error() is not None:
        pytest.skip(f"fastft._cuda unavailable: {_extension.load_error()}")


def _cuda_inputs(batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, dtype, with_mask):
    """q, k, v (no grad) and, with ``with_mask``, a padding mask with ~30% of keys padded
    and the first sequence right-padded to half its length, as in a real batch."""
    q, k, v = (t.detach() for t in make_qkv(batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, dtype, "cuda"))
    mask = None
    if with_mask:
        mask = torch.rand(batch, seqlen_k, device="cuda") > 0.3
        mask[0, -((seqlen_k + 1) // 2):] = False
    return q, k, v, mask


def _poison_allocator(*shapes, device):
    """Leave NaN-filled blocks in torch's caching allocator, so that an output element the
    kernel forgets to write shows up as NaN rather than as a stale plausible value."""
    for shape in shapes:
        torch.full(shape, math.nan, dtype=torch.float32, device=device)


def check_cuda_kernels(q, k, v, causal, mask, scale, window=(-1, -1), bottom_right=False, softcap=0.0,
                       with_grad_lse=False):
    """Runs attention_cuda.attention_forward / attention_backward and attention_ref (fp32 and
    input dtype) on the same inputs; the rule holds for out, lse, dq, dk and dv (with a
    random gradient through the lse when ``with_grad_lse``)."""
    grad_out = torch.randn_like(q)
    options = dict(window=window, bottom_right=bottom_right, softcap=softcap)
    _poison_allocator(q.shape, q.shape, k.shape, k.shape, device=q.device)
    out, lse = attention_cuda.attention_forward(q, k, v, causal, mask, scale, **options)
    grad_lse = torch.randn_like(lse).masked_fill(lse.isinf(), 0.0) if with_grad_lse else None
    dq, dk, dv = attention_cuda.attention_backward(grad_out, q, k, v, out, lse, causal, mask, scale, grad_lse=grad_lse,
                                                   **options)
    torch.cuda.synchronize()

    results = {}
    for upcast in (True, False):
        leaves = [t.detach().to(torch.float32 if upcast else t.dtype).requires_grad_() for t in (q, k, v)]
        ref_out, ref_lse = attention_ref(*leaves, causal=causal, key_padding_mask=mask, softmax_scale=scale,
                                         window=window, causal_alignment=("bottom-right" if bottom_right else "top-left"),
                                         softcap=softcap, upcast=upcast, return_lse=True)
        if grad_lse is None:
            ref_out.backward(grad_out.to(ref_out.dtype))
        else:
            torch.autograd.backward([ref_out, ref_lse], [grad_out.to(ref_out.dtype), grad_lse])
        results[upcast] = (ref_out.detach(), ref_lse.detach(), *(t.grad for t in leaves))
    oracle, baseline = results[True], results[False]

    assert out.dtype == q.dtype and dq.dtype == q.dtype and dk.dtype == k.dtype
    assert lse.dtype == torch.float32
    # atol relative to each tensor's scale: an exactly-zero oracle (dq with one key) must not
    # demand exact zeros from fp32 sums taken in another order.
    for name, fast, ref, base in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), oracle, baseline):
        assert_tolerance_rule(name, fast, ref, base, atol=1e-3, relative_atol=True)
    return out, lse, dq, dk, dv


@pytest.mark.gpu
@pytest.mark.parametrize("heads_q,heads_kv", CUDA_HEADS)
@pytest.mark.parametrize("seqlen_q,seqlen_k", CUDA_SEQLENS)
@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=["fp16", "bf16"])
def test_cuda_kernels_match_reference(dtype, head_dim, causal, with_mask, seqlen_q, seqlen_k, heads_q, heads_kv):
    _require_extension()
    q, k, v, mask = _cuda_inputs(2, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, dtype, with_mask)
    check_cuda_kernels(q, k, v, causal, mask, 1.0 / math.sqrt(head_dim))


CUDA_OPTIONS = {  # name -> (causal, window, bottom_right, softcap)
    "causal bottom-right": (True, (-1, -1), True, 0.0),
    "sliding window": (True, (37, -1), False, 0.0),
    "sliding window bottom-right": (True, (100, -1), True, 0.0),
    "window both sides": (False, (70, 9), False, 0.0),
    "softcap": (False, (-1, -1), False, 3.0),
    "softcap, causal window": (True, (64, -1), True, 1.5),
}


@pytest.mark.gpu
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(1, 1), (113, 113), (1023, 1023), (77, 300), (300, 77)])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("name", list(CUDA_OPTIONS))
def test_cuda_kernels_options(name, head_dim, seqlen_q, seqlen_k):
    """Windows (key tiles skipped), both alignments, softcap and the lse's gradient."""
    _require_extension()
    causal, window, bottom_right, softcap = CUDA_OPTIONS[name]
    q, k, v, mask = _cuda_inputs(2, 6, 2, seqlen_q, seqlen_k, head_dim, torch.bfloat16, with_mask=True)
    check_cuda_kernels(q, k, v, causal, mask, head_dim**-0.5, window, bottom_right, softcap, with_grad_lse=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=["fp16", "bf16"])
def test_cuda_softmax_scale_is_applied(dtype):
    _require_extension()
    q, k, v, mask = _cuda_inputs(1, 2, 2, 77, 131, 64, dtype, with_mask=True)
    check_cuda_kernels(q, k, v, False, mask, 0.37)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cuda_fully_masked_rows_are_zero(causal):
    """A batch element with every key padded: out 0, lse -inf, no gradient anywhere in it."""
    _require_extension()
    q, k, v, mask = _cuda_inputs(3, 4, 2, 70, 90, 64, torch.float16, with_mask=True)
    mask[1] = False
    out, lse, dq, dk, dv = check_cuda_kernels(q, k, v, causal, mask, 0.125)
    assert (out[1] == 0).all() and (lse[1] == -math.inf).all()
    assert (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    # Padded keys of the other elements get no gradient either.
    assert (dk[0][:, ~mask[0]] == 0).all() and (dv[0][:, ~mask[0]] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cuda_strided_views_match_contiguous(head_dim):
    """(B, S, H, D).transpose(1, 2) views, as Hugging Face projections produce, are read in
    place and give bit-identical forward results to contiguous copies."""
    _require_extension()
    batch, seqlen, heads = 2, 150, 4
    qkv = torch.randn(batch, seqlen, 3, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, S, D), not contiguous
    assert not q.is_contiguous()
    out_view, lse_view = attention_cuda.attention_forward(q, k, v, True, None, 0.1)
    out_copy, lse_copy = attention_cuda.attention_forward(q.contiguous(), k.contiguous(), v.contiguous(), True,
                                                          None, 0.1)
    assert torch.equal(out_view, out_copy) and torch.equal(lse_view, lse_copy)
    check_cuda_kernels(q, k, v, True, None, 0.1)


@pytest.mark.gpu
def test_cuda_forward_is_deterministic():
    """The forward pass has no atomics: two runs agree bit for bit (a race would not)."""
    _require_extension()
    q, k, v, mask = _cuda_inputs(2, 8, 2, 517, 517, 128, torch.float16, with_mask=True)
    first = attention_cuda.attention_forward(q, k, v, True, mask, 0.088)
    second = attention_cuda.attention_forward(q, k, v, True, mask, 0.088)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.gpu
def test_cuda_empty_key_sequence():
    _require_extension()
    q, k, v, _ = _cuda_inputs(2, 2, 2, 5, 0, 64, torch.float16, with_mask=False)
    out, lse = attention_cuda.attention_forward(q, k, v, False, None, 0.125)
    assert (out == 0).all() and (lse == -math.inf).all()
    dq, dk, dv = attention_cuda.attention_backward(torch.randn_like(q), q, k, v, out, lse, False, None, 0.125)
    assert (dq == 0).all() and dk.shape == k.shape and dv.shape == v.shape


@pytest.mark.gpu
def test_cuda_rejects_bad_inputs():
    _require_extension()
    q, k, v, _ = _cuda_inputs(2, 3, 2, 9, 9, 64, torch.float16, with_mask=False)
    with pytest.raises(ValueError, match="multiple"):
        attention_cuda.attention_forward(q, k, v, False, None, 0.125)  # 3 query heads over 2 kv heads
    q, k, v, _ = _cuda_inputs(2, 2, 2, 9, 9, 64, torch.float16, with_mask=False)
    with pytest.raises(ValueError, match="key_padding_mask"):
        attention_cuda.attention_forward(q, k, v, False, torch.ones(2, 8, dtype=torch.bool, device="cuda"), 0.125)
    with pytest.raises(TypeError):
        attention_cuda.attention_forward(q.float(), k.float(), v.float(), False, None, 0.125)


@pytest.mark.gpu
def test_cuda_reasons_empty_for_supported_inputs():
    _require_extension()
    q, k, v, mask = _cuda_inputs(1, 4, 2, 9, 9, 128, torch.bfloat16, with_mask=True)
    assert attention_cuda.reasons(q, k, v, mask, None, 0.0) == []


def test_cuda_reasons_name_what_the_kernels_cannot_do():
    """Runs on the CPU: the reasons are plain Python."""
    q = torch.randn(1, 2, 5, 64)
    text = " | ".join(attention_cuda.reasons(q, q, q, None, torch.tensor([0, 5]), 0.1, torch.ones(2)))
    assert "CUDA device" in text and "float16/bfloat16" in text
    assert "cu_seqlens" in text and "dropout" in text and "ALiBi" in text
    odd = torch.randn(1, 2, 5, 96, dtype=torch.float16)
    assert any("head_dim 96" in r for r in attention_cuda.reasons(odd, odd, odd))


@pytest.mark.parametrize("capability,archs,runs", [
    ((9, 0), ("80", "90a"), True),
    ((8, 6), ("80", "90a"), True),
    ((10, 0), ("80", "90a"), False),  # no kernel image in the build
    ((7, 5), ("75",), False),  # an image, but the kernels need sm_80 instructions
])
def test_cuda_reasons_on_a_stand_in_gpu(monkeypatch, capability, archs, runs):
    """The device half of the CUDA backend's reasons (what `auto` asks first on a GPU) runs
    here against a stand-in GPU and extension."""
    stand_in_gpu(monkeypatch, capability=capability, archs=archs)
    q = cuda_tensor(1, 4, 9, 64, dtype=torch.bfloat16)
    k = cuda_tensor(1, 2, 9, 64, dtype=torch.bfloat16)
    mask = cuda_tensor(1, 9, dtype=torch.bool)
    found = backend_reasons(q, k, k, key_padding_mask=mask)["cuda"]()
    assert (found == []) == runs, found
    if capability == (7, 5):
        assert found == ["compute capability 7.5 < 8.0"]


def test_cuda_reasons_name_a_missing_binding(monkeypatch):
    stand_in_gpu(monkeypatch, bindings=("lora_fused_linear",))
    q = cuda_tensor(1, 2, 9, 64)
    assert any("built without attention_forward" in r for r in attention_cuda.reasons(q, q, q))


# --------------------------------------------------------------------------- GPU: repeatability, streams


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_dk_dv_repeat_bit_for_bit(backend):
    """dK and dV have one writer per element in both backends (GQA heads are summed in
    registers, no atomics): two backward passes agree bit for bit. A race (a missing
    barrier, a split that adds in another order) would not."""
    qkv = make_qkv(2, 8, 2, 517, 517, 128, torch.bfloat16, device="cuda")
    if backend == "cuda" and backend_reasons(*qkv)["cuda"]():
        pytest.skip("cuda backend: " + "; ".join(backend_reasons(*qkv)["cuda"]()))
    mask = torch.rand(2, 517, device="cuda") > 0.2
    grad_out = torch.randn_like(qkv[0])
    runs = [torch.autograd.grad(attention(*qkv, causal=True, key_padding_mask=mask, backend=backend), qkv[1:],
                                grad_out) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_on_a_non_default_stream(backend):
    """Forward and backward run on the caller's current stream: on a side stream the
    results are the default stream's, bit for bit (dQ's atomics aside: compared by rule)."""
    qkv = make_qkv(2, 4, 2, 300, 300, 64, torch.float16, device="cuda")
    if backend == "cuda" and backend_reasons(*qkv)["cuda"]():
        pytest.skip("cuda backend: " + "; ".join(backend_reasons(*qkv)["cuda"]()))
    grad_out = torch.randn_like(qkv[0])

    def step():
        out = attention(*qkv, causal=True, backend=backend)
        return [out, *torch.autograd.grad(out, qkv, grad_out)]

    expected = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = [t * 1 for t in step()]  # torch ops queued behind the kernels on the same stream
    torch.cuda.current_stream().wait_stream(side)
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
        assert torch.equal(g, e) or name == "dq", name
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------- CUDA backend on a CPU
# The emulating stand-in (tests/_cuda_stand_in.py) runs fastft/ops/attention_cuda.py on CPU
# tensors, checks each launch against csrc/attention/bindings.h and computes what the
# kernels would from the raw pointers and strides, so the wrapper's arguments are checked
# by the numbers.


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,causal,padded", [((2, 4, 2, 33, 40, 64), True, True),
                                                 ((1, 2, 2, 17, 9, 32), False, True),
                                                 ((2, 4, 1, 20, 20, 128), True, False)])
def test_cuda_backend_on_the_stand_in(monkeypatch, dtype, shape, causal, padded):
    stand_in = stand_in_gpu(monkeypatch, emulate=True)
    qkv = make_qkv(*shape, dtype)
    mask = torch.rand(shape[0], shape[4]) > 0.3 if padded else None
    check_against_reference("cuda", qkv, dtype, causal=causal, key_padding_mask=mask)
    assert [name for name, _ in stand_in.calls] == ["attention_forward", "attention_backward"]
    assert stand_in.guards == [qkv[0].device] * 2  # launched on the tensors' device


@pytest.mark.parametrize("name", ["causal bottom-right, seq_q > seq_k", "window bottom-right + padding",
                                  "softcap causal padded", "window on both sides"])
def test_cuda_backend_options_on_the_stand_in(monkeypatch, name):
    """Windows, alignments, softcap and the lse's gradient cross the binding as the kernels
    take them (window_left / window_right / bottom_right / softcap / grad_lse)."""
    stand_in = stand_in_gpu(monkeypatch, emulate=True)
    shape, kwargs = _option_case(name)
    shape = (*shape[:5], 64)  # a head_dim the kernels have
    check_against_reference("cuda", make_qkv(*shape, torch.float16), torch.float16, with_lse=True, **kwargs)
    forward, backward = (call for _, call in stand_in.calls)
    left, right = kwargs.get("window") or (-1, -1)
    if kwargs.get("causal"):
        right = 0
    assert (forward["window_left"], forward["window_right"]) == (left, right)
    assert forward["bottom_right"] == (kwargs.get("causal_alignment") == "bottom-right")
    assert forward["softcap"] == kwargs.get("softcap", 0.0) and backward["softcap"] == forward["softcap"]
    assert backward["grad_lse"] != 0  # the lse's gradient crossed too


def test_cuda_backend_reads_strided_views_in_place(monkeypatch):
    """(B, S, H, D).transpose(1, 2) views go to the kernels without a copy: their strides
    cross the binding, and the emulated kernel reading through them gives the reference."""
    stand_in = stand_in_gpu(monkeypatch, emulate=True)
    packed = torch.randn(2, 30, 3, 4, 64, dtype=torch.float16)  # (B, S, 3, H, D)
    q, k, v = (packed[:, :, i].transpose(1, 2).requires_grad_() for i in range(3))
    assert not q.is_contiguous()
    check_against_reference("cuda", [q, k, v], torch.float16, causal=True)
    forward = stand_in.calls[0][1]
    assert forward["q"] == q.data_ptr() and tuple(forward["q_strides"]) == q.stride()[:3]


# --------------------------------------------------------------------------- GPU: pipelined CUDA backward
# Issue 15, defect 8: FASTFT_ATTENTION_BWD=pipelined selects the dK/dV kernel with
# double-buffered Q / dO loads and, on small grids, the query steps of a key block split over
# several thread blocks (fp32 partials summed in a fixed order). It is opt-in until a GPU has
# run these tests: they put it next to the classic kernel on the same inputs (the classic
# kernel's error sets the bound of the tolerance rule) and require bitwise repeatable dK / dV.
# FASTFT_ATTENTION_BWD_SPLITS forces the split path on shapes a large GPU would not split.

PIPELINED_CASES = {  # name -> (batch, heads_q, heads_kv, seqlen_q, seqlen_k, causal, window, bottom_right, mask)
    "short mha": (2, 2, 2, 7, 7, False, (-1, -1), False, False),
    "gqa 4 causal padded": (2, 8, 2, 113, 203, True, (-1, -1), False, True),
    "mqa long causal": (1, 8, 1, 1023, 1023, True, (-1, -1), False, False),
    "gqa sliding window bottom-right": (2, 6, 2, 300, 77, True, (37, -1), True, True),
    "window both sides padded": (2, 4, 2, 203, 203, False, (70, 9), False, True),
    "one query": (3, 4, 2, 1, 300, False, (-1, -1), False, True),
}


def _fp32_reference_grads(q, k, v, grad_out, grad_lse, causal, mask, scale, window, bottom_right):
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = attention_ref(*leaves, causal=causal, key_padding_mask=mask, softmax_scale=scale,
                                     window=window, causal_alignment="bottom-right" if bottom_right else "top-left",
                                     upcast=True, return_lse=True)
    torch.autograd.backward([ref_out, ref_lse], [grad_out.float(), grad_lse])
    return [t.grad for t in leaves]


def _cuda_backward_variant(monkeypatch, variant, splits, *args, **kwargs):
    monkeypatch.setenv("FASTFT_ATTENTION_BWD", variant)
    monkeypatch.setenv("FASTFT_ATTENTION_BWD_SPLITS", str(splits))
    grads = attention_cuda.attention_backward(*args, **kwargs)
    torch.cuda.synchronize()
    return grads


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [0, 3], ids=["auto-splits", "3-splits"])
@pytest.mark.parametrize("name", list(PIPELINED_CASES))
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=["fp16", "bf16"])
def test_gpu_pipelined_backward_matches_classic(monkeypatch, dtype, head_dim, name, splits):
    """The pipelined dQ / dK / dV obey the tolerance rule against the fp32 reference with the
    classic kernel as the plain computation (error <= 2 x classic's + atol), and dK / dV
    repeat bit for bit."""
    _require_extension()
    batch, heads_q, heads_kv, seqlen_q, seqlen_k, causal, window, bottom_right, with_mask = PIPELINED_CASES[name]
    q, k, v, mask = _cuda_inputs(batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, dtype, with_mask)
    scale = head_dim**-0.5
    options = dict(window=window, bottom_right=bottom_right)
    out, lse = attention_cuda.attention_forward(q, k, v, causal, mask, scale, **options)
    grad_out = torch.randn_like(q)
    grad_lse = torch.randn_like(lse).masked_fill(lse.isinf(), 0.0)
    args = (grad_out, q, k, v, out, lse, causal, mask, scale)
    classic = _cuda_backward_variant(monkeypatch, "classic", 0, *args, grad_lse=grad_lse, **options)
    _poison_allocator(q.shape, q.shape, k.shape, k.shape, device=q.device)
    pipelined = _cuda_backward_variant(monkeypatch, "pipelined", splits, *args, grad_lse=grad_lse, **options)
    again = _cuda_backward_variant(monkeypatch, "pipelined", splits, *args, grad_lse=grad_lse, **options)
    reference = _fp32_reference_grads(q, k, v, grad_out, grad_lse, causal, mask, scale, window, bottom_right)
    for label, fast, ref, plain in zip(("dq", "dk", "dv"), pipelined, reference, classic):
        assert fast.dtype == dtype and fast.shape == plain.shape
        assert torch.isfinite(fast).all(), label
        assert_tolerance_rule(label, fast, ref, plain, atol=1e-3, relative_atol=True)
    assert torch.equal(pipelined[1], again[1]) and torch.equal(pipelined[2], again[2])
    if with_mask:  # padded keys get no gradient from either kernel
        assert (pipelined[1][0][:, ~mask[0]] == 0).all() and (pipelined[2][0][:, ~mask[0]] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 32, 8, 1024, 128), (32, 12, 12, 512, 64), (2, 16, 2, 256, 128)],
                         ids=["llama-gqa-1k", "bert-base-32x512", "gqa-8-short"])
def test_gpu_pipelined_backward_real_shapes(monkeypatch, shape):
    """The shapes of benchmarks/NOTES.md with the automatic split (Llama GQA at 1k tokens is
    split on a 132-SM GPU, BERT-base is not): rule against fp32 with classic as the plain
    computation, bitwise repeat of dK / dV through the public op."""
    _require_extension()
    batch, heads_q, heads_kv, seqlen, head_dim = shape
    q, k, v, mask = _cuda_inputs(batch, heads_q, heads_kv, seqlen, seqlen, head_dim, torch.bfloat16, True)
    sm_count = torch.cuda.get_device_properties(q.device).multi_processor_count
    splits = attention_cuda.backward_splits(batch, heads_q, heads_kv, seqlen, seqlen, head_dim, sm_count)
    if shape[0] == 1 and sm_count >= 100:
        assert splits > 1  # the small-grid case defect 8 is about
    scale = head_dim**-0.5
    out, lse = attention_cuda.attention_forward(q, k, v, True, mask, scale)
    grad_out = torch.randn_like(q)
    args = (grad_out, q, k, v, out, lse, True, mask, scale)
    classic = _cuda_backward_variant(monkeypatch, "classic", 0, *args)
    pipelined = _cuda_backward_variant(monkeypatch, "pipelined", 0, *args)
    zero_lse = torch.zeros_like(lse)
    reference = _fp32_reference_grads(q, k, v, grad_out, zero_lse, True, mask, scale, (-1, -1), False)
    for label, fast, ref, plain in zip(("dq", "dk", "dv"), pipelined, reference, classic):
        assert_tolerance_rule(label, fast, ref, plain, atol=1e-3, relative_atol=True)
    qkv = [t.detach().requires_grad_() for t in (q, k, v)]
    runs = [torch.autograd.grad(attention(*qkv, causal=True, key_padding_mask=mask, backend="cuda"), qkv[1:],
                                grad_out) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [0, 2])
def test_gpu_pipelined_dk_dv_repeat_bit_for_bit(monkeypatch, splits):
    """test_gpu_dk_dv_repeat_bit_for_bit with the pipelined kernel: the split partials are
    summed in a fixed order, so dK / dV stay deterministic."""
    monkeypatch.setenv("FASTFT_ATTENTION_BWD", "pipelined")
    monkeypatch.setenv("FASTFT_ATTENTION_BWD_SPLITS", str(splits))
    qkv = make_qkv(2, 8, 2, 517, 517, 128, torch.bfloat16, device="cuda")
    if backend_reasons(*qkv)["cuda"]():
        pytest.skip("cuda backend: " + "; ".join(backend_reasons(*qkv)["cuda"]()))
    mask = torch.rand(2, 517, device="cuda") > 0.2
    grad_out = torch.randn_like(qkv[0])
    runs = [torch.autograd.grad(attention(*qkv, causal=True, key_padding_mask=mask, backend="cuda"), qkv[1:],
                                grad_out) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
