"""``fastft active``: fine-tune with fewer labels. Choose the pool rows worth labelling,
have a person label them, fine-tune again; or simulate that on data already labelled to
choose a strategy first. Reads top to bottom: check, set up (the fine-tuning config, the
loop's directory), run a round / the simulation, report.

    # simulate on labelled data: learning curves per strategy vs random, over seeds
    fastft active --simulate --model runs/bert/final --pool train.jsonl --test test.jsonl \\
        --strategies random entropy badge --seeds 0 1 2 --initial 20 --k 20 --rounds 4 \\
        --output-dir runs/al-sim epochs=6 lr=1e-4
    # label for real: round 0 fine-tunes on the seed set and picks 100 rows to label
    fastft active --model runs/bert/final --pool pool.jsonl --labelled seed.jsonl --k 100 \\
        --strategy badge --eval dev=dev.jsonl --output-dir runs/al epochs=4
    #   ... label runs/al/round-000/to_label.jsonl (add "label" to each row) ...
    fastft active --output-dir runs/al --add labelled-round0.jsonl      # round 1, and so on
    fastft active --output-dir runs/al --resume                          # after a crash

Every round fine-tunes the base model afresh on all labels so far (``fastft.finetune`` with
the loop's config). The loop's files: ``fastft/active/loop.py``; the simulation's:
``fastft/active/simulate.py``; the strategies: ``fastft/active/strategies.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Mapping, Sequence

from fastft.active.loop import (
    RoundResult,
    add_labels,
    read_jsonl,
    read_state,
    run_round,
    start_loop,
)
from fastft.active.simulate import SimulationResult
from fastft.active.simulate import simulate as simulate_curves
from fastft.active.strategies import STRATEGIES
from fastft.data.loading import load_rows, rows_of
from fastft.errors import loading
from fastft.finetuning.evaluation import evaluate_sets
from fastft.finetuning.tasks.base import distinct_labels
from fastft.recipes.finetune import FinetuneConfig, _is_data_file, _name_and_path, finetune, named_sets
from fastft.train.config import config_as_dict, config_from_dict, load_config, resolve_config
from fastft.train.runtime import seed_everything

__all__ = ["continue_loop", "main", "simulate", "start"]

# Fields of the stored fine-tuning config that belong to one run, not to the loop.
_PER_RUN = ("output_dir", "resume", "overwrite", "data_files", "save")


def _tokenizer(tokenizer, model: str):
    if tokenizer is None or isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        with loading("tokenizer", tokenizer or model):
            return AutoTokenizer.from_pretrained(tokenizer or model)
    return tokenizer


def _with_labels(config: FinetuneConfig, *row_sets: list[dict]) -> FinetuneConfig:
    """Fix the classes from every row known now (labelled, evaluation sets): a seed set
    that lacks a class must still train a head with all of them."""
    task = config.task
    if task.labels is None and hasattr(task, "label_column"):
        task.labels = distinct_labels((row[task.label_column] for rows in row_sets for row in rows
                                       if row.get(task.label_column) is not None), "the labelled and evaluation rows")
    return config


def _fit(model: str, tokenizer, config: FinetuneConfig, eval_sets: Mapping[str, list[dict]], *, save: bool = True):
    """``fit(rows, output_dir, resume)`` for the loop: ``fastft.finetune`` from the base model."""

    def fit(rows, output_dir, resume=False):
        seed_everything(config.seed)  # the new head is drawn before the loop seeds: the same rows, the same model
        return finetune(model, tokenizer, {"train": rows, **eval_sets}, config=config, output_dir=output_dir,
                        resume="auto" if resume else None, save=save)

    return fit


# ------------------------------------------------------------------------ the label loop


def start(model: str, pool, labelled, k: int, strategy: str = "entropy", *, output_dir: str, eval_sets=None,
          tokenizer=None, config: FinetuneConfig | Mapping | str | None = None, seed: int = 0, mc_passes: int = 10,
          mc_dropout: float | None = None, overwrite: bool = False, **overrides) -> RoundResult:
    """Start a label loop in ``output_dir`` and run its round 0: fine-tune ``model`` (a name or
    path: every round starts from it) on ``labelled``, evaluate ``eval_sets`` ({name: rows};
    the first of validation / dev / test picks the best checkpoint), pick ``k`` pool rows.

    Returns: the round (``to_label_path``: the rows to label).

    Raises (before anything is written): ValueError (an unknown strategy, k larger than the
    pool left after dropping duplicates and labelled rows, bad columns / labels, ...),
    OutputDirInUse (``output_dir`` holds another loop and not ``overwrite``).
    """
    if not isinstance(model, str):
        raise TypeError("start: give the model as a name or path (each round fine-tunes it afresh)")
    config = resolve_config(config, overrides, FinetuneConfig)
    pool, labelled = rows_of(pool), rows_of(labelled)
    eval_sets = {name: rows_of(rows) for name, rows in (eval_sets or {}).items()}
    _with_labels(config, labelled, *eval_sets.values())
    for name, rows in {"labelled": labelled, **eval_sets}.items():
        config.task.check_columns(rows, name)
        config.task.check_labels(rows, name)
    stored = {k: v for k, v in config_as_dict(config).items() if k not in _PER_RUN}
    recipe = {"model": model, "tokenizer": tokenizer if isinstance(tokenizer, str) else None,
              "eval": list(eval_sets), "config": stored}
    output_dir = start_loop(output_dir, pool=pool, labelled=labelled, k=k, strategy=strategy, task=config.task,
                            seed=seed, select_options={"mc_passes": mc_passes, "mc_dropout": mc_dropout},
                            recipe=recipe, overwrite=overwrite,
                            files={f"eval/{name}.jsonl": rows for name, rows in eval_sets.items()})  # later rounds read these
    return continue_loop(output_dir, tokenizer=tokenizer)


def continue_loop(output_dir: str, add=None, *, tokenizer=None) -> RoundResult:
    """Go on with the loop in ``output_dir``: with ``add`` (labelled rows, or a file of
    them) start the next round on all labels so far; without, finish the latest round
    where it stopped (a crash) or show it again when it is done.

    Raises: ActiveLoopError (no loop there; labels added before the round's selection),
    ValueError (added rows without labels / columns, with labels outside the classes).
    """
    state = read_state(output_dir)
    recipe = state["recipe"]
    config = config_from_dict(FinetuneConfig, recipe["config"])
    eval_sets = {name: read_jsonl(os.path.join(output_dir, "eval", f"{name}.jsonl")) for name in recipe["eval"]}
    added_report = None
    if add is not None:
        rows = load_rows(add) if isinstance(add, str) else rows_of(add)
        config.task.check_columns(rows, "added")
        config.task.check_labels(rows, "added")
        _, added_report = add_labels(output_dir, rows)
    tokenizer = _tokenizer(tokenizer or recipe.get("tokenizer"), recipe["model"])
    fit = _fit(recipe["model"], tokenizer, config, eval_sets)

    def evaluate(bundle):
        from fastft.finetuning.bundle import load_finetuned

        model, bundle_tokenizer, task = load_finetuned(bundle)
        return evaluate_sets(model, bundle_tokenizer, task, eval_sets, batch_size=config.eval_batch_size or
                             config.batch_size, generate=False)

    result = run_round(output_dir, fit, evaluate=evaluate, device=None)
    if added_report is not None:
        result.steps.insert(0, "labels added: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in added_report.items()))
    return result


# ------------------------------------------------------------------------ simulation


def simulate(model: str, pool, test, *, output_dir: str, strategies: Sequence[str] = ("random", "entropy"),
             seeds: Sequence[int] = (0, 1, 2), initial: int = 20, k: int = 20, rounds: int = 4, eval_sets=None,
             tokenizer=None, config: FinetuneConfig | Mapping | str | None = None, metric: str | None = None,
             mc_passes: int = 10, mc_dropout: float | None = None, resume: bool = False, overwrite: bool = False,
             log=None, **overrides) -> SimulationResult:
    """Simulated active learning on the labelled ``pool``, measured on ``test``
    (``fastft.active.simulate``): every round fine-tunes ``model`` afresh with the
    config (``epochs=``, ``lr=``, ``strategy=`` ... as overrides), with the seed as its seed.

    Returns: ``SimulationResult`` (curves, labels needed to reach random's final metric,
    the CSV / PNG / summary paths).
    """
    if not isinstance(model, str):
        raise TypeError("simulate: give the model as a name or path (each round fine-tunes it afresh)")
    config = resolve_config(config, {"progress": False, "plot": False, **overrides}, FinetuneConfig)
    pool, test = rows_of(pool), rows_of(test)
    eval_sets = {name: rows_of(rows) for name, rows in (eval_sets or {}).items()}
    _with_labels(config, pool, test, *eval_sets.values())
    for name, rows in {"pool": pool, "test": test, **eval_sets}.items():
        config.task.check_columns(rows, name)
        config.task.check_labels(rows, name)
    tokenizer = _tokenizer(tokenizer, model)

    def fit(rows, output_dir, seed):
        run = resolve_config(config, {"seed": seed}, FinetuneConfig)  # the head's initialisation, the data order
        seed_everything(seed)  # the new head is drawn before the loop seeds: a fit depends on (rows, seed) only
        return finetune(model, tokenizer, {"train": rows, **eval_sets}, config=run, output_dir=output_dir, save=False)

    return simulate_curves(pool, test, fit=fit, task=config.task, output_dir=output_dir, strategies=strategies,
                           seeds=seeds, initial=initial, k=k, rounds=rounds, metric=metric,
                           select_options={"mc_passes": mc_passes, "mc_dropout": mc_dropout}, resume=resume,
                           overwrite=overwrite, batch_size=config.eval_batch_size or 32, log=log)


# ------------------------------------------------------------------------ command line


def _round_text(result: RoundResult, output_dir: str) -> str:
    lines = [*result.steps, ""]
    if result.metrics:
        names = sorted({k for m in result.metrics.values() for k, v in m.items()
                        if isinstance(v, (int, float)) and not k.startswith("num_")})
        lines += [f"round {result.index} ({result.labelled} labelled rows), bundle {result.bundle}", "",
                  "| set | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for name, m in result.metrics.items():
            lines.append(f"| {name} | " + " | ".join(f"{m[n]:.4g}" if isinstance(m.get(n), (int, float)) else ""
                                                     for n in names) + " |")
        lines.append("")
    if result.to_label:
        lines.append(f"next: label the {len(result.to_label)} rows of {result.to_label_path} (give each its label), "
                     f"then: fastft active --output-dir {output_dir} --add <the labelled file>")
    else:
        lines.append("the pool is used up: nothing left to label")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fastft active", description="Active learning: pick the pool rows worth labelling, add their labels, "
        "fine-tune again (a round per call), or --simulate that on labelled data to choose a strategy.")
    parser.add_argument("--output-dir", required=True, help="the loop's (or simulation's) directory")
    parser.add_argument("--model", help="base model name or path (every round fine-tunes it afresh)")
    parser.add_argument("--tokenizer")
    parser.add_argument("--pool", help="rows to choose from (.jsonl/.json/.csv/.parquet); with --simulate: labelled")
    parser.add_argument("--labelled", help="the labelled seed set (round 0)")
    parser.add_argument("--k", type=int, help="rows to pick per round")
    parser.add_argument("--strategy", default="entropy", choices=STRATEGIES)
    parser.add_argument("--eval", nargs="*", default=[], metavar="NAME=PATH",
                        help="named evaluation sets (the first of validation / dev / test picks the best checkpoint)")
    parser.add_argument("--add", metavar="FILE", help="labelled rows (to_label.jsonl with labels): the next round")
    parser.add_argument("--resume", action="store_true", help="finish a crashed round / simulation")
    parser.add_argument("--overwrite", action="store_true", help="move an old loop in --output-dir aside and start over")
    parser.add_argument("--seed", type=int, default=0, help="random / badge draws, BALD's dropout masks")
    parser.add_argument("--mc-passes", type=int, default=10, help="bald: Monte-Carlo dropout passes")
    parser.add_argument("--mc-dropout", type=float, help="bald: dropout rate to sample with (default: the model's)")
    parser.add_argument("--simulate", action="store_true", help="simulate on a labelled --pool, measured on --test")
    parser.add_argument("--test", help="--simulate: the labelled rows the learning curves are measured on")
    parser.add_argument("--strategies", nargs="+", default=["random", "entropy"], metavar="STRATEGY",
                        help=f"--simulate: strategies to compare (of {', '.join(STRATEGIES)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--initial", type=int, default=20, help="--simulate: random seed-set size")
    parser.add_argument("--rounds", type=int, default=4, help="--simulate: selection rounds after the seed set")
    parser.add_argument("--metric", help="--simulate: the test metric (default: the task's primary one)")
    parser.add_argument("--config", help="YAML file mapped onto fastft.recipes.finetune.FinetuneConfig")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="fine-tuning settings (epochs=4 lr=1e-4 ...)")
    args = parser.parse_args(argv)

    eval_entries = [e for e in args.eval if _is_data_file(_name_and_path(e)[1])]
    overrides = [e for e in args.eval if e not in eval_entries] + args.overrides
    starting = [flag for flag in ("model", "pool", "labelled", "k") if getattr(args, flag) is not None]
    if args.simulate:
        missing = [f"--{f}" for f in ("model", "pool", "test") if getattr(args, f) is None]
        if missing or args.k is None:
            raise ValueError(f"--simulate needs {', '.join(missing + ['--k'] * (args.k is None))}")
        config = load_config(args.config, overrides, cls=FinetuneConfig)
        result = simulate(args.model, load_rows(args.pool), load_rows(args.test), output_dir=args.output_dir,
                          strategies=args.strategies, seeds=args.seeds, initial=args.initial, k=args.k,
                          rounds=args.rounds, eval_sets=named_sets(eval_entries), tokenizer=args.tokenizer,
                          config=config, metric=args.metric, mc_passes=args.mc_passes, mc_dropout=args.mc_dropout,
                          resume=args.resume, overwrite=args.overwrite, log=lambda line: print(line, file=sys.stderr))
        print(result.table())
        print(json.dumps(result.paths, indent=2))
        return 0
    if args.add or args.resume:
        if starting or eval_entries or overrides:
            raise ValueError(f"--add / --resume go on with the loop in {args.output_dir} as it was started; drop "
                             f"{', '.join('--' + f for f in starting) or 'the fine-tuning settings'}")
        result = continue_loop(args.output_dir, args.add, tokenizer=args.tokenizer)
    else:
        missing = [f"--{f}" for f in ("model", "pool", "labelled", "k") if getattr(args, f) is None]
        if missing:
            raise ValueError(f"starting a loop needs {', '.join(missing)} (going on with one: --add FILE or --resume)")
        config = load_config(args.config, overrides, cls=FinetuneConfig)
        result = start(args.model, load_rows(args.pool), load_rows(args.labelled), args.k, args.strategy,
                       output_dir=args.output_dir, eval_sets=named_sets(eval_entries), tokenizer=args.tokenizer,
                       config=config, seed=args.seed, mc_passes=args.mc_passes, mc_dropout=args.mc_dropout,
                       overwrite=args.overwrite)
    print(_round_text(result, args.output_dir))
    return 0




if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
