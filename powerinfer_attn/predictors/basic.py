"""The predictors that need no model of their own: every head (``all``), none (``none``, with
window fill the StreamingLLM baseline), random heads (``random:K``), the calibrated top K
(``static:K``) and masks read from a file (``mask-file:PATH``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..engine.decode import PredictorBase
from .importance import topk_mask


class _Shaped(PredictorBase):
    n_layer = n_head = 0

    def bind(self, engine) -> None:
        self.n_layer, self.n_head = engine.n_layer, engine.n_head


class AllHeads(_Shaped):
    name = "all"

    def predict(self, state) -> np.ndarray:
        return np.ones((self.n_layer, self.n_head), np.int32)


class NoHeads(_Shaped):
    """No head: with window fill (``none:fill=window:S+W``) every head attends over the sinks and
    the recent window only, the StreamingLLM baseline."""
    name = "none"

    def predict(self, state) -> np.ndarray:
        return np.zeros((self.n_layer, self.n_head), np.int32)


class RandomHeads(_Shaped):
    def __init__(self, k: int, seed: int = 0):
        self.k, self.seed = k, seed
        self.name = f"random:{k}"
        self.rng = np.random.default_rng(seed)

    def bind(self, engine) -> None:
        super().bind(engine)
        if not 1 <= self.k <= self.n_head:
            raise ValueError(f"random:{self.k}: K must be in [1, {self.n_head}]")

    def predict(self, state) -> np.ndarray:
        scores = self.rng.random((self.n_layer, self.n_head))
        return topk_mask(scores, self.k)


class StaticHeads(_Shaped):
    def __init__(self, k: int, path: str | Path):
        self.k, self.path = k, Path(path)
        self.name = f"static:{k}"
        if not self.path.is_file():
            raise ValueError(f"static:{k}: calibration file {self.path} not found; run `powerinfer-attn calibrate`")
        self.calibration = json.loads(self.path.read_text())
        self.importance = np.array(self.calibration["importance"], np.float32)

    def bind(self, engine) -> None:
        super().bind(engine)
        if self.importance.shape != (self.n_layer, self.n_head):
            raise ValueError(f"{self.path} was calibrated for {self.importance.shape} heads, "
                             f"the model has ({self.n_layer}, {self.n_head})")
        if self.calibration.get("model_name") != engine.model_path.name:
            raise ValueError(f"{self.path} was calibrated on {self.calibration.get('model_name')}, "
                             f"not {engine.model_path.name}")
        if not 1 <= self.k <= self.n_head:
            raise ValueError(f"static:{self.k}: K must be in [1, {self.n_head}]")
        self.mask = topk_mask(self.importance, self.k)

    def predict(self, state) -> np.ndarray:
        return self.mask


class MaskFile(_Shaped):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = f"mask-file:{self.path}"
        if not self.path.is_file():
            raise ValueError(f"mask file not found: {self.path}")
        try:
            masks = np.load(self.path, allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{self.path} is not a .npy array: {e}") from e
        if masks.ndim != 3:
            raise ValueError(f"{self.path}: mask array must have shape (steps, n_layer, n_head), got {masks.shape}")
        if not (np.issubdtype(masks.dtype, np.integer) or masks.dtype == np.bool_) or not np.isin(masks, (0, 1)).all():
            raise ValueError(f"{self.path}: masks must be integer or bool 0/1 values")
        self.masks = masks.astype(np.int32)

    def bind(self, engine) -> None:
        super().bind(engine)
        if self.masks.shape[1:] != (self.n_layer, self.n_head):
            raise ValueError(f"{self.path}: mask array must have shape (steps, {self.n_layer}, {self.n_head}), "
                             f"got {self.masks.shape}")

    def predict(self, state) -> np.ndarray:
        if state.step >= len(self.masks):
            raise ValueError(f"{self.path} holds masks for {len(self.masks)} steps; step {state.step} was asked for")
        return self.masks[state.step]
