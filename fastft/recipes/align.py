"""``fastft.align`` / ``fastft align``: fine-tune a causal LM from human feedback. Reads top to
bottom: check everything, set up (data, model, forgetting baseline, strategy, reference),
train (offline through the engine's loop, online through the sample / score / update
alternation), report (held-out reward accuracy, margin and KL, forgetting, the bundle).

    import fastft
    from fastft.alignment import DPO, GRPO
    from fastft.finetuning import LoRA

    result = fastft.align("path/to/sft-model", "path/to/sft-model", {"train": pairs, "validation": dev},
                          method=DPO(beta=0.1), strategy=LoRA(rank=8), epochs=1, lr=5e-6)
    print(result.metrics)                    # reward_accuracy, reward_margin, chosen_logps, kl_ref ...
    fastft.predict(result.save_path, ["a prompt"])   # the aligned model's answers

    # online: k samples per prompt scored by a function (or a reward-model bundle path)
    result = fastft.align(model, tokenizer, prompts, method=GRPO(k=4), reward=my_verifier, max_steps=200)

Strings name the methods with their defaults (``method="dpo" | "ipo" | "simpo" | "orpo" |
"rloo" | "grpo"``) and so on for the strategy (``strategy="lora"``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from fastft.alignment.data import PairCollator, PreparationReport, load_pairs, tokenize_pairs, tokenize_prompts
from fastft.alignment.logprobs import check_causal_lm, logprob_path
from fastft.alignment.methods import Method
from fastft.alignment.metrics import PreferenceMetrics, ReferenceKL
from fastft.alignment.objectives import PreferenceObjective
from fastft.alignment.online import OnlineState, train_online
from fastft.alignment.reference import AdaptersDisabled, CachedReference, FrozenCopy, cache_reference_logps
from fastft.errors import loading
from fastft.finetuning.bundle import load_finetuned, save_finetuned
from fastft.finetuning.guards import lm_perplexity
from fastft.finetuning.strategies import Strategy
from fastft.finetuning.tasks import SFTTask
from fastft.train.callbacks import Callback
from fastft.train.config import ModelConfig, TrainConfig, load_config, option_field, parse_yaml, resolve_config
from fastft.train.evaluation import evaluate
from fastft.train.loop import TrainState, train
from fastft.train.output_dir import check_output_dir
from fastft.train.runtime import cpu_speedups, resolve_device

__all__ = ["AlignConfig", "AlignResult", "align", "main"]

REFERENCES = ("auto", "cache", "adapters", "copy")


@dataclass
class AlignConfig(TrainConfig):
    """The loop's settings plus what learning from preferences adds. For online methods
    ``batch_size`` is prompts per rollout and ``max_steps`` counts rollouts."""

    method: Method = option_field(Method, "dpo")  # DPO, IPO, SimPO, ORPO, RLOO, GRPO (fastft.alignment.methods)
    strategy: Strategy = option_field(Strategy, "full")  # Full, Freeze, LoRA, Adapter (fastft.finetuning)
    # Where log ref comes from: "cache" (computed once before training), "adapters" (LoRA
    # switched off), "copy" (a frozen copy in memory); "auto": cache offline, online
    # adapters with LoRA else copy.
    reference: str = "auto"
    max_length: int = 512  # prompt + response tokens
    max_prompt_length: int | None = None  # the prompt's share when a pair does not fit (default: half)
    keep_prompt: str = "end"  # which part of a long prompt survives truncation
    keep_response: str = "start"  # ... and of a long response
    # Online: a function (prompts, completions) -> rewards, a reward-model bundle path, or
    # "module:function" (the command line's form).
    reward: Any = None
    kl_prompts: int = 16  # held-out prompts whose completions measure the KL to the reference
    # Unlabeled texts ({"validation": [...]} or a list: the last 20% held out) whose perplexity
    # before and after measures forgetting.
    pretraining_data: Any = None
    measure_forgetting: bool | None = None  # default: when pretraining_data is given
    disable_dropout: bool = True  # the policy and its reference see the same network (as TRL does)
    save: Any = True  # True: bundle into <output_dir>/finetuned; a path: there; False: none
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self):
        super().__post_init__()
        if self.reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {self.reference!r}")


@dataclass
class AlignResult:
    """What ``align`` returns.

    ``metrics`` / ``metrics_before``: on the held-out set after / before training --
    offline: ``reward_accuracy``, ``reward_margin``, ``chosen_reward``, ``rejected_reward``,
    ``chosen_logps``, ``rejected_logps``, ``loss``, ``kl_ref`` (KL(ref ‖ π) on held-out
    prompts); online: ``reward``, ``kl`` (KL(π ‖ ref)), ``response_length``. ``history``: one
    entry per evaluation (offline) or rollout (online). ``data``: what tokenising kept and
    dropped, per set. ``forgetting``: ``{"perplexity_before", "perplexity_after",
    "increase"}`` or None."""

    model: nn.Module
    tokenizer: Any
    method: Method
    state: TrainState | OnlineState
    metrics: dict[str, Any] = field(default_factory=dict)
    metrics_before: dict[str, Any] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    data: dict[str, PreparationReport] = field(default_factory=dict)
    forgetting: dict[str, float] | None = None
    save_path: str | None = None


def align(
    model: nn.Module | str,
    tokenizer,
    data,
    method: Method | str | Mapping | None = None,
    config: AlignConfig | Mapping | str | None = None,
    *,
    callbacks: Sequence[Callback] = (),
    **overrides,
) -> AlignResult:
    """Align ``model`` with preferences (offline methods) or a reward (online methods).

    Args:
        model: a ``transformers`` causal LM (``GPT2LMHeadModel``, ``LlamaForCausalLM`` ...),
            usually after supervised fine-tuning, or its name/path.
        tokenizer: its tokenizer, or a name/path.
        data: offline: rows ``{"prompt", "chosen", "rejected"}`` (list, ``datasets.Dataset``
            or a .json/.jsonl/.csv/.parquet path), or ``{"train": ..., "validation": ...}``;
            online: rows with a ``prompt`` (or plain prompt strings), the same two forms.
            Prompts and responses are texts or chat messages.
        method: ``DPO(beta=0.1)``, ``IPO()``, ``SimPO()``, ``ORPO()``, ``RLOO(k=4)``,
            ``GRPO(k=4)`` or a name; None: ``config.method``.
        config: ``AlignConfig`` / mapping / YAML path / None; ``**overrides`` set its fields:
            ``strategy=LoRA(rank=8)``, ``reward=fn``, ``reference="adapters"``,
            ``pretraining_data=texts``, ``epochs=1``, ``lr=5e-6``, ``max_length=256``.
        callbacks: more ``fastft.train.Callback`` s (offline methods).

    Returns: ``AlignResult``.

    Raises (all before the first step, with nothing written):
        ValueError: a multi-process launch (torchrun), rows missing ``prompt`` / ``chosen``
            / ``rejected``, no pair left after truncation, a model that is not a causal LM,
            ``beta <= 0``, ``k < 2``, an online method without a reward, a reward that is
            not a function or a reward bundle, a reference the method or strategy cannot
            use, a reward function returning NaN or the wrong number of rewards (at the
            first rollout, before any file is written).
        TypeError: options that belong to no method / strategy.
        KeyError: unknown config override names.
    """
    if method is not None:
        overrides["method"] = method
    config = resolve_config(config, overrides, AlignConfig)
    check_output_dir(config.output_dir, resume=config.resume, overwrite=config.overwrite)  # before any work
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("fastft align runs in one process (its log-probs bypass the DDP / FSDP wrapper's forward)")
    method, strategy = config.method, config.strategy
    reference_kind = _reference_kind(config)
    reward_fn = _reward_function(config.reward, config.device) if method.online else None
    heldout_texts = _heldout_texts(config.pretraining_data)
    measure_forgetting = bool(heldout_texts) if config.measure_forgetting is None else config.measure_forgetting
    if measure_forgetting and not heldout_texts:
        raise ValueError("measure_forgetting needs held-out unlabeled text: pass pretraining_data=")

    # --- data: pairs (offline) or prompts (online), tokenised ---------------------------
    if tokenizer is None or isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        with loading("tokenizer", tokenizer or model):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
    sets = _split_sets(data)
    truncation = dict(max_length=config.max_length, max_prompt_length=config.max_prompt_length,
                      keep_prompt=config.keep_prompt, keep_response=config.keep_response)
    prepared = {} if method.online else {name: tokenize_pairs(rows, tokenizer, set_name=name, **truncation)
                                         for name, rows in sets.items()}
    prompts = {name: _prompts_of(rows, name) for name, rows in sets.items()}
    max_prompt_length = config.max_prompt_length or config.max_length // 2
    prompt_ids = {name: tokenize_prompts(p, tokenizer, max_prompt_length=max_prompt_length,
                                         keep_prompt=config.keep_prompt) for name, p in prompts.items()}
    heldout = next((n for n in sets if n != "train"), None)

    # --- model, forgetting baseline, strategy, reference --------------------------------
    if isinstance(model, str):
        from transformers import AutoModelForCausalLM

        with loading("model", model):
            model = AutoModelForCausalLM.from_pretrained(model)
    check_causal_lm(model)
    if strategy.trains_new_head_first or strategy.peft_method in ("prefix", "prompt"):
        raise ValueError(f"strategy {strategy.name!r} does not fit preference tuning of a causal LM "
                         "(use full, freeze, lora or adapter)")
    if reference_kind == "adapters" and strategy.peft_method != "lora":
        raise ValueError(f"reference='adapters' needs strategy='lora', got {strategy.name!r}")
    model.to(resolve_device(config.device))
    if config.disable_dropout:
        _disable_dropout(model)
    forgetting = None
    if measure_forgetting:
        forgetting = {"perplexity_before": lm_perplexity(model, heldout_texts, tokenizer, block_size=64)}
    plan = strategy.apply(model, head_names=(), epochs=None if config.max_steps else config.epochs, tokenizer=tokenizer)
    reference = {"cache": CachedReference, "adapters": AdaptersDisabled, "copy": FrozenCopy}[reference_kind]
    reference = reference(model) if reference_kind == "copy" else reference()
    loop_config = dataclasses.replace(config, export=False)  # the bundle is saved instead
    result = AlignResult(model=model, tokenizer=tokenizer, method=method, state=None,
                         data={name: p.report for name, p in prepared.items()})

    # --- train: offline through the engine's loop, online by sampling -------------------
    with cpu_speedups(model, config):
        if method.online:
            state = train_online(model, tokenizer, prompts["train"], prompt_ids["train"], method=method,
                                 reward_fn=reward_fn, reference=reference, config=loop_config,
                                 eval_prompts=prompts.get(heldout, ()), eval_prompt_ids=prompt_ids.get(heldout, ()))
            result.history = state.history
            if state.evaluations:
                result.metrics_before, result.metrics = dict(state.evaluations[0]), dict(state.evaluations[-1])
        else:
            features = {name: p.features for name, p in prepared.items()}
            collator = PairCollator(tokenizer)
            eval_batch_size = config.eval_batch_size or config.batch_size
            if reference_kind == "cache" and method.needs_reference:
                for name in features:
                    cache_reference_logps(model, features[name], collator, batch_size=eval_batch_size)
            objective = PreferenceObjective(method, reference)
            kl = None
            if heldout:
                kl = ReferenceKL(model, tokenizer, prompt_ids[heldout][: config.kl_prompts],
                                 max_new_tokens=min(64, config.max_length - max_prompt_length))

            def held_out_metrics(current):
                metrics = evaluate(current, features[heldout], objective, collator=collator, batch_size=eval_batch_size,
                                   metric_fns=[PreferenceMetrics()])
                return {**metrics, "kl_ref": kl.measure(current)}

            if heldout:
                result.metrics_before = held_out_metrics(model)
            history = _History()
            state = train(model, objective, features["train"], collator=collator, config=loop_config,
                          eval_data=features.get(heldout), tokenizer=tokenizer, metric_fns=[PreferenceMetrics()],
                          callbacks=[*plan.callbacks, *([kl] if kl else []), history, *callbacks])
            model, result.history = state.model, history.records
            if heldout:
                result.metrics = held_out_metrics(model)
    result.state, result.model = state, model

    # --- report: forgetting, the bundle --------------------------------------------------
    if measure_forgetting:
        after = lm_perplexity(model, heldout_texts, tokenizer, block_size=64)
        forgetting.update(perplexity_after=after, increase=after - forgetting["perplexity_before"])
        result.forgetting = forgetting
    if config.save:
        path = config.save if isinstance(config.save, str) else os.path.join(state.output_dir, "finetuned")
        result.save_path = save_finetuned(model, tokenizer, SFTTask(max_length=config.max_length), path,
                                          strategy=strategy)
    return result


# ------------------------------------------------------------------------ the pieces


class _History(Callback):
    """Every held-out evaluation during training (with ``kl_ref`` from ``ReferenceKL``)."""

    def __init__(self):
        self.records: list[dict] = []

    def on_evaluate(self, state, metrics):
        self.records.append({"step": state.step, "epoch": state.epoch, **metrics})


def _reference_kind(config: AlignConfig) -> str:
    """The reference the run uses (see ``AlignConfig.reference``).

    Raises:
        ValueError: a cached reference for an online method (new samples need a model).
    """
    method, kind = config.method, config.reference
    lora = config.strategy.peft_method == "lora"
    if kind == "auto":
        return ("adapters" if lora else "copy") if method.online else "cache"
    if kind == "cache" and method.online:
        raise ValueError(f"method {method.name!r} samples new completions: their reference log-probs need "
                         "reference='adapters' (with LoRA) or 'copy', not 'cache'")
    return kind


def _reward_function(reward, device) -> Callable:
    """A reward function ``(prompts, completions) -> floats`` from a function, a
    ``"module:function"`` name, or the path of a reward-model bundle (``task="reward"``).

    Raises:
        ValueError: no reward, or a bundle of another task.
    """
    if reward is None:
        raise ValueError("online methods need a reward: reward=fn(prompts, completions) -> floats, or the path of a "
                         "reward-model bundle (fastft finetune --task reward ...)")
    if callable(reward):
        return reward
    if not isinstance(reward, str):
        raise ValueError(f"reward: a function, 'module:function' or a reward-model bundle path, got {reward!r}")
    if not os.path.isdir(reward) and ":" in reward:
        module, _, name = reward.partition(":")
        return getattr(importlib.import_module(module), name)
    reward_model, reward_tokenizer, task = load_finetuned(reward, device=resolve_device(device))
    if task.name != "reward":
        raise ValueError(f"reward: {reward} is a {task.name!r} bundle, not a reward model (task='reward')")

    def score(prompts, completions):
        rows = [{"prompt": p, "response": c} for p, c in zip(prompts, completions)]
        return task.predict(reward_model, reward_tokenizer, rows)

    return score


def _disable_dropout(model: nn.Module) -> None:
    """Dropout probability 0 everywhere (nn.Dropout modules and attention-dropout rates)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def _split_sets(data) -> dict[str, list]:
    """``{"train": rows, <held-out name>: rows ...}`` (validation / dev / test first)."""
    if isinstance(data, Mapping) and not hasattr(data, "column_names"):
        if "train" not in data:
            raise ValueError(f"data: a mapping needs a 'train' entry, got keys {sorted(data)}")
        names = sorted((k for k in data if k != "train"), key=lambda k: (k not in ("validation", "dev", "test"),
                                                                          k != "validation"))
        return {"train": _rows(data["train"]), **{k: _rows(data[k]) for k in names}}
    return {"train": _rows(data)}


