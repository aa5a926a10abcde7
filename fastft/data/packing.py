"""Packing tokenised documents into fixed-length blocks that remember document boundaries.

Packing concatenates documents (each already ending with its end token) and cuts the
stream every ``block_size`` tokens, so no compute is spent on padding. Each block keeps
``document_starts``: the positions inside the block where a segment begins -- always 0
(a block may open in the middle of a document) and every position where a new document
starts. The collators turn them into

- ``cu_seqlens`` (int32): cumulative segment lengths over the flattened batch, the
  varlen-attention layout (``fastft.ops.attention(..., cu_seqlens=...)``) in which no
  token attends across a document boundary;
- ``position_ids`` reset to 0 at every segment start (optional).

    block_size = 8, documents A (5 tokens), B (6 tokens), C (3 tokens):
    stream  A A A A A B B B | B B B C C C
    block 0 A A A A A B B B   document_starts [0, 5]
    block 1 B B B C C C       document_starts [0, 3]   (shorter: the end of the stream)

Only the last block of each ``map`` batch can be shorter than ``block_size``; the
collators pad it.
"""

from __future__ import annotations

import datasets

__all__ = ["pack_documents"]


def _pack_batch(batch, *, block_size):
    """``datasets.map`` worker: a batch of documents -> a batch of blocks."""
    columns = [name for name in ("input_ids", "word_starts") if name in batch]
    out = {name: [] for name in columns}
    out["document_starts"] = []
    stream = {name: [] for name in columns}
    doc_starts: list[int] = []  # positions in the stream where documents begin
    for i in range(len(batch["input_ids"])):
        doc_starts.append(len(stream["input_ids"]))
        for name in columns:
            stream[name].extend(batch[name][i])
    total = len(stream["input_ids"])
    next_doc = 0
    for begin in range(0, total, block_size):
        end = min(begin + block_size, total)
        for name in columns:
            out[name].append(stream[name][begin:end])
        while next_doc < len(doc_starts) and doc_starts[next_doc] < begin:
            next_doc += 1
        starts = {0}
        j = next_doc
        while j < len(doc_starts) and doc_starts[j] < end:
            starts.add(doc_starts[j] - begin)
            j += 1
        out["document_starts"].append(sorted(starts))
    return out


def pack_documents(
    dataset: datasets.Dataset,
    block_size: int,
    *,
    num_proc: int | None = None,
    batch_size: int = 1000,
) -> datasets.Dataset:
    """Pack tokenised documents into blocks of ``block_size`` tokens.

    Args:
        dataset: rows with ``input_ids`` (list[int]) and optionally ``word_starts``.
        block_size: tokens per block (> 0).
        num_proc: worker processes for ``map``.
        batch_size: documents packed together per ``map`` call; only the last block of
            each call can be short.

    Returns: a dataset of blocks with ``input_ids``, ``document_starts`` (sorted
    positions, always starting with 0) and ``word_starts`` when present.

    Raises:
        ValueError: ``block_size`` < 1 or no ``input_ids`` column.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if "input_ids" not in dataset.column_names:
        raise ValueError(f"dataset must have an input_ids column, got {dataset.column_names}")
    return dataset.map(
        _pack_batch,
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc,
        remove_columns=dataset.column_names,
        fn_kwargs={"block_size": block_size},
        desc="packing",
    )
