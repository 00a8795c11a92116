# One-command set-up on a fresh machine. The CPU torch wheel is installed first and on its own,
# so that resolving the rest never pulls a multi-GB CUDA build of torch.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-long bench lint docs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml Makefile
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	# k-diffusion, a peer the tests check equivalence against: its sampling module only (its own
	# requirements pull torchvision & co., which do not match the CPU torch wheel)
	$(BIN)/python -m pip install -q --no-deps k-diffusion==0.1.1.post1
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/flowdiff compare --peers diffusers,k-diffusion

test: setup
	$(BIN)/python -m pytest -q

test-long: setup
	$(BIN)/python -m pytest -q --slow

# The benchmarks behind benchmarks/RESULTS.md (tens of minutes on 2 cores; each script documents its options).
bench: setup
	$(BIN)/python -m pip install -q -r benchmarks/requirements.txt
	$(BIN)/python benchmarks/bench_overhead.py
	$(BIN)/python benchmarks/bench_models.py
	$(BIN)/python benchmarks/bench_lownfe.py
	$(BIN)/python benchmarks/bench_adaptive.py
	$(BIN)/python benchmarks/bench_reconstruction.py
	$(BIN)/python benchmarks/bench_eta.py
	$(BIN)/python benchmarks/bench_throughput.py --out benchmarks/results/throughput_cpu.md

# The documentation site, offline, into site/ (mkdocs-material + mkdocstrings: the API reference from the
# docstrings). --strict: a warning (a broken reference, a name that does not resolve) fails the build.
docs: setup
	$(BIN)/mkdocs build --strict --site-dir site

lint: setup
	$(BIN)/ruff check flowdiff solvers tests benchmarks examples docs
