"""Metrics: the JSONL log, perplexity, and the loss / perplexity curve plot."""

from __future__ import annotations

import json
import math
import os
from typing import Any

__all__ = ["MetricsLog", "perplexity", "plot_curves"]


def perplexity(mean_token_loss: float) -> float:
    """exp(mean cross-entropy in nats), capped to avoid overflow (inf above ~709)."""
    return math.exp(min(mean_token_loss, 700.0))


class MetricsLog:
    """Append-only JSONL file: one JSON object per line (``{"step": ..., "loss": ...}``).

    Appending means a resumed run continues the same file; a step logged twice (after a
    crash between a log line and the next checkpoint) is read back with the last value
    winning.
    """

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

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


def plot_curves(metrics_path: str, png_path: str) -> str | None:
    """Plot train / eval loss and perplexity against the step into ``png_path``.

    Returns the path, or None when there is nothing to plot. Uses matplotlib's Agg
    backend (no display needed).
    """
    records = MetricsLog(metrics_path).read()
    train_steps, train_loss = _series(records, "loss")
    eval_steps, eval_loss = _series(records, "eval_loss")
    if not train_steps and not eval_steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(10, 4))
    if train_steps:
        ax_loss.plot(train_steps, train_loss, label="train")
        ax_ppl.plot(train_steps, [perplexity(v) for v in train_loss], label="train")
    if eval_steps:
        ax_loss.plot(eval_steps, eval_loss, "o-", label="held-out")
        ax_ppl.plot(eval_steps, [perplexity(v) for v in eval_loss], "o-", label="held-out")
    ax_loss.set(xlabel="optimizer step", ylabel="loss (nats / supervised item)", title="loss")
    ax_ppl.set(xlabel="optimizer step", ylabel="perplexity", title="perplexity", yscale="log")
    for ax in (ax_loss, ax_ppl):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
