"""Fused scaled-dot-product attention: forward and backward, masks, varlen, GQA, dropout.

``attention(q, k, v)`` equals ``torch.nn.functional.scaled_dot_product_attention`` on the
layout ``(batch, heads, seq, head_dim)``, with what transformer training needs on top:

* ``causal`` masking, aligned top-left exactly like SDPA's ``is_causal`` (see below);
* ``key_padding_mask`` ``(batch, seq_k)`` bool, True = attend (Hugging Face's convention);
* packed variable-length batches (``cu_seqlens``), no attention across documents;
* grouped-query / multi-query attention (k and v have fewer heads than q);
* attention dropout whose mask is replayed exactly in backward;
* query rows with no key to attend output 0 and get 0 gradient (SDPA gives NaN).

Causal alignment when ``seq_q != seq_k`` is SDPA's: query ``i`` attends keys ``j <= i``
(the mask is ``torch.ones(seq_q, seq_k).tril()``), *not* FlashAttention's bottom-right
alignment. ``x`` = attends::

    seq_q=3, seq_k=5            seq_q=5, seq_k=3
         k: 0 1 2 3 4                k: 0 1 2
      q0    x . . . .             q0    x . .
      q1    x x . . .             q1    x x .
      q2    x x x . .             q2    x x x
                                  q3    x x x
                                  q4    x x x

Every backend implements two functions over the same arguments,

    forward(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, causal, softmax_scale,
            dropout_p, seed) -> out, lse
    backward(grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen,
             causal, softmax_scale, dropout_p, seed) -> dq, dk, dv

where ``lse`` is the fp32 natural-log log-sum-exp of each query row's scaled scores
(``(batch, heads_q, seq_q)``, or ``(heads_q, total_tokens)`` for varlen; ``-inf`` for a row
with no key) that the FlashAttention backward needs to rebuild the probabilities. The
triton and cuda backends share one autograd wiring through the custom op
``fastft::attention`` (+ ``fastft::attention_backward``), so torch.compile sees them as
opaque nodes without graph breaks. The torch backend on dense inputs is plain
differentiable torch instead (SDPA, whose own fused backward beats any recomputation, and
which torch.compile traces natively); on packed inputs it runs through the op too, with a
per-document loop, recomputing the probabilities in backward (its ``lse`` is empty).
Validation, dispatch and seeding are shared and live in this file.

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


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    dropout_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    upcast: bool = True,
    return_lse: bool = False,
):
    """Plain PyTorch attention, every score materialised: the oracle for tests.

    Same arguments and layouts as :func:`attention`. ``dropout_mask`` is an explicit bool
    keep-mask ``(batch, heads_q, seq_q, seq_k)`` (``(heads_q, total, total)`` for varlen);
    kept probabilities are scaled by ``1 / (1 - dropout_p)``. With ``upcast=True`` the math
    runs in fp32; ``upcast=False`` runs in the input dtype, which is what an unfused model
    does and what the tolerance rule compares against. Returns ``out`` in ``q``'s dtype;
    with ``return_lse``, ``(out, lse)`` where ``lse`` is what the fused backends keep for
    backward: the fp32 natural-log log-sum-exp of each query row's scaled, masked scores
    (``(batch, heads_q, seq_q)``, ``(heads_q, total)`` for varlen; ``-inf`` for a row with
    no key), taken in fp32 over the scores as computed (in the input dtype without upcast).
    """
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    if cu_seqlens is not None:
        # Packed (total, heads, dim) -> one "batch" of all tokens with a block-diagonal mask.
        doc_of_token = _document_ids(cu_seqlens, q.shape[0])  # (total,)
        position = torch.arange(q.shape[0], device=q.device) - cu_seqlens[doc_of_token].long()
        allowed = doc_of_token[:, None] == doc_of_token[None, :]  # (total, total)
        if causal:
            allowed &= position[None, :] <= position[:, None]
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, heads, total, dim)
        allowed = allowed[None, None]  # (1, 1, total, total)
        if dropout_mask is not None:
            dropout_mask = dropout_mask[None]
    else:
        allowed = _allowed_keys(q.shape[0], q.shape[2], k.shape[2], causal, key_padding_mask, q.device)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])  # GQA: (B, Hq, Sk, D)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, Hq, Sq, Sk)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = scores.float().logsumexp(dim=-1) if return_lse else None  # (B, Hq, Sq), -inf without a key
    if allowed is not None:
        # A row with no key would be softmax(all -inf) = NaN: give it uniform scores and
        # zero its probabilities afterwards, so it outputs 0 and passes back 0.
        has_key = allowed.any(-1, keepdim=True)  # (B, 1, Sq, 1)
        scores = scores.masked_fill(~has_key, 0.0)
    probs = torch.softmax(scores, dim=-1)
    if allowed is not None:
        probs = probs * has_key
    if dropout_mask is not None:
        probs = probs * dropout_mask / (1.0 - dropout_p)
    out = probs @ v  # (B, Hq, Sq, D)
    if cu_seqlens is not None:
        out = out[0].transpose(0, 1)  # (total, heads, dim)
        lse = None if lse is None else lse[0]  # (heads, total)
    return (out.to(dtype), lse) if return_lse else out.to(dtype)


def _document_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) int64: the document each packed token belongs to."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths, output_size=total)


def _allowed_keys(batch, seq_q, seq_k, causal, key_padding_mask, device) -> Optional[torch.Tensor]:
    """Bool (B or 1, 1, Sq, Sk), True where query i may attend key j; None when all may."""
    allowed = None
    if causal:  # top-left aligned, as SDPA's is_causal
        allowed = torch.ones(seq_q, seq_k, dtype=torch.bool, device=device).tril()[None, None]
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
                        mask_fn=attention_dropout_mask) -> torch.Tensor:
    """Bool keep-mask ``(heads_q, total, total)`` of a packed batch (False across documents);
    ``mask_fn`` is ``attention_dropout_mask`` (triton) or ``torch_dropout_mask`` (torch)."""
    bounds = cu_seqlens.tolist()
    total = bounds[-1]
    keep = torch.zeros(heads_q, total, total, dtype=torch.bool, device=cu_seqlens.device)
    for doc, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if end > start:
            length = end - start
            keep[:, start:end, start:end] = mask_fn(
                seed, 1, heads_q, length, length, dropout_p, cu_seqlens.device, first_batch=doc)[0]
    return keep


# --------------------------------------------------------------------------- torch backend


def _torch_dense_forward(q, k, v, causal, key_padding_mask, scale, dropout_p, seed, first_batch):
    """(B, Hq, Sq, D) attention in plain torch: SDPA when it expresses the mask (no
    dropout: SDPA's dropout mask cannot be replayed), explicit fp32 math otherwise."""
    batch, heads_q, seq_q, _ = q.shape
    seq_k = k.shape[2]
    k_rep, v_rep = _repeat_kv(k, heads_q), _repeat_kv(v, heads_q)
    if dropout_p == 0.0:
        if key_padding_mask is None:
            out = F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=causal, scale=scale)
            return out.contiguous()
        allowed = _allowed_keys(batch, seq_q, seq_k, causal, key_padding_mask, q.device)  # (B, 1, Sq, Sk)
        has_key = allowed.any(-1, keepdim=True)  # (B, 1, Sq, 1)
        # Rows with no key attend everything (no NaN) and are zeroed afterwards.
        out = F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=allowed | ~has_key, scale=scale)
        return out.masked_fill(~has_key, 0.0).contiguous()
    keep = torch_dropout_mask(seed, batch, heads_q, seq_q, seq_k, dropout_p, q.device, first_batch=first_batch)
    return attention_ref(q, k, v, causal=causal, key_padding_mask=key_padding_mask, softmax_scale=scale,
                         dropout_mask=keep, dropout_p=dropout_p).contiguous()


