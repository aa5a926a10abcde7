"""What the Triton kernels share with the other backends, in plain Python.

This module imports no triton: ``fastft.ops`` and the CUDA wrappers import it to ask
whether Triton can run (before importing any kernel) and to compute lora_linear's
dropout parameters exactly as the kernels do.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Sequence

import torch

_MASK32 = 0xFFFFFFFF


def interpreting_triton() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_reasons(tensors: Sequence[torch.Tensor]) -> list[str]:
    """Why no Triton kernel can run on these tensors (empty when one can): what every op's
    Triton backend starts its own reasons from."""
    if importlib.util.find_spec("triton") is None:
        return ["triton is not installed"]
    if not all(t.is_cuda for t in tensors) and not interpreting_triton():
        return ["tensors are not on a CUDA device (set TRITON_INTERPRET=1 to run Triton on the CPU)"]
    return []


# --------------------------------------------------------------------------- lora_linear dropout
# The mask definition (the same bits on every backend) is in fastft/ops/lora_linear.py's docstring.


def mix32(value: int) -> int:
    """lowbias32 integer hash of a Python int in [0, 2³²) (lora_linear's dropout mixer)."""
    value &= _MASK32
    value ^= value >> 16
    value = (value * 0x7FEB352D) & _MASK32
    value ^= value >> 15
    value = (value * 0x846CA68B) & _MASK32
    value ^= value >> 16
    return value


def dropout_params(dropout_p: float, seed: int) -> tuple[int, int]:
    """(seed key, keep threshold on 24 bits) of lora_linear's dropout mask, shared by every backend."""
    return mix32(seed % (1 << 32)), math.ceil(dropout_p * (1 << 24))


# --------------------------------------------------------------------------- attention dropout
# The mask definition is in fastft/ops/attention.py's docstring (attention_dropout_mask).

ATTENTION_DROPOUT_BITS = 16  # random bits per keep decision: 8 decisions per Philox-4x32 call


def attention_dropout_threshold(dropout_p: float) -> int:
    """A score is kept when its 16 random bits are >= this: probability ``1 - dropout_p`` to
    within 2⁻¹⁷ (the 1 / (1 - dropout_p) rescaling uses the exact ``dropout_p``)."""
    return min(round(dropout_p * (1 << ATTENTION_DROPOUT_BITS)), (1 << ATTENTION_DROPOUT_BITS) - 1)
