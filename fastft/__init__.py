"""fastft: fast pretraining and fine-tuning of transformer language models.

Fused kernels (attention, LoRA matmul, linear cross-entropy) in Triton and CUDA C++,
each with a pure-PyTorch twin, and a thin training loop on Hugging Face models.
"""

import importlib

__version__ = "0.1.0"

from fastft import ops  # noqa: E402
from fastft.ops import attention, linear_cross_entropy, lora_linear  # noqa: E402

# Heavier entry points (they import transformers / datasets) load on first use.
_LAZY = {
    "patch": "fastft.models",
    "unpatch": "fastft.models",
    "pretrain": "fastft.train",
    "finetune": "fastft.train",
    "evaluate": "fastft.train",
    "predict": "fastft.train",
    "peft": "fastft.peft",
    "nn": "fastft.nn",
}


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return module if module.__name__.endswith("." + name) else getattr(module, name)
    raise AttributeError(f"module 'fastft' has no attribute {name!r}")


__all__ = ["__version__", "ops", "attention", "linear_cross_entropy", "lora_linear", *_LAZY]
