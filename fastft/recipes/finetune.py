"""``fastft.finetune`` / ``fastft finetune``: the second stage — adapt a pretrained model to a
labelled task. Reads top to bottom: check everything, set up (model, forgetting baseline,
strategy, learning rates, guard, callbacks), train, report (every named set, forgetting,
the bundle).

    import fastft
    from fastft.finetuning import Discriminative, GradualUnfreeze, L2SP
    result = fastft.finetune(
        "path/to/bert", "path/to/bert", {"train": rows, "validation": dev, "ood": other},
        task="classification", strategy=GradualUnfreeze(every=1), lr_scheme=Discriminative(factor=2.6),
        guard=L2SP(alpha=0.01), schedule__name="slanted_triangular", epochs=4, lr=1e-4,
    )
    print(result.table())                    # every named set side by side
    labels = fastft.predict(result.save_path, ["a new sentence"])

Strings name the typed options with their defaults (``strategy="lora"``,
``lr_scheme="discriminative"``, ``guard="l2sp"``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from torch import nn

from fastft.audit.mitigation import BALANCES, WEIGHT_KEY, ReweightedClassificationObjective, balance_weights, balanced_rows
from fastft.audit.report import audit
from fastft.data.loading import load_rows, rows_of
from fastft.errors import loading
from fastft.finetuning.bundle import save_finetuned
from fastft.finetuning.evaluation import OtherSetsEvaluation, evaluate_sets, plot_finetuning
from fastft.finetuning.guards import Guard, lm_perplexity, lm_view
from fastft.finetuning.strategies import HEAD_NAMES, GradualUnfreeze, LRScheme, Strategy, lr_param_groups
from fastft.finetuning.tasks import Task, get_task
from fastft.train.callbacks import BestModel, Callback, EarlyStopping
from fastft.train.config import ModelConfig, TrainConfig, load_config, option_field, parse_yaml, resolve_config
from fastft.train.loop import TrainState, train
from fastft.train.output_dir import check_output_dir
from fastft.train.runtime import cpu_speedups, resolve_device, seed_everything

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "main"]


@dataclass
class FinetuneConfig(TrainConfig):
    """The loop's settings plus what fine-tuning adds."""

    task: Task = option_field(get_task, "classification")  # a Task, its name, or {name: ..., labels: [...], max_length: ...}
    strategy: Strategy = option_field(Strategy, "full")  # Full, Features, Freeze, GradualUnfreeze, LoRA, Adapter, ...
    lr_scheme: LRScheme | None = option_field(LRScheme, None)  # Discriminative, LayerwiseDecay
    guard: Guard | None = option_field(Guard, None)  # Replay, L2SP, EWC
    # Unlabeled texts (a list, or {"train": [...], "validation": [...]}) for replay / EWC and
    # for measuring forgetting (held out: "validation", else the last 20%).
    pretraining_data: Any = None
    lm_model: Any = None  # the pretrained masked-LM whose head measures an encoder's forgetting (default: loaded)
    measure_forgetting: bool | None = None  # default: when pretraining_data is given
    select_metric: str | None = None  # best-model / early-stopping metric; default: the task's primary one
    generate: bool = True  # SFT: BLEU of greedy generations on each set at the end
    save: Any = True  # True: bundle into <output_dir>/finetuned; a path: there; False: none
    # A BERT-family [CLS] classifier runs its last layer for position 0 only (same loss and
    # gradients, less work; fastft/models/first_token.py).
    cut_last_layer: bool = True
    # fastft.audit: a slice report of every named set by this column (with intervals and gaps);
    # balance_by: train every slice of this column equally ("sample": repeat the smaller slices'
    # rows; "reweight": per-row loss weights), its slice report too; calibrate: fit a temperature
    # on the selection set, saved in the bundle (fastft.predict then returns calibrated probabilities).
    slice_by: str | None = None
    balance_by: str | None = None
    balance: str = "sample"
    calibrate: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)  # the model's name or path (recorded in run_config.json)
    data_files: dict = field(default_factory=dict)  # {"train": path, "<set>": path}: where the data came from


