"""Triton backend of ``fastft.ops.lora_linear``: the four primitives ``down``, ``up``,
``grad_input`` and ``grad_a`` (their contract is in fastft/ops/lora_linear.py).

Two kernels serve all four:

``_lora_fused_linear_kernel``  out = [out +] X @ W' [+ bias] + scale · mask∘(L @ R)
    One output tile per program: the base GEMM over K (W' an fp16/bf16/fp32 matrix, or an
    int8 matrix dequantised on the fly with per-channel scales), then the rank-r product
    of the tile's rows of L (tokens, r) and columns of R (r, N) is added in the epilogue
    while the accumulator is still in registers, with the dropout keep-mask recomputed
    from the seed. Forward: X = x, W' = Wᵀ, L = xa, R = Bᵀ. Backward: X = dy, W' = W,
    L = dy B, R = A, masked by the dropout of x. With ``HAS_BASE=False, ACCUMULATE=True``
    it is only the epilogue, added to an output cuBLAS already wrote.

``_lora_masked_matmul_kernel``  partial[s] = (P∘mask) @ (Q∘mask) over the s-th K slice
    The skinny products with the dropped-out x, without materialising dropout(x):
    forward xa = (x∘mask) Aᵀ (P = x), backward dA = (dy B)ᵀ (x∘mask) (Q = x, reduced over
    tokens, split in slices whose fp32 partials are summed by torch: deterministic, unlike
    atomics).

Which GEMM runs the base matmul (the design decision, to be confirmed by
benchmarks/bench_lora_linear.py on a GPU; override with FASTFT_LORA_BASE_GEMM=cublas|triton):

* int8 weights: always this file's fused kernel. cuBLAS has no int8-weight x bf16-activation
  GEMM, and dequantising W first writes and reads a full 16-bit copy of it on every call.
* 16-bit weights: cuBLAS for the base GEMM, then the rank-r update as a second cuBLAS
  ``addmm_`` (or the masked Triton epilogue when dropout must be replayed in backward).
  Napkin numbers on an H100 for x (16k, 4096) @ Wᵀ (4096, 4096): the GEMM is 550 GFLOP,
  ~0.7 ms at ~800 TFLOP/s; the separate epilogue re-reads and re-writes y (16k x 4096 bf16,
  256 MB) in ~0.08 ms, ~11 %. A pointer-based Triton GEMM (no TMA / warp-specialisation,
  portable to triton 3.6 and 3.9) is expected to reach 75-90 % of cuBLAS on Hopper, i.e. to
  lose more than the fused epilogue saves (a prediction, not yet measured). Where the two
  are within ~10 % (A100) the fused kernel can win; the benchmark's
  `fastft[triton+fused-gemm]` row measures exactly this, and the default should follow it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastft.kernels._autotune import config, for_target
from fastft.kernels._common import dropout_params, interpreting_triton

INTERPRET = interpreting_triton()
BASE_GEMM = os.environ.get("FASTFT_LORA_BASE_GEMM", "cublas").strip().lower()
if BASE_GEMM not in ("cublas", "triton"):
    raise ValueError(f"FASTFT_LORA_BASE_GEMM must be 'cublas' or 'triton', got {BASE_GEMM!r}")


# --------------------------------------------------------------------------- dropout mask


@triton.jit
def _mix32(h):
    """lowbias32 integer hash on uint32 (the same bits as fastft.kernels._common.mix32)."""
    h = h ^ (h >> 16)
    h = h * tl.full((), 0x7FEB352D, tl.uint32)
    h = h ^ (h >> 15)
    h = h * tl.full((), 0x846CA68B, tl.uint32)
    h = h ^ (h >> 16)
    return h


@triton.jit
def _dropout_keep(tokens, features, seed_key, threshold):
    """Keep-mask at (token, feature) coordinates (broadcastable int32 index tensors)."""
    key = seed_key.to(tl.uint32, bitcast=True)
    row_hash = _mix32(tokens.to(tl.uint32) ^ key)
    element_hash = _mix32(row_hash ^ features.to(tl.uint32))
    return (element_hash >> 8).to(tl.int32) >= threshold


# --------------------------------------------------------------------------- kernels


def _fused_configs():
    if INTERPRET:  # more than one config fails under the interpreter; small tiles are fast there
        return [config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 4}, 4, 3)]
    # Compiled ahead of time for sm_80 and sm_90 (python -m fastft.kernels.aot): none of
    # these spills on either. 128 x 256 x 64 (8 warps) and 128 x 128 x 32 (4 warps, 4
    # stages) spilled 32-1024 B per thread with the rank-r epilogue and were dropped.
    return [
        config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, 8, 3),
        config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, 4, 4),
        config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, 4, 3),
    ]


def _prune(configs, named_args, **kwargs):
    """The configs of the target architecture (FASTFT_TRITON_CONFIGS=first: the first)."""
    return for_target(configs)


@triton.autotune(
    configs=_fused_configs(),
    # Not M: the token count changes from batch to batch and must not re-trigger tuning.
    key=["N", "K", "HAS_BASE", "ACCUMULATE", "WEIGHT_INT8", "SCALE_ALONG_N", "HAS_MASK", "BLOCK_R"],
    # Tuning runs the kernel several times: an accumulating launch must start from the
    # same output every time.
    restore_value=["Out"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit(do_not_specialize=["seed_key", "threshold"])
def _lora_fused_linear_kernel(
    X, W, WScale, Bias, L, R, Out,
    M, N, K, RANK,
    stride_xm, stride_xk, stride_wk, stride_wn,
    stride_lm, stride_lr, stride_rr, stride_rn,
    stride_om, stride_on,
    scale, seed_key, threshold,
    HAS_BASE: tl.constexpr, ACCUMULATE: tl.constexpr, HAS_BIAS: tl.constexpr,
    WEIGHT_INT8: tl.constexpr, SCALE_ALONG_N: tl.constexpr, HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped ("swizzled") tile order: GROUP_M consecutive programs share the same W'
    # columns, so those stay in L2 while the group sweeps its rows of X.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,) token rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) output columns
    in_m = offs_m < M
    in_n = offs_n < N
    # 64-bit element offsets: tokens x features passes 2^31 at ~150k tokens x 14336
    # (offs_m * stride in int32 would wrap to a wrong address).
    rows64 = offs_m.to(tl.int64)
    cols64 = offs_n.to(tl.int64)
    out_dtype = Out.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if HAS_BASE:
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k  # (BK,)
            in_k = ks < K
            ks64 = ks.to(tl.int64)
            x = tl.load(X + rows64[:, None] * stride_xm + ks64[None, :] * stride_xk,
                        mask=in_m[:, None] & in_k[None, :], other=0.0)  # (BM, BK)
            w = tl.load(W + ks64[:, None] * stride_wk + cols64[None, :] * stride_wn,
                        mask=in_k[:, None] & in_n[None, :], other=0)  # (BK, BN)
            if WEIGHT_INT8:
                if SCALE_ALONG_N:
                    # |q| <= 127 is exact in fp16/bf16; the per-column scale is applied
                    # once to the fp32 accumulator after the loop.
                    w = w.to(out_dtype)
                else:
                    # The scale runs along the reduction (dx = dy W): dequantise the tile
                    # in fp32, round once to the activation dtype (as QLoRA's dequant).
                    w_scale = tl.load(WScale + ks, mask=in_k, other=0.0).to(tl.float32)  # (BK,)
                    w = (w.to(tl.float32) * w_scale[:, None]).to(out_dtype)
            if UPCAST:  # the interpreter's bf16 dot is wrong; fp32 is exact for 16-bit inputs
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc += tl.dot(x, w, input_precision=DOT_PRECISION)
        if WEIGHT_INT8:
            if SCALE_ALONG_N:
                col_scale = tl.load(WScale + offs_n, mask=in_n, other=0.0).to(tl.float32)  # (BN,)
                acc = acc * col_scale[None, :]

    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=in_n, other=0.0).to(tl.float32)[None, :]

    # Rank-r epilogue: (BM, r) @ (r, BN) on the tile still in registers, BLOCK_R ranks at
    # a time (16 <= BLOCK_R <= 64: tl.dot's minimum, and a bound on registers for large r);
    # padded ranks load as zeros.
    lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, RANK, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        in_r = offs_r < RANK
        lo = tl.load(L + rows64[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                     mask=in_m[:, None] & in_r[None, :], other=0.0)  # (BM, BR)
        up = tl.load(R + offs_r[:, None] * stride_rr + cols64[None, :] * stride_rn,
                     mask=in_r[:, None] & in_n[None, :], other=0.0)  # (BR, BN)
        if UPCAST:
            lo = lo.to(tl.float32)
            up = up.to(tl.float32)
        lora += tl.dot(lo, up, input_precision=DOT_PRECISION)  # (BM, BN) fp32
    if HAS_MASK:  # backward dx: the mask of x at (token row, feature column)
        keep = _dropout_keep(offs_m[:, None], offs_n[None, :], seed_key, threshold)
        lora = tl.where(keep, lora, 0.0)
    acc += scale * lora

    out_ptrs = Out + rows64[:, None] * stride_om + cols64[None, :] * stride_on
    out_mask = in_m[:, None] & in_n[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_dtype), mask=out_mask)


@triton.jit(do_not_specialize=["seed_key", "threshold"])
def _lora_masked_matmul_kernel(
    P, Q, Partial,
    M, N, K, K_PER_SPLIT,
    stride_pm, stride_pk, stride_qk, stride_qn,
    stride_ps, stride_om, stride_on,
    seed_key, threshold,
    MASK_P: tl.constexpr, MASK_Q: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """partial[split] (M, N) fp32 = sum over this split's K slice of (P∘mask) @ (Q∘mask).

    The dropout mask applies to the operand that is x: P = x has (token, feature) =
    (m, k); Q = x has (token, feature) = (k, n).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_m = offs_m < M
    in_n = offs_n < N
    rows64 = offs_m.to(tl.int64)  # 64-bit offsets, as in _lora_fused_linear_kernel
    cols64 = offs_n.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = split * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + offs_k
        in_k = ks < k_end
        ks64 = ks.to(tl.int64)
        p = tl.load(P + rows64[:, None] * stride_pm + ks64[None, :] * stride_pk,
                    mask=in_m[:, None] & in_k[None, :], other=0.0)  # (BM, BK)
        q = tl.load(Q + ks64[:, None] * stride_qk + cols64[None, :] * stride_qn,
                    mask=in_k[:, None] & in_n[None, :], other=0.0)  # (BK, BN)
        if MASK_P:
            p = tl.where(_dropout_keep(offs_m[:, None], ks[None, :], seed_key, threshold), p, 0.0)
        if MASK_Q:
            q = tl.where(_dropout_keep(ks[:, None], offs_n[None, :], seed_key, threshold), q, 0.0)
        if UPCAST:
            p = p.to(tl.float32)
            q = q.to(tl.float32)
        acc += tl.dot(p, q, input_precision=DOT_PRECISION)
    tl.store(Partial + split.to(tl.int64) * stride_ps + rows64[:, None] * stride_om + cols64[None, :] * stride_on,
             acc, mask=in_m[:, None] & in_n[None, :])


