"""The training loop shared by pretraining and fine-tuning. Read ``train`` top to bottom.

    state = train(model, objective, train_data, collator=..., config=TrainConfig(...))

What varies between runs comes in from outside; the loop itself stays the same:

- the **objective** (``fastft.train.objectives``) turns a batch into summed losses and
  says how many items (tokens, examples) each batch supervises;
- **param_groups** (a list of torch parameter-group dicts, or a function of the model
  returning one) give per-group learning rates / weight decay -- discriminative
  fine-tuning, layer-wise decay;
- **callbacks** (``fastft.train.callbacks``) run at step end, evaluation and epoch end:
  early stopping, gradual unfreezing, best-model selection;
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
import json
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from fastft.data.batching import count_tokens, fetch, to_device
from fastft.data.sampler import ORDER_KEYS, EpochBatches
from fastft.train.callbacks import Callback, EarlyStopping
from fastft.errors import TrainingDiverged
from fastft.train.checkpoint import (
    export_pretrained,
    latest_checkpoint,
    load_checkpoint,
    model_fingerprint,
    read_trainer_state,
    save_checkpoint,
)
from fastft.train.config import TrainConfig, run_record
from fastft.train.distributed import Parallel, setup_parallel
from fastft.train.evaluation import evaluate
from fastft.train.metrics import MetricsLog, plot_curves
from fastft.train.objectives import Objective, get_objective
from fastft.train.optim import build_optimizer
from fastft.train.output_dir import claim_output_dir
from fastft.train.runtime import autocast, maybe_patch, seed_everything, with_precision_resolved
from fastft.train.schedules import build_scheduler, warmup_steps_for

__all__ = ["TrainState", "accumulate_gradients", "train"]


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
    # The loop's machinery, kept here so the named steps below share it:
    sampler: EpochBatches | None = None
    scaler: torch.amp.GradScaler | None = None
    callbacks: list[Callback] = field(default_factory=list)
    log: MetricsLog | None = None
    last_saved_step: int | None = None
    run_id: str = ""  # names this run's checkpoints (kept across resumes): pruning touches only those
    unlogged: list[dict] = field(default_factory=list)  # per-step records since the last metrics.jsonl line


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
        OutputDirInUse: ``output_dir`` holds another run and neither ``resume`` nor
            ``overwrite`` is set (``fastft.train.output_dir``).
        TrainingDiverged: the loss or gradient norm became NaN / infinite; the run stops
            before that step's update, its checkpoints intact.
        ValueError: empty ``train_data``; ``resume`` pointing at a checkpoint of another
            model or data order; ``distributed: none`` under a multi-process launch.
        RuntimeError: (distributed) a collective failed or timed out because another
            rank died or hung; the message names this rank and the last checkpoint.
    """
    config = with_precision_resolved(config or TrainConfig())  # precision="auto" -> bf16 / fp32 here, printed
    if len(train_data) == 0:
        raise ValueError("train_data is empty")
    state = _set_up(model, get_objective(objective), len(train_data), config, param_groups, callbacks, collator)
    model, parallel, device = state.model, state.parallel, state.parallel.device
    if parallel.world_size > 1 and parallel.rank > 0 and hasattr(collator, "reseeded"):  # distinct masks per rank
        collator = collator.reseeded(getattr(collator, "seed", config.seed) + 7919 * parallel.rank)

    def checkpoint():
        _save(state, collator, tokenizer)

    def run_evaluation():
        _evaluate(state, eval_data, eval_collator or collator, metric_fns)

    if config.resume:
        _resume(state, collator)
    for cb in state.callbacks:
        cb.on_train_begin(state)

    model.train()
    progress = tqdm(total=state.total_steps, initial=state.step, unit="step", dynamic_ncols=True,
                    disable=not (config.progress and parallel.is_main))
    epoch_batches, next_batch = [], 0
    try:
        while state.step < state.total_steps and not state.should_stop:
            if next_batch == 0:  # the rest of this epoch's order (depends on seed and epoch only)
                epoch_batches = list(state.sampler.global_batches(state.epoch, start_sample=state.samples_in_epoch))
                if not epoch_batches:  # resumed (with another batch shape) inside the epoch's remainder
                    _next_epoch(state)
                    continue
            step_batches = epoch_batches[next_batch : next_batch + config.grad_accum_steps]  # all ranks' examples
            next_batch += len(step_batches)
            started = time.perf_counter()
            micro_batches = [to_device(collator(fetch(train_data, state.sampler.shard(b))), device) for b in step_batches]
            tokens = round(parallel.all_reduce_sum([sum(count_tokens(b) for b in micro_batches)])[0])

            parallel.refresh()  # DDP: re-register parameters if a callback (un)froze some
            losses = accumulate_gradients(model, state.objective, micro_batches, precision=config.precision,
                                          scaler=state.scaler, extra_losses=extra_losses, parallel=parallel)
            grad_norm, lr = _optimizer_step(state, losses)

            state.step += 1
            state.batch_in_epoch += len(step_batches)
            state.samples_in_epoch += sum(len(b) for b in step_batches)
            state.tokens_seen += tokens
            elapsed = time.perf_counter() - started
            state.last_train = {"step": state.step, "epoch": state.epoch, **losses, "lr": lr, "grad_norm": grad_norm,
                                "tokens": tokens, "tokens_per_s": tokens / max(elapsed, 1e-9)}
            state.unlogged.append({**state.last_train, "seconds": elapsed})
            progress.update(1)
            progress.set_postfix(loss=f"{losses['loss']:.4f}", tok_s=f"{state.last_train['tokens_per_s']:.0f}")
            if state.step % config.log_every == 0 or state.step == state.total_steps:
                _log_interval(state)
            for cb in state.callbacks:
                cb.on_step_end(state, state.last_train)

            epoch_done = next_batch >= len(epoch_batches)
            if epoch_done:  # roll over before evaluating/saving, so a checkpoint never sits at an epoch's end
                for cb in state.callbacks:
                    cb.on_epoch_end(state)
                _next_epoch(state)
                next_batch = 0
            if eval_data is not None and _evaluation_due(state, epoch_done):
                run_evaluation()  # every rank evaluates the whole held-out set (FSDP needs all of them)
            if config.save_every and state.step % config.save_every == 0:
                checkpoint()
        progress.close()
        _finish(state, eval_data is not None, run_evaluation, checkpoint, tokenizer)
    except RuntimeError as error:
        if not (parallel.enabled and parallel.world_size > 1 and _is_communication_error(error)):
            raise
        message = parallel.failure_message(error, state.checkpoint_path)
        print(message, file=sys.stderr, flush=True)  # before the launcher may kill this process
        raise RuntimeError(message) from error
    if config.plot and parallel.is_main:
        plot_curves(state.log.path, os.path.join(state.output_dir, "curves.png"),
                    perplexity_panel=state.objective.perplexity_term is not None)
    for cb in state.callbacks:
        cb.on_train_end(state)
    return state