@dataclass
class FinetuneResult:
    """What ``finetune`` returns.

    ``metrics``: ``{set name: {metric: value}}`` of the final (best) model on every named
    evaluation set; ``majority``: the primary metric of the majority-class predictor per
    set; ``history``: one entry per evaluation during training ``{"step", "epoch", "set",
    ...metrics}``; ``forgetting``: ``{"perplexity_before", "perplexity_after", "increase"}``
    of the pretraining objective on held-out unlabeled text (None when not measured)."""

    model: nn.Module
    tokenizer: Any
    task: Task
    state: TrainState
    strategy: Strategy
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    majority: dict[str, float | None] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    best_step: int | None = None
    best_metric: float | None = None
    forgetting: dict[str, float] | None = None
    save_path: str | None = None
    unfreeze_history: list = field(default_factory=list)
    slices: dict = field(default_factory=dict)  # {set: fastft.audit.SliceReport} with slice_by / balance_by
    temperature: float | None = None  # fitted with calibrate=True

    def table(self, metrics: Sequence[str] | None = None) -> str:
        """A markdown table: one row per evaluation set, one column per scalar metric."""
        names = list(metrics) if metrics else sorted(
            {k for m in self.metrics.values() for k, v in m.items() if isinstance(v, (int, float)) and not k.startswith("num_")}
        )
        lines = ["| set | " + " | ".join(names) + " | majority |", "|---" * (len(names) + 2) + "|"]
        for set_name, values in self.metrics.items():
            cells = [f"{values[n]:.4g}" if isinstance(values.get(n), (int, float)) else "" for n in names]
            majority = self.majority.get(set_name)
            lines.append(f"| {set_name} | " + " | ".join(cells) + f" | {'' if majority is None else f'{majority:.4g}'} |")
        return "\n".join(lines)


