"""Atomic checkpoints with exact resume, and Hugging Face export.

A checkpoint is a directory ``<output_dir>/checkpoints/step-000123/``:

    model.safetensors    the model's state dict (safetensors; tied weights stored once)
    config.json          the model's config, so ``from_pretrained`` loads the directory
    tokenizer files      when a tokenizer is given
    training_state.pt    optimizer, scheduler, GradScaler, collator generator, RNG states
                         (python, numpy, torch CPU and CUDA), callbacks' states
    trainer_state.json   step, epoch, batches consumed in the epoch, sampler, best metric

Distributed runs (DDP / FSDP: ``save_checkpoint(..., parallel=...)``) write the same directory with
the weights and optimizer state through ``torch.distributed.checkpoint`` (DCP) instead:

    dcp/                 model + optimizer state dicts, each rank writing its own shards
                         (``get_state_dict``: FSDP2 DTensor shards, DDP replicas deduplicated)
    rank-00000.pt ...    per rank: scheduler, GradScaler, collator generator, RNG states,
                         callbacks' states
    config.json, tokenizer files, trainer_state.json (with ``world_size``)

DCP re-shards on load, so such a checkpoint resumes with any number of ranks, and also in
a single process (``load_checkpoint`` recognises the layout).

Atomicity: everything is written into a hidden ``.tmp-...`` sibling directory, flushed to
disk, and only then renamed to ``step-NNNNNN`` with ``os.replace`` (a single rename on
POSIX). A crash at any moment leaves either no new directory or a complete one; hidden
leftovers are never listed and are swept at the next save.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import uuid
import warnings
from typing import Any

import numpy as np
import safetensors.torch
import torch

__all__ = [
    "export_pretrained",
    "model_fingerprint",
    "read_trainer_state",
    "is_sharded_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

_STEP_DIR = re.compile(r"^step-(\d+)$")
MODEL_FILE = "model.safetensors"
TRAINING_STATE_FILE = "training_state.pt"
TRAINER_STATE_FILE = "trainer_state.json"
DCP_DIR = "dcp"


def _rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU, every CUDA device) generator states, as tensors and
    plain Python values (loadable with ``torch.load(weights_only=True)``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(path: str) -> None:
    """Flush every file under ``path`` (and the directories) to disk before the rename."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_publish(tmp: str, final: str) -> None:
    """Rename complete directory ``tmp`` to ``final``, replacing an existing ``final``."""
    _fsync_tree(tmp)
    if os.path.exists(final):
        # os.replace cannot overwrite a non-empty directory: move the old one aside first.
        trash = os.path.join(os.path.dirname(final), f".old-{os.path.basename(final)}-{uuid.uuid4().hex[:8]}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(os.path.dirname(final))


def _sweep_leftovers(root: str) -> None:
    """Remove hidden directories left by saves that crashed."""
    for name in os.listdir(root):
        if name.startswith((".tmp-", ".old-")):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def list_checkpoints(root: str) -> list[str]:
    """Complete checkpoint directories under ``root``, oldest (lowest step) first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        if match and os.path.isfile(os.path.join(root, name, TRAINER_STATE_FILE)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return [path for _, path in sorted(found)]


def read_trainer_state(path: str) -> dict[str, Any]:
    """``trainer_state.json`` of checkpoint ``path`` (step, data position, run id, model).

    Raises:
        FileNotFoundError: ``path`` is not a complete fastft checkpoint.
    """
    file = os.path.join(path, TRAINER_STATE_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path} is not a complete fastft checkpoint (no {TRAINER_STATE_FILE})")
    with open(file) as f:
        return json.load(f)


def model_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """What identifies a model's weights for resuming: its class, parameter count, and a
    digest of every parameter's name and shape (a checkpoint of another model differs)."""
    names_shapes = [(name, tuple(param.shape)) for name, param in model.named_parameters()]
    digest = hashlib.sha256(repr(names_shapes).encode()).hexdigest()[:16]
    return {
        "class": type(model).__name__.removeprefix("FSDP"),  # FSDP2 renames a sharded model's class
        "parameters": sum(param.numel() for param in model.parameters()),
        "names_and_shapes": digest,
    }


def _prune(root: str, keep_last: int | None, run_id: str | None) -> None:
    """Remove all but the newest ``keep_last`` checkpoints *of this run* under ``root``."""
    if not keep_last or keep_last < 1:
        return
    ours = [path for path in list_checkpoints(root) if run_id is None or read_trainer_state(path).get("run_id") == run_id]
    for old in ours[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: str) -> str | None:
    """The highest-step complete checkpoint under ``root``, or None."""
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


def _per_process_states(scheduler, scaler, collator, extra_state) -> dict[str, Any]:
    """What each process saves besides weights and optimizer: small states and RNG streams."""
    return {
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "collator": None if collator is None else collator.state_dict(),
        "rng": rng_state(),
        "extra": extra_state or {},
    }


def save_checkpoint(
    root: str,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    scaler=None,
    collator=None,
    trainer_state: dict[str, Any] | None = None,
    extra_state: dict[str, Any] | None = None,
    tokenizer=None,
    keep_last: int | None = None,
    parallel=None,
    run_id: str | None = None,
) -> str:
    """Write checkpoint ``root/step-{step:06d}`` atomically; keep the newest ``keep_last``
    of the run ``run_id`` (recorded in the checkpoint; None: of every run under ``root``).

    ``trainer_state`` must be JSON-serialisable; ``extra_state`` (e.g. callbacks' states)
    goes into ``training_state.pt`` with the optimizer. Returns the checkpoint path.

    With a distributed ``parallel`` (``fastft.train.distributed.Parallel``, DDP / FSDP) this
    is a collective -- call it on every rank: each rank writes its shards through DCP
    into one hidden directory and rank 0 renames it once all have finished. ``root`` must
    then be on a file system every rank sees; ``model`` is the unwrapped (possibly
    FSDP-sharded) module.
    """
    sharded = parallel is not None and parallel.enabled
    is_main = parallel.is_main if sharded else True
    final = os.path.join(root, f"step-{step:06d}")
    # Sharded: ranks must agree on the directory's name without talking, hence no random part.
    tmp = os.path.join(root, f".tmp-step-{step:06d}-" + ("sharded" if sharded else uuid.uuid4().hex[:8]))
    if is_main:
        os.makedirs(root, exist_ok=True)
        _sweep_leftovers(root)
        os.makedirs(tmp)
    states = _per_process_states(scheduler, scaler, collator, extra_state)
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        parallel.barrier()  # nobody writes before the sweep
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=os.path.join(tmp, DCP_DIR))
        torch.save(states, os.path.join(tmp, _rank_file(parallel.rank)))
        parallel.barrier()  # every rank's files are in place
    else:
        safetensors.torch.save_model(model, os.path.join(tmp, MODEL_FILE))
        states["optimizer"] = None if optimizer is None else optimizer.state_dict()
        torch.save(states, os.path.join(tmp, TRAINING_STATE_FILE))
    if is_main:
        if getattr(model, "config", None) is not None and hasattr(model.config, "to_json_file"):
            model.config.to_json_file(os.path.join(tmp, "config.json"))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        # trainer_state.json is written last: list_checkpoints requires it.
        record = {"step": step, "run_id": run_id, **({"world_size": parallel.world_size} if sharded else {}),
                  **(trainer_state or {})}
        with open(os.path.join(tmp, TRAINER_STATE_FILE), "w") as f:
            json.dump(record, f, indent=2)
        _atomic_publish(tmp, final)
        _prune(root, keep_last, run_id)
    if sharded:
        parallel.barrier()  # the checkpoint exists for everyone before anyone goes on
    return final


