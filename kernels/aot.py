"""Compile every Triton kernel and autotune config ahead of time, without a GPU.

    python -m fastft.kernels.aot [--arch 80 90] [--json PATH]

For each target architecture this points Triton at a stand-in driver (no GPU is touched),
then calls the real host launchers of ``fastft.kernels`` on meta tensors of realistic
shapes (``SPECIMENS``). Each kernel launch becomes a compile only: an autotuned kernel
compiles every config its pruning keeps for those inputs, exactly as a first launch on
that GPU would, with the same argument specialisation (alignment, divisibility by 16,
strides equal to 1). From each compiled kernel it reads what the GPU would have to
provide: registers per thread, stack frame per thread (local memory: register spills)
from the cubin (``cuobjdump --dump-resource-usage``, shipped with Triton), and shared
memory from the compiler's metadata.

A config fails when its shared memory exceeds what one block may use on that
architecture (``SHARED_LIMIT``) or when it spills more than ``SPILL_BUDGET`` bytes per
thread. ``tests/test_aot_compile.py`` runs this in CI for the installed Triton (and for a
second Triton, e.g. the GPU image's 3.6, when ``FASTFT_AOT_PYTHON`` names its Python).
Compiles land in Triton's cache (``TRITON_CACHE_DIR``): a second run takes seconds.

Must run in a process of its own: the kernels are imported with ``TRITON_INTERPRET=0``
and Triton's active driver is replaced.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import re
import types
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before any kernel module is imported: GPU configs

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# Largest dynamic shared memory one block can opt into (CUDA C Programming Guide, "Compute
# Capabilities", table 21): sm_80 163 KB, sm_90 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
# Stack frame (local memory) per thread a config may use: Triton kernels keep no arrays in
# local memory, so any stack frame is register spills. 64 B (16 registers' worth, mostly
# served from L1) lets the attention kernels with dropout keep their larger tiles on sm_90;
# the configs listed measured 0-64 B, the ones dropped 80-3,000 B.
SPILL_BUDGET = 64


@dataclass
class Compiled:
    """One compiled kernel: what it is and what it needs from the GPU."""

    kernel: str
    specimen: str
    arch: int
    config: str  # the meta-parameters, warps and stages
    registers: int
    stack_bytes: int  # per thread: spills
    shared_bytes: int  # per block
    seconds: float  # compile (or cache read) time

    def problems(self) -> list[str]:
        found = []
        limit = SHARED_LIMIT.get(self.arch)
        if limit is not None and self.shared_bytes > limit:
            found.append(f"shared memory {self.shared_bytes} B > {limit} B on sm_{self.arch}")
        if self.stack_bytes > SPILL_BUDGET:
            found.append(f"spills: {self.stack_bytes} B stack frame per thread > budget {SPILL_BUDGET} B")
        return found


class _StandInDriver:
    """What Triton asks its active driver while compiling: the target and a device / stream id."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("meta")


@functools.lru_cache(maxsize=None)
def _cuobjdump() -> str:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else "cuobjdump"