def finetune(
    model: nn.Module | str,
    tokenizer,
    data,
    task: Task | str | Mapping | None = None,
    strategy: Strategy | str | Mapping | None = None,
    config: FinetuneConfig | Mapping | str | None = None,
    *,
    callbacks: Sequence[Callback] = (),
    **overrides,
) -> FinetuneResult:
    """Fine-tune ``model`` on ``task`` with ``strategy``.

    Args:
        model: a ``transformers`` model with the task's head (e.g.
            ``BertForSequenceClassification(num_labels=...)``) or a name/path, then built
            with the right ``Auto*`` class and the label map.
        tokenizer: the model's (fast) tokenizer, or a name/path.
        data: rows (list of dicts / ``datasets.Dataset``) to train on, or ``{"train": rows,
            "validation": rows, "<other name>": rows ...}``: the first of validation / dev /
            test (else the first name) selects the best checkpoint; every set is reported.
            Columns per task: see ``fastft.finetuning.tasks``.
        task: a ``Task`` (``ClassificationTask(labels=[...], max_length=64)`` ...) or its
            name ``"classification" | "regression" | "token" | "qa" | "sft"``; None:
            ``config.task``.
        strategy: ``Full()``, ``Features()``, ``Freeze(first=2)``, ``GradualUnfreeze(every=1)``,
            ``LoRA(rank=8)``, ``Adapter()``, ``Prefix()``, ``Prompt()`` or a name; None:
            ``config.strategy``.
        config: ``FinetuneConfig`` / mapping / YAML path / None; ``**overrides`` set its
            fields: ``lr_scheme=Discriminative(factor=2.6)``, ``guard=EWC(strength=1.0)``,
            ``pretraining_data=texts``, ``epochs=3``, ``lr=2e-5``,
            ``schedule__name="slanted_triangular"``, ``early_stopping_patience=2``.
            ``export`` is ignored: the bundle is saved instead.
        callbacks: more ``fastft.train.Callback`` s for the loop.

    Returns: ``FinetuneResult``.

    Raises (all before the first step):
        ValueError: missing columns, labels outside the configured classes, a model
            without the task's head (e.g. QA on a causal LM), an unknown task / strategy /
            guard / lr scheme, strategy options that do not fit the model (freezing or
            unfreezing more layers than it has), a guard without pretraining text.
        TypeError: options that belong to no task / strategy / guard.
        KeyError: unknown config override names.
    """
    overrides.update({k: v for k, v in (("task", task), ("strategy", strategy)) if v is not None})
    config = resolve_config(config, overrides, FinetuneConfig)
    check_output_dir(config.output_dir, resume=config.resume, overwrite=config.overwrite)  # before any work
    task, strategy = config.task, config.strategy
    epochs = None if config.max_steps else config.epochs
    strategy.check(epochs)
    guard_texts, heldout_texts = _split_texts(config.pretraining_data)
    if config.guard is not None and config.guard.needs_text and not guard_texts:
        raise ValueError(f"guard {config.guard.name!r} needs unlabeled pretraining text: pass pretraining_data=[...]")
    measure_forgetting = bool(heldout_texts) if config.measure_forgetting is None else config.measure_forgetting
    if measure_forgetting and not heldout_texts:
        raise ValueError("measure_forgetting needs held-out unlabeled text: pass pretraining_data=")

    # --- data and labels ----------------------------------------------------------------
    train_rows, other_sets = _split_sets(data)
    for name, rows in {"train": train_rows, **other_sets}.items():
        task.check_columns(rows, name)
    task.fit_labels(train_rows)
    for name, rows in {"train": train_rows, **other_sets}.items():
        task.check_labels(rows, name)
    _check_audit_options(config, train_rows, other_sets)

    config.data_files = config.data_files or {name: f"<{len(rows)} rows given from Python>"
                                              for name, rows in {"train": train_rows, **other_sets}.items()}

    # --- tokenizer, model (a new head's initial weights come from the run's seed) -------
    seed_everything(config.seed)
    config.model.name_or_path = model if isinstance(model, str) else getattr(model.config, "_name_or_path", None) or None
    if tokenizer is None or isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        with loading("tokenizer", tokenizer or model):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
    if isinstance(model, str):
        with loading("model", model):
            model = task.build_model(model)
    task.check_model(model)
    head_names = task.head_modules or HEAD_NAMES
    if strategy.trains_new_head_first and not task.head_modules:
        raise ValueError(f"strategy {strategy.name!r} trains only a new task head; task {task.name!r} has none")
    model.to(resolve_device(config.device))

    # --- forgetting: the pretraining view, measured before ----------------------------
    view = lm_view(model, config.lm_model) if measure_forgetting or (config.guard and config.guard.needs_text) else None
    block_size = min(64, task.max_length)
    forgetting = None
    if measure_forgetting:
        forgetting = {"perplexity_before": lm_perplexity(view, heldout_texts, tokenizer, block_size=block_size)}

    # --- strategy, learning rates, guard ------------------------------------------------
    plan = strategy.apply(model, head_names=head_names, epochs=epochs, tokenizer=tokenizer)
    param_groups = None
    if config.lr_scheme is not None:
        param_groups = lr_param_groups(model, config.optim.lr, config.optim.weight_decay, config.lr_scheme,
                                       groups=plan.groups)
    extra_losses = []
    if config.guard is not None:
        extra_losses.append(config.guard.build(model, lm_model=view, texts=guard_texts, tokenizer=tokenizer,
                                               head_names=head_names, seed=config.seed, block_size=block_size))

    # --- features, callbacks: best model, the other sets, early stopping ----------------
    train_features, objective = _training_features(config, train_rows, tokenizer)
    features = {name: task.preprocess(rows, tokenizer, training=False) for name, rows in other_sets.items()}
    selection = next(iter(other_sets), None)
    eval_batch_size = config.eval_batch_size or config.batch_size
    best, other_eval, selection_callbacks = _selection_callbacks(config, tokenizer, other_sets, features, selection,
                                                                 eval_batch_size)
    all_callbacks = [*plan.callbacks, *selection_callbacks, *callbacks]
    # Early stopping, the export (a bundle instead) and the plot (per named set) are done here.
    loop_config = dataclasses.replace(config, early_stopping_patience=None, export=False, plot=False)

    # --- train, then evaluate every named set with the best weights -------------------
    cut = None
    if config.cut_last_layer and task.name in ("classification", "regression"):
        from fastft.models.first_token import first_token_last_layer

        cut, _ = first_token_last_layer(model)
    try:
        with cpu_speedups(model, config):
            state = train(
                model, objective, train_features, collator=task.collator(tokenizer), config=loop_config,
                eval_data=features.get(selection), tokenizer=tokenizer, param_groups=param_groups,
                callbacks=all_callbacks, extra_losses=extra_losses,
                metric_fns=task.metric_fns(other_sets[selection], features[selection], tokenizer) if selection else [],
            )
        model = state.model
        metrics = evaluate_sets(model, tokenizer, task, other_sets, batch_size=eval_batch_size,
                                generate=config.generate, features=features)
    finally:
        if cut is not None:
            cut.remove()
    if config.calibrate:  # before the bundle is written: it keeps the temperature
        task.temperature = _fit_temperature(model, tokenizer, task, other_sets[selection], eval_batch_size)

    # --- report: the sets side by side, forgetting, the bundle --------------------------
    result = FinetuneResult(model=model, tokenizer=tokenizer, task=task, state=state, strategy=strategy, metrics=metrics)
    result.majority = {name: task.majority_score(train_rows, rows) for name, rows in other_sets.items()}
    result.history = other_eval.history if other_eval else []
    if best is not None:
        result.best_step, result.best_metric = best.best_step, best.best
    for cb in plan.callbacks:
        result.unfreeze_history = list(getattr(cb, "history", []))
    result.temperature = task.temperature if config.calibrate else None
    result.slices = _slice_reports(config, model, tokenizer, other_sets, eval_batch_size)
    if measure_forgetting:
        after = lm_perplexity(view, heldout_texts, tokenizer, block_size=block_size)
        forgetting.update(perplexity_after=after, increase=after - forgetting["perplexity_before"])
        result.forgetting = forgetting
    if config.plot and state.parallel.is_main:
        plot_finetuning(os.path.join(state.output_dir, "metrics.jsonl"), result.history, config.select_metric
                        or task.primary_metric, os.path.join(state.output_dir, "curves.png"))
    if config.save:
        path = config.save if isinstance(config.save, str) else os.path.join(state.output_dir, "finetuned")
        result.save_path = save_finetuned(model, tokenizer, task, path, strategy=strategy)
    return result


