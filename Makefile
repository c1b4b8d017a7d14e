# One-command set-up, demo and tests. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow lint clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/seesay demo

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=25

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# One-way layers (import-linter's contract in setup.cfg) and ruff's checks (pyproject.toml).
lint: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) seesay-demo
