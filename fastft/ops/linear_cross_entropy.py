"""Fused linear + cross-entropy: the masked-LM / causal-LM loss without full logits.

``linear_cross_entropy(hidden, weight, labels)`` equals
``F.cross_entropy(F.linear(hidden, weight, bias), labels, ...)`` but never holds the
``(tokens, vocab)`` logits: only the rows whose label is not ``ignore_index`` are
gathered (masked-LM supervises ~15% of tokens, so ~85% of the work disappears), and
those are processed a chunk at a time. Logits, log-sum-exp and the weight gradient are
accumulated in fp32 whatever the input dtype, also under ``torch.autocast`` (see the
function's docstring: the matmuls take the autocast dtype where that is fast).

Gradients are computed during the forward pass when autograd will need them and the
loss is reduced (``mean`` / ``sum``): the upstream gradient of a reduced loss is one
scalar, so the backward pass only scales what the forward pass already produced. That
saves recomputing the logits (one of four vocab-sized matmuls). With ``reduction="none"``
the upstream gradient differs per row, so backward recomputes. When the backward pass is
the graph's last (no ``retain_graph``), the precomputed gradients are scaled in place and
handed on as they are: the op's peak memory holds one weight gradient, not two.

Every backend implements one function over the gathered labelled rows,

    rows(hidden (M, H), weight (V, H), bias (V,) | None, labels (M,) in [0, V),
         label_smoothing, row_scale (M,) fp32 | None, grad_mask [hidden, weight, bias])
      -> loss (M,) fp32, grad_hidden (M, H) fp32 | None, grad_weight (V, H) fp32 | None,
         grad_bias (V,) fp32 | None

where the gradients are those of ``sum(row_scale * loss)`` and are only computed when
``row_scale`` is given. Everything else (validation, gathering, scattering, reductions,
autograd, torch.compile registration) is shared and lives in this file.

The torch and Triton rows functions take one more, optional argument, ``extras``
(``RowsExtras``: class weights, final-logit softcap, z-loss row scale, whether to return
each row's argmax); with it they return two more values, ``lse (M,) fp32`` and ``argmax
(M,) int64 | None``, and the loss and gradients follow the formulas in ``RowsExtras``'s
docstring. The CUDA backend does not take ``extras`` (it refuses calls that need them).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from fastft._dispatch import choose_backend
from fastft._precision import autocast_dtype, autocast_off, cpu_matmul_precision, loss_matmul_precision
from fastft.kernels._common import triton_reasons
from fastft.ops import linear_cross_entropy_cuda

__all__ = ["linear_cross_entropy", "linear_cross_entropy_ref", "backend_reasons", "LossOutput"]

REDUCTIONS = ("mean", "sum", "none")
# Measured fastest first (benchmarks/NOTES.md); CPU inputs fall through to torch.
PRIORITY = ("cuda", "triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The torch backend processes at most this many logits (fp32) at once: 6M * 4 B = 24 MiB,
# bounded by a constant, never by tokens x vocab: 206 rows at BERT's vocabulary of 30522.
# Picked by measurement (benchmarks/NOTES.md, "CPU: chunk size"): on a 32 MiB-L3 AMD EPYC,
# chunks of 192-256 rows at V = 30522 (23-31 MiB) ran causal-LM 1.2x faster than naive on
# one core, 274 rows (33 MiB) and more fell back to naive's speed: a chunk that stays in
# the last-level cache between its passes (written by a GEMM, max, exp, sum, scale, read by
# two GEMMs).
CHUNK_LOGITS = 6 << 20


class LossOutput(NamedTuple):
    """What ``linear_cross_entropy`` returns when ``return_z_loss`` or ``return_accuracy`` is
    set (otherwise it returns the loss tensor alone). Fields not asked for are None.

    loss: the loss, z-loss term included (as Liger-Kernel's ``return_z_loss``).
    z_loss: ``lse_square_scale * lse**2`` of the labelled rows alone, reduced as the loss
        (fp32; for logging: no gradient flows through it, the loss carries it).
    accuracy: token accuracy of the labelled rows, ``argmax(logits) == label`` with the
        (softcapped) logits: an fp32 fraction for ``mean`` / ``sum`` (NaN when no row is
        labelled), a per-row bool tensor of ``labels.shape`` for ``none`` (False where
        ignored). No gradient.
    """

    loss: torch.Tensor
    z_loss: Optional[torch.Tensor] = None
    accuracy: Optional[torch.Tensor] = None


class RowsExtras(NamedTuple):
    """The options beyond plain (smoothed) cross-entropy, for a rows function.

    With class weights ``w`` (``S = sum_j w_j``; all ones without), ``z = softcap *
    tanh(u / softcap)`` of the raw logits ``u`` (``z = u`` without), ``lse = logsumexp(z)``
    and ``eps`` the label smoothing, each row's loss is F.cross_entropy's

        loss = (1-eps) w_y (lse - z_y) + (eps/V) (S lse - sum_j w_j z_j)

    and the gradients are those of ``sum(row_scale * loss + z_row_scale * lse**2)``:
    ``d/dz_j = p_j (row_scale ((1-eps) w_y + eps S / V) + 2 z_row_scale lse)
    - row_scale (1-eps) w_y [j == y] - row_scale (eps/V) w_j``, times ``1 - (z_j/softcap)**2``
    through the softcap.
    """

    class_weights: Optional[torch.Tensor] = None  # (V,) fp32
    softcap: float = 0.0  # 0: none
    z_row_scale: Optional[torch.Tensor] = None  # (M,) fp32, gradient of sum(z_row_scale * lse**2)
    want_argmax: bool = False


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
    class_weights: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    lse_square_scale: float = 0.0,
    return_z_loss: bool = False,
    return_accuracy: bool = False,
    upcast: bool = True,
):
    """Plain PyTorch, full logits: the oracle for tests and the naive benchmark baseline.

    With ``upcast=True`` (default) everything is computed in fp32; ``upcast=False`` runs in
    the input dtype, which is what an unfused model does and what the tolerance rule
    compares against. Same options and return convention as ``linear_cross_entropy``.
    """
    if upcast:
        hidden, weight = hidden.float(), weight.float()
        bias = None if bias is None else bias.float()
    logits = F.linear(hidden, weight, bias)  # (..., V): what fastft never materialises
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits.reshape(-1, weight.shape[0])
    targets = labels.reshape(-1).long()  # F.cross_entropy takes int64 only
    loss = F.cross_entropy(
        logits,
        targets,
        weight=None if class_weights is None else class_weights.to(logits.dtype),
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    z_loss = accuracy = None
    if lse_square_scale or return_z_loss or return_accuracy:
        labelled = targets != ignore_index
        count = labelled.sum()
        z_rows = torch.where(labelled, lse_square_scale * torch.logsumexp(logits, dim=1) ** 2, 0.0)
        correct = (logits.argmax(dim=1) == targets) & labelled
        if reduction == "none":
            z_loss, accuracy = z_rows, correct
        else:
            z_loss = z_rows.sum() / count if reduction == "mean" else z_rows.sum()
            accuracy = correct.sum().float() / count
        loss = loss + z_loss
    if reduction == "none":
        loss = loss.reshape(labels.shape)
        z_loss = None if z_loss is None else z_loss.reshape(labels.shape)
        accuracy = None if accuracy is None else accuracy.reshape(labels.shape)
    if return_z_loss or return_accuracy:
        return LossOutput(loss, z_loss if return_z_loss else None, accuracy if return_accuracy else None)
    return loss


# --------------------------------------------------------------------------- backends


def _rows_torch(hidden, weight, bias, labels, label_smoothing, row_scale, grad_mask, matmul_precision="ieee",
                extras=None):
    """Chunked pure-PyTorch rows function: the CPU path.

    Each chunk of ``c`` rows computes its logits transposed, ``(V, c)`` = ``W @ hᵀ``, in
    fp32 (the vocabulary on the outer axis: MKL ran ``h @ Wᵀ`` at ~34 GFLOP/s and ``W @ hᵀ``
    at ~50-60 on one core of an AMD EPYC, while the two gradient GEMMs run as fast in
    either layout; benchmarks/NOTES.md). Then, in place, ``exp(z - max)``, whose column
    sums give the log-sum-exp (``max + log(sum)``: the max-shifted form, no overflow) and
    the loss; when ``row_scale`` is given the same buffer becomes, in one more pass, the
    gradient of the loss with respect to the logits (``row_scale * (softmax - smoothed
    one-hot)``) before two matmuls give the hidden and weight gradients. The weight
    gradient accumulates in fp32 across chunks (the first chunk writes it, so it is never
    zero-filled).

    ``matmul_precision`` ``"bf16"`` (``fastft._precision.loss_matmul_precision``: bf16 on
    a CPU with native bf16) multiplies with bf16 operands and fp32 accumulation and
    results; ``"ieee"``: fp32 throughout. Inputs of any float dtype are read as fp32 (a
    16-bit weight is upcast once; fp32 master weights are read in place).

    Peak extra memory: one chunk of logits (``CHUNK_LOGITS`` fp32), plus an fp32 copy of a
    16-bit weight. With ``extras`` (``RowsExtras``) the same pass applies the softcap in
    place (keeping ``1 - tanh**2`` for the gradient in a second buffer: the chunk is halved
    then), weights the loss and gradient by the class weights, adds the z-loss gradient,
    takes each row's argmax, and the function also returns ``lse`` and ``argmax``.
    """
    num_rows, _ = hidden.shape
    vocab = weight.shape[0]
    weight32 = weight.float()
    bias32 = None if bias is None else bias.float()
    want_grad = row_scale is not None
    f32 = dict(dtype=torch.float32, device=hidden.device)
    loss = torch.empty(num_rows, **f32)
    grad_hidden = torch.empty(hidden.shape, **f32) if want_grad and grad_mask[0] else None
    grad_weight = torch.empty(weight.shape, **f32) if want_grad and grad_mask[1] else None
    grad_bias = torch.zeros(vocab, **f32) if want_grad and bias is not None and grad_mask[2] else None
    class_weights = softcap = z_row_scale = lse = argmax = target_weight = None
    if extras is not None:
        class_weights = None if extras.class_weights is None else extras.class_weights.float()
        softcap = extras.softcap or None
        z_row_scale = extras.z_row_scale
        lse = torch.empty(num_rows, **f32)
        argmax = torch.empty(num_rows, dtype=torch.int64, device=hidden.device) if extras.want_argmax else None
        if class_weights is not None:
            target_weight = class_weights[labels]  # (M,) w_y
            weight_total = float(class_weights.sum())  # S
    keep_derivative = softcap is not None and want_grad
    chunk = max(1, min(CHUNK_LOGITS // vocab // (2 if keep_derivative else 1), num_rows))
    buffer = torch.empty(vocab * chunk, **f32)  # one chunk's logits, reused: never two alive at once
    derivative_buffer = torch.empty(vocab * chunk, **f32) if keep_derivative else None
    with cpu_matmul_precision(matmul_precision):
        for start in range(0, num_rows, chunk):
            end = min(start + chunk, num_rows)
            h = hidden[start:end].float()  # (c, H)
            y = labels[start:end]
            columns = torch.arange(end - start, device=h.device)
            logits_t = torch.mm(weight32, h.T, out=buffer[: vocab * (end - start)].view(vocab, end - start))  # (V, c)
            if bias32 is not None:
                logits_t += bias32[:, None]
            if softcap is not None:  # z = c * tanh(u / c), in place; dz/du = 1 - tanh**2
                tanh = logits_t.div_(softcap).tanh_()
                if keep_derivative:
                    derivative = torch.mul(tanh, tanh, out=derivative_buffer[: tanh.numel()].view(tanh.shape))
                    derivative.neg_().add_(1.0)
                logits_t = tanh.mul_(softcap)
            if argmax is not None:
                argmax[start:end] = logits_t.argmax(dim=0)
            target = logits_t[y, columns]  # (c,)
            if target_weight is None:
                # Smoothed cross-entropy: (1-e) * (lse - z_y) + e * (lse - mean_j z_j).
                row_loss = -(1.0 - label_smoothing) * target
                if label_smoothing:
                    row_loss -= label_smoothing * logits_t.mean(dim=0)
                lse_weight = 1.0
            else:
                # Weighted: (1-e) w_y (lse - z_y) + (e/V) (S lse - sum_j w_j z_j), as F.cross_entropy.
                w_y = target_weight[start:end]
                row_loss = -(1.0 - label_smoothing) * w_y * target
                if label_smoothing:
                    row_loss -= (label_smoothing / vocab) * (class_weights @ logits_t)
                lse_weight = (1.0 - label_smoothing) * w_y + label_smoothing * weight_total / vocab
            row_max = logits_t.amax(dim=0)  # (c,)
            exp_shifted = logits_t.sub_(row_max).exp_()  # exp(z - max) in the logits' buffer
            sum_exp = exp_shifted.sum(dim=0)  # (c,) >= 1
            if lse is None:
                loss[start:end] = row_loss.add_(row_max).add_(sum_exp.log())  # + lse
            else:
                row_lse = lse[start:end]
                torch.add(row_max, sum_exp.log(), out=row_lse)
                loss[start:end] = row_loss.add_(lse_weight * row_lse)
            if not want_grad:
                continue
            # d loss / d logits = softmax - (1-e) * onehot(y) - e / V, times row_scale, in place
            # (general form with class weights and z-loss: RowsExtras).
            scale = row_scale[start:end]
            if lse is None:
                grad_logits_t = exp_shifted.mul_(scale / sum_exp)  # (V, c)
                if label_smoothing:
                    grad_logits_t -= scale * (label_smoothing / vocab)
                grad_logits_t[y, columns] -= scale * (1.0 - label_smoothing)
            else:
                softmax_scale = scale * lse_weight
                if z_row_scale is not None:
                    softmax_scale = softmax_scale + 2.0 * z_row_scale[start:end] * row_lse
                grad_logits_t = exp_shifted.mul_(softmax_scale / sum_exp)  # (V, c)
                if label_smoothing:
                    if class_weights is None:
                        grad_logits_t -= scale * (label_smoothing / vocab)
                    else:
                        grad_logits_t.addr_(class_weights, scale * (label_smoothing / vocab), alpha=-1.0)
                target_scale = scale * (1.0 - label_smoothing)
                if target_weight is not None:
                    target_scale = target_scale * w_y
                grad_logits_t[y, columns] -= target_scale
                if keep_derivative:
                    grad_logits_t.mul_(derivative)
            if grad_hidden is not None:
                torch.mm(grad_logits_t.T, weight32, out=grad_hidden[start:end])  # (c, H)
            if grad_weight is not None:
                if start == 0:
                    torch.mm(grad_logits_t, h, out=grad_weight)  # (V, H)
                else:
                    grad_weight.addmm_(grad_logits_t, h)
            if grad_bias is not None:
                grad_bias += grad_logits_t.sum(dim=1)
    if extras is None:
        return loss, grad_hidden, grad_weight, grad_bias
    return loss, grad_hidden, grad_weight, grad_bias, lse, argmax


def _rows_triton(*args):
    from fastft.kernels.linear_cross_entropy import linear_cross_entropy_rows

    return linear_cross_entropy_rows(*args)


ROWS = {"torch": _rows_torch, "triton": _rows_triton, "cuda": linear_cross_entropy_cuda.linear_cross_entropy_rows}


def _run_rows(backend, hidden, weight, bias, labels, label_smoothing, row_scale, grad_mask, matmul_precision,
              extras=None):
    """``ROWS[backend]``; the torch backend also takes the CPU matmul precision. Always
    returns six values: loss, the three gradients, lse and argmax (the last two None
    without ``extras``). Arguments are passed positionally (tests wrap the functions)."""
    if backend == "torch":
        args = (hidden, weight, bias, labels, label_smoothing, row_scale, grad_mask, matmul_precision)
        result = _rows_torch(*args) if extras is None else _rows_torch(*args, extras)
    else:
        args = (hidden, weight, bias, labels, label_smoothing, row_scale, grad_mask)
        result = ROWS[backend](*args) if extras is None else ROWS[backend](*args, extras)
    return tuple(result) + (None, None) if extras is None else tuple(result)


def _labelled_rows(hidden, labels, ignore_index):
    """(indices of the labelled rows, or None when every row is labelled; their hidden
    states; their labels). Causal-LM labels every row: then nothing is gathered."""
    selected = (labels != ignore_index).nonzero().squeeze(1)  # rows that cost anything
    if selected.numel() == labels.numel():
        return None, hidden, labels
    return selected, hidden.index_select(0, selected), labels.index_select(0, selected)


def _scatter_rows(rows, selected, num_rows):
    """Per-row fp32 results of the labelled rows -> all rows (zeros elsewhere)."""
    if selected is None:
        return rows
    return rows.new_zeros(num_rows, *rows.shape[1:]).index_copy_(0, selected, rows)


def _options_in_use(class_weights=None, softcap=None, lse_square_scale=0.0, return_z_loss=False,
                    return_accuracy=False) -> list[str]:
    """Names of the options beyond plain cross-entropy that a call uses (``return_z_loss``
    alone with ``lse_square_scale=0`` needs nothing: that z-loss is zero)."""
    used = []
    if softcap is not None:
        used.append("softcap")
    if lse_square_scale:
        used.append("z-loss")
    if class_weights is not None:
        used.append("class_weights")
    if return_accuracy:
        used.append("return_accuracy")
    return used


def backend_reasons(hidden: torch.Tensor, weight: torch.Tensor, *, class_weights=None, softcap=None,
                    lse_square_scale=0.0, return_z_loss=False, return_accuracy=False) -> dict:
    """For each backend, a function returning why it cannot run these inputs (with these
    options: the CUDA backend has no softcap / z-loss / class weights / accuracy yet)."""
    options = _options_in_use(class_weights, softcap, lse_square_scale, return_z_loss, return_accuracy)

    def triton():
        found = triton_reasons((hidden, weight))
        if hidden.dtype not in FLOAT_DTYPES:
            found.append(f"dtype {hidden.dtype} is not fp32/fp16/bf16")
        return found

    return {
        "torch": lambda: [],
        "triton": triton,
        "cuda": lambda: linear_cross_entropy_cuda.reasons(hidden, weight, options=options),
    }


# --------------------------------------------------------------------------- the op


def _check_labels(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(
            f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; found {value}"
        )


def _check_class_weights(class_weights: torch.Tensor) -> None:
    bad = ~torch.isfinite(class_weights) | (class_weights < 0)
    if bool(bad.any()):
        raise ValueError(f"class_weights must be finite and >= 0; found {float(class_weights[bad][0])}")


def _row_extras(class_weights, softcap, lse_square_scale, return_accuracy, z_row_scale):
    """RowsExtras for a call using any option beyond plain cross-entropy, else None (the
    plain path, which every backend takes)."""
    if class_weights is None and not softcap and not lse_square_scale and not return_accuracy:
        return None
    return RowsExtras(None if class_weights is None else class_weights.float().contiguous(), float(softcap),
                      z_row_scale, bool(return_accuracy))


def _forward(hidden, weight, bias, labels, ignore_index, reduction, label_smoothing, backend, grad_mask,
             matmul_precision, class_weights, softcap, lse_square_scale, return_z_loss, return_accuracy):
    """Shared body of the forward op: gather labelled rows, run the backend, reduce.

    With class weights a row's loss is weighted by its target's weight and ``mean`` divides
    by the sum of those weights (F.cross_entropy); the z-loss term ``lse_square_scale *
    lse**2`` is unweighted and ``mean`` divides it by the number of labelled rows
    (Liger-Kernel's convention)."""
    num_rows = hidden.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    _check_labels(labels, weight.shape[0], ignore_index)
    if class_weights is not None:
        _check_class_weights(class_weights)
    selected, rows_hidden, rows_labels = _labelled_rows(hidden, labels, ignore_index)
    count = rows_labels.numel()
    # The denominator of a mean: the labelled rows' target weights with class weights, else their count.
    weight_total = class_weights.float()[rows_labels].sum() if class_weights is not None else None
    want_grad = any(grad_mask) and reduction != "none"
    row_scale = z_row_scale = None
    if want_grad:  # gradient of the reduced loss w.r.t. each row's loss (and z-loss)
        scale = 1.0 / count if (reduction == "mean" and count) else 1.0
        row_scale = torch.full((count,), scale, **f32)
        if weight_total is not None and reduction == "mean":
            row_scale = torch.ones(count, **f32) / weight_total
        if lse_square_scale:
            z_row_scale = torch.full((count,), scale * lse_square_scale, **f32)
    extras = _row_extras(class_weights, softcap, lse_square_scale, return_accuracy, z_row_scale)
    lse_rows = argmax_rows = None
    if count:
        loss_rows, grad_h_rows, grad_weight, grad_bias, lse_rows, argmax_rows = _run_rows(
            backend, rows_hidden, weight, bias, rows_labels, label_smoothing, row_scale, grad_mask, matmul_precision,
            extras)
    else:  # nothing supervised: no kernel launch, zero gradients below
        loss_rows, grad_h_rows, grad_weight, grad_bias = hidden.new_zeros(0, **f32), None, None, None
    z_rows = lse_square_scale * lse_rows.square() if lse_rows is not None else loss_rows.new_zeros(count)
    if reduction == "none":
        loss = _scatter_rows(loss_rows + z_rows if lse_square_scale else loss_rows, selected, num_rows)
        z_loss = _scatter_rows(z_rows, selected, num_rows) if return_z_loss else hidden.new_empty(0, **f32)
    else:
        loss = loss_rows.sum()
        z_loss = z_rows.sum()
        if reduction == "mean":  # NaN when nothing is labelled, as F.cross_entropy
            loss = loss / (weight_total if weight_total is not None else count) if count else loss.new_tensor(math.nan)
            z_loss = z_loss / count if count else z_loss.new_tensor(math.nan)
        if lse_square_scale:
            loss = loss + z_loss
        if not return_z_loss:
            z_loss = hidden.new_empty(0, **f32)
    if not return_accuracy:
        accuracy = hidden.new_empty(0, **f32)
    else:
        correct = argmax_rows == rows_labels if argmax_rows is not None else rows_labels.new_zeros(0, dtype=torch.bool)
        if reduction == "none":
            accuracy = _scatter_rows(correct, selected, num_rows)
        else:
            accuracy = correct.sum().float() / count if count else hidden.new_tensor(math.nan, **f32)
    # Fill in every gradient the caller asked for (zeros when no row was labelled); an
    # empty tensor marks the ones not computed. custom_op outputs may not alias each other.
    grad_hidden = hidden.new_empty(0, **f32)
    if want_grad and grad_mask[0]:
        grad_hidden = (_scatter_rows(grad_h_rows, selected, num_rows) if grad_h_rows is not None
                       else hidden.new_zeros(hidden.shape, **f32))
    if grad_weight is None:
        grad_weight = hidden.new_zeros(weight.shape, **f32) if want_grad and grad_mask[1] else hidden.new_empty(0, **f32)
    if grad_bias is None:
        has_bias_grad = want_grad and grad_mask[2] and bias is not None
        grad_bias = hidden.new_zeros(weight.shape[:1], **f32) if has_bias_grad else hidden.new_empty(0, **f32)
    return loss, z_loss, accuracy, grad_hidden, grad_weight, grad_bias


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
    matmul_precision: str,
    class_weights: Optional[torch.Tensor],
    softcap: float,
    lse_square_scale: float,
    return_z_loss: bool,
    return_accuracy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, z_loss, accuracy, grad_hidden, grad_weight, grad_bias); z_loss and
    accuracy are empty unless asked for (``softcap`` 0 means none); the gradients (fp32, of
    the reduced loss) are empty unless precomputed for a reduced loss with grad_mask set.
    Runs with autocast off: the inputs' dtypes and ``matmul_precision`` say how to compute."""
    with autocast_off(hidden.device.type):
        return _forward(hidden, weight, bias, labels, ignore_index, reduction, label_smoothing, backend, grad_mask,
                        matmul_precision, class_weights, softcap, lse_square_scale, return_z_loss, return_accuracy)


@_linear_cross_entropy_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, reduction, label_smoothing, backend, grad_mask, matmul_precision,
      class_weights, softcap, lse_square_scale, return_z_loss, return_accuracy):
    want_grad = any(grad_mask) and reduction != "none"
    f32 = dict(dtype=torch.float32, device=hidden.device)
    loss_shape = hidden.shape[:1] if reduction == "none" else ()
    loss = hidden.new_empty(loss_shape, **f32)
    z_loss = hidden.new_empty(loss_shape if return_z_loss else (0,), **f32)
    if not return_accuracy:
        accuracy = hidden.new_empty((0,), **f32)
    elif reduction == "none":
        accuracy = hidden.new_empty(loss_shape, dtype=torch.bool)
    else:
        accuracy = hidden.new_empty((), **f32)
    grad_hidden = hidden.new_empty(hidden.shape if want_grad and grad_mask[0] else (0,), **f32)
    grad_weight = hidden.new_empty(weight.shape if want_grad and grad_mask[1] else (0,), **f32)
    has_bias_grad = want_grad and grad_mask[2] and bias is not None
    grad_bias = hidden.new_empty(weight.shape[:1] if has_bias_grad else (0,), **f32)
    return loss, z_loss, accuracy, grad_hidden, grad_weight, grad_bias


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
    matmul_precision: str,
    class_weights: Optional[torch.Tensor],
    softcap: float,
    lse_square_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recomputing backward for ``reduction="none"``: per-row upstream gradients (of the
    loss, z-loss term included)."""
    with autocast_off(hidden.device.type):
        selected, rows_hidden, rows_labels = _labelled_rows(hidden, labels, ignore_index)
        row_scale = (grad_loss if selected is None else grad_loss.index_select(0, selected)).float()
        z_row_scale = row_scale * lse_square_scale if lse_square_scale else None
        extras = _row_extras(class_weights, softcap, lse_square_scale, False, z_row_scale)
        grad_h_rows = grad_weight = grad_bias = None
        if rows_labels.numel():
            _, grad_h_rows, grad_weight, grad_bias, _, _ = _run_rows(
                backend, rows_hidden, weight, bias, rows_labels, label_smoothing, row_scale, grad_mask,
                matmul_precision, extras)
        if grad_h_rows is not None:
            grad_hidden = _scatter_rows(grad_h_rows, selected, hidden.shape[0])
        else:
            grad_hidden = hidden.new_zeros(hidden.shape, dtype=torch.float32)
        if grad_weight is None:
            grad_weight = weight.new_zeros(weight.shape, dtype=torch.float32)
        if grad_bias is None:
            grad_bias = weight.new_zeros(weight.shape[0], dtype=torch.float32)
        return grad_hidden, grad_weight, grad_bias


@_linear_cross_entropy_backward_op.register_fake
def _(grad_loss, hidden, weight, bias, labels, ignore_index, label_smoothing, backend, grad_mask, matmul_precision,
      class_weights, softcap, lse_square_scale):
    f32 = dict(dtype=torch.float32)
    return (hidden.new_empty(hidden.shape, **f32), weight.new_empty(weight.shape, **f32),
            weight.new_empty(weight.shape[:1], **f32))


NUM_OP_INPUTS = 15


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, labels, ignore_index, reduction, label_smoothing, backend, grad_mask,
     matmul_precision, class_weights, softcap, lse_square_scale, _return_z_loss, _return_accuracy) = inputs
    _, z_loss, accuracy, grad_hidden, grad_weight, grad_bias = output
    ctx.precomputed = reduction != "none"
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.has_bias = bias is not None
    ctx.args = (ignore_index, label_smoothing, backend, grad_mask, matmul_precision, softcap, lse_square_scale)
    if ctx.precomputed:
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
    else:
        ctx.save_for_backward(hidden, weight, bias, labels, class_weights)
    # z_loss and accuracy are for logging: the loss carries the z-loss term's gradient.
    ctx.mark_non_differentiable(z_loss, accuracy, grad_hidden, grad_weight, grad_bias)
    # Backward uses only the loss's gradient: without this, autograd would hand it zero-filled
    # gradients for the other outputs, i.e. allocate and zero a second weight gradient.
    ctx.set_materialize_grads(False)


def _scale_in_place_is_safe(saved) -> bool:
    """True inside a backward pass after which autograd frees the graph (no
    ``retain_graph``, no ``create_graph``), on plain tensors: then no later backward reads
    this node's saved tensors and they may be overwritten. False when unsure: outside
    autograd's engine, while torch.compile traces (its tensors are subclasses), or a torch
    without the query."""
    if torch.compiler.is_compiling() or any(type(t) is not torch.Tensor for t in saved):
        return False
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return keep_graph is not None and not keep_graph()


def _backward(ctx, grad_loss, _grad_z_loss, _grad_accuracy, _grad_hidden, _grad_weight, _grad_bias):
    hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
    grad_mask = ctx.args[3]
    if grad_loss is None:  # grads are not materialised (_setup_context): the loss got none
        return (None,) * NUM_OP_INPUTS
    if ctx.precomputed:
        # d(reduced loss) is one scalar: scale what forward computed. In place when this
        # is the graph's last backward (the usual loss.backward()): the saved buffers then
        # become the gradients themselves, and autograd hands them on without a copy --
        # the weight gradient is the largest buffer of the whole op.
        saved = ctx.saved_tensors
        if _scale_in_place_is_safe(saved):
            grad_hidden, grad_weight, grad_bias = (g.mul_(grad_loss) for g in saved)
        else:
            grad_hidden, grad_weight, grad_bias = (g * grad_loss for g in saved)
        del saved
    else:
        hidden, weight, bias, labels, class_weights = ctx.saved_tensors
        ignore_index, label_smoothing, backend, grad_mask, matmul_precision, softcap, lse_square_scale = ctx.args
        grad_hidden, grad_weight, grad_bias = _linear_cross_entropy_backward_op(
            grad_loss, hidden, weight, bias, labels, ignore_index, label_smoothing, backend, grad_mask,
            matmul_precision, class_weights, softcap, lse_square_scale)
    return (
        grad_hidden.to(hidden_dtype) if grad_mask[0] else None,
        grad_weight.to(weight_dtype) if grad_mask[1] else None,
        grad_bias.to(bias_dtype) if ctx.has_bias and grad_mask[2] else None,
    ) + (None,) * (NUM_OP_INPUTS - 3)


_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def _validate(hidden, weight, labels, bias, reduction, label_smoothing, under_autocast):
    """Raise on bad inputs. Under autocast the float dtypes may differ (e.g. bf16 hidden
    states and fp32 master weights), as ``F.linear`` accepts them there."""
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
    if under_autocast:
        if not weight.is_floating_point():
            raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    elif weight.dtype != hidden.dtype:
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
        if under_autocast:
            if not bias.is_floating_point():
                raise TypeError(f"bias must be a floating-point tensor, got {bias.dtype}")
        elif bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} does not match hidden dtype {hidden.dtype}")
        devices.add(("bias", bias.device))
    if len({d for _, d in devices}) > 1:
        raise ValueError("inputs are on different devices: " + ", ".join(f"{n}={d}" for n, d in sorted(devices, key=str)))
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")


def _validate_options(weight, class_weights, softcap, lse_square_scale):
    """Raise on bad loss options (values of class_weights are checked inside the op)."""
    if class_weights is not None:
        if not isinstance(class_weights, torch.Tensor):
            raise TypeError(f"class_weights must be a torch.Tensor or None, got {type(class_weights).__name__}")
        if class_weights.shape != weight.shape[:1]:
            raise ValueError(f"class_weights must have shape ({weight.shape[0]},) (one per class), "
                             f"got {tuple(class_weights.shape)}")
        if not class_weights.is_floating_point():
            raise TypeError(f"class_weights must be a floating-point tensor, got {class_weights.dtype}")
        if class_weights.device != weight.device:
            raise ValueError(f"class_weights is on {class_weights.device}, the weight on {weight.device}")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise TypeError(f"softcap must be a float or None, got {type(softcap).__name__}")
        if not (math.isfinite(softcap) and softcap > 0):
            raise ValueError(f"softcap must be a finite number > 0 (or None), got {softcap}")
    if isinstance(lse_square_scale, bool) or not isinstance(lse_square_scale, (int, float)):
        raise TypeError(f"lse_square_scale must be a float, got {type(lse_square_scale).__name__}")
    if not (math.isfinite(lse_square_scale) and lse_square_scale >= 0):
        raise ValueError(f"lse_square_scale must be a finite number >= 0, got {lse_square_scale}")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    class_weights: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    lse_square_scale: float = 0.0,
    return_z_loss: bool = False,
    return_accuracy: bool = False,
    backend: str = "auto",
):
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``labels``, without the logits.

    Args:
        hidden: ``(..., H)`` fp32 / fp16 / bf16 final hidden states (e.g. ``(batch, seq, H)``).
        weight: ``(V, H)`` output embedding / LM head, same dtype and device as ``hidden``
            (under autocast: any float dtype, e.g. the fp32 master weight).
        labels: ``hidden.shape[:-1]`` int64 / int32 targets in ``[0, V)`` or ``ignore_index``.
            For causal-LM pass labels already shifted (``labels[t] = tokens[t + 1]``).
        bias: optional ``(V,)`` output bias.
        ignore_index: label value of rows that are not supervised; they cost no compute.
        reduction: ``"mean"`` (over supervised rows), ``"sum"`` or ``"none"``
            (``labels.shape``, 0 at ignored rows).
        label_smoothing: in ``[0, 1]``, as in ``F.cross_entropy``.
        class_weights: optional ``(V,)`` float tensor of per-class weights, finite and
            ``>= 0``: ``F.cross_entropy(weight=...)`` semantics (each row's loss, smoothing
            term included, is weighted as there; ``mean`` divides by the sum of the
            labelled rows' target weights). No gradient flows to it. (Named so because
            ``weight`` is the projection.)
        softcap: optional ``c > 0``: final-logit softcapping (Gemma 2), the logits become
            ``c * tanh(logits / c)`` before the softmax; gradients go through the tanh.
        lse_square_scale: z-loss (PaLM) coefficient ``s >= 0``: adds ``s * lse**2`` of each
            labelled row to the loss (unweighted by class weights; ``mean`` divides it by
            the number of labelled rows), as Liger-Kernel's option of that name.
        return_z_loss: also return the z-loss term alone (the loss still includes it).
        return_accuracy: also return the token accuracy of the labelled rows (argmax of
            the softcapped logits == label), computed in the same chunked pass.
        backend: ``"auto" | "cuda" | "triton" | "torch"`` (``FASTFT_BACKEND`` overrides auto).
            The CUDA backend has no class weights / softcap / z-loss / accuracy yet:
            ``auto`` skips it for calls using them, an explicit ``"cuda"`` raises.

    Returns:
        The loss in float32 (it is accumulated in fp32; casting it down would only discard
        digits). With ``reduction="mean"`` and every row ignored the result is NaN and the
        gradients are zero, exactly as ``F.cross_entropy``. Gradients come back in each
        input's own dtype.

        With ``return_z_loss`` or ``return_accuracy``: a ``LossOutput(loss, z_loss,
        accuracy)`` named tuple, the fields not asked for None. ``z_loss`` is reduced like
        the loss (``labels.shape`` for ``none``, 0 at ignored rows); ``accuracy`` is an fp32
        fraction of the labelled rows for ``mean`` and ``sum`` (NaN when none is labelled)
        and a bool tensor of ``labels.shape`` for ``none`` (False at ignored rows). Neither
        carries a gradient. For example::

            out = linear_cross_entropy(h, w, y, lse_square_scale=1e-4, return_z_loss=True,
                                       return_accuracy=True)
            out.loss.backward(); log(out.z_loss, out.accuracy)

    Mixed precision. Under ``torch.autocast`` the matmuls take the autocast dtype, as
    ``F.linear`` would, while the logits, log-sum-exp, loss and weight gradient stay fp32:
    on a GPU the inputs are cast and the fused kernels run; on a CPU the torch backend
    reads the inputs as they are (fp32 master weights without a copy) and, for bf16 on a
    CPU with native bf16 (AMX / AVX512-BF16), multiplies with bf16 operands and fp32
    accumulation; on a CPU without it, in fp32, the faster choice there (bf16 is emulated)
    and never less accurate. bf16 inputs outside autocast get the same CPU treatment.

    Raises:
        TypeError: non-tensor inputs, non-float hidden, mismatched dtypes, non-integer labels.
        ValueError: mismatched shapes or devices, labels outside ``[0, V)`` other than
            ``ignore_index``, a bad reduction / label_smoothing / class_weights (shape,
            device, negative or non-finite values) / softcap (<= 0) / lse_square_scale
            (< 0, NaN), or a backend that cannot run these inputs (the message lists its
            reasons).
    """
    device_type = hidden.device.type if isinstance(hidden, torch.Tensor) else "cpu"
    autocast_to = autocast_dtype(device_type)
    _validate(hidden, weight, labels, bias, reduction, label_smoothing, autocast_to is not None)
    _validate_options(weight, class_weights, softcap, lse_square_scale)
    if autocast_to is not None and device_type != "cpu":
        # The GPU kernels take one dtype: cast as F.linear does under autocast.
        hidden, weight, bias = _cast_all((hidden, weight, bias), autocast_to)
    chosen = choose_backend("linear_cross_entropy", backend, backend_reasons(
        hidden, weight, class_weights=class_weights, softcap=softcap, lse_square_scale=lse_square_scale,
        return_z_loss=return_z_loss, return_accuracy=return_accuracy), PRIORITY, hidden.device)
    if autocast_to is not None and chosen != "torch":  # the Triton interpreter on CPU tensors
        hidden, weight, bias = _cast_all((hidden, weight, bias), autocast_to)
    # The torch backend reads any float dtypes as fp32 (fp32 master weights in place) and
    # multiplies in bf16 where the CPU does so natively (fastft._precision).
    matmul_precision = loss_matmul_precision(autocast_to or hidden.dtype, hidden.device) if chosen == "torch" else "ieee"
    tracking = torch.is_grad_enabled()
    grad_mask = [tracking and hidden.requires_grad, tracking and weight.requires_grad,
                 tracking and bias is not None and bias.requires_grad]
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    labels1d = labels.reshape(-1)
    loss, z_loss, accuracy = _linear_cross_entropy_op(
        hidden2d, weight, bias, labels1d, int(ignore_index), reduction, float(label_smoothing), chosen, grad_mask,
        matmul_precision, class_weights, float(softcap or 0.0), float(lse_square_scale), bool(return_z_loss),
        bool(return_accuracy))[:3]
    if reduction == "none":  # z_loss / accuracy not asked for are empty placeholders
        loss = loss.reshape(labels.shape)
        z_loss = z_loss.reshape(labels.shape) if return_z_loss else z_loss
        accuracy = accuracy.reshape(labels.shape) if return_accuracy else accuracy
    if return_z_loss or return_accuracy:
        return LossOutput(loss, z_loss if return_z_loss else None, accuracy if return_accuracy else None)
    return loss


def _cast_all(tensors, dtype):
    return tuple(None if t is None else t.to(dtype) for t in tensors)