def _training_features(config: FinetuneConfig, train_rows, tokenizer):
    """The training features and the objective: the task's own, or with ``balance_by``
    every slice trained equally (``fastft.audit.mitigation``: rows of the smaller slices
    repeated, or per-row loss weights)."""
    task = config.task
    if config.balance_by and config.balance == "sample":
        train_rows = balanced_rows(train_rows, config.balance_by, config.seed)
    features = task.preprocess(train_rows, tokenizer, training=True)
    if not (config.balance_by and config.balance == "reweight"):
        return features, task.objective()
    for feature, weight in zip(features, balance_weights(train_rows, config.balance_by)):
        feature[WEIGHT_KEY] = weight
    return features, ReweightedClassificationObjective()


def _slice_reports(config: FinetuneConfig, model, tokenizer, other_sets, batch_size) -> dict:
    """With ``slice_by`` (or ``balance_by``): ``fastft.audit``'s slice report of every named
    set that has the column."""
    slice_by = config.slice_by or config.balance_by
    sliced = {name: rows for name, rows in other_sets.items() if any(row.get(slice_by) is not None for row in rows)}
    if not slice_by or not sliced:
        return {}
    return audit(model, sliced, tokenizer=tokenizer, task=config.task, slice_by=slice_by, calibration=False,
                 batch_size=batch_size, seed=config.seed).slices


def _check_audit_options(config: FinetuneConfig, train_rows, other_sets) -> None:
    """slice_by / balance_by / calibrate: refused, before any work, where they cannot apply."""
    task = config.task
    for option in ("slice_by", "balance_by", "calibrate"):
        if getattr(config, option) and task.name != "classification":
            raise ValueError(f"{option}: for classification tasks only (the task is {task.name!r})")
    if config.balance not in BALANCES:
        raise ValueError(f"balance must be one of {list(BALANCES)}, got {config.balance!r}")
    if config.balance_by and not any(row.get(config.balance_by) is not None for row in train_rows):
        raise ValueError(f"balance_by={config.balance_by!r}: no row of data['train'] has that column "
                         f"(its columns: {sorted(train_rows[0])})")
    if config.slice_by and not any(row.get(config.slice_by) is not None for rows in other_sets.values() for row in rows):
        raise ValueError(f"slice_by={config.slice_by!r}: no evaluation set has that column")
    if config.calibrate and not other_sets:
        raise ValueError("calibrate: fitting a temperature needs a validation set (data={'train': ..., 'validation': ...})")


def _fit_temperature(model, tokenizer, task, rows, batch_size) -> float:
    """Temperature scaling on the selection set's logits (``fastft.audit.calibration``)."""
    from fastft.audit.calibration import fit_temperature

    was_training = model.training
    model.eval()
    try:
        logits = task.logits(model, tokenizer, rows, batch_size=batch_size)
    finally:
        model.train(was_training)
    return fit_temperature(logits, [task.label_id(row[task.label_column]) for row in rows])


def _selection_callbacks(config: FinetuneConfig, tokenizer, other_sets, features, selection, batch_size):
    """With a selection set: the best model on its ``select_metric`` (restored at the end),
    the other named sets evaluated alongside (``history``), and early stopping."""
    if selection is None:
        return None, None, []
    task = config.task
    select_metric = config.select_metric or task.primary_metric
    mode = task.mode(select_metric)
    # Gradual unfreezing: weights still frozen at the best evaluation may change later.
    best = BestModel(select_metric, mode, track_initial=isinstance(config.strategy, GradualUnfreeze))
    other_eval = OtherSetsEvaluation(
        selection, [n for n in other_sets if n != selection],
        lambda current, name: evaluate_sets(current, tokenizer, task, {name: other_sets[name]}, batch_size=batch_size,
                                            generate=False, features=features)[name],
    )
    callbacks = [best, other_eval]
    if config.early_stopping_patience:
        callbacks.append(EarlyStopping(config.early_stopping_patience, select_metric, mode=mode))
    return best, other_eval, callbacks


