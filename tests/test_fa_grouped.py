"""Flash attention's grouped decode kernel (ggml-cpu.patch): one decode token over
512+ F16 cells with a head mask, the active query heads of each KV head computed together,
against float64 numpy attention. Group sizes on both sides of its limit of 32 query heads per
pass (33 runs the row kernel), K/V in blocks per KV head and in the cache's rows, head widths
64 and 128, ALiBi slopes and soft-capping, 1 to 3 threads."""

import numpy as np
import pytest

from powerinfer_attn.native import kernels

pytestmark = pytest.mark.usefixtures("ggml_lib")


def reference(k, v, q, mask, heads, max_bias=0.0, softcap=0.0):
    n_head_kv, n_kv, d = k.shape
    n_head = q.shape[0]
    r = n_head // n_head_kv
    kf, vf = k.astype(np.float16).astype(np.float64), v.astype(np.float16).astype(np.float64)
    n_log2 = 1 << int(np.floor(np.log2(n_head)))
    m0, m1 = 2.0 ** (-max_bias / n_log2), 2.0 ** (-max_bias / 2 / n_log2)
    out = np.zeros((n_head, d))
    for h in np.flatnonzero(heads):
        slope = (m0 ** (h + 1) if h < n_log2 else m1 ** (2 * (h - n_log2) + 1)) if max_bias > 0 else 1.0
        s = kf[h // r] @ q[h].astype(np.float64) / np.sqrt(d)
        if softcap:
            s = softcap * np.tanh(s / softcap)
        s = s + slope * mask
        p = np.exp(s - s.max())
        out[h] = (p / p.sum()) @ vf[h // r]
    return out


def case(rng, n_kv, n_head, n_head_kv, d, alibi=False):
    k = rng.standard_normal((n_head_kv, n_kv, d)).astype(np.float32)
    v = rng.standard_normal((n_head_kv, n_kv, d)).astype(np.float32)
    q = (rng.standard_normal((n_head, d)) * 2).astype(np.float32)
    # ALiBi's mask holds the negative distance; otherwise 0 or -inf
    mask = -np.abs(np.arange(n_kv) - n_kv).astype(np.float32) / 64 if alibi else np.zeros(n_kv, np.float32)
    mask[n_kv - 37:] = -np.inf  # the cache view's padding
    mask[rng.choice(n_kv - 37, 40, replace=False)] = -np.inf  # holes (other sequences' cells)
    return k, v, q, mask


@pytest.mark.parametrize("cache_layout", [False, True])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("n_head,n_head_kv", [(4, 4), (6, 2), (8, 2), (14, 2), (8, 1), (64, 2), (66, 2)])
def test_grouped_decode_matches_reference(cache_layout, n_threads, d, n_head, n_head_kv):
    rng = np.random.default_rng(n_head * 100 + d + n_threads)
    n_kv = 1300
    k, v, q, mask = case(rng, n_kv, n_head, n_head_kv, d)
    heads = (rng.random(n_head) < 0.6).astype(np.int32)
    heads[0], heads[-1] = 1, 0
    out = kernels.attention(k, v, q, mask, heads, n_threads=n_threads, flash=True, cache_layout=cache_layout)
    ref = reference(k, v, q, mask, heads)
    # 33 query heads per KV head (66/2) is past the grouped kernel's limit: the row kernel runs,
    # with Q rounded to F16 and an F16 accumulator; 64/2 takes one pass per KV head
    grouped = n_head // n_head_kv <= 32
    np.testing.assert_allclose(out, ref, atol=2e-4 if grouped else 1e-2, rtol=0)
    assert np.all(out[heads == 0] == 0)


@pytest.mark.parametrize("max_bias,softcap", [(8.0, 0.0), (0.0, 30.0), (8.0, 10.0)])
def test_grouped_decode_alibi_and_softcap(max_bias, softcap):
    rng = np.random.default_rng(11)
    k, v, q, mask = case(rng, 900, 8, 2, 64, alibi=True)
    heads = np.array([1, 1, 0, 1, 0, 0, 1, 1], np.int32)
    out = kernels.attention(k, v, q, mask, heads, n_threads=2, flash=True, max_bias=max_bias, softcap=softcap)
    np.testing.assert_allclose(out, reference(k, v, q, mask, heads, max_bias, softcap), atol=2e-4, rtol=0)


def test_every_head_active_is_stock_flash_attention():
    """All heads active: stock flash attention's result to its F16 accumulator's rounding, and
    each head's output the same whichever other heads are active (a group is not a batch)."""
    rng = np.random.default_rng(3)
    k, v, q, mask = case(rng, 2000, 9, 3, 64)
    ones = np.ones(9, np.int32)
    out = kernels.attention(k, v, q, mask, ones, n_threads=2, flash=True, cache_layout=True)
    stock = kernels.attention(k, v, q, mask, None, n_threads=2, flash=True, cache_layout=True)
    np.testing.assert_allclose(out, stock, atol=1e-2, rtol=0)
    np.testing.assert_allclose(out, reference(k, v, q, mask, ones), atol=2e-4, rtol=0)
    some = np.array([0, 1, 0, 1, 1, 0, 0, 0, 1], np.int32)
    part = kernels.attention(k, v, q, mask, some, n_threads=2, flash=True, cache_layout=True)
    assert np.array_equal(part[some == 1], out[some == 1])


def test_no_head_active():
    rng = np.random.default_rng(4)
    k, v, q, mask = case(rng, 600, 6, 2, 64)
    out = kernels.attention(k, v, q, mask, np.zeros(6, np.int32), n_threads=2, flash=True)
    assert np.all(out == 0)
