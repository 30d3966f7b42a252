# The two commands of the README's Quick start. Each bootstraps what is missing first (idempotent).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup demo test lint

setup:
	@bash scripts/bootstrap.sh

demo: setup
	@$(PY) -m examples.demo $(ARGS)

test: setup
	@$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	@$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy
