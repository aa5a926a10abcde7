"""LoRA adapters on disk in Hugging Face PEFT's format, so either library reads the other's.

A directory holds

* ``adapter_config.json``: a PEFT ``LoraConfig`` (``peft_type: "LORA"``, ``r``,
  ``lora_alpha``, ``target_modules``, ``use_rslora``, ``modules_to_save``, ...);
* ``adapter_model.safetensors``: tensors named as PEFT names them (for the default
  adapter): ``base_model.model.<module path>.lora_A.weight`` ``(r, in)``,
  ``base_model.model.<module path>.lora_B.weight`` ``(out, r)`` and, for each module to
  save, ``base_model.model.<module path>.<param>`` (e.g. ``...classifier.weight``).

``<module path>`` is the module's name in the bare transformers model (what
``model.named_modules()`` says before any wrapping), which is what PEFT writes too.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from fastft.nn import LoRALinear
from fastft.nn.lora import _is_conv1d, is_linear_like
from fastft.peft.inject import _inject_lora, lora_layers
from fastft.peft.sharding import full_tensor, is_writer
from fastft.peft.state import peft_state, refreeze

__all__ = ["save_adapter", "load_adapter", "PEFT_PREFIX"]

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

_TASK_TYPES = (  # transformers class-name suffix -> PEFT task_type
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
)


def _task_type(model: nn.Module):
    name = type(model).__name__
    for suffix, task in _TASK_TYPES:
        if name.endswith(suffix):
            return task
    return None


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def save_adapter(model: nn.Module, directory: str) -> None:
    """Write ``model``'s LoRA adapter (and modules_to_save) in PEFT's format to ``directory``.

    ``peft.PeftModel.from_pretrained(base_model, directory)`` then rebuilds the same
    adapted model. Per-layer ranks / alphas that differ are written as PEFT's
    ``rank_pattern`` / ``alpha_pattern``.

    Raises:
        ValueError: the model has no fastft LoRA layers (only LoRA has a PEFT format here).
    """
    layers = lora_layers(model)
    if not layers:
        methods = peft_state(model).methods
        raise ValueError(f"{type(model).__name__} has no fastft LoRA layers to save"
                         + (f" (applied: {', '.join(methods)}; only LoRA has a PEFT on-disk format)" if methods else ""))
    modules_to_save = peft_state(model).modules_to_save
    tensors = _adapter_tensors(model, layers, modules_to_save)
    config = _lora_config(model, layers, modules_to_save)
    if not is_writer():
        return  # every rank took part in the gathers above; rank 0 writes
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})


def _adapter_tensors(model: nn.Module, layers: dict[str, LoRALinear], modules_to_save: list[str]) -> dict:
    """Every tensor to write, whole (FSDP2 shards gathered) and under PEFT's key."""
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = full_tensor(layer.lora_a).detach().contiguous()  # (r, in)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = full_tensor(layer.lora_b).detach().contiguous()  # (out, r)
    for module_name in modules_to_save:
        for param_name, tensor in model.get_submodule(module_name).state_dict().items():
            tensors[f"{PEFT_PREFIX}{module_name}.{param_name}"] = full_tensor(tensor).detach().contiguous()
    return tensors


