"""Choosing a strategy on data that is already labelled: the labels of the pool are hidden
and revealed only for the rows a strategy picks. For each strategy and seed:

    round 0   a random seed set of ``initial`` rows (the same rows for every strategy at a seed)
    round r   fine-tune on the labelled rows -> the test metric -> pick ``k`` more rows
              (round 0 is fine-tuned once per seed and shared by the strategies: ``fit``
              must depend on its rows and seed only, as the recipe's does)
              (their labels are now revealed) -> round r + 1, up to ``rounds``

and the learning curves (test metric vs labels used), mean ± standard deviation over the
seeds per strategy, random among them as the baseline:

    <output_dir>/simulation.json   the settings (a resumed run must match them)
    <output_dir>/curves.jsonl      one line per (strategy, seed, round), written as each ends:
                                   labels, the metric, the labelled pool indices, the next picks
    <output_dir>/curves.csv        strategy, seed, round, labels, <metric>
    <output_dir>/curves.png        the curves with their spread over seeds
    <output_dir>/summary.md        per strategy: the final metric, and the labels it needed to
                                   reach random's final metric (mean over seeds)

A crash loses at most the round in flight: ``resume=True`` reads ``curves.jsonl`` and goes on
from each (strategy, seed)'s last finished round. Fine-tuning comes in as
``fit(train_rows, output_dir, seed) -> result`` with ``model`` / ``tokenizer`` / ``task``
(what ``fastft.finetune`` returns); each fit's scratch directory is removed once its round is recorded.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from fastft.active.pool import prepare_pool
from fastft.active.strategies import STRATEGIES, select
from fastft.errors import OutputDirInUse

__all__ = ["SimulationResult", "labels_to_reach", "simulate"]


@dataclass
class SimulationResult:
    """``records``: one dict per (strategy, seed, round); ``curves``: per strategy a list of
    ``(labels, mean, std)`` over seeds; ``reach``: per strategy the labels its mean curve
    needed to reach random's final mean (None: never; random: its whole budget; empty
    without a random baseline);
    ``paths``: the files written."""

    metric: str
    records: list[dict]
    curves: dict[str, list[tuple[int, float, float]]]
    reach: dict[str, int | None] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)

    def table(self) -> str:
        random_final = self.curves.get("random", [(None, None, None)])[-1]
        lines = [f"| strategy | labels | final {self.metric} (mean ± std over seeds) | labels to reach random's "
                 f"final{'' if random_final[1] is None else f' ({random_final[1]:.4g})'} |", "|---|---|---|---|"]
        for strategy, curve in self.curves.items():
            labels, mean, std = curve[-1]
            reach = self.reach.get(strategy, "")
            reach = "not reached" if reach is None else reach
            lines.append(f"| {strategy} | {labels} | {mean:.4g} ± {std:.2g} | {reach} |")
        return "\n".join(lines)


def labels_to_reach(curve: list[tuple[int, float, float]], target: float) -> int | None:
    """The fewest labels at which ``curve``'s mean is at least ``target`` (None: never)."""
    for labels, mean, _ in curve:
        if mean >= target - 1e-12:
            return labels
    return None


