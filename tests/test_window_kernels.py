"""Window fill in the kernels: one decode token's attention (v2 K*q, the head-masked softmax, in
place or not, v2 softmax*V; and flash attention, row and split-KV paths) against numpy attention
restricted to a skipped head's first S and last W visible cells, with a mask that hides the
cache view's padding and a hole."""

import numpy as np
import pytest

from powerinfer_attn.native import kernels

pytestmark = pytest.mark.usefixtures("ggml_lib")


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
    # in flash attention's decode path the windowed heads run the row kernel (an F16
    # accumulator), the active heads the grouped one (F32): equal to F16 rounding only
    np.testing.assert_allclose(out, dense, atol=5e-3 if flash else 1e-5, rtol=0)
