# make serve  — set up (idempotent, cached) and serve the app on http://127.0.0.1:8000/
# make test   — set up and run every test (native + headless-browser)
# make bench  — set up and print the benchmark table
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: setup system-deps serve test test-native test-browser bench clean-vendor

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

system-deps:
	@bash scripts/system-deps.sh

setup: system-deps $(STAMP)
	@$(BIN)/tabmesh setup

serve: setup
	$(BIN)/tabmesh serve $(ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-native: setup
	$(BIN)/python -m pytest tests/native $(PYTEST_ARGS)

test-browser: setup
	$(BIN)/python -m pytest tests/browser $(PYTEST_ARGS)

bench: setup
	$(BIN)/tabmesh bench $(ARGS)

clean-vendor:
	rm -rf vendor models
