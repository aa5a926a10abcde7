"""Sentence pairs for next-sentence prediction (BERT's NSP, Devlin et al. 2019, section 3.1).

Each example is ``[CLS] A [SEP] B [SEP]`` with ``token_type_ids`` 0 on ``[CLS] A [SEP]``
and 1 on ``B [SEP]``. With probability ``nsp_probability`` (0.5) B is a random stretch
of another document and ``next_sentence_label = 1`` ("not next"); otherwise B is the text
that really follows A and the label is 0 ("is next"), Hugging Face
``BertForPreTraining``'s convention. When A is the last sentence of its document it has
no continuation and B is always random.

Sentences: the lines of a document when it has several (``txt_mode="paragraph"``), else
the pieces of the text split after ``.``, ``!`` or ``?`` followed by whitespace. A is
grown sentence by sentence up to about half of the length budget, B fills the rest.
Pairs are drawn once, with a seeded ``random.Random``, when the dataset is built (the
original BERT data pipeline also fixed its pairs ahead of training).
"""

from __future__ import annotations

import random
import re

import datasets

__all__ = ["build_nsp_pairs", "split_sentences"]

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    """A document's sentences: its non-empty lines if it has several, else a punctuation split."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        return lines
    return [piece for piece in _SENTENCE_END.split(text.strip()) if piece]


def build_nsp_pairs(
    dataset: datasets.Dataset,
    tokenizer,
    *,
    max_length: int = 128,
    nsp_probability: float = 0.5,
    text_column: str = "text",
    seed: int = 0,
) -> datasets.Dataset:
    """Build NSP sentence pairs from documents.

    Args:
        dataset: documents with a ``text_column``.
        tokenizer: must have ``[CLS]``/``[SEP]`` (``cls_token_id``, ``sep_token_id``).
        max_length: tokens per pair including the three special tokens (>= 5).
        nsp_probability: probability that B is random (label 1).
        seed: seeds the pair drawing.

    Returns: a dataset with ``input_ids``, ``token_type_ids`` (list[int]) and
    ``next_sentence_label`` (0 = B follows A, 1 = B is random).

    Raises:
        ValueError: tokenizer without cls/sep tokens, ``max_length`` < 5, or no document
            with at least one sentence.
    """
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
        raise ValueError("tokenizer: NSP needs [CLS] and [SEP] tokens (a BERT-style tokenizer)")
    if max_length < 5:
        raise ValueError(f"max_length must be >= 5, got {max_length}")
    documents = [split_sentences(text) for text in dataset[text_column]]
    flat = [sentence for sentences in documents for sentence in sentences]
    if not flat:
        raise ValueError("dataset: no sentences to pair")
    encoded = tokenizer(flat, add_special_tokens=False, verbose=False)["input_ids"]
    docs: list[list[list[int]]] = []  # document -> sentence -> token ids
    offset = 0
    for sentences in documents:
        docs.append([ids for ids in encoded[offset : offset + len(sentences)] if ids])
        offset += len(sentences)
    docs = [doc for doc in docs if doc]

    rng = random.Random(seed)
    budget = max_length - 3  # [CLS] A [SEP] B [SEP]
    out = {"input_ids": [], "token_type_ids": [], "next_sentence_label": []}
    for doc_index, doc in enumerate(docs):
        i = 0
        while i < len(doc):
            # A: at least one sentence, grown up to half of the budget.
            a: list[int] = list(doc[i])
            j = i + 1
            while j < len(doc) and len(a) + len(doc[j]) <= budget // 2:
                a += doc[j]
                j += 1
            if j >= len(doc) and j - i >= 2:
                j -= 1  # leave the last sentence as A's true continuation
                a = [t for sentence in doc[i:j] for t in sentence]
            is_random = j >= len(doc) or rng.random() < nsp_probability
            if is_random:
                others = [k for k in range(len(docs)) if k != doc_index] or [doc_index]
                other = docs[rng.choice(others)]
                start = rng.randrange(len(other))
                b_sentences = other[start:]
            else:
                b_sentences = doc[j:]
            b: list[int] = []
            for sentence in b_sentences:
                if b and len(a) + len(b) + len(sentence) > budget:
                    break
                b += sentence
            # Truncate the longer side first (BERT's truncate_seq_pair).
            while len(a) + len(b) > budget:
                if len(a) > len(b):
                    a.pop()
                else:
                    b.pop()
            ids = [tokenizer.cls_token_id, *a, tokenizer.sep_token_id, *b, tokenizer.sep_token_id]
            out["input_ids"].append(ids)
            out["token_type_ids"].append([0] * (len(a) + 2) + [1] * (len(b) + 1))
            out["next_sentence_label"].append(int(is_random))
            i = j  # a random B leaves the real continuation to start the next pair
    return datasets.Dataset.from_dict(out)
