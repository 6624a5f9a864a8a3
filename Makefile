# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create the virtual environment, install this package, build and install the
# patched llama.cpp (incremental: seconds when nothing changed) and fetch the default model.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
PY      = $(BIN)/python

.PHONY: setup demo test test-fast clean

$(BIN)/powerinfer-attn: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

setup: $(BIN)/powerinfer-attn
	$(BIN)/powerinfer-attn build
	$(BIN)/powerinfer-attn model

demo: setup
	$(BIN)/powerinfer-attn generate -p "The capital of France is" -n 32
	$(BIN)/powerinfer-attn generate -p "The capital of France is" -n 32 --sparse --predictor all

test: setup
	$(BIN)/powerinfer-attn build --stock
	POWERINFER_ATTN_REQUIRE_ENGINE=1 $(PY) -m pytest -v tests

# the pure-Python tests, no build needed
test-fast: $(BIN)/powerinfer-attn
	$(PY) -m pytest -q tests/test_build.py tests/test_model.py

clean:
	rm -rf $(VENV) vendor
