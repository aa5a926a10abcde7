"""``fastft bench``: run benchmark suites side by side with their references.

The suites live in the repository's ``benchmarks/`` folder (they are not part of the
installed package: run from a source checkout, e.g. after ``pip install -e .``). Results
go to ``--out`` (default ``~/.cache/fastft/bench``, outside the source tree: the committed
results under ``benchmarks/results/`` change only when a maintainer writes there on
purpose, ``--out benchmarks/results/<device>``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

# suite name -> module under benchmarks/ with ``run(quick: bool, out_dir) -> rows``
SUITES = {
    "loss": "benchmarks.bench_linear_cross_entropy",
    "attention": "benchmarks.bench_attention",
    "lora_linear": "benchmarks.bench_lora_linear",
    "train": "benchmarks.bench_train",
    "finetune": "benchmarks.bench_finetune",
    "dpo": "benchmarks.bench_dpo",
    "precision": "benchmarks.bench_precision",
}
# other names a suite answers to: each op's own name, and the names of earlier releases
ALIASES = {"linear_cross_entropy": "loss", "lora": "lora_linear"}


def _find_benchmarks() -> Path:
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (root / "benchmarks" / "common.py").exists():
            return root
    raise SystemExit("fastft bench: no benchmarks/ folder found; run it from a fastft source checkout")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastft bench", description=__doc__)
    parser.add_argument("--suite", choices=[*SUITES, *ALIASES, "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="target configurations only (a lent GPU: < 8 min)")
    parser.add_argument("--out", default=default_out_dir(),
                        help="results directory (default %(default)s; benchmarks/results/<device> to commit them)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    sys.path.insert(0, str(_find_benchmarks()))
    names = list(SUITES) if args.suite == "all" else [ALIASES.get(args.suite, args.suite)]
    failed = []
    for name in names:
        try:
            module = importlib.import_module(SUITES[name])
        except ModuleNotFoundError as err:
            print(f"suite {name}: not available ({err})", file=sys.stderr)
            failed.append(name)
            continue
        print(f"=== suite {name} ===", flush=True)
        module.run(args.quick, args.out)
    print(f"results in {os.path.abspath(args.out)}")
    return 1 if failed and args.suite != "all" else 0


def default_out_dir() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "fastft", "bench")