def _torch_dense_backward(grad_out, q, k, v, out, causal, key_padding_mask, scale, dropout_p, seed, first_batch):
    """Gradients of (B, Hq, Sq, D) attention by explicit fp32 math, recomputing the
    probabilities (the same equations the FlashAttention backward kernels use):

        P = softmax(S),  dV = (P∘Z)ᵀ dO,  dP = (dO Vᵀ)∘Z,  dS = P∘(dP - rowsum(dO∘O)),
        dQ = scale · dS K,  dK = scale · dSᵀ Q

    with Z the dropout keep-mask divided by (1 - p) (all ones without dropout).
    """
    batch, heads_q, seq_q, dim = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    q32, k32, v32, do32 = q.float(), _repeat_kv(k, heads_q).float(), _repeat_kv(v, heads_q).float(), grad_out.float()
    scores = (q32 @ k32.transpose(-2, -1)) * scale  # (B, Hq, Sq, Sk)
    allowed = _allowed_keys(batch, seq_q, seq_k, causal, key_padding_mask, q.device)
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
    grad_scores = probs * (grad_probs - delta)
    grad_q = (grad_scores @ k32) * scale
    grad_k = (grad_scores.transpose(-2, -1) @ q32) * scale  # (B, Hq, Sk, D)
    # GQA: a k/v head's gradient sums over the query heads of its group.
    group = heads_q // heads_kv
    grad_k = grad_k.reshape(batch, heads_kv, group, seq_k, dim).sum(2)
    grad_v = grad_v.reshape(batch, heads_kv, group, seq_k, dim).sum(2)
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)


