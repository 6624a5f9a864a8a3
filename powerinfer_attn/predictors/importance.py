"""Per-head importance: the norm of each head's contribution through ``wo``.

A head's output ``o_h`` (width d) reaches the residual stream only through the columns of
``wo`` that read it, so its contribution is ``wo[:, h*d:(h+1)*d] @ o_h`` and its importance
the norm of that vector. ``HeadContributions`` is a tensor hook that reads every layer's
``kqv_out-<il>`` (the heads side by side, before ``wo``) and computes these norms for the
last token of the batch, with ``wo`` dequantized from the GGUF once.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..engine.decode import TensorHook

_KQV_OUT = re.compile(r"^kqv_out-(\d+)$")
_ATTN_NORM = re.compile(r"^attn_norm-(\d+)$")


def load_wo(model_path: str | Path, n_layer: int) -> list[np.ndarray]:
    """Each layer's ``wo`` as float32 ``(n_embd, n_head*d)`` (out = wo @ heads)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(model_path))
    tensors = {t.name: t for t in reader.tensors}
    out = []
    for il in range(n_layer):
        t = tensors.get(f"blk.{il}.attn_output.weight")
        if t is None:
            raise ValueError(f"{model_path}: no blk.{il}.attn_output.weight")
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        out.append(w.reshape(int(t.shape[1]), int(t.shape[0])))
    return out


