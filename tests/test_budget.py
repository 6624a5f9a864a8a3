"""The token budget in the engine (``Engine.set_kv_budget``, ``:budget=N``): a budget that covers
the context gives head-only sparse decode bit for bit; a small one reads only its pages (the
graph's own selection, read back through the eval callback) and changes the logits; the page
bounds follow a sequence state loaded over another one; errors. The kernels' own tests are in
test_budget_kernels.py."""

import numpy as np
import pytest

from powerinfer_attn.engine.decode import Engine, EngineError
from powerinfer_attn.predictors.wrappers import KVBudget
from powerinfer_attn.predictors.specs import get_predictor

from powerinfer_attn.engine.reference import _KQV_OUT, WindowedHeads
from test_architectures import STEPS, _rel, tiny_models  # noqa: F401
from test_budget_kernels import bounds_of, ref_select
from test_engine import random_masks, rel_diff, teacher_forced_logits
from test_faults import half_masks

# a few hundred tokens of varied text, so that a budget of a few pages is a real cut
TEXT = " ".join(f"Entry {i}: the {w} of {c} was recorded as {i * 37 % 101}." for i, (w, c) in enumerate(
    [("river", "Rome"), ("bridge", "Paris"), ("harbour", "Oslo"), ("tower", "Pisa"), ("market", "Cairo"),
     ("garden", "Kyoto"), ("library", "Prague"), ("station", "Lima")] * 4))


@pytest.mark.parametrize("flash_attn", [False, True])
def test_budget_covering_the_context_is_head_only_sparse_bit_for_bit(model_path, flash_attn):
    with Engine(model_path, n_ctx=1024, n_threads=2, flash_attn=flash_attn) as eng:
        toks = eng.tokenize(TEXT)
        assert len(toks) > 300
        masks = random_masks(np.random.default_rng(3), 24, eng.n_layer, eng.n_head, 0.6)
        seq = toks[:len(toks) - 24] + toks[-24:]
        heads_only = teacher_forced_logits(eng, seq, len(seq) - 24, masks)
        eng.set_kv_budget(1024)
        covered = teacher_forced_logits(eng, seq, len(seq) - 24, masks)
        eng.set_kv_budget(64, page=16, n_sink=4, n_recent=16)
        cut = teacher_forced_logits(eng, seq, len(seq) - 24, masks)
        eng.set_kv_budget(0)
        off_again = teacher_forced_logits(eng, seq, len(seq) - 24, masks)
    assert np.array_equal(covered, heads_only)
    assert np.array_equal(off_again, heads_only)
    # 64 of ~320 cells per KV group: another attention (how close is for `score` to say)
    assert np.isfinite(cut).all() and rel_diff(cut, heads_only).max() > 1e-3


def test_flash_attention_reads_the_same_pages_as_v2(model_path):
    """The budget with flash attention (its head-masked kernel over the selected pages) against
    the same budget without it (v2 over those pages), one step after a prefill: the same pages in
    the first layer (nearly all in the others), and logits about as close as the two paths are
    without a budget, far closer than a budget is to head-only sparse decode."""
    out, pages = {}, {}
    for fa in (False, True):
        hook = PagesHook()
        with Engine(model_path, n_ctx=1024, n_threads=2, flash_attn=fa, tensor_hook=hook) as eng:
            toks = eng.tokenize(TEXT)
            eng.prefill(toks[:-1])
            eng.set_sparse(True)
            eng.set_mask(random_masks(np.random.default_rng(7), 1, eng.n_layer, eng.n_head, 0.6)[0])
            out[fa, "heads"] = eng.step(toks[-1]).copy()
            eng.rollback(len(toks) - 1)
            eng.set_kv_budget(64, page=16, n_sink=4, n_recent=16)
            hook.pages.clear()
            out[fa, "budget"] = eng.step(toks[-1]).copy()
            pages[fa] = hook.pages
    assert sorted(pages[True]) == sorted(pages[False]) == list(range(len(pages[True])))
    # layer 0 scores the same q; later layers' q differ by the paths' rounding, which may swap
    # pages whose scores are close
    assert np.array_equal(pages[True][0], pages[False][0])
    differ = np.mean([np.mean(pages[True][il] != pages[False][il]) for il in pages[True]])
    assert differ < 0.05
    paths = rel_diff(out[True, "heads"][None], out[False, "heads"][None])[0]
    same = rel_diff(out[True, "budget"][None], out[False, "budget"][None])[0]
    moved = rel_diff(out[False, "budget"][None], out[False, "heads"][None])[0]
    # (measured: 0.040 between the paths, 0.064 with the budget, 0.40 from the budget itself)
    assert same < max(3 * paths, 1e-3) and same < 0.25 * moved, (paths, same, moved)


