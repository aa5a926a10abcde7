"""``fastft.pretrain`` / ``fastft pretrain``: masked-LM / causal-LM (/ NSP) pretraining on raw
text, in one call. Reads top to bottom: the config, the model, the data, the loop.

    fastft.pretrain(model, tokenizer, "corpus/*.txt", objective="mlm", max_steps=1000, lr=5e-4)
    fastft pretrain --config run.yaml model.name_or_path=bert-base-uncased data.train=corpus.txt
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from fastft.data.loading import load_documents
from fastft.errors import loading
from fastft.models.loading import load_pretrained, new_head_weights
from fastft.data.pipeline import is_tokenized, prepare_lm_data
from fastft.train.config import DataConfig, ModelConfig, TrainConfig, load_config, resolve_config
from fastft.train.loop import TrainState, train
from fastft.train.objectives import OBJECTIVES
from fastft.train.output_dir import check_output_dir
from fastft.train.runtime import cpu_speedups, seed_everything

__all__ = ["PretrainConfig", "build_model", "load_tokenizer", "main", "pretrain"]


@dataclass
class PretrainConfig(TrainConfig):
    """The loop's settings plus what pretraining adds: the objective, the text, the model."""

    objective: str = "mlm"  # "mlm" | "clm" | "mlm+nsp"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self):
        super().__post_init__()
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {self.objective!r}")


def pretrain(
    model: torch.nn.Module | str | None,
    tokenizer,
    data: Any = None,
    objective: str | None = None,
    config: PretrainConfig | Mapping | str | None = None,
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
        config: ``PretrainConfig``, a mapping, a YAML path, or None (defaults).
        **overrides: config fields (``max_steps=100``, ``lr=3e-4``, ``optim__lr=3e-4``,
            ``fused=False`` to skip ``fastft.patch``).

    Returns: the final ``TrainState`` (``.model``, ``.last_eval``, ``.export_path`` ...).

    Raises:
        ValueError: unknown objective, missing data, or ``"mlm+nsp"`` with a model without
            a next-sentence head.
        KeyError: unknown override names (listing the valid ones).
    """
    if objective is not None:
        overrides["objective"] = objective
    config = resolve_config(config, overrides, PretrainConfig)
    check_output_dir(config.output_dir, resume=config.resume, overwrite=config.overwrite)  # before any work
    seed_everything(config.seed)  # model initialisation from scratch is part of the run

    # --- tokenizer (the model's name recorded in run_config.json) ----------------------
    if isinstance(model, str):
        config.model.name_or_path = model
    elif model is not None:  # recorded in run_config.json: where the weights came from
        config.model.name_or_path = config.model.name_or_path or getattr(model.config, "_name_or_path", None) or None
    if tokenizer is None or isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer or config.model.tokenizer or config.model.name_or_path)

    # --- data: documents -> tokens -> packed blocks, and the objective's collator -------
    train_source, validation_source = _split_data(data, config)
    if data is not None:  # for run_config.json: paths as given, Python data by a description
        config.data.train = data if isinstance(data, str) else f"<{type(data).__name__} given from Python>"
    options = config.data.lm_options()
    train_data, collator = prepare_lm_data(train_source, tokenizer, config.objective, seed=config.seed, **options)
    eval_data = None
    if validation_source is not None:
        eval_data, _ = prepare_lm_data(validation_source, tokenizer, config.objective, seed=config.seed + 1, **options)

    # --- the model (after the data: a bad file is reported before any weights load) ---
    if model is None or isinstance(model, str):
        model = build_model(config.model, config.objective)
    if config.objective == "mlm+nsp" and "next_sentence_label" not in inspect.signature(model.forward).parameters:
        raise ValueError(
            f"objective 'mlm+nsp' needs a model with a next-sentence head (e.g. BertForPreTraining), got {type(model).__name__}"
        )

    # --- train ------------------------------------------------------------------------
    with cpu_speedups(model, config):
        return train(model, config.objective, train_data, collator=collator, config=config, eval_data=eval_data,
                     tokenizer=tokenizer, param_groups=param_groups, callbacks=callbacks, extra_losses=extra_losses)


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    with loading("tokenizer", name_or_path):
        return AutoTokenizer.from_pretrained(name_or_path)


def build_model(model_config: ModelConfig, objective: str) -> torch.nn.Module:
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
        with loading("model", model_config.name_or_path):
            hf_config = transformers.AutoConfig.from_pretrained(model_config.name_or_path, **model_config.config_overrides)
        return auto.from_config(hf_config)
    model, missing = load_pretrained(auto, model_config.name_or_path, **model_config.config_overrides)
    fresh = new_head_weights(model, missing)
    if fresh:
        warnings.warn(f"{model_config.name_or_path} has no pretrained {objective} head ({', '.join(fresh[:3])} ... "
                      "initialised at random): continued pretraining trains it from scratch, so the first losses "
                      "and perplexities are those of a random head", stacklevel=2)
    return model


def _split_data(data, config: PretrainConfig):
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


# ------------------------------------------------------------------------ command line


def config_keys_text(config) -> str:
    """Every config key with its default, one per line (the ``--help`` epilog)."""
    lines = []

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value) and "parse" not in f.metadata:
                walk(value, f"{prefix}{f.name}.")
            else:
                lines.append(f"  {prefix}{f.name} = {value!r}")

    walk(config, "")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fastft pretrain",
        description="Pretrain a language model (masked-LM / causal-LM / +NSP) from a YAML config and key=value overrides.",
        epilog="keys (default values):\n" + config_keys_text(PretrainConfig()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file mapped onto fastft.recipes.pretrain.PretrainConfig")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optim.lr=3e-4 data.block_size=64")
    args = parser.parse_args(argv)

    config = load_config(args.config, args.overrides, cls=PretrainConfig)
    if not config.model.name_or_path:
        raise ValueError("model.name_or_path is required (in the YAML or as an override)")
    if config.data.train is None:
        raise ValueError("data.train is required (in the YAML or as an override)")
    state = pretrain(None, None, None, config=config)
    summary = {
        "step": state.step,
        "tokens_seen": state.tokens_seen,
        "train": state.last_train,
        "eval": state.last_eval,
        "checkpoint": state.checkpoint_path,
        "export": state.export_path,
    }
    if state.parallel is None or state.parallel.is_main:  # one summary, not one per rank
        print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
