"""CUDA backend of ``fastft.ops.attention``: the wrapper of the FlashAttention-2 kernels.

The kernels live in csrc/attention/ (bound in csrc/attention/bindings.h). Every tensor
check happens here, before a pointer crosses into C++; ``reasons`` says which inputs the
kernels cannot take, so that dispatch never gets that far with them.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

from fastft import _extension
from fastft._extension import DTYPE_CODES, check_cuda_tensor, pointer, stream_handle

HEAD_DIMS = (32, 64, 128)  # template instances in csrc/attention/*.cu
_DTYPES = (torch.float16, torch.bfloat16)
_GRID_LIMIT = 65535  # heads and batch are grid dimensions y and z

# Which dK/dV kernel the backward runs (csrc/attention/attention_bwd.cu, issue 15 defect 8):
#   FASTFT_ATTENTION_BWD=classic    (default) the kernel every GPU test so far was written for;
#   FASTFT_ATTENTION_BWD=pipelined  Q / dO loads double-buffered (two barriers per query block
#                                   instead of three) and, when the grid is small, the query
#                                   steps of each key block split over several thread blocks
#                                   whose fp32 dK / dV partials are summed in a fixed order.
# The pipelined kernel compiles and links but has never run on a GPU: it stays opt-in until a
# lent GPU has run, in one call, the gpu tests of tests/test_attention.py that compare it with
# the classic kernel (test_gpu_pipelined_backward_*) and `bash benchmarks/gpu_run.sh bench` with
# FASTFT_ATTENTION_BWD=pipelined; then make it the default. FASTFT_ATTENTION_BWD_SPLITS=N forces
# N splits (tests use it to run the split path on any shape; 0 or unset: chosen by grid size).
BACKWARD_VARIANTS = {"classic": 0, "pipelined": 1}
_BLOCK_N = 64  # keys per thread block of the dK/dV kernels
_MAX_SPLITS = 8


def backward_variant() -> str:
    """The dK/dV kernel ``FASTFT_ATTENTION_BWD`` selects: ``"classic"`` (default) or ``"pipelined"``."""
    name = os.environ.get("FASTFT_ATTENTION_BWD", "").strip().lower() or "classic"
    if name not in BACKWARD_VARIANTS:
        raise ValueError(f"FASTFT_ATTENTION_BWD={name!r} is not one of {sorted(BACKWARD_VARIANTS)}")
    return name


def backward_splits(batch: int, heads_q: int, heads_kv: int, seqlen_q: int, seqlen_k: int, head_dim: int,
                    sm_count: int) -> int:
    """Thread blocks per (batch, kv head, key block) for the pipelined dK/dV kernel.

    1 when ``batch * heads_kv * ceil(seqlen_k / 64)`` already gives every SM two blocks;
    otherwise enough splits to reach that, at most 8 and at most half the (query head, query
    block) steps of a key block, so that each split still has two steps to pipeline.
    ``FASTFT_ATTENTION_BWD_SPLITS`` overrides (clipped to the steps there are).
    """
    blocks = batch * heads_kv * -(-seqlen_k // _BLOCK_N)
    block_m = 32 if head_dim >= 128 else 64  # backward_block_m in attention_bwd.cu
    steps = (heads_q // max(heads_kv, 1)) * -(-seqlen_q // block_m)
    limit = max(1, min(steps, _GRID_LIMIT // max(heads_kv, 1)))
    forced = int(os.environ.get("FASTFT_ATTENTION_BWD_SPLITS", "0") or 0)
    if forced > 0:
        return min(forced, limit)
    target = 2 * sm_count
    if blocks == 0 or blocks >= target:
        return 1
    return max(1, min(-(-target // blocks), _MAX_SPLITS, steps // 2, limit))


def reasons(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
) -> list[str]:
    """Why the CUDA attention kernels cannot run these inputs (empty list when they can).

    The extension itself (built, bound, on a CUDA device the build fits), then what the
    kernels support: fp16/bf16, a head_dim in ``HEAD_DIMS``, no varlen, no dropout, no
    ALiBi, a bool mask, compute capability >= 8.0 (causal in either alignment, sliding
    windows, softcap and the lse they run). Shape errors are the op's to raise.
    """
    tensors = [q, k, v] + ([key_padding_mask] if key_padding_mask is not None else [])
    found = _extension.reasons(tensors, "attention_forward", "attention_backward")
    if q.dtype not in _DTYPES:
        found.append(f"dtype {q.dtype} is not float16/bfloat16 (the kernels use 16-bit tensor cores)")
    elif k.dtype != q.dtype or v.dtype != q.dtype:
        found.append(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        found.append("q, k, v must be 4-D (batch, heads, seq, head_dim)")
    head_dim = q.shape[-1] if q.dim() else 0
    if head_dim not in HEAD_DIMS:
        found.append(f"head_dim {head_dim} is not one of {HEAD_DIMS}")
    elif k.shape[-1] != head_dim or v.shape[-1] != head_dim:
        found.append(f"k / v head_dim ({k.shape[-1]}, {v.shape[-1]}) differ from q's ({head_dim})")
    if cu_seqlens is not None:
        found.append("variable-length batches (cu_seqlens) are not supported by the CUDA kernels")
    if dropout_p > 0.0:
        found.append(f"attention dropout (dropout_p={dropout_p}) is not supported by the CUDA kernels")
    if alibi_slopes is not None:
        found.append("ALiBi slopes are not supported by the CUDA kernels")
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        found.append(f"key_padding_mask must be bool, got {key_padding_mask.dtype}")
    if all(t.is_cuda for t in tensors):
        capability = tuple(torch.cuda.get_device_capability(q.device))
        if capability < (8, 0):  # mma.sync m16n8k16 with bf16, ldmatrix, cp.async
            found.append(f"compute capability {capability[0]}.{capability[1]} < 8.0")
    return found


def _attention_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when the kernels can read it in place, else a contiguous copy.

    The kernels take (batch, head, seq) strides and need a unit head_dim stride, 16-byte
    aligned rows (cp.async / vector stores) and a 16-byte aligned base. So the common
    ``(B, S, H, D).transpose(1, 2)`` view of a Hugging Face projection is used without a copy.
    """
    aligned = t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(
        s % 8 == 0 for s in t.stride()[:-1])
    if aligned:
        return t
    return t.clone(memory_format=torch.contiguous_format)  # fresh allocation: aligned


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)  # (batch, head, seq), in elements


