"""compare, score and calibrate end to end on the default model, on a small text of our own."""

import json

import numpy as np
import pytest

from powerinfer_attn.evaluation import compare as cmp
from powerinfer_attn.predictors import predictor_file
from powerinfer_attn.predictors.specs import get_predictor
from powerinfer_attn.engine.text import TEXT_ENV, resolve_text_file, text_tokens

TEXT = (
    "The Tiber is the third longest river in Italy. It rises in the Apennine Mountains in Emilia-Romagna "
    "and flows through Tuscany, Umbria and Lazio, where it is joined by the river Aniene, to the Tyrrhenian Sea. "
    "Rome was founded on its eastern banks. The river rises at Mount Fumaiolo in central Italy and flows in a "
    "generally southerly direction past Perugia and Orvieto to reach Rome. "
) * 6


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "river.txt"
    p.write_text(TEXT)
    return p


def run_score(model_path, text_file, *specs, **kw):
    preds = [get_predictor(spec, model_path) for spec in specs]
    res = cmp.score(model_path, text_file, preds, prefix=24, steps=12, windows=2, threads=2, **kw)
    return res if len(specs) > 1 else res[0]


def test_score_all_matches_dense(model_path, text_file, tmp_path):
    out = tmp_path / "logits.npy"
    r = run_score(model_path, text_file, "all", dump_logits=out)
    assert r.kl_mean < 1e-6 and r.top1_agreement == 1.0
    assert r.ppl_sparse == pytest.approx(r.ppl_dense, rel=1e-5)
    assert r.density == 1.0 and len(r.density_per_layer) == 30
    assert np.load(out).shape == (2, 12, 49152)


def test_score_several_prefixes_in_one_run(model_path, text_file):
    """One run, a table per prefix length; each length scores as it does alone (the dense prefill
    is shared through a copied KV cache, which must not change a result)."""
    preds = [get_predictor(s, model_path) for s in ("all", "oracle-topk:6")]
    both = cmp.score(model_path, text_file, preds, prefix=[24, 40], steps=12, windows=2, threads=2)
    assert [(r.prefix, r.predictor) for r in both] == [(24, "all"), (24, "oracle-topk:6"), (40, "all"), (40, "oracle-topk:6")]
    alone = run_score(model_path, text_file, "all", "oracle-topk:6")
    for a, b in zip(both[:2], alone):
        assert (a.ppl_sparse, a.kl_mean, a.density) == (b.ppl_sparse, b.kl_mean, b.density)
    assert both[2].kl_mean < 1e-6 and both[3].density == pytest.approx(6 / 9)
    table = cmp.format_scores(both)
    assert "prefix 24 (2 windows x 12 steps)" in table and "prefix 40 (2 windows x 12 steps)" in table


def test_score_orders_oracle_static_random(model_path, text_file, tmp_path):
    calib = tmp_path / "calib.json"
    cmp.calibrate(model_path, text_file, calib, tokens=256, batch=128, threads=2)
    data = json.loads(calib.read_text())
    assert np.array(data["importance"]).shape == (30, 9) and data["tokens"] > 0
    expl = np.array(data["mean_explained"])
    assert expl.shape == (30, 9) and (expl >= 0).all() and (expl <= 1 + 1e-6).all()
    assert 0 < data["mean_explained_overall"] < 1
    oracle, static, rand = run_score(model_path, text_file, "oracle-topk:7", f"static:7:{calib}", "random:7:1")
    for r in (oracle, static, rand):
        assert r.density == pytest.approx(7 / 9)
    assert oracle.kl_mean < rand.kl_mean
    assert static.kl_mean < rand.kl_mean
    for r in (oracle, static, rand):  # the tail statistics are of the same per-token KL values
        assert 0 <= r.kl_median <= r.kl_p99 <= r.kl_max and r.kl_max >= r.kl_mean
    assert "| KL median | KL 99% | KL max |" in cmp.format_scores([oracle])


