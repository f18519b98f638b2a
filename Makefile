# Every target fills its own virtual environment first, so a fresh machine needs nothing but python3.
# The two commands the README names:  make book  and  make test

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

# FAST mode: small models, small patches, short schedules (CPU minutes). Unset it for the paper's settings.
export CELLSEG_FAST ?= 1
# Two cores here: one torch thread per pytest worker avoids oversubscription.
TEST_WORKERS ?= 2

.PHONY: help install test test-unit test-notebooks lint format book clean benchmarks

help:
	@echo "make test   - install into $(VENV) if needed, lint, run unit tests and execute every notebook (nbval)"
	@echo "make book   - install into $(VENV) if needed and build the Jupyter Book, executing every notebook"
	@echo "make benchmarks - run the scripts in benchmarks/ and update benchmarks/RESULTS.md"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=23"
	$(BIN)/python -m pip install --quiet -e ".[test,book]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (cellseg-lite)" > /dev/null
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check cellseg_lite tests benchmarks notebooks
	$(BIN)/ruff format --check cellseg_lite tests benchmarks

format: $(STAMP)
	$(BIN)/ruff check --fix cellseg_lite tests benchmarks notebooks
	$(BIN)/ruff format cellseg_lite tests benchmarks

test-unit: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile tests

test-notebooks: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --nbval-lax notebooks

test: lint test-unit test-notebooks

book: $(STAMP)
	$(BIN)/jupyter-book build --all -W --keep-going .

benchmarks: $(STAMP)
	$(BIN)/python benchmarks/bench_metrics.py

clean:
	rm -rf _build .pytest_cache .ruff_cache
