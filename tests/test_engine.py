"""The patched engine on the default model: dense generation, and sparse decode against its
oracle (all heads: the dense tokens; a mask: dense attention with those heads zeroed)."""

import numpy as np
import pytest

from powerinfer_attn.predictors import predictor_file
from powerinfer_attn.engine.decode import Engine, EngineError
from powerinfer_attn.predictors.basic import AllHeads, MaskFile
from powerinfer_attn.predictors.specs import get_predictor
from powerinfer_attn.engine.reference import FilledHeads, LinearFilledHeads, ZeroedHeads

PROMPT = "The history of the Roman Empire begins with"
N_STEPS = 24


def test_dense_generation(engine):
    g = engine.generate("The capital of France is", 8)
    assert len(g.tokens) >= 1
    assert "Paris" in g.text
    assert g.decode_tok_s > 0


def test_all_heads_sparse_gives_dense_tokens(engine):
    dense = engine.generate(PROMPT, N_STEPS, stop_at_eog=False)
    pred = AllHeads()
    pred.bind(engine)
    sparse = engine.generate(PROMPT, N_STEPS, predictor=pred, stop_at_eog=False)
    assert sparse.tokens == dense.tokens
    assert sparse.masks is not None and len(sparse.masks) == N_STEPS - 1
    assert not engine.sparse, "generate must switch sparse off again"


def teacher_forced_logits(eng, tokens, prompt_len, masks=None):
    """Logits of each decode step fed with the given tokens; sparse with masks when given."""
    eng.reset()
    eng.prefill(tokens[:prompt_len])
    out = []
    eng.set_sparse(masks is not None)
    try:
        for i, tok in enumerate(tokens[prompt_len:]):
            if masks is not None:
                eng.set_mask(masks[i])
            out.append(eng.step(tok))
    finally:
        eng.set_sparse(False)
    return np.array(out)


def test_all_heads_logits_match_dense(engine):
    toks = engine.tokenize(PROMPT + " the founding of the city by Romulus and Remus, twin brothers")
    dense = teacher_forced_logits(engine, toks, 6)
    ones = np.ones((len(toks) - 6, engine.n_layer, engine.n_head), np.int32)
    sparse = teacher_forced_logits(engine, toks, 6, ones)
    np.testing.assert_allclose(sparse, dense, atol=2e-3 * np.abs(dense).max(), rtol=0)


def test_sparse_off_is_bit_identical_to_before(engine):
    """Switching sparse on and off again leaves the dense graph exactly as it was."""
    toks = engine.tokenize(PROMPT)
    a = teacher_forced_logits(engine, toks, 4)
    half = np.zeros((len(toks) - 4, engine.n_layer, engine.n_head), np.int32)
    half[:, :, ::2] = 1
    teacher_forced_logits(engine, toks, 4, half)
    b = teacher_forced_logits(engine, toks, 4)
    assert np.array_equal(a, b)


def test_sparse_min_ctx_runs_the_stock_graph_before_it_and_sparse_from_it(engine):
    """The switch is in the library: steps before the position are dense decode bit for bit,
    from it on the mask takes effect; changing the position is exact both ways."""
    toks = engine.tokenize(PROMPT + " the founding of the city by Romulus and Remus, twin brothers")
    prompt_len, switch = 4, 9
    dense = teacher_forced_logits(engine, toks, prompt_len)
    half = np.zeros((len(toks) - prompt_len, engine.n_layer, engine.n_head), np.int32)
    half[:, :, ::2] = 1
    sparse = teacher_forced_logits(engine, toks, prompt_len, half)
    try:
        engine.set_sparse_min_ctx(switch)
        both = teacher_forced_logits(engine, toks, prompt_len, half)
    finally:
        engine.set_sparse_min_ctx(0)
    k = switch - prompt_len  # steps decoded at positions below the switch
    assert np.array_equal(both[:k], dense[:k]) and not np.allclose(sparse[:k], dense[:k])
    assert not np.allclose(both[k:], dense[k:])
    # from the switch on the cache holds dense K/V of the earlier steps, so compare the first
    # sparse step with a run whose earlier steps were dense too
    assert np.array_equal(teacher_forced_logits(engine, toks, switch, half[k:])[0], both[k])
    assert np.array_equal(teacher_forced_logits(engine, toks, prompt_len), dense)  # dense as before
    with pytest.raises(ValueError):
        engine.set_sparse_min_ctx(-1)


