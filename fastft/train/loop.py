"""The training loop shared by pretraining and fine-tuning. Read it top to bottom.

    train(model, objective, train_data, collator=..., config=TrainConfig(...))

What varies between runs comes in from outside, the loop itself stays the same:

- the **objective** (``fastft.train.objectives``) turns a batch into summed losses and
  says how many items (tokens, examples) each batch supervises;
- **param_groups** (a list of torch parameter-group dicts, or a function of the model
  returning one) give per-group learning rates / weight decay -- discriminative
  fine-tuning, layer-wise decay;
- **callbacks** (``fastft.train.callbacks``) run at step end, evaluation and epoch end:
  early stopping, gradual unfreezing, best-checkpoint selection;
- **extra_losses** are functions ``fn(model) -> 0-dim tensor`` added once per optimizer
  step (regularisers such as L2-SP or EWC);
- **metric_fns** add task metrics to evaluation (objects with ``update(batch, outputs)``
  and ``compute() -> dict``).

One optimizer step = ``grad_accum_steps`` micro-batches. Their supervised-item counts are
added up *before* the first forward pass and every micro-batch's summed loss is divided
by the total, so accumulation gives exactly the gradient of one large batch.

Under ``torchrun`` (``config.distributed`` = "ddp" | "fsdp", ``fastft.train.distributed``)
the same loop runs on every rank: each rank takes a disjoint shard of every micro-batch
(``fastft.data.sampler``), the counts are summed over ranks too (the *global* batch's
count), inner micro-steps skip gradient communication, checkpoints are sharded (DCP), and
rank 0 alone logs, plots and exports.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import json
import math
import os
import platform
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from fastft.data.sampler import ORDER_KEYS, EpochBatches
from fastft.nn.dropout import use_fast_dropout
from fastft.train.callbacks import Callback, EarlyStopping
from fastft.train.checkpoint import (
    export_pretrained,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
)
from fastft.train.config import TrainConfig
from fastft.train.distributed import Parallel, setup_parallel
from fastft.train.metrics import MetricsLog, perplexity, plot_curves
from fastft.train.objectives import Objective, get_objective
from fastft.train.schedules import build_scheduler, warmup_steps_for

__all__ = ["TrainState", "accumulate_gradients", "build_optimizer", "evaluate", "maybe_patch", "train"]


@dataclass
class TrainState:
    """What the loop knows at any moment; callbacks read and may change it."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    config: TrainConfig
    objective: Objective
    total_steps: int
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of the current epoch already used
    samples_in_epoch: int = 0  # examples of the current epoch already used, over all ranks
    tokens_seen: int = 0  # input tokens (non-padding) processed
    should_stop: bool = False
    last_eval: dict = field(default_factory=dict)
    last_train: dict = field(default_factory=dict)
    output_dir: str = ""
    checkpoint_path: str | None = None  # the latest checkpoint written or resumed from
    export_path: str | None = None
    parallel: Parallel | None = None  # rank, world size, mode ("none" | "ddp" | "fsdp")


