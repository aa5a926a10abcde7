"""Collators: lists of examples -> padded tensor batches with labels.

Every collator pads ``input_ids`` to the longest example of the batch (right padding,
``attention_mask`` 0 on padding), carries ``token_type_ids`` and ``next_sentence_label``
when the examples have them, and, for packed blocks (examples with ``document_starts``),
adds ``cu_seqlens`` / ``max_seqlen`` (and ``position_ids`` reset at each document when
``reset_position_ids=True``), see ``fastft.data.packing``.

Who shifts, causal-LM: **the model**. ``CausalLMCollator`` returns ``labels`` equal to
``input_ids`` (padding set to -100), unshifted; Hugging Face ``*ForCausalLM`` models
shift inside ``forward`` (logits at position t are scored against labels[t + 1]), and so
does fastft's loss counting (``fastft.train.objectives``).

Randomness (masking) comes only from the collator's own ``torch.Generator``, seeded at
construction; ``state_dict()`` / ``load_state_dict()`` save and restore it so a resumed
run draws the same masks.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch

__all__ = ["IGNORE_INDEX", "CausalLMCollator", "MaskedLMCollator", "PadCollator", "pad_id_of"]

# The label of a position no loss scores (F.cross_entropy's and Hugging Face's default):
# the one definition every collator, objective and metric of fastft uses.
IGNORE_INDEX = -100


def pad_id_of(tokenizer) -> int:
    """The id used for padding: the pad token, else end-of-sequence, else 0."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def pad_rows(rows: Sequence[Sequence[int]], length: int, value: int) -> torch.Tensor:
    """Integer rows right-padded with ``value`` to ``length``: a (len(rows), length) tensor."""
    out = torch.full((len(rows), length), value, dtype=torch.long)  # (B, T)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


class _Collator:
    """Padding and packed-boundary bookkeeping shared by the collators."""

    def __init__(self, tokenizer, *, reset_position_ids: bool = False, pad_to_multiple_of: int | None = None):
        self.tokenizer = tokenizer
        self.pad_id = pad_id_of(tokenizer)
        self.reset_position_ids = reset_position_ids
        self.pad_to_multiple_of = pad_to_multiple_of

    def _base(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("examples: an empty batch")
        lengths = [len(example["input_ids"]) for example in examples]
        length = max(lengths)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": pad_rows([e["input_ids"] for e in examples], length, self.pad_id),  # (B, T)
            "attention_mask": pad_rows([[1] * n for n in lengths], length, 0),  # (B, T)
        }
        if "token_type_ids" in examples[0]:
            batch["token_type_ids"] = pad_rows([e["token_type_ids"] for e in examples], length, 0)
        if "word_starts" in examples[0]:
            batch["word_starts"] = pad_rows([e["word_starts"] for e in examples], length, 1)
        if "next_sentence_label" in examples[0]:
            batch["next_sentence_label"] = torch.tensor([int(e["next_sentence_label"]) for e in examples])
        if "document_starts" in examples[0]:
            batch.update(self._boundaries([e["document_starts"] for e in examples], lengths, length))
        return batch

    def _boundaries(self, starts: Sequence[Sequence[int]], lengths: Sequence[int], length: int):
        """cu_seqlens over the flattened (B*T) batch; padding is a segment of its own."""
        cu_seqlens = [0]
        position_ids = torch.zeros(len(starts), length, dtype=torch.long)  # (B, T)
        for row, (row_starts, n) in enumerate(zip(starts, lengths)):
            bounds = sorted(set(row_starts) | {0}) + [n] + ([length] if n < length else [])
            for begin, end in zip(bounds[:-1], bounds[1:]):
                cu_seqlens.append(row * length + end)
                position_ids[row, begin:end] = torch.arange(end - begin)
        cu = torch.tensor(cu_seqlens, dtype=torch.int32)  # (segments + 1,)
        out = {"cu_seqlens": cu, "max_seqlen": int((cu[1:] - cu[:-1]).max())}
        if self.reset_position_ids:
            out["position_ids"] = position_ids
        return out

    # Deterministic collators have no state; the masked-LM one overrides these.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def reseeded(self, seed: int) -> "_Collator":
        """A copy with its own generator seeded with ``seed`` (evaluation uses it so that
        held-out masks are the same at every evaluation and training's stream is untouched)."""
        return copy.copy(self)


class CausalLMCollator(_Collator):
    """Causal-LM batches: ``labels = input_ids`` with padding set to -100, unshifted (the
    model shifts). Returns input_ids, attention_mask, labels (B, T) int64, plus the
    packed-boundary keys when examples carry ``document_starts``."""

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self._base(examples)
        batch.pop("word_starts", None)
        labels = batch["input_ids"].clone()  # (B, T)
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        batch["labels"] = labels
        return batch