def test_predicted_steps_below_sparse_min_ctx_count_as_dense(engine):
    switch = len(engine.tokenize(PROMPT)) + 3  # the first 3 decode steps on the stock graph
    engine.set_sparse_min_ctx(switch)
    try:
        before = dict(engine.graph_steps)
        pred = AllHeads()
        pred.bind(engine)
        g = engine.generate(PROMPT, 8, predictor=pred, stop_at_eog=False)
    finally:
        engine.set_sparse_min_ctx(0)
    steps = len(g.tokens) - 1  # the first token comes from the prefill
    assert steps == 7 and engine.graph_steps["dense"] - before["dense"] == 3
    assert engine.graph_steps["sparse"] - before["sparse"] == 4


def zeroed_dense_logits(model_path, tokens, prompt_len, masks, flash_attn=False, n_ctx=512, fill=None, linear=None):
    """The oracle: stock dense decode with inactive heads' outputs zeroed by a tensor hook
    (or, with ``fill`` [n_layer, n_head, d], replaced by those vectors, or with ``linear`` a
    ``HeadFill``, by its prediction)."""
    hook = ZeroedHeads(*masks.shape[1:]) if fill is None and linear is None else \
        FilledHeads(*masks.shape[1:], fill) if linear is None else LinearFilledHeads(*masks.shape[1:], linear)
    with Engine(model_path, n_ctx=n_ctx, n_threads=2, tensor_hook=hook, flash_attn=flash_attn) as ref_eng:
        ref_eng.prefill(tokens[:prompt_len])  # hook.mask is all ones: dense prefill
        out = []
        for i, tok in enumerate(tokens[prompt_len:]):
            hook.mask = masks[i]
            out.append(ref_eng.step(tok))
    assert hook.seen >= len(out) * masks.shape[1]
    return np.array(out)


def random_masks(rng, steps, n_layer, n_head, density):
    masks = (rng.random((steps, n_layer, n_head)) < density).astype(np.int32)
    masks[:, 3, :] = 0  # a layer with no active head: its attention contributes nothing
    return masks


def rel_diff(a, b):
    """Per step: max |a - b| over the vocabulary, relative to max |b|."""
    return np.abs(a - b).max(axis=1) / np.abs(b).max(axis=1)


ORACLE_TEXT = PROMPT + " a small settlement on the banks of the Tiber river in central Italy"


def check_masked_matches_zeroed_dense_f32(f32_model_path, seed, density, **engine_kw):
    """Random masks on the float model against dense attention with the masked heads zeroed:
    equal to float rounding, and far from dense (``engine_kw``: where the layers run)."""
    with Engine(f32_model_path, n_ctx=512, n_threads=2, **engine_kw) as eng:
        toks = eng.tokenize(ORACLE_TEXT)
        masks = random_masks(np.random.default_rng(seed), len(toks) - 5, eng.n_layer, eng.n_head, density)
        sparse = teacher_forced_logits(eng, toks, 5, masks)
        dense = teacher_forced_logits(eng, toks, 5)
    ref = zeroed_dense_logits(f32_model_path, toks, 5, masks)
    assert rel_diff(sparse, ref).max() < 5e-3
    assert np.array_equal(sparse.argmax(1), ref.argmax(1))
    # the mask matters: without it the logits are far away
    assert rel_diff(dense, ref).min() > 20 * rel_diff(sparse, ref).max()


