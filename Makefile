# The README's two commands: `make demo` (main job on the embedded tiny preset) and `make test` (what CI runs).
# `make test-fast`: the unit and integration tiers only (tests/conftest.py describes the tiers), for the inner loop.
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
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

test-fast: setup
	@bash scripts/setup-test-deps.sh
	$(VENV)/bin/ruff check .
	$(VENV)/bin/vulture
	$(PY) -m pytest -q $(PYTEST_ARGS) tests/unit tests/integration

demo: setup
	$(PY) -m demo $(DEMO_ARGS)

clean:
	rm -rf outputs
