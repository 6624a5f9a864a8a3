"""The oracle: each step's heads from their measured importance on a dense step of the same state,
then rolled back (``oracle:P``, ``oracle-topk:K``). A quality bound, never a speed mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..engine.hooks import DeferredHook
from .basic import _Shaped
from .importance import HeadContributions, mass_mask, topk_mask
from .predictor_file import read_fill


class Oracle(_Shaped):
    """Measures importance on a dense step of the current state, rolls it back, then selects.
    With ``fill_from`` (a predictor file holding a fill) skipped heads get that fill and the
    importance is each contribution's deviation from it."""

    def __init__(self, model_path: str | Path, fraction: float | None = None, k: int | None = None,
                 fill_from: str | Path | None = None):
        self.fraction, self.k = fraction, k
        self.model_path = model_path
        self.fill_path = Path(fill_from) if fill_from else None
        self.fill_kind, self.fill = "zero", None
        if self.fill_path is not None:
            if not self.fill_path.is_file():
                raise ValueError(f"predictor file {self.fill_path} not found")
            self.fill_kind, self.fill = read_fill(self.fill_path)
            if self.fill_kind == "zero":
                raise ValueError(f"{self.fill_path} holds no fill (train-predictor --fill mean|linear writes one)")
        self.name = (f"oracle:{fraction:g}" if fraction is not None else f"oracle-topk:{k}") + \
            ("" if self.fill is None else f"+{self.fill_kind}")
        self.hook = DeferredHook()

    def bind(self, engine) -> None:
        super().bind(engine)
        if self.k is not None and not 1 <= self.k <= self.n_head:
            raise ValueError(f"oracle-topk:{self.k}: K must be in [1, {self.n_head}]")
        if self.fill is not None:
            engine.load_head_predictor(self.fill_path)  # checks that it fits the model
            engine.set_head_fill(self.fill_kind)
        self.hook.inner = HeadContributions(engine.model_path, engine.n_layer, engine.n_head, fill=self.fill)
        self.hook.inner.active = False

    def predict(self, state) -> np.ndarray:
        eng, hook = state.engine, self.hook.inner
        was_sparse = eng.sparse
        eng.set_sparse(False)
        hook.active = True
        try:
            eng.step(state.token)
        finally:
            hook.active = False
            eng.rollback(state.position)
            eng.set_sparse(was_sparse)
        imp = hook.last if self.fill is None else hook.per_token_dev[self.fill_kind][-1]
        return mass_mask(imp, self.fraction) if self.fraction is not None else topk_mask(imp, self.k)
