"""nn.Modules for parameter-efficient fine-tuning, over fastft's fused ops.

- ``LoRALinear``: frozen linear + trainable low-rank update (forward through
  ``fastft.ops.lora_linear``), with merge / unmerge / disable.
- ``Adapter``: Houlsby bottleneck adapter.
- ``PrefixEncoder``: per-layer key/value prefixes (prefix tuning), MLP-reparametrised.
- ``PromptEmbedding``: soft prompt vectors (prompt tuning).
- ``FastDropout``: ``nn.Dropout`` with cheaper masks on the CPU (the loop swaps it in there).

``fastft.peft`` injects these into Hugging Face models.
"""

from fastft.nn.adapter import Adapter
from fastft.nn.dropout import FastDropout, use_fast_dropout
from fastft.nn.lora import LoRALinear, is_linear_like
from fastft.nn.prefix import PrefixEncoder
from fastft.nn.prompt import PromptEmbedding

__all__ = ["LoRALinear", "Adapter", "PrefixEncoder", "PromptEmbedding", "FastDropout", "use_fast_dropout", "is_linear_like"]
