"""Sparse decode on a GPU (ggml-cuda.patch), for `make test-cuda` on a machine with one
and a library built with `powerinfer-attn build --cuda`; skipped elsewhere (CI has no GPU).

Every layer on the GPU (n_gpu_layers=99), flash attention on: the head-masked flash attention
kernels (K/V rows read once per KV head for all its active query heads; CUDA cores for MHA,
tensor cores for 2-4 query heads per KV head), wq and wo through the stock product (the
attention kernel ignores inactive heads' queries and zeroes their outputs). Random masks
must match the CPU's oracle, dense decode with the inactive heads' outputs zeroed, and the CPU's
own sparse decode; all heads active must match dense decode on the GPU. Tiny random-weight
models of every architecture, MHA and GQA, head widths 64 and 128, the weight types of the CPU
tests. The in-graph predictor and its fills on the GPU (llama-head-predictor.patch): its masks
against the numpy rules on the GPU's own logits, its counters, and the CPU's decode. Window
fill in the same kernels: skipped heads' outputs against numpy attention over their window, and
dense decode when the window holds every cell."""

import warnings

import numpy as np
import pytest
from test_architectures import ARCHS, PROMPT, SHAPES, STEPS, _rel, _tokens, sparse_logits, tiny_models  # noqa: F401
from test_faults import half_masks, oracle_logits
from test_predictor import _Graph, _random_predictor
from test_budget import BudgetCheck, budget_logits, masked_decode

from powerinfer_attn.native import build
from powerinfer_attn.training import train
from powerinfer_attn.native.bindings import OP_KQV, OP_ON_DEVICE, OP_PREDICTOR_ON_DEVICE
from powerinfer_attn.engine.decode import Engine, SparseFallbackWarning
from powerinfer_attn.engine.reference import _KQV_OUT, WindowedHeads


def _has_cuda() -> bool:
    try:
        return "cuda" in build.check()["backends"]
    except Exception:  # no library at all: the CPU suites report that
        return False


pytestmark = [
    pytest.mark.skipif(not _has_cuda(), reason="no CUDA backend in the installed library (powerinfer-attn build --cuda)"),
    pytest.mark.filterwarnings("ignore::powerinfer_attn.engine.decode.SparseFallbackWarning"),
]

GPU = dict(n_gpu_layers=99, flash_attn=True)


def dense_logits(path, tokens, **kw):
    with Engine(path, n_ctx=64, n_threads=2, **kw) as eng:
        eng.prefill(tokens[:PROMPT])
        return np.array([eng.step(t) for t in tokens[PROMPT:]])


def check_against_oracle(path, toks, masks, **kw):
    """The GPU's sparse decode is as close to the CPU's oracle as the GPU's dense decode is to
    the CPU's (its matrix kernels round differently: TF32 for F32, their own activation
    quantization), it is the CPU's sparse decode to the same precision, and the masks matter.
    ``kw``: more engine options for all of them (cache types)."""
    gpu, cpu_kw = GPU | kw, dict(flash_attn=True) | kw
    noise = _rel(dense_logits(path, toks, **gpu), dense_logits(path, toks, **cpu_kw))
    bound = 2 * noise + 1e-4
    want = oracle_logits(path, toks, PROMPT, masks, n_ctx=64, n_threads=2, **cpu_kw)
    got, ops = sparse_logits(path, toks, masks, **gpu)
    cpu, _ = sparse_logits(path, toks, masks, **cpu_kw)
    # on the GPU wq and wo take the stock product (the attention kernel ignores inactive heads'
    # queries and zeroes their outputs), and layer_ops says so
    assert ops == [OP_KQV | OP_ON_DEVICE] * len(ops)
    assert _rel(got, want) < bound
    assert _rel(got, cpu) < bound
    assert _rel(got, dense_logits(path, toks, **gpu)) > 5 * bound
    return noise


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"h{s[0]}kv{s[1]}d{s[2]}")
def test_gpu_random_masks_match_the_oracle(tiny_models, arch, shape):
    path = tiny_models(arch, shape, "F32")
    toks = _tokens(3)
    masks = half_masks(np.random.default_rng(4), STEPS, 2, shape[0])
    masks[0] = 0  # every head off in one step: every KV head skipped
    masks[1] = 1
    noise = check_against_oracle(path, toks, masks)
    assert noise < 1e-2
    # all heads active: the head-masked kernel gives stock flash attention's logits
    ones = np.ones_like(masks)
    assert _rel(sparse_logits(path, toks, ones, **GPU)[0], dense_logits(path, toks, **GPU)) < 1e-4


