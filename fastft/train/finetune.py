"""``fastft.finetune``: the second stage — adapt a pretrained model to a labelled task.

    import fastft
    result = fastft.finetune(
        "path/to/bert", "path/to/bert", {"train": rows, "validation": dev, "ood": other},
        task="classification", strategy="gradual-unfreeze", lr_scheme="discriminative",
        schedule__name="slanted_triangular", epochs=4, lr=1e-4,
    )
    print(result.table())                    # every named set side by side
    labels = fastft.predict(result.save_path, ["a new sentence"])

One call: checks data, model and options (clear errors before any step), applies the
strategy (``fastft.train.strategies``), builds per-layer learning rates, a forgetting
guard (``fastft.train.guards``), trains through the shared loop (``fastft.train.loop``)
evaluating the selection set (the first evaluation set) at each epoch end / every
``eval_every`` steps, keeps the best weights, stops early, evaluates every named set,
measures forgetting, and saves a bundle that ``load_finetuned`` / ``predict`` read back.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from fastft.train.callbacks import Callback, EarlyStopping
from fastft.train.config import TrainConfig
from fastft.train.guards import build_guard, lm_perplexity, lm_view
from fastft.train.loop import TrainState, evaluate, resolve_device, train
from fastft.train.pretrain import resolve_config
from fastft.train.strategies import HEAD_NAMES, PEFT_STRATEGIES, add_head_layers, apply_strategy, check_strategy, lr_param_groups
from fastft.train.tasks import SFTTask, Task, get_task, rows_of

__all__ = ["FinetuneResult", "evaluate_sets", "finetune", "load_finetuned", "predict", "save_finetuned"]

BUNDLE_FILE = "fastft_finetune.json"
WEIGHTS_FILE = "finetuned.safetensors"


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
    strategy: str
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    majority: dict[str, float | None] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    best_step: int | None = None
    best_metric: float | None = None
    forgetting: dict[str, float] | None = None
    save_path: str | None = None
    unfreeze_history: list = field(default_factory=list)

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


# ------------------------------------------------------------------------ callbacks


class BestModel(Callback):
    """Keeps a CPU copy of the trainable weights at the best evaluation (``metric``,
    ``mode``) and restores them when training ends. With ``track_initial`` (gradual
    unfreezing: weights frozen at the best moment may change later) the initial values
    of all parameters are kept too, to restore those."""

    def __init__(self, metric: str, mode: str, *, track_initial: bool = False):
        self.metric, self.mode, self.track_initial = metric, mode, track_initial
        self.best: float | None = None
        self.best_step: int | None = None
        self.snapshot: dict[str, torch.Tensor] = {}
        self.initial: dict[str, torch.Tensor] = {}

    def on_train_begin(self, state):
        if self.track_initial:
            self.initial = {n: p.detach().to("cpu", copy=True) for n, p in state.model.named_parameters()}

    def on_evaluate(self, state, metrics):
        if self.metric not in metrics:
            raise KeyError(f"select_metric {self.metric!r} not in the evaluation metrics {sorted(metrics)}")
        value = float(metrics[self.metric])
        if self.best is None or (value < self.best if self.mode == "min" else value > self.best):
            self.best, self.best_step = value, state.step
            self.snapshot = {n: p.detach().to("cpu", copy=True) for n, p in state.model.named_parameters() if p.requires_grad}

    def on_train_end(self, state):
        if not self.snapshot:
            return
        with torch.no_grad():
            for name, param in state.model.named_parameters():
                source = self.snapshot.get(name, self.initial.get(name))
                if source is not None:
                    param.copy_(source.to(param.device))

    def state_dict(self):
        return {"best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state):
        self.best, self.best_step = state["best"], state["best_step"]


class OtherSetsEvaluation(Callback):
    """After each evaluation of the selection set, evaluates the other named sets too and
    records everything in ``history`` (so in-domain / out-of-domain curves sit side by side)."""

    def __init__(self, selection_name: str, other_sets: dict, evaluate_fn):
        self.selection_name, self.other_sets, self.evaluate_fn = selection_name, other_sets, evaluate_fn
        self.history: list[dict] = []

    def on_evaluate(self, state, metrics):
        self.history.append({"step": state.step, "epoch": state.epoch, "set": self.selection_name, **_scalars(metrics)})
        for name in self.other_sets:
            self.history.append({"step": state.step, "epoch": state.epoch, "set": name,
                                 **_scalars(self.evaluate_fn(state.model, name))})


def _scalars(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


# ------------------------------------------------------------------------ evaluation


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
        if isinstance(task, SFTTask) and generate:
            metrics.update(task.generation_metrics(model, tokenizer, rows))
        results[name] = metrics
    return results


# ------------------------------------------------------------------------ finetune


def _split_sets(data, eval_sets) -> tuple[list[dict], dict[str, list[dict]]]:
    if isinstance(data, Mapping) and not hasattr(data, "column_names"):
        if "train" not in data:
            raise ValueError(f"data: a mapping needs a 'train' entry, got keys {sorted(data)}")
        train_rows = rows_of(data["train"])
        named = {k: v for k, v in data.items() if k != "train"}
        ordered = sorted(named, key=lambda k: (k not in ("validation", "dev", "test"), k != "validation"))
        others = {k: rows_of(named[k]) for k in ordered}
    else:
        train_rows, others = rows_of(data), {}
    for name, rows in (eval_sets or {}).items():
        others[name] = rows_of(rows)
    return train_rows, others


def _split_texts(pretraining_data) -> tuple[list[str], list[str]]:
    """(texts for the guard, held-out texts for measuring forgetting)."""
    if pretraining_data is None:
        return [], []
    if isinstance(pretraining_data, Mapping):
        return list(pretraining_data.get("train", [])), list(pretraining_data.get("validation", []))
    texts = list(pretraining_data)
    cut = max(1, len(texts) // 5)
    return texts[:-cut], texts[-cut:]


def finetune(
    model: nn.Module | str,
    tokenizer,
    data,
    task: str | Task = "classification",
    strategy: str = "full",
    config: TrainConfig | Mapping | str | None = None,
    *,
    labels: Sequence[Any] | None = None,
    task_options: Mapping[str, Any] | None = None,
    strategy_options: Mapping[str, Any] | None = None,
    lr_scheme: str | None = None,
    lr_factor: float | None = None,
    guard: str | None = None,
    guard_options: Mapping[str, Any] | None = None,
    pretraining_data=None,
    lm_model=None,
    measure_forgetting: bool | None = None,
    eval_sets: Mapping[str, Any] | None = None,
    select_metric: str | None = None,
    generate: bool = True,
    save: bool | str = True,
    callbacks: Sequence[Callback] = (),
    cut_last_layer: bool = True,
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
            Columns per task: see ``fastft.train.tasks``.
        task: ``"classification" | "regression" | "token" | "qa" | "sft"`` or a ``Task``.
        strategy: ``"full" | "features" | "freeze" | "gradual-unfreeze" | "lora" |
            "adapter" | "prefix" | "prompt"``; its options in ``strategy_options``
            (``freeze_first``, ``train_last``, ``extra_layers``, ``unfreeze_every``,
            ``unfreeze_schedule``, ``unfreeze_on``; for PEFT the ``fastft.peft.apply`` config).
        config: ``TrainConfig`` / mapping / YAML path / None; ``**overrides`` as in
            ``fastft.pretrain`` (``epochs=3``, ``lr=2e-5``, ``schedule__name="slanted_triangular"``,
            ``early_stopping_patience=2``). ``export`` is ignored: the bundle is saved instead.
        labels: the classes (names or ids), in head order; default: sorted training labels.
        task_options: ``max_length``, ``stride`` (QA), ``text_column`` ...
        lr_scheme: None, ``"discriminative"`` (÷ ``lr_factor``, default 2.6 per group) or
            ``"layerwise"`` (× ``lr_factor``, default 0.8 per group), head at ``lr``.
        guard: None, ``"replay"`` (``fraction``, ``weight``), ``"l2sp"`` (``alpha``, ``beta``)
            or ``"ewc"`` (``strength``, ``num_batches``), options in ``guard_options``.
        pretraining_data: unlabeled texts (list, or ``{"train", "validation"}``) for replay /
            EWC and for measuring forgetting (held-out: ``validation``, else the last 20%).
        lm_model: the pretrained masked-LM whose head measures forgetting of an encoder
            (default: loaded from the model's ``_name_or_path``), see ``guards.lm_view``.
        measure_forgetting: default: when ``pretraining_data`` is given.
        select_metric: best-checkpoint / early-stopping metric (default: the task's primary
            metric: accuracy, mse, f1, loss).
        generate: SFT: BLEU of greedy generations on each set at the end.
        save: True: bundle into ``<output_dir>/finetuned``; a path: there; False: no bundle.
        cut_last_layer: classification / regression on a BERT-family [CLS] classifier: run
            the last layer for position 0 only while training and evaluating
            (``fastft.models.first_token``); False: the full last layer.

    Returns: ``FinetuneResult``.

    Raises (all before the first step):
        ValueError: missing columns, labels outside the configured classes, a model
            without the task's head (e.g. QA on a causal LM), an unknown task / strategy /
            guard / lr scheme, strategy options that do not fit the model (freezing or
            unfreezing more layers than it has), a guard without pretraining text.
        TypeError: options that belong to no task / strategy / guard.
        KeyError: unknown config override names.
    """
    config = resolve_config(config, dict(overrides))
    task = get_task(task, **({"labels": labels} if labels is not None else {}), **dict(task_options or {}))
    strategy_options = dict(strategy_options or {})
    epochs = None if config.max_steps else config.epochs
    check_strategy(strategy, strategy_options, epochs=epochs)
    if lr_scheme not in (None, "discriminative", "layerwise"):
        raise ValueError(f"lr_scheme must be None, 'discriminative' or 'layerwise', got {lr_scheme!r}")
    if guard not in (None, "replay", "l2sp", "ewc"):
        raise ValueError(f"guard must be None, 'replay', 'l2sp' or 'ewc', got {guard!r}")
    guard_texts, heldout_texts = _split_texts(pretraining_data)
    if guard in ("replay", "ewc") and not guard_texts:
        raise ValueError(f"guard {guard!r} needs unlabeled pretraining text: pass pretraining_data=[...]")
    measure_forgetting = bool(heldout_texts) if measure_forgetting is None else measure_forgetting
    if measure_forgetting and not heldout_texts:
        raise ValueError("measure_forgetting needs held-out unlabeled text: pass pretraining_data=")

    # --- data and labels ----------------------------------------------------------------
    train_rows, other_sets = _split_sets(data, eval_sets)
    task.check_columns(train_rows, "train")
    for name, rows in other_sets.items():
        task.check_columns(rows, name)
    task.fit_labels(train_rows)
    task.check_labels(train_rows, "train")
    for name, rows in other_sets.items():
        task.check_labels(rows, name)

    # --- tokenizer, model ---------------------------------------------------------------
    if tokenizer is None or isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
    if isinstance(model, str):
        model = task.build_model(model)
    task.check_model(model)
    head_names = task.head_modules or HEAD_NAMES
    if strategy == "features" and not task.head_modules:
        raise ValueError(f"strategy 'features' trains only a new task head; task {task.name!r} has none")
    device = resolve_device(config.device)
    model.to(device)

    # --- forgetting: the pretraining view, measured before ----------------------------
    view = None
    forgetting = None
    if measure_forgetting or guard in ("replay", "ewc"):
        view = lm_view(model, lm_model)
    block_size = min(64, task.max_length)
    if measure_forgetting:
        forgetting = {"perplexity_before": lm_perplexity(view, heldout_texts, tokenizer, block_size=block_size)}

    # --- strategy, learning rates, guard ------------------------------------------------
    plan = apply_strategy(model, strategy, strategy_options, head_names=head_names, epochs=epochs)
    param_groups = None
    if lr_scheme is not None:
        param_groups = lr_param_groups(model, config.optim.lr, config.optim.weight_decay, lr_scheme,
                                       factor=lr_factor, groups=plan.groups)
    guard_options = dict(guard_options or {})
    if guard in ("replay", "ewc"):
        guard_options.setdefault("block_size", block_size)
    guard_fn = build_guard(guard, model, lm_model=view, texts=guard_texts, tokenizer=tokenizer, head_names=head_names,
                           seed=config.seed, **guard_options) if guard else None

    # --- features, callbacks ------------------------------------------------------------
    train_features = task.preprocess(train_rows, tokenizer, training=True)
    features = {name: task.preprocess(rows, tokenizer, training=False) for name, rows in other_sets.items()}
    selection_name = next(iter(other_sets), None)
    select_metric = select_metric or task.primary_metric
    mode = "max" if (select_metric == task.primary_metric and task.greater_is_better) or select_metric in (
        "accuracy", "macro_f1", "f1", "exact_match", "pearson", "bleu") else "min"
    all_callbacks: list[Callback] = list(plan.callbacks)
    best = None
    other_eval = None
    if selection_name is not None:
        best = BestModel(select_metric, mode, track_initial=strategy == "gradual-unfreeze")
        all_callbacks.append(best)

        def evaluate_named(current_model, name):
            return evaluate_sets(current_model, tokenizer, task, {name: other_sets[name]},
                                 batch_size=config.eval_batch_size or config.batch_size, generate=False,
                                 features=features)[name]

        other_eval = OtherSetsEvaluation(selection_name, [n for n in other_sets if n != selection_name], evaluate_named)
        all_callbacks.append(other_eval)
        if config.early_stopping_patience:
            all_callbacks.append(EarlyStopping(config.early_stopping_patience, select_metric, mode=mode))
    all_callbacks += list(callbacks)
    config = dataclasses.replace(config, early_stopping_patience=None, export=False)

    # A [CLS] classifier never reads the last layer's other positions: run that layer's
    # attention output and feed-forward block for position 0 only (same loss and
    # gradients, less work; fastft/models/first_token.py). Out again before returning.
    cut = None
    if cut_last_layer and task.name in ("classification", "regression"):
        from fastft.models.first_token import first_token_last_layer

        cut, _ = first_token_last_layer(model)
    try:
        state = train(
            model,
            task.objective(),
            train_features,
            collator=task.collator(tokenizer),
            config=config,
            eval_data=features.get(selection_name) if selection_name else None,
            tokenizer=tokenizer,
            param_groups=param_groups,
            callbacks=all_callbacks,
            extra_losses=[guard_fn] if guard_fn is not None else [],
            metric_fns=task.metric_fns(other_sets[selection_name], features[selection_name], tokenizer) if selection_name else [],
        )
        model = state.model
        # --- final evaluation, forgetting, bundle ---------------------------------------
        result = FinetuneResult(model=model, tokenizer=tokenizer, task=task, state=state, strategy=strategy)
        result.metrics = evaluate_sets(model, tokenizer, task, other_sets, batch_size=config.eval_batch_size or config.batch_size,
                                       generate=generate, features=features)
    finally:
        if cut is not None:
            cut.remove()
    result.majority = {name: task.majority_score(train_rows, rows) for name, rows in other_sets.items()}
    result.history = other_eval.history if other_eval else []
    if best is not None:
        result.best_step, result.best_metric = best.best_step, best.best
    for cb in plan.callbacks:
        result.unfreeze_history = list(getattr(cb, "history", []))
    if measure_forgetting:
        after = lm_perplexity(view, heldout_texts, tokenizer, block_size=block_size)
        forgetting.update(perplexity_after=after, increase=after - forgetting["perplexity_before"])
        result.forgetting = forgetting
    if save:
        path = save if isinstance(save, str) else os.path.join(state.output_dir, "finetuned")
        result.save_path = save_finetuned(model, tokenizer, task, path, strategy=strategy, strategy_options=strategy_options)
    return result


