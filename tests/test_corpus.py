"""Texts of several kinds (corpus.py) and the per-layer diagnosis of a predictor file against
the oracle (diagnose.py)."""

import json

import numpy as np
import pytest

from powerinfer_attn.training import corpus
from powerinfer_attn.training import diagnose
from powerinfer_attn.predictors import predictor_file
from powerinfer_attn.engine.decode import Engine
from powerinfer_attn.predictors.fill import HeadFill
from powerinfer_attn.engine.text import split_articles, text_tokens, training_articles

# --- pure Python ---------------------------------------------------------------------


def _kind(name: str, n: int, size: int) -> str:
    return "".join(f"# ---- {name}{i}\n" + f"{name} text {i}.\n" * size for i in range(n))


def test_docs_text_is_the_reference_topics_as_articles():
    text, names = corpus.docs_text()
    arts = split_articles(text)
    assert [a[2] for a in arts] == names and len(names) > 50
    assert "assignment" in names  # the language reference's section on assignment statements
    assert training_articles(text)  # collect can read it


def test_mix_trains_on_equal_shares_of_every_kind_and_holds_out_the_rest():
    texts = {"a": _kind("a", 40, 50), "b": _kind("b", 20, 300), "c": _kind("c", 60, 20)}
    mixed, taken = corpus.mix(texts, block_chars=2000)
    arts = split_articles(mixed)
    names = [t for _, _, t in arts]
    train = {t for _, _, t in training_articles(mixed)}  # what collect reads
    # collect's part holds the training articles of every kind, and only those
    train_names = {k: {f"{k}/{t}" for _, _, t in training_articles(x)} for k, x in texts.items()}
    held_names = {k: {f"{k}/{t}" for _, _, t in split_articles(x)} - train_names[k] for k, x in texts.items()}
    base = {n.split(".")[0] for n in train}
    assert {n.split("/")[0] for n in base} == {"a", "b", "c"}
    assert all(n in train_names[n.split("/")[0]] for n in base)
    # every training piece is in collect's part; the held-out articles follow as one
    assert {n for n in names if n != "held-out"} == train and names[-1] == "held-out"
    held_part = mixed[arts[-1][0]:]
    held_seen = {ln[3:].split(".")[0] for ln in held_part.splitlines() if ln.startswith("## ")}
    assert held_seen and held_seen <= set().union(*held_names.values())
    assert {n.split("/")[0] for n in held_seen} == {"a", "b", "c"}
    # as much of each kind as the smallest has (to within one piece)
    assert max(taken.values()) - min(taken.values()) <= 2000 + 400
    # pieces are at most about a block: a long article is cut
    assert max(e - s for s, e, _ in arts[:-1]) < 2000 + 600
    assert any("." in n for n in names if n.startswith("b/"))


def test_mix_refuses_rulers_haystack_and_nothing():
    with pytest.raises(ValueError, match="essays"):
        corpus.mix({"wiki": _kind("w", 10, 10), "essays": _kind("e", 10, 10)})
    with pytest.raises(ValueError, match="no kinds"):
        corpus.mix({})


def test_chat_requests_are_seeded_and_distinct():
    a, b = corpus.chat_requests(30, seed=1), corpus.chat_requests(30, seed=1)
    assert a == b and len({r for r, _ in a}) == 30
    assert corpus.chat_requests(30, seed=2) != a
    with pytest.raises(ValueError):
        corpus.chat_requests(10_000)


def _fake_data(tmp_path, dev: np.ndarray, x: np.ndarray, fill_from: str) -> None:
    """A `collect` directory of one chunk: layer inputs ``x [n_layer, N, n_embd]``, deviations ``dev [N, n_layer, n_head]``."""
    n_layer, n, n_embd = x.shape
    n_head = dev.shape[2]
    np.save(tmp_path / "x-00000.npy", x.astype(np.float16))
    np.save(tmp_path / "imp-00000.npy", (2 * dev).astype(np.float32))
    np.save(tmp_path / "dev-linear-00000.npy", dev.astype(np.float32))
    np.save(tmp_path / "resid-00000.npy", np.ones((n, n_layer), np.float32))
    HeadFill(w=np.zeros((n_layer, n_head * 4, n_embd), np.float32), b=np.zeros((n_layer, n_head * 4), np.float32)).save(
        tmp_path / "fill.npz")
    (tmp_path / "meta.json").write_text(json.dumps({"text_file": "kind.txt", "tokens": n, "seq_len": 512, "chunks": 1,
                                                    "n_layer": n_layer, "n_head": n_head, "n_embd": n_embd,
                                                    "fill_from": fill_from}))


def _fake_predictor(path, ws, bs, n_head, n_embd, density=0.5):
    n_layer = len(ws)
    summary = {"heldout_density": density, "value_for_density": {f"{density:.2f}": 0.0},
               "layer_density_for_density": {f"{density:.2f}": [density] * n_layer}}
    predictor_file.write_predictor(path, ws, bs, "m.gguf", "threshold", 0.0, summary,
                                   linear=(np.zeros((n_layer, n_head * 4, n_embd), np.float32),
                                           np.zeros((n_layer, n_head * 4), np.float32)))


