"""Fused scaled-dot-product attention: forward and backward, masks, varlen, GQA, dropout.

``attention(q, k, v)`` equals ``torch.nn.functional.scaled_dot_product_attention`` on the
layout ``(batch, heads, seq, head_dim)``, with what transformer training needs on top:

* ``causal`` masking, aligned top-left like SDPA's ``is_causal`` by default, or
  bottom-right (``causal_alignment="bottom-right"``: KV-cached decoding, chunked prefill);
* sliding-window (local) attention ``window=(left, right)``, alone or with ``causal``;
* logit soft-capping ``softcap`` (Gemma 2's ``c · tanh(s / c)``) and ALiBi slopes;
* ``key_padding_mask`` ``(batch, seq_k)`` bool, True = attend (Hugging Face's convention);
* packed variable-length batches (``cu_seqlens``, or ``cu_seqlens_q`` / ``cu_seqlens_k``
  when queries and keys are packed differently), no attention across documents;
* grouped-query / multi-query attention (k and v have fewer heads than q);
* attention dropout whose mask is replayed exactly in backward;
* the row log-sum-exp (``return_lse=True``), with its gradient;
* query rows with no key to attend output 0 and get 0 gradient (SDPA gives NaN).

Which keys a query sees. Query ``i`` has a *diagonal* key ``i + shift``: ``shift = 0``
with ``causal_alignment="top-left"`` (SDPA's ``is_causal``: the mask is
``torch.ones(seq_q, seq_k).tril()``), ``shift = seq_k - seq_q`` with ``"bottom-right"``
(FlashAttention's: the last query sees the last key). ``causal`` keeps keys
``j <= i + shift``; ``window=(left, right)`` keeps ``i + shift - left <= j <= i + shift +
right`` (-1: unbounded on that side; with ``causal`` the right side is 0). For packed
batches both count positions inside each document. ``x`` = attends::

    causal, top-left          causal, bottom-right      causal, window=(2, -1)
    seq_q=3, seq_k=5          seq_q=3, seq_k=5          seq_q=seq_k=5
         k: 0 1 2 3 4              k: 0 1 2 3 4              k: 0 1 2 3 4
      q0    x . . . .           q0    x x x . .           q0    x . . . .
      q1    x x . . .           q1    x x x x .           q1    x x . . .
      q2    x x x . .           q2    x x x x x           q2    x x x . .
                                                          q3    . x x x .
                                                          q4    . . x x x

Scores, in order: ``s = softmax_scale · q·k``; with ``softcap = c > 0``, ``s = c ·
tanh(s / c)``; with ALiBi, ``s -= slope · |i + shift - j|`` (FlashAttention's order); then
the mask and the softmax.

Every backend implements two functions over the same keyword options (``_options``),

    forward(q, k, v, *, return_lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
            max_seqlen_q, max_seqlen_k, window, bottom_right, softcap, alibi_slopes,
            softmax_scale, dropout_p, seed) -> out, lse
    backward(grad_out, grad_lse, q, k, v, out, lse, **the same options) -> dq, dk, dv

where ``window`` is already combined with ``causal`` and ``lse`` is the fp32 natural-log
log-sum-exp of each query row's scores (``(batch, heads_q, seq_q)``, or ``(heads_q,
total_q)`` for varlen; ``-inf`` for a row with no key) that the FlashAttention backward
needs to rebuild the probabilities. ``grad_lse`` (None when the caller did not ask for the
lse) enters the backward through ``delta``: since ``d lse_i / d s_ij = p_ij``, the score
gradient ``p ∘ (dP - delta)`` becomes ``p ∘ (dP - (delta - grad_lse))``. The triton and
cuda backends share one autograd wiring through the custom op ``fastft::attention`` (+
``fastft::attention_backward``), so torch.compile sees them as opaque nodes without graph
breaks. The torch backend on dense inputs is plain differentiable torch instead (SDPA
where it expresses the call, whose own fused backward beats any recomputation and which
torch.compile traces natively; explicit fp32 math with softcap, ALiBi, dropout or the
lse); on packed inputs it runs through the op too, with a per-document loop,
recomputing the forward under autograd in backward (its ``lse`` is empty unless asked
for). Validation, dispatch and seeding are shared and live in this file.

Dropout seeding. A dropout call draws one 31-bit seed from ``generator`` (default:
torch's default CPU generator, so ``torch.manual_seed`` makes masks reproducible and
``torch.utils.checkpoint`` replays them). The keep/drop decision of score ``(b, h, i, j)``
takes 16 of the 128 bits that one Philox-4x32-10 call (Triton's ``tl.randint4x(key,
counter)``) gives for key ``seed + ((b * heads_q + h) << 32)`` and counter ``(i *
ceil(seq_k / 8) + j // 8) mod 2**32``: half ``j % 2`` (low, high) of word ``(j % 8) // 2``;
the score is kept when they are ``>= round(dropout_p * 2**16)`` (for varlen, ``b`` is the
document index and ``i, j`` positions inside the document). One call serves 8 scores
(FlashAttention-2's way), where one call per score made the Triton kernels bound by
random-number generation; ``attention_dropout_mask`` reproduces it in torch for tests. The torch backend draws its mask from a cheaper counter-based hash of the same
coordinates (``torch_dropout_mask``: Philox in torch ops is ~40x slower than SDPA on a
CPU), so the two backends drop different scores, each reproducibly; the CUDA backend does
not implement dropout.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from fastft._dispatch import choose_backend
from fastft._precision import autocast_dtype, autocast_off
from fastft.kernels._common import attention_dropout_threshold, interpreting_triton, triton_reasons
from fastft.ops import attention_cuda

__all__ = ["attention", "attention_ref", "attention_dropout_mask", "torch_dropout_mask", "varlen_dropout_mask",
           "draw_dropout_seed",
           "backend_reasons"]

# Fastest first (benchmarks/NOTES.md); CPU inputs fall through to torch.
PRIORITY = ("cuda", "triton", "torch")
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
TRITON_MAX_HEAD_DIM = 256


# --------------------------------------------------------------------------- reference

ALIGNMENTS = ("top-left", "bottom-right")


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window: Optional[tuple[int, int]] = None,
    causal_alignment: str = "top-left",
    softcap: Optional[float] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    dropout_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    upcast: bool = True,
    return_lse: bool = False,
):
    """Plain PyTorch attention, every score materialised: the oracle for tests.

    Same arguments and layouts as :func:`attention`. ``dropout_mask`` is an explicit bool
    keep-mask ``(batch, heads_q, seq_q, seq_k)`` (``(heads_q, total_q, total_k)`` for
    varlen); kept probabilities are scaled by ``1 / (1 - dropout_p)``. With ``upcast=True``
    the math runs in fp32; ``upcast=False`` runs in the input dtype, which is what an
    unfused model does and what the tolerance rule compares against. Returns ``out`` in
    ``q``'s dtype; with ``return_lse``, ``(out, lse)`` where ``lse`` is what the fused
    backends keep for backward: the fp32 natural-log log-sum-exp of each query row's
    scaled, soft-capped, biased and masked scores (``(batch, heads_q, seq_q)``,
    ``(heads_q, total_q)`` for varlen; ``-inf`` for a row with no key), taken in fp32 over
    the scores as computed (in the input dtype without upcast). Both are differentiable.
    """
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    left, right = _combined_window(causal, window)
    bottom_right = causal_alignment == "bottom-right"
    cu_q, cu_k = (cu_seqlens, cu_seqlens) if cu_seqlens is not None else (cu_seqlens_q, cu_seqlens_k)
    if cu_q is not None:
        # Packed (total, heads, dim) -> one "batch" of all tokens with a block-diagonal mask.
        doc_q, pos_q, len_q = _document_positions(cu_q, q.shape[0])  # (Tq,) each
        doc_k, pos_k, len_k = _document_positions(cu_k, k.shape[0])  # (Tk,) each
        diagonal = pos_q + ((len_k - len_q)[doc_q] if bottom_right else 0)  # (Tq,): query i's diagonal key
        allowed = (doc_q[:, None] == doc_k[None, :]) & _window_mask(diagonal[:, None], pos_k[None, :], left, right)
        distance = (pos_k[None, :] - diagonal[:, None])[None, None]  # (1, 1, Tq, Tk)
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, heads, total, dim)
        allowed = allowed[None, None]  # (1, 1, Tq, Tk)
        if dropout_mask is not None:
            dropout_mask = dropout_mask[None]
        slopes = None
        if alibi_slopes is not None:  # (Hq,) or (docs, Hq) -> (1, Hq, Tq, 1)
            per_doc = alibi_slopes.float() if alibi_slopes.dim() == 2 else alibi_slopes.float()[None]
            slopes = per_doc.expand(len_k.numel(), -1)[doc_q].t()[None, :, :, None]
    else:
        batch, seq_q, seq_k = q.shape[0], q.shape[2], k.shape[2]
        shift = seq_k - seq_q if bottom_right else 0
        allowed = _allowed_keys(batch, seq_q, seq_k, (left, right), shift, key_padding_mask, q.device)
        distance = (torch.arange(seq_k, device=q.device)[None, :]
                    - torch.arange(seq_q, device=q.device)[:, None] - shift)  # (Sq, Sk)
        slopes = None
        if alibi_slopes is not None:  # (Hq,) or (B, Hq) -> (1 or B, Hq, 1, 1)
            slopes = alibi_slopes.float().reshape(-1 if alibi_slopes.dim() == 2 else 1, alibi_slopes.shape[-1])
            slopes = slopes[:, :, None, None]
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])  # GQA: (B, Hq, Sk, D)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, Hq, Sq, Sk)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if slopes is not None:
        scores = scores - (slopes * distance.abs()).to(scores.dtype)
    if allowed is not None:
        # A row with no key would be softmax(all -inf) = NaN: give it uniform scores and
        # zero its probabilities afterwards, so it outputs 0 and passes back 0.
        has_key = allowed.any(-1, keepdim=True)  # (B, 1, Sq, 1)
        scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~has_key, 0.0)
    lse = scores.float().logsumexp(dim=-1) if return_lse else None  # (B, Hq, Sq)
    probs = torch.softmax(scores, dim=-1)
    if allowed is not None:
        probs = probs * has_key
        if lse is not None:  # -inf without a key (computed on finite scores: no NaN in backward)
            lse = lse.masked_fill(~has_key[..., 0], float("-inf"))
    if dropout_mask is not None:
        probs = probs * dropout_mask / (1.0 - dropout_p)
    out = probs @ v  # (B, Hq, Sq, D)
    if cu_q is not None:
        out = out[0].transpose(0, 1)  # (total_q, heads, dim)
        lse = None if lse is None else lse[0]  # (heads, total_q)
    return (out.to(dtype), lse) if return_lse else out.to(dtype)


def _combined_window(causal: bool, window: Optional[tuple[int, int]]) -> tuple[int, int]:
    """(left, right) keys around the diagonal, -1 = unbounded; ``causal`` caps right at 0."""
    left, right = (-1, -1) if window is None else (int(window[0]), int(window[1]))
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def _window_mask(diagonal: torch.Tensor, key: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """Bool, broadcast of ``diagonal`` (a query's diagonal key) and ``key`` positions: key
    within ``[diagonal - left, diagonal + right]`` (-1: that side unbounded)."""
    allowed = torch.ones(torch.broadcast_shapes(diagonal.shape, key.shape), dtype=torch.bool, device=key.device)
    if right >= 0:
        allowed &= key <= diagonal + right
    if left >= 0:
        allowed &= key >= diagonal - left
    return allowed


def _document_positions(cu_seqlens: torch.Tensor, total: int):
    """(document, position inside it) of each of ``total`` packed tokens, and the lengths."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths,
                                  output_size=total)
    position = torch.arange(total, device=cu_seqlens.device) - cu_seqlens[doc].long()
    return doc, position, lengths