# --------------------------------------------------------------- the loop's named steps


def _set_up(model, objective, num_examples, config, param_groups, callbacks, collator) -> TrainState:
    """Process group, output directory, seeds, the (patched, wrapped) model, data order,
    step budget, optimizer, schedule, callbacks and the metrics log, in that order (the
    order of random draws is part of exact resume)."""
    output_dir = os.path.abspath(config.output_dir)
    moved = claim_output_dir(output_dir, resume=config.resume, overwrite=config.overwrite)
    if moved:
        print(f"fastft: overwrite: the previous run in {output_dir} was moved to {moved}", file=sys.stderr)
    parallel = setup_parallel(config)  # one process, or this rank of a torchrun job
    if parallel.is_main:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "run_config.json"), "w") as f:  # what this run was asked to do
            json.dump(run_record(config), f, indent=2)
    seed_everything(config.seed)
    model = maybe_patch(model, config.fused)
    if config.gradient_checkpointing:
        # Recompute activations in backward: ~1/3 more compute for far less memory.
        # (recent transformers call it activation_checkpointing_enable; older ones only have this name)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
            model.config.use_cache = False  # a KV cache is useless in training and clashes with checkpointing
    model = parallel.wrap(model)  # to this rank's device; DDP wraps it, FSDP shards it (per block, then the root)
    if parallel.world_size > 1:
        seed_everything(config.seed + parallel.rank)  # the same weights everywhere, distinct dropout per rank
    scaler = torch.amp.GradScaler(parallel.device.type, enabled=config.precision == "fp16")
    sampler = EpochBatches(num_examples, config.batch_size, shuffle=True, seed=config.seed,
                           world_size=parallel.world_size, rank=parallel.rank)
    steps_per_epoch = math.ceil(len(sampler) / config.grad_accum_steps)  # an epoch's last step may be short
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    optimizer = build_optimizer(model, config.optim, param_groups, parallel.device)  # after FSDP replaced the parameters
    warmup = warmup_steps_for(total_steps, config.schedule.warmup_steps, config.schedule.warmup_ratio)
    scheduler = build_scheduler(optimizer, config.schedule.name, total_steps=total_steps, warmup_steps=warmup,
                                min_lr_ratio=config.schedule.min_lr_ratio, **config.schedule.options)
    callbacks = list(callbacks)
    if config.early_stopping_patience:
        callbacks.append(EarlyStopping(config.early_stopping_patience, config.early_stopping_metric))
    # Only rank 0 logs: the other ranks write their (identical) records to /dev/null.
    log = MetricsLog(os.path.join(output_dir, "metrics.jsonl") if parallel.is_main else os.devnull)
    return TrainState(model, optimizer, scheduler, config, objective, total_steps, output_dir=output_dir,
                      parallel=parallel, sampler=sampler, scaler=scaler, callbacks=callbacks, log=log,
                      run_id=uuid.uuid4().hex)


