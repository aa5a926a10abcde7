"""Parameter-efficient fine-tuning of Hugging Face models: LoRA (through the fused
``fastft.ops.lora_linear``), Houlsby adapters, prefix tuning and prompt tuning.

    import fastft.peft as fp
    fp.apply(model, "lora", target_modules=["query", "value"], rank=8, alpha=16)
    print(fp.trainable_parameters_report(model))
    ...train...
    fp.save_adapter(model, "out/")          # Hugging Face PEFT format
    fp.merge(model)                          # fold LoRA into the weights for inference

``load_adapter`` reads adapters saved by PEFT; ``accelerate(peft_model)`` runs an existing
PEFT model's LoRA layers through fastft's fused op.
"""

from fastft.peft.inject import (
    DEFAULT_MODULES_TO_SAVE,
    METHODS,
    PREFIX_VERIFIED_MODEL_TYPES,
    TrainableParametersReport,
    apply,
    lora_layers,
    merge,
    trainable_parameters_report,
    unmerge,
)
from fastft.peft.interop import accelerate
from fastft.peft.io import load_adapter, save_adapter
from fastft.peft.virtual_tokens import materialize_prefix

__all__ = [
    "apply",
    "merge",
    "unmerge",
    "lora_layers",
    "save_adapter",
    "load_adapter",
    "accelerate",
    "materialize_prefix",
    "trainable_parameters_report",
    "TrainableParametersReport",
    "METHODS",
    "DEFAULT_MODULES_TO_SAVE",
    "PREFIX_VERIFIED_MODEL_TYPES",
]
