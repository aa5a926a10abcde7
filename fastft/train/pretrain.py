"""``fastft.pretrain``: masked-LM / causal-LM (/ NSP) pretraining on raw text, in one call."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Mapping

import torch

from fastft.data.pipeline import is_tokenized, prepare_lm_data
from fastft.data.loading import load_documents
from fastft.train.config import OBJECTIVES, TrainConfig, apply_overrides, config_from_dict, load_config, resolve_kwarg_overrides
from fastft.train.loop import TrainState, seed_everything, train

__all__ = ["build_model", "load_tokenizer", "pretrain", "resolve_config"]


def resolve_config(config: TrainConfig | Mapping | str | None, overrides: Mapping[str, Any]) -> TrainConfig:
    """A ``TrainConfig`` from a config object, a mapping, a YAML path or None, plus keyword
    overrides (``lr=...``, ``optim__lr=...``, ``data={"block_size": 64}``)."""
    if config is None:
        config = TrainConfig()
    elif isinstance(config, str):
        config = load_config(config)
    elif isinstance(config, Mapping):
        config = config_from_dict(TrainConfig, config)
    elif not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, a mapping, a YAML path or None, got {type(config).__name__}")
    if overrides:
        config = apply_overrides(config, resolve_kwarg_overrides(config, overrides))
    return config


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path)


def build_model(model_config, objective: str) -> torch.nn.Module:
    """A Hugging Face model for ``objective`` from ``ModelConfig``: pretrained weights
    (continued pretraining) or, with ``from_scratch``, random weights from its config
    (``config_overrides`` applied, e.g. fewer layers)."""
    import transformers

    if not model_config.name_or_path:
        raise ValueError("model.name_or_path is required to build a model")
    auto = {
        "mlm": transformers.AutoModelForMaskedLM,
        "clm": transformers.AutoModelForCausalLM,
        "mlm+nsp": transformers.AutoModelForPreTraining,
    }[objective]
    if model_config.from_scratch:
        hf_config = transformers.AutoConfig.from_pretrained(model_config.name_or_path, **model_config.config_overrides)
        return auto.from_config(hf_config)
    return auto.from_pretrained(model_config.name_or_path, **model_config.config_overrides)


def _split_data(data, config: TrainConfig):
    """(train source, validation source | None) from ``data`` and the config."""
    validation = config.data.validation
    if isinstance(data, Mapping) and not hasattr(data, "column_names"):
        train_source = data.get("train")
        validation = data.get("validation", data.get("test", validation))
    else:
        train_source = data if data is not None else config.data.train
    if train_source is None:
        raise ValueError("data: no training data (pass data=... or set data.train)")
    if validation is None and config.data.validation_fraction > 0 and not is_tokenized(train_source):
        documents = load_documents(
            train_source, text_column=config.data.text_column, txt_mode=config.data.txt_mode, split=config.data.split
        )
        parts = documents.train_test_split(test_size=config.data.validation_fraction, seed=config.seed)
        train_source, validation = parts["train"], parts["test"]
    return train_source, validation


def pretrain(
    model: torch.nn.Module | str | None,
    tokenizer,
    data: Any = None,
    objective: str | None = None,
    config: TrainConfig | Mapping | str | None = None,
    *,
    callbacks=(),
    param_groups=None,
    extra_losses=(),
    **overrides,
) -> TrainState:
    """Pretrain (from scratch) or continue pretraining a Hugging Face language model.

    Args:
        model: a ``transformers`` model (``BertForMaskedLM``, ``RobertaForMaskedLM``,
            ``GPT2LMHeadModel``, ``LlamaForCausalLM``, ``BertForPreTraining`` for
            ``"mlm+nsp"``...), or a name/path (then ``config.model`` says whether from
            scratch), or None to build it from ``config.model``.
        tokenizer: the model's tokenizer, or a name/path (None: ``config.model``).
        data: text for ``fastft.data.load_documents`` (path(s), glob, Hub name, list of
            texts, ``datasets.Dataset``), a tokenised dataset, or ``{"train": ...,
            "validation": ...}``; None: ``config.data.train`` / ``validation``.
        objective: ``"mlm"``, ``"clm"`` or ``"mlm+nsp"``; None: ``config.objective``
            (default ``"mlm"``).
        config: ``TrainConfig``, a mapping, a YAML path, or None (defaults).
        **overrides: config fields (``max_steps=100``, ``lr=3e-4``, ``optim__lr=3e-4``,
            ``fused=False`` to skip ``fastft.patch``).

    Returns: the final ``TrainState`` (``.model``, ``.last_eval``, ``.export_path`` ...).

    Raises:
        ValueError: unknown objective, missing data, or ``"mlm+nsp"`` with a model without
            a next-sentence head.
        KeyError: unknown override names (listing the valid ones).
    """
    overrides = dict(overrides)
    explicit_objective = objective
    config = resolve_config(config, overrides)
    if explicit_objective is not None:
        config = dataclasses.replace(config, objective=explicit_objective)
    if config.objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {config.objective!r}")
    seed_everything(config.seed)  # model initialisation from scratch is part of the run

    if tokenizer is None or isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer or config.model.tokenizer or config.model.name_or_path)
    if model is None or isinstance(model, str):
        model_config = config.model if model is None else dataclasses.replace(config.model, name_or_path=model)
        model = build_model(model_config, config.objective)
    if config.objective == "mlm+nsp" and "next_sentence_label" not in inspect.signature(model.forward).parameters:
        raise ValueError(
            f"objective 'mlm+nsp' needs a model with a next-sentence head (e.g. BertForPreTraining), got {type(model).__name__}"
        )

    d = config.data
    data_options = dict(
        block_size=d.block_size,
        packing=d.packing,
        text_column=d.text_column,
        txt_mode=d.txt_mode,
        split=d.split,
        num_proc=d.num_proc,
        mlm_probability=d.mlm_probability,
        mask_replace_prob=d.mask_replace_prob,
        random_replace_prob=d.random_replace_prob,
        whole_word_mask=d.whole_word_mask,
        nsp_probability=d.nsp_probability,
        reset_position_ids=d.reset_position_ids,
    )
    train_source, validation_source = _split_data(data, config)
    train_data, collator = prepare_lm_data(train_source, tokenizer, config.objective, seed=config.seed, **data_options)
    eval_data = None
    if validation_source is not None:
        eval_data, _ = prepare_lm_data(validation_source, tokenizer, config.objective, seed=config.seed + 1, **data_options)
    return train(
        model,
        config.objective,
        train_data,
        collator=collator,
        config=config,
        eval_data=eval_data,
        tokenizer=tokenizer,
        param_groups=param_groups,
        callbacks=callbacks,
        extra_losses=extra_losses,
    )
