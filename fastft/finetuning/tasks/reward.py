"""Reward model: a sequence-scoring head trained on preference pairs (Bradley-Terry).

A reward model reads ``prompt + response`` and returns one number; trained so that the
chosen response of each pair scores higher than the rejected one,

    loss = -log σ(r(prompt, chosen) - r(prompt, rejected) - margin)

(Bradley & Terry 1952; ``margin``: an optional per-row column, how strongly the chosen
response is preferred, as in Llama 2). The model is a ``*ForSequenceClassification`` with
one output; decoder-only models (GPT-2, Llama ...) read the score at the last non-padding
token, which needs ``config.pad_token_id`` (set from the tokenizer when the model is built
by name). Pairs are tokenised as preference tuning does (``fastft.alignment.data``:
``[bos] prompt`` + ``response [eos]``, prompt end and response start kept on truncation,
dropped pairs reported) and both responses of a batch go through the model in one pass.

Evaluation reports the pairwise accuracy on held-out pairs (``reward_accuracy``; ties count
one half) and the mean margin; ``fastft.predict(bundle, texts)`` returns the scores of
texts (or of ``{"prompt", "response"}`` rows).
"""

from __future__ import annotations

import torch

from fastft.alignment.data import PairCollator, prompt_ids, response_ids, tokenize_pairs, truncate
from fastft.alignment.losses import bradley_terry_loss
from fastft.alignment.metrics import PreferenceMetrics
from fastft.data.collators import pad_id_of, pad_rows
from fastft.finetuning.tasks.base import Task
from fastft.train.objectives import Objective, model_inputs

__all__ = ["BradleyTerryObjective", "RewardTask"]


class BradleyTerryObjective(Objective):
    """Scores the 2B sequences of a ``PairCollator`` batch (chosen rows, then rejected) in
    one forward pass; term ``bt`` per pair. Outputs ``chosen_rewards`` / ``rejected_rewards``."""

    name = "bt"

    def counts(self, batch):
        return {"bt": batch["input_ids"].shape[0] // 2}

    def loss(self, model, batch, counts):
        out = model(**model_inputs(model, batch, exclude=("labels",)))
        scores = out.logits.float().reshape(-1)  # (2B,)
        pairs = scores.shape[0] // 2
        chosen, rejected = scores[:pairs], scores[pairs:]
        losses = bradley_terry_loss(chosen, rejected, batch.get("margin"))
        return {"bt": losses.sum()}, {"chosen_rewards": chosen.detach(), "rejected_rewards": rejected.detach()}


class RewardTask(Task):
    """Reward model on ``prompt`` / ``chosen`` / ``rejected`` (+ optional ``margin``) rows.

    Options: ``max_length`` (prompt + response tokens), ``max_prompt_length`` (the prompt's
    share when a pair does not fit; default half)."""

    name = "reward"
    auto_class = "AutoModelForSequenceClassification"
    required_columns = ("prompt", "chosen", "rejected")
    primary_metric = "reward_accuracy"
    higher_is_better = ("reward_accuracy", "reward_margin")
    head_modules = ("score", "classifier")
    pretraining_objective = "clm"

    def option_names(self):
        return ("max_prompt_length",)

    def model_kwargs(self):
        return {"num_labels": 1}

    def build_model(self, name_or_path: str):
        import transformers

        model = super().build_model(name_or_path)
        if model.config.pad_token_id is None:  # decoder scoring heads find the last token by it
            model.config.pad_token_id = pad_id_of(transformers.AutoTokenizer.from_pretrained(name_or_path))
        return model

    def check_model(self, model):
        name = type(model).__name__
        if not name.endswith("ForSequenceClassification"):
            raise ValueError(f"task 'reward' needs a sequence-scoring model (AutoModelForSequenceClassification with "
                             f"num_labels=1); got {name}")
        if model.config.num_labels != 1:
            raise ValueError(f"task 'reward' needs one output (num_labels=1); {name} has {model.config.num_labels}")
        decoder = not getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "score")
        if decoder and model.config.pad_token_id is None:
            raise ValueError(f"task 'reward': {name} finds each sequence's last token by config.pad_token_id, which is "
                             "None: set model.config.pad_token_id = tokenizer.pad_token_id (or eos_token_id)")

    def preprocess(self, rows, tokenizer, *, training):
        prepared = tokenize_pairs(rows, tokenizer, max_length=self.max_length,
                                  max_prompt_length=self.options.get("max_prompt_length"),
                                  set_name="train" if training else "evaluation")
        self.last_report = prepared.report
        return prepared.features

    def collator(self, tokenizer):
        return PairCollator(tokenizer)

    def objective(self):
        return BradleyTerryObjective()

    def metric_fns(self, rows, features, tokenizer):
        return [PreferenceMetrics()]

    def _text_ids(self, tokenizer, row) -> list[int]:
        if "text" in row:
            ids = prompt_ids(tokenizer, row["text"])  # [bos] text
            eos = tokenizer.eos_token_id
            return (ids + ([eos] if eos is not None else []))[: self.max_length]
        prompt, (response,), _ = truncate(prompt_ids(tokenizer, row["prompt"]),
                                          [response_ids(tokenizer, row["prompt"], row["response"])],
                                          max_length=self.max_length,
                                          max_prompt_length=self.options.get("max_prompt_length") or self.max_length // 2)
        return prompt + response

    @torch.no_grad()
    def predict(self, model, tokenizer, rows, *, batch_size=16):
        """The reward of each row: a ``text``, or a ``prompt`` and its ``response``."""
        device = next(model.parameters()).device
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else pad_id_of(tokenizer)
        scores = []
        for start in range(0, len(rows), batch_size):
            ids = [self._text_ids(tokenizer, row) for row in rows[start : start + batch_size]]
            length = max(map(len, ids))
            batch = {"input_ids": pad_rows(ids, length, pad).to(device),
                     "attention_mask": pad_rows([[1] * len(i) for i in ids], length, 0).to(device)}
            scores += model(**batch).logits.float().reshape(-1).tolist()
        return scores
