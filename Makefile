# The two commands of the README's Quick start. Each bootstraps what is missing first (idempotent).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup demo test test-fast lint

# These machines set PYTHONDONTWRITEBYTECODE; empty for the tests (Python takes empty as unset): pytest keeps each
# test module as it rewrote its asserts (__pycache__, ignored by git) instead of rewriting every module in every
# worker at every run (2.5 s of CPU per pytest worker), and the processes the tests start keep their bytecode too.
test test-fast: export PYTHONDONTWRITEBYTECODE :=

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

# The edit-test loop: no Prefect server, no Packer, no Terraform; about 40 s on 2 cores. Its tests wait (backoffs,
# timeouts) more than they compute, and a few wait seconds: a worker that runs out of tests takes some from
# another's queue (worksteal), instead of idling while one worker works through its last sleepy tests alone.
# Races run with five threads here and at full scale (marked stress) in `make test`: the six full-scale races
# alone took 16 CPU-s of the 60 its pytest workers used (tests/helpers.py crowds).
test-fast: setup
	@$(VENV)/bin/lint-imports --no-cache >/dev/null || $(VENV)/bin/lint-imports --no-cache
	@$(PY) -m pytest -n $(JOBS) --dist worksteal -m "not slow and not tools and not stress" $(PYTEST_ARGS)

# Style, types and the layer contract (library <- blocks <- tasks <- flows | cli). `make test` runs it first.
lint: setup
	@$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy
	@$(VENV)/bin/lint-imports --no-cache >/dev/null || $(VENV)/bin/lint-imports --no-cache