def _restore_states(states: dict[str, Any], *, scheduler, scaler, collator=None, rng: bool = False) -> None:
    """Load ``_per_process_states``' entries into the given objects (None: skipped)."""
    for target, key in ((scheduler, "scheduler"), (scaler, "scaler"), (collator, "collator")):
        if target is not None and states.get(key) is not None:
            target.load_state_dict(states[key])
    if rng:
        set_rng_state(states["rng"])


def load_checkpoint(
    path: str,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    scaler=None,
    collator=None,
    restore_rng: bool = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load checkpoint ``path`` into the given objects (in place) and restore RNG states.

    Returns ``(trainer_state, extra_state)``.

    Raises:
        FileNotFoundError: ``path`` is not a complete checkpoint.
    """
    trainer_state = read_trainer_state(path)
    if is_sharded_checkpoint(path):
        return _load_sharded_checkpoint(
            path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, collator=collator, restore_rng=restore_rng
        )
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError(
            f"{path} was written by a single-process run; an FSDP run resumes from a sharded checkpoint "
            "(written by any distributed run, e.g. torchrun --nproc_per_node 1 ... distributed=fsdp)"
        )
    device = next(model.parameters()).device
    safetensors.torch.load_model(model, os.path.join(path, MODEL_FILE), device=str(device))
    state = torch.load(os.path.join(path, TRAINING_STATE_FILE), map_location="cpu", weights_only=True)
    if optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    _restore_states(state, scheduler=scheduler, scaler=scaler, collator=collator, rng=restore_rng)
    return trainer_state, state["extra"]


def export_pretrained(model, tokenizer, path: str, *, state_dict=None, architecture: str | None = None) -> str:
    """``save_pretrained`` the model (and tokenizer) into ``path`` atomically, so
    ``transformers.AutoModel*.from_pretrained(path)`` loads it directly. Returns ``path``.

    ``state_dict``: full tensors to write instead of the model's own (a sharded model's
    weights gathered on rank 0); ``architecture``: the class name recorded in config.json
    (FSDP renames a sharded model's class to ``FSDP<name>``)."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(path)}-{uuid.uuid4().hex[:8]}")
    if state_dict is None:
        model.save_pretrained(tmp)
    else:
        model.save_pretrained(tmp, state_dict=state_dict)
    if architecture is not None and os.path.isfile(os.path.join(tmp, "config.json")):
        with open(os.path.join(tmp, "config.json")) as f:
            hf_config = json.load(f)
        hf_config["architectures"] = [architecture]
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    _atomic_publish(tmp, path)
    return path


# ------------------------------------------------------------------ sharded (DCP) checkpoints


def is_sharded_checkpoint(path: str) -> bool:
    """True for a checkpoint written by a distributed run (a ``dcp/`` directory)."""
    return os.path.isdir(os.path.join(path, DCP_DIR))


def _load_sharded_checkpoint(path, *, model, optimizer, scheduler, scaler, collator, restore_rng):
    """Load a sharded (distributed) checkpoint directory into this process's objects, whatever
    the number of ranks now (DCP re-shards; no process group: a single process reads it all).

    Per-rank states: rank r reads ``rank-r.pt`` when the saving run had a rank r (random
    streams then continue exactly when the world size is unchanged), else rank 0's
    scheduler/scaler/callbacks states, keeping its own fresh random streams.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if optimizer is not None:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
    else:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = {"model": get_model_state_dict(model)}
    distributed = dist.is_available() and dist.is_initialized()
    with warnings.catch_warnings():  # without a process group DCP warns that it reads everything: that is the intent
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(state, checkpoint_id=os.path.join(path, DCP_DIR), no_dist=not distributed)
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    else:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state["model"])
    rank = dist.get_rank() if distributed else 0
    own = os.path.join(path, _rank_file(rank))
    per_rank = torch.load(own if os.path.isfile(own) else os.path.join(path, _rank_file(0)), map_location="cpu", weights_only=True)
    if os.path.isfile(own):
        _restore_states(per_rank, scheduler=scheduler, scaler=scaler, collator=collator, rng=restore_rng)
    else:  # another world size: rank 0's schedule, this rank's own fresh random streams
        _restore_states(per_rank, scheduler=scheduler, scaler=scaler)
    return read_trainer_state(path), per_rank["extra"]
