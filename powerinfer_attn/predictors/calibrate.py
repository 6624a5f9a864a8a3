"""Shift a trained predictor's per-head biases to the text at hand, from the prompt.

Why: off its training text a trained predictor loses most of its edge, and the data says where
(docs/results-cpu.md, "Off its training text"): a few heads whose linear fill stands in well
on the training mix stand in badly on another kind of text (Qwen2.5-Coder's layer 4 head 8 is
the top head of its layer at 1% of the mix's tokens and at 25% of the essays'), and the
predictor, which learnt them as heads that rarely matter, still drops them. Their level moved
with the text; the order the predictor gives within a head's own tokens mostly did not.

The prompt is prefilled densely anyway, so each head's deviation from its fill can be measured
on the last prompt tokens: ``n_tokens`` of them are decoded again, densely, with a recorder on
(``HeadContributions``), and each head's bias moves by the mean gap between its training target
(``log`` of that deviation) and its logit there, less the layer's mean gap (density control
sets the layer's level). Pinned heads keep their bias. The file's biases come back at each new
answer whose prompt is too short to measure on. With ``fill_bias``, the linear fill's constant
term also moves by the mean residual of the heads' outputs there (output - fill), so that what
skipped heads get follows the text's level too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .importance import HeadContributions
from .predictor_file import read_fill, read_weights

MIN_TOKENS = 32  # fewer prompt tokens than this: the file's own biases
_EPS = 1e-6


def bias_shift(ws: list[np.ndarray], bs: list[np.ndarray], xs: list[np.ndarray], dev: np.ndarray,
               frozen: np.ndarray) -> list[np.ndarray]:
    """Per layer, ``[n_head]`` to add to the biases: the mean over the tokens of ``log(dev) -
    (W x + b)``, centred over the heads not ``frozen`` (which get 0). ``xs[il]`` is ``[N,
    n_embd]``, ``dev`` ``[N, n_layer, n_head]`` (each head's deviation from its fill), ``frozen``
    ``[n_layer, n_head]`` bool."""
    out = []
    for il, (w, b) in enumerate(zip(ws, bs)):
        gap = (np.log(dev[:, il] + _EPS) - (xs[il] @ w.T + b)).mean(axis=0)
        free = ~frozen[il]
        shift = np.zeros_like(gap, dtype=np.float32)
        if free.any():
            shift[free] = gap[free] - gap[free].mean()
        out.append(shift)
    return out


class PromptCalibration:
    """Measures on the last ``n_tokens`` of the prompt in the engine and sets the shifted biases
    (``Engine.set_head_bias``). ``hook`` must be in the engine's tensor hook."""

    def __init__(self, path: Path, model_path: Path, n_layer: int, n_head: int, n_tokens: int,
                 pinned: list[list[int]] | None = None, fill_bias: bool = False):
        if n_tokens < MIN_TOKENS:
            raise ValueError(f"calibration needs at least {MIN_TOKENS} prompt tokens, got {n_tokens}")
        self.n_tokens = n_tokens
        self.ws, self.bs = read_weights(path)
        kind, fill = read_fill(path)
        if kind != "linear":
            raise ValueError(f"{path}: calibration measures the deviation from a linear fill; the file has {kind} fill")
        self.kind: str = kind
        self.fill_bias, self.fill_b = fill_bias, fill.b
        self.frozen = np.zeros((n_layer, n_head), bool)
        for il, h in pinned or []:
            self.frozen[il, h] = True
        # with a linear fill it also keeps each layer's attn_norm rows: the predictor's input
        self.hook = HeadContributions(model_path, n_layer, n_head, fill=fill)
        self.hook.active = False
        self.shift: list[np.ndarray] | None = None  # what the last calibration added

    def run(self, engine) -> bool:
        """Calibrate on the engine's prompt (its last ``n_tokens`` positions) and set the biases;
        with too short a prompt, or one whose tokens the engine does not know, set the file's.
        True when it calibrated."""
        # one ubatch, so that the recorder sees every token in one call per layer
        n = min(self.n_tokens, engine.n_past, engine.n_ubatch)
        if n < MIN_TOKENS or len(engine.tokens) != engine.n_past:
            self.shift = None
            self._set(engine, self.bs)
            if self.fill_bias:
                self._set_fill(engine, list(self.fill_b))
            return False
        start = engine.n_past - n
        tokens = engine.tokens[start:]
        was_sparse = engine.sparse
        engine.rollback(start)
        engine.set_sparse(False)
        self.hook.active = True
        try:
            engine.prefill(tokens)  # the same tokens at the same positions: the same cells, to the batch split's rounding
        finally:
            self.hook.active = False
            engine.set_sparse(was_sparse)
        dev = self.hook.per_token_dev[self.kind]
        self.shift = bias_shift(self.ws, self.bs, [self.hook.x[il] for il in range(len(self.ws))], dev, self.frozen)
        self._set(engine, [b + s for b, s in zip(self.bs, self.shift)])
        if self.fill_bias:
            self._set_fill(engine, [b + r for b, r in zip(self.fill_b, self.hook.fill_residual)])
        return True

    @staticmethod
    def _set_fill(engine, biases: list[np.ndarray]) -> None:
        for il, b in enumerate(biases):
            engine.set_head_fill_bias(il, b)

    @staticmethod
    def _set(engine, biases: list[np.ndarray]) -> None:
        for il, b in enumerate(biases):
            engine.set_head_bias(il, b)


__all__ = ["MIN_TOKENS", "PromptCalibration", "bias_shift"]
