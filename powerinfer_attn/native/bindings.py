"""The patched llama.cpp's ctypes bindings, and the constants its C API shares with Python.

This is the bottom of the package above the build: it loads ``llama_cpp.llama_cpp`` (refusing a
stock build), routes llama.cpp's log, and names the integer codes that the sparse-attention C
functions take and return (``patches/llama-sparse-attn-graph.patch``,
``llama-head-predictor.patch``, the fills included). Keep these tables in step with
``llama.h`` there; nothing here knows what a predictor or a fill is for.
"""

from __future__ import annotations

import collections
import os

from .build import PATCH_SYMBOL


class EngineError(RuntimeError):
    pass


# llama_head_predictor_set_rule's rule ids
RULE_IDS = {"file": 0, "threshold": 1, "topk": 2, "mass": 3}

# llama_set_head_fill's fill kinds: what a skipped head contributes
FILLS = ("zero", "mean", "linear")
FILL_IDS = {"zero": 0, "mean": 1, "linear": 2}
# llama_set_kv_budget: the page sizes it takes, and the defaults of the token budget (cells per
# page, sinks and recent cells always read); see docs/results-cpu.md for how they were chosen
KV_PAGES = (8, 16, 32, 64, 128, 256)
KV_PAGE, KV_SINK, KV_RECENT = 16, 4, 64
KV_DENSE_LAYERS = 0  # the first layers that read every cell under a budget
# llama_set_kv_budget_score: how a page is scored for a KV group (enum ggml_kv_page_score): its
# bound summed over the group's active heads, or the best over them of each head's bound
# relative to that head's best page
KV_SCORES = {"sum": 0, "head-max": 1, "exact": 2, "mid": 3}  # exact: the oracle (reads every key)
KV_SCORE = "sum"

# llama_sparse_attn_layer_ops's bits: which parts of a layer run on the sparse ops
OP_WQ, OP_KQV, OP_WO = 1, 2, 4
OP_ON_DEVICE = 8  # wq or wo on a GPU: dense there by design (the masked product would read it all)
OP_PREDICTOR_ON_DEVICE = 16  # the in-graph predictor is on and this layer's part of it is on a GPU
OP_UNSUPPORTED = -1  # every layer of an architecture the sparse ops do not serve

# ggml_type ids of the KV cache types a context can be given (cparams.type_k, type_v)
CACHE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "bf16": 30}

# llama_set_activated_heads's return codes
SET_HEADS_ERRORS = {
    -1: "no mask or no context",
    -2: "wrong number of values",
    -3: "a value other than 0 or 1",
    -4: "sparse attention does not support this model's architecture (llama, qwen2 and qwen3 only)",
}

# llama_head_predictor_load's return codes
PREDICTOR_LOAD_ERRORS = {
    -1: "not a readable head predictor file (see the log above)",
    -2: "it was trained for a model of another shape",
    -4: "sparse attention does not support this model's architecture (llama, qwen2 and qwen3 only)",
}

_llama = None
_log_cb = None
# llama.cpp's (and ggml's) most recent error lines, to say why a load failed
_recent_errors: collections.deque[str] = collections.deque(maxlen=8)


def bindings():
    """The patched ``llama_cpp.llama_cpp`` module, refusing a stock build.

    ``POWERINFER_ATTN_ALLOW_STOCK=1`` accepts a stock build for dense decoding only; the
    tests use it in a child process to compare against unpatched llama.cpp.
    """
    global _llama, _log_cb
    if _llama is not None:
        return _llama
    try:
        import llama_cpp.llama_cpp as C
    except (ImportError, OSError) as e:
        raise EngineError(f"the llama_cpp bindings cannot be loaded ({e}); run `powerinfer-attn build`") from e
    if not hasattr(C, PATCH_SYMBOL) and not os.environ.get("POWERINFER_ATTN_ALLOW_STOCK"):
        raise EngineError(
            f"the installed llama_cpp ({C.__file__}) is a stock build without {PATCH_SYMBOL}; "
            f"run `powerinfer-attn build` in this environment"
        )
    verbose = bool(os.environ.get("POWERINFER_ATTN_VERBOSE"))

    last_level = [0]

    @C.llama_log_callback
    def _log(level, text, _user):
        # llama.cpp is chatty at load time; keep warnings and errors unless asked.
        # ggml_log_level: 3 WARN, 4 ERROR, 5 CONT (continues the previous message)
        if level != 5:
            last_level[0] = level
        if last_level[0] == 4:  # GGML_LOG_LEVEL_ERROR
            _recent_errors.append(text.decode(errors="replace").strip())
        if verbose or last_level[0] >= 3:
            os.write(2, text)

    C.llama_log_set(_log, None)
    _log_cb = _log  # keep the callback alive
    C.llama_backend_init()
    _llama = C
    return C


def recent_errors() -> list[str]:
    """llama.cpp's most recent error lines (cleared by ``clear_errors``)."""
    return list(_recent_errors)


def clear_errors() -> None:
    _recent_errors.clear()