def _lora_config(model: nn.Module, layers: dict[str, LoRALinear], modules_to_save: list[str]) -> dict:
    """PEFT's ``LoraConfig`` for these layers: the most common rank / alpha, the others as patterns."""
    ranks = {name: layer.rank for name, layer in layers.items()}
    alphas = {name: layer.alpha for name, layer in layers.items()}
    rank, alpha = _most_common(ranks.values()), _most_common(alphas.values())
    dropouts = {layer.dropout for layer in layers.values()}
    rslora = {layer.use_rslora for layer in layers.values()}
    if len(rslora) > 1:
        raise ValueError("PEFT's format has one use_rslora flag, but this model mixes rsLoRA and plain LoRA layers")
    config_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": config_name,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": max(dropouts),
        "use_rslora": rslora.pop(),
        # Exact module paths: PEFT matches a list entry when it equals a module's name.
        "target_modules": sorted(layers),
        "rank_pattern": {name: r for name, r in ranks.items() if r != rank},
        "alpha_pattern": {name: a for name, a in alphas.items() if a != alpha},
        "modules_to_save": [name.split(".")[-1] for name in modules_to_save] or None,
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "bias": "none",
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def load_adapter(model: nn.Module, directory: str) -> nn.Module:
    """Load a PEFT-format LoRA adapter (saved by PEFT's ``save_pretrained`` or by
    ``save_adapter``) into ``model``, in place; returns ``model``.

    A model without LoRA gets LoRA layers where the file has them (rank, alpha, rsLoRA and
    dropout from the config, ``rank_pattern`` / ``alpha_pattern`` included) and is frozen as
    after ``apply``; a model that already has fastft LoRA layers must have them at exactly
    the file's modules, with the same shapes and scaling. Saved ``modules_to_save``
    parameters are copied in and kept trainable.

    Raises:
        FileNotFoundError: missing ``adapter_config.json`` / ``adapter_model.safetensors``.
        NotImplementedError: not a LoRA adapter, or DoRA / LoRA biases.
        RuntimeError: the model's LoRA layers are merged.
        ValueError: the adapter does not fit the model (the message names the first
            missing module or mismatched key and the shapes).
    """
    config, pairs, others = _read_adapter(directory)
    existing = lora_layers(model)
    merged = [name for name, layer in existing.items() if layer.merged]
    if merged:
        raise RuntimeError(f"LoRA layer {merged[0]!r} is merged; call fastft.peft.unmerge(model) before loading")
    if existing:  # the file must describe exactly these layers
        _check_layers_match(model, existing, pairs, config)
    else:  # the file says where LoRA goes
        _inject_file_layers(model, pairs, config, directory)
    layers = lora_layers(model)
    # Check every shape before copying anything, so a bad file leaves the weights untouched.
    _check_pair_shapes(model, layers, pairs)
    state_dict = model.state_dict(keep_vars=True)
    saved_modules = _check_other_tensors(model, state_dict, others)
    with torch.no_grad():
        for name, pair in pairs.items():
            layers[name].lora_a.copy_(pair["lora_A"])
            layers[name].lora_b.copy_(pair["lora_B"])
        for key, value in others.items():
            state_dict[key].copy_(value)
    peft_state(model).keep_trainable(saved_modules)
    refreeze(model)
    return model


# The steps of load_adapter, in order.


