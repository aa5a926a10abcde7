"""Triton FlashAttention-2 kernels for ``fastft.ops.attention`` (the ``triton`` backend).

Algorithm: FlashAttention-2 (Dao, "FlashAttention-2: Faster Attention with Better
Parallelism and Work Partitioning", 2023).

* forward: one program per (query block, batch * head); it streams key/value blocks,
  keeps a running row maximum ``m`` and row sum ``l`` of ``exp(s - m)`` (online softmax)
  and rescales its fp32 accumulator when the maximum grows; at the end it writes
  ``out = acc / l`` and the row log-sum-exp ``lse = m + log(l)`` for the backward pass.
* backward: ``delta = rowsum(dO ∘ O)`` (a small preprocess kernel), then a dk/dv kernel
  with one program per (key block, batch * kv-head) that loops over query blocks (and the
  query heads sharing that kv head, so grouped-query attention needs no atomics), and a
  dq kernel with one program per (query block, batch * head) that loops over key blocks.
  Both rebuild the probabilities ``P = exp(S - lse)`` instead of storing them.

Masks: causal (top-left aligned, query ``i`` attends keys ``j <= i`` as SDPA's
``is_causal``), a key padding mask, sequence ends and head_dim padding (the head
dimension is padded to the next power of two >= 16 and masked on every load/store).
Variable-length batches use the same kernels: a "batch" index is a document, its rows
start at ``cu_seqlens[doc]`` and its length is ``cu_seqlens[doc + 1] - cu_seqlens[doc]``.

Dropout: one Philox-4x32 call (``tl.randint4x``) gives 128 random bits, 16 per keep
decision, so one call serves 8 consecutive keys of a query row (FlashAttention-2 draws
its bits the same way): score ``(b, h, i, j)`` uses call ``(key = seed + ((b * heads_q +
h) << 32), counter = i * ceil(seq_k / 8) + j // 8)``, 16-bit half ``j % 2`` of output word
``(j % 8) // 2``, and is kept when those bits are ``>= round(dropout_p * 2^16)``. The
forward and both backward kernels draw the same numbers (Philox is counter based), and
``fastft.ops.attention.attention_dropout_mask`` reproduces them in torch.

Scores are kept in base 2 (``qk_scale = softmax_scale * log2(e)``) so the kernels use
``exp2``; ``lse`` is stored in natural log (the convention shared with the CUDA backend).
Only plain pointer arithmetic is used (``tl.make_block_ptr`` is gone in triton 3.9).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from fastft.kernels._autotune import config, one_config, target_family
from fastft.kernels._common import attention_dropout_threshold, interpreting_triton

LOG2E = 1.4426950408889634  # 1 / ln(2): exp(x) = exp2(x * LOG2E)
LN2 = 0.6931471805599453


# --------------------------------------------------------------------------- autotuning


def _configs(shapes):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, {arch family: largest padded head_dim})
    candidates; one small config under the interpreter (more than one fails there, and
    small blocks keep numpy quick)."""
    if interpreting_triton():
        shapes = [(64, 64, 4, 1, {80: 256, 90: 256})]
    configs = []
    for m, n, warps, stages, fits in shapes:
        configs.append(config({"BLOCK_M": m, "BLOCK_N": n}, warps, stages, archs=tuple(fits), fits=fits))
    return configs


