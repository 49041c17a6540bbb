# Two commands do all set-up on a fresh machine:
#   make quickstart   install, then run the main job on the embedded synthetic click log
#   make test         install (with dev tools), then lint and run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-dev quickstart test lint bench

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	# torch first, pinned, so the local CPU wheel is used and no CUDA build is pulled in
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .

install-dev: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"

quickstart: install
	$(BIN)/recsys-dpo run experiment=quickstart

lint: install-dev
	$(BIN)/ruff check .

test: install-dev
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: install-dev
	$(BIN)/python benchmarks/bench_pairs.py
