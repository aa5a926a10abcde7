"""``fastft.audit.audit``: one call that evaluates a classifier beyond its average, on named
sets, and the report ``fastft eval --slice-by / --ood / --calibration / --swap-terms`` prints.

    from fastft.audit import audit
    report = audit("runs/x/finetuned", {"test": rows, "forum": other_rows, "news": ood_rows},
                   slice_by="dialect", ood=["news"], swap_terms="pairs.txt", report_dir="audit/")
    print(report.markdown())     # the sets side by side (+ ece, msp/energy auroc, fpr95), slices,
                                 # counterfactual flips; audit/ holds report.md, report.json and
                                 # one reliability diagram per labelled set (reliability-<set>.png)

Probabilities are the ones ``fastft.predict`` returns: softmax of the logits over the
bundle's temperature (1 without one; ``finetune(..., calibrate=True)`` fits it), and with
a temperature the uncalibrated ECE is reported beside the calibrated one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from fastft.active.outputs import model_outputs, resolve_model
from fastft.audit.calibration import CalibrationBins, expected_calibration_error, reliability_diagram
from fastft.audit.counterfactual import CounterfactualReport, counterfactual_probe, read_swap_terms
from fastft.audit.ood import detection_scores
from fastft.audit.slices import MISSING, SliceReport, slice_metrics, slice_table, slice_values
from fastft.data.loading import rows_of
from fastft.errors import OutputDirInUse

__all__ = ["REPORT_FILES", "AuditReport", "audit", "check_audit_inputs", "labelled_sets"]

REPORT_FILES = ("report.md", "report.json")


@dataclass
class AuditReport:
    """What ``audit`` found. ``columns``: per set the scalar columns it adds to the
    side-by-side table (``accuracy``, ``ece`` [, ``ece_uncalibrated``]; an OOD set:
    ``msp_auroc``, ``msp_fpr95``, ``energy_auroc``, ``energy_fpr95``); ``slices`` /
    ``counterfactual`` / ``calibration``: per labelled set; ``files``: what was written."""

    task: str
    temperature: float
    columns: dict[str, dict[str, Any]]
    in_distribution: str | None = None
    ood: list[str] = field(default_factory=list)
    slices: dict[str, SliceReport] = field(default_factory=dict)
    counterfactual: dict[str, CounterfactualReport] = field(default_factory=dict)
    calibration: dict[str, CalibrationBins] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "task": self.task, "temperature": self.temperature, "in_distribution": self.in_distribution,
            "ood": self.ood, "sets": self.columns,
            "slices": {name: r.as_dict() for name, r in self.slices.items()},
            "counterfactual": {name: r.as_dict() for name, r in self.counterfactual.items()},
            "calibration": {name: {"ece": b.ece, "bins": {"edges": b.edges.tolist(), "count": b.count.tolist(),
                                                          "accuracy": _nan_none(b.accuracy),
                                                          "confidence": _nan_none(b.confidence)}}
                            for name, b in self.calibration.items()},
            "files": self.files,
        }

    def table(self) -> str:
        """The sets side by side: one row per set, one column per scalar."""
        names = list(dict.fromkeys(k for c in self.columns.values() for k in c))
        lines = ["| set | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for set_name, values in self.columns.items():
            cells = [f"{values[n]:.4g}" if isinstance(values.get(n), (int, float)) else "" for n in names]
            lines.append(f"| {set_name}{' (OOD)' if set_name in self.ood else ''} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def markdown(self, compare: "AuditReport | None" = None, names: tuple[str, str] = ("before", "after"), *,
                 table: bool = True) -> str:
        """The whole report; ``compare``: another model's report on the same sets (e.g. before
        a mitigation), whose slices are shown beside this one's (``names``: (its, this));
        ``table=False`` leaves out the sets' table (a caller that prints its own)."""
        parts = []
        if self.temperature != 1.0:
            parts.append(f"probabilities at temperature {self.temperature:.4g} (the bundle's; ece_uncalibrated: at 1)")
        if self.ood:
            parts.append(f"out-of-distribution detection: {', '.join(self.ood)} against {self.in_distribution} "
                         "(in-distribution rows as positives; msp = max softmax probability, energy = logsumexp of "
                         "the logits; fpr95 = share of OOD rows accepted at 95% true-positive rate)")
        for set_name, report in self.slices.items():
            other = compare.slices.get(set_name) if compare is not None else None
            reports = {names[0]: other, names[1]: report} if other is not None else {"": report}
            parts.append(f"### {set_name}: {slice_table(reports)}")
        for set_name, report in self.counterfactual.items():
            parts.append(f"### {set_name}: {report.table()}")
        if self.files:
            parts.append("written: " + ", ".join(self.files))
        return "\n\n".join([self.table()] * table + parts)