@pytest.mark.parametrize("seed,density", [(0, 0.5), (1, 0.25), (2, 0.9)])
def test_masked_sparse_matches_zeroed_dense_f32(f32_model_path, seed, density):
    """On the float model (the default model's weights dequantized) the only differences are
    float rounding: wo's active columns are summed per run of heads instead of in one pass."""
    check_masked_matches_zeroed_dense_f32(f32_model_path, seed, density)


@pytest.mark.parametrize("seed,density", [(0, 0.5), (1, 0.25)])
def test_mean_fill_matches_filled_dense_f32(tmp_path, f32_model_path, seed, density):
    """Mean fill adds, after wo, mean [n_head, n_embd] x (1 - mask): the same as dense decode
    whose inactive heads output the vector m_h whose image through wo is that mean."""
    from powerinfer_attn.predictors.importance import load_wo

    rng = np.random.default_rng(seed)
    with Engine(f32_model_path, n_ctx=512, n_threads=2) as eng:
        L, H, E = eng.n_layer, eng.n_head, eng.n_embd
        d = E // H
        fill = (rng.normal(size=(L, H, d)) * 0.3).astype(np.float32)
        wo = load_wo(f32_model_path, L)
        means = [np.stack([wo[il][:, h * d:(h + 1) * d] @ fill[il, h] for h in range(H)], axis=1) for il in range(L)]
        zeros = [np.zeros((H, E), np.float32)] * L
        predictor_file.write_predictor(tmp_path / "m.gguf", zeros, [np.zeros(H, np.float32)] * L, f32_model_path.name,
                              "threshold", 0.0, {}, means=means)
        toks = eng.tokenize(ORACLE_TEXT)
        masks = random_masks(rng, len(toks) - 5, L, H, density)
        eng.load_head_predictor(tmp_path / "m.gguf")
        eng.set_head_fill("mean")  # the masks still come from Python: the predictor is not switched on
        sparse = teacher_forced_logits(eng, toks, 5, masks)
        eng.set_head_fill("zero")
        zero_filled = teacher_forced_logits(eng, toks, 5, masks)
    ref = zeroed_dense_logits(f32_model_path, toks, 5, masks, fill=fill)
    assert rel_diff(sparse, ref).max() < 5e-3
    # the same top token wherever the oracle's top two are further apart than the rounding
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * np.abs(sparse - ref).max(axis=1)
    assert clear.mean() > 0.5 and np.array_equal(sparse.argmax(1)[clear], ref.argmax(1)[clear])
    # the fill matters, and switching it off gives back zero fill
    assert rel_diff(zero_filled, ref).min() > 20 * rel_diff(sparse, ref).max()
    assert rel_diff(zero_filled, zeroed_dense_logits(f32_model_path, toks, 5, masks)).max() < 5e-3


