"""Triton backend of ``fastft.ops.linear_cross_entropy``: fully fused, logits never stored.

``linear_cross_entropy_rows(hidden, weight, bias, labels, label_smoothing, row_scale,
grad_mask)`` is the rows function described in ``fastft/ops/linear_cross_entropy.py``:
it receives only the labelled rows (every label in ``[0, V)``) and returns the per-row
loss and, when ``row_scale`` is given, the fp32 gradients of ``sum(row_scale * loss)``.

Design, in the spirit of Cut Cross-Entropy (Wijmans et al., "Cut Your Losses in
Large-Vocabulary Language Models", 2024): the ``(M, V)`` logits never exist in device
memory, not even a chunk of them; each program computes one ``(BLOCK_M, BLOCK_V)`` tile
of them in registers with ``tl.dot`` over ``H`` and consumes it immediately.

* ``_linear_cross_entropy_fwd_kernel``, grid ``(row blocks, vocab splits)``: each program
  walks the vocab tiles of its split with an online log-sum-exp (running max, rescaled
  running sum, as in Milakov & Gimelshein 2018 / FlashAttention), picking up the target
  logit and, for label smoothing, the running sum of logits. It writes one partial
  log-sum-exp per (row, split); the host merges the splits with ``torch.logsumexp``.
  Vocab splits exist because a batch with few labelled rows (fine-tuning, small MLM
  batches) has too few row blocks to fill 132 SMs on its own.
* ``_linear_cross_entropy_bwd_kernel``, grid ``(row blocks, vocab tiles)``: recompute the
  logits tile, turn it into ``dlogits = row_scale * (softmax - (1-e) onehot - e/V)`` using
  the saved log-sum-exp (one exp per element, no second reduction), then add
  ``dlogits @ W_tile`` into ``grad_hidden`` and ``dlogits^T @ h_block`` into
  ``grad_weight`` with fp32 atomics, ``H`` a ``BLOCK_H`` chunk at a time.

Why atomics: ``grad_hidden[rows]`` is a sum over all vocab tiles and ``grad_weight[tile]``
a sum over all row blocks. Keeping either sum in one program needs a ``BLOCK_M x H`` (or
``BLOCK_V x H``) fp32 accumulator, 1-2 MiB at H=4096, far beyond registers and shared
memory; giving each program an H slice instead multiplies the logits recomputation by
``H / BLOCK_H``; writing per-tile partials and reducing them afterwards costs an
``(M or V) x H`` fp32 buffer per partial (GBs). Relaxed fp32 atomics (``red.global.add``
in L2, no return value) are the cheapest reduction left, and the one CCE uses. The cost:
``M*V*H * (1/BLOCK_V + 1/BLOCK_M)`` atomic adds, one per ``4 * BLOCK_M * BLOCK_V /
(BLOCK_M + BLOCK_V)`` FLOPs (256 at 128 x 128), so large tiles matter. Summation order is
therefore not deterministic run to run (differences at fp32 rounding level).

Napkin math (M labelled rows, V vocab, H hidden; 16-bit inputs):

* FLOPs: forward ``2*M*V*H`` (the logits); backward ``6*M*V*H`` = 3x forward
  (recompute the logits, then ``grad_hidden`` and ``grad_weight``, each ``2*M*V*H``).
  BERT-base MLM (32 x 512 tokens, 15% labelled: M = 2458, V = 30522, H = 768): forward
  115 GFLOP, backward 346 GFLOP, i.e. ~0.2 ms and ~0.6 ms at ~600 TFLOP/s of bf16 on an
  H100. Llama-3-8B causal LM (M = 8192, V = 128256, H = 4096): 8.6 TFLOP forward,
  26 TFLOP backward, ~14 ms / ~43 ms.
* Bytes: at least ``V*H*2`` (the weight) + ``M*H*2`` (the rows) read per pass; Llama:
  1.05 GB, ~0.3 ms at 3.35 TB/s, so every pass is compute-bound by ~50x. What fusion
  saves is the ``M*V*4``-byte fp32 logits (4.2 GB for Llama) and their gradient: memory,
  and ~1.3 ms of traffic per pass over them. Gradient outputs: ``(M + V) * H * 4`` bytes
  of fp32, plus the atomics above going through L2.
* Forward partials: ``M * splits * 8`` bytes, negligible.

Gradient filtering (opt-in, ``FASTFT_LOSS_GRAD_FILTER=on``; default "off"): the backward
skips the matmuls of every tile whose gradient is below 16-bit resolution, as Cut
Cross-Entropy does (``_grad_filter_eps``: threshold, and when it never filters).

Numerics: every ``tl.dot`` accumulates in fp32; fp32 inputs use 3-pass TF32 dots (about
fp32 accuracy on the tensor cores) unless torch is set to allow TF32, then plain TF32.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from fastft.kernels._autotune import config, for_target
from fastft.kernels._common import interpreting_triton

__all__ = ["linear_cross_entropy_rows"]

# The Triton interpreter (TRITON_INTERPRET=1) runs every program instance through numpy:
# it cannot autotune over several configs, and tl.dot on bf16 returns garbage, so kernels
# read this flag (it must be set before triton decorates kernels, i.e. before import).
INTERPRETING = interpreting_triton()

# Kernel globals must be tl.constexpr (the GPU compiler rejects plain globals; the
# interpreter does not, so only a real compile catches it).
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * LOG2E), exp2 is the native MUFU op
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): ln(x) = log2(x) * LN2

# Each vocab split of the forward pass covers a multiple of this many columns, so every
# BLOCK_V in the configs below (which all divide it) tiles a split exactly, and the split
# layout does not depend on which config the autotuner picks.
VOCAB_SPLIT_ALIGN = 64 if INTERPRETING else 256
# Aim for about this many forward programs per SM (one wave with room to balance tails).
PROGRAMS_PER_SM = 2
# Row-block size used only to size the vocab split (the real BLOCK_M comes from the config).
NOMINAL_BLOCK_M = 128


def _config(block_m, block_v, block_h, num_warps, num_stages, inputs, archs=(80, 90), options=True):
    """``options=False``: not for calls with class weights or a softcap (spills there)."""
    return config({"BLOCK_M": block_m, "BLOCK_V": block_v, "BLOCK_H": block_h}, num_warps, num_stages, archs,
                  inputs=inputs, options=options)


# Configs per input width and architecture: big tiles feed the tensor cores (wgmma wants
# BLOCK_M >= 64 per warpgroup) and amortise the reload of the h block per vocab tile; 3-4
# pipeline stages hide the global-load latency of the H loop. The forward holds one fp32
# (BLOCK_M, BLOCK_V) accumulator; the backward also holds the 16-bit dlogits tile and two
# (., BLOCK_H) products. Small-BLOCK_M entries serve batches with few labelled rows. Every
# config is compiled ahead of time for sm_80 and sm_90 (python -m fastft.kernels.aot, in
# CI: register spills fail it) and kept only for the architectures where it neither spills
# nor exceeds shared memory: on sm_80 (mma.sync, no wgmma, accumulators in registers) the
# backward needs BLOCK_H = 32 (16 for fp32) where sm_90 affords 64 (32). Numbers in
# benchmarks/NOTES.md ("Triton configs, ahead of time").
#
# Under the interpreter one config replaces the list: its cost is Python overhead per
# program and per op (numpy does the arithmetic), so 64 x 64 x 32 runs ~8x faster than
# 32 x 32 x 32, while test sizes (M = 113, V = 333, H = 40..100) still span several
# blocks in every dimension and several multi-tile vocab splits, which exercises every
# mask and loop.
if INTERPRETING:
    FWD_CONFIGS = [_config(64, 64, 32, 1, 1, "any")]
    BWD_CONFIGS = [_config(64, 64, 32, 1, 1, "any")]
else:
    FWD_CONFIGS = [
        _config(128, 128, 64, 8, 4, "16bit"),
        _config(128, 128, 64, 8, 3, "16bit"),
        _config(64, 256, 64, 8, 3, "16bit"),
        _config(64, 128, 64, 4, 4, "16bit"),
        _config(128, 128, 32, 8, 3, "fp32", archs=(90,)),
        _config(64, 128, 32, 8, 3, "fp32", archs=(90,)),
        _config(64, 64, 32, 4, 3, "fp32", archs=(90,)),
        _config(64, 128, 16, 8, 3, "fp32", archs=(80,)),
        _config(64, 64, 16, 4, 3, "fp32", archs=(80,)),
    ]
    BWD_CONFIGS = [
        _config(128, 128, 64, 8, 3, "16bit", archs=(90,)),
        _config(64, 128, 64, 4, 3, "16bit", archs=(90,)),
        # With class weights / softcap: 80 B of spills per thread under Triton 3.6 (budget 64).
        _config(128, 64, 64, 4, 3, "16bit", archs=(90,), options=False),
        _config(64, 64, 64, 4, 4, "16bit", archs=(90,)),
        _config(128, 128, 32, 8, 3, "16bit", archs=(80,)),
        _config(64, 128, 32, 8, 3, "16bit", archs=(80,)),
        _config(128, 64, 32, 8, 3, "16bit", archs=(80,)),
        _config(64, 64, 32, 4, 3, "16bit", archs=(80,)),
        _config(64, 128, 32, 8, 3, "fp32", archs=(90,)),
        _config(64, 64, 32, 4, 3, "fp32", archs=(90,)),
        _config(64, 128, 16, 8, 3, "fp32", archs=(80,)),
        _config(64, 64, 16, 4, 3, "fp32", archs=(80,)),
        _config(32, 64, 32, 4, 3, "fp32", archs=(80,)),
    ]


def _configs_for_dtype(configs, named_args, **kwargs):
    """Autotuner pre-filter: the configs for the input width (fp32 or 16-bit), the loss
    options (class weights / softcap) and the target architecture
    (FASTFT_TRITON_CONFIGS=first: only the first)."""
    inputs = "fp32" if named_args["Hidden"].dtype == torch.float32 else "16bit"
    meta = {**named_args, **kwargs}
    options = bool(meta.get("HAS_CLASS_WEIGHTS") or meta.get("HAS_SOFTCAP"))
    return for_target([c for c in configs if c.inputs in (inputs, "any") and (c.options or not options)])


# --------------------------------------------------------------------------- kernels


@triton.jit
def _logits_tile(
    Hidden, Weight, Bias,
    rows, cols, row_mask, col_mask,  # (BLOCK_M,), (BLOCK_V,) indices and validity
    H,
    stride_hm, stride_hh, stride_wv, stride_wh, stride_b,
    HAS_BIAS: tl.constexpr, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """fp32 logits tile ``hidden[rows] @ weight[cols]^T + bias[cols]``: (BLOCK_M, BLOCK_V).

    Invalid rows / columns read zeros (their logits are finite garbage the callers mask).
    """
    offs_h = tl.arange(0, BLOCK_H)
    # 64-bit row offsets: V*H or M*H can exceed 2^31 elements (e.g. 128256 x 32768).
    hidden_ptrs = Hidden + rows[:, None].to(tl.int64) * stride_hm + offs_h[None, :] * stride_hh  # (BM, BH)
    weight_ptrs = Weight + cols[:, None].to(tl.int64) * stride_wv + offs_h[None, :] * stride_wh  # (BV, BH)
    logits = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for h_start in range(0, H, BLOCK_H):
        h_mask = (h_start + offs_h) < H
        hidden_tile = tl.load(hidden_ptrs, mask=row_mask[:, None] & h_mask[None, :], other=0.0)  # (BM, BH)
        weight_tile = tl.load(weight_ptrs, mask=col_mask[:, None] & h_mask[None, :], other=0.0)  # (BV, BH)
        if UPCAST_DOT:  # interpreter: bf16 tl.dot is wrong there; fp32 products of 16-bit values are exact
            hidden_tile = hidden_tile.to(tl.float32)
            weight_tile = weight_tile.to(tl.float32)
        # fp32 accumulation on the tensor cores whatever the input dtype.
        logits = tl.dot(hidden_tile, tl.trans(weight_tile), logits, input_precision=INPUT_PRECISION)
        hidden_ptrs += BLOCK_H * stride_hh
        weight_ptrs += BLOCK_H * stride_wh
    if HAS_BIAS:
        bias = tl.load(Bias + cols * stride_b, mask=col_mask, other=0.0).to(tl.float32)  # (BV,)
        logits += bias[None, :]
    return logits


@triton.jit
def _softcap(logits, softcap):
    """``softcap * tanh(logits / softcap)`` (Gemma 2 final-logit softcapping), with tanh
    from exp2 (tanh(|x|) = (1 - 2^(-2|x| log2 e)) / (1 + ...), no overflow), portable
    across triton versions and the interpreter."""
    x = logits / softcap
    t = tl.exp2(tl.abs(x) * (-2.0 * LOG2E))
    tanh_abs = (1.0 - t) / (1.0 + t)
    return softcap * tl.where(x < 0.0, -tanh_abs, tanh_abs)


@triton.autotune(configs=FWD_CONFIGS, key=["V", "H", "M_BUCKET", "HAS_CLASS_WEIGHTS", "HAS_SOFTCAP"],
                 prune_configs_by={"early_config_prune": _configs_for_dtype})
@triton.jit
def _linear_cross_entropy_fwd_kernel(
    Hidden, Weight, Bias, Labels,  # (M, H), (V, H), (V,) or dummy, (M,) int32/int64
    SplitLse,  # (M, num_splits) fp32 out: log-sum-exp of the logits of each split
    SplitLogitSum,  # (M, num_splits) fp32 out: sum of the logits of each split (smoothing only)
    TargetLogit,  # (M,) fp32 out: z[row, label[row]], written by the split holding the label
    ClassWeights,  # (V,) fp32 class weights (smoothing sums w_j z_j), or dummy
    SplitMax, SplitArgmax,  # (M, num_splits) fp32 / int32 out: each split's max (log2 units) and its first column
    M, V, H, M_BUCKET,  # M_BUCKET (power of two of M) only keys the autotuner
    split_size,  # columns per split, a multiple of VOCAB_SPLIT_ALIGN
    softcap,  # final-logit softcap (HAS_SOFTCAP)
    stride_hm, stride_hh, stride_wv, stride_wh, stride_b, stride_split,
    HAS_BIAS: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_CLASS_WEIGHTS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WANT_ARGMAX: tl.constexpr,
    UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    row_mask = rows < M
    labels = tl.load(Labels + rows, mask=row_mask, other=-1).to(tl.int32)  # (BM,), -1 never matches

    split_start = pid_split * split_size
    split_end = tl.minimum(split_start + split_size, V)
    # Online log-sum-exp in base 2: with z2 = z * log2(e), lse = ln(2) * (m2 + log2(s2)) where
    # m2 is the running max of z2 and s2 = sum 2^(z2 - m2). Every split holds at least one
    # valid column and so does every tile, so m2 is finite after the first tile and the
    # rescale factor 2^(m2_old - m2_new) never sees (-inf) - (-inf).
    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # m2
    running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)  # s2, relative to m2
    target = tl.zeros((BLOCK_M,), dtype=tl.float32)
    logit_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    best_col = tl.zeros((BLOCK_M,), dtype=tl.int32)  # argmax so far (first column of the max)
    for v_start in range(split_start, split_end, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V)  # (BV,)
        col_mask = cols < split_end
        logits = _logits_tile(Hidden, Weight, Bias, rows, cols, row_mask, col_mask, H,
                              stride_hm, stride_hh, stride_wv, stride_wh, stride_b,
                              HAS_BIAS, UPCAST_DOT, INPUT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_H)  # (BM, BV)
        if HAS_SOFTCAP:
            logits = _softcap(logits, softcap)
        # The target logit: exactly one column of one tile of one split matches each label.
        target += tl.sum(tl.where(cols[None, :] == labels[:, None], logits, 0.0), axis=1)
        if HAS_SMOOTHING:  # smoothed loss needs mean_j z_j (sum_j w_j z_j with class weights)
            if HAS_CLASS_WEIGHTS:
                class_weights = tl.load(ClassWeights + cols, mask=col_mask, other=0.0)  # (BV,)
                logit_sum += tl.sum(tl.where(col_mask[None, :], logits * class_weights[None, :], 0.0), axis=1)
            else:
                logit_sum += tl.sum(tl.where(col_mask[None, :], logits, 0.0), axis=1)
        # Padding columns must not count in the softmax: -inf becomes 2^-inf = 0 below.
        logits2 = tl.where(col_mask[None, :], logits * LOG2E, float("-inf"))  # (BM, BV) z2
        tile_max = tl.max(logits2, axis=1)
        if WANT_ARGMAX:  # the tile's first column holding its max replaces the argmax if strictly larger
            tile_col = tl.min(tl.where(logits2 == tile_max[:, None], cols[None, :], V), axis=1)
            best_col = tl.where(tile_max > running_max, tile_col, best_col)
        new_max = tl.maximum(running_max, tile_max)
        # Rescale the old sum to the new max, then add this tile relative to the new max:
        # every exponent is <= 0, so nothing overflows whatever the logits' magnitude.
        running_sum = running_sum * tl.exp2(running_max - new_max) + \
            tl.sum(tl.exp2(logits2 - new_max[:, None]), axis=1)
        running_max = new_max
    split_lse = (running_max + tl.log2(running_sum)) * LN2  # back to natural log

    out_offsets = rows.to(tl.int64) * stride_split + pid_split
    tl.store(SplitLse + out_offsets, split_lse, mask=row_mask)
    if HAS_SMOOTHING:
        tl.store(SplitLogitSum + out_offsets, logit_sum, mask=row_mask)
    if WANT_ARGMAX:
        tl.store(SplitMax + out_offsets, running_max, mask=row_mask)
        tl.store(SplitArgmax + out_offsets, best_col, mask=row_mask)
    # Only the split that owns the label writes the target: no atomics, no partials.
    owns_label = (labels >= split_start) & (labels < split_end)
    tl.store(TargetLogit + rows, target, mask=row_mask & owns_label)


@triton.autotune(configs=BWD_CONFIGS, key=["V", "H", "M_BUCKET", "HAS_CLASS_WEIGHTS", "HAS_SOFTCAP", "FILTER"],
                 prune_configs_by={"early_config_prune": _configs_for_dtype},
                 # The kernel accumulates with atomics: benchmarking a config must start
                 # from zeros, and the autotuner zeroes them again before the real launch.
                 reset_to_zero=["GradHidden", "GradWeight", "GradBias"])
@triton.jit
def _linear_cross_entropy_bwd_kernel(
    Hidden, Weight, Bias, Labels,  # (M, H), (V, H), (V,) or dummy, (M,) int32/int64
    Lse,  # (M,) fp32: log-sum-exp from the forward
    CoefSoftmax, CoefTarget, CoefSmooth,  # (M,) fp32: dz_j = a p_j - b [j == y] - c w_j (host: _row_coefficients)
    ClassWeights,  # (V,) fp32 class weights, or dummy
    GradHidden, GradWeight, GradBias,  # (M, H), (V, H), (V,) fp32, zero-initialised, or dummies
    M, V, H, M_BUCKET,
    softcap,
    stride_hm, stride_hh, stride_wv, stride_wh, stride_b,
    HAS_BIAS: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_CLASS_WEIGHTS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    GRAD_HIDDEN: tl.constexpr, GRAD_WEIGHT: tl.constexpr, GRAD_BIAS: tl.constexpr,
    FILTER: tl.constexpr, FILTER_EPS: tl.constexpr,  # gradient filtering (host: _grad_filter_eps)
    UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # Row blocks vary fastest: the programs resident at one time share a few vocab tiles,
    # so each weight tile comes from HBM about once and is reused from L2 by every row
    # block (the gathered rows are small and stay in L2 anyway).
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # (BV,)
    row_mask = rows < M
    col_mask = cols < V
    logits = _logits_tile(Hidden, Weight, Bias, rows, cols, row_mask, col_mask, H,
                          stride_hm, stride_hh, stride_wv, stride_wh, stride_b,
                          HAS_BIAS, UPCAST_DOT, INPUT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_H)  # (BM, BV)
    if HAS_SOFTCAP:
        logits = _softcap(logits, softcap)
    lse = tl.load(Lse + rows, mask=row_mask, other=0.0)  # (BM,)
    coef_softmax = tl.load(CoefSoftmax + rows, mask=row_mask, other=0.0)  # (BM,)
    coef_target = tl.load(CoefTarget + rows, mask=row_mask, other=0.0)  # (BM,)
    labels = tl.load(Labels + rows, mask=row_mask, other=-1).to(tl.int32)  # (BM,)

    # softmax = exp(z - lse) from the saved lse: exponents are <= 0 up to rounding (the
    # forward built lse from these very logits), so no max pass and no overflow.
    probs = tl.exp2((logits - lse[:, None]) * LOG2E)  # (BM, BV)
    # d total / d z_j = a p_j - b [j == y] - c w_j, the row scale included: plain smoothed
    # cross-entropy has a = s, b = s (1-e), c = s e / V, w = 1 (general form: the host's
    # _row_coefficients, fastft.ops.linear_cross_entropy.RowsExtras).
    is_target = cols[None, :] == labels[:, None]
    dlogits = coef_softmax[:, None] * probs - tl.where(is_target, coef_target[:, None], 0.0)
    if HAS_SMOOTHING:
        coef_smooth = tl.load(CoefSmooth + rows, mask=row_mask, other=0.0)  # (BM,)
        if HAS_CLASS_WEIGHTS:
            class_weights = tl.load(ClassWeights + cols, mask=col_mask, other=0.0)  # (BV,)
            dlogits -= coef_smooth[:, None] * class_weights[None, :]
        else:
            dlogits -= coef_smooth[:, None]
    if HAS_SOFTCAP:  # through z = c tanh(u / c): dz/du = 1 - (z / c)^2
        capped = logits / softcap
        dlogits *= 1.0 - capped * capped
    # Padding rows/columns contribute nothing (their logits are garbage, not -inf).
    dlogits = tl.where(row_mask[:, None] & col_mask[None, :], dlogits, 0.0)

    if FILTER:
        # Gradient filtering (Cut Cross-Entropy): a tile whose every |dlogit| is at most
        # FILTER_EPS times its row's scale (the largest coefficient, max(|a|, |b|): the size
        # of the row's own target term) adds nothing the 16-bit gradient can resolve, so its
        # two matmuls, their atomics and the bias sum are skipped. Padding rows and columns
        # are 0 and never keep a tile; a NaN does (the comparison is False).
        row_scale = tl.maximum(tl.abs(coef_softmax), tl.abs(coef_target))  # (BM,)
        negligible = tl.abs(dlogits) <= FILTER_EPS * row_scale[:, None]  # (BM, BV)
        significant = tl.sum(tl.sum(tl.where(negligible, 0, 1), axis=1), axis=0)
        if significant == 0:
            return

    if GRAD_BIAS:  # d/d bias_j = sum over rows of dlogits: fp32, no dot
        bias_grad = tl.sum(dlogits, axis=0)  # (BV,)
        tl.atomic_add(GradBias + cols, bias_grad, mask=col_mask, sem="relaxed")

    if GRAD_HIDDEN or GRAD_WEIGHT:
        # The matmuls take dlogits in the input dtype (16-bit tensor cores) divided by the
        # block's largest row coefficient, which multiplies the fp32 products afterwards: a
        # mean over N rows scales by 1/N, which would push fp16 dlogits (min normal 6.1e-5)
        # into subnormals; divided, they are O(softmax) again.
        block_scale = tl.max(tl.maximum(tl.abs(coef_softmax), tl.abs(coef_target)), axis=0)
        block_scale = tl.where(block_scale > 0.0, block_scale, 1.0)
        dlogits_dot = (dlogits / block_scale).to(Hidden.dtype.element_ty)  # (BM, BV)
        if UPCAST_DOT:  # interpreter: round like the GPU path, then dot in fp32 (exact)
            dlogits_dot = dlogits_dot.to(tl.float32)
        offs_h = tl.arange(0, BLOCK_H)
        rows64 = rows[:, None].to(tl.int64)
        cols64 = cols[:, None].to(tl.int64)
        # Staggered start: the programs resident at one time are consecutive row blocks of
        # one vocab tile (pid_m varies fastest), so without it they would all add into the
        # same (BLOCK_V, BLOCK_H) slab of dW at once and serialise on its atomics in L2.
        # Row block pid_m starts at H chunk pid_m mod (chunks) and wraps around.
        h_chunks = tl.cdiv(H, BLOCK_H)
        for h_step in range(0, h_chunks):
            h_start = ((h_step + pid_m) % h_chunks) * BLOCK_H
            h_cols = h_start + offs_h  # (BH,)
            h_mask = h_cols < H
            if GRAD_HIDDEN:
                weight_tile = tl.load(Weight + cols64 * stride_wv + h_cols[None, :] * stride_wh,
                                      mask=col_mask[:, None] & h_mask[None, :], other=0.0)  # (BV, BH)
                if UPCAST_DOT:
                    weight_tile = weight_tile.to(tl.float32)
                grad_hidden = tl.dot(dlogits_dot, weight_tile, input_precision=INPUT_PRECISION) * block_scale  # (BM, BH)
                # Relaxed: nothing reads these sums before the kernel ends, so no ordering is needed.
                tl.atomic_add(GradHidden + rows64 * H + h_cols[None, :], grad_hidden,
                              mask=row_mask[:, None] & h_mask[None, :], sem="relaxed")
            if GRAD_WEIGHT:
                hidden_tile = tl.load(Hidden + rows64 * stride_hm + h_cols[None, :] * stride_hh,
                                      mask=row_mask[:, None] & h_mask[None, :], other=0.0)  # (BM, BH)
                if UPCAST_DOT:
                    hidden_tile = hidden_tile.to(tl.float32)
                grad_weight = tl.dot(tl.trans(dlogits_dot), hidden_tile, input_precision=INPUT_PRECISION) * block_scale  # (BV, BH)
                tl.atomic_add(GradWeight + cols64 * H + h_cols[None, :], grad_weight,
                              mask=col_mask[:, None] & h_mask[None, :], sem="relaxed")


# --------------------------------------------------------------------------- host side


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """About how many forward programs keep the device busy."""
    if device.type == "cuda":
        return PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: a few splits of a few tiles each, to exercise the split merge


def _input_precision(dtype: torch.dtype) -> str:
    """tl.dot precision. 16-bit inputs: exact products on the tensor cores, the value is
    ignored. fp32 inputs: plain TF32 (10-bit mantissa) when torch allows TF32 matmuls,
    else "tf32x3" (each operand split into a TF32 high part and a TF32 remainder, three
    tensor-core products: about fp32 accuracy, at 1/3 of TF32 speed). "ieee" would be
    exact fp32 but runs on the FMA units (H100: ~67 TFLOP/s against ~495 for TF32) and
    spilled registers at every one of these tiles when compiled for sm_90."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "tf32x3"
    return "tf32"


