"""The CUDA FlashAttention-2 kernels (csrc/attention/) against plain PyTorch.

``fastft.ops._cuda.attention_forward`` / ``attention_backward`` are compared with an fp32
reference on fresh random inputs, outputs, log-sum-exp and every gradient, under the
DESIGN.md rule: the kernel's error against fp32 is at most twice the error of the same
computation done in plain torch in the input dtype, plus a small atol. GPU-only tests are
marked ``gpu``; the refusal reasons are checked on the CPU too.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastft.ops import _cuda

DTYPES = (torch.float16, torch.bfloat16)


def _require_extension():
    if _cuda.load_error() is not None:
        pytest.skip(f"fastft._cuda unavailable: {_cuda.load_error()}")


def reference_attention(q, k, v, causal, key_padding_mask, softmax_scale, upcast=True):
    """Plain torch attention: returns (out, lse).

    ``upcast=True`` computes in fp32 (the oracle); ``upcast=False`` in the input dtype, as
    an unfused model would (the baseline of the tolerance rule). Differentiable in q, k, v.
    """
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # (B, Hq, Sk, D)
    v = v.repeat_interleave(group, dim=1)
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    scores = (q @ k.transpose(-1, -2)) * softmax_scale  # (B, Hq, Sq, Sk)
    allowed = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril()  # top-left aligned: key j <= query i
    allowed = allowed[None, None]  # (1, 1, Sq, Sk)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    has_key = allowed.any(dim=-1, keepdim=True)  # (B, Hq, Sq, 1)
    lse = scores.float().masked_fill(~allowed, -math.inf).logsumexp(dim=-1)  # -inf on empty rows
    # A finite fill (not -inf) keeps fully masked rows NaN-free in forward and backward;
    # multiplying by has_key then zeroes them, as the kernels do.
    probs = torch.softmax(scores.masked_fill(~allowed, torch.finfo(scores.dtype).min), dim=-1)
    probs = probs * has_key.to(probs.dtype)
    return probs @ v, lse


def _poison_allocator(*shapes, device):
    """Leave NaN-filled blocks in torch's caching allocator, so that an output element the
    kernel forgets to write shows up as NaN rather than as a stale plausible value."""
    for shape in shapes:
        torch.full(shape, math.nan, dtype=torch.float32, device=device)


def _max_error(value, oracle):
    return (value.float() - oracle.float()).abs().max().item() if value.numel() else 0.0


def assert_within_rule(name, fast, oracle, baseline, rel_atol=1e-3):
    """|fast - oracle| <= 2 |baseline - oracle| + atol (DESIGN.md), atol relative to the
    oracle's scale (at least rel_atol: an exactly-zero oracle, e.g. dq with one key, must
    not demand exact zeros from fp32 sums taken in another order); also: all finite."""
    assert fast.shape == oracle.shape, f"{name}: shape {tuple(fast.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(fast.float()).all(), f"{name}: non-finite values"
    fast_err = _max_error(fast, oracle)
    base_err = _max_error(baseline, oracle)
    atol = rel_atol * max(oracle.abs().max().item() if oracle.numel() else 0.0, 1.0)
    assert fast_err <= 2 * base_err + atol, (
        f"{name}: error {fast_err:.3e} > 2 x torch-{baseline.dtype} error {base_err:.3e} + atol {atol:.1e}")


def assert_lse_within_rule(fast, oracle, baseline):
    empty = oracle == -math.inf
    assert torch.equal(fast == -math.inf, empty), "lse: -inf exactly on the rows with no allowed key"
    assert_within_rule("lse", fast[~empty], oracle[~empty], baseline[~empty])


def _random_inputs(batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, dtype, with_mask, device="cuda"):
    q = torch.randn(batch, heads_q, seqlen_q, head_dim, device=device, dtype=dtype)
    k = torch.randn(batch, heads_kv, seqlen_k, head_dim, device=device, dtype=dtype)
    v = torch.randn(batch, heads_kv, seqlen_k, head_dim, device=device, dtype=dtype)
    mask = None
    if with_mask:
        mask = torch.rand(batch, seqlen_k, device=device) > 0.3  # ~30% of keys padded
        mask[0, -((seqlen_k + 1) // 2):] = False  # a right-padded sequence, as in a real batch
    return q, k, v, mask


def _check_against_reference(q, k, v, causal, mask, scale):
    """Runs the kernels and the two references on the same inputs and asserts the rule."""
    grad_out = torch.randn_like(q)
    _poison_allocator(q.shape, q.shape, k.shape, k.shape, device=q.device)
    out, lse = _cuda.attention_forward(q, k, v, causal, mask, scale)
    dq, dk, dv = _cuda.attention_backward(grad_out, q, k, v, out, lse, causal, mask, scale)
    torch.cuda.synchronize()

    results = {}
    for upcast in (True, False):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        ref_out, ref_lse = reference_attention(*leaves, causal, mask, scale, upcast=upcast)
        ref_out.backward(grad_out.to(ref_out.dtype))
        results[upcast] = (ref_out.detach(), ref_lse, *(t.grad for t in leaves))
    oracle, baseline = results[True], results[False]

    assert out.dtype == q.dtype and dq.dtype == q.dtype and dk.dtype == k.dtype
    assert lse.dtype == torch.float32
    assert_within_rule("out", out, oracle[0], baseline[0])
    assert_lse_within_rule(lse, oracle[1], baseline[1])
    for name, fast, ref, base in zip(("dq", "dk", "dv"), (dq, dk, dv), oracle[2:], baseline[2:]):
        assert_within_rule(name, fast, ref, base)
    return out, lse, dq, dk, dv


SEQLENS = [(1, 1), (7, 7), (113, 113), (1023, 1023), (113, 203), (203, 113), (1, 300), (300, 7)]
HEADS = [(2, 2), (6, 2), (4, 1)]  # MHA, GQA, MQA


@pytest.mark.gpu
@pytest.mark.parametrize("heads_q,heads_kv", HEADS)
@pytest.mark.parametrize("seqlen_q,seqlen_k", SEQLENS)
@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_matches_reference(dtype, head_dim, causal, with_mask, seqlen_q, seqlen_k, heads_q, heads_kv):
    _require_extension()
    q, k, v, mask = _random_inputs(2, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, dtype, with_mask)
    _check_against_reference(q, k, v, causal, mask, 1.0 / math.sqrt(head_dim))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_softmax_scale_is_applied(dtype):
    _require_extension()
    q, k, v, mask = _random_inputs(1, 2, 2, 77, 131, 64, dtype, with_mask=True)
    _check_against_reference(q, k, v, False, mask, 0.37)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fully_masked_rows_are_zero(causal):
    """A batch element with every key padded: out 0, lse -inf, no gradient anywhere in it."""
    _require_extension()
    q, k, v, mask = _random_inputs(3, 4, 2, 70, 90, 64, torch.float16, with_mask=True)
    mask[1] = False
    out, lse, dq, dk, dv = _check_against_reference(q, k, v, causal, mask, 0.125)
    assert (out[1] == 0).all() and (lse[1] == -math.inf).all()
    assert (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    # Padded keys of the other elements get no gradient either.
    assert (dk[0][:, ~mask[0]] == 0).all() and (dv[0][:, ~mask[0]] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_strided_views_match_contiguous(head_dim):
    """(B, S, H, D).transpose(1, 2) views, as Hugging Face projections produce, are read in
    place and give bit-identical forward results to contiguous copies."""
    _require_extension()
    batch, seqlen, heads = 2, 150, 4
    qkv = torch.randn(batch, seqlen, 3, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, S, D), not contiguous
    assert not q.is_contiguous()
    out_view, lse_view = _cuda.attention_forward(q, k, v, True, None, 0.1)
    out_copy, lse_copy = _cuda.attention_forward(q.contiguous(), k.contiguous(), v.contiguous(), True, None, 0.1)
    assert torch.equal(out_view, out_copy) and torch.equal(lse_view, lse_copy)
    _check_against_reference(q, k, v, True, None, 0.1)


@pytest.mark.gpu
def test_forward_is_deterministic():
    """The forward pass has no atomics: two runs agree bit for bit (a race would not)."""
    _require_extension()
    q, k, v, mask = _random_inputs(2, 8, 2, 517, 517, 128, torch.float16, with_mask=True)
    first = _cuda.attention_forward(q, k, v, True, mask, 0.088)
    second = _cuda.attention_forward(q, k, v, True, mask, 0.088)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.gpu
def test_empty_key_sequence():
    _require_extension()
    q, k, v, _ = _random_inputs(2, 2, 2, 5, 0, 64, torch.float16, with_mask=False)
    out, lse = _cuda.attention_forward(q, k, v, False, None, 0.125)
    assert (out == 0).all() and (lse == -math.inf).all()
    dq, dk, dv = _cuda.attention_backward(torch.randn_like(q), q, k, v, out, lse, False, None, 0.125)
    assert (dq == 0).all() and dk.shape == k.shape and dv.shape == v.shape


@pytest.mark.gpu
def test_rejects_bad_inputs():
    _require_extension()
    q, k, v, _ = _random_inputs(2, 3, 2, 9, 9, 64, torch.float16, with_mask=False)
    with pytest.raises(ValueError, match="multiple"):
        _cuda.attention_forward(q, k, v, False, None, 0.125)  # 3 query heads over 2 kv heads
    q, k, v, _ = _random_inputs(2, 2, 2, 9, 9, 64, torch.float16, with_mask=False)
    with pytest.raises(ValueError, match="key_padding_mask"):
        _cuda.attention_forward(q, k, v, False, torch.ones(2, 8, dtype=torch.bool, device="cuda"), 0.125)
    with pytest.raises(TypeError):
        _cuda.attention_forward(q.float(), k.float(), v.float(), False, None, 0.125)


def test_reasons_name_what_the_kernels_cannot_do():
    """Runs on the CPU: the reasons are plain Python."""
    q = torch.randn(1, 2, 5, 64)
    reasons = _cuda.attention_reasons(q, q, q, None, torch.tensor([0, 5]), 0.1)
    text = " | ".join(reasons)
    assert "CUDA device" in text and "float16/bfloat16" in text
    assert "cu_seqlens" in text and "dropout" in text
    odd = torch.randn(1, 2, 5, 96, dtype=torch.float16)
    assert any("head_dim 96" in r for r in _cuda.attention_reasons(odd, odd, odd))


@pytest.mark.gpu
def test_reasons_empty_for_supported_inputs():
    _require_extension()
    q, k, v, mask = _random_inputs(1, 4, 2, 9, 9, 128, torch.bfloat16, with_mask=True)
    assert _cuda.attention_reasons(q, k, v, mask, None, 0.0) == []
