"""Fused LoRA linear: ``y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ`` in one op.

LoRA (Hu et al. 2021, arXiv:2106.09685) adds a rank-``r`` update ``B A`` to a frozen
weight ``W``. Done naively (PEFT's ``lora.Linear``) a step materialises ``dropout(x)``
(a full copy of the activations), writes the base output and the LoRA output separately
and adds them, and the backward pass keeps the dropout mask / dropped copy alive. This
op instead:

* computes ``xa = dropout(x) Aᵀ`` (tokens, r) once and keeps it for backward: it is
  ``r / in_features`` the size of ``x`` (cheap to keep, costly to recompute);
* adds ``scaling · xa Bᵀ + b`` into the base GEMM's output (a fused epilogue) instead of a
  separate tensor;
* never stores the dropout mask: it is a pure function of ``(seed, token, feature)``
  (a counter-based hash, below) and is recomputed wherever it is needed, in forward and
  backward, identically by every backend;
* accepts the frozen ``W`` as int8 with per-output-channel scales (QLoRA-style
  weight-only quantisation, Dettmers et al. 2023, arXiv:2305.14314, with int8 absmax
  instead of NF4), dequantised on the fly inside the fused GEMM, so the base weight takes
  about half the memory of bf16.

Every backend implements four primitives over 2-D tensors (``N`` tokens, ``K`` in
features, ``O`` out features, ``r`` rank, ``mask`` the dropout keep-mask of ``x``):

    down(x (N,K), lora_a (r,K), dropout)                      -> xa = (x∘mask) Aᵀ      (N,r)
    up(x, weight, weight_scale, bias, xa, lora_b, scale)      -> y  = x Wᵀ + b + scale·xa Bᵀ   (N,O)
    grad_input(g (N,O), weight, weight_scale, gb (N,r), lora_a, scale, dropout)
                                                              -> dx = g W + scale·mask∘(gb A) (N,K)
    grad_a(gb (N,r), x (N,K), dropout)                        -> dA = gbᵀ (x∘mask)      (r,K)

with ``scale = scaling / (1 - dropout_p)`` (the inverted-dropout factor folded into the
rank-r product) and ``gb = g B`` (N, r). Everything else (validation, the cheap rank-r
products ``gb`` and ``dB = scale · gᵀ xa``, ``dW``, ``db``, autograd and torch.compile
registration) is shared and lives in this file.

Dropout mask (the same bits on every backend and device): with ``seed32 = seed mod 2³²``,
``key = mix32(seed32)``, ``h = mix32(mix32(key ^ token) ^ feature)``, an element is kept
when ``(h >> 8) >= ceil(dropout_p · 2²⁴)``, i.e. with probability ``1 - dropout_p`` to
within 2⁻²⁴. ``mix32`` is the "lowbias32" integer hash found by Chris Wellons' hash
prospector (https://nullprogram.com/blog/2018/07/31/): xor-shift 16, multiply 0x7feb352d,
xor-shift 15, multiply 0x846ca68b, xor-shift 16, all modulo 2³².
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from fastft._dispatch import choose_backend
from fastft._precision import autocast_dtype, autocast_off
from fastft.kernels._common import dropout_params, triton_reasons
from fastft.ops import lora_linear_cuda

__all__ = [
    "lora_linear",
    "lora_linear_ref",
    "quantize_weight_int8",
    "dequantize_weight_int8",
    "dropout_keep_mask",
    "backend_reasons",
]

# cuda first: every large GEMM goes to cuBLAS there (int8 weights dequantised first:
# lora_linear_cuda.INT8_GEMM, until a measured mixed-input GEMM beats it) and its kernel
# only does the dropout products cuBLAS cannot; triton's int8 base GEMM is its own fused
# kernel (unmeasured; kernels/lora_linear.py). CPU inputs fall through to torch.
PRIORITY = ("cuda", "triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Beyond this rank the rank-r product is a GEMM of its own and fusing it gains nothing;
# the kernels loop over the rank in chunks, so this is a policy, not a register limit.
MAX_FUSED_RANK = 1024
# The torch backend materialises the dropout mask (and its int32 hash) this many elements
# at a time at most: 1M * 4 B = 4 MiB per temporary, bounded by a constant.
MASK_CHUNK_ELEMENTS = 1 << 20

_MASK32 = 0xFFFFFFFF


# --------------------------------------------------------------------------- dropout mask


def _as_int32(value: int) -> int:
    """The int32 with the same 32 bits as the uint32 ``value``."""
    value &= _MASK32
    return value - (1 << 32) if value >= (1 << 31) else value


def _mix32_tensor_(values: torch.Tensor) -> torch.Tensor:
    """lowbias32, in place, on an int32 tensor of uint32 bit patterns (the same bits as
    ``fastft.kernels._common.mix32``, which every backend's seed key comes from).

    torch has no uint32 shifts, so this works on int32: multiplication wraps modulo 2³²
    (two's complement) and each right shift is masked to make it logical. In place with one
    scratch buffer: the CPU cost is memory traffic. The tests compare it with the
    Python-int ``mix32`` on every device they run on."""
    shifted = torch.empty_like(values)
    for shift, multiplier in ((16, 0x7FEB352D), (15, 0x846CA68B), (16, None)):
        torch.bitwise_right_shift(values, shift, out=shifted)
        values ^= shifted.bitwise_and_((1 << (32 - shift)) - 1)
        if multiplier is not None:
            values *= _as_int32(multiplier)
    return values


def dropout_keep_mask(seed: int, dropout_p: float, num_rows: int, num_cols: int, *,
                      row_offset: int = 0, device=None) -> torch.Tensor:
    """The keep-mask (bool, ``(num_rows, num_cols)``) that ``lora_linear`` applies to the
    2-D view ``x.reshape(-1, in_features)`` for this seed, starting at token ``row_offset``.

    True means kept (the element is then scaled by ``1 / (1 - dropout_p)``).
    """
    key, threshold = dropout_params(dropout_p, seed)
    rows = torch.arange(row_offset, row_offset + num_rows, device=device, dtype=torch.int32)
    cols = torch.arange(num_cols, device=device, dtype=torch.int32)
    row_hash = _mix32_tensor_(rows ^ _as_int32(key))  # (num_rows,)
    element_hash = _mix32_tensor_(row_hash[:, None] ^ cols[None, :])  # (num_rows, num_cols) int32 bits
    return element_hash.bitwise_right_shift_(8).bitwise_and_(0xFFFFFF) >= threshold


def _keep_chunks(num_rows: int, num_cols: int, dropout_p: float, seed: int, device):
    """Yield (start, end, keep-mask of rows start:end), a bounded number of elements at a time."""
    chunk = max(1, MASK_CHUNK_ELEMENTS // max(num_cols, 1))
    for start in range(0, num_rows, chunk):
        end = min(start + chunk, num_rows)
        yield start, end, dropout_keep_mask(seed, dropout_p, end - start, num_cols, row_offset=start, device=device)


# --------------------------------------------------------------------------- int8 weights


def quantize_weight_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel (row-wise absmax) int8 quantisation of a frozen weight.

    Args:
        weight: ``(out, in)`` floating-point weight.

    Returns:
        ``(q, scale)``: ``q`` int8 ``(out, in)`` in ``[-127, 127]`` and ``scale`` float32
        ``(out,)`` with ``weight ≈ q * scale[:, None]``; all-zero rows get scale 1.

    Error bound: round-to-nearest gives, for every element of row ``o``,
    ``|weight[o, i] - q[o, i] * scale[o]| <= scale[o] / 2 = max_i |weight[o, i]| / 254``
    (half a quantisation step; the fp32 arithmetic adds at most a relative 2⁻²³ of
    ``|weight[o, i]|`` on top). Storage is 1 byte per weight plus 4 bytes per output channel:
    about half of bf16.

    Raises:
        TypeError: ``weight`` is not a floating-point tensor.
        ValueError: ``weight`` is not 2-D or is not finite.
    """
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {getattr(weight, 'dtype', type(weight))}")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (out, in), got {tuple(weight.shape)}")
    weight32 = weight.detach().float()
    if not bool(torch.isfinite(weight32).all()):
        raise ValueError("weight must be finite to be quantised")
    absmax = weight32.abs().amax(dim=1)  # (out,)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))  # (out,)
    q = torch.round(weight32 / scale[:, None]).clamp_(-127, 127).to(torch.int8)  # (out, in)
    return q, scale


def dequantize_weight_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale[:, None]`` computed in fp32 and returned as ``dtype`` (``(out, in)``)."""
    return (q.float() * scale.float()[:, None]).to(dtype)


def _base_weight(weight: torch.Tensor, weight_scale: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The base weight as a ``dtype`` matrix (int8 dequantised: a temporary, torch path only)."""
    if weight.dtype == torch.int8:
        return dequantize_weight_int8(weight, weight_scale, dtype)
    return weight


# --------------------------------------------------------------------------- reference


def lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    *,
    dropout_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    weight_scale: Optional[torch.Tensor] = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Plain PyTorch LoRA linear with an explicit dropout mask: the test oracle.

    ``y = x Wᵀ + b + scaling · ((x ∘ mask / (1 - dropout_p)) Aᵀ) Bᵀ``. ``dropout_mask``
    (bool, ``x.shape``) is None for no dropout. An int8 ``weight`` is dequantised with
    ``weight_scale``. ``upcast=True`` computes in fp32 (returned as fp32); ``upcast=False``
    computes in ``x``'s dtype as an unfused model would (the tolerance rule's baseline).
    """
    dtype = torch.float32 if upcast else x.dtype
    w = dequantize_weight_int8(weight, weight_scale, dtype) if weight.dtype == torch.int8 else weight.to(dtype)
    x = x.to(dtype)
    b = None if bias is None else bias.to(dtype)
    dropped = x if dropout_mask is None else x * dropout_mask.to(dtype) / (1.0 - dropout_p)
    base = F.linear(x, w, b)
    return base + scaling * F.linear(F.linear(dropped, lora_a.to(dtype)), lora_b.to(dtype))


# --------------------------------------------------------------------------- torch backend


def _down_torch(x, lora_a, dropout_p, seed):
    """xa = (x∘mask) Aᵀ: (N, r) in x's dtype."""
    if dropout_p == 0.0:
        return x @ lora_a.T
    xa = x.new_empty(x.shape[0], lora_a.shape[0])
    for start, end, keep in _keep_chunks(*x.shape, dropout_p, seed, x.device):
        torch.mm(x[start:end] * keep, lora_a.T, out=xa[start:end])
    return xa


