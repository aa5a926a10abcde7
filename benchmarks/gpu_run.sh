#!/usr/bin/env bash
# The runbook for a lent GPU (../shared/GPU.md): two calls, back to back on the warm machine.
#
#   call 1   bash benchmarks/gpu_run.sh check     build + correctness        estimate ~3.5 min (caps: 4.1)
#   call 2   bash benchmarks/gpu_run.sh bench     the benchmark suites       estimate ~8 min (caps: 7.5)
#
# Give each call timeout_s=600. Everything lands in $OUT (default benchmarks/results/gpu-run/),
# at most 8 files (what the device tool brings back): check.log, info.txt, tests.log from
# call 1; bench.log and results.tar.gz (every suite's CSV/JSON/md/PNG, re-packed after each
# suite, so a time-out keeps what was measured) from call 2. Unpack the tarball into
# benchmarks/results/<device>/ and commit it with NOTES.md updated (prediction vs result).
#
# Time estimates, from their parts (16-core H200 machine; parts measured on the 2-core CPU
# machine here are scaled by the cores they use):
#
#   call 1 (check)                                                             ~205 s
#     pip install -e . --no-deps, FASTFT_CUDA=1, FASTFT_CUDA_ARCHS=90a: the four nvcc
#       jobs run in parallel (MAX_JOBS = cores); the whole build took 75 s here for two
#       archs on 2 cores, so one arch with a job per file ~20-40 s           ~40 s
#     fastft info                                                              ~5 s
#     pytest -m "(gpu or interpret) and not slow" -n 8, FASTFT_TRITON_CONFIGS=first:
#       ~850 tests (collected here), mostly sub-second on the GPU (~60 s over 8 workers);
#       Triton compiles with one config per kernel: ~10 kernels x ~8 flag variants x
#       ~2.5 s = ~200 s of compiling, 8 at a time (~25 s); the forced-config tests
#       (tests/test_triton_configs.py, 14 tests) compile every config once: ~60
#       compiles + runs spread over the 8 workers (~45 s); collection and worker
#       start-up ~30 s                                                ~160 s (cap 180)
#     ...plus the machine's start (minutes of device time, not of the command).
#
#   call 2 (bench)                                                             ~480 s
#     each suite under its own `timeout`, --quick configurations, autotuning included
#     (all configs: ~8 per kernel x ~2.5 s compile on first use, ~40 s per suite), the
#     matmul / copy ceilings measured once per suite (~5 s):
#       linear_cross_entropy 130 s, attention 170 s, lora_linear 150 s = 450 s of caps;
#       tar after each suite ~1 s. A suite that overruns is cut; the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-run}
mkdir -p "$OUT"
MODE=${1:-}
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1

case "$MODE" in
check)
  status=0
  # The image has torch / triton / transformers / peft: install fastft only, no deps.
  # Only the architecture of this GPU: half the nvcc time of the default 80;90a.
  if ! FASTFT_CUDA=1 FASTFT_CUDA_ARCHS=90a pip install --no-build-isolation --no-deps -e . > "$OUT/check.log" 2>&1; then
    tail -40 "$OUT/check.log"; exit 1
  fi
  grep -E "^compiled " "$OUT/check.log"
  python -m fastft info > "$OUT/info.txt" 2>&1; head -20 "$OUT/info.txt"
  # Correct first: every kernel against its fp32 reference on this GPU, one Triton config
  # per kernel (the forced-config tests still run each config once).
  FASTFT_TRITON_CONFIGS=first timeout 180 python -m pytest -m "(gpu or interpret) and not slow" -q -n 8 \
    -p no:cacheprovider > "$OUT/tests.log" 2>&1 || status=1
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20
  tail -3 "$OUT/tests.log"
  exit $status
  ;;
bench)
  RESULTS=$(mktemp -d)
  status=0
  : > "$OUT/bench.log"
  for suite in "linear_cross_entropy 130" "attention 170" "lora_linear 150"; do
    set -- $suite
    echo "=== $1 (cap $2 s)" | tee -a "$OUT/bench.log"
    timeout "$2" python -m "benchmarks.bench_$1" --quick --out "$RESULTS" >> "$OUT/bench.log" 2>&1 \
      || { echo "suite $1 stopped: exit $?" | tee -a "$OUT/bench.log"; status=1; }
    tar czf "$OUT/results.tar.gz" -C "$RESULTS" .  # after each suite: a time-out keeps what was measured
    grep -E "^(results:|  vs|- )" "$OUT/bench.log" | tail -6
  done
  exit $status
  ;;
*)
  echo "usage: bash benchmarks/gpu_run.sh check|bench   (the two calls of a lent GPU's runbook)" >&2
  exit 2
  ;;
esac
