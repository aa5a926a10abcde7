"""Evaluation of a fine-tuned model on several named sets (in-domain, out-of-domain ...)
side by side, at the end and after every evaluation during training."""

from __future__ import annotations

from typing import Any, Mapping

from fastft.data.loading import rows_of
from fastft.finetuning.tasks import Task
from fastft.train.callbacks import Callback
from fastft.train.evaluation import evaluate
from fastft.train.metrics import save_panels, two_panels

__all__ = ["OtherSetsEvaluation", "evaluate_sets", "plot_finetuning", "scalars"]


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


def plot_finetuning(metrics_path: str, history: list[dict], metric: str, png_path: str) -> str | None:
    """Fine-tuning's curves: the training loss (each point the mean over its logging
    interval) and the selection set's held-out loss per step; beside it ``metric`` (the
    task's, e.g. accuracy) of every named evaluation set per evaluation."""
    from fastft.train.metrics import MetricsLog

    records = MetricsLog(metrics_path).read()
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None and "eval_loss" not in r]
    selection = history[0]["set"] if history else None  # OtherSetsEvaluation records it first
    held_out = [(h["step"], h["loss"]) for h in history if h["set"] == selection and h.get("loss") is not None]
    if not train and not history:
        return None
    fig, (ax_loss, ax_metric) = two_panels()
    for points, style, label in ((train, "-", "train"), (held_out, "o-", "held-out (selection set)")):
        if points:
            ax_loss.plot(*zip(*points), style, label=label)
    ax_loss.set(xlabel="optimizer step", ylabel="loss", title="loss")
    for name in dict.fromkeys(h["set"] for h in history):
        points = [(h["step"], h[metric]) for h in history if h["set"] == name and h.get(metric) is not None]
        if points:
            ax_metric.plot(*zip(*points), "o-", label=name)
    ax_metric.set(xlabel="optimizer step", ylabel=metric, title=f"{metric} per evaluation set")
    return save_panels(fig, png_path)
