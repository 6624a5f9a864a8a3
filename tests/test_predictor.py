"""The trained head predictor: data collection, training, the GGUF sidecar, and the in-graph
selection against its numpy reference."""

import json
import re
import warnings

import numpy as np
import pytest

from powerinfer_attn.training import collect
from powerinfer_attn.evaluation import compare
from powerinfer_attn.predictors import predictor_file
from powerinfer_attn.training import train
from powerinfer_attn.engine.decode import Engine, EngineError, TensorHook
from powerinfer_attn.predictors.importance import mass_mask, topk_mask
from powerinfer_attn.predictors.trained import TrainedHeads
from powerinfer_attn.predictors.specs import get_predictor
from powerinfer_attn.engine.text import split_articles, training_articles

# --- pure Python ---------------------------------------------------------------------


def test_split_articles_and_training_half():
    text = " = A = \n\n one two \n = = Sub = = \n three \n = B = \n four \n = C = \n" + "x" * 100 + "\n"
    arts = split_articles(text)
    assert [a[2] for a in arts] == ["A", "B", "C"]  # sub-headings do not split
    assert arts[0][0] == 0 and arts[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(arts, arts[1:]))
    assert [a[2] for a in training_articles(text, 0.45)] == ["A", "B"]


def test_ridge_recovers_a_linear_map():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 12)).astype(np.float32)
    w_true = rng.normal(size=(3, 12)).astype(np.float32)
    y = x @ w_true.T + np.array([1.0, -2.0, 0.5], np.float32)
    w, b = train.ridge(x, y, 1e-3)
    np.testing.assert_allclose(w, w_true, atol=1e-3)
    np.testing.assert_allclose(b, [1.0, -2.0, 0.5], atol=1e-3)


