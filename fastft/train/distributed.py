"""Data parallelism for the training loop: DDP and FSDP2 under ``torchrun``.

    torchrun --nproc_per_node 8 -m fastft pretrain --config run.yaml distributed=fsdp

The loop (``fastft.train.loop``) stays one loop; what differs between one process and N
lives here, behind one object, ``Parallel``:

- ``setup_parallel(config)`` reads torchrun's environment (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), joins the process group (NCCL on GPUs,
  gloo on CPUs) with ``parallel.timeout_s`` as the collective timeout, and checks with a
  barrier that every rank arrived;
- ``Parallel.wrap(model)``: DDP (a replica per rank, gradients all-reduced), or FSDP2
  (``torch.distributed.fsdp.fully_shard`` on each transformer block, then on the root:
  weights, gradients and optimizer state sharded over the ranks, optional
  ``CPUOffloadPolicy`` and ``MixedPrecisionPolicy``). The optimizer is built after this;
- ``gradient_sync(enabled)``: gradient accumulation without communication on the inner
  micro-steps (DDP ``no_sync``, FSDP2 ``set_requires_gradient_sync(False)``);
- ``all_reduce_sum``: supervised-token counts (before the forward passes, so every rank
  normalises by the *global* count) and the logged losses;
- ``clip_grad_norm_``, ``full_state_dict`` (gathered on rank 0 for export),
  ``failure_message`` (what every surviving rank prints when a peer dies).

Gradient scale: DDP and FSDP *average* gradients over ranks. Each rank's loss is its
share of the global loss (its summed losses / the global count), whose *sum* over ranks
is the global loss, so the loop multiplies the objective by ``loss_scale = world_size``
before backward: the average of ``world_size x share`` is the sum of the shares.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.distributed as dist

from fastft.peft.sharding import full_tensor
from fastft.train.runtime import resolve_device

__all__ = ["Parallel", "full_tensor", "setup_parallel", "trainable_state_dict", "transformer_blocks"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, None: None}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP2 shards one by one (each is gathered only while it runs).

    The elements of ``nn.ModuleList``s whose class Hugging Face names in
    ``_no_split_modules`` (``BertLayer``, ``GPT2Block``, ``LlamaDecoderLayer``...; that list
    may also name non-repeated parts such as ``BertEmbeddings``, which stay with the root),
    else the elements of the ``nn.ModuleList`` holding the most parameters. A block sharing
    a parameter with anything outside it (tied weights) is left to the root: FSDP2 needs
    shared parameters in one group. Returns [] when there is none (then only the root is
    sharded: correct, with less overlap of communication and compute).
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    blocks = [block for modules in lists for block in modules if type(block).__name__ in names]
    if not blocks and lists:
        blocks = list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))
    owners: dict[int, int] = {}  # parameter id -> how many module attributes hold it
    for _, param in model.named_parameters(remove_duplicate=False):
        owners[id(param)] = owners.get(id(param), 0) + 1

    def self_contained(block):
        inside: dict[int, int] = {}
        for _, param in block.named_parameters(remove_duplicate=False):
            inside[id(param)] = inside.get(id(param), 0) + 1
        return all(owners[i] == n for i, n in inside.items())

    return [block for block in blocks if self_contained(block)]


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{name: full CPU tensor}`` of the parameters that require grad -- the adapter-only
    state of LoRA / adapters / prefix tuning plus ``modules_to_save``. Under FSDP2 each
    rank holds a shard of every parameter; saving ``model.state_dict()`` filtered on one
    rank would keep only that rank's shards, so each tensor is gathered from all of them.
    Call it on every rank (every rank gets the result; write it from rank 0)."""
    return {name: full_tensor(p).cpu() for name, p in model.named_parameters() if p.requires_grad}


class _ForwardingDDP(torch.nn.parallel.DistributedDataParallel):
    """DDP that still looks like the model it wraps to the code calling it.

    Objectives pick the batch keys a model accepts from ``inspect.signature(model.forward)``
    and may read attributes such as ``model.config``; plain DDP has ``forward(*inputs,
    **kwargs)`` and none of the attributes. Here ``forward`` carries the wrapped model's
    signature (``__wrapped__``, which ``inspect.signature`` follows) and unknown attributes
    are looked up on the wrapped model.
    """

    def __init__(self, module: torch.nn.Module, **kwargs):
        super().__init__(module, **kwargs)
        ddp_forward = super().forward

        def forward(*args, **kwargs):
            return ddp_forward(*args, **kwargs)

        forward.__wrapped__ = module.forward  # inspect.signature reports the model's own parameters
        self.forward = forward

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":  # not set yet (inside DDP.__init__): no recursion
                raise
            return getattr(self.module, name)


