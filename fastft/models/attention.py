"""``attn_implementation="fastft"``: Hugging Face attention routed through ``fastft.ops.attention``.

Two functions are registered with ``transformers`` under the name ``"fastft"``:

* a **mask function** in ``AttentionMaskInterface``. ``transformers`` builds every
  model's mask through it (``create_causal_mask`` / ``create_bidirectional_mask``), and
  without one it would hand a custom implementation no mask at all. Ours mirrors what
  the ``"sdpa"`` mask means but never materialises a ``(batch, 1, q, k)`` mask for the
  two patterns the op expresses:

  ======================================  ==========================================
  pattern                                 what the model passes to attention
  ======================================  ==========================================
  causal (or causal sliding window) or    ``None`` (causality from the module, the
  bidirectional, no padding, no cache     window from its ``sliding_window``)
  causal (or causal sliding window) +     ``(batch, kv)`` bool, True = attend:
  key padding, or a kv-cache whose keys   causal aligned bottom-right (the last
  end at the last query (decoding,        query sees the last key), the window from
  chunked prefill, sliding-window caches) the module's ``sliding_window``
  bidirectional + key padding             ``(batch, 1, 1, kv)`` bool, True = attend
  anything else (packed sequences,        the ``(batch, 1, q, kv)`` bool mask of
  chunked attention, overlays, a static   ``"sdpa"``: the attention function below
  cache's prefill, ...)                   runs it when it recognises it, else falls
                                          back
  ======================================  ==========================================

  The ``(batch, 1, 1, kv)`` form broadcasts exactly like a full sdpa/eager mask, so
  the bidirectional case stays valid for any code that reads it. The 2-D form is the
  convention of ``transformers``' own flash-attention path (a 2-D mask = padding on top
  of a causal pattern aligned bottom-right, the window coming from the attention
  module's ``sliding_window`` argument, which every sliding-window model passes for
  flash attention).

* an **attention function** in ``AttentionInterface`` with the signature every HF
  attention module calls (``module, query, key, value, attention_mask, dropout,
  scaling, ...``; q/k/v are ``(batch, heads, seq, head_dim)``, k/v may have fewer heads).
  It turns the mask into ``causal`` + ``causal_alignment`` + ``key_padding_mask`` (it also
  recognises those patterns, sliding windows included, in a 4-D bool or additive float
  mask, e.g. one the user passed), the module's ``sliding_window`` into ``window`` and its
  ``softcap`` into ``softcap``, and calls ``fastft.ops.attention``. When the mask or an
  argument is something the op cannot express it calls ``transformers``' sdpa function
  instead (the model family's eager function when the call soft-caps, which sdpa cannot),
  records the reason in :data:`last_fallback_reason` / :func:`fallback_reasons` and logs
  it once.

Mask conventions follow ``transformers.masking_utils`` (checked against 5.17 and 5.23):
bool masks are True where attention is allowed; additive float masks are 0 where
allowed and ``torch.finfo(dtype).min`` (or -inf) where not.
"""

from __future__ import annotations

import collections
import inspect
import logging
import sys
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "ATTENTION_NAME",
    "fastft_attention_forward",
    "fastft_attention_mask",
    "register",
    "register_loaded",
    "fallback_reasons",
    "last_fallback_reason",
]

ATTENTION_NAME = "fastft"

logger = logging.getLogger("fastft.models")

# Why the fused op was not used, most recent first in `last_fallback_reason`, counted per
# distinct reason in `_fallback_counts` (each distinct reason is logged once).
last_fallback_reason: Optional[str] = None
_fallback_counts: collections.Counter = collections.Counter()

# Keyword arguments some HF attention modules pass that change the math in a way the op
# has no parameter for. A value of None means "not used" and is fine.
_UNSUPPORTED_KWARGS = {
    "s_aux": "attention sinks (s_aux)",
    "sinks": "attention sinks",
    "position_bias": "an additive position bias (T5-style)",
    "head_mask": "a head mask",
}


def fallback_reasons() -> dict:
    """``{reason: number of attention calls that fell back to sdpa for it}`` since import."""
    return dict(_fallback_counts)


