"""powerinfer-attn: decode-time attention-head sparsity for llama.cpp.

Modules: ``build`` (fetch, patch, build the engine), ``model`` (the default GGUF),
``engine`` (step-by-step decode through the patched bindings), ``cli``.
"""

__version__ = "0.1.0"