def _allowed_keys(batch, seq_q, seq_k, window, shift, key_padding_mask, device) -> Optional[torch.Tensor]:
    """Bool (B or 1, 1, Sq, Sk), True where query i may attend key j; None when all may.
    ``window`` = (left, right) around key ``i + shift`` (-1: unbounded; causal is right 0)."""
    allowed = None
    if window != (-1, -1):
        diagonal = torch.arange(seq_q, device=device)[:, None] + shift
        allowed = _window_mask(diagonal, torch.arange(seq_k, device=device)[None, :], *window)[None, None]
    if key_padding_mask is not None:
        padding = key_padding_mask[:, None, None, :]  # (B, 1, 1, Sk)
        allowed = padding.expand(batch, 1, seq_q, seq_k) if allowed is None else allowed & padding
    return allowed


def _repeat_kv(t: torch.Tensor, heads_q: int) -> torch.Tensor:
    """(B, Hkv, S, D) -> (B, Hq, S, D): each k/v head serves heads_q // Hkv query heads."""
    batch, heads_kv, seq, dim = t.shape
    group = heads_q // heads_kv
    if group == 1:
        return t
    return t[:, :, None].expand(batch, heads_kv, group, seq, dim).reshape(batch, heads_q, seq, dim)


# --------------------------------------------------------------------------- dropout RNG

# Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011)
# constants, as used by triton.language.random for 32-bit counters.
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * b for a < 2**32 and int64 b in [0, 2**32), without
    overflowing int64: split b into 16-bit halves."""
    low_part = a * (b & 0xFFFF)  # < 2**48
    high_part = a * (b >> 16)  # < 2**48
    hi = (high_part + (low_part >> 16)) >> 16
    lo = (((high_part & 0xFFFF) << 16) + low_part) & _MASK32
    return hi & _MASK32, lo


def _philox4x32(key: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four uint32 words (as int64 tensors) of Triton's ``tl.randint4x(key, offset)``
    for int64 keys and uint32 offsets (given here as int64 tensors in [0, 2**32))."""
    c0, c1 = offset, torch.zeros_like(offset)
    c2, c3 = torch.zeros_like(offset), torch.zeros_like(offset)
    k0, k1 = key & _MASK32, (key >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _MASK32, (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def _philox_uniform(key: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in [0, 1), bit-identical to Triton's ``tl.rand(key, offset)``."""
    c0 = _philox4x32(key, offset)[0]
    # Triton's uint_to_uniform_float: reinterpret as int32, fold negatives with ~x, scale.
    signed = torch.where(c0 >= 2**31, c0 - 2**32, c0)
    signed = torch.where(signed < 0, -signed - 1, signed).to(torch.int32)
    return signed.float() * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def attention_dropout_mask(
    seed, batch: int, heads_q: int, seq_q: int, seq_k: int, dropout_p: float,
    device=None, *, first_batch: int = 0,
) -> torch.Tensor:
    """Bool keep-mask ``(batch, heads_q, seq_q, seq_k)`` that the triton and torch backends
    apply for ``seed`` (an int or an int64 scalar tensor; see the module docstring). ``first_batch`` offsets the batch index,
    e.g. to the document index of a varlen slice."""
    if isinstance(seed, torch.Tensor):  # a drawn seed tensor (traceable by torch.compile)
        seed = seed.to(device=device, dtype=torch.int64)
    b = torch.arange(first_batch, first_batch + batch, device=device)[:, None, None, None]
    h = torch.arange(heads_q, device=device)[None, :, None, None]
    i = torch.arange(seq_q, device=device)[None, None, :, None]
    groups = (seq_k + 7) // 8  # one Philox call per 8 keys of a row
    g = torch.arange(groups, device=device)[None, None, None, :]
    key = seed + ((b * heads_q + h) << 32)  # (B, Hq, 1, 1)
    counter = (i * groups + g) & _MASK32  # (1, 1, Sq, G)
    key, counter = torch.broadcast_tensors(key, counter)
    words = torch.stack(_philox4x32(key, counter), dim=-1)  # (B, Hq, Sq, G, 4)
    # Key 8 g + t takes half t % 2 (low, high) of word t // 2: 16 random bits per decision.
    draws = torch.stack([words & 0xFFFF, words >> 16], dim=-1).flatten(-3)[..., :seq_k]  # (B, Hq, Sq, Sk)
    return draws >= attention_dropout_threshold(dropout_p)


_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash (the mixer lora_linear's dropout uses) on int64 tensors holding
    uint32 values: int64 products wrap modulo 2**64, which keeps their low 32 bits exact."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def torch_dropout_mask(
    seed, batch: int, heads_q: int, seq_q: int, seq_k: int, dropout_p: float,
    device=None, *, first_batch: int = 0,
) -> torch.Tensor:
    """Bool keep-mask ``(batch, heads_q, seq_q, seq_k)`` of the **torch** backend.

    A counter-based hash of (seed, batch, head, query, key): ~10 integer ops per score where
    reproducing Triton's Philox in torch costs ~100 (40x slower than SDPA itself on a CPU,
    measured), so CPU training with attention dropout keeps SDPA's speed. The torch and
    triton backends therefore drop different (equally distributed) scores; each backend is
    reproducible for a seed and replays its own mask in backward.
    """
    if isinstance(seed, torch.Tensor):  # a drawn seed tensor (traceable by torch.compile)
        seed = seed.to(device=device, dtype=torch.int64)
    rows = torch.arange(batch * heads_q * seq_q, device=device, dtype=torch.int64) + first_batch * heads_q * seq_q
    row_hash = _mix32((rows & _M32) ^ _mix32(torch.as_tensor(seed, device=device, dtype=torch.int64) & _M32))
    cols = torch.arange(seq_k, device=device, dtype=torch.int64)
    bits = _mix32(row_hash[:, None] ^ cols[None, :]) >> 8  # 24 uniform bits per score
    keep = bits >= math.ceil(dropout_p * (1 << 24))
    return keep.reshape(batch, heads_q, seq_q, seq_k)


def varlen_dropout_mask(seed: int, cu_seqlens: torch.Tensor, heads_q: int, dropout_p: float,
                        mask_fn=attention_dropout_mask, cu_seqlens_k: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bool keep-mask ``(heads_q, total_q, total_k)`` of a packed batch (False across
    documents); ``cu_seqlens`` packs the queries, ``cu_seqlens_k`` the keys (default: the
    same); ``mask_fn`` is ``attention_dropout_mask`` (triton) or ``torch_dropout_mask`` (torch)."""
    cu_seqlens_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    keep = torch.zeros(heads_q, int(cu_seqlens[-1]), int(cu_seqlens_k[-1]), dtype=torch.bool,
                       device=cu_seqlens.device)
    for doc, q_start, q_end, k_start, k_end in _documents(cu_seqlens, cu_seqlens_k):
        if k_end > k_start:
            keep[:, q_start:q_end, k_start:k_end] = mask_fn(
                seed, 1, heads_q, q_end - q_start, k_end - k_start, dropout_p, cu_seqlens.device, first_batch=doc)[0]
    return keep


# --------------------------------------------------------------------------- torch backend


def _torch_dense_forward(q, k, v, *, key_padding_mask, window, bottom_right, softcap, alibi_slopes, softmax_scale,
                         dropout_p, seed, first_batch=0, return_lse=False):
    """(B, Hq, Sq, D) attention in plain torch, differentiable: ``(out, lse or None)``.

    SDPA when it expresses the call (no softcap, ALiBi, dropout -- SDPA's mask cannot be
    replayed -- or lse), explicit fp32 math otherwise."""
    batch, heads_q, seq_q, _ = q.shape
    seq_k = k.shape[2]
    shift = seq_k - seq_q if bottom_right else 0
    if not (return_lse or softcap or alibi_slopes is not None or dropout_p > 0.0):
        k_rep, v_rep = _repeat_kv(k, heads_q), _repeat_kv(v, heads_q)
        if key_padding_mask is None and window in ((-1, -1), (-1, 0)) and (window == (-1, -1) or shift == 0):
            out = F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=window == (-1, 0), scale=softmax_scale)
            return out.contiguous(), None
        allowed = _allowed_keys(batch, seq_q, seq_k, window, shift, key_padding_mask, q.device)  # (B|1, 1, Sq, Sk)
        has_key = allowed.any(-1, keepdim=True)  # (B|1, 1, Sq, 1)
        # Rows with no key attend everything (no NaN) and are zeroed afterwards.
        out = F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=allowed | ~has_key, scale=softmax_scale)
        return out.masked_fill(~has_key, 0.0).contiguous(), None
    keep = None
    if dropout_p > 0.0:
        keep = torch_dropout_mask(seed, batch, heads_q, seq_q, seq_k, dropout_p, q.device, first_batch=first_batch)
    out, lse = attention_ref(q, k, v, window=window, causal_alignment=ALIGNMENTS[bottom_right], softcap=softcap,
                             alibi_slopes=alibi_slopes, key_padding_mask=key_padding_mask, softmax_scale=softmax_scale,
                             dropout_mask=keep, dropout_p=dropout_p, return_lse=True)
    return out.contiguous(), (lse if return_lse else None)


def _documents(cu_seqlens_q: torch.Tensor, cu_seqlens_k: Optional[torch.Tensor] = None):
    """(doc index, q start, q end, k start, k end) of each document of a packed batch with
    at least one query."""
    bounds_q = cu_seqlens_q.tolist()
    bounds_k = bounds_q if cu_seqlens_k is None or cu_seqlens_k is cu_seqlens_q else cu_seqlens_k.tolist()
    return [(doc, qs, qe, ks, ke) for doc, (qs, qe, ks, ke)
            in enumerate(zip(bounds_q[:-1], bounds_q[1:], bounds_k[:-1], bounds_k[1:])) if qe > qs]


def _as_batch(t: torch.Tensor) -> torch.Tensor:
    """(len, heads, dim) slice of a packed tensor -> (1, heads, len, dim)."""
    return t.transpose(0, 1)[None]


def _document_options(options: dict, doc: int) -> dict:
    """A packed call's options for one document as a dense (1, H, len, D) problem."""
    slopes = options["alibi_slopes"]
    if slopes is not None and slopes.dim() == 2:
        slopes = slopes[doc]
    return dict(key_padding_mask=None, window=options["window"], bottom_right=options["bottom_right"],
                softcap=options["softcap"], alibi_slopes=slopes, softmax_scale=options["softmax_scale"],
                dropout_p=options["dropout_p"], seed=options["seed"], first_batch=doc)


def _dense_options(options: dict) -> dict:
    return {name: options[name] for name in ("key_padding_mask", "window", "bottom_right", "softcap", "alibi_slopes",
                                             "softmax_scale", "dropout_p", "seed")}


def _torch_forward(q, k, v, *, return_lse, **options):
    cu_q, cu_k = options["cu_seqlens_q"], options["cu_seqlens_k"]
    if cu_q is None:
        out, lse = _torch_dense_forward(q, k, v, return_lse=return_lse, **_dense_options(options))
        return out, (lse if return_lse else q.new_empty(0, dtype=torch.float32))
    out = torch.zeros_like(q, memory_format=torch.contiguous_format)  # (Tq, Hq, D)
    lse = (torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device) if return_lse
           else q.new_empty(0, dtype=torch.float32))
    for doc, qs, qe, ks, ke in _documents(cu_q, cu_k):  # per document: no block-diagonal T x T mask
        if ke == ks:
            continue  # no key: out 0, lse -inf
        doc_out, doc_lse = _torch_dense_forward(_as_batch(q[qs:qe]), _as_batch(k[ks:ke]), _as_batch(v[ks:ke]),
                                                return_lse=return_lse, **_document_options(options, doc))
        out[qs:qe] = doc_out[0].transpose(0, 1)
        if return_lse:
            lse[:, qs:qe] = doc_lse[0]
    return out, lse


def _torch_dense_backward(grad_out, grad_lse, q, k, v, out, *, key_padding_mask, window, bottom_right, softcap,
                          alibi_slopes, softmax_scale, dropout_p, seed, first_batch=0):
    """Gradients of (B, Hq, Sq, D) attention by explicit fp32 math, recomputing the
    probabilities (the same equations the FlashAttention backward kernels use):

        P = softmax(S),  dV = (P∘Z)ᵀ dO,  dP = (dO Vᵀ)∘Z,  dS = P∘(dP - rowsum(dO∘O) + dlse),
        dS_raw = dS∘(1 - t²) with softcap (t = tanh(scale · QKᵀ / c)),
        dQ = scale · dS_raw K,  dK = scale · dS_rawᵀ Q

    with Z the dropout keep-mask divided by (1 - p) (all ones without dropout) and dlse the
    gradient of a returned lse (0 without).
    """
    batch, heads_q, seq_q, dim = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    shift = seq_k - seq_q if bottom_right else 0
    q32, k32, v32, do32 = q.float(), _repeat_kv(k, heads_q).float(), _repeat_kv(v, heads_q).float(), grad_out.float()
    scores = (q32 @ k32.transpose(-2, -1)) * softmax_scale  # (B, Hq, Sq, Sk)
    if softcap:
        tanh = torch.tanh(scores / softcap)
        scores = tanh * softcap
    if alibi_slopes is not None:
        distance = (torch.arange(seq_k, device=q.device)[None, :] - torch.arange(seq_q, device=q.device)[:, None]
                    - shift).abs()
        scores = scores - alibi_slopes.float().reshape(-1, heads_q)[:, :, None, None] * distance
    allowed = _allowed_keys(batch, seq_q, seq_k, window, shift, key_padding_mask, q.device)
    if allowed is not None:
        has_key = allowed.any(-1, keepdim=True)
        scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~has_key, 0.0)
    probs = torch.softmax(scores, dim=-1)
    if allowed is not None:
        probs = probs * has_key
    dropped = probs  # P∘Z
    if dropout_p > 0.0:
        keep = torch_dropout_mask(seed, batch, heads_q, seq_q, seq_k, dropout_p, q.device, first_batch=first_batch)
        dropped = probs * keep / (1.0 - dropout_p)
    grad_v = dropped.transpose(-2, -1) @ do32  # (B, Hq, Sk, D)
    grad_probs = do32 @ v32.transpose(-2, -1)  # (B, Hq, Sq, Sk)
    if dropout_p > 0.0:
        grad_probs = grad_probs * keep / (1.0 - dropout_p)
    delta = (do32 * out.float()).sum(-1, keepdim=True)  # (B, Hq, Sq, 1) = rowsum(P∘dP)
    if grad_lse is not None:  # d lse / d S = P
        delta = delta - grad_lse.float()[..., None]
    grad_scores = probs * (grad_probs - delta)
    if softcap:
        grad_scores = grad_scores * (1.0 - tanh * tanh)
    grad_q = (grad_scores @ k32) * softmax_scale
    grad_k = (grad_scores.transpose(-2, -1) @ q32) * softmax_scale  # (B, Hq, Sk, D)
    # GQA: a k/v head's gradient sums over the query heads of its group.
    group = heads_q // heads_kv
    grad_k = grad_k.reshape(batch, heads_kv, group, seq_k, dim).sum(2)
    grad_v = grad_v.reshape(batch, heads_kv, group, seq_k, dim).sum(2)
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)


def _torch_backward(grad_out, grad_lse, q, k, v, out, lse, **options):
    cu_q, cu_k = options["cu_seqlens_q"], options["cu_seqlens_k"]
    if cu_q is None:
        return _torch_dense_backward(grad_out, grad_lse, q, k, v, out, **_dense_options(options))
    grads = [torch.zeros_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)]
    for doc, qs, qe, ks, ke in _documents(cu_q, cu_k):
        if ke == ks:
            continue  # no key: nothing flows
        doc_grad_lse = None if grad_lse is None else grad_lse[:, qs:qe][None]  # (1, Hq, len_q)
        dq, dk, dv = _torch_dense_backward(
            _as_batch(grad_out[qs:qe]), doc_grad_lse, _as_batch(q[qs:qe]), _as_batch(k[ks:ke]),
            _as_batch(v[ks:ke]), _as_batch(out[qs:qe]), **_document_options(options, doc))
        grads[0][qs:qe], grads[1][ks:ke], grads[2][ks:ke] = (g[0].transpose(0, 1) for g in (dq, dk, dv))
    return tuple(grads)


