"""The preference-optimisation methods, as typed options (``fastft.train.config.Option``):
``method=DPO(beta=0.1)`` from Python, ``method="dpo"`` for the defaults, ``method: {name:
ipo, beta: 0.5}`` in YAML, ``method.beta=0.5`` on the command line.

    offline, on preference pairs (fastft.alignment.objectives.PreferenceObjective)
      DPO(beta=0.1, label_smoothing=0.0)   sigmoid loss on log-ratios to the reference
      IPO(beta=0.1)                        squared loss, per-token averages
      SimPO(beta=2.0, gamma=1.0)           no reference, length-normalised, target margin γ
      ORPO(beta=0.1)                       no reference: chosen NLL + β · odds-ratio term
    online, on completions sampled from the policy (fastft.alignment.online)
      RLOO(k=4, beta=0.05, ...)            leave-one-out baseline, KL folded into the reward
      GRPO(k=4, beta=0.04, ...)            group-normalised advantages, k3 KL in the loss

Options are checked when the object is built, so a bad value (``beta <= 0``, ``k < 2``)
fails before anything is loaded or written. The loss formulas are in
``fastft.alignment.losses``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fastft.alignment import losses
from fastft.train.config import Option

__all__ = ["DPO", "GRPO", "IPO", "ORPO", "RLOO", "Method", "OnlineMethod", "SimPO"]


class Method(Option):
    """A way of learning from preferences (a family of typed options)."""

    kind: ClassVar[str] = "method"
    online: ClassVar[bool] = False  # samples from the policy during training (RLOO, GRPO)
    needs_reference: ClassVar[bool] = True  # compares with a frozen reference policy
    length_normalized: ClassVar[bool] = False  # per-token average log-probs instead of sums
    chosen_nll: ClassVar[bool] = False  # adds the chosen responses' token NLL as a second term (ORPO)

    def _check_beta(self) -> None:
        beta = getattr(self, "beta")
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not beta > 0:
            raise ValueError(f"method {self.name!r}: beta must be > 0, got {beta!r}")

    def _check_label_smoothing(self) -> None:
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"method {self.name!r}: label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}")

    def pair_losses(self, policy_chosen, policy_rejected, ref_chosen=None, ref_rejected=None):
        """Per-pair losses ``(B,)`` and the implicit chosen / rejected rewards ``(B,)``."""
        raise NotImplementedError


@dataclass
class DPO(Method):
    """Direct preference optimisation (sigmoid loss); ``label_smoothing`` ε > 0 is
    conservative DPO (the preference label is taken as flipped with probability ε)."""

    name: ClassVar[str] = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0

    def __post_init__(self):
        self._check_beta()
        self._check_label_smoothing()

    def pair_losses(self, policy_chosen, policy_rejected, ref_chosen=None, ref_rejected=None):
        return losses.dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=self.beta,
                               label_smoothing=self.label_smoothing)


@dataclass
class IPO(Method):
    """Identity preference optimisation: regresses the log-ratio gap to 1/(2β)."""

    name: ClassVar[str] = "ipo"
    length_normalized: ClassVar[bool] = True
    beta: float = 0.1

    def __post_init__(self):
        self._check_beta()

    def pair_losses(self, policy_chosen, policy_rejected, ref_chosen=None, ref_rejected=None):
        return losses.ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=self.beta)


@dataclass
class SimPO(Method):
    """Simple preference optimisation: no reference, length-normalised rewards β·avg log π
    and a target margin ``gamma``."""

    name: ClassVar[str] = "simpo"
    needs_reference: ClassVar[bool] = False
    length_normalized: ClassVar[bool] = True
    beta: float = 2.0
    gamma: float = 1.0
    label_smoothing: float = 0.0

    def __post_init__(self):
        self._check_beta()
        self._check_label_smoothing()

    def pair_losses(self, policy_chosen, policy_rejected, ref_chosen=None, ref_rejected=None):
        return losses.simpo_loss(policy_chosen, policy_rejected, beta=self.beta, gamma=self.gamma,
                                 label_smoothing=self.label_smoothing)


@dataclass
class ORPO(Method):
    """Odds-ratio preference optimisation: supervised loss on the chosen responses plus
    β times the odds-ratio term; no reference."""

    name: ClassVar[str] = "orpo"
    needs_reference: ClassVar[bool] = False
    length_normalized: ClassVar[bool] = True
    chosen_nll: ClassVar[bool] = True
    beta: float = 0.1

    def __post_init__(self):
        self._check_beta()

    def pair_losses(self, policy_chosen, policy_rejected, ref_chosen=None, ref_rejected=None):
        return losses.orpo_loss(policy_chosen, policy_rejected, beta=self.beta)


@dataclass
class OnlineMethod(Method):
    """Shared options of the online methods.

    k: completions sampled per prompt (a group; >= 2: the baseline comes from the others).
    beta: KL coefficient towards the reference (>= 0; 0: no penalty).
    clip: ε of the clipped ratio π/π_old (matters when ``updates_per_rollout`` > 1).
    temperature, top_p, max_new_tokens: sampling (``generate``).
    updates_per_rollout: optimizer steps on each batch of samples.
    """

    online: ClassVar[bool] = True
    kl_in_reward: ClassVar[bool] = False  # RLOO: the KL penalty shapes the reward; GRPO: a loss term
    k: int = 4
    beta: float = 0.05
    clip: float = 0.2
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    updates_per_rollout: int = 1

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 2:
            raise ValueError(f"method {self.name!r}: k (completions per prompt) must be an integer >= 2, got {self.k!r}")
        if not isinstance(self.beta, (int, float)) or not self.beta >= 0:
            raise ValueError(f"method {self.name!r}: beta (KL coefficient) must be >= 0, got {self.beta!r}")
        if not self.clip > 0:
            raise ValueError(f"method {self.name!r}: clip must be > 0, got {self.clip!r}")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"method {self.name!r}: need temperature > 0 and 0 < top_p <= 1, got "
                             f"{self.temperature!r}, {self.top_p!r}")
        if self.max_new_tokens < 1 or self.updates_per_rollout < 1:
            raise ValueError(f"method {self.name!r}: max_new_tokens and updates_per_rollout must be >= 1")

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """``(prompts, k)`` rewards (RLOO: already KL-shaped) -> advantages."""
        raise NotImplementedError


@dataclass
class RLOO(OnlineMethod):
    """REINFORCE leave-one-out: reward minus β·(log π - log ref) of the whole completion,
    baseline the mean of the group's other k - 1 shaped rewards."""

    name: ClassVar[str] = "rloo"
    kl_in_reward: ClassVar[bool] = True

    def advantages(self, rewards):
        return losses.rloo_advantages(rewards)


@dataclass
class GRPO(OnlineMethod):
    """Group relative policy optimisation: rewards normalised within each group, a
    per-token k3 KL penalty β·KL(π ‖ ref) in the loss."""

    name: ClassVar[str] = "grpo"
    beta: float = 0.04

    def advantages(self, rewards):
        return losses.grpo_advantages(rewards)
