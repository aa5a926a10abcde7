"""Where and how a run executes: device, seeds, autocast, and the CPU speed-ups the
recipes switch on around the loop (the loop itself stays device-agnostic)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import platform
import random
import sys
import warnings

import numpy as np
import torch

__all__ = ["autocast", "cpu_speedups", "maybe_patch", "resolve_device", "retain_freed_memory", "seed_everything"]


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; any other name as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device: torch.device, precision: str):
    """bf16 / fp16 autocast (weights stay fp32), or nothing for fp32."""
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