# --------------------------------------------------------------------------- triton / cuda


def _triton_forward(q, k, v, *, return_lse, **options):
    from fastft.kernels.attention import attention_forward

    return attention_forward(q, k, v, **options)


def _triton_backward(grad_out, grad_lse, q, k, v, out, lse, **options):
    from fastft.kernels.attention import attention_backward

    return attention_backward(grad_out, q, k, v, out, lse, grad_lse=grad_lse, **options)


def _cuda_forward(q, k, v, *, return_lse, key_padding_mask, window, bottom_right, softcap, softmax_scale, **_refused):
    # varlen / dropout / ALiBi were refused by attention_cuda.reasons before we get here;
    # the wrapper copies only layouts its kernels cannot read in place.
    return attention_cuda.attention_forward(q, k, v, False, key_padding_mask, softmax_scale, window=window,
                                            bottom_right=bottom_right, softcap=softcap)


def _cuda_backward(grad_out, grad_lse, q, k, v, out, lse, *, key_padding_mask, window, bottom_right, softcap,
                   softmax_scale, **_refused):
    return attention_cuda.attention_backward(grad_out, q, k, v, out, lse, False, key_padding_mask, softmax_scale,
                                             window=window, bottom_right=bottom_right, softcap=softcap,
                                             grad_lse=grad_lse)


