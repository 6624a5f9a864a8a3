#!/usr/bin/env bash
# On the GPU machine (no network; carry .gpu/src.tgz and .gpu/wheels, made here by
# scripts/gpu/pack.sh; not .gpu itself, which would replace the build kept there):
#   scripts/gpu/run.sh build           the patched tree with ggml's CUDA backend into .gpu/site
#                                      (build dir .gpu/build: incremental while the machine stays)
#   scripts/gpu/run.sh test            tests/test_cuda.py, then compute-sanitizer over part of it
#   scripts/gpu/run.sh backend-ops     ggml's test-backend-ops with ggml-tests.patch's cases (carry
#                                      .gpu/test-backend-ops.cpp): CUDA against the CPU, per op
#   scripts/gpu/run.sh bench NAME ...  bench -ngl 99 on a synthetic model of NAME's shape
#                                      (llama2-7b, llama3-8b, smollm2-135m), the rest bench's options
#   scripts/gpu/run.sh profile NAME CTX  GPU time per kernel of a decode step (profile_step.py)
#   scripts/gpu/run.sh pred NAME FILL  a random predictor (top-k, n_head/2) with that fill (zero,
#                                      mean, linear) for NAME's model: prints its path, for
#                                      bench --predictor trained:PATH
#   scripts/gpu/run.sh ruler MODEL SAMPLES TAG PREDICTOR...  RULER answers on the GPU (-ngl 99, flash
#                                      attention) for the samples `eval --samples-out` wrote here
#                                      (lm-eval is not on that machine): $OUT/ruler-TAG.json, to
#                                      score here with `eval --rescore`
# Results go to $OUT (or out/) as NAME files.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
OUT=${OUT:-out}
mkdir -p "$OUT" .gpu/site
export PYTHONPATH="$PWD/.gpu/site:$PWD" PYTHONUNBUFFERED=1
# libggml-cuda.so exports its own instances of libstdc++ templates; loaded through ctypes into a
# Python that has not loaded libstdc++ yet, llama's model loader crashed printing a number there
# (seen 2026-11-26). Loading libstdc++ first avoids it.
export LD_PRELOAD=${LD_PRELOAD:-$(ldconfig -p | awk '/libstdc\+\+\.so\.6 /{print $NF; exit}')}

build() {
	[ -f .gpu/site/diskcache/__init__.py ] || $PY -m pip install -q --no-index --no-deps --target .gpu/site .gpu/wheels/*.whl
	# unpack over the last tree, touching only files whose content changed (make stays incremental)
	rm -rf .gpu/new && mkdir -p .gpu/new .gpu/src && tar -C .gpu/new -xzf .gpu/src.tgz
	(cd .gpu/new/src && find . -type f) | while read -r f; do
		cmp -s ".gpu/new/src/$f" ".gpu/src/$f" || { mkdir -p ".gpu/src/$(dirname "$f")"; cp ".gpu/new/src/$f" ".gpu/src/$f"; }
	done
	args=$($PY -c "from powerinfer_attn.native.build import cmake_args_from_env; print(' '.join(cmake_args_from_env(True)))")
	CMAKE_ARGS="$args" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) $PY -m pip install -q --no-build-isolation --no-deps --upgrade \
		--target .gpu/site -C build-dir="$PWD/.gpu/build" ./.gpu/src
	$PY -c "from powerinfer_attn.native import build; print(build.check())"
}

model() {  # a synthetic model of a known shape in /tmp (speed does not depend on the weights)
	local f=/tmp/$1.gguf
	case $1 in
		llama2-7b) shape="32 4096 32 32 11008 32000 32768 10000" ;;
		llama3-8b) shape="32 4096 32 8 14336 32000 32768 500000" ;;
		smollm2-135m) shape="30 576 9 3 1536 49152 8192 100000" ;;
		tiny) shape="2 256 4 2 512 1000 4096" ;;
		*) echo "unknown shape $1" >&2; exit 2 ;;
	esac
	[ -f "$f" ] || $PY scripts/gpu/synthetic_model.py "$f" $shape
	echo "$f"
}

pred() {  # a random predictor for the synthetic model NAME, with fill FILL
	local m f=/tmp/$1-$2-pred.gguf
	m=$(model "$1")
	[ -f "$f" ] || $PY scripts/gpu/synthetic_predictor.py "$m" "$f" "$2" >&2
	echo "$f"
}

case ${1:-} in
	build) build ;;
	pred) pred "$2" "${3:-zero}" ;;
	smoke) $PY scripts/gpu/smoke.py "$(model "${2:-smollm2-135m}")" ;;
	profile) $PY scripts/gpu/profile_step.py "$(model "$2")" "${3:-32768}" 2>&1 | grep -v "^llama_\|^load\|^print_info" ;;
	test)
		nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
		set -o pipefail
		$PY -m pytest -v -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test-cuda.txt"
		compute-sanitizer --tool memcheck --error-exitcode 1 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py \
			-k "(test_gpu_random_masks_match_the_oracle and llama) or predictor or covers or q8_0_cache or (window_fill_matches and not 4600)" 2>&1 | tail -20 | tee "$OUT/test-cuda-sanitizer.txt"
		;;
	backend-ops)
		lib=.gpu/site/llama_cpp/lib
		g++ -std=c++17 -O1 -w -I .gpu/src/vendor/llama.cpp/ggml/include .gpu/test-backend-ops.cpp -L$lib -lggml -lggml-base \
			-Wl,-rpath,$PWD/$lib -lpthread -o .gpu/test-backend-ops
		for op in MUL_MAT_SPARSE_ATTN FLASH_ATTN_EXT_HEADS SOFT_MAX_HEADS HEAD_SELECT KV_PAGE_BOUNDS KV_PAGE_SELECT; do
			.gpu/test-backend-ops -b CUDA0 -o $op 2>&1 | grep -E "^ +$op|Backend CUDA0|tests passed"
		done | tee "$OUT/backend-ops-cuda.txt"
		;;
	bench)
		name=$2; shift 2
		tag=${TAG:-$name}  # the output files' name: TAG=llama3-8b-gqa ... --gqa
		m=$(model "$name")
		$PY -c "from powerinfer_attn.cli import main; main()" bench -m "$m" -ngl 99 --json "$@" > "$OUT/bench-gpu-$tag.json"
		$PY -c "from powerinfer_attn.cli import main; main()" show "$OUT/bench-gpu-$tag.json" | tee "$OUT/bench-gpu-$tag.txt"
		;;
	ruler)
		m=$2 samples=$3 tag=$4; shift 4
		preds=(); for p in "$@"; do preds+=(--predictor "$p"); done
		$PY -c "from powerinfer_attn.cli import main; main()" eval -m "$m" --samples-in "$samples" -ngl 99 --flash-attn \
			--json "${preds[@]}" > "$OUT/ruler-$tag.json"
		;;
	*) sed -n 2,19p "$0"; exit 2 ;;
esac
