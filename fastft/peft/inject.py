"""Injecting LoRA / adapters / prefixes / prompts into a Hugging Face model.

``apply(model, method, **config)`` modifies ``model`` in place (and returns it): it adds
the method's modules, freezes everything else, and keeps the task head trainable
(``modules_to_save``). What was applied is recorded on the model (``model._fastft_peft``,
see ``fastft.peft.state``) so that ``merge`` / ``save_adapter`` / a second ``apply`` know about it.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch.nn as nn

from fastft.nn import Adapter, LoRALinear, PrefixEncoder, PromptEmbedding, is_linear_like
from fastft.peft.state import FASTFT_MODULES, peft_state, refreeze
from fastft.peft.virtual_tokens import apply_prefix, apply_prompt

__all__ = [
    "apply",
    "merge",
    "unmerge",
    "lora_layers",
    "trainable_parameters_report",
    "TrainableParametersReport",
    "METHODS",
    "DEFAULT_MODULES_TO_SAVE",
]

METHODS = ("lora", "adapter", "prefix", "prompt")
# Task heads that a PEFT method must still train (they are freshly initialised for the
# task): sequence / token classification, extractive QA, GPT-2/Llama classification.
DEFAULT_MODULES_TO_SAVE = ("classifier", "qa_outputs", "score")
# Where Houlsby adapters go (after the attention output projection and after the
# feed-forward output projection of every layer), by module name, for the usual families.
ATTENTION_OUTPUT_PATTERN = (
    r"(.*\.)?("
    r"attention\.output\.dense"  # BERT, RoBERTa, ELECTRA, ...
    r"|attn\.c_proj"  # GPT-2
    r"|self_attn\.o_proj"  # Llama, Mistral, Qwen2, Gemma, ...
    r"|self_attn\.out_proj"  # OPT, BART
    r"|attention\.dense|self_attention\.dense"  # GPT-NeoX, Falcon, BLOOM
    r")"
)
FEED_FORWARD_OUTPUT_PATTERN = (
    r"(.*\.)?("
    r"(?<!attention\.)output\.dense"  # BERT-family FFN output (not attention.output.dense)
    r"|mlp\.c_proj"  # GPT-2
    r"|mlp\.down_proj"  # Llama family
    r"|fc2"  # OPT, BART
    r"|mlp\.dense_4h_to_h"  # GPT-NeoX, Falcon, BLOOM
    r")"
)


# --------------------------------------------------------------------------- module lookup


def _fastft_module_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, FASTFT_MODULES)]


def _base_named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """named_modules() without fastft's own modules and what they contain."""
    inside = [name + "." for name in _fastft_module_names(model)]
    for name, module in model.named_modules():
        if isinstance(module, FASTFT_MODULES) or any(name.startswith(prefix) for prefix in inside):
            continue
        yield name, module


def _matches_suffix(name: str, suffixes: Sequence[str]) -> bool:
    return any(name == suffix or name.endswith("." + suffix) for suffix in suffixes)


def _matches(name: str, pattern: Union[str, Sequence[str]]) -> bool:
    """A string is a regular expression matched against the whole module name (as PEFT);
    a list holds name suffixes (``"query"`` matches ``bert.encoder.layer.0.attention.self.query``)."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return _matches_suffix(name, pattern)


def _some_names(names: Sequence[str], limit: int = 12) -> str:
    """A short, readable sample of module names for error messages (distinct last parts first)."""
    seen: dict[str, str] = {}
    for name in names:
        leaf = ".".join(name.split(".")[-2:])
        seen.setdefault(leaf, name)
    sample = list(seen.values())[:limit]
    more = len(names) - len(sample)
    return ", ".join(sample) + (f", ... ({more} more)" if more > 0 else "")


def _output_head_name(model: nn.Module) -> Optional[str]:
    """The module name of the LM output head (excluded from "all-linear")."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None


def _resolve_modules_to_save(model: nn.Module, modules_to_save) -> list[str]:
    if modules_to_save is None:
        return []
    if modules_to_save == "auto":
        return [name for name, _ in _base_named_modules(model)
                if name and name.split(".")[-1] in DEFAULT_MODULES_TO_SAVE]
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    names = [name for name, _ in _base_named_modules(model)]
    found = []
    for suffix in modules_to_save:
        hits = [name for name in names if name and _matches_suffix(name, [suffix])]
        if not hits:
            raise ValueError(f"modules_to_save entry {suffix!r} matches no module; top-level modules here: "
                             + ", ".join(name for name, _ in model.named_children()))
        found.extend(hit for hit in hits if hit not in found)
    return found