@pytest.mark.parametrize("shape", [(9, 3, 64), (6, 2, 128)], ids=lambda s: f"h{s[0]}kv{s[1]}d{s[2]}")
def test_gpu_three_heads_per_kv_head(tiny_models, shape):
    """SmolLM2's grouping, 3 query heads per KV head: the tensor-core kernel takes up to 4, and the
    slot of the missing one must stay out of every sum."""
    path = tiny_models("llama", shape, "F32")
    masks = half_masks(np.random.default_rng(9), STEPS, 2, shape[0])
    masks[1] = 1
    check_against_oracle(path, _tokens(8), masks)


@pytest.mark.parametrize("shape", [(16, 2, 64), (12, 2, 128)], ids=lambda s: f"h{s[0]}kv{s[1]}d{s[2]}")
def test_gpu_six_to_eight_heads_per_kv_head(tiny_models, shape):
    """More than 4 query heads per KV head take the CUDA-core kernel with room for 8 heads a block
    (the tensor-core one takes at most 4); 6 leave two of its slots empty."""
    path = tiny_models("llama", shape, "F32")
    masks = half_masks(np.random.default_rng(10), STEPS, 2, shape[0])
    masks[1] = 1
    check_against_oracle(path, _tokens(8), masks)


Q8 = dict(cache_type_k="q8_0", cache_type_v="q8_0")


@pytest.mark.parametrize("shape", [(8, 8, 64), (8, 2, 64), (4, 4, 128), (4, 1, 128), (16, 2, 64)],
                         ids=lambda s: f"h{s[0]}kv{s[1]}d{s[2]}")
def test_gpu_q8_0_cache(tiny_models, shape):
    """A Q8_0 K/V cache is read by the CUDA-core kernel (for every grouping: the tensor-core one
    reads F16 rows) with its blocks' scales: as close to the CPU's oracle with the same cache as
    the two backends' dense decodes are, every head off in one step and on in another."""
    path = tiny_models("llama", shape, "F32")
    masks = half_masks(np.random.default_rng(13), STEPS, 2, shape[0])
    masks[0] = 0
    masks[1] = 1
    check_against_oracle(path, _tokens(13), masks, **Q8)


