"""Public functional ops. ``<op>.py`` holds one op: its reference (``<op>_ref``), its
public entry (``<op>(..., backend="auto")``), its torch backend and its backend dispatch;
``<op>_cuda.py`` its CUDA wrapper. No op's module imports another op's."""

from fastft.ops.attention import attention, attention_ref
from fastft.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from fastft.ops.lora_linear import dequantize_weight_int8, lora_linear, lora_linear_ref, quantize_weight_int8

__all__ = [
    "attention",
    "attention_ref",
    "dequantize_weight_int8",
    "linear_cross_entropy",
    "linear_cross_entropy_ref",
    "lora_linear",
    "lora_linear_ref",
    "quantize_weight_int8",
]