def _read_adapter(directory: str) -> tuple[dict, dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """An adapter directory's config and tensors: ``(config, pairs, others)``, where
    ``pairs[module] = {"lora_A": (r, in), "lora_B": (out, r)}`` and ``others`` maps the
    modules_to_save parameters' names to their tensors. Refuses what fastft cannot load."""
    config_path = os.path.join(directory, CONFIG_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: not a PEFT adapter directory")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        raise NotImplementedError(f"fastft loads LoRA adapters only; {config_path} has peft_type={config.get('peft_type')!r}")
    if config.get("use_dora"):
        raise NotImplementedError("DoRA adapters (use_dora=true) are not supported by fastft")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise NotImplementedError(f"LoRA adapters with trained biases (bias={config.get('bias')!r}) are not supported")
    tensors = {_normalise_key(key): value for key, value in load_file(weights_path).items()}

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        found = re.fullmatch(r"(.+)\.(lora_[AB])\.weight", key)
        if found:
            pairs.setdefault(found.group(1), {})[found.group(2)] = value
        else:
            others[key] = value
    for name, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(pair)).pop()
            raise ValueError(f"adapter file has no {PEFT_PREFIX}{name}.{missing}.weight to go with its pair")
    return config, pairs, others


def _check_layers_match(model: nn.Module, existing: dict[str, LoRALinear], pairs: dict, config: dict) -> None:
    """A model that has LoRA already: the file must describe exactly its layers, with their scaling."""
    for name in sorted(set(pairs) | set(existing)):
        if name not in existing:
            raise _does_not_fit(model, f"key {PEFT_PREFIX}{name}.lora_A.weight has no LoRA layer {name!r} in the model")
        if name not in pairs:
            raise _does_not_fit(model, f"missing key {PEFT_PREFIX}{name}.lora_A.weight for the model's LoRA "
                                       f"layer {name!r}")
        # Same scaling, or the loaded weights would silently compute something else.
        alpha, rslora = _config_alpha(config, name), bool(config.get("use_rslora", False))
        layer = existing[name]
        if (alpha, rslora) != (layer.alpha, layer.use_rslora):
            raise _does_not_fit(model, f"LoRA layer {name!r} has alpha={layer.alpha:g}, use_rslora="
                                       f"{layer.use_rslora}; the file's config says alpha={alpha:g}, "
                                       f"use_rslora={rslora}")


def _inject_file_layers(model: nn.Module, pairs: dict, config: dict, directory: str) -> None:
    """A model without LoRA: check each named module and its shapes, then add LoRA layers
    with the file's ranks and scaling, and record them as ``apply`` would."""
    modules = dict(model.named_modules())
    ranks, alphas = {}, {}
    for name in sorted(pairs):
        module = modules.get(name)
        if module is None:
            raise _does_not_fit(model, f"key {PEFT_PREFIX}{name}.lora_A.weight names module {name!r}, which does "
                                       f"not exist in the model")
        if not is_linear_like(module):
            raise _does_not_fit(model, f"module {name!r} is a {type(module).__name__}, not a linear layer")
        rank = _config_rank(config, name)
        if pairs[name]["lora_A"].shape[0] != rank:
            raise ValueError(f"shape mismatch for {PEFT_PREFIX}{name}.lora_A.weight: the config says rank {rank}, "
                             f"the tensor has shape {tuple(pairs[name]['lora_A'].shape)}")
        weight = module.weight
        in_features, out_features = weight.shape if _is_conv1d(module) else weight.shape[::-1]
        for short, expected in (("lora_A", (rank, in_features)), ("lora_B", (out_features, rank))):
            _check_shape(model, name, short, expected, pairs[name][short])
        ranks[name] = rank
        alphas[name] = _config_alpha(config, name)
    dropout = float(config.get("lora_dropout") or 0.0)
    _inject_lora(model, sorted(pairs), rank=ranks, alpha=alphas, dropout=dropout,
                 rslora=bool(config.get("use_rslora", False)))
    state = peft_state(model)
    if "lora" not in state.methods:
        state.methods.append("lora")
    state.config.setdefault("lora", dict(target_modules=sorted(pairs), loaded_from=directory))


def _check_pair_shapes(model: nn.Module, layers: dict[str, LoRALinear], pairs: dict) -> None:
    for name, pair in pairs.items():
        layer = layers[name]
        for short, param in (("lora_A", layer.lora_a), ("lora_B", layer.lora_b)):
            _check_shape(model, name, short, tuple(param.shape), pair[short])


def _check_other_tensors(model: nn.Module, state_dict: dict, others: dict[str, torch.Tensor]) -> list[str]:
    """Every non-LoRA tensor must name a parameter of the model, of its shape; returns
    the modules they belong to (the modules to save), in order."""
    saved_modules = []
    for key, value in others.items():
        target = state_dict.get(key)
        if target is None:
            raise _does_not_fit(model, f"key {PEFT_PREFIX}{key} names no parameter of the model")
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(f"shape mismatch for {PEFT_PREFIX}{key}: the model has {tuple(target.shape)}, "
                             f"the file has {tuple(value.shape)}")
        module_name = key.rpartition(".")[0]
        if module_name not in saved_modules:
            saved_modules.append(module_name)
    return saved_modules


# --------------------------------------------------------------------------- small helpers


def _config_rank(config: dict, name: str) -> int:
    return int(_pattern_value(config.get("rank_pattern") or {}, name, config.get("r", 8)))


def _config_alpha(config: dict, name: str) -> float:
    return float(_pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8)))


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module whose name ends
    with it at a dot boundary (the key is a regular expression)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _normalise_key(key: str) -> str:
    """``base_model.model.X.lora_A.default.weight`` / ``...lora_A.weight`` -> ``X.lora_A.weight``."""
    if key.startswith(PEFT_PREFIX):
        key = key[len(PEFT_PREFIX):]
    return re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1.weight", key)


def _does_not_fit(model: nn.Module, why: str) -> ValueError:
    return ValueError(f"adapter does not fit {type(model).__name__}: {why}")


def _check_shape(model: nn.Module, name: str, short: str, expected: tuple, tensor: torch.Tensor) -> None:
    """``short`` is ``"lora_A"`` or ``"lora_B"``; ``expected`` the model's shape for it."""
    if tuple(tensor.shape) != expected:
        raise ValueError(f"shape mismatch for {PEFT_PREFIX}{name}.{short}.weight: the model's "
                         f"{type(model).__name__} expects {expected}, the file has {tuple(tensor.shape)}")
