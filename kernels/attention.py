"""Triton FlashAttention-2 kernels for ``fastft.ops.attention`` (the ``triton`` backend).

Algorithm: FlashAttention-2 (Dao, "FlashAttention-2: Faster Attention with Better
Parallelism and Work Partitioning", 2023).

* forward: one program per (query block, batch * head); it streams key/value blocks,
  keeps a running row maximum ``m`` and row sum ``l`` of ``exp(s - m)`` (online softmax)
  and rescales its fp32 accumulator when the maximum grows; at the end it writes
  ``out = acc / l`` and the row log-sum-exp ``lse = m + log(l)`` for the backward pass.
* backward: ``delta = rowsum(dO ∘ O) - dlse`` (a small preprocess kernel; ``dlse`` is the
  gradient of a returned lse, 0 otherwise), then a dk/dv kernel with one program per (key
  block, batch * kv-head) that loops over query blocks (and the query heads sharing that
  kv head, so grouped-query attention needs no atomics), and a dq kernel with one program
  per (query block, batch * head) that loops over key blocks. Both rebuild the
  probabilities ``P = exp(S - lse)`` instead of storing them.

Masks: query ``i`` has the diagonal key ``i + shift`` (``shift = 0`` top-left, ``seq_k -
seq_q`` bottom-right, per document when packed) and may see keys ``[i + shift - left, i +
shift + right]`` (``WINDOW_LEFT`` / ``WINDOW_RIGHT``: that side is bounded; causal is
``right = 0``), a key padding mask, sequence ends and head_dim padding. Every loop runs
only over the blocks a program's window reaches (``_key_range`` / ``_query_range``):
blocks wholly outside it are skipped, not masked, so a sliding window of W keys costs
``O(seq · W)``. Variable-length batches use the same kernels: a "batch" index is a
document, its queries start at ``cu_seqlens_q[doc]`` and its keys at ``cu_seqlens_k[doc]``.

Scores: ``s = scale · q·k``, soft-capped to ``c · tanh(s / c)`` (``HAS_SOFTCAP``; its
gradient is ``1 - tanh²``), minus ``slope · |i + shift - j|`` (``HAS_ALIBI``). Each
feature is a constexpr, so a call without it compiles the plain kernel.

Head dimensions: the head dimension is split into a power-of-two main block and, when it
saves work, a power-of-two tail (``head_dim_blocks``: 80 = 64 + 16, 96 = 64 + 32, 48 = 32
+ 16), each product then being two ``tl.dot``s; otherwise it is padded to the next power
of two (>= 16) and masked on every load/store. Padding 80 or 96 to 128 did 60% / 33%
more matmul work than the model needs.

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
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, fits, fits_extra) candidates, ``fits`` /
    ``fits_extra`` = {arch family: head-dim classes}; one small config under the interpreter
    (more than one fails there, and small blocks keep numpy quick)."""
    if interpreting_triton():
        every = {80: HEAD_DIM_CLASSES, 90: HEAD_DIM_CLASSES}
        shapes = [(64, 64, 4, 1, every, every)]
    configs = []
    for m, n, warps, stages, fits, fits_extra in shapes:
        archs = tuple(sorted(a for a in (80, 90) if fits.get(a) or fits_extra.get(a)))
        configs.append(config({"BLOCK_M": m, "BLOCK_N": n}, warps, stages, archs=archs, fits=fits,
                              fits_extra=fits_extra))
    return configs


# Head-dim classes a config is checked at: 64 (any head_dim up to 64, padded to a power of
# two), 96 (65..96: a 64-wide main block and a 16- or 32-wide tail, head_dim_blocks), 128,
# 256 (padded).
HEAD_DIM_CLASSES = (64, 96, 128, 256)

# Which tile fits where was measured ahead of time (python -m fastft.kernels.aot: every
# candidate compiled for sm_80 and sm_90, with triton 3.9 and the GPU image's 3.6, at each
# head-dim class, in two feature classes with their largest register footprint: ``fits``
# for GQA + causal + padding + dropout, ``fits_extra`` when a call also bounds the window's
# left side or soft-caps or adds ALiBi (kernels/aot.py's specimens): a config is listed for
# a class where it stays within shared memory and spills at most kernels/aot.py's
# SPILL_BUDGET with both versions. On sm_80 (mma.sync: accumulators in registers, no
# wgmma) the tiles are smaller; the split head_dim 96 (two accumulators, two dot products
# per product) spills more than the padded 128 in several backward tiles. Numbers:
# benchmarks/NOTES.md ("Triton configs, ahead of time" and issue 17's section). The first
# config is the one FASTFT_TRITON_CONFIGS=first keeps.
_ALL = (64, 96, 128)
FWD_CONFIGS = _configs([
    (128, 64, 8, 3, {80: (64,), 90: _ALL}, {80: (64,), 90: _ALL}),
    (128, 128, 8, 2, {90: (64, 128)}, {}),  # extra: 104-384 B of spills
    (128, 128, 8, 3, {90: (64,)}, {}),
    (128, 32, 4, 3, {80: (64,), 90: (64,)}, {80: (64,), 90: (64,)}),
    (64, 64, 4, 4, {80: _ALL, 90: _ALL}, {80: (64, 128), 90: _ALL}),
    (64, 64, 4, 2, {80: _ALL, 90: _ALL}, {80: _ALL, 90: _ALL}),
    (64, 32, 4, 3, {80: _ALL, 90: (*_ALL, 256)}, {80: _ALL, 90: (*_ALL, 256)}),
    (32, 32, 4, 2, {80: HEAD_DIM_CLASSES, 90: HEAD_DIM_CLASSES}, {80: HEAD_DIM_CLASSES, 90: HEAD_DIM_CLASSES}),
])
# dk/dv: BLOCK_N keys are the resident tile, BLOCK_M queries stream; dq: the reverse.
BWD_KV_CONFIGS = _configs([
    (32, 64, 8, 3, {80: (64, 128), 90: (64,)}, {90: (64,)}),  # head_dim 96, sm_80: 296 B of spills
    (32, 128, 8, 3, {90: (64,)}, {90: (64,)}),
    (32, 128, 8, 2, {90: (64,)}, {90: (64,)}),
    (32, 64, 4, 3, {90: (64,)}, {}),
    (16, 128, 8, 3, {90: (64, 96)}, {90: _ALL}),  # head_dim 128: 96 B (triton 3.6), 64 B with the extras
    (16, 64, 4, 2, {80: (64,), 90: (64,)}, {80: (64,), 90: (64,)}),
    (32, 32, 4, 2, {80: (64, 128), 90: (64, 128)}, {80: (64, 128), 90: (64, 128)}),  # head_dim 96: 96-448 B
    (16, 32, 4, 2, {80: HEAD_DIM_CLASSES, 90: HEAD_DIM_CLASSES}, {80: _ALL, 90: HEAD_DIM_CLASSES}),
    (16, 16, 4, 2, {}, {80: (256,)}),  # sm_80, head_dim 256 with the extras: (16, 32) spills 144 B
])
BWD_Q_CONFIGS = _configs([
    (128, 32, 8, 3, {80: _ALL, 90: _ALL}, {80: (64,), 90: _ALL}),
    (128, 64, 8, 3, {90: _ALL}, {90: (64,)}),
    (64, 64, 8, 3, {80: (64, 128), 90: _ALL}, {80: (128,), 90: _ALL}),
    (64, 64, 4, 3, {90: _ALL}, {90: (64,)}),
    (64, 32, 4, 3, {80: _ALL, 90: _ALL}, {80: (64, 128), 90: _ALL}),
    (64, 32, 4, 2, {80: _ALL, 90: _ALL}, {80: (64, 128), 90: _ALL}),
    (128, 32, 4, 3, {90: (64,)}, {}),
    (32, 32, 4, 2, {80: HEAD_DIM_CLASSES, 90: HEAD_DIM_CLASSES}, {80: HEAD_DIM_CLASSES, 90: HEAD_DIM_CLASSES}),
])


