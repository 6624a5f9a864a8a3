"""Sparse decode for an existing ``llama_cpp.Llama``: the installed ``llama_cpp`` is our patched
build, so its context can take the sparse switch, a predictor file and a fill.

    from llama_cpp import Llama
    from powerinfer_attn.serving import sparsify

    llm = Llama("model.gguf", n_ctx=4096)
    sparsify.sparsify(llm, "trained:pred.gguf:density=0.7")
    out = llm.create_completion("...", max_tokens=64)       # or create_chat_completion, stream=True
    print(sparsify.head_density(llm))                       # of the decode steps since the last call
    sparsify.unsparsify(llm)                                # dense again

Prompt evaluation stays dense (batches of more than one token); every generated token is one
sparse decode step. Predictors that choose in the graph (``trained:``) or keep one mask
(``all``, ``static:K``) work here; predictors that run Python before each step (``oracle``,
``random``, ``mask-file``) need the ``Engine``, which owns the decode loop.
"""

from __future__ import annotations

import numpy as np

from ..engine.decode import Engine, EngineError
from ..predictors.basic import AllHeads, NoHeads, StaticHeads
from ..predictors.trained import TrainedHeads
from ..predictors.specs import get_predictor

_STATE = "_powerinfer_attn"


def sparsify(llm, predictor: str = "all", sparse_min_ctx: int | str = 0, say=None) -> str:
    """Turn sparse decode on for ``llm`` with ``predictor`` (a name as ``--predictor`` takes);
    returns the predictor's full name. Calling it again replaces the predictor.
    ``sparse_min_ctx``: tokens at positions below it decode on the stock graph (``auto``: where
    `bench` measured sparse to pay on this machine, ``engine.crossover``)."""
    unsparsify(llm)
    eng = Engine.attach(llm.model_path, llm.model, llm.ctx,
                        flash_attn=getattr(llm.context_params, "flash_attn_type", 0) == 1)
    pred = get_predictor(predictor, llm.model_path)
    inner = getattr(pred, "inner", pred)  # a predictor with window fill (:fill=window:S+W)
    if not isinstance(inner, (TrainedHeads, AllHeads, NoHeads, StaticHeads)):
        raise ValueError(f"{pred.name}: sparsify takes trained:..., all, static:K or none:fill=window:S+W; a predictor that runs "
                         f"Python before every step needs powerinfer_attn.engine.decode.Engine")
    if getattr(inner, "calibrate", 0):
        # llama-cpp-python prefills and decodes itself: nothing here runs between its prompt and its first step
        raise ValueError(f"{pred.name}: calibrate=N runs through powerinfer_attn.engine.decode.Engine (generate, score, "
                         f"needle, eval --via engine); sparsify and the server do not calibrate yet")
    pred.bind(eng)  # shapes, the model it was made for; a trained file is loaded with its rule and fill
    mask = None
    if isinstance(inner, TrainedHeads):
        eng.use_head_predictor(True)
        eng.head_stats(reset=True)
    else:
        mask = eng.check_mask(pred.predict(None))
        eng.set_mask(mask)
    from ..engine import crossover

    eng.set_sparse_min_ctx(crossover.resolve(sparse_min_ctx, llm.model_path, eng.n_threads, eng.n_gpu_layers,
                                             pred.in_graph, say))
    eng.set_sparse(True)
    setattr(llm, _STATE, {"engine": eng, "predictor": pred.name, "mask": mask, "pred": pred})
    return pred.name


def unsparsify(llm) -> None:
    """Dense decode again (the stock graph); a no-op on a dense ``llm``."""
    state = getattr(llm, _STATE, None)
    if state is None:
        return
    eng = state["engine"]
    if not eng.closed and llm.ctx is not None:
        eng.set_sparse(False)
        eng.set_head_fill("zero")  # and no window fill: the next predictor sets its own
        if eng._head_predictor is not None:
            eng.use_head_predictor(False)
    eng.close()  # lets go of the pointers only
    delattr(llm, _STATE)


def restart(llm) -> None:
    """A new text starts: the predictor's density control from its own threshold again (the
    server calls this before each request, so that an answer does not depend on earlier ones)."""
    state = getattr(llm, _STATE, None)
    if state is not None:
        state["pred"].restart(state["engine"])


def sparse_min_ctx(llm) -> int:
    """The position from which ``llm`` decodes on the sparse graph (0 when not sparsified)."""
    state = getattr(llm, _STATE, None)
    return state["engine"].sparse_min_ctx if state is not None else 0


def predictor_name(llm) -> str | None:
    """The predictor ``llm`` decodes with, or None when dense."""
    state = getattr(llm, _STATE, None)
    return state["predictor"] if state else None


def head_density(llm, reset: bool = True) -> float | None:
    """Mean head density of the sparse decode steps since ``sparsify`` or the last call (with
    ``reset``); None when ``llm`` is dense or decoded no token since."""
    state = getattr(llm, _STATE, None)
    if state is None:
        return None
    if state["mask"] is not None:
        return float(np.mean(state["mask"]))
    kept, total = state["engine"].head_stats(reset)
    return kept / total if total else None


__all__ = ["sparsify", "unsparsify", "restart", "head_density", "predictor_name", "sparse_min_ctx", "EngineError"]