def simulate(pool: list[dict], test: list[dict], *, fit: Callable[[list[dict], str, int], Any], task, output_dir: str,
             strategies=("random", "entropy"), seeds=(0, 1, 2), initial: int = 20, k: int = 20, rounds: int = 4,
             metric: str | None = None, select_options: dict | None = None, resume: bool = False,
             overwrite: bool = False, batch_size: int = 32, log: Callable[[str], None] | None = None) -> SimulationResult:
    """Simulated active learning on a labelled ``pool`` (see the module docstring); the
    metric is measured on ``test`` (``metric``: default the task's primary one). ``task``
    says which columns are a row's input (duplicates count once).

    Raises:
        ValueError: an unknown strategy; no seeds; initial / k / rounds below 1; a pool too
            small for ``initial + rounds * k`` rows after dropping duplicates; an empty test set.
        OutputDirInUse: ``output_dir`` holds a simulation and neither ``resume`` nor
            ``overwrite``, or ``resume`` with other settings than the stored ones.
    """
    from fastft.finetuning.evaluation import evaluate_sets

    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown selection strateg{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
                         f"choose from {list(STRATEGIES)}")
    if not strategies or not seeds:
        raise ValueError("simulate: give at least one strategy and one seed")
    for name, value in (("initial", initial), ("k", k), ("rounds", rounds)):
        if value < 1:
            raise ValueError(f"simulate: {name} must be >= 1, got {value}")
    if not test:
        raise ValueError("simulate: the test set is empty")
    log = log or (lambda line: None)
    settings = {"strategies": list(strategies), "seeds": list(seeds), "initial": initial, "k": k, "rounds": rounds,
                "metric": metric, "select_options": select_options or {}, "pool_rows": len(pool), "test_rows": len(test)}
    records = _claim(output_dir, settings, resume, overwrite)
    needed = initial + rounds * k
    done = {(r["strategy"], r["seed"], r["round"]): r for r in records}

    for seed in seeds:
        start: list[int] | None = None
        first_fit = None  # round 0 is the same fit for every strategy at a seed: done once
        for strategy in strategies:
            last = max((r for r in records if r["strategy"] == strategy and r["seed"] == seed),
                       key=lambda r: r["round"], default=None)
            first_round = 0 if last is None else last["round"] + 1
            labelled = [] if last is None else last["labelled"] + last["selected"]
            for round_ in range(first_round, rounds + 1):
                if (strategy, seed, round_) in done:
                    continue
                started = time.perf_counter()
                scratch = os.path.join(output_dir, "runs", f"{strategy}-seed{seed}-round{round_}")
                if os.path.isdir(scratch):
                    shutil.rmtree(scratch)  # a crashed round's: ours, redone from the start
                if round_ == 0:
                    if start is None:
                        start = _initial_rows(pool, task, needed, initial, seed)
                    labelled = list(start)
                if round_ == 0 and first_fit is not None:
                    result, value = first_fit
                else:
                    result = fit([pool[i] for i in labelled], scratch, seed)
                    value = None
                model, tokenizer, task = result.model, result.tokenizer, result.task
                name = metric or task.primary_metric
                if value is None:
                    value = evaluate_sets(model, tokenizer, task, {"test": test}, batch_size=batch_size,
                                          generate=False)["test"][name]
                if round_ == 0:
                    first_fit = (result, value)
                selected = []
                if round_ < rounds:
                    chosen = select(model, pool, k, strategy, labelled=[pool[i] for i in labelled], tokenizer=tokenizer,
                                    task=task, seed=1000 * seed + round_, batch_size=batch_size,
                                    **(select_options or {}))
                    selected = chosen.indices
                record = {"strategy": strategy, "seed": seed, "round": round_, "labels": len(labelled), name: value,
                          "metric": name, "labelled": labelled, "selected": selected,
                          "seconds": round(time.perf_counter() - started, 3)}
                with open(os.path.join(output_dir, "curves.jsonl"), "a") as f:
                    f.write(json.dumps(record) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                records.append(record)
                shutil.rmtree(scratch, ignore_errors=True)
                log(f"{strategy} seed {seed} round {round_}: {len(labelled)} labels, {name} {value:.4f} "
                    f"({record['seconds']:.1f} s)")
                labelled = labelled + selected
    return _report(records, output_dir)


def _claim(output_dir: str, settings: dict, resume: bool, overwrite: bool) -> list[dict]:
    """The records already in ``output_dir`` (resume), after checking it is ours to write."""
    settings_path = os.path.join(output_dir, "simulation.json")
    curves = os.path.join(output_dir, "curves.jsonl")
    if os.path.exists(settings_path) or os.path.exists(curves):
        if resume:
            with open(settings_path) as f:
                stored = json.load(f)
            differ = sorted(k for k in settings if stored.get(k) != settings[k])
            if differ:
                raise OutputDirInUse(f"{output_dir} holds a simulation with other settings ({', '.join(differ)}: "
                                     f"{[stored.get(k) for k in differ]} there, {[settings[k] for k in differ]} now): "
                                     "resume with the same ones, or use another --output-dir")
            if not os.path.exists(curves):
                return []
            with open(curves) as f:
                return [json.loads(line) for line in f if line.strip()]
        if not overwrite:
            raise OutputDirInUse(f"output dir {output_dir} holds a simulation: continue it with --resume, or start over "
                                 "with --overwrite (the old one is moved aside, not deleted)")
        import datetime

        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        os.replace(output_dir, f"{os.path.abspath(output_dir)}.previous-{stamp}")
    os.makedirs(output_dir, exist_ok=True)
    with open(settings_path, "w") as f:
        json.dump(settings, f, indent=2)
    return []


def _initial_rows(pool: list[dict], task, needed: int, initial: int, seed: int) -> list[int]:
    """``initial`` distinct pool rows drawn at random with ``seed`` (duplicates count once)."""
    first, _ = prepare_pool(pool, [], task)  # the first row of each input (what selection keeps)
    if len(first) < needed:
        raise ValueError(f"simulate: the pool has {len(first)} distinct rows, the simulation needs initial + rounds x k "
                         f"= {needed}")
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(first, size=initial, replace=False))


