"""Retrieval heads: the induction score finds copying heads, and pinning keeps them."""

import re

import numpy as np
import pytest

from powerinfer_attn.predictors import predictor_file
from powerinfer_attn.training import retrieval
from powerinfer_attn.engine.decode import Engine, TensorHook


def test_scores_single_out_a_few_copying_heads(model_path):
    res = retrieval.measure(model_path, [160], steps=8, sequences=1, threads=2)
    s = res.scores
    assert s.shape == (30, 9) and np.all(s >= 0) and np.all(s <= 1)
    # a few heads put much of their attention on the token to copy, 160 cells back; most put
    # about what a uniform spread over the context would (1/170)
    assert s.max() > 0.2
    assert np.median(s) < 0.01
    assert res.top(5).sum() == 5 and res.top(5)[np.unravel_index(np.argmax(s), s.shape)] == 1


def test_measure_rejects_bad_arguments(model_path):
    with pytest.raises(ValueError, match="distances longer than steps"):
        retrieval.measure(model_path, [8], steps=8)


class _Masks(TensorHook):
    def __init__(self):
        self.t = {}

    def wants(self, name):
        return re.match(r"^head_mask-\d+$", name) is not None

    def __call__(self, name, data):
        self.t[int(name.rpartition("-")[2])] = data.reshape(-1).copy()


def _masks(path, model_path, toks):
    hook = _Masks()
    out = []
    with Engine(model_path, n_ctx=128, n_threads=2, tensor_hook=hook) as eng:
        eng.prefill(toks[:4])
        eng.load_head_predictor(path)
        eng.set_head_rule("threshold", 1.0)
        eng.set_sparse(True)
        eng.use_head_predictor(True)
        for t in toks[4:12]:
            eng.step(t)
            out.append(np.stack([hook.t[il] for il in range(eng.n_layer)]))
    return np.array(out)


def test_pinned_heads_are_always_kept_and_the_rest_unchanged(tmp_path, model_path, engine):
    rng = np.random.default_rng(0)
    L, H, E = engine.n_layer, engine.n_head, engine.n_embd
    ws = [(rng.normal(size=(H, E)) * 0.05).astype(np.float32) for _ in range(L)]
    bs = [rng.normal(size=H).astype(np.float32) for _ in range(L)]
    lin = (rng.normal(size=(L, H * 64, E)).astype(np.float32) * 0.01, rng.normal(size=(L, H * 64)).astype(np.float32))
    predictor_file.write_predictor(tmp_path / "p.gguf", ws, bs, model_path.name, "threshold", 1.0, {"note": "x"}, linear=lin)
    pin = np.zeros((L, H), np.int32)
    pin[3, 2] = pin[17, 0] = pin[17, 8] = 1
    retrieval.pin(tmp_path / "p.gguf", tmp_path / "pinned.gguf", pin)

    meta = predictor_file.read_metadata(tmp_path / "pinned.gguf")
    assert meta["training"]["note"] == "x" and sorted(meta["training"]["pinned_heads"]) == [[3, 2], [17, 0], [17, 8]]
    kind, fill = predictor_file.read_fill(tmp_path / "pinned.gguf")
    assert kind == "linear"
    np.testing.assert_array_equal(fill.w, lin[0].astype(np.float16).astype(np.float32))

    toks = engine.tokenize("The river runs to the sea, and the sea to the rain, and the rain to the river.")
    plain, pinned = _masks(tmp_path / "p.gguf", model_path, toks), _masks(tmp_path / "pinned.gguf", model_path, toks)
    assert np.all(pinned[:, pin == 1] == 1)
    assert np.any(plain[:, pin == 1] == 0)  # they were not all kept without the pin
    # before the first pinned layer the inputs are the same, so are the choices
    # (later layers read the pinned heads' outputs)
    np.testing.assert_array_equal(pinned[:, :3], plain[:, :3])


def test_pin_rejects_a_mask_of_another_shape(tmp_path, model_path, engine):
    L, H, E = engine.n_layer, engine.n_head, engine.n_embd
    predictor_file.write_predictor(tmp_path / "p.gguf", [np.zeros((H, E), np.float32)] * L, [np.zeros(H, np.float32)] * L,
                                   model_path.name, "threshold", 0.0, {})
    with pytest.raises(ValueError, match="heads, the mask is"):
        retrieval.pin(tmp_path / "p.gguf", tmp_path / "q.gguf", np.zeros((L, H + 1), np.int32))


def test_cli_pin_options_go_together(tmp_path):
    from click.testing import CliRunner

    from powerinfer_attn.cli import main

    (tmp_path / "p.gguf").write_bytes(b"")
    for args in (["--pin", str(tmp_path / "p.gguf"), "--out", str(tmp_path / "q.gguf")],
                 ["--top", "3", "--out", str(tmp_path / "q.gguf")]):
        r = CliRunner().invoke(main, ["retrieval-heads", *args])
        assert r.exit_code != 0 and "go together" in r.output


def test_show_prints_a_retrieval_result(tmp_path):
    import json

    from click.testing import CliRunner

    from powerinfer_attn.cli import main

    scores = np.zeros((2, 3))
    scores[1, 2] = 0.4
    (tmp_path / "r.json").write_text(json.dumps({"scores": scores.tolist(), "distances": [100], "steps": 4,
                                                 "sequences": 1, "model": "m.gguf", "pinned": [[1, 2]], "out": "q.gguf"}))
    r = CliRunner().invoke(main, ["show", str(tmp_path / "r.json")])
    assert r.exit_code == 0 and "layer  1 head  2: 0.400" in r.output.splitlines()[1] and "[[1, 2]]" in r.output