# Which tile fits where was measured ahead of time (python -m fastft.kernels.aot, every
# candidate compiled for sm_80 and sm_90 with a padding mask, causal masking and dropout,
# the kernels' largest register footprint, with triton 3.9 and the GPU image's 3.6): a
# config is listed for an architecture family up to the largest head_dim (padded) at
# which it stays within shared memory and spills at most kernels/aot.py's SPILL_BUDGET
# with both. On sm_80 (mma.sync: accumulators in registers, no
# wgmma) the tiles are smaller. Numbers: benchmarks/NOTES.md ("Triton configs, ahead of
# time"). The first config is the one FASTFT_TRITON_CONFIGS=first keeps.
FWD_CONFIGS = _configs([
    (128, 64, 8, 3, {80: 64, 90: 128}),
    (128, 128, 8, 2, {90: 128}),
    (128, 128, 8, 3, {90: 64}),
    (128, 32, 4, 3, {80: 64, 90: 64}),
    (64, 64, 4, 4, {80: 128, 90: 128}),
    (64, 64, 4, 2, {80: 128, 90: 128}),  # head_dim 256, sm_90: 64 B of spills (triton 3.9), 80 B (3.6)
    (64, 32, 4, 3, {80: 128, 90: 256}),
    (32, 32, 4, 2, {80: 256, 90: 256}),
])
# dk/dv: BLOCK_N keys are the resident tile, BLOCK_M queries stream; dq: the reverse.
BWD_KV_CONFIGS = _configs([
    (32, 64, 8, 3, {80: 128, 90: 64}),  # head_dim 128, sm_90: 32 B of spills (triton 3.9), 72 B (3.6)
    (32, 128, 8, 3, {90: 64}),
    (32, 128, 8, 2, {90: 64}),
    (32, 64, 4, 3, {90: 64}),
    (16, 128, 8, 3, {90: 128}),
    (16, 64, 4, 2, {80: 64, 90: 64}),  # head_dim 128, sm_90: 8 B (triton 3.9), 80 B (3.6)
    (32, 32, 4, 2, {80: 128, 90: 128}),
    (16, 32, 4, 2, {80: 256, 90: 256}),
])
BWD_Q_CONFIGS = _configs([
    (128, 32, 8, 3, {80: 128, 90: 128}),
    (128, 64, 8, 3, {90: 128}),
    (64, 64, 8, 3, {80: 128, 90: 128}),
    (64, 64, 4, 3, {90: 128}),  # sm_80: 128 B of spills at head_dim 64 (0 at 128)
    (64, 32, 4, 3, {80: 128, 90: 128}),
    (64, 32, 4, 2, {80: 128, 90: 128}),
    (128, 32, 4, 3, {90: 64}),
    (32, 32, 4, 2, {80: 256, 90: 256}),
])


def _prune_for_head_dim(configs, named_args, **kwargs):
    """The configs that fit the target architecture at this head_dim (FASTFT_TRITON_CONFIGS
    =first: the first of them); the smallest one when none is listed there."""
    head_dim = max(64, {**named_args, **kwargs}.get("HEAD_DIM_PAD", 64))
    family = target_family()
    kept = [c for c in configs if getattr(c, "fits", {}).get(family, 0) >= head_dim]
    kept = kept or configs[-1:]
    return kept[:1] if one_config() else kept


_AUTOTUNE_KEY = ["seq_bucket", "HEAD_DIM_PAD", "CAUSAL", "HAS_PADDING_MASK", "IS_VARLEN", "HAS_DROPOUT"]


# --------------------------------------------------------------------------- helpers