def _up_torch(x, weight, weight_scale, bias, xa, lora_b, scale):
    """y = x Wᵀ + b + scale · xa Bᵀ: (N, O)."""
    y = F.linear(x, _base_weight(weight, weight_scale, x.dtype), bias)
    return y.addmm_(xa, lora_b.T, alpha=scale)


def _grad_input_torch(grad, weight, weight_scale, grad_xa, lora_a, scale, dropout_p, seed):
    """dx = g W + scale · mask∘(gb A): (N, K)."""
    grad_x = grad @ _base_weight(weight, weight_scale, grad.dtype)
    if dropout_p == 0.0:
        return grad_x.addmm_(grad_xa, lora_a, alpha=scale)
    for start, end, keep in _keep_chunks(grad.shape[0], lora_a.shape[1], dropout_p, seed, grad.device):
        grad_x[start:end].add_((grad_xa[start:end] @ lora_a).mul_(keep), alpha=scale)
    return grad_x


def _accumulate_(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``total += a @ b`` into an fp32 ``total`` (16-bit chunk products are added in fp32,
    so the sum over chunks loses nothing to 16-bit rounding)."""
    if a.dtype == total.dtype:
        total.addmm_(a, b)
    else:
        total += (a @ b).float()


def _grad_a_torch(grad_xa, x, dropout_p, seed):
    """dA = gbᵀ (x∘mask): (r, K) (unscaled), in x's dtype (accumulated in fp32 over chunks)."""
    if dropout_p == 0.0:
        return grad_xa.T @ x
    grad_a = x.new_zeros(grad_xa.shape[1], x.shape[1], dtype=torch.float32)
    for start, end, keep in _keep_chunks(*x.shape, dropout_p, seed, x.device):
        _accumulate_(grad_a, grad_xa[start:end].T, x[start:end] * keep)
    return grad_a.to(x.dtype)


def _masked_grads_torch(grad, weight, weight_scale, grad_xa, lora_a, x, scale, dropout_p, seed, want_x, want_a):
    """(dx or None, scale · dA or None) with dropout, each chunk's mask computed once for both."""
    grad_x = grad @ _base_weight(weight, weight_scale, grad.dtype) if want_x else None  # (N, K)
    grad_a = x.new_zeros(lora_a.shape, dtype=torch.float32) if want_a else None  # (r, K), fp32 over chunks
    for start, end, keep in _keep_chunks(*x.shape, dropout_p, seed, x.device):
        if want_a:
            _accumulate_(grad_a, grad_xa[start:end].T, x[start:end] * keep)
        if want_x:
            grad_x[start:end].add_((grad_xa[start:end] @ lora_a).mul_(keep), alpha=scale)
    return grad_x, (grad_a.mul_(scale).to(x.dtype) if want_a else None)


class _TorchBackend:
    down = staticmethod(_down_torch)
    up = staticmethod(_up_torch)
    grad_input = staticmethod(_grad_input_torch)
    grad_a = staticmethod(_grad_a_torch)
    masked_grads = staticmethod(_masked_grads_torch)


def _backend_impl(name: str):
    if name == "torch":
        return _TorchBackend
    if name == "triton":
        from fastft.kernels import lora_linear as triton_backend

        return triton_backend
    return lora_linear_cuda.LoRALinearBackend


def _fused_reasons(x: torch.Tensor, lora_a: Optional[torch.Tensor]) -> list[str]:
    """What neither fused backend (triton, cuda) takes: a non-float dtype, a rank beyond fusion."""
    found = []
    if x.dtype not in FLOAT_DTYPES:
        found.append(f"dtype {x.dtype} is not fp32/fp16/bf16")
    rank = 0 if lora_a is None else lora_a.shape[0]
    if rank > MAX_FUSED_RANK:
        found.append(f"rank {rank} > {MAX_FUSED_RANK} (larger ranks gain nothing from fusion)")
    return found


def backend_reasons(x: torch.Tensor, weight: torch.Tensor, lora_a: Optional[torch.Tensor] = None,
                    weight_scale: Optional[torch.Tensor] = None, dropout_p: float = 0.0) -> dict:
    """For each backend, a function returning why it cannot run these inputs."""
    tensors = [t for t in (x, weight, lora_a, weight_scale) if t is not None]
    return {
        "torch": lambda: [],
        "triton": lambda: triton_reasons(tensors) + _fused_reasons(x, lora_a),
        "cuda": lambda: lora_linear_cuda.reasons(x, weight, lora_a, weight_scale) + _fused_reasons(x, lora_a),
    }


# --------------------------------------------------------------------------- the op


def _empty(reference: torch.Tensor) -> torch.Tensor:
    return reference.new_empty(0)


@torch.library.custom_op("fastft::lora_linear", mutates_args=())
def _lora_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    weight_scale: Optional[torch.Tensor],
    scaling: float,
    dropout_p: float,
    seed: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (y (N, O), xa (N, r)); xa = dropout(x) Aᵀ without the 1/(1-p) factor is
    what backward needs and is not differentiable."""
    scale = scaling / (1.0 - dropout_p)
    impl = _backend_impl(backend)
    if x.shape[0] == 0:
        return x.new_empty(0, weight.shape[0]), x.new_empty(0, lora_a.shape[0])
    with autocast_off(x.device.type):  # the inputs already carry the compute dtype (lora_linear)
        xa = impl.down(x, lora_a, dropout_p, seed)  # (N, r)
        y = impl.up(x, weight, weight_scale, bias, xa, lora_b, scale)  # (N, O)
    return y, xa


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, weight_scale, scaling, dropout_p, seed, backend):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_a.shape[0])


@torch.library.custom_op("fastft::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    xa: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
    backend: str,
    grad_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx, dW, db, dA, dB); an empty tensor stands for a gradient not asked for
    (grad_mask order: x, weight, bias, lora_a, lora_b)."""
    with autocast_off(x.device.type):  # a backward run inside the caller's autocast block
        return _lora_linear_backward(grad, x, weight, weight_scale, lora_a, lora_b, xa, scaling, dropout_p, seed,
                                     backend, grad_mask)


def _lora_linear_backward(grad, x, weight, weight_scale, lora_a, lora_b, xa, scaling, dropout_p, seed, backend,
                          grad_mask):
    want_x, want_weight, want_bias, want_a, want_b = grad_mask
    scale = scaling / (1.0 - dropout_p)
    impl = _backend_impl(backend)
    grad = grad.contiguous()
    grad_xa = grad @ lora_b  # (N, r): the rank-r bottleneck of the backward pass
    # custom_op outputs may not alias each other: one fresh empty tensor per missing gradient.
    grad_x, grad_weight, grad_bias, grad_a, grad_b = (_empty(x) for _ in range(5))
    if x.shape[0] > 0 and dropout_p > 0.0 and hasattr(impl, "masked_grads") and (want_x or want_a):
        # One mask computation serves dx and dA (the torch backend's mask is not free).
        grad_x_masked, grad_a_masked = impl.masked_grads(grad, weight, weight_scale, grad_xa, lora_a, x, scale,
                                                         dropout_p, seed, want_x, want_a)
        grad_x = grad_x_masked if want_x else grad_x
        grad_a = grad_a_masked if want_a else grad_a
        want_x = want_a = False  # done
    if want_x:
        if x.shape[0] == 0:
            grad_x = torch.zeros_like(x)
        else:
            grad_x = impl.grad_input(grad, weight, weight_scale, grad_xa, lora_a, scale, dropout_p, seed)
    if want_weight:
        grad_weight = grad.T @ x  # (O, K); never for int8 weights (they cannot require grad)
    if want_bias:
        grad_bias = grad.sum(dim=0)  # (O,)
    if want_a:
        if x.shape[0] == 0:
            grad_a = torch.zeros_like(lora_a)
        else:
            grad_a = impl.grad_a(grad_xa, x, dropout_p, seed).mul_(scale)  # (r, K)
    if want_b:
        grad_b = (grad.T @ xa).mul_(scale)  # (O, r)
    return grad_x, grad_weight, grad_bias, grad_a, grad_b


@_lora_linear_backward_op.register_fake
def _(grad, x, weight, weight_scale, lora_a, lora_b, xa, scaling, dropout_p, seed, backend, grad_mask):
    want_x, want_weight, want_bias, want_a, want_b = grad_mask
    return (
        x.new_empty(x.shape) if want_x else x.new_empty(0),
        x.new_empty(weight.shape) if want_weight else x.new_empty(0),
        x.new_empty(weight.shape[:1]) if want_bias else x.new_empty(0),
        x.new_empty(lora_a.shape) if want_a else x.new_empty(0),
        x.new_empty(lora_b.shape) if want_b else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, weight_scale, scaling, dropout_p, seed, backend = inputs
    _, xa = output
    # Saved: references to the inputs (no copies) and xa (N, r); never the dropout mask.
    ctx.save_for_backward(x, weight, weight_scale, lora_a, lora_b, xa)
    ctx.args = (scaling, dropout_p, seed, backend)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(xa)


def _backward(ctx, grad_y, _grad_xa):
    x, weight, weight_scale, lora_a, lora_b, xa = ctx.saved_tensors
    scaling, dropout_p, seed, backend = ctx.args
    needs = ctx.needs_input_grad
    grad_mask = [bool(needs[0]), bool(needs[1]) and weight.dtype != torch.int8,
                 bool(needs[2]) and ctx.has_bias, bool(needs[3]), bool(needs[4])]
    grads = _lora_linear_backward_op(grad_y, x, weight, weight_scale, lora_a, lora_b, xa,
                                     scaling, dropout_p, seed, backend, grad_mask)
    grads = [g if wanted else None for g, wanted in zip(grads, grad_mask)]
    return (*grads, None, None, None, None, None)


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


def _validate(x, weight, bias, lora_a, lora_b, scaling, dropout_p, weight_scale):
    for name, t in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have shape (..., in_features), got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (out_features, in_features), got {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal in_features = weight.shape[1] = {in_features}")
    if lora_a.dim() != 2 or lora_a.shape[0] < 1:
        raise ValueError(f"lora_a must have shape (rank, in_features) with rank >= 1, got {tuple(lora_a.shape)}")
    rank = lora_a.shape[0]
    if lora_a.shape[1] != in_features:
        raise ValueError(f"lora_a must have shape (rank, in_features) = ({rank}, {in_features}), "
                         f"got {tuple(lora_a.shape)}")
    if lora_b.dim() != 2 or tuple(lora_b.shape) != (out_features, rank):
        raise ValueError(f"lora_b must have shape (out_features, rank) = ({out_features}, {rank}), "
                         f"got {tuple(lora_b.shape)}")
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if t.dtype != x.dtype:
            raise TypeError(f"{name} dtype {t.dtype} does not match x dtype {x.dtype} (cast the adapter to x's dtype)")
    devices = {("x", x.device), ("weight", weight.device), ("lora_a", lora_a.device), ("lora_b", lora_b.device)}
    if weight.dtype == torch.int8:
        if weight_scale is None:
            raise ValueError("weight is int8 but weight_scale is None: pass the per-output-channel scales "
                             "returned by quantize_weight_int8")
        if not isinstance(weight_scale, torch.Tensor):
            raise TypeError(f"weight_scale must be a torch.Tensor, got {type(weight_scale).__name__}")
        if weight_scale.dtype not in FLOAT_DTYPES:
            raise TypeError(f"weight_scale must be fp32/fp16/bf16, got {weight_scale.dtype}")
        if tuple(weight_scale.shape) != (out_features,):
            raise ValueError(f"weight_scale must have shape (out_features,) = ({out_features},), "
                             f"got {tuple(weight_scale.shape)}")
        devices.add(("weight_scale", weight_scale.device))
    else:
        if weight_scale is not None:
            raise ValueError(f"weight_scale is only for int8 weights; weight has dtype {weight.dtype}")
        if weight.dtype != x.dtype:
            raise TypeError(f"weight dtype {weight.dtype} does not match x dtype {x.dtype} (or pass an int8 weight)")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must have shape (out_features,) = ({out_features},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias dtype {bias.dtype} does not match x dtype {x.dtype}")
        devices.add(("bias", bias.device))
    if len({d for _, d in devices}) > 1:
        listing = ", ".join(f"{n}={d}" for n, d in sorted(devices, key=str))
        raise ValueError(f"inputs are on different devices: {listing}")
    if isinstance(scaling, torch.Tensor) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise TypeError(f"scaling must be a finite Python number, got {scaling!r}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")


def _autocast_inputs(x, weight, bias, lora_a, lora_b):
    """Under autocast on x's device: the float inputs cast to the autocast dtype, as
    ``F.linear`` casts its own; unchanged otherwise (and for an int8 weight)."""
    dtype = autocast_dtype(x.device.type)
    if dtype is None:
        return x, weight, bias, lora_a, lora_b

    def cast(t):
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    return cast(x), cast(weight), cast(bias), cast(lora_a), cast(lora_b)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    *,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    weight_scale: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """LoRA linear layer: ``y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ``.

    Args:
        x: ``(..., in_features)`` fp32 / fp16 / bf16 activations.
        weight: ``(out_features, in_features)`` frozen base weight, ``x``'s dtype, or int8
            from ``quantize_weight_int8`` together with ``weight_scale``. It gets a gradient
            only if it requires one (never when int8).
        bias: optional ``(out_features,)`` base bias, ``x``'s dtype.
        lora_a: ``(rank, in_features)`` down-projection A, ``x``'s dtype, rank >= 1.
        lora_b: ``(out_features, rank)`` up-projection B, ``x``'s dtype.
        scaling: the LoRA factor (``alpha / rank``, or ``alpha / sqrt(rank)`` for rsLoRA).
        dropout_p: in ``[0, 1)``; dropout on the LoRA branch's input only (as PEFT). The op
            has no training flag: pass 0 in eval mode.
        seed: the dropout mask is a pure function of ``(seed, token, feature)`` (see the
            module docstring), identical on every backend and device, and replayed in
            backward without being stored. ``None`` draws a seed from ``generator`` (or
            torch's default CPU generator, so ``torch.manual_seed`` makes runs repeatable).
            Only ``seed mod 2³²`` matters. Under ``torch.compile(fullgraph=True)`` with
            dropout pass an explicit seed (drawing one is a data-dependent scalar).
        generator: the ``torch.Generator`` seeds are drawn from when ``seed`` is None.
        weight_scale: ``(out_features,)`` per-output-channel scales, required exactly when
            ``weight`` is int8: the base weight is ``weight * weight_scale[:, None]``,
            dequantised on the fly (gradients for ``x`` flow through the dequantised weight).
        backend: ``"auto" | "cuda" | "triton" | "torch"`` (``FASTFT_BACKEND`` overrides auto).

    Returns:
        ``(..., out_features)`` in ``x``'s dtype. Gradients flow to ``x``, ``lora_a``,
        ``lora_b``, and to ``weight`` / ``bias`` when they require grad.

    Under ``torch.autocast`` it behaves as ``nn.Linear`` does there: the float inputs
    (``x``, a float ``weight``, ``bias``, ``lora_a``, ``lora_b``) are cast to the autocast
    dtype, the result has that dtype, and gradients reach fp32 master weights in fp32 (an
    int8 weight and its ``weight_scale`` stay as they are).

    Raises:
        TypeError: non-tensor inputs, non-float ``x``, dtypes that do not match ``x``,
            non-number ``scaling``.
        ValueError: shapes that do not fit (``x``'s last dim vs in_features, rank < 1,
            ``lora_a`` / ``lora_b`` / ``bias`` / ``weight_scale`` shapes), int8 weight without
            ``weight_scale`` (or scales with a float weight), mixed devices, ``dropout_p``
            outside ``[0, 1)``, or a backend that cannot run these inputs (with its reasons).
    """
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        x, weight, bias, lora_a, lora_b = _autocast_inputs(x, weight, bias, lora_a, lora_b)
    _validate(x, weight, bias, lora_a, lora_b, scaling, dropout_p, weight_scale)
    dropout_p = float(dropout_p)
    if dropout_p == 0.0:
        seed = 0
    elif seed is None:
        device = generator.device if generator is not None else "cpu"
        seed = int(torch.randint(0, 1 << 32, (1,), generator=generator, device=device, dtype=torch.int64).item())
    else:
        seed = int(seed) % (1 << 32)
    chosen = choose_backend("lora_linear", backend,
                            backend_reasons(x, weight, lora_a, weight_scale, dropout_p), PRIORITY, x.device)
    x2d = x.reshape(-1, x.shape[-1])  # (N, K)
    y, _ = _lora_linear_op(x2d, weight, bias, lora_a, lora_b, weight_scale, float(scaling), dropout_p, seed, chosen)
    return y.reshape(*x.shape[:-1], weight.shape[0])
