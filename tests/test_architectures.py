"""Sparse decode on every supported architecture, without downloads: tiny random-weight GGUFs
written here (llama; qwen2 with q/k/v biases; qwen3 with per-head q/k RMS norms), MHA and GQA
with several group sizes, head widths 64 and 128, rewritten by llama.cpp's own quantizer into
each weight type. Random masks must match dense decode whose inactive heads' outputs are zeroed
(the oracle, reference.ZeroedHeads); with all heads active sparse decode gives dense's logits.
Where a part cannot run sparse (wo in a K-quant whose 256-value blocks are wider than a head),
``layer_ops`` must say so, and the result must still be exact."""

import ctypes

import numpy as np
import pytest
from test_faults import half_masks, oracle_logits, write_tiny_llama

from powerinfer_attn.native import bindings
from powerinfer_attn.native.bindings import OP_KQV, OP_WO, OP_WQ
from powerinfer_attn.engine.decode import Engine, EngineError

ARCHS = ("llama", "qwen2", "qwen3")
# (n_head, n_head_kv, head width): MHA, GQA groups of 4 and 2 at width 64; GQA 4 and MHA at 128
SHAPES = [(8, 8, 64), (8, 2, 64), (8, 4, 64), (4, 1, 128), (4, 4, 128)]
# llama_ftype of each weight type (llama.h); the K-quant ftypes are the "_S" mixes, mostly that type
FTYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q8_0": 7, "Q4_K": 14, "Q5_K": 16, "Q6_K": 18}
STEPS, PROMPT = 6, 5

# the dense fallbacks are what some cases check; their warning is expected
pytestmark = pytest.mark.filterwarnings("ignore::powerinfer_attn.engine.decode.SparseFallbackWarning")


@pytest.fixture(scope="module")
def tiny_models(engine_lib, tmp_path_factory):
    """F32 sources, written once per (arch, shape); quantized copies made on demand."""
    root = tmp_path_factory.mktemp("arch")
    cache: dict = {}

    def get(arch, shape, type_name):
        key = (arch, shape, type_name)
        if key in cache:
            return cache[key]
        n_head, n_head_kv, d = shape
        src = root / f"{arch}-{n_head}-{n_head_kv}-{d}.F32.gguf"
        if not src.is_file():
            write_tiny_llama(src, arch=arch, n_head=n_head, n_head_kv=n_head_kv, head_dim=d, n_ff=512, n_vocab=64)
        out = src if type_name == "F32" else quantize(src, src.with_name(src.name.replace("F32", type_name)), type_name)
        cache[key] = out
        return out

    return get


def quantize(src, out, type_name):
    C = bindings.bindings()
    params = C.llama_model_quantize_default_params()
    params.ftype = FTYPES[type_name]
    params.nthread = 2
    params.allow_requantize = True
    rc = C.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    assert rc == 0 and out.is_file(), f"llama_model_quantize {type_name} failed ({rc})"
    return out


def sparse_logits(path, tokens, masks, **kw):
    with Engine(path, n_ctx=64, n_threads=2, **kw) as eng:
        eng.prefill(tokens[:PROMPT])
        eng.set_sparse(True)
        out = []
        for i, t in enumerate(tokens[PROMPT:]):
            eng.set_mask(masks[i])
            out.append(eng.step(t))
        return np.array(out), eng.layer_ops()


def _tokens(seed):
    return [int(t) for t in np.random.default_rng(seed).integers(1, 64, size=PROMPT + STEPS)]


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"h{s[0]}kv{s[1]}d{s[2]}")
def test_f32_random_masks_match_zeroed_heads(tiny_models, arch, shape):
    """F32: everything runs sparse, and matches the oracle to float rounding."""
    path = tiny_models(arch, shape, "F32")
    toks = _tokens(1)
    masks = half_masks(np.random.default_rng(2), STEPS, 2, shape[0])
    want = oracle_logits(path, toks, PROMPT, masks, n_ctx=64, n_threads=2)
    got, ops = sparse_logits(path, toks, masks)
    assert ops == [OP_WQ | OP_KQV | OP_WO] * 2
    assert _rel(got, want) < 1e-4
    ones = np.ones_like(masks)
    dense = oracle_logits(path, toks, PROMPT, ones, n_ctx=64, n_threads=2)
    assert _rel(sparse_logits(path, toks, ones)[0], dense) < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("type_name", [t for t in FTYPES if t != "F32"])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3]], ids=lambda s: f"h{s[0]}kv{s[1]}d{s[2]}")