def _check_attention_tensors(q, k, v, key_padding_mask) -> tuple[int, int, int, int, int, int]:
    """Validates q / k / v / mask for the kernels; returns (B, Hq, Hkv, Sq, Sk, D)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_cuda_tensor(name, t, dtype=_DTYPES, contiguous=False, device=q.device)
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, heads, seq, head_dim), got {tuple(t.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    if k.shape != (batch, heads_kv, seqlen_k, head_dim) or v.shape != k.shape:
        raise ValueError(f"k and v must have shape (batch={batch}, heads_kv, seq_k, head_dim={head_dim}), "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} is not supported by the CUDA kernels {HEAD_DIMS}")
    if heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(f"q heads ({heads_q}) must be a multiple of k/v heads ({heads_kv})")
    if batch > _GRID_LIMIT or heads_q > _GRID_LIMIT:
        raise ValueError(f"batch ({batch}) and heads ({heads_q}) must be at most {_GRID_LIMIT}")
    if max(seqlen_q, seqlen_k) >= 2**31:
        raise ValueError("sequence lengths must be below 2**31")
    if key_padding_mask is not None:
        check_cuda_tensor("key_padding_mask", key_padding_mask, dtype=torch.bool, contiguous=False,
                          device=q.device)
        if key_padding_mask.shape != (batch, seqlen_k):
            raise ValueError(f"key_padding_mask must have shape (batch={batch}, seq_k={seqlen_k}), "
                             f"got {tuple(key_padding_mask.shape)}")
    return batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim


def _attention_mask_bytes(key_padding_mask: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], int]:
    """(B, Sk) bool -> the same bytes as uint8 with a unit key stride, and its batch stride."""
    if key_padding_mask is None:
        return None, 0
    mask = key_padding_mask.contiguous().view(torch.uint8)  # torch.bool is one byte, 1 = attend
    return mask, mask.stride(0)


def _window(causal: bool, window: tuple[int, int]) -> tuple[int, int]:
    """(left, right) with causal folded in (right capped at 0); -1 = unbounded."""
    left, right = int(window[0]), int(window[1])
    if left < -1 or right < -1:
        raise ValueError(f"window sides must be >= -1 (-1: unbounded), got {window}")
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def _softcap(softcap: float) -> float:
    softcap = float(softcap or 0.0)
    if not (math.isfinite(softcap) and softcap >= 0.0):
        raise ValueError(f"softcap must be a finite number >= 0 (0: off), got {softcap}")
    return softcap


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    key_padding_mask: Optional[torch.Tensor],
    softmax_scale: float,
    *,
    window: tuple[int, int] = (-1, -1),
    bottom_right: bool = False,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-2 forward on the current CUDA stream.

    Args:
        q: ``(B, Hq, Sq, D)`` fp16 / bf16, D in ``HEAD_DIMS``.
        k, v: ``(B, Hkv, Sk, D)``, same dtype; ``Hq % Hkv == 0`` (query head h reads k/v
            head ``h // (Hq // Hkv)``: grouped-query / multi-query attention).
        causal: query i attends keys ``j <= i + shift`` (``shift = 0``: top-left aligned,
            like SDPA's is_causal; ``Sk - Sq`` with ``bottom_right``).
        key_padding_mask: ``(B, Sk)`` bool, True = attend, or None.
        softmax_scale: multiplies ``q @ k^T`` before the softmax.
        window: ``(left, right)``: query i attends keys ``[i + shift - left, i + shift +
            right]`` (-1: unbounded; with causal, right is 0). Key blocks outside are skipped.
        bottom_right: align the diagonal bottom-right (``shift = Sk - Sq``).
        softcap: ``c > 0`` caps the scaled scores at ``c · tanh(s / c)`` (the GPU's
            ``tanh.approx``, as FlashAttention); 0: off.

    Returns:
        ``out`` ``(B, Hq, Sq, D)`` (contiguous, dtype of q) and ``lse`` ``(B, Hq, Sq)`` fp32,
        the natural-log log-sum-exp of the scaled, soft-capped, masked scores. Rows with no
        allowed key get ``out = 0`` and ``lse = -inf``.

    Raises:
        ValueError / TypeError: inputs the kernels cannot take (device, dtype, shapes).
        RuntimeError: a failed launch (from the extension).
    """
    batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim = _check_attention_tensors(q, k, v, key_padding_mask)
    window_left, window_right = _window(causal, window)
    softcap = _softcap(softcap)
    out = torch.empty((batch, heads_q, seqlen_q, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads_q, seqlen_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if seqlen_k == 0:  # no key at all: every row is fully masked
        return out.zero_(), lse.fill_(-math.inf)
    q, k, v = (_attention_layout(t) for t in (q, k, v))
    mask, mask_stride = _attention_mask_bytes(key_padding_mask)
    with torch.cuda.device(q.device):  # launch on q's device, on its current stream
        _extension.module().attention_forward(
            q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), out=out.data_ptr(), lse=lse.data_ptr(),
            key_padding_mask=pointer(mask), mask_batch_stride=mask_stride,
            batch=batch, heads_q=heads_q, heads_kv=heads_kv, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
            head_dim=head_dim, q_strides=_strides3(q), k_strides=_strides3(k), v_strides=_strides3(v),
            out_strides=_strides3(out), window_left=window_left, window_right=window_right,
            bottom_right=bool(bottom_right), softcap=softcap, softmax_scale=float(softmax_scale),
            dtype=DTYPE_CODES[q.dtype], stream=stream_handle(q.device),
        )
    return out, lse


def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    key_padding_mask: Optional[torch.Tensor],
    softmax_scale: float,
    *,
    window: tuple[int, int] = (-1, -1),
    bottom_right: bool = False,
    softcap: float = 0.0,
    grad_lse: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashAttention-2 backward on the current CUDA stream.

    Args:
        grad_out: ``(B, Hq, Sq, D)`` gradient of ``out``, dtype of q.
        q, k, v, causal, key_padding_mask, softmax_scale, window, bottom_right, softcap: as
            given to ``attention_forward``.
        out, lse: what ``attention_forward`` returned for them.
        grad_lse: ``(B, Hq, Sq)`` gradient of ``lse`` when the caller used it, or None.

    Returns:
        ``(dq, dk, dv)``: dq ``(B, Hq, Sq, D)``; dk, dv ``(B, Hkv, Sk, D)`` summed over the
        query heads of each group; all contiguous, dtype of q. Rows that attended no key
        contribute nothing.

    Raises:
        ValueError / TypeError: inputs the kernels cannot take (device, dtype, shapes).
        RuntimeError: a failed launch (from the extension).
    """
    batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim = _check_attention_tensors(q, k, v, key_padding_mask)
    for name, t in (("grad_out", grad_out), ("out", out)):
        check_cuda_tensor(name, t, dtype=q.dtype, contiguous=False, device=q.device)
        if t.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(t.shape)}")
    check_cuda_tensor("lse", lse, dtype=torch.float32, device=q.device)
    if lse.shape != (batch, heads_q, seqlen_q):
        raise ValueError(f"lse must have shape {(batch, heads_q, seqlen_q)}, got {tuple(lse.shape)}")
    if grad_lse is not None:
        check_cuda_tensor("grad_lse", grad_lse, dtype=torch.float32, contiguous=False, device=q.device)
        if grad_lse.shape != lse.shape:
            raise ValueError(f"grad_lse must have lse's shape {tuple(lse.shape)}, got {tuple(grad_lse.shape)}")
        grad_lse = grad_lse.contiguous()  # read as contiguous (B, Hq, Sq)
    window_left, window_right = _window(causal, window)
    softcap = _softcap(softcap)
    grad_q = torch.empty((batch, heads_q, seqlen_q, head_dim), dtype=q.dtype, device=q.device)
    grad_k = torch.empty((batch, heads_kv, seqlen_k, head_dim), dtype=q.dtype, device=q.device)
    grad_v = torch.empty_like(grad_k)
    if grad_q.numel() == 0 or grad_k.numel() == 0:  # no query or no key: nothing flows
        return grad_q.zero_(), grad_k.zero_(), grad_v.zero_()
    grad_out, q, k, v, out = (_attention_layout(t) for t in (grad_out, q, k, v, out))
    mask, mask_stride = _attention_mask_bytes(key_padding_mask)
    delta = torch.empty((batch, heads_q, seqlen_q), dtype=torch.float32, device=q.device)  # rowsum(dO * O)
    grad_q_accum = torch.zeros((batch, heads_q, seqlen_q, head_dim), dtype=torch.float32, device=q.device)
    variant = backward_variant()
    splits, workspace = 1, None
    if variant == "pipelined":
        sm_count = torch.cuda.get_device_properties(q.device).multi_processor_count
        splits = backward_splits(batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, sm_count)
        if splits > 1:  # fp32 dK / dV partials, every element written by the kernel: no zeroing
            workspace = torch.empty((2, splits, batch, heads_kv, seqlen_k, head_dim), dtype=torch.float32,
                                    device=q.device)
    with torch.cuda.device(q.device):
        _extension.module().attention_backward(
            grad_out=grad_out.data_ptr(), q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), out=out.data_ptr(),
            lse=lse.data_ptr(), delta=delta.data_ptr(), grad_q_accum=grad_q_accum.data_ptr(),
            grad_q=grad_q.data_ptr(), grad_k=grad_k.data_ptr(), grad_v=grad_v.data_ptr(),
            grad_lse=pointer(grad_lse), key_padding_mask=pointer(mask), mask_batch_stride=mask_stride,
            batch=batch, heads_q=heads_q, heads_kv=heads_kv, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
            head_dim=head_dim, grad_out_strides=_strides3(grad_out), q_strides=_strides3(q),
            k_strides=_strides3(k), v_strides=_strides3(v), out_strides=_strides3(out),
            grad_k_strides=_strides3(grad_k), grad_v_strides=_strides3(grad_v), window_left=window_left,
            window_right=window_right, bottom_right=bool(bottom_right), softcap=softcap,
            softmax_scale=float(softmax_scale), dtype=DTYPE_CODES[q.dtype], variant=BACKWARD_VARIANTS[variant],
            kv_splits=splits, dkv_workspace=pointer(workspace), stream=stream_handle(q.device),
        )
    return grad_q, grad_k, grad_v
