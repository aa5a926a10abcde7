"""Preference data: rows ``{"prompt", "chosen", "rejected"}`` -> token ids, and batches that
put every pair's chosen and rejected response through the model in one forward pass.

A row's ``prompt`` is a text or chat messages (``[{"role": "user", "content": ...}]``,
rendered with the tokenizer's chat template and its generation prompt); ``chosen`` /
``rejected`` are texts or the assistant's messages. A tokenised pair is

    input_ids     [bos] prompt            (no loss: the model is not taught to write prompts)
    chosen_ids    chosen response [eos]
    rejected_ids  rejected response [eos]

(the layout of ``task="sft"``, so an aligned model answers prompts exactly as an SFT one).

Truncation, when ``prompt + longer response`` exceeds ``max_length``: the prompt keeps its
**end** (``keep_prompt="end"``; what the response answers is at the end of it) and is
cut to ``max_prompt_length`` first; then the responses keep their **start**
(``keep_response="start"``) within what is left. A pair where either response is empty
after this -- or was empty to begin with -- is dropped, and so is a pair whose chosen and
rejected responses are identical (it carries no preference: its DPO gradient is zero);
``PreparedPairs.report`` lists them and a warning says how many, never silently.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from fastft.data.collators import IGNORE_INDEX, pad_id_of, pad_rows
from fastft.data.loading import load_rows, rows_of

__all__ = [
    "PAIR_COLUMNS",
    "PairCollator",
    "PreparedPairs",
    "PreparationReport",
    "PromptCollator",
    "check_pair_columns",
    "load_pairs",
    "prompt_ids",
    "response_batch",
    "response_ids",
    "tokenize_pairs",
    "tokenize_prompts",
    "truncate",
]

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
KEEP_SIDES = ("start", "end")


def load_pairs(data) -> list[dict]:
    """Preference rows from a list of dicts, a ``datasets.Dataset`` or a ``.json`` /
    ``.jsonl`` / ``.csv`` / ``.parquet`` path."""
    if isinstance(data, str):
        return load_rows(data)
    return rows_of(data)


def check_pair_columns(rows: Sequence[dict], set_name: str = "train", columns: Sequence[str] = PAIR_COLUMNS) -> None:
    """Every row has ``prompt``, ``chosen`` and ``rejected`` (not None).

    Raises:
        ValueError: an empty set, or rows missing a column (the first few are named).
    """
    if not rows:
        raise ValueError(f"preference data[{set_name!r}] is empty")
    bad = [(i, [c for c in columns if row.get(c) is None]) for i, row in enumerate(rows)]
    bad = [(i, missing) for i, missing in bad if missing]
    if bad:
        shown = ", ".join(f"row {i} lacks {missing}" for i, missing in bad[:5])
        raise ValueError(f"preference data[{set_name!r}] needs columns {list(columns)} in every row: {shown}"
                         + (f" (and {len(bad) - 5} more rows)" if len(bad) > 5 else ""))


# --------------------------------------------------------------------------- tokenising


def _is_messages(value) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(m, dict) and "content" in m for m in value)


def prompt_ids(tokenizer, prompt) -> list[int]:
    """``[bos] prompt`` for a text (the SFT task's layout); a chat prompt through the
    tokenizer's chat template with the generation prompt (its own special tokens)."""
    if _is_messages(prompt):
        return list(tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + list(ids)


def response_ids(tokenizer, prompt, response) -> list[int]:
    """A response's ids followed by eos. Chat messages: the template's rendering of the
    conversation minus the rendering of the prompt (when it is a prefix of it)."""
    if _is_messages(response):
        if not _is_messages(prompt):
            raise ValueError("a chat-message response needs a chat-message prompt")
        start = prompt_ids(tokenizer, prompt)
        full = list(tokenizer.apply_chat_template(list(prompt) + list(response), tokenize=True, return_dict=False))
        if full[: len(start)] == start:
            return full[len(start):]
        response = "".join(m["content"] for m in response)  # template re-renders the prompt: plain text then
    ids = list(tokenizer(response, add_special_tokens=False)["input_ids"]) if response else []
    eos = tokenizer.eos_token_id
    return ids + ([eos] if eos is not None and ids else [])


def _keep(ids: list[int], length: int, side: str) -> list[int]:
    if len(ids) <= length:
        return ids
    return ids[:length] if side == "start" else ids[len(ids) - length:]


def truncate(prompt: list[int], responses: Sequence[list[int]], *, max_length: int, max_prompt_length: int,
             keep_prompt: str = "end", keep_response: str = "start") -> tuple[list[int], list[list[int]], bool]:
    """Fit ``prompt + each response`` into ``max_length`` tokens: when the longest does not
    fit, the prompt keeps ``max_prompt_length`` tokens (its end by default), then each
    response keeps what room is left (its start). Returns ``(prompt, responses, cut)``."""
    if len(prompt) + max(map(len, responses)) <= max_length:
        return prompt, list(responses), False
    prompt = _keep(prompt, max_prompt_length, keep_prompt)
    room = max_length - len(prompt)
    return prompt, [_keep(r, room, keep_response) for r in responses], True


@dataclass
class PreparationReport:
    """What tokenising a set of pairs kept and dropped (row indices of the input)."""

    total: int = 0
    kept: int = 0
    truncated: list[int] = field(default_factory=list)  # kept, but cut to fit
    empty: list[int] = field(default_factory=list)  # a response empty before / after truncation: dropped
    identical: list[int] = field(default_factory=list)  # chosen == rejected: dropped

    @property
    def dropped(self) -> int:
        return len(self.empty) + len(self.identical)

    def summary(self) -> str:
        parts = [f"{self.kept} of {self.total} pairs kept"]
        if self.truncated:
            parts.append(f"{len(self.truncated)} truncated")
        if self.empty:
            parts.append(f"{len(self.empty)} dropped with an empty response after truncation (rows {self.empty[:5]}"
                         + ("..." if len(self.empty) > 5 else "") + ")")
        if self.identical:
            parts.append(f"{len(self.identical)} dropped with chosen identical to rejected (rows {self.identical[:5]}"
                         + ("..." if len(self.identical) > 5 else "") + ")")
        return ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "kept": self.kept, "truncated": len(self.truncated), "empty": self.empty,
                "identical": self.identical}


@dataclass
class PreparedPairs:
    """Tokenised pairs (``features``: dicts of ``input_ids`` (the prompt) / ``chosen_ids`` /
    ``rejected_ids`` [/ ``margin``]) and the report of what was dropped."""

    features: list[dict]
    report: PreparationReport


def tokenize_pairs(
    rows: Sequence[dict],
    tokenizer,
    *,
    max_length: int = 512,
    max_prompt_length: int | None = None,
    keep_prompt: str = "end",
    keep_response: str = "start",
    set_name: str = "train",
    warn: bool = True,
) -> PreparedPairs:
    """Tokenise preference rows, truncate them to ``max_length`` tokens per sequence
    (prompt + response), drop (and report) pairs without a preference left.

    Args:
        rows: dicts with ``prompt``, ``chosen``, ``rejected`` (texts or chat messages) and
            optionally ``margin`` (a float: how much more ``chosen`` is preferred, used by
            the reward model's Bradley-Terry loss).
        max_prompt_length: the prompt's share of ``max_length`` when the pair does not fit
            (default: half of it).
        keep_prompt / keep_response: which part survives truncation, ``"start"`` or
            ``"end"`` (defaults: the prompt's end, the responses' start).

    Returns: ``PreparedPairs``. Warns when pairs were dropped.

    Raises:
        ValueError: missing columns, bad sizes or sides, or no pair left.
    """
    check_pair_columns(rows, set_name)
    if keep_prompt not in KEEP_SIDES or keep_response not in KEEP_SIDES:
        raise ValueError(f"keep_prompt / keep_response must be one of {KEEP_SIDES}, got {keep_prompt!r} / {keep_response!r}")
    max_prompt_length = max_length // 2 if max_prompt_length is None else max_prompt_length
    if not 1 <= max_prompt_length < max_length:
        raise ValueError(f"need 1 <= max_prompt_length < max_length, got {max_prompt_length} and {max_length}")
    report = PreparationReport(total=len(rows))
    features = []
    for i, row in enumerate(rows):
        prompt = prompt_ids(tokenizer, row["prompt"])
        chosen = response_ids(tokenizer, row["prompt"], row["chosen"])
        rejected = response_ids(tokenizer, row["prompt"], row["rejected"])
        prompt, (chosen, rejected), cut = truncate(prompt, [chosen, rejected], max_length=max_length,
                                                   max_prompt_length=max_prompt_length, keep_prompt=keep_prompt,
                                                   keep_response=keep_response)
        if cut:
            report.truncated.append(i)
        if not chosen or not rejected:
            report.empty.append(i)
            continue
        if chosen == rejected:
            report.identical.append(i)
            continue
        feature = {"input_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}
        if row.get("margin") is not None:
            margin = float(row["margin"])
            if not math.isfinite(margin):
                raise ValueError(f"preference data[{set_name!r}] row {i}: margin must be a finite number, got {row['margin']!r}")
            feature["margin"] = margin
        features.append(feature)
    dropped = set(report.empty) | set(report.identical)
    report.truncated = [i for i in report.truncated if i not in dropped]
    report.kept = len(features)
    if report.dropped and warn:
        warnings.warn(f"preference data[{set_name!r}]: {report.summary()}", stacklevel=2)
    if not features:
        raise ValueError(f"preference data[{set_name!r}]: no pair left to train on ({report.summary()})")
    return PreparedPairs(features, report)


def tokenize_prompts(prompts: Sequence, tokenizer, *, max_prompt_length: int, keep_prompt: str = "end") -> list[list[int]]:
    """Prompt ids (``[bos] prompt`` / chat template) for sampling, each cut to ``max_prompt_length``."""
    return [_keep(prompt_ids(tokenizer, p), max_prompt_length, keep_prompt) for p in prompts]


# --------------------------------------------------------------------------- batches


def response_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> dict:
    """``prompt + response`` sequences, right-padded: ``input_ids`` / ``attention_mask`` /
    ``labels`` ``(N, T)``, the labels the input ids on response tokens and -100 on the
    prompt and padding (the model shifts: logits at t score labels[t + 1])."""
    sequences = [list(p) + list(r) for p, r in zip(prompts, responses)]
    labels = [[IGNORE_INDEX] * len(p) + list(r) for p, r in zip(prompts, responses)]
    length = max(map(len, sequences))
    return {
        "input_ids": pad_rows(sequences, length, pad_id),  # (N, T)
        "attention_mask": pad_rows([[1] * len(s) for s in sequences], length, 0),  # (N, T)
        "labels": pad_rows(labels, length, IGNORE_INDEX),  # (N, T)
    }


class PairCollator:
    """Pairs -> one ``response_batch`` of ``2B`` sequences: the B chosen rows first, then
    the B rejected rows in the same order (so one forward pass scores both), plus

        ref_logps   (2B,) fp32, when the features carry cached reference log-probs
                    (``ref_chosen_logp`` / ``ref_rejected_logp``)
        margin      (B,) fp32, when the features have one
    """

    def __init__(self, tokenizer):
        self.pad_id = pad_id_of(tokenizer)

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("examples: an empty batch")
        prompts = [e["input_ids"] for e in examples] * 2
        batch = response_batch(prompts, [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples],
                               self.pad_id)
        if "ref_chosen_logp" in examples[0]:
            batch["ref_logps"] = torch.tensor([e["ref_chosen_logp"] for e in examples]
                                              + [e["ref_rejected_logp"] for e in examples], dtype=torch.float32)
        if any("margin" in e for e in examples):
            batch["margin"] = torch.tensor([float(e.get("margin", 0.0)) for e in examples], dtype=torch.float32)
        return batch


class PromptCollator:
    """Prompt ids -> a **left**-padded batch for ``generate`` (a decoder-only model
    continues every row from its last column)."""

    def __init__(self, tokenizer):
        self.pad_id = pad_id_of(tokenizer)

    def __call__(self, prompts: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        length = max(map(len, prompts))
        input_ids = torch.full((len(prompts), length), self.pad_id, dtype=torch.long)  # (B, P)
        attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for i, ids in enumerate(prompts):
            input_ids[i, length - len(ids):] = torch.as_tensor(list(ids), dtype=torch.long)
            attention_mask[i, length - len(ids):] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}