def _nan_none(values) -> list:
    return [None if v != v else float(v) for v in values]


def labelled_sets(task, sets: Mapping[str, list[dict]], ood: Sequence[str] = ()) -> list[str]:
    """The sets with a label in every row. Sets marked OOD may go without labels (detection
    needs none); any other set must have them.

    Raises:
        ValueError: a set that is not OOD with rows lacking a label.
    """
    column = getattr(task, "label_column", "label")
    labelled = []
    for name, rows in sets.items():
        if all(row.get(column) is not None for row in rows):
            labelled.append(name)
        elif name not in ood:
            missing = sum(row.get(column) is None for row in rows)
            raise ValueError(f"data[{name!r}]: {missing} of {len(rows)} rows have no {column!r}; only a set marked "
                             "out-of-distribution (--ood) may go without labels")
    return labelled


def _check_report_dir(report_dir: str | None, overwrite: bool, names: list[str]) -> None:
    if report_dir is None:
        return
    ours = [*REPORT_FILES, *(f"reliability-{n}.png" for n in names)]
    present = [f for f in ours if os.path.exists(os.path.join(report_dir, f))]
    if present and not overwrite:
        raise OutputDirInUse(f"report dir {report_dir} already holds a report ({', '.join(present[:3])}): give another "
                             "directory, or overwrite=True (--overwrite)")


def check_audit_inputs(sets: Mapping[str, list], *, ood: Sequence[str] = (), in_distribution: str | None = None,
                       swap_terms=None, report_dir: str | None = None, overwrite: bool = False):
    """The checks of ``audit`` that need no model (a caller runs them before loading one).
    Returns (OOD names, the in-distribution set or None, the term pairs or None).

    Raises: ValueError, FileNotFoundError, OutputDirInUse (see ``audit``)."""
    if not sets:
        raise ValueError("audit: no evaluation sets given")
    ood = list(ood or [])
    unknown = [n for n in ood if n not in sets]
    if unknown:
        raise ValueError(f"--ood names {unknown} are not evaluation sets (the sets: {list(sets)})")
    if ood:
        inside = [n for n in sets if n not in ood]
        if not inside:
            raise ValueError(f"every set is marked out-of-distribution ({ood}): AUROC needs an in-distribution set "
                             "too (a single class has nothing to tell apart)")
        in_distribution = in_distribution or inside[0]
        if in_distribution not in inside:
            raise ValueError(f"in-distribution set {in_distribution!r} is not a set that is not marked OOD ({inside})")
    elif in_distribution is not None:
        raise ValueError("--in-distribution without --ood: name the out-of-distribution sets too")
    pairs = None
    if swap_terms is not None:
        pairs = read_swap_terms(swap_terms) if isinstance(swap_terms, (str, os.PathLike)) else [tuple(p) for p in swap_terms]
    _check_report_dir(report_dir, overwrite, list(sets))
    return ood, in_distribution, pairs