def _report(records: list[dict], output_dir: str) -> SimulationResult:
    name = records[0]["metric"] if records else "metric"
    strategies = list(dict.fromkeys(r["strategy"] for r in records))
    curves: dict[str, list[tuple[int, float, float]]] = {}
    for strategy in strategies:
        by_round: dict[int, list[dict]] = {}
        for r in records:
            if r["strategy"] == strategy:
                by_round.setdefault(r["round"], []).append(r)
        curve = []
        for round_ in sorted(by_round):
            values = [r[name] for r in by_round[round_]]
            labels = int(round(np.mean([r["labels"] for r in by_round[round_]])))
            curve.append((labels, float(np.mean(values)), float(np.std(values))))
        curves[strategy] = curve
    reach = {}
    if "random" in curves:
        # random needs its whole budget by definition (a noisy curve may touch its final value earlier)
        target = curves["random"][-1][1]
        reach = {s: curves[s][-1][0] if s == "random" else labels_to_reach(c, target) for s, c in curves.items()}
    result = SimulationResult(name, records, curves, reach)
    csv_path = os.path.join(output_dir, "curves.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["strategy", "seed", "round", "labels", name])
        for r in sorted(records, key=lambda r: (r["strategy"], r["seed"], r["round"])):
            writer.writerow([r["strategy"], r["seed"], r["round"], r["labels"], f"{r[name]:.6g}"])
    result.paths["csv"] = csv_path
    result.paths["png"] = _plot(curves, name, os.path.join(output_dir, "curves.png"))
    seeds = sorted({r["seed"] for r in records})
    summary = os.path.join(output_dir, "summary.md")
    with open(summary, "w") as f:
        f.write(f"# Simulated active learning: {name} vs labels (seeds {seeds})\n\n{result.table()}\n")
    result.paths["summary"] = summary
    return result


def _plot(curves: dict, metric: str, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy, curve in curves.items():
        labels, mean, std = (np.array(v) for v in zip(*curve))
        style = "k--" if strategy == "random" else "o-"
        (line,) = ax.plot(labels, mean, style, label=strategy, markersize=4)
        if not all(math.isclose(s, 0.0) for s in std):
            ax.fill_between(labels, mean - std, mean + std, alpha=0.12, color=line.get_color())
    ax.set(xlabel="labelled rows", ylabel=f"test {metric}", title="learning curves (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