def test_score_on_training_articles(model_path, text_file, tmp_path):
    from powerinfer_attn.engine.decode import Engine

    train_part = " = Tiber = \n" + TEXT + "\n"
    text = train_part + " = Other = \n" + "Completely different words about a cat and a dog. " * 60
    assert len(train_part) < 0.45 * len(text)
    path = tmp_path / "two.txt"
    path.write_text(text)
    with Engine(model_path, n_ctx=64, n_threads=2) as eng:
        assert text_tokens(eng, path, training=True) == eng.tokenize(train_part, add_bos=False)
        with pytest.raises(ValueError, match="no whole article"):
            text_tokens(eng, text_file, training=True)  # one article, the whole file
    r = run_score(model_path, path, "all", training=True)
    assert r.text == "training articles" and r.kl_mean < 1e-6


def test_contribution_moments(model_path):
    from powerinfer_attn.engine.decode import Engine
    from powerinfer_attn.predictors.importance import HeadContributions

    plain = HeadContributions(model_path, 30, 9)
    with pytest.raises(ValueError, match="moments"):
        plain.mean_explained()
    hook = HeadContributions(model_path, 30, 9, moments=True)
    with Engine(model_path, n_ctx=64, n_threads=2, tensor_hook=hook) as eng:
        toks = eng.tokenize(TEXT, add_bos=False)
        eng.prefill(toks[:1])
        # one token: every head's mean is its only contribution
        np.testing.assert_allclose(hook.mean_explained(), 1.0, rtol=1e-4)
        np.testing.assert_allclose(np.sqrt(hook.energy_sum), hook.per_token[0], rtol=1e-4)
        one_token_mean = hook.mean_contribution()
        eng.reset()
        eng.prefill(toks[:16])
    assert hook.tokens_seen == 17
    expl = hook.mean_explained()
    assert (expl <= 1 + 1e-6).all() and expl.min() < 0.9  # Jensen, and some heads do vary
    assert 0 < hook.mean_explained_overall() < 1
    # deviation from a head's mean: none for the token the mean was taken from, the plain norm around zero
    from powerinfer_attn.predictors.fill import HeadFill

    centered = HeadContributions(model_path, 30, 9, fill=HeadFill(mean_post=one_token_mean))
    around_zero = HeadContributions(model_path, 30, 9, fill=HeadFill(mean_post=np.zeros_like(one_token_mean)))
    for h in (centered, around_zero):
        with Engine(model_path, n_ctx=64, n_threads=2, tensor_hook=h) as eng:
            eng.prefill(toks[:2], all_logits=True)
    assert centered.per_token_dev["mean"][0].max() < 1e-3 * centered.per_token[0].max()
    assert centered.per_token_dev["mean"][1].min() > 0
    np.testing.assert_allclose(around_zero.per_token_dev["mean"], around_zero.per_token, rtol=1e-5)


def test_oracle_full_mass_keeps_every_head(model_path, text_file):
    r = run_score(model_path, text_file, "oracle:1.0")
    assert r.density == 1.0 and r.kl_mean < 1e-6


def test_oracle_with_fills(model_path, text_file, tmp_path):
    """oracle:P:fill-from=F runs with F's fill on and ranks heads by their deviation from that fill."""
    from powerinfer_attn.training import collect
    from powerinfer_attn.engine.decode import Engine

    with Engine(model_path, n_ctx=200, n_threads=1) as eng:
        toks = text_tokens(eng, text_file)
        L, H, E = eng.n_layer, eng.n_head, eng.n_embd
    fill = collect.fit_fill(model_path, [toks[:128]], L, H, 128, 2)
    assert fill.mean_post.shape == (L, H, E) and fill.w.shape == (L, E, E)
    zeros, zb = [np.zeros((H, E), np.float32)] * L, [np.zeros(H, np.float32)] * L
    predictor_file.write_predictor(tmp_path / "m.gguf", zeros, zb, model_path.name, "threshold", 0.0, {},
                          means=[m.T for m in fill.mean_post])
    predictor_file.write_predictor(tmp_path / "l.gguf", zeros, zb, model_path.name, "threshold", 0.0, {},
                          linear=(fill.w, fill.b))
    mean, linear, plain = run_score(model_path, text_file, f"oracle:0.8:fill-from={tmp_path / 'm.gguf'}",
                                    f"oracle:0.8:fill-from={tmp_path / 'l.gguf'}", "oracle:0.8")
    assert (mean.predictor, linear.predictor, plain.predictor) == ("oracle:0.8+mean", "oracle:0.8+linear", "oracle:0.8")
    for r in (mean, linear):
        assert 0 < r.density < 1 and np.isfinite(r.kl_mean) and r.kl_mean != plain.kl_mean
    with pytest.raises(ValueError, match="fill-from=PRED.gguf"):
        get_predictor("oracle:0.8:means=x.gguf", model_path)
    # the spelling before the rename is refused with the new one named
    with pytest.raises(ValueError, match="the oracle's fill file is fill-from=PRED.gguf"):
        get_predictor(f"oracle:0.8:fill={tmp_path / 'l.gguf'}", model_path)
    predictor_file.write_predictor(tmp_path / "plain.gguf", zeros, zb, model_path.name, "threshold", 0.0, {})
    with pytest.raises(ValueError, match="holds no fill"):
        get_predictor(f"oracle:0.8:fill-from={tmp_path / 'plain.gguf'}", model_path)


