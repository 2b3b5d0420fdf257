# The README's two commands: `make demo` (main job on the embedded tiny preset) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test lint demo clean

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

demo: setup
	$(PY) -m demo $(DEMO_ARGS)

clean:
	rm -rf outputs
