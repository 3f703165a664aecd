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
.PHONY: help install run test test-all reproduce-table bench clean

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

clean:  ## remove run outputs and caches (keeps .venv, the kanji cache, studies/ and results/)
	rm -rf outputs multirun .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
