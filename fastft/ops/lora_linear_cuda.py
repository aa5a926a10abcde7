"""CUDA backend of ``fastft.ops.lora_linear``: the wrapper of the fused LoRA GEMM kernel.

The kernel lives in csrc/lora_linear/lora_linear.cu (contract in lora_linear.h). Every
tensor check happens in ``lora_fused_linear``, before a pointer crosses into C++;
``reasons`` says which inputs this backend cannot take.
"""

from __future__ import annotations

import os

import torch

from fastft import _extension
from fastft._extension import DTYPE_CODES, check_cuda_tensor, pointer, stream_handle
from fastft.kernels._common import dropout_params

_DTYPES = (torch.float16, torch.bfloat16)
# How the CUDA backend runs the base GEMM of an int8 weight. "dequant": dequantise W to the
# activation dtype (one pass over O·K bytes, a transient 16-bit copy) and run cuBLAS, at
# cuBLAS speed plus ~3·O·K bytes of traffic. "fused": csrc/lora_linear's WMMA kernel,
# which dequantises while staging tiles but stages them with scalar strided loads, no
# double buffering and two barriers per k-step (napkin: 40-80 TFLOP/s, ~10x slower than
# cuBLAS at N 8192, K = O = 4096; benchmarks/NOTES.md). "dequant" until a measured
# mixed-input GEMM beats it; FASTFT_LORA_INT8_GEMM=fused selects the kernel (benchmarks).
INT8_GEMM = os.environ.get("FASTFT_LORA_INT8_GEMM", "dequant").strip().lower()
if INT8_GEMM not in ("dequant", "fused"):
    raise ValueError(f"FASTFT_LORA_INT8_GEMM must be 'dequant' or 'fused', got {INT8_GEMM!r}")


def reasons(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor | None = None,
            weight_scale: torch.Tensor | None = None) -> list[str]:
    """Why the CUDA backend cannot run lora_linear on these inputs (empty list when it can):
    the extension (built with lora_fused_linear, on a CUDA device the build fits), and
    16-bit activations (the kernel uses 16-bit tensor cores)."""
    tensors = [t for t in (x, weight, lora_a, weight_scale) if t is not None]
    found = _extension.reasons(tensors, "lora_fused_linear")
    if x.dtype not in _DTYPES:
        found.append("the CUDA kernels use 16-bit tensor cores (fp16/bf16 only)")
    return found


def lora_fused_linear(out, x, w_t, weight_scale, scale_along_n, bias, lora_l, lora_r_t, scale,
                      dropout_p=0.0, seed=0, *, mask=None, k_per_split=0):
    """``out[z] = [out +] x @ w_t [+ bias] + scale · mask∘(lora_l @ lora_r_t)`` on the GPU.

    ``out`` (M, N) fp16/bf16, or (splits, M, N) fp32 split-K partials when ``k_per_split``
    splits the reduction; ``x`` (M, K) like ``out`` (None: no base GEMM, the rank-r term is
    then added to ``out``); ``w_t`` the logical (K, N) base operand, 16-bit or int8 with
    ``weight_scale`` (N,) or (K,) (``scale_along_n``); ``lora_l`` (M, r) / ``lora_r_t``
    (r, N) or None. ``mask`` names where the dropout keep-mask of x applies: ``"x"`` (x at
    (m, k)), ``"w"`` (w_t at (k, n)), ``"lora"`` (the rank-r term at (m, n)) or None.
    Any strides; checks happen here, before a pointer crosses into C++.
    """
    split_out = out.dim() == 3
    dtype = x.dtype if x is not None else out.dtype
    device = out.device
    if dtype not in _DTYPES:
        raise TypeError(f"lora_fused_linear: activations must be fp16/bf16, got {dtype}")
    rows, cols = out.shape[-2:]
    check_cuda_tensor("out", out, dtype=torch.float32 if split_out else dtype, contiguous=False, device=device)
    has_base = x is not None
    if has_base:
        check_cuda_tensor("x", x, dtype=dtype, contiguous=False, device=device)
        check_cuda_tensor("w_t", w_t, dtype=(dtype, torch.int8), contiguous=False, device=device)
        if x.shape[0] != rows or w_t.shape[1] != cols or x.shape[1] != w_t.shape[0]:
            raise ValueError(f"lora_fused_linear: x {tuple(x.shape)} @ w_t {tuple(w_t.shape)} does not give "
                             f"out {(rows, cols)}")
        if (w_t.dtype == torch.int8) != (weight_scale is not None):
            raise ValueError("lora_fused_linear: weight_scale is required exactly for int8 w_t")
        if weight_scale is not None:
            check_cuda_tensor("weight_scale", weight_scale, dtype=torch.float32, device=device)
            expected = cols if scale_along_n else w_t.shape[0]
            if tuple(weight_scale.shape) != (expected,):
                raise ValueError(f"lora_fused_linear: weight_scale must have shape ({expected},)")
    if bias is not None:
        check_cuda_tensor("bias", bias, dtype=dtype, device=device)
        if tuple(bias.shape) != (cols,):
            raise ValueError(f"lora_fused_linear: bias must have shape ({cols},)")
    rank = 0
    if lora_l is not None:
        check_cuda_tensor("lora_l", lora_l, dtype=dtype, contiguous=False, device=device)
        check_cuda_tensor("lora_r_t", lora_r_t, dtype=dtype, contiguous=False, device=device)
        rank = lora_l.shape[1]
        if lora_l.shape[0] != rows or tuple(lora_r_t.shape) != (rank, cols):
            raise ValueError(f"lora_fused_linear: lora_l {tuple(lora_l.shape)} @ lora_r_t "
                             f"{tuple(lora_r_t.shape)} does not give {(rows, cols)}")
    if mask not in (None, "x", "w", "lora"):
        raise ValueError(f"lora_fused_linear: mask must be None, 'x', 'w' or 'lora', got {mask!r}")
    seed_key, threshold = dropout_params(dropout_p, seed) if mask is not None else (0, 0)
    reduce = x.shape[1] if has_base else 0
    extension = _extension.module()
    with torch.cuda.device(device):  # launch on the tensors' device (e.g. cuda:1 under device_map), on its stream
        extension.lora_fused_linear(
            x=pointer(x), w=pointer(w_t), w_scale=pointer(weight_scale), bias=pointer(bias),
            lora_l=pointer(lora_l), lora_r=pointer(lora_r_t), out=pointer(out),
            rows=rows, cols=cols, reduce=reduce, rank=rank, k_per_split=k_per_split,
            stride_xm=x.stride(0) if has_base else 0, stride_xk=x.stride(1) if has_base else 0,
            stride_wk=w_t.stride(0) if has_base else 0, stride_wn=w_t.stride(1) if has_base else 0,
            stride_lm=lora_l.stride(0) if rank else 0, stride_lr=lora_l.stride(1) if rank else 0,
            stride_rr=lora_r_t.stride(0) if rank else 0, stride_rn=lora_r_t.stride(1) if rank else 0,
            stride_om=out.stride(-2), stride_on=out.stride(-1), stride_os=out.stride(0) if split_out else 0,
            scale=float(scale), seed_key=seed_key, threshold=threshold,
            dtype=DTYPE_CODES[dtype], weight_int8=has_base and w_t.dtype == torch.int8, scale_along_n=scale_along_n,
            mask_x=mask == "x", mask_w=mask == "w", mask_lora=mask == "lora",
            accumulate=not has_base, out_fp32=split_out, stream=stream_handle(device),
        )
    return out