def _record_fallback(reason: str) -> None:
    global last_fallback_reason
    last_fallback_reason = reason
    if reason not in _fallback_counts:
        logger.warning("fastft attention falls back to sdpa: %s", reason)
    _fallback_counts[reason] += 1


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


# --------------------------------------------------------------------------- mask function


def fastft_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: Optional[torch.Tensor] = None,
    local_size: Optional[int] = None,
    allow_is_causal_skip: bool = True,
    allow_is_bidirectional_skip: bool = False,
    **kwargs,
) -> Optional[torch.Tensor]:
    """The ``AttentionMaskInterface`` entry for ``"fastft"`` (same arguments as ``sdpa_mask``).

    Args:
        batch_size, q_length, kv_length, q_offset, kv_offset: as in
            ``transformers.masking_utils.sdpa_mask`` (offsets are non-zero with a kv-cache).
        mask_function: the pattern ``transformers`` wants; its plain causal, bidirectional
            and causal sliding-window patterns get a compact mask.
        attention_mask: optional ``(batch, >= kv_offset + kv_length)`` bool padding mask,
            True = real token.
        local_size: the sliding window (or chunk) size ``transformers`` passes along.

    Returns:
        ``None``, a ``(batch, kv_length)`` bool mask (causal, or causal sliding window, +
        key padding, aligned bottom-right), a ``(batch, 1, 1, kv_length)`` bool mask (key
        padding only), or for any other pattern exactly what ``sdpa_mask`` returns. See
        the module docstring.
    """
    from transformers import masking_utils

    is_bidirectional_pattern = mask_function is masking_utils.bidirectional_mask_function
    window = _sliding_window_of(mask_function, masking_utils)
    is_causal_pattern = mask_function is masking_utils.causal_mask_function or (
        window is not None and local_size == window)
    # A causal pattern is expressible when the keys end at the last query: no cache, or a
    # cache whose keys are the past tokens (DynamicCache, a sliding layer's last W - 1),
    # i.e. causal aligned bottom-right. A static cache's prefill (keys past the queries:
    # empty slots) is not.
    keys_end_at_last_query = q_offset + q_length == kv_offset + kv_length
    aligned = q_offset == 0 and kv_offset == 0 and q_length == kv_length
    if (is_causal_pattern and keys_end_at_last_query) or (is_bidirectional_pattern and local_size is None):
        padding = _key_padding(attention_mask, kv_length, kv_offset)  # (B, K) bool | None
        no_padding = padding is None or (not _is_compiling() and bool(padding.all()))
        if is_causal_pattern:
            if no_padding and allow_is_causal_skip and aligned:
                return None  # the module's is_causal (and sliding_window) apply, as for sdpa
            if padding is None:
                padding = torch.ones(batch_size, kv_length, dtype=torch.bool, device=kwargs.get("device", "cpu"))
            return padding.expand(batch_size, kv_length)  # (B, K): causal (bottom-right) + key padding
        if no_padding and allow_is_bidirectional_skip:
            return None
        if padding is None:
            padding = torch.ones(batch_size, kv_length, dtype=torch.bool, device=kwargs.get("device", "cpu"))
        return padding.expand(batch_size, kv_length)[:, None, None, :]  # (B, 1, 1, K): key padding only
    return masking_utils.sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        local_size=local_size,
        allow_is_causal_skip=allow_is_causal_skip,
        allow_is_bidirectional_skip=allow_is_bidirectional_skip,
        **kwargs,
    )


def _sliding_window_of(mask_function, masking_utils) -> Optional[int]:
    """``W`` when ``mask_function`` is ``transformers``' causal sliding-window pattern
    (``sliding_window_causal_mask_function(W)``: ``and_masks(sliding_window_overlay(W),
    causal_mask_function)``), else None. Read from the closures, so any other combination
    (packed sequences, chunks, overlays) is not mistaken for it."""
    if getattr(mask_function, "__qualname__", "") != "and_masks.<locals>.and_mask":
        return None
    parts = inspect.getclosurevars(mask_function).nonlocals.get("mask_functions", ())
    if len(parts) != 2 or parts[1] is not masking_utils.causal_mask_function:
        return None
    overlay = parts[0]
    if getattr(overlay, "__qualname__", "") != "sliding_window_overlay.<locals>.inner_mask":
        return None
    window = inspect.getclosurevars(overlay).nonlocals.get("sliding_window")
    return window if isinstance(window, int) and window > 0 else None