def _vocab_split(num_rows: int, vocab: int, device: torch.device) -> tuple[int, int]:
    """(split_size, num_splits): vocab ranges for the forward grid's second axis.

    Enough splits that row blocks x splits reaches the target program count, each split a
    multiple of VOCAB_SPLIT_ALIGN columns (so any config's BLOCK_V tiles it) and non-empty.
    """
    row_blocks = triton.cdiv(num_rows, NOMINAL_BLOCK_M)
    wanted_splits = max(1, triton.cdiv(_target_programs(device), row_blocks))
    split_size = triton.cdiv(triton.cdiv(vocab, wanted_splits), VOCAB_SPLIT_ALIGN) * VOCAB_SPLIT_ALIGN
    return split_size, triton.cdiv(vocab, split_size)


def _m_bucket(num_rows: int) -> int:
    """Autotuner key for the row count: its power of two, so that a masked-LM batch whose
    labelled-row count changes every step does not re-tune every step."""
    return min(triton.next_power_of_2(num_rows), 1 << 16)


def _forward(hidden, weight, bias, labels, label_smoothing, class_weights=None, target_weight=None, softcap=0.0,
             want_argmax=False):
    """Per-row log-sum-exp, loss and (``want_argmax``) argmax: (M,) fp32, fp32, int64 | None.

    With class weights (``class_weights`` (V,) fp32, ``target_weight`` = their values at
    the labels) the loss is F.cross_entropy's weighted one (RowsExtras in
    fastft/ops/linear_cross_entropy.py)."""
    num_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    split_size, num_splits = _vocab_split(num_rows, vocab, hidden.device)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    split_lse = torch.empty(num_rows, num_splits, **f32)
    has_smoothing = label_smoothing > 0.0
    split_logit_sum = torch.empty(num_rows, num_splits, **f32) if has_smoothing else split_lse  # dummy when unused
    split_max = torch.empty(num_rows, num_splits, **f32) if want_argmax else split_lse
    split_argmax = (torch.empty(num_rows, num_splits, dtype=torch.int32, device=hidden.device) if want_argmax
                    else split_lse)
    target_logit = torch.empty(num_rows, **f32)
    bias_arg = bias if bias is not None else weight  # never read when HAS_BIAS is False
    grid = lambda meta: (triton.cdiv(num_rows, meta["BLOCK_M"]), num_splits)  # noqa: E731
    _linear_cross_entropy_fwd_kernel[grid](
        hidden, weight, bias_arg, labels,
        split_lse, split_logit_sum, target_logit,
        class_weights if class_weights is not None else split_lse, split_max, split_argmax,
        num_rows, vocab, hidden_size, _m_bucket(num_rows),
        split_size, float(softcap),
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        bias.stride(0) if bias is not None else 0, split_lse.stride(0),
        HAS_BIAS=bias is not None, HAS_SMOOTHING=has_smoothing,
        HAS_CLASS_WEIGHTS=class_weights is not None, HAS_SOFTCAP=bool(softcap), WANT_ARGMAX=bool(want_argmax),
        UPCAST_DOT=INTERPRETING, INPUT_PRECISION=_input_precision(hidden.dtype),
    )
    # Merge the splits: lse = log sum_s exp(lse_s), stable in torch.logsumexp.
    lse = torch.logsumexp(split_lse, dim=1)  # (M,)
    if class_weights is None:
        # Smoothed cross-entropy: (1-e)(lse - z_y) + e(lse - mean_j z_j).
        loss = lse - (1.0 - label_smoothing) * target_logit
        if has_smoothing:
            loss -= (label_smoothing / vocab) * split_logit_sum.sum(dim=1)
    else:
        # Weighted: (1-e) w_y (lse - z_y) + (e/V) (S lse - sum_j w_j z_j), as F.cross_entropy.
        loss = (1.0 - label_smoothing) * target_weight * (lse - target_logit)
        if has_smoothing:
            loss += (label_smoothing / vocab) * (class_weights.sum() * lse - split_logit_sum.sum(dim=1))
    argmax = None
    if want_argmax:  # the first split holding the row's max (torch.argmax: first occurrence), then its column
        best_split = split_max.argmax(dim=1, keepdim=True)
        argmax = split_argmax.gather(1, best_split).squeeze(1).long()
    return lse, loss, argmax


