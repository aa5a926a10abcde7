"""Learning from preferences: reward models, DPO-family preference tuning, online RL.

    data.py        preference rows -> token ids (truncation, dropped-pair report), batches
                   with chosen + rejected in one forward pass, left-padded prompts
    logprobs.py    log π(y | x) from the backbone's hidden states through
                   fastft.ops.linear_cross_entropy(reduction="none"): never the logits
    losses.py      DPO, IPO, SimPO, ORPO, Bradley-Terry; RLOO / GRPO advantages, the
                   clipped policy-gradient loss, the k3 KL estimate
    methods.py     the typed options DPO(beta=0.1), IPO, SimPO, ORPO, RLOO(k=4), GRPO(k=4)
    reference.py   reference log-probs: cached once, LoRA adapters disabled, or a frozen copy
    objectives.py  PreferenceObjective (offline), PolicyGradientObjective (online) for the loop
    sampling.py    k completions per prompt through generate
    online.py      the sample / score / update alternation of RLOO and GRPO
    metrics.py     reward accuracy and margin, chosen / rejected log-probs, KL(ref ‖ π)

The recipe ``fastft.align`` (fastft/recipes/align.py) puts them together; the reward model
is the fine-tuning task ``task="reward"`` (fastft/finetuning/tasks/reward.py).
"""

from fastft.alignment.data import PairCollator, PreparationReport, load_pairs, tokenize_pairs, tokenize_prompts
from fastft.alignment.logprobs import check_causal_lm, sequence_logprobs, token_logprobs
from fastft.alignment.methods import DPO, GRPO, IPO, ORPO, RLOO, Method, OnlineMethod, SimPO
from fastft.alignment.metrics import PreferenceMetrics, ReferenceKL
from fastft.alignment.objectives import PolicyGradientObjective, PreferenceObjective
from fastft.alignment.reference import AdaptersDisabled, CachedReference, FrozenCopy, adapters_disabled, cache_reference_logps

__all__ = [
    "DPO",
    "GRPO",
    "IPO",
    "ORPO",
    "RLOO",
    "AdaptersDisabled",
    "CachedReference",
    "FrozenCopy",
    "Method",
    "OnlineMethod",
    "PairCollator",
    "PolicyGradientObjective",
    "PreferenceMetrics",
    "PreferenceObjective",
    "PreparationReport",
    "ReferenceKL",
    "SimPO",
    "adapters_disabled",
    "cache_reference_logps",
    "check_causal_lm",
    "load_pairs",
    "sequence_logprobs",
    "token_logprobs",
    "tokenize_pairs",
    "tokenize_prompts",
]
