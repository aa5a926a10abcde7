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

Modules, each importing only the ones below it (``tests/test_peft.py`` checks there is
no cycle, and nothing from above ``fastft.peft``):

    io              save_adapter / load_adapter (PEFT's format)   -> inject, state, sharding
    inject          apply, merge, lora_layers, the report         -> virtual_tokens, state
    virtual_tokens  prefix and prompt tuning (forward pre-hooks)  -> state
    state           the per-model record and refreeze
    sharding        full_tensor (FSDP2 shards -> whole tensors)
    interop         accelerate(peft_model)
"""

from fastft.peft.inject import (
    DEFAULT_MODULES_TO_SAVE,
    METHODS,
    TrainableParametersReport,
    apply,
    lora_layers,
    merge,
    trainable_parameters_report,
    unmerge,
)
from fastft.peft.interop import accelerate
from fastft.peft.io import load_adapter, save_adapter
from fastft.peft.virtual_tokens import PREFIX_VERIFIED_MODEL_TYPES, materialize_prefix

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