# ----------------------------------------------------------------------------- helpers


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@functools.cache  # process-wide and permanent: once is enough (libc_ver reads the executable)
def retain_freed_memory() -> bool:
    """Linux/glibc: let malloc keep freed blocks up to 1 GiB in the process for reuse.

    By default glibc hands every freed block above its (adaptive, ≤ 32 MiB) mmap threshold
    back to the kernel, so a buffer that large allocated anew each step is page-faulted in
    anew each step: e.g. the dense word-embedding gradient of a BERT vocabulary (30522 x 384
    fp32 = 45 MiB for MiniLM) took 14 ms per step to zero-fill on a 2-core AMD EPYC, 4 ms
    with this setting (measured). The cost: freed memory stays with the process (up to
    1 GiB above the heap top) instead of returning to the OS. Process-wide and permanent.
    Returns whether malloc accepted the settings (False elsewhere)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    limit = 1 << 30
    return bool(libc.mallopt(m_mmap_threshold, limit)) and bool(libc.mallopt(m_trim_threshold, limit))


def maybe_patch(model: torch.nn.Module, fused: bool) -> torch.nn.Module:
    """Apply ``fastft.patch`` (fused attention and loss) unless ``fused`` is False; if
    fastft.models cannot be imported or refuses the model, warn and go on unpatched."""
    if not fused or getattr(model, "_fastft_loop_patched", False):
        return model
    try:
        from fastft.models import patch

        patched = patch(model)
        model = patched if isinstance(patched, torch.nn.Module) else model
    except Exception as error:  # noqa: BLE001 -- any failure means: run the plain model
        warnings.warn(f"fastft.patch unavailable ({type(error).__name__}: {error}); training unpatched", stacklevel=2)
        return model
    model._fastft_loop_patched = True
    return model


def default_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices (weights, embeddings) decay; biases and norm scales do not
    (the split nanoGPT uses: decay iff ``param.dim() >= 2``). Frozen parameters are
    included, so unfreezing them later needs no new optimizer (AdamW skips ``grad=None``)."""
    decay, no_decay = [], []
    for param in model.parameters():
        (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fused_adamw_supported(groups: list[dict], device: torch.device) -> bool:
    """Whether ``fused="auto"`` takes AdamW's fused kernel: on CUDA always; on a CPU for
    plain (not DTensor-sharded) tensors. On a CPU the per-parameter ("for-loop") AdamW
    makes ~6 passes over memory per parameter; the fused kernel makes one. For MiniLM
    (22.7M parameters, 12M of them the word embeddings) that is a fifth of a CPU training
    step (benchmarks/bench_finetune.py)."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support has no DTensor either
        return True
    return not any(isinstance(p, DTensor) for g in groups for p in g["params"])


def build_optimizer(model, optim_config, param_groups=None, device=None) -> torch.optim.AdamW:
    """AdamW over ``param_groups`` (list of dicts or ``fn(model) -> list``; groups without
    ``lr`` / ``weight_decay`` get the config's). ``fused="auto"``: see ``fused_adamw_supported``."""
    groups = param_groups(model) if callable(param_groups) else param_groups
    groups = default_param_groups(model, optim_config.weight_decay) if groups is None else groups
    groups = [{"lr": optim_config.lr, "weight_decay": optim_config.weight_decay, **g, "params": list(g["params"])}
              for g in groups]
    groups = [g for g in groups if g["params"]]
    fused = optim_config.fused
    if fused == "auto":
        fused = device is not None and fused_adamw_supported(groups, device)
    return torch.optim.AdamW(
        groups, lr=optim_config.lr, betas=tuple(optim_config.betas), eps=optim_config.eps, fused=bool(fused) or None
    )


def autocast(device: torch.device, precision: str):
    """bf16 / fp16 autocast (weights stay fp32), or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def fetch(data, indices: Sequence[int]) -> list[dict]:
    """Examples ``indices`` of a ``datasets.Dataset`` (one columnar read) or a list of dicts."""
    if isinstance(data, (list, tuple)):
        return [data[i] for i in indices]
    columns = data[list(indices)]  # {column: [values]}
    names = list(columns)
    return [dict(zip(names, values)) for values in zip(*(columns[n] for n in names))]


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def count_tokens(batch: dict) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


# --------------------------------------------------------------- one optimizer step


def accumulate_gradients(
    model: torch.nn.Module,
    objective: Objective,
    micro_batches: Sequence[dict],
    *,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
    extra_losses: Sequence[Callable[[torch.nn.Module], torch.Tensor]] = (),
    parallel: Parallel | None = None,
) -> dict[str, float]:
    """Backward through ``micro_batches`` so that ``.grad`` holds the gradient of

        sum over terms t of  (sum of term-t losses over all micro-batches) / (term-t items in all of them)
        + sum of extra_losses(model)

    i.e. the gradient of the concatenated batch. Returns ``{"loss": objective part,
    "<term>_loss": ..., "extra_loss": ...}`` as floats. Gradients are accumulated into
    whatever ``.grad`` holds (the caller zeroes them).

    With ``parallel`` (DDP / FSDP) "all micro-batches" means those of every rank: the
    counts are summed over ranks before the first forward, the objective is called on
    ``parallel.forward_model`` (the DDP wrapper), only the last micro-step communicates
    gradients, and the returned losses are those of the global batch.
    """
    device = parallel.device if parallel is not None else next(model.parameters()).device
    distributed = parallel is not None and parallel.enabled
    forward_model = parallel.forward_model if distributed else model
    totals: dict[str, int] = {}
    for batch in micro_batches:  # counts first: they only need the labels
        for term, count in objective.counts(batch).items():
            totals[term] = totals.get(term, 0) + count
    if distributed:  # every rank divides by the global batch's counts (one collective)
        terms = sorted(totals)
        totals = dict(zip(terms, (round(c) for c in parallel.all_reduce_sum(totals[t] for t in terms))))
    term_losses = {term: [] for term in totals}  # detached per-micro-batch parts, summed at the end
    extra_parts = []
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with parallel.gradient_sync(last) if distributed else contextlib.nullcontext():
            with autocast(device, precision):
                sums, outputs = objective.loss(forward_model, batch)
            loss = None
            for term, summed in sums.items():
                if totals.get(term, 0) > 0:
                    normalised = summed / totals[term]  # objectives return >= fp32 sums
                    loss = normalised if loss is None else loss + normalised
                    term_losses[term].append(normalised.detach())
            if distributed:
                # DDP/FSDP average gradients over ranks; the objective's sum over ranks is
                # the global loss, so scale by world_size (extra losses are the same on
                # every rank: their average is already right).
                loss = loss * parallel.loss_scale if loss is not None and loss.requires_grad else _zero_with_graph(outputs)
            if last:
                for extra in extra_losses:  # regularisers: once per optimizer step, outside autocast
                    value = extra(model)
                    loss = value if loss is None else loss + value
                    extra_parts.append(value.detach())
            if loss is not None and loss.requires_grad:
                (scaler.scale(loss) if scaler is not None else loss).backward()
    # One host sync per step, not per micro-batch.
    result = {f"{term}_loss": float(sum(parts)) if parts else 0.0 for term, parts in term_losses.items()}
    if distributed:  # each rank holds its share of the global losses
        result = dict(zip(result, parallel.all_reduce_sum(result.values())))
    result["loss"] = sum(result.values())
    if extra_losses:
        result["extra_loss"] = float(sum(extra_parts))
    return result


def _is_communication_error(error: BaseException) -> bool:
    """A failed / timed-out collective (gloo or NCCL), as opposed to a bug on this rank."""
    if isinstance(error, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(error).lower()
    return any(word in text for word in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket", "barrier"))


def _zero_with_graph(outputs) -> torch.Tensor:
    """0 x a forward output that needs grad: a rank whose micro-batch supervises nothing
    must still run backward, or DDP/FSDP would wait forever for its gradients."""
    values = outputs.values() if isinstance(outputs, dict) else (outputs if isinstance(outputs, (list, tuple)) else [outputs])
    for key, value in zip(outputs.keys() if isinstance(outputs, dict) else range(len(values)), values):
        if key != "loss" and torch.is_tensor(value) and value.requires_grad:  # the 0/0 loss would be NaN
            return value.float().sum() * 0.0
    raise RuntimeError("a micro-batch with nothing to supervise, and no model output to run backward through")


# ------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data,
    objective: str | Objective = "mlm",
    *,
    collator=None,
    tokenizer=None,
    batch_size: int = 8,
    max_batches: int | None = None,
    precision: str = "fp32",
    seed: int = 0,
    metric_fns: Sequence[Any] = (),
    **data_options,
) -> dict[str, float]:
    """Held-out loss (per term and total), perplexity, and task metrics.

    Args:
        model: evaluated in ``eval()`` mode (its mode is restored afterwards).
        data: a tokenised dataset / list of dicts (then ``collator`` is required), or raw
            text for ``fastft.data.prepare_lm_data`` (then ``tokenizer`` is required;
            ``data_options`` such as ``block_size`` are passed on).
        objective: name or ``Objective``.
        collator: its ``reseeded(seed)`` copy is used, so masked-LM evaluation masks are
            the same at every evaluation and the training collator's stream is untouched.
        max_batches: stop after this many batches (None: all).
        metric_fns: objects with ``update(batch, outputs)`` and ``compute() -> dict``.

    Returns: ``{"loss", "<term>_loss", "perplexity" (LM objectives), "num_<term>",
    ...task metrics}``; items are averaged over the whole set, not per batch.

    Raises:
        ValueError: raw data without a tokenizer, or no collator for tokenised data.
    """
    objective = get_objective(objective)
    from fastft.data.pipeline import is_tokenized, prepare_lm_data

    if not is_tokenized(data):
        if tokenizer is None:
            raise ValueError("evaluate: raw text data needs a tokenizer")
        data, built = prepare_lm_data(data, tokenizer, objective.name, seed=seed, **data_options)
        collator = collator or built
    if collator is None:
        raise ValueError("evaluate: tokenised data needs a collator")
    collator = collator.reseeded(seed) if hasattr(collator, "reseeded") else collator
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    try:
        for b, start in enumerate(range(0, len(data), batch_size)):
            if max_batches is not None and b >= max_batches:
                break
            batch = to_device(collator(fetch(data, range(start, min(start + batch_size, len(data))))), device)
            with autocast(device, precision):
                term_sums, outputs = objective.loss(model, batch)
            for term, count in objective.counts(batch).items():
                sums[term] = sums.get(term, 0.0) + float(term_sums[term])
                counts[term] = counts.get(term, 0) + count
            for metric in metric_fns:
                metric.update(batch, outputs)
    finally:
        model.train(was_training)
    metrics: dict[str, float] = {}
    for term in sums:
        metrics[f"num_{term}"] = counts[term]
        if counts[term]:
            metrics[f"{term}_loss"] = sums[term] / counts[term]
    metrics["loss"] = sum(metrics[f"{t}_loss"] for t in sums if counts[t]) if any(counts.values()) else float("nan")
    if objective.perplexity_term and f"{objective.perplexity_term}_loss" in metrics:
        metrics["perplexity"] = perplexity(metrics[f"{objective.perplexity_term}_loss"])
    for metric in metric_fns:
        metrics.update(metric.compute())
    return metrics


# ----------------------------------------------------------------------- the loop


def train(
    model: torch.nn.Module,
    objective: str | Objective,
    train_data,
    *,
    collator: Callable[[list[dict]], dict],
    config: TrainConfig | None = None,
    eval_data=None,
    eval_collator=None,
    tokenizer=None,
    param_groups=None,
    callbacks: Sequence[Callback] = (),
    extra_losses: Sequence[Callable[[torch.nn.Module], torch.Tensor]] = (),
    metric_fns: Sequence[Any] = (),
) -> TrainState:
    """Train ``model`` on ``train_data`` (tokenised dataset or list of dicts) with ``collator``.

    Writes into ``config.output_dir``: ``checkpoints/step-*`` (every ``save_every`` steps
    and at the end), ``metrics.jsonl``, ``curves.png``, ``final/`` (Hugging Face format,
    when ``export`` and the model has ``save_pretrained``).

    Under ``torchrun`` with ``config.distributed`` "ddp" / "fsdp" (or "auto"), call it on
    every rank with the same arguments: ``batch_size`` is per rank, the global batch is
    ``batch_size x world_size x grad_accum_steps``; only rank 0 writes logs and exports.

    Returns: the final ``TrainState``. Its ``model`` is the (FSDP: sharded) model, never
    the DDP wrapper, so parameter names are unchanged.

    Raises:
        ValueError: empty ``train_data``; ``resume`` pointing at a checkpoint whose data
            order (sampler) differs from this run's; ``distributed: none`` under a
            multi-process launch.
        RuntimeError: (distributed) a collective failed or timed out because another
            rank died or hung; the message names this rank and the last checkpoint.
    """
    config = config or TrainConfig()
    objective = get_objective(objective)
    eval_collator = eval_collator or collator
    output_dir = os.path.abspath(config.output_dir)
    checkpoint_root = os.path.join(output_dir, "checkpoints")
    parallel = setup_parallel(config)  # one process, or this rank of a torchrun job
    if parallel.is_main:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "run_config.json"), "w") as f:  # what this run was asked to do
            json.dump(dataclasses.asdict(config), f, indent=2, default=str)

    # --- model, precision, memory -------------------------------------------------
    seed_everything(config.seed)
    device = parallel.device
    model = maybe_patch(model, config.fused)
    if config.gradient_checkpointing:
        # Recompute activations in backward: ~1/3 more compute for far less memory.
        # (recent transformers call it activation_checkpointing_enable; older ones only have this name)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
            model.config.use_cache = False  # a KV cache is useless in training and clashes with checkpointing
    # CPU runs: dropout masks from a cheaper generator, and malloc keeps the large per-step
    # buffers (e.g. the embedding gradient) mapped; together ~7% of a MiniLM fine-tuning step
    # on 2 cores (benchmarks/bench_finetune.py). The dropout swap is undone when the loop ends.
    dropout_swap = None
    if device.type == "cpu":
        if config.fast_dropout:
            dropout_swap = use_fast_dropout(model)
        if config.retain_freed_memory:
            retain_freed_memory()
    # To this rank's device; DDP wraps it, FSDP shards it (per block, then the root).
    model = parallel.wrap(model)
    if parallel.world_size > 1:
        seed_everything(config.seed + parallel.rank)  # the same weights everywhere, distinct dropout per rank
        if parallel.rank > 0 and hasattr(collator, "reseeded"):  # distinct masked-LM masks per rank
            collator = collator.reseeded(getattr(collator, "seed", config.seed) + 7919 * parallel.rank)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")

    # --- data order, step budget, optimizer and schedule ----------------------------
    if len(train_data) == 0:
        raise ValueError("train_data is empty")
    sampler = EpochBatches(
        len(train_data), config.batch_size, shuffle=True, seed=config.seed, world_size=parallel.world_size, rank=parallel.rank
    )
    steps_per_epoch = math.ceil(len(sampler) / config.grad_accum_steps)  # an epoch's last step may be short
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    optimizer = build_optimizer(model, config.optim, param_groups, device)  # after FSDP: it replaced the parameters
    scheduler = build_scheduler(
        optimizer,
        config.schedule.name,
        total_steps=total_steps,
        warmup_steps=warmup_steps_for(total_steps, config.schedule.warmup_steps, config.schedule.warmup_ratio),
        min_lr_ratio=config.schedule.min_lr_ratio,
        **config.schedule.options,
    )
    callbacks = list(callbacks)
    if config.early_stopping_patience:
        callbacks.append(EarlyStopping(config.early_stopping_patience, config.early_stopping_metric))
    state = TrainState(model, optimizer, scheduler, config, objective, total_steps, output_dir=output_dir, parallel=parallel)
    # Only rank 0 logs: the other ranks write their (identical) records to /dev/null.
    log = MetricsLog(os.path.join(output_dir, "metrics.jsonl") if parallel.is_main else os.devnull)

    def checkpoint() -> None:
        save = save_sharded_checkpoint if parallel.enabled else save_checkpoint  # DCP: every rank writes its shards
        state.checkpoint_path = save(
            checkpoint_root,
            state.step,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            collator=collator if hasattr(collator, "state_dict") else None,
            trainer_state={
                "epoch": state.epoch,
                "batch_in_epoch": state.batch_in_epoch,
                "samples_in_epoch": state.samples_in_epoch,  # global samples: re-shardable over any world size
                "tokens_seen": state.tokens_seen,
                "total_steps": total_steps,
                "sampler": sampler.state_dict(),
                "last_eval": state.last_eval,
            },
            extra_state={"callbacks": [cb.state_dict() for cb in callbacks]},
            tokenizer=tokenizer,
            keep_last=config.keep_last,
            **({"parallel": parallel} if parallel.enabled else {}),
        )

    def run_evaluation() -> dict:
        metrics = evaluate(
            model,
            eval_data,
            objective,
            collator=eval_collator,
            batch_size=config.eval_batch_size or config.batch_size,
            max_batches=config.eval_batches,
            precision=config.precision,
            seed=config.seed,
            metric_fns=metric_fns,
        )
        state.last_eval = {"step": state.step, **metrics}
        log.write({"step": state.step, "epoch": state.epoch, **{f"eval_{k}": v for k, v in metrics.items()}})
        for cb in callbacks:
            cb.on_evaluate(state, metrics)
        return metrics

    # --- resume: weights, optimizer, schedule, RNG, data position ---------------------
    resume_from = config.resume
    if resume_from == "auto" or resume_from is True:  # the latest checkpoint of this output_dir, if any
        resume_from = latest_checkpoint(checkpoint_root)
    if resume_from:
        trainer_state, extra = load_checkpoint(
            resume_from,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            collator=collator if hasattr(collator, "load_state_dict") else None,
        )  # restores the RNG states last: nothing below may draw random numbers before the loop
        saved_order = {k: trainer_state["sampler"].get(k) for k in ORDER_KEYS}
        if saved_order != {k: sampler.state_dict()[k] for k in ORDER_KEYS}:
            raise ValueError(
                f"resume: checkpoint {resume_from} was written with data order {trainer_state['sampler']}, "
                f"this run has {sampler.state_dict()}"
            )
        state.step = trainer_state["step"]
        state.epoch = trainer_state["epoch"]
        state.batch_in_epoch = trainer_state["batch_in_epoch"]
        # The position in global samples (older checkpoints: micro-batches x their batch size).
        state.samples_in_epoch = trainer_state.get(
            "samples_in_epoch", trainer_state["batch_in_epoch"] * trainer_state["sampler"]["batch_size"]
        )
        state.tokens_seen = trainer_state["tokens_seen"]
        state.last_eval = trainer_state.get("last_eval", {})
        state.checkpoint_path = resume_from
        for cb, cb_state in zip(callbacks, extra.get("callbacks", [])):
            cb.load_state_dict(cb_state)

    for cb in callbacks:
        cb.on_train_begin(state)

    # --- the loop: one iteration = one optimizer step -----------------------------
    model.train()
    progress = tqdm(
        total=total_steps,
        initial=state.step,
        disable=not (config.progress and parallel.is_main),
        unit="step",
        dynamic_ncols=True,
    )
    epoch_batches, epoch_of_batches = None, None
    last_saved_step = state.step if resume_from else None
    try:
        while state.step < total_steps and not state.should_stop:
            if epoch_of_batches != state.epoch:  # the rest of this epoch's order (depends on seed and epoch only)
                epoch_batches = list(sampler.global_batches(state.epoch, start_sample=state.samples_in_epoch))
                epoch_of_batches, next_batch = state.epoch, 0
                if not epoch_batches:  # resumed (with another batch shape) inside the epoch's remainder
                    state.epoch += 1
                    state.batch_in_epoch = state.samples_in_epoch = 0
                    continue
            step_batches = epoch_batches[next_batch : next_batch + config.grad_accum_steps]  # all ranks' examples
            next_batch += len(step_batches)
            started = time.perf_counter()
            micro_batches = [to_device(collator(fetch(train_data, sampler.shard(b))), device) for b in step_batches]
            tokens = round(parallel.all_reduce_sum([sum(count_tokens(b) for b in micro_batches)])[0])

            parallel.refresh()  # DDP: re-register parameters if a callback (un)froze some
            step_losses = accumulate_gradients(
                model,
                objective,
                micro_batches,
                precision=config.precision,
                scaler=scaler,
                extra_losses=extra_losses,
                parallel=parallel,
            )
            scaler.unscale_(optimizer)  # true gradients before clipping (no-op unless fp16)
            with_grad = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            grad_norm = parallel.clip_grad_norm_(with_grad, config.optim.max_grad_norm)
            scaler.step(optimizer)  # skips the step if fp16 gradients overflowed
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]  # the lr this step used (first group)
            scheduler.step()

            state.step += 1
            state.batch_in_epoch += len(step_batches)
            state.samples_in_epoch += sum(len(b) for b in step_batches)
            state.tokens_seen += tokens
            elapsed = time.perf_counter() - started
            state.last_train = {
                "step": state.step,
                "epoch": state.epoch,
                **step_losses,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens": tokens,
                "tokens_per_s": tokens / max(elapsed, 1e-9),
            }
            progress.update(1)
            progress.set_postfix(loss=f"{step_losses['loss']:.4f}", tok_s=f"{state.last_train['tokens_per_s']:.0f}")
            if state.step % config.log_every == 0 or state.step == total_steps:
                log.write(state.last_train)
            for cb in callbacks:
                cb.on_step_end(state, state.last_train)

            epoch_done = next_batch >= len(epoch_batches)
            if epoch_done:  # roll over before evaluating/saving, so a checkpoint never sits at an epoch's end
                for cb in callbacks:
                    cb.on_epoch_end(state)
                state.epoch += 1
                state.batch_in_epoch = state.samples_in_epoch = 0
            if eval_data is not None and (
                (config.eval_every and state.step % config.eval_every == 0)
                or (not config.eval_every and epoch_done)
                or state.step == total_steps
            ):
                run_evaluation()  # every rank evaluates the whole held-out set (FSDP needs all of them)
            if config.save_every and state.step % config.save_every == 0:
                checkpoint()
                last_saved_step = state.step
        progress.close()

        # --- the end: final evaluation, checkpoint, export, plot ---------------------------
        if eval_data is not None and state.last_eval.get("step") != state.step:
            run_evaluation()
        if last_saved_step != state.step:
            checkpoint()
        if config.export and hasattr(model, "save_pretrained"):
            full_weights = parallel.full_state_dict(model) if parallel.mode == "fsdp" else None  # gathers: all ranks
            if parallel.is_main:
                state.export_path = export_pretrained(
                    model,
                    tokenizer,
                    os.path.join(output_dir, "final"),
                    state_dict=full_weights,
                    architecture=parallel.model_class.__name__ if full_weights is not None else None,
                )
    except RuntimeError as error:
        if not (parallel.enabled and parallel.world_size > 1 and _is_communication_error(error)):
            raise
        message = parallel.failure_message(error, state.checkpoint_path)
        print(message, file=sys.stderr, flush=True)  # before the launcher may kill this process
        raise RuntimeError(message) from error
    finally:
        if dropout_swap is not None:
            dropout_swap.restore()
    if config.plot and parallel.is_main:
        plot_curves(log.path, os.path.join(output_dir, "curves.png"))
    for cb in callbacks:
        cb.on_train_end(state)
    return state