def head_dim_class(main: int, tail: int) -> int:
    """The HEAD_DIM_CLASSES entry of a head dimension split into (main, tail) blocks."""
    return 96 if tail else max(64, main)


def _prune_for_head_dim(configs, named_args, **kwargs):
    """The configs checked on the target architecture at this head-dim class and feature
    class (FASTFT_TRITON_CONFIGS=first: the first of them); the last one when none is."""
    meta = {**named_args, **kwargs}
    head_class = head_dim_class(meta.get("HEAD_DIM_MAIN", 64), meta.get("HEAD_DIM_TAIL", 0))
    extra = bool(meta.get("WINDOW_LEFT") or meta.get("HAS_SOFTCAP") or meta.get("HAS_ALIBI"))
    family = target_family()
    kept = [c for c in configs if head_class in getattr(c, "fits_extra" if extra else "fits", {}).get(family, ())]
    kept = kept or configs[-1:]
    return kept[:1] if one_config() else kept


_AUTOTUNE_KEY = ["seq_bucket", "HEAD_DIM_MAIN", "HEAD_DIM_TAIL", "WINDOW_LEFT", "WINDOW_RIGHT", "HAS_PADDING_MASK",
                 "IS_VARLEN", "HAS_DROPOUT", "HAS_SOFTCAP", "HAS_ALIBI"]


# --------------------------------------------------------------------------- helpers


def head_dim_blocks(head_dim: int) -> tuple[int, int]:
    """(main, tail) blocks the kernels split the head dimension into: a head_dim of 65..96
    is a 64-wide main block and a 16- or 32-wide tail (80 -> (64, 16), 96 -> (64, 32): 37.5%
    / 25% less matmul work than padding to 128; ``tl.dot`` needs 16); every other head_dim
    is padded to the next power of two >= 16 (tail 0). Splits elsewhere would save less
    (40, 48 of 64) or were not checked ahead of time (160, 192 of 256)."""
    padded = max(16, triton.next_power_of_2(head_dim))
    if 64 < head_dim <= 96:
        return 64, 16 if head_dim <= 80 else 32
    return padded, 0