@triton.jit
def _keep_mask(seed, bh, rows, start_n, seq_len_k, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: which scores of query rows ``rows`` and keys ``start_n +
    [0, BLOCK_N)`` survive dropout (``start_n`` and BLOCK_N multiples of 8). One Philox
    call per 8 scores: counter ``i * ceil(seq_k / 8) + j // 8``; its four 32-bit words hold
    the 16-bit draws of keys j % 8 = 0, 1 (word 0, low / high half), 2, 3 (word 1), ..."""
    key = seed + (bh.to(tl.int64) << 32)
    groups = start_n // 8 + tl.arange(0, BLOCK_N // 8)  # (BN/8,)
    counter = (rows[:, None].to(tl.int64) * ((seq_len_k + 7) // 8) + groups[None, :]).to(tl.uint32)  # mod 2^32
    r0, r1, r2, r3 = tl.randint4x(key, counter)  # (BM, BN/8) each
    # Interleave the eight 16-bit draws d_t back into key order j = 8 c + t: join stacks
    # along a new last axis, so the innermost join is t's lowest bit (t = 4 t2 + 2 t1 + t0).
    low, high = 0xFFFF, 16
    even = tl.join(tl.join(r0 & low, r2 & low), tl.join(r1 & low, r3 & low))  # t0 = 0: t = 0, 4, 2, 6
    odd = tl.join(tl.join(r0 >> high, r2 >> high), tl.join(r1 >> high, r3 >> high))  # t0 = 1: t = 1, 5, 3, 7
    draws = tl.reshape(tl.join(even, odd), (BLOCK_M, BLOCK_N))
    return draws.to(tl.int32) >= threshold


@triton.jit
def _score_mask(offs_m, offs_n, seq_len_q, seq_len_k, KeyPaddingMask, mask_row_offset, stride_ms,
                CAUSAL: tl.constexpr, HAS_PADDING_MASK: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: query i may attend key j (in range, causal, not padded)."""
    valid = (offs_m[:, None] < seq_len_q) & (offs_n[None, :] < seq_len_k)
    if CAUSAL:  # top-left aligned: key j <= query i
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    if HAS_PADDING_MASK:
        attend = tl.load(KeyPaddingMask + mask_row_offset + offs_n * stride_ms, mask=offs_n < seq_len_k, other=0)
        valid = valid & (attend != 0)[None, :]
    return valid


@triton.jit
def _sequence_bounds(CuSeqlens, batch_index, seq_q, seq_k, IS_VARLEN: tl.constexpr):
    """(first row, rows in q, rows in k) of one batch element or one packed document."""
    if IS_VARLEN:
        start = tl.load(CuSeqlens + batch_index)
        length = tl.load(CuSeqlens + batch_index + 1) - start
        return start, length, length
    return tl.full([], 0, tl.int32), seq_q, seq_k


# --------------------------------------------------------------------------- forward


@triton.autotune(configs=FWD_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_for_head_dim})
@triton.jit(do_not_specialize=["seed", "dropout_threshold"])
def _attention_fwd_kernel(
    Q, K, V, Out, Lse, KeyPaddingMask, CuSeqlens,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh, stride_ls,
    stride_mb, stride_ms,
    heads_q, group_size, seq_q, seq_k, head_dim,
    softmax_scale, dropout_p, dropout_threshold, seed, seq_bucket,
    HEAD_DIM_PAD: tl.constexpr, CAUSAL: tl.constexpr, HAS_PADDING_MASK: tl.constexpr, IS_VARLEN: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)  # batch (or document) * heads_q + head
    batch, head = bh // heads_q, bh % heads_q
    head_kv = head // group_size  # grouped-query attention
    row0, seq_len_q, seq_len_k = _sequence_bounds(CuSeqlens, batch, seq_q, seq_k, IS_VARLEN)
    if start_m * BLOCK_M >= seq_len_q:
        return

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < head_dim
    # int64 base offsets: batch * stride overflows int32 on large tensors.
    q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + row0.to(tl.int64) * stride_qs
    k_base = K + batch.to(tl.int64) * stride_kb + head_kv.to(tl.int64) * stride_kh + row0.to(tl.int64) * stride_ks
    v_base = V + batch.to(tl.int64) * stride_vb + head_kv.to(tl.int64) * stride_vh + row0.to(tl.int64) * stride_vs
    mask_row = batch.to(tl.int64) * stride_mb

    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=(offs_m[:, None] < seq_len_q) & d_ok[None, :], other=0.0)  # (BLOCK_M, D)
    if DOT_FP32:  # the interpreter's bf16 tl.dot is wrong: compute on fp32 tiles
        q = q.to(tl.float32)
    qk_scale = softmax_scale * 1.4426950408889634  # scores in base 2: exp2 is the fast path

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (base 2)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2(s - m_i), before dropout
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    hi = seq_len_k
    if CAUSAL:  # keys past the block's last query are masked for every row
        hi = tl.minimum(seq_len_k, (start_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        k_t = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                      mask=(cols[None, :] < seq_len_k) & d_ok[:, None], other=0.0)  # (D, BLOCK_N)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                    mask=(cols[:, None] < seq_len_k) & d_ok[None, :], other=0.0)  # (BLOCK_N, D)
        if DOT_FP32:
            k_t, v = k_t.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, k_t) * qk_scale  # (BLOCK_M, BLOCK_N) fp32
        valid = _score_mask(offs_m, cols, seq_len_q, seq_len_k, KeyPaddingMask, mask_row, stride_ms,
                            CAUSAL, HAS_PADDING_MASK)
        s = tl.where(valid, s, float("-inf"))
        # Online softmax: new max, rescale the old sum/accumulator by exp2(m_old - m_new).
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row whose keys so far are all masked has m_new = -inf: subtract 0 instead so
        # exp2 gives 0 rather than exp2(-inf + inf) = NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:  # normalise with every probability, accumulate only the kept ones
            keep = _keep_mask(seed, bh, offs_m, start_n, seq_len_k, dropout_threshold, BLOCK_M, BLOCK_N)
            p = tl.where(keep, p, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    has_key = l_i > 0.0  # rows with no key to attend output 0 and lse = -inf
    inv_l = tl.where(has_key, 1.0 / tl.where(has_key, l_i, 1.0), 0.0)
    if HAS_DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    out = acc * inv_l[:, None]
    lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453, float("-inf"))

    o_base = Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + row0.to(tl.int64) * stride_os
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od, out.to(Out.dtype.element_ty),
             mask=(offs_m[:, None] < seq_len_q) & d_ok[None, :])
    l_base = Lse + batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + row0.to(tl.int64) * stride_ls
    tl.store(l_base + offs_m * stride_ls, lse, mask=offs_m < seq_len_q)