def _resume(state: TrainState, collator) -> None:
    """Weights, optimizer, schedule, RNG and data position from ``config.resume`` (a
    checkpoint path, or "auto" / True: the latest of this output directory, if any)."""
    resume_from = state.config.resume
    if resume_from == "auto" or resume_from is True:
        resume_from = latest_checkpoint(os.path.join(state.output_dir, "checkpoints"))
    if not resume_from:
        state.log.truncate_after(0)  # nothing to resume: what a crashed start logged goes
        return
    _check_resumable(state, resume_from, read_trainer_state(resume_from))
    trainer_state, extra = load_checkpoint(
        resume_from, model=state.model, optimizer=state.optimizer, scheduler=state.scheduler, scaler=state.scaler,
        collator=collator if hasattr(collator, "load_state_dict") else None,
    )  # restores the RNG states last: nothing after this may draw random numbers before the loop
    state.step = state.last_saved_step = trainer_state["step"]
    state.run_id = trainer_state.get("run_id") or state.run_id  # checkpoints of fastft 0.1.0 have none
    state.epoch = trainer_state["epoch"]
    state.batch_in_epoch = trainer_state["batch_in_epoch"]
    # The position in global samples (older checkpoints: micro-batches x their batch size).
    state.samples_in_epoch = trainer_state.get(
        "samples_in_epoch", trainer_state["batch_in_epoch"] * trainer_state["sampler"]["batch_size"]
    )
    state.tokens_seen = trainer_state["tokens_seen"]
    state.last_eval = trainer_state.get("last_eval", {})
    state.checkpoint_path = resume_from
    for cb, cb_state in zip(state.callbacks, extra.get("callbacks", [])):
        cb.load_state_dict(cb_state)
    dropped = state.log.truncate_after(state.step)  # lines the interrupted run wrote after this checkpoint
    if state.parallel.is_main:
        print(f"fastft: resumed from step {state.step} ({resume_from})"
              + (f"; dropped {dropped} metrics line(s) logged after it" if dropped else ""), file=sys.stderr)


