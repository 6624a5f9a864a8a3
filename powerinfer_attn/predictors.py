"""Predictors: before each sparse decode step, which heads of each layer run.

A predictor is anything with ``engine.Predictor``'s protocol: a ``name``, ``bind(engine)``
(called once the engine exists; checks that the predictor fits the model) and ``predict(state)
-> mask`` with ``mask`` ``[n_layer, n_head]`` of 0/1 (1 = head active); ``state`` is an
``engine.StepState``. A predictor that needs to watch the graph has a ``hook`` (an
``engine.TensorHook``) that the engine must be built with.

Built-in, by name (``get_predictor``), with what each costs per decode step:

- ``all``: every head. Nothing. The sparse path's exactness check.
- ``none:fill=window:S+W``: no head, every one windowed (below): the sinks-and-window-only
  baseline (StreamingLLM) that keeps perplexity and loses retrieval. Nothing.
- ``random:K[:SEED]``: K heads per layer drawn at random every step (seeded). A few
  microseconds. The floor any real predictor must beat.
- ``static:K[:FILE]``: the K heads of each layer with the highest mean importance on a
  calibration text (``powerinfer-attn calibrate``, stored as a small JSON file). Nothing.
- ``oracle:P`` / ``oracle-topk:K``: per token, the heads whose importance (norm of the
  contribution through ``wo``) covers fraction P of the layer's total, or the top K,
  measured on a dense step of the same state that is then rolled back. It costs a whole
  dense step plus the graph switch: an upper bound on quality, never a speed mode.
  ``:fill=PRED.gguf`` adds the fill that file holds (``fill.py``, mean or linear): skipped
  heads contribute what it predicts, and importance is the deviation from that (named
  ``oracle:P+mean`` or ``oracle:P+linear``).
- ``mask-file:PATH``: masks from a ``.npy`` array ``[steps, n_layer, n_head]``; step i uses
  ``masks[i]``. An array lookup.
- ``trained:PRED.gguf[:RULE=VALUE][:fill=zero]``: the predictor from ``train-predictor``,
  computed inside the decode graph (``in_graph``): one small matrix-vector product and a
  selection per layer, no Python per step. RULE (threshold, topk, mass) overrides the file's
  rule; ``density=D`` keeps the file's rule at the value that gave density D on the held-out
  data (0.30, 0.35, ..., 1.00), and for the threshold rule turns on density control
  (``Engine.set_head_density``): the threshold follows the text so that the mean density stays
  at D, each layer at its held-out share, at any context length (``gain=G`` sets its speed,
  ``gain=0`` keeps the fixed held-out threshold). A file trained with a fill runs with it
  (named ``...+mean`` or ``...+linear``); ``fill=zero`` turns it off. Its ``hook`` reads back the masks the graph chose (``observed``).
  Without the file (``trained``, ``trained:density=0.7``) it is the one ``prepare`` stored for
  the model (``prepared_predictor_path``).

Any of them may end with ``:fill=window:S+W`` (``WindowFill``): a head the predictor skips still
attends, but over the first S and the last W KV cells only, instead of contributing nothing
(``Engine.set_head_window``; wq and wo then run dense). It replaces a trained file's own fill;
an oracle still ranks heads by their whole contribution.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .bindings import FILLS, KV_PAGE, KV_RECENT, KV_SINK
from .engine import Predictor
from .importance import HeadContributions, mass_mask, topk_mask
from .model import cache_dir
from .predictor_file import read_fill, read_metadata


class _Shaped:
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
        self.hook = _DeferredHook()

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


class _DeferredHook:
    """The engine needs its hook at construction, before the predictor can be bound."""

    inner: HeadContributions | None = None

    def wants(self, name: str) -> bool:
        return self.inner is not None and self.inner.wants(name)

    def __call__(self, name, data) -> None:
        self.inner(name, data)


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


class _MaskReader:
    """Tensor hook: the ``head_mask-<il>`` tensors the in-graph predictor computed in the last step."""

    def __init__(self):
        self.mask: np.ndarray | None = None

    def wants(self, name: str) -> bool:
        return self.mask is not None and name.startswith("head_mask-")

    def __call__(self, name, data) -> None:
        self.mask[int(name.rpartition("-")[2])] = data.reshape(-1)


class TrainedHeads(_Shaped):
    in_graph = True

    def __init__(self, path: str | Path, rule: str | None = None, value: float | None = None,
                 fill: str | None = None, gain: float | None = None):
        self.path, self.rule, self.value = Path(path), rule, value
        self.targets: list[float] | None = None  # density control's per-layer targets
        self.gain = 0.0
        if not self.path.is_file():
            raise ValueError(f"trained predictor file not found: {self.path}; run `powerinfer-attn train-predictor`")
        try:
            self.meta = read_metadata(self.path)
        except Exception as e:
            raise ValueError(f"{self.path} is not a GGUF head predictor: {e}") from e
        if self.meta.get("kind") != "linear":
            raise ValueError(f"{self.path} is not a head predictor (no head_predictor.kind)")
        if fill is not None and fill not in FILLS:
            raise ValueError(f"unknown fill {fill!r}; choose from {', '.join(FILLS)}")
        own = self.meta.get("fill", "zero")
        if fill not in (None, "zero", own):
            raise ValueError(f"{self.path} was trained with {own} fill: it runs with that or fill=zero, not {fill}")
        self.fill = fill or own
        if gain is not None and (rule != "density" or gain < 0):
            raise ValueError("gain=G (>= 0) goes with density=D")
        self.name = (f"trained:{self.path.name}" + (f":{rule}={value:g}" if rule else "")
                     + (f":gain={gain:g}" if gain is not None else "")
                     + ("" if self.fill == "zero" else f"+{self.fill}"))
        if rule == "density":
            # the file's rule, at the value that gave this density on the held-out data
            training = self.meta["training"]
            table = training.get("value_for_density", {})
            key = f"{value:.2f}"
            if key not in table:
                raise ValueError(f"{self.path}: no held-out value for density {value:g}; it has {', '.join(table)}")
            self.rule, self.value = self.meta["rule"], float(table[key])
            # and, for the threshold rule, density control holds the mean density there on any text
            self.gain = DENSITY_GAIN if gain is None else gain
            if self.rule == "threshold" and self.gain > 0:
                per_layer = training.get("layer_density_for_density", {}).get(key)
                n_layer = int(self.meta["n_layer"])
                self.targets = [min(1.0, max(float(t), 1e-3)) for t in per_layer] if per_layer else [value] * n_layer
        self.hook = _MaskReader()

    def bind(self, engine) -> None:
        super().bind(engine)
        if self.meta.get("model_name") != engine.model_path.name:
            raise ValueError(f"{self.path} was trained for {self.meta.get('model_name')}, not {engine.model_path.name}")
        engine.load_head_predictor(self.path)
        if self.rule:
            engine.set_head_rule(self.rule, self.value)
        if self.targets is not None:
            engine.set_head_density(self.targets, self.gain)
        engine.use_head_predictor(True)
        engine.set_head_fill(self.fill)
        self.hook.mask = np.zeros((self.n_layer, self.n_head), np.int32)

    def restart(self, engine) -> None:
        """Density control from the rule's own threshold again, as for a new text: one request's
        answer then does not depend on what was decoded before it (a server's other requests)."""
        if self.targets is not None:
            engine.set_head_density(self.targets, self.gain)

    def predict(self, state) -> None:
        return None  # the graph decides

    def observed(self) -> np.ndarray:
        """The masks of the last decode step, as the graph computed them."""
        return self.hook.mask.copy()


class _Wrapper:
    """A predictor around another: decides the heads through it, adds an engine setting in bind."""

    def _wrap(self, inner: Predictor, name: str) -> None:
        self.inner, self.name = inner, name
        self.in_graph = getattr(inner, "in_graph", False)
        if hasattr(inner, "hook"):
            self.hook = inner.hook

    def predict(self, state):
        return self.inner.predict(state)

    def restart(self, engine) -> None:
        if hasattr(self.inner, "restart"):
            self.inner.restart(engine)

    def observed(self) -> np.ndarray:
        return self.inner.observed()


class WindowFill(_Wrapper):
    """Any predictor, with window fill for the heads it skips (``Engine.set_head_window``)."""

    def __init__(self, inner: Predictor, n_sink: int, n_recent: int):
        if n_sink < 0 or n_recent < 0 or n_sink + n_recent == 0:
            raise ValueError(f"window fill: S and W must be >= 0 and not both 0 (got {n_sink}+{n_recent})")
        if getattr(inner, "fill", None) is not None and getattr(inner, "fill_kind", "zero") != "zero":
            raise ValueError(f"{inner.name} already has a fill; window fill replaces it, give one or the other")
        self.n_sink, self.n_recent = n_sink, n_recent
        self._wrap(inner, f"{inner.name}+window:{n_sink}+{n_recent}")

    def bind(self, engine) -> None:
        self.inner.bind(engine)
        engine.set_head_window(self.n_sink, self.n_recent)


class KVBudget(_Wrapper):
    """Any predictor, with a token budget for the heads it keeps (``Engine.set_kv_budget``): each
    KV group's active heads read about ``budget`` cells, pages chosen in the graph per step."""

    def __init__(self, inner: Predictor, budget: int, page: int = KV_PAGE, n_sink: int = KV_SINK,
                 n_recent: int = KV_RECENT):
        if budget < 1:
            raise ValueError(f"a token budget is a number of cells >= 1 (got {budget}); leave :budget= out for none")
        self.budget, self.page, self.n_sink, self.n_recent = budget, page, n_sink, n_recent
        self._wrap(inner, f"{inner.name}+budget:{budget}")

    def bind(self, engine) -> None:
        self.inner.bind(engine)
        engine.set_kv_budget(self.budget, self.page, self.n_sink, self.n_recent)

    def __getattr__(self, name):  # what callers read from the inner predictor (fill, targets, ...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


NAMES = ("all", "none:fill=window:S+W", "random:K[:SEED]", "static:K[:FILE]", "oracle:P[:fill=PRED.gguf]", "oracle-topk:K[:fill=PRED.gguf]",
         "mask-file:PATH", "trained[:PRED.gguf][:RULE=VALUE][:gain=G][:fill=zero]", "any of them + :fill=window:S+W",
         "any of them + :budget=N (cells per KV group)")

_WINDOW = re.compile(r":fill=window:(\d+)\+(\d+)$")

# density control's step per layer, in logits per unit of density error (trained:...:density=D)
DENSITY_GAIN = 0.05


def with_budget(spec: str, kv_budget: int) -> str:
    """``spec`` with ``:budget=kv_budget`` unless it has a budget of its own or kv_budget is 0."""
    return spec if not kv_budget or ":budget=" in spec else spec + f":budget={kv_budget}"


def add_option(spec: str, option: str) -> str:
    """``spec`` with ``:option`` added, before a window fill, which must stay last."""
    window = _WINDOW.search(spec)
    return spec + f":{option}" if window is None else spec[:window.start()] + f":{option}" + spec[window.start():]


def default_calibration_path(model_path: str | Path) -> Path:
    return cache_dir() / "calibration" / (Path(model_path).name + ".json")


def prepared_predictor_path(model_path: str | Path) -> Path:
    """Where `prepare` stores the model's predictor, and where ``trained`` without a file looks."""
    return cache_dir() / "predictors" / (Path(model_path).stem + ".gguf")


_BUDGET = re.compile(r":budget=([^:]*)")


def get_predictor(spec: str, model_path: str | Path) -> Predictor:
    """A predictor from its command-line name (see the module doc). Call ``bind(engine)`` next."""
    budgets = _BUDGET.findall(spec)
    if budgets:
        if len(budgets) > 1 or not budgets[0].isdigit():
            raise ValueError(f"bad predictor {spec!r}: a token budget is one :budget=N, N a number of cells")
        return KVBudget(get_predictor(_BUDGET.sub("", spec), model_path), int(budgets[0]))
    window = _WINDOW.search(spec)
    if window:
        base = spec[:window.start()]
        inner = (NoHeads() if base == "none" else
                 get_predictor(base + (":fill=zero" if base.startswith("trained:") else ""), model_path))
        return WindowFill(inner, int(window.group(1)), int(window.group(2)))
    if ":fill=window" in spec:
        raise ValueError(f"bad predictor {spec!r}: window fill is :fill=window:S+W (two integers), at the end")
    kind, _, arg = spec.partition(":")
    try:
        if kind == "all" and not arg:
            return AllHeads()
        if kind == "none" and not arg:  # with window fill it returned above
            raise ValueError("none keeps no head: it needs window fill, none:fill=window:S+W")
        if kind == "random" and arg:
            k, _, seed = arg.partition(":")
            return RandomHeads(int(k), int(seed) if seed else 0)
        if kind == "static" and arg:
            k, _, path = arg.partition(":")
            return StaticHeads(int(k), path or default_calibration_path(model_path))
        if kind in ("oracle", "oracle-topk") and arg:
            value, _, opt = arg.partition(":")
            fill_from = None
            if opt:
                if not opt.startswith("fill="):
                    raise ValueError(f"bad predictor {spec!r}: the option is fill=PRED.gguf")
                fill_from = opt.removeprefix("fill=")
            if kind == "oracle":
                return Oracle(model_path, fraction=float(value), fill_from=fill_from)
            return Oracle(model_path, k=int(value), fill_from=fill_from)
        if kind == "mask-file" and arg:
            return MaskFile(arg)
        if kind == "trained":
            # trained or trained:OPTS...: the predictor `prepare` made for this model
            parts = arg.split(":") if arg else []
            if not parts or "=" in parts[0]:
                found = prepared_predictor_path(model_path)
                if not found.is_file():
                    raise ValueError(f"no prepared predictor for {Path(model_path).name} (looked in {found}): "
                                     "run `powerinfer-attn prepare`, or give trained:PRED.gguf")
                parts = [str(found)] + parts
            path, *opts = parts
            rule = value = fill = gain = None
            for opt in opts:
                name, eq, val = opt.partition("=")
                if eq and name == "fill" and fill is None:
                    fill = val
                elif eq and name in ("threshold", "topk", "mass", "density") and rule is None:
                    rule, value = name, float(val)
                elif eq and name == "gain" and gain is None:
                    gain = float(val)
                else:
                    raise ValueError(f"bad predictor {spec!r}: after the file come at most one rule "
                                     f"(threshold=V, topk=K, mass=P or density=D), gain=G and fill=FILL")
            return TrainedHeads(path, rule, value, fill, gain)
    except ValueError as e:
        if "invalid literal" in str(e) or "could not convert" in str(e):
            raise ValueError(f"bad predictor {spec!r}: {e}; choose from: {', '.join(NAMES)}") from e
        raise
    raise ValueError(f"unknown predictor {spec!r}; choose from: {', '.join(NAMES)}")
