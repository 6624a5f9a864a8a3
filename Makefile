# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create the virtual environment, install this package, build and install the
# patched llama.cpp (incremental: seconds when nothing changed) and fetch the default model.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
PY      = $(BIN)/python

.PHONY: setup demo test test-fast test-cuda sanitize figures budget-sweep long-context qwen clean

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
	$(PY) scripts/serve-demo.py

test: setup
	$(BIN)/powerinfer-attn build --stock
	POWERINFER_ATTN_REQUIRE_ENGINE=1 $(PY) -m pytest -v tests
	$(MAKE) sanitize

# The figures of docs/results-cpu.md and the layer-budget sweep: pipelines in scripts/, run in this
# environment (scripts/figures.sh says what each one makes and how long it takes).
TEXT ?= ../shared/data/wikitext-2-raw/wiki.test.raw
figures: setup
	BIN=$(BIN) TEXT=$(TEXT) scripts/figures.sh
	BIN=$(BIN) TEXT=$(TEXT) scripts/long-context.sh
	BIN=$(BIN) TEXT=$(TEXT) scripts/serve.sh

budget-sweep: setup
	BIN=$(BIN) TEXT=$(TEXT) scripts/budget-sweep.sh

long-context: setup
	BIN=$(BIN) TEXT=$(TEXT) scripts/long-context.sh

# the second model (Qwen2.5-Coder-0.5B): its predictor, quality and speed tables
qwen: setup
	BIN=$(BIN) TEXT=$(TEXT) scripts/qwen.sh

# On a machine with an NVIDIA GPU and the CUDA toolkit (CI has none: tests/test_cuda.py skips
# there). On the lent GPU machine, which has no network: scripts/gpu/pack.sh here, then
# scripts/gpu/run.sh build and test there (figures/test-cuda.txt).
test-cuda: $(BIN)/powerinfer-attn
	$(BIN)/powerinfer-attn build --cuda
	$(PY) -m pytest -v tests/test_cuda.py

# the tests that need no build (no engine, no GPU): pytest -m "not engine and not gpu"
test-fast: $(BIN)/powerinfer-attn
	$(PY) -m pytest -q -m "not engine and not gpu" tests

# The kernel tests against ggml-base + ggml-cpu built alone from the patched tree with
# AddressSanitizer and UndefinedBehaviorSanitizer (any UB aborts). Same CPU options as the
# normal build (native, OpenMP, llamafile); -O1 -g. Incremental: a second run only rebuilds
# what changed. Python is not instrumented, so libasan is preloaded and leak checks are off.
SAN_CC      ?= gcc
SAN_CXX     ?= g++
SAN_BUILD   ?= vendor/asan-build
GGML_SRC     = vendor/src/vendor/llama.cpp/ggml
SAN_FLAGS    = -fno-sanitize-recover=undefined $(if $(filter x86_64,$(shell uname -m)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16)
SAN_JOBS    ?= $(shell nproc 2>/dev/null || echo 2)
SAN_GEN      = $(if $(shell command -v ninja 2>/dev/null),-G Ninja,)

$(SAN_BUILD)/CMakeCache.txt: Makefile tests/sanitize/CMakeLists.txt | setup
	@test -f $(GGML_SRC)/CMakeLists.txt || { echo "no patched tree at $(GGML_SRC): run \`$(BIN)/powerinfer-attn build --force\`" >&2; exit 1; }
	cmake -S tests/sanitize -B $(SAN_BUILD) $(SAN_GEN) -DGGML_DIR=$(abspath $(GGML_SRC)) \
		-DCMAKE_C_COMPILER=$(SAN_CC) -DCMAKE_CXX_COMPILER=$(SAN_CXX) \
		-DCMAKE_BUILD_TYPE=RelWithDebInfo \
		-DCMAKE_C_FLAGS_RELWITHDEBINFO="-O1 -g" -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g" \
		-DCMAKE_C_FLAGS="$(SAN_FLAGS)" -DCMAKE_CXX_FLAGS="$(SAN_FLAGS)" \
		-DCMAKE_LIBRARY_OUTPUT_DIRECTORY=$(abspath $(SAN_BUILD))/lib \
		-DGGML_SANITIZE_ADDRESS=ON -DGGML_SANITIZE_UNDEFINED=ON \
		-DGGML_NATIVE=ON -DGGML_LLAMAFILE=ON -DGGML_OPENMP=ON -DGGML_BLAS=OFF \
		-DGGML_BACKEND_DL=OFF -DBUILD_SHARED_LIBS=ON \
		-DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF
	@touch $@

sanitize: $(SAN_BUILD)/CMakeCache.txt
	cmake --build $(SAN_BUILD) --target ggml-base ggml-cpu -j $(SAN_JOBS)
	LD_PRELOAD="$$($(SAN_CC) -print-file-name=libasan.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
	POWERINFER_ATTN_GGML_LIB_DIR=$(abspath $(SAN_BUILD))/lib \
		$(PY) -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_kernel_properties.py tests/test_window_kernels.py tests/test_budget_kernels.py \
		tests/test_fa_grouped.py

clean:
	rm -rf $(VENV) vendor
