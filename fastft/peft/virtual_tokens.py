"""Prefix tuning and prompt tuning on Hugging Face models, through a forward pre-hook.

Both methods add "virtual tokens" in front of the input. fastft does it without
changing the model class: a forward pre-hook on the model rewrites the call's arguments.

* Prompt tuning (Lester et al. 2021): ``input_ids`` are embedded with the model's own
  input embedding, the soft prompt ``(B, p, d)`` is prepended to ``inputs_embeds``, and
  the attention mask / token type ids / position ids / token-level labels are extended to
  match (labels with -100 so virtual positions are never scored). Outputs therefore
  have ``p + n`` positions (token-level logits included), as in Hugging Face PEFT.
  Consequences, also as in PEFT: an encoder classifier pooling position 0 (BERT's [CLS])
  pools the first virtual token, which is trained for it; decoder classifiers
  (GPT-2 / Llama ``...ForSequenceClassification``) given ``inputs_embeds`` cannot find
  the last non-pad token and take the last position, so pad such batches on the left.

* Prefix tuning (Li & Liang 2021): the per-layer prefixes ``(B, h_kv, p, d_h)`` are put
  into a fresh ``transformers.DynamicCache`` passed as ``past_key_values``. Every attention
  layer then concatenates them in front of its own keys/values (exactly what the cache
  mechanism does for generation), the attention mask is extended by ``p`` ones, and
  positions of the real tokens start at ``p`` (as they would after ``p`` cached tokens).
  Gradients flow into the prefixes through the cache's concatenation.

  This relies on each self-attention layer calling ``past_key_values.update(k, v, layer)``
  and the mask builder accepting a ``past + current`` attention mask. tests/test_peft.py
  checks it (a prefix masked out must give the base model with positions shifted by
  ``p``) with transformers 5.23 and 5.17 on BERT and RoBERTa (encoders: the bidirectional
  mask covers the prefix), GPT-2 and Llama (causal). Other architectures raise
  ``NotImplementedError`` naming the model rather than risk a silently wrong result
  (encoder-decoder models keep their encoder self-attention out of the cache; models
  without ``past_key_values`` such as DistilBERT have no cache; sliding-window and hybrid
  attention masks were not checked).

Generation with a cache (``model.generate``) is not supported for either method: a
non-empty ``past_key_values`` given by the caller raises ``NotImplementedError``.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn as nn

from fastft.nn import PrefixEncoder, PromptEmbedding
from fastft.peft.state import peft_state, refreeze

__all__ = ["apply_prefix", "apply_prompt", "materialize_prefix", "prefix_geometry", "PREFIX_VERIFIED_MODEL_TYPES"]

PREFIX_MODULE = "fastft_prefix"
PROMPT_MODULE = "fastft_prompt"
# Architectures on which prefix tuning through the key/value cache has been verified
# (tests/test_peft.py and the checks described above).
PREFIX_VERIFIED_MODEL_TYPES = ("bert", "roberta", "gpt2", "llama")


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"{type(model).__name__} has no .config: prefix / prompt tuning need a transformers model")
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def prefix_geometry(model: nn.Module) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of a transformers model's attention layers."""
    config = _text_config(model)
    num_layers = config.num_hidden_layers
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return num_layers, num_kv_heads, head_dim


def _check_virtual_tokens(num_virtual_tokens) -> int:
    if isinstance(num_virtual_tokens, bool) or not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
        raise ValueError(f"num_virtual_tokens must be an integer >= 1, got {num_virtual_tokens!r}")
    return num_virtual_tokens


def _bind_arguments(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """All call arguments as keywords (models are also called positionally: ``model(ids)``)."""
    if not args:
        return dict(kwargs)
    names = [name for name, param in inspect.signature(model.forward).parameters.items()
             if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(names):
        raise TypeError(f"{type(model).__name__}.forward got {len(args)} positional arguments, expected at most {len(names)}")
    bound = dict(zip(names, args))
    duplicated = sorted(set(bound) & set(kwargs))
    if duplicated:
        raise TypeError(f"{type(model).__name__}.forward got multiple values for {', '.join(duplicated)}")
    return {**bound, **kwargs}


def _refuse_caller_cache(model: nn.Module, kwargs: dict, method: str) -> None:
    past = kwargs.get("past_key_values")
    if past is None:
        return
    get_length = getattr(past, "get_seq_length", None)
    if not callable(get_length) or get_length() > 0:
        raise NotImplementedError(
            f"{method} tuning with a caller-provided past_key_values (e.g. generate() with a cache) is not "
            f"supported by fastft on {type(model).__name__}; call the model on whole sequences")


def _batch_size(kwargs: dict) -> int:
    for key in ("input_ids", "inputs_embeds"):
        if kwargs.get(key) is not None:
            return kwargs[key].shape[0]
    raise ValueError("the model must be called with input_ids or inputs_embeds")


# --------------------------------------------------------------------------- prefix


def _prefix_hook(model: nn.Module, args: tuple, kwargs: dict):
    from transformers import DynamicCache

    kwargs = _bind_arguments(model, args, kwargs)
    _refuse_caller_cache(model, kwargs, "prefix")
    encoder: PrefixEncoder = getattr(model, PREFIX_MODULE)
    batch = _batch_size(kwargs)
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    # Lazily built layers: plain full-attention DynamicLayers, never cropped.
    cache = DynamicCache()
    for layer, (key, value) in enumerate(encoder(batch)):  # each (B, h_kv, p, d_h)
        cache.update(key.to(dtype), value.to(dtype), layer)
    kwargs["past_key_values"] = cache
    mask = kwargs.get("attention_mask")
    if mask is not None:  # (B, n) -> (B, p + n): every virtual token is visible
        kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, encoder.num_virtual_tokens), mask], dim=1)
    return (), kwargs


