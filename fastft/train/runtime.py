"""Where and how a run executes: device, seeds, autocast, and the CPU speed-ups the
recipes switch on around the loop (the loop itself stays device-agnostic)."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import logging
import os
import platform
import random
import sys
import warnings

import numpy as np
import torch

from fastft._precision import cpu_bf16, matmul_gflops, recommended_precision

__all__ = [
    "autocast",
    "cpu_native_bf16",
    "cpu_speedups",
    "maybe_patch",
    "recommended_precision",
    "resolve_device",
    "resolve_precision",
    "retain_freed_memory",
    "seed_everything",
    "with_precision_resolved",
]

logger = logging.getLogger("fastft.train")


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; any other name as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cpu_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AMX / AVX512-BF16 / Arm BF16; see
    ``fastft._precision.cpu_bf16`` for what was found, and ``FASTFT_CPU_BF16``)."""
    return cpu_bf16().native


@functools.cache
def _emulated_bf16_warning(device_text: str) -> str:
    """The warning for bf16 on a CPU without native bf16, with this CPU's measured speeds
    (measured once per process, ~0.2 s)."""
    fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    return (f"precision='bf16' on a CPU without native bf16 will be slower than fp32, not faster: {device_text}. "
            f"Measured here, a 128x256 @ 256x256 matmul on one thread: bf16 {bf16:.2f} GFLOP/s, fp32 {fp32:.1f} "
            f"GFLOP/s ({fp32 / max(bf16, 1e-9):.0f}x). Use precision='fp32' (or 'auto', which picks it here); "
            "bf16 pays on CPUs with AMX (Intel Xeon 4th gen+) or AVX512-BF16 (AMD Zen 4+).")


def resolve_precision(precision: str, device: torch.device, *, announce: bool = False) -> str:
    """The precision a run on ``device`` computes in: ``"fp32" | "bf16" | "fp16"``.

    ``"auto"`` becomes ``recommended_precision(device)``, logged (``fastft.train`` logger)
    and, with ``announce``, printed to stderr with the reason. ``"bf16"`` on a CPU without
    native bf16 is allowed with a warning naming the measured slowdown.

    Raises:
        ValueError: ``"fp16"`` on a CPU (there is no loss-scaled fp16 path there: the
            message names bf16), or a precision that is none of fp32 / bf16 / fp16 / auto.
    """
    device = torch.device(device)
    if precision == "auto":
        precision, why = recommended_precision(device)
        logger.info("precision=auto -> %s (%s)", precision, why)
        if announce:
            print(f"fastft: precision=auto -> {precision} ({why})", file=sys.stderr, flush=True)
        return precision
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be one of fp32, bf16, fp16, auto; got {precision!r}")
    if device.type == "cpu" and precision == "fp16":
        found = cpu_bf16()
        raise ValueError(
            "precision='fp16' is not supported on the CPU: fp16 needs loss scaling, which fastft does on GPUs only, "
            "and CPUs compute fp16 no faster. Use precision='bf16' (same range as fp32, no loss scaling"
            + ("; this CPU has native bf16" if found.native else "; this CPU has no native bf16, so it will be slower")
            + ") or 'fp32' (or 'auto')."
        )
    if device.type == "cpu" and precision == "bf16" and not cpu_bf16().native:
        warnings.warn(_emulated_bf16_warning(cpu_bf16().describe()), stacklevel=2)
    return precision


def with_precision_resolved(config):
    """``config`` (a ``TrainConfig``) with its precision resolved for ``config.device``
    (:func:`resolve_precision`; ``"auto"`` announced by the main process only): itself
    when nothing changes, else a copy. The loop calls it once, first thing, so a precision
    this device cannot run fails before anything is written.

    Raises:
        ValueError: as :func:`resolve_precision` (fp16 on a CPU).
    """
    device = resolve_device(config.device)
    main_process = os.environ.get("RANK", "0") == "0"  # torchrun ranks: only rank 0 prints
    precision = resolve_precision(config.precision, device, announce=main_process)
    return config if precision == config.precision else dataclasses.replace(config, precision=precision)


def autocast(device: torch.device, precision: str):
    """bf16 / fp16 autocast (weights stay fp32), or nothing for fp32; ``"auto"`` as
    :func:`resolve_precision` decides for ``device``."""
    if precision == "auto":
        precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


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


@contextlib.contextmanager
def cpu_speedups(model: torch.nn.Module, config):
    """On a CPU run (``config.device``), for the duration of the block: dropout masks from a
    cheaper generator (``fastft.nn.FastDropout``, when ``config.fast_dropout``) and malloc
    keeping large per-step buffers mapped (``retain_freed_memory``, when
    ``config.retain_freed_memory``); together ~7% of a MiniLM fine-tuning step on 2 cores
    (benchmarks/bench_finetune.py). The model's own dropout modules are back afterwards,
    whatever happened inside. Nothing changes on a GPU run."""
    swap = None
    if resolve_device(config.device).type == "cpu":
        if config.fast_dropout:
            from fastft.nn.dropout import use_fast_dropout

            swap = use_fast_dropout(model)
        if config.retain_freed_memory:
            retain_freed_memory()
    try:
        yield model
    finally:
        if swap is not None:
            swap.restore()
