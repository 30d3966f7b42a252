# The two commands of the README's Quick start. Each bootstraps what is missing first (idempotent).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup demo test test-fast lint

setup:
	@bash scripts/bootstrap.sh

demo: setup
	@$(PY) -m examples.demo $(ARGS)

# Two pytest workers per core, at most 4: each has its own Prefect server, worker and stand-ins, and takes whole
# test files, so module fixtures are made once; the longest files first (tests/conftest.py). A test waits on
# servers, tools, health checks and timeouts as much as it computes: on 2 cores, 4 workers kept the CPU 92 %
# busy and pytest took 12.3-12.9 min where 2 took 18.2-19.5 (docs/benchmarks.md, "Issue 24: fourth session").
JOBS ?= $(shell n=$$(( $$(nproc) * 2 )); [ $$n -gt 4 ] && n=4; echo $$n)

test: lint
	@$(PY) -m pytest -n $(JOBS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The edit-test loop: no Prefect server, no Packer, no Terraform; about 60 s on 2 cores.
test-fast: setup
	@$(VENV)/bin/lint-imports --no-cache >/dev/null || $(VENV)/bin/lint-imports --no-cache
	@$(PY) -m pytest -n $(JOBS) -m "not slow and not tools" $(PYTEST_ARGS)

# Style, types and the layer contract (library <- blocks <- tasks <- flows | cli). `make test` runs it first.
lint: setup
	@$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy
	@$(VENV)/bin/lint-imports --no-cache >/dev/null || $(VENV)/bin/lint-imports --no-cache
