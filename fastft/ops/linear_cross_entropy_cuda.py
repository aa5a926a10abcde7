"""CUDA backend of ``fastft.ops.linear_cross_entropy``: cuBLAS GEMMs around a softmax-grad kernel.

The kernel lives in csrc/linear_cross_entropy/ (launcher linear_cross_entropy.cu, device
code softmax_grad_kernel.cuh). Every tensor check happens here, before a pointer crosses
into C++; ``reasons`` says which inputs this backend cannot take.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from fastft import _extension
from fastft._extension import DTYPE_CODES, check_cuda_tensor, pointer, stream_handle

# Rows per chunk: CHUNK_LOGITS // V, but never fewer than MIN_CHUNK_ROWS. Each chunk
# read-modify-writes the whole fp32 (V, H) weight gradient (8·V·H bytes) in its dW GEMM,
# which does 2·c·V·H FLOPs: on an H200 (~790 TFLOP/s, ~4.3 TB/s) that GEMM stays
# compute-bound only for c >= 8 · 790 / (2 · 4.3) ≈ 735 rows. At V = 128256 a 2^24-logit
# chunk is 130 rows, so dW traffic would be ~8x its GEMM time (benchmarks/NOTES.md).
# Memory: max(64 MiB, 1024 · V · 4 B) of fp32 logits (525 MB at V = 128256) plus half that
# as a 16-bit copy, whatever the number of tokens.
CHUNK_LOGITS = 1 << 24
MIN_CHUNK_ROWS = 1024
# fp16 copies of dlogits are taken at GRAD_GAIN times their value (then divided out of the
# fp32 GEMM results, exactly: a power of two). |dlogits| <= 1 before it, so 2^14 keeps the
# largest below fp16's 65504 while lifting probabilities of ~1e-8 out of the subnormals.
GRAD_GAIN = {torch.float16: 2.0**14, torch.bfloat16: 1.0, torch.float32: 1.0}

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def reasons(hidden: torch.Tensor, weight: torch.Tensor, options=()) -> list[str]:
    """Why the CUDA backend cannot run linear_cross_entropy on these inputs (empty list
    when it can): the extension (built with the softmax-grad kernel, on a CUDA device the
    build fits), a floating-point dtype it takes, and none of the loss ``options`` (names
    such as "softcap") the kernel does not implement yet."""
    found = _extension.reasons((hidden, weight), "linear_cross_entropy_softmax_grad")
    if hidden.dtype not in _FLOAT_DTYPES:
        found.append(f"dtype {hidden.dtype} is not fp32/fp16/bf16")
    if options:
        found.append(f"no softcap / z-loss / class weights / accuracy yet (this call uses {', '.join(options)})")
    return found


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
    extension = _extension.module()
    with torch.cuda.device(device):
        extension.linear_cross_entropy_softmax_grad(
            logits=pointer(logits), rows=rows, vocab=vocab,
            bias=pointer(bias), bias_dtype=DTYPE_CODES[bias.dtype] if bias is not None else 0,
            labels=pointer(labels),
            label_smoothing=float(label_smoothing),
            row_scale=pointer(row_scale),
            write_in_place=bool(write_in_place),
            grad_logits_16=pointer(grad_logits_16),
            grad_logits_16_dtype=DTYPE_CODES[grad_logits_16.dtype] if grad_logits_16 is not None else 0,
            loss=pointer(outputs["loss"]), lse=pointer(outputs["lse"]),
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


def _accumulate_fp32(form: str, acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
    """acc (fp32) += alpha · a @ b for 16-bit a, b, in the given form (see _GemmPlan)."""
    if form == "addmm":
        torch.addmm(acc, a, b, out_dtype=torch.float32, alpha=alpha, out=acc)
    elif form == "baddbmm":
        acc3 = acc.unsqueeze(0)  # (1, m, n) view of acc: out= writes through it
        torch.baddbmm(acc3, a.unsqueeze(0), b.unsqueeze(0), out_dtype=torch.float32, alpha=alpha, out=acc3)
    else:
        acc.add_(torch.mm(a, b, out_dtype=torch.float32), alpha=alpha)


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


def chunk_plan(num_rows: int, vocab: int) -> list[tuple[int, int]]:
    """(start, end) row ranges of the chunks: CHUNK_LOGITS // vocab rows, at least
    MIN_CHUNK_ROWS, in whole 128-row GEMM tiles (a chunk of 130 rows would pay for 256 on
    the tensor cores), at most ``num_rows``."""
    rows = max(MIN_CHUNK_ROWS, CHUNK_LOGITS // vocab)
    rows = max(1, min(num_rows, rows - rows % 128 if rows >= 128 else rows))
    return [(start, min(start + rows, num_rows)) for start in range(0, num_rows, rows)]


def chunk_scales(row_scale: torch.Tensor, chunks, gain: float = 1.0) -> tuple[torch.Tensor, list[float]]:
    """Split ``row_scale`` per chunk into ``ratios`` (what the kernel multiplies dlogits by
    before rounding them to 16 bits: ``gain · row_scale / s``, at most ``gain`` in
    magnitude) and ``s`` (the chunk's largest ``|row_scale|`` over ``gain``, applied to the
    fp32 GEMM results), so that ``ratio · s == row_scale``. A mean over N rows has
    ``row_scale = 1/N`` everywhere: the ratio is then ``gain`` exactly and nothing of
    ``softmax / N`` is lost to 16-bit rounding. One host read for all chunks' maxima."""
    maxima = torch.stack([row_scale[start:end].abs().max() for start, end in chunks])
    maxima = torch.where(maxima > 0, maxima, torch.ones_like(maxima))
    chunk_of_row = torch.repeat_interleave(
        torch.arange(len(chunks), device=row_scale.device),
        torch.tensor([end - start for start, end in chunks], device=row_scale.device))
    ratios = (row_scale * (gain / maxima[chunk_of_row])).contiguous()
    return ratios, [m / gain for m in maxima.tolist()]


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

    For each chunk of rows (``chunk_plan``: at least MIN_CHUNK_ROWS rows, so the dW GEMM
    stays compute-bound): cuBLAS writes the fp32 logits ``h_c @ W.T`` (fp32 output even
    for 16-bit inputs), the softmax-grad kernel turns them into loss and ``dlogits =
    ratio * (softmax - smoothed one-hot)`` (in place, and as a 16-bit copy for 16-bit
    inputs so the next GEMMs run on tensor cores), then ``grad_hidden_c = s · dlogits @
    W``, ``grad_weight += s · dlogits.T @ h_c`` (fp32 accumulator) and ``grad_bias += s ·
    dlogits.sum(0)``. The row scale is split as in the Triton backend (``chunk_scales``):
    ``ratio = row_scale / s`` with ``s`` the chunk's largest ``|row_scale|`` (times
    GRAD_GAIN for fp16), so a mean over N rows does not round ``softmax / N`` to 16 bits
    (at N = 2458, V = 30522 that flushed 92-98% of fp16 gradients to zero). Everything
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
    _extension.module()  # unavailable extension: raise before allocating anything

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
        kernel_wants_scale = write_in_place or grad_16
        chunks = chunk_plan(num_rows, vocab)
        ratios, scales = (chunk_scales(row_scale, chunks, GRAD_GAIN[hidden.dtype]) if want_grad
                          else (None, [1.0] * len(chunks)))
        chunk_rows = chunks[0][1] - chunks[0][0]
        logits_buffer = torch.empty(chunk_rows, vocab, **f32)  # reused by every chunk
        grad_16_buffer = torch.empty(chunk_rows, vocab, dtype=hidden.dtype, device=device) if grad_16 else None
        for (start, end), scale in zip(chunks, scales):
            h = hidden[start:end].float() if upcast else hidden[start:end]  # (c, H)
            logits = logits_buffer[: end - start]  # (c, V) fp32
            _mm_into_fp32(h, gemm_weight.T, out=logits)
            grad_logits_16 = None if grad_16_buffer is None else grad_16_buffer[: end - start]
            linear_cross_entropy_softmax_grad(
                logits, labels[start:end], bias=bias, label_smoothing=label_smoothing,
                row_scale=ratios[start:end] if kernel_wants_scale else None,
                write_in_place=write_in_place, grad_logits_16=grad_logits_16,
                loss=loss[start:end], lse=lse[start:end],
            )
            if not want_grad:
                continue
            # dlogits is ratio * (softmax - one-hot); every product below is scaled by s.
            grad_logits = grad_logits_16 if grad_logits_16 is not None else logits  # (c, V)
            if need_hidden:
                _mm_into_fp32(grad_logits, gemm_weight, out=grad_hidden[start:end])  # (c, H)
                if scale != 1.0:
                    grad_hidden[start:end].mul_(scale)
            if need_weight:
                if grad_logits.dtype == torch.float32:
                    grad_weight.addmm_(grad_logits.T, h, alpha=scale)  # (V, H) += s (V, c) @ (c, H)
                else:
                    _accumulate_fp32(plan.accumulate, grad_weight, grad_logits.T, h, alpha=scale)
            if need_bias:
                grad_bias.add_(logits.sum(dim=0), alpha=scale)  # fp32 dlogits, column sums
    return loss, grad_hidden, grad_weight, grad_bias
