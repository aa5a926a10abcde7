"""Shared benchmark plumbing: timing, peak memory, device peak, and result files.

Every suite (benchmarks/bench_<op>.py) measures its implementation and the references
side by side in one process with these helpers and writes through ``write_results``:
CSV + JSON (rows and the environment: device, versions, date) + a markdown table + PNG.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------- environment


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        model = match.group(1).strip() if match else model
    except OSError:
        pass
    return f"CPU {model} ({torch.get_num_threads()} threads)"


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - a missing optional package is just reported as None
        return None


def environment(device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        commit = None
    return {
        "device": device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "fastft": _version("fastft"),
        "git_commit": commit,
    }


# --------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, repeat: int = 5,
              max_seconds: float = 20.0) -> float:
    """Median wall time of ``fn`` in milliseconds, after warm-up.

    On a GPU this is ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs);
    on a CPU, ``time.perf_counter`` around each call. ``max_seconds`` caps the repeats of
    slow CPU baselines (at least one timed run always happens).
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    times = []
    start_all = time.perf_counter()
    for i in range(warmup + repeat):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        if i == 0 and elapsed > 2.0:
            warmup = 1  # a multi-second call is warm after one run; more would only cost minutes
        if i >= warmup:
            times.append(elapsed * 1e3)
        if time.perf_counter() - start_all > max_seconds and times:
            break
    return statistics.median(times)


# --------------------------------------------------------------------------- memory

_M_MMAP_THRESHOLD = -3


def _fix_glibc_mmap_threshold() -> None:
    """Make glibc return every freed block >= 64 KiB to the OS right away, so the
    process's resident-set peak tracks live tensors rather than allocator caching."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 65536)
    except OSError:
        pass


def _rss_bytes(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(field + r":\s+(\d+)", status).group(1)) * 1024


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory ``fn`` needs beyond what was allocated before it ran.

    GPU: the caching allocator's peak counter. CPU: the kernel's peak resident-set counter
    (VmHWM), reset just before the call through /proc/self/clear_refs.
    """
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    _fix_glibc_mmap_threshold()
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_bytes("VmRSS")
    fn()
    return max(0, _rss_bytes("VmHWM") - before)


# --------------------------------------------------------------------------- device peak


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Measured TFLOP/s of a large square matmul on this device: the roofline that
    fused kernels are reported against (a fraction of *measured*, not datasheet, peak)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda: a @ b, device)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def copy_peak_gbps(device: torch.device) -> float:
    """Measured GB/s of a large device-to-device copy (read + write)."""
    numel = (1 << 28) if device.type == "cuda" else (1 << 24)
    src = torch.empty(numel, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)
    return 2 * numel * 4 / (ms * 1e-3) / 1e9


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


# --------------------------------------------------------------------------- results


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(value):
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def bar_chart(ax, rows: list[dict], case_of: Callable[[dict], tuple], case_label: Callable[[tuple], str],
              value: str = "ms", log: bool = True) -> None:
    """Grouped bars on ``ax``: a group per case (``case_of(row)``, in order of first
    appearance), a bar per ``impl``, height ``row[value]`` (missing or failed: no bar)."""
    cases = list(dict.fromkeys(case_of(r) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        heights = [next((r[value] for r in rows if case_of(r) == case and r["impl"] == impl and r.get(value)), 0.0)
                   for case in cases]
        ax.bar([c + i * width for c in range(len(cases))], heights, width, label=impl)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))])
    ax.set_xticklabels([case_label(c) for c in cases], fontsize=7)
    if log:
        ax.set_yscale("log")


def write_results(name: str, rows: list[dict], env: dict, columns: list[str], out_dir: Path | None = None,
                  plot: Callable[[list[dict], Path], None] | None = None, notes: str = "") -> Path:
    """Write ``<name>.csv``, ``<name>.json``, ``<name>.md`` (and ``<name>.png`` via ``plot``)
    into ``out_dir`` (default benchmarks/results/<device-slug>/). Returns the markdown path."""
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")[:48]
    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR / slug
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for row in rows for k in row}, key=lambda k: (k not in columns, columns.index(k) if k in columns else 0, k))
    with open(out_dir / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / f"{name}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
    header = (f"# {name}\n\nDevice: **{env['device']}** · date {env['date'][:10]} · torch {env['torch']} · "
              f"triton {env['triton']} · fastft {env['fastft']} (commit {env['git_commit']})\n\n")
    md_path = out_dir / f"{name}.md"
    md_path.write_text(header + (notes + "\n\n" if notes else "") + markdown_table(rows, columns) + "\n")
    if plot is not None and rows:
        import matplotlib

        matplotlib.use("Agg")
        plot(rows, out_dir / f"{name}.png")
    return md_path


def out_dir_from_env() -> Path | None:
    """``FASTFT_BENCH_OUT`` redirects results (e.g. to $OUT on a lent GPU machine)."""
    value = os.environ.get("FASTFT_BENCH_OUT")
    return Path(value) if value else None


def suite_main(run: Callable[[bool, object], list], description: str, argv=None) -> None:
    """The command line every suite shares: ``[--quick] [--out DIR]`` then ``run``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the target configurations and a few more")
    parser.add_argument("--out", default=None, help="results directory (default benchmarks/results/<device>/)")
    args = parser.parse_args(argv)
    run(args.quick, args.out)