def _documents(cu_seqlens: torch.Tensor):
    """(doc index, start, end) of each non-empty document of a packed batch."""
    bounds = cu_seqlens.tolist()
    return [(doc, s, e) for doc, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])) if e > s]


def _as_batch(t: torch.Tensor) -> torch.Tensor:
    """(len, heads, dim) slice of a packed tensor -> (1, heads, len, dim)."""
    return t.transpose(0, 1)[None]


def _torch_forward(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, causal, scale, dropout_p, seed):
    empty_lse = q.new_empty(0, dtype=torch.float32)
    if cu_seqlens is None:
        return _torch_dense_forward(q, k, v, causal, key_padding_mask, scale, dropout_p, seed, 0), empty_lse
    out = torch.zeros_like(q, memory_format=torch.contiguous_format)  # (total, Hq, D)
    for doc, start, end in _documents(cu_seqlens):  # per document: no block-diagonal T x T mask
        doc_out = _torch_dense_forward(_as_batch(q[start:end]), _as_batch(k[start:end]), _as_batch(v[start:end]),
                                       causal, None, scale, dropout_p, seed, doc)
        out[start:end] = doc_out[0].transpose(0, 1)
    return out, empty_lse


def _torch_backward(grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, causal, scale,
                    dropout_p, seed):
    if cu_seqlens is None:
        return _torch_dense_backward(grad_out, q, k, v, out, causal, key_padding_mask, scale, dropout_p, seed, 0)
    grad_q = torch.zeros_like(q, memory_format=torch.contiguous_format)
    grad_k = torch.zeros_like(k, memory_format=torch.contiguous_format)
    grad_v = torch.zeros_like(v, memory_format=torch.contiguous_format)
    for doc, start, end in _documents(cu_seqlens):
        dq, dk, dv = _torch_dense_backward(
            _as_batch(grad_out[start:end]), _as_batch(q[start:end]), _as_batch(k[start:end]),
            _as_batch(v[start:end]), _as_batch(out[start:end]), causal, None, scale, dropout_p, seed, doc)
        grad_q[start:end], grad_k[start:end], grad_v[start:end] = (g[0].transpose(0, 1) for g in (dq, dk, dv))
    return grad_q, grad_k, grad_v


# --------------------------------------------------------------------------- triton / cuda


def _triton_forward(*args):
    from fastft.kernels.attention import attention_forward

    return attention_forward(*args)


def _triton_backward(*args):
    from fastft.kernels.attention import attention_backward

    return attention_backward(*args)


def _cuda_forward(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, causal, scale, dropout_p, seed):
    # cu_seqlens / dropout were refused by attention_cuda.reasons before we get here; the
    # wrapper copies only layouts its kernels cannot read in place.
    return attention_cuda.attention_forward(q, k, v, causal, key_padding_mask, scale)


