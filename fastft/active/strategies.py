"""Selection strategies: which pool rows are worth a label.

Every strategy gives each picked row a score, higher = more worth labelling:

    random            a uniform draw (seeded): the baseline every other strategy must beat
    entropy           -Σ_c p_c log p_c                          (nats; max log C)
    margin            1 - (p_(1) - p_(2))                       (top two probabilities)
    least-confidence  1 - p_(1)
    bald              H(mean_t p_t) - mean_t H(p_t)             mutual information between
                      the label and the weights, p_t from T Monte-Carlo dropout passes
                      (Houlsby et al. 2011; Gal et al. 2017)
    badge             gradient embeddings g = (p - onehot(ŷ)) ⊗ h (the last layer's loss
                      gradient at the predicted label ŷ; h = the head's input), then k-means++
                      seeding: the first pick has the largest ‖g‖, each next one is drawn with
                      probability ∝ D², its squared distance to the nearest pick (Ash et al.
                      2020). Score: that D² when picked (the first: ‖g‖²). Uncertain *and* diverse.
    coreset           k-center greedy on [CLS] embeddings: each pick is the candidate farthest
                      from every labelled row and earlier pick (Sener & Savarese 2018). Score:
                      that distance when picked (no labelled rows: the first pick is the one
                      farthest from the pool's mean, scored by that distance).

For a token-tagging task a row's score is the mean of its words' scores (entropy, margin,
least-confidence, BALD), its gradient embedding the mean of its words' (BADGE).
Probabilities are the calibrated ones when the task has a temperature (``fastft.audit``).
The uncertainty strategies rank rows independently (the top k); badge and coreset build a
diverse batch.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from fastft.active.outputs import mc_dropout, model_outputs, resolve_model
from fastft.active.pool import PoolReport, prepare_pool
from fastft.data.loading import rows_of

__all__ = [
    "STRATEGIES",
    "Selection",
    "bald_scores",
    "entropy_scores",
    "gradient_embeddings",
    "k_center_greedy",
    "kmeans_pp_seeding",
    "least_confidence_scores",
    "margin_scores",
    "mc_probabilities",
    "select",
]

STRATEGIES = ("random", "entropy", "margin", "least-confidence", "bald", "badge", "coreset")


# ------------------------------------------------------------------ scores of probabilities
# p: (N, U, C) probabilities, mask: (N, U) real units; each returns (N,) float64.


def _per_row(unit_scores: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """Mean of each row's unit scores over its real units (a row without any: 0)."""
    mask = mask.to(unit_scores.dtype)
    total = (unit_scores * mask).sum(-1)
    return (total / mask.sum(-1).clamp(min=1)).double().numpy()


def _entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.double()
    return -(p * torch.log(p.clamp(min=1e-30))).sum(-1)  # 0 log 0 = 0