def _split_sets(data) -> tuple[list[dict], dict[str, list[dict]]]:
    """(training rows, {set name: rows}) with the selection set (validation / dev / test) first."""
    if isinstance(data, Mapping) and not hasattr(data, "column_names"):
        if "train" not in data:
            raise ValueError(f"data: a mapping needs a 'train' entry, got keys {sorted(data)}")
        named = {k: v for k, v in data.items() if k != "train"}
        ordered = sorted(named, key=lambda k: (k not in ("validation", "dev", "test"), k != "validation"))
        return rows_of(data["train"]), {k: rows_of(named[k]) for k in ordered}
    return rows_of(data), {}


def _split_texts(pretraining_data) -> tuple[list[str], list[str]]:
    """(texts for the guard, held-out texts for measuring forgetting)."""
    if pretraining_data is None:
        return [], []
    if isinstance(pretraining_data, Mapping):
        return list(pretraining_data.get("train", [])), list(pretraining_data.get("validation", []))
    texts = list(pretraining_data)
    cut = max(1, len(texts) // 5)
    return texts[:-cut], texts[-cut:]


# ------------------------------------------------------------------------ command line


def named_sets(entries: list[str]) -> dict[str, list[dict]]:
    """``["dev=dev.jsonl", "ood.jsonl"]`` -> ``{"dev": rows, "ood": rows}`` (name: the file's stem)."""
    return {name: load_rows(path) for name, path in map(_name_and_path, entries)}


def _is_data_file(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in (".json", ".jsonl", ".csv", ".parquet") or os.path.isfile(path)


def _name_and_path(entry: str) -> tuple[str, str]:
    return tuple(entry.split("=", 1)) if "=" in entry else (os.path.splitext(os.path.basename(entry))[0], entry)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fastft finetune", description="Fine-tune a model on a labelled task.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokenizer")
    parser.add_argument("--train", required=True, help=".json/.jsonl/.csv/.parquet file of rows")
    parser.add_argument("--eval", nargs="*", default=[], metavar="NAME=PATH", help="named evaluation sets")
    parser.add_argument("--task", help="classification (default), regression, token, qa or sft")
    parser.add_argument("--strategy", help=f"one of {sorted(Strategy.members)} (default: full)")
    parser.add_argument("--strategy-options", help="YAML mapping, e.g. '{rank: 8}'")
    parser.add_argument("--lr-scheme", choices=sorted(LRScheme.members))
    parser.add_argument("--guard", choices=sorted(Guard.members))
    parser.add_argument("--pretraining-data", help="text file of unlabeled documents (one per line)")
    parser.add_argument("--config", help="YAML file mapped onto fastft.recipes.finetune.FinetuneConfig")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    # `--eval dev=d.jsonl max_steps=2`: argparse hands the override to --eval too; a set names a data file.
    eval_entries = [e for e in args.eval if _is_data_file(_name_and_path(e)[1])]
    overrides = [e for e in args.eval if e not in eval_entries] + args.overrides
    config = load_config(args.config, overrides, cls=FinetuneConfig)
    data = {"train": load_rows(args.train), **named_sets(eval_entries)}
    config.data_files = {"train": os.path.abspath(args.train), **{name: os.path.abspath(path) for name, path in
                                                                   map(_name_and_path, eval_entries)}}
    flags = {"task": args.task, "lr_scheme": args.lr_scheme, "guard": args.guard}
    if args.strategy or args.strategy_options:
        flags["strategy"] = {"name": args.strategy or config.strategy.name, **(parse_yaml(args.strategy_options or "{}") or {})}
    if args.pretraining_data:
        flags["pretraining_data"] = open(args.pretraining_data).read().splitlines()
    result = finetune(args.model, args.tokenizer or args.model, data, config=config,
                      **{k: v for k, v in flags.items() if v is not None})
    print(result.table())
    for name, report in result.slices.items():
        print(f"\n{name}: {report.table()}")
    print(json.dumps({"best_step": result.best_step, "forgetting": result.forgetting, "saved": result.save_path,
                      **({"temperature": result.temperature} if result.temperature is not None else {})}, indent=2))
    return 0

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