# --------------------------------------------------------------------------- backward


@triton.jit
def _attention_bwd_delta_kernel(
    Out, GradOut, Delta, CuSeqlens,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_gb, stride_gh, stride_gs, stride_gd,
    stride_lb, stride_lh, stride_ls,
    heads_q, seq_q, head_dim,
    HEAD_DIM_PAD: tl.constexpr, IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO ∘ O) (fp32) = rowsum(P ∘ dP): the softmax-backward correction."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    batch, head = bh // heads_q, bh % heads_q
    row0, seq_len_q, _ = _sequence_bounds(CuSeqlens, batch, seq_q, seq_q, IS_VARLEN)
    if start_m * BLOCK_M >= seq_len_q:
        return
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask = (offs_m[:, None] < seq_len_q) & (offs_d[None, :] < head_dim)
    o_base = Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + row0.to(tl.int64) * stride_os
    g_base = GradOut + batch.to(tl.int64) * stride_gb + head.to(tl.int64) * stride_gh + row0.to(tl.int64) * stride_gs
    o = tl.load(o_base + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od, mask=mask, other=0.0)
    g = tl.load(g_base + offs_m[:, None] * stride_gs + offs_d[None, :] * stride_gd, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * g.to(tl.float32), 1)
    d_base = Delta + batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + row0.to(tl.int64) * stride_ls
    tl.store(d_base + offs_m * stride_ls, delta, mask=offs_m < seq_len_q)


