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

.PHONY: help install browser test test-unit test-notebooks lint format book clean benchmarks bench-book

help:
	@echo "make test   - install into $(VENV) if needed, lint, run unit tests and execute every notebook (nbval)"
	@echo "make book   - install into $(VENV) if needed and build the Jupyter Book, executing every notebook"
	@echo "make benchmarks - run the scripts in benchmarks/ and update benchmarks/RESULTS.md"
	@echo "make bench-book - time every notebook in FAST mode and update benchmarks/RESULTS.md"
	@echo "make browser    - install Debian's chromium and chromium-driver if missing (the site test needs them)"

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

# The site test (tests/test_book.py) opens the built book in Debian's headless Chromium. Installed
# here when it is missing and we are root with apt-get (a fresh CI machine); otherwise say how.
CHROMIUM_PACKAGES := chromium chromium-driver
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then \
		echo "browser: $$(/usr/bin/chromium --version 2> /dev/null || echo /usr/bin/chromium)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null; then \
		echo "browser: installing $(CHROMIUM_PACKAGES) with apt-get"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -q --no-install-recommends $(CHROMIUM_PACKAGES); \
	else \
		echo "browser: /usr/bin/chromium or /usr/bin/chromedriver is missing, so the site test will skip"; \
		echo "  (and fail under CI=true). On Debian or Ubuntu install them with:"; \
		echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends $(CHROMIUM_PACKAGES)"; \
	fi

test-unit: $(STAMP) browser
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --doctest-modules tests cellseg_lite

test-notebooks: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --nbval-lax notebooks

test: lint test-unit test-notebooks

book: $(STAMP)
	$(BIN)/jupyter-book build --all -W --keep-going .

benchmarks: $(STAMP)
	$(BIN)/python benchmarks/bench_metrics.py

# Minutes: every notebook once, one at a time (the issue's budget: the whole book under 20 minutes).
bench-book: $(STAMP)
	$(BIN)/python benchmarks/bench_book.py

clean:
	rm -rf _build .pytest_cache .ruff_cache
