"""The correctness oracle for sparse decode: stock dense attention whose inactive heads'
outputs are zeroed.

``ZeroedHeads`` is a tensor hook for a dense engine: right after llama.cpp computes a
layer's attention output before ``wo``, ``kqv_out-<il>`` (ggml ``[d*n_head, n_tokens]``, the
heads side by side; the same tensor with or without flash attention), it zeroes the slices
of the heads the mask marks inactive. Everything else is the unpatched dense graph, so a
sparse decode with the same mask must give the same logits up to float rounding.

``FilledHeads`` and ``LinearFilledHeads`` are the oracles for mean and linear fill
(``Engine.set_head_fill``): the inactive heads' slices get given vectors (their mean outputs),
or linear fill's prediction from the layer's input, instead of zeros. ``WindowedHeads`` is the
one for window fill (``Engine.set_head_window``): an inactive head's slice is its attention
computed in numpy over the first S and the last W tokens only.
"""

from __future__ import annotations

import re

import numpy as np

from .decode import TensorHook

_KQV_OUT = re.compile(r"^kqv_out-(\d+)$")


class ZeroedHeads(TensorHook):
    def __init__(self, n_layer: int, n_head: int):
        self.mask = np.ones((n_layer, n_head), dtype=np.int32)
        self.n_head = n_head
        self.seen = 0

    def wants(self, name: str) -> bool:
        return _KQV_OUT.match(name) is not None

    def __call__(self, name: str, data: np.ndarray) -> None:
        il = int(_KQV_OUT.match(name).group(1))
        # numpy (1, 1, n_tokens, n_head*d)
        width = data.shape[-1]
        if width % self.n_head:
            raise ValueError(f"{name}: width {width} is not a multiple of {self.n_head} heads")
        heads = data.reshape(data.shape[:-1] + (self.n_head, width // self.n_head))
        if (self.mask[il] == 0).any():
            heads[..., self.mask[il] == 0, :] = self.fill_for(il)
        self.seen += 1

    def fill_for(self, il: int):
        return 0.0


class FilledHeads(ZeroedHeads):
    """Inactive heads' outputs replaced by ``fill[il, h]`` (``[n_layer, n_head, d]``, before ``wo``)."""

    def __init__(self, n_layer: int, n_head: int, fill: np.ndarray):
        super().__init__(n_layer, n_head)
        if fill.ndim != 3 or fill.shape[:2] != (n_layer, n_head):
            raise ValueError(f"fill must be [n_layer, n_head, d], got {fill.shape}")
        self.fill = fill.astype(np.float32)

    def fill_for(self, il: int):
        return self.fill[il, self.mask[il] == 0]


_ATTN_NORM = re.compile(r"^attn_norm-(\d+)$")


class LinearFilledHeads(ZeroedHeads):
    """Inactive heads' outputs replaced by linear fill's ``w[il] @ x + b[il]`` (their slices),
    ``x`` the layer's ``attn_norm`` output of the same token (``fill.HeadFill``)."""

    def __init__(self, n_layer: int, n_head: int, fill):
        super().__init__(n_layer, n_head)
        self.head_fill = fill
        self.x: list = [None] * n_layer

    def wants(self, name: str) -> bool:
        return super().wants(name) or _ATTN_NORM.match(name) is not None

    def __call__(self, name: str, data: np.ndarray) -> None:
        m = _ATTN_NORM.match(name)
        if m is not None:
            self.x[int(m.group(1))] = data.reshape(-1, data.shape[-1]).copy()
            return
        super().__call__(name, data)

    def fill_for(self, il: int):
        x = self.x[il]
        if x is None or x.shape[0] != 1:
            raise ValueError("linear fill is for single-token decode steps")
        out = self.head_fill.outputs(il, x)[0].reshape(self.n_head, -1)
        return out[self.mask[il] == 0]


_QKV_CUR = re.compile(r"^([QKV])cur-(\d+)$")


class WindowedHeads(ZeroedHeads):
    """Inactive heads' outputs replaced by their attention over the first ``n_sink`` and the last
    ``n_recent`` tokens of the sequence (the current one included), softmax over those only.
    It keeps every token's K and V (``Kcur``/``Vcur``, after RoPE, rounded to F16 as the cache
    stores them) from a fresh context on: one sequence, cells in position order, scale 1/sqrt(d).
    ``round_q``: round q to F16 first, as CPU flash attention does (the CUDA kernels keep it to
    22 bits)."""

    def __init__(self, n_layer: int, n_head: int, n_sink: int, n_recent: int, round_q: bool = True):
        super().__init__(n_layer, n_head)
        self.n_sink, self.n_recent, self.round_q = n_sink, n_recent, round_q
        self.cur: list[dict] = [{} for _ in range(n_layer)]
        self.keys: list[list] = [[] for _ in range(n_layer)]
        self.values: list[list] = [[] for _ in range(n_layer)]

    def wants(self, name: str) -> bool:
        return super().wants(name) or _QKV_CUR.match(name) is not None

    def __call__(self, name: str, data: np.ndarray) -> None:
        m = _QKV_CUR.match(name)
        if m is not None:
            # the last tensor of that name in the layer is the one attention reads (after RoPE)
            self.cur[int(m.group(2))][m.group(1)] = data.reshape(-1, data.shape[-2], data.shape[-1]).copy()
            return
        self.remember(int(_KQV_OUT.match(name).group(1)))
        super().__call__(name, data)

    def remember(self, il: int) -> None:
        """Keep layer il's K and V of the step (at its attention output, when they are final)."""
        cur = self.cur[il]
        self.keys[il].extend(cur["K"].astype(np.float16).astype(np.float64))
        self.values[il].extend(cur["V"].astype(np.float16).astype(np.float64))

    def fill_for(self, il: int):
        q = self.cur[il]["Q"]
        if q.shape[0] != 1:
            raise ValueError("window fill is for single-token decode steps")
        k, v = np.stack(self.keys[il]), np.stack(self.values[il])  # [n, n_head_kv, d]
        n, n_head_kv, d = k.shape
        cells = sorted(set(range(min(self.n_sink, n))) | set(range(max(0, n - self.n_recent), n)))
        out = []
        for h in np.flatnonzero(self.mask[il] == 0):
            g = h // (self.n_head // n_head_kv)
            qh = q[0, h].astype(np.float16) if self.round_q else q[0, h]
            s = k[cells, g] @ qh.astype(np.float64) / np.sqrt(d)
            p = np.exp(s - s.max())
            out.append((p / p.sum()) @ v[cells, g])
        return np.array(out, np.float32).reshape(-1, d)
