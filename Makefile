# One-command set-up on a fresh machine. The CPU torch wheel is installed first and on its own,
# so that resolving the rest never pulls a multi-GB CUDA build of torch.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-long bench lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/flowdiff compare

test: setup
	$(BIN)/python -m pytest -q

test-long: setup
	$(BIN)/python -m pytest -q --slow

bench: setup
	$(BIN)/python -m pip install -q -r benchmarks/requirements.txt
	$(BIN)/python benchmarks/run_all.py

lint: setup
	$(BIN)/ruff check flowdiff solvers tests benchmarks