def _resources(kernel) -> tuple[int, int]:
    """(registers, stack frame bytes) per thread of a compiled kernel's cubin."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return int(match.group(1)), int(match.group(2))


@contextlib.contextmanager
def compile_only(modules, arch: int, record):
    """Within: every launch of a kernel of ``modules`` compiles for ``arch`` instead of
    running, and ``record(kernel_name, compiled, seconds, meta_kwargs)`` is called per kernel."""
    previous = driver._active  # None until something asked for the default (no GPU: there is none)
    driver.set_active(_StandInDriver(arch))
    patched = []

    def jit_run(fn, original):
        def run(*args, grid, warmup, **kwargs):
            started = time.perf_counter()
            kernel = original(*args, grid=grid, warmup=True, **kwargs)
            record(fn.__name__, kernel, time.perf_counter() - started, kwargs)
            return kernel
        return run

    def autotuned_run(tuner):
        def run(*args, grid, warmup, **kwargs):
            return tuner.warmup(*args, grid=grid, **kwargs)
        return run

    try:
        for module in modules:
            for value in vars(module).values():
                if isinstance(value, Autotuner):
                    patched.append((value, "run"))
                    value.run = autotuned_run(value)
                    value = value.fn
                if isinstance(value, JITFunction) and "run" not in vars(value):
                    patched.append((value, "run"))
                    value.run = jit_run(value, value.run)
                    value.device_caches.clear()  # compiled for another target (keyed by device id only)
        yield
    finally:
        for obj, name in patched:
            with contextlib.suppress(AttributeError):
                delattr(obj, name)
            if isinstance(obj, JITFunction):
                obj.device_caches.clear()
        driver._active = previous


# --------------------------------------------------------------------------- what is compiled


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _loss_specimens():
    from fastft.kernels import linear_cross_entropy as loss

    # Llama-3 vocabulary, a ragged number of labelled rows, bias and smoothing on (every
    # feature of the kernels: the most registers), all three gradients.
    # "+options": class weights, final-logit softcap, z-loss and the argmax on top (the
    # ``extras`` of fastft/ops/linear_cross_entropy.py, duck-typed: kernels never import ops).
    rows, vocab, hidden = 1013, 128256, 4096
    for dtype, options in itertools.product((torch.bfloat16, torch.float32), (False, True)):
        extras = types.SimpleNamespace(class_weights=_meta(vocab, dtype=torch.float32), softcap=30.0,
                                       z_row_scale=_meta(rows, dtype=torch.float32), want_argmax=True)
        yield f"loss {str(dtype)[6:]}{' +options' if options else ''}", (
            lambda dtype=dtype, extras=extras if options else None: loss.linear_cross_entropy_rows(
                _meta(rows, hidden, dtype=dtype), _meta(vocab, hidden, dtype=dtype), _meta(vocab, dtype=dtype),
                _meta(rows, dtype=torch.int64), 0.1, _meta(rows, dtype=torch.float32), [True, True, True], extras))
    # Gradient filtering (FASTFT_LOSS_GRAD_FILTER=on, 16-bit inputs, no smoothing: the
    # backward's FILTER branch), plain and with the options.
    for options in (False, True):
        extras = types.SimpleNamespace(class_weights=_meta(vocab, dtype=torch.float32), softcap=30.0,
                                       z_row_scale=_meta(rows, dtype=torch.float32), want_argmax=True)

        def run(extras=extras if options else None):
            with _environ(FASTFT_LOSS_GRAD_FILTER="on"):
                loss.linear_cross_entropy_rows(
                    _meta(rows, hidden), _meta(vocab, hidden), _meta(vocab), _meta(rows, dtype=torch.int64), 0.0,
                    _meta(rows, dtype=torch.float32), [True, True, True], extras)
        yield f"loss bfloat16{' +options' if options else ''} +filter", run


@contextlib.contextmanager
def _environ(**values):
    """Within: the environment variables set to ``values``; restored afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _attention_specimens():
    from fastft.kernels import attention

    # The kernels prune configs per feature class (kernels/attention.py: ``fits`` and
    # ``fits_extra``), so each class compiles with its largest register footprint:
    #   base:  GQA, causal, a padding mask, dropout, the lse's gradient;
    #   extra: the same with a window bounded on both sides, bottom-right alignment,
    #          softcap and ALiBi slopes per batch element (any of the first, softcap or
    #          ALiBi makes a call this class).
    # head_dim 96 is split 64 + 32 (the largest split; 80 = 64 + 16, 48 = 32 + 16 are smaller).
    for head_dim, extra in itertools.product((64, 96, 128, 256), (False, True)):
        batch, heads_q, heads_kv, seq = 2, 8, 2, 1000

        def run(head_dim=head_dim, extra=extra):
            q = _meta(batch, heads_q, seq, head_dim)
            k = v = _meta(batch, heads_kv, seq, head_dim)
            options = dict(key_padding_mask=_meta(batch, seq, dtype=torch.bool), window=(-1, 0),
                           softmax_scale=head_dim**-0.5, dropout_p=0.1, seed=1234)
            if extra:
                options.update(window=(255, 31), bottom_right=True, softcap=30.0,
                               alibi_slopes=_meta(batch, heads_q, dtype=torch.float32))
            out, lse = attention.attention_forward(q, k, v, **options)
            attention.attention_backward(torch.empty_like(out), q, k, v, out, lse, grad_lse=torch.empty_like(lse),
                                         **options)
        yield f"attention d{head_dim}{' window+softcap+alibi' if extra else ''}", run


