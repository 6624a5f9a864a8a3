"""The trained predictor (``trained:PRED.gguf``): a linear model per layer evaluated inside the
decode graph, with its rule, density control and fill from the predictor file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..native.bindings import FILLS
from .basic import _Shaped
from ..engine.hooks import DeferredHook, Hooks
from .calibrate import MIN_TOKENS, PromptCalibration
from .predictor_file import read_metadata

# density control's step per layer, in logits per unit of density error (trained:...:density=D)
DENSITY_GAIN = 0.05


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
                 fill: str | None = None, gain: float | None = None, calibrate: int = 0, calibrate_fill: bool = False):
        self.path, self.rule, self.value = Path(path), rule, value
        self.calibrate = int(calibrate)  # prompt tokens to shift the biases on (``calibrate.py``); 0 = the file's
        self.calibrate_fill = bool(calibrate_fill)  # the linear fill's constant term too
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
        if self.calibrate and self.calibrate < MIN_TOKENS:
            raise ValueError(f"calibrate=N needs N >= {MIN_TOKENS} prompt tokens (0 turns it off), got {self.calibrate}")
        if self.calibrate_fill and not self.calibrate:
            raise ValueError("calibrate-fill goes with calibrate=N")
        if self.calibrate and self.fill != "linear":
            raise ValueError(f"calibrate=N measures each head against its linear fill; {self.path.name} runs with {self.fill} fill")
        self.name = (f"trained:{self.path.name}" + (f":{rule}={value:g}" if rule else "")
                     + (f":gain={gain:g}" if gain is not None else "")
                     + (f":calibrate={self.calibrate}" if self.calibrate else "")
                     + (":calibrate-fill" if self.calibrate_fill else "")
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
        self.masks = _MaskReader()
        self.calibration: PromptCalibration | None = None
        # the calibration's recorder needs the model (wo), known at bind; the engine takes its
        # hook before that
        self._recorder = DeferredHook()
        self.hook = Hooks(self.masks, self._recorder) if self.calibrate else self.masks

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
        self.masks.mask = np.zeros((self.n_layer, self.n_head), np.int32)
        if self.calibrate:
            self.calibration = PromptCalibration(self.path, engine.model_path, self.n_layer, self.n_head, self.calibrate,
                                                 pinned=self.meta.get("training", {}).get("pinned_heads"),
                                                 fill_bias=self.calibrate_fill)
            self._recorder.inner = self.calibration.hook

    def restart(self, engine) -> None:
        """Density control from the rule's own threshold again, as for a new text: one request's
        answer then does not depend on what was decoded before it (a server's other requests)."""
        if self.targets is not None:
            engine.set_head_density(self.targets, self.gain)

    def predict(self, state) -> None:
        return None  # the graph decides

    def observed(self) -> np.ndarray:
        """The masks of the last decode step, as the graph computed them."""
        return self.masks.mask.copy()

    def begin(self, engine) -> None:
        """With ``calibrate``: the biases shifted to the prompt now in the engine."""
        if self.calibration is not None:
            self.calibration.run(engine)