def _get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, leaf = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), leaf


def _out_features(module: nn.Module) -> int:
    if isinstance(module, LoRALinear):
        return module.out_features
    if isinstance(module, nn.Linear):
        return module.out_features
    if hasattr(module, "nf"):  # transformers Conv1D
        return module.nf
    raise TypeError(f"cannot tell the output size of {type(module).__name__}")


# --------------------------------------------------------------------------- LoRA


def _check_rank(rank) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    return rank


def _lora_targets(model: nn.Module, target_modules, modules_to_save: Sequence[str]) -> list[str]:
    candidates = list(_base_named_modules(model))
    linear_names = [name for name, module in candidates if is_linear_like(module)]
    already = [name for name, module in model.named_modules() if isinstance(module, LoRALinear)]
    if target_modules == "all-linear":
        head = _output_head_name(model)
        saved = [name + "." for name in modules_to_save]
        targets = [name for name in linear_names
                   if name != head and name not in modules_to_save and not any(name.startswith(s) for s in saved)]
    else:
        if not isinstance(target_modules, str):
            if isinstance(target_modules, Sequence) and all(isinstance(s, str) for s in target_modules) and target_modules:
                target_modules = list(target_modules)
            else:
                raise TypeError("target_modules must be 'all-linear', a regular expression (str) or a non-empty "
                                f"list of module-name suffixes, got {target_modules!r}")
        doubled = [name for name in already if _matches(name, target_modules)]
        if doubled:
            raise ValueError(f"target_modules={target_modules!r} matches {doubled[0]!r}, which already has LoRA")
        targets = [name for name in linear_names if _matches(name, target_modules)]
    if not targets:
        raise ValueError(f"target_modules={target_modules!r} matches no linear module of {type(model).__name__}; "
                         f"linear modules here include: {_some_names(linear_names)}")
    return targets


def _inject_lora(model: nn.Module, targets: Sequence[str], *, rank: Union[int, dict], alpha: Union[float, dict],
                 dropout: float, rslora: bool) -> list[str]:
    """Wrap each named linear module in a ``LoRALinear`` (rank / alpha may be per-name dicts)."""
    state = peft_state(model)
    for name in targets:
        parent, leaf = _get_parent(model, name)
        base = getattr(parent, leaf)
        module_rank = rank[name] if isinstance(rank, dict) else rank
        module_alpha = alpha[name] if isinstance(alpha, dict) else alpha
        wrapped = LoRALinear(base, rank=_check_rank(module_rank), alpha=module_alpha, dropout=dropout,
                             use_rslora=rslora)
        setattr(parent, leaf, wrapped)
        # An adapter hooked on the bare layer must now see the LoRA-adapted output.
        if name in state.adapter_hooks:
            handle, adapter = state.adapter_hooks.pop(name)
            handle.remove()
            _register_adapter_hook(model, name, adapter)
    return list(targets)


