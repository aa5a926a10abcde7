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

from fastft.nn.lora import _is_conv1d, is_linear_like

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
    import torch.distributed as dist
    from safetensors.torch import save_file

    from fastft.peft.inject import _state, lora_layers
    from fastft.train.distributed import full_tensor  # gathers FSDP2 shards; plain tensors pass through

    layers = lora_layers(model)
    if not layers:
        methods = _state(model).methods
        raise ValueError(f"{type(model).__name__} has no fastft LoRA layers to save"
                         + (f" (applied: {', '.join(methods)}; only LoRA has a PEFT on-disk format)" if methods else ""))
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = full_tensor(layer.lora_a).detach().contiguous()  # (r, in)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = full_tensor(layer.lora_b).detach().contiguous()  # (out, r)
    modules_to_save = _state(model).modules_to_save
    for module_name in modules_to_save:
        for param_name, tensor in model.get_submodule(module_name).state_dict().items():
            tensors[f"{PEFT_PREFIX}{module_name}.{param_name}"] = full_tensor(tensor).detach().contiguous()
    ranks = {name: layer.rank for name, layer in layers.items()}
    alphas = {name: layer.alpha for name, layer in layers.items()}
    rank, alpha = _most_common(ranks.values()), _most_common(alphas.values())
    dropouts = {layer.dropout for layer in layers.values()}
    rslora = {layer.use_rslora for layer in layers.values()}
    if len(rslora) > 1:
        raise ValueError("PEFT's format has one use_rslora flag, but this model mixes rsLoRA and plain LoRA layers")
    config_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    config = {
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
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return  # every rank took part in the gathers above; rank 0 writes
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})


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


