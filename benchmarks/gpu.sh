#!/usr/bin/env bash
# `make bench-gpu`: the GPU checks as one prepared script that fits a 10-minute call on an H100 (about 9.5 minutes).
#   1. nvidia-smi's card, memory and driver;
#   2. the gpu-marked tests (tests/test_gpu.py and friends: engine and evaluation parity on CUDA, data on the
#      device, bf16, a whole run with the GPU defaults);
#   3. the benchmark on CUDA (every setting, REPEATS (6) timed steps per row; EVAL_TASKS (200) evaluation tasks
#      timed per row, scaled to 2,000). 2026-11-26, H100, 10 repeats, 300 tasks: 288 s for the four Conv4 settings'
#      steps and the 28x28 evaluations.
#      2026-11-27 (task-folding engine, 6 repeats, 200 tasks): the four Conv4 settings took 339 s and the
#      ResNet-12 one did not finish in the rest of 520 s. BENCH_ONLY (a setting label's text, e.g. resnet12 or
#      "conv4 28x28") runs only those settings: one session can measure what an earlier one left out;
#      BENCH_ARGS adds benchmark options (e.g. "--engines loop,batched" to time fewer engines).
# `bash benchmarks/gpu.sh table` (`make table-gpu`) instead: `make reproduce-table PRESET=gpu` within TABLE_TIMEOUT
# (560) s; its runs resume, so calls until the table is complete fill it (runs in results/gpu-kanji, the table
# files copied to $OUT).
# `bash benchmarks/gpu.sh rows` (`make rows-gpu`) instead: the experiment rows' acceptance command for the ResNet-12
# rows (ROWS_ONLY), alone on the card, rows started until ROWS_BUDGET (480) s: a 2-core CPU cannot run them in a
# session (an estimated 10+ minutes per 1-shot row, 30+ per 5-shot row).
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
if [ "${1:-bench}" = table ]; then  # the GPU-scale kanji table: runs resume, so repeated calls fill it
  # The runs stay in results/gpu-kanji (ignored by git: kept between calls on the same machine); the table to $out.
  timeout "${TABLE_TIMEOUT:-560}" $PY -m simt.reproduce --preset gpu 2>&1 | tail -n 40
  table=$?
  pkill -TERM -f "$PWD/run.py -m" && sleep 10  # runs still going: SIGTERM saves their checkpoints for the next call
  cp results/gpu-kanji/table.md results/gpu-kanji/table.csv results/gpu-kanji/runs.csv results/gpu-kanji/*.png \
    "$out/" 2>/dev/null
  echo "reproduce-table exit $table (124: stopped at its time limit; call again to continue the runs)"
  exit "$table"
fi
if [ "${1:-bench}" = rows ]; then
  table="$out/$(date -u +%Y-%m-%d)-cuda-experiment-rows.md"
  timeout "${ROWS_TIMEOUT:-560}" $PY -m benchmarks.experiment_rows --only "${ROWS_ONLY:-resnet12}" \
    --budget "${ROWS_BUDGET:-480}" --out "$table" trainer.threads=8 >/dev/null 2>"$out/rows-log.txt"
  rows=$?
  cat "$table" 2>/dev/null || tail -n 30 "$out/rows-log.txt"  # the table as far as it got, even after a timeout
  echo "experiment rows exit $rows (124: stopped at its time limit; the rows done are in the table)"
  exit "$rows"
fi
timeout "${TEST_TIMEOUT:-120}" $PY -m pytest -q -m gpu -p no:cacheprovider tests >>"$out/gpu-tests.txt" 2>&1
tests=$?
tail -n 25 "$out/gpu-tests.txt"
timeout "${BENCH_TIMEOUT:-440}" $PY -m benchmarks.bench --device cuda --eval-tasks "${EVAL_TASKS:-200}" \
  --repeats "${REPEATS:-6}" ${BENCH_ONLY:+--only "$BENCH_ONLY"} ${BENCH_ARGS:-} \
  --out "$out/$(date -u +%Y-%m-%d)-cuda.md" 2>&1 | tee "$out/bench-log.txt" | tail -n 120
bench=$?  # the benchmark's status, not tail's: pipefail (set above)
echo "gpu tests exit $tests, benchmark exit $bench (124: stopped at its time limit; the tables of the settings" \
  "done are kept; 1: a setting failed, see the file's last section)"
exit $(( tests || bench ))