def _key_padding(attention_mask: Optional[torch.Tensor], kv_length: int, kv_offset: int) -> Optional[torch.Tensor]:
    """The ``(batch, kv_length)`` bool slice of a 2-D padding mask seen by these keys.

    HF pads a too-short mask with False (``prepare_padding_mask``) and indexes it at
    ``kv_offset + j`` for key ``j`` (``padding_mask_function``); this does the same.
    """
    if attention_mask is None:
        return None
    mask = attention_mask.to(torch.bool)
    missing = kv_offset + kv_length - mask.shape[-1]
    if missing > 0:
        mask = F.pad(mask, (0, missing), value=False)
    return mask[:, kv_offset : kv_offset + kv_length]


# --------------------------------------------------------------------------- mask -> op arguments


def _mask_to_op_arguments(attention_mask, causal: bool, window_left: int, batch: int, q_len: int, k_len: int):
    """Translate what the model passed into ``(causal, alignment, key_padding_mask, reason)``.

    ``reason`` is None when the op can run, otherwise why it cannot. ``key_padding_mask``
    is ``(batch, k_len)`` bool (True = attend) or None; ``alignment`` the op's
    ``causal_alignment``; ``window_left`` (-1: none) the module's sliding window, which a
    4-D mask must contain to be recognised.
    """
    if attention_mask is None:
        # As sdpa with no mask: is_causal, top-left. One query (decoding) sees the cache's
        # keys up to itself, i.e. its window is placed bottom-right.
        return causal, ("bottom-right" if q_len == 1 else "top-left"), None, None
    if not isinstance(attention_mask, torch.Tensor):  # e.g. a flex-attention BlockMask
        return causal, "top-left", None, f"attention_mask of type {type(attention_mask).__name__}"
    shape = tuple(attention_mask.shape)
    if attention_mask.dim() == 2:
        # Our mask function's causal + key padding form (HF's flash-attention convention:
        # causal aligned bottom-right, the keys ending at the last query).
        if shape != (batch, k_len) or attention_mask.dtype != torch.bool:
            return causal, "top-left", None, (f"2-D attention_mask of shape {shape} and dtype "
                                               f"{attention_mask.dtype} (expected ({batch}, {k_len}) bool)")
        return q_len > 1, "bottom-right", attention_mask, None
    if attention_mask.dim() != 4:
        return causal, "top-left", None, f"{attention_mask.dim()}-D attention_mask of shape {shape}"
    allowed, reason = _allowed_positions(attention_mask)  # (b, h, q, k) bool
    if reason:
        return causal, "top-left", None, reason
    if allowed.shape[-1] != k_len or allowed.shape[0] not in (1, batch) or allowed.shape[2] not in (1, q_len):
        return causal, "top-left", None, (f"attention_mask of shape {shape} does not broadcast to ({batch}, heads, "
                                          f"{q_len}, {k_len})")
    if allowed.shape[1] != 1:  # a per-head mask is fine if every head is the same
        if not bool((allowed == allowed[:, :1]).all()):
            return causal, "top-left", None, f"attention_mask of shape {shape} differs between heads"
        allowed = allowed[:, :1]
    allowed = allowed[:, 0]  # (b, q or 1, k)
    # An explicit mask decides causality on its own (sdpa ignores is_causal when given one).
    if allowed.shape[1] == 1 or q_len == 1:
        # One mask row for every query: a plain key mask, whatever the module's causality
        # (with a sliding window, one query's window placed bottom-right).
        return False, "bottom-right", allowed[:, 0].expand(batch, k_len), None
    key_mask = allowed.any(dim=1)  # (b, k): a key no query may see is as good as padded
    if window_left < 0 and bool((allowed == key_mask[:, None, :]).all()):
        return False, "top-left", key_mask.expand(batch, k_len), None
    alignments = ("top-left",) if q_len == k_len else ("bottom-right", "top-left")
    for alignment in alignments:
        shift = k_len - q_len if alignment == "bottom-right" else 0
        diagonal = torch.arange(q_len, device=allowed.device)[:, None] + shift  # (q, 1)
        key = torch.arange(k_len, device=allowed.device)[None, :]  # (1, k)
        pattern = key <= diagonal
        if window_left >= 0:
            pattern = pattern & (key >= diagonal - window_left)
        if bool((allowed == (key_mask[:, None, :] & pattern)).all()):
            return True, alignment, key_mask.expand(batch, k_len), None
    what = "causal (+ the module's sliding window)" if window_left >= 0 else "causal"
    return causal, "top-left", None, (
        f"attention_mask of shape {shape} is neither {what} + key padding nor key padding only "
        "(e.g. packed sequences, chunked attention, a static cache's prefill or a custom mask)"
    )


