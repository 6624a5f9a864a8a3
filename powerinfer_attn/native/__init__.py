"""The native layer: fetching, patching and building llama.cpp (``build``), the patched bindings
and the constants shared with the C API (``bindings``), ggml ops run one at a time for the kernel
tests (``kernels``) and the model files (``model``). Imports nothing else of the package."""