def _row_coefficients(lse, row_scale, label_smoothing, vocab, target_weight, weight_total, z_row_scale):
    """(a, b, c) per row, (M,) fp32 each, with d total / d z_j = a p_j - b [j == y] - c w_j
    the gradient of ``sum(row_scale * loss + z_row_scale * lse**2)`` (RowsExtras)."""
    row_scale = row_scale.float()
    if target_weight is None:
        coef_softmax = row_scale
        coef_target = row_scale * (1.0 - label_smoothing)
    else:
        coef_softmax = row_scale * ((1.0 - label_smoothing) * target_weight + label_smoothing * weight_total / vocab)
        coef_target = row_scale * ((1.0 - label_smoothing) * target_weight)
    if z_row_scale is not None:
        coef_softmax = coef_softmax + 2.0 * z_row_scale.float() * lse
    coef_smooth = row_scale * (label_smoothing / vocab)
    return coef_softmax.contiguous(), coef_target.contiguous(), coef_smooth.contiguous()


def _backward(hidden, weight, bias, labels, label_smoothing, lse, row_scale, grad_mask, class_weights=None,
              target_weight=None, softcap=0.0, z_row_scale=None, grad_filter=False):
    """fp32 gradients of sum(row_scale * loss + z_row_scale * lse**2) for the inputs selected by grad_mask
    (``grad_filter``: skip the tiles below 16-bit resolution, see _grad_filter_eps)."""
    num_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    want_hidden, want_weight = bool(grad_mask[0]), bool(grad_mask[1])
    want_bias = bool(grad_mask[2]) and bias is not None
    if not (want_hidden or want_weight or want_bias):
        return None, None, None
    dummy = torch.empty(1, **f32)  # stands for a gradient the kernel never touches
    weight_total = class_weights.sum() if class_weights is not None else None
    coef_softmax, coef_target, coef_smooth = _row_coefficients(
        lse, row_scale, label_smoothing, vocab, target_weight, weight_total, z_row_scale)
    # The kernel adds partial sums with atomics: the outputs start at zero.
    grad_hidden = torch.zeros(num_rows, hidden_size, **f32) if want_hidden else None
    grad_weight = torch.zeros(vocab, hidden_size, **f32) if want_weight else None
    grad_bias = torch.zeros(vocab, **f32) if want_bias else None
    filter_eps = _grad_filter_eps(hidden.dtype, label_smoothing) if grad_filter else 0.0
    grid = lambda meta: (triton.cdiv(num_rows, meta["BLOCK_M"]), triton.cdiv(vocab, meta["BLOCK_V"]))  # noqa: E731
    _linear_cross_entropy_bwd_kernel[grid](
        hidden, weight, bias if bias is not None else weight, labels,
        lse, coef_softmax, coef_target, coef_smooth,
        class_weights if class_weights is not None else dummy,
        grad_hidden if want_hidden else dummy, grad_weight if want_weight else dummy,
        grad_bias if want_bias else dummy,
        num_rows, vocab, hidden_size, _m_bucket(num_rows),
        float(softcap),
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        bias.stride(0) if bias is not None else 0,
        HAS_BIAS=bias is not None, HAS_SMOOTHING=label_smoothing > 0.0,
        HAS_CLASS_WEIGHTS=class_weights is not None, HAS_SOFTCAP=bool(softcap),
        GRAD_HIDDEN=want_hidden, GRAD_WEIGHT=want_weight, GRAD_BIAS=want_bias,
        FILTER=filter_eps > 0.0, FILTER_EPS=filter_eps,
        UPCAST_DOT=INTERPRETING, INPUT_PRECISION=_input_precision(hidden.dtype),
    )
    return grad_hidden, grad_weight, grad_bias


