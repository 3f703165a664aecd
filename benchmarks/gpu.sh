#!/usr/bin/env bash
# `make bench-gpu`: the GPU checks as one prepared script that fits a 10-minute call on an H100.
#   1. nvidia-smi's card, memory and driver;
#   2. the gpu-marked tests (tests/test_gpu.py and friends: engine and evaluation parity on CUDA, data on the
#      device, bf16, a whole run with the GPU defaults);
#   3. the benchmark on CUDA (every setting; EVAL_TASKS evaluation tasks timed per row, scaled to 2,000).
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
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu-card.txt"
timeout "${TEST_TIMEOUT:-180}" $PY -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$out/gpu-tests.txt"
tests=$?
timeout "${BENCH_TIMEOUT:-360}" $PY -m benchmarks.bench --device cuda --eval-tasks "${EVAL_TASKS:-400}" \
  --out "$out/$(date -u +%Y-%m-%d)-cuda.md" 2>&1 | tail -n 150 | tee "$out/bench-log.txt"
bench=$?
echo "gpu tests exit $tests, benchmark exit $bench (124: stopped at its time limit; the tables of the settings done are kept)"
exit $(( tests || bench ))
