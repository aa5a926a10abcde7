"""Instruction supervised fine-tuning of a causal LM: loss on the response tokens only."""

from __future__ import annotations

import warnings

import torch

from fastft.data.collators import IGNORE_INDEX
from fastft.finetuning.metrics import bleu
from fastft.finetuning.tasks.base import Task
from fastft.train.objectives import Objective, model_inputs

__all__ = ["ResponseLMObjective", "SFTTask"]


class ResponseLMObjective(Objective):
    """Instruction SFT: causal-LM loss on response tokens only (prompt labels are -100).

    The model shifts (logits at t score labels[t + 1]), so the counted tokens are
    ``labels[:, 1:] != -100``; the loss goes through the model's own ``labels=`` path
    (fastft.patch's fused loss when patched) and its mean is turned back into a sum."""

    name = "sft"
    perplexity_term = "sft"

    def counts(self, batch):
        return {"sft": int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())}

    def loss(self, model, batch, counts):
        count = counts["sft"]
        out = model(**model_inputs(model, batch))
        mean = out.loss.to(torch.promote_types(out.loss.dtype, torch.float32))
        return {"sft": mean * count if count else mean.new_zeros(())}, out


class SFTTask(Task):
    """Instruction supervised fine-tuning of a causal LM on ``prompt`` / ``response`` pairs.

    A feature is ``[bos] prompt response [eos]`` with labels -100 on ``[bos] prompt``: the
    loss (and the reported perplexity) covers response tokens only, so the model learns to
    answer rather than to reproduce prompts. BLEU of greedy generations against the
    reference responses comes from ``evaluate_sets(..., generate=True)``."""

    name = "sft"
    auto_class = "AutoModelForCausalLM"
    required_columns = ("prompt", "response")
    primary_metric = "loss"
    higher_is_better = ("bleu",)
    head_modules = ()
    pretraining_objective = "clm"

    def option_names(self):
        return ("max_new_tokens",)

    def check_model(self, model):
        head = type(model).__name__
        if not head.endswith(("ForCausalLM", "LMHeadModel")):
            raise ValueError(f"task 'sft' needs a causal language model (AutoModelForCausalLM); got {head}")

    def _prompt_ids(self, tokenizer, prompt):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        bos = tokenizer.bos_token_id
        return ([bos] if bos is not None else []) + ids

    def preprocess(self, rows, tokenizer, *, training):
        eos = tokenizer.eos_token_id
        if eos is None and training:
            warnings.warn(
                "sft: the tokenizer has no end-of-sequence token, so responses end with no stop marker and the model "
                "never learns to stop (generation runs to max_new_tokens); give the tokenizer an eos_token "
                "(and the model an embedding for it) before fine-tuning", stacklevel=2)
        features = []
        for i, row in enumerate(rows):
            prompt = self._prompt_ids(tokenizer, row["prompt"])
            if len(prompt) >= self.max_length:
                raise ValueError(f"sft: row {i}'s prompt has {len(prompt)} tokens, max_length is {self.max_length}")
            response = tokenizer(row["response"], add_special_tokens=False)["input_ids"] if row.get("response") is not None else []
            response = (response + ([eos] if eos is not None else []))[: self.max_length - len(prompt)]
            ids = prompt + response
            features.append({
                "input_ids": ids,
                "attention_mask": [1] * len(ids),
                "labels": [IGNORE_INDEX] * len(prompt) + response,
            })
        return features

    def objective(self):
        return ResponseLMObjective()

    @torch.no_grad()
    def predict(self, model, tokenizer, rows, *, batch_size=16, max_new_tokens=None):
        """Greedy continuations of each ``prompt`` (one at a time: no padding subtleties)."""
        max_new_tokens = max_new_tokens or self.options.get("max_new_tokens", 32)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        outputs = []
        try:
            for row in rows:
                prompt = torch.tensor([self._prompt_ids(tokenizer, row["prompt"])], device=device)  # (1, P)
                generated = model.generate(
                    input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                    do_sample=False, pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
                new_tokens = generated[0, prompt.shape[1]:].tolist()
                outputs.append(tokenizer.decode(new_tokens, skip_special_tokens=True).strip())
        finally:
            model.train(was_training)
        return outputs

    def generation_metrics(self, model, tokenizer, rows) -> dict[str, float]:
        hypotheses = self.predict(model, tokenizer, rows)
        references = [tokenizer.decode(tokenizer(r["response"], add_special_tokens=False)["input_ids"],
                                       skip_special_tokens=True).strip() for r in rows]
        return {"bleu": bleu(hypotheses, references)}