class PagesHook:
    """Reads back every layer's page selection (the graph's kv_pages-IL tensors)."""

    def __init__(self):
        self.pages = {}

    def wants(self, name: str) -> bool:
        return name.startswith("kv_pages-")

    def __call__(self, name: str, data: np.ndarray) -> None:
        self.pages[int(name.split("-")[1])] = data.copy()


@pytest.mark.parametrize("flash_attn", [False, True])
def test_small_budget_reads_its_pages_only(model_path, flash_attn):
    hook = PagesHook()
    with Engine(model_path, n_ctx=1024, n_threads=2, tensor_hook=hook, flash_attn=flash_attn) as eng:
        toks = eng.tokenize(TEXT)
        eng.prefill(toks[:-1])
        eng.set_sparse(True)
        mask = np.ones((eng.n_layer, eng.n_head), np.int32)
        mask[:, eng.n_head // eng.n_head_kv:] = 0  # only the first KV group keeps heads
        eng.set_mask(mask)
        eng.set_kv_budget(96, page=16, n_sink=4, n_recent=32)
        eng.step(toks[-1])
        n_kv_pages = -(-len(toks) // 16)
    assert sorted(hook.pages) == list(range(eng.n_layer))
    for il, sel in hook.pages.items():
        sel = sel.reshape(eng.n_head_kv, -1)
        assert sel[0].sum() == 96 // 16  # the budget's pages, sinks and recent ones among them
        assert sel[0, 0] == 1 and sel[0, (len(toks) - 1) // 16] == 1
        assert sel[1:].sum() == 0  # groups without an active head read nothing
        assert not sel[0, n_kv_pages:].any()  # nor the cache view's padding


def test_dense_first_layers_select_no_pages(model_path):
    """n_dense_layers: those layers read every cell (no selection in their graph), the others
    select as before; every layer dense is head-only sparse, bit for bit."""
    hook = PagesHook()
    with Engine(model_path, n_ctx=1024, n_threads=2, tensor_hook=hook) as eng:
        toks = eng.tokenize(TEXT)
        masks = random_masks(np.random.default_rng(5), 8, eng.n_layer, eng.n_head, 0.6)
        heads_only = teacher_forced_logits(eng, toks, len(toks) - 8, masks)
        eng.set_kv_budget(64, page=16, n_sink=4, n_recent=16, n_dense_layers=eng.n_layer)
        hook.pages.clear()
        all_dense = teacher_forced_logits(eng, toks, len(toks) - 8, masks)
        assert not hook.pages
        eng.set_kv_budget(64, page=16, n_sink=4, n_recent=16, n_dense_layers=2)
        teacher_forced_logits(eng, toks, len(toks) - 8, masks)
        assert sorted(hook.pages) == list(range(2, eng.n_layer))
        with pytest.raises(ValueError, match="dense layers"):
            eng.set_kv_budget(64, n_dense_layers=-1)
    assert np.array_equal(all_dense, heads_only)


def test_page_bounds_follow_a_loaded_state(model_path):
    """A state loaded over another sequence: the bounds are recomputed before the next step, so
    decoding goes on as in the engine that made the state."""
    budget = dict(budget=64, page=16, n_sink=4, n_recent=16)
    with Engine(model_path, n_ctx=1024, n_threads=2) as a, Engine(model_path, n_ctx=1024, n_threads=2) as b:
        toks = a.tokenize(TEXT)
        other = b.tokenize(TEXT.replace("Entry", "Record").replace("recorded", "noted"))
        for eng in (a, b):
            eng.set_sparse(True)
            eng.set_mask(np.ones((eng.n_layer, eng.n_head), np.int32))
            eng.set_kv_budget(**budget)
        a.prefill(toks[:-8])
        state = a.save_state()
        want = [a.step(t) for t in toks[-8:]]
        b.prefill(other)  # bounds of another text, then the state of the first
        b.load_state(state)
        got = [b.step(t) for t in toks[-8:]]
    assert np.array_equal(np.array(got), np.array(want))


def test_budget_errors_and_specs(model_path):
    with Engine(model_path, n_ctx=256, n_threads=1) as eng:
        with pytest.raises(ValueError, match="page must be"):
            eng.set_kv_budget(64, page=12)
        with pytest.raises(ValueError, match=">= 0"):
            eng.set_kv_budget(-1)
    p = get_predictor("all:budget=512", model_path)
    assert isinstance(p, KVBudget) and p.budget == 512 and p.name == "all+budget:512"
    p = get_predictor("random:3:1:budget=128:fill=window:4+60", model_path)
    assert p.name == "random:3+window:4+60+budget:128"
    p = get_predictor("all:budget=512:budget-score=head-max", model_path)
    assert p.score == "head-max" and p.name == "all+budget:512/head-max"
    p = get_predictor("all:budget=512:budget-score=mid:budget-spread=0.5", model_path)
    assert p.score == "mid" and p.spread == 0.5 and p.name == "all+budget:512/mid0.5"
    p = get_predictor("all:budget=512:budget-page=64", model_path)
    assert p.page == 64 and p.name == "all+budget:512/page64"
    for bad in ("all:budget=", "all:budget=x", "all:budget=0", "all:budget=1:budget=2", "all:budget-score=sum",
                "all:budget=64:budget-score=best", "all:budget-spread=0.5", "all:budget=64:budget-spread=0.5",
                "all:budget=64:budget-score=mid:budget-spread=2", "all:budget=64:budget-score=mid:budget-spread=x",
                "all:budget-page=32", "all:budget=64:budget-page=12", "all:budget=64:budget-page=16:budget-page=32"):
        with pytest.raises(ValueError, match="budget"):
            get_predictor(bad, model_path)
    with Engine(model_path, n_ctx=256, n_threads=1) as eng:
        with pytest.raises(ValueError, match="score is one of"):
            eng.set_kv_budget(64, score="best")
        eng.set_kv_budget(64, score="head-max")
        assert eng.kv_budget_score == "head-max"
        with pytest.raises(ValueError, match="spread"):
            eng.set_kv_budget(64, score="head-max", spread=0.5)
        eng.set_kv_budget(64, score="mid", spread=0.5)
        assert eng.kv_budget_spread == 0.5


def test_mid_score_with_full_spread_selects_as_head_max(model_path):
    """The spread reaches the graph: mid plus the whole spread is head-max's bound (the same
    pages in every layer), and no spread is the midpoint (other pages somewhere)."""
    sel = {}
    for score, spread in (("head-max", 0.0), ("mid", 1.0), ("mid", 0.0)):
        hook = PagesHook()
        with Engine(model_path, n_ctx=1024, n_threads=2, tensor_hook=hook) as eng:
            toks = eng.tokenize(TEXT)
            eng.prefill(toks[:-1])
            eng.set_sparse(True)
            eng.set_kv_budget(96, page=16, n_sink=4, n_recent=16, score=score, spread=spread)
            eng.step(toks[-1])
        sel[score, spread] = np.stack([hook.pages[il] for il in range(eng.n_layer)])
    assert np.array_equal(sel["mid", 1.0], sel["head-max", 0.0])
    assert not np.array_equal(sel["mid", 0.0], sel["head-max", 0.0])


def masked_decode(path, toks, n_prompt, masks, setup=None, check=None, **kw):
    """Sparse decode with one mask per step after a dense prefill of ``n_prompt`` tokens;
    ``setup(engine)`` sets more before the first step (a budget, a window); a ``check`` hook
    observes it and is told each step's mask."""
    with Engine(path, n_ctx=n_prompt + 64, n_threads=2, tensor_hook=check, **kw) as eng:
        eng.prefill(toks[:n_prompt])
        eng.set_sparse(True)
        if setup is not None:
            setup(eng)
        out = []
        for i, t in enumerate(toks[n_prompt:]):
            eng.set_mask(masks[i])
            if check is not None:
                check.mask = masks[i]
            out.append(eng.step(t))
        return np.array(out)


def budget_logits(path, toks, n_prompt, masks, budget, check=None, **kw):
    """masked_decode with a token budget (``budget``: set_kv_budget's keyword arguments, or None)."""
    return masked_decode(path, toks, n_prompt, masks, (lambda e: e.set_kv_budget(**budget)) if budget else None,
                         check, **kw)


class BudgetCheck(WindowedHeads):
    """Each decode step's token budget, layer by layer (on the CPU here, on the GPU in test_cuda): its pages (kv_pages-IL) against
    the numpy selection (test_budget_kernels.ref_select) from the step's own q and the keys so far, and
    every active head's output against numpy attention over the cells of the pages the GPU
    chose (so that a page swapped between two near-equal scores does not move that check)."""

    def __init__(self, n_layer, n_head, budget, round_q=False, bounds_type=np.float32):
        super().__init__(n_layer, n_head, 0, 0, round_q=round_q)
        self.budget = budget
        self.bounds_type = bounds_type  # the CPU's cache keeps F16 bounds, the GPU's F32
        self.pages = {}
        self.page_mismatch = []
        self.errors = []

    def wants(self, name):
        return super().wants(name) or name.startswith("kv_pages-")

    def __call__(self, name, data):
        if name.startswith("kv_pages-"):
            self.pages[int(name.split("-")[1])] = data.copy()
            return
        m = _KQV_OUT.match(name)
        if m is None:
            return super().__call__(name, data)
        il = int(m.group(1))
        self.remember(il)
        q = self.cur[il]["Q"]
        if q.shape[0] != 1 or il not in self.pages:
            return  # prefill: no selection
        b = self.budget
        k, v = np.stack(self.keys[il]), np.stack(self.values[il])  # [n, n_head_kv, d]
        n, n_head_kv, d = k.shape
        sel = self.pages.pop(il).reshape(n_head_kv, -1)
        page = b["page"]
        npk = sel.shape[1]
        mask = np.full(npk * page, -np.inf, np.float32)
        mask[:n] = 0
        keys = np.zeros((n_head_kv, npk * page, d), np.float32)  # the cache's cells past n are zero
        keys[:, :n] = k.transpose(1, 0, 2)
        bounds = bounds_of(keys, page, npk).astype(self.bounds_type)
        score = {"sum": 0, "head-max": 1, "mid": 3}[b.get("score", "sum")]
        if b.get("rerank"):  # the score's pages for rerank x budget, then the exact score (F16 keys) among them
            cand = ref_select(q[0], bounds, self.mask[il], mask, page, b["rerank"] * b["budget"], b["n_sink"],
                              b["n_recent"], score)
            rows = keys.transpose(1, 0, 2).reshape(npk * page, -1).astype(np.float16)
            want = ref_select(q[0], bounds, self.mask[il], mask, page, b["budget"], b["n_sink"], b["n_recent"], 2,
                              keys=rows, candidates=cand)
        else:
            want = ref_select(q[0], bounds, self.mask[il], mask, page, b["budget"], b["n_sink"], b["n_recent"], score)
        self.page_mismatch.append(float(np.mean(want != sel)))
        got = data.reshape(-1, self.n_head, d)[0]
        r = self.n_head // n_head_kv
        for h in np.flatnonzero(self.mask[il]):
            cells = [c for c in range(n) if sel[h // r, c // page]]
            qh = q[0, h].astype(np.float16) if self.round_q else q[0, h]
            s = k[cells, h // r] @ qh.astype(np.float64) / np.sqrt(d)
            p = np.exp(s - s.max())
            self.errors.append(_rel(got[h], (p / p.sum()) @ v[cells, h // r]))


@pytest.mark.parametrize("shape,n_prompt,page", [((8, 8, 64), 700, 16), ((9, 3, 64), 700, 32), ((4, 1, 128), 600, 8)],
                         ids=lambda v: f"h{v[0]}kv{v[1]}d{v[2]}" if isinstance(v, tuple) else str(v))
@pytest.mark.parametrize("flash_attn", [False, True])
def test_budget_selects_as_numpy_and_attends_over_its_pages(tiny_models, shape, n_prompt, page, flash_attn):
    """The engine's budget on the CPU, step by step and layer by layer: the graph's pages are
    numpy's selection from the step's q and keys, and each active head's output is numpy
    attention over those pages' cells (v2, and flash attention's kernels); test_cuda checks the
    GPU the same way."""
    model = tiny_models("llama", shape, "F32")
    rng = np.random.default_rng(23)
    toks = [int(t) for t in rng.integers(1, 64, size=n_prompt + STEPS)]
    masks = half_masks(rng, STEPS, 2, shape[0])
    masks[0] = 0
    budget = dict(budget=8 * page, page=page, n_sink=4, n_recent=32)
    # the CPU's K*q takes q in F16, and its cache keeps the page bounds in F16
    check = BudgetCheck(2, shape[0], budget, round_q=True, bounds_type=np.float16)
    budget_logits(model, toks, n_prompt, masks, budget, check=check, flash_attn=flash_attn)
    assert len(check.page_mismatch) == 2 * STEPS  # the step with no head too: no page
    assert np.mean(check.page_mismatch) < 0.01, check.page_mismatch
    assert len(check.errors) == int(masks.sum())
    # v2's products take q and the softmax in F16 (vec_dot_f16); flash attention's row kernel also
    # accumulates V in F16 (stock's)
    assert max(check.errors) < (5e-3 if flash_attn else 1e-3), max(check.errors)


@pytest.mark.parametrize("flash_attn", [False, True])
def test_rerank_selects_as_numpy_and_covering_budget_is_head_only(tiny_models, flash_attn):
    """Re-ranking in the engine (set_kv_budget(rerank=2)): each step's pages are numpy's bound
    selection of twice the budget narrowed by the exact score, each active head attends over
    them; a budget that covers the context is head-only sparse decode, bit for bit."""
    shape, n_prompt, page = (9, 3, 64), 700, 16
    model = tiny_models("llama", shape, "F32")
    rng = np.random.default_rng(29)
    toks = [int(t) for t in rng.integers(1, 64, size=n_prompt + STEPS)]
    masks = half_masks(rng, STEPS, 2, shape[0])
    budget = dict(budget=8 * page, page=page, n_sink=4, n_recent=32, rerank=2)
    check = BudgetCheck(2, shape[0], budget, round_q=True, bounds_type=np.float16)
    budget_logits(model, toks, n_prompt, masks, budget, check=check, flash_attn=flash_attn)
    assert len(check.page_mismatch) == 2 * STEPS
    assert np.mean(check.page_mismatch) < 0.01, check.page_mismatch
    assert max(check.errors) < (5e-3 if flash_attn else 1e-3), max(check.errors)
    covering = budget_logits(model, toks, n_prompt, masks, dict(budget, budget=4096), flash_attn=flash_attn)
    head_only = budget_logits(model, toks, n_prompt, masks, None, flash_attn=flash_attn)
    assert np.array_equal(covering, head_only)
    with pytest.raises(EngineError, match="rerank|F16"):
        budget_logits(model, toks[:n_prompt + 2], n_prompt, masks[:2], budget, cache_type_k="q8_0")
