"""Mixed precision below the ops: does this CPU multiply bf16 natively, what autocast asks
for, and the CPU matmul mode that multiplies in bf16 while accumulating in fp32.

Why the CPU needs its own answer. A CPU with AMX (Intel Xeon 4th gen+) or AVX512-BF16
(Intel Cooper Lake+, AMD Zen 4+) multiplies bf16 several times faster than fp32; one
without them has no bf16 arithmetic at all and torch emulates it, far slower than fp32
(on a 2-core AMD EPYC with AVX2 only, a 2048x768 @ 768x3072 matmul ran at 0.5 GFLOP/s
in bf16 against 38 GFLOP/s in fp32, measured side by side). So bf16 pays on the first
kind of CPU and costs dearly on the second: every place that chooses a precision asks
:func:`cpu_bf16`.

``FASTFT_CPU_BF16=1`` makes fastft treat the CPU as having native bf16 (``0``: as
lacking it; unset or ``auto``: detect), e.g. to exercise the native-bf16 code path on a
machine without it. Importing this module costs nothing; detection runs on first use.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

__all__ = [
    "CpuBf16",
    "autocast_dtype",
    "autocast_off",
    "bf16_flags",
    "cpu_bf16",
    "cpu_matmul_precision",
    "loss_matmul_precision",
    "matmul_gflops",
    "recommended_precision",
]

# Instruction-set extensions with bf16 arithmetic, as named in /proc/cpuinfo (and in
# torch.cpu.get_capabilities() on x86): Intel AMX, AVX512-BF16 (x86), the Armv8.6 BF16
# extension (aarch64's "bf16" feature).
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")
ENV_OVERRIDE = "FASTFT_CPU_BF16"


@dataclass(frozen=True)
class CpuBf16:
    """What fastft found about bf16 arithmetic on this CPU.

    native: bf16 matmuls run natively (faster than fp32) -- found flags, or the override.
    flags: the bf16 extensions found (subset of ``NATIVE_BF16_FLAGS``).
    cpu: the CPU's model name; isa: the widest vector ISA torch's kernels use here.
    override: the value of ``FASTFT_CPU_BF16`` when it decided ``native``, else None.
    """

    native: bool
    flags: tuple[str, ...]
    cpu: str
    isa: str
    override: Optional[str] = None

    def describe(self) -> str:
        """One line: the CPU, its ISA and the bf16 verdict with its evidence."""
        found = ", ".join(self.flags) if self.flags else f"none of {', '.join(NATIVE_BF16_FLAGS)}"
        verdict = "native bf16" if self.native else "no native bf16 (torch emulates bf16 matmuls)"
        forced = f"; {ENV_OVERRIDE}={self.override} overrides detection" if self.override is not None else ""
        return f"{self.cpu} ({self.isa}): {verdict}; bf16 instructions found: {found}{forced}"


def _cpu_model() -> str:
    match = re.search(r"model name\s*:\s*(.+)", _cpuinfo())
    return match.group(1).strip() if match else (platform.processor() or platform.machine())


def bf16_flags(cpuinfo: str) -> tuple[str, ...]:
    """The bf16 extensions among the "flags" (x86) / "Features" (aarch64) words of a
    /proc/cpuinfo text, in ``NATIVE_BF16_FLAGS`` order."""
    words = set()
    for match in re.finditer(r"^(?:flags|Features)\s*:\s*(.*)$", cpuinfo, flags=re.MULTILINE):
        words |= set(match.group(1).split())
    return tuple(flag for flag in NATIVE_BF16_FLAGS if flag in words)


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


@functools.cache
def _detected() -> tuple[tuple[str, ...], str, str]:
    """(bf16 flags found, CPU model, ISA): torch's own CPU probe where it has one, and
    /proc/cpuinfo (which also covers aarch64)."""
    found = set()
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        try:
            found |= {flag for flag, present in capabilities().items() if present and flag in NATIVE_BF16_FLAGS}
        except Exception:  # noqa: BLE001 -- a probe failing means: look at /proc/cpuinfo only
            pass
    found |= set(bf16_flags(_cpuinfo()))
    isa = torch.backends.cpu.get_cpu_capability()
    return tuple(flag for flag in NATIVE_BF16_FLAGS if flag in found), _cpu_model(), isa


def cpu_bf16() -> CpuBf16:
    """This CPU's bf16 support (detected once; ``FASTFT_CPU_BF16`` read on every call).

    Native needs a bf16 extension and a torch built with oneDNN (mkldnn), whose kernels
    use it. Raises ValueError for an override other than ``auto``, ``0`` or ``1``.
    """
    flags, cpu, isa = _detected()
    override = os.environ.get(ENV_OVERRIDE, "auto").strip().lower() or "auto"
    if override not in ("auto", "0", "1"):
        raise ValueError(f"{ENV_OVERRIDE} must be auto, 0 or 1, got {override!r}")
    if override != "auto":
        return CpuBf16(override == "1", flags, cpu, isa, override)
    return CpuBf16(bool(flags) and torch.backends.mkldnn.is_available(), flags, cpu, isa)


def recommended_precision(device: torch.device) -> tuple[str, str]:
    """``(precision, why)`` that ``precision="auto"`` picks on ``device``: bf16 on a CUDA
    GPU that supports it and on a CPU with native bf16, fp32 elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported():
            return "bf16", f"{name} supports bf16"
        return "fp32", f"{name} has no bf16 support"
    if device.type == "cpu":
        found = cpu_bf16()
        if found.native:
            evidence = ", ".join(found.flags) or f"{ENV_OVERRIDE}={found.override}"
            return "bf16", f"{found.cpu} multiplies bf16 natively ({evidence})"
        return "fp32", f"{found.cpu} has no native bf16 ({found.isa}): bf16 would be emulated, slower than fp32"
    return "fp32", f"no bf16 rule for {device.type} devices"


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` casts matmul inputs to on ``device_type``, or None when
    autocast is off there (or does not exist for it, e.g. ``meta``)."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except RuntimeError:  # "unknown device type for autocast"
        pass
    return None


def autocast_off(device_type: str):
    """A context with autocast disabled on ``device_type``: an op's implementation, once its
    inputs carry the dtypes it computes in, runs as it would outside autocast (custom ops
    and autograd backward otherwise see the caller's autocast state). A device type
    autocast does not know (e.g. ``meta``) has no autocast state to turn off."""
    if autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def loss_matmul_precision(dtype: torch.dtype, device: torch.device) -> str:
    """How the CPU loss path multiplies for inputs (or an autocast) of ``dtype``: ``"bf16"``
    -- bf16 products, fp32 accumulation and fp32 results -- for bf16 on a CPU with native
    bf16; ``"ieee"`` (fp32) otherwise, which is also the faster choice where bf16 is emulated."""
    if device.type == "cpu" and dtype == torch.bfloat16 and cpu_bf16().native:
        return "bf16"
    return "ieee"


@contextlib.contextmanager
def cpu_matmul_precision(precision: str):
    """fp32 matmuls on the CPU inside the block multiply at ``precision``: ``"bf16"`` sets
    oneDNN's fp32 math mode to bf16 (``torch.backends.mkldnn.matmul.fp32_precision``):
    operands are rounded to bf16 inside the GEMM, products and sums stay fp32, results are
    fp32 -- where the CPU has bf16 instructions (elsewhere oneDNN ignores it and the GEMM is
    plain fp32). ``"ieee"``: nothing changes. The previous mode is restored on exit."""
    if precision == "ieee":
        yield
        return
    matmul = torch.backends.mkldnn.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = precision
    try:
        yield
    finally:
        matmul.fp32_precision = previous


def matmul_gflops(dtype: torch.dtype, shape: tuple[int, int, int] = (128, 256, 256), repeat: int = 5) -> float:
    """Measured GFLOP/s of one ``(m, k) @ (k, n)`` CPU matmul in ``dtype`` on one thread
    (best of ``repeat`` after a warm-up; ~0.1 s at the default shape where bf16 is
    emulated). One thread: a per-core comparison that other busy threads on a shared
    machine disturb least. The thread count is restored afterwards."""
    m, k, n = shape
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=generator).to(dtype)
    b = torch.randn(k, n, generator=generator).to(dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a @ b
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return 2 * m * k * n / max(best, 1e-9) / 1e9
