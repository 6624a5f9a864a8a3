"""Predictors around another one: window fill for the heads it skips (``:fill=window:S+W``) and a
token budget for the heads it keeps (``:budget=N``)."""

from __future__ import annotations

import numpy as np

from ..engine.decode import Predictor, PredictorBase, as_predictor
from ..native.bindings import KV_DENSE_LAYERS, KV_PAGE, KV_RECENT, KV_SCORE, KV_SINK


class _Wrapper(PredictorBase):
    """A predictor around another: decides the heads through it, adds an engine setting in bind."""

    def _wrap(self, inner: Predictor, name: str) -> None:
        self.inner, self.name = as_predictor(inner), name
        self.in_graph, self.hook = self.inner.in_graph, self.inner.hook

    def predict(self, state):
        return self.inner.predict(state)

    def restart(self, engine) -> None:
        self.inner.restart(engine)

    def begin(self, engine) -> None:
        self.inner.begin(engine)

    def observed(self) -> np.ndarray:
        return self.inner.observed()


class WindowFill(_Wrapper):
    """Any predictor, with window fill for the heads it skips (``Engine.set_head_window``)."""

    def __init__(self, inner: Predictor, n_sink: int, n_recent: int):
        if n_sink < 0 or n_recent < 0 or n_sink + n_recent == 0:
            raise ValueError(f"window fill: S and W must be >= 0 and not both 0 (got {n_sink}+{n_recent})")
        if getattr(inner, "fill", None) is not None and getattr(inner, "fill_kind", "zero") != "zero":
            raise ValueError(f"{inner.name} already has a fill; window fill replaces it, give one or the other")
        self.n_sink, self.n_recent = n_sink, n_recent
        self._wrap(inner, f"{inner.name}+window:{n_sink}+{n_recent}")

    def bind(self, engine) -> None:
        self.inner.bind(engine)
        engine.set_head_window(self.n_sink, self.n_recent)


class KVBudget(_Wrapper):
    """Any predictor, with a token budget for the heads it keeps (``Engine.set_kv_budget``): each
    KV group's active heads read about ``budget`` cells, pages chosen in the graph per step."""

    def __init__(self, inner: Predictor, budget: int, page: int = KV_PAGE, n_sink: int = KV_SINK,
                 n_recent: int = KV_RECENT, n_dense_layers: int = KV_DENSE_LAYERS, score: str = KV_SCORE,
                 spread: float = 0.0, rerank: int = 0):
        if budget < 1:
            raise ValueError(f"a token budget is a number of cells >= 1 (got {budget}); leave :budget= out for none")
        self.budget, self.page, self.n_sink, self.n_recent = budget, page, n_sink, n_recent
        self.n_dense_layers, self.score, self.spread, self.rerank = n_dense_layers, score, spread, rerank
        self._wrap(inner, f"{inner.name}+budget:{budget}" + (f"/{score}" if score != KV_SCORE else "")
                   + (f"{spread:g}" if spread else "") + (f"/page{page}" if page != KV_PAGE else "")
                   + (f"/rerank{rerank}" if rerank else ""))

    def bind(self, engine) -> None:
        self.inner.bind(engine)
        engine.set_kv_budget(self.budget, self.page, self.n_sink, self.n_recent, self.n_dense_layers, self.score,
                             self.spread, self.rerank)

    def __getattr__(self, name):  # what callers read from the inner predictor (fill, targets, ...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