@dataclass
class Parallel:
    """How this process takes part in training. ``mode`` is "none" (one process),
    "ddp" or "fsdp"; ``rank`` / ``world_size`` / ``local_rank`` come from torchrun."""

    mode: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timeout_s: float = 600.0
    options: Any = None  # ParallelConfig
    forward_model: torch.nn.Module | None = None  # what the objective calls (DDP wrapper, or the model)
    model_class: type | None = None  # the model's class before fully_shard renamed it
    _trainable_at_wrap: tuple = ()
    _module: torch.nn.Module | None = None

    # -------------------------------------------------------------------- basic facts

    @property
    def enabled(self) -> bool:
        return self.mode in ("ddp", "fsdp")

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, the progress bar, plots and exports."""
        return self.rank == 0

    @property
    def loss_scale(self) -> float:
        """Multiplier of the objective before backward (see the module docstring)."""
        return float(self.world_size) if self.enabled else 1.0

    # ----------------------------------------------------------------------- wrapping

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """Prepare ``model`` for this mode; returns the module the loop keeps as
        ``TrainState.model`` (its parameter names unchanged). DDP: the model on this
        rank's device, with ``forward_model`` the DDP wrapper. FSDP: the model itself,
        sharded in place (blocks first, then the root), ``forward_model`` the same.
        Build the optimizer *after* this call: FSDP replaces the parameters."""
        self._module = model
        self.model_class = type(model)
        if self.mode == "fsdp":
            self._shard(model)
            self.forward_model = model
        elif self.mode == "ddp":
            model.to(self.device)
            self._wrap_ddp(model)
        else:
            model.to(self.device)
            self.forward_model = model
        return model

    def _wrap_ddp(self, model: torch.nn.Module) -> None:
        # DDP registers, at construction, the parameters that require grad; it is rebuilt
        # when that set changes (gradual unfreezing): see refresh().
        self._trainable_at_wrap = tuple(p.requires_grad for p in model.parameters())
        self.forward_model = _ForwardingDDP(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=bool(self.options and self.options.find_unused_parameters),
        )

    def _shard(self, model: torch.nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        options = self.options
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        kwargs = {"mesh": mesh, "reshard_after_forward": options.reshard_after_forward if options else True}
        if options is not None and (options.param_dtype or options.reduce_dtype):
            kwargs["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=DTYPES[options.param_dtype], reduce_dtype=DTYPES[options.reduce_dtype]
            )
        # CPU offload: sharded weights/grads/optimizer state live in pinned CPU memory and
        # the optimizer steps there; each block is copied to the GPU only while it runs.
        # (Pinned memory makes the copies asynchronous; it needs CUDA.)
        offload = options is not None and options.cpu_offload
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=self.device.type == "cuda") if offload else OffloadPolicy()
        for block in transformer_blocks(model):
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)  # the root: embeddings, head, final norm

    def refresh(self) -> None:
        """Rebuild the DDP wrapper when the set of trainable parameters changed (a frozen
        layer was unfrozen): DDP only all-reduces the parameters it saw at construction."""
        if self.mode != "ddp" or self._module is None:
            return
        if tuple(p.requires_grad for p in self._module.parameters()) != self._trainable_at_wrap:
            self._wrap_ddp(self._module)

    # --------------------------------------------------------------- communication

    def gradient_sync(self, enabled: bool):
        """Context for one micro-step's backward: ``enabled=False`` keeps the gradient
        local (accumulation), ``True`` (the last micro-step) reduces it over ranks."""
        if self.mode == "ddp" and not enabled:
            return self.forward_model.no_sync()
        if self.mode == "fsdp":
            self._module.set_requires_gradient_sync(enabled)  # recursive over every sharded block
        return contextlib.nullcontext()

    def all_reduce_sum(self, values: Iterable[float]) -> list[float]:
        """Element-wise sum over ranks of a list of numbers (one collective, float64 so
        token counts stay exact). Identity for one process."""
        values = [float(v) for v in values]
        if not self.enabled or self.world_size == 1:
            return values
        device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        tensor = torch.tensor(values, dtype=torch.float64, device=device)  # (len(values),)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def barrier(self) -> None:
        """Wait for every rank. On gloo a ``monitored_barrier``: past the timeout it raises
        naming the ranks that did not arrive, instead of waiting forever."""
        if not self.enabled or self.world_size == 1:
            return
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=self.timeout_s), wait_all_ranks=True)
        else:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def clip_grad_norm_(self, parameters: list[torch.nn.Parameter], max_norm: float | None) -> float:
        """Clip the global gradient norm to ``max_norm`` (None/0: only measure it); returns
        the norm before clipping. Under FSDP each rank holds shards of the gradients: the
        squared norms of the local shards are summed over ranks."""
        limit = max_norm if max_norm else float("inf")
        if self.mode != "fsdp":
            # torch's clip_grad_norm_, without its multiply-by-1.0 pass over every gradient
            # when the norm is under the limit (~2% of a small CPU step): the same numbers.
            norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
            if float(norm) + 1e-6 > limit:  # torch's coefficient limit / (norm + 1e-6) is < 1
                torch.nn.utils.clip_grads_with_norm_(parameters, limit, norm)
            return float(norm)
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in parameters if p.grad is not None]
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        squares = sum(float(g.detach().float().pow(2).sum()) for g in local)
        norm = self.all_reduce_sum([squares])[0] ** 0.5
        coefficient = limit / (norm + 1e-6)
        if coefficient < 1.0:
            for g in local:
                g.detach().mul_(coefficient)
        return norm

    # ----------------------------------------------------------------- state dicts

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole model's state dict as full CPU tensors on rank 0 (None elsewhere).
        Under FSDP every rank takes part in the gathers: call it on every rank."""
        if self.mode != "fsdp":
            return {k: v.detach().cpu() for k, v in model.state_dict().items()} if self.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.is_main else None

    def failure_message(self, error: BaseException, checkpoint: str | None) -> str:
        return (
            f"fastft: rank {self.rank} of {self.world_size} stops: a collective failed or waited longer than "
            f"parallel.timeout_s={self.timeout_s:g} s -- another rank probably died or hung (see its log above). "
            f"Last complete checkpoint: {checkpoint or 'none'} (resume with resume=auto). "
            f"Cause: {type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        )


def _on_sigterm(signum, frame):  # torchrun sends SIGTERM to the other workers when one fails
    rank = os.environ.get("RANK", "?")
    print(f"fastft: rank {rank}: stopped by the launcher (signal {signum}); another rank failed", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


def setup_parallel(config) -> Parallel:
    """Join (or create) the process group for ``config.distributed`` and return ``Parallel``.

    ``"auto"`` means "ddp" when launched with ``WORLD_SIZE > 1`` and "none" otherwise.
    "ddp"/"fsdp" without torchrun's environment start a one-process group (useful for FSDP
    CPU offload on one device). An existing process group is used as it is.

    Raises:
        ValueError: ``distributed: none`` under a multi-process launch (every rank would
            train the whole data set and write the same files); ``fsdp`` with fp16 autocast.
    """
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    mode = config.distributed
    if mode == "auto":
        mode = "ddp" if env_world > 1 or (dist.is_available() and dist.is_initialized()) else "none"
    if mode == "none":
        if env_world > 1:
            raise ValueError(
                f"distributed: none, but launched with WORLD_SIZE={env_world}: set distributed=ddp or distributed=fsdp"
            )
        return Parallel(device=resolve_device(config.device), options=config.parallel)
    if mode == "fsdp" and config.precision == "fp16":
        raise ValueError("distributed: fsdp does not support precision=fp16 (GradScaler); use bf16, or parallel.param_dtype")
    timeout_s = config.parallel.timeout_s
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:  # a lone process without torchrun
            os.environ.update(MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        use_cuda = config.device in ("auto", "cuda") and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s)
        )
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
        if os.environ.get("TORCHELASTIC_RUN_ID") and hasattr(signal, "SIGTERM"):
            with contextlib.suppress(ValueError):  # only possible in the main thread
                signal.signal(signal.SIGTERM, _on_sigterm)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu") if config.device in ("auto", "cpu") else torch.device(config.device)
    parallel = Parallel(
        mode=mode,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=device,
        timeout_s=timeout_s,
        options=config.parallel,
    )
    parallel.barrier()  # every rank is here, or a clear error naming the missing ones
    return parallel