def entropy_scores(p: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    return _per_row(_entropy(p), mask)


def margin_scores(p: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    top = p.double().topk(min(2, p.shape[-1]), dim=-1).values
    second = top[..., 1] if top.shape[-1] > 1 else torch.zeros_like(top[..., 0])
    return _per_row(1.0 - (top[..., 0] - second), mask)


def least_confidence_scores(p: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    return _per_row(1.0 - p.double().max(-1).values, mask)


def bald_scores(samples: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """``samples``: (T, N, U, C) probabilities of T dropout passes."""
    mean = samples.double().mean(0)
    return _per_row(_entropy(mean) - _entropy(samples).mean(0), mask)


UNCERTAINTY = {"entropy": entropy_scores, "margin": margin_scores, "least-confidence": least_confidence_scores}


# ------------------------------------------------------------------ diverse batches


def kmeans_pp_seeding(points: np.ndarray, k: int, seed: int = 0) -> tuple[list[int], list[float]]:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) as BADGE uses it: the first pick is the
    point of largest norm, each next one is drawn with probability ∝ its squared distance to
    the nearest pick so far. Returns (picked indices, their squared distance when picked).
    Points identical to a pick have probability 0; if only such points are left, the rest
    is drawn uniformly from them."""
    rng = np.random.default_rng(seed)
    points = np.asarray(points, dtype=np.float64)
    norms = (points ** 2).sum(1)
    first = int(np.argmax(norms))
    picked, scores = [first], [float(norms[first])]
    nearest = ((points - points[first]) ** 2).sum(1)
    nearest[first] = 0.0
    available = np.ones(len(points), dtype=bool)
    available[first] = False
    while len(picked) < k:
        weights = np.where(available, nearest, 0.0)
        total = weights.sum()
        if total > 0:
            choice = int(rng.choice(len(points), p=weights / total))
        else:
            choice = int(rng.choice(np.flatnonzero(available)))
        picked.append(choice)
        scores.append(float(nearest[choice]))
        available[choice] = False
        nearest = np.minimum(nearest, ((points - points[choice]) ** 2).sum(1))
    return picked, scores


def k_center_greedy(points: np.ndarray, k: int, centers: np.ndarray | None = None) -> tuple[list[int], list[float]]:
    """k-center greedy: repeatedly pick the point farthest (Euclidean) from every center
    and earlier pick. ``centers`` (M, D): the labelled rows (None or empty: the first pick
    is the point farthest from the points' mean). Returns (picked, distance when picked)."""
    points = np.asarray(points, dtype=np.float64)
    if centers is None or len(centers) == 0:
        nearest = np.sqrt(((points - points.mean(0)) ** 2).sum(1))
    else:
        centers = np.asarray(centers, dtype=np.float64)
        squared = (points ** 2).sum(1)[:, None] - 2 * points @ centers.T + (centers ** 2).sum(1)[None, :]
        nearest = np.sqrt(np.clip(squared, 0, None).min(1))
    picked, scores = [], []
    nearest = nearest.copy()
    for _ in range(k):
        choice = int(np.argmax(nearest))
        picked.append(choice)
        scores.append(float(nearest[choice]))
        nearest = np.minimum(nearest, np.sqrt(((points - points[choice]) ** 2).sum(1)))
        nearest[choice] = -np.inf  # never twice
    return picked, scores


def gradient_embeddings(probabilities: torch.Tensor, head_inputs: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """BADGE's embeddings: (N, C·H') with g = (p - onehot(argmax p)) ⊗ h per unit, averaged
    over a row's real units. ``probabilities`` (N, U, C), ``head_inputs`` (N, U, H')."""
    p = probabilities.double()
    onehot = torch.nn.functional.one_hot(p.argmax(-1), p.shape[-1]).double()
    g = (p - onehot)[..., :, None] * head_inputs.double()[..., None, :]  # (N, U, C, H')
    g = g.flatten(-2) * mask.double()[..., None]
    return (g.sum(1) / mask.double().sum(1).clamp(min=1)[:, None]).numpy()


# ------------------------------------------------------------------ selection


@dataclass
class Selection:
    """What ``select`` returns: the ``k`` picked ``rows`` (the pool's dicts, as given),
    their ``indices`` in the pool, their ``scores`` (higher = more worth labelling; see
    the module docstring), in pick order, the ``strategy`` and the pool ``report``
    (duplicates and already-labelled rows dropped)."""

    rows: list[dict]
    indices: list[int]
    scores: list[float]
    strategy: str
    report: PoolReport
    details: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.rows)


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def mc_probabilities(model, tokenizer, task, rows: list[dict], *, passes: int = 10, rate: float | None = None,
                     seed: int = 0, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte-Carlo dropout: ``passes`` forward passes with dropout on (``outputs.mc_dropout``),
    drawn from ``torch.manual_seed(seed)`` inside a forked RNG (the caller's random state is
    untouched). Returns (samples (T, N, U, C), unit mask (N, U))."""
    if passes < 2:
        raise ValueError(f"bald needs at least 2 dropout passes, got {passes}")
    temperature = getattr(task, "temperature", 1.0)
    samples = []
    devices = [torch.device(d) for d in {str(p.device) for p in model.parameters()} if torch.device(d).type == "cuda"]
    with torch.random.fork_rng(devices=devices), mc_dropout(model, rate):
        torch.manual_seed(seed)
        for _ in range(passes):
            out = model_outputs(model, tokenizer, task, rows, batch_size=batch_size)
            samples.append(out.probabilities(temperature))
    return torch.stack(samples), out.unit_mask


def select(model_or_bundle, pool, k: int, strategy: str = "entropy", *, labelled=(), tokenizer=None, task=None,
           seed: int = 0, batch_size: int = 32, mc_passes: int = 10, mc_dropout: float | None = None,
           device=None) -> Selection:
    """The ``k`` pool rows most worth labelling under ``strategy``.

    Args:
        model_or_bundle: a bundle directory (``fastft finetune``'s ``…/finetuned``), a
            ``FinetuneResult``, or a model with ``tokenizer=`` and ``task=`` (its labels set).
        pool: rows (dicts / ``datasets.Dataset``) with the task's input columns
            (classification: ``text`` [, ``text_pair``]; token: ``tokens``); any label or
            other column is carried along untouched.
        k: rows to pick (1 ≤ k ≤ candidates).
        strategy: one of ``STRATEGIES``.
        labelled: rows already labelled: pool rows with the same input are never picked,
            and coreset measures distances to them.
        seed: random / badge draws, and BALD's dropout masks.
        mc_passes: BALD's dropout passes; ``mc_dropout``: the dropout rate to sample with
            (None: the model's own; a model with none needs one).

    Returns: ``Selection`` (rows, pool indices, scores in pick order, the pool report).

    Raises:
        ValueError: an unknown strategy; k < 1 or more than the candidates left after
            dropping duplicates and labelled rows; an empty pool; a task without class
            probabilities; BALD on a model without dropout and no ``mc_dropout``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown selection strategy {strategy!r}; choose one of {list(STRATEGIES)}")
    pool, labelled = rows_of(pool), rows_of(labelled)
    if not pool:
        raise ValueError("the pool is empty: nothing to select from")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    model, tokenizer, task = resolve_model(model_or_bundle, tokenizer, task, device)
    candidates, report = prepare_pool(pool, labelled, task)
    if k > len(candidates):
        raise ValueError(f"k={k} is more than the {len(candidates)} pool rows left to label ({report.line()})")
    rows = [pool[i] for i in candidates]
    temperature = getattr(task, "temperature", 1.0)
    details: dict = {}

    if strategy == "random":
        scores = np.random.default_rng(seed).random(len(rows))
        picked = _top(scores, k)
        picked_scores = [float(scores[i]) for i in picked]
    elif strategy in UNCERTAINTY:
        with _eval_mode(model):
            out = model_outputs(model, tokenizer, task, rows, batch_size=batch_size)
        scores = UNCERTAINTY[strategy](out.probabilities(temperature), out.unit_mask)
        picked = _top(scores, k)
        picked_scores = [float(scores[i]) for i in picked]
    elif strategy == "bald":
        samples, mask = mc_probabilities(model, tokenizer, task, rows, passes=mc_passes, rate=mc_dropout, seed=seed,
                                         batch_size=batch_size)
        scores = bald_scores(samples, mask)
        picked = _top(scores, k)
        picked_scores = [float(scores[i]) for i in picked]
    elif strategy == "badge":
        with _eval_mode(model):
            out = model_outputs(model, tokenizer, task, rows, batch_size=batch_size, head_inputs=True)
        embeddings = gradient_embeddings(out.probabilities(temperature), out.head_inputs, out.unit_mask)
        picked, picked_scores = kmeans_pp_seeding(embeddings, k, seed)
    else:  # coreset
        with _eval_mode(model):
            out = model_outputs(model, tokenizer, task, rows, batch_size=batch_size, embeddings=True)
            centers = (model_outputs(model, tokenizer, task, labelled, batch_size=batch_size, embeddings=True).embeddings
                       if labelled else None)
        picked, picked_scores = k_center_greedy(out.embeddings.numpy(), k,
                                                None if centers is None else centers.numpy())
    indices = [candidates[i] for i in picked]
    if any(not math.isfinite(s) for s in picked_scores):
        raise ValueError(f"{strategy}: non-finite scores (the model's outputs hold NaN / inf)")
    return Selection([pool[i] for i in indices], indices, [float(s) for s in picked_scores], strategy, report, details)


def _top(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the k highest scores, ties broken by position (stable)."""
    return [int(i) for i in np.argsort(-np.asarray(scores), kind="stable")[:k]]
