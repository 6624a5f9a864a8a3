"""Predictors: before each sparse decode step, which heads of each layer run.

A predictor is any object with ``predict(state) -> mask`` where ``mask`` is
``[n_layer, n_head]`` of 0/1 (1 = head active). ``state`` is an
``engine.StepState`` (step index, position, token, engine).

Built-in, selectable by name with ``get_predictor``:

- ``all``: every head active. Costs nothing; the sparse path's exactness check
  (it must reproduce dense decoding).
- ``mask-file:PATH``: masks read from a ``.npy`` array ``[steps, n_layer, n_head]``;
  step i uses ``masks[i]``. Costs one array lookup per step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Predictor(Protocol):
    name: str

    def predict(self, state) -> np.ndarray: ...


class AllHeads:
    name = "all"

    def __init__(self, n_layer: int, n_head: int):
        self._mask = np.ones((n_layer, n_head), dtype=np.int32)

    def predict(self, state) -> np.ndarray:
        return self._mask


class MaskFile:
    def __init__(self, path: str | Path, n_layer: int, n_head: int):
        self.path = Path(path)
        self.name = f"mask-file:{self.path}"
        if not self.path.is_file():
            raise ValueError(f"mask file not found: {self.path}")
        try:
            masks = np.load(self.path, allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{self.path} is not a .npy array: {e}") from e
        if masks.ndim != 3 or masks.shape[1:] != (n_layer, n_head):
            raise ValueError(f"{self.path}: mask array must have shape (steps, {n_layer}, {n_head}), got {masks.shape}")
        if not (np.issubdtype(masks.dtype, np.integer) or masks.dtype == np.bool_) or not np.isin(masks, (0, 1)).all():
            raise ValueError(f"{self.path}: masks must be integer or bool 0/1 values")
        self.masks = masks.astype(np.int32)

    def predict(self, state) -> np.ndarray:
        if state.step >= len(self.masks):
            raise ValueError(f"{self.path} holds masks for {len(self.masks)} steps; step {state.step} was asked for")
        return self.masks[state.step]


NAMES = ("all", "mask-file:PATH")


def get_predictor(spec: str, n_layer: int, n_head: int) -> Predictor:
    """A predictor from its command-line name."""
    kind, _, arg = spec.partition(":")
    if kind == "all" and not arg:
        return AllHeads(n_layer, n_head)
    if kind == "mask-file" and arg:
        return MaskFile(arg, n_layer, n_head)
    raise ValueError(f"unknown predictor {spec!r}; choose from: {', '.join(NAMES)}")
