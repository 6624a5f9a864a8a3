"""The trained predictor's biases shifted to the prompt (``predictors/calibrate.py``)."""

import contextlib
import re

import numpy as np
import pytest

from powerinfer_attn.engine.decode import Engine, TensorHook
from powerinfer_attn.engine.hooks import Hooks
from powerinfer_attn.predictors import predictor_file
from powerinfer_attn.predictors.calibrate import MIN_TOKENS, bias_shift
from powerinfer_attn.predictors.importance import HeadContributions
from powerinfer_attn.predictors.specs import get_predictor
from powerinfer_attn.engine.decode import open_engine

TEXT = ("The river runs to the sea, and the sea to the rain; the rain falls on the hills and the "
        "hills send it down to the river again. ") * 8


def test_bias_shift_is_the_centred_mean_gap_and_leaves_frozen_heads():
    rng = np.random.default_rng(0)
    n_layer, n_head, n_embd, n = 2, 4, 6, 50
    ws = [rng.normal(size=(n_head, n_embd)).astype(np.float32) for _ in range(n_layer)]
    bs = [rng.normal(size=n_head).astype(np.float32) for _ in range(n_layer)]
    xs = [rng.normal(size=(n, n_embd)).astype(np.float32) for _ in range(n_layer)]
    dev = np.exp(rng.normal(size=(n, n_layer, n_head))).astype(np.float32)
    frozen = np.zeros((n_layer, n_head), bool)
    frozen[1, 2] = True
    out = bias_shift(ws, bs, xs, dev, frozen)
    for il in range(n_layer):
        gap = (np.log(dev[:, il] + 1e-6) - (xs[il] @ ws[il].T + bs[il])).mean(axis=0)
        free = ~frozen[il]
        want = np.where(free, gap - gap[free].mean(), 0.0)
        np.testing.assert_allclose(out[il], want, rtol=1e-5, atol=1e-5)
        assert abs(out[il][free].sum()) < 1e-4  # the layer's level is density control's
    assert out[1][2] == 0.0


def test_calibration_spec_errors(tmp_path, model_path):
    with Engine(model_path, n_ctx=64, n_threads=1) as eng:
        _predictor(tmp_path / "p.gguf", model_path, eng)
    with pytest.raises(ValueError, match="calibrate=N needs N >= 32"):
        get_predictor(f"trained:{tmp_path / 'p.gguf'}:calibrate=8", model_path)
    with pytest.raises(ValueError, match="linear fill"):
        get_predictor(f"trained:{tmp_path / 'p.gguf'}:calibrate=64:fill=zero", model_path)
    p = get_predictor(f"trained:{tmp_path / 'p.gguf'}:topk=3:calibrate=64", model_path)
    assert p.calibrate == 64 and ":calibrate=64" in p.name


def _predictor(path, model_path, eng, seed=0):
    """A random predictor with a random linear fill for ``eng``'s model."""
    rng = np.random.default_rng(seed)
    d = eng.n_embd // eng.n_head
    ws = [(rng.normal(size=(eng.n_head, eng.n_embd)) * 0.05).astype(np.float32) for _ in range(eng.n_layer)]
    bs = [rng.normal(size=eng.n_head).astype(np.float32) for _ in range(eng.n_layer)]
    linear = ((rng.normal(size=(eng.n_layer, eng.n_head * d, eng.n_embd)) * 0.05).astype(np.float32),
              (rng.normal(size=(eng.n_layer, eng.n_head * d)) * 0.1).astype(np.float32))
    predictor_file.write_predictor(path, ws, bs, model_path.name, "topk", 3.0, {"pinned_heads": [[1, 0]]},
                                   linear=linear)
    return ws, bs


class _Graph(TensorHook):
    """Keeps the graph's tensors of the given kinds (name-IL)."""

    def __init__(self, kinds=("attn_norm", "head_logits")):
        self.t = {}
        self.pattern = re.compile(rf"^({'|'.join(kinds)})-\d+$")

    def wants(self, name):
        return self.pattern.match(name) is not None

    def __call__(self, name, data):
        self.t[name] = data.copy()


