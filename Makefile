# make serve  — set up (idempotent, cached) and serve the app on http://127.0.0.1:8000/
# make test   — set up and run every test (native + headless-browser)
# make bench  — set up and print the benchmark table
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: setup system-deps serve test test-native test-browser bench bench-deps clean-vendor

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

# One BLAS thread: on 2 cores shared with Chromium, multi-threaded OpenBLAS measured 3-5x slower.
test: setup
	OPENBLAS_NUM_THREADS=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

test-native: setup
	$(BIN)/python -m pytest tests/native $(PYTEST_ARGS)

test-browser: setup
	$(BIN)/python -m pytest tests/browser $(PYTEST_ARGS)

# The references the benchmark compares against: llama.cpp via llama-cpp-python (compiled
# here, 10-15 minutes once; AMX off because this CPU reports AMX the VM cannot run), and
# hnswlib for the rag section (a C++ build, ~2 minutes once). sentence-transformers (torch)
# is too large to install here: point TABMESH_ST_PYTHON at a Python that has it.
bench-deps: $(STAMP)
	@$(BIN)/python -c "import llama_cpp" 2>/dev/null || { echo "building llama-cpp-python (once, 10-15 min)…"; \
	  CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" \
	  CXXFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" $(BIN)/python -m pip install -q llama-cpp-python==0.3.36; }
	@$(BIN)/python -c "import hnswlib" 2>/dev/null || $(BIN)/python -m pip install -q hnswlib==0.8.0

bench: setup bench-deps
	$(BIN)/tabmesh bench $(ARGS)

clean-vendor:
	rm -rf vendor models