@triton.jit
def _tanh(x):
    """tanh to a few fp32 ulp, with ``exp2`` only (no libdevice, so the interpreter runs
    it too): ``(1 - e) / (1 + e)``, ``e = exp(-2|x|)``, and below |x| = 1/8, where ``1 - e``
    would cancel, the odd Taylor polynomial to x⁷ (next term < 2e-9 relative there)."""
    a = tl.abs(x)
    e = tl.exp2(a * -2.8853900817779268)  # exp(-2|x|) = exp2(-2 log2(e) |x|)
    t = (1.0 - e) / (1.0 + e)
    a2 = a * a
    series = a * (1.0 + a2 * (-0.3333333333333333 + a2 * (0.13333333333333333 + a2 * -0.05396825396825397)))
    t = tl.where(a < 0.125, series, t)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _base2_scores(qk, q_diagonal, k_index, slope2, qk_scale, softcap_scale, softcap2,
                  HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Scores in base 2 from the raw products ``qk`` (any 2-D orientation; ``q_diagonal`` /
    ``k_index`` broadcast to it): ``scale · qk``, soft-capped to ``c · tanh(scale · qk / c)``
    (``softcap_scale = scale / c``, ``softcap2 = c · log2(e)``), minus the ALiBi bias
    ``slope · |diagonal - key|`` (``slope2 = slope · log2(e)``). Returns ``(s2, t)``, ``t =
    tanh(scale · qk / c)`` for the softcap's gradient ``1 - t²`` (``qk`` without softcap)."""
    if HAS_SOFTCAP:
        t = _tanh(qk * softcap_scale)
        s2 = t * softcap2
    else:
        t = qk
        s2 = qk * qk_scale
    if HAS_ALIBI:
        s2 = s2 - slope2 * tl.abs(k_index - q_diagonal).to(tl.float32)
    return s2, t


@triton.jit
def _in_window(allowed, q_diagonal, k_index, window_left, window_right, WINDOW_LEFT: tl.constexpr,
               WINDOW_RIGHT: tl.constexpr):
    """``allowed`` and, broadcast of ``q_diagonal`` (query ``i``'s diagonal key ``i + shift``)
    and ``k_index``: the key lies in ``[diagonal - left, diagonal + right]``."""
    if WINDOW_RIGHT:
        allowed = allowed & (k_index <= q_diagonal + window_right)
    if WINDOW_LEFT:
        allowed = allowed & (k_index >= q_diagonal - window_left)
    return allowed


@triton.jit
def _key_range(start_m, shift, seq_len_q, seq_len_k, window_left, window_right, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr):
    """[lo, hi): the keys query block ``start_m`` can see; ``lo`` a multiple of BLOCK_N
    (or ``lo >= hi``: none). Key blocks outside are never loaded (rows i in [m0, m0 +
    BLOCK_M), clipped to the sequence, see keys from m0 + shift - left to their last
    row + shift + right)."""
    lo = 0
    hi = seq_len_k
    if WINDOW_LEFT:  # (a first key past the end: no block, rather than the last one rounded down to)
        first = tl.maximum(start_m * BLOCK_M + shift - window_left, 0)
        lo = tl.where(first >= seq_len_k, seq_len_k, first // BLOCK_N * BLOCK_N)
    if WINDOW_RIGHT:
        hi = tl.minimum(seq_len_k, tl.minimum((start_m + 1) * BLOCK_M, seq_len_q) + shift + window_right)
    return lo, hi


@triton.jit
def _query_range(start_n, shift, seq_len_q, seq_len_k, window_left, window_right, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr):
    """[lo, hi): the queries that can see key block ``start_n`` (clipped to the sequence);
    ``lo`` a multiple of BLOCK_M or ``lo >= hi`` (key j is seen by queries j - shift -
    right .. j - shift + left)."""
    lo = 0
    hi = seq_len_q
    if WINDOW_RIGHT:
        first = tl.maximum(start_n * BLOCK_N - shift - window_right, 0)
        lo = tl.where(first >= seq_len_q, seq_len_q, first // BLOCK_M * BLOCK_M)
    if WINDOW_LEFT:
        hi = tl.minimum(seq_len_q, tl.minimum((start_n + 1) * BLOCK_N, seq_len_k) - shift + window_left)
    return lo, hi


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
def _sequence_bounds(CuSeqlensQ, CuSeqlensK, batch_index, seq_q, seq_k, bottom_right, IS_VARLEN: tl.constexpr):
    """(first query row, first key row, queries, keys, shift) of one batch element or one
    packed document; ``shift`` places query i's diagonal key at ``i + shift``."""
    if IS_VARLEN:
        q_start = tl.load(CuSeqlensQ + batch_index)
        k_start = tl.load(CuSeqlensK + batch_index)
        len_q = tl.load(CuSeqlensQ + batch_index + 1) - q_start
        len_k = tl.load(CuSeqlensK + batch_index + 1) - k_start
    else:
        q_start = tl.full([], 0, tl.int32)
        k_start = tl.full([], 0, tl.int32)
        len_q = seq_q + q_start
        len_k = seq_k + k_start
    return q_start, k_start, len_q, len_k, (len_k - len_q) * bottom_right


# --------------------------------------------------------------------------- forward


@triton.autotune(configs=FWD_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_for_head_dim})
@triton.jit(do_not_specialize=["seed", "dropout_threshold", "window_left", "window_right", "bottom_right"])
def _attention_fwd_kernel(
    Q, K, V, Out, Lse, KeyPaddingMask, CuSeqlensQ, CuSeqlensK, AlibiSlopes,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh, stride_ls,
    stride_mb, stride_ms, stride_ab, stride_ah,
    heads_q, group_size, seq_q, seq_k, head_dim,
    window_left, window_right, bottom_right, softcap,
    softmax_scale, dropout_p, dropout_threshold, seed, seq_bucket,
    HEAD_DIM_MAIN: tl.constexpr, HEAD_DIM_TAIL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
    HAS_PADDING_MASK: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)  # batch (or document) * heads_q + head
    batch, head = bh // heads_q, bh % heads_q
    head_kv = head // group_size  # grouped-query attention
    q_row0, k_row0, seq_len_q, seq_len_k, shift = _sequence_bounds(CuSeqlensQ, CuSeqlensK, batch, seq_q, seq_k,
                                                                   bottom_right, IS_VARLEN)
    if start_m * BLOCK_M >= seq_len_q:
        return

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_MAIN)
    d_ok = offs_d < head_dim
    # int64 base offsets: batch * stride overflows int32 on large tensors.
    q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + q_row0.to(tl.int64) * stride_qs
    k_base = K + batch.to(tl.int64) * stride_kb + head_kv.to(tl.int64) * stride_kh + k_row0.to(tl.int64) * stride_ks
    v_base = V + batch.to(tl.int64) * stride_vb + head_kv.to(tl.int64) * stride_vh + k_row0.to(tl.int64) * stride_vs
    mask_row = batch.to(tl.int64) * stride_mb
    row_ok = offs_m < seq_len_q
    q_diagonal = offs_m + shift  # each query's diagonal key

    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, D main)
    if DOT_FP32:  # the interpreter's bf16 tl.dot is wrong: compute on fp32 tiles
        q = q.to(tl.float32)
    if HEAD_DIM_TAIL > 0:  # head_dim = main + tail (e.g. 64 + 32 for 96): a second, narrow block
        offs_t = HEAD_DIM_MAIN + tl.arange(0, HEAD_DIM_TAIL)
        t_ok = offs_t < head_dim
        q_tail = tl.load(q_base + offs_m[:, None] * stride_qs + offs_t[None, :] * stride_qd,
                         mask=row_ok[:, None] & t_ok[None, :], other=0.0)
        if DOT_FP32:
            q_tail = q_tail.to(tl.float32)
    qk_scale = softmax_scale * 1.4426950408889634  # scores in base 2: exp2 is the fast path
    softcap_scale = 0.0
    if HAS_SOFTCAP:
        softcap_scale = softmax_scale / softcap
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(AlibiSlopes + batch.to(tl.int64) * stride_ab + head * stride_ah) * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (base 2)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2(s - m_i), before dropout
    acc = tl.zeros([BLOCK_M, HEAD_DIM_MAIN], dtype=tl.float32)
    if HEAD_DIM_TAIL > 0:
        acc_tail = tl.zeros([BLOCK_M, HEAD_DIM_TAIL], dtype=tl.float32)

    # Only the key blocks this query block's window reaches (all of them without a window).
    lo, hi = _key_range(start_m, shift, seq_len_q, seq_len_k, window_left, window_right, BLOCK_M, BLOCK_N,
                        WINDOW_LEFT, WINDOW_RIGHT)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < seq_len_k
        k_t = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                      mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # (D, BLOCK_N)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, D)
        if DOT_FP32:
            k_t, v = k_t.to(tl.float32), v.to(tl.float32)
        qk = tl.dot(q, k_t)  # (BLOCK_M, BLOCK_N) fp32
        if HEAD_DIM_TAIL > 0:
            k_t_tail = tl.load(k_base + cols[None, :] * stride_ks + offs_t[:, None] * stride_kd,
                               mask=col_ok[None, :] & t_ok[:, None], other=0.0)
            v_tail = tl.load(v_base + cols[:, None] * stride_vs + offs_t[None, :] * stride_vd,
                             mask=col_ok[:, None] & t_ok[None, :], other=0.0)
            if DOT_FP32:
                k_t_tail, v_tail = k_t_tail.to(tl.float32), v_tail.to(tl.float32)
            qk += tl.dot(q_tail, k_t_tail)
        s, _ = _base2_scores(qk, q_diagonal[:, None], cols[None, :], slope2, qk_scale, softcap_scale,
                             softcap * 1.4426950408889634, HAS_SOFTCAP, HAS_ALIBI)
        valid = _in_window(row_ok[:, None] & col_ok[None, :], q_diagonal[:, None], cols[None, :], window_left,
                           window_right, WINDOW_LEFT, WINDOW_RIGHT)
        if HAS_PADDING_MASK:
            attend = tl.load(KeyPaddingMask + mask_row + cols * stride_ms, mask=col_ok, other=0)
            valid = valid & (attend != 0)[None, :]
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
        if HEAD_DIM_TAIL > 0:
            acc_tail = acc_tail * alpha[:, None] + tl.dot(p.to(v_tail.dtype), v_tail)
        m_i = m_new

    has_key = l_i > 0.0  # rows with no key to attend output 0 and lse = -inf
    inv_l = tl.where(has_key, 1.0 / tl.where(has_key, l_i, 1.0), 0.0)
    if HAS_DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453, float("-inf"))

    o_base = Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + q_row0.to(tl.int64) * stride_os
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
             (acc * inv_l[:, None]).to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if HEAD_DIM_TAIL > 0:
        tl.store(o_base + offs_m[:, None] * stride_os + offs_t[None, :] * stride_od,
                 (acc_tail * inv_l[:, None]).to(Out.dtype.element_ty), mask=row_ok[:, None] & t_ok[None, :])
    l_base = Lse + batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + q_row0.to(tl.int64) * stride_ls
    tl.store(l_base + offs_m * stride_ls, lse, mask=row_ok)


