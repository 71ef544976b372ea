# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv with pip (uv and poetry do not see the torch wheels on this machine's disk),
# install the project once, and skip the install when pyproject.toml has not changed.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?=

.PHONY: install demo test test-quick lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/curation demo --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-quick: $(STAMP)
	$(PY) -m pytest -m quick $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check curation tests benchmarks
	$(VENV)/bin/ruff format --check curation tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format curation tests benchmarks
	$(VENV)/bin/ruff check --fix curation tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/crawl.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
