"""The pool of rows to choose from: the same input twice is one candidate, and an input
already labelled is none. Rows are compared on the task's *input* columns only (the text,
the pair / the words), never on a label or any other column."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

__all__ = ["PoolReport", "input_columns", "input_key", "prepare_pool"]


def input_columns(task) -> tuple[str, ...]:
    """The columns that make a row's input for ``task``."""
    if task.name == "token":
        return ("tokens",)
    if task.name in ("classification", "regression"):
        return (task.text_column, task.pair_column)
    return tuple(getattr(task, "required_columns", ()))


def input_key(row: dict, columns: tuple[str, ...]) -> str:
    """A hashable identity of ``row``'s input: its ``columns`` as canonical JSON
    (a missing column and ``None`` are the same; surrounding whitespace of texts is not part of it)."""
    values = [row.get(c) for c in columns]
    values = [v.strip() if isinstance(v, str) else v for v in values]
    return json.dumps(values, sort_keys=True, default=str)


@dataclass
class PoolReport:
    """What became of the pool before selection: ``pool`` rows given, ``duplicates``
    dropped (an earlier pool row has the same input), ``already_labelled`` dropped (the
    labelled set has the input), ``candidates`` left."""

    pool: int
    duplicates: int
    already_labelled: int
    candidates: int
    duplicate_rows: list[int] = field(default_factory=list)  # pool indices dropped as duplicates
    labelled_rows: list[int] = field(default_factory=list)  # pool indices dropped as already labelled

    def line(self) -> str:
        dropped = []
        if self.duplicates:
            dropped.append(f"{self.duplicates} duplicate row(s)")
        if self.already_labelled:
            dropped.append(f"{self.already_labelled} row(s) already labelled")
        return (f"pool: {self.pool} rows" + (f", dropped {' and '.join(dropped)}" if dropped else "")
                + f": {self.candidates} candidates")

    def as_dict(self) -> dict:
        return {"pool": self.pool, "duplicates": self.duplicates, "already_labelled": self.already_labelled,
                "candidates": self.candidates}


def prepare_pool(pool: list[dict], labelled: list[dict], task) -> tuple[list[int], PoolReport]:
    """The pool indices that are candidates (first occurrence of each input, not in
    ``labelled``), in pool order, and the report of what was dropped."""
    columns = input_columns(task)
    seen_labelled = {input_key(row, columns) for row in labelled}
    seen, candidates, duplicates, already = set(), [], [], []
    for i, row in enumerate(pool):
        key = input_key(row, columns)
        if key in seen_labelled:
            already.append(i)
        elif key in seen:
            duplicates.append(i)
        else:
            seen.add(key)
            candidates.append(i)
    report = PoolReport(len(pool), len(duplicates), len(already), len(candidates), duplicates, already)
    return candidates, report