def test_diagnose_regret_is_one_for_the_oracles_order_and_more_for_a_worse_one(tmp_path):
    rng = np.random.default_rng(0)
    n_layer, n, n_head, n_embd = 2, 400, 4, 8
    x = rng.normal(size=(n_layer, n, n_embd)).astype(np.float32)
    # each head's importance is exp of a linear function of x: a linear predictor can rank exactly
    w_true = rng.normal(size=(n_head, n_embd)).astype(np.float32)
    dev = np.stack([np.exp(x[il].astype(np.float16).astype(np.float32) @ w_true.T) for il in range(n_layer)], axis=1)
    data = tmp_path / "data"
    data.mkdir()
    _fake_data(data, dev, x, "good.gguf")
    good, bad = tmp_path / "good.gguf", tmp_path / "bad.gguf"
    _fake_predictor(good, [w_true] * n_layer, [np.zeros(n_head, np.float32)] * n_layer, n_head, n_embd)
    _fake_predictor(bad, [-w_true, w_true], [np.zeros(n_head, np.float32)] * n_layer, n_head, n_embd)
    rep = diagnose.report(good, data, density=0.5)
    assert [l["regret"] for l in rep["layers"]] == pytest.approx([1.0, 1.0], abs=1e-3)
    assert all(abs(l["dropped"] - l["dropped_oracle"]) < 1e-3 for l in rep["layers"])
    # an oracle free to spread the heads over the tokens does at least as well as one held to the counts
    assert all(l["regret_spread"] >= l["regret"] - 1e-6 for l in rep["layers"])
    assert rep["mean"]["fill_left"] == pytest.approx(0.5)  # importance under the fill is half the zero-fill one
    assert all(0.4 < l["density_fixed"] < 0.6 for l in rep["layers"])  # threshold 0 cuts a symmetric logit in half
    # the bad file ranks layer 0 backwards: it drops far more than the oracle there, and layer 1 as well as it
    (data / "meta.json").write_text((data / "meta.json").read_text().replace("good.gguf", "bad.gguf"))
    rep = diagnose.report(bad, data, density=0.5)
    assert rep["layers"][0]["regret"] > 3 and rep["layers"][1]["regret"] == pytest.approx(1.0, abs=1e-3)
    assert "regret" in diagnose.format_report([rep])


def test_diagnose_refuses_data_judged_against_another_fill(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 64, 8)).astype(np.float32)
    _fake_data(tmp_path, np.ones((64, 1, 4), np.float32), x, None)
    _fake_predictor(tmp_path / "p.gguf", [np.zeros((4, 8), np.float32)], [np.zeros(4, np.float32)], 4, 8)
    with pytest.raises(ValueError, match="fill-from"):
        diagnose.report(tmp_path / "p.gguf", tmp_path)


# --- with the library --------------------------------------------------------------------


def test_text_files_parse_the_chat_templates_control_tokens(model_path, tmp_path):
    with Engine(model_path, n_ctx=256, n_threads=2) as eng:
        prompt = eng.chat_prompt([{"role": "user", "content": "hi"}])
        f = tmp_path / "chat.txt"
        f.write_text(prompt)
        toks = text_tokens(eng, f)
        spelled = eng.tokenize(prompt, add_bos=False)
        assert len(toks) < len(spelled)  # <|im_start|> is one token, not its letters
        assert sum(eng.is_eog(t) for t in toks) >= 1  # <|im_end|> as the model's end-of-turn token


def test_prepare_makes_a_predictor_that_trained_finds_and_resumes(model_path, tmp_path, monkeypatch):
    """prepare end to end on a tiny budget: texts, mix, collect, train, pin; stored where
    `--predictor trained` looks; a second run redoes nothing."""
    from powerinfer_attn.predictors import predictor_file
    from powerinfer_attn.training import prepare
    from powerinfer_attn.predictors.specs import get_predictor, prepared_predictor_path

    monkeypatch.setenv("POWERINFER_ATTN_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="prepare"):
        get_predictor("trained:density=0.7", model_path)
    steps = []
    res = prepare.prepare(model_path, conversations=6, tokens=1024, seq_len=512, pin_heads=2, sensitivity=False,
                          threads=2, chat_tokens=48, progress=lambda step, n: steps.append(step))
    out = prepared_predictor_path(model_path)
    assert res["predictor"] == str(out) and out.is_file()
    assert set(res["texts"]) == {"code", "docs", "chat"} and len(res["pinned"]) == 2
    assert {"chat", "collect", "retrieval"} <= set(steps)
    meta = predictor_file.read_metadata(out)
    assert set(meta["training"]["texts"]) == {"code", "docs", "chat"}  # the file says what it was trained on
    pred = get_predictor("trained:density=0.7", model_path)
    assert pred.name.startswith(f"trained:{out.name}:density=0.7")
    work = prepare.work_dir(model_path)
    stamp = (work / "pred.gguf").stat().st_mtime_ns
    steps.clear()
    prepare.prepare(model_path, conversations=6, tokens=1024, seq_len=512, pin_heads=2, sensitivity=False, threads=2,
                    chat_tokens=48, progress=lambda step, n: steps.append(step))
    assert (work / "pred.gguf").stat().st_mtime_ns == stamp and "collect" not in steps and "chat" not in steps
