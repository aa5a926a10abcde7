"""Fused linear + cross-entropy: the masked-LM / causal-LM loss without full logits.

``linear_cross_entropy(hidden, weight, labels)`` equals
``F.cross_entropy(F.linear(hidden, weight, bias), labels, ...)`` but never holds the
``(tokens, vocab)`` logits: only the rows whose label is not ``ignore_index`` are
gathered (masked-LM supervises ~15% of tokens, so ~85% of the work disappears), and
those are processed a chunk at a time. Logits, log-sum-exp and the weight gradient are
accumulated in fp32 whatever the input dtype.

Gradients are computed during the forward pass when autograd will need them and the
loss is reduced (``mean`` / ``sum``): the upstream gradient of a reduced loss is one
scalar, so the backward pass only scales what the forward pass already produced. That
saves recomputing the logits (one of four vocab-sized matmuls). With ``reduction="none"``
the upstream gradient differs per row, so backward recomputes.

Every backend implements one function over the gathered labelled rows,

    rows(hidden (M, H), weight (V, H), bias (V,) | None, labels (M,) in [0, V),
         label_smoothing, row_scale (M,) fp32 | None, grad_mask [hidden, weight, bias])
      -> loss (M,) fp32, grad_hidden (M, H) fp32 | None, grad_weight (V, H) fp32 | None,
         grad_bias (V,) fp32 | None

where the gradients are those of ``sum(row_scale * loss)`` and are only computed when
``row_scale`` is given. Everything else (validation, gathering, scattering, reductions,
autograd, torch.compile registration) is shared and lives in this file.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastft._dispatch import choose_backend
from fastft.kernels._common import triton_reasons
from fastft.ops import linear_cross_entropy_cuda

__all__ = ["linear_cross_entropy", "linear_cross_entropy_ref", "backend_reasons"]

REDUCTIONS = ("mean", "sum", "none")
# Measured fastest first (benchmarks/NOTES.md); CPU inputs fall through to torch.
PRIORITY = ("cuda", "triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The torch backend processes at most this many logits (fp32) at once: 4M * 4 B = 16 MiB,
# bounded by a constant, never by tokens x vocab. Still hundreds of rows per GEMM at BERT's
# vocabulary (137 rows x 30522), enough to keep a CPU's matmul efficient.
CHUNK_LOGITS = 1 << 22


# --------------------------------------------------------------------------- reference


def linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    upcast: bool = True,
) -> torch.Tensor:
    """Plain PyTorch, full logits: the oracle for tests and the naive benchmark baseline.

    With ``upcast=True`` (default) everything is computed in fp32; ``upcast=False`` runs in
    the input dtype, which is what an unfused model does and what the tolerance rule
    compares against.
    """
    if upcast:
        hidden, weight = hidden.float(), weight.float()
        bias = None if bias is None else bias.float()
    logits = F.linear(hidden, weight, bias)  # (..., V): what fastft never materialises
    loss = F.cross_entropy(
        logits.reshape(-1, weight.shape[0]),
        labels.reshape(-1).long(),  # F.cross_entropy takes int64 only
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    return loss.reshape(labels.shape) if reduction == "none" else loss


# --------------------------------------------------------------------------- backends


def _rows_torch(hidden, weight, bias, labels, label_smoothing, row_scale, grad_mask):
    """Chunked pure-PyTorch rows function: the CPU path.

    Each chunk of rows computes its (chunk, V) logits in fp32, the log-sum-exp and loss,
    and, when ``row_scale`` is given, turns the logits in place into the gradient of the
    loss with respect to them (softmax - smoothed one-hot) before two matmuls give the
    hidden and weight gradients. Peak extra memory: one chunk of logits, plus an fp32
    weight-gradient accumulator when the weight is 16-bit.
    """
    num_rows, _ = hidden.shape
    vocab = weight.shape[0]
    weight32 = weight.float()
    bias32 = None if bias is None else bias.float()
    want_grad = row_scale is not None
    loss = torch.empty(num_rows, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if want_grad and grad_mask[0] else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=hidden.device) if want_grad and grad_mask[1] else None
    grad_bias = (torch.zeros(vocab, dtype=torch.float32, device=hidden.device)
                 if want_grad and bias is not None and grad_mask[2] else None)
    chunk = max(1, CHUNK_LOGITS // vocab)
    for start in range(0, num_rows, chunk):
        end = min(start + chunk, num_rows)
        h = hidden[start:end].float()  # (c, H)
        y = labels[start:end]
        logits = h @ weight32.T  # (c, V) fp32
        if bias32 is not None:
            logits += bias32
        lse = torch.logsumexp(logits, dim=-1)  # (c,)
        target = logits.gather(1, y[:, None]).squeeze(1)
        # Smoothed cross-entropy: (1-e) * (lse - z_y) + e * (lse - mean_j z_j).
        row_loss = lse - (1.0 - label_smoothing) * target
        if label_smoothing:
            row_loss -= label_smoothing * logits.mean(dim=-1)
        loss[start:end] = row_loss
        if not want_grad:
            continue
        # d loss / d logits = softmax - (1-e) * onehot(y) - e / V, reusing the logits buffer.
        grad_logits = logits.sub_(lse[:, None]).exp_()
        if label_smoothing:
            grad_logits -= label_smoothing / vocab
        grad_logits[torch.arange(end - start, device=h.device), y] -= 1.0 - label_smoothing
        grad_logits *= row_scale[start:end, None]
        if grad_hidden is not None:
            torch.mm(grad_logits, weight32, out=grad_hidden[start:end])
        if grad_weight is not None:
            grad_weight.addmm_(grad_logits.T, h)
        if grad_bias is not None:
            grad_bias += grad_logits.sum(dim=0)
    return loss, grad_hidden, grad_weight, grad_bias


def _rows_triton(*args):
    from fastft.kernels.linear_cross_entropy import linear_cross_entropy_rows

    return linear_cross_entropy_rows(*args)


ROWS = {"torch": _rows_torch, "triton": _rows_triton, "cuda": linear_cross_entropy_cuda.linear_cross_entropy_rows}


def backend_reasons(hidden: torch.Tensor, weight: torch.Tensor) -> dict:
    """For each backend, a function returning why it cannot run these inputs."""

    def triton():
        found = triton_reasons((hidden, weight))
        if hidden.dtype not in FLOAT_DTYPES:
            found.append(f"dtype {hidden.dtype} is not fp32/fp16/bf16")
        return found

    return {
        "torch": lambda: [],
        "triton": triton,
        "cuda": lambda: linear_cross_entropy_cuda.reasons(hidden, weight),
    }


# --------------------------------------------------------------------------- the op


def _check_labels(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(
            f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; found {value}"
        )


def _forward(hidden, weight, bias, labels, ignore_index, reduction, label_smoothing, backend, grad_mask):
    """Shared body of the forward op: gather labelled rows, run the backend, reduce."""
    num_rows = hidden.shape[0]
    _check_labels(labels, weight.shape[0], ignore_index)
    selected = (labels != ignore_index).nonzero().squeeze(1)  # rows that cost anything
    count = selected.numel()
    want_grad = any(grad_mask) and reduction != "none"
    row_scale = None
    if want_grad:  # gradient of the reduced loss w.r.t. each row's loss
        scale = 1.0 / count if (reduction == "mean" and count) else 1.0
        row_scale = torch.full((count,), scale, dtype=torch.float32, device=hidden.device)
    if count:
        loss_rows, grad_h_rows, grad_weight, grad_bias = ROWS[backend](
            hidden.index_select(0, selected), weight, bias, labels.index_select(0, selected),
            label_smoothing, row_scale, grad_mask,
        )
    else:  # nothing supervised: no kernel launch, zero gradients below
        loss_rows, grad_h_rows, grad_weight, grad_bias = hidden.new_zeros(0, dtype=torch.float32), None, None, None
    if reduction == "none":
        loss = loss_rows.new_zeros(num_rows).index_copy_(0, selected, loss_rows)
    else:
        loss = loss_rows.sum()
        if reduction == "mean":
            loss = loss / count if count else loss.new_tensor(float("nan"))  # as F.cross_entropy
    # Fill in every gradient the caller asked for (zeros when no row was labelled); an
    # empty tensor marks the ones not computed. custom_op outputs may not alias each other.
    f32 = dict(dtype=torch.float32, device=hidden.device)
    grad_hidden = hidden.new_empty(0, **f32)
    if want_grad and grad_mask[0]:
        grad_hidden = hidden.new_zeros(hidden.shape, **f32)
        if grad_h_rows is not None:
            grad_hidden.index_copy_(0, selected, grad_h_rows)
    if grad_weight is None:
        grad_weight = hidden.new_zeros(weight.shape, **f32) if want_grad and grad_mask[1] else hidden.new_empty(0, **f32)
    if grad_bias is None:
        has_bias_grad = want_grad and grad_mask[2] and bias is not None
        grad_bias = hidden.new_zeros(weight.shape[:1], **f32) if has_bias_grad else hidden.new_empty(0, **f32)
    return loss, grad_hidden, grad_weight, grad_bias


@torch.library.custom_op("fastft::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    backend: str,
    grad_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, grad_hidden, grad_weight, grad_bias); the gradients (fp32, of the
    reduced loss) are empty unless precomputed for a reduced loss with grad_mask set."""
    return _forward(hidden, weight, bias, labels, ignore_index, reduction, label_smoothing, backend, grad_mask)


