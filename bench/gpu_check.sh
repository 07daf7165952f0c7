#!/usr/bin/env bash
# One call on a GPU machine with no network: build seqkern against the torch that is there,
# check the CUDA kernels' riskiest parts, benchmark the recurrent layers (the open targets),
# read their kernels' hardware counters (ncu), check them for shared-memory races, profile
# them and a one-step call's host time layer by layer (bench/host_overhead.py),
# run the whole test suite on the GPU (Triton compiled, cuda backend where built), the
# attention tests with the Hopper path off, then the other benchmarks, and print a short
# table last. Every stage has a time limit and the whole run a deadline (TOTAL_S), so a
# grid barrier or TMA wait that never completes cannot eat the lease.
#   bash bench/gpu_check.sh                 all stages (PYTHON=python3 by default)
#   STAGES="bench_more" bash bench/gpu_check.sh   only the named stages (a warm second call)
#   LAYER_K / TESTS_K / MORE_K narrow the layer benchmarks, the tests, the other benchmarks
#   (pytest -k expressions).
# Logs and benchmark JSON go to $OUT (at most 8 files come back: one tarball of all logs,
# the summary, the benchmark runs merged into one JSON). With gpu-prebuilt/ carried (`make
# gpu-torch-check` on the CPU machine first) and matching, the build stage compiles nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=/tmp/gpu_check
OUT_DIR=${OUT:-/tmp/gpu_check_out}
rm -rf "$LOG"; mkdir -p "$LOG" "$OUT_DIR"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
# Hopper only unless told otherwise: half the nvcc work of the default 80;90a.
export SEQKERN_CUDA_ARCHS=${SEQKERN_CUDA_ARCHS:-90a}
STAGES=${STAGES:-"build cuda_risky bench_layers ncu racecheck profile host tests sm80 bench_more"}
START=$(date +%s)
TOTAL_S=${TOTAL_S:-520}
declare -A RC

remaining() { echo $(( TOTAL_S - ($(date +%s) - START) )); }

save() {  # what comes back even if the call is cut off later
  tar czf "$OUT_DIR/logs.tgz" -C /tmp gpu_check 2>/dev/null
  # this call's benchmark runs only (a warm machine keeps an earlier call's)
  $PY bench/compare_backends.py --merge "$OUT_DIR/bench.json" \
    $(find bench/results -name '*.json' -newer "$LOG/gpu.txt" 2>/dev/null) >/dev/null 2>&1
}

# stage NAME LIMIT_S CMD...: runs CMD under min(LIMIT_S, time left - 35 s), the 35 s being
# timeout's 20 s grace after SIGINT and the summary.
stage() {
  local name=$1 limit=$2; shift 2
  [[ " $STAGES " == *" $name "* ]] || return 0
  local left=$(( $(remaining) - 35 ))
  (( left < limit )) && limit=$left
  if (( limit < 20 )); then
    echo "== $name: skipped, $(remaining) s left"; RC[$name]=skipped; return 0
  fi
  echo "== $name (limit ${limit}s, $(date +%T))"
  local t0=$(date +%s)
  # SIGINT first: pytest then stops and still prints what passed and failed so far.
  timeout -s INT -k 20 "$limit" "$@" >"$LOG/$name.log" 2>&1
  RC[$name]=$?
  echo "   rc=${RC[$name]} in $(( $(date +%s) - t0 )) s"
  tail -n "${TAIL:-6}" "$LOG/$name.log" | cut -c1-200
  save
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
    --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  # The device tool copies the working tree over a checkout whose .git may lag it: pass the
  # real commit as SEQKERN_COMMIT=$(git rev-parse --short HEAD) in the device command.
  echo "commit ${SEQKERN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null) (per .git, may lag)}"
} 2>&1 | tee "$LOG/gpu.txt"