FORWARD = {"torch": _torch_forward, "triton": _triton_forward, "cuda": _cuda_forward}
BACKWARD = {"torch": _torch_backward, "triton": _triton_backward, "cuda": _cuda_backward}


def _triton_reasons(q, k, v, key_padding_mask, cu_seqlens) -> list[str]:
    """Why the Triton kernels (kernels/attention.py) cannot run these inputs."""
    found = triton_reasons([t for t in (q, k, v, key_padding_mask, cu_seqlens) if t is not None])
    if q.dtype not in FLOATS:
        found.append(f"dtype {q.dtype} is not fp16/bf16/fp32")
    elif q.dtype == torch.float32 and not interpreting_triton():
        found.append("fp32 runs on the torch backend on GPUs (the Triton kernels are for fp16/bf16)")
    if q.shape[-1] > TRITON_MAX_HEAD_DIM:
        found.append(f"head_dim={q.shape[-1]} > {TRITON_MAX_HEAD_DIM}")
    return found


def _torch_reasons(q) -> list[str]:
    return [] if q.dtype in FLOATS else [f"dtype {q.dtype} is not fp16/bf16/fp32"]


def backend_reasons(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
) -> dict:
    """For each backend, a function returning why it cannot run these inputs
    (``cu_seqlens``: the query offsets of a packed call, ``cu_seqlens`` or ``cu_seqlens_q``).
    Sliding windows, either causal alignment, softcap and the lse every backend runs."""
    return {
        "torch": lambda: _torch_reasons(q),
        "triton": lambda: _triton_reasons(q, k, v, key_padding_mask, cu_seqlens),
        "cuda": lambda: attention_cuda.reasons(q, k, v, key_padding_mask, cu_seqlens, dropout_p, alibi_slopes),
    }