def _check_resumable(state: TrainState, path: str, saved: dict) -> None:
    """Refuse, in one line, a checkpoint of another model or data order (before loading it)."""
    differences = []
    saved_model, this_model = saved.get("model"), model_fingerprint(state.model)
    if saved_model is not None and saved_model != this_model:
        differences += [f"{key} {saved_model.get(key)} vs {this_model[key]}" for key in this_model
                        if saved_model.get(key) != this_model[key]]
    saved_order = {k: saved["sampler"].get(k) for k in ORDER_KEYS}
    this_order = {k: state.sampler.state_dict()[k] for k in ORDER_KEYS}
    differences += [f"{key} {saved_order[key]} vs {this_order[key]}" for key in ORDER_KEYS
                    if saved_order[key] != this_order[key]]
    if differences:
        raise ValueError(f"resume: checkpoint {path} is of another run (checkpoint vs this run: "
                         f"{'; '.join(differences)}); start a new run in another output_dir, or overwrite=true")


def _optimizer_step(state: TrainState, losses: dict[str, float]) -> tuple[float, float]:
    """Unscale (fp16), clip, step, zero the gradients, advance the schedule. Returns the
    gradient norm before clipping and the learning rate the step used (first group).

    A NaN / infinite loss, or gradient norm (outside fp16, where GradScaler skips such a
    step and lowers its scale), stops the run before the update: ``TrainingDiverged``."""
    optimizer, scaler = state.optimizer, state.scaler
    scaler.unscale_(optimizer)  # true gradients before clipping (no-op unless fp16)
    with_grad = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    grad_norm = float(state.parallel.clip_grad_norm_(with_grad, state.config.optim.max_grad_norm))
    if not math.isfinite(losses["loss"]) or (not math.isfinite(grad_norm) and not scaler.is_enabled()):
        _diverged(state, losses, grad_norm)
    scaler.step(optimizer)  # skips the step if fp16 gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    lr = state.scheduler.get_last_lr()[0]
    state.scheduler.step()
    return grad_norm, lr


def _diverged(state: TrainState, losses: dict[str, float], grad_norm: float) -> None:
    step, config = state.step + 1, state.config
    if state.unlogged:
        _log_interval(state)  # the good steps since the last line, then the bad one
    state.log.write({"step": step, "epoch": state.epoch, **losses, "grad_norm": grad_norm, "diverged": True})
    kept = f"the last checkpoint, {state.checkpoint_path}, is intact" if state.checkpoint_path else "no checkpoint was written"
    raise TrainingDiverged(
        f"step {step}: the loss is {losses['loss']:.4g} and the gradient norm {grad_norm:.4g}: training diverged and "
        f"stopped before this update ({kept}); try a lower learning rate (optim.lr={config.optim.lr:g} now)"
        + (f" or precision=bf16 / fp32 instead of {config.precision}" if config.precision != "fp32" else "")
    )


def _log_interval(state: TrainState) -> None:
    """One metrics.jsonl line for the steps since the last: the last step's record with its
    losses averaged over them and the throughput over their total time (a single step's
    loss every ``log_every`` steps is noise, not a curve)."""
    steps = state.unlogged
    means = {k: sum(r[k] for r in steps) / len(steps) for k in state.last_train
             if k.endswith("loss") and all(k in r for r in steps)}
    tokens = sum(r["tokens"] for r in steps)
    state.log.write({**state.last_train, **means, "tokens": tokens,
                     "tokens_per_s": tokens / max(sum(r["seconds"] for r in steps), 1e-9), "steps_logged": len(steps)})
    state.unlogged = []


def _next_epoch(state: TrainState) -> None:
    state.epoch += 1
    state.batch_in_epoch = state.samples_in_epoch = 0


