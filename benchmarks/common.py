"""The benchmark harness every suite shares: sweeping, timing, memory, speed-ups, result files.

An op suite (benchmarks/bench_<op>.py) defines only its shapes, its implementations and
what to measure, as an :class:`OpSuite`; :func:`run_op_suite` sweeps the shapes, times
each implementation's forward and forward+backward pass side by side in one process,
measures peak memory and TFLOP/s, adds the speed-up columns against the references and
writes through :func:`report`: CSV + JSON (rows and the environment: device, versions,
date) + a markdown table + PNG. The end-to-end suites (bench_train, bench_finetune)
measure whole training steps with the same timing, memory, row and report helpers.
"""

from __future__ import annotations

import argparse
import contextlib
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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
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


def _release_free_heap() -> None:
    """Hand memory freed into glibc's heap back to the OS (malloc_trim): blocks freed by
    earlier (timing) runs, while the mmap threshold was still glibc's adaptive one, would
    otherwise stay resident, count in the baseline and serve the measured call's
    allocations without raising the peak (an implementation measured first read ~0 MiB)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
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
    _release_free_heap()
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


@contextlib.contextmanager
def failure_recorded(row: dict, device: torch.device, *, ours: bool):
    """Run one measurement of ``row``: out of memory, or any error of a reference
    implementation (``ours=False``), becomes the row's status instead of ending the sweep;
    any other error of fastft's own implementation propagates."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - one failing implementation must not stop the sweep
        if ours and not is_out_of_memory(err):
            raise
        row["status"] = "OOM" if is_out_of_memory(err) else f"error: {type(err).__name__}: {err}"[:120]
        if device.type == "cuda":
            torch.cuda.empty_cache()


def print_row(row: dict) -> None:
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)


def available_backends(reasons: dict[str, Callable[[], list[str]]], backends: Iterable[str]) -> list[str]:
    """Those of ``backends`` whose reasons function (an op's ``backend_reasons``) says it can run."""
    return [backend for backend in backends if not reasons[backend]()]


# --------------------------------------------------------------------------- op suites

PASSES = ("fwd", "fwd+bwd")


@dataclass
class Workload:
    """One configuration of an op suite, ready to time.

    case: the configuration's columns, copied into each of its rows.
    implementations: name -> forward pass on the workload's inputs (no arguments); fastft's
        own are named ``fastft`` or ``fastft[...]`` (their errors end the sweep).
    leaves: the inputs whose ``.grad`` each timed step clears.
    backward: finishes a forward+backward step from the forward's output.
    flops: useful FLOPs of each pass, for the TFLOP/s columns (empty: no such columns).
    gradient_bytes: subtracted from the forward+backward peak (the gradients themselves).
    measured_within: implementation -> context its measurements run in (a kernel switch).
    extra: ``(implementation, pass, forward) -> columns`` measured besides time and memory.
    """

    case: dict
    implementations: dict[str, Callable[[], torch.Tensor]]
    leaves: Sequence[torch.Tensor]
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward
    flops: dict[str, float] = field(default_factory=dict)
    gradient_bytes: int = 0
    measured_within: dict[str, Callable[[], contextlib.AbstractContextManager]] = field(default_factory=dict)
    extra: Callable[[str, str, Callable[[], torch.Tensor]], dict] | None = None


@dataclass
class OpSuite:
    """What an op benchmark defines; :func:`run_op_suite` does the rest.

    name: the op, and the stem of the results files.
    columns: the results table's columns, in order.
    configs: ``(device, quick) -> configurations`` to sweep.
    workload: ``(configuration, device, dtype) -> Workload``.
    speedups / overheads: column -> reference implementations (the first one measured in
        the same case and pass counts): ``reference ms / ms`` and ``ms / reference ms``.
    summary: ``(rows, device) -> lines`` headlining the results, under ``summary_title``.
    plot: ``(rows, png path)``.
    """

    name: str
    columns: list[str]
    configs: Callable[[torch.device, bool], Iterable]
    workload: Callable[[object, torch.device, torch.dtype], Workload]
    speedups: dict[str, tuple[str, ...]]
    overheads: dict[str, tuple[str, ...]] = field(default_factory=dict)
    summary: Callable[[list[dict], torch.device], list[str]] | None = None
    summary_title: str = ""
    plot: Callable[[list[dict], Path], None] | None = None


def _clear_grads(leaves: Sequence[torch.Tensor]) -> None:
    for t in leaves:
        t.grad = None


