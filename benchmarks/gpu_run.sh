#!/usr/bin/env bash
# One go on a GPU machine: build the CUDA extension, run the `gpu` tests, then the quick
# benchmark suite. Everything lands in $OUT (default benchmarks/results/gpu-run/):
#   build.log, info.txt, gpu-tests.log, bench.log and each suite's CSV/JSON/md/PNG.
# On a lent machine (see ../shared/GPU.md) run it through the device tool, e.g.
#   bash benchmarks/gpu_run.sh            (with OUT set by the tool)
# then copy $OUT into benchmarks/results/<device>/ and commit it with NOTES.md updated.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-run}
mkdir -p "$OUT"
status=0

# The image already has torch/triton/transformers/peft: install fastft only, no deps.
if ! FASTFT_CUDA=1 pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; exit 1
fi
python -m fastft info | tee "$OUT/info.txt"

# Correct first: every kernel against its fp32 reference on this GPU (plus the interpreter
# tests, which on a GPU run the compiled Triton kernels).
timeout 180 python -m pytest -m "gpu or interpret" -q -x -p no:cacheprovider > "$OUT/gpu-tests.log" 2>&1 || status=1
tail -5 "$OUT/gpu-tests.log"

# Then fast: the quick suites side by side with the references.
FASTFT_BENCH_OUT="$OUT" timeout 360 python -m fastft bench --quick > "$OUT/bench.log" 2>&1 || status=1
grep -E "^(===|results:|GPU|CPU|  vs)" "$OUT/bench.log" | tail -20
exit $status