# --------------------------------------------------------------------------- the op


def draw_dropout_seed(generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The int64 scalar tensor seed in ``[0, 2**31 - 1)`` that one dropout call draws from
    ``generator`` (default: torch's default CPU generator); every (batch, head, query,
    key) counter derives from it. Tests replay masks with it."""
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, 2**31 - 1, (), generator=generator, device=device, dtype=torch.int64)


def _seed_value(seed: Optional[torch.Tensor]) -> int:
    return 0 if seed is None else int(seed.item())


def _resolve_max_seqlen(cu_seqlens: Optional[torch.Tensor], max_seqlen: int) -> int:
    if cu_seqlens is None or max_seqlen > 0:
        return max_seqlen
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item()) if cu_seqlens.numel() > 1 else 0


def _options(key_padding_mask, cu_seqlens_q, cu_seqlens_k, alibi_slopes, seed, max_seqlen_q, max_seqlen_k,
             window_left, window_right, bottom_right, softcap, softmax_scale, dropout_p) -> dict:
    """The keyword options every backend's forward and backward take (module docstring)."""
    return dict(key_padding_mask=key_padding_mask, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                max_seqlen_q=_resolve_max_seqlen(cu_seqlens_q, max_seqlen_q),
                max_seqlen_k=_resolve_max_seqlen(cu_seqlens_k, max_seqlen_k),
                window=(window_left, window_right), bottom_right=bottom_right, softcap=softcap,
                alibi_slopes=alibi_slopes, softmax_scale=softmax_scale, dropout_p=dropout_p, seed=_seed_value(seed))


@torch.library.custom_op("fastft::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    cu_seqlens_q: Optional[torch.Tensor],
    cu_seqlens_k: Optional[torch.Tensor],
    alibi_slopes: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    window_left: int,
    window_right: int,
    bottom_right: bool,
    softcap: float,
    softmax_scale: float,
    dropout_p: float,
    return_lse: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out, lse); lse is empty for the torch backend unless ``return_lse``."""
    options = _options(key_padding_mask, cu_seqlens_q, cu_seqlens_k, alibi_slopes, seed, max_seqlen_q, max_seqlen_k,
                       window_left, window_right, bottom_right, softcap, softmax_scale, dropout_p)
    with autocast_off(q.device.type):  # q, k, v carry the compute dtype (attention casts under autocast)
        return FORWARD[backend](q, k, v, return_lse=return_lse, **options)


def _lse_shape(q, cu_seqlens_q, backend, return_lse):
    if backend == "torch" and not return_lse:
        return (0,)
    if cu_seqlens_q is not None:
        return (q.shape[1], q.shape[0])  # (Hq, total_q)
    return tuple(q.shape[:3])  # (B, Hq, Sq)


@_attention_op.register_fake
def _(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, alibi_slopes, seed, max_seqlen_q, max_seqlen_k,
      window_left, window_right, bottom_right, softcap, softmax_scale, dropout_p, return_lse, backend):
    out = q.new_empty(q.shape)
    lse = q.new_empty(_lse_shape(q, cu_seqlens_q, backend, return_lse), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("fastft::attention_backward", mutates_args=())
def _attention_backward_op(
    grad_out: torch.Tensor,
    grad_lse: Optional[torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    cu_seqlens_q: Optional[torch.Tensor],
    cu_seqlens_k: Optional[torch.Tensor],
    alibi_slopes: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    window_left: int,
    window_right: int,
    bottom_right: bool,
    softcap: float,
    softmax_scale: float,
    dropout_p: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv) in the dtypes and shapes of q, k, v (dk/dv with k's heads);
    ``grad_lse`` is the lse's gradient when the caller asked for the lse (else None)."""
    options = _options(key_padding_mask, cu_seqlens_q, cu_seqlens_k, alibi_slopes, seed, max_seqlen_q, max_seqlen_k,
                       window_left, window_right, bottom_right, softcap, softmax_scale, dropout_p)
    with autocast_off(q.device.type):  # a backward run inside the caller's autocast block
        grads = BACKWARD[backend](grad_out, grad_lse, q, k, v, out, lse, **options)
    return tuple(g.contiguous() for g in grads)


@_attention_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k, alibi_slopes, seed,
      max_seqlen_q, max_seqlen_k, window_left, window_right, bottom_right, softcap, softmax_scale, dropout_p, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    (q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, alibi_slopes, seed, *arguments) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k, alibi_slopes, seed)
    *ctx.arguments, ctx.return_lse, ctx.backend = arguments
    if not ctx.return_lse:
        ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k, alibi_slopes, seed = ctx.saved_tensors
    grad_lse = grad_lse.contiguous() if ctx.return_lse and grad_lse is not None else None
    grad_q, grad_k, grad_v = _attention_backward_op(
        grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k, alibi_slopes, seed,
        *ctx.arguments, ctx.backend)
    return (grad_q, grad_k, grad_v) + (None,) * 15


_attention_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- validation


