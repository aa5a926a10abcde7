"""The tiny Hugging Face model configs of the tests, in one place.

One builder per family, all with the same argument names (the BERT ones: ``hidden_size``,
``num_hidden_layers`` ...; GPT-2's ``n_embd`` / ``n_layer`` / ``n_head`` / ``n_positions``
are filled from them) and one ``dropout`` for every dropout probability of the family.
``**extra`` goes to the config unchanged (``num_labels``, ``pad_token_id``,
``initializer_range``, ``attn_implementation`` ...).

Tests pass their sizes and dropout explicitly wherever they differ from these defaults:
several assert learned accuracies that hold for their exact model (the sizes decide how
many random numbers the initialisation draws, so even ``max_position_embeddings`` changes
every weight after the position embeddings). Note the defaults here are not the families'
own: ``BertConfig`` alone has dropout 0.1 and 512 positions.
"""

from __future__ import annotations

import transformers

__all__ = [
    "bert_config",
    "distilbert_config",
    "electra_config",
    "gemma2_config",
    "gpt2_config",
    "llama_config",
    "mistral_config",
    "roberta_config",
]


def _encoder_config(config_class, vocab_size, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size,
                    max_position_embeddings, dropout, extra):
    return config_class(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout, **extra,
    )


def bert_config(vocab_size: int, hidden_size: int = 32, num_hidden_layers: int = 2, num_attention_heads: int = 2,
                intermediate_size: int = 64, max_position_embeddings: int = 64, dropout: float = 0.0,
                **extra) -> transformers.BertConfig:
    """``BertConfig``; ``dropout`` sets ``hidden_dropout_prob`` and ``attention_probs_dropout_prob``."""
    return _encoder_config(transformers.BertConfig, vocab_size, hidden_size, num_hidden_layers, num_attention_heads,
                           intermediate_size, max_position_embeddings, dropout, extra)


def roberta_config(vocab_size: int, hidden_size: int = 32, num_hidden_layers: int = 2, num_attention_heads: int = 2,
                   intermediate_size: int = 64, max_position_embeddings: int = 64, dropout: float = 0.0,
                   **extra) -> transformers.RobertaConfig:
    """``RobertaConfig`` (positions start after the padding index: a model reading L tokens
    needs ``max_position_embeddings >= L + 2``)."""
    return _encoder_config(transformers.RobertaConfig, vocab_size, hidden_size, num_hidden_layers, num_attention_heads,
                           intermediate_size, max_position_embeddings, dropout, extra)


def electra_config(vocab_size: int, hidden_size: int = 32, num_hidden_layers: int = 2, num_attention_heads: int = 2,
                   intermediate_size: int = 64, max_position_embeddings: int = 64, dropout: float = 0.0,
                   **extra) -> transformers.ElectraConfig:
    """``ElectraConfig`` (its ``embedding_size`` stays at the family's default unless given)."""
    return _encoder_config(transformers.ElectraConfig, vocab_size, hidden_size, num_hidden_layers, num_attention_heads,
                           intermediate_size, max_position_embeddings, dropout, extra)


def gpt2_config(vocab_size: int, hidden_size: int = 32, num_hidden_layers: int = 2, num_attention_heads: int = 2,
                max_position_embeddings: int = 64, dropout: float = 0.0, **extra) -> transformers.GPT2Config:
    """``GPT2Config`` (``n_embd``, ``n_layer``, ``n_head``, ``n_positions``; the MLP is 4x
    wide); ``dropout`` sets ``resid_pdrop``, ``embd_pdrop`` and ``attn_pdrop``."""
    return transformers.GPT2Config(
        vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_hidden_layers, n_head=num_attention_heads,
        n_positions=max_position_embeddings, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, **extra,
    )


def _decoder_config(config_class, vocab_size, hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
                    intermediate_size, max_position_embeddings, dropout, extra):
    return config_class(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
        attention_dropout=dropout, **extra,
    )


def llama_config(vocab_size: int, hidden_size: int = 32, num_hidden_layers: int = 2, num_attention_heads: int = 2,
                 num_key_value_heads: int | None = None, intermediate_size: int = 64, max_position_embeddings: int = 64,
                 dropout: float = 0.0, **extra) -> transformers.LlamaConfig:
    """``LlamaConfig``; ``num_key_value_heads`` < ``num_attention_heads`` is grouped-query
    attention (None: as many as the query heads); ``dropout`` is ``attention_dropout``."""
    return _decoder_config(transformers.LlamaConfig, vocab_size, hidden_size, num_hidden_layers, num_attention_heads,
                           num_key_value_heads, intermediate_size, max_position_embeddings, dropout, extra)


def mistral_config(vocab_size: int, hidden_size: int = 32, num_hidden_layers: int = 2, num_attention_heads: int = 2,
                   num_key_value_heads: int | None = None, intermediate_size: int = 64, max_position_embeddings: int = 64,
                   dropout: float = 0.0, **extra) -> transformers.MistralConfig:
    """``MistralConfig`` (Llama's arguments; ``sliding_window=`` through ``extra``)."""
    if num_key_value_heads is None:
        num_key_value_heads = num_attention_heads  # MistralConfig's own default is 8, whatever the query heads
    return _decoder_config(transformers.MistralConfig, vocab_size, hidden_size, num_hidden_layers, num_attention_heads,
                           num_key_value_heads, intermediate_size, max_position_embeddings, dropout, extra)


def gemma2_config(vocab_size: int, hidden_size: int = 32, num_hidden_layers: int = 2, num_attention_heads: int = 2,
                  num_key_value_heads: int | None = None, intermediate_size: int = 64, max_position_embeddings: int = 64,
                  dropout: float = 0.0, **extra) -> transformers.Gemma2Config:
    """``Gemma2Config`` (Llama's arguments; ``head_dim`` defaults to ``hidden_size //
    num_attention_heads`` and ``query_pre_attn_scalar`` to that head_dim, where the family's
    own defaults are 256; ``sliding_window=``, ``attn_logit_softcapping=`` and
    ``layer_types=`` through ``extra``)."""
    if num_key_value_heads is None:
        num_key_value_heads = num_attention_heads
    extra.setdefault("head_dim", hidden_size // num_attention_heads)
    extra.setdefault("query_pre_attn_scalar", extra["head_dim"])
    return _decoder_config(transformers.Gemma2Config, vocab_size, hidden_size, num_hidden_layers, num_attention_heads,
                           num_key_value_heads, intermediate_size, max_position_embeddings, dropout, extra)


def distilbert_config(vocab_size: int, hidden_size: int = 32, num_hidden_layers: int = 2, num_attention_heads: int = 2,
                      intermediate_size: int = 64, max_position_embeddings: int = 64, dropout: float = 0.0,
                      **extra) -> transformers.DistilBertConfig:
    """``DistilBertConfig`` (``dim``, ``n_layers``, ``n_heads``, ``hidden_dim``); ``dropout``
    sets ``dropout`` and ``attention_dropout``."""
    return transformers.DistilBertConfig(
        vocab_size=vocab_size, dim=hidden_size, n_layers=num_hidden_layers, n_heads=num_attention_heads,
        hidden_dim=intermediate_size, max_position_embeddings=max_position_embeddings, dropout=dropout,
        attention_dropout=dropout, **extra,
    )