# --------------------------------------------------------------------------- launchers


def _rank_block(rank: int) -> int:
    return min(64, max(16, triton.next_power_of_2(rank)))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: full fp32 products like torch's default matmul (not TF32).
    return "ieee" if dtype == torch.float32 else "tf32"


def _signed32(value: int) -> int:
    """A uint32 passed as an int32 kernel argument (bitcast back inside the kernel)."""
    return value - (1 << 32) if value >= (1 << 31) else value


def fused_linear(out, x, w_t, weight_scale, scale_along_n, bias, lora_l, lora_r_t, scale,
                 dropout_p=0.0, seed=0, *, has_base=True, accumulate=False):
    """out[M, N] = [out +] x @ w_t [+ bias] + scale · mask∘(lora_l @ lora_r_t).

    ``w_t`` is the logical (K, N) base operand (any strides, e.g. ``weight.T``), int8 when
    ``weight_scale`` is given; ``lora_l`` (M, r) and ``lora_r_t`` the logical (r, N).
    The mask (when dropout_p > 0) is x's dropout at (row, column) of ``out``.
    """
    num_rows, num_cols = out.shape
    reduce_dim = w_t.shape[0] if has_base else 0
    # The kernel reads bias and scales with unit stride.
    bias = None if bias is None else bias.contiguous()
    weight_scale = None if weight_scale is None else weight_scale.contiguous()
    rank = lora_l.shape[1]
    seed_key, threshold = dropout_params(dropout_p, seed)
    grid = lambda meta: (triton.cdiv(num_rows, meta["BLOCK_M"]) * triton.cdiv(num_cols, meta["BLOCK_N"]),)  # noqa: E731
    x_arg = x if has_base else out  # unused pointers still need a tensor
    w_arg = w_t if has_base else out
    _lora_fused_linear_kernel[grid](
        x_arg, w_arg, weight_scale if weight_scale is not None else out,
        bias if bias is not None else out, lora_l, lora_r_t, out,
        num_rows, num_cols, reduce_dim, rank,
        x_arg.stride(0), x_arg.stride(1), w_arg.stride(0), w_arg.stride(1),
        lora_l.stride(0), lora_l.stride(1), lora_r_t.stride(0), lora_r_t.stride(1),
        out.stride(0), out.stride(1),
        float(scale), _signed32(seed_key), threshold,
        HAS_BASE=has_base, ACCUMULATE=accumulate, HAS_BIAS=bias is not None,
        WEIGHT_INT8=weight_scale is not None, SCALE_ALONG_N=scale_along_n, HAS_MASK=dropout_p > 0.0,
        UPCAST=INTERPRET, DOT_PRECISION=_dot_precision(out.dtype), BLOCK_R=_rank_block(rank),
    )
    return out