def _validate(q, k, v, causal, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
              softmax_scale, dropout_p, window, causal_alignment, softcap, alibi_slopes):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOATS:
            raise TypeError(f"{name} must be fp32, fp16 or bf16, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} dtype {t.dtype} does not match q dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    varlen = cu_seqlens_q is not None
    layout = "(total_tokens, heads, head_dim)" if varlen else "(batch, heads, seq, head_dim)"
    rank = 3 if varlen else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != rank:
            raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    head_axis = 1
    heads_q, heads_kv = q.shape[head_axis], k.shape[head_axis]
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k head_dim {k.shape[-1]} does not match q head_dim {q.shape[-1]}")
    if heads_kv == 0 or heads_q % heads_kv:
        raise ValueError(f"k/v heads ({heads_kv}) must divide q heads ({heads_q}) (grouped-query attention)")
    if q.shape[-1] == 0:
        raise ValueError("head_dim must be at least 1")
    if varlen:
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask cannot be combined with cu_seqlens (packed batches have no padding)")
        same = cu_seqlens_k is cu_seqlens_q
        if same and k.shape[0] != q.shape[0]:
            raise ValueError(f"with cu_seqlens, k and v must have q's total_tokens {q.shape[0]}, got {k.shape[0]}")
        _validate_cu_seqlens(cu_seqlens_q, q, max_seqlen_q, "cu_seqlens" if same else "cu_seqlens_q",
                             "max_seqlen" if same else "max_seqlen_q")
        if not same:
            _validate_cu_seqlens(cu_seqlens_k, k, max_seqlen_k, "cu_seqlens_k", "max_seqlen_k")
            if cu_seqlens_k.shape != cu_seqlens_q.shape:
                raise ValueError(f"cu_seqlens_q and cu_seqlens_k must count the same documents, got "
                                 f"{tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}")
    else:
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"k batch {k.shape[0]} does not match q batch {q.shape[0]}")
        if min(q.shape[0], q.shape[2], k.shape[2]) == 0:
            raise ValueError(f"batch, seq_q and seq_k must be at least 1, got q {tuple(q.shape)}, k {tuple(k.shape)}")
        if max_seqlen_q is not None or max_seqlen_k is not None:
            raise ValueError("max_seqlen is only meaningful with cu_seqlens")
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, torch.Tensor):
                raise TypeError(f"key_padding_mask must be a torch.Tensor or None, got {type(key_padding_mask).__name__}")
            if key_padding_mask.dtype != torch.bool:
                raise TypeError(f"key_padding_mask must be bool (True = attend), got {key_padding_mask.dtype}")
            expected = (q.shape[0], k.shape[2])
            if tuple(key_padding_mask.shape) != expected:
                raise ValueError(f"key_padding_mask must have shape (batch, seq_k) = {expected}, "
                                 f"got {tuple(key_padding_mask.shape)}")
            if key_padding_mask.device != q.device:
                raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be a finite number or None, got {softmax_scale!r}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if window is not None and not (isinstance(window, (tuple, list)) and len(window) == 2
                                   and all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window)):
        raise ValueError(f"window must be None or (left, right), two ints >= -1 (-1: unbounded), got {window!r}")
    if causal_alignment not in ALIGNMENTS:
        raise ValueError(f"causal_alignment must be one of {ALIGNMENTS}, got {causal_alignment!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and not isinstance(softcap, bool)
                                    and math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap must be None or a finite number >= 0 (0: off), got {softcap!r}")
    if alibi_slopes is not None:
        batch = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
        if not isinstance(alibi_slopes, torch.Tensor) or alibi_slopes.dtype != torch.float32:
            raise TypeError(f"alibi_slopes must be an fp32 tensor, got "
                            f"{getattr(alibi_slopes, 'dtype', type(alibi_slopes).__name__)}")
        if tuple(alibi_slopes.shape) not in ((heads_q,), (batch, heads_q)):
            raise ValueError(f"alibi_slopes must have shape (heads_q,) = ({heads_q},) or (batch, heads_q) = "
                             f"({batch}, {heads_q}), got {tuple(alibi_slopes.shape)}")
        if alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes is on {alibi_slopes.device} but q is on {q.device}")


def _validate_cu_seqlens(cu_seqlens, t, max_seqlen, name="cu_seqlens", max_name="max_seqlen"):
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must have shape (num_docs + 1,) with num_docs >= 1, got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != t.device:
        raise ValueError(f"{name} is on {cu_seqlens.device} but q is on {t.device}")
    if max_seqlen is not None and (not isinstance(max_seqlen, int) or max_seqlen < 1):
        raise ValueError(f"{max_name} must be a positive int or None, got {max_seqlen!r}")
    if torch.compiler.is_compiling():
        return  # value checks read the tensor (a device sync / graph break): done eagerly only
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"{name} must start at 0, got {bounds[0]}")
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    if min(lengths) < 0:
        raise ValueError(f"{name} must be non-decreasing, got {bounds}")
    if bounds[-1] != t.shape[0]:
        raise ValueError(f"{name} must end at total_tokens={t.shape[0]}, got {bounds[-1]}")
    if max_seqlen is not None and max_seqlen < max(lengths):
        raise ValueError(f"{max_name}={max_seqlen} is smaller than the longest document ({max(lengths)})")