@pytest.mark.parametrize("seed,density", [(0, 0.5), (1, 0.25)])
def test_linear_fill_matches_filled_dense_f32(tmp_path, f32_model_path, seed, density):
    """Linear fill puts w x + b (x: the layer's attn_norm output) in the skipped heads' outputs
    before a dense wo: the same as dense decode whose inactive heads output that."""
    from powerinfer_attn.predictors.fill import HeadFill

    rng = np.random.default_rng(seed)
    with Engine(f32_model_path, n_ctx=512, n_threads=2) as eng:
        L, H, E = eng.n_layer, eng.n_head, eng.n_embd
        # F16 in the file: draw values that F16 holds exactly, so the oracle uses the same map
        fill = HeadFill(w=(rng.normal(size=(L, E, E)) * 0.01).astype(np.float16).astype(np.float32),
                        b=(rng.normal(size=(L, E)) * 0.3).astype(np.float32))
        predictor_file.write_predictor(tmp_path / "lin.gguf", [np.zeros((H, E), np.float32)] * L, [np.zeros(H, np.float32)] * L,
                              f32_model_path.name, "threshold", 0.0, {}, linear=(fill.w, fill.b))
        toks = eng.tokenize(ORACLE_TEXT)
        masks = random_masks(rng, len(toks) - 5, L, H, density)
        eng.load_head_predictor(tmp_path / "lin.gguf")
        eng.set_head_fill("linear")
        sparse = teacher_forced_logits(eng, toks, 5, masks)
        all_heads = teacher_forced_logits(eng, toks, 5, np.ones_like(masks))
        eng.set_head_fill("zero")
        dense = teacher_forced_logits(eng, toks, 5)
    # ggml multiplies an F16 matrix by x rounded to F16: so does the reference
    fill.outputs = lambda il, x: x.astype(np.float16).astype(np.float32) @ fill.w[il].T + fill.b[il]
    ref = zeroed_dense_logits(f32_model_path, toks, 5, masks, linear=fill)
    assert rel_diff(sparse, ref).max() < 5e-3
    zeroed = zeroed_dense_logits(f32_model_path, toks, 5, masks)
    assert rel_diff(zeroed, ref).min() > 10 * rel_diff(sparse, ref).max()
    # every head active: nothing to fill, dense logits
    assert rel_diff(all_heads, dense).max() < 5e-3


def test_mean_fill_errors(tmp_path, model_path, engine):
    from powerinfer_attn.engine.decode import EngineError

    with Engine(model_path, n_ctx=64, n_threads=1) as eng:
        with pytest.raises(EngineError, match="needs a head predictor"):
            eng.set_head_fill("mean")
        with pytest.raises(ValueError, match="unknown fill"):
            eng.set_head_fill("half")
        L, H, E = eng.n_layer, eng.n_head, eng.n_embd
        ws, bs = [np.zeros((H, E), np.float32)] * L, [np.zeros(H, np.float32)] * L
        predictor_file.write_predictor(tmp_path / "plain.gguf", ws, bs, model_path.name, "threshold", 0.0, {})
        eng.load_head_predictor(tmp_path / "plain.gguf")
        for kind in ("mean", "linear"):
            with pytest.raises(EngineError, match=f"holds no {kind} fill"):
                eng.set_head_fill(kind)
        eng.set_head_fill("zero")
        bad = [np.zeros((E, H + 1), np.float32)] * L
        predictor_file.write_predictor(tmp_path / "bad.gguf", ws, bs, model_path.name, "threshold", 0.0, {}, means=bad)
        with pytest.raises(EngineError, match="returned -1"):
            eng.load_head_predictor(tmp_path / "bad.gguf")
        badlin = (np.zeros((L, E + 1, E), np.float32), np.zeros((L, E + 1), np.float32))  # not whole heads
        predictor_file.write_predictor(tmp_path / "badlin.gguf", ws, bs, model_path.name, "threshold", 0.0, {}, linear=badlin)
        with pytest.raises(EngineError, match="returned -1"):
            eng.load_head_predictor(tmp_path / "badlin.gguf")


@pytest.mark.parametrize("seed,density", [(0, 0.5), (2, 0.9)])
def test_masked_sparse_tracks_zeroed_dense_q4_1(model_path, engine, seed, density):
    """On the Q4_1 model activations are quantized to Q8_1 before every dot product, so a
    rounding-sized difference can flip a quantization step and grow through the layers;
    the sparse path must still follow the oracle far more closely than dense does."""
    toks = engine.tokenize(ORACLE_TEXT)
    masks = random_masks(np.random.default_rng(seed), len(toks) - 5, engine.n_layer, engine.n_head, density)
    sparse = teacher_forced_logits(engine, toks, 5, masks)
    dense = teacher_forced_logits(engine, toks, 5)
    ref = zeroed_dense_logits(model_path, toks, 5, masks)
    assert (sparse.argmax(1) == ref.argmax(1)).mean() >= 0.85
    assert np.median(rel_diff(sparse, ref)) < 0.25 * np.median(rel_diff(dense, ref))


