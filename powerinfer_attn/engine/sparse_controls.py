"""The sparse controls of an ``Engine``: sparse decode on and off, head masks, the in-graph
predictor (its file, rule, density and fill), window fill, the token budget, and what says which
parts of which layers could not run sparse. A mixin: ``Engine`` holds the context they act on."""

from __future__ import annotations

import ctypes
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from ..native import bindings as B
from ..native.bindings import KV_DENSE_LAYERS, KV_PAGE, KV_PAGES, KV_RECENT, KV_SCORE, KV_SCORES, KV_SINK, EngineError


class SparseFallbackWarning(UserWarning):
    """Sparse decode is on, but some parts of some layers run on the dense op (see
    ``Engine.layer_ops``): the result is still exact, those parts are just not skipped."""


class SparseControls:
    """Needs from the engine: ``C`` (the bindings), ``ctx``, ``model_path``, ``n_layer``, ``n_head``,
    ``n_gpu_layers``, ``rpc``, ``flash_attn``, ``cache_types``, ``repack``, ``_check_open()``, and the
    state it keeps here (``_head_predictor``, ``_warned_fallback``, ``kv_budget``)."""

    def set_sparse(self, enabled: bool) -> None:
        """Build single-token decode with the sparse attention ops (prefill stays dense).

        Other architectures than llama, qwen2 and qwen3 are refused (EngineError). Parts of layers that the sparse
        ops cannot serve stay on the dense op, which is exact but skips nothing: the first time
        that happens a ``SparseFallbackWarning`` says which (see ``layer_ops``)."""
        self._check_open()
        if not hasattr(self.C, "llama_set_sparse_attn"):
            if enabled:
                raise EngineError("this is a stock llama.cpp library: no sparse attention")
            return
        rc = self.C.llama_set_sparse_attn(self.ctx, bool(enabled))
        if rc != 0:
            raise EngineError(f"sparse attention is not supported for {self.model_path.name} "
                              f"(llama, qwen2 and qwen3 architectures only; llama_set_sparse_attn returned {rc})")
        if enabled and not self._warned_fallback:
            self._warned_fallback = True
            msg = self.fallback_summary()
            if msg:
                warnings.warn(SparseFallbackWarning(msg), stacklevel=2)
            self._warn_off_gpu_kernel("sparse attention")

    sparse_min_ctx = 0

    def set_sparse_min_ctx(self, n: int) -> None:
        """Decode a token at a position below ``n`` with the stock graph even when sparse is on
        (at short context the sparse graph costs more than it skips; ``crossover`` measures
        where); from ``n`` on, with the sparse one. 0: sparse at every position. The switch is
        in the library (``llama_set_sparse_attn_min_pos``), so it holds for a ``Llama`` too."""
        self._check_open()
        if n < 0:
            raise ValueError(f"sparse_min_ctx must be >= 0 (got {n})")
        if not hasattr(self.C, "llama_set_sparse_attn_min_pos"):
            if n:
                raise EngineError("this library has no sparse minimum position (rebuild: powerinfer-attn build)")
            return
        if self.C.llama_set_sparse_attn_min_pos(self.ctx, int(n)) != 0:
            raise EngineError(f"llama_set_sparse_attn_min_pos refused {n}")
        self.sparse_min_ctx = int(n)

    def next_step_sparse(self) -> bool:
        """Whether the next single-token step runs the sparse graph."""
        return self.sparse and self.n_past >= self.sparse_min_ctx

    def _warn_off_gpu_kernel(self, what: str) -> None:
        """Warn when the head-masked attention of layers on a GPU cannot run there (its kernel,
        ggml-cuda.patch, needs flash attention and F16 or Q8_0 K and V)."""
        # (RPC servers run every op: a CPU server runs these kernels where the layer is)
        if self.n_gpu_layers == 0 or self.rpc or (self.flash_attn and self.cache_types in (("f16", "f16"), ("q8_0", "q8_0"))):
            return
        warnings.warn(SparseFallbackWarning(
            f"{what} on a GPU needs flash attention and an F16 or Q8_0 cache (K and V alike); with flash "
            f"attention {'on' if self.flash_attn else 'off'} and {'/'.join(self.cache_types)} caches llama.cpp's "
            f"scheduler runs it on the CPU and copies each GPU layer's K/V cache there every step (exact, but slow)"),
            stacklevel=3)

    @property
    def sparse(self) -> bool:
        self._check_open()
        return bool(self.C.llama_get_sparse_attn(self.ctx))

    def check_mask(self, mask) -> np.ndarray:
        """Validate a head mask [n_layer, n_head] of 0/1 and return it as contiguous int32."""
        m = np.asarray(mask)
        if m.shape != (self.n_layer, self.n_head):
            raise ValueError(f"head mask must have shape (n_layer, n_head) = ({self.n_layer}, {self.n_head}), got {m.shape}")
        if m.dtype == np.bool_:
            m = m.astype(np.int32)
        elif not np.issubdtype(m.dtype, np.integer):
            raise ValueError(f"head mask must be integer or bool, got {m.dtype}")
        if not np.isin(m, (0, 1)).all():
            raise ValueError("head mask values must be 0 or 1")
        return np.ascontiguousarray(m, dtype=np.int32)

    def set_mask(self, mask) -> None:
        """The activated_head mask for the following decode steps (it may be set before
        ``set_sparse(True)``; all heads are active until the first call)."""
        self._check_open()
        m = self.check_mask(mask)
        ptr = m.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        rc = self.C.llama_set_activated_heads(self.ctx, ptr, m.size)
        if rc != 0:
            why = B.SET_HEADS_ERRORS.get(rc, "unknown error")
            raise EngineError(f"llama_set_activated_heads returned {rc} ({why}) for {self.model_path.name}")

    def load_head_predictor(self, path: str | os.PathLike) -> None:
        """Load a trained head predictor (GGUF sidecar from ``train-predictor``) into the context.
        It runs only after ``use_head_predictor(True)``."""
        self._check_open()
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"head predictor not found: {p}")
        if not hasattr(self.C, "llama_head_predictor_load"):
            raise EngineError("this library has no in-graph head predictor (rebuild: powerinfer-attn build)")
        rc = self.C.llama_head_predictor_load(self.ctx, str(p).encode())
        if rc != 0:
            why = B.PREDICTOR_LOAD_ERRORS.get(rc, "unknown error")
            raise EngineError(f"{p}: llama_head_predictor_load returned {rc}: {why}")
        self._head_predictor = p

    def set_head_rule(self, rule: str, value: float | None = None) -> None:
        """The loaded predictor's selection rule: ``file`` (its own), ``threshold``, ``topk`` or ``mass``."""
        self._check_open()
        if rule not in B.RULE_IDS:
            raise ValueError(f"unknown rule {rule!r}; choose from {', '.join(B.RULE_IDS)}")
        if rule != "file" and value is None:
            raise ValueError(f"rule {rule} needs a value")
        rc = self.C.llama_head_predictor_set_rule(self.ctx, B.RULE_IDS[rule], float(value or 0.0))
        if rc == -1:
            raise EngineError("no head predictor loaded")
        if rc != 0:
            raise ValueError(f"bad value {value} for rule {rule} (topk: a whole number in [1, {self.n_head}]; "
                             f"mass: a fraction in (0, 1])")

    def set_head_density(self, targets: Sequence[float] | None, gain: float = 0.0) -> None:
        """Density control of the loaded predictor's threshold rule: after each layer's selection
        the threshold moves by ``gain * (share kept - targets[il])``, so the mean density over the
        steps tracks ``targets`` (per layer, in (0, 1]) on any text and at any context length;
        ``None`` turns it off. The controller starts from the rule's own threshold."""
        self._check_open()
        if self._head_predictor is None:
            raise EngineError("no head predictor loaded (load_head_predictor)")
        if targets is None:
            rc = self.C.llama_head_predictor_set_density(self.ctx, None, 0, 0.0)
        else:
            t = np.ascontiguousarray(targets, dtype=np.float32)
            if t.shape != (self.n_layer,) or not ((t > 0) & (t <= 1)).all() or not gain > 0:
                raise ValueError(f"density control takes {self.n_layer} targets in (0, 1] and a gain > 0")
            rc = self.C.llama_head_predictor_set_density(self.ctx, t.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                                         self.n_layer, float(gain))
        if rc != 0:
            raise EngineError(f"llama_head_predictor_set_density returned {rc} (density control needs the threshold rule)")

    def set_head_bias(self, il: int, bias) -> None:
        """Replace layer ``il``'s bias in the loaded predictor (``n_head`` values; the next step
        uses it). Loading the file again restores its own."""
        self._check_open()
        if self._head_predictor is None:
            raise EngineError("no head predictor loaded (load_head_predictor)")
        b = np.ascontiguousarray(bias, dtype=np.float32)
        if not 0 <= il < self.n_layer or b.shape != (self.n_head,) or not np.isfinite(b).all():
            raise ValueError(f"a bias is {self.n_head} finite values for a layer in [0, {self.n_layer})")
        rc = self.C.llama_head_predictor_set_bias(self.ctx, int(il), b.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                                  self.n_head)
        if rc != 0:
            raise EngineError(f"llama_head_predictor_set_bias returned {rc}")

    def set_head_fill_bias(self, il: int, bias) -> None:
        """Replace layer ``il``'s linear fill constant term in the loaded predictor (``n_head *
        head width`` values). Loading the file again restores its own."""
        self._check_open()
        if self._head_predictor is None:
            raise EngineError("no head predictor loaded (load_head_predictor)")
        b = np.ascontiguousarray(bias, dtype=np.float32)
        if not 0 <= il < self.n_layer or b.ndim != 1 or not np.isfinite(b).all():
            raise ValueError(f"a fill bias is one row of finite values for a layer in [0, {self.n_layer})")
        rc = self.C.llama_head_predictor_set_fill_bias(self.ctx, int(il), b.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                                       int(b.size))
        if rc != 0:
            raise EngineError(f"llama_head_predictor_set_fill_bias returned {rc}"
                              + (" (the predictor file has no linear fill)" if rc == -3 else ""))

    def head_stats(self, reset: bool = True) -> tuple[int, int]:
        """(heads kept, heads chosen among) by the loaded in-graph predictor since it was loaded
        or last reset: their ratio is the density of those steps, with no eval callback."""
        self._check_open()
        kept, total = ctypes.c_int64(0), ctypes.c_int64(0)
        if self._head_predictor is None or \
                self.C.llama_head_predictor_stats(self.ctx, ctypes.byref(kept), ctypes.byref(total), bool(reset)) != 0:
            raise EngineError("no head predictor loaded (load_head_predictor)")
        return int(kept.value), int(total.value)

    def use_head_predictor(self, enabled: bool) -> None:
        """Sparse decode takes its masks from the loaded predictor, computed in the graph (True),
        or from ``set_mask`` (False)."""
        self._check_open()
        if enabled and self._head_predictor is None:
            raise EngineError("no head predictor loaded (load_head_predictor)")
        if hasattr(self.C, "llama_set_head_predictor"):
            self.C.llama_set_head_predictor(self.ctx, bool(enabled))

    def set_head_fill(self, fill: str) -> None:
        """What a head that sparse decode skips contributes, whichever source the mask comes
        from: ``zero`` (nothing, the default), ``mean`` or ``linear`` (``predictors/fill.py``), read from
        the loaded predictor's file."""
        self._check_open()
        if fill not in B.FILL_IDS:
            raise ValueError(f"unknown fill {fill!r}; choose from {', '.join(B.FILL_IDS)}")
        if fill != "zero" and self._head_predictor is None:
            raise EngineError(f"{fill} fill needs a head predictor file that holds it (load_head_predictor)")
        if not hasattr(self.C, "llama_set_head_fill"):
            if fill != "zero":
                raise EngineError("this library has no head fills (rebuild: powerinfer-attn build)")
            return
        rc = self.C.llama_set_head_fill(self.ctx, B.FILL_IDS[fill])
        if rc == -3:
            raise EngineError(f"{self._head_predictor} holds no {fill} fill (train-predictor --fill {fill} writes it)")
        if rc != 0:
            raise EngineError(f"llama_set_head_fill returned {rc}")

    def set_head_window(self, n_sink: int, n_recent: int) -> None:
        """Window fill: a head that sparse decode skips still attends, over the first ``n_sink``
        and the last ``n_recent`` KV cells only (wq and wo then run dense). Replaces the fill of
        ``set_head_fill``; ``set_head_fill("zero")`` turns it off. Needs no predictor file."""
        self._check_open()
        if n_sink < 0 or n_recent < 0 or n_sink + n_recent == 0:
            raise ValueError(f"window fill needs n_sink, n_recent >= 0, not both 0 (got {n_sink}, {n_recent})")
        if not hasattr(self.C, "llama_set_head_window"):
            raise EngineError("this library has no window fill (rebuild: powerinfer-attn build)")
        rc = self.C.llama_set_head_window(self.ctx, int(n_sink), int(n_recent))
        if rc != 0:
            raise EngineError(f"llama_set_head_window returned {rc}")
        self._warn_off_gpu_kernel("window fill's attention")

    def set_kv_budget(self, budget: int, page: int = KV_PAGE, n_sink: int = KV_SINK, n_recent: int = KV_RECENT,
                      n_dense_layers: int = KV_DENSE_LAYERS, score: str = KV_SCORE, spread: float = 0.0,
                      rerank: int = 0) -> None:
        """Token budget: in sparse decode each KV group's active heads read only about ``budget``
        cached cells, the pages of ``page`` cells whose bound on q.k is highest, always with the
        pages of the first ``n_sink`` and last ``n_recent`` cells the token sees (chosen in the
        graph per step and layer); the first ``n_dense_layers`` layers read every cell. A budget
        that covers the context reads all of it, as without one; ``0`` turns it off. With or without
        flash attention (its head-masked kernel reads only the pages, on the CPU and on a GPU, where
        it needs an F16 or Q8_0 cache as head sparsity does). ``score``: how a page is scored for a
        group (``bindings.KV_SCORES``: summed over its heads, or each head's best pages first).
        ``spread`` (score ``mid`` only): add that share of each page's spread along q to its
        midpoint estimate, from 0 (the midpoint) to 1 (the bound). ``rerank`` (2 to 16, F16 K cache):
        the score picks ``rerank`` times the budget, then each head's exact largest q.k over those
        pages' keys picks the budget's pages (the keys of the larger selection are read once)."""
        self._check_open()
        if budget < 0 or n_sink < 0 or n_recent < 0 or n_dense_layers < 0:
            raise ValueError(f"kv budget: budget, sinks, recent cells and dense layers must be >= 0 "
                             f"(got {budget}, {n_sink}, {n_recent}, {n_dense_layers})")
        if score not in KV_SCORES:
            raise ValueError(f"kv budget: score is one of {', '.join(KV_SCORES)} (got {score!r})")
        if not 0.0 <= spread <= 1.0 or (spread and score != "mid"):
            raise ValueError(f"kv budget: spread is in [0, 1] and goes with the mid score (got {spread!r} with {score})")
        if page not in KV_PAGES:
            raise ValueError(f"kv budget: page must be one of {', '.join(map(str, KV_PAGES))} cells (got {page})")
        if rerank and not 2 <= rerank <= 16:
            raise ValueError(f"kv budget: rerank is a factor from 2 to 16, or 0 for none (got {rerank})")
        if not hasattr(self.C, "llama_set_kv_budget"):
            raise EngineError("this library has no token budget (rebuild: powerinfer-attn build)")
        if budget:
            self._warn_off_gpu_kernel("the token budget's attention")
        rc = self.C.llama_set_kv_budget(self.ctx, int(budget), int(page), int(n_sink), int(n_recent), int(n_dense_layers))
        if rc != 0:
            raise EngineError(f"llama_set_kv_budget returned {rc}: {' '.join(B.recent_errors()[-1:])}")
        if not hasattr(self.C, "llama_set_kv_budget_score"):
            if score != KV_SCORE:
                raise EngineError("this library has no page scores but the sum (rebuild: powerinfer-attn build)")
        elif self.C.llama_set_kv_budget_score(self.ctx, KV_SCORES[score]) != 0:
            raise EngineError(f"llama_set_kv_budget_score refused {score}")
        if hasattr(self.C, "llama_set_kv_budget_spread"):
            if self.C.llama_set_kv_budget_spread(self.ctx, float(spread)) != 0:
                raise EngineError(f"llama_set_kv_budget_spread refused {spread}")
        elif spread:
            raise EngineError("this library has no page spread (rebuild: powerinfer-attn build)")
        if budget and rerank and self.n_gpu_layers and not self.rpc:
            warnings.warn(SparseFallbackWarning(
                "re-ranking's exact page score has no GPU kernel: llama.cpp's scheduler runs it on the CPU and "
                "copies each GPU layer's K cache there every step (exact, but slow)"), stacklevel=2)
        if hasattr(self.C, "llama_set_kv_budget_rerank"):
            rc = self.C.llama_set_kv_budget_rerank(self.ctx, int(rerank) if budget else 0)
            if rc != 0:
                raise EngineError(f"llama_set_kv_budget_rerank returned {rc}: {' '.join(B.recent_errors()[-1:])}")
        elif rerank:
            raise EngineError("this library has no re-ranking (rebuild: powerinfer-attn build)")
        self.kv_budget = (int(budget), int(page), int(n_sink), int(n_recent), int(n_dense_layers)) if budget else None
        self.kv_budget_score = score
        self.kv_budget_spread = float(spread)
        self.kv_budget_rerank = int(rerank) if budget else 0

    def layer_ops(self) -> list[int]:
        """Per layer, which parts run sparse: bit 1 wq, 2 K*q and softmax*V, 4 wo, 8 when wq or
        wo is on a GPU, where it runs the stock product by design (its bit clear), and 16 when the
        in-graph predictor is on with this layer's part of it on a GPU (its selection and fills
        run there); -1 for every
        layer of a model the sparse ops do not support (an architecture other than llama, qwen2, qwen3)."""
        self._check_open()
        return [int(self.C.llama_sparse_attn_layer_ops(self.ctx, il)) for il in range(self.n_layer)]

    def fallback_summary(self) -> str | None:
        """What runs dense in sparse mode and why, in words; None when everything runs sparse."""
        ops = self.layer_ops()
        parts = []
        for bit, what in ((B.OP_WQ, "wq"), (B.OP_WO, "wo")):
            layers = [il for il, o in enumerate(ops) if o >= 0 and not o & (bit | B.OP_ON_DEVICE)]
            if layers:
                parts.append(f"{what} in {_layer_ranges(layers)} ({self._fallback_reason(what, layers[0])})")
        if not parts:
            return None
        return (f"{self.model_path.name}: sparse attention runs the dense op for " + "; ".join(parts) +
                ". Decode stays exact, but those parts skip no work.")

    def _fallback_reason(self, what: str, il: int) -> str:
        repacked = "repacked for this CPU; Engine(repack=False) keeps it sparse"
        if what == "wq":
            return repacked if self.repack else "a fused wqkv or a LoRA adapter on it"
        info = _gguf_tensor(self.model_path, f"blk.{il}.attn_output.weight")
        if info is not None:
            type_name, block, ne0 = info
            head_dim = ne0 // self.n_head
            if head_dim % block:
                return f"it is {type_name}, whose {block}-value blocks do not fit a head width of {head_dim}"
        return repacked if self.repack else "its head width is not whole blocks of its type"


def _gguf_tensor(path: Path, name: str) -> tuple[str, int, int] | None:
    """(type name, values per block, ne0) of a tensor in a GGUF file, or None if unreadable."""
    try:
        from gguf import GGML_QUANT_SIZES, GGUFReader

        for t in GGUFReader(path).tensors:
            if t.name == name:
                return t.tensor_type.name, GGML_QUANT_SIZES[t.tensor_type][0], int(t.shape[0])
    except Exception:  # only used to word a warning
        return None
    return None


def _layer_ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> 'layers 0-2, 5'."""
    runs: list[list[int]] = []
    for il in layers:
        if runs and runs[-1][1] == il - 1:
            runs[-1][1] = il
        else:
            runs.append([il, il])
    word = "layer" if len(layers) == 1 else "layers"
    return word + " " + ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)