def test_set_head_bias_reaches_the_graph_and_loading_restores_the_file(tmp_path, model_path):
    g = _Graph()
    with Engine(model_path, n_ctx=128, n_threads=2, tensor_hook=g) as eng:
        ws, bs = _predictor(tmp_path / "p.gguf", model_path, eng)
        toks = eng.tokenize("The river runs to the sea, and the sea")
        eng.prefill(toks[:-1])
        eng.load_head_predictor(tmp_path / "p.gguf")
        eng.set_sparse(True)
        eng.use_head_predictor(True)
        delta = np.arange(eng.n_head, dtype=np.float32)
        eng.set_head_bias(3, bs[3] + delta)
        for expect in (bs[3] + delta, bs[3]):
            pos = eng.n_past
            g.t.clear()
            eng.step(toks[-1])
            x = g.t["attn_norm-3"].reshape(-1)
            np.testing.assert_allclose(g.t["head_logits-3"].reshape(-1), ws[3] @ x + expect, rtol=1e-4, atol=1e-4)
            eng.rollback(pos)
            eng.load_head_predictor(tmp_path / "p.gguf")  # the file's biases again
        with pytest.raises(ValueError):
            eng.set_head_bias(eng.n_layer, bs[0])
        with pytest.raises(ValueError):
            eng.set_head_bias(0, np.full(eng.n_head, np.nan))


def test_engine_tracks_the_tokens_of_its_positions(model_path):
    with Engine(model_path, n_ctx=128, n_threads=1) as eng:
        toks = eng.tokenize(TEXT)[:40]
        eng.prefill(toks[:30])
        eng.step(toks[30])
        assert eng.tokens == toks[:31]
        state = eng.save_state()
        eng.rollback(20)
        assert eng.tokens == toks[:20]
        eng.load_state(state)
        assert eng.tokens == toks[:31] and eng.n_past == 31
        eng.reset()
        assert eng.tokens == []


@contextlib.contextmanager
def _measured_prompt_end(tmp_path, model_path, n_cal):
    """A random predictor with a linear fill at tmp_path/p.gguf, and an engine that prefilled 120
    tokens with an independent recorder (``HeadContributions``) on the last ``n_cal`` of them:
    yields (engine, recorder, tokens, W, b)."""
    with Engine(model_path, n_ctx=64, n_threads=1) as e:
        ws, bs = _predictor(tmp_path / "p.gguf", model_path, e)
        n_layer, n_head = e.n_layer, e.n_head
    _, fill = predictor_file.read_fill(tmp_path / "p.gguf")
    ref = HeadContributions(model_path, n_layer, n_head, fill=fill)
    ref.active = False
    with Engine(model_path, n_ctx=256, n_threads=2, tensor_hook=ref) as eng:
        toks = eng.tokenize(TEXT)[:120]
        eng.prefill(toks[:-n_cal])
        ref.active = True
        eng.prefill(toks[-n_cal:])
        ref.active = False
        yield eng, ref, toks, ws, bs