def test_quantized_random_masks_match_zeroed_heads(tiny_models, arch, type_name, shape):
    """Every weight type the quantizer writes: exact against the oracle up to float rounding
    (both quantize the activations the same way before each dot product); a wo whose quant
    blocks are wider than a head stays dense and is reported."""
    path = tiny_models(arch, shape, type_name)
    toks = _tokens(3)
    masks = half_masks(np.random.default_rng(4), STEPS, 2, shape[0])
    # repack off: repacked weights (Q4_0, Q8_0, Q4_K on AVX2) would stay on the dense op
    want = oracle_logits(path, toks, PROMPT, masks, n_ctx=64, n_threads=2, repack=False)
    got, ops = sparse_logits(path, toks, masks, repack=False)
    assert _rel(got, want) < 2e-3, (type_name, ops)
    assert all(o & OP_KQV for o in ops)
    wo_block = 256 if type_name.endswith("_K") else 32 if type_name != "F16" else 1
    for o in ops:
        assert bool(o & OP_WO) == (shape[2] % wo_block == 0), (type_name, shape, ops)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cache", ["f16", "q8_0", "q4_0"])
def test_quantized_kv_cache_with_flash_attention(tiny_models, arch, cache):
    """K and V caches in f16, q8_0, q4_0 with flash attention: inactive heads are skipped in
    its per-head loop, exact against the oracle with the same cache types."""
    shape = SHAPES[1]
    path = tiny_models(arch, shape, "F32")
    toks = _tokens(5)
    masks = half_masks(np.random.default_rng(6), STEPS, 2, shape[0])
    kw = dict(flash_attn=True, cache_type_k=cache, cache_type_v=cache)
    want = oracle_logits(path, toks, PROMPT, masks, n_ctx=64, n_threads=2, **kw)
    got, _ = sparse_logits(path, toks, masks, **kw)
    # flash attention rounds Q to F16 and splits the decode over KV chunks in another order
    assert _rel(got, want) < 1e-3


def test_quantized_k_cache_without_flash_attention(tiny_models):
    """Without flash attention only K may be quantized (llama.cpp); v2 reads q8_0 K rows."""
    path = tiny_models("qwen2", SHAPES[1], "F32")
    toks = _tokens(7)
    masks = half_masks(np.random.default_rng(8), STEPS, 2, SHAPES[1][0])
    want = oracle_logits(path, toks, PROMPT, masks, n_ctx=64, n_threads=2, cache_type_k="q8_0")
    got, _ = sparse_logits(path, toks, masks, cache_type_k="q8_0")
    assert _rel(got, want) < 1e-4
    with pytest.raises(EngineError, match="needs flash attention"):
        Engine(path, n_ctx=64, cache_type_v="q8_0")
    with pytest.raises(EngineError, match="unknown K cache type"):
        Engine(path, n_ctx=64, cache_type_k="q3")


@pytest.mark.parametrize("arch", ARCHS)
def test_graph_names_what_collect_records(tiny_models, arch):
    """Every supported architecture names attn_norm, kqv_out, attn_out and ffn_inp per layer:
    `collect` (predictor training data) reads them through the eval callback."""
    from powerinfer_attn.engine.decode import TensorHook

    class Names(TensorHook):
        seen: set = set()

        def wants(self, name):
            self.seen.add(name)
            return False

    hook = Names()
    with Engine(tiny_models(arch, SHAPES[1], "F32"), n_ctx=64, n_threads=2, tensor_hook=hook) as eng:
        eng.prefill(_tokens(3)[:PROMPT])
    for il in range(2):
        assert {f"attn_norm-{il}", f"kqv_out-{il}", f"attn_out-{il}", f"ffn_inp-{il}"} <= hook.seen, arch
