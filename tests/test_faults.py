"""Bad input and faults around the sparse engine: it must refuse with a clear Python error, or
fall back to the dense op and say so, and never crash, hang or compute something else than asked.

Loads that could take the process down (corrupt, truncated and foreign GGUFs) run in a child
interpreter, so a crash fails the test instead of killing pytest."""

import copy
import ctypes
import json
import subprocess
import sys
import textwrap
import threading
import warnings

import numpy as np
import pytest
from test_engine import ORACLE_TEXT, PROMPT, rel_diff, teacher_forced_logits

from powerinfer_attn.engine.decode import (
    Engine,
    EngineError,
    SparseFallbackWarning,
    TensorHook,
)
from powerinfer_attn.predictors.basic import AllHeads
from powerinfer_attn.engine.reference import ZeroedHeads

# --- helpers ------------------------------------------------------------------


def run_isolated(code: str, *args, timeout: int = 300) -> list[dict]:
    """Run ``code`` in a fresh interpreter; the JSON objects it printed, one a line. A crash or a
    hang there fails the calling test."""
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"the child exited with {r.returncode} (negative: killed by that signal):\n{r.stderr[-3000:]}"
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


# for each path: load it, prefill three tokens; the error if it is refused
LOAD_EACH = """
import json, sys
import numpy as np
from powerinfer_attn.engine.decode import Engine, EngineError
for path in sys.argv[1:]:
    try:
        with Engine(path, n_ctx=256, n_threads=1) as e:
            logits = e.prefill([1, 2, 3])
            res = {"path": path, "loaded": True, "finite": bool(np.isfinite(logits).all())}
    except EngineError as ex:
        res = {"path": path, "error": str(ex)}
    print(json.dumps(res), flush=True)
"""


