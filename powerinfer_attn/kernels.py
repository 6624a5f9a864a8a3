"""Run the sparse attention ops on their own, through libggml, on numpy data.

Used by the kernel tests (against a plain numpy reference) and for op-level timing.
Shapes follow ggml: ``ne = (ne0, ne1, ne2)`` with ne0 the contiguous dimension, so a
numpy array of shape ``(ne2, ne1, ne0)`` holds a ggml tensor ``[ne0, ne1, ne2]``.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np

from . import build

# enum ggml_type values used here
GGML_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14}
GGML_TYPE_I32 = 26
MODES = {"v1": 1, "v2": 2, "v3": 3}


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


@functools.lru_cache(maxsize=1)
def libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """libggml-base and libggml-cpu from the installed patched llama_cpp package."""
    inst = build.installed()
    if inst.lib is None or not inst.patched:
        raise RuntimeError("the patched llama_cpp is not installed; run `powerinfer-attn build`")
    libdir = Path(inst.lib).parent
    g = ctypes.CDLL(str(libdir / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    cpu = ctypes.CDLL(str(libdir / "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
    P, I64, I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    sigs = {
        (g, "ggml_init"): ([_InitParams], P),
        (g, "ggml_free"): ([P], None),
        (g, "ggml_new_tensor_1d"): ([P, I32, I64], P),
        (g, "ggml_new_tensor_2d"): ([P, I32, I64, I64], P),
        (g, "ggml_new_tensor_3d"): ([P, I32, I64, I64, I64], P),
        (g, "ggml_get_data"): ([P], P),
        (g, "ggml_get_name"): ([P], ctypes.c_char_p),
        (g, "ggml_is_contiguous"): ([P], ctypes.c_bool),
        (g, "ggml_nbytes"): ([P], ctypes.c_size_t),
        (g, "ggml_permute"): ([P, P, I32, I32, I32, I32], P),
        (g, "ggml_mul_mat"): ([P, P, P], P),
        (g, "ggml_mul_mat_sparse_attn_v1"): ([P, P, P, P], P),
        (g, "ggml_mul_mat_sparse_attn_v2"): ([P, P, P, P], P),
        (g, "ggml_mul_mat_sparse_attn_v3"): ([P, P, P, P], P),
        (g, "ggml_sparse_attn_cols_ok"): ([I32, I64], ctypes.c_bool),
        (g, "ggml_new_graph"): ([P], P),
        (g, "ggml_build_forward_expand"): ([P, P], None),
        (g, "ggml_quantize_chunk"): ([I32, P, P, I64, I64, I64, P], ctypes.c_size_t),
        (g, "ggml_row_size"): ([I32, I64], ctypes.c_size_t),
        (cpu, "ggml_graph_compute_with_ctx"): ([P, P, I32], I32),
        (cpu, "ggml_cpu_init"): ([], None),
    }
    for (lib, name), (argtypes, restype) in sigs.items():
        f = getattr(lib, name)
        f.argtypes, f.restype = argtypes, restype
    cpu.ggml_cpu_init()
    return g, cpu


def quantize(w: np.ndarray, type_name: str) -> bytes:
    """Rows of float32 ``w`` (last axis = ne0) in ggml type ``type_name``."""
    g, _ = libs()
    w = np.ascontiguousarray(w, dtype=np.float32)
    t = GGML_TYPE[type_name]
    if type_name == "F32":
        return w.tobytes()
    if type_name == "F16":
        return w.astype(np.float16).tobytes()
    n_per_row = w.shape[-1]
    nrows = w.size // n_per_row
    out = ctypes.create_string_buffer(g.ggml_row_size(t, n_per_row) * nrows)
    g.ggml_quantize_chunk(t, w.ctypes.data, out, 0, nrows, n_per_row, None)
    return out.raw


def dequantize(data: bytes, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The float values ggml sees for ``data`` (gguf-py's reference dequantizers)."""
    if type_name == "F32":
        return np.frombuffer(data, dtype=np.float32).reshape(shape).copy()
    if type_name == "F16":
        return np.frombuffer(data, dtype=np.float16).astype(np.float32).reshape(shape)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    q = gguf_dequantize(np.frombuffer(data, dtype=np.uint8), GGMLQuantizationType[type_name])
    return q.astype(np.float32).reshape(shape)