build() {
  # A _C built on the CPU machine for these very sources, this torch and these archs (`make
  # gpu-torch-check` leaves it in gpu-prebuilt/; the run carries it): installed without
  # compiling, which took 126-138 s of the lease. Anything else: compiled here.
  local stamp want
  stamp=$(cat gpu-prebuilt/stamp 2>/dev/null)
  want=$(bash bench/prebuilt_stamp.sh "$($PY -c 'import torch; print(torch.__version__)')" \
         "$SEQKERN_CUDA_ARCHS")
  if [[ -f gpu-prebuilt/_C.abi3.so.xz && "$stamp" == "$want" ]]; then
    rm -f seqkern/_C*.so
    SEQKERN_NO_EXTENSION=1 $PY -m pip install -q -e . --no-build-isolation --no-deps &&
      $PY -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), \
              open(sys.argv[2], 'wb'))" gpu-prebuilt/_C.abi3.so.xz seqkern/_C.abi3.so &&
      $PY -c "import seqkern._C" && { echo "installed the prebuilt _C (stamp $stamp)"; return 0; }
    echo "the prebuilt _C did not install or load: compiling"
    rm -f seqkern/_C*.so
  elif [[ -n "$stamp" ]]; then
    echo "gpu-prebuilt/ was built from other sources or for another torch: compiling"
  fi
  rm -f seqkern/_C*.so  # a _C left by an earlier call would shadow (cpython-3XX) or stand in
  $PY -m pip install -q -e . --no-build-isolation --no-deps && return 0
  echo "CUDA build failed; building the CPU kernels only so that Triton still runs"
  SEQKERN_SKIP_CUDA_BUILD=1 $PY -m pip install -q -e . --no-build-isolation --no-deps
  return 3
}
export -f build; export PY
stage build 240 bash -c build
$PY -m seqkern.info >"$LOG/info.txt" 2>&1; grep -iE "cuda|triton" "$LOG/info.txt" | head -n 8

PYTEST=($PY -m pytest -q -p no:cacheprovider -rf)
$PY -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout=150 --timeout-method=thread)
XDIST=()
$PY -c "import xdist" 2>/dev/null && XDIST=(-n "${WORKERS:-8}")
# (tests/conftest.py poisons every test's outputs; the benchmarks run unpoisoned)
export SEQKERN_TEST_DEVICE=cuda

stage cuda_risky 150 "${PYTEST[@]}" tests/test_cuda_backend.py

BENCH=($PY -m pytest -q -s -p no:cacheprovider)
# Issue 5's GPU targets first: small batch, fastrnns training, packed; decoding steps (mid-batch skipped).
# (220 s: the seqkern-cuda-split rows added at fastrnns; a prebuilt _C leaves the time free)
# (the training step on data at the fastrnns and small-batch B4 shapes only: the lease; the
# Triton layers, whose compiles alone take tens of seconds, in bench_more at B4 inference; so is
# LSTM proj_size, which on a GPU runs on triton: fp32 inference and the step on data)
stage bench_layers 220 "${BENCH[@]}" bench/test_rnn_layer_bench.py \
  -k "${LAYER_K:-not triton and not mid-batch and not projection and not (train-data and (packed or B1 or B8))}"
# Why a step takes what it does: Nsight Compute's counters of one forward and one backward
# recurrence (LSTM fastrnns training, bf16 and fp32), stall reasons first (bench/ncu_rnn.py).
NCU=(ncu --clock-control none --profile-from-start off -k regex:layer_ --section SpeedOfLight
     --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats
     --section Occupancy --section SourceCounters)
TAIL=12 stage ncu 90 "${NCU[@]}" $PY bench/ncu_rnn.py
# Shared-memory hazards in the layer kernels (cp.async staging, tensor-core tiles).
stage racecheck 90 compute-sanitizer --tool racecheck --error-exitcode 9 --print-limit 20 \
  $PY bench/sanitize_rnn.py
# Where the layer and cell time goes (kernels vs host), cuda / triton / torch side by side.
TAIL=30 stage profile 60 $PY bench/gpu_profile.py
# A one-step call's host time, layer by layer of the stack (module, op, body, entry point),
# beside torch's module: what the cells' 150-300 us of host time are made of.
TAIL=28 stage host 45 $PY bench/host_overhead.py --calls 200 --rounds 5
stage tests 200 "${PYTEST[@]}" "${XDIST[@]}" tests/ -m "not cuda_emulation" \
  --ignore=tests/test_cuda_backend.py -k "${TESTS_K:-}"
stage sm80 60 env SEQKERN_CUDA_SM90=0 "${PYTEST[@]}" "${XDIST[@]}" tests/test_attention.py -k cuda
stage bench_more 200 "${BENCH[@]}" bench/test_attention_bench.py bench/test_rnn_cell_bench.py \
  bench/test_rnn_layer_bench.py \
  -k "${MORE_K:-L4096 or (Cell and B64) or (rnn_layer and triton and small-batch-B4 and inference) or (rnn_layer and projection and float32 and (inference or train-data))}"

echo
echo "== summary (rc 124 = timed out): $(for s in "${!RC[@]}"; do printf '%s=%s ' "$s" "${RC[$s]}"; done)"
for s in tests sm80 cuda_risky racecheck; do
  [[ -f "$LOG/$s.log" ]] && echo "$s: $(grep -E '(passed|failed|error)' "$LOG/$s.log" | tail -n 1)"
done
$PY bench/compare_backends.py --table "$OUT_DIR/bench.json" 2>&1 | tee "$LOG/table.md" | cut -c1-150
save
cp "$LOG/table.md" "$OUT_DIR/" 2>/dev/null
echo "total $(( $(date +%s) - START )) s"
