"""Python face of the CUDA C++ extension ``fastft._cuda``.

The extension takes raw device pointers, sizes and the caller's CUDA stream, and links
only the CUDA runtime. Every check on tensors (device, dtype, contiguity, shape) happens
here, before a pointer crosses into C++.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

_module = None
_load_error: str | None = None

try:  # the package must import and work without the extension
    from fastft import _cuda as _module  # type: ignore[attr-defined]
except ImportError as err:
    info_path = Path(__file__).resolve().parent.parent / "_build_info.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        why = info.get("error") or f"import failed: {err}"
    else:
        why = "not built (installed with FASTFT_CUDA=0, or no nvcc at install time)"
    _load_error = why

# dtype codes shared with csrc/common.h
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def load_error() -> str | None:
    """None when the extension is importable, else why it is not."""
    return _load_error


def module():
    if _module is None:
        raise RuntimeError(f"fastft CUDA extension unavailable: {_load_error}")
    return _module


def build_info() -> dict:
    path = Path(__file__).resolve().parent.parent / "_build_info.json"
    return json.loads(path.read_text()) if path.exists() else {}


def stream_handle(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def check_cuda_tensor(name: str, t: torch.Tensor, *, dtype=None, contiguous: bool = True, device=None) -> None:
    if not t.is_cuda:
        raise ValueError(f"{name} must be a CUDA tensor, got device {t.device}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    if dtype is not None and t.dtype not in (dtype if isinstance(dtype, tuple) else (dtype,)):
        raise TypeError(f"{name} has dtype {t.dtype}, expected {dtype}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


# =====================================================================================
# linear_cross_entropy: CUDA backend (section owned by the linear_cross_entropy CUDA
# engineer; kernel in csrc/linear_cross_entropy/softmax_grad_kernel.cuh)
# =====================================================================================

import functools  # noqa: E402 - this section's own imports, kept with the section
from dataclasses import dataclass  # noqa: E402

# fp32 logits held at once by the CUDA backend: 2^26 * 4 B = 256 MiB (plus a 128 MiB
# 16-bit copy for 16-bit inputs), whatever tokens x vocab is. Large chunks keep the three
# GEMMs per chunk big enough to run cuBLAS near peak.
LINEAR_CROSS_ENTROPY_CUDA_CHUNK_LOGITS = 1 << 24

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _pointer(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _driver_cuda_version() -> tuple[int, int] | None:
    """CUDA version the installed NVIDIA driver supports, e.g. (12, 8); None if unknown."""
    getter = getattr(torch._C, "_cuda_getDriverVersion", None)  # private, absent on CPU builds
    try:
        version = int(getter()) if getter is not None else 0
    except (RuntimeError, OSError, TypeError, ValueError):
        return None
    return (version // 1000, version % 1000 // 10) if version > 0 else None


def device_reasons(device: torch.device) -> list[str]:
    """Why the built extension cannot run kernels on ``device`` (empty when it can).

    Two things the import cannot tell: the driver must support the CUDA major version
    the extension's static runtime was built with (a CUDA 13 build needs a 580+ driver),
    and the build must hold a kernel image for the GPU. SASS built for sm_XY runs on
    compute capability X.Y' with Y' >= Y; an ``a`` variant (sm_90a) only on exactly X.Y;
    ``+PTX`` entries JIT on any capability >= X.Y.
    """
    info = build_info()
    reasons = []
    built_with = info.get("cuda_version")  # "13.0"
    driver = _driver_cuda_version()
    if built_with and driver is not None and driver[0] < int(built_with.split(".")[0]):
        reasons.append(f"the NVIDIA driver supports CUDA {driver[0]}.{driver[1]} but the extension was built "
                       f"with CUDA {built_with} (update the driver or rebuild with an older toolkit)")
    archs = info.get("archs") or []
    if not archs:  # no record (e.g. built by hand): let the launch itself report
        return reasons
    major, minor = torch.cuda.get_device_capability(device)
    for arch in archs:
        ptx = arch.endswith("+PTX")
        number = arch.removesuffix("+PTX")
        exact = number.endswith("a")
        digits = number.removesuffix("a")
        arch_major, arch_minor = int(digits[:-1]), int(digits[-1])
        if exact and (major, minor) == (arch_major, arch_minor):
            return reasons
        if not exact and major == arch_major and minor >= arch_minor:
            return reasons
        if ptx and (major, minor) >= (arch_major, arch_minor):
            return reasons
    reasons.append(f"extension built for archs {';'.join(archs)}, not for compute capability {major}.{minor} "
                   f"(rebuild with FASTFT_CUDA_ARCHS)")
    return reasons


def linear_cross_entropy_softmax_grad(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    row_scale: torch.Tensor | None = None,
    write_in_place: bool = False,
    grad_logits_16: torch.Tensor | None = None,
    loss: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss, log-sum-exp and (optionally) the logits gradient of a chunk of fp32 logits.

    The memory-bound middle of the CUDA backend, one kernel launch on the current stream.
    With ``z = logits + bias`` and ``eps = label_smoothing``:

        lse  = logsumexp(z, dim=1)
        loss = lse - (1 - eps) * z[label] - eps * z.mean(dim=1)      (= F.cross_entropy)
        grad = row_scale[:, None] * (softmax(z) - (1 - eps) * onehot(label) - eps / V)

    Args:
        logits: ``(rows, V)`` fp32, contiguous, CUDA. Overwritten by ``grad`` when
            ``write_in_place``.
        labels: ``(rows,)`` int64, contiguous, in ``[0, V)`` (a row with another label gets
            a NaN loss; nothing is read out of bounds).
        bias: optional ``(V,)`` fp32 / fp16 / bf16, contiguous.
        label_smoothing: ``eps`` in ``[0, 1]``.
        row_scale: ``(rows,)`` fp32, contiguous; required by any gradient output.
        write_in_place: write ``grad`` (fp32) over ``logits``.
        grad_logits_16: optional ``(rows, V)`` fp16 / bf16 contiguous output for ``grad``.
        loss, lse: optional ``(rows,)`` fp32 contiguous outputs (allocated when None).

    Returns:
        ``(loss, lse)``, both ``(rows,)`` fp32.

    Raises:
        ValueError / TypeError: a tensor on the wrong device, of the wrong dtype, shape or
            layout, or a gradient output without ``row_scale``.
        RuntimeError: the extension is unavailable or the launch failed.
    """
    check_cuda_tensor("logits", logits, dtype=torch.float32)
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must have shape (rows, V) with V >= 1, got {tuple(logits.shape)}")
    device = logits.device
    rows, vocab = logits.shape
    check_cuda_tensor("labels", labels, dtype=torch.int64, device=device)
    if labels.shape != (rows,):
        raise ValueError(f"labels must have shape ({rows},), got {tuple(labels.shape)}")
    if bias is not None:
        check_cuda_tensor("bias", bias, dtype=_FLOAT_DTYPES, device=device)
        if bias.shape != (vocab,):
            raise ValueError(f"bias must have shape ({vocab},), got {tuple(bias.shape)}")
    if row_scale is not None:
        check_cuda_tensor("row_scale", row_scale, dtype=torch.float32, device=device)
        if row_scale.shape != (rows,):
            raise ValueError(f"row_scale must have shape ({rows},), got {tuple(row_scale.shape)}")
    if grad_logits_16 is not None:
        check_cuda_tensor("grad_logits_16", grad_logits_16, dtype=(torch.float16, torch.bfloat16), device=device)
        if grad_logits_16.shape != (rows, vocab):
            raise ValueError(f"grad_logits_16 must have shape ({rows}, {vocab}), got {tuple(grad_logits_16.shape)}")
    if (write_in_place or grad_logits_16 is not None) and row_scale is None:
        raise ValueError("write_in_place / grad_logits_16 need row_scale (the gradient is of sum(row_scale * loss))")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    outputs = {}
    for name, given in (("loss", loss), ("lse", lse)):
        if given is None:
            given = torch.empty(rows, dtype=torch.float32, device=device)
        check_cuda_tensor(name, given, dtype=torch.float32, device=device)
        if given.shape != (rows,):
            raise ValueError(f"{name} must have shape ({rows},), got {tuple(given.shape)}")
        outputs[name] = given
    extension = module()
    with torch.cuda.device(device):
        extension.linear_cross_entropy_softmax_grad(
            logits=_pointer(logits), rows=rows, vocab=vocab,
            bias=_pointer(bias), bias_dtype=DTYPE_CODES[bias.dtype] if bias is not None else 0,
            labels=_pointer(labels),
            label_smoothing=float(label_smoothing),
            row_scale=_pointer(row_scale),
            write_in_place=bool(write_in_place),
            grad_logits_16=_pointer(grad_logits_16),
            grad_logits_16_dtype=DTYPE_CODES[grad_logits_16.dtype] if grad_logits_16 is not None else 0,
            loss=_pointer(outputs["loss"]), lse=_pointer(outputs["lse"]),
            stream=stream_handle(device),
        )
    return outputs["loss"], outputs["lse"]