def _cuda_backward(grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, causal, scale,
                   dropout_p, seed):
    return attention_cuda.attention_backward(grad_out, q, k, v, out, lse, causal, key_padding_mask, scale)


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
) -> dict:
    """For each backend, a function returning why it cannot run these inputs."""
    return {
        "torch": lambda: _torch_reasons(q),
        "triton": lambda: _triton_reasons(q, k, v, key_padding_mask, cu_seqlens),
        "cuda": lambda: attention_cuda.reasons(q, k, v, key_padding_mask, cu_seqlens, dropout_p),
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


@torch.library.custom_op("fastft::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    max_seqlen: int,
    causal: bool,
    softmax_scale: float,
    dropout_p: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out, lse); lse is empty for the torch backend (see the module docstring)."""
    max_seqlen = _resolve_max_seqlen(cu_seqlens, max_seqlen)
    return FORWARD[backend](q, k, v, key_padding_mask, cu_seqlens, max_seqlen, causal, softmax_scale,
                            dropout_p, _seed_value(seed))


def _lse_shape(q, cu_seqlens, backend):
    if backend == "torch":
        return (0,)
    if cu_seqlens is not None:
        return (q.shape[1], q.shape[0])  # (Hq, total)
    return tuple(q.shape[:3])  # (B, Hq, Sq)


@_attention_op.register_fake
def _(q, k, v, key_padding_mask, cu_seqlens, seed, max_seqlen, causal, softmax_scale, dropout_p, backend):
    out = q.new_empty(q.shape)
    lse = q.new_empty(_lse_shape(q, cu_seqlens, backend), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("fastft::attention_backward", mutates_args=())
def _attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    max_seqlen: int,
    causal: bool,
    softmax_scale: float,
    dropout_p: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv) in the dtypes and shapes of q, k, v (dk/dv with k's heads)."""
    max_seqlen = _resolve_max_seqlen(cu_seqlens, max_seqlen)
    grads = BACKWARD[backend](grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, causal,
                              softmax_scale, dropout_p, _seed_value(seed))
    return tuple(g.contiguous() for g in grads)


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens, seed, max_seqlen, causal, softmax_scale,
      dropout_p, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, cu_seqlens, seed, max_seqlen, causal, softmax_scale, dropout_p, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, cu_seqlens, seed)
    ctx.args = (max_seqlen, causal, softmax_scale, dropout_p, backend)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, key_padding_mask, cu_seqlens, seed = ctx.saved_tensors
    max_seqlen, causal, softmax_scale, dropout_p, backend = ctx.args
    grad_q, grad_k, grad_v = _attention_backward_op(
        grad_out, q, k, v, out, lse, key_padding_mask, cu_seqlens, seed, max_seqlen, causal, softmax_scale,
        dropout_p, backend)
    return grad_q, grad_k, grad_v, None, None, None, None, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- validation


def _validate(q, k, v, causal, key_padding_mask, cu_seqlens, max_seqlen, softmax_scale, dropout_p):
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
    varlen = cu_seqlens is not None
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
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"with cu_seqlens, k and v must have q's total_tokens {q.shape[0]}, got {k.shape[0]}")
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask cannot be combined with cu_seqlens (packed batches have no padding)")
        _validate_cu_seqlens(cu_seqlens, q, max_seqlen)
    else:
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"k batch {k.shape[0]} does not match q batch {q.shape[0]}")
        if min(q.shape[0], q.shape[2], k.shape[2]) == 0:
            raise ValueError(f"batch, seq_q and seq_k must be at least 1, got q {tuple(q.shape)}, k {tuple(k.shape)}")
        if max_seqlen is not None:
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