class _Ctx:
    def __init__(self, mem: int):
        g, _ = libs()
        self.g = g
        self.ctx = g.ggml_init(_InitParams(mem, None, False))
        if not self.ctx:
            raise MemoryError("ggml_init failed")

    def tensor(self, type_id: int, ne: tuple[int, ...], data: bytes):
        g = self.g
        fn = {1: g.ggml_new_tensor_1d, 2: g.ggml_new_tensor_2d, 3: g.ggml_new_tensor_3d}[len(ne)]
        t = fn(self.ctx, type_id, *ne)
        n = g.ggml_nbytes(t)
        if len(data) != n:
            raise ValueError(f"tensor {ne} of type {type_id} needs {n} bytes, got {len(data)}")
        ctypes.memmove(g.ggml_get_data(t), data, n)
        return t

    def compute(self, t, n_threads: int, shape: tuple[int, ...]) -> np.ndarray:
        g, cpu = libs()
        gf = g.ggml_new_graph(self.ctx)
        g.ggml_build_forward_expand(gf, t)
        status = cpu.ggml_graph_compute_with_ctx(self.ctx, gf, n_threads)
        if status != 0:
            raise RuntimeError(f"ggml_graph_compute_with_ctx returned {status}")
        n = int(np.prod(shape))
        buf = (ctypes.c_float * n).from_address(g.ggml_get_data(t))
        return np.frombuffer(buf, dtype=np.float32).reshape(shape).copy()

    def close(self):
        if self.ctx:
            self.g.ggml_free(self.ctx)
            self.ctx = None


def mul_mat(mode: str | None, a: bytes, a_type: str, a_ne: tuple[int, ...], b: np.ndarray,
            heads: np.ndarray | None, n_threads: int = 1, permute_b: bool = False,
            permute_a: bool = False) -> np.ndarray:
    """``ggml_mul_mat_sparse_attn_<mode>(a, b, heads)``, or ``ggml_mul_mat(a, b)`` for mode None.

    ``b`` is float32 with numpy shape ``(ne2, ne1, ne0)`` (or 2-D). With ``permute_b`` it is
    given as ``(ne1, ne2, ne0)`` and permuted in the graph, the way llama builds q (a
    non-contiguous src1); ``permute_a`` does the same for a 3-D ``a`` (the KV cache view of k).
    Returns the result as numpy ``(ne2, ne1, ne0)`` (or 2-D).
    """
    b = np.ascontiguousarray(b, dtype=np.float32)
    b_ne = tuple(reversed(b.shape))
    mem = len(a) + b.nbytes * 8 + (1 << 20) + 64 * a_ne[1] * 16 * max(1, b.size // b.shape[-1])
    c = _Ctx(mem + (16 << 20))
    g = c.g
    try:
        if permute_a:
            # given as [ne0, ne2, ne1]; permute(0, 2, 1, 3) gives [ne0, ne1, ne2]
            ta = c.tensor(GGML_TYPE[a_type], (a_ne[0], a_ne[2], a_ne[1]), a)
            ta = g.ggml_permute(c.ctx, ta, 0, 2, 1, 3)
        else:
            ta = c.tensor(GGML_TYPE[a_type], a_ne, a)
        if permute_b:
            tb = c.tensor(GGML_TYPE["F32"], b_ne, b.tobytes())
            tb = g.ggml_permute(c.ctx, tb, 0, 2, 1, 3)
            out_shape = (b.shape[1], b.shape[0], a_ne[1])
        else:
            tb = c.tensor(GGML_TYPE["F32"], b_ne, b.tobytes())
            out_shape = b.shape[:-1] + (a_ne[1],)
        if mode is None:
            t = g.ggml_mul_mat(c.ctx, ta, tb)
        else:
            h = np.ascontiguousarray(heads, dtype=np.int32)
            th = c.tensor(GGML_TYPE_I32, (h.size,), h.tobytes())
            t = getattr(g, f"ggml_mul_mat_sparse_attn_{mode}")(c.ctx, ta, tb, th)
        return c.compute(t, n_threads, out_shape)
    finally:
        c.close()