def masked_matmul(p, q, dropout_p, seed, *, mask_p, num_splits=1):
    """(P∘mask) @ (Q∘mask) in fp32, the K reduction split ``num_splits`` ways (summed here)."""
    rows, reduce_dim = p.shape
    cols = q.shape[1]
    seed_key, threshold = dropout_params(dropout_p, seed)
    if INTERPRET:
        block_m, block_n, block_k, warps = 16, 16, 16, 4
    else:
        block_m = min(128, max(16, triton.next_power_of_2(rows)))
        block_n = min(128, max(16, triton.next_power_of_2(cols)))
        block_k, warps = 64, 4
    per_split = triton.cdiv(triton.cdiv(reduce_dim, num_splits), block_k) * block_k
    num_splits = triton.cdiv(reduce_dim, per_split)
    partial = torch.empty(num_splits, rows, cols, device=p.device, dtype=torch.float32)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(cols, block_n), num_splits)
    _lora_masked_matmul_kernel[grid](
        p, q, partial, rows, cols, reduce_dim, per_split,
        p.stride(0), p.stride(1), q.stride(0), q.stride(1),
        partial.stride(0), partial.stride(1), partial.stride(2),
        _signed32(seed_key), threshold,
        MASK_P=mask_p, MASK_Q=not mask_p, UPCAST=INTERPRET, DOT_PRECISION=_dot_precision(p.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
    )
    return partial[0] if num_splits == 1 else partial.sum(dim=0)


def _use_fused_base(weight: torch.Tensor) -> bool:
    return weight.dtype == torch.int8 or BASE_GEMM == "triton"


# --------------------------------------------------------------------------- the primitives


def down(x, lora_a, dropout_p, seed):
    """xa = (x∘mask) Aᵀ: (N, r) in x's dtype. Without dropout this is one cuBLAS GEMM."""
    if dropout_p == 0.0:
        return x @ lora_a.T
    return masked_matmul(x, lora_a.T, dropout_p, seed, mask_p=True).to(x.dtype)


def up(x, weight, weight_scale, bias, xa, lora_b, scale):
    """y = x Wᵀ + b + scale · xa Bᵀ: (N, O)."""
    if _use_fused_base(weight):
        y = x.new_empty(x.shape[0], weight.shape[0])
        return fused_linear(y, x, weight.T, weight_scale, True, bias, xa, lora_b.T, scale)
    y = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T  # cuBLAS, bias in its epilogue
    return y.addmm_(xa, lora_b.T, alpha=scale)


def grad_input(grad, weight, weight_scale, grad_xa, lora_a, scale, dropout_p, seed):
    """dx = g W + scale · mask∘(gb A): (N, K)."""
    if _use_fused_base(weight):
        grad_x = grad.new_empty(grad.shape[0], weight.shape[1])
        return fused_linear(grad_x, grad, weight, weight_scale, False, None, grad_xa, lora_a, scale,
                            dropout_p, seed)
    grad_x = grad @ weight  # cuBLAS
    if dropout_p == 0.0:
        return grad_x.addmm_(grad_xa, lora_a, alpha=scale)
    return fused_linear(grad_x, None, None, None, False, None, grad_xa, lora_a, scale, dropout_p, seed,
                        has_base=False, accumulate=True)


def grad_a(grad_xa, x, dropout_p, seed):
    """dA = gbᵀ (x∘mask): (r, K), reduced over tokens in slices of ~4k (deterministic)."""
    if dropout_p == 0.0:
        return grad_xa.T @ x
    splits = max(1, x.shape[0] // 4096)
    return masked_matmul(grad_xa.T, x, dropout_p, seed, mask_p=False, num_splits=splits).to(x.dtype)
