"""Hugging Face ``transformers`` integration: fused attention and logits-free LM losses.

``import fastft`` registers ``attn_implementation="fastft"`` with ``transformers`` as soon
as transformers' attention and mask registries load (``fastft/_transformers_hook.py``;
importing fastft does not import transformers), so after ``import fastft``::

    model = AutoModelForCausalLM.from_config(config, attn_implementation="fastft")

routes attention through ``fastft.ops.attention``. For a model that already exists,
``fastft.patch(model)`` switches its attention and replaces its masked-LM / causal-LM
loss with ``fastft.ops.linear_cross_entropy`` (labelled calls then return
``logits=None``); ``fastft.unpatch(model)`` restores it.

Sliding windows, soft-capping and KV-cached generation (decoding, chunked prefill,
sliding-window caches) run on the op. When an attention call has something the op cannot
express (packed sequences, chunked attention, an arbitrary 4-D mask, attention sinks, a
paged cache, ...) it runs transformers' sdpa function instead; the reason is logged
once, kept in ``fastft.models.last_fallback_reason`` and counted in
``fastft.models.fallback_reasons()``.
"""

from fastft.models import attention as _attention
from fastft.models.attention import ATTENTION_NAME, fallback_reasons, register, register_loaded
from fastft.models.loss import LOSS_BY_CLASS, causal_lm_loss, masked_lm_loss
from fastft.models.patching import is_patched, patch, unpatch

# What transformers has loaded already (the rest registers as it loads: `import fastft`
# installed fastft/_transformers_hook.py before this package could run).
register_loaded()

__all__ = [
    "ATTENTION_NAME",
    "LOSS_BY_CLASS",
    "causal_lm_loss",
    "fallback_reasons",
    "is_patched",
    "last_fallback_reason",
    "masked_lm_loss",
    "patch",
    "register",
    "register_loaded",
    "unpatch",
]


def __getattr__(name):
    # Read live from the attention module: a plain re-export would freeze the value at import.
    if name == "last_fallback_reason":
        return _attention.last_fallback_reason
    raise AttributeError(f"module 'fastft.models' has no attribute {name!r}")