def apply_prefix(model: nn.Module, *, num_virtual_tokens: int = 20, prefix_projection: bool = True,
                 projection_hidden_size: Optional[int] = None) -> dict:
    """Add a ``PrefixEncoder`` (as ``model.fastft_prefix``) and the hook that feeds it.

    Raises:
        NotImplementedError: the architecture is not one prefix tuning is verified on.
        ValueError: ``num_virtual_tokens < 1``.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in PREFIX_VERIFIED_MODEL_TYPES or getattr(model.config, "is_encoder_decoder", False):
        raise NotImplementedError(
            f"prefix tuning is not implemented for {type(model).__name__} (model_type={model_type!r}): fastft passes "
            f"prefixes through the key/value cache and has verified that on model types "
            f"{', '.join(PREFIX_VERIFIED_MODEL_TYPES)}; use method='prompt' or 'lora' for this model")
    _check_virtual_tokens(num_virtual_tokens)
    num_layers, num_kv_heads, head_dim = prefix_geometry(model)
    hidden_size = _text_config(model).hidden_size
    weight = next(p for p in model.parameters() if p.is_floating_point())
    encoder = PrefixEncoder(
        num_virtual_tokens, num_layers, num_kv_heads, head_dim,
        projection_hidden_size=(projection_hidden_size or hidden_size) if prefix_projection else None,
        token_dim=hidden_size if prefix_projection else None, dtype=weight.dtype, device=weight.device)
    model.add_module(PREFIX_MODULE, encoder)
    peft_state(model).virtual_token_hook = model.register_forward_pre_hook(_prefix_hook, with_kwargs=True)
    return dict(num_virtual_tokens=num_virtual_tokens, prefix_projection=prefix_projection,
                projection_hidden_size=projection_hidden_size)


def materialize_prefix(model: nn.Module) -> nn.Module:
    """After training: drop the prefix MLP, keeping the prefixes it produces (same outputs).

    Raises:
        ValueError: the model has no fastft prefix.
    """
    encoder = getattr(model, PREFIX_MODULE, None)
    if not isinstance(encoder, PrefixEncoder):
        raise ValueError(f"{type(model).__name__} has no fastft prefix (apply(model, 'prefix') first)")
    encoder.materialize()
    refreeze(model)  # the new prefixes parameter is trainable like the old ones
    return model


# --------------------------------------------------------------------------- prompt


def _prompt_hook(model: nn.Module, args: tuple, kwargs: dict):
    kwargs = _bind_arguments(model, args, kwargs)
    _refuse_caller_cache(model, kwargs, "prompt")
    prompt: PromptEmbedding = getattr(model, PROMPT_MODULE)
    p = prompt.num_virtual_tokens
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        if kwargs.get("input_ids") is None:
            raise ValueError("the model must be called with input_ids or inputs_embeds")
        embeds = model.get_input_embeddings()(kwargs["input_ids"])  # (B, n, d)
    kwargs["input_ids"] = None
    batch, length = embeds.shape[:2]
    kwargs["inputs_embeds"] = torch.cat([prompt(batch).to(embeds.dtype), embeds], dim=1)  # (B, p + n, d)
    mask = kwargs.get("attention_mask")
    if mask is not None:
        kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, p), mask], dim=1)  # (B, p + n)
    token_types = kwargs.get("token_type_ids")
    if token_types is not None:
        kwargs["token_type_ids"] = torch.cat([token_types.new_zeros(batch, p), token_types], dim=1)
    positions = kwargs.get("position_ids")
    if positions is not None:  # virtual tokens take positions 0..p-1, the text moves up by p
        virtual = torch.arange(p, device=positions.device, dtype=positions.dtype).expand(positions.shape[0], p)
        kwargs["position_ids"] = torch.cat([virtual, positions + p], dim=1)
    labels = kwargs.get("labels")
    if labels is not None and labels.dim() >= 2 and labels.shape[1] == length:  # token-level labels
        kwargs["labels"] = torch.cat([labels.new_full((batch, p, *labels.shape[2:]), -100), labels], dim=1)
    return (), kwargs


def apply_prompt(model: nn.Module, *, num_virtual_tokens: int = 20, init_text: Optional[str] = None,
                 tokenizer=None, init_token_ids=None) -> dict:
    """Add a ``PromptEmbedding`` (as ``model.fastft_prompt``) and the hook that prepends it.

    Raises:
        ValueError: ``num_virtual_tokens < 1``; ``init_text`` without a ``tokenizer``; both
            ``init_text`` and ``init_token_ids``.
        TypeError: the model has no ``nn.Embedding`` input embedding.
    """
    _check_virtual_tokens(num_virtual_tokens)
    if init_text is not None:
        if init_token_ids is not None:
            raise ValueError("give init_text or init_token_ids, not both")
        if tokenizer is None:
            raise ValueError("init_text needs tokenizer=... to turn the text into token ids")
        init_token_ids = tokenizer(init_text, add_special_tokens=False)["input_ids"]
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(embeddings, nn.Embedding):
        raise TypeError(f"{type(model).__name__} has no nn.Embedding input embedding (get_input_embeddings())")
    model.add_module(PROMPT_MODULE, PromptEmbedding(num_virtual_tokens, embeddings, init_token_ids))
    peft_state(model).virtual_token_hook = model.register_forward_pre_hook(_prompt_hook, with_kwargs=True)
    return dict(num_virtual_tokens=num_virtual_tokens, init_text=init_text)