def _packing(cu_seqlens, cu_seqlens_q, cu_seqlens_k, max_seqlen, max_seqlen_q, max_seqlen_k):
    """(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) from the two ways of
    passing them: ``cu_seqlens`` (+ ``max_seqlen``) for both, or one of each."""
    if cu_seqlens is not None:
        if cu_seqlens_q is not None or cu_seqlens_k is not None:
            raise ValueError("pass either cu_seqlens or cu_seqlens_q and cu_seqlens_k, not both")
        if max_seqlen_q is not None or max_seqlen_k is not None:
            raise ValueError("with cu_seqlens, give max_seqlen (max_seqlen_q / max_seqlen_k go with cu_seqlens_q / _k)")
        return cu_seqlens, cu_seqlens, max_seqlen, max_seqlen
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("cu_seqlens_q and cu_seqlens_k go together (cu_seqlens: the same offsets for both)")
    if max_seqlen is not None:
        if cu_seqlens_q is not None:
            raise ValueError("with cu_seqlens_q / cu_seqlens_k, give max_seqlen_q / max_seqlen_k")
        raise ValueError("max_seqlen is only meaningful with cu_seqlens")
    return cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window: Optional[tuple[int, int]] = None,
    causal_alignment: str = "top-left",
    softcap: Optional[float] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    softmax_scale: Optional[float] = None,
    dropout_p: float = 0.0,
    generator: Optional[torch.Generator] = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Scaled-dot-product attention ``softmax(q kᵀ · scale) v``, as SDPA, fused.

    Args:
        q: ``(batch, heads_q, seq_q, head_dim)`` fp16 / bf16 / fp32; packed,
            ``(total_q, heads_q, head_dim)``. Any strides.
        k, v: ``(batch, heads_kv, seq_k, head_dim)`` (packed: ``(total_k, heads_kv,
            head_dim)``), same dtype and device as ``q``; ``heads_kv`` divides ``heads_q``
            (grouped-query / multi-query attention: query head ``h`` uses k/v head
            ``h // (heads_q // heads_kv)``). ``seq_k`` may differ from ``seq_q``.
        causal: query ``i`` attends keys ``j <= i + shift`` (module docstring; with packed
            batches, positions inside each document).
        window: ``(left, right)``: query ``i`` attends keys ``i + shift - left <= j <= i +
            shift + right``; -1 leaves that side unbounded. With ``causal``, ``right`` is 0
            (Mistral's ``sliding_window = W`` is ``causal=True, window=(W - 1, -1)``). The
            kernels skip key blocks wholly outside the window instead of masking them.
        causal_alignment: ``"top-left"`` (default, SDPA's ``is_causal``: ``shift = 0``) or
            ``"bottom-right"`` (FlashAttention's, what KV-cached decoding and chunked
            prefill need: ``shift = seq_k - seq_q``, per document when packed). Places
            the window too.
        softcap: ``c > 0`` caps the scaled scores at ``c · tanh(s / c)`` before the softmax
            (Gemma 2's attention logit soft-capping); None or 0: off.
        alibi_slopes: optional fp32 ``(heads_q,)`` or ``(batch, heads_q)`` (packed:
            ``(num_docs, heads_q)``): adds ``-slope · |i + shift - j|`` to the scores
            (after softcap). No gradient flows to the slopes.
        key_padding_mask: optional ``(batch, seq_k)`` bool, True = attend; padded keys never
            get weight. Not allowed with packed batches.
        cu_seqlens: optional ``(num_docs + 1,)`` int32 cumulative document lengths of a packed
            batch, starting at 0, non-decreasing, ending at ``total_tokens``; tokens attend
            only inside their document.
        max_seqlen: optional longest document length with ``cu_seqlens`` (saves a device
            sync; computed when None).
        cu_seqlens_q, cu_seqlens_k: instead of ``cu_seqlens``, separate offsets for the
            packed queries and keys of each document (e.g. a chunk of new tokens per
            document attending to its cached keys), each as ``cu_seqlens``.
        max_seqlen_q, max_seqlen_k: their longest documents, as ``max_seqlen``.
        softmax_scale: multiplies the scores; default ``head_dim ** -0.5``.
        dropout_p: attention-dropout probability in ``[0, 1)``; pass 0 at evaluation.
        generator: the ``torch.Generator`` a dropout call draws its seed from (default:
            torch's default CPU generator). The same generator state gives the same mask
            (the triton and torch backends give identical masks; module docstring).
        return_lse: also return the log-sum-exp of each query row's scores (differentiable:
            its gradient flows into q and k), e.g. to merge attention over key chunks.
        backend: ``"auto" | "cuda" | "triton" | "torch"`` (``FASTFT_BACKEND`` overrides auto).

    Under ``torch.autocast``, q, k and v are cast to the autocast dtype first (as SDPA
    does there) and the op computes as it would for inputs of that dtype.

    Returns:
        ``out`` with ``q``'s shape and dtype (contiguous); with ``return_lse``, ``(out, lse)``
        where ``lse`` is fp32 ``(batch, heads_q, seq_q)`` (packed: ``(heads_q, total_q)``),
        the natural-log ``logsumexp`` of each row's masked scores. Query rows with no key
        to attend (every key padded or outside the window, or causal and the visible keys
        padded) are 0, have ``lse = -inf`` and pass back a 0 gradient; SDPA would give NaN
        there.

    Raises:
        TypeError: non-tensor inputs, non-float / mismatched dtypes, a non-bool
            ``key_padding_mask``, ``cu_seqlens`` that is not int32, ``alibi_slopes`` not fp32.
        ValueError: mismatched shapes, heads or devices; a mask of the wrong shape;
            ``cu_seqlens`` not starting at 0, decreasing or not ending at ``total_tokens``;
            both ``cu_seqlens`` and ``cu_seqlens_q/k``; ``dropout_p`` outside ``[0, 1)``; a
            window side below -1; an unknown ``causal_alignment``; a negative ``softcap``;
            a backend that cannot run these inputs (e.g. a head_dim it does not support:
            the message lists every reason).
    """
    autocast_to = autocast_dtype(q.device.type) if isinstance(q, torch.Tensor) else None
    if autocast_to is not None:  # as SDPA under autocast: q, k, v in the autocast dtype
        q, k, v = (t.to(autocast_to) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in (q, k, v))
    cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k = _packing(
        cu_seqlens, cu_seqlens_q, cu_seqlens_k, max_seqlen, max_seqlen_q, max_seqlen_k)
    _validate(q, k, v, causal, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
              softmax_scale, dropout_p, window, causal_alignment, softcap, alibi_slopes)
    chosen = choose_backend("attention", backend,
                            backend_reasons(q, k, v, key_padding_mask, cu_seqlens_q, dropout_p, alibi_slopes),
                            PRIORITY, q.device)
    scale = float(q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale)
    window_left, window_right = _combined_window(causal, window)
    bottom_right = causal_alignment == "bottom-right"
    softcap = float(softcap or 0.0)
    seed = draw_dropout_seed(generator) if dropout_p > 0.0 else None
    if chosen == "torch" and cu_seqlens_q is None:
        # Plain differentiable torch: autograd then uses SDPA's own fused backward (about
        # 2x faster on a CPU than recomputing explicitly inside the custom op), and
        # torch.compile traces SDPA natively. Varlen keeps the op (its loop is opaque).
        # Autocast off: the dropout path's explicit fp32 math must stay fp32.
        with autocast_off(q.device.type):
            out, lse = _torch_dense_forward(
                q, k, v, key_padding_mask=key_padding_mask, window=(window_left, window_right),
                bottom_right=bottom_right, softcap=softcap, alibi_slopes=alibi_slopes, softmax_scale=scale,
                dropout_p=float(dropout_p), seed=seed, return_lse=return_lse)
        return (out, lse) if return_lse else out
    out, lse = _attention_op(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, alibi_slopes, seed,
                             int(max_seqlen_q or 0), int(max_seqlen_k or 0), window_left, window_right, bottom_right,
                             softcap, scale, float(dropout_p), bool(return_lse), chosen)
    return (out, lse) if return_lse else out