@pytest.mark.parametrize("long_context", [False, True], ids=["row-path", "split-kv-path"])
def test_flash_attention_sparse(f32_model_path, long_context):
    """Flash attention skips inactive heads in its per-head loop; from 512 cached tokens on,
    decode takes the split-KV path (the grouped kernel with a head mask), where skipped heads'
    partials must carry no mass."""
    text = ORACLE_TEXT + (" The city grew, conquered its neighbours and built roads." * 50 if long_context else "")
    with Engine(f32_model_path, n_ctx=1024, n_threads=2, flash_attn=True) as eng:
        toks = eng.tokenize(text)
        prompt_len = len(toks) - 8
        assert (prompt_len >= 512) == long_context
        ones = np.ones((8, eng.n_layer, eng.n_head), np.int32)
        dense = teacher_forced_logits(eng, toks, prompt_len)
        all_heads = teacher_forced_logits(eng, toks, prompt_len, ones)
        masks = random_masks(np.random.default_rng(5), 8, eng.n_layer, eng.n_head, 0.5)
        sparse = teacher_forced_logits(eng, toks, prompt_len, masks)
    if long_context:
        # the split-KV path with a head mask runs the grouped decode kernel, which accumulates
        # in F32 where stock flash attention accumulates softmax*V in F16: with every head the
        # two differ by that rounding, and the grouped one is the closer to exact attention
        # (the path without flash attention, all F32 in this model)
        exact = zeroed_dense_logits(f32_model_path, toks, prompt_len, ones, n_ctx=1024)
        assert (all_heads.argmax(1) == dense.argmax(1)).all()
        assert rel_diff(all_heads, exact).max() < rel_diff(dense, exact).max()
        ref = zeroed_dense_logits(f32_model_path, toks, prompt_len, masks, n_ctx=1024)
    else:
        np.testing.assert_allclose(all_heads, dense, atol=1e-4 * np.abs(dense).max(), rtol=0)
        ref = zeroed_dense_logits(f32_model_path, toks, prompt_len, masks, flash_attn=True, n_ctx=1024)
    # flash attention accumulates V*softmax in F16 on the CPU, which amplifies rounding differences
    assert rel_diff(sparse, ref).max() < 2e-2
    assert rel_diff(dense, ref).min() > 20 * rel_diff(sparse, ref).max()


def test_mask_validation(engine):
    with pytest.raises(ValueError, match="shape"):
        engine.set_mask(np.ones((engine.n_layer, engine.n_head + 1), np.int32))
    with pytest.raises(ValueError, match="0 or 1"):
        engine.set_mask(np.full((engine.n_layer, engine.n_head), 2, np.int32))
    with pytest.raises(ValueError, match="integer or bool"):
        engine.set_mask(np.ones((engine.n_layer, engine.n_head), np.float32))
    engine.set_mask(np.ones((engine.n_layer, engine.n_head), bool))


def test_c_api_rejects_bad_masks(engine):
    """The C API validates on its own (size and values), returning error codes."""
    import ctypes

    C = engine.C
    bad = (ctypes.c_int32 * (engine.n_layer * engine.n_head))(*([1] * (engine.n_layer * engine.n_head)))
    assert C.llama_set_activated_heads(engine.ctx, bad, engine.n_layer * engine.n_head - 1) == -2
    bad[5] = 7
    assert C.llama_set_activated_heads(engine.ctx, bad, engine.n_layer * engine.n_head) == -3
    assert C.llama_set_activated_heads(engine.ctx, None, 0) == -1


def test_layer_ops_report_sparse_parts(engine):
    # Q4_1 weights, head width 64: wq rows, attention and wo columns all run sparse
    assert engine.layer_ops() == [7] * engine.n_layer