def write_tiny_llama(path, arch="llama", n_head=4, n_head_kv=2, head_dim=64, n_layer=2, n_ff=512,
                     n_vocab=64, types=None, seed=0):
    """A small random model of the llama layout (or another architecture's name on it), F32
    except the tensors ``types`` names by their short name (``{"attn_output": "Q4_K"}``).
    ``qwen2`` adds q/k/v biases, ``qwen3`` per-head q/k RMS norms (random, not ones).
    No tokenizer ("no_vocab"): decode it from token ids."""
    import gguf

    from powerinfer_attn.native import kernels

    types = types or {}
    rng = np.random.default_rng(seed)
    n_embd = n_head * head_dim
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(512)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("no_vocab")

    def add(name, shape, norm=False, scale=None):
        if norm:
            a = np.ones(shape, np.float32) if scale is None else (1 + scale * rng.standard_normal(shape)).astype(np.float32)
        else:
            a = (rng.standard_normal(shape) / np.sqrt(shape[-1] if scale is None else 1 / scale)).astype(np.float32)
        t = types.get(name.split(".")[-2], "F32")
        if t == "F32":
            w.add_tensor(name, a)
        else:
            q = np.frombuffer(kernels.quantize(a, t), np.uint8).reshape(shape[0], -1)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType[t])

    add("token_embd.weight", (n_vocab, n_embd))
    add("output_norm.weight", (n_embd,), norm=True)
    add("output.weight", (n_vocab, n_embd))
    for i in range(n_layer):
        add(f"blk.{i}.attn_norm.weight", (n_embd,), norm=True)
        add(f"blk.{i}.attn_q.weight", (n_head * head_dim, n_embd))
        add(f"blk.{i}.attn_k.weight", (n_head_kv * head_dim, n_embd))
        add(f"blk.{i}.attn_v.weight", (n_head_kv * head_dim, n_embd))
        add(f"blk.{i}.attn_output.weight", (n_embd, n_head * head_dim))
        if arch == "qwen2":
            add(f"blk.{i}.attn_q.bias", (n_head * head_dim,), scale=0.5)
            add(f"blk.{i}.attn_k.bias", (n_head_kv * head_dim,), scale=0.5)
            add(f"blk.{i}.attn_v.bias", (n_head_kv * head_dim,), scale=0.5)
        if arch == "qwen3":
            add(f"blk.{i}.attn_q_norm.weight", (head_dim,), norm=True, scale=0.2)
            add(f"blk.{i}.attn_k_norm.weight", (head_dim,), norm=True, scale=0.2)
        add(f"blk.{i}.ffn_norm.weight", (n_embd,), norm=True)
        add(f"blk.{i}.ffn_gate.weight", (n_ff, n_embd))
        add(f"blk.{i}.ffn_up.weight", (n_ff, n_embd))
        add(f"blk.{i}.ffn_down.weight", (n_embd, n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def oracle_logits(model_path, tokens, prompt_len, masks, hook=None, **engine_kw):
    """Dense decode with the masked heads' outputs zeroed (reference.ZeroedHeads), or replaced
    as another reference ``hook`` with a ``mask`` says."""
    hook = hook or ZeroedHeads(masks.shape[1], masks.shape[2])
    with Engine(model_path, tensor_hook=hook, **engine_kw) as eng:
        eng.prefill(tokens[:prompt_len])
        out = []
        for i, tok in enumerate(tokens[prompt_len:]):
            hook.mask = masks[i]
            out.append(eng.step(tok))
    return np.array(out)


def half_masks(rng, steps, n_layer, n_head, density=0.5):
    return (rng.random((steps, n_layer, n_head)) < density).astype(np.int32)


class KqvOut(TensorHook):
    """Keeps the last value of every layer's attention output before wo."""

    def __init__(self):
        self.last = {}

    def wants(self, name):
        return name.startswith("kqv_out-")

    def __call__(self, name, data):
        self.last[name] = data.copy()


@pytest.fixture(scope="module")
def small_engine(model_path):
    eng = Engine(model_path, n_ctx=256, n_threads=2)
    yield eng
    eng.close()


# --- masks ----------------------------------------------------------------------


@pytest.mark.parametrize("zero_layers", [[3], list(range(30))], ids=["one-layer", "every-layer"])
def test_all_zero_layer_contributes_nothing(f32_model_path, zero_layers):
    """A layer whose heads are all off is allowed: its attention output (before wo) is exactly
    zero, so the layer adds only its FFN; the logits are dense decode with that layer's heads
    zeroed (the oracle), and far from plain dense."""
    obs = KqvOut()
    with Engine(f32_model_path, n_ctx=256, n_threads=2, tensor_hook=obs) as eng:
        toks = eng.tokenize(ORACLE_TEXT)
        masks = half_masks(np.random.default_rng(7), len(toks) - 5, eng.n_layer, eng.n_head, 0.7)
        masks[:, zero_layers, :] = 0
        dense = teacher_forced_logits(eng, toks, 5)
        sparse = teacher_forced_logits(eng, toks, 5, masks)
        # the last step's attention outputs: zero exactly where the layer's mask is all off
        for il in range(eng.n_layer):
            out = obs.last[f"kqv_out-{il}"]
            assert np.all(out == 0) == (not masks[-1, il].any()), il
        assert all(not masks[-1, il].any() for il in zero_layers)
    ref = oracle_logits(f32_model_path, toks, 5, masks, n_ctx=256, n_threads=2)
    assert rel_diff(sparse, ref).max() < 5e-3
    assert rel_diff(dense, ref).min() > 20 * rel_diff(sparse, ref).max()


def test_mask_on_a_closed_engine_is_an_error(model_path):
    """Once the model and context are freed every call is refused instead of reaching the C API
    with freed pointers."""
    eng = Engine(model_path, n_ctx=256, n_threads=1)
    n_layer, n_head = eng.n_layer, eng.n_head
    eng.close()
    calls = {
        "set_mask": lambda: eng.set_mask(np.ones((n_layer, n_head), np.int32)),
        "set_sparse": lambda: eng.set_sparse(True),
        "sparse": lambda: eng.sparse,
        "layer_ops": eng.layer_ops,
        "prefill": lambda: eng.prefill([1, 2]),
        "step": lambda: eng.step(1),
        "generate": lambda: eng.generate("Hello", 2),
        "tokenize": lambda: eng.tokenize("Hello"),
        "detokenize": lambda: eng.detokenize([1]),
        "reset": eng.reset,
        "rollback": lambda: eng.rollback(0),
    }
    for name, call in calls.items():
        with pytest.raises(EngineError, match="is closed"):
            call()
    eng.close()  # a second close is harmless


def test_c_api_without_context_returns_error_codes(engine):
    """No context (NULL), or a layer that does not exist: error codes, not a crash."""
    C = engine.C
    n = engine.n_layer * engine.n_head
    mask = (ctypes.c_int32 * n)(*([1] * n))
    assert C.llama_set_activated_heads(None, mask, n) == -1
    assert C.llama_set_sparse_attn(None, True) == -1
    assert C.llama_get_sparse_attn(None) is False
    assert C.llama_sparse_attn_layer_ops(None, 0) == -1
    assert C.llama_sparse_attn_layer_ops(engine.ctx, -1) == -1
    assert C.llama_sparse_attn_layer_ops(engine.ctx, engine.n_layer) == -1


@pytest.mark.parametrize("shape", [(32, 32), (9, 30), (270,), (1, 30, 9), (30, 8), (31, 9)])
def test_mask_for_another_model_names_both_shapes(engine, shape):
    """(9, 30) and (270,) have the model's number of values, which the C API alone would take."""
    with pytest.raises(ValueError) as ei:
        engine.set_mask(np.ones(shape, np.int32))
    msg = str(ei.value)
    assert "(30, 9)" in msg and str(shape) in msg


def test_mask_set_before_sparse_mode_applies(model_path):
    """A mask may be set while decode is dense; it takes effect when sparse mode is switched on."""
    masks = half_masks(np.random.default_rng(3), 1, 30, 9)[0]
    out = []
    for mask_first in (True, False):
        with Engine(model_path, n_ctx=256, n_threads=2) as eng:
            toks = eng.tokenize(PROMPT)
            eng.prefill(toks[:-1])
            if mask_first:
                eng.set_mask(masks)
            eng.set_sparse(True)
            if not mask_first:
                eng.set_mask(masks)
            out.append(eng.step(toks[-1]))
            eng.set_sparse(False)
            eng.rollback(len(toks) - 1)
            out.append(eng.step(toks[-1]))  # dense again
    np.testing.assert_array_equal(out[0], out[2])
    np.testing.assert_array_equal(out[1], out[3])
    assert not np.array_equal(out[0], out[1])


# --- models ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(engine_lib, tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


def test_other_architecture_is_refused_cleanly(tiny_dir):
    """A model of another architecture (refact: llama's tensors, another graph) loads and decodes
    densely; sparse mode is refused with an EngineError, the C API answers -4 / -1."""
    path = write_tiny_llama(tiny_dir / "refact.gguf", arch="refact")
    (res,) = run_isolated("""
        import ctypes, json, sys
        import numpy as np
        from powerinfer_attn.engine.decode import Engine, EngineError
        out = {}
        with Engine(sys.argv[1], n_ctx=64, n_threads=1) as e:
            out["dense_ok"] = bool(np.isfinite(e.prefill([1, 2, 3])).all() and np.isfinite(e.step(4)).all())
            for name, call in (("set_sparse", lambda: e.set_sparse(True)),
                               ("set_mask", lambda: e.set_mask(np.ones((e.n_layer, e.n_head), np.int32)))):
                try:
                    call()
                    out[name] = "accepted"
                except EngineError as ex:
                    out[name] = str(ex)
            n = e.n_layer * e.n_head
            out["rc"] = e.C.llama_set_activated_heads(e.ctx, (ctypes.c_int32 * n)(*[1] * n), n)
            out["layer_ops"] = e.layer_ops()
            out["sparse"] = e.sparse
            out["dense_after"] = bool(np.isfinite(e.step(5)).all())
        print(json.dumps(out))
        """, path)
    assert res["dense_ok"] and res["dense_after"]
    assert "not supported for refact.gguf (llama, qwen2 and qwen3 architectures only" in res["set_sparse"]
    assert "returned -4" in res["set_mask"] and "architecture" in res["set_mask"]
    assert res["rc"] == -4
    assert res["layer_ops"] == [-1, -1] and res["sparse"] is False


def test_unknown_architecture_is_a_clear_load_error(tiny_dir):
    path = write_tiny_llama(tiny_dir / "bogus.gguf", arch="notanarch")
    (res,) = run_isolated(LOAD_EACH, path)
    assert str(path) in res["error"] and "unknown model architecture: 'notanarch'" in res["error"]


@pytest.mark.parametrize("wo_type,head_dim", [("Q4_K", 64), ("Q4_0", 48)])
def test_unservable_wo_falls_back_to_dense_with_a_warning(tiny_dir, wo_type, head_dim):
    """wo whose head width is not whole quant blocks (Q4_K at 64: 256-value blocks; Q4_0 at 48)
    cannot skip columns: layer_ops reports wo dense, set_sparse warns once, and sparse decode
    still equals the zeroed-heads oracle (the inactive heads' inputs to wo are zero)."""
    path = write_tiny_llama(tiny_dir / f"wo-{wo_type}-{head_dim}.gguf", head_dim=head_dim,
                            types={"attn_output": wo_type})
    block = 256 if wo_type.endswith("_K") else 32
    rng = np.random.default_rng(1)
    toks = [int(t) for t in rng.integers(0, 64, 16)]
    with Engine(path, n_ctx=64, n_threads=2, repack=False) as eng:
        assert eng.layer_ops() == [1 | 2] * eng.n_layer
        with pytest.warns(SparseFallbackWarning,
                          match=rf"wo in layers 0-1 \(it is {wo_type}, whose {block}-value blocks do not fit a head width of {head_dim}\)"):
            eng.set_sparse(True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            eng.set_sparse(True)  # said once per engine
        eng.set_sparse(False)
        masks = half_masks(rng, len(toks) - 4, eng.n_layer, eng.n_head)
        masks[:, 1, :] = 0
        sparse = teacher_forced_logits(eng, toks, 4, masks)
        dense = teacher_forced_logits(eng, toks, 4)
    ref = oracle_logits(path, toks, 4, masks, n_ctx=64, n_threads=2, repack=False)
    assert rel_diff(sparse, ref).max() < 1e-4
    assert rel_diff(dense, ref).min() > 20 * rel_diff(sparse, ref).max()


def test_repacked_weights_fall_back_with_a_warning(model_path):
    """Q4_0 weights that the CPU backend repacks (on AVX2 and others) are read by the dense op
    only; without repacking the same model runs fully sparse."""
    from powerinfer_attn.native.model import derived_model_path

    path = derived_model_path("Q4_0", model_path)
    with Engine(path, n_ctx=256, n_threads=2, repack=False) as eng:
        assert eng.layer_ops() == [7] * eng.n_layer
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            eng.set_sparse(True)
    with Engine(path, n_ctx=256, n_threads=2, repack=True) as eng:
        ops = eng.layer_ops()
        assert all(o & 2 for o in ops)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            eng.set_sparse(True)
        said = [str(w.message) for w in caught if issubclass(w.category, SparseFallbackWarning)]
        if ops == [7] * eng.n_layer:  # a CPU without repacked Q4_0 kernels
            assert not said
        else:
            assert len(said) == 1 and "repacked for this CPU; Engine(repack=False) keeps it sparse" in said[0]


def gguf_data_offset(path):
    from gguf import GGUFReader

    return GGUFReader(path).data_offset


def test_truncated_gguf_is_a_clear_error_naming_the_file(model_path, tmp_path):
    data = model_path.read_bytes()
    start = gguf_data_offset(model_path)
    cuts = {"empty": 0, "magic": 3, "header": 24, "kv": 1000, "tokenizer": 100_000, "tensor-info": start - 100,
            "first-tensor": start + 1000, "half": len(data) // 2, "last-byte": len(data) - 1}
    paths = []
    for name, n in cuts.items():
        p = tmp_path / f"cut-{name}.gguf"
        p.write_bytes(data[:n])
        paths.append(p)
    del data
    results = run_isolated(LOAD_EACH, *paths)
    assert [r["path"] for r in results] == [str(p) for p in paths]
    for name, r in zip(cuts, results):
        assert "error" in r, f"{name}: {r}"
        assert r["path"] in r["error"], name
    by_name = dict(zip(cuts, (r["error"] for r in results)))
    assert "is empty" in by_name["empty"]
    assert "not a GGUF file" in by_name["magic"]
    for name in ("first-tensor", "half", "last-byte"):
        assert "not within the file bounds" in by_name[name], by_name[name]


def test_corrupt_gguf_is_a_clear_error_or_loads(model_path, tmp_path):
    """Garbage, garbage after the magic, impossible counts, a scrambled header: errors naming
    the file. Scrambled tensor data cannot be told from weights (GGUF has no checksums): it
    loads and decodes without crashing."""
    rng = np.random.default_rng(0)
    data = bytearray(model_path.read_bytes())
    header = bytes(data[:24])
    cases = {
        "garbage": rng.bytes(4096),
        "magic-then-garbage": b"GGUF" + rng.bytes(4096),
        "version-then-garbage": header[:8] + rng.bytes(4096),
        "huge-counts": b"GGUF" + (3).to_bytes(4, "little") + (2**62).to_bytes(8, "little") * 2 + rng.bytes(64),
        "scrambled-kv": header + rng.bytes(4096) + bytes(data[24 + 4096:gguf_data_offset(model_path) + 4096]),
    }
    paths = []
    for name, blob in cases.items():
        p = tmp_path / f"{name}.gguf"
        p.write_bytes(blob)
        paths.append(p)
    start = gguf_data_offset(model_path)
    data[start:start + (1 << 20)] = rng.bytes(1 << 20)
    scrambled = tmp_path / "scrambled-tensor-data.gguf"
    scrambled.write_bytes(data)
    del data
    results = run_isolated(LOAD_EACH, *paths, scrambled)
    for name, r in zip(cases, results):
        assert "error" in r and r["path"] in r["error"], f"{name}: {r}"
    assert "not a GGUF file" in results[0]["error"]
    assert results[-1]["path"] == str(scrambled) and results[-1].get("loaded"), results[-1]


# --- context ---------------------------------------------------------------------


def test_zero_length_prompt(small_engine):
    eng = small_engine
    with pytest.raises(EngineError, match="empty prompt"):
        eng.prefill([])
    assert eng.tokenize("") == []  # this model adds no BOS
    with pytest.raises(EngineError, match="empty prompt"):
        eng.generate("", 4)
    with pytest.raises(EngineError, match="empty prompt"):
        eng.generate([], 4)


def test_prompt_longer_than_the_context_is_refused_before_running(small_engine):
    eng = small_engine
    eng.reset()
    eng.prefill([1] * 10)
    with pytest.raises(EngineError, match=rf"context full: 10 positions used \+ {eng.n_ctx - 9} new tokens > n_ctx {eng.n_ctx}"):
        eng.prefill([1] * (eng.n_ctx - 9))
    assert eng.n_past == 10  # nothing ran
    with pytest.raises(EngineError, match="context full"):
        eng.generate([1] * (eng.n_ctx + 1), 4)
    assert "Paris" in eng.generate("The capital of France is", 6).text  # still usable


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_decode_past_the_context(small_engine, sparse):
    eng = small_engine
    eng.reset()
    eng.prefill(list(range(1, eng.n_ctx)))
    eng.set_sparse(sparse)
    try:
        if sparse:
            eng.set_mask(half_masks(np.random.default_rng(0), 1, eng.n_layer, eng.n_head)[0])
        last = eng.step(5)
        assert eng.n_past == eng.n_ctx
        with pytest.raises(EngineError, match=rf"context full: {eng.n_ctx} positions used \+ 1 new token > n_ctx"):
            eng.step(6)
        assert eng.n_past == eng.n_ctx
        eng.rollback(eng.n_ctx - 1)
        np.testing.assert_array_equal(eng.step(5), last)
    finally:
        eng.set_sparse(False)


def test_generation_past_the_context(small_engine):
    eng = small_engine
    pred = AllHeads()
    pred.bind(eng)
    with pytest.raises(EngineError, match="context full"):
        eng.generate(list(range(1, eng.n_ctx - 3)), 10, predictor=pred, stop_at_eog=False)
    assert not eng.sparse, "generate must switch sparse off after an error"


def test_token_ids_out_of_range(small_engine):
    eng = small_engine
    eng.reset()
    eng.prefill([1, 2])
    for bad in (-1, eng.n_vocab, 2**31 - 1):
        with pytest.raises(EngineError, match=rf"token id {bad} is out of range: the vocabulary has {eng.n_vocab}"):
            eng.step(bad)
        with pytest.raises(EngineError, match="out of range"):
            eng.prefill([3, bad])
        assert eng.n_past == 2


# --- concurrency -------------------------------------------------------------------


def second_context(eng: Engine) -> Engine:
    """Another context on ``eng``'s llama_model (an Engine has one of each), built through the C
    API. Close it before ``eng``: it frees only its context."""
    C = eng.C
    cp = C.llama_context_default_params()
    cp.n_ctx = eng.n_ctx
    cp.n_batch = C.llama_n_batch(eng.ctx)
    cp.n_ubatch = C.llama_n_ubatch(eng.ctx)
    cp.n_threads = cp.n_threads_batch = eng.n_threads
    cp.flash_attn_type = 1 if eng.flash_attn else 0
    cp.no_perf = True
    twin = copy.copy(eng)
    twin.ctx = C.llama_init_from_model(eng.model, cp)
    assert twin.ctx
    twin.model = None
    twin.n_past = 0
    return twin


@pytest.fixture(scope="module")
def two_mask_runs(model_path):
    """Tokens, two mask sequences and each one's logits from a context of its own, alone."""
    rng = np.random.default_rng(11)
    with Engine(model_path, n_ctx=256, n_threads=1) as eng:
        toks = eng.tokenize(ORACLE_TEXT)
        masks = [half_masks(rng, len(toks) - 5, eng.n_layer, eng.n_head, d) for d in (0.5, 0.3)]
    refs = []
    for m in masks:
        with Engine(model_path, n_ctx=256, n_threads=1) as eng:
            refs.append(teacher_forced_logits(eng, toks, 5, m))
    return toks, masks, refs


def interleaved(engines, toks, masks, prompt_len=5):
    """Step the engines in turn; each one's mask is set before any of them steps."""
    for eng in engines:
        eng.reset()
        eng.prefill(toks[:prompt_len])
        eng.set_sparse(True)
    outs = [[] for _ in engines]
    for i, tok in enumerate(toks[prompt_len:]):
        for eng, m in zip(engines, masks):
            eng.set_mask(m[i])
        for eng, out in zip(engines, outs):
            out.append(eng.step(tok))
    for eng in engines:
        eng.set_sparse(False)
    return [np.array(o) for o in outs]


def test_two_engines_interleaved_stay_independent(model_path, two_mask_runs):
    toks, masks, refs = two_mask_runs
    with Engine(model_path, n_ctx=256, n_threads=1) as a, Engine(model_path, n_ctx=256, n_threads=1) as b:
        out_a, out_b = interleaved([a, b], toks, masks)
    np.testing.assert_array_equal(out_a, refs[0])
    np.testing.assert_array_equal(out_b, refs[1])
    assert not np.array_equal(out_a, out_b)


def test_two_contexts_on_one_model_stay_independent(model_path, two_mask_runs):
    toks, masks, refs = two_mask_runs
    with Engine(model_path, n_ctx=256, n_threads=1) as a:
        b = second_context(a)
        try:
            out_a, out_b = interleaved([a, b], toks, masks)
        finally:
            b.close()
        assert a.sparse is False and a.layer_ops() == [7] * a.n_layer
    np.testing.assert_array_equal(out_a, refs[0])
    np.testing.assert_array_equal(out_b, refs[1])


def test_two_engines_decoding_in_parallel_threads(model_path, two_mask_runs):
    """ctypes releases the GIL during llama_decode: the two contexts really run at once."""
    toks, masks, refs = two_mask_runs
    engines = [Engine(model_path, n_ctx=256, n_threads=1) for _ in masks]
    results: list = [None, None]

    def run(i):
        try:
            results[i] = teacher_forced_logits(engines[i], toks, 5, masks[i])
        except BaseException as e:  # re-raised below
            results[i] = e

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads), "a decode thread hung"
    finally:
        for eng in engines:
            eng.close()
    for res, ref in zip(results, refs):
        if isinstance(res, BaseException):
            raise res
        np.testing.assert_array_equal(res, ref)