def _dequantize(weight: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 (O, K) times fp32 per-row scales, rounded once to ``dtype`` (as the fused
    kernel and the torch backend round it): a transient (O, K) 16-bit copy."""
    return (weight.float() * weight_scale.float()[:, None]).to(dtype)


class LoRALinearBackend:
    """The CUDA backend's four lora_linear primitives (contract in fastft/ops/lora_linear.py).

    The 16-bit GEMMs stay on cuBLAS through torch, and so do int8 base weights (dequantised
    first, INT8_GEMM); the kernel above does what cuBLAS cannot: the products with
    dropout(x) without materialising it (and the int8 dequant-GEMM when INT8_GEMM is
    "fused").
    """

    # dA's token reduction is split in slices of this many tokens (fp32 partials summed by
    # torch: deterministic, and enough blocks to fill the GPU when r and in_features are small).
    GRAD_A_TOKENS_PER_SPLIT = 2048

    @staticmethod
    def down(x, lora_a, dropout_p, seed):
        if dropout_p == 0.0:
            return x @ lora_a.T
        xa = x.new_empty(x.shape[0], lora_a.shape[0])  # (N, r)
        return lora_fused_linear(xa, x, lora_a.T, None, True, None, None, None, 0.0, dropout_p, seed, mask="x")

    @staticmethod
    def up(x, weight, weight_scale, bias, xa, lora_b, scale):
        if weight.dtype == torch.int8 and INT8_GEMM == "dequant":
            weight = _dequantize(weight, weight_scale, x.dtype)
        if weight.dtype != torch.int8:
            y = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T
            return y.addmm_(xa, lora_b.T, alpha=scale)
        y = x.new_empty(x.shape[0], weight.shape[0])  # (N, O)
        bias = None if bias is None else bias.contiguous()
        return lora_fused_linear(y, x, weight.T, weight_scale.float().contiguous(), True, bias, xa, lora_b.T, scale)

    @staticmethod
    def grad_input(grad, weight, weight_scale, grad_xa, lora_a, scale, dropout_p, seed):
        mask = "lora" if dropout_p > 0.0 else None
        if weight.dtype == torch.int8 and INT8_GEMM == "dequant":
            weight = _dequantize(weight, weight_scale, grad.dtype)
        if weight.dtype == torch.int8:
            grad_x = grad.new_empty(grad.shape[0], weight.shape[1])  # (N, K)
            return lora_fused_linear(grad_x, grad, weight, weight_scale.float().contiguous(), False, None, grad_xa, lora_a,
                                     scale, dropout_p, seed, mask=mask)
        grad_x = grad @ weight  # cuBLAS
        if mask is None:
            return grad_x.addmm_(grad_xa, lora_a, alpha=scale)
        return lora_fused_linear(grad_x, None, None, None, False, None, grad_xa, lora_a, scale, dropout_p, seed,
                                 mask=mask)

    @classmethod
    def grad_a(cls, grad_xa, x, dropout_p, seed):
        if dropout_p == 0.0:
            return grad_xa.T @ x
        tokens = x.shape[0]
        per_split = min(tokens, cls.GRAD_A_TOKENS_PER_SPLIT)
        splits = -(-tokens // per_split)
        partial = torch.empty(splits, grad_xa.shape[1], x.shape[1], device=x.device, dtype=torch.float32)
        lora_fused_linear(partial, grad_xa.T, x, None, True, None, None, None, 0.0, dropout_p, seed,
                          mask="w", k_per_split=per_split)
        return partial.sum(dim=0).to(x.dtype)  # (r, K)