def _rows(data) -> list:
    rows = load_pairs(data)
    return [{"prompt": r} if isinstance(r, (str, list)) else r for r in rows]


def _prompts_of(rows: list[dict], set_name: str) -> list:
    if not rows:
        raise ValueError(f"data[{set_name!r}] is empty")
    missing = [i for i, row in enumerate(rows) if row.get("prompt") is None]
    if missing:
        raise ValueError(f"data[{set_name!r}]: rows {missing[:5]} have no 'prompt'")
    return [row["prompt"] for row in rows]


def _heldout_texts(pretraining_data) -> list[str]:
    if pretraining_data is None:
        return []
    if isinstance(pretraining_data, Mapping):
        return list(pretraining_data.get("validation", []))
    texts = list(pretraining_data)
    return texts[-max(1, len(texts) // 5):]


# ------------------------------------------------------------------------ command line


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fastft align", description="Align a causal LM with preferences or a reward.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokenizer")
    parser.add_argument("--train", required=True, help=".json/.jsonl/.csv/.parquet rows (prompt, chosen, rejected)")
    parser.add_argument("--eval", metavar="PATH", help="held-out rows (reward accuracy, margin, KL)")
    parser.add_argument("--method", help=f"one of {sorted(Method.members)} (default: dpo)")
    parser.add_argument("--method-options", help="YAML mapping, e.g. '{beta: 0.1}'")
    parser.add_argument("--strategy", help=f"one of {sorted(Strategy.members)} (default: full)")
    parser.add_argument("--strategy-options", help="YAML mapping, e.g. '{rank: 8}'")
    parser.add_argument("--reward", help="online methods: a reward-model bundle directory or module:function")
    parser.add_argument("--pretraining-data", help="text file of unlabeled documents (one per line): forgetting")
    parser.add_argument("--config", help="YAML file mapped onto fastft.recipes.align.AlignConfig")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    config = load_config(args.config, args.overrides, cls=AlignConfig)
    data = {"train": args.train, **({"validation": args.eval} if args.eval else {})}
    flags = {"reward": args.reward}
    for name, options in (("method", args.method_options), ("strategy", args.strategy_options)):
        chosen = getattr(args, name)
        if chosen or options:
            flags[name] = {"name": chosen or getattr(config, name).name, **(parse_yaml(options or "{}") or {})}
    if args.pretraining_data:
        flags["pretraining_data"] = open(args.pretraining_data).read().splitlines()
    result = align(args.model, args.tokenizer or args.model, data, config=config,
                   **{k: v for k, v in flags.items() if v is not None})
    path, reason = logprob_path(result.model)
    report = {"method": result.method.spec(), "before": result.metrics_before, "after": result.metrics}
    if result.method.online:  # the training rollouts' reward, KL and length, first and last
        report["rollouts"] = {"first": result.history[0], "last": result.history[-1]}
    else:
        report["data"] = {k: v.as_dict() for k, v in result.data.items()}
    report.update(forgetting=result.forgetting, logprobs=path if reason is None else f"{path} ({reason})",
                  saved=result.save_path)
    print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