class HeadContributions(TensorHook):
    """Records, for every token of each decode, ``importance[token, il, h]``.

    ``last`` is the last token's ``[n_layer, n_head]``. ``active`` switches recording on and off.
    With ``moments``, it also sums over every token seen each head's contribution vector and
    its squared norm (``mean_explained``, ``mean_contribution``). With ``fill`` (a
    ``fill.HeadFill``), ``per_token_dev[kind]`` holds, for each fill the object has (``mean``,
    ``linear``), the norm of each contribution's deviation from what that fill would put in
    its place: what skipping the head then changes. Linear fill reads ``attn_norm-<il>`` too.
    """

    def __init__(self, model_path: str | Path, n_layer: int, n_head: int, moments: bool = False,
                 fill=None):
        self.wo = load_wo(model_path, n_layer)
        self.n_layer, self.n_head = n_layer, n_head
        self.per_token = np.zeros((0, n_layer, n_head), np.float32)
        self.fill = fill
        self.fill_kinds = [k for k in ("mean", "linear") if fill is not None and fill.has(k)]
        if fill is not None and fill.mean_post is not None and \
                fill.mean_post.shape != (n_layer, n_head, self.wo[0].shape[0]):
            raise ValueError(f"the fill's means must be [n_layer, n_head, n_embd], got {fill.mean_post.shape}")
        self.per_token_dev = {k: np.zeros((0, n_layer, n_head), np.float32) for k in self.fill_kinds}
        self.x: list[np.ndarray | None] = [None] * n_layer
        # with linear fill: per layer, the mean over the last call's tokens of output - fill
        self.fill_residual: list[np.ndarray | None] = [None] * n_layer
        self.active = True
        n_embd = self.wo[0].shape[0]
        self.tokens_seen = 0
        self.contrib_sum = np.zeros((n_layer, n_head, n_embd)) if moments else None
        self.energy_sum = np.zeros((n_layer, n_head)) if moments else None

    def mean_explained(self) -> np.ndarray:
        """``[n_layer, n_head]``: the share of each head's mean squared contribution that its
        mean contribution accounts for, ``|E c|^2 / E |c|^2``. Near 1, the head adds about the
        same vector at every token (dropping it then mostly removes a constant offset)."""
        mean, energy = self._moments()
        return (mean ** 2).sum(axis=-1) / np.maximum(energy, 1e-30)

    def mean_contribution(self) -> np.ndarray:
        """``[n_layer, n_head, n_embd]``: each head's mean contribution through ``wo``."""
        return self._moments()[0]

    def mean_explained_overall(self) -> float:
        """The same over all heads together: the share of the attention outputs' energy in their means."""
        mean, energy = self._moments()
        return float((mean ** 2).sum() / energy.sum())

    def _moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Each head's mean contribution ``[n_layer, n_head, n_embd]`` and mean squared norm."""
        if self.contrib_sum is None or self.tokens_seen == 0:
            raise ValueError("no moments recorded: make the hook with moments=True and run tokens through it")
        return self.contrib_sum / self.tokens_seen, self.energy_sum / self.tokens_seen

    @property
    def last(self) -> np.ndarray:
        return self.per_token[-1]

    def wants(self, name: str) -> bool:
        if not self.active:
            return False
        return _KQV_OUT.match(name) is not None or ("linear" in self.fill_kinds and _ATTN_NORM.match(name) is not None)

    def __call__(self, name: str, data: np.ndarray) -> None:
        m = _ATTN_NORM.match(name)
        if m is not None:
            self.x[int(m.group(1))] = data.reshape(-1, data.shape[-1]).copy()
            return
        il = int(_KQV_OUT.match(name).group(1))
        o = data.reshape(-1, data.shape[-1])  # (n_tokens, n_head*d)
        n_tokens, width = o.shape
        if il == 0 or self.per_token.shape[0] != n_tokens:
            self.per_token = np.zeros((n_tokens, self.n_layer, self.n_head), np.float32)
            self.per_token_dev = {k: np.zeros_like(self.per_token) for k in self.fill_kinds}
        d = width // self.n_head
        w = self.wo[il]
        residual = None  # output - linear fill
        if "linear" in self.fill_kinds:
            if self.x[il] is None or self.x[il].shape[0] != n_tokens:
                raise ValueError(f"{name}: no attn_norm-{il} of {n_tokens} tokens before it")
            residual = o - self.fill.outputs(il, self.x[il])
            self.fill_residual[il] = residual.mean(axis=0)
        for h in range(self.n_head):
            cols = slice(h * d, (h + 1) * d)
            contrib = o[:, cols] @ w[:, cols].T  # (n_tokens, n_embd)
            self.per_token[:, il, h] = np.linalg.norm(contrib, axis=1)
            if "mean" in self.fill_kinds:
                self.per_token_dev["mean"][:, il, h] = np.linalg.norm(contrib - self.fill.mean_post[il, h], axis=1)
            if residual is not None:
                self.per_token_dev["linear"][:, il, h] = np.linalg.norm(residual[:, cols] @ w[:, cols].T, axis=1)
            if self.contrib_sum is not None:
                self.contrib_sum[il, h] += contrib.sum(axis=0)
                self.energy_sum[il, h] += float((contrib.astype(np.float64) ** 2).sum())
        if il == 0 and self.contrib_sum is not None:
            self.tokens_seen += n_tokens


def mass_mask(importance: np.ndarray, fraction: float) -> np.ndarray:
    """Per layer, the fewest heads whose importance sums to at least ``fraction`` of the layer's total."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"mass fraction must be in (0, 1], got {fraction}")
    order = np.argsort(-importance, axis=1, kind="stable")
    sorted_imp = np.take_along_axis(importance, order, axis=1)
    total = sorted_imp.sum(axis=1, keepdims=True)
    cum = np.cumsum(sorted_imp, axis=1)
    # keep head j (in sorted order) while the mass before it is still short of the target
    before = cum - sorted_imp
    keep_sorted = before < fraction * total - 1e-12
    keep_sorted[:, 0] = True
    mask = np.zeros_like(importance, dtype=np.int32)
    np.put_along_axis(mask, order, keep_sorted.astype(np.int32), axis=1)
    return mask


def topk_mask(importance: np.ndarray, k: int) -> np.ndarray:
    """Per layer, the ``k`` most important heads."""
    n_head = importance.shape[1]
    if not 1 <= k <= n_head:
        raise ValueError(f"k must be in [1, {n_head}], got {k}")
    order = np.argsort(-importance, axis=1, kind="stable")[:, :k]
    mask = np.zeros_like(importance, dtype=np.int32)
    np.put_along_axis(mask, order, 1, axis=1)
    return mask
