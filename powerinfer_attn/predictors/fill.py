"""What a head that sparse decode skips contributes instead of nothing, and how that is fitted.

- ``zero``: nothing (the sparse ops' own result).
- ``mean``: the head's mean contribution through ``wo``, ``mean_post[il, h]`` (``[n_embd]``),
  added after ``wo``. Many heads add nearly the same vector at every token.
- ``linear``: the head's output predicted from the layer's ``attn_norm`` output ``x``,
  ``w[il] @ x + b[il]`` (``[n_head*d]``, the skipped heads' slices), put in place of the
  output before a dense ``wo``. It also follows heads whose output tracks the current token.

``FillFitter`` is a tensor hook that accumulates, per layer, the sums a ridge regression from
``x`` to the attention output before ``wo`` (``kqv_out``) needs, over dense batches; ``fit``
turns them into a ``HeadFill`` holding both fills. Only sums are kept, so memory does not grow
with the number of tokens.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from ..engine.decode import TensorHook
from .importance import load_wo

_NAMED = re.compile(r"^(attn_norm|kqv_out)-(\d+)$")


@dataclasses.dataclass
class HeadFill:
    """Per layer: ``mean_post [n_layer, n_head, n_embd]`` (mean fill), ``w [n_layer, n_head*d,
    n_embd]`` and ``b [n_layer, n_head*d]`` (linear fill); either part may be None."""

    mean_post: np.ndarray | None = None
    w: np.ndarray | None = None
    b: np.ndarray | None = None

    def has(self, kind: str) -> bool:
        return kind == "zero" or (kind == "mean" and self.mean_post is not None) or \
            (kind == "linear" and self.w is not None)

    def outputs(self, il: int, x: np.ndarray) -> np.ndarray:
        """Linear fill's outputs ``[n_tokens, n_head*d]`` for the layer's inputs ``x [n_tokens, n_embd]``."""
        return x.astype(np.float32) @ self.w[il].T + self.b[il]

    def save(self, path: Path) -> None:
        np.savez(path, **{k: v for k, v in dataclasses.asdict(self).items() if v is not None})

    @classmethod
    def load(cls, path: Path) -> "HeadFill":
        with np.load(path) as z:
            return cls(**{k: z[k] for k in z.files})


# The linear fill's ridge strength. scripts/fill-ridge.py (figures/domains/fill-ridge.json): a fill
# fitted on WikiText left 0.440 of the heads' output energy on held-out WikiText at 100 against
# 0.438 at 10, and less on every other kind (essays 0.631 against 0.653, code 0.734 against
# 0.800); 1000 and more lose everywhere.
FILL_RIDGE = 100.0


class FillFitter(TensorHook):
    """Accumulates per layer ``sum x``, ``sum o``, ``X^T X`` and ``X^T O`` (float64) from
    ``attn_norm-<il>`` (x) and ``kqv_out-<il>`` (o, the heads side by side before ``wo``)."""

    def __init__(self, n_layer: int):
        self.n_layer = n_layer
        self.x: list[np.ndarray | None] = [None] * n_layer
        self.n = np.zeros(n_layer)
        self.sx = self.so = self.sxx = self.sxo = None

    def wants(self, name: str) -> bool:
        return _NAMED.match(name) is not None

    def __call__(self, name: str, data: np.ndarray) -> None:
        what, il = _NAMED.match(name).group(1), int(_NAMED.match(name).group(2))
        rows = data.reshape(-1, data.shape[-1]).astype(np.float64)
        if what == "attn_norm":
            self.x[il] = rows
            return
        x = self.x[il]
        if x is None or x.shape[0] != rows.shape[0]:
            raise ValueError(f"{name}: no attn_norm-{il} of {rows.shape[0]} tokens before it")
        if self.sx is None:
            e, o = x.shape[1], rows.shape[1]
            self.sx, self.so = np.zeros((self.n_layer, e)), np.zeros((self.n_layer, o))
            self.sxx, self.sxo = np.zeros((self.n_layer, e, e)), np.zeros((self.n_layer, e, o))
        self.n[il] += len(x)
        self.sx[il] += x.sum(axis=0)
        self.so[il] += rows.sum(axis=0)
        self.sxx[il] += x.T @ x
        self.sxo[il] += x.T @ rows
        self.x[il] = None

    def fit(self, model_path: str | Path, n_head: int, lam: float = FILL_RIDGE) -> HeadFill:
        """Both fills: the mean output through ``wo``, and the ridge regression ``o ~ w x + b``
        (``lam`` on ``w`` only)."""
        if self.sx is None or self.n.min() < 2:
            raise ValueError("no tokens seen: run dense batches through the hook first")
        wo = load_wo(model_path, self.n_layer)
        n_embd = self.sx.shape[1]
        width = self.so.shape[1]
        d = width // n_head
        mean_post = np.zeros((self.n_layer, n_head, wo[0].shape[0]), np.float32)
        w = np.zeros((self.n_layer, width, n_embd), np.float32)
        b = np.zeros((self.n_layer, width), np.float32)
        for il in range(self.n_layer):
            n = self.n[il]
            mx, mo = self.sx[il] / n, self.so[il] / n
            cxx = self.sxx[il] - n * np.outer(mx, mx)
            cxo = self.sxo[il] - n * np.outer(mx, mo)
            cxx[np.diag_indices_from(cxx)] += lam
            wl = np.linalg.solve(cxx, cxo).T  # [width, n_embd]
            w[il] = wl
            b[il] = mo - wl @ mx
            for h in range(n_head):
                mean_post[il, h] = wo[il][:, h * d:(h + 1) * d] @ mo[h * d:(h + 1) * d]
        return HeadFill(mean_post=mean_post, w=w, b=b)
