"""Pure-Python pieces: head selection rules, bench masks, scoring windows."""

import numpy as np
import pytest

from powerinfer_attn.evaluation.bench import heads_for_density
from powerinfer_attn.predictors.importance import mass_mask, topk_mask
from powerinfer_attn.engine.text import log_softmax, window_starts


def test_mass_mask_keeps_fewest_heads_covering_fraction():
    imp = np.array([[5.0, 3.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    assert mass_mask(imp, 0.5).tolist() == [[1, 0, 0, 0], [1, 1, 0, 0]]
    assert mass_mask(imp, 0.8).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert mass_mask(imp, 0.9).tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert mass_mask(imp, 1.0).sum() == 8
    # at least one head per layer, even for a layer with no mass
    assert mass_mask(np.zeros((1, 3)), 0.5).sum() == 1
    with pytest.raises(ValueError):
        mass_mask(imp, 0.0)


def test_mass_mask_covers_fraction_property():
    rng = np.random.default_rng(0)
    for _ in range(200):
        imp = rng.random((3, 9)) ** 3
        p = rng.uniform(0.05, 1.0)
        m = mass_mask(imp, p)
        kept = (imp * m).sum(1)
        assert np.all(kept >= p * imp.sum(1) - 1e-9)
        # minimal: dropping the weakest kept head falls short
        for il in range(3):
            weakest = imp[il][m[il] == 1].min()
            if m[il].sum() > 1:
                assert kept[il] - weakest < p * imp[il].sum() + 1e-9


def test_topk_mask():
    imp = np.array([[0.1, 0.9, 0.5], [3.0, 2.0, 1.0]])
    assert topk_mask(imp, 2).tolist() == [[0, 1, 1], [1, 1, 0]]
    with pytest.raises(ValueError):
        topk_mask(imp, 4)


def test_heads_for_density_plain_and_gqa():
    m = heads_for_density(0.5, 2, 9, 3)
    assert m.shape == (2, 9) and m.sum(1).tolist() == [4, 4]  # round(4.5) = 4 (banker's rounding)
    # plain spreads over the 3 KV groups of 3 query heads
    groups = m[0].reshape(3, 3).sum(1)
    assert groups.max() - groups.min() <= 1
    g = heads_for_density(1 / 3, 1, 9, 3, gqa=True)
    assert g[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]  # one whole group
    assert heads_for_density(1.0, 1, 9, 3).sum() == 9
    with pytest.raises(ValueError):
        heads_for_density(0.0, 1, 9, 3)


def test_window_starts():
    s = window_starts(1000, 100, 5)
    assert s[0] == 500 and s[-1] == 900 and len(s) == 5
    assert all(b > a for a, b in zip(s, s[1:]))
    assert window_starts(1000, 100, 2, first_half=True) == [0, 400]
    with pytest.raises(ValueError, match="too short"):
        window_starts(100, 100, 2)


def test_log_softmax():
    x = np.array([[1.0, 2.0, 3.0], [1000.0, 1000.0, 0.0]])
    ls = log_softmax(x)
    np.testing.assert_allclose(np.exp(ls).sum(1), 1.0)
    np.testing.assert_allclose(ls[1, 0], np.log(0.5))


def test_stdlib_text_is_fixed_code():
    from powerinfer_attn.engine.text import STDLIB_MODULES, stdlib_text

    text, found = stdlib_text()
    assert found == [m for m in STDLIB_MODULES if m in found] and len(found) >= 20
    assert text.startswith(f"# ---- {found[0]}.py\n") and "def " in text and len(text) > 500_000
    assert stdlib_text(("argparse", "no_such_module"))[1] == ["argparse"]
    # split by module, as WikiText is split by article
    from powerinfer_attn.engine.text import split_articles, training_articles

    arts = split_articles(text)
    assert [a[2] for a in arts] == [f"{m}.py" for m in found] and arts[0][0] == 0 and arts[-1][1] == len(text)
    train = training_articles(text)
    assert 0 < len(train) < len(found) and train[-1][1] <= 0.45 * len(text)
    with pytest.raises(ValueError, match="none of the modules"):
        stdlib_text(("no_such_module",))


def test_sampler():
    from powerinfer_attn.engine.sampling import Sampler

    logits = np.array([0.0, 3.0, 2.9, -1.0, 2.0])
    assert Sampler()(logits) == 1  # temperature 0: greedy
    assert Sampler(temp=1.0, top_k=1)(logits) == 1
    assert Sampler(temp=1.0, top_p=0.01)(logits) == 1  # the nucleus is the top token
    draws = [Sampler(temp=1.0, seed=s)(logits) for s in range(200)]
    assert set(draws) <= {0, 1, 2, 3, 4} and {1, 2, 4} <= set(draws)
    assert set(Sampler(temp=1.0, top_k=2, seed=0)(logits) for _ in range(50)) <= {1, 2}
    a, b = Sampler(temp=0.8, seed=7), Sampler(temp=0.8, seed=7)
    assert [a(logits) for _ in range(20)] == [b(logits) for _ in range(20)]
    with pytest.raises(ValueError, match="top_p"):
        Sampler(top_p=0.0)


def test_a_users_predictor_object_gets_the_optional_parts_explicitly():
    from powerinfer_attn.engine.decode import PredictorBase, as_predictor
    from powerinfer_attn.predictors.basic import AllHeads
    from powerinfer_attn.predictors.wrappers import KVBudget

    class Mine:  # only what Predictor asks
        name = "mine"

        def bind(self, engine):
            self.bound = engine

        def predict(self, state):
            return np.ones((1, 2), np.int32)

    mine = Mine()
    p = as_predictor(mine)
    assert isinstance(p, PredictorBase) and p.name == "mine" and not p.in_graph and p.hook is None
    p.restart(None)  # nothing to forget
    p.bind("engine")
    assert mine.bound == "engine" and p.predict(None).shape == (1, 2)
    with pytest.raises(TypeError, match="not an in-graph predictor"):
        p.observed()
    ours = AllHeads()
    assert as_predictor(ours) is ours and as_predictor(None) is None
    assert KVBudget(mine, 64).name == "mine+budget:64"  # a wrapper takes a user's object too
    with pytest.raises(TypeError, match="needs name, bind"):
        as_predictor(object())
