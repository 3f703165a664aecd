#!/usr/bin/env bash
# `make bench-gpu`: the GPU checks as one prepared script that fits a 10-minute call on an H100 (about 9.5 minutes).
#   1. nvidia-smi's card, memory and driver;
#   2. the gpu-marked tests (tests/test_gpu.py and friends: engine and evaluation parity on CUDA, data on the
#      device, bf16, a whole run with the GPU defaults), and beside them every experiment row's acceptance
#      command on fixture files (benchmarks/experiment_rows.py; as many as ROWS_BUDGET allows);
#   3. then, alone on the GPU, the benchmark on CUDA (every setting; EVAL_TASKS (300) evaluation tasks timed per
#      row, scaled to 2,000).
# Results go to $OUT when it is set (the lent GPU machines' output folder), else to benchmarks/results/.
# Python: .venv when there is one; else python3 (a lent machine's python3 holds torch): then the other
# dependencies come from .whl/ (`make gpu-wheels` here, and carry .whl), installed into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
if ! $PY -c "import hydra, higher, optuna" 2>/dev/null; then
  [ -d .whl ] || { echo "error: $PY lacks hydra/higher/optuna and there is no .whl/ (make gpu-wheels)"; exit 2; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results}
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import sys, torch; print('Python', sys.version.split()[0], 'torch', torch.__version__, 'CUDA', torch.version.cuda)"
} 2>&1 | tee "$out/gpu-tests.txt"
# Nothing timed yet: the tests and the experiment rows share the GPU (rows: ResNet-12 with SiMT in one process,
# the other rows in two; each starts no new run after ROWS_BUDGET seconds).
rows() {  # name, then experiment_rows arguments
  local name=$1; shift
  timeout "${ROWS_TIMEOUT:-240}" $PY -m benchmarks.experiment_rows --budget "${ROWS_BUDGET:-190}" \
    --out "$out/rows-$name.md" "$@" trainer.threads=3 >"$out/rows-$name.log" 2>&1
}
rows resnet12 --only resnet12 --simt on & r1=$!
rows other-0 --exclude resnet12 --shard 0/2 & r2=$!
rows other-1 --exclude resnet12 --shard 1/2 & r3=$!
timeout "${TEST_TIMEOUT:-150}" $PY -m pytest -q -m gpu -p no:cacheprovider tests >>"$out/gpu-tests.txt" 2>&1
tests=$?
wait $r1; rows1=$?; wait $r2; rows2=$?; wait $r3; rows3=$?
tail -n 25 "$out/gpu-tests.txt"; tail -n 3 "$out"/rows-*.md
timeout "${BENCH_TIMEOUT:-320}" $PY -m benchmarks.bench --device cuda --eval-tasks "${EVAL_TASKS:-300}" \
  --out "$out/$(date -u +%Y-%m-%d)-cuda.md" 2>&1 | tee "$out/bench-log.txt" | tail -n 120
bench=$?
echo "gpu tests exit $tests, rows exit $rows1 $rows2 $rows3 (1: a row failed; 124: time limit), benchmark exit $bench" \
  "(124: stopped at its time limit; the tables of the settings done are kept)"
exit $(( tests || bench || rows1 == 1 || rows2 == 1 || rows3 == 1 ))
