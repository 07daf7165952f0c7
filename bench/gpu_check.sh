#!/usr/bin/env bash
# One call on a GPU machine with no network: build seqkern against the torch that is there,
# run the whole test suite on the GPU (Triton compiled, cuda backend where built), run the
# GPU benchmarks, and print a short summary table last. Logs go to $OUT when it is set.
#   bash bench/gpu_check.sh            (PYTHON=python3 by default)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${OUT:-/tmp}/gpu_check
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$LOG/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$LOG/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$LOG/gpu.txt"

echo "== build"
$PY -m pip install -q -e . --no-build-isolation --no-deps >"$LOG/build.log" 2>&1
build_rc=$?
tail -n 20 "$LOG/build.log"
$PY -m seqkern.info | tee "$LOG/info.txt"

# Every stage has a time limit: a hand-written grid barrier or TMA wait that never completes
# must not eat the machine's whole lease. TESTS_S and BENCH_S override them.
echo "== the CUDA kernels' riskiest parts first (grid barrier, TMA waits), briefly"
SEQKERN_TEST_DEVICE=cuda SEQKERN_POISON_OUTPUTS=1 timeout 180 \
  $PY -m pytest tests/test_cuda_backend.py -q -p no:cacheprovider >"$LOG/tests_cuda.log" 2>&1
cuda_rc=$?
tail -n 8 "$LOG/tests_cuda.log"
echo "== tests on the GPU (cuda and triton backends)"
SEQKERN_TEST_DEVICE=cuda SEQKERN_POISON_OUTPUTS=1 timeout "${TESTS_S:-300}" \
  $PY -m pytest tests/ -q -p no:cacheprovider --ignore=tests/test_cuda_backend.py \
  >"$LOG/tests.log" 2>&1
tests_rc=$?
tail -n 15 "$LOG/tests.log"
echo "== CUDA attention with the Hopper path off (the sm_80 kernels at D 64/128)"
SEQKERN_TEST_DEVICE=cuda SEQKERN_CUDA_SM90=0 timeout 120 $PY -m pytest tests/test_attention.py \
  -q -k cuda -p no:cacheprovider >"$LOG/tests_sm80.log" 2>&1
sm80_rc=$?
tail -n 3 "$LOG/tests_sm80.log"

echo "== benchmarks"
# BENCH_ARGS narrows the grid when device time is short, e.g. BENCH_ARGS='-k "D128 or LSTM"'.
eval timeout "${BENCH_S:-300}" $PY -m pytest bench/ -q -s -p no:cacheprovider \
  --benchmark-json="$LOG/bench.json" "${BENCH_ARGS:-}" >"$LOG/bench.log" 2>&1
bench_rc=$?
cp bench/results/*.json "$LOG/" 2>/dev/null

echo
echo "== summary (build rc=$build_rc, cuda checks rc=$cuda_rc, tests rc=$tests_rc, sm80 tests rc=$sm80_rc, bench rc=$bench_rc; rc 124 = timed out)"
grep -E "passed|failed" "$LOG/tests.log" | tail -n 1
sed -n '/^seqkern benchmarks/,/^$/p' "$LOG/bench.log" | cut -c1-110
echo "== cuda vs triton, case by case (the evidence for seqkern.backends.MEASURED_ORDER)"
$PY bench/compare_backends.py | tee "$LOG/cuda_vs_triton.md" | tail -n 6