GRAD_FILTER_ENV = "FASTFT_LOSS_GRAD_FILTER"


def _grad_filter_enabled() -> bool:
    """The opt-in switch ``FASTFT_LOSS_GRAD_FILTER``: "off" (default) or "on"."""
    value = os.environ.get(GRAD_FILTER_ENV, "off")
    if value not in ("off", "on"):
        raise ValueError(f"{GRAD_FILTER_ENV}={value!r}: expected 'off' (the default) or 'on'")
    return value == "on"


def _grad_filter_eps(dtype: torch.dtype, label_smoothing: float) -> float:
    """Threshold of the backward's gradient filtering, relative to each row's scale; 0: never filter.

    Cut Cross-Entropy (Wijmans et al. 2024, section 4.3 and its ``filter_eps="auto"``)
    skips the blocks of the gradient whose softmax values are all below
    ``torch.finfo(dtype).eps / 32``: 2^-12 for bf16 (eps 2^-7), 2^-15 for fp16 (eps 2^-10).
    Why that is below what the result can hold: a row's gradient is of the size of its
    target term (|b| = the row scale, times |W| or |h|), and the 16-bit gradient it ends up
    as (the parameters' dtype) has steps of eps of its size, i.e. a rounding error up to
    eps/2; one skipped element changes it by at most eps/32, 1/16 of that. The skipped
    elements of a row are the softmax's tail, whose small mass (CCE's Fig. 3: the average
    probability of the i-th most likely token falls below bf16 precision after a few
    hundred ranks) and random-signed products with W keep their sum under the rounding in
    practice; CCE found its training curves unchanged with the filter (Gemma 2 2B, Phi 3.5
    Mini; Fig. 4). The worst case (every skipped element of a row just below the
    threshold) is ``skipped columns x eps x scale x max |W|``: tests/test_linear_cross_entropy.py
    checks that bound.

    Never for fp32 inputs: they ask for fp32 gradients (tf32x3 dots), which resolve
    2^-24, and CCE's backward only takes 16-bit inputs (no precedent to follow). Never with
    label smoothing: its term ``-e/V`` per column is below any threshold at large V but
    sums to ``e x scale`` over the vocabulary, a systematic (same-signed) part of the
    gradient, not rounding noise."""
    if dtype == torch.float32 or label_smoothing > 0.0:
        return 0.0
    return torch.finfo(dtype).eps / 32