def test_calibration_measures_the_prompt_end_and_shifts_the_biases(tmp_path, model_path):
    """At an answer's first step the biases become the file's plus ``bias_shift`` of the prompt's
    last N tokens, measured as an independent engine measures them; the cache it decoded again
    gives dense decode the same logits as before; a prompt too short gets the file's biases."""
    n_cal = 48
    with _measured_prompt_end(tmp_path, model_path, n_cal) as (eng, ref, toks, ws, bs):
        n_layer, n_head = eng.n_layer, eng.n_head
        frozen = np.zeros((n_layer, n_head), bool)
        frozen[1, 0] = True
        want = bias_shift(ws, bs, [ref.x[il] for il in range(n_layer)], ref.per_token_dev["linear"], frozen)
        dense_next = eng.step(toks[0])

    pred = get_predictor(f"trained:{tmp_path / 'p.gguf'}:calibrate={n_cal}", model_path)
    g = _Graph()
    with open_engine(model_path, pred, n_ctx=256, n_threads=2) as eng:
        eng._hook.hooks += (g,)  # noqa: SLF001 - read the graph's logits too
        eng.prefill(toks)
        eng.set_sparse(True)
        g.t.clear()
        eng.predicted_step(pred, 0, toks[0])
        for il in range(n_layer):
            np.testing.assert_allclose(pred.calibration.shift[il], want[il], rtol=1e-3, atol=1e-3)
            x = g.t[f"attn_norm-{il}"].reshape(-1)
            np.testing.assert_allclose(g.t[f"head_logits-{il}"].reshape(-1), ws[il] @ x + bs[il] + want[il],
                                       rtol=1e-3, atol=1e-3)
        assert pred.calibration.shift[1][0] == 0.0  # pinned
        eng.rollback(len(toks))
        eng.set_sparse(False)
        np.testing.assert_allclose(eng.step(toks[0]), dense_next, rtol=1e-3, atol=1e-3)

        eng.reset()
        eng.prefill(toks[:MIN_TOKENS - 1])
        eng.set_sparse(True)
        g.t.clear()
        eng.predicted_step(pred, 0, toks[0])
        assert pred.calibration.shift is None
        x = g.t["attn_norm-2"].reshape(-1)
        np.testing.assert_allclose(g.t["head_logits-2"].reshape(-1), ws[2] @ x + bs[2], rtol=1e-4, atol=1e-4)


def test_hooks_hand_each_hook_what_it_wants():
    class H(TensorHook):
        def __init__(self, pat):
            self.pat, self.got = pat, []

        def wants(self, name):
            return name.startswith(self.pat)

        def __call__(self, name, data):
            self.got.append(name)

    a, b = H("a"), H("b")
    hs = Hooks(a, b)
    assert hs.wants("a-1") and hs.wants("b-2") and not hs.wants("c-3")
    hs("a-1", np.zeros(1))
    hs("b-2", np.zeros(1))
    assert a.got == ["a-1"] and b.got == ["b-2"]


def test_calibrate_fill_moves_the_fill_bias_by_the_prompt_residual(tmp_path, model_path):
    """calibrate-fill: the linear fill's constant term becomes the file's plus the mean of
    (output - fill) over the prompt's last N tokens, as an independent recorder measures it, and
    the graph's fill rows of skipped heads are fill_w x + that; the setter's errors."""
    n_cal = 48
    with _measured_prompt_end(tmp_path, model_path, n_cal) as (eng, ref, toks, _, _):
        n_layer, n_head, d = eng.n_layer, eng.n_head, eng.n_embd // eng.n_head
        residual = [r.copy() for r in ref.fill_residual]
    _, fill = predictor_file.read_fill(tmp_path / "p.gguf")
    assert all(r.shape == (n_head * d,) and np.abs(r).max() > 1e-3 for r in residual)

    pred = get_predictor(f"trained:{tmp_path / 'p.gguf'}:topk=3:calibrate={n_cal}:calibrate-fill", model_path)
    assert pred.calibrate_fill and pred.name.endswith(f":calibrate={n_cal}:calibrate-fill+linear")
    g = _Graph(("attn_norm", "head_fill"))
    with open_engine(model_path, pred, n_ctx=256, n_threads=2) as eng:
        eng._hook.hooks += (g,)  # noqa: SLF001 - read the graph's fill rows too
        eng.prefill(toks)
        eng.set_sparse(True)
        g.t.clear()
        eng.predicted_step(pred, 0, toks[0])
        mask = pred.observed()
        for il in range(n_layer):
            x = g.t[f"attn_norm-{il}"].reshape(-1)
            want = (fill.w[il] @ x + fill.b[il] + residual[il]).reshape(n_head, d)
            got = g.t[f"head_fill-{il}"].reshape(n_head, d)
            off = mask[il] == 0
            assert off.any()
            np.testing.assert_allclose(got[off], want[off], rtol=1e-3, atol=1e-3)
        with pytest.raises(ValueError):
            eng.set_head_fill_bias(0, np.full(n_head * d, np.inf))
    with pytest.raises(ValueError, match="calibrate-fill goes with calibrate"):
        get_predictor(f"trained:{tmp_path / 'p.gguf'}:calibrate-fill", model_path)