def load_adapter(model: nn.Module, directory: str) -> nn.Module:
    """Load a PEFT-format LoRA adapter (saved by PEFT's ``save_pretrained`` or by
    ``save_adapter``) into ``model``, in place; returns ``model``.

    A model without LoRA gets LoRA layers where the file has them (rank, alpha, rsLoRA and
    dropout from the config, ``rank_pattern`` / ``alpha_pattern`` included) and is frozen as
    after ``apply``; a model that already has fastft LoRA layers must have them at exactly
    the file's modules, with the same shapes and scaling. Saved ``modules_to_save`` parameters are copied in and kept trainable.

    Raises:
        FileNotFoundError: missing ``adapter_config.json`` / ``adapter_model.safetensors``.
        NotImplementedError: not a LoRA adapter, or DoRA / LoRA biases.
        RuntimeError: the model's LoRA layers are merged.
        ValueError: the adapter does not fit the model (the message names the first
            missing module or mismatched key and the shapes).
    """
    from safetensors.torch import load_file

    from fastft.peft.inject import _inject_lora, _refreeze, _state, lora_layers

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

    lora_tensors: dict[str, dict[str, torch.Tensor]] = {}
    other_tensors: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        found = re.fullmatch(r"(.+)\.(lora_[AB])\.weight", key)
        if found:
            lora_tensors.setdefault(found.group(1), {})[found.group(2)] = value
        else:
            other_tensors[key] = value
    for name, pair in lora_tensors.items():
        if set(pair) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(pair)).pop()
            raise ValueError(f"adapter file has no {PEFT_PREFIX}{name}.{missing}.weight to go with its pair")

    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    modules = dict(model.named_modules())
    existing = lora_layers(model)
    merged = [name for name, layer in existing.items() if layer.merged]
    if merged:
        raise RuntimeError(f"LoRA layer {merged[0]!r} is merged; call fastft.peft.unmerge(model) before loading")
    if existing:  # the file must describe exactly these layers
        for name in sorted(set(lora_tensors) | set(existing)):
            if name not in existing:
                raise ValueError(f"adapter does not fit {type(model).__name__}: key {PEFT_PREFIX}{name}.lora_A.weight "
                                 f"has no LoRA layer {name!r} in the model")
            if name not in lora_tensors:
                raise ValueError(f"adapter does not fit {type(model).__name__}: missing key "
                                 f"{PEFT_PREFIX}{name}.lora_A.weight for the model's LoRA layer {name!r}")
            # Same scaling, or the loaded weights would silently compute something else.
            alpha = float(_pattern_value(alpha_pattern, name, config.get("lora_alpha", 8)))
            rslora = bool(config.get("use_rslora", False))
            layer = existing[name]
            if (alpha, rslora) != (layer.alpha, layer.use_rslora):
                raise ValueError(f"adapter does not fit {type(model).__name__}: LoRA layer {name!r} has alpha="
                                 f"{layer.alpha:g}, use_rslora={layer.use_rslora}; the file's config says "
                                 f"alpha={alpha:g}, use_rslora={rslora}")
    else:
        ranks, alphas = {}, {}
        for name in sorted(lora_tensors):
            module = modules.get(name)
            if module is None:
                raise ValueError(f"adapter does not fit {type(model).__name__}: key {PEFT_PREFIX}{name}.lora_A.weight "
                                 f"names module {name!r}, which does not exist in the model")
            if not is_linear_like(module):
                raise ValueError(f"adapter does not fit {type(model).__name__}: module {name!r} is a "
                                 f"{type(module).__name__}, not a linear layer")
            rank = int(_pattern_value(rank_pattern, name, config.get("r", 8)))
            if lora_tensors[name]["lora_A"].shape[0] != rank:
                raise ValueError(f"shape mismatch for {PEFT_PREFIX}{name}.lora_A.weight: the config says rank {rank}, "
                                 f"the tensor has shape {tuple(lora_tensors[name]['lora_A'].shape)}")
            weight = module.weight
            in_features, out_features = weight.shape if _is_conv1d(module) else weight.shape[::-1]
            for short, expected in (("lora_A", (rank, in_features)), ("lora_B", (out_features, rank))):
                got = tuple(lora_tensors[name][short].shape)
                if got != expected:
                    raise ValueError(f"shape mismatch for {PEFT_PREFIX}{name}.{short}.weight: the model's "
                                     f"{type(model).__name__} expects {expected}, the file has {got}")
            ranks[name] = rank
            alphas[name] = float(_pattern_value(alpha_pattern, name, config.get("lora_alpha", 8)))
        dropout = float(config.get("lora_dropout") or 0.0)
        _inject_lora(model, sorted(lora_tensors), rank=ranks, alpha=alphas, dropout=dropout,
                     rslora=bool(config.get("use_rslora", False)))
        state = _state(model)
        if "lora" not in state.methods:
            state.methods.append("lora")
        state.config.setdefault("lora", dict(target_modules=sorted(lora_tensors), loaded_from=directory))
    layers = lora_layers(model)

    # Check every shape before copying anything, so a bad file leaves the model untouched.
    for name, pair in lora_tensors.items():
        layer = layers[name]
        for short, param in (("lora_A", layer.lora_a), ("lora_B", layer.lora_b)):
            if tuple(pair[short].shape) != tuple(param.shape):
                raise ValueError(f"shape mismatch for {PEFT_PREFIX}{name}.{short}.weight: the model's "
                                 f"{type(model).__name__} expects {tuple(param.shape)}, the file has {tuple(pair[short].shape)}")
    state_dict = model.state_dict(keep_vars=True)
    saved_modules = []
    for key, value in other_tensors.items():
        target = state_dict.get(key)
        if target is None:
            raise ValueError(f"adapter does not fit {type(model).__name__}: key {PEFT_PREFIX}{key} names no "
                             f"parameter of the model")
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(f"shape mismatch for {PEFT_PREFIX}{key}: the model has {tuple(target.shape)}, "
                             f"the file has {tuple(value.shape)}")
        module_name = key.rpartition(".")[0]
        if module_name not in saved_modules:
            saved_modules.append(module_name)

    with torch.no_grad():
        for name, pair in lora_tensors.items():
            layers[name].lora_a.copy_(pair["lora_A"])
            layers[name].lora_b.copy_(pair["lora_B"])
        for key, value in other_tensors.items():
            state_dict[key].copy_(value)
    state = _state(model)
    state.modules_to_save.extend(name for name in saved_modules if name not in state.modules_to_save)
    _refreeze(model)
    return model
