"""``fastft.patch(model)`` / ``fastft.unpatch(model)``: switch an existing HF model to fastft.

* attention: ``model.set_attn_implementation("fastft")`` (see ``fastft.models.attention``).
* loss: the model's ``forward`` is wrapped. Without ``labels`` the wrapper calls the
  original forward unchanged. With ``labels`` it calls the original forward with
  ``labels=None`` while the output-embedding layer (``model.get_output_embeddings()``)
  only records its input and returns an empty ``(..., 0)`` tensor instead of logits; the
  loss is then computed from that input by ``linear_cross_entropy``. Everything else
  (arguments, caches, hidden states, the prediction-head transform) stays HF's code.
  The returned output has ``loss`` and ``logits=None``: not building the
  ``(tokens, vocab)`` logits is the point.
"""

from __future__ import annotations

import functools
import inspect
import logging
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fastft.models import attention as _attention
from fastft.models.loss import loss_for

__all__ = ["patch", "unpatch", "is_patched"]

logger = logging.getLogger("fastft.models")

_STATE_ATTR = "_fastft_patch"
_NO_INSTANCE_FORWARD = object()  # marks "forward was the class method" for unpatch


@dataclass
class _PatchState:
    """What ``patch`` changed on a model, so ``unpatch`` can put it back."""

    previous_attn_implementation: Optional[str] = None  # None: attention was not changed
    previous_forward: object = _NO_INSTANCE_FORWARD  # the instance attribute we replaced, if any
    loss_patched: bool = False
    loss_skipped_reason: Optional[str] = None


def is_patched(model: torch.nn.Module) -> bool:
    """True when ``model`` currently carries a fastft patch."""
    return getattr(model, _STATE_ATTR, None) is not None


def patch(model: torch.nn.Module, attention: bool = True, loss: bool = True) -> torch.nn.Module:
    """Route a Hugging Face model's attention and LM loss through fastft's fused ops.

    Args:
        model: a ``transformers.PreTrainedModel`` (any architecture for ``attention``; for
            ``loss``: ``BertForMaskedLM``, ``RobertaForMaskedLM``, ``GPT2LMHeadModel``,
            ``LlamaForCausalLM``).
        attention: set ``attn_implementation="fastft"`` (``fastft.ops.attention``; masks the
            op cannot express fall back to sdpa, see ``fastft.models.fallback_reasons()``).
        loss: when the forward gets ``labels``, compute the loss with
            ``linear_cross_entropy`` on the output-embedding layer's input, without the
            logits. The output then has ``logits=None`` (and a tuple output, with
            ``return_dict=False``, has no logits entry). Without labels the forward is
            unchanged. ``num_items_in_batch`` (HF gradient accumulation) is honoured as in
            ``transformers``' ``fixed_cross_entropy``: sum / num_items_in_batch. For a head
            fastft does not know, the loss is left alone and a warning says why.

    Returns:
        The same model, patched in place (patching twice is the same as once).

    Raises:
        ValueError: ``model`` cannot switch its attention implementation to ``"fastft"``.
    """
    if is_patched(model):
        unpatch(model)
    state = _PatchState()
    if attention:
        _attention.register()
        previous = model.config._attn_implementation
        if previous != _attention.ATTENTION_NAME:
            model.set_attn_implementation(_attention.ATTENTION_NAME)
            if model.config._attn_implementation != _attention.ATTENTION_NAME:
                raise ValueError(
                    f"{type(model).__name__} did not accept attn_implementation={_attention.ATTENTION_NAME!r} "
                    "(it does not dispatch attention through transformers' AttentionInterface)"
                )
            state.previous_attn_implementation = previous
    if loss:
        loss_fn, reason = loss_for(model)
        if loss_fn is None:
            state.loss_skipped_reason = f"loss not patched: {reason}"
            warnings.warn(f"fastft.patch: {state.loss_skipped_reason}", stacklevel=2)
        else:
            state.previous_forward = model.__dict__.get("forward", _NO_INSTANCE_FORWARD)
            model.forward = _forward_with_fused_loss(model, model.forward, loss_fn)
            state.loss_patched = True
    setattr(model, _STATE_ATTR, state)
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`patch`: the previous attention implementation and the original forward.

    Returns the model; a model that is not patched is returned unchanged.
    """
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        return model
    if state.loss_patched:
        if state.previous_forward is _NO_INSTANCE_FORWARD:
            del model.forward  # the class's forward is visible again
        else:
            model.forward = state.previous_forward
    if state.previous_attn_implementation is not None:
        model.set_attn_implementation(state.previous_attn_implementation)
    delattr(model, _STATE_ATTR)
    return model


def _forward_with_fused_loss(model: torch.nn.Module, original_forward: Callable, loss_fn: Callable) -> Callable:
    """Wrap ``original_forward`` (a bound method) so a labelled call never builds logits."""
    signature = inspect.signature(original_forward)

    var_keyword = next(
        (p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None
    )

    @functools.wraps(original_forward)
    def forward(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        labels = bound.arguments.get("labels")
        if labels is None:
            return original_forward(*args, **kwargs)
        # Call again by keyword, with labels=None and a ModelOutput back (tupled at the end
        # if the caller asked for a tuple).
        call = {name: value for name, value in bound.arguments.items() if name != var_keyword}
        extra = dict(bound.arguments.get(var_keyword, {}))  # HF passes loss kwargs here
        call.update(extra)
        call["labels"] = None
        return_dict = call.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(model.config, "return_dict", True)
        call["return_dict"] = True

        head = model.get_output_embeddings()
        captured = []

        def capture_instead_of_logits(hidden):  # (..., H) -> (..., 0): no logits
            captured.append(hidden)
            return hidden.new_empty(*hidden.shape[:-1], 0)

        previous_head_forward = head.__dict__.get("forward")
        head.forward = capture_instead_of_logits
        try:
            output = original_forward(**call)
        finally:
            if previous_head_forward is None:
                del head.forward
            else:
                head.forward = previous_head_forward
        if len(captured) != 1:
            raise RuntimeError(
                f"fastft loss patch: {type(model).__name__}.forward called its output embeddings "
                f"{len(captured)} times (expected once); patch with fastft.patch(model, loss=False)"
            )
        hidden = captured[0]  # (batch, seq, H)
        if hidden.shape[:-1] != labels.shape:
            raise ValueError(
                f"labels of shape {tuple(labels.shape)} do not match the {tuple(hidden.shape[:-1])} positions "
                "scored by the LM head (logits_to_keep must be 0 when labels are given)"
            )
        loss_kwargs = {k: extra[k] for k in ("num_items_in_batch", "ignore_index", "shift_labels") if k in extra}
        loss = loss_fn(hidden, head, labels, **loss_kwargs)
        fields = {key: value for key, value in output.items() if key not in ("loss", "logits")}
        output = type(output)(loss=loss, logits=None, **fields)
        return output if return_dict else output.to_tuple()

    return forward