@dataclass(frozen=True)
class _GemmPlan:
    """How this torch build multiplies 16-bit matrices into fp32 on this device.

    fp32_output: ``torch.mm(a16, b16, out_dtype=torch.float32, out=c32)`` works (the
        ``mm.dtype_out`` overload, recent torch on CUDA). Without it the backend upcasts
        the inputs and runs fp32 GEMMs.
    accumulate: how ``acc32 += a16 @ b16`` is done: ``"addmm"`` or ``"baddbmm"`` (one
        GEMM accumulating into acc, where the torch build allows an fp32 ``self`` with
        16-bit matrices) or ``"mm_add"`` (a temporary fp32 product, then an add).
    """

    fp32_output: bool
    accumulate: str


def _accumulate_fp32(form: str, acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b for 16-bit a, b, in the given form (see _GemmPlan)."""
    if form == "addmm":
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif form == "baddbmm":
        acc3 = acc.unsqueeze(0)  # (1, m, n) view of acc: out= writes through it
        torch.baddbmm(acc3, a.unsqueeze(0), b.unsqueeze(0), out_dtype=torch.float32, out=acc3)
    else:
        acc += torch.mm(a, b, out_dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _gemm_plan(device: torch.device, dtype: torch.dtype) -> _GemmPlan:
    """Probe once per (device, dtype) which fp32-output GEMM forms work, on tiny matrices
    laid out as the backend uses them (a transposed operand), checking the numbers: an
    overload that exists but ignores ``out`` aliasing would be caught, not trusted."""
    probe_errors = (RuntimeError, TypeError, NotImplementedError)
    generator = torch.Generator().manual_seed(0)

    def random(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    def close(result, expected):  # semantics check: a wrong form is off by O(1)
        return torch.allclose(result.double(), expected, rtol=1e-2, atol=1e-2)

    hidden, weight = random(5, 3), random(4, 3)  # (c, H), (V, H)
    try:
        out = torch.empty(5, 4, dtype=torch.float32, device=device)
        torch.mm(hidden, weight.T, out_dtype=torch.float32, out=out)
        fp32_output = close(out, hidden.double() @ weight.double().T)
    except probe_errors:
        fp32_output = False
    if not fp32_output:
        return _GemmPlan(fp32_output=False, accumulate="mm_add")
    grad_logits = random(5, 4)  # (c, V)
    start = torch.randn(4, 3, generator=generator).to(device)  # (V, H) fp32 accumulator
    expected = start.double() + grad_logits.double().T @ hidden.double()
    for form in ("addmm", "baddbmm"):
        acc = start.clone()
        try:
            _accumulate_fp32(form, acc, grad_logits.T, hidden)
        except probe_errors:
            continue
        if close(acc, expected):
            return _GemmPlan(fp32_output=True, accumulate=form)
    return _GemmPlan(fp32_output=True, accumulate="mm_add")


def _mm_into_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out (fp32) = a @ b; a, b fp32, or 16-bit with an fp32-output GEMM (fp32 accumulation)."""
    if a.dtype == torch.float32:
        torch.mm(a, b, out=out)
    else:
        torch.mm(a, b, out_dtype=torch.float32, out=out)


def linear_cross_entropy_rows(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    label_smoothing: float,
    row_scale: torch.Tensor | None,
    grad_mask,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The CUDA backend's rows function (interface: fastft/ops/linear_cross_entropy.py).

    Args:
        hidden: ``(M, H)`` fp32 / fp16 / bf16 CUDA, the labelled rows only.
        weight: ``(V, H)`` same dtype and device.
        bias: optional ``(V,)`` fp32 / fp16 / bf16.
        labels: ``(M,)`` int64 / int32 in ``[0, V)``.
        label_smoothing: in ``[0, 1]``.
        row_scale: optional ``(M,)`` float; when given, the gradients are those of
            ``sum(row_scale * loss)``.
        grad_mask: three bools, which of [hidden, weight, bias] need a gradient.

    Returns:
        ``loss (M,)`` fp32 and fp32 ``grad_hidden (M, H)``, ``grad_weight (V, H)``,
        ``grad_bias (V,)``, each None unless row_scale is given and its mask entry is True
        (grad_bias also None without a bias).

    For each chunk of rows (at most LINEAR_CROSS_ENTROPY_CUDA_CHUNK_LOGITS logits):
    cuBLAS writes the fp32 logits ``h_c @ W.T`` (fp32 output even for 16-bit inputs), the
    softmax-grad kernel turns them into loss and ``dlogits = row_scale * (softmax -
    smoothed one-hot)`` (in place, and as a 16-bit copy for 16-bit inputs so the next
    GEMMs run on tensor cores), then ``grad_hidden_c = dlogits @ W``, ``grad_weight +=
    dlogits.T @ h_c`` (fp32 accumulator) and ``grad_bias += dlogits.sum(0)``. Everything
    runs on the caller's current stream of ``hidden``'s device.
    """
    check_cuda_tensor("hidden", hidden, dtype=_FLOAT_DTYPES, contiguous=False)
    device = hidden.device
    if hidden.dim() != 2:
        raise ValueError(f"hidden must have shape (M, H), got {tuple(hidden.shape)}")
    num_rows, hidden_size = hidden.shape
    check_cuda_tensor("weight", weight, dtype=hidden.dtype, contiguous=False, device=device)
    if weight.dim() != 2 or weight.shape[1] != hidden_size or weight.shape[0] < 1:
        raise ValueError(f"weight must have shape (V, {hidden_size}) with V >= 1, got {tuple(weight.shape)}")
    vocab = weight.shape[0]
    check_cuda_tensor("labels", labels, dtype=(torch.int64, torch.int32), contiguous=False, device=device)
    if labels.shape != (num_rows,):
        raise ValueError(f"labels must have shape ({num_rows},), got {tuple(labels.shape)}")
    if bias is not None:
        check_cuda_tensor("bias", bias, dtype=_FLOAT_DTYPES, contiguous=False, device=device)
        if bias.shape != (vocab,):
            raise ValueError(f"bias must have shape ({vocab},), got {tuple(bias.shape)}")
    if row_scale is not None:
        check_cuda_tensor("row_scale", row_scale, dtype=_FLOAT_DTYPES, contiguous=False, device=device)
        if row_scale.shape != (num_rows,):
            raise ValueError(f"row_scale must have shape ({num_rows},), got {tuple(row_scale.shape)}")
    if len(grad_mask) != 3:
        raise ValueError(f"grad_mask must have 3 entries [hidden, weight, bias], got {len(grad_mask)}")
    module()  # unavailable extension: raise before allocating anything

    want_grad = row_scale is not None
    need_hidden = want_grad and bool(grad_mask[0])
    need_weight = want_grad and bool(grad_mask[1])
    need_bias = want_grad and bias is not None and bool(grad_mask[2])
    # The kernel takes contiguous int64 labels / fp32 row scales / contiguous bias: O(M + V) copies at most.
    labels = labels.to(torch.int64).contiguous()
    bias = None if bias is None else bias.contiguous()
    row_scale = None if row_scale is None else row_scale.to(torch.float32).contiguous()

    f32 = dict(dtype=torch.float32, device=device)
    loss = torch.empty(num_rows, **f32)
    lse = torch.empty(num_rows, **f32)
    grad_hidden = torch.empty(num_rows, hidden_size, **f32) if need_hidden else None
    grad_weight = torch.zeros(vocab, hidden_size, **f32) if need_weight else None
    grad_bias = torch.zeros(vocab, **f32) if need_bias else None
    if num_rows == 0:
        return loss, grad_hidden, grad_weight, grad_bias

    with torch.cuda.device(device):
        sixteen_bit = hidden.dtype != torch.float32
        plan = _gemm_plan(device, hidden.dtype) if sixteen_bit else None
        # Without 16-bit GEMMs that write fp32, run the GEMMs in fp32 on upcast copies:
        # slower and an fp32 copy of the weight, but the logits keep fp32 precision.
        upcast = sixteen_bit and not plan.fp32_output
        gemm_weight = weight.float() if upcast else weight  # (V, H)
        # 16-bit inputs: the matmul gradients read a 16-bit copy of dlogits (tensor cores);
        # the fp32 dlogits are written in place only when something reads them.
        grad_16 = sixteen_bit and not upcast and (need_hidden or need_weight)
        write_in_place = need_bias or (not grad_16 and (need_hidden or need_weight))
        kernel_row_scale = row_scale if (write_in_place or grad_16) else None

        # Whole 128-row GEMM tiles: a chunk of 130 rows would pay for 256 on the tensor cores.
        chunk_rows = LINEAR_CROSS_ENTROPY_CUDA_CHUNK_LOGITS // vocab
        chunk_rows = max(1, min(num_rows, chunk_rows - chunk_rows % 128 if chunk_rows >= 128 else chunk_rows))
        logits_buffer = torch.empty(chunk_rows, vocab, **f32)  # reused by every chunk
        grad_16_buffer = torch.empty(chunk_rows, vocab, dtype=hidden.dtype, device=device) if grad_16 else None
        for start in range(0, num_rows, chunk_rows):
            end = min(start + chunk_rows, num_rows)
            h = hidden[start:end].float() if upcast else hidden[start:end]  # (c, H)
            logits = logits_buffer[: end - start]  # (c, V) fp32
            _mm_into_fp32(h, gemm_weight.T, out=logits)
            grad_logits_16 = None if grad_16_buffer is None else grad_16_buffer[: end - start]
            linear_cross_entropy_softmax_grad(
                logits, labels[start:end], bias=bias, label_smoothing=label_smoothing,
                row_scale=None if kernel_row_scale is None else kernel_row_scale[start:end],
                write_in_place=write_in_place, grad_logits_16=grad_logits_16,
                loss=loss[start:end], lse=lse[start:end],
            )
            if not want_grad:
                continue
            grad_logits = grad_logits_16 if grad_logits_16 is not None else logits  # (c, V)
            if need_hidden:
                _mm_into_fp32(grad_logits, gemm_weight, out=grad_hidden[start:end])  # (c, H)
            if need_weight:
                if grad_logits.dtype == torch.float32:
                    grad_weight.addmm_(grad_logits.T, h)  # (V, H) += (V, c) @ (c, H)
                else:
                    _accumulate_fp32(plan.accumulate, grad_weight, grad_logits.T, h)
            if need_bias:
                grad_bias += logits.sum(dim=0)  # fp32 dlogits, column sums
    return loss, grad_hidden, grad_weight, grad_bias


# ================================================================= end linear_cross_entropy


# =====================================================================================
# attention: CUDA backend (section owned by the attention CUDA engineer; FlashAttention-2
# kernels in csrc/attention/, bound in csrc/attention/bindings.h)
# =====================================================================================

import math  # noqa: E402 - this section's own imports, kept with the section
from typing import Optional  # noqa: E402

ATTENTION_CUDA_HEAD_DIMS = (32, 64, 128)  # template instances in csrc/attention/*.cu
_ATTENTION_CUDA_DTYPES = (torch.float16, torch.bfloat16)
_GRID_LIMIT = 65535  # heads and batch are grid dimensions y and z


def attention_reasons(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
) -> list[str]:
    """Why the CUDA attention kernels cannot run these inputs (empty list when they can).

    Covers what the kernels support (device, fp16/bf16, head_dim, no varlen, no dropout,
    compute capability >= 8.0 and a kernel image for it); the extension's availability is
    reported by ``fastft._dispatch.cuda_reasons``. Shape errors are the op's to raise.
    """
    reasons = []
    tensors = [q, k, v] + ([key_padding_mask] if key_padding_mask is not None else [])
    on_cuda = all(t.is_cuda for t in tensors)
    if not on_cuda:
        reasons.append("tensors are not on a CUDA device")
    if q.dtype not in _ATTENTION_CUDA_DTYPES:
        reasons.append(f"dtype {q.dtype} is not float16/bfloat16 (the kernels use 16-bit tensor cores)")
    elif k.dtype != q.dtype or v.dtype != q.dtype:
        reasons.append(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        reasons.append("q, k, v must be 4-D (batch, heads, seq, head_dim)")
    head_dim = q.shape[-1] if q.dim() else 0
    if head_dim not in ATTENTION_CUDA_HEAD_DIMS:
        reasons.append(f"head_dim {head_dim} is not one of {ATTENTION_CUDA_HEAD_DIMS}")
    elif k.shape[-1] != head_dim or v.shape[-1] != head_dim:
        reasons.append(f"k / v head_dim ({k.shape[-1]}, {v.shape[-1]}) differ from q's ({head_dim})")
    if cu_seqlens is not None:
        reasons.append("variable-length batches (cu_seqlens) are not supported by the CUDA kernels")
    if dropout_p > 0.0:
        reasons.append(f"attention dropout (dropout_p={dropout_p}) is not supported by the CUDA kernels")
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        reasons.append(f"key_padding_mask must be bool, got {key_padding_mask.dtype}")
    if on_cuda:
        capability = torch.cuda.get_device_capability(q.device)
        if capability < (8, 0):  # mma.sync m16n8k16 with bf16, ldmatrix, cp.async
            reasons.append(f"compute capability {capability[0]}.{capability[1]} < 8.0")
        else:
            reasons.extend(arch_reasons(q.device))
    return reasons


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
        check_cuda_tensor(name, t, dtype=_ATTENTION_CUDA_DTYPES, contiguous=False, device=q.device)
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, heads, seq, head_dim), got {tuple(t.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    if k.shape != (batch, heads_kv, seqlen_k, head_dim) or v.shape != k.shape:
        raise ValueError(f"k and v must have shape (batch={batch}, heads_kv, seq_k, head_dim={head_dim}), "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if head_dim not in ATTENTION_CUDA_HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} is not supported by the CUDA kernels {ATTENTION_CUDA_HEAD_DIMS}")
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


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    key_padding_mask: Optional[torch.Tensor],
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-2 forward on the current CUDA stream.

    Args:
        q: ``(B, Hq, Sq, D)`` fp16 / bf16, D in ``ATTENTION_CUDA_HEAD_DIMS``.
        k, v: ``(B, Hkv, Sk, D)``, same dtype; ``Hq % Hkv == 0`` (query head h reads k/v
            head ``h // (Hq // Hkv)``: grouped-query / multi-query attention).
        causal: query i attends keys ``j <= i`` (top-left aligned, like SDPA's is_causal).
        key_padding_mask: ``(B, Sk)`` bool, True = attend, or None.
        softmax_scale: multiplies ``q @ k^T`` before the softmax.

    Returns:
        ``out`` ``(B, Hq, Sq, D)`` (contiguous, dtype of q) and ``lse`` ``(B, Hq, Sq)`` fp32,
        the natural-log log-sum-exp of the scaled, masked scores. Rows with no allowed key
        get ``out = 0`` and ``lse = -inf``.

    Raises:
        ValueError / TypeError: inputs the kernels cannot take (device, dtype, shapes).
        RuntimeError: a failed launch (from the extension).
    """
    batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim = _check_attention_tensors(q, k, v, key_padding_mask)
    out = torch.empty((batch, heads_q, seqlen_q, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads_q, seqlen_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if seqlen_k == 0:  # no key at all: every row is fully masked
        return out.zero_(), lse.fill_(-math.inf)
    q, k, v = (_attention_layout(t) for t in (q, k, v))
    mask, mask_stride = _attention_mask_bytes(key_padding_mask)
    with torch.cuda.device(q.device):  # launch on q's device, on its current stream
        module().attention_forward(
            q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), out=out.data_ptr(), lse=lse.data_ptr(),
            key_padding_mask=0 if mask is None else mask.data_ptr(), mask_batch_stride=mask_stride,
            batch=batch, heads_q=heads_q, heads_kv=heads_kv, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
            head_dim=head_dim, q_strides=_strides3(q), k_strides=_strides3(k), v_strides=_strides3(v),
            out_strides=_strides3(out), causal=bool(causal), softmax_scale=float(softmax_scale),
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashAttention-2 backward on the current CUDA stream.

    Args:
        grad_out: ``(B, Hq, Sq, D)`` gradient of ``out``, dtype of q.
        q, k, v, causal, key_padding_mask, softmax_scale: as given to ``attention_forward``.
        out, lse: what ``attention_forward`` returned for them.

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
    grad_q = torch.empty((batch, heads_q, seqlen_q, head_dim), dtype=q.dtype, device=q.device)
    grad_k = torch.empty((batch, heads_kv, seqlen_k, head_dim), dtype=q.dtype, device=q.device)
    grad_v = torch.empty_like(grad_k)
    if grad_q.numel() == 0 or grad_k.numel() == 0:  # no query or no key: nothing flows
        return grad_q.zero_(), grad_k.zero_(), grad_v.zero_()
    grad_out, q, k, v, out = (_attention_layout(t) for t in (grad_out, q, k, v, out))
    mask, mask_stride = _attention_mask_bytes(key_padding_mask)
    delta = torch.empty((batch, heads_q, seqlen_q), dtype=torch.float32, device=q.device)  # rowsum(dO * O)
    grad_q_accum = torch.zeros((batch, heads_q, seqlen_q, head_dim), dtype=torch.float32, device=q.device)
    with torch.cuda.device(q.device):
        module().attention_backward(
            grad_out=grad_out.data_ptr(), q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), out=out.data_ptr(),
            lse=lse.data_ptr(), delta=delta.data_ptr(), grad_q_accum=grad_q_accum.data_ptr(),
            grad_q=grad_q.data_ptr(), grad_k=grad_k.data_ptr(), grad_v=grad_v.data_ptr(),
            key_padding_mask=0 if mask is None else mask.data_ptr(), mask_batch_stride=mask_stride,
            batch=batch, heads_q=heads_q, heads_kv=heads_kv, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
            head_dim=head_dim, grad_out_strides=_strides3(grad_out), q_strides=_strides3(q),
            k_strides=_strides3(k), v_strides=_strides3(v), out_strides=_strides3(out),
            grad_k_strides=_strides3(grad_k), grad_v_strides=_strides3(grad_v), causal=bool(causal),
            softmax_scale=float(softmax_scale), dtype=DTYPE_CODES[q.dtype], stream=stream_handle(q.device),
        )
    return grad_q, grad_k, grad_v


# ================================================================= end attention


# =====================================================================================
# lora_linear: CUDA backend (section owned by the lora_linear engineer; kernel in
# csrc/lora_linear/lora_linear.cu, contract in csrc/lora_linear/lora_linear.h)
# =====================================================================================

_LORA_CUDA_DTYPES = (torch.float16, torch.bfloat16)


def _lora_address(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def lora_linear_reasons(device: torch.device) -> list[str]:
    """Why this build cannot run lora_fused_linear on ``device`` (beyond cuda_reasons)."""
    if _module is None:
        return []  # cuda_reasons already says why the extension is missing
    if not hasattr(_module, "lora_fused_linear"):
        return ["the CUDA extension was built without lora_fused_linear (csrc/bindings.cpp does not bind it)"]
    return arch_reasons(device) if device.type == "cuda" else []


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
    from fastft.ops.lora_linear import dropout_params

    split_out = out.dim() == 3
    dtype = x.dtype if x is not None else out.dtype
    device = out.device
    if dtype not in _LORA_CUDA_DTYPES:
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
    module().lora_fused_linear(
        x=_lora_address(x), w=_lora_address(w_t), w_scale=_lora_address(weight_scale), bias=_lora_address(bias),
        lora_l=_lora_address(lora_l), lora_r=_lora_address(lora_r_t), out=out.data_ptr(),
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


class LoRALinearBackend:
    """The CUDA backend's four lora_linear primitives (contract in fastft/ops/lora_linear.py).

    The 16-bit GEMMs stay on cuBLAS through torch; the kernel above does what cuBLAS
    cannot: the int8 dequant-GEMM with its rank-r / bias epilogue, and the products with
    dropout(x) without materialising it.
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
        if weight.dtype != torch.int8:
            y = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T
            return y.addmm_(xa, lora_b.T, alpha=scale)
        y = x.new_empty(x.shape[0], weight.shape[0])  # (N, O)
        bias = None if bias is None else bias.contiguous()
        return lora_fused_linear(y, x, weight.T, weight_scale.float().contiguous(), True, bias, xa, lora_b.T, scale)

    @staticmethod
    def grad_input(grad, weight, weight_scale, grad_xa, lora_a, scale, dropout_p, seed):
        mask = "lora" if dropout_p > 0.0 else None
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


# ================================================================= end lora_linear
