"""Choosing the next token from logits, as llama-cli does: greedy at temperature 0 (the default
here, so that dense and sparse runs compare token by token), otherwise top-k, then top-p
(nucleus) over the softmax at the temperature, drawn from a seeded generator."""

from __future__ import annotations

import numpy as np


class Sampler:
    def __init__(self, temp: float = 0.0, top_k: int = 40, top_p: float = 0.95, seed: int | None = None):
        if temp < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
            raise ValueError(f"sampling needs temp >= 0, top_k >= 0 (0: all) and top_p in (0, 1]; got {temp}, {top_k}, {top_p}")
        self.temp, self.top_k, self.top_p = temp, top_k, top_p
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.temp == 0.0:
            return int(np.argmax(logits))
        x = logits.astype(np.float64) / self.temp
        order = np.argsort(-x, kind="stable")
        if self.top_k:
            order = order[:self.top_k]
        p = np.exp(x[order] - x[order[0]])
        p /= p.sum()
        # the fewest most likely tokens whose mass reaches top_p
        keep = int(np.searchsorted(np.cumsum(p), self.top_p) + 1)
        order, p = order[:keep], p[:keep] / p[:keep].sum()
        return int(order[self.rng.choice(len(order), p=p)])
