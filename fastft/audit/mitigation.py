"""Mitigation during fine-tuning: give every slice of the training data the same weight.

    balance="sample"    group-balanced sampling: each slice's rows are repeated until it has
                        as many as the largest slice (whole copies, then a seeded draw without
                        replacement for the remainder), so an epoch sees every slice equally
                        often and every original row at least once
    balance="reweight"  loss re-weighting: row i of slice g weighs N / (G · n_g) (mean weight
                        1 over the training set), the classification loss becomes
                        Σ_i w_i · CE_i / N: the same expected gradient as balanced sampling,
                        without repeating rows

The slice of a row is ``fastft.audit.slices.slice_values`` (rows without the column: the
slice ``"missing"``). ``fastft.finetune(..., balance_by="group")`` applies one of them to
the training rows; evaluation sets are never changed.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch.nn.functional as F

from fastft.audit.slices import slice_values
from fastft.train.objectives import Objective, model_inputs

__all__ = ["BALANCES", "WEIGHT_KEY", "ReweightedClassificationObjective", "balanced_rows", "balance_weights",
           "check_balance_column"]

BALANCES = ("sample", "reweight")
WEIGHT_KEY = "example_weight"  # the feature holding a row's loss weight (the collator stacks it)


def check_balance_column(rows: list[dict], column: str, set_name: str = "train") -> None:
    """Raises ValueError when no row has ``column`` (a typo, most likely)."""
    if not any(row.get(column) is not None for row in rows):
        raise ValueError(f"balance_by={column!r}: no row of data[{set_name!r}] has that column (its columns: "
                         f"{sorted(rows[0]) if rows else []})")


def balanced_rows(rows: list[dict], column: str, seed: int = 0) -> list[dict]:
    """``rows`` with each slice repeated up to the largest slice's size (see the module
    docstring); the order is slice by slice (the loop shuffles every epoch)."""
    check_balance_column(rows, column)
    groups = slice_values(rows, column)
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    target = max(len(m) for m in members.values())
    rng = np.random.default_rng(seed)
    result = []
    for g in sorted(members):
        idx = members[g]
        copies, remainder = divmod(target, len(idx))
        chosen = idx * copies + sorted(rng.choice(idx, size=remainder, replace=False).tolist())
        result += [rows[i] for i in chosen]
    return result


def balance_weights(rows: list[dict], column: str) -> list[float]:
    """Per row the weight N / (G · n_g) of its slice g (G slices, n_g rows in g)."""
    check_balance_column(rows, column)
    groups = slice_values(rows, column)
    counts = Counter(groups)
    n, g = len(rows), len(counts)
    return [n / (g * counts[x]) for x in groups]


class ReweightedClassificationObjective(Objective):
    """Cross-entropy of a sequence classifier's logits with per-row weights from the batch's
    ``example_weight`` (B,) (absent, as in evaluation batches: weight 1). Summed, so the
    loop's division by the row count gives the weighted mean."""

    name = "cls"

    def counts(self, batch):
        return {"cls": int(batch["labels"].numel())}

    def loss(self, model, batch, counts):
        out = model(**model_inputs(model, batch, exclude=("labels", WEIGHT_KEY)))
        per_row = F.cross_entropy(out.logits.float(), batch["labels"], reduction="none")  # (B,)
        weights = batch.get(WEIGHT_KEY)
        return {"cls": (per_row * weights.float()).sum() if weights is not None else per_row.sum()}, out