def _allowed_positions(mask: torch.Tensor):
    """Bool "may attend" view of a 4-D bool or additive float mask, or a reason it has none."""
    if mask.dtype == torch.bool:
        return mask, None
    if not mask.is_floating_point():
        return None, f"attention_mask of dtype {mask.dtype}"
    allowed = mask == 0
    # Additive masks block with finfo.min (HF) or -inf; anything else is a bias the op lacks.
    blocked = mask <= torch.finfo(mask.dtype).min / 2
    if not bool((allowed | blocked).all()):
        return None, "additive float attention_mask with values other than 0 and -inf/finfo.min (an attention bias)"
    return allowed, None


# --------------------------------------------------------------------------- attention function


def fastft_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
):
    """The ``AttentionInterface`` entry for ``"fastft"``.

    Args:
        module: the calling attention module (its ``is_causal`` is used when the mask
            does not decide causality, as ``transformers``' sdpa function does).
        query: ``(batch, heads, q_len, head_dim)``.
        key, value: ``(batch, kv_heads, k_len, head_dim)``; ``heads % kv_heads == 0`` (GQA).
        attention_mask: None, ``(batch, k_len)`` bool, or a 4-D bool / additive float mask
            broadcastable to ``(batch, heads, q_len, k_len)`` (see the module docstring).
        dropout: attention-probability dropout (HF passes 0 in eval mode).
        scaling: softmax scale (None = ``head_dim ** -0.5``).
        is_causal: overrides ``module.is_causal`` when given.
        sliding_window (keyword): ``W``: each query sees itself and the ``W - 1`` keys
            before it (Mistral, Gemma 2, Qwen 2: ``transformers``' flash-attention
            convention); causal modules only.
        softcap (keyword): attention logit soft-capping (Gemma 2's ``attn_logit_softcapping``).

    Returns:
        ``(attn_output (batch, q_len, heads, head_dim), None)``: the layout every HF
        attention function returns; attention weights are never materialised.
    """
    batch, _, q_len, _ = query.shape
    k_len = key.shape[2]
    module_causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    # One query (decoding) sees every cached key: causality is moot, as in sdpa.
    causal = module_causal and q_len > 1

    reason = _argument_reason(query, key, value, kwargs)
    sliding_window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    window_left = -1
    if reason is None and sliding_window is not None:
        if not module_causal:
            reason = f"a bidirectional sliding window (sliding_window={sliding_window!r})"
        elif not isinstance(sliding_window, int) or sliding_window < 1:
            reason = f"sliding_window={sliding_window!r} (expected a positive int)"
        else:
            window_left = sliding_window - 1  # HF: keys j with i - W < j <= i
    if reason is None and softcap is not None and not (isinstance(softcap, (int, float)) and softcap >= 0):
        reason = f"softcap={softcap!r} (expected a number >= 0)"
    key_padding_mask, alignment = None, "top-left"
    if reason is None:
        causal, alignment, key_padding_mask, reason = _mask_to_op_arguments(
            attention_mask, causal, window_left, batch, q_len, k_len)
    if reason is not None:
        _record_fallback(reason)
        return _fallback(module, query, key, value, attention_mask, dropout, scaling, is_causal, window_left, kwargs)

    from fastft.ops.attention import attention

    output = attention(
        query, key, value,
        causal=causal,
        window=None if window_left < 0 else (window_left, -1),
        causal_alignment=alignment,
        softcap=softcap,
        key_padding_mask=key_padding_mask,
        softmax_scale=scaling,
        dropout_p=dropout,
    )  # (batch, heads, q_len, head_dim)
    return output.transpose(1, 2).contiguous(), None  # (batch, q_len, heads, head_dim)


