# The README's two commands: `make demo` (main job on the embedded tiny preset) and `make test` (what CI runs).
# `make test-fast`: the unit and integration tiers only (tests/conftest.py describes the tiers), for the inner loop.
# Each tier runs in a pytest process of its own (scripts/test-tiers.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test test-fast lint demo clean

setup:
	@bash scripts/setup.sh

# ruff, then the dead-code check (vulture, ~2 s; settings and paths in pyproject.toml [tool.vulture])
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/vulture

test: setup
	@bash scripts/setup-test-deps.sh
	$(VENV)/bin/ruff check .
	$(VENV)/bin/vulture
	PYTEST_ARGS="$(PYTEST_ARGS)" VENV=$(VENV) bash scripts/test-tiers.sh unit integration e2e

test-fast: setup
	@bash scripts/setup-test-deps.sh
	$(VENV)/bin/ruff check .
	$(VENV)/bin/vulture
	PYTEST_ARGS="$(PYTEST_ARGS)" VENV=$(VENV) bash scripts/test-tiers.sh unit integration

demo: setup
	$(PY) -m demo $(DEMO_ARGS)

clean:
	rm -rf outputs