def _lora_specimens():
    from fastft.kernels import lora_linear

    tokens, features, out_features, rank = 4097, 4096, 4096, 16

    def run():
        x = _meta(tokens, features)
        weight, scale = _meta(out_features, features, dtype=torch.int8), _meta(out_features, dtype=torch.float32)
        lora_a, lora_b = _meta(rank, features), _meta(out_features, rank)
        xa = lora_linear.down(x, lora_a, 0.1, 7)  # masked matmul
        lora_linear.up(x, weight, scale, _meta(out_features), xa, lora_b, 2.0)  # fused, int8
        grad = _meta(tokens, out_features)
        lora_linear.grad_input(grad, weight, scale, _meta(tokens, rank), lora_a, 2.0, 0.1, 7)
        lora_linear.grad_input(grad, _meta(out_features, features), None, _meta(tokens, rank), lora_a, 2.0, 0.1, 7)
        lora_linear.grad_a(_meta(tokens, rank), x, 0.1, 7)
    yield "lora_linear bf16/int8", run


SPECIMENS = (_loss_specimens, _attention_specimens, _lora_specimens)


def specimen_names() -> list[str]:
    return [name for specimens in SPECIMENS for name, _ in specimens()]


def compile_all(archs, only: str | None = None, exact: str | None = None) -> list[Compiled]:
    """Compile every specimen (those whose name contains ``only``, or the one named
    ``exact``) for every arch; return one entry per compiled kernel."""
    from fastft.kernels import attention, linear_cross_entropy, lora_linear

    modules = (attention, linear_cross_entropy, lora_linear)
    results: list[Compiled] = []
    for arch in archs:
        for specimens in SPECIMENS:
            for name, launch in specimens():
                if (only and only not in name) or (exact and name != exact):
                    continue

                def record(kernel_name, kernel, seconds, kwargs, arch=arch, specimen=name):
                    registers, stack = _resources(kernel)
                    blocks = ", ".join(f"{k}={v}" for k, v in sorted(kwargs.items())
                                       if k.startswith(("BLOCK", "GROUP")))
                    meta = kernel.metadata
                    results.append(Compiled(kernel_name, specimen, arch,
                                            f"{blocks} warps={meta.num_warps} stages={meta.num_stages}",
                                            registers, stack, meta.shared, round(seconds, 2)))

                with compile_only(modules, arch, record):
                    launch()
    return results


def _compile_one(task) -> list[dict]:
    arch, name = task
    return [asdict(r) for r in compile_all([arch], exact=name)]


def _compile_in_processes(archs, only, jobs) -> list[Compiled]:
    """compile_all split by (arch, specimen) over ``jobs`` fresh processes (each sets its
    own stand-in driver); the results in the order of the serial run."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    tasks = [(arch, name) for arch in archs for name in specimen_names() if not only or only in name]
    # The largest specimens first, so that the last one to start is a short one.
    order = sorted(range(len(tasks)), key=lambda i: "attention" not in tasks[i][1])
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        done = dict(zip(order, pool.map(_compile_one, [tasks[i] for i in order])))
    return [Compiled(**entry) for i in range(len(tasks)) for entry in done[i]]


def table(results: list[Compiled]) -> str:
    lines = [f"{'kernel':<36} {'specimen':<22} {'sm':>3} {'regs':>4} {'spill':>6} {'shared':>7}  config"]
    for r in results:
        flag = "  <-- " + "; ".join(r.problems()) if r.problems() else ""
        lines.append(f"{r.kernel:<36} {r.specimen:<22} {r.arch:>3} {r.registers:>4} {r.stack_bytes:>6} "
                     f"{r.shared_bytes:>7}  {r.config}{flag}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--only", help="only specimens whose name contains this")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.jobs > 1:
        results = _compile_in_processes(args.arch, args.only, args.jobs)
    else:
        results = compile_all(args.arch, args.only)
    print(table(results))
    failures = [r for r in results if r.problems()]
    print(f"triton {triton.__version__}: {len(results)} kernels compiled for sm_{', sm_'.join(map(str, args.arch))} "
          f"in {time.perf_counter() - started:.0f} s; {len(failures)} over the limits")
    if args.json:
        Path(args.json).write_text(json.dumps({"triton": triton.__version__, "spill_budget": SPILL_BUDGET,
                                               "shared_limit": SHARED_LIMIT,
                                               "kernels": [asdict(r) for r in results]}, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
