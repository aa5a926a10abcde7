"""One call from raw text to (dataset, collator) for the language-modelling objectives."""

from __future__ import annotations

from typing import Any

import datasets

from fastft.data.collators import CausalLMCollator, MaskedLMCollator
from fastft.data.loading import load_documents, tokenize_documents
from fastft.data.nsp import build_nsp_pairs
from fastft.data.packing import pack_documents

__all__ = ["LM_OBJECTIVES", "is_tokenized", "prepare_lm_data"]

LM_OBJECTIVES = ("mlm", "clm", "mlm+nsp")


def is_tokenized(data: Any) -> bool:
    """True for a dataset (or list of dicts) that already has ``input_ids``."""
    if isinstance(data, datasets.Dataset):
        return "input_ids" in data.column_names
    return isinstance(data, list) and bool(data) and isinstance(data[0], dict) and "input_ids" in data[0]


def prepare_lm_data(
    source: Any,
    tokenizer,
    objective: str = "mlm",
    *,
    block_size: int = 128,
    packing: bool = True,
    text_column: str = "text",
    txt_mode: str = "line",
    split: str = "train",
    num_proc: int | None = None,
    mlm_probability: float = 0.15,
    mask_replace_prob: float = 0.8,
    random_replace_prob: float = 0.1,
    whole_word_mask: bool = False,
    nsp_probability: float = 0.5,
    reset_position_ids: bool = False,
    seed: int = 0,
):
    """Load, tokenise, pack (or truncate) ``source`` and build the objective's collator.

    Args:
        source: anything ``load_documents`` takes, or an already tokenised dataset
            (``input_ids`` column), used as it is.
        objective: ``"mlm"``, ``"clm"`` or ``"mlm+nsp"`` (sentence pairs, padded; packing
            does not apply).
        block_size: block length when packing; maximum length otherwise.
        seed: seeds the masking generator and the NSP pair drawing.

    Returns: ``(dataset, collator)``.

    Raises:
        ValueError: unknown objective.
    """
    if objective not in LM_OBJECTIVES:
        raise ValueError(f"objective must be one of {LM_OBJECTIVES}, got {objective!r}")
    mlm_kwargs = dict(
        mlm_probability=mlm_probability,
        mask_replace_prob=mask_replace_prob,
        random_replace_prob=random_replace_prob,
        whole_word_mask=whole_word_mask,
        seed=seed,
        reset_position_ids=reset_position_ids,
    )
    if objective == "clm":
        collator = CausalLMCollator(tokenizer, reset_position_ids=reset_position_ids)
    else:
        collator = MaskedLMCollator(tokenizer, **mlm_kwargs)
    if is_tokenized(source):
        return source, collator
    documents = load_documents(source, text_column=text_column, txt_mode=txt_mode, split=split)
    if objective == "mlm+nsp":
        dataset = build_nsp_pairs(
            documents, tokenizer, max_length=block_size, nsp_probability=nsp_probability, text_column=text_column, seed=seed
        )
        return dataset, collator
    # Word starts from the fast tokenizer's word ids, for whole-word masking.
    word_starts = objective == "mlm" and whole_word_mask and getattr(tokenizer, "is_fast", False)
    tokens = tokenize_documents(
        documents,
        tokenizer,
        text_column=text_column,
        max_length=None if packing else block_size,
        word_starts=word_starts,
        num_proc=num_proc,
    )
    dataset = pack_documents(tokens, block_size, num_proc=num_proc) if packing else tokens
    return dataset, collator
