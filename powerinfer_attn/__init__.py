"""powerinfer-attn: decode-time attention-head sparsity for llama.cpp.

Layers, each importing only those before it: ``native`` (build, bindings, model files),
``engine`` (decode with head masks), ``predictors``, ``serving``, ``evaluation``, ``training``;
``cli`` on top.
"""

__version__ = "0.1.0"
