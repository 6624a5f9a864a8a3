# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create the virtual environment, install this package, build and install the
# patched llama.cpp (incremental: seconds when nothing changed) and fetch the default model.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
PY      = $(BIN)/python

.PHONY: setup demo test test-fast sanitize figures budget-sweep clean

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
	$(MAKE) sanitize

# The README's figures: quality on WikiText-2, the trained predictor's Pareto table, and decode
# speed at 2 threads (about 75 min on 2 cores). `powerinfer-attn show figures/FILE.json` prints
# a result's tables again. The predictor data and file go to vendor/predictor (git-ignored).
TEXT ?= ../shared/data/wikitext-2-raw/wiki.test.raw
PRED  = vendor/predictor/pred.gguf
PRED_MEAN = vendor/predictor/pred-mean.gguf
PRED_ZERO = vendor/predictor/pred-zero.gguf
PRED_SHARE = vendor/predictor/pred-share.gguf
figures: setup
	mkdir -p figures vendor/predictor
	$(BIN)/powerinfer-attn calibrate --text-file $(TEXT) -t 2
	$(BIN)/powerinfer-attn collect --text-file $(TEXT) --out vendor/predictor/data -t 2
	$(BIN)/powerinfer-attn train-predictor vendor/predictor/data --out $(PRED)
	$(BIN)/powerinfer-attn train-predictor vendor/predictor/data --fill mean --out $(PRED_MEAN)
	$(BIN)/powerinfer-attn train-predictor vendor/predictor/data --fill zero --out $(PRED_ZERO)
	$(BIN)/powerinfer-attn train-predictor vendor/predictor/data --label share --out $(PRED_SHARE)
	$(BIN)/powerinfer-attn score --text-file $(TEXT) --windows 8 -t 2 --json --plot figures/pareto.png \
		--predictor all --predictor oracle:0.8 --predictor oracle:0.85 --predictor oracle:0.9 \
		--predictor oracle:0.8:fill=$(PRED) --predictor oracle:0.85:fill=$(PRED) \
		--predictor oracle:0.9:fill=$(PRED) --predictor oracle:0.85:fill=$(PRED_MEAN) \
		--predictor static:7 --predictor random:7 \
		--predictor trained:$(PRED):density=0.6 --predictor trained:$(PRED):density=0.65 \
		--predictor trained:$(PRED):density=0.7 --predictor trained:$(PRED):density=0.75 \
		--predictor trained:$(PRED):density=0.8 \
		--predictor trained:$(PRED_MEAN):density=0.7 --predictor trained:$(PRED_ZERO):density=0.7 \
		--predictor trained:$(PRED_SHARE):density=0.7 > figures/score.json
	$(BIN)/powerinfer-attn score --text-file $(TEXT) --windows 32 -t 2 --json \
		--predictor oracle:0.8:fill=$(PRED) --predictor trained:$(PRED):density=0.65 \
		--predictor trained:$(PRED):density=0.7 --predictor trained:$(PRED_SHARE):density=0.7 \
		> figures/score-32windows.json
	$(BIN)/powerinfer-attn bench --ctx 1024,4096,8192 --density 1,0.5,0.25 --reps 20 -t 2 \
		--json --plot figures/bench-2threads.png > figures/bench-2threads.json
	$(BIN)/powerinfer-attn bench --ctx 8192 --density 0.7 --predictor trained:$(PRED) --reps 10 -t 2 \
		--no-profile --json > figures/bench-trained-8192.json
	$(BIN)/powerinfer-attn show figures/score.json
	$(BIN)/powerinfer-attn show figures/score-32windows.json
	$(BIN)/powerinfer-attn show figures/bench-2threads.json
	$(BIN)/powerinfer-attn show figures/bench-trained-8192.json

# How strongly per-layer sensitivity should shape the budgets: predictors trained with offsets
# A*log(sensitivity) for several A (defaults otherwise: linear fill, level label), scored at
# density 0.7 on windows of the *training* articles (the held-out half is not looked at to
# choose A). Needs `make figures`'s collected data.
BUDGETS = 0 0.5 1 2
budget-sweep: setup
	for a in $(BUDGETS); do $(BIN)/powerinfer-attn train-predictor vendor/predictor/data \
		--layer-budget $$a --out vendor/predictor/pred-budget-$$a.gguf || exit 1; done
	$(BIN)/powerinfer-attn score --text-file $(TEXT) --training-articles --windows 8 -t 2 --json \
		$(foreach a,$(BUDGETS),--predictor trained:vendor/predictor/pred-budget-$(a).gguf:density=0.7) \
		--predictor oracle:0.8:fill=$(PRED) > figures/budget-sweep.json
	$(BIN)/powerinfer-attn show figures/budget-sweep.json

# the pure-Python tests, no build needed
test-fast: $(BIN)/powerinfer-attn
	$(PY) -m pytest -q tests/test_build.py tests/test_model.py

# The kernel tests against ggml-base + ggml-cpu built alone from the patched tree with
# AddressSanitizer and UndefinedBehaviorSanitizer (any UB aborts). Same CPU options as the
# normal build (native, OpenMP, llamafile); -O1 -g. Incremental: a second run only rebuilds
# what changed. Python is not instrumented, so libasan is preloaded and leak checks are off.
SAN_CC      ?= gcc
SAN_CXX     ?= g++
SAN_BUILD   ?= vendor/asan-build
GGML_SRC     = vendor/src/vendor/llama.cpp/ggml
SAN_FLAGS    = -fno-sanitize-recover=undefined
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
		$(PY) -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_kernel_properties.py

clean:
	rm -rf $(VENV) vendor
