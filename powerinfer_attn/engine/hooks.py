"""Reading the graph's tensors during a step: a ``TensorHook`` (the oracle's importance, the
in-graph predictor's masks, node timing) and the eval callback that hands it the tensors."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from ..native.bindings import EngineError, bindings


class TensorHook:
    """Called for graph tensors whose name passes ``wants`` (e.g. ``kqv-12``), right after
    they are computed, with their float32 data as a writable array of ggml shape reversed
    (numpy ``(ne3, ne2, ne1, ne0)``). Writing to it changes what later ops read."""

    def wants(self, name: str) -> bool:
        raise NotImplementedError

    def __call__(self, name: str, data: np.ndarray) -> None:
        raise NotImplementedError


class Hooks(TensorHook):
    """Several hooks on one engine: each gets the tensors it wants."""

    def __init__(self, *hooks: TensorHook):
        self.hooks = hooks

    def wants(self, name: str) -> bool:
        return any(h.wants(name) for h in self.hooks)

    def __call__(self, name: str, data: np.ndarray) -> None:
        for h in self.hooks:
            if h.wants(name):
                h(name, data)


class DeferredHook(TensorHook):
    """A hook whose ``inner`` is set later: the engine takes its hook at construction, before
    a predictor is bound to it and knows what to record."""

    inner: TensorHook | None = None

    def wants(self, name: str) -> bool:
        return self.inner is not None and self.inner.wants(name)

    def __call__(self, name: str, data: np.ndarray) -> None:
        self.inner(name, data)


class _GgmlTensor(ctypes.Structure):
    # the head of struct ggml_tensor (ggml.h), up to the fields read here
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
                ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4)]


def _eval_callback(hook: TensorHook, errors: list):
    from ..native.kernels import libs

    C = bindings()
    g, _ = libs(Path(C._lib._name).parent)  # the libggml-base that libllama itself uses

    if not getattr(hook, "wants_data", True):
        # a hook that only times nodes (profile.NodeTimer): no name decoding, no data access
        @C.ggml_backend_sched_eval_callback
        def timing_cb(t, ask, _user):
            if ask:
                return hook.wants("")
            try:
                hook.node(g, t)
                return True
            except BaseException as e:
                errors.append(e)
                return False

        return timing_cb

    @C.ggml_backend_sched_eval_callback
    def cb(t, ask, _user):
        name = g.ggml_get_name(t).decode()
        if ask:
            return hook.wants(name)
        if not hook.wants(name):
            return True
        try:
            head = _GgmlTensor.from_address(t)
            dtype = {0: np.float32, 26: np.int32}.get(head.type)  # GGML_TYPE_F32, GGML_TYPE_I32
            if dtype is None or not g.ggml_is_contiguous(t):
                raise EngineError(f"tensor hook: {name} is not a contiguous F32 or I32 tensor")
            shape = tuple(reversed(head.ne[:4]))
            n = int(np.prod(shape))
            if head.buffer and not g.ggml_backend_buffer_is_host(head.buffer):
                # a tensor in GPU memory: copied out (the scheduler has synchronized its backend)
                data = np.empty(shape, dtype)
                g.ggml_backend_tensor_get(t, data.ctypes.data, 0, 4 * n)
            else:
                buf = (ctypes.c_char * (4 * n)).from_address(g.ggml_get_data(t))
                data = np.frombuffer(buf, dtype=dtype).reshape(shape)
            hook(name, data)
            return True
        except BaseException as e:  # an exception must not unwind through C; stop the graph instead
            errors.append(e)
            return False

    return cb
