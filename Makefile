# The README's commands. The first use creates .venv and installs everything (no GPU needed).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# This machine has torch 2.13.0 (CPU) on disk; on a GPU machine: make TORCH="torch" (or your CUDA build).
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
PYTEST := $(BIN)/python -m pytest -p no:cacheprovider

.PHONY: setup demo test test-slow test-all bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[test,quant]"
	touch $(STAMP)

demo: $(STAMP)         ## build a model + corpus locally, harvest, analyse, query: end to end
	$(BIN)/harvest demo

test: $(STAMP)         ## the fast suite (a few minutes on 2 cores)
	$(PYTEST) -m "not slow" tests

test-slow: $(STAMP)    ## the slower end-to-end tests (real process kills, Ray clusters)
	$(PYTEST) -m slow tests

test-all: test test-slow

bench: $(STAMP)        ## benchmarks (run on a quiet machine); figures go to bench/RESULTS.md
	$(BIN)/python bench/harvest_overhead.py
	$(BIN)/python bench/pipeline_scaling.py
	$(BIN)/python bench/outlier_scan.py

clean:
	rm -rf build stores .pytest_cache
