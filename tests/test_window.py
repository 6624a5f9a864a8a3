"""Window fill: a head that sparse decode skips attends over its first S and last W KV cells only.

Kernels: one decode token's attention (v2 K*q, the head-masked softmax, v2 softmax*V; and flash
attention, row and split-KV paths) against numpy attention restricted to those cells, with a
mask that hides the cache view's padding and a hole. Engine: sparse decode with window fill
against dense decode whose inactive heads' outputs are replaced by that restricted attention
(``reference.WindowedHeads``)."""

import numpy as np
import pytest

from powerinfer_attn import kernels
from powerinfer_attn.engine import Engine
from powerinfer_attn.predictors import WindowFill, get_predictor
from powerinfer_attn.reference import WindowedHeads

from test_engine import ORACLE_TEXT, random_masks, rel_diff, teacher_forced_logits


def window_cells(mask, n_sink, n_recent):
    """The cells a windowed head reads: the window ends after the last cell the mask shows."""
    end = int(np.flatnonzero(mask != -np.inf).max()) + 1
    return sorted(set(range(min(n_sink, end))) | set(range(max(min(n_sink, end), end - n_recent), end)))


def reference(k, v, q, mask, heads, window):
    n_head_kv, n_kv, d = k.shape
    r = q.shape[0] // n_head_kv
    kf, vf = k.astype(np.float16).astype(np.float64), v.astype(np.float16).astype(np.float64)
    out = np.zeros((q.shape[0], d))
    for h in range(q.shape[0]):
        if heads[h]:
            cells = list(range(n_kv))
        elif window:
            cells = window_cells(mask, *window)
        else:
            continue
        s = kf[h // r, cells] @ q[h].astype(np.float16).astype(np.float64) / np.sqrt(d) + mask[cells]
        p = np.exp(s - s.max())
        out[h] = (p / p.sum()) @ vf[h // r, cells]
    return out


def attention_case(rng, n_kv, n_head, n_head_kv, d=64, pad=20, hole=None):
    k = rng.standard_normal((n_head_kv, n_kv, d)).astype(np.float32)
    v = rng.standard_normal((n_head_kv, n_kv, d)).astype(np.float32)
    q = (rng.standard_normal((n_head, d)) * 2).astype(np.float32)
    mask = np.zeros(n_kv, np.float32)
    mask[n_kv - pad:] = -np.inf  # the cache view's padding after the last token
    if hole is not None:
        mask[hole] = -np.inf
    return k, v, q, mask


@pytest.mark.parametrize("flash,inplace", [(False, False), (False, True), (True, False)])
@pytest.mark.parametrize("n_threads", [1, 3])
@pytest.mark.parametrize("n_kv", [77, 700])  # flash attention splits the KV cells over threads from 512
@pytest.mark.parametrize("window", [(4, 16), (0, 8), (3, 0), (1, 1), (400, 400)])
def test_window_attention_matches_restricted_reference(flash, inplace, n_threads, n_kv, window):
    rng = np.random.default_rng(n_kv + window[0] + 7 * window[1])
    n_head, n_head_kv = 6, 2
    k, v, q, mask = attention_case(rng, n_kv, n_head, n_head_kv, hole=[2, n_kv - 30])
    heads = np.array([1, 0, 0, 1, 0, 1], np.int32)
    out = kernels.attention(k, v, q, mask, heads, window, n_threads, flash, inplace)
    ref = reference(k, v, q, mask, heads, window)
    # flash attention accumulates softmax*V in F16 for an F16 V
    np.testing.assert_allclose(out, ref, atol=1e-2 if flash else 3e-3, rtol=0)
    # active heads are untouched by the window: bit for bit the output without it
    plain = kernels.attention(k, v, q, mask, heads, None, n_threads, flash)
    assert np.array_equal(out[heads == 1], plain[heads == 1])
    assert np.all(plain[heads == 0] == 0)
    # and a window differs from dense attention unless it covers every visible cell
    dense = reference(k, v, q, mask, np.ones_like(heads), None)
    if sum(window) < n_kv - 20:
        assert np.abs(out[heads == 0] - dense[heads == 0]).max() > 1e-2


@pytest.mark.parametrize("flash", [False, True])
def test_window_of_every_cell_is_dense_attention(flash):
    rng = np.random.default_rng(5)
    k, v, q, mask = attention_case(rng, 600, 4, 4, pad=0)
    heads = np.array([0, 1, 0, 0], np.int32)
    out = kernels.attention(k, v, q, mask, heads, (300, 300), 2, flash)
    dense = kernels.attention(k, v, q, mask, np.ones(4, np.int32), None, 2, flash)
    np.testing.assert_allclose(out, dense, atol=1e-5, rtol=0)


def windowed_dense_logits(model_path, tokens, prompt_len, masks, window, flash_attn):
    hook = WindowedHeads(*masks.shape[1:], *window)
    with Engine(model_path, n_ctx=512, n_threads=2, tensor_hook=hook, flash_attn=flash_attn) as ref_eng:
        ref_eng.prefill(tokens[:prompt_len])
        out = []
        for i, tok in enumerate(tokens[prompt_len:]):
            hook.mask = masks[i]
            out.append(ref_eng.step(tok))
    return np.array(out)


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