def test_select_rules():
    logits = np.array([[0.5, -1.0, 2.0, 0.1], [-5.0, -6.0, -7.0, -8.0]], np.float32)
    np.testing.assert_array_equal(train.select("threshold", logits, 0.2), [[1, 0, 1, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(train.select("topk", logits, 2), topk_mask(logits, 2))
    np.testing.assert_array_equal(train.select("mass", logits[:1], 0.8), mass_mask(np.maximum(logits[:1], 0), 0.8))
    np.testing.assert_array_equal(train.select("mass", logits[1:], 0.8), [[1, 0, 0, 0]])  # all clipped: top head
    with pytest.raises(ValueError, match="unknown rule"):
        train.select("best", logits, 0)


def _fake_data(dirpath, n_layer=2, n_head=3, n_embd=8, chunks=6, batch=64, seed=0, means=False):
    """Importance exp(0.5 w.x) per head; with ``means`` the fills' deviations are exp(-0.5 w.x)
    (mean) and exp(0.25 w.x) (linear), so a predictor trained on another one ranks heads otherwise."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(n_layer, n_head, n_embd))
    for c in range(chunks):
        x = rng.normal(size=(n_layer, batch, n_embd)).astype(np.float16)
        wx = np.einsum("lhe,lte->tlh", w, x.astype(np.float64))
        np.save(dirpath / f"x-{c:05d}.npy", x)
        np.save(dirpath / f"imp-{c:05d}.npy", np.exp(wx * 0.5).astype(np.float32))
        np.save(dirpath / f"resid-{c:05d}.npy", np.full((batch, n_layer), 10.0, np.float32))
        if means:
            np.save(dirpath / f"dev-mean-{c:05d}.npy", np.exp(-wx * 0.5).astype(np.float32))
            np.save(dirpath / f"dev-linear-{c:05d}.npy", np.exp(wx * 0.25).astype(np.float32))
    if means:
        from powerinfer_attn.predictors.fill import HeadFill

        d = 4
        HeadFill(mean_post=rng.normal(size=(n_layer, n_head, n_embd)).astype(np.float32),
                 w=rng.normal(size=(n_layer, n_head * d, n_embd)).astype(np.float16).astype(np.float32),
                 b=rng.normal(size=(n_layer, n_head * d)).astype(np.float32)).save(dirpath / "fill.npz")
    meta = {"model_name": "fake.gguf", "articles": "fake", "tokens": chunks * batch, "chunks": chunks,
            "batch": batch, "n_layer": n_layer, "n_head": n_head, "n_embd": n_embd}
    (dirpath / "meta.json").write_text(json.dumps(meta))


def test_train_fits_held_out_data_and_writes_the_sidecar(tmp_path):
    _fake_data(tmp_path)
    out = tmp_path / "pred.gguf"
    s = train.train(tmp_path, out, density=0.5, label="residual")
    # log(importance / residual) is exactly linear in x here, so the held-out fit is nearly perfect
    assert s["heldout_r2_mean"] > 0.99
    assert abs(s["heldout_density"] - 0.5) < 0.05
    meta = predictor_file.read_metadata(out)
    assert meta["kind"] == "linear" and meta["n_layer"] == 2 and meta["n_head"] == 3 and meta["n_embd"] == 8
    assert meta["rule"] == "threshold" and meta["rule_value"] == pytest.approx(s["rule_value"], rel=1e-6)
    assert meta["training"]["heldout_density"] == s["heldout_density"]
    from gguf import GGUFReader

    shapes = {t.name: tuple(int(v) for v in t.shape) for t in GGUFReader(str(out)).tensors}
    assert shapes["blk.1.head_pred.weight"] == (8, 3)  # ggml order: ne0 = n_embd
    assert shapes["blk.1.head_pred.bias"] == (3,)


@pytest.mark.parametrize("rule,label", [("threshold", "share"), ("threshold", "level"), ("mass", "residual"),
                                        ("topk", "residual")])
def test_train_other_rules_reach_the_density(tmp_path, rule, label):
    _fake_data(tmp_path)
    s = train.train(tmp_path, tmp_path / "p.gguf", rule=rule, density=2 / 3, label=label)
    assert s["rule"] == rule and abs(s["heldout_density"] - 2 / 3) < 0.1


def test_density_spec_uses_the_held_out_table(tmp_path):
    _fake_data(tmp_path)
    s = train.train(tmp_path, tmp_path / "p.gguf", density=0.5, label="residual")
    p = get_predictor(f"trained:{tmp_path / 'p.gguf'}:density=0.6", "m.gguf")
    assert p.rule == "threshold" and p.value == pytest.approx(s["value_for_density"]["0.60"])
    assert s["value_for_density"]["0.60"] < s["rule_value"]  # more heads: a lower threshold
    with pytest.raises(ValueError, match="no held-out value for density 0.62"):
        get_predictor(f"trained:{tmp_path / 'p.gguf'}:density=0.62", "m.gguf")


def test_bench_times_the_trained_predictor(tmp_path, model_path, engine):
    from powerinfer_attn.evaluation import bench

    _random_predictor(tmp_path / "p.gguf", model_path, engine, value=0.5)
    res = bench.run(model_path, [64], [1.0], threads=2, reps=3, flash_attn="off", profile=False,
                    trained=f"trained:{tmp_path / 'p.gguf'}", progress=lambda m: None)
    row = next(r for r in res["rows"] if r["mode"] == "trained")
    assert 0.0 < row["kept"] < 1.0 and row["ratio"] > 0 and row["tok_s"] > 0
    assert "trained" in bench.format_table(res)
    with pytest.raises(ValueError, match="takes a trained"):
        bench.run(model_path, [64], [1.0], threads=2, reps=3, flash_attn="off", profile=False,
                  trained="all", progress=lambda m: None)


def test_bench_engine_runs_the_predictors_fill(tmp_path, model_path, engine):
    """bench times the trained predictor with the fill its file holds, not without it."""
    from powerinfer_attn.evaluation import bench

    L, H, E = engine.n_layer, engine.n_head, engine.n_embd
    rng = np.random.default_rng(0)
    ws, bs = _random_predictor(tmp_path / "r.gguf", model_path, engine, value=0.5)
    lin = ((rng.normal(size=(L, E, E)) * 0.01).astype(np.float32), (rng.normal(size=(L, E)) * 0.3).astype(np.float32))
    predictor_file.write_predictor(tmp_path / "p.gguf", ws, bs, model_path.name, "threshold", 0.5, {}, linear=lin)
    toks = engine.tokenize("The river runs to the sea, and the sea")
    eng = bench.stack_trained(model_path, f"trained:{tmp_path / 'p.gguf'}", 64, 2, False, True)
    try:
        eng.prefill(toks[:-1])
        eng.set_sparse(True)
        filled = eng.step(toks[-1])
        eng.rollback(len(toks) - 1)
        eng.set_head_fill("zero")
        plain = eng.step(toks[-1])
    finally:
        eng.close()
    assert np.abs(filled - plain).max() > 1e-2


@pytest.mark.parametrize("fill", ["linear", "mean"])
def test_fill_training_uses_deviations_and_stores_the_fill(tmp_path, fill):
    from powerinfer_attn.predictors.fill import HeadFill

    _fake_data(tmp_path, means=True)
    out = tmp_path / "p.gguf"
    s = train.train(tmp_path, out, density=0.5, fill=None if fill == "linear" else fill)  # linear: the default
    assert s["fill"] == fill and predictor_file.read_metadata(out)["fill"] == fill
    kind, stored = predictor_file.read_fill(out)
    want = HeadFill.load(tmp_path / "fill.npz")
    assert kind == fill
    if fill == "mean":
        np.testing.assert_array_equal(stored.mean_post, want.mean_post)
    else:
        np.testing.assert_array_equal(stored.w, want.w)  # F16 in the file; these values are exact in F16
        np.testing.assert_array_equal(stored.b, want.b)
    x, dev, _ = collect.load_layer(tmp_path, 0, fill)
    w, b = _read_layer(out, 0)
    # the logits follow log(deviation share) under this fill, not another fill's
    logits = x @ w.T + b
    assert np.corrcoef(logits[:, 0] - logits[:, 1], np.log(dev[:, 0] / dev[:, 1]))[0, 1] > 0.9
    z = train.train(tmp_path, tmp_path / "z.gguf", density=0.5, fill="zero")
    assert z["fill"] == "zero" and predictor_file.read_fill(tmp_path / "z.gguf")[0] == "zero"
    p = get_predictor(f"trained:{out}:density=0.6", "m.gguf")
    assert p.fill == fill and p.name.endswith(f"+{fill}")
    p = get_predictor(f"trained:{out}:fill=zero:topk=2", "m.gguf")
    assert p.fill == "zero" and p.rule == "topk" and "+" not in p.name
    with pytest.raises(ValueError, match="trained with zero fill"):
        get_predictor(f"trained:{tmp_path / 'z.gguf'}:fill={fill}", "m.gguf")
    with pytest.raises(ValueError, match="unknown fill"):
        get_predictor(f"trained:{out}:fill=half", "m.gguf")
    with pytest.raises(ValueError, match="at most one rule"):
        get_predictor(f"trained:{out}:topk=2:mass=0.5", "m.gguf")
    assert compare.family(f"oracle:0.8+{fill}") == f"oracle+{fill}" and compare.family(p.name) == f"trained:{out.name}"
    with pytest.raises(ValueError, match="one fill"):
        predictor_file.write_predictor(tmp_path / "two.gguf", [w], [b], "m.gguf", "threshold", 0.0, {},
                              means=[np.zeros((8, 3), np.float32)], linear=(want.w, want.b))


def _read_layer(path, il):
    from gguf import GGUFReader

    ts = {t.name: np.asarray(t.data, np.float32) for t in GGUFReader(str(path)).tensors}
    return ts[f"blk.{il}.head_pred.weight"], ts[f"blk.{il}.head_pred.bias"]


def test_train_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="collect"):
        train.train(tmp_path, tmp_path / "p.gguf")
    _fake_data(tmp_path, chunks=1, batch=8)
    with pytest.raises(ValueError, match="too little data"):
        train.train(tmp_path, tmp_path / "p.gguf")
    with pytest.raises(ValueError, match="unknown label"):
        train.train(tmp_path, tmp_path / "p.gguf", label="best")
    _fake_data(tmp_path)
    with pytest.raises(FileNotFoundError, match="no data for mean fill"):
        train.train(tmp_path, tmp_path / "p.gguf", fill="mean")
    with pytest.raises(ValueError, match="unknown fill"):
        train.train(tmp_path, tmp_path / "p.gguf", fill="half")


def test_trained_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        get_predictor(f"trained:{tmp_path / 'none.gguf'}", "m.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(ValueError, match="not a GGUF head predictor"):
        get_predictor(f"trained:{bad}", "m.gguf")
    _fake_data(tmp_path)
    train.train(tmp_path, tmp_path / "p.gguf", density=0.5)
    with pytest.raises(ValueError, match="threshold=V"):
        get_predictor(f"trained:{tmp_path / 'p.gguf'}:best=3", "m.gguf")
    p = get_predictor(f"trained:{tmp_path / 'p.gguf'}:topk=2", "m.gguf")
    assert isinstance(p, TrainedHeads) and p.rule == "topk" and p.value == 2


# --- against the built engine ----------------------------------------------------------


def _random_predictor(path, model_path, eng, value=0.0, rule="threshold", scale=0.05, seed=0, fill="zero",
                      head_dim=None):
    """A random predictor file for ``eng``'s model; with ``fill`` mean or linear (heads of width
    ``head_dim``), random means or a random linear map as well."""
    rng = np.random.default_rng(seed)
    ws = [(rng.normal(size=(eng.n_head, eng.n_embd)) * scale).astype(np.float32) for _ in range(eng.n_layer)]
    bs = [rng.normal(size=eng.n_head).astype(np.float32) for _ in range(eng.n_layer)]
    means = linear = None
    if fill == "mean":
        means = [(rng.normal(size=(eng.n_embd, eng.n_head)) * 0.1).astype(np.float32) for _ in range(eng.n_layer)]
    elif fill == "linear":
        n_out = eng.n_head * head_dim
        linear = ((rng.normal(size=(eng.n_layer, n_out, eng.n_embd)) * 0.05).astype(np.float32),
                  (rng.normal(size=(eng.n_layer, n_out)) * 0.1).astype(np.float32))
    predictor_file.write_predictor(path, ws, bs, model_path.name, rule, value, {"note": "random, for tests"},
                                   means=means, linear=linear)
    return ws, bs


class _Graph(TensorHook):
    def __init__(self):
        self.t = {}

    def wants(self, name):
        return re.match(r"^(attn_norm|head_logits|head_mask)-\d+$", name) is not None

    def __call__(self, name, data):
        self.t[name] = data.copy()


@pytest.mark.parametrize("rule,value", [("threshold", 0.3), ("topk", 4), ("mass", 0.7)])
def test_in_graph_predictor_matches_numpy(tmp_path, model_path, rule, value):
    g = _Graph()
    with Engine(model_path, n_ctx=128, n_threads=2, tensor_hook=g) as eng:
        ws, bs = _random_predictor(tmp_path / "p.gguf", model_path, eng)
        toks = eng.tokenize("The river runs to the sea, and the sea")
        eng.prefill(toks[:-1])
        eng.load_head_predictor(tmp_path / "p.gguf")
        eng.set_head_rule(rule, value)
        eng.set_sparse(True)
        eng.use_head_predictor(True)
        g.t.clear()
        eng.step(toks[-1])
        for il in range(eng.n_layer):
            x = g.t[f"attn_norm-{il}"].reshape(-1)
            logits = g.t[f"head_logits-{il}"].reshape(-1)
            np.testing.assert_allclose(logits, ws[il] @ x + bs[il], rtol=1e-4, atol=1e-4)
            mask = g.t[f"head_mask-{il}"].reshape(-1)
            np.testing.assert_array_equal(mask, train.select(rule, logits[None], value)[0])


def test_density_control_matches_numpy_and_holds_the_target(tmp_path, model_path):
    """With density control the threshold moves by gain * (share kept - target) after every
    layer: the masks match that controller run in numpy on the graph's own logits, and the mean
    density reaches the targets' mean even though the fixed threshold keeps far more heads (one
    offset for all layers: each layer keeps what its logits say at that offset)."""
    g = _Graph()
    gain = 0.1
    with Engine(model_path, n_ctx=256, n_threads=2, tensor_hook=g) as eng:
        _random_predictor(tmp_path / "p.gguf", model_path, eng)
        targets = np.full(eng.n_layer, 0.4, np.float32)
        targets[::2] = 0.6  # per-layer targets, mean 0.5
        toks = eng.tokenize("The river runs to the sea, and the sea to the rain, and the rain " * 6)
        eng.prefill(toks[:8])
        eng.load_head_predictor(tmp_path / "p.gguf")
        eng.set_head_rule("threshold", -0.5)
        eng.set_head_density(targets, gain)
        eng.set_sparse(True)
        eng.use_head_predictor(True)
        offset, fixed, kept, masks = np.float32(0.0), [], [], []
        for t in toks[8:68]:
            g.t.clear()
            eng.step(t)
            for il in range(eng.n_layer):
                logits = g.t[f"head_logits-{il}"].reshape(-1)
                mask = g.t[f"head_mask-{il}"].reshape(-1)
                want = train.select("threshold", logits[None], -0.5 + float(offset))[0]
                # float rounding of the offset may flip a head sitting right on the threshold
                close = np.abs(logits - (-0.5 + offset)) < 1e-4
                np.testing.assert_array_equal(mask[~close], want[~close])
                offset = np.float32(offset + np.float32(gain) * (np.float32(mask.sum()) / eng.n_head - targets[il]))
                fixed.append(train.select("threshold", logits[None], -0.5)[0].mean())
                kept.append(mask.mean())
            masks.append([g.t[f"head_mask-{il}"].reshape(-1) for il in range(eng.n_layer)])
        late = np.array(masks[-30:], np.float64)
        assert np.mean(fixed) > 0.65  # the fixed threshold alone keeps far more
        assert abs(late.mean() - 0.5) < 0.04
        # off again: the fixed threshold, offset back at 0
        eng.set_head_density(None)
        g.t.clear()
        eng.step(toks[68])
        logits = g.t["head_logits-0"].reshape(-1)
        np.testing.assert_array_equal(g.t["head_mask-0"].reshape(-1), train.select("threshold", logits[None], -0.5)[0])
        eng.set_head_rule("topk", 3)
        with pytest.raises(EngineError, match="threshold rule"):
            eng.set_head_density(targets, gain)
        with pytest.raises(ValueError, match="targets"):
            eng.set_head_density(targets[:3], gain)


def test_restart_starts_density_control_anew(tmp_path, model_path):
    """After ``restart`` a text decodes with the masks it gets in a fresh engine, whatever the
    controller did on the text before (what a server's requests and eval's samples rely on)."""
    g = _Graph()
    text_a = "The river runs to the sea, and the sea to the rain. " * 4
    text_b = "It was the best of times, it was the worst of times. " * 3

    def masks_of(eng, text, n=12):
        toks = eng.tokenize(text)
        eng.reset()
        eng.prefill(toks[:8])
        out = []
        for t in toks[8:8 + n]:
            g.t.clear()
            eng.step(t)
            out.append(np.stack([g.t[f"head_mask-{il}"].reshape(-1) for il in range(eng.n_layer)]))
        return np.array(out)

    with Engine(model_path, n_ctx=256, n_threads=2, tensor_hook=g) as eng:
        _random_predictor(tmp_path / "p.gguf", model_path, eng)
        targets = np.full(eng.n_layer, 0.5, np.float32)
        pred = TrainedHeads(tmp_path / "p.gguf", "threshold", -0.5)
        pred.targets, pred.gain = list(targets), 0.1
        eng.load_head_predictor(tmp_path / "p.gguf")
        eng.set_head_rule("threshold", -0.5)
        pred.restart(eng)
        eng.set_sparse(True)
        eng.use_head_predictor(True)
        fresh_b = masks_of(eng, text_b)
        masks_of(eng, text_a, 40)  # moves the controller's offset
        after_a = masks_of(eng, text_b)
        pred.restart(eng)
        restarted = masks_of(eng, text_b)
    np.testing.assert_array_equal(restarted, fresh_b)
    assert not np.array_equal(after_a, fresh_b)  # without the restart the history shows


def test_density_rule_sets_control_targets(tmp_path):
    """train records what each layer keeps at every density of its grid; trained:...:density=D
    turns density control on with those targets (gain=0: the fixed held-out threshold)."""
    from powerinfer_attn.predictors.trained import DENSITY_GAIN

    _fake_data(tmp_path)
    s = train.train(tmp_path, tmp_path / "p.gguf", density=0.5)
    table = s["layer_density_for_density"]
    assert set(table) == set(s["value_for_density"]) and len(table["0.50"]) == 2
    assert np.mean(table["0.50"]) == pytest.approx(0.5, abs=0.1)
    pred = TrainedHeads(tmp_path / "p.gguf", "density", 0.5)
    assert pred.rule == "threshold" and pred.value == pytest.approx(s["value_for_density"]["0.50"])
    assert pred.targets == pytest.approx([max(t, 1e-3) for t in table["0.50"]]) and pred.gain == DENSITY_GAIN
    fixed = get_predictor(f"trained:{tmp_path / 'p.gguf'}:density=0.5:gain=0", "m.gguf")
    assert fixed.targets is None and ":gain=0" in fixed.name
    assert TrainedHeads(tmp_path / "p.gguf", "threshold", 0.2).targets is None
    with pytest.raises(ValueError, match="gain=G"):
        get_predictor(f"trained:{tmp_path / 'p.gguf'}:threshold=0.2:gain=0.1", "m.gguf")


def test_in_graph_predictor_with_every_head_gives_dense_tokens(tmp_path, model_path, engine):
    dense = engine.generate("Once upon a time", 16, stop_at_eog=False).tokens
    _random_predictor(tmp_path / "p.gguf", model_path, engine, value=-1e9)  # every head above threshold
    pred = get_predictor(f"trained:{tmp_path / 'p.gguf'}", model_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from powerinfer_attn.engine.decode import open_engine

        with open_engine(model_path, pred, n_ctx=engine.n_ctx, n_threads=2) as eng:
            gen = eng.generate("Once upon a time", 16, predictor=pred, stop_at_eog=False)
    assert gen.tokens == dense
    assert np.array(gen.masks).all()


def test_in_graph_masks_match_python_masks(tmp_path, model_path):
    """The same masks set from Python give the same logits: the in-graph mask is really used."""
    from powerinfer_attn.engine.decode import open_engine

    with Engine(model_path, n_ctx=32, n_threads=1) as probe:
        _random_predictor(tmp_path / "p.gguf", model_path, probe, value=0.5)
    pred = get_predictor(f"trained:{tmp_path / 'p.gguf'}", model_path)
    with open_engine(model_path, pred, n_ctx=128, n_threads=2) as eng:
        toks = eng.tokenize("It was the best of times, it was the worst of times")
        eng.prefill(toks[:-3])
        eng.set_sparse(True)
        got = [eng.predicted_step(pred, i, t) for i, t in enumerate(toks[-3:])]
        masks = [m for _, m in got]
        assert 0.2 < np.mean(masks) < 0.9  # a real mix of heads
        # the Python path with the same masks, from the same state
        eng.rollback(len(toks) - 3)
        replay = get_predictor("all", model_path)
        replay.bind(eng)
        replay.predict = lambda state: masks[state.step]
        again = [eng.predicted_step(replay, i, t)[0] for i, t in enumerate(toks[-3:])]
    for (lg, _), lg2 in zip(got, again):
        np.testing.assert_array_equal(lg, lg2)


def test_predictor_load_errors(tmp_path, model_path, engine):
    with pytest.raises(FileNotFoundError):
        engine.load_head_predictor(tmp_path / "none.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF junk")
    with pytest.raises(EngineError, match="returned -1"):
        engine.load_head_predictor(tmp_path / "junk.gguf")
    rng = np.random.default_rng(0)
    ws = [rng.normal(size=(engine.n_head, 64)).astype(np.float32)] * engine.n_layer
    bs = [np.zeros(engine.n_head, np.float32)] * engine.n_layer
    predictor_file.write_predictor(tmp_path / "small.gguf", ws, bs, model_path.name, "threshold", 0.0, {})
    with pytest.raises(EngineError, match="another shape"):
        engine.load_head_predictor(tmp_path / "small.gguf")
    with pytest.raises(EngineError, match="no head predictor loaded"):
        engine.use_head_predictor(True)
    _random_predictor(tmp_path / "p.gguf", model_path, engine)
    engine.load_head_predictor(tmp_path / "p.gguf")
    with pytest.raises(ValueError, match="bad value"):
        engine.set_head_rule("topk", 0)
    with pytest.raises(ValueError, match="bad value"):
        engine.set_head_rule("mass", 1.5)
    engine.set_head_rule("file")
    predictor_file.write_predictor(tmp_path / "other.gguf", *_random_predictor(tmp_path / "x.gguf", model_path, engine),
                          "another-model.gguf", "threshold", 0.0, {})
    with pytest.raises(ValueError, match="trained for another-model.gguf"):
        get_predictor(f"trained:{tmp_path / 'other.gguf'}", model_path).bind(engine)


def test_collect_records_shapes_and_keeps_to_training_articles(tmp_path, model_path):
    text = "".join(f" = Article {i} = \n\n" + "The cat sat on the mat and looked at the moon . " * 30 + "\n" for i in range(12))
    (tmp_path / "t.raw").write_text(text)
    meta = collect.collect(model_path, tmp_path / "t.raw", tmp_path / "d", tokens=1024, batch=128, threads=2,
                           sensitivity=False)
    assert meta["layer_sensitivity"] is None and meta["layer_sensitivity_linear"] is None
    assert meta["chunks"] >= 2 and meta["tokens"] == meta["chunks"] * 128
    assert meta["train_tokens_available"] <= meta["scored_from_token"]
    x, imp, resid = collect.load_layer(tmp_path / "d", 3)
    with Engine(model_path, n_ctx=32, n_threads=1) as eng:
        assert x.shape == (meta["tokens"], eng.n_embd) and imp.shape == (meta["tokens"], eng.n_head)
    assert resid.shape == (meta["tokens"],) and (resid > 0).all() and (imp > 0).all()
    # the fills' data: the fills, and deviations from them that differ from the raw importance
    from powerinfer_attn.predictors.fill import HeadFill

    for kind in ("mean", "linear"):
        _, dev, _ = collect.load_layer(tmp_path / "d", 3, kind)
        assert dev.shape == imp.shape and (dev > 0).all() and not np.allclose(dev, imp)
    fill = HeadFill.load(tmp_path / "d" / "fill.npz")
    assert fill.mean_post.shape == (eng.n_layer, eng.n_head, eng.n_embd)
    assert fill.w.shape == (eng.n_layer, eng.n_embd, eng.n_embd) and fill.b.shape == (eng.n_layer, eng.n_embd)
    assert meta["fill_tokens"] >= 128
    # attn_norm output is RMS-normalised times the norm weights: not all zeros, finite
    assert np.isfinite(x).all() and np.abs(x).mean() > 0.01


def test_collect_resume_runs_only_the_missing_chunks(tmp_path, model_path):
    text = "".join(f" = Article {i} = \n\n" + "The cat sat on the mat and looked at the moon . " * 30 + "\n" for i in range(12))
    (tmp_path / "t.raw").write_text(text)
    d = tmp_path / "d"
    meta = collect.collect(model_path, tmp_path / "t.raw", d, tokens=1024, batch=128, threads=2, sensitivity=False)
    last = meta["chunks"] - 1
    whole = {f.name: np.load(f) for f in d.glob("*-*.npy")}
    # a run stopped in its last chunk: that chunk's files are gone (pos last), an earlier one is marked
    for f in d.glob(f"*-{last:05d}.npy"):
        f.unlink()
    np.save(d / "imp-00000.npy", np.zeros(1, np.float32))
    again = collect.collect(model_path, tmp_path / "t.raw", d, tokens=1024, batch=128, threads=2,
                            sensitivity=False, resume=True)
    assert again["chunks"] == meta["chunks"]
    assert np.load(d / "imp-00000.npy").shape == (1,)  # a finished chunk is not run again
    for name, arr in whole.items():
        if name.endswith(f"-{last:05d}.npy"):
            np.testing.assert_allclose(np.load(d / name), arr, rtol=1e-5, atol=1e-5)
    # resuming a different run is refused
    with pytest.raises(ValueError, match="cannot resume"):
        collect.collect(model_path, tmp_path / "t.raw", d, tokens=2048, batch=128, threads=2,
                        sensitivity=False, resume=True)
    with pytest.raises(ValueError, match="cannot resume"):
        collect.collect(model_path, tmp_path / "t.raw", tmp_path / "empty", tokens=1024, batch=128, threads=2,
                        sensitivity=False, resume=True)


def test_layer_sensitivity(model_path):
    with Engine(model_path, n_ctx=64, n_threads=1) as eng:
        toks = eng.tokenize("The cat sat on the mat and looked at the moon while the dog slept by the door . " * 4,
                            add_bos=False)
        n_layer = eng.n_layer
    sens = collect.layer_sensitivity(model_path, toks, windows=1, prefix=16, steps=4, fraction=0.5, threads=2)
    assert len(sens) == n_layer and all(np.isfinite(sens)) and min(sens) >= 0.0
    assert sum(x > 0 for x in sens) > n_layer // 2  # dropping half the mass moves the output
    nothing = collect.layer_sensitivity(model_path, toks, windows=1, prefix=16, steps=2, fraction=1.0, threads=2)
    assert max(nothing) == 0.0  # nothing dropped, nothing moved


def test_layer_sensitivity_under_linear_fill(tmp_path, model_path):
    with Engine(model_path, n_ctx=64, n_threads=1) as eng:
        toks = eng.tokenize("The cat sat on the mat and looked at the moon while the dog slept by the door . " * 4,
                            add_bos=False)
        n_layer, n_head = eng.n_layer, eng.n_head
    fill = collect.fit_fill(model_path, [toks[:48]], n_layer, n_head, 48, threads=2)
    side = collect._fill_sidecar(tmp_path, fill, n_head, model_path)
    assert predictor_file.read_fill(side)[0] == "linear"
    kw = dict(windows=1, prefix=16, steps=4, fraction=0.5, threads=2)
    zero = collect.layer_sensitivity(model_path, toks, **kw)
    filled = collect.layer_sensitivity(model_path, toks, fill_file=side, **kw)
    assert len(filled) == n_layer and all(np.isfinite(filled)) and min(filled) >= 0.0
    assert sum(x > 0 for x in filled) > n_layer // 2 and filled != zero
    nothing = collect.layer_sensitivity(model_path, toks, windows=1, prefix=16, steps=2, fraction=1.0, threads=2,
                                        fill_file=side)
    assert max(nothing) == 0.0
    means = tmp_path / "means.gguf"
    predictor_file.write_predictor(means, [np.zeros((n_head, fill.w.shape[2]), np.float32)] * n_layer,
                          [np.zeros(n_head, np.float32)] * n_layer, model_path.name, "threshold", 0.0, {},
                          means=[np.zeros((fill.w.shape[2], n_head), np.float32)] * n_layer)
    with pytest.raises(ValueError, match="takes a linear one"):
        collect.layer_sensitivity(model_path, toks, fill_file=means, **kw)


def test_layer_budgets_offset_the_bias(tmp_path):
    _fake_data(tmp_path)
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["layer_sensitivity"] = [1.0, 4.0]
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with_b = train.train(tmp_path, tmp_path / "a.gguf", density=0.5)
    without = train.train(tmp_path, tmp_path / "b.gguf", density=0.5, layer_budget=0.0)
    twice = train.train(tmp_path, tmp_path / "c.gguf", density=0.5, layer_budget=2.0)
    assert with_b["layer_offsets"] == pytest.approx([-np.log(2), np.log(2)], abs=1e-4)
    assert twice["layer_offsets"] == pytest.approx([-2 * np.log(2), 2 * np.log(2)], abs=1e-4)
    assert without["layer_offsets"] is None and without["layer_budget_strength"] == 0.0
    with pytest.raises(ValueError, match="strength"):
        train.train(tmp_path, tmp_path / "d.gguf", layer_budget=-1.0)
    # the more sensitive layer keeps more heads at the same mean density
    d = with_b["heldout_density_per_layer"]
    assert d[1] > d[0]
    from gguf import GGUFReader

    ta = {t.name: np.array(t.data) for t in GGUFReader(str(tmp_path / "a.gguf")).tensors}
    tb = {t.name: np.array(t.data) for t in GGUFReader(str(tmp_path / "b.gguf")).tensors}
    np.testing.assert_allclose(ta["blk.1.head_pred.bias"] - tb["blk.1.head_pred.bias"], np.log(2), atol=1e-4)
    np.testing.assert_array_equal(ta["blk.1.head_pred.weight"], tb["blk.1.head_pred.weight"])


def test_layer_budgets_use_the_sensitivities_under_the_fill(tmp_path):
    _fake_data(tmp_path, means=True)
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["layer_sensitivity"] = [1.0, 4.0]
    meta["layer_sensitivity_linear"] = [4.0, 1.0]
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    lin = train.train(tmp_path, tmp_path / "a.gguf", density=0.5, fill="linear")
    zero = train.train(tmp_path, tmp_path / "b.gguf", density=0.5, fill="zero")
    mean = train.train(tmp_path, tmp_path / "c.gguf", density=0.5, fill="mean")
    assert lin["layer_sensitivity"] == "layer_sensitivity_linear"
    assert lin["layer_offsets"] == pytest.approx([np.log(2), -np.log(2)], abs=1e-4)
    # no sensitivities were measured under the others' fills: the zero-fill ones stand in
    for s in (zero, mean):
        assert s["layer_sensitivity"] == "layer_sensitivity"
        assert s["layer_offsets"] == pytest.approx([-np.log(2), np.log(2)], abs=1e-4)


def test_level_label_is_log_importance_less_the_layers_mean_log_total():
    rng = np.random.default_rng(0)
    imp = rng.uniform(0.1, 2.0, size=(50, 4))
    y = train.targets("threshold", imp, np.ones(50), "level")
    np.testing.assert_allclose(y, np.log(imp + 1e-6) - np.log(imp.sum(axis=1)).mean(), rtol=1e-6)
    # unlike share, it keeps how large a token's deviations are: scaling one token moves its labels
    imp2 = imp.copy()
    imp2[0] *= 10
    y2 = train.targets("threshold", imp2, np.ones(50), "level")
    s1, s2 = (train.targets("threshold", a, np.ones(50), "share") for a in (imp, imp2))
    np.testing.assert_allclose(s1[0], s2[0], rtol=1e-4)
    assert (y2[0] - y[0]).mean() > 2.0


def test_pareto_plot(tmp_path):
    from powerinfer_attn.evaluation import compare

    res = [{"predictor": p, "density": d, "ppl_dense": 10.0, "ppl_sparse": q}
           for p, d, q in [("trained:p.gguf:density=0.6", 0.6, 12.0), ("trained:p.gguf", 0.7, 11.0),
                           ("oracle:0.8", 0.69, 10.8), ("random:7", 0.78, 30.0)]]
    compare.plot_pareto(res, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert compare.family("trained:p.gguf:density=0.6") == "trained:p.gguf"
    assert compare.family("trained:p.gguf:density=0.7:gain=0+linear") == "trained:p.gguf:fixed+linear"
    assert compare.family("trained:q.gguf:density=0.7+linear") == "trained:q.gguf+linear"


def test_fills_are_fitted_on_sequences_spread_over_the_text():
    # many short chunks: every 4th, spread over the text; a few long sequences: all of them
    assert collect.fill_sequences(list(range(64))) == list(range(0, 64, 4))
    assert collect.fill_sequences(list(range(4))) == [0, 1, 2, 3]
    assert collect.fill_tokens(32768, 512) == 8192 and collect.fill_tokens(32768, 8192) == 32768
