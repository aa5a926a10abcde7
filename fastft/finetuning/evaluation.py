"""Evaluation of a fine-tuned model on several named sets (in-domain, out-of-domain ...)
side by side, at the end and after every evaluation during training."""

from __future__ import annotations

from typing import Any, Mapping

from fastft.data.loading import rows_of
from fastft.finetuning.tasks import Task
from fastft.train.callbacks import Callback
from fastft.train.evaluation import evaluate

__all__ = ["OtherSetsEvaluation", "evaluate_sets", "scalars"]


class OtherSetsEvaluation(Callback):
    """After each evaluation of the selection set, evaluates the other named sets too and
    records everything in ``history`` (so in-domain / out-of-domain curves sit side by side)."""

    def __init__(self, selection_name: str, other_sets: dict, evaluate_fn):
        self.selection_name, self.other_sets, self.evaluate_fn = selection_name, other_sets, evaluate_fn
        self.history: list[dict] = []

    def on_evaluate(self, state, metrics):
        self.history.append({"step": state.step, "epoch": state.epoch, "set": self.selection_name, **scalars(metrics)})
        for name in self.other_sets:
            self.history.append({"step": state.step, "epoch": state.epoch, "set": name,
                                 **scalars(self.evaluate_fn(state.model, name))})


def scalars(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def evaluate_sets(model, tokenizer, task: Task, sets: Mapping[str, Any], *, batch_size: int = 16,
                  generate: bool = True, features: Mapping[str, list] | None = None) -> dict[str, dict[str, Any]]:
    """Evaluate ``model`` on several named sets: ``{name: metrics}`` with the task loss,
    its metrics (accuracy, macro-F1, per-class report / exact match, F1 / MSE), and for
    SFT the response perplexity and, with ``generate``, BLEU of greedy generations."""
    results = {}
    for name, data in sets.items():
        rows = rows_of(data)
        feats = (features or {}).get(name) or task.preprocess(rows, tokenizer, training=False)
        metrics = evaluate(model, feats, task.objective(), collator=task.collator(tokenizer), batch_size=batch_size,
                           metric_fns=task.metric_fns(rows, feats, tokenizer))
        if generate and hasattr(task, "generation_metrics"):
            metrics.update(task.generation_metrics(model, tokenizer, rows))
        results[name] = metrics
    return results
