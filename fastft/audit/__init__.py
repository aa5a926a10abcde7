"""Evaluation beyond the average: how a fine-tuned classifier does per slice of its data
(and the bias gaps between slices), when a substitutable term changes, how far its
confidence can be trusted, and whether it can tell inputs unlike its training data.

- ``slices``: per-slice metrics with bootstrap intervals, worst slice, largest gap,
  demographic-parity and equal-opportunity differences, small-slice flags, a "missing" slice;
- ``counterfactual``: the term-swap probe (flip rate, mean change of the probability);
- ``calibration``: ECE, reliability diagrams, temperature scaling (saved in the bundle by
  ``finetune(..., calibrate=True)``; ``fastft.predict`` then returns calibrated probabilities);
- ``ood``: maximum-softmax-probability and energy scores, AUROC and FPR at 95% TPR;
- ``mitigation``: group-balanced sampling / loss re-weighting (``finetune(..., balance_by=...)``);
- ``report``: ``audit(bundle, sets, slice_by=..., ood=[...], swap_terms=...)``, the Python
  twin of ``fastft eval --slice-by ... --ood ... --calibration --swap-terms ...``.
"""

from fastft.audit.calibration import CalibrationBins, expected_calibration_error, fit_temperature, nll, reliability_diagram
from fastft.audit.counterfactual import CounterfactualReport, counterfactual_probe, read_swap_terms, swap_terms
from fastft.audit.mitigation import (
    BALANCES,
    ReweightedClassificationObjective,
    balance_weights,
    balanced_rows,
    check_balance_column,
)
from fastft.audit.ood import auroc, detection_scores, energy_score, fpr_at_tpr, msp_score
from fastft.audit.report import AuditReport, audit, labelled_sets
from fastft.audit.slices import MISSING, SliceReport, slice_metrics, slice_table, slice_values

__all__ = [
    "BALANCES",
    "MISSING",
    "AuditReport",
    "CalibrationBins",
    "CounterfactualReport",
    "ReweightedClassificationObjective",
    "SliceReport",
    "audit",
    "auroc",
    "balance_weights",
    "balanced_rows",
    "check_balance_column",
    "counterfactual_probe",
    "detection_scores",
    "energy_score",
    "expected_calibration_error",
    "fit_temperature",
    "fpr_at_tpr",
    "labelled_sets",
    "msp_score",
    "nll",
    "read_swap_terms",
    "reliability_diagram",
    "slice_metrics",
    "slice_table",
    "slice_values",
    "swap_terms",
]