def _evaluation_due(state: TrainState, epoch_done: bool) -> bool:
    """Every ``eval_every`` steps, else at each epoch's end; and always at the last step."""
    every = state.config.eval_every
    return (every and state.step % every == 0) or (not every and epoch_done) or state.step == state.total_steps


def _evaluate(state: TrainState, eval_data, collator, metric_fns) -> dict:
    config = state.config
    metrics = evaluate(state.model, eval_data, state.objective, collator=collator,
                       batch_size=config.eval_batch_size or config.batch_size, max_batches=config.eval_batches,
                       precision=config.precision, seed=config.seed, metric_fns=metric_fns)
    state.last_eval = {"step": state.step, **metrics}
    state.log.write({"step": state.step, "epoch": state.epoch, **{f"eval_{k}": v for k, v in metrics.items()}})
    for cb in state.callbacks:
        cb.on_evaluate(state, metrics)
    return metrics


def _save(state: TrainState, collator, tokenizer) -> None:
    """A checkpoint of everything exact resume needs (DCP shards from every rank when distributed)."""
    state.checkpoint_path = save_checkpoint(
        os.path.join(state.output_dir, "checkpoints"),
        state.step,
        model=state.model,
        optimizer=state.optimizer,
        scheduler=state.scheduler,
        scaler=state.scaler,
        collator=collator if hasattr(collator, "state_dict") else None,
        trainer_state={
            "epoch": state.epoch,
            "batch_in_epoch": state.batch_in_epoch,
            "samples_in_epoch": state.samples_in_epoch,  # global samples: re-shardable over any world size
            "tokens_seen": state.tokens_seen,
            "total_steps": state.total_steps,
            "sampler": state.sampler.state_dict(),
            "last_eval": state.last_eval,
            "model": model_fingerprint(state.model),
        },
        extra_state={"callbacks": [cb.state_dict() for cb in state.callbacks]},
        tokenizer=tokenizer,
        keep_last=state.config.keep_last,
        parallel=state.parallel,
        run_id=state.run_id,
    )
    state.last_saved_step = state.step


def _finish(state: TrainState, has_eval_data: bool, run_evaluation, checkpoint, tokenizer) -> None:
    """The last metrics line (a run stopped early may end inside an interval), evaluation
    and checkpoint (unless this step already had them), and the Hugging Face export
    (FSDP: weights gathered from every rank, written by rank 0)."""
    if state.unlogged:
        _log_interval(state)
    if has_eval_data and state.last_eval.get("step") != state.step:
        run_evaluation()
    if state.last_saved_step != state.step:
        checkpoint()
    model, parallel = state.model, state.parallel
    if state.config.export and hasattr(model, "save_pretrained"):
        full_weights = parallel.full_state_dict(model) if parallel.mode == "fsdp" else None  # a collective
        if parallel.is_main:
            state.export_path = export_pretrained(
                model, tokenizer, os.path.join(state.output_dir, "final"), state_dict=full_weights,
                architecture=parallel.model_class.__name__ if full_weights is not None else None,
            )


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
    counts = [objective.counts(batch) for batch in micro_batches]  # once per micro-batch: they only need the labels
    totals: dict[str, int] = {}
    for batch_counts in counts:
        for term, count in batch_counts.items():
            totals[term] = totals.get(term, 0) + count
    if distributed:  # every rank divides by the global batch's counts (one collective)
        terms = sorted(totals)
        totals = dict(zip(terms, (round(c) for c in parallel.all_reduce_sum(totals[t] for t in terms))))
    term_losses = {term: [] for term in totals}  # detached per-micro-batch parts, summed at the end
    extra_parts = []
    for i, (batch, batch_counts) in enumerate(zip(micro_batches, counts)):
        last = i == len(micro_batches) - 1
        with parallel.gradient_sync(last) if distributed else contextlib.nullcontext():
            with autocast(device, precision):
                sums, outputs = objective.loss(forward_model, batch, batch_counts)
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
