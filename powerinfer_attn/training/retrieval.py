"""Retrieval heads: the heads that copy a token from far back in the context.

A head that retrieves (an induction head) attends from a token to the token that followed its
earlier occurrence, and copies it. Such heads are few, their work shows on few tokens (a name, a
number, a key asked for again), and a predictor that reads the layer input cannot see those
tokens coming; dropped, the model loses what it read thousands of tokens back while perplexity
barely moves. They are found without any test text: a run ``R`` of random tokens is followed by
``R`` again, and while the second copy is decoded each head's attention on the cell after the
first occurrence of the current token (``kq_soft_max``, dense decode) is its score. The copy is
``distance`` tokens back, so heads that only look at recent tokens score near zero.

``pin`` writes a predictor file whose selection always keeps chosen heads (their bias raised
far above any threshold); density control then spends the rest of each layer's budget on the
other heads.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Callable

import numpy as np

from ..engine.decode import Engine, TensorHook

_SOFTMAX = re.compile(r"^kq_soft_max-(\d+)$")

# added to a pinned head's predictor bias: far past any threshold or density control's reach
PIN_BIAS = 1.0e4


class _Attention(TensorHook):
    """Each layer's attention weights of the last decode step: ``[n_head, n_kv]``."""

    def __init__(self):
        self.active = False
        self.probs: dict[int, np.ndarray] = {}

    def wants(self, name: str) -> bool:
        return self.active and _SOFTMAX.match(name) is not None

    def __call__(self, name: str, data: np.ndarray) -> None:
        il = int(_SOFTMAX.match(name).group(1))
        self.probs[il] = data.reshape(data.shape[-3] if data.ndim >= 3 else 1, -1).copy()


@dataclasses.dataclass
class RetrievalScores:
    scores: np.ndarray      # [n_layer, n_head]: mean attention on the copy target
    distances: list[int]    # how far back the copies were
    steps: int              # decode steps scored per distance and sequence
    sequences: int

    def top(self, k: int) -> np.ndarray:
        """A 0/1 ``[n_layer, n_head]`` mask of the ``k`` highest-scoring heads of the model."""
        flat = np.argsort(-self.scores, axis=None, kind="stable")[:k]
        mask = np.zeros(self.scores.shape, np.int32)
        mask.flat[flat] = 1
        return mask

    def to_json(self) -> dict:
        return {"scores": self.scores.round(5).tolist(), "distances": self.distances, "steps": self.steps,
                "sequences": self.sequences}


def measure(model_path: Path, distances: list[int], steps: int = 32, sequences: int = 2, threads: int | None = None,
            vocab_tokens: list[int] | None = None, seed: int = 0,
            progress: Callable[[int], None] | None = None) -> RetrievalScores:
    """Induction scores of every head, averaged over ``sequences`` random runs per distance and
    ``steps`` decode steps of each second copy. ``vocab_tokens``: the tokens to draw the runs
    from (default: every token id the model has, except the first 256)."""
    if steps < 1 or sequences < 1 or not distances or min(distances) <= steps:
        raise ValueError("retrieval heads: steps >= 1, sequences >= 1, and distances longer than steps")
    n_ctx = max(distances) + steps + 8
    rng = np.random.default_rng(seed)
    hook = _Attention()
    with Engine(model_path, n_ctx=n_ctx, n_threads=threads, tensor_hook=hook) as eng:
        pool = np.asarray(vocab_tokens if vocab_tokens else range(256, eng.n_vocab), np.int64)
        total = np.zeros((eng.n_layer, eng.n_head))
        n = 0
        for dist in distances:
            for _ in range(sequences):
                run = [int(t) for t in rng.choice(pool, size=dist)]
                # BOS, the run, the run again: the copy of token i sits dist cells after it
                first = eng.tokenize("", add_bos=True) + run
                lead = 4  # a few tokens of the second copy so that the pattern has started
                eng.reset()
                eng.prefill(first + run[:lead])
                hook.active = True
                try:
                    for i in range(lead, lead + steps):
                        eng.step(run[i])
                        # query token run[i] (second copy); the token that followed its first
                        # occurrence, the one to copy next, is run[i + 1]'s cell
                        for il in range(eng.n_layer):
                            total[il] += hook.probs[il][:, len(first) - dist + 1 + i]
                        n += 1
                finally:
                    hook.active = False
                if progress:
                    progress(1)
    return RetrievalScores(total / n, list(distances), steps, sequences)


def format_top(res: RetrievalScores, n: int = 12) -> str:
    """The ``n`` highest-scoring heads, one line each, under a line saying how they were measured."""
    s = res.scores
    order = np.argsort(-s, axis=None, kind="stable")[:n]
    lines = [f"attention on the copy target, {res.sequences} runs x {res.steps} steps at distances {res.distances} "
             f"(median head {np.median(s):.4f})"]
    for i in order:
        il, h = divmod(int(i), s.shape[1])
        lines.append(f"  layer {il:2d} head {h:2d}: {s[il, h]:.3f}")
    return "\n".join(lines)


def pin(pred_path: Path, out: Path, mask: np.ndarray) -> list[list[int]]:
    """A copy of the predictor file ``pred_path`` that always keeps the heads of ``mask``;
    returns them as ``[layer, head]`` pairs."""
    from ..predictors.predictor_file import read_metadata, rewrite_biases

    meta = read_metadata(pred_path)
    if (int(meta["n_layer"]), int(meta["n_head"])) != mask.shape:
        raise ValueError(f"{pred_path} is for {meta['n_layer']}x{meta['n_head']} heads, the mask is {mask.shape}")
    pinned = [[int(il), int(h)] for il, h in zip(*np.nonzero(mask))]
    rewrite_biases(pred_path, out, lambda il, b: b + PIN_BIAS * mask[il], note={"pinned_heads": pinned})
    return pinned