@pytest.mark.parametrize("type_name", ["F16", "Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3]], ids=lambda s: f"h{s[0]}kv{s[1]}d{s[2]}")
def test_gpu_quantized_weights(tiny_models, type_name, shape):
    path = tiny_models("llama", shape, type_name)
    check_against_oracle(path, _tokens(5), half_masks(np.random.default_rng(6), STEPS, 2, shape[0]))


@pytest.mark.parametrize("shape,n_prompt", [(SHAPES[1], 700), ((32, 8, 64), 4600)],
                         ids=["h8kv2d64-700", "h32kv8d64-4600"])
def test_long_context_on_the_gpu(tiny_models, shape, n_prompt):
    """Past the kernels' ranges, with the cache padded and partly masked. At 4600 cells and 8 KV
    heads each warp of the tensor-core kernel walks several 16-cell tiles (its ranges are sized
    for about 512 blocks), so its running max and sum are carried from tile to tile."""
    path = tiny_models("llama", shape, "F32")
    rng = np.random.default_rng(7)
    toks = [int(t) for t in rng.integers(1, 64, size=n_prompt + STEPS)]
    masks = half_masks(rng, STEPS, 2, shape[0])

    def run(**kw):
        with Engine(path, n_ctx=n_prompt + 64, n_threads=2, **kw) as eng:
            eng.prefill(toks[:n_prompt])
            eng.set_sparse(True)
            out = []
            for i, t in enumerate(toks[n_prompt:]):
                eng.set_mask(masks[i])
                out.append(eng.step(t))
            return np.array(out)

    assert _rel(run(**GPU), run(flash_attn=True)) < 1e-3


# --- the in-graph predictor and its fills on the GPU ---------------------------------------


@pytest.mark.parametrize("rule,value", [("threshold", 0.3), ("topk", 4), ("mass", 0.7), ("density", -0.5)])
def test_gpu_in_graph_predictor_matches_numpy(tiny_models, tmp_path, rule, value):
    """With every layer on the GPU the predictor runs there (layer_ops bit 16): each layer's logits
    are W x + b of its attn_norm output, its mask is the rule applied to those logits (with the
    density controller's offset moved layer after layer), and the counters add up the masks."""
    shape = SHAPES[1]
    path = tiny_models("llama", shape, "F32")
    g = _Graph()
    toks = _tokens(11)
    with Engine(path, n_ctx=64, n_threads=2, tensor_hook=g, **GPU) as eng:
        pred = tmp_path / "p.gguf"
        ws, bs = _random_predictor(pred, path, eng)
        eng.prefill(toks[:PROMPT])
        eng.load_head_predictor(pred)
        targets, gain = np.array([0.3, 0.6] * eng.n_layer, np.float32)[:eng.n_layer], 0.2
        if rule == "density":
            eng.set_head_rule("threshold", value)
            eng.set_head_density(targets, gain)
        else:
            eng.set_head_rule(rule, value)
        eng.set_sparse(True)
        eng.use_head_predictor(True)
        assert all(o & OP_PREDICTOR_ON_DEVICE for o in eng.layer_ops())
        eng.head_stats(reset=True)
        offset, kept = np.float32(0.0), 0
        for t in toks[PROMPT:]:
            g.t.clear()
            eng.step(t)
            for il in range(eng.n_layer):
                x = g.t[f"attn_norm-{il}"].reshape(-1)
                logits = g.t[f"head_logits-{il}"].reshape(-1)
                np.testing.assert_allclose(logits, ws[il] @ x + bs[il], rtol=1e-3, atol=1e-3)
                mask = g.t[f"head_mask-{il}"].reshape(-1)
                if rule == "density":
                    want = train.select("threshold", logits[None], float(np.float32(value) + offset))[0]
                    close = np.abs(logits - (np.float32(value) + offset)) < 1e-4
                    np.testing.assert_array_equal(mask[~close], want[~close])
                    offset = np.float32(offset + np.float32(gain) * (np.float32(mask.sum()) / eng.n_head - targets[il]))
                else:
                    np.testing.assert_array_equal(mask, train.select(rule, logits[None], value)[0])
                kept += int(mask.sum())
        assert eng.head_stats() == (kept, STEPS * eng.n_layer * eng.n_head)
        assert 0 < kept < STEPS * eng.n_layer * eng.n_head


@pytest.mark.parametrize("fill,ngl", [("zero", 99), ("mean", 99), ("linear", 99), ("linear", 2), ("zero", 2)],
                         ids=["zero", "mean", "linear", "linear-last-layer-on-gpu", "zero-last-layer-on-gpu"])
def test_gpu_predictor_and_fills_match_the_cpu(tiny_models, tmp_path, fill, ngl):
    """The predictor with each fill decodes on the GPU as on the CPU: the same masks, and logits as
    close as the two backends' dense decodes are; a fill changes them (it is really applied). With
    only the last layer on the GPU the selection state goes from the CPU to the GPU within the
    step and back to the CPU at its end."""
    shape = SHAPES[1]
    path = tiny_models("llama", shape, "F32")
    toks = _tokens(12)
    pred = tmp_path / "p.gguf"
    with Engine(path, n_ctx=32, n_threads=1) as probe:
        _random_predictor(pred, path, probe, value=shape[0] // 2, rule="topk", seed=1, fill=fill, head_dim=shape[2])

    def run(fill, **kw):
        g = _Graph()
        with Engine(path, n_ctx=64, n_threads=2, tensor_hook=g, **(dict(flash_attn=True) | kw)) as eng:
            eng.prefill(toks[:PROMPT])
            eng.load_head_predictor(pred)
            eng.set_head_fill(fill)
            eng.set_sparse(True)
            eng.use_head_predictor(True)
            eng.head_stats(reset=True)
            logits, masks = [], []
            for t in toks[PROMPT:]:
                g.t.clear()
                logits.append(eng.step(t))
                masks.append([g.t[f"head_mask-{il}"].reshape(-1) for il in range(eng.n_layer)])
            masks = np.array(masks)
            assert eng.head_stats() == (int(masks.sum()), masks.size)
            on_gpu = [bool(o & OP_PREDICTOR_ON_DEVICE) for o in eng.layer_ops()]
            if "n_gpu_layers" not in kw:
                assert not any(on_gpu)
            elif kw["n_gpu_layers"] >= 99:
                assert all(on_gpu)
            else:  # the first layer on the CPU, the last on the GPU
                assert on_gpu[0] is False and on_gpu[-1] is True
            return np.array(logits), masks

    gpu = dict(GPU, n_gpu_layers=ngl)
    noise = _rel(dense_logits(path, toks, **gpu), dense_logits(path, toks, flash_attn=True))
    bound = 2 * noise + 1e-4
    got, got_masks = run(fill, **gpu)
    want, want_masks = run(fill)
    np.testing.assert_array_equal(got_masks, want_masks)
    assert 0.3 < got_masks.mean() < 0.7
    assert _rel(got, want) < bound
    if fill != "zero":
        assert _rel(got, run("zero", **gpu)[0]) > 5 * bound


# --- window fill on the GPU ----------------------------------------------------------------


def _window_logits(path, toks, n_prompt, masks, window, check=None, **kw):
    """masked_decode with window fill when ``window`` (S, W) is given."""
    return masked_decode(path, toks, n_prompt, masks, (lambda e: e.set_head_window(*window)) if window else None,
                         check, **kw)


class _WindowError(WindowedHeads):
    """Compares each step's windowed heads' outputs (the kernels' own) with numpy attention over
    the window of the same q, K and V, instead of replacing them."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.errors = []

    def __call__(self, name, data):
        m = _KQV_OUT.match(name)
        if m is None:
            return super().__call__(name, data)
        il = int(m.group(1))
        self.remember(il)
        off = self.mask[il] == 0
        if self.cur[il]["Q"].shape[0] == 1 and off.any():
            got = data.reshape(-1, self.n_head, data.shape[-1] // self.n_head)[0][off]
            self.errors.append(_rel(got, self.fill_for(il)))


@pytest.mark.parametrize("shape,n_prompt", [((8, 8, 64), 700), ((8, 2, 64), 700), ((9, 3, 64), 300),
                                            ((4, 4, 128), 300), ((4, 1, 128), 300), ((16, 2, 64), 700),
                                            ((8, 8, 64), 4600), ((32, 8, 64), 4600)],
                         ids=lambda v: f"h{v[0]}kv{v[1]}d{v[2]}" if isinstance(v, tuple) else str(v))
def test_gpu_window_fill_matches_numpy_attention(tiny_models, shape, n_prompt):
    """Skipped heads attend over 4 sink and 40 recent cells: every skipped head's output, every
    step and layer, is numpy attention over those cells of the step's own q, K and V. With the
    CUDA-core kernel (MHA, and 8 query heads per KV head, where a block holds skipped and active
    heads together) and the tensor-core one (2-4 query heads per KV head), in short caches
    and in long ones where the window's cells lie in a few of many ranges; one step skips every
    head (only windowed heads: ranges without window cells are not read at all). The logits are
    the CPU's window fill's, to the CPU's precision: its flash attention accumulates V in F16
    for those heads (stock's row loop), about 2e-3 of each head's output. The window is really
    applied: zero fill gives other logits."""
    path = tiny_models("llama", shape, "F32")
    rng = np.random.default_rng(11)
    toks = [int(t) for t in rng.integers(1, 64, size=n_prompt + STEPS)]
    masks = half_masks(rng, STEPS, 2, shape[0])
    masks[0] = 0
    check = _WindowError(2, shape[0], 4, 40, round_q=False)
    got = _window_logits(path, toks, n_prompt, masks, (4, 40), check=check, **GPU)
    assert len(check.errors) == int((masks == 0).any(axis=2).sum())
    assert max(check.errors) < 1e-4, check.errors
    assert _rel(got, _window_logits(path, toks, n_prompt, masks, (4, 40), flash_attn=True)) < 5e-3
    assert _rel(got, _window_logits(path, toks, n_prompt, masks, None, **GPU)) > 0.1


@pytest.mark.parametrize("shape", [(8, 8, 64), (8, 2, 64)], ids=lambda s: f"h{s[0]}kv{s[1]}d{s[2]}")
@pytest.mark.parametrize("window", [(700, 0), (0, 700), (300, 500)], ids=["sinks", "recent", "both"])
def test_gpu_window_that_covers_the_cache_is_dense(tiny_models, shape, window):
    """A window holding every cell makes a skipped head attend as an active one: every head
    skipped then gives dense decode on the GPU, through the sink cells only, the recent ones only,
    or both meeting."""
    path = tiny_models("llama", shape, "F32")
    rng = np.random.default_rng(12)
    n_prompt = 600
    toks = [int(t) for t in rng.integers(1, 64, size=n_prompt + STEPS)]
    none = np.zeros((STEPS, 2, shape[0]), np.int32)
    got = _window_logits(path, toks, n_prompt, none, window, **GPU)
    want = _window_logits(path, toks, n_prompt, np.ones_like(none), None, **GPU)
    assert _rel(got, want) < 1e-4


def test_gpu_window_fill_warns_only_off_its_kernel(tiny_models):
    """The window runs in the GPU's flash attention with an F16 cache; without flash attention the
    scheduler runs it on the CPU, and the engine says so rather than leaving a slow step
    unexplained."""
    path = tiny_models("llama", SHAPES[1], "F32")
    with Engine(path, n_ctx=64, n_threads=2, **GPU) as eng, warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        eng.set_head_window(4, 8)
    assert not [w for w in seen if issubclass(w.category, SparseFallbackWarning)]
    with Engine(path, n_ctx=64, n_threads=2, n_gpu_layers=99) as eng, \
            pytest.warns(SparseFallbackWarning, match="window fill"):
        eng.set_head_window(4, 8)


@pytest.mark.parametrize("kw", [dict(flash_attn=False), dict(flash_attn=True, cache_type_k="q4_0", cache_type_v="q4_0"),
                                dict(flash_attn=True, cache_type_k="q8_0")], ids=["no-fa", "q4_0", "q8_0-k-only"])
def test_gpu_sparse_off_the_kernel_warns(tiny_models, kw):
    """Sparse attention the CUDA kernel cannot read (no flash attention, caches other than F16 and
    Q8_0) runs on the CPU; set_sparse says so. With F16 or Q8_0 caches it says nothing."""
    path = tiny_models("llama", SHAPES[1], "F32")
    with Engine(path, n_ctx=64, n_threads=2, n_gpu_layers=99, **kw) as eng, \
            pytest.warns(SparseFallbackWarning, match="needs flash attention"):
        eng.set_sparse(True)
    for ok in ({}, Q8):
        with Engine(path, n_ctx=64, n_threads=2, **GPU, **ok) as eng, warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            eng.set_sparse(True)
        assert not [w for w in seen if issubclass(w.category, SparseFallbackWarning)]



@pytest.mark.parametrize("shape,n_prompt,page,cache", [
    ((8, 8, 64), 700, 16, "f16"), ((8, 2, 64), 700, 16, "f16"), ((16, 2, 64), 700, 32, "f16"),
    ((4, 4, 128), 300, 8, "f16"), ((4, 1, 128), 300, 16, "f16"),
    ((32, 8, 64), 4600, 64, "f16"), ((8, 8, 64), 4600, 128, "f16")],
    ids=lambda v: f"h{v[0]}kv{v[1]}d{v[2]}" if isinstance(v, tuple) else str(v))
@pytest.mark.parametrize("score", ["sum", "head-max", "mid"])
def test_gpu_budget_selects_as_numpy_and_attends_over_its_pages(tiny_models, shape, n_prompt, page, cache, score):
    """A budget of 8 pages (sinks 4, recent 32 cells): in every decode step and layer the GPU's
    page selection (kv-budget.cu) is numpy's from the same q and keys, and each active head's
    output is numpy attention over exactly the selected pages' cells, with the CUDA-core kernel
    (MHA, 8 query heads per KV head) and the tensor-core one (2-4 per KV head), in
    short caches and long ones. One step has every head off (no group selects a page). The budget
    is really applied: head-only sparse decode gives other logits."""
    path = tiny_models("llama", shape, "F32")
    rng = np.random.default_rng(13)
    toks = [int(t) for t in rng.integers(1, 64, size=n_prompt + STEPS)]
    masks = half_masks(rng, STEPS, 2, shape[0])
    masks[0] = 0
    budget = dict(budget=8 * page, page=page, n_sink=4, n_recent=32, score=score)
    check = BudgetCheck(2, shape[0], budget)
    kw = GPU | dict(cache_type_k=cache, cache_type_v=cache)
    got = budget_logits(path, toks, n_prompt, masks, budget, check=check, **kw)
    assert len(check.page_mismatch) == 2 * STEPS  # the step with no head too: no page
    assert np.mean(check.page_mismatch) < 0.01, check.page_mismatch
    assert len(check.errors) == int(masks.sum())
    # the tensor-core kernel keeps q and p to 22 bits
    assert max(check.errors) < 1e-4, max(check.errors)
    assert _rel(got, budget_logits(path, toks, n_prompt, masks, None, **kw)) > 0.05


@pytest.mark.parametrize("shape", [(8, 8, 64), (8, 2, 64), (16, 2, 64)], ids=lambda s: f"h{s[0]}kv{s[1]}d{s[2]}")
def test_gpu_budget_that_covers_the_cache_is_head_only_sparse(tiny_models, shape):
    """Every visible page selected: the kernels read every cell, as without a budget (the
    tensor-core kernel then cuts the cache into more ranges, so the sums may round differently)."""
    path = tiny_models("llama", shape, "F32")
    rng = np.random.default_rng(17)
    toks = [int(t) for t in rng.integers(1, 64, size=700 + STEPS)]
    masks = half_masks(rng, STEPS, 2, shape[0])
    covered = budget_logits(path, toks, 700, masks, dict(budget=1024, page=16, n_sink=4, n_recent=32), **GPU)
    heads_only = budget_logits(path, toks, 700, masks, None, **GPU)
    assert _rel(covered, heads_only) < 1e-5


@pytest.mark.parametrize("shape", [(8, 2, 64), (8, 8, 64)], ids=lambda s: f"h{s[0]}kv{s[1]}d{s[2]}")
@pytest.mark.parametrize("cache", ["f16", "q8_0"])
def test_gpu_budget_matches_the_cpu(tiny_models, shape, cache):
    """The same budget on the GPU and on the CPU (flash attention; a Q8_0 cache too, which the
    GPU's page bounds dequantize): logits as close as the two are without a budget, and the
    budget moves them."""
    path = tiny_models("llama", shape, "F32")
    rng = np.random.default_rng(19)
    toks = [int(t) for t in rng.integers(1, 64, size=700 + STEPS)]
    masks = half_masks(rng, STEPS, 2, shape[0])
    budget = dict(budget=128, page=16, n_sink=4, n_recent=32)
    kw = dict(flash_attn=True, cache_type_k=cache, cache_type_v=cache)
    heads = budget_logits(path, toks, 700, masks, None, n_gpu_layers=99, **kw)
    noise = _rel(heads, budget_logits(path, toks, 700, masks, None, **kw))
    got = budget_logits(path, toks, 700, masks, budget, n_gpu_layers=99, **kw)
    cpu = budget_logits(path, toks, 700, masks, budget, **kw)
    assert _rel(got, cpu) < 2 * noise + 1e-4
    assert _rel(got, heads) > 10 * (2 * noise + 1e-4)
