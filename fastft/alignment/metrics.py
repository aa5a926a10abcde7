"""What alignment reports on held-out data.

- ``PreferenceMetrics`` (an ``evaluate(..., metric_fns=...)`` accumulator): reward accuracy
  (the share of pairs whose chosen response gets the higher reward; a tie counts one half,
  so a model that cannot tell them apart scores 0.5), the mean reward margin, the mean
  chosen / rejected rewards and log-probs. "Reward" is the method's implicit reward
  (DPO: β·(log π - log ref)) or a reward model's score.
- ``ReferenceKL``: KL(ref ‖ π) on held-out prompts, estimated on completions sampled once
  from the starting policy (the reference) and cached with their reference log-probs:
  ``mean(log ref(y) - log π(y))``. No reference model has to stay in memory, so it works
  with the cached reference too. A ``Callback``: after each evaluation it logs
  ``eval_kl_ref`` and adds ``kl_ref`` to the metrics the later callbacks see.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fastft.alignment.logprobs import evaluation_mode, sequence_logprobs
from fastft.alignment.sampling import sample_completions
from fastft.train.callbacks import Callback

__all__ = ["PreferenceMetrics", "ReferenceKL"]


class PreferenceMetrics:
    """Accumulates the ``chosen_rewards`` / ``rejected_rewards`` (and ``chosen_logps`` /
    ``rejected_logps``, when present) of each batch's outputs."""

    def __init__(self):
        self._parts: dict[str, list[torch.Tensor]] = {}

    def update(self, batch, outputs) -> None:
        for key in ("chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps"):
            if key in outputs:
                self._parts.setdefault(key, []).append(outputs[key].detach().float().cpu())

    def compute(self) -> dict[str, float]:
        parts, self._parts = {k: torch.cat(v) for k, v in self._parts.items()}, {}
        if "chosen_rewards" not in parts:
            return {}
        chosen, rejected = parts["chosen_rewards"], parts["rejected_rewards"]
        wins = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
        metrics = {"reward_accuracy": float(wins.mean()), "reward_margin": float((chosen - rejected).mean()),
                   "chosen_reward": float(chosen.mean()), "rejected_reward": float(rejected.mean())}
        for key in ("chosen_logps", "rejected_logps"):
            if key in parts:
                metrics[key] = float(parts[key].mean())
        return metrics


class ReferenceKL(Callback):
    """KL(ref ‖ π) on completions of held-out ``prompts`` (token ids) sampled from ``model``
    *now* (construct it before training: the model is then the reference)."""

    def __init__(self, model, tokenizer, prompts: Sequence[Sequence[int]], *, k: int = 2, max_new_tokens: int = 32,
                 temperature: float = 1.0, batch_size: int = 16):
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.history: list[dict] = []
        device = next(model.parameters()).device
        self.batches = []
        for start in range(0, len(prompts), batch_size):
            samples = sample_completions(model, tokenizer, prompts[start : start + batch_size], k=k,
                                         temperature=temperature, max_new_tokens=max_new_tokens)
            batch = samples.batch(tokenizer, device)
            with evaluation_mode(model):
                batch["ref_logps"] = sequence_logprobs(model, batch)[0]
            self.batches.append(batch)

    def measure(self, model) -> float:
        """Mean over the cached completions of ``log ref(y | x) - log π(y | x)``."""
        total, count = 0.0, 0
        with evaluation_mode(model):
            for batch in self.batches:
                total += float((batch["ref_logps"] - sequence_logprobs(model, batch)[0]).sum())
                count += batch["input_ids"].shape[0]
        return total / max(count, 1)

    def on_evaluate(self, state, metrics):
        kl = self.measure(state.model)
        metrics["kl_ref"] = kl  # for the callbacks after this one
        self.history.append({"step": state.step, "kl_ref": kl})
        if state.log is not None:
            state.log.write({"step": state.step, "epoch": state.epoch, "eval_kl_ref": kl})