def test_static_refuses_other_model(model_path, f32_model_path, text_file, tmp_path):
    from powerinfer_attn.engine.decode import open_engine

    calib = tmp_path / "calib.json"
    cmp.calibrate(model_path, text_file, calib, tokens=128, batch=128, threads=2)
    pred = get_predictor(f"static:7:{calib}", f32_model_path)
    with pytest.raises(ValueError, match="calibrated on"):
        open_engine(f32_model_path, pred, n_ctx=256, n_threads=2)


def test_compare_all_agrees(model_path):
    r = cmp.compare(model_path, "The capital of France is", 12, get_predictor("all", model_path), threads=2)
    assert r.agreement == 1.0 and r.first_divergence is None
    assert r.dense_tokens == r.sparse_tokens and r.density == 1.0


def test_text_file_required(monkeypatch):
    monkeypatch.delenv(TEXT_ENV, raising=False)
    with pytest.raises(ValueError, match="--text-file"):
        resolve_text_file(None)


def test_matrix_pairs_each_trained_predictor_with_the_oracle_of_its_run():
    def res(name, ppl, kl, density):
        return cmp.ScoreResult(name, 4, 4096, 128, 10.0, ppl, kl, 0.9, density, [density])
    wiki = [res("trained:w.gguf:density=0.7+linear", 11.0, 0.10, 0.70), res("oracle:0.8+linear", 10.5, 0.05, 0.69),
            res("oracle:0.6+linear", 12.0, 0.20, 0.50)]
    mixed = [res("trained:m.gguf:density=0.7+linear", 10.6, 0.06, 0.70), res("oracle:0.8+linear", 10.4, 0.04, 0.70)]
    code = [res("trained:w.gguf:density=0.7+linear", 13.0, 0.30, 0.71), res("oracle:0.8+linear", 11.0, 0.10, 0.70)]
    table = cmp.format_matrix([("wiki", wiki), ("wiki", mixed), ("code", code)])
    lines = table.splitlines()
    assert lines[0] == "| predictor | wiki | code |"
    row = {ln.split(" | ")[0].lstrip("| "): ln for ln in lines[2:]}
    assert row["trained:w.gguf:density=0.7+linear"].endswith(
        "| +10.0% / 0.100 @0.70 (2.00x) | +30.0% / 0.300 @0.71 (3.00x) |")
    assert "(1.50x)" in row["trained:m.gguf:density=0.7+linear"]  # against its own run's oracle, not w.gguf's
    assert "+4.0% / 0.040" in row["oracle:0.8+linear (fill of m.gguf)"]
    assert "+5.0% / 0.050" in row["oracle:0.8+linear (fill of w.gguf)"]
    # between two oracle runs the oracle's KL is interpolated (log-linear in density)
    assert cmp.oracle_kl_at(wiki[1:], 0.595) == pytest.approx((0.05 * 0.20) ** 0.5, rel=1e-3)
    assert cmp.oracle_kl_at(wiki[1:], 0.3) == 0.20
