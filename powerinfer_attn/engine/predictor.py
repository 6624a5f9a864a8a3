"""What the engine asks of a predictor (``Predictor``), the optional parts with their defaults
(``PredictorBase``), and what a predictor is told before each step (``StepState``). The engine
knows no predictor class: the ``predictors`` folder has the built-in ones."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .hooks import TensorHook

Engine = Any  # an engine.decode.Engine (not imported: the engine imports this module)


@dataclasses.dataclass
class StepState:
    """What a predictor is told before a decode step."""
    step: int          # 0 for the first decode step after the prompt
    position: int      # position of the token about to be decoded
    token: int         # the token about to be decoded
    engine: Engine


@runtime_checkable
class Predictor(Protocol):
    """What the engine asks of every predictor. ``bind(engine)`` is called once the engine exists
    (check the shapes, load files into it); ``predict(state)`` gives the mask ``[n_layer,
    n_head]`` of 0/1 for the step ``state`` (a ``StepState``) describes."""

    name: str

    def bind(self, engine: Engine) -> None: ...

    def predict(self, state: StepState) -> np.ndarray: ...


class PredictorBase:
    """The parts of a predictor the engine may use beyond ``Predictor``, with what they are for a
    predictor that does not need them; the package's predictors derive from it, and
    ``as_predictor`` gives any other object these defaults.

    ``hook``: a ``TensorHook`` the engine must be built with (``open_engine`` does that).
    ``in_graph``: True for a predictor loaded into the graph, which chooses the masks itself
    during the step; ``observed()`` then gives the mask the step used. ``restart(engine)``:
    forget what earlier sequences taught it (a density controller's state), before a new one.
    ``begin(engine)``: the first decode step of an answer comes next, its prompt in the engine's
    cache (a trained predictor may calibrate on it)."""

    name = "predictor"
    hook: TensorHook | None = None
    in_graph = False

    def restart(self, engine: Engine) -> None:
        pass

    def begin(self, engine: Engine) -> None:
        pass

    def observed(self) -> np.ndarray:
        raise TypeError(f"{self.name} is not an in-graph predictor: it has no observed mask")


class _Foreign(PredictorBase):
    """A user's object with only ``Predictor``'s part, seen through ``PredictorBase``."""

    def __init__(self, inner: Predictor):
        self.inner, self.name = inner, inner.name

    def bind(self, engine: Engine) -> None:
        self.inner.bind(engine)

    def predict(self, state: StepState) -> np.ndarray:
        return self.inner.predict(state)


def as_predictor(predictor: Predictor | None) -> PredictorBase | None:
    """``predictor`` as a ``PredictorBase`` (itself when it is one)."""
    if predictor is None or isinstance(predictor, PredictorBase):
        return predictor
    if not isinstance(predictor, Predictor):
        raise TypeError(f"{predictor!r} is not a predictor: it needs name, bind(engine) and predict(state)")
    return _Foreign(predictor)