class MaskedLMCollator(_Collator):
    """Masked-LM batches (BERT, Devlin et al. 2019, section 3.1 / appendix A.1).

    Each eligible token (not special, not padding) is selected with probability
    ``mlm_probability``; a selected token becomes ``[MASK]`` with probability
    ``mask_replace_prob``, a random non-special token with ``random_replace_prob``, and
    stays unchanged otherwise. ``labels`` hold the original id at selected positions and
    -100 elsewhere.

    Whole-word masking selects words instead of tokens (each word with probability
    ``mlm_probability``, every token of a selected word is selected; the 80/10/10 choice
    is then made per token). Word starts come from the examples' ``word_starts`` column
    (fast tokenizers' word ids, ``tokenize_documents(word_starts=True)``) or, failing
    that, from WordPiece ``##`` continuation tokens.

    Args:
        tokenizer: must have a mask token.
        seed: seeds the collator's own ``torch.Generator`` (the only randomness used).

    Raises:
        ValueError: no mask token, or probabilities outside [0, 1] / summing above 1.
    """

    def __init__(
        self,
        tokenizer,
        *,
        mlm_probability: float = 0.15,
        mask_replace_prob: float = 0.8,
        random_replace_prob: float = 0.1,
        whole_word_mask: bool = False,
        seed: int = 0,
        reset_position_ids: bool = False,
        pad_to_multiple_of: int | None = None,
    ):
        super().__init__(tokenizer, reset_position_ids=reset_position_ids, pad_to_multiple_of=pad_to_multiple_of)
        if tokenizer.mask_token_id is None:
            raise ValueError("tokenizer: masked-LM needs a tokenizer with a mask token")
        for name, p in (
            ("mlm_probability", mlm_probability),
            ("mask_replace_prob", mask_replace_prob),
            ("random_replace_prob", random_replace_prob),
        ):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if mask_replace_prob + random_replace_prob > 1.0:
            raise ValueError("mask_replace_prob + random_replace_prob must be <= 1")
        self.mlm_probability = mlm_probability
        self.mask_replace_prob = mask_replace_prob
        self.random_replace_prob = random_replace_prob
        self.whole_word_mask = whole_word_mask
        self.mask_id = int(tokenizer.mask_token_id)
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids) | {self.pad_id}), dtype=torch.long)
        vocab = torch.arange(len(tokenizer))
        # Random replacements are drawn from ordinary tokens only.
        self.random_ids = vocab[~torch.isin(vocab, self.special_ids)]  # (V',)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def reseeded(self, seed: int) -> "MaskedLMCollator":
        clone = copy.copy(self)
        clone.generator = torch.Generator().manual_seed(seed)
        return clone

    def _word_starts(self, examples, batch) -> torch.Tensor:
        if "word_starts" in batch:
            return batch.pop("word_starts")
        starts = torch.ones_like(batch["input_ids"])  # (B, T)
        for row, example in enumerate(examples):
            tokens = self.tokenizer.convert_ids_to_tokens(list(example["input_ids"]))
            for col, token in enumerate(tokens):
                starts[row, col] = 0 if token.startswith("##") else 1
        return starts

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self._base(examples)
        input_ids = batch["input_ids"]  # (B, T)
        eligible = batch["attention_mask"].bool() & ~torch.isin(input_ids, self.special_ids)  # (B, T)
        draws = torch.rand(input_ids.shape, generator=self.generator)  # (B, T)
        if self.whole_word_mask:
            word_starts = self._word_starts(examples, batch).bool() | ~eligible  # specials: words of their own
            word_starts[:, 0] = True  # a block may open mid-word: that piece is a word here
            word_index = word_starts.long().cumsum(dim=1) - 1  # (B, T): word number per token
            # One draw per word: the draw at the word's index decides all its tokens.
            selected = draws.gather(1, word_index) < self.mlm_probability
        else:
            batch.pop("word_starts", None)
            selected = draws < self.mlm_probability
        selected &= eligible
        labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        choice = torch.rand(input_ids.shape, generator=self.generator)  # (B, T): 80/10/10
        to_mask = selected & (choice < self.mask_replace_prob)
        to_random = selected & ~to_mask & (choice < self.mask_replace_prob + self.random_replace_prob)
        random_tokens = self.random_ids[
            torch.randint(len(self.random_ids), input_ids.shape, generator=self.generator)
        ]  # (B, T)
        input_ids = torch.where(to_mask, torch.full_like(input_ids, self.mask_id), input_ids)
        input_ids = torch.where(to_random, random_tokens, input_ids)
        batch["input_ids"] = input_ids
        batch["labels"] = labels
        return batch


class PadCollator:
    """Right-pads the sequence fields of task features to the batch's longest one.

    ``input_ids`` with the tokenizer's pad id, ``attention_mask`` / ``token_type_ids`` with
    0, sequence ``labels`` with -100 (ignored by the loss); scalar fields (class labels,
    start/end positions, feature_index) become 1-D tensors. Float labels stay float
    (regression)."""

    SEQUENCE_PAD = {"attention_mask": 0, "token_type_ids": 0, "labels": IGNORE_INDEX}

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("features: an empty batch")
        length = max(len(f["input_ids"]) for f in features)
        batch = {}
        for key in features[0]:
            if key == "offset_mapping":
                continue
            values = [f[key] for f in features]
            if isinstance(values[0], (list, tuple)):
                pad = self.pad_id if key == "input_ids" else self.SEQUENCE_PAD.get(key, 0)
                batch[key] = pad_rows(values, length, pad)  # (B, T)
            else:
                dtype = torch.float32 if isinstance(values[0], float) else torch.long
                batch[key] = torch.tensor(values, dtype=dtype)  # (B,)
        return batch
