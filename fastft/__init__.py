"""fastft: fast pretraining and fine-tuning of transformer language models.

Fused kernels (attention, LoRA matmul, linear cross-entropy) in Triton and CUDA C++,
each with a pure-PyTorch twin, and a thin training loop on Hugging Face models.
"""

import importlib

__version__ = "0.1.0"

from fastft import ops  # noqa: E402
from fastft.ops import attention, linear_cross_entropy, lora_linear  # noqa: E402
from fastft import _transformers_hook  # noqa: E402

# attn_implementation="fastft" as soon as transformers' registries load (imports nothing now).
_transformers_hook.install()

# Heavier entry points (they import transformers / datasets) load on first use:
# name -> (module, attribute of it; None: the module itself).
_LAZY = {
    "patch": ("fastft.models", "patch"),
    "unpatch": ("fastft.models", "unpatch"),
    "pretrain": ("fastft.recipes.pretrain", "pretrain"),
    "finetune": ("fastft.recipes.finetune", "finetune"),
    "align": ("fastft.recipes.align", "align"),
    "evaluate": ("fastft.train.evaluation", "evaluate"),
    "predict": ("fastft.finetuning.bundle", "predict"),
    "load_finetuned": ("fastft.finetuning.bundle", "load_finetuned"),
    "save_finetuned": ("fastft.finetuning.bundle", "save_finetuned"),
    "peft": ("fastft.peft", None),
    "nn": ("fastft.nn", None),
    "active": ("fastft.active", None),
    "audit": ("fastft.audit", None),
}


def __getattr__(name):
    if name in _LAZY:
        module_name, attribute = _LAZY[name]
        module = importlib.import_module(module_name)
        return module if attribute is None else getattr(module, attribute)
    raise AttributeError(f"module 'fastft' has no attribute {name!r}")


__all__ = ["__version__", "ops", "attention", "linear_cross_entropy", "lora_linear", *_LAZY]
