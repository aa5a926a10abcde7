"""The fine-tuning bundle: one directory that ``load_finetuned`` / ``predict`` read back in
one call (the weights or only the adapter and head, the label map, the tokenizer, the
strategy that rebuilds the model's added modules)."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import torch
from torch import nn

from fastft.errors import loading
from fastft.finetuning.strategies import HEAD_NAMES, Strategy
from fastft.models.loading import load_pretrained
from fastft.finetuning.tasks import Task, get_task

__all__ = ["BUNDLE_FILE", "load_finetuned", "predict", "save_finetuned"]

BUNDLE_FILE = "fastft_finetune.json"
WEIGHTS_FILE = "finetuned.safetensors"


def _json_safe(options: Mapping[str, Any]) -> dict:
    safe = {}
    for key, value in options.items():
        try:
            json.dumps(value)
        except TypeError:
            continue  # e.g. a tokenizer for prompt init: the trained embeddings are saved anyway
        safe[key] = value
    return safe


def save_finetuned(model: nn.Module, tokenizer, task: Task, path: str, *, strategy: Strategy | str = "full",
                   base_model: str | None = None) -> str:
    """Write a bundle that ``load_finetuned`` / ``predict`` read back in one call:

        fastft_finetune.json     task name + options + label map, strategy (name + options),
                                 model class, base model path, which weights are stored,
                                 the probabilities' temperature (``task.temperature``, 1: none)
        config.json              the model's config (with id2label / label2id)
        finetuned.safetensors    full weights; or, for a PEFT strategy whose base model is
                                 on disk, only the trained tensors (adapter + head)
        adapter/                 LoRA also in Hugging Face PEFT format (``fastft.peft.save_adapter``)
        tokenizer files

    Returns ``path``."""
    import safetensors.torch

    os.makedirs(path, exist_ok=True)
    strategy = Strategy.parse(strategy)
    base_model = base_model or getattr(model.config, "_name_or_path", None)
    partial = strategy.peft_method is not None and bool(base_model) and os.path.isdir(base_model)
    if task.labels is not None and hasattr(model.config, "id2label") and task.name != "regression":
        model.config.id2label = {i: str(l) for i, l in enumerate(task.labels)}
        model.config.label2id = {str(l): i for i, l in enumerate(task.labels)}
    model.config.save_pretrained(path)
    in_base = _checkpoint_names(base_model) if partial else None
    if in_base is not None:
        # The trained tensors, and the frozen ones the base checkpoint lacks (a pooler or any
        # weight initialised at random when the base was loaded): without them a reload
        # would draw other random values.
        prefix = getattr(model, "base_model_prefix", "")
        tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
                   if p.requires_grad or not _found(n, in_base, prefix)}
        safetensors.torch.save_file(tensors, os.path.join(path, WEIGHTS_FILE))
    else:
        partial = False
        safetensors.torch.save_model(model, os.path.join(path, WEIGHTS_FILE))
    if strategy.peft_method == "lora":
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
        "strategy": _json_safe(strategy.spec()),
        "model_class": type(model).__name__,
        "base_model": base_model if partial else None,
        "weights": "trained" if partial else "full",
        "temperature": float(getattr(task, "temperature", 1.0)),  # calibration of the probabilities (1: none)
    }
    with open(os.path.join(path, BUNDLE_FILE), "w") as f:
        json.dump(bundle, f, indent=2)
    return path


def _checkpoint_names(path: str) -> set[str] | None:
    """The weight names stored in a Hugging Face checkpoint directory (safetensors files,
    read from their headers); None when it has none to read."""
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return set(json.load(f)["weight_map"])
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        with safe_open(single, "pt") as f:
            return set(f.keys())
    return None


def _found(name: str, names: set[str], prefix: str) -> bool:
    """Whether parameter ``name`` of the task model (LoRA's ``base_layer`` wrapping undone)
    is in checkpoint ``names``, with or without the backbone prefix (``bert.`` ...)."""
    name = name.replace(".base_layer.", ".")
    bare = name[len(prefix) + 1 :] if prefix and name.startswith(prefix + ".") else name
    return name in names or bare in names or f"{prefix}.{bare}" in names


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
    if bundle.get("temperature", 1.0) != 1.0:
        task.temperature = float(bundle["temperature"])
    with loading("bundle", path):
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        hf_config = transformers.AutoConfig.from_pretrained(path)
    model_class = getattr(transformers, bundle["model_class"], None)
    if bundle["weights"] == "trained":
        # The base model lacks the task head the bundle holds: keep transformers from calling
        # it "newly initialized" (it is about to be loaded), and check below that it is.
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            model, not_in_base = load_pretrained(model_class or getattr(transformers, task.auto_class),
                                                 bundle["base_model"], what="base model", config=hf_config)
        finally:
            transformers.logging.set_verbosity(verbosity)
    else:
        model = model_class(hf_config) if model_class is not None else getattr(transformers, task.auto_class).from_config(hf_config)
    _strategy_of(bundle).add_modules(model, head_names=task.head_modules or HEAD_NAMES, tokenizer=tokenizer)
    weights = os.path.join(path, WEIGHTS_FILE)
    if bundle["weights"] == "trained":
        tensors = safetensors.torch.load_file(weights)
        named = dict(model.named_parameters())
        missing = sorted(set(tensors) - set(named))
        if missing:
            raise ValueError(f"{weights}: tensors {missing[:5]} have no parameter in the rebuilt model")
        untrained = sorted(set(not_in_base) - {name.replace(".base_layer.", ".") for name in tensors})
        if untrained:
            raise ValueError(f"{path}: weights {untrained[:5]} are neither in the base model {bundle['base_model']} "
                             "nor in the bundle")
        with torch.no_grad():
            for name, tensor in tensors.items():
                named[name].copy_(tensor)
    else:
        safetensors.torch.load_model(model, weights, strict=True)
    model.to(device).eval()
    return model, tokenizer, task


def _strategy_of(bundle: dict) -> Strategy:
    """The bundle's strategy; bundles of fastft 0.1.0 stored a name and an options mapping."""
    if isinstance(bundle["strategy"], dict):
        return Strategy.parse(bundle["strategy"])
    renamed = {"freeze_first": "first"}
    options = {renamed.get(k, k): v for k, v in bundle.get("strategy_options", {}).items()
               if not k.startswith("unfreeze_")}  # gradual unfreezing adds nothing to rebuild
    return Strategy.parse({"name": bundle["strategy"], **options})


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


def predict(model, inputs, *, tokenizer=None, task: str | Task | None = None, batch_size: int = 16, device=None,
            scores: bool = False) -> list:
    """Predictions for ``inputs`` from a fine-tuned model.

    Args:
        model: a bundle directory written by ``finetune`` / ``save_finetuned`` (then
            tokenizer and task come from it), or a model (then pass ``tokenizer`` and a
            ``Task`` with its labels, e.g. ``result.task``).
        inputs: rows (dicts with the task's columns), or shorthands: strings (a text; an
            SFT prompt; whitespace-split words for tagging), ``(text, pair)`` /
            ``(question, context)`` tuples, word lists for tagging.

        scores: classification: ``{"label", "probabilities": {label: p}}`` per input.

    Returns: per input — a label (classification), a float (regression), a tag per word
    (token), the answer text (QA) or the generated response (SFT).

    Raises:
        ValueError: ``scores`` for a task that has none; no tokenizer / task for a model.
    """
    if isinstance(model, str):
        model, loaded_tokenizer, loaded_task = load_finetuned(model, device=device or "cpu")
        tokenizer = tokenizer or loaded_tokenizer
        task = task or loaded_task
    if tokenizer is None or task is None:
        raise ValueError("predict: with a model object, pass tokenizer= and task= (e.g. result.task)")
    task = get_task(task) if isinstance(task, str) else task
    if scores and not task.has_scores:
        raise ValueError(f"predict: task {task.name!r} gives no scores (classification does)")
    if device is not None:
        model.to(device)
    was_training = model.training
    model.eval()
    try:
        return task.predict(model, tokenizer, _as_rows(inputs, task), batch_size=batch_size,
                            **({"scores": True} if scores else {}))
    finally:
        model.train(was_training)
