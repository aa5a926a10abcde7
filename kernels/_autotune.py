"""What the autotuned kernels' config pruning shares.

* Configs per architecture: ``config(..., archs=(80, 90))`` tags a ``triton.Config`` with
  the architecture families it was checked on (``python -m fastft.kernels.aot``: it fits
  shared memory and does not spill there); ``for_target(configs)`` keeps the ones of the
  GPU Triton compiles for, read from Triton's active driver, so the ahead-of-time check
  (which swaps in a stand-in driver per architecture) prunes exactly as that GPU would.
* ``FASTFT_TRITON_CONFIGS=first``: every kernel keeps only the first config left after
  pruning, so nothing is autotuned: a correctness run compiles one config per kernel (the
  first call of benchmarks/gpu_runbook.md). Read at each launch, so tests can set it.
"""

from __future__ import annotations

import os

import triton


def config(meta: dict, num_warps: int, num_stages: int, archs=(80, 90), **tags) -> triton.Config:
    """A ``triton.Config`` for the architecture families ``archs`` (80: Ampere / Ada, 90:
    Hopper and later); ``tags`` become attributes a kernel's own pruning reads."""
    result = triton.Config(meta, num_warps=num_warps, num_stages=num_stages)
    result.archs = tuple(archs)
    for name, value in tags.items():
        setattr(result, name, value)
    return result


def target_family() -> int:
    """90 for a Hopper (or newer) target, 80 below; 90 when no driver says (CPU interpreter)."""
    try:
        arch = triton.runtime.driver.active.get_current_target().arch
        return 90 if int(arch) >= 90 else 80
    except Exception:  # noqa: BLE001 - no GPU driver (interpreter), or a non-CUDA target
        return 90


def one_config() -> bool:
    return os.environ.get("FASTFT_TRITON_CONFIGS", "all").strip().lower() == "first"


def for_target(configs: list) -> list:
    """The configs checked on the target's architecture family (all of them when none is),
    cut to the first one under FASTFT_TRITON_CONFIGS=first."""
    family = target_family()
    kept = [c for c in configs if family in getattr(c, "archs", (family,))] or list(configs)
    return kept[:1] if one_config() else kept