# --------------------------------------------------------------------------- backward


@triton.jit
def _attention_bwd_delta_kernel(
    Out, GradOut, GradLse, Delta, CuSeqlensQ,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_gb, stride_gh, stride_gs, stride_gd,
    stride_lb, stride_lh, stride_ls,
    heads_q, seq_q, head_dim,
    HEAD_DIM_PAD: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_GRAD_LSE: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO ∘ O) - dlse (fp32): the softmax-backward correction, rowsum(P ∘ dP),
    less the gradient of a returned lse (d lse / d s = P, so it enters as dS = P ∘ (dP -
    delta + dlse))."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    batch, head = bh // heads_q, bh % heads_q
    row0, _, seq_len_q, _, _ = _sequence_bounds(CuSeqlensQ, CuSeqlensQ, batch, seq_q, seq_q, 0, IS_VARLEN)
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
    l_off = batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + row0.to(tl.int64) * stride_ls
    if HAS_GRAD_LSE:  # GradLse has lse's (contiguous) layout
        delta -= tl.load(GradLse + l_off + offs_m * stride_ls, mask=offs_m < seq_len_q, other=0.0)
    tl.store(Delta + l_off + offs_m * stride_ls, delta, mask=offs_m < seq_len_q)


@triton.autotune(configs=BWD_KV_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_for_head_dim})
@triton.jit(do_not_specialize=["seed", "dropout_threshold", "window_left", "window_right", "bottom_right"])
def _attention_bwd_dkdv_kernel(
    Q, K, V, GradOut, Lse, Delta, GradK, GradV, KeyPaddingMask, CuSeqlensQ, CuSeqlensK, AlibiSlopes,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_gb, stride_gh, stride_gs, stride_gd,
    stride_lb, stride_lh, stride_ls,
    stride_mb, stride_ms, stride_ab, stride_ah,
    heads_q, heads_kv, group_size, heads_per_split, stride_split, seq_q, seq_k, head_dim,
    window_left, window_right, bottom_right, softcap,
    softmax_scale, dropout_p, dropout_threshold, seed, seq_bucket,
    HEAD_DIM_MAIN: tl.constexpr, HEAD_DIM_TAIL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
    HAS_PADDING_MASK: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV of one key block of one kv head: loops over the query blocks of the query
    heads of its group (GQA) that its split holds (program_id(2): heads [split *
    heads_per_split, ...)), so each element of its dK/dV (of the split's partial, written
    ``stride_split`` elements further per split) has one writer and no atomics.

    Works on transposed scores (keys along rows): sᵀ = K Qᵀ, pᵀ = exp(sᵀ - lse),
    dV += (pᵀ∘Z) dO, dpᵀ = (V dOᵀ)∘Z, dsᵀ = pᵀ∘(dpᵀ - delta)(∘(1 - tᵀ²) with softcap),
    dK += dsᵀ Q.
    """
    start_n = tl.program_id(0)
    bh_kv = tl.program_id(1)  # batch (or document) * heads_kv + kv head
    batch, head_kv = bh_kv // heads_kv, bh_kv % heads_kv
    q_row0, k_row0, seq_len_q, seq_len_k, shift = _sequence_bounds(CuSeqlensQ, CuSeqlensK, batch, seq_q, seq_k,
                                                                   bottom_right, IS_VARLEN)
    if start_n * BLOCK_N >= seq_len_k:
        return

    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_MAIN)
    d_ok = offs_d < head_dim
    key_ok = offs_n < seq_len_k
    kv_mask = key_ok[:, None] & d_ok[None, :]
    k_base = K + batch.to(tl.int64) * stride_kb + head_kv.to(tl.int64) * stride_kh + k_row0.to(tl.int64) * stride_ks
    v_base = V + batch.to(tl.int64) * stride_vb + head_kv.to(tl.int64) * stride_vh + k_row0.to(tl.int64) * stride_vs
    k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    if DOT_FP32:
        k, v = k.to(tl.float32), v.to(tl.float32)
    grad_k = tl.zeros([BLOCK_N, HEAD_DIM_MAIN], dtype=tl.float32)
    grad_v = tl.zeros([BLOCK_N, HEAD_DIM_MAIN], dtype=tl.float32)
    if HEAD_DIM_TAIL > 0:
        offs_t = HEAD_DIM_MAIN + tl.arange(0, HEAD_DIM_TAIL)
        t_ok = offs_t < head_dim
        kv_tail_mask = key_ok[:, None] & t_ok[None, :]
        k_tail = tl.load(k_base + offs_n[:, None] * stride_ks + offs_t[None, :] * stride_kd, mask=kv_tail_mask,
                         other=0.0)
        v_tail = tl.load(v_base + offs_n[:, None] * stride_vs + offs_t[None, :] * stride_vd, mask=kv_tail_mask,
                         other=0.0)
        if DOT_FP32:
            k_tail, v_tail = k_tail.to(tl.float32), v_tail.to(tl.float32)
        grad_k_tail = tl.zeros([BLOCK_N, HEAD_DIM_TAIL], dtype=tl.float32)
        grad_v_tail = tl.zeros([BLOCK_N, HEAD_DIM_TAIL], dtype=tl.float32)
    qk_scale = softmax_scale * 1.4426950408889634
    softcap_scale = 0.0
    if HAS_SOFTCAP:
        softcap_scale = softmax_scale / softcap
    key_allowed = key_ok
    if HAS_PADDING_MASK:  # this key block's padding, read once
        key_attend = tl.load(KeyPaddingMask + batch.to(tl.int64) * stride_mb + offs_n * stride_ms,
                             mask=key_ok, other=0)
        key_allowed = key_allowed & (key_attend != 0)

    # Only the query blocks whose window reaches this key block.
    lo, hi = _query_range(start_n, shift, seq_len_q, seq_len_k, window_left, window_right, BLOCK_M, BLOCK_N,
                          WINDOW_LEFT, WINDOW_RIGHT)
    split = tl.program_id(2)
    for g in range(split * heads_per_split, tl.minimum(group_size, (split + 1) * heads_per_split)):
        head = head_kv * group_size + g
        bh = batch * heads_q + head  # the dropout key uses the query head
        q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + q_row0.to(tl.int64) * stride_qs
        g_base = (GradOut + batch.to(tl.int64) * stride_gb + head.to(tl.int64) * stride_gh
                  + q_row0.to(tl.int64) * stride_gs)
        l_base = Lse + batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + q_row0.to(tl.int64) * stride_ls
        d_base = (Delta + batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh
                  + q_row0.to(tl.int64) * stride_ls)
        slope2 = 0.0
        if HAS_ALIBI:
            slope2 = tl.load(AlibiSlopes + batch.to(tl.int64) * stride_ab + head * stride_ah) * 1.4426950408889634
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + offs_m
            rows_ok = rows < seq_len_q
            row_mask = rows_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :] * stride_qd, mask=row_mask, other=0.0)
            do = tl.load(g_base + rows[:, None] * stride_gs + offs_d[None, :] * stride_gd, mask=row_mask, other=0.0)
            if DOT_FP32:
                q, do = q.to(tl.float32), do.to(tl.float32)
            lse = tl.load(l_base + rows * stride_ls, mask=rows_ok, other=0.0) * 1.4426950408889634
            delta = tl.load(d_base + rows * stride_ls, mask=rows_ok, other=0.0)
            qk_t = tl.dot(k, tl.trans(q))  # (BLOCK_N, BLOCK_M)
            dp_t = tl.dot(v, tl.trans(do))  # (BLOCK_N, BLOCK_M) = (dO Vᵀ)ᵀ
            if HEAD_DIM_TAIL > 0:
                tail_mask = rows_ok[:, None] & t_ok[None, :]
                q_tail = tl.load(q_base + rows[:, None] * stride_qs + offs_t[None, :] * stride_qd, mask=tail_mask,
                                 other=0.0)
                do_tail = tl.load(g_base + rows[:, None] * stride_gs + offs_t[None, :] * stride_gd, mask=tail_mask,
                                  other=0.0)
                if DOT_FP32:
                    q_tail, do_tail = q_tail.to(tl.float32), do_tail.to(tl.float32)
                qk_t += tl.dot(k_tail, tl.trans(q_tail))
                dp_t += tl.dot(v_tail, tl.trans(do_tail))
            q_diagonal = rows + shift
            s_t, tanh_t = _base2_scores(qk_t, q_diagonal[None, :], offs_n[:, None], slope2, qk_scale, softcap_scale,
                                        softcap * 1.4426950408889634, HAS_SOFTCAP, HAS_ALIBI)
            # The mask built directly in the transposed (key, query) orientation.
            valid_t = _in_window(key_allowed[:, None] & rows_ok[None, :], q_diagonal[None, :], offs_n[:, None],
                                 window_left, window_right, WINDOW_LEFT, WINDOW_RIGHT)
            # Probabilities rebuilt from the saved log-sum-exp; masked (and no-key rows,
            # whose lse is -inf) are exactly 0.
            p_t = tl.where(valid_t, tl.exp2(s_t - lse[None, :]), 0.0)
            if HAS_DROPOUT:
                keep_t = tl.trans(_keep_mask(seed, bh, rows, start_n * BLOCK_N, seq_len_k, dropout_threshold,
                                             BLOCK_M, BLOCK_N))  # (BLOCK_N, BLOCK_M)
                p_dropped_t = tl.where(keep_t, p_t / (1.0 - dropout_p), 0.0)
                dp_t = tl.where(keep_t, dp_t / (1.0 - dropout_p), 0.0)
            else:
                p_dropped_t = p_t
            grad_v += tl.dot(p_dropped_t.to(do.dtype), do)
            ds_t = p_t * (dp_t - delta[None, :])  # softmax backward
            if HAS_SOFTCAP:  # through c · tanh(s / c): times 1 - tanh²
                ds_t = ds_t * (1.0 - tanh_t * tanh_t)
            grad_k += tl.dot(ds_t.to(q.dtype), q)
            if HEAD_DIM_TAIL > 0:
                grad_v_tail += tl.dot(p_dropped_t.to(do_tail.dtype), do_tail)
                grad_k_tail += tl.dot(ds_t.to(q_tail.dtype), q_tail)

    gk_base = (GradK + split.to(tl.int64) * stride_split + batch.to(tl.int64) * stride_kb
               + head_kv.to(tl.int64) * stride_kh + k_row0.to(tl.int64) * stride_ks)
    gv_base = (GradV + split.to(tl.int64) * stride_split + batch.to(tl.int64) * stride_vb
               + head_kv.to(tl.int64) * stride_vh + k_row0.to(tl.int64) * stride_vs)
    # grad_k * scale: S = scale · Q Kᵀ.
    tl.store(gk_base + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
             (grad_k * softmax_scale).to(GradK.dtype.element_ty), mask=kv_mask)
    tl.store(gv_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
             grad_v.to(GradV.dtype.element_ty), mask=kv_mask)
    if HEAD_DIM_TAIL > 0:
        tl.store(gk_base + offs_n[:, None] * stride_ks + offs_t[None, :] * stride_kd,
                 (grad_k_tail * softmax_scale).to(GradK.dtype.element_ty), mask=kv_tail_mask)
        tl.store(gv_base + offs_n[:, None] * stride_vs + offs_t[None, :] * stride_vd,
                 grad_v_tail.to(GradV.dtype.element_ty), mask=kv_tail_mask)


@triton.autotune(configs=BWD_Q_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_for_head_dim})
@triton.jit(do_not_specialize=["seed", "dropout_threshold", "window_left", "window_right", "bottom_right"])
def _attention_bwd_dq_kernel(
    Q, K, V, GradOut, Lse, Delta, GradQ, KeyPaddingMask, CuSeqlensQ, CuSeqlensK, AlibiSlopes,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_gb, stride_gh, stride_gs, stride_gd,
    stride_lb, stride_lh, stride_ls,
    stride_mb, stride_ms, stride_ab, stride_ah,
    heads_q, group_size, seq_q, seq_k, head_dim,
    window_left, window_right, bottom_right, softcap,
    softmax_scale, dropout_p, dropout_threshold, seed, seq_bucket,
    HEAD_DIM_MAIN: tl.constexpr, HEAD_DIM_TAIL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
    HAS_PADDING_MASK: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of one query block: loops over the key blocks its window reaches,
    dQ += (P∘(dP - delta)(∘(1 - t²) with softcap)) K · scale. GradQ has Q's strides."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    batch, head = bh // heads_q, bh % heads_q
    head_kv = head // group_size
    q_row0, k_row0, seq_len_q, seq_len_k, shift = _sequence_bounds(CuSeqlensQ, CuSeqlensK, batch, seq_q, seq_k,
                                                                   bottom_right, IS_VARLEN)
    if start_m * BLOCK_M >= seq_len_q:
        return

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_MAIN)
    d_ok = offs_d < head_dim
    row_ok = offs_m < seq_len_q
    row_mask = row_ok[:, None] & d_ok[None, :]
    q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + q_row0.to(tl.int64) * stride_qs
    g_base = GradOut + batch.to(tl.int64) * stride_gb + head.to(tl.int64) * stride_gh + q_row0.to(tl.int64) * stride_gs
    k_base = K + batch.to(tl.int64) * stride_kb + head_kv.to(tl.int64) * stride_kh + k_row0.to(tl.int64) * stride_ks
    v_base = V + batch.to(tl.int64) * stride_vb + head_kv.to(tl.int64) * stride_vh + k_row0.to(tl.int64) * stride_vs
    l_off = batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + q_row0.to(tl.int64) * stride_ls
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd, mask=row_mask, other=0.0)
    do = tl.load(g_base + offs_m[:, None] * stride_gs + offs_d[None, :] * stride_gd, mask=row_mask, other=0.0)
    if DOT_FP32:
        q, do = q.to(tl.float32), do.to(tl.float32)
    grad_q = tl.zeros([BLOCK_M, HEAD_DIM_MAIN], dtype=tl.float32)
    if HEAD_DIM_TAIL > 0:
        offs_t = HEAD_DIM_MAIN + tl.arange(0, HEAD_DIM_TAIL)
        t_ok = offs_t < head_dim
        tail_mask = row_ok[:, None] & t_ok[None, :]
        q_tail = tl.load(q_base + offs_m[:, None] * stride_qs + offs_t[None, :] * stride_qd, mask=tail_mask, other=0.0)
        do_tail = tl.load(g_base + offs_m[:, None] * stride_gs + offs_t[None, :] * stride_gd, mask=tail_mask,
                          other=0.0)
        if DOT_FP32:
            q_tail, do_tail = q_tail.to(tl.float32), do_tail.to(tl.float32)
        grad_q_tail = tl.zeros([BLOCK_M, HEAD_DIM_TAIL], dtype=tl.float32)
    lse = tl.load(Lse + l_off + offs_m * stride_ls, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + l_off + offs_m * stride_ls, mask=row_ok, other=0.0)
    qk_scale = softmax_scale * 1.4426950408889634
    softcap_scale = 0.0
    if HAS_SOFTCAP:
        softcap_scale = softmax_scale / softcap
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(AlibiSlopes + batch.to(tl.int64) * stride_ab + head * stride_ah) * 1.4426950408889634
    mask_row = batch.to(tl.int64) * stride_mb
    q_diagonal = offs_m + shift

    lo, hi = _key_range(start_m, shift, seq_len_q, seq_len_k, window_left, window_right, BLOCK_M, BLOCK_N,
                        WINDOW_LEFT, WINDOW_RIGHT)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < seq_len_k
        col_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=col_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=col_mask, other=0.0)
        if DOT_FP32:
            k, v = k.to(tl.float32), v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k))  # (BLOCK_M, BLOCK_N)
        dp = tl.dot(do, tl.trans(v))  # (BLOCK_M, BLOCK_N)
        if HEAD_DIM_TAIL > 0:
            col_tail_mask = col_ok[:, None] & t_ok[None, :]
            k_tail = tl.load(k_base + cols[:, None] * stride_ks + offs_t[None, :] * stride_kd, mask=col_tail_mask,
                             other=0.0)
            v_tail = tl.load(v_base + cols[:, None] * stride_vs + offs_t[None, :] * stride_vd, mask=col_tail_mask,
                             other=0.0)
            if DOT_FP32:
                k_tail, v_tail = k_tail.to(tl.float32), v_tail.to(tl.float32)
            qk += tl.dot(q_tail, tl.trans(k_tail))
            dp += tl.dot(do_tail, tl.trans(v_tail))
        s, tanh_s = _base2_scores(qk, q_diagonal[:, None], cols[None, :], slope2, qk_scale, softcap_scale,
                                  softcap * 1.4426950408889634, HAS_SOFTCAP, HAS_ALIBI)
        valid = _in_window(row_ok[:, None] & col_ok[None, :], q_diagonal[:, None], cols[None, :], window_left,
                           window_right, WINDOW_LEFT, WINDOW_RIGHT)
        if HAS_PADDING_MASK:
            attend = tl.load(KeyPaddingMask + mask_row + cols * stride_ms, mask=col_ok, other=0)
            valid = valid & (attend != 0)[None, :]
        p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
        if HAS_DROPOUT:
            keep = _keep_mask(seed, bh, offs_m, start_n, seq_len_k, dropout_threshold, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - tanh_s * tanh_s)
        grad_q += tl.dot(ds.to(k.dtype), k)
        if HEAD_DIM_TAIL > 0:
            grad_q_tail += tl.dot(ds.to(k_tail.dtype), k_tail)

    gq_base = GradQ + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + q_row0.to(tl.int64) * stride_qs
    tl.store(gq_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
             (grad_q * softmax_scale).to(GradQ.dtype.element_ty), mask=row_mask)
    if HEAD_DIM_TAIL > 0:
        tl.store(gq_base + offs_m[:, None] * stride_qs + offs_t[None, :] * stride_qd,
                 (grad_q_tail * softmax_scale).to(GradQ.dtype.element_ty), mask=tail_mask)


# --------------------------------------------------------------------------- host side


def _strides4(t: torch.Tensor, varlen: bool) -> tuple[int, int, int, int]:
    """(batch, head, seq, dim) strides; a packed (total, heads, dim) tensor is one batch
    of ``total`` rows (batch stride 0, each document offsets its first row)."""
    if varlen:
        return 0, t.stride(1), t.stride(0), t.stride(2)
    return tuple(t.stride())


class _Problem:
    """Sizes, flags and per-call launch arguments shared by the three kernels."""

    def __init__(self, q, k, *, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window,
                 bottom_right, softcap, alibi_slopes, dropout_p, **_):
        self.varlen = cu_seqlens_q is not None
        if self.varlen:
            total_q, self.heads_q, self.head_dim = q.shape
            self.heads_kv = k.shape[1]
            self.batch = cu_seqlens_q.numel() - 1  # documents
            self.seq_q, self.seq_k = max_seqlen_q, max_seqlen_k
            # lse / delta as (1, Hq, total_q): rows addressed like q's tokens.
            self.lse_shape, self.lse_strides = (self.heads_q, total_q), (0, total_q, 1)
        else:
            self.batch, self.heads_q, self.seq_q, self.head_dim = q.shape
            self.heads_kv, self.seq_k = k.shape[1], k.shape[2]
            self.lse_shape = (self.batch, self.heads_q, self.seq_q)
            self.lse_strides = (self.heads_q * self.seq_q, self.seq_q, 1)
        self.group_size = self.heads_q // self.heads_kv
        self.head_dim_main, self.head_dim_tail = head_dim_blocks(self.head_dim)
        self.head_dim_pad = max(16, triton.next_power_of_2(self.head_dim))
        self.seq_bucket = triton.next_power_of_2(max(self.seq_q, self.seq_k, 1))
        # A bool mask is read as bytes (0 = padded); a zero-copy view.
        self.padding = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else None
        self.mask_strides = tuple(self.padding.stride()) if self.padding is not None else (0, 0)
        self.cu_seqlens_q, self.cu_seqlens_k = cu_seqlens_q, cu_seqlens_k
        self.alibi = alibi_slopes
        # (batch, head) strides of the slopes: (Hq,) slopes are shared by every batch element.
        self.alibi_strides = ((0, 1) if alibi_slopes is None or alibi_slopes.dim() == 1
                              else tuple(alibi_slopes.stride()))
        self.window_left, self.window_right = window
        self.scalars = (max(self.window_left, 0), max(self.window_right, 0), int(bool(bottom_right)), float(softcap))
        self.flags = dict(
            HEAD_DIM_MAIN=self.head_dim_main, HEAD_DIM_TAIL=self.head_dim_tail,
            WINDOW_LEFT=self.window_left >= 0, WINDOW_RIGHT=self.window_right >= 0,
            HAS_PADDING_MASK=key_padding_mask is not None, IS_VARLEN=self.varlen, HAS_DROPOUT=dropout_p > 0.0,
            HAS_SOFTCAP=softcap > 0.0, HAS_ALIBI=alibi_slopes is not None,
            # bf16 tl.dot is wrong in the interpreter: upcast the tiles there.
            DOT_FP32=interpreting_triton() and q.dtype == torch.bfloat16,
        )

    def pointers(self, q):
        """Dummy tensors stand in for absent optional inputs (never read: constexpr flags)."""
        return (self.padding if self.padding is not None else q,
                self.cu_seqlens_q if self.cu_seqlens_q is not None else q,
                self.cu_seqlens_k if self.cu_seqlens_k is not None else q,
                self.alibi if self.alibi is not None else q)


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


def attention_forward(q, k, v, *, softmax_scale, key_padding_mask=None, cu_seqlens_q=None, cu_seqlens_k=None,
                      max_seqlen_q=0, max_seqlen_k=0, window=(-1, -1), bottom_right=False, softcap=0.0,
                      alibi_slopes=None, dropout_p=0.0, seed=0):
    """Triton forward: returns ``out`` (q's shape, contiguous) and ``lse`` (fp32, natural log,
    ``(B, Hq, Sq)`` or ``(Hq, total_q)`` for varlen). Options as ``fastft.ops.attention``'s
    backends take them (``window`` already combined with causal)."""
    problem = _Problem(q, k, key_padding_mask=key_padding_mask, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                       max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, window=window,
                       bottom_right=bottom_right, softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(problem.lse_shape, dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(problem.seq_q, meta["BLOCK_M"]), problem.batch * problem.heads_q)  # noqa: E731
    _attention_fwd_kernel[grid](
        q, k, v, out, lse, *problem.pointers(q),
        *_strides4(q, problem.varlen), *_strides4(k, problem.varlen), *_strides4(v, problem.varlen),
        *_strides4(out, problem.varlen), *problem.lse_strides, *problem.mask_strides, *problem.alibi_strides,
        problem.heads_q, problem.group_size, problem.seq_q, problem.seq_k, problem.head_dim, *problem.scalars,
        float(softmax_scale), float(dropout_p), attention_dropout_threshold(dropout_p), int(seed), problem.seq_bucket,
        **problem.flags,
    )
    return out, lse


def attention_backward(grad_out, q, k, v, out, lse, *, softmax_scale, grad_lse=None, key_padding_mask=None,
                       cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, window=(-1, -1),
                       bottom_right=False, softcap=0.0, alibi_slopes=None, dropout_p=0.0, seed=0):
    """Triton backward: returns ``(dq, dk, dv)`` with the shapes and dtypes of q, k, v.
    ``grad_lse`` (lse's shape, or None) is the gradient of a returned lse."""
    problem = _Problem(q, k, key_padding_mask=key_padding_mask, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                       max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, window=window,
                       bottom_right=bottom_right, softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p)
    varlen = problem.varlen
    padding, cu_q, cu_k, alibi = problem.pointers(q)
    # The gradient kernels write dQ/dK/dV with q's/k's/v's strides into fresh contiguous
    # buffers, so they read contiguous inputs (a no-op for the usual contiguous ones).
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty(problem.lse_shape, dtype=torch.float32, device=q.device)
    if grad_lse is not None:
        grad_lse = grad_lse.to(torch.float32).contiguous()  # lse's layout: lse_strides address it

    delta_block = 32 if interpreting_triton() else 64
    _attention_bwd_delta_kernel[(triton.cdiv(problem.seq_q, delta_block), problem.batch * problem.heads_q)](
        out, grad_out, grad_lse if grad_lse is not None else delta, delta, cu_q,
        *_strides4(out, varlen), *_strides4(grad_out, varlen), *problem.lse_strides,
        problem.heads_q, problem.seq_q, problem.head_dim,
        HEAD_DIM_PAD=problem.head_dim_pad, IS_VARLEN=varlen, HAS_GRAD_LSE=grad_lse is not None, BLOCK_M=delta_block,
    )
    strides = (
        *_strides4(q, varlen), *_strides4(k, varlen), *_strides4(v, varlen), *_strides4(grad_out, varlen),
        *problem.lse_strides, *problem.mask_strides, *problem.alibi_strides,
    )
    scalars = (*problem.scalars, float(softmax_scale), float(dropout_p), attention_dropout_threshold(dropout_p),
               int(seed), problem.seq_bucket)
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
        q, k, v, grad_out, lse, delta, grad_k_out, grad_v_out, padding, cu_q, cu_k, alibi, *strides,
        problem.heads_q, problem.heads_kv, problem.group_size, heads_per_split, k.numel(),
        problem.seq_q, problem.seq_k, problem.head_dim,
        *scalars, **problem.flags,
    )
    if splits > 1:
        grad_k = grad_k_out.sum(dim=0).to(k.dtype)
        grad_v = grad_v_out.sum(dim=0).to(v.dtype)
    grid_q = lambda meta: (triton.cdiv(problem.seq_q, meta["BLOCK_M"]), problem.batch * problem.heads_q)  # noqa: E731
    _attention_bwd_dq_kernel[grid_q](
        q, k, v, grad_out, lse, delta, grad_q, padding, cu_q, cu_k, alibi, *strides,
        problem.heads_q, problem.group_size, problem.seq_q, problem.seq_k, problem.head_dim,
        *scalars, **problem.flags,
    )
    return grad_q, grad_k, grad_v
