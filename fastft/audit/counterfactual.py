"""Counterfactual probe: does the prediction change when only a substitutable term does?

Given pairs of terms (``he,she``; ``his,her``; a dialect's spelling and another's), each
evaluation row that holds either term of a pair gets a twin with the pair's terms swapped
(whole words, both directions at once, the case of each occurrence kept: ``He`` ↔ ``She``).
Per pair: how many rows it touched, how often the predicted class flips between a row and
its twin, and the mean absolute change of the probability of the row's predicted class.
A model that ignores the terms scores 0 on both.

The term file: one pair per line, the two terms separated by a comma (or a tab),
``#`` comments and blank lines ignored::

    # gender terms
    he,she
    his,her
    man,woman

(``.txt``, ``.csv`` or ``.tsv``; a ``.json`` file holds a list of two-term lists.)
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

__all__ = ["CounterfactualReport", "counterfactual_probe", "read_swap_terms", "swap_terms"]

FORMATS = (".txt", ".csv", ".tsv", ".json")


def read_swap_terms(path: str) -> list[tuple[str, str]]:
    """The term pairs of ``path`` (format: the module docstring).

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unknown extension, a line that is not two terms, an empty file,
            a term in two pairs.
    """
    extension = os.path.splitext(path)[1].lower()
    if extension not in FORMATS:
        raise ValueError(f"{path}: unknown swap-term file format {extension or '(no extension)'!r}; give a .txt / .csv "
                         "/ .tsv file of 'term,term' lines or a .json list of [term, term] pairs")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    pairs: list[tuple[str, str]] = []
    if extension == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not JSON ({error.msg} at line {error.lineno})") from None
        if not isinstance(items, list):
            raise ValueError(f"{path}: a .json swap-term file holds a list of [term, term] pairs")
        for i, item in enumerate(items):
            if not (isinstance(item, list) and len(item) == 2 and all(isinstance(t, str) and t.strip() for t in item)):
                raise ValueError(f"{path}: item {i} is {item!r}, not a pair of two terms")
            pairs.append((item[0].strip(), item[1].strip()))
    else:
        for number, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            terms = [t.strip() for t in re.split(r"[,\t]", line)]
            if len(terms) != 2 or not all(terms):
                raise ValueError(f"{path}: line {number} is {line!r}, not two terms separated by a comma")
            pairs.append((terms[0], terms[1]))
    if not pairs:
        raise ValueError(f"{path}: no term pairs (empty, or only comments)")
    seen: dict[str, int] = {}
    for i, pair in enumerate(pairs):
        if pair[0].lower() == pair[1].lower():
            raise ValueError(f"{path}: pair {pair!r} swaps a term with itself")
        for term in pair:
            if term.lower() in seen and seen[term.lower()] != i:
                raise ValueError(f"{path}: term {term!r} is in two pairs; a term can swap with one other only")
            seen[term.lower()] = i
    return pairs


def _cased_like(word: str, template: str) -> str:
    if template.isupper() and len(template) > 1:
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def swap_terms(text: str, a: str, b: str) -> str:
    """``text`` with every whole-word ``a`` replaced by ``b`` and every ``b`` by ``a`` (case-
    insensitive match, the case of each occurrence kept)."""
    pattern = re.compile(r"\b(" + re.escape(a) + "|" + re.escape(b) + r")\b", re.IGNORECASE)
    return pattern.sub(lambda m: _cased_like(b if m.group(0).lower() == a.lower() else a, m.group(0)), text)


@dataclass
class CounterfactualReport:
    """``pairs``: per ``"a,b"``: ``{"rows", "flips", "flip_rate", "mean_abs_change"}``
    (``flip_rate`` / ``mean_abs_change`` None when no row holds either term)."""

    pairs: dict[str, dict]
    rows: int

    def as_dict(self) -> dict:
        return {"rows": self.rows, "pairs": self.pairs}

    def table(self) -> str:
        lines = [f"counterfactual term swaps ({self.rows} rows)", "",
                 "| term pair | rows with a term | prediction flips | flip rate | mean abs change of p(predicted) |",
                 "|---|---:|---:|---:|---:|"]
        for pair, entry in self.pairs.items():
            rate = "" if entry["flip_rate"] is None else f"{entry['flip_rate']:.3f}"
            change = "" if entry["mean_abs_change"] is None else f"{entry['mean_abs_change']:.4f}"
            lines.append(f"| {pair} | {entry['rows']} | {entry['flips']} | {rate} | {change} |")
        return "\n".join(lines)


def counterfactual_probe(probabilities_of, rows: list[dict], pairs: list[tuple[str, str]],
                         text_columns: tuple[str, ...] = ("text", "text_pair")) -> CounterfactualReport:
    """Run the probe: ``probabilities_of(rows) -> (N, C) tensor`` gives the model's class
    probabilities (as ``predict`` returns them); ``text_columns`` are swapped in each row."""
    import torch

    result = {}
    for a, b in pairs:
        touched, twins = [], []
        for i, row in enumerate(rows):
            twin = dict(row)
            for column in text_columns:
                if isinstance(row.get(column), str):
                    twin[column] = swap_terms(row[column], a, b)
            if any(twin.get(c) != row.get(c) for c in text_columns):
                touched.append(i)
                twins.append(twin)
        entry = {"rows": len(touched), "flips": 0, "flip_rate": None, "mean_abs_change": None}
        if touched:
            original = torch.as_tensor(probabilities_of([rows[i] for i in touched]), dtype=torch.float64)
            swapped = torch.as_tensor(probabilities_of(twins), dtype=torch.float64)
            predicted = original.argmax(-1)
            flips = int((swapped.argmax(-1) != predicted).sum())
            change = (swapped.gather(1, predicted[:, None]) - original.gather(1, predicted[:, None])).abs()
            entry.update(flips=flips, flip_rate=flips / len(touched), mean_abs_change=float(change.mean()))
        result[f"{a},{b}"] = entry
    return CounterfactualReport(result, len(rows))
