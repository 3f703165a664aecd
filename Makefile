# SiMT sweep system. `make help` lists the targets.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=
PRESET ?= cpu
DATASET ?=
DATA_DIR ?=

.DEFAULT_GOAL := help
.PHONY: help install run test test-all reproduce-table bench bench-gpu rows-gpu table-gpu gpu-wheels clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install the pinned dependencies (torch 2.14.1, hydra 1.3.8, ...)

run: $(STAMP)  ## train + evaluate the default (MAML + SiMT, Conv4, kanji 5-way 1-shot); extra overrides: ARGS="..."
	$(PY) run.py $(ARGS)

test: $(STAMP)  ## the default test suite (fast: no `slow` or `gpu` tests)
	$(PY) -m pytest -q $(ARGS)

test-all: $(STAMP)  ## every CPU test, `slow` included
	$(PY) -m pytest -q -m "not gpu" $(ARGS)

reproduce-table: $(STAMP)  ## baseline vs SiMT table (PRESET=cpu|paper|smoke, DATASET=..., DATA_DIR=...; re-runs skip finished runs)
	$(PY) -m simt.reproduce --preset $(PRESET) $(if $(DATASET),--dataset $(DATASET)) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(ARGS)

bench: $(STAMP)  ## time a meta-step per engine vs an official-style loop (benchmarks/README.md); ARGS="--quick", "--device cuda", ...
	$(PY) -m benchmarks.bench $(ARGS)

bench-gpu:  ## the GPU checks in one go (10 min on an H100; BENCH_ONLY=resnet12 for that setting): gpu tests + CUDA benchmark
	bash benchmarks/gpu.sh

rows-gpu:  ## on a GPU (< 10 min): the ResNet-12 experiment rows' acceptance command (benchmarks/gpu.sh rows)
	bash benchmarks/gpu.sh rows

table-gpu:  ## on a GPU (< 10 min a call; call again until done): the GPU-scale kanji table (benchmarks/gpu.sh table)
	bash benchmarks/gpu.sh table

# Wheels for a machine whose python3 (3.12) has torch but not our other dependencies (the lent GPU machines).
GPU_WHEELS := hydra-core==1.3.8 omegaconf==2.3.1 higher==0.2.1 optuna==5.0.0 sqlalchemy==2.1.9 alembic==1.20.1 \
              colorlog==6.12.0 mako==1.4.3 kanjivg==20260714
gpu-wheels: $(STAMP)  ## download those wheels into .whl/ (for bench-gpu on a machine without .venv)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	$(PY) -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3  # sdist only: built here (pure Python)

clean:  ## remove run outputs and caches (keeps .venv, the kanji cache, studies/ and results/)
	rm -rf outputs multirun .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
