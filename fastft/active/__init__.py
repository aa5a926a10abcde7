"""Active learning: choose which rows are worth a label, label them, fine-tune again.

    import fastft
    from fastft.active import select
    picked = select("runs/round0/finetuned", pool_rows, k=100, strategy="badge", labelled=seed_rows)
    picked.rows, picked.scores, picked.report.line()

- ``strategies``: ``select`` and the strategies ``random``, ``entropy``, ``margin``,
  ``least-confidence``, ``bald`` (MC dropout), ``badge`` (gradient embeddings + k-means++),
  ``coreset`` (k-center greedy on [CLS] embeddings), with their score functions;
- ``pool``: duplicates and already-labelled rows never come back;
- ``outputs``: what a strategy reads from a model (probabilities, embeddings, head inputs);
- ``loop``: the label loop's rounds in an output directory (crash-resumable);
- ``simulate``: learning curves per strategy vs random on data already labelled.

``fastft active`` (``fastft/recipes/active.py``) puts them together with ``fastft.finetune``.
"""

from fastft.active.loop import ActiveLoopError, RoundResult, add_labels, read_state, run_round, start_loop
from fastft.active.outputs import ModelOutputs, mc_dropout, model_outputs, resolve_model
from fastft.active.pool import PoolReport, input_key, prepare_pool
from fastft.active.simulate import SimulationResult, labels_to_reach, simulate
from fastft.active.strategies import (
    STRATEGIES,
    Selection,
    bald_scores,
    entropy_scores,
    gradient_embeddings,
    k_center_greedy,
    kmeans_pp_seeding,
    least_confidence_scores,
    margin_scores,
    mc_probabilities,
    select,
)

__all__ = [
    "STRATEGIES",
    "ActiveLoopError",
    "ModelOutputs",
    "PoolReport",
    "RoundResult",
    "Selection",
    "SimulationResult",
    "add_labels",
    "bald_scores",
    "entropy_scores",
    "gradient_embeddings",
    "input_key",
    "k_center_greedy",
    "kmeans_pp_seeding",
    "labels_to_reach",
    "least_confidence_scores",
    "margin_scores",
    "mc_dropout",
    "mc_probabilities",
    "model_outputs",
    "prepare_pool",
    "read_state",
    "resolve_model",
    "run_round",
    "select",
    "simulate",
    "start_loop",
]
