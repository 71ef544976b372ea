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

# The venv takes about 7.5 GiB (torch's build carries CUDA libraries): say so before pip runs out of disk.
MIN_FREE_GIB ?= 9

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -c 'import shutil, sys; free = shutil.disk_usage(".").free / 2**30; \
	  sys.exit(0 if free >= $(MIN_FREE_GIB) else f"make install: {free:.1f} GiB free on this disk; .venv takes about 7.5 GiB, free at least $(MIN_FREE_GIB) GiB (or set MIN_FREE_GIB)")'
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