def linear_cross_entropy_rows(hidden, weight, bias, labels, label_smoothing, row_scale, grad_mask, extras=None):
    """Loss (and gradients) of the labelled rows, fused in Triton.

    Args:
        hidden: (M, H) fp32 / fp16 / bf16, M >= 1, any strides.
        weight: (V, H) same dtype, any strides (a transposed or sliced view is read in
            place: the kernels take strides, so nothing is copied).
        bias: (V,) same dtype, or None.
        labels: (M,) int32 / int64, all in [0, V).
        label_smoothing: float in [0, 1].
        row_scale: (M,) fp32 weights of each row's loss in the total whose gradient is
            wanted, or None for the loss only.
        grad_mask: [hidden, weight, bias] booleans: which gradients to compute.
        extras: optional ``RowsExtras`` (fastft/ops/linear_cross_entropy.py): class
            weights, softcap, z-loss row scale, argmax wanted.

    Returns:
        (loss (M,) fp32, grad_hidden (M, H) fp32 | None, grad_weight (V, H) fp32 | None,
        grad_bias (V,) fp32 | None); the gradients are those of ``sum(row_scale * loss)``
        (``+ z_row_scale * lse**2`` with extras), None where ``row_scale`` is None or the
        grad_mask entry is False (or bias is None). With ``extras`` two more values follow:
        lse (M,) fp32 and argmax (M,) int64 (None unless ``extras.want_argmax``).
    """
    grad_filter = _grad_filter_enabled()  # FASTFT_LOSS_GRAD_FILTER, read per call (a bad value raises here)
    labels = labels.contiguous()  # a no-op for the gathered rows the op passes
    class_weights = target_weight = z_row_scale = None
    softcap, want_argmax = 0.0, False
    if extras is not None:
        softcap, z_row_scale, want_argmax = extras.softcap, extras.z_row_scale, extras.want_argmax
        if extras.class_weights is not None:
            class_weights = extras.class_weights.float().contiguous()
            target_weight = class_weights[labels]
    device_guard = torch.cuda.device(hidden.device) if hidden.is_cuda else contextlib.nullcontext()
    with device_guard:  # triton launches on the current device: make it the tensors' one
        lse, loss, argmax = _forward(hidden, weight, bias, labels, label_smoothing, class_weights, target_weight,
                                     softcap, want_argmax)
        grad_hidden = grad_weight = grad_bias = None
        if row_scale is not None:
            grad_hidden, grad_weight, grad_bias = _backward(
                hidden, weight, bias, labels, label_smoothing, lse, row_scale, grad_mask, class_weights,
                target_weight, softcap, z_row_scale, grad_filter)
    if extras is None:
        return loss, grad_hidden, grad_weight, grad_bias
    return loss, grad_hidden, grad_weight, grad_bias, lse, argmax
