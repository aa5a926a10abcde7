"""``fastft bench``: run benchmark suites side by side with their references.

The suites live in the repository's ``benchmarks/`` folder (they are not part of the
installed package: run from a source checkout, e.g. after ``pip install -e .``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# suite name -> module under benchmarks/ with ``run(quick: bool, out_dir) -> rows``
SUITES = {
    "loss": "benchmarks.bench_linear_cross_entropy",
    "attention": "benchmarks.bench_attention",
    "lora_linear": "benchmarks.bench_lora_linear",
    "train": "benchmarks.bench_train",
    "finetune": "benchmarks.bench_finetune",
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
    parser.add_argument("--out", default=None, help="results directory (default benchmarks/results/<device>/)")
    args = parser.parse_args(argv)
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
    return 1 if failed and args.suite != "all" else 0
