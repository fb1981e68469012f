# Two commands on a fresh Debian machine: `make run` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8080

.PHONY: setup setup-test run test lint typecheck services bench bench-peers clean

# `make run` installs what the server needs; `make test` adds the test tools (pytest, playwright, ruff).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV) || (apt-get update -qq && apt-get install -y -qq python3-venv && python3 -m venv $(VENV))
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test]'
	touch $@

public/node_modules/.installed: public/package.json public/package-lock.json
	command -v npm >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq nodejs npm)
	cd public && npm ci --no-audit --no-fund --loglevel=error
	touch $@

setup: $(VENV)/.installed public/node_modules/.installed

setup-test: setup $(VENV)/.installed-test

run: setup
	@echo "UVM Compute on the embedded default (SQLite + in-process queue, data in ./data)."
	@echo "Open http://$(HOST):$(PORT)/ to volunteer, http://$(HOST):$(PORT)/dashboard to submit work."
	@echo "Results are confirmed by a second volunteer: open the volunteer page in two browsers (or a private window)."
	$(VENV)/bin/uvm-compute serve --host $(HOST) --port $(PORT)

services:
	bash scripts/ensure-services.sh

lint: setup-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup-test
	$(VENV)/bin/mypy  # server/ and uvm_compute/, settings in pyproject.toml [tool.mypy]

test: setup-test services lint typecheck
	$(VENV)/bin/pytest -q -p no:cacheprovider --durations=30

bench: setup-test services
	$(PY) bench/dispatch.py --volunteers 500 --tasks 60000 --prefetch 8
	$(PY) bench/dispatch.py --backend sqlite --volunteers 100 --tasks 30000
	$(PY) bench/browser.py

# UVM against Dask, Celery and Ray on one job (their packages: the `bench` extra, never `make test`'s)
bench-peers: setup-test services
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/peers.py

clean:
	rm -rf $(VENV) public/node_modules data
