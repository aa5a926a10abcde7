"""Online RL from a reward (RLOO, GRPO): sample, score, update, repeat. Read ``train_online``
top to bottom.

One *rollout* takes ``batch_size`` prompts, samples ``k`` completions of each from the
current policy (``generate``), scores them with the reward function (a Python function or a
reward-model bundle turned into one by the recipe), and computes, without autograd, each
completion token's log-probability under the sampling policy (``old_logps``) and the
reference (``ref_logps``), the group-relative advantages, and the KL of the samples to the
reference. Then ``updates_per_rollout`` optimizer steps minimise the clipped
policy-gradient loss (``PolicyGradientObjective``) on that batch, through the engine's
``accumulate_gradients``, optimizer, schedule and metrics log. Generation needs the current
weights, so the engine's ``train()`` (a fixed dataset) does not fit; this function reuses
its pieces instead.

Nothing is written until the first rollout has been scored: a reward function returning
NaN or the wrong number of rewards fails before any file exists.
"""

from __future__ import annotations

import json
import math
import os
import time
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from fastft.alignment.logprobs import evaluation_mode, token_logprobs
from fastft.alignment.methods import OnlineMethod
from fastft.alignment.objectives import PolicyGradientObjective
from fastft.alignment.reference import Reference
from fastft.alignment.sampling import Samples, sample_completions
from fastft.data.collators import IGNORE_INDEX
from fastft.errors import TrainingDiverged
from fastft.train.config import TrainConfig, run_record
from fastft.train.loop import accumulate_gradients
from fastft.train.metrics import MetricsLog
from fastft.train.optim import build_optimizer
from fastft.train.output_dir import claim_output_dir
from fastft.train.runtime import maybe_patch, resolve_precision, seed_everything
from fastft.train.schedules import build_scheduler, warmup_steps_for

__all__ = ["OnlineState", "RewardFunction", "Rollout", "check_rewards", "evaluate_policy", "rollout", "train_online"]

# (prompts as given in the data, completion texts) -> one float per completion
RewardFunction = Callable[[Sequence[Any], Sequence[str]], Sequence[float]]


def check_rewards(rewards, expected: int) -> torch.Tensor:
    """The reward function's output as an fp32 tensor ``(expected,)``.

    Raises:
        ValueError: not a sequence of ``expected`` finite numbers.
    """
    try:
        values = torch.as_tensor([float(r) for r in rewards], dtype=torch.float32)
    except (TypeError, ValueError) as error:
        raise ValueError(f"the reward function must return a sequence of numbers, one per completion: {error}") from None
    if values.numel() != expected:
        raise ValueError(f"the reward function returned {values.numel()} rewards for {expected} completions")
    if not torch.isfinite(values).all():
        bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
        raise ValueError(f"the reward function returned non-finite rewards (NaN / inf) at completions {bad[:5]}")
    return values


@dataclass
class Rollout:
    """A scored batch of samples, ready for ``PolicyGradientObjective``."""

    batch: dict[str, torch.Tensor]  # input_ids, attention_mask, labels, old_logps, ref_logps, advantages
    samples: Samples
    rewards: torch.Tensor  # (N,) as the reward function gave them
    stats: dict[str, float]  # reward, reward_std, kl, response_length


def rollout(model, tokenizer, prompts: Sequence[Any], prompt_ids: Sequence[Sequence[int]], method: OnlineMethod,
            reward_fn: RewardFunction, reference: Reference, *, k: int | None = None, greedy: bool = False) -> Rollout:
    """Sample ``k`` (default ``method.k``) completions per prompt, score them, and compute
    old / reference log-probs, the KL to the reference and the advantages."""
    k = method.k if k is None else k
    device = next(model.parameters()).device
    samples = sample_completions(model, tokenizer, prompt_ids, k=k, temperature=method.temperature, top_p=method.top_p,
                                 max_new_tokens=method.max_new_tokens, greedy=greedy)
    rewards = check_rewards(reward_fn([p for p in prompts for _ in range(samples.k)], samples.texts), len(samples.texts))
    batch = samples.batch(tokenizer, device)
    with evaluation_mode(model):
        batch["old_logps"] = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    batch["ref_logps"] = reference.token_logps(model, batch)  # (N, T-1)
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    kl = ((batch["old_logps"] - batch["ref_logps"]) * mask).sum(-1).cpu()  # (N,) log π(y) - log ref(y): KL(π ‖ ref) on average
    shaped = rewards - method.beta * kl if method.kl_in_reward else rewards
    if samples.k > 1:
        batch["advantages"] = method.advantages(shaped.view(-1, samples.k)).reshape(-1).to(device)
    lengths = mask.sum(-1).float()
    stats = {"reward": float(rewards.mean()), "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
             "kl": float(kl.mean()), "response_length": float(lengths.mean())}
    return Rollout(batch, samples, rewards, stats)


def evaluate_policy(model, tokenizer, prompts, prompt_ids, method, reward_fn, reference, *, batch_size: int = 16) -> dict:
    """Mean reward, KL(π ‖ ref) and response length of one sample per held-out prompt."""
    totals, count = {}, 0
    for start in range(0, len(prompts), batch_size):
        part = rollout(model, tokenizer, prompts[start : start + batch_size], prompt_ids[start : start + batch_size],
                       method, reward_fn, reference, k=1)
        n = len(part.samples.texts)
        for key, value in part.stats.items():
            totals[key] = totals.get(key, 0.0) + value * n
        count += n
    return {key: value / count for key, value in totals.items() if key != "reward_std"}