def audit(model_or_bundle, sets: Mapping[str, Any], *, tokenizer=None, task=None, slice_by: str | None = None,
          ood: Sequence[str] = (), in_distribution: str | None = None, swap_terms=None, calibration: bool = True,
          report_dir: str | None = None, overwrite: bool = False, n_bins: int = 15, n_bootstrap: int = 1000,
          min_slice: int = 30, positive=None, confidence: float = 0.95, seed: int = 0, batch_size: int = 32,
          device=None, compare: AuditReport | None = None) -> AuditReport:
    """Audit a fine-tuned classifier on named sets.

    Args:
        model_or_bundle: a bundle directory, a ``FinetuneResult``, or a model with
            ``tokenizer=`` and ``task=``.
        sets: ``{name: rows}`` (dicts / ``datasets.Dataset``); all need the task's input
            columns, all but the OOD ones its label column.
        slice_by: a column: per-slice metrics with intervals and the gaps (``fastft.audit.slices``).
        ood: names of sets that are out of distribution; ``in_distribution``: the set they
            are told apart from (default: the first set not in ``ood``).
        swap_terms: a term-pair file path or a list of pairs: the counterfactual probe on
            every labelled in-distribution set.
        calibration: ECE per labelled set (and with ``report_dir`` a reliability diagram).
        report_dir: write ``report.md``, ``report.json`` and ``reliability-<set>.png`` here
            (refused if a report is there, unless ``overwrite``).
        positive: the positive label of a binary task (default: the second of the labels).
        compare: another model's report on the same sets (e.g. trained without
            ``balance_by``): ``report.md`` shows its slices beside these ("before" / "after").

    Returns: ``AuditReport``.

    Raises (all before the model runs):
        ValueError: no sets; OOD names that are not sets; no in-distribution set left (every
            set marked OOD: AUROC needs two classes); an OOD set with no rows; a set without
            labels that is not marked OOD; a ``slice_by`` column in no row of a set; a bad
            swap-term file; a positive label that is not a class; a task other than classification.
        FileNotFoundError: a missing swap-term file or bundle.
        OutputDirInUse: ``report_dir`` holds a report and not ``overwrite``.
    """
    sets = {name: rows_of(rows) for name, rows in sets.items()}
    ood, in_distribution, pairs = check_audit_inputs(sets, ood=ood, in_distribution=in_distribution,
                                                     swap_terms=swap_terms, report_dir=report_dir, overwrite=overwrite)
    model, tokenizer, task = resolve_model(model_or_bundle, tokenizer, task, device)
    if task.name != "classification":
        raise ValueError(f"audit: works on classification bundles; this one is {task.name!r}")
    for name, rows in sets.items():
        if not rows:
            raise ValueError(f"data[{name!r}] is empty" + (" (an OOD set needs rows to score)" if name in ood else ""))
        task.check_columns([{task.label_column: None, **rows[0]}], name)  # inputs present (labels checked below)
    labelled = labelled_sets(task, sets, ood)
    for name in labelled:
        task.check_labels(sets[name], name)
    if slice_by is not None:
        for name in labelled:
            if all(value == MISSING for value in slice_values(sets[name], slice_by)):
                raise ValueError(f"--slice-by {slice_by!r}: no row of data[{name!r}] has that column "
                                 f"(its columns: {sorted(sets[name][0])})")
    positive_id = None
    if len(task.labels) == 2:
        names = [str(label) for label in task.labels]
        positive_id = 1 if positive is None else names.index(str(positive)) if str(positive) in names else None
        if positive_id is None:
            raise ValueError(f"positive label {positive!r} is not one of the classes {task.labels}")
    elif positive is not None:
        raise ValueError(f"positive={positive!r}: positive / true-positive rates need a binary task "
                         f"(this one has {len(task.labels)} classes)")

    temperature = float(getattr(task, "temperature", 1.0))
    was_training = model.training
    model.eval()
    try:
        logits = {name: model_outputs(model, tokenizer, task, rows, batch_size=batch_size).logits[:, 0]
                  for name, rows in sets.items()}  # (N, C)
    finally:
        model.train(was_training)

    report = AuditReport(task.name, temperature, {name: {} for name in sets}, in_distribution, ood)
    for name in labelled:
        references = torch.tensor([task.label_id(row[task.label_column]) for row in sets[name]])
        probabilities = (logits[name] / temperature).softmax(-1)
        predictions = probabilities.argmax(-1)
        columns = report.columns[name]
        columns["accuracy"] = float((predictions == references).double().mean())
        if calibration:
            bins = expected_calibration_error(probabilities, references, n_bins)
            report.calibration[name] = bins
            columns["ece"] = bins.ece
            raw = None
            if temperature != 1.0:
                raw = expected_calibration_error(logits[name].softmax(-1), references, n_bins)
                columns["ece_uncalibrated"] = raw.ece
            if report_dir is not None:
                os.makedirs(report_dir, exist_ok=True)
                path = os.path.join(report_dir, f"reliability-{name}.png")
                reliability_diagram(bins, path, title=f"{name}: reliability (T = {temperature:.3g})", other=raw)
                report.files.append(path)
        if slice_by is not None:
            report.slices[name] = slice_metrics(
                predictions.tolist(), references.tolist(), slice_values(sets[name], slice_by),
                num_classes=len(task.labels), column=slice_by, positive=positive_id,
                positive_name=None if positive_id is None else str(task.labels[positive_id]),
                n_bootstrap=n_bootstrap, confidence=confidence, min_count=min_slice, seed=seed)
        if pairs and name not in ood:
            def probabilities_of(rows, _model=model):
                _model.eval()
                try:
                    return (model_outputs(_model, tokenizer, task, rows, batch_size=batch_size).logits[:, 0]
                            / temperature).softmax(-1)
                finally:
                    _model.train(was_training)

            report.counterfactual[name] = counterfactual_probe(
                probabilities_of, sets[name], pairs, (task.text_column, task.pair_column))
    for name in ood:
        report.columns[name].update(detection_scores(logits[in_distribution], logits[name], temperature=temperature))
    if report_dir is not None:
        os.makedirs(report_dir, exist_ok=True)
        md, js = (os.path.join(report_dir, f) for f in REPORT_FILES)
        report.files += [md, js]
        with open(md, "w") as f:
            f.write(report.markdown(compare=compare) + "\n")
        with open(js, "w") as f:
            json.dump(report.as_dict(), f, indent=2, default=str)
    return report
