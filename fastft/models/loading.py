"""Loading a pretrained Hugging Face model and knowing which of its weights are *not*
pretrained: a masked-LM head missing from a checkpoint (a sentence-embedding model, an
encoder saved without its head) is initialised at random, and perplexity, continued
pretraining or a forgetting measurement through it would be meaningless numbers."""

from __future__ import annotations

from fastft.errors import loading

__all__ = ["load_pretrained", "new_head_weights"]


def load_pretrained(auto_class, name_or_path: str, *, what: str = "model", **kwargs):
    """``auto_class.from_pretrained(name_or_path, **kwargs)`` with a one-line error for a
    name it cannot load. Returns ``(model, names of the weights initialised anew)``."""
    with loading(what, name_or_path):
        model, info = auto_class.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
    return model, sorted(info.get("missing_keys", ()))


def new_head_weights(model, missing: list[str]) -> list[str]:
    """The weights among ``missing`` that belong to the model's output head (the LM head:
    ``get_output_embeddings`` and the layers around it), i.e. what makes its predictions
    random; the backbone's own missing weights are a different problem (reported as is)."""
    backbone = getattr(model, "base_model_prefix", "")
    return [name for name in missing if not (backbone and name.startswith(backbone + "."))]
