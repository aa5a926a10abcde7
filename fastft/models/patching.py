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

Both replacements are installed once, at patch time, as small objects holding the model
or the head (``_FusedLossForward``, ``_CapturingHeadForward``): ``copy.deepcopy`` of a
patched model points the copies at the copy, and ``pickle`` / ``torch.save(model)``
stores them by class and state, so an unpickled model is still patched (a bound method
of a module function would be pickled as ``getattr(head, name)`` and fail to load); a
call only flips a flag on a plain object, which ``torch.compile`` traces as an ordinary
side effect (swapping a module's ``forward`` during the call would not be).
"""

from __future__ import annotations

import inspect
import logging
import types
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fastft.models import attention as _attention
from fastft.models.loss import loss_for

__all__ = ["patch", "unpatch", "is_patched"]

logger = logging.getLogger("fastft.models")

_STATE_ATTR = "_fastft_patch"
_CAPTURE_ATTR = "_fastft_capture"


@dataclass
class _PatchState:
    """What ``patch`` changed on a model, so ``unpatch`` can put it back."""

    previous_attn_implementation: Optional[str] = None  # None: attention was not changed
    previous_forward: Optional[Callable] = None  # an instance-level forward we replaced, if any
    loss_fn: Optional[Callable] = None  # None: the loss was not patched
    loss_skipped_reason: Optional[str] = None


class _HeadCapture:
    """Per-head switch: while ``active``, the head records its input instead of computing logits."""

    def __init__(self):
        self.active = False
        self.inputs = []


class _CapturingHeadForward:
    """``head.forward`` while patched: ``F.linear`` as usual, or (..., H) -> empty (..., 0)."""

    def __init__(self, head: torch.nn.Module):
        self.head = head

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.head
        capture = head.__dict__[_CAPTURE_ATTR]
        if not capture.active:
            return type(head).forward(head, hidden)
        capture.inputs.append(hidden)
        return hidden.new_empty(*hidden.shape[:-1], 0)  # no logits


def _install_capture(head: torch.nn.Module) -> _HeadCapture:
    if _CAPTURE_ATTR not in head.__dict__:
        head.__dict__[_CAPTURE_ATTR] = _HeadCapture()
        head.forward = _CapturingHeadForward(head)
    return head.__dict__[_CAPTURE_ATTR]


def _remove_capture(head: Optional[torch.nn.Module]) -> None:
    if head is not None and _CAPTURE_ATTR in head.__dict__:
        del head.__dict__[_CAPTURE_ATTR]
        del head.forward


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
            ``transformers``' ``fixed_cross_entropy``: sum / num_items_in_batch, also for
            BERT / RoBERTa whose own forward ignores it. The loss is fp32. For an LM head
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
            get_head = getattr(model, "get_output_embeddings", None)
            if get_head is not None and get_head() is not None:
                # An LM head we do not know: the caller probably expected the fused loss.
                warnings.warn(f"fastft.patch: {state.loss_skipped_reason}", stacklevel=2)
            else:  # no vocabulary head (a backbone, a classifier): nothing to fuse
                logger.info("fastft.patch: %s", state.loss_skipped_reason)
        else:
            state.loss_fn = loss_fn
            state.previous_forward = model.__dict__.get("forward")
            _install_capture(model.get_output_embeddings())
            model.forward = _FusedLossForward(model)
    setattr(model, _STATE_ATTR, state)
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`patch`: the previous attention implementation and the original forward.

    Returns the model; a model that is not patched is returned unchanged.
    """
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        return model
    if state.loss_fn is not None:
        if state.previous_forward is None:
            del model.forward  # the class's forward is visible again
        else:
            model.forward = state.previous_forward
        _remove_capture(model.get_output_embeddings())
    if state.previous_attn_implementation is not None:
        model.set_attn_implementation(state.previous_attn_implementation)
    delattr(model, _STATE_ATTR)
    return model


def _original_forward(model: torch.nn.Module, state: _PatchState) -> Callable:
    if state.previous_forward is None:
        return types.MethodType(type(model).forward, model)
    return state.previous_forward


class _FusedLossForward:
    """``model.forward`` while the loss is patched.

    ``__wrapped__`` makes ``inspect.signature(model.forward)`` the original one: the HF
    Trainer reads it to keep dataset columns and to decide whether to pass
    ``num_items_in_batch``. Holding the model (not a closure over it) lets
    ``copy.deepcopy`` point a copied model's forward at the copy.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @property
    def __wrapped__(self):
        return _original_forward(self.model, getattr(self.model, _STATE_ATTR))

    def __call__(self, *args, **kwargs):
        return _forward_with_fused_loss(self.model, *args, **kwargs)


def _forward_with_fused_loss(model: torch.nn.Module, *args, **kwargs):
    """The body of :class:`_FusedLossForward`."""
    state = getattr(model, _STATE_ATTR)
    original_forward = _original_forward(model, state)
    signature = inspect.signature(original_forward)
    bound = signature.bind(*args, **kwargs)
    labels = bound.arguments.get("labels")
    if labels is None:
        return original_forward(*args, **kwargs)

    # Call again by keyword, with labels=None and a ModelOutput back (made a tuple at the
    # end if the caller asked for one). HF passes loss arguments (num_items_in_batch, ...)
    # in **kwargs, and to the backbone too: they go along unchanged.
    var_keyword = next((p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    extra = dict(bound.arguments.get(var_keyword, {}))
    call = {name: value for name, value in bound.arguments.items() if name != var_keyword}
    call.update(extra)
    call["labels"] = None
    return_dict = call.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    call["return_dict"] = True

    head = model.get_output_embeddings()
    capture = _install_capture(head)  # a no-op unless the head was replaced since patch()
    capture.active, capture.inputs = True, []
    try:
        output = original_forward(**call)
    finally:
        capture.active = False
    inputs, capture.inputs = capture.inputs, []
    if len(inputs) != 1:
        raise RuntimeError(
            f"fastft loss patch: {type(model).__name__}.forward called its output embeddings "
            f"{len(inputs)} times (expected once); patch with fastft.patch(model, loss=False)"
        )
    hidden = inputs[0]  # (batch, seq, H): the head's input, after any prediction transform
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} do not match the {tuple(hidden.shape[:-1])} positions "
            "scored by the LM head (logits_to_keep must be 0 when labels are given)"
        )
    loss_kwargs = {k: extra[k] for k in ("num_items_in_batch", "ignore_index", "shift_labels") if k in extra}
    loss = state.loss_fn(hidden, head, labels, **loss_kwargs)
    fields = {key: value for key, value in output.items() if key not in ("loss", "logits")}
    output = type(output)(loss=loss, logits=None, **fields)
    return output if return_dict else output.to_tuple()