@dataclass
class OnlineState:
    """What ``train_online`` returns: the model, the per-rollout records, the held-out
    evaluations (``evaluations``: ``{"step", "reward", "kl", "response_length"}``)."""

    model: torch.nn.Module
    output_dir: str
    step: int = 0  # optimizer steps
    rollouts: int = 0
    history: list[dict] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)


def train_online(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Any],
    prompt_ids: Sequence[Sequence[int]],
    *,
    method: OnlineMethod,
    reward_fn: RewardFunction,
    reference: Reference,
    config: TrainConfig,
    eval_prompts: Sequence[Any] = (),
    eval_prompt_ids: Sequence[Sequence[int]] = (),
) -> OnlineState:
    """RLOO / GRPO on ``prompts`` (as the reward function sees them) and their token ids.

    ``config.batch_size`` prompts per rollout (x ``method.k`` completions), ``max_steps``
    rollouts (else ``epochs`` passes over the prompts), ``method.updates_per_rollout``
    optimizer steps each; evaluation on ``eval_prompts`` every ``eval_every`` rollouts and
    at the end. Writes ``run_config.json`` and ``metrics.jsonl`` into ``config.output_dir``.
    """
    device = next(model.parameters()).device
    # "auto" -> bf16 / fp32 for this device (printed); fp16 on a CPU fails here, before any work
    config = dataclasses.replace(config, precision=resolve_precision(config.precision, device, announce=True))
    seed_everything(config.seed)
    model = maybe_patch(model, config.fused)
    objective = PolicyGradientObjective(method)
    rollouts_per_epoch = math.ceil(len(prompts) / config.batch_size)
    total_rollouts = config.max_steps or config.epochs * rollouts_per_epoch
    total_steps = total_rollouts * method.updates_per_rollout
    optimizer = build_optimizer(model, config.optim, None, device)
    scheduler = build_scheduler(optimizer, config.schedule.name, total_steps=total_steps,
                                warmup_steps=warmup_steps_for(total_steps, config.schedule.warmup_steps,
                                                              config.schedule.warmup_ratio),
                                min_lr_ratio=config.schedule.min_lr_ratio, **config.schedule.options)
    generator = torch.Generator().manual_seed(config.seed)
    state = OnlineState(model, os.path.abspath(config.output_dir))
    log = None

    def evaluate_now():
        if eval_prompts:
            metrics = evaluate_policy(model, tokenizer, eval_prompts, eval_prompt_ids, method, reward_fn, reference,
                                      batch_size=config.eval_batch_size or config.batch_size)
            state.evaluations.append({"step": state.step, **metrics})
            if log is not None:
                log.write({"step": state.step, **{f"eval_{k}": v for k, v in metrics.items()}})

    progress = tqdm(total=total_rollouts, unit="rollout", dynamic_ncols=True, disable=not config.progress)
    order: list[int] = []
    model.train()
    while state.rollouts < total_rollouts:
        if not order:  # a new pass over the prompts, in a fresh order
            order = torch.randperm(len(prompts), generator=generator).tolist()
        chosen, order = order[: config.batch_size], order[config.batch_size:]
        started = time.perf_counter()
        scored = rollout(model, tokenizer, [prompts[i] for i in chosen], [prompt_ids[i] for i in chosen], method,
                         reward_fn, reference)
        if log is None:  # the reward function has answered well once: now the run's files
            claim_output_dir(state.output_dir, resume=config.resume, overwrite=config.overwrite)
            os.makedirs(state.output_dir, exist_ok=True)
            with open(os.path.join(state.output_dir, "run_config.json"), "w") as f:
                json.dump(run_record(config), f, indent=2)
            log = MetricsLog(os.path.join(state.output_dir, "metrics.jsonl"))
            if not state.evaluations:
                evaluate_now()  # the starting policy
        for _ in range(method.updates_per_rollout):
            losses = accumulate_gradients(model, objective, [scored.batch], precision=config.precision)
            trainable = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.optim.max_grad_norm or float("inf"))
            if not (math.isfinite(losses["loss"]) and math.isfinite(float(grad_norm))):
                log.write({"step": state.step + 1, "rollout": state.rollouts + 1, **losses,
                           "grad_norm": float(grad_norm), "diverged": True})
                raise TrainingDiverged(
                    f"rollout {state.rollouts + 1}: the loss is {losses['loss']:.4g} and the gradient norm "
                    f"{float(grad_norm):.4g}: training diverged and stopped before this update (nothing is saved); "
                    f"try a lower learning rate (optim.lr={config.optim.lr:g} now) or a larger beta")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            state.step += 1
        state.rollouts += 1
        record = {"step": state.step, "rollout": state.rollouts, **scored.stats, **losses, "lr": lr,
                  "grad_norm": float(grad_norm), "seconds": time.perf_counter() - started}
        state.history.append(record)
        if state.rollouts % config.log_every == 0 or state.rollouts == total_rollouts:
            log.write(record)
        progress.update(1)
        progress.set_postfix(reward=f"{scored.stats['reward']:.3f}", kl=f"{scored.stats['kl']:.3f}",
                             len=f"{scored.stats['response_length']:.1f}")
        if config.eval_every and state.rollouts % config.eval_every == 0 and state.rollouts != total_rollouts:
            evaluate_now()
    progress.close()
    evaluate_now()
    return state
