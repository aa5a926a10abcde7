"""Metrics per slice of an evaluation set (the rows sharing a value of one column: a
domain, a dialect, a demographic group ...), with bootstrap confidence intervals, and the
gaps between slices that a bias audit asks about.

Per slice (and overall): the row count, accuracy, macro-F1 and, for a binary task, the
positive rate P(ŷ = positive) and the true-positive rate P(ŷ = positive | y = positive),
each with a percentile bootstrap interval (rows resampled with replacement within the
slice, ``n_bootstrap`` times, seeded). Then:

    worst slice                    the slice with the lowest primary metric (accuracy)
    largest gap                    the slice whose metric is farthest from the overall one
    demographic parity difference  max - min positive rate over slices (binary tasks)
    equal opportunity difference   max - min true-positive rate over slices with positives

as in Fairlearn's ``demographic_parity_difference`` / ``equal_opportunity_difference``
(the latter is its true-positive-rate half of equalized odds). Slices with fewer than
``min_count`` rows are flagged ``small``: reported, and counted in the gaps, never hidden.
Rows without the column (or with null in it) form their own slice, ``"missing"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

__all__ = ["MISSING", "SliceReport", "slice_metrics", "slice_table", "slice_values"]

MISSING = "missing"


def slice_values(rows: Sequence[dict], column: str) -> list[str]:
    """Each row's slice: ``str(row[column])``, or ``"missing"`` where the row lacks the
    column or holds null / an empty string there."""
    values = []
    for row in rows:
        value = row.get(column)
        values.append(MISSING if value is None or (isinstance(value, str) and not value.strip()) else str(value))
    return values


def _metric_rows(pred: np.ndarray, ref: np.ndarray, num_classes: int, positive: int | None) -> dict[str, np.ndarray]:
    """Each metric for every resample at once: ``pred`` / ``ref`` are (B, n) class ids."""
    correct = pred == ref
    result = {"accuracy": correct.mean(1)}
    f1s, present = [], []
    for c in range(num_classes):
        tp = ((pred == c) & correct).sum(1)
        predicted, actual = (pred == c).sum(1), (ref == c).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(predicted + actual > 0, 2 * tp / (predicted + actual), 0.0)
        f1s.append(f1)
        present.append(actual > 0)
    f1s, present = np.stack(f1s, 1), np.stack(present, 1)  # (B, C)
    with np.errstate(invalid="ignore", divide="ignore"):
        # macro-F1 over the classes present in the references (fastft.finetuning.metrics.macro_f1)
        result["macro_f1"] = (f1s * present).sum(1) / present.sum(1)
    if positive is not None:
        result["positive_rate"] = (pred == positive).mean(1)
        positives = (ref == positive).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            result["true_positive_rate"] = np.where(positives > 0, ((pred == positive) & correct).sum(1) / positives,
                                                    np.nan)
    return result


@dataclass
class SliceReport:
    """``slices``: ``{slice: {"count", "small", metric: value, metric + "_ci": (lo, hi)}}``
    with ``"overall"`` first; the gaps (see the module docstring); ``missing``: rows in the
    ``"missing"`` slice."""

    column: str
    metrics: list[str]
    slices: dict[str, dict[str, Any]]
    worst_slice: str | None = None
    largest_gap: tuple[str, float] | None = None  # (slice, its metric - overall)
    demographic_parity_difference: float | None = None
    equal_opportunity_difference: float | None = None
    positive: str | None = None
    missing: int = 0
    confidence: float = 0.95
    n_bootstrap: int = 1000
    min_count: int = 30
    notes: list[str] = field(default_factory=list)

    @property
    def primary(self) -> str:
        return self.metrics[0]

    def as_dict(self) -> dict:
        return {"column": self.column, "slices": self.slices, "worst_slice": self.worst_slice,
                "largest_gap": None if self.largest_gap is None else
                {"slice": self.largest_gap[0], "difference": self.largest_gap[1]},
                "demographic_parity_difference": self.demographic_parity_difference,
                "equal_opportunity_difference": self.equal_opportunity_difference, "positive": self.positive,
                "missing": self.missing, "confidence": self.confidence, "n_bootstrap": self.n_bootstrap,
                "min_count": self.min_count}

    def summary(self) -> str:
        """The gaps in one paragraph."""
        parts = []
        if self.worst_slice is not None:
            s = self.slices[self.worst_slice]
            parts.append(f"worst slice: {self.worst_slice} ({self.primary} {s[self.primary]:.3f}, {s['count']} rows"
                         f"{', small' if s['small'] else ''})")
        if self.largest_gap is not None:
            parts.append(f"largest gap to overall: {self.largest_gap[0]} ({self.largest_gap[1]:+.3f})")
        if self.demographic_parity_difference is not None:
            parts.append(f"demographic parity difference: {self.demographic_parity_difference:.3f} "
                         f"(positive rate of {self.positive!r}, max - min over slices)")
        if self.equal_opportunity_difference is not None:
            parts.append(f"equal opportunity difference: {self.equal_opportunity_difference:.3f} "
                         "(true-positive rate, max - min over slices)")
        small = [name for name, s in self.slices.items() if s["small"] and name != "overall"]
        if small:
            parts.append(f"small slices (< {self.min_count} rows, wide intervals): {', '.join(small)}")
        if self.missing:
            parts.append(f"{self.missing} row(s) without {self.column!r}: slice {MISSING!r}")
        return "; ".join(parts + self.notes)

    def table(self) -> str:
        return slice_table({"": self})


def _fmt(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def slice_table(reports: dict[str, SliceReport]) -> str:
    """A markdown table of one or more reports on the same column side by side (e.g.
    ``{"before": ..., "after": ...}``): per slice its rows and each metric with its
    interval, per report; the gaps below it."""
    names = list(reports)
    first = reports[names[0]]
    slices = list(dict.fromkeys(s for r in reports.values() for s in r.slices))
    header, rule = ["slice", "rows"], ["---", "---:"]
    for metric in first.metrics:
        for name in names:
            header.append(f"{metric}{f' ({name})' if name else ''} [{int(first.confidence * 100)}% CI]")
            rule.append("---")
    header.append("")
    rule.append("---")
    lines = [f"slices by `{first.column}`", "", "| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    for slice_name in slices:
        present = [reports[n].slices.get(slice_name) for n in names]
        count = next(s["count"] for s in present if s is not None)
        cells = [slice_name, str(count)]
        for metric in first.metrics:
            for s in present:
                if s is None or s.get(metric) is None or (isinstance(s.get(metric), float) and math.isnan(s[metric])):
                    cells.append("")
                    continue
                lo, hi = s[metric + "_ci"]
                cells.append(f"{s[metric]:.3f} [{_fmt(lo)}, {_fmt(hi)}]")
        cells.append("small" if any(s is not None and s["small"] for s in present) and slice_name != "overall" else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for name in names:
        lines.append(f"{name + ': ' if name else ''}{reports[name].summary()}")
    return "\n".join(lines)


def slice_metrics(predictions: Sequence[int], references: Sequence[int], groups: Sequence[str], *,
                  num_classes: int, column: str = "slice", positive: int | None = None,
                  positive_name: str | None = None, n_bootstrap: int = 1000, confidence: float = 0.95,
                  min_count: int = 30, seed: int = 0) -> SliceReport:
    """Per-slice metrics of predicted vs reference class ids, see the module docstring.

    Args:
        predictions, references: (N,) class ids; groups: (N,) slice names (``slice_values``).
        num_classes: C; positive: the positive class id of a binary task (None: no rates).
        n_bootstrap: resamples per slice (0: no intervals).

    Raises:
        ValueError: lengths that disagree, no rows, a confidence outside (0, 1).
    """
    pred, ref = np.asarray(predictions, dtype=np.int64), np.asarray(references, dtype=np.int64)
    groups = np.asarray([str(g) for g in groups], dtype=object)
    if not (len(pred) == len(ref) == len(groups)):
        raise ValueError(f"predictions, references and slices disagree in length: {len(pred)}, {len(ref)}, {len(groups)}")
    if len(pred) == 0:
        raise ValueError("slice metrics of no rows")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    names = ["accuracy", "macro_f1"] + (["positive_rate", "true_positive_rate"] if positive is not None else [])
    order = ["overall"] + sorted(set(groups) - {MISSING}) + ([MISSING] if MISSING in set(groups) else [])
    slices: dict[str, dict[str, Any]] = {}
    alpha = (1 - confidence) / 2
    for name in order:
        rows = np.arange(len(pred)) if name == "overall" else np.flatnonzero(groups == name)
        p, r = pred[rows], ref[rows]
        point = {m: float(v[0]) for m, v in _metric_rows(p[None], r[None], num_classes, positive).items()}
        entry: dict[str, Any] = {"count": int(len(rows)), "small": bool(len(rows) < min_count)}
        intervals = {m: (None, None) for m in names}
        if n_bootstrap > 0:
            draws = {m: [] for m in names}
            chunk = max(1, min(n_bootstrap, 2_000_000 // max(len(rows), 1)))  # bound (chunk, n) index arrays
            for start in range(0, n_bootstrap, chunk):
                take = rng.integers(0, len(rows), size=(min(chunk, n_bootstrap - start), len(rows)))
                for m, v in _metric_rows(p[take], r[take], num_classes, positive).items():
                    draws[m].append(v)
            for m in names:
                values = np.concatenate(draws[m])
                values = values[~np.isnan(values)]
                if values.size:
                    intervals[m] = (float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha)))
        for m in names:
            entry[m] = None if math.isnan(point[m]) else point[m]
            entry[m + "_ci"] = intervals[m]
        slices[name] = entry
    report = SliceReport(column, names, slices, positive=positive_name, missing=int((groups == MISSING).sum()),
                         confidence=confidence, n_bootstrap=n_bootstrap, min_count=min_count)
    parts = {n: s for n, s in slices.items() if n != "overall"}
    primary = names[0]
    if parts:
        report.worst_slice = min(parts, key=lambda n: (parts[n][primary], n))
        gap_slice = max(parts, key=lambda n: (abs(parts[n][primary] - slices["overall"][primary]), n))
        report.largest_gap = (gap_slice, parts[gap_slice][primary] - slices["overall"][primary])
    if positive is not None and len(parts) >= 2:
        rates = [s["positive_rate"] for s in parts.values()]
        report.demographic_parity_difference = float(max(rates) - min(rates))
        tprs = [s["true_positive_rate"] for s in parts.values() if s["true_positive_rate"] is not None]
        if len(tprs) >= 2:
            report.equal_opportunity_difference = float(max(tprs) - min(tprs))
        without = [n for n, s in parts.items() if s["true_positive_rate"] is None]
        if without:
            report.notes.append(f"no positive rows (true-positive rate undefined) in: {', '.join(without)}")
    return report