def test_mask_file_predictor(tmp_path, engine):
    with pytest.raises(ValueError, match="unknown predictor"):
        get_predictor("nope", engine.model_path)
    p = tmp_path / "m.npy"
    np.save(p, np.ones((2, engine.n_layer, engine.n_head), np.int8))
    mf = get_predictor(f"mask-file:{p}", engine.model_path)
    assert isinstance(mf, MaskFile)
    mf.bind(engine)
    g = engine.generate(PROMPT, 3, predictor=mf, stop_at_eog=False)
    assert len(g.masks) == 2
    with pytest.raises(ValueError, match="2 steps"):
        engine.generate(PROMPT, 5, predictor=mf, stop_at_eog=False)
    np.save(p, np.ones((2, engine.n_layer, 3), np.int8))
    with pytest.raises(ValueError, match="shape"):
        get_predictor(f"mask-file:{p}", engine.model_path).bind(engine)


def test_context_overflow_is_an_error(engine):
    with pytest.raises(EngineError, match="context full"):
        engine.generate([1] * (engine.n_ctx + 1), 4)
    with pytest.raises(EngineError, match="empty"):
        engine.generate([], 4)


# --- sequence state: one dense prefill shared by several engines --------------------------


def test_sparse_after_copied_prefill_matches_own_prefill(engine, model_path):
    """A sparse engine loaded with a dense engine's saved prefill decodes exactly as after its own
    prefill: same logits, masked and dense steps alike."""
    toks = engine.tokenize(ORACLE_TEXT * 4)
    prompt, rest = toks[:40], toks[40:56]
    rng = np.random.default_rng(3)
    masks = (rng.random((len(rest), engine.n_layer, engine.n_head)) < 0.6).astype(np.int32)
    masks[:, :, 0] = 1
    own = teacher_forced_logits(engine, toks[:56], 40, masks)
    with Engine(model_path, n_ctx=512, n_threads=2) as source, Engine(model_path, n_ctx=512, n_threads=2) as dest:
        source.prefill(prompt)
        state = source.save_state()
        dest.prefill(engine.tokenize("something else entirely, to be replaced"))
        dest.load_state(state)
        assert dest.n_past == 40
        dest.set_sparse(True)
        copied = []
        for i, t in enumerate(rest):
            dest.set_mask(masks[i])
            copied.append(dest.step(t))
        dest.set_sparse(False)
        np.testing.assert_array_equal(np.array(copied), own)
        # and dense decode after the copy equals the source's own dense decode
        dest.load_state(state)
        np.testing.assert_array_equal(dest.step(rest[0]), source.step(rest[0]))


def test_load_state_refuses_what_does_not_fit(engine, model_path):
    engine.reset()
    engine.prefill(engine.tokenize(ORACLE_TEXT * 30)[:400])
    state = engine.save_state()
    with Engine(model_path, n_ctx=256, n_threads=1) as small:
        assert small.n_ctx < 400
        with pytest.raises(EngineError, match="does not fit n_ctx"):
            small.load_state(state)
    with Engine(model_path, n_ctx=512, n_threads=1, flash_attn=True) as fa:
        with pytest.raises(EngineError, match="flash-attention"):
            fa.load_state(state)


def test_generate_streams_and_samples(engine):
    from powerinfer_attn.engine.sampling import Sampler

    seen = []
    g = engine.generate("The capital of France is", 8, on_token=seen.append)
    assert seen == [t for t in g.tokens if not engine.is_eog(t)]
    a = engine.generate("Once upon a time", 12, sample=Sampler(temp=0.9, seed=5), stop_at_eog=False)
    b = engine.generate("Once upon a time", 12, sample=Sampler(temp=0.9, seed=5), stop_at_eog=False)
    greedy = engine.generate("Once upon a time", 12, stop_at_eog=False)
    assert a.tokens == b.tokens and a.tokens != greedy.tokens
    prompt = engine.chat_prompt([{"role": "user", "content": "Hello"}])
    assert "Hello" in prompt and prompt.index("Hello") > 0  # wrapped in the GGUF's template
