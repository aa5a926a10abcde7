"""What fastft.peft applied to a model, and the freezing that follows from it.

The record lives on the model (``model._fastft_peft``) so that ``merge``, ``save_adapter``,
``load_adapter`` and a second ``apply`` know what the first one did. Every module of
``fastft.peft`` that changes a model reads and writes it here; this module imports no
other module of ``fastft.peft``, so theirs all point down to it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from fastft.nn import Adapter, LoRALinear, PrefixEncoder, PromptEmbedding

__all__ = ["PeftState", "peft_state", "refreeze", "FASTFT_MODULES"]

# The modules fastft.peft adds to a model.
FASTFT_MODULES = (LoRALinear, Adapter, PrefixEncoder, PromptEmbedding)


@dataclass
class PeftState:
    """What fastft.peft applied to a model (stored as ``model._fastft_peft``)."""

    methods: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)  # full module names
    adapter_hooks: dict[str, tuple] = field(default_factory=dict)  # host name -> (hook handle, Adapter)
    virtual_token_hook: Any = None  # prefix / prompt forward pre-hook handle
    config: dict[str, dict] = field(default_factory=dict)  # method -> the config it was applied with

    def keep_trainable(self, module_names: Iterable[str]) -> None:
        """Add module names to ``modules_to_save`` (each once, in order)."""
        self.modules_to_save.extend(name for name in module_names if name not in self.modules_to_save)


def peft_state(model: nn.Module) -> PeftState:
    """``model``'s record, created empty on first use."""
    state = model.__dict__.get("_fastft_peft")
    if state is None:
        state = PeftState()
        model.__dict__["_fastft_peft"] = state
    return state


def refreeze(model: nn.Module) -> None:
    """Freeze everything, then unfreeze every fastft adapter parameter and modules_to_save."""
    state = peft_state(model)
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.lora_a.requires_grad_(True)
            module.lora_b.requires_grad_(True)
        elif isinstance(module, (Adapter, PrefixEncoder, PromptEmbedding)):
            for param in module.parameters():
                param.requires_grad_(True)
    for name in state.modules_to_save:
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(True)
