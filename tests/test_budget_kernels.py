"""The token budget in the kernels: page bounds (ggml_kv_page_bounds) against numpy min/max over
each page's cells, F16 and quantized K; page selection (ggml_kv_page_select) against a numpy
selection on the same q and bounds, GQA groups of 1 to 7 heads, holes in the mask; and attention
over the selected pages, v2 (K*q, the head-masked softmax, softmax*V) and flash attention with
the head mask (its row kernel and its grouped decode kernel, with window fill beside), against
numpy attention restricted to exactly those cells, bit for bit equal to head-only sparse
attention when every visible page is selected."""

import numpy as np
import pytest

from powerinfer_attn.native import kernels

pytestmark = pytest.mark.usefixtures("ggml_lib")


def ref_bounds(k_rows, page, n_head_kv):
    n_cells, n_embd = k_rows.shape
    x = k_rows.reshape(n_cells // page, page, n_head_kv, n_embd // n_head_kv)
    return np.concatenate([x.min(1), x.max(1)], -1)


@pytest.mark.parametrize("k_type", ["F16", "Q8_0", "Q4_0", "F32"])
@pytest.mark.parametrize("page", [8, 16, 64])
@pytest.mark.parametrize("n_threads", [1, 3])
@pytest.mark.parametrize("bounds_type", [np.float32, np.float16])
def test_bounds_are_min_and_max_of_the_written_pages(k_type, page, n_threads, bounds_type):
    """F16 bounds (what the CPU's cache keeps) are the F32 ones rounded to nearest."""
    rng = np.random.default_rng(page + n_threads)
    d, n_head_kv, n_cells = 64, 2, 512
    k = rng.standard_normal((n_cells, d * n_head_kv)).astype(np.float32)
    data = kernels.quantize(k, k_type)
    seen = kernels.dequantize(data, k_type, k.shape)
    full = ref_bounds(seen, page, n_head_kv).astype(bounds_type)
    old = rng.standard_normal(full.shape).astype(bounds_type)  # stale bounds of earlier contents
    # a decode step's cell, a prefill's run, and cells in no order with repeats
    for idxs in ([300], list(range(40, 40 + 3 * page + 5)), [511, 0, 77, 0, 78, 300]):
        out = kernels.page_bounds(data, k_type, n_cells, d, n_head_kv, old, idxs, page, n_threads)
        touched = sorted({c // page for c in idxs})
        want = old.copy()
        want[touched] = full[touched]
        assert out.dtype == bounds_type and np.array_equal(out, want)


def visible_cells(mask):
    return np.flatnonzero(mask != -np.inf)


def ref_select(q, bounds, heads, mask, page, budget, n_sink, n_recent, score=0, keys=None, spread=0.0, candidates=None):
    n_head, d = q.shape
    n_head_kv = bounds.shape[1]
    r = n_head // n_head_kv
    npk = -(-mask.size // page)
    vis = visible_cells(mask)
    sel = np.zeros((n_head_kv, npk), np.int32)
    for g in range(n_head_kv):
        act = [h for h in range(g * r, (g + 1) * r) if heads[h]]
        if not act:
            continue
        forced = {c // page for c in vis[:n_sink]} | {c // page for c in vis[len(vis) - n_recent:]} if n_recent else \
            {c // page for c in vis[:n_sink]}
        mn, mx = bounds[:npk, g, :d].astype(np.float64), bounds[:npk, g, d:].astype(np.float64)
        seen = np.array([np.any((vis >= p * page) & (vis < (p + 1) * page)) for p in range(npk)])
        allowed = seen if candidates is None else seen & (candidates[g] != 0)  # pages the score may pick
        if score == 2:  # each head's exact largest q.k over the page's visible cells
            kg = keys[:, g * d:(g + 1) * d].astype(np.float64)
            per_head = []
            for h in act:
                dots = np.full(npk * page, -np.inf)
                dots[vis] = kg[vis] @ q[h].astype(np.float64)
                per_head.append(dots.reshape(npk, page).max(1))
        elif score == 3:  # the midpoint estimate, plus spread times the page's half range along q
            per_head = [(q[h] * (mn + mx) / 2 + spread * np.abs(q[h]) * (mx - mn) / 2).sum(1) for h in act]
        else:
            per_head = [np.maximum(q[h] * mn, q[h] * mx).sum(1) for h in act]
        if score == 0:  # the bound summed over the group's active heads
            s = sum(per_head)
        else:  # each head's bound relative to its best visible page, the best of them
            s = np.max([b - b[allowed].max() for b in per_head], axis=0) if allowed.any() else np.full(npk, -np.inf)
        cand = [p for p in range(npk) if p not in forced and allowed[p]]
        cand.sort(key=lambda p: (-s[p], p))
        take = max(0, min(len(cand), budget // page - len(forced)))
        for p in list(forced) + cand[:take]:
            sel[g, p] = 1
        if take == len(cand):  # every visible page: the whole view, as without a budget (every candidate)
            sel[g] = 1 if candidates is None else np.maximum(sel[g], candidates[g] != 0)
    return sel


def budget_case(rng, n_kv, n_head, n_head_kv, d=64, pad=37, holes=()):
    k = rng.standard_normal((n_head_kv, n_kv, d)).astype(np.float32)
    v = rng.standard_normal((n_head_kv, n_kv, d)).astype(np.float32)
    # a few cells with large keys so that the scores have clear winners
    k[:, rng.choice(n_kv - pad, 6, replace=False)] *= 4
    q = (rng.standard_normal((n_head, d)) * 2).astype(np.float32)
    mask = np.zeros(n_kv, np.float32)
    mask[n_kv - pad:] = -np.inf
    for lo, hi in holes:  # cells of another sequence or removed ones
        mask[lo:hi] = -np.inf
    return k, v, q, mask


def bounds_of(k, page, n_pages):
    n_head_kv, n_kv, d = k.shape
    rows = np.zeros((n_pages * page, n_head_kv * d), np.float32)
    rows[:n_kv] = k.astype(np.float16).astype(np.float32).transpose(1, 0, 2).reshape(n_kv, -1)
    return ref_bounds(rows, page, n_head_kv)


@pytest.mark.parametrize("n_head,n_head_kv", [(3, 3), (6, 3), (8, 2), (7, 1), (9, 3)])
@pytest.mark.parametrize("page", [8, 16, 32])
@pytest.mark.parametrize("n_threads", [1, 2, 4])
@pytest.mark.parametrize("score", [0, 1, 3])
@pytest.mark.parametrize("bounds_type", [np.float32, np.float16])
def test_selection_matches_numpy(n_head, n_head_kv, page, n_threads, score, bounds_type):
    rng = np.random.default_rng(n_head * 100 + page + n_threads)
    n_kv = 768
    k, _, q, mask = budget_case(rng, n_kv, n_head, n_head_kv, holes=[(100, 180), (301, 302)])
    bounds = bounds_of(k, page, n_kv // page + 4).astype(bounds_type)  # the cache is larger than the view
    heads = (rng.random(n_head) < 0.6).astype(np.int32)
    heads[0] = 1
    for budget, n_sink, n_recent in [(128, 4, 32), (0, 4, 32), (256, 0, 0), (64, 40, 100), (10**6, 4, 32)]:
        got = kernels.page_select(q, bounds, heads, mask, page, budget, n_sink, n_recent, n_threads, score)
        want = ref_select(q, bounds, heads, mask, page, budget, n_sink, n_recent, score)
        assert np.array_equal(got, want), (budget, n_sink, n_recent)
        vis_pages = {c // page for c in visible_cells(mask)}
        for g in range(n_head_kv):
            kept = set(np.flatnonzero(got[g]))
            if heads[g * (n_head // n_head_kv):(g + 1) * (n_head // n_head_kv)].any() and budget >= 10**6:
                assert kept == set(range(got.shape[1]))
            elif budget < len(vis_pages) * page:
                assert kept <= vis_pages  # never a page the token cannot see


@pytest.mark.parametrize("spread", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_mid_score_spread_matches_numpy(spread, n_threads):
    """The midpoint plus a share of each page's spread along q; at 1 it is the bound, so the
    selection is head-max's."""
    rng = np.random.default_rng(int(spread * 100) + n_threads)
    n_kv, n_head, n_head_kv, page = 768, 8, 2, 16
    k, _, q, mask = budget_case(rng, n_kv, n_head, n_head_kv, holes=[(100, 180)])
    bounds = bounds_of(k, page, n_kv // page)
    heads = (rng.random(n_head) < 0.6).astype(np.int32)
    heads[0] = 1
    for budget in (128, 256):
        got = kernels.page_select(q, bounds, heads, mask, page, budget, 4, 32, n_threads, score=3, spread=spread)
        want = ref_select(q, bounds, heads, mask, page, budget, 4, 32, score=3, spread=spread)
        assert np.array_equal(got, want), budget
        if spread == 1.0:
            assert np.array_equal(got, kernels.page_select(q, bounds, heads, mask, page, budget, 4, 32, n_threads, score=1))
    with pytest.raises(ValueError):
        kernels.page_select(q, bounds, heads, mask, page, 128, 4, 32, 1, score=3, spread=1.5)


@pytest.mark.parametrize("n_head,n_head_kv", [(3, 3), (9, 3), (7, 1)])
@pytest.mark.parametrize("n_threads", [1, 3])
@pytest.mark.parametrize("rerank", [2, 4])
def test_rerank_exact_among_the_bounds_candidates_matches_numpy(n_head, n_head_kv, n_threads, rerank):
    """Re-ranking (llama_set_kv_budget_rerank): the bound's pages for rerank x budget, then the
    exact score among them only; every candidate when the budget covers them."""
    rng = np.random.default_rng(7 * n_head + n_threads + rerank)
    page, n_kv = 16, 768
    k, _, q, mask = budget_case(rng, n_kv, n_head, n_head_kv, holes=[(100, 180)])
    rows = k.astype(np.float16).transpose(1, 0, 2).reshape(n_kv, -1)
    bounds = bounds_of(k, page, n_kv // page).astype(np.float16)
    heads = (rng.random(n_head) < 0.7).astype(np.int32)
    heads[0] = 1
    for budget in (64, 128, 10**5):
        cand = kernels.page_select(q, bounds, heads, mask, page, rerank * budget, 4, 32, n_threads)
        got = kernels.page_select(q, bounds, heads, mask, page, budget, 4, 32, n_threads, score=2, keys=rows,
                                  candidates=cand)
        want = ref_select(q, bounds, heads, mask, page, budget, 4, 32, score=2, keys=rows, candidates=cand)
        assert np.array_equal(got, want), budget
        assert np.all(got[cand == 0] == 0)  # never a page outside the candidates
        if budget < 10**5:  # the second stage narrows the candidates down to the budget
            assert got.sum() < cand.sum()
            assert np.all(got.sum(1) <= budget // page + 2)  # + the sinks' and the window's pages


@pytest.mark.parametrize("n_head,n_head_kv", [(3, 3), (9, 3), (7, 1)])
@pytest.mark.parametrize("n_threads", [1, 3])
def test_exact_score_matches_numpy(n_head, n_head_kv, n_threads):
    rng = np.random.default_rng(n_head + n_threads)
    page, n_kv = 16, 768
    k, _, q, mask = budget_case(rng, n_kv, n_head, n_head_kv, holes=[(100, 180)])
    rows = k.astype(np.float16).transpose(1, 0, 2).reshape(n_kv, -1)  # the cache's rows
    bounds = bounds_of(k, page, n_kv // page)
    heads = np.ones(n_head, np.int32)
    for budget in (64, 256):
        got = kernels.page_select(q, bounds, heads, mask, page, budget, 4, 32, n_threads, score=2, keys=rows)
        want = ref_select(q, bounds, heads, mask, page, budget, 4, 32, score=2, keys=rows)
        assert np.array_equal(got, want), budget


def test_head_max_score_keeps_a_small_heads_best_page():
    """Summed over a group's heads, a head whose q is small (a retrieval head among heads with
    large q) cannot move the choice; scored against each head's own best page, its page is kept."""
    page, n_kv, d = 16, 256, 8
    k = np.zeros((1, n_kv, d), np.float32)
    for p_, v in zip((2, 3, 4, 5), (5.0, 4.0, 3.0, 2.0)):
        k[0, p_ * page + 1, 0] = v  # what head 0 attends to
    k[0, 9 * page + 7, 1] = 5.0  # head 1's needle
    q = np.zeros((2, d), np.float32)
    q[0, 0], q[1, 1] = 10.0, 0.1
    mask = np.zeros(n_kv, np.float32)
    b = bounds_of(k, page, n_kv // page)
    heads = np.ones(2, np.int32)
    summed = kernels.page_select(q, b, heads, mask, page, 2 * page, 0, 0, 1, score=0)
    head_max = kernels.page_select(q, b, heads, mask, page, 2 * page, 0, 0, 1, score=1)
    assert list(np.flatnonzero(summed[0])) == [2, 3]
    assert list(np.flatnonzero(head_max[0])) == [2, 9]


def test_selection_keeps_the_pages_with_the_largest_bound():
    # one KV group, one head, q = e_0: a page's bound is the max of K's channel 0 over it
    page, n_kv, d = 16, 256, 8
    k = np.zeros((1, n_kv, d), np.float32)
    k[0, 5 * page + 3, 0] = 9.0
    k[0, 9 * page + 1, 0] = 7.0
    k[0, 2 * page, 0] = -50.0  # a large negative key bounds nothing from above
    q = np.zeros((1, d), np.float32)
    q[0, 0] = 1.0
    mask = np.zeros(n_kv, np.float32)
    got = kernels.page_select(q, bounds_of(k, page, n_kv // page), np.ones(1, np.int32), mask, page, 4 * page, 1, 1)
    assert sorted(np.flatnonzero(got[0])) == [0, 5, 9, n_kv // page - 1]


def restricted_reference(k, v, q, mask, heads, page, sel):
    n_head_kv, n_kv, d = k.shape
    r = q.shape[0] // n_head_kv
    kf, vf = k.astype(np.float16).astype(np.float64), v.astype(np.float16).astype(np.float64)
    out = np.zeros((q.shape[0], d))
    for h in range(q.shape[0]):
        if not heads[h]:
            continue
        cells = [c for c in range(n_kv) if sel[h // r, c // page] and mask[c] != -np.inf]
        s = kf[h // r, cells] @ q[h].astype(np.float16).astype(np.float64) / np.sqrt(d)
        p = np.exp(s - s.max())
        out[h] = (p / p.sum()) @ vf[h // r, cells]
    return out


@pytest.mark.parametrize("n_head,n_head_kv", [(6, 2), (9, 3), (7, 1), (4, 4)])
@pytest.mark.parametrize("page", [8, 16, 64])
@pytest.mark.parametrize("n_threads", [1, 3])
@pytest.mark.parametrize("path", ["v2", "v2-inplace", "flash", "flash-cache"])
def test_attention_over_selected_pages_matches_restricted_reference(n_head, n_head_kv, page, n_threads, path):
    """flash: one block per KV head (the row kernel); flash-cache: the cache's layout, where the
    split-KV decode path runs the grouped kernel (512 cells and more)."""
    rng = np.random.default_rng(n_head + page + n_threads)
    n_kv = 1024
    k, v, q, mask = budget_case(rng, n_kv, n_head, n_head_kv, holes=[(200, 260)])
    heads = np.ones(n_head, np.int32)
    heads[1] = 0
    npk = n_kv // page
    sel = kernels.page_select(q, bounds_of(k, page, npk), heads, mask, page, 256, 4, 64, 2)
    opts = dict(inplace=path == "v2-inplace", flash=path.startswith("flash"), cache_layout=path == "flash-cache")
    out = kernels.attention(k, v, q, mask, heads, None, n_threads, pages=(page, sel), **opts)
    ref = restricted_reference(k, v, q, mask, heads, page, sel)
    # flash attention's row kernel accumulates softmax*V in F16 (the window tests allow as much)
    np.testing.assert_allclose(out, ref, atol=1e-2 if opts["flash"] else 3e-3, rtol=0)
    assert np.all(out[heads == 0] == 0)
    # a budget differs from full attention: the test would not see a selection that is ignored
    full = kernels.attention(k, v, q, mask, heads, None, n_threads, **opts)
    assert np.abs(out - full).max() > 1e-2


@pytest.mark.parametrize("cache_layout", [False, True])
def test_flash_pages_leave_window_fill_heads_their_window(cache_layout):
    """Pages are for the active heads: a head marked 0 under window fill attends over its sink
    and recent cells, whichever pages its group reads."""
    rng = np.random.default_rng(11)
    n_kv, page, window = 1024, 16, (4, 60)
    k, v, q, mask = budget_case(rng, n_kv, 6, 2)
    heads = np.array([1, 0, 1, 0, 0, 0], np.int32)  # group 1 has no active head: it selects nothing
    sel = kernels.page_select(q, bounds_of(k, page, n_kv // page), heads, mask, page, 256, 4, 64, 1)
    assert sel[1].sum() == 0
    out = kernels.attention(k, v, q, mask, heads, window, 2, flash=True, cache_layout=cache_layout, pages=(page, sel))
    no_pages = kernels.attention(k, v, q, mask, heads, window, 2, flash=True, cache_layout=cache_layout)
    active = heads == 1
    np.testing.assert_allclose(out[active], restricted_reference(k, v, q, mask, heads, page, sel)[active], atol=1e-2, rtol=0)
    np.testing.assert_array_equal(out[~active], no_pages[~active])


@pytest.mark.parametrize("page", [8, 16, 32])
@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("flash", [False, True])
def test_every_visible_page_selected_is_head_only_sparse_bit_for_bit(page, n_threads, flash):
    rng = np.random.default_rng(page)
    n_kv = 2048
    k, v, q, mask = budget_case(rng, n_kv, 9, 3, pad=200, holes=[(64, 70)])
    heads = np.array([1, 0, 1, 1, 1, 0, 0, 0, 1], np.int32)
    sel = kernels.page_select(q, bounds_of(k, page, n_kv // page), heads, mask, page, n_kv, 4, 64, n_threads)
    out = kernels.attention(k, v, q, mask, heads, None, n_threads, pages=(page, sel), flash=flash, cache_layout=flash)
    plain = kernels.attention(k, v, q, mask, heads, None, n_threads, flash=flash, cache_layout=flash)
    assert np.array_equal(out, plain)


def test_pages_refused_with_a_wrong_shape():
    rng = np.random.default_rng(1)
    k, v, q, mask = budget_case(rng, 128, 4, 2)
    with pytest.raises(ValueError, match="selection of shape"):
        kernels.attention(k, v, q, mask, np.ones(4, np.int32), pages=(16, np.ones((2, 3), np.int32)))
    with pytest.raises(ValueError, match="must be >= 0"):
        kernels.page_select(q, bounds_of(k, 16, 8), np.ones(4, np.int32), mask, 16, -1, 0, 0)
