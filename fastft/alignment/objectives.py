"""What the training loop minimises when learning from preferences (``fastft.train``'s
``Objective`` interface: summed losses per term + the counts that normalise them).

``PreferenceObjective`` (offline: DPO, IPO, SimPO, ORPO) runs a ``PairCollator`` batch --
the B chosen sequences then the B rejected ones -- through the model **once**, takes each
sequence's log-probability from the fused path (``fastft.alignment.logprobs``), splits the
two halves and applies the method's pair loss. Terms: ``pref`` (per pair) and, for ORPO,
``nll`` (per chosen response token).

``PolicyGradientObjective`` (online: RLOO, GRPO) scores a batch of sampled completions
(``fastft.alignment.online``): the clipped policy-gradient loss per completion token, plus
GRPO's k3 KL penalty; term ``pg`` (per completion token).
"""

from __future__ import annotations

from fastft.alignment.logprobs import sequence_logprobs, token_logprobs
from fastft.alignment.losses import clipped_policy_loss, kl_k3
from fastft.alignment.methods import Method, OnlineMethod
from fastft.alignment.reference import Reference
from fastft.data.collators import IGNORE_INDEX
from fastft.train.objectives import Objective

__all__ = ["PolicyGradientObjective", "PreferenceObjective"]


class PreferenceObjective(Objective):
    """Offline preference optimisation with ``method`` against ``reference`` (unused by
    the reference-free SimPO / ORPO). Outputs per batch (for evaluation metrics):
    ``chosen_logps`` / ``rejected_logps`` (summed log-probs) and ``chosen_rewards`` /
    ``rejected_rewards`` (the method's implicit rewards), each ``(B,)``, detached."""

    name = "preference"

    def __init__(self, method: Method, reference: Reference | None = None):
        if method.online:
            raise ValueError(f"method {method.name!r} is online: it trains through fastft.alignment.online")
        if method.needs_reference and reference is None:
            raise ValueError(f"method {method.name!r} needs a reference")
        self.method, self.reference = method, reference

    def counts(self, batch):
        pairs = batch["input_ids"].shape[0] // 2
        counts = {"pref": pairs}
        if self.method.chosen_nll:
            counts["nll"] = int((batch["labels"][:pairs, 1:] != IGNORE_INDEX).sum())
        return counts

    def loss(self, model, batch, counts):
        logps, lengths = sequence_logprobs(model, batch)  # (2B,) each: chosen rows, then rejected rows
        pairs = logps.shape[0] // 2
        scale = lengths.clamp(min=1).to(logps.dtype) if self.method.length_normalized else 1.0
        policy = logps / scale
        reference = None
        if self.method.needs_reference:
            reference = self.reference.logps(model, batch).to(logps.dtype) / scale
        pair_losses, chosen_rewards, rejected_rewards = self.method.pair_losses(
            policy[:pairs], policy[pairs:], *((reference[:pairs], reference[pairs:]) if reference is not None else ()))
        sums = {"pref": pair_losses.sum()}
        if self.method.chosen_nll:
            sums["nll"] = -logps[:pairs].sum()
        outputs = {"chosen_logps": logps[:pairs].detach(), "rejected_logps": logps[pairs:].detach(),
                   "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards}
        return sums, outputs


class PolicyGradientObjective(Objective):
    """Online RL on a rollout batch with ``input_ids`` / ``attention_mask`` / ``labels``
    (completion tokens labelled), ``old_logps`` and ``ref_logps`` ``(N, T-1)`` (per token,
    from the sampling policy and the reference) and ``advantages`` ``(N,)``."""

    name = "policy_gradient"

    def __init__(self, method: OnlineMethod):
        self.method = method

    def counts(self, batch):
        return {"pg": int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())}

    def loss(self, model, batch, counts):
        logps = token_logprobs(model, batch["input_ids"], batch.get("attention_mask"), batch["labels"])  # (N, T-1)
        mask = (batch["labels"][:, 1:] != IGNORE_INDEX).to(logps.dtype)
        per_token = clipped_policy_loss(logps, batch["old_logps"], batch["advantages"], clip=self.method.clip)
        kl = kl_k3(logps, batch["ref_logps"])
        if not self.method.kl_in_reward and self.method.beta:
            per_token = per_token + self.method.beta * kl
        outputs = {"kl": (kl.detach() * mask).sum(-1)}  # (N,) per completion
        return {"pg": (per_token * mask).sum()}, outputs