def measure_workload(workload: Workload, device: torch.device, dtype: torch.dtype,
                     matmul_peak: float | None) -> list[dict]:
    """One row per (implementation, pass): median ms, peak extra memory, TFLOP/s (as a
    fraction of ``matmul_peak`` when given), the workload's extra columns, and a status."""
    rows = []
    for impl, forward in workload.implementations.items():
        for pass_ in PASSES:
            def step():
                _clear_grads(workload.leaves)
                if pass_ == "fwd":
                    with torch.no_grad():
                        return forward()
                workload.backward(forward())

            row = {**workload.case, "dtype": str(dtype).split(".")[-1], "pass": pass_, "impl": impl}
            with failure_recorded(row, device, ours=impl.startswith("fastft")):
                with workload.measured_within.get(impl, contextlib.nullcontext)():
                    ms = median_ms(step, device)
                    # The timed runs left their gradients in .grad: free them first, or the
                    # baseline would include them and the step's own gradients, subtracted
                    # below, would be counted out twice.
                    _clear_grads(workload.leaves)
                    peak = peak_extra_bytes(step, device) - (workload.gradient_bytes if pass_ == "fwd+bwd" else 0)
                    row.update(ms=ms, peak_extra_MiB=max(peak, 0) / 2**20, status="ok")
                    if workload.extra is not None:
                        row.update(workload.extra(impl, pass_, forward))
                if workload.flops:
                    row["tflops"] = workload.flops[pass_] / (ms * 1e-3) / 1e12
                    if matmul_peak:
                        row["frac_matmul_peak"] = row["tflops"] / matmul_peak
            rows.append(row)
            print_row(row)
    return rows


def add_ratios(rows: list[dict], speedups: dict[str, tuple[str, ...]], overheads: dict[str, tuple[str, ...]]) -> None:
    """Fill ``reference ms / ms`` (speed-up) and ``ms / reference ms`` (overhead) columns,
    each pass against the same pass of the first reference implementation measured."""
    for ratios, speedup in ((speedups, True), (overheads, False)):
        for column, references in ratios.items():
            reference_ms = {}
            for row in rows:
                if row["impl"] in references and row.get("ms") and row["pass"] not in reference_ms:
                    reference_ms[row["pass"]] = row["ms"]
            for row in rows:
                if row.get("ms") and reference_ms.get(row["pass"]):
                    ratio = reference_ms[row["pass"]] / row["ms"]
                    row[column] = ratio if speedup else 1.0 / ratio


def run_op_suite(suite: OpSuite, quick: bool = False, out_dir=None) -> list[dict]:
    """Sweep ``suite`` on this machine's device (bf16 on a GPU, fp32 on a CPU) and report it."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    env = environment(device)
    matmul_peak = matmul_peak_tflops(device, dtype)
    env["matmul_peak_tflops"] = matmul_peak
    peak_text = f"{matmul_peak:.1f} TFLOP/s" if device.type == "cuda" else f"{matmul_peak * 1e3:.1f} GFLOP/s"
    print(f"{suite.name} on {env['device']} ({dtype}); measured matmul peak {peak_text}", flush=True)
    rows = []
    for config in suite.configs(device, quick):
        case_rows = measure_workload(suite.workload(config, device, dtype), device, dtype,
                                     matmul_peak if device.type == "cuda" else None)
        add_ratios(case_rows, suite.speedups, suite.overheads)
        rows += case_rows
    lines = suite.summary(rows, device) if suite.summary is not None else []
    report(suite.name, rows, env, suite.columns, out_dir, suite.plot, title=suite.summary_title, lines=lines)
    return rows


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


def report(name: str, rows: list[dict], env: dict, columns: list[str], out_dir=None,
           plot: Callable[[list[dict], Path], None] | None = None, *, title: str = "", lines: Sequence[str] = (),
           notes: str = "") -> Path:
    """Write the results files (into ``out_dir``, else ``FASTFT_BENCH_OUT``, else
    benchmarks/results/<device>/) and print the headline ``lines`` and where the files are.
    The markdown gets ``notes``, then ``lines`` as a list under ``title``."""
    if lines:
        notes = "\n\n".join(part for part in (notes, title, "\n".join(f"- {line}" for line in lines)) if part)
    path = write_results(name, rows, env, columns, out_dir or out_dir_from_env(), plot, notes)
    if lines:
        print("\n".join(lines))
    print(f"results: {path}")
    return path


def suite_main(run: Callable[[bool, object], list], description: str, argv=None) -> None:
    """The command line every suite shares: ``[--quick] [--out DIR]`` then ``run``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the target configurations and a few more")
    parser.add_argument("--out", default=None, help="results directory (default benchmarks/results/<device>/)")
    args = parser.parse_args(argv)
    run(args.quick, args.out)
