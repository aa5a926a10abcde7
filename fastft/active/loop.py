"""The label loop: rounds of fine-tune → evaluate → select, with a person labelling in
between, kept in one output directory so that every round can be read back and a crashed
one picks up where it stopped.

    <output_dir>/
      active.json              the loop: strategy, k, seed, selection options, what the recipe
                               needs to fine-tune again (model, sets, overrides)
      pool.jsonl               the pool as given at the start (the loop's own copy)
      eval/<name>.jsonl        the named evaluation sets (the recipe's copies, read by every round)
      round-000/
        labelled.jsonl         the labelled rows this round trains on (round 0: the seed set)
        finetune/              the fine-tuning run (run_config.json, metrics.jsonl, checkpoints/,
                               finetuned/: the bundle)
        metrics.json           the bundle's metrics on every named evaluation set
        selection.json         the picked rows' pool indices and scores, the pool report
        to_label.jsonl         the rows to label (written last: its presence means the round is done)
      round-001/ ...           labelled.jsonl = round-000's rows + the labels added after it

A round's state is what its directory holds, each file written whole (a temporary file,
then a rename), so a crash leaves a round at one of four points and ``run_round`` goes on
from there: fine-tuning (resumed from its checkpoints), evaluation, selection.

The fine-tuning itself comes in as ``fit(train_rows, output_dir, resume)`` returning an
object with ``save_path`` (the bundle) and ``metrics`` ({set: metrics}), like
``fastft.finetune``'s result (``fastft/recipes/active.py`` passes it): this package knows
no recipe.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable

from fastft.active.pool import input_columns, input_key, prepare_pool
from fastft.active.strategies import STRATEGIES, select
from fastft.errors import FastftError, OutputDirInUse

__all__ = ["ActiveLoopError", "RoundResult", "add_labels", "read_jsonl", "read_state", "round_dir", "run_round",
           "start_loop", "write_jsonl"]

STATE_FILE = "active.json"
POOL_FILE = "pool.jsonl"


class ActiveLoopError(FastftError):
    """The loop's directory is not in a state for the asked step (labels added before
    selection, a loop started over another ...)."""


def write_jsonl(path: str, rows: list[dict]) -> None:
    """Rows as JSON lines, written whole (temporary file, then rename)."""
    _write_whole(path, "".join(json.dumps(row, default=str) + "\n" for row in rows))


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_whole(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: str, value: Any) -> None:
    _write_whole(path, json.dumps(value, indent=2, default=str) + "\n")


def round_dir(output_dir: str, index: int) -> str:
    return os.path.join(output_dir, f"round-{index:03d}")


def read_state(output_dir: str) -> dict:
    """``active.json`` with ``rounds``: the round directories present, in order.

    Raises:
        ActiveLoopError: ``output_dir`` holds no label loop.
    """
    path = os.path.join(output_dir, STATE_FILE)
    if not os.path.isfile(path):
        raise ActiveLoopError(f"{output_dir} holds no active-learning loop ({STATE_FILE} not found): start one with "
                              "--model, --pool, --labelled and --k")
    with open(path) as f:
        state = json.load(f)
    rounds = sorted(int(name[6:]) for name in os.listdir(output_dir)
                    if name.startswith("round-") and name[6:].isdigit())
    state["rounds"] = rounds
    return state


def start_loop(output_dir: str, *, pool: list[dict], labelled: list[dict], k: int, strategy: str, task,
               seed: int = 0, select_options: dict | None = None, recipe: dict | None = None,
               files: dict[str, list[dict]] | None = None, overwrite: bool = False) -> str:
    """Create the loop in ``output_dir``: ``active.json``, ``pool.jsonl``,
    ``round-000/labelled.jsonl`` (the seed set) and ``files`` ({relative path: rows}, e.g.
    the recipe's copies of the evaluation sets). Nothing is written when a check fails.

    Raises:
        OutputDirInUse: ``output_dir`` holds files (another loop, another run) and not
            ``overwrite`` (then they are moved to ``<output_dir>.previous-<date-time>``).
        ValueError: an unknown strategy, k < 1, an empty pool or seed set, k larger than
            the pool rows left after dropping duplicates and labelled ones.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown selection strategy {strategy!r}; choose one of {list(STRATEGIES)}")
    if not pool:
        raise ValueError("the pool is empty: nothing to select from")
    if not labelled:
        raise ValueError("the labelled (seed) set is empty: label a few rows to start from")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    task.check_columns(labelled, "labelled")
    candidates, report = prepare_pool(pool, labelled, task)
    if k > len(candidates):
        raise ValueError(f"k={k} is more than the {len(candidates)} pool rows left to label ({report.line()})")
    output_dir = os.path.abspath(output_dir)
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        what = "an active-learning loop" if os.path.exists(os.path.join(output_dir, STATE_FILE)) else "other files"
        if not overwrite:
            raise OutputDirInUse(f"output dir {output_dir} holds {what}: continue a loop with --add FILE or --resume, "
                                 f"or start over with --overwrite (the old one is moved to {output_dir}.previous-"
                                 "<date-time>, not deleted)")
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        os.replace(output_dir, f"{output_dir}.previous-{stamp}")
    # Built beside it and renamed into place: a crash leaves no half-made loop in output_dir.
    building = f"{output_dir}.building-{os.getpid()}"
    os.makedirs(round_dir(building, 0))
    write_jsonl(os.path.join(building, POOL_FILE), pool)
    write_jsonl(os.path.join(round_dir(building, 0), "labelled.jsonl"), labelled)
    for relative, rows in (files or {}).items():
        os.makedirs(os.path.dirname(os.path.join(building, relative)), exist_ok=True)
        write_jsonl(os.path.join(building, relative), rows)
    _write_json(os.path.join(building, STATE_FILE), {
        "version": 1, "strategy": strategy, "k": k, "seed": seed, "select_options": select_options or {},
        "task": task.spec(), "recipe": recipe or {}, "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "start_report": report.as_dict(),
    })
    if os.path.isdir(output_dir):
        os.rmdir(output_dir)  # empty (checked above)
    os.replace(building, output_dir)
    return output_dir


@dataclass
class RoundResult:
    """A finished round: its ``index``, directory, the number of ``labelled`` rows it trained
    on, the bundle, its ``metrics``, the rows it picked (``to_label``; empty when the pool
    is used up) and a ``report`` line per step done in this call."""

    index: int
    path: str
    labelled: int
    bundle: str
    metrics: dict
    to_label: list[dict]
    to_label_path: str
    steps: list[str]


def _stage(path: str) -> str:
    if os.path.exists(os.path.join(path, "to_label.jsonl")):
        return "done"
    if os.path.exists(os.path.join(path, "metrics.json")):
        return "evaluated"
    if os.path.exists(os.path.join(path, "finetune", "finetuned", "fastft_finetune.json")):
        return "trained"
    return "started"


def run_round(output_dir: str, fit: Callable[[list[dict], str, bool], Any], *,
              evaluate: Callable[[str], dict] | None = None, device=None) -> RoundResult:
    """Finish the loop's latest round from wherever it stopped: fine-tune on its
    ``labelled.jsonl`` (``fit(rows, round/finetune, resume)``; resume is True when an
    earlier try left files there), write the metrics, select the next ``k`` rows.
    ``evaluate(bundle) -> {set: metrics}`` is needed only when a crash came between the
    bundle and its metrics. A round already done is returned as it is."""
    state = read_state(output_dir)
    index = state["rounds"][-1]
    path = round_dir(output_dir, index)
    labelled = read_jsonl(os.path.join(path, "labelled.jsonl"))
    steps, result = [], None
    bundle = os.path.join(path, "finetune", "finetuned")
    stage = _stage(path)
    if stage == "started":
        resume = os.path.isdir(os.path.join(path, "finetune")) and bool(os.listdir(os.path.join(path, "finetune")))
        result = fit(labelled, os.path.join(path, "finetune"), resume)
        if os.path.abspath(result.save_path) != os.path.abspath(bundle):
            raise ActiveLoopError(f"fit saved its bundle to {result.save_path}, the loop expects {bundle}")
        steps.append(f"round {index}: fine-tuned on {len(labelled)} labelled rows" + (" (resumed)" if resume else ""))
        stage = "trained"
    if stage == "trained":
        if result is not None:
            metrics = result.metrics
        elif evaluate is not None:
            metrics = evaluate(bundle)
        else:
            raise ActiveLoopError(f"{path}: the bundle has no metrics.json and no evaluate function was given")
        _write_json(os.path.join(path, "metrics.json"), metrics)
        steps.append(f"round {index}: evaluated on {sorted(metrics) or 'no named sets'}")
        stage = "evaluated"
    if stage == "evaluated":
        pool = read_jsonl(os.path.join(output_dir, POOL_FILE))
        model_or_bundle = result if result is not None and hasattr(result, "model") else bundle
        from fastft.active.outputs import resolve_model

        model, tokenizer, task = resolve_model(model_or_bundle, device=device)
        candidates, report = prepare_pool(pool, labelled, task)
        k = min(state["k"], len(candidates))
        if k:
            selection = select(model, pool, k, state["strategy"], labelled=labelled, tokenizer=tokenizer, task=task,
                               seed=state["seed"] + index, **state["select_options"])
            picked, scores, report = selection.rows, selection.scores, selection.report
            indices = selection.indices
        else:
            picked, scores, indices = [], [], []
        label_column = "tags" if task.name == "token" else getattr(task, "label_column", "label")
        to_label = [{c: v for c, v in row.items() if c != label_column} for row in picked]
        _write_json(os.path.join(path, "selection.json"), {
            "strategy": state["strategy"], "k": state["k"], "picked": len(picked), "pool_indices": indices,
            "scores": scores, "pool_report": report.as_dict(), "pool_used_up": len(picked) < state["k"]})
        write_jsonl(os.path.join(path, "to_label.jsonl"), to_label)
        steps.append(f"round {index}: selected {len(picked)} rows with {state['strategy']} ({report.line()})")
    with open(os.path.join(path, "metrics.json")) as f:
        metrics = json.load(f)
    to_label_path = os.path.join(path, "to_label.jsonl")
    return RoundResult(index, path, len(labelled), bundle, metrics, read_jsonl(to_label_path), to_label_path, steps)


def add_labels(output_dir: str, rows: list[dict]) -> tuple[str, dict]:
    """Start the next round: its ``labelled.jsonl`` = the latest round's labelled rows + ``rows``
    (the labelled ``to_label.jsonl`` rows, or any pool rows a person labelled). Rows whose
    input is already labelled, or repeated in ``rows``, are dropped. Returns (the new
    round's directory, a report: added / duplicates dropped / picked rows left unlabelled /
    rows that were not picked). Nothing is written when a check fails.

    Raises:
        ActiveLoopError: the latest round has not finished its selection yet.
        ValueError: no rows; rows without the task's columns or with an empty label.
    """
    state = read_state(output_dir)
    from fastft.finetuning.tasks import get_task

    task = get_task(state["task"]["name"], **{k: v for k, v in state["task"].items() if k != "name"})
    index = state["rounds"][-1]
    path = round_dir(output_dir, index)
    if _stage(path) != "done":
        raise ActiveLoopError(f"round {index} has not selected rows yet ({path}): finish it first (--resume)")
    if not rows:
        raise ValueError("no labelled rows to add")
    task.check_columns(rows, "added")
    label_column = "tags" if task.name == "token" else getattr(task, "label_column", "label")
    unlabelled = [i for i, row in enumerate(rows) if row.get(label_column) in (None, "")]
    if unlabelled:
        raise ValueError(f"{len(unlabelled)} added row(s) have no {label_column!r} (rows {unlabelled[:5]}): label them, "
                         "or leave them out (they stay in the pool)")
    labelled = read_jsonl(os.path.join(path, "labelled.jsonl"))
    columns = input_columns(task)
    known = {input_key(row, columns) for row in labelled}
    picked = {input_key(row, columns) for row in read_jsonl(os.path.join(path, "to_label.jsonl"))}
    added, duplicates = [], 0
    for row in rows:
        key = input_key(row, columns)
        if key in known:
            duplicates += 1
            continue
        known.add(key)
        added.append(row)
    added_keys = {input_key(row, columns) for row in added}
    report = {"added": len(added), "duplicates_dropped": duplicates,
              "picked_not_labelled": len(picked - added_keys), "not_picked": len(added_keys - picked)}
    new = round_dir(output_dir, index + 1)
    building = f"{new}.building"  # not a round until renamed: a crash here leaves no half round
    if os.path.isdir(building):
        shutil.rmtree(building)
    os.makedirs(building)
    write_jsonl(os.path.join(building, "labelled.jsonl"), labelled + added)
    os.replace(building, new)
    return new, report
