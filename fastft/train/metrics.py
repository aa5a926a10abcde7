"""Metrics: the JSONL log, perplexity, and the curves plot."""

from __future__ import annotations

import json
import math
import os
from typing import Any

__all__ = ["MetricsLog", "json_safe", "perplexity", "plot_curves", "save_panels", "two_panels"]


def perplexity(mean_token_loss: float) -> float:
    """exp(mean cross-entropy in nats), capped to avoid overflow (inf above ~709)."""
    return math.exp(min(mean_token_loss, 700.0))


def json_safe(value: Any) -> Any:
    """``value`` with every NaN / infinite float replaced by None: strict JSON has no NaN,
    and a file with a bare ``NaN`` is not JSON for most readers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class MetricsLog:
    """Append-only JSONL file: one JSON object per line (``{"step": ..., "loss": ...}``),
    strict JSON (non-finite numbers are written as null).

    Appending means a resumed run continues the same file; ``truncate_after(step)`` first
    drops what the crashed run logged after its last checkpoint, so no step appears twice.
    """

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
            f.flush()

    def truncate_after(self, step: int) -> int:
        """Drop the records of steps after ``step`` (written after the checkpoint a run
        resumes from); returns how many were dropped. Rewritten atomically."""
        if not os.path.exists(self.path):
            return 0
        records = self.read()
        kept = [r for r in records if r.get("step", 0) <= step]
        if len(kept) != len(records):
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(json_safe(r), allow_nan=False) + "\n" for r in kept)
            os.replace(tmp, self.path)
        return len(records) - len(kept)

    def read(self) -> list[dict[str, Any]]:
        if not os.path.exists(self.path):
            return []
        records = []
        with open(self.path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError:  # a line cut by a crash
                        continue
        return records


def _series(records, key):
    by_step = {}
    for record in records:
        if key in record and record[key] is not None and "step" in record:
            by_step[record["step"]] = record[key]
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_curves(metrics_path: str, png_path: str, *, perplexity_panel: bool = True) -> str | None:
    """Plot the train / held-out loss against the step into ``png_path``, and beside it
    the perplexity (language-model objectives: ``perplexity_panel``) or else every other
    held-out metric logged (``eval_accuracy`` ...).

    Returns the path, or None when there is nothing to plot. Uses matplotlib's Agg
    backend (no display needed).
    """
    records = MetricsLog(metrics_path).read()
    train_steps, train_loss = _series(records, "loss")
    eval_steps, eval_loss = _series(records, "eval_loss")
    if not train_steps and not eval_steps:
        return None
    fig, (ax_loss, ax_right) = two_panels()
    if train_steps:
        ax_loss.plot(train_steps, train_loss, label="train")
    if eval_steps:
        ax_loss.plot(eval_steps, eval_loss, "o-", label="held-out")
    ax_loss.set(xlabel="optimizer step", ylabel="loss (nats / supervised item)", title="loss")
    if perplexity_panel:
        if train_steps:
            ax_right.plot(train_steps, [perplexity(v) for v in train_loss], label="train")
        if eval_steps:
            ax_right.plot(eval_steps, [perplexity(v) for v in eval_loss], "o-", label="held-out")
        ax_right.set(xlabel="optimizer step", ylabel="perplexity", title="perplexity", yscale="log")
    else:
        names = sorted({k for r in records for k, v in r.items() if k.startswith("eval_") and k != "eval_loss"
                        and not k.startswith("eval_num_") and isinstance(v, (int, float))})
        for name in names:
            steps, values = _series(records, name)
            ax_right.plot(steps, values, "o-", label=name[len("eval_"):])
        ax_right.set(xlabel="optimizer step", title="held-out metrics")
    return save_panels(fig, png_path)


def two_panels():
    """A figure with two side-by-side axes (matplotlib's Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, 2, figsize=(10, 4))


def save_panels(fig, png_path: str) -> str:
    """Grid and legend on each axis that has labelled lines, then write ``png_path`` and
    free the figure; returns the path."""
    import matplotlib.pyplot as plt

    for ax in fig.axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