def _argument_reason(query, key, value, kwargs) -> Optional[str]:
    """Why the op cannot take these tensors / keyword arguments, or None."""
    for name, what in _UNSUPPORTED_KWARGS.items():
        argument = kwargs.get(name)
        if argument is not None:
            return what if isinstance(argument, torch.Tensor) else f"{what} ({name}={argument!r})"
    if kwargs.get("cache") is not None:  # a paged cache must be updated by the sdpa path
        return "a paged kv-cache (cache=...)"
    if value.shape[-1] != query.shape[-1] or key.shape[-1] != query.shape[-1]:
        return f"different head dims for q/k/v ({query.shape[-1]}, {key.shape[-1]}, {value.shape[-1]})"
    if query.shape[1] % key.shape[1] != 0:
        return f"{query.shape[1]} query heads are not a multiple of {key.shape[1]} key/value heads"
    return None


def _fallback(module, query, key, value, attention_mask, dropout, scaling, is_causal, window_left, kwargs):
    """What the call runs when the op cannot: sdpa, or -- sdpa cannot soft-cap -- the model
    family's own eager function when the call soft-caps (it takes an additive mask)."""
    q_len = query.shape[2]
    mask = _as_sdpa_mask(attention_mask, q_len, window_left)
    if kwargs.get("softcap") is not None:
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is not None:
            if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill(
                    ~mask, torch.finfo(query.dtype).min)
            elif mask is None and (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
                mask = _as_sdpa_mask(torch.ones(query.shape[0], key.shape[2], dtype=torch.bool, device=query.device),
                                     q_len, window_left)
                mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill(
                    ~mask, torch.finfo(query.dtype).min)
            return eager(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def _as_sdpa_mask(attention_mask, q_len: int, window_left: int = -1):
    """The mask to hand ``sdpa_attention_forward`` on a fallback.

    Only our 2-D causal + key padding form needs expanding (with the module's sliding
    window); everything else (None, 4-D masks, masks HF built for other patterns) already
    means the same thing to sdpa.
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return attention_mask
    k_len = attention_mask.shape[-1]
    # Keys are the last k_len positions, queries the last q_len (HF's bottom-right alignment).
    query_pos = torch.arange(k_len - q_len, k_len, device=attention_mask.device)[:, None]  # (q, 1)
    key_pos = torch.arange(k_len, device=attention_mask.device)[None, :]  # (1, k)
    causal = key_pos <= query_pos  # (q, k)
    if window_left >= 0:
        causal = causal & (key_pos >= query_pos - window_left)
    return attention_mask.to(torch.bool)[:, None, None, :] & causal  # (batch, 1, q, k)


# --------------------------------------------------------------------------- registration


def register() -> None:
    """Register ``"fastft"`` in ``transformers``' attention and mask interfaces (idempotent).

    ``import fastft`` already arranges this for whenever transformers' modeling and masking
    utilities load (``fastft/_transformers_hook.py``); calling it imports both now."""
    from transformers import modeling_utils, masking_utils  # noqa: F401  (registered on their import)

    register_loaded()


def register_loaded() -> None:
    """Register ``"fastft"`` in whichever of ``transformers``' two interfaces is already
    imported (``AttentionInterface`` in ``transformers.modeling_utils``,
    ``AttentionMaskInterface`` in ``transformers.masking_utils``), importing neither."""
    modeling_utils = sys.modules.get("transformers.modeling_utils")
    if modeling_utils is not None and hasattr(modeling_utils, "AttentionInterface"):
        modeling_utils.AttentionInterface.register(ATTENTION_NAME, fastft_attention_forward)
    masking_utils = sys.modules.get("transformers.masking_utils")
    if masking_utils is not None and hasattr(masking_utils, "AttentionMaskInterface"):
        masking_utils.AttentionMaskInterface.register(ATTENTION_NAME, fastft_attention_mask)