def _apply_lora(model, modules_to_save, *, target_modules="all-linear", rank=8, alpha=16.0, dropout=0.0,
                rslora=False):
    _check_rank(rank)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0 or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    targets = _lora_targets(model, target_modules, modules_to_save)
    _inject_lora(model, targets, rank=rank, alpha=float(alpha), dropout=float(dropout), rslora=bool(rslora))
    return dict(target_modules=target_modules, rank=rank, alpha=alpha, dropout=dropout, rslora=rslora)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every ``LoRALinear`` in ``model`` by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def merge(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight (``W ← W + scaling · B A``); returns ``model``.

    Raises:
        ValueError: the model has no LoRA layers.
        RuntimeError: a layer is already merged.
    """
    return _set_merged(model, merged=True)


def unmerge(model: nn.Module) -> nn.Module:
    """Undo ``merge(model)`` (exact up to floating-point rounding); returns ``model``.

    Raises:
        ValueError: the model has no LoRA layers.
        RuntimeError: a layer is not merged.
    """
    return _set_merged(model, merged=False)


def _set_merged(model: nn.Module, *, merged: bool) -> nn.Module:
    """Merge (``merged=True``) or unmerge every LoRA layer; all must be in the other state."""
    action = "merge" if merged else "unmerge"
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no fastft LoRA layers to {action}")
    done = [name for name, layer in layers.items() if layer.merged == merged]
    if done:
        raise RuntimeError(f"LoRA is already merged (e.g. {done[0]}); call unmerge(model) first" if merged
                           else f"LoRA is not merged (e.g. {done[0]}); nothing to unmerge")
    for layer in layers.values():
        getattr(layer, action)()
    return model


# --------------------------------------------------------------------------- adapters


class _AdapterHook:
    """Forward hook replacing a sublayer output ``h`` by ``adapter(h)``."""

    def __init__(self, adapter: Adapter):
        self.adapter = adapter

    def __call__(self, module, args, output):
        return self.adapter(output)


def _adapter_key(name: str) -> str:
    return name.replace(".", "__")  # ModuleDict keys cannot contain dots


def _register_adapter_hook(model: nn.Module, name: str, adapter: Adapter) -> None:
    handle = model.get_submodule(name).register_forward_hook(_AdapterHook(adapter))
    # The adapter is kept with the handle to re-register the hook when LoRA wraps the host.
    peft_state(model).adapter_hooks[name] = (handle, adapter)


def _adapter_hosts(model: nn.Module, adapter_modules) -> list[str]:
    """The linear modules whose outputs get an adapter: ``adapter_modules`` (suffixes or a
    regex), or by default each layer's attention-output and feed-forward-output projection."""
    candidates = [name for name, module in _base_named_modules(model) if name and is_linear_like(module)]
    # LoRALinear hosts count too (adapters go after the adapted output).
    candidates += [name for name, module in model.named_modules() if isinstance(module, LoRALinear)]
    if adapter_modules is not None:
        hosts = [name for name in candidates if _matches(name, adapter_modules)]
        if not hosts:
            raise ValueError(f"adapter_modules={adapter_modules!r} matches no linear module (adapters go after a "
                             f"sublayer's output projection); linear modules here include: "
                             f"{_some_names(candidates)}")
        return hosts
    # Houlsby et al. place the adapter on the sublayer's output, before the residual
    # addition (and, post-LN models, the layer norm): exactly the projection's output.
    attention = [name for name in candidates if re.fullmatch(ATTENTION_OUTPUT_PATTERN, name)]
    feed_forward = [name for name in candidates if re.fullmatch(FEED_FORWARD_OUTPUT_PATTERN, name)]
    if not attention or not feed_forward:
        missing = "attention output" if not attention else "feed-forward output"
        raise ValueError(
            f"cannot find the {missing} projections of {type(model).__name__} to insert adapters after; pass "
            f"adapter_modules=[...] (name suffixes or a regex). Linear modules here include: "
            f"{_some_names(candidates)}")
    return sorted(set(attention + feed_forward), key=candidates.index)


def _apply_adapter(model, modules_to_save, *, bottleneck_size=None, activation="gelu", up_init_std=1e-3,
                   adapter_modules=None):
    state = peft_state(model)
    hosts = _adapter_hosts(model, adapter_modules)
    doubled = [name for name in hosts if name in state.adapter_hooks]
    if doubled:
        raise ValueError(f"{doubled[0]!r} already has an adapter")
    if "fastft_adapters" not in model._modules:
        model.add_module("fastft_adapters", nn.ModuleDict())
    for name in hosts:
        host = model.get_submodule(name)
        hidden = _out_features(host)
        size = bottleneck_size if bottleneck_size is not None else max(1, hidden // 16)
        weight = next(host.parameters())
        adapter = Adapter(hidden, size, activation, up_init_std, dtype=weight.dtype, device=weight.device)
        model.fastft_adapters[_adapter_key(name)] = adapter
        _register_adapter_hook(model, name, adapter)
    return dict(bottleneck_size=bottleneck_size, activation=activation, hosts=hosts)


# --------------------------------------------------------------------------- apply


_METHOD_CONFIG = {
    "lora": ("target_modules", "rank", "alpha", "dropout", "rslora"),
    "adapter": ("bottleneck_size", "activation", "up_init_std", "adapter_modules"),
    "prefix": ("num_virtual_tokens", "projection_hidden_size", "prefix_projection"),
    "prompt": ("num_virtual_tokens", "init_text", "tokenizer", "init_token_ids"),
}


def apply(model: nn.Module, method: str = "lora", *, modules_to_save: Union[str, Sequence[str], None] = "auto",
          **config) -> nn.Module:
    """Add a parameter-efficient fine-tuning method to a Hugging Face model, in place.

    Everything but the method's parameters and ``modules_to_save`` is frozen
    (``requires_grad=False``); methods compose (``apply`` twice keeps both trainable).

    Args:
        model: any ``transformers`` ``PreTrainedModel`` (or plain ``nn.Module`` for LoRA /
            adapters).
        method: ``"lora" | "adapter" | "prefix" | "prompt"``.
        modules_to_save: modules kept fully trainable, by name suffix; ``"auto"`` (default)
            takes the task heads named ``classifier`` / ``qa_outputs`` / ``score`` that exist,
            None keeps nothing.
        **config: per method —

            * ``lora``: ``target_modules`` (``"all-linear"`` — every linear layer but the LM
              output head and modules_to_save —, a regex fully matching module names, or a
              list of name suffixes such as ``["query", "value"]``), ``rank`` (8),
              ``alpha`` (16), ``dropout`` (0), ``rslora`` (False: scaling α/r; True: α/√r).
            * ``adapter``: ``bottleneck_size`` (default hidden/16), ``activation``
              (``"gelu"``), ``up_init_std`` (1e-3), ``adapter_modules`` (where to insert;
              default: the attention-output and feed-forward-output projections of each
              layer, found by name for BERT/RoBERTa/GPT-2/Llama/OPT/NeoX-like models).
            * ``prefix``: ``num_virtual_tokens`` (20), ``prefix_projection`` (True: the MLP
              reparametrisation), ``projection_hidden_size`` (default hidden size). Works on
              BERT, RoBERTa, GPT-2 and Llama (see ``fastft.peft.virtual_tokens``).
            * ``prompt``: ``num_virtual_tokens`` (20), and either ``init_text`` with
              ``tokenizer`` or ``init_token_ids`` to initialise from a text; otherwise random
              vocabulary embeddings.

    Returns:
        ``model`` itself (modified).

    Raises:
        ValueError: unknown method, rank <= 0, patterns that match nothing (the message
            lists module names that exist), bad sizes.
        TypeError: an option that does not belong to the method.
        NotImplementedError: prefix tuning on an architecture it is not verified for.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(map(repr, METHODS))}")
    unknown = sorted(set(config) - set(_METHOD_CONFIG[method]))
    if unknown:
        raise TypeError(f"apply(method={method!r}) got unexpected option(s) {', '.join(unknown)}; "
                        f"valid options: modules_to_save, {', '.join(_METHOD_CONFIG[method])}")
    state = peft_state(model)
    if method in state.methods and method != "lora":
        raise ValueError(f"method {method!r} is already applied to this model")
    if method in ("prefix", "prompt") and {"prefix", "prompt"} & set(state.methods):
        raise ValueError("prefix and prompt tuning cannot be combined on one model (both add virtual tokens)")
    saved = _resolve_modules_to_save(model, modules_to_save)
    if method == "lora":
        applied = _apply_lora(model, saved, **config)
    elif method == "adapter":
        applied = _apply_adapter(model, saved, **config)
    elif method == "prefix":
        applied = apply_prefix(model, **config)
    else:
        applied = apply_prompt(model, **config)
    state.methods.append(method)
    state.config[method] = applied
    state.keep_trainable(saved)
    refreeze(model)
    return model


# --------------------------------------------------------------------------- report


@dataclass
class TrainableParametersReport:
    """Counts of trainable vs all parameters (shared tensors counted once).

    ``print(report)`` gives one line; ``by_group`` splits the trainable count into
    ``lora`` / ``adapter`` / ``prefix`` / ``prompt`` / ``modules_to_save`` / ``other``.
    """

    trainable: int
    total: int
    by_group: dict[str, int]

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        groups = ", ".join(f"{group} {count:,}" for group, count in self.by_group.items() if count)
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                f"trainable%: {self.percent:.4f}" + (f" ({groups})" if groups else ""))


def trainable_parameters_report(model: nn.Module) -> TrainableParametersReport:
    """Count ``model``'s trainable parameters, overall and per kind (see the report class)."""
    group_of: dict[int, str] = {}
    for module in model.modules():
        group = {LoRALinear: "lora", Adapter: "adapter", PrefixEncoder: "prefix", PromptEmbedding: "prompt"}.get(
            type(module))
        if group is None:
            continue
        params = [module.lora_a, module.lora_b] if isinstance(module, LoRALinear) else module.parameters()
        for param in params:
            group_of[id(param)] = group
    for name in peft_state(model).modules_to_save:
        for param in model.get_submodule(name).parameters():
            group_of.setdefault(id(param), "modules_to_save")
    seen: set[int] = set()
    total = trainable = 0
    by_group = Counter({"lora": 0, "adapter": 0, "prefix": 0, "prompt": 0, "modules_to_save": 0, "other": 0})
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
            by_group[group_of.get(id(param), "other")] += param.numel()
    return TrainableParametersReport(trainable=trainable, total=total, by_group=dict(by_group))
