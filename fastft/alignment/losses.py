"""The losses of learning from preferences, on sequence log-probabilities (plain functions).

Offline, per pair (``c`` chosen, ``r`` rejected; ``π`` the policy, ``ref`` the reference,
log-probs summed over response tokens unless "avg": divided by the response's length):

    dpo    Rafailov et al. 2023        z = β[(log π_c - log ref_c) - (log π_r - log ref_r)]
                                       -(1-ε) log σ(z) - ε log σ(-z)   (ε: label smoothing,
                                       "conservative DPO", Mitchell 2023)
    ipo    Azar et al. 2023            (h - 1/(2β))²,  h the same log-ratio difference on
                                       per-token averages (as TRL computes it)
    simpo  Meng et al. 2024            z = β(avg log π_c - avg log π_r) - γ; no reference
    orpo   Hong et al. 2024            NLL of the chosen response + β·(-log σ(log odds_c -
                                       log odds_r)),  odds = p / (1 - p), p = exp(avg log π)
    bt     Bradley & Terry 1952        -log σ(r_c - r_r - m): a reward model's scores r, an
                                       optional margin m (Touvron et al. 2023, Llama 2)

Online (RLOO, Ahmadian et al. 2024; GRPO, Shao et al. 2024), per completion i of k
sampled for one prompt:

    rloo advantage   A_i = r_i - mean_{j≠i} r_j = k/(k-1) (r_i - mean_j r_j)
    grpo advantage   A_i = (r_i - mean_j r_j) / (std_j r_j + 1e-4)
    policy loss      per token t: -min(ρ_t A_i, clip(ρ_t, 1-ε, 1+ε) A_i),  ρ_t = π/π_old
    kl (k3)          per token: exp(ref - log π) - (ref - log π) - 1   (Schulman 2020: an
                     unbiased, non-negative estimate of KL(π ‖ ref) on samples of π)

The preference losses return per-pair losses plus the implicit rewards reported in
evaluation (chosen / rejected, detached).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "bradley_terry_loss",
    "clipped_policy_loss",
    "dpo_loss",
    "grpo_advantages",
    "ipo_loss",
    "kl_k3",
    "orpo_loss",
    "rloo_advantages",
    "simpo_loss",
]


def _smoothed_sigmoid_loss(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1-ε) log σ(z) - ε log σ(-z): binary cross-entropy against the label "chosen is
    better", flipped with probability ε."""
    loss = -F.logsigmoid(z)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-z)
    return loss


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float, label_smoothing: float = 0.0):
    """DPO (sigmoid) per pair. Inputs: ``(B,)`` summed log-probs. Returns ``(losses (B,),
    chosen_rewards (B,), rejected_rewards (B,))``; the rewards are β·(log π - log ref)."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    losses = _smoothed_sigmoid_loss(beta * (chosen_ratio - rejected_ratio), label_smoothing)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float):
    """IPO per pair on **per-token average** log-probs ``(B,)``: (h - 1/(2β))²."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    losses = (chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def simpo_loss(policy_chosen, policy_rejected, *, beta: float, gamma: float, label_smoothing: float = 0.0):
    """SimPO per pair on **per-token average** log-probs ``(B,)``; no reference model.
    Rewards: β·avg log π."""
    losses = _smoothed_sigmoid_loss(beta * (policy_chosen - policy_rejected) - gamma, label_smoothing)
    return losses, beta * policy_chosen.detach(), beta * policy_rejected.detach()


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, through expm1 (exact near 0, where 1 - e^x cancels)."""
    return torch.log(-torch.expm1(x.clamp(max=-1e-6)))


def orpo_loss(policy_chosen, policy_rejected, *, beta: float):
    """ORPO's odds-ratio term per pair, β·(-log σ(log odds_c - log odds_r)), on **per-token
    average** log-probs ``(B,)`` (the chosen response's NLL is added by the caller, as a
    token-level term). Rewards: β·avg log π."""
    log_odds = (policy_chosen - policy_rejected) - (_log1m_exp(policy_chosen) - _log1m_exp(policy_rejected))
    losses = -beta * F.logsigmoid(log_odds)
    return losses, beta * policy_chosen.detach(), beta * policy_rejected.detach()


def bradley_terry_loss(reward_chosen, reward_rejected, margin=None):
    """-log σ(r_c - r_r - m) per pair ``(B,)``; ``margin`` ``(B,)`` or None (0)."""
    difference = reward_chosen - reward_rejected
    if margin is not None:
        difference = difference - margin
    return -F.logsigmoid(difference)


# --------------------------------------------------------------------------- online


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Leave-one-out baseline per group: ``rewards`` ``(prompts, k)`` -> ``(prompts, k)``."""
    k = rewards.shape[-1]
    return k / (k - 1) * (rewards - rewards.mean(-1, keepdim=True))


def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Group-normalised rewards: ``(prompts, k)`` -> ``(prompts, k)`` (sample std, as TRL)."""
    return (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + eps)


def clipped_policy_loss(logps, old_logps, advantages, *, clip: float) -> torch.Tensor:
    """PPO's clipped surrogate per token. ``logps`` / ``old_logps`` ``(N, T)``, ``advantages``
    ``(N,)``; returns ``(N, T)`` (the caller masks and sums the completion tokens)."""
    ratio = torch.exp(logps - old_logps)
    advantages = advantages[:, None]
    return -torch.minimum(ratio * advantages, ratio.clamp(1.0 - clip, 1.0 + clip) * advantages)


def kl_k3(logps, ref_logps) -> torch.Tensor:
    """Per-token k3 estimate of KL(π ‖ ref) on tokens sampled from π: e^(ref-π) - (ref-π) - 1 >= 0."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1.0
