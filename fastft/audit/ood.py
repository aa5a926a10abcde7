"""Out-of-distribution detection from a classifier's logits, with no extra training.

    maximum softmax probability   msp(x)    = max_c softmax(z / T)_c      (Hendrycks & Gimpel 2017)
    energy                        energy(x) = -log Σ_c exp(z_c)           (Liu et al. 2020)

Both are read as *in-distribution scores* (higher = more in-distribution: msp, and -energy).
Detection is scored with the in-distribution rows as positives:

    AUROC          P(score of an in-distribution row > score of an OOD row), ties counting ½
                   (the Mann-Whitney U statistic); 0.5 = no better than chance, 1.0 = perfect
    FPR@95%TPR     the share of OOD rows accepted when the threshold accepts 95% of the
                   in-distribution rows (lower is better)
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["auroc", "detection_scores", "energy_score", "fpr_at_tpr", "msp_score"]


def msp_score(logits, temperature: float = 1.0) -> np.ndarray:
    """(N,) the top-class probability of softmax(logits / temperature)."""
    z = torch.as_tensor(logits, dtype=torch.float64) / temperature
    return z.softmax(-1).max(-1).values.numpy()


def energy_score(logits) -> np.ndarray:
    """(N,) the negative energy log Σ_c exp(z_c) (higher = more in-distribution)."""
    return torch.logsumexp(torch.as_tensor(logits, dtype=torch.float64), -1).numpy()


def _check(inside, outside) -> tuple[np.ndarray, np.ndarray]:
    inside, outside = np.asarray(inside, dtype=np.float64), np.asarray(outside, dtype=np.float64)
    if inside.size == 0 or outside.size == 0:
        raise ValueError(f"AUROC needs rows of both kinds: {inside.size} in-distribution and {outside.size} "
                         "out-of-distribution rows given (a single-class set has no ranking to score)")
    return inside, outside


def auroc(inside, outside) -> float:
    """Area under the ROC curve separating ``inside`` scores (positives) from ``outside``
    scores, from average ranks (ties count half).

    Raises:
        ValueError: either side has no rows.
    """
    inside, outside = _check(inside, outside)
    scores = np.concatenate([inside, outside])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average rank of each group of tied scores (1-based)
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + 1 + end) / 2
    n_in, n_out = len(inside), len(outside)
    u = ranks[:n_in].sum() - n_in * (n_in + 1) / 2
    return float(u / (n_in * n_out))


def fpr_at_tpr(inside, outside, tpr: float = 0.95) -> float:
    """The share of ``outside`` scores at or above the highest threshold that keeps at least
    ``tpr`` of the ``inside`` scores.

    Raises:
        ValueError: either side has no rows.
    """
    inside, outside = _check(inside, outside)
    ranked = np.sort(inside)[::-1]
    keep = int(np.ceil(tpr * len(ranked)))  # at least this many in-distribution rows accepted
    threshold = ranked[max(keep, 1) - 1]
    return float((outside >= threshold).mean())


def detection_scores(inside_logits, outside_logits, *, temperature: float = 1.0) -> dict[str, float]:
    """``{"msp_auroc", "msp_fpr95", "energy_auroc", "energy_fpr95"}`` between two sets' logits."""
    msp_in, msp_out = msp_score(inside_logits, temperature), msp_score(outside_logits, temperature)
    energy_in, energy_out = energy_score(inside_logits), energy_score(outside_logits)
    return {
        "msp_auroc": auroc(msp_in, msp_out), "msp_fpr95": fpr_at_tpr(msp_in, msp_out),
        "energy_auroc": auroc(energy_in, energy_out), "energy_fpr95": fpr_at_tpr(energy_in, energy_out),
    }