# ------------------------------------------------------------------------ bundle I/O


def _json_safe(options: Mapping[str, Any]) -> dict:
    safe = {}
    for key, value in options.items():
        try:
            json.dumps(value)
        except TypeError:
            continue  # e.g. a tokenizer for prompt init: the trained embeddings are saved anyway
        safe[key] = value
    return safe


def save_finetuned(model: nn.Module, tokenizer, task: Task, path: str, *, strategy: str = "full",
                   strategy_options: Mapping[str, Any] | None = None, base_model: str | None = None) -> str:
    """Write a bundle that ``load_finetuned`` / ``predict`` read back in one call:

        fastft_finetune.json     task name + options + label map, strategy + options,
                                 model class, base model path, which weights are stored
        config.json              the model's config (with id2label / label2id)
        finetuned.safetensors    full weights; or, for a PEFT strategy whose base model is
                                 on disk, only the trained tensors (adapter + head)
        adapter/                 LoRA also in Hugging Face PEFT format (``fastft.peft.save_adapter``)
        tokenizer files

    Returns ``path``."""
    import safetensors.torch

    os.makedirs(path, exist_ok=True)
    strategy_options = dict(strategy_options or {})
    base_model = base_model or getattr(model.config, "_name_or_path", None)
    partial = strategy in PEFT_STRATEGIES and bool(base_model) and os.path.isdir(base_model)
    if task.labels is not None and hasattr(model.config, "id2label") and task.name != "regression":
        model.config.id2label = {i: str(l) for i, l in enumerate(task.labels)}
        model.config.label2id = {str(l): i for i, l in enumerate(task.labels)}
    model.config.save_pretrained(path)
    if partial:
        tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        safetensors.torch.save_file(tensors, os.path.join(path, WEIGHTS_FILE))
    else:
        safetensors.torch.save_model(model, os.path.join(path, WEIGHTS_FILE))
    if strategy == "lora":
        try:
            import fastft.peft

            fastft.peft.save_adapter(model, os.path.join(path, "adapter"))
        except Exception as error:  # noqa: BLE001 -- the bundle itself is complete without it
            import warnings

            warnings.warn(f"LoRA adapter not written in PEFT format ({error})", stacklevel=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    bundle = {
        "task": task.name,
        "task_options": {"max_length": task.max_length, **_json_safe(task.options)},
        "labels": task.labels,
        "strategy": strategy,
        "strategy_options": _json_safe(strategy_options),
        "model_class": type(model).__name__,
        "base_model": base_model if partial else None,
        "weights": "trained" if partial else "full",
    }
    with open(os.path.join(path, BUNDLE_FILE), "w") as f:
        json.dump(bundle, f, indent=2)
    return path


def load_finetuned(path: str, *, device: str | torch.device = "cpu") -> tuple[nn.Module, Any, Task]:
    """Read a ``save_finetuned`` bundle: returns ``(model in eval mode, tokenizer, task)``.

    Raises:
        FileNotFoundError: ``path`` holds no bundle.
    """
    import safetensors.torch
    import transformers

    bundle_path = os.path.join(path, BUNDLE_FILE)
    if not os.path.isfile(bundle_path):
        raise FileNotFoundError(f"{bundle_path} not found: not a fastft fine-tuning bundle")
    with open(bundle_path) as f:
        bundle = json.load(f)
    task = get_task(bundle["task"], labels=bundle["labels"], **bundle["task_options"])
    hf_config = transformers.AutoConfig.from_pretrained(path)
    model_class = getattr(transformers, bundle["model_class"], None)
    if bundle["weights"] == "trained":
        model = (model_class or getattr(transformers, task.auto_class)).from_pretrained(bundle["base_model"], config=hf_config)
    else:
        model = model_class(hf_config) if model_class is not None else getattr(transformers, task.auto_class).from_config(hf_config)
    strategy, options = bundle["strategy"], bundle["strategy_options"]
    if strategy in PEFT_STRATEGIES:
        import fastft.peft

        fastft.peft.apply(model, strategy, **options)
    elif strategy == "freeze" and options.get("extra_layers"):
        add_head_layers(model, int(options["extra_layers"]), task.head_modules or HEAD_NAMES)
    weights = os.path.join(path, WEIGHTS_FILE)
    if bundle["weights"] == "trained":
        tensors = safetensors.torch.load_file(weights)
        named = dict(model.named_parameters())
        missing = sorted(set(tensors) - set(named))
        if missing:
            raise ValueError(f"{weights}: tensors {missing[:5]} have no parameter in the rebuilt model")
        with torch.no_grad():
            for name, tensor in tensors.items():
                named[name].copy_(tensor)
    else:
        safetensors.torch.load_model(model, weights, strict=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model.to(device).eval()
    return model, tokenizer, task


def _as_rows(inputs, task: Task) -> list[dict]:
    if isinstance(inputs, (str, dict, tuple)):
        inputs = [inputs]
    rows = []
    for item in inputs:
        if isinstance(item, dict):
            rows.append(item)
        elif isinstance(item, str):
            key = {"sft": "prompt"}.get(task.name, "text")
            rows.append({key: item} if task.name != "token" else {"tokens": item.split()})
        elif isinstance(item, tuple) and task.name in ("classification", "regression"):
            rows.append({"text": item[0], "text_pair": item[1]})
        elif isinstance(item, tuple) and task.name == "qa":
            rows.append({"question": item[0], "context": item[1]})
        elif isinstance(item, list) and task.name == "token":
            rows.append({"tokens": item})
        else:
            raise TypeError(f"predict: cannot read input {item!r} for task {task.name!r}")
    return rows


def predict(model, inputs, *, tokenizer=None, task: str | Task | None = None, batch_size: int = 16, device=None) -> list:
    """Predictions for ``inputs`` from a fine-tuned model.

    Args:
        model: a bundle directory written by ``finetune`` / ``save_finetuned`` (then
            tokenizer and task come from it), or a model (then pass ``tokenizer`` and a
            ``Task`` with its labels, e.g. ``result.task``).
        inputs: rows (dicts with the task's columns), or shorthands: strings (a text; an
            SFT prompt; whitespace-split words for tagging), ``(text, pair)`` /
            ``(question, context)`` tuples, word lists for tagging.

    Returns: per input — a label (classification), a float (regression), a tag per word
    (token), the answer text (QA) or the generated response (SFT).
    """
    if isinstance(model, str):
        model, loaded_tokenizer, loaded_task = load_finetuned(model, device=device or "cpu")
        tokenizer = tokenizer or loaded_tokenizer
        task = task or loaded_task
    if tokenizer is None or task is None:
        raise ValueError("predict: with a model object, pass tokenizer= and task= (e.g. result.task)")
    task = get_task(task) if isinstance(task, str) else task
    if device is not None:
        model.to(device)
    was_training = model.training
    model.eval()
    try:
        return task.predict(model, tokenizer, _as_rows(inputs, task), batch_size=batch_size)
    finally:
        model.train(was_training)
