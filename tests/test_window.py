"""Window fill in the engine: sparse decode with a skipped head attending over its first S and
last W KV cells, against dense decode whose inactive heads' outputs are replaced by that
restricted attention (``reference.WindowedHeads``); its predictor option and errors. The
kernels' own tests are in test_window_kernels.py."""

import numpy as np
import pytest

from powerinfer_attn.engine.decode import Engine
from powerinfer_attn.predictors.wrappers import WindowFill
from powerinfer_attn.predictors.specs import get_predictor
from powerinfer_attn.engine.reference import WindowedHeads

from test_engine import ORACLE_TEXT, random_masks, rel_diff, teacher_forced_logits
from test_faults import oracle_logits


def windowed_dense_logits(model_path, tokens, prompt_len, masks, window, flash_attn):
    return oracle_logits(model_path, tokens, prompt_len, masks, hook=WindowedHeads(*masks.shape[1:], *window),
                         n_ctx=512, n_threads=2, flash_attn=flash_attn)


@pytest.mark.parametrize("flash_attn", [False, True])
@pytest.mark.parametrize("window", [(1, 3), (4, 8)])
def test_window_fill_matches_windowed_dense_f32(f32_model_path, flash_attn, window):
    """Sparse decode with window fill gives the logits of dense decode whose inactive heads
    attend over the window only; zero fill and dense are both far from it."""
    with Engine(f32_model_path, n_ctx=512, n_threads=2, flash_attn=flash_attn) as eng:
        toks = eng.tokenize(ORACLE_TEXT)
        masks = random_masks(np.random.default_rng(sum(window)), len(toks) - 5, eng.n_layer, eng.n_head, 0.5)
        eng.set_head_window(*window)
        sparse = teacher_forced_logits(eng, toks, 5, masks)
        all_heads = teacher_forced_logits(eng, toks, 5, np.ones_like(masks))
        eng.set_head_fill("zero")  # window off again
        zero_filled = teacher_forced_logits(eng, toks, 5, masks)
        dense = teacher_forced_logits(eng, toks, 5)
    ref = windowed_dense_logits(f32_model_path, toks, 5, masks, window, flash_attn)
    assert rel_diff(sparse, ref).max() < 5e-3
    # a step whose window covers the whole sequence is dense: compare only where it does not
    short = np.arange(len(ref)) + 6 > sum(window)
    assert rel_diff(zero_filled, ref)[short].min() > 10 * rel_diff(sparse, ref).max()
    assert rel_diff(dense, ref)[short].min() > 10 * rel_diff(sparse, ref).max()
    assert rel_diff(all_heads, dense).max() < 5e-3


def test_window_fill_errors_and_specs(model_path, tmp_path):
    with Engine(model_path, n_ctx=64, n_threads=1) as eng:
        for bad in ((0, 0), (-1, 4)):
            with pytest.raises(ValueError, match="window fill"):
                eng.set_head_window(*bad)
    p = get_predictor("random:3:1:fill=window:4+60", model_path)
    assert isinstance(p, WindowFill) and p.name == "random:3+window:4+60"
    p = get_predictor("oracle:0.8:fill=window:0+16", model_path)
    assert p.name == "oracle:0.8+window:0+16" and p.hook is p.inner.hook
    from powerinfer_attn.predictors.specs import add_option

    assert add_option("trained:p.gguf:fill=window:4+60", "density=0.7") == "trained:p.gguf:density=0.7:fill=window:4+60"
    assert add_option("trained:p.gguf", "density=0.7") == "trained:p.gguf:density=0.7"
    for bad in ("random:3:fill=window:4", "random:3:fill=window:4+60:x", "all:fill=window:0+0"):
        with pytest.raises(ValueError):
            get_predictor(bad, model_path)


def test_window_fill_generates_with_a_predictor(engine):
    """A Python-side predictor with window fill decodes, and all heads with it is dense."""
    prompt = "The history of the Roman Empire begins with"
    dense = engine.generate(prompt, 12, stop_at_eog=False)
    pred = get_predictor("all:fill=window:4+8", engine.model_path)
    pred.bind(engine)
    try:
        sparse = engine.generate(prompt, 12, predictor=pred, stop_at_eog=False)
    finally:
        engine.set_head_fill("zero")
    assert sparse.tokens == dense.tokens


def test_bench_times_window_fill(model_path):
    """bench --window: the fixed-density rows run with window fill, and say so."""
    from powerinfer_attn.evaluation import bench

    res = bench.run(model_path, [300], [0.5], threads=2, reps=3, flash_attn="on", profile=False,
                    caches=("f16",), window=(4, 16), progress=lambda m: None)
    assert res["window"] == [4, 16]
    sparse = [r for r in res["rows"] if r["mode"] == "sparse"]
    assert len(sparse) == 1 and sparse[0]["ratio"] > 0.3
