"""Evaluation on held-out data: the objective's loss per term, perplexity, task metrics."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from fastft.data.batching import fetch, to_device
from fastft.data.pipeline import is_tokenized, prepare_lm_data
from fastft.train.metrics import perplexity
from fastft.train.objectives import Objective, get_objective
from fastft.train.runtime import autocast

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data,
    objective: str | Objective = "mlm",
    *,
    collator=None,
    tokenizer=None,
    batch_size: int = 8,
    max_batches: int | None = None,
    precision: str = "fp32",
    seed: int = 0,
    metric_fns: Sequence[Any] = (),
    **data_options,
) -> dict[str, float]:
    """Held-out loss (per term and total), perplexity, and task metrics.

    Args:
        model: evaluated in ``eval()`` mode (its mode is restored afterwards).
        data: a tokenised dataset / list of dicts (then ``collator`` is required), or raw
            text for ``fastft.data.prepare_lm_data`` (then ``tokenizer`` is required;
            ``data_options`` such as ``block_size`` are passed on).
        objective: name or ``Objective``.
        collator: its ``reseeded(seed)`` copy is used, so masked-LM evaluation masks are
            the same at every evaluation and the training collator's stream is untouched.
        max_batches: stop after this many batches (None: all).
        metric_fns: objects with ``update(batch, outputs)`` and ``compute() -> dict``.

    Returns: ``{"loss", "<term>_loss", "perplexity" (LM objectives), "num_<term>",
    ...task metrics}``; items are averaged over the whole set, not per batch.

    Raises:
        ValueError: raw data without a tokenizer, or no collator for tokenised data.
    """
    objective = get_objective(objective)
    if not is_tokenized(data):
        if tokenizer is None:
            raise ValueError("evaluate: raw text data needs a tokenizer")
        data, built = prepare_lm_data(data, tokenizer, objective.name, seed=seed, **data_options)
        collator = collator or built
    if collator is None:
        raise ValueError("evaluate: tokenised data needs a collator")
    collator = collator.reseeded(seed) if hasattr(collator, "reseeded") else collator
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    try:
        for b, start in enumerate(range(0, len(data), batch_size)):
            if max_batches is not None and b >= max_batches:
                break
            batch = to_device(collator(fetch(data, range(start, min(start + batch_size, len(data))))), device)
            batch_counts = objective.counts(batch)
            with autocast(device, precision):
                term_sums, outputs = objective.loss(model, batch, batch_counts)
            for term, count in batch_counts.items():
                sums[term] = sums.get(term, 0.0) + float(term_sums[term])
                counts[term] = counts.get(term, 0) + count
            for metric in metric_fns:
                metric.update(batch, outputs)
    finally:
        model.train(was_training)
    metrics: dict[str, float] = {}
    for term in sums:
        metrics[f"num_{term}"] = counts[term]
        if counts[term]:
            metrics[f"{term}_loss"] = sums[term] / counts[term]
    metrics["loss"] = sum(metrics[f"{t}_loss"] for t in sums if counts[t]) if any(counts.values()) else float("nan")
    if objective.perplexity_term and f"{objective.perplexity_term}_loss" in metrics:
        metrics["perplexity"] = perplexity(metrics[f"{objective.perplexity_term}_loss"])
    for metric in metric_fns:
        metrics.update(metric.compute())
    return metrics