@triton.autotune(configs=BWD_KV_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_for_head_dim})
@triton.jit(do_not_specialize=["seed", "dropout_threshold"])
def _attention_bwd_dkdv_kernel(
    Q, K, V, GradOut, Lse, Delta, GradK, GradV, KeyPaddingMask, CuSeqlens,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_gb, stride_gh, stride_gs, stride_gd,
    stride_lb, stride_lh, stride_ls,
    stride_mb, stride_ms,
    heads_q, heads_kv, group_size, heads_per_split, stride_split, seq_q, seq_k, head_dim,
    softmax_scale, dropout_p, dropout_threshold, seed, seq_bucket,
    HEAD_DIM_PAD: tl.constexpr, CAUSAL: tl.constexpr, HAS_PADDING_MASK: tl.constexpr, IS_VARLEN: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV of one key block of one kv head: loops over the query blocks of the query
    heads of its group (GQA) that its split holds (program_id(2): heads [split *
    heads_per_split, ...)), so each element of its dK/dV (of the split's partial, written
    ``stride_split`` elements further per split) has one writer and no atomics.

    Works on transposed scores (keys along rows): sᵀ = K Qᵀ, pᵀ = exp(sᵀ - lse),
    dV += (pᵀ∘Z) dO, dpᵀ = (V dOᵀ)∘Z, dsᵀ = pᵀ∘(dpᵀ - delta), dK += dsᵀ Q.
    """
    start_n = tl.program_id(0)
    bh_kv = tl.program_id(1)  # batch (or document) * heads_kv + kv head
    batch, head_kv = bh_kv // heads_kv, bh_kv % heads_kv
    row0, seq_len_q, seq_len_k = _sequence_bounds(CuSeqlens, batch, seq_q, seq_k, IS_VARLEN)
    if start_n * BLOCK_N >= seq_len_k:
        return

    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < head_dim
    kv_mask = (offs_n[:, None] < seq_len_k) & d_ok[None, :]
    k_base = K + batch.to(tl.int64) * stride_kb + head_kv.to(tl.int64) * stride_kh + row0.to(tl.int64) * stride_ks
    v_base = V + batch.to(tl.int64) * stride_vb + head_kv.to(tl.int64) * stride_vh + row0.to(tl.int64) * stride_vs
    k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    if DOT_FP32:
        k, v = k.to(tl.float32), v.to(tl.float32)
    qk_scale = softmax_scale * 1.4426950408889634
    if HAS_PADDING_MASK:  # this key block's padding, read once
        key_attend = tl.load(KeyPaddingMask + batch.to(tl.int64) * stride_mb + offs_n * stride_ms,
                             mask=offs_n < seq_len_k, other=0)
    grad_k = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    grad_v = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)

    lo = 0
    if CAUSAL:  # queries before this key block never see it
        lo = (start_n * BLOCK_N // BLOCK_M) * BLOCK_M
    split = tl.program_id(2)
    for g in range(split * heads_per_split, tl.minimum(group_size, (split + 1) * heads_per_split)):
        head = head_kv * group_size + g
        bh = batch * heads_q + head  # the dropout key uses the query head
        q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + row0.to(tl.int64) * stride_qs
        g_base = (GradOut + batch.to(tl.int64) * stride_gb + head.to(tl.int64) * stride_gh
                  + row0.to(tl.int64) * stride_gs)
        l_base = Lse + batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + row0.to(tl.int64) * stride_ls
        d_base = (Delta + batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh
                  + row0.to(tl.int64) * stride_ls)
        for start_m in range(lo, seq_len_q, BLOCK_M):
            rows = start_m + offs_m
            row_mask = (rows[:, None] < seq_len_q) & d_ok[None, :]
            q = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :] * stride_qd, mask=row_mask, other=0.0)
            do = tl.load(g_base + rows[:, None] * stride_gs + offs_d[None, :] * stride_gd, mask=row_mask, other=0.0)
            if DOT_FP32:
                q, do = q.to(tl.float32), do.to(tl.float32)
            lse = tl.load(l_base + rows * stride_ls, mask=rows < seq_len_q, other=0.0) * 1.4426950408889634
            delta = tl.load(d_base + rows * stride_ls, mask=rows < seq_len_q, other=0.0)
            s_t = tl.dot(k, tl.trans(q)) * qk_scale  # (BLOCK_N, BLOCK_M), base 2
            # The mask built directly in the transposed (key, query) orientation.
            valid_t = (offs_n[:, None] < seq_len_k) & (rows[None, :] < seq_len_q)
            if CAUSAL:
                valid_t = valid_t & (offs_n[:, None] <= rows[None, :])
            if HAS_PADDING_MASK:
                valid_t = valid_t & (key_attend != 0)[:, None]
            # Probabilities rebuilt from the saved log-sum-exp; masked (and no-key rows,
            # whose lse is -inf) are exactly 0.
            p_t = tl.where(valid_t, tl.exp2(s_t - lse[None, :]), 0.0)
            dp_t = tl.dot(v, tl.trans(do))  # (BLOCK_N, BLOCK_M) = (dO Vᵀ)ᵀ
            if HAS_DROPOUT:
                keep_t = tl.trans(_keep_mask(seed, bh, rows, start_n * BLOCK_N, seq_len_k, dropout_threshold,
                                             BLOCK_M, BLOCK_N))  # (BLOCK_N, BLOCK_M)
                p_dropped_t = tl.where(keep_t, p_t / (1.0 - dropout_p), 0.0)
                dp_t = tl.where(keep_t, dp_t / (1.0 - dropout_p), 0.0)
            else:
                p_dropped_t = p_t
            grad_v += tl.dot(p_dropped_t.to(do.dtype), do)
            ds_t = p_t * (dp_t - delta[None, :])  # softmax backward
            grad_k += tl.dot(ds_t.to(q.dtype), q)

    grad_k = grad_k * softmax_scale  # S = scale · Q Kᵀ
    gk_base = (GradK + split.to(tl.int64) * stride_split + batch.to(tl.int64) * stride_kb + head_kv.to(tl.int64) * stride_kh
               + row0.to(tl.int64) * stride_ks)
    gv_base = (GradV + split.to(tl.int64) * stride_split + batch.to(tl.int64) * stride_vb + head_kv.to(tl.int64) * stride_vh
               + row0.to(tl.int64) * stride_vs)
    tl.store(gk_base + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
             grad_k.to(GradK.dtype.element_ty), mask=kv_mask)
    tl.store(gv_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
             grad_v.to(GradV.dtype.element_ty), mask=kv_mask)


@triton.autotune(configs=BWD_Q_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_for_head_dim})
@triton.jit(do_not_specialize=["seed", "dropout_threshold"])
def _attention_bwd_dq_kernel(
    Q, K, V, GradOut, Lse, Delta, GradQ, KeyPaddingMask, CuSeqlens,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_gb, stride_gh, stride_gs, stride_gd,
    stride_lb, stride_lh, stride_ls,
    stride_mb, stride_ms,
    heads_q, group_size, seq_q, seq_k, head_dim,
    softmax_scale, dropout_p, dropout_threshold, seed, seq_bucket,
    HEAD_DIM_PAD: tl.constexpr, CAUSAL: tl.constexpr, HAS_PADDING_MASK: tl.constexpr, IS_VARLEN: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of one query block: loops over key blocks, dQ += (P∘(dP - delta)) K · scale.
    GradQ has Q's strides."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    batch, head = bh // heads_q, bh % heads_q
    head_kv = head // group_size
    row0, seq_len_q, seq_len_k = _sequence_bounds(CuSeqlens, batch, seq_q, seq_k, IS_VARLEN)
    if start_m * BLOCK_M >= seq_len_q:
        return

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < head_dim
    row_mask = (offs_m[:, None] < seq_len_q) & d_ok[None, :]
    q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + row0.to(tl.int64) * stride_qs
    g_base = GradOut + batch.to(tl.int64) * stride_gb + head.to(tl.int64) * stride_gh + row0.to(tl.int64) * stride_gs
    k_base = K + batch.to(tl.int64) * stride_kb + head_kv.to(tl.int64) * stride_kh + row0.to(tl.int64) * stride_ks
    v_base = V + batch.to(tl.int64) * stride_vb + head_kv.to(tl.int64) * stride_vh + row0.to(tl.int64) * stride_vs
    l_off = batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + row0.to(tl.int64) * stride_ls
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd, mask=row_mask, other=0.0)
    do = tl.load(g_base + offs_m[:, None] * stride_gs + offs_d[None, :] * stride_gd, mask=row_mask, other=0.0)
    if DOT_FP32:
        q, do = q.to(tl.float32), do.to(tl.float32)
    lse = tl.load(Lse + l_off + offs_m * stride_ls, mask=offs_m < seq_len_q, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + l_off + offs_m * stride_ls, mask=offs_m < seq_len_q, other=0.0)
    qk_scale = softmax_scale * 1.4426950408889634
    mask_row = batch.to(tl.int64) * stride_mb
    grad_q = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    hi = seq_len_k
    if CAUSAL:
        hi = tl.minimum(seq_len_k, (start_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_mask = (cols[:, None] < seq_len_k) & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=col_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=col_mask, other=0.0)
        if DOT_FP32:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N), base 2
        valid = _score_mask(offs_m, cols, seq_len_q, seq_len_k, KeyPaddingMask, mask_row, stride_ms,
                            CAUSAL, HAS_PADDING_MASK)
        p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))  # (BLOCK_M, BLOCK_N)
        if HAS_DROPOUT:
            keep = _keep_mask(seed, bh, offs_m, start_n, seq_len_k, dropout_threshold, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        grad_q += tl.dot(ds.to(k.dtype), k)

    grad_q = grad_q * softmax_scale
    gq_base = GradQ + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + row0.to(tl.int64) * stride_qs
    tl.store(gq_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd, grad_q.to(GradQ.dtype.element_ty),
             mask=row_mask)


# --------------------------------------------------------------------------- host side


def _strides4(t: torch.Tensor, varlen: bool) -> tuple[int, int, int, int]:
    """(batch, head, seq, dim) strides; a packed (total, heads, dim) tensor is one batch
    of ``total`` rows (batch stride 0, each document offsets its first row)."""
    if varlen:
        return 0, t.stride(1), t.stride(0), t.stride(2)
    return tuple(t.stride())


class _Problem:
    """Sizes, flags and per-call launch arguments shared by the three kernels."""

    def __init__(self, q, k, key_padding_mask, cu_seqlens, max_seqlen, causal, dropout_p):
        self.varlen = cu_seqlens is not None
        if self.varlen:
            total, self.heads_q, self.head_dim = q.shape
            self.heads_kv = k.shape[1]
            self.batch = cu_seqlens.numel() - 1  # documents
            self.seq_q = self.seq_k = max_seqlen
            # lse / delta as (1, Hq, total): rows addressed like q's tokens.
            self.lse_shape, self.lse_strides = (self.heads_q, total), (0, total, 1)
        else:
            self.batch, self.heads_q, self.seq_q, self.head_dim = q.shape
            self.heads_kv, self.seq_k = k.shape[1], k.shape[2]
            self.lse_shape = (self.batch, self.heads_q, self.seq_q)
            self.lse_strides = (self.heads_q * self.seq_q, self.seq_q, 1)
        self.group_size = self.heads_q // self.heads_kv
        self.head_dim_pad = max(16, triton.next_power_of_2(self.head_dim))
        self.seq_bucket = triton.next_power_of_2(max(self.seq_q, self.seq_k, 1))
        # A bool mask is read as bytes (0 = padded); a zero-copy view.
        self.padding = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else None
        self.mask_strides = tuple(self.padding.stride()) if self.padding is not None else (0, 0)
        self.cu_seqlens = cu_seqlens
        self.flags = dict(
            HEAD_DIM_PAD=self.head_dim_pad, CAUSAL=bool(causal), HAS_PADDING_MASK=key_padding_mask is not None,
            IS_VARLEN=self.varlen, HAS_DROPOUT=dropout_p > 0.0,
            # bf16 tl.dot is wrong in the interpreter: upcast the tiles there.
            DOT_FP32=interpreting_triton() and q.dtype == torch.bfloat16,
        )

    def pointers(self, q):
        """Dummy tensors stand in for absent optional inputs (never read: constexpr flags)."""
        return (self.padding if self.padding is not None else q,
                self.cu_seqlens if self.cu_seqlens is not None else q)


# The dK/dV grid is split over query heads when it has fewer programs than this many per SM
# (with a nominal 64-key block): one wave of several programs per SM hides their latency.
KV_PROGRAMS_PER_SM = 2


def _kv_splits(problem: _Problem, device: torch.device) -> int:
    """How many ways to split each GQA group's query heads in the dK/dV kernel (1: none)."""
    if problem.group_size == 1:
        return 1
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        wanted = KV_PROGRAMS_PER_SM * torch.cuda.get_device_properties(index).multi_processor_count
    else:
        wanted = 8  # interpreter: small test shapes split too, so the split path is tested
    programs = triton.cdiv(max(problem.seq_k, 1), 64) * problem.batch * problem.heads_kv
    return max(1, min(problem.group_size, triton.cdiv(wanted, programs)))


def attention_forward(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, causal, softmax_scale, dropout_p, seed):
    """Triton forward: returns ``out`` (q's shape, contiguous) and ``lse`` (fp32, natural log,
    ``(B, Hq, Sq)`` or ``(Hq, total)`` for varlen)."""
    problem = _Problem(q, k, key_padding_mask, cu_seqlens, max_seqlen, causal, dropout_p)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(problem.lse_shape, dtype=torch.float32, device=q.device)
    padding, cu = problem.pointers(q)
    grid = lambda meta: (triton.cdiv(problem.seq_q, meta["BLOCK_M"]), problem.batch * problem.heads_q)  # noqa: E731
    _attention_fwd_kernel[grid](
        q, k, v, out, lse, padding, cu,
        *_strides4(q, problem.varlen), *_strides4(k, problem.varlen), *_strides4(v, problem.varlen),
        *_strides4(out, problem.varlen), *problem.lse_strides, *problem.mask_strides,
        problem.heads_q, problem.group_size, problem.seq_q, problem.seq_k, problem.head_dim,
        float(softmax_scale), float(dropout_p), attention_dropout_threshold(dropout_p), int(seed), problem.seq_bucket,
        **problem.flags,
    )
    return out, lse


def attention_backward(grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, causal,
                       softmax_scale, dropout_p, seed):
    """Triton backward: returns ``(dq, dk, dv)`` with the shapes and dtypes of q, k, v."""
    problem = _Problem(q, k, key_padding_mask, cu_seqlens, max_seqlen, causal, dropout_p)
    varlen = problem.varlen
    padding, cu = problem.pointers(q)
    # The gradient kernels write dQ/dK/dV with q's/k's/v's strides into fresh contiguous
    # buffers, so they read contiguous inputs (a no-op for the usual contiguous ones).
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty(problem.lse_shape, dtype=torch.float32, device=q.device)

    delta_block = 32 if interpreting_triton() else 64
    _attention_bwd_delta_kernel[(triton.cdiv(problem.seq_q, delta_block), problem.batch * problem.heads_q)](
        out, grad_out, delta, cu,
        *_strides4(out, varlen), *_strides4(grad_out, varlen), *problem.lse_strides,
        problem.heads_q, problem.seq_q, problem.head_dim,
        HEAD_DIM_PAD=problem.head_dim_pad, IS_VARLEN=varlen, BLOCK_M=delta_block,
    )
    strides = (
        *_strides4(q, varlen), *_strides4(k, varlen), *_strides4(v, varlen), *_strides4(grad_out, varlen),
        *problem.lse_strides, *problem.mask_strides,
    )
    scalars = (float(softmax_scale), float(dropout_p), attention_dropout_threshold(dropout_p), int(seed),
               problem.seq_bucket)
    # Grouped-query attention with short sequences gives few (key block, kv head) programs:
    # then the query heads of a group are split over a third grid axis, each split writing
    # an fp32 partial dK / dV that torch sums (in a fixed order: deterministic).
    heads_per_split = triton.cdiv(problem.group_size, _kv_splits(problem, q.device))
    splits = triton.cdiv(problem.group_size, heads_per_split)
    if splits > 1:
        grad_k_out = torch.empty((splits, *k.shape), dtype=torch.float32, device=k.device)
        grad_v_out = torch.empty((splits, *v.shape), dtype=torch.float32, device=v.device)
    else:
        grad_k_out, grad_v_out = grad_k, grad_v
    grid_kv = lambda meta: (triton.cdiv(problem.seq_k, meta["BLOCK_N"]), problem.batch * problem.heads_kv, splits)  # noqa: E731
    _attention_bwd_dkdv_kernel[grid_kv](
        q, k, v, grad_out, lse, delta, grad_k_out, grad_v_out, padding, cu, *strides,
        problem.heads_q, problem.heads_kv, problem.group_size, heads_per_split, k.numel(),
        problem.seq_q, problem.seq_k, problem.head_dim,
        *scalars, **problem.flags,
    )
    if splits > 1:
        grad_k = grad_k_out.sum(dim=0).to(k.dtype)
        grad_v = grad_v_out.sum(dim=0).to(v.dtype)
    grid_q = lambda meta: (triton.cdiv(problem.seq_q, meta["BLOCK_M"]), problem.batch * problem.heads_q)  # noqa: E731
    _attention_bwd_dq_kernel[grid_q](
        q, k, v, grad_out, lse, delta, grad_q, padding, cu, *strides,
        problem.heads_q, problem.group_size, problem.seq_q, problem.seq_k, problem.head_dim,
        *scalars, **problem.flags,
    )
    return grad_q, grad_k, grad_v