def _validate_cu_seqlens(cu_seqlens, q, max_seqlen):
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor or None, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must have shape (num_docs + 1,) with num_docs >= 1, got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if max_seqlen is not None and (not isinstance(max_seqlen, int) or max_seqlen < 1):
        raise ValueError(f"max_seqlen must be a positive int or None, got {max_seqlen!r}")
    if torch.compiler.is_compiling():
        return  # value checks read the tensor (a device sync / graph break): done eagerly only
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    if min(lengths) < 0:
        raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds}")
    if bounds[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens must end at total_tokens={q.shape[0]}, got {bounds[-1]}")
    if max_seqlen is not None and max_seqlen < max(lengths):
        raise ValueError(f"max_seqlen={max_seqlen} is smaller than the longest document ({max(lengths)})")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    softmax_scale: Optional[float] = None,
    dropout_p: float = 0.0,
    generator: Optional[torch.Generator] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Scaled-dot-product attention ``softmax(q kᵀ · scale) v``, as SDPA, fused.

    Args:
        q: ``(batch, heads_q, seq_q, head_dim)`` fp16 / bf16 / fp32; with ``cu_seqlens``,
            ``(total_tokens, heads_q, head_dim)``. Any strides.
        k, v: ``(batch, heads_kv, seq_k, head_dim)`` (``(total_tokens, heads_kv, head_dim)``
            with ``cu_seqlens``), same dtype and device as ``q``; ``heads_kv`` divides
            ``heads_q`` (grouped-query / multi-query attention: query head ``h`` uses k/v
            head ``h // (heads_q // heads_kv)``). ``seq_k`` may differ from ``seq_q``.
        causal: query ``i`` attends keys ``j <= i``, top-left aligned as SDPA's ``is_causal``
            (drawing in the module docstring); with ``cu_seqlens``, positions inside each
            document.
        key_padding_mask: optional ``(batch, seq_k)`` bool, True = attend; padded keys never
            get weight. Not allowed with ``cu_seqlens``.
        cu_seqlens: optional ``(num_docs + 1,)`` int32 cumulative document lengths of a packed
            batch, starting at 0, non-decreasing, ending at ``total_tokens``; tokens attend
            only inside their document.
        max_seqlen: optional longest document length with ``cu_seqlens`` (saves a device
            sync; computed when None).
        softmax_scale: multiplies the scores; default ``head_dim ** -0.5``.
        dropout_p: attention-dropout probability in ``[0, 1)``; pass 0 at evaluation.
        generator: the ``torch.Generator`` a dropout call draws its seed from (default:
            torch's default CPU generator). The same generator state gives the same mask
            (the triton and torch backends give identical masks; module docstring).
        backend: ``"auto" | "cuda" | "triton" | "torch"`` (``FASTFT_BACKEND`` overrides auto).

    Returns:
        ``out`` with ``q``'s shape and dtype (contiguous). Query rows with no key to attend
        (every key padded, or causal and the visible keys padded) are 0 and pass back a 0
        gradient; SDPA would give NaN there.

    Raises:
        TypeError: non-tensor inputs, non-float / mismatched dtypes, a non-bool
            ``key_padding_mask``, ``cu_seqlens`` that is not int32.
        ValueError: mismatched shapes, heads or devices; a mask of the wrong shape;
            ``cu_seqlens`` not starting at 0, decreasing or not ending at ``total_tokens``;
            ``dropout_p`` outside ``[0, 1)``; a backend that cannot run these inputs (e.g.
            a head_dim it does not support: the message lists every reason).
    """
    _validate(q, k, v, causal, key_padding_mask, cu_seqlens, max_seqlen, softmax_scale, dropout_p)
    chosen = choose_backend("attention", backend,
                            backend_reasons(q, k, v, key_padding_mask, cu_seqlens, dropout_p), PRIORITY, q.device)
    scale = float(q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale)
    seed = draw_dropout_seed(generator) if dropout_p > 0.0 else None
    if chosen == "torch" and cu_seqlens is None:
        # Plain differentiable torch: autograd then uses SDPA's own fused backward (about
        # 2x faster on a CPU than recomputing explicitly inside the custom op), and
        # torch.compile traces SDPA natively. Varlen keeps the op (its loop is opaque).
        return _torch_dense_forward(q, k, v, causal, key_padding_mask, scale, float(dropout_p), seed, 0)
    out, _ = _attention_op(q, k, v, key_padding_mask, cu_seqlens, seed, int(max_seqlen or 0), causal, scale,
                           float(dropout_p), chosen)
    return out
