#!/usr/bin/env bash
# Here, before a run on the GPU machine (which has no network): pack what it needs into .gpu/
# (git-ignored; carry it): the patched llama-cpp-python tree without what the build does not
# read (the sdist itself is over the 64 MiB a run may carry), and wheels of the Python packages
# the machine lacks, and test-backend-ops.cpp with the series' cases. Then, there: scripts/gpu/run.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
"$BIN/powerinfer-attn" build > /dev/null  # vendor/src is the current series applied
mkdir -p .gpu
L=src/vendor/llama.cpp
tar -C vendor -czf .gpu/src.tgz \
	--exclude="src/.git" --exclude="src/llama_cpp/lib" --exclude="src/examples" --exclude="src/docs" --exclude="src/tests" \
	--exclude="$L/docs" --exclude="$L/models" --exclude="$L/benches" --exclude="$L/tests" \
	--exclude="$L/examples" --exclude="$L/tools" --exclude="$L/media" --exclude="$L/pocs" \
	--exclude="$L/ggml/src/ggml-vulkan" --exclude="$L/ggml/src/ggml-sycl" --exclude="$L/ggml/src/ggml-opencl" \
	--exclude="$L/ggml/src/ggml-hexagon" --exclude="$L/ggml/src/ggml-metal" --exclude="$L/ggml/src/ggml-cann" \
	--exclude="$L/ggml/src/ggml-webgpu" --exclude="$L/ggml/src/ggml-et" --exclude="$L/ggml/src/ggml-openvino" \
	src
cp vendor/$L/tests/test-backend-ops.cpp .gpu/  # for run.sh backend-ops (the tests folder is left out above)
"$BIN/python" -m pip download -q --no-deps --only-binary=:all: -d .gpu/wheels diskcache==5.6.3 gguf==0.19.0
ls -la .gpu .gpu/wheels