@_linear_cross_entropy_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, reduction, label_smoothing, backend, grad_mask):
    want_grad = any(grad_mask) and reduction != "none"
    f32 = dict(dtype=torch.float32, device=hidden.device)
    loss = hidden.new_empty(hidden.shape[:1] if reduction == "none" else (), **f32)
    grad_hidden = hidden.new_empty(hidden.shape if want_grad and grad_mask[0] else (0,), **f32)
    grad_weight = hidden.new_empty(weight.shape if want_grad and grad_mask[1] else (0,), **f32)
    has_bias_grad = want_grad and grad_mask[2] and bias is not None
    grad_bias = hidden.new_empty(weight.shape[:1] if has_bias_grad else (0,), **f32)
    return loss, grad_hidden, grad_weight, grad_bias


@torch.library.custom_op("fastft::linear_cross_entropy_backward", mutates_args=())
def _linear_cross_entropy_backward_op(
    grad_loss: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    backend: str,
    grad_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recomputing backward for ``reduction="none"``: per-row upstream gradients."""
    selected = (labels != ignore_index).nonzero().squeeze(1)
    row_scale = grad_loss.index_select(0, selected).float()
    grad_h_rows = grad_weight = grad_bias = None
    if selected.numel():
        _, grad_h_rows, grad_weight, grad_bias = ROWS[backend](
            hidden.index_select(0, selected), weight, bias, labels.index_select(0, selected),
            label_smoothing, row_scale, grad_mask,
        )
    grad_hidden = hidden.new_zeros(hidden.shape, dtype=torch.float32)
    if grad_h_rows is not None:
        grad_hidden.index_copy_(0, selected, grad_h_rows)
    if grad_weight is None:
        grad_weight = weight.new_zeros(weight.shape, dtype=torch.float32)
    if grad_bias is None:
        grad_bias = weight.new_zeros(weight.shape[0], dtype=torch.float32)
    return grad_hidden, grad_weight, grad_bias


@_linear_cross_entropy_backward_op.register_fake
def _(grad_loss, hidden, weight, bias, labels, ignore_index, label_smoothing, backend, grad_mask):
    f32 = dict(dtype=torch.float32)
    return (hidden.new_empty(hidden.shape, **f32), weight.new_empty(weight.shape, **f32),
            weight.new_empty(weight.shape[:1], **f32))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, reduction, label_smoothing, backend, grad_mask = inputs
    _, grad_hidden, grad_weight, grad_bias = output
    ctx.precomputed = reduction != "none"
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.has_bias = bias is not None
    ctx.args = (ignore_index, label_smoothing, backend, grad_mask)
    if ctx.precomputed:
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
    else:
        ctx.save_for_backward(hidden, weight, bias, labels)
    ctx.mark_non_differentiable(grad_hidden, grad_weight, grad_bias)


def _backward(ctx, grad_loss, _grad_hidden, _grad_weight, _grad_bias):
    hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
    grad_mask = ctx.args[3]
    if ctx.precomputed:  # d(reduced loss) is one scalar: scale what forward computed
        grad_hidden, grad_weight, grad_bias = (g * grad_loss for g in ctx.saved_tensors)
    else:
        hidden, weight, bias, labels = ctx.saved_tensors
        ignore_index, label_smoothing, backend, grad_mask = ctx.args
        grad_hidden, grad_weight, grad_bias = _linear_cross_entropy_backward_op(
            grad_loss, hidden, weight, bias, labels, ignore_index, label_smoothing, backend, grad_mask)
    return (
        grad_hidden.to(hidden_dtype) if grad_mask[0] else None,
        grad_weight.to(weight_dtype) if grad_mask[1] else None,
        grad_bias.to(bias_dtype) if ctx.has_bias and grad_mask[2] else None,
        None, None, None, None, None, None,
    )


_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def _validate(hidden, weight, labels, bias, reduction, label_smoothing):
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating-point tensor, got {hidden.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape (..., H), got a scalar")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape (V, H) = (V, {hidden.shape[-1]}), got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (vocab size V >= 1)")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} does not match hidden dtype {hidden.dtype}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels must have shape {tuple(hidden.shape[:-1])} (hidden without its last dim), got {tuple(labels.shape)}")
    devices = {("hidden", hidden.device), ("weight", weight.device), ("labels", labels.device)}
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} does not match hidden dtype {hidden.dtype}")
        devices.add(("bias", bias.device))
    if len({d for _, d in devices}) > 1:
        raise ValueError("inputs are on different devices: " + ", ".join(f"{n}={d}" for n, d in sorted(devices, key=str)))
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``labels``, without the logits.

    Args:
        hidden: ``(..., H)`` fp32 / fp16 / bf16 final hidden states (e.g. ``(batch, seq, H)``).
        weight: ``(V, H)`` output embedding / LM head, same dtype and device as ``hidden``.
        labels: ``hidden.shape[:-1]`` int64 / int32 targets in ``[0, V)`` or ``ignore_index``.
            For causal-LM pass labels already shifted (``labels[t] = tokens[t + 1]``).
        bias: optional ``(V,)`` output bias.
        ignore_index: label value of rows that are not supervised; they cost no compute.
        reduction: ``"mean"`` (over supervised rows), ``"sum"`` or ``"none"``
            (``labels.shape``, 0 at ignored rows).
        label_smoothing: in ``[0, 1]``, as in ``F.cross_entropy``.
        backend: ``"auto" | "cuda" | "triton" | "torch"`` (``FASTFT_BACKEND`` overrides auto).

    Returns:
        The loss in float32 (it is accumulated in fp32; casting it down would only discard
        digits). With ``reduction="mean"`` and every row ignored the result is NaN and the
        gradients are zero, exactly as ``F.cross_entropy``.

    Raises:
        TypeError: non-tensor inputs, non-float hidden, mismatched dtypes, non-integer labels.
        ValueError: mismatched shapes or devices, labels outside ``[0, V)`` other than
            ``ignore_index``, a bad reduction / label_smoothing, or a backend that cannot run
            these inputs (the message lists its reasons).
    """
    _validate(hidden, weight, labels, bias, reduction, label_smoothing)
    chosen = choose_backend("linear_cross_entropy", backend, backend_reasons(hidden, weight), PRIORITY, hidden.device)
    tracking = torch.is_grad_enabled()
    grad_mask = [tracking and hidden.requires_grad, tracking and weight.requires_grad,
                 tracking and bias is not None and bias.requires_grad]
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    labels1d = labels.reshape(-1)
    loss = _linear_cross_entropy_op(hidden2d, weight, bias, labels1d, int(ignore_index), reduction,
                                    float(label_smoothing), chosen, grad_mask)[0]
    return loss.reshape(labels.shape) if reduction == "none" else loss
