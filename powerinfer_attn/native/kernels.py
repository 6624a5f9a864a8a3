"""Run the sparse attention ops on their own, through libggml, on numpy data.

Used by the kernel tests (against a plain numpy reference) and for op-level timing.
Shapes follow ggml: ``ne = (ne0, ne1, ne2)`` with ne0 the contiguous dimension, so a
numpy array of shape ``(ne2, ne1, ne0)`` holds a ggml tensor ``[ne0, ne1, ne2]``.

The libraries are those of the installed patched ``llama_cpp`` package, unless
``$POWERINFER_ATTN_GGML_LIB_DIR`` names another directory holding ``libggml-base.so`` and
``libggml-cpu.so`` built from the patched tree (``make sanitize`` points it at an
AddressSanitizer/UBSan build in ``vendor/asan-build``).

Arguments the ops would reject with a ggml assertion (which aborts the process) are refused
here with a ValueError instead.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import numpy as np

from . import build

# enum ggml_type values used here
GGML_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14}
GGML_TYPE_I32 = 26
GGML_TYPE_I64 = 27
MODES = {"v1": 1, "v2": 2, "v3": 3}
# ggml_head_select: its rules (enum ggml_head_select_rule) and the slots of its I32 state
# (enum ggml_head_select_slot; floats as their bits, counters as two 32-bit halves, low first)
HEAD_RULES = {"threshold": 1, "topk": 2, "mass": 3}
SLOT_RULE, SLOT_VALUE, SLOT_GAIN, SLOT_OFFSET, SLOT_KEPT, SLOT_CHOSEN, SLOT_TARGET = 0, 1, 2, 3, 4, 6, 8
LIB_DIR_ENV = "POWERINFER_ATTN_GGML_LIB_DIR"


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class _CPlan(ctypes.Structure):
    # struct ggml_cplan (ggml-cpu.h)
    _fields_ = [("work_size", ctypes.c_size_t), ("work_data", ctypes.c_void_p), ("n_threads", ctypes.c_int),
                ("threadpool", ctypes.c_void_p), ("abort_callback", ctypes.c_void_p),
                ("abort_callback_data", ctypes.c_void_p), ("use_ref", ctypes.c_bool)]


@functools.lru_cache(maxsize=1)
def package_lib_dir() -> Path:
    """The lib directory of the installed patched llama_cpp package (looked up once)."""
    inst = build.installed()
    if inst.lib is None or not inst.patched:
        raise RuntimeError("the patched llama_cpp is not installed; run `powerinfer-attn build`")
    return Path(inst.lib).parent


def lib_dir() -> Path:
    """Where the kernel helpers load libggml-base/libggml-cpu from: ``$POWERINFER_ATTN_GGML_LIB_DIR``,
    else ``package_lib_dir()``."""
    override = os.environ.get(LIB_DIR_ENV)
    if not override:
        return package_lib_dir()
    d = Path(override).resolve()
    missing = [n for n in ("libggml-base.so", "libggml-cpu.so") if not (d / n).is_file()]
    if missing:
        raise RuntimeError(f"${LIB_DIR_ENV} is {d}, which has no {' or '.join(missing)}")
    return d


def libs(libdir: Path | None = None) -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """libggml-base and libggml-cpu from ``libdir`` (default ``lib_dir()``)."""
    return _load(Path(libdir) if libdir else lib_dir())


@functools.lru_cache(maxsize=None)
def _load(libdir: Path) -> tuple[ctypes.CDLL, ctypes.CDLL]:
    g = ctypes.CDLL(str(libdir / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    cpu = ctypes.CDLL(str(libdir / "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
    P, I64, I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    sigs = {
        (g, "ggml_init"): ([_InitParams], P),
        (g, "ggml_tensor_overhead"): ([], ctypes.c_size_t),
        (g, "ggml_graph_overhead"): ([], ctypes.c_size_t),
        (g, "ggml_backend_cpu_buffer_from_ptr"): ([P, ctypes.c_size_t], P),
        (g, "ggml_backend_tensor_alloc"): ([P, P, P], I32),
        (g, "ggml_backend_buffer_free"): ([P], None),
        (g, "ggml_backend_buffer_is_host"): ([P], ctypes.c_bool),
        (g, "ggml_backend_tensor_get"): ([P, P, ctypes.c_size_t, ctypes.c_size_t], None),
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
        (g, "ggml_mul_mat_sparse_attn_v1_fill"): ([P, P, P, P, P], P),
        (g, "ggml_sparse_attn_v3_ok"): ([I32, I64], ctypes.c_bool),
        (g, "ggml_mul_mat_sparse_attn_set_window"): ([P, P, I32, I32, ctypes.c_bool], None),
        (g, "ggml_soft_max_ext"): ([P, P, P, ctypes.c_float, ctypes.c_float], P),
        (g, "ggml_soft_max_ext_inplace"): ([P, P, P, ctypes.c_float, ctypes.c_float], P),
        (g, "ggml_soft_max_ext_set_heads"): ([P, P], None),
        (g, "ggml_soft_max_ext_set_window"): ([P, I32, I32], None),
        (g, "ggml_flash_attn_ext"): ([P, P, P, P, P, ctypes.c_float, ctypes.c_float, ctypes.c_float], P),
        (g, "ggml_flash_attn_ext_set_heads"): ([P, P], None),
        (g, "ggml_flash_attn_ext_set_window"): ([P, I32, I32], None),
        (g, "ggml_head_select"): ([P, P, P, I32], P),
        (g, "ggml_kv_page_bounds"): ([P, P, P, P, I32], P),
        (g, "ggml_kv_page_select"): ([P, P, P, P, P, I32, I32, I32, I32], P),
        (g, "ggml_kv_page_select_set_score"): ([P, I32], None),
        (g, "ggml_kv_page_select_set_keys"): ([P, P], None),
        (g, "ggml_kv_page_select_set_spread"): ([P, ctypes.c_float], None),
        (g, "ggml_kv_page_select_set_candidates"): ([P, P], None),
        (g, "ggml_mul_mat_sparse_attn_set_pages"): ([P, P, I32, ctypes.c_bool], None),
        (g, "ggml_flash_attn_ext_set_pages"): ([P, P, I32], None),
        (g, "ggml_soft_max_ext_set_pages"): ([P, P, I32], None),
        (g, "ggml_new_graph"): ([P], P),
        (g, "ggml_build_forward_expand"): ([P, P], None),
        (g, "ggml_quantize_chunk"): ([I32, P, P, I64, I64, I64, P], ctypes.c_size_t),
        (g, "ggml_row_size"): ([I32, I64], ctypes.c_size_t),
        (g, "ggml_blck_size"): ([I32], I64),
        (cpu, "ggml_graph_plan"): ([P, I32, P], _CPlan),
        (cpu, "ggml_graph_compute"): ([P, ctypes.POINTER(_CPlan)], I32),
        (cpu, "ggml_cpu_init"): ([], None),
    }
    for (lib, name), (argtypes, restype) in sigs.items():
        if not hasattr(lib, name):  # a stock library (a tensor hook on it): no sparse ops
            continue
        f = getattr(lib, name)
        f.argtypes, f.restype = argtypes, restype
    cpu.ggml_cpu_init()
    return g, cpu


def block_size(type_name: str) -> int:
    """Values per block of ggml type ``type_name`` (1 for F32/F16)."""
    g, _ = libs()
    return int(g.ggml_blck_size(_type_id(type_name)))


def _type_id(type_name: str) -> int:
    if type_name not in GGML_TYPE:
        raise ValueError(f"unsupported weight type {type_name!r}; choose from {', '.join(GGML_TYPE)}")
    return GGML_TYPE[type_name]


def quantize(w: np.ndarray, type_name: str) -> bytes:
    """Rows of float32 ``w`` (last axis = ne0) in ggml type ``type_name``."""
    g, _ = libs()
    w = np.ascontiguousarray(w, dtype=np.float32)
    t = _type_id(type_name)
    if w.ndim == 0 or w.shape[-1] % block_size(type_name):
        raise ValueError(f"rows of {type_name} must be whole blocks of {block_size(type_name)} values, "
                         f"got shape {w.shape}")
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


_libc = ctypes.CDLL(None)
_libc.posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_size_t]
_libc.free.argtypes = [ctypes.c_void_p]


class _Ctx:
    """A ggml context that holds only tensor headers and the graph: every tensor's data, the
    result and the work buffer each get their own heap allocation of exactly their size, so an
    AddressSanitizer build sees a kernel that reads or writes past any of them."""

    def __init__(self):
        g, cpu = libs()
        self.g, self.cpu = g, cpu
        self.allocs: list[int] = []
        self.buffers: list[int] = []
        mem = 16 * g.ggml_tensor_overhead() + g.ggml_graph_overhead() + 4096
        self.ctx = g.ggml_init(_InitParams(mem, None, True))
        if not self.ctx:
            raise MemoryError("ggml_init failed")

    def _malloc(self, n: int) -> int:
        p = ctypes.c_void_p()
        if _libc.posix_memalign(ctypes.byref(p), 64, max(n, 1)) != 0:
            raise MemoryError(f"cannot allocate {n} bytes")
        self.allocs.append(p.value)
        return p.value

    def allocate(self, t) -> int:
        """Give tensor t data of its own; its address."""
        n = self.g.ggml_nbytes(t)
        ptr = self._malloc(n)
        buf = self.g.ggml_backend_cpu_buffer_from_ptr(ptr, n)
        self.buffers.append(buf)
        if self.g.ggml_backend_tensor_alloc(buf, t, ptr) != 0:
            raise RuntimeError("ggml_backend_tensor_alloc failed")
        return ptr

    def tensor(self, type_id: int, ne: tuple[int, ...], data: bytes):
        g = self.g
        fn = {1: g.ggml_new_tensor_1d, 2: g.ggml_new_tensor_2d, 3: g.ggml_new_tensor_3d}[len(ne)]
        t = fn(self.ctx, type_id, *ne)
        n = g.ggml_nbytes(t)
        if len(data) != n:
            raise ValueError(f"tensor {ne} of type {type_id} needs {n} bytes, got {len(data)}")
        ctypes.memmove(self.allocate(t), data, n)
        return t

    def compute(self, t, n_threads: int, shape: tuple[int, ...], out: int | None = None,
                dtype=np.float32) -> np.ndarray:
        """Run the graph that ends in t; its result as ``dtype`` (float32 or float16) of ``shape``,
        read from t's own new allocation or, for a t that is a view (an in-place op), from ``out``."""
        g, cpu = self.g, self.cpu
        out = out or self.allocate(t)
        gf = g.ggml_new_graph(self.ctx)
        g.ggml_build_forward_expand(gf, t)
        plan = cpu.ggml_graph_plan(gf, n_threads, None)
        plan.work_data = self._malloc(plan.work_size) if plan.work_size else None
        status = cpu.ggml_graph_compute(gf, ctypes.byref(plan))
        if status != 0:
            raise RuntimeError(f"ggml_graph_compute returned {status}")
        n, size = int(np.prod(shape)), np.dtype(dtype).itemsize
        if n * size != g.ggml_nbytes(t):
            raise RuntimeError(f"result is {g.ggml_nbytes(t)} bytes, expected {n} of {np.dtype(dtype).name}")
        return np.frombuffer((ctypes.c_char * (n * size)).from_address(out), dtype=dtype).reshape(shape).copy()

    def close(self):
        for buf in self.buffers:
            self.g.ggml_backend_buffer_free(buf)
        self.buffers.clear()
        for p in self.allocs:
            _libc.free(p)
        self.allocs.clear()
        if self.ctx:
            self.g.ggml_free(self.ctx)
            self.ctx = None


def check_args(mode: str | None, a_type: str, a_ne: tuple[int, ...], b_ne: tuple[int, ...],
               heads: np.ndarray | None, n_threads: int) -> None:
    """The conditions ggml asserts for ``mul_mat`` (``b_ne`` after any permute), as ValueErrors."""
    _type_id(a_type)
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1, got {n_threads}")
    a4, b4 = tuple(a_ne) + (1,) * (4 - len(a_ne)), tuple(b_ne) + (1,) * (4 - len(b_ne))
    if a4[0] != b4[0] or b4[2] % a4[2] or b4[3] % a4[3]:
        raise ValueError(f"cannot multiply a {a_ne} by b {b_ne}: ne0 must agree and b's ne2, ne3 be multiples of a's")
    if a_ne[0] % block_size(a_type):
        raise ValueError(f"a's rows ({a_ne[0]}) must be whole {a_type} blocks of {block_size(a_type)}")
    if mode is None:
        return
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    h = np.asarray(heads)
    if h.ndim != 1 or h.size == 0:
        raise ValueError(f"heads must be a non-empty vector, got shape {h.shape}")
    if not np.isin(h, (0, 1)).all():
        raise ValueError("heads values must be 0 or 1")
    n_head = h.size
    if mode == "v1" and a_ne[1] % n_head:
        raise ValueError(f"v1: a's {a_ne[1]} rows are not {n_head} heads of equal width")
    if mode == "v2" and (len(b_ne) < 3 or b_ne[2] != n_head):
        raise ValueError(f"v2: b's ne2 must be n_head = {n_head}, b is {b_ne}")
    if mode == "v3":
        g, _ = libs()
        if a_ne[0] % n_head or a4[2:] != (1, 1) or b4[2:] != (1, 1):
            raise ValueError(f"v3: a {a_ne} must be 2-D with {n_head} heads of equal width, b 2-D")
        if not g.ggml_sparse_attn_v3_ok(_type_id(a_type), a_ne[0] // n_head):
            raise ValueError(f"v3: head width {a_ne[0] // n_head} is not whole {a_type} blocks "
                             f"of {block_size(a_type)}: use the dense op")


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
    b_ne_eff = (b_ne[0], b_ne[2], b_ne[1]) if permute_b else b_ne
    check_args(mode, a_type, a_ne, b_ne_eff, heads, n_threads)
    c = _Ctx()
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


def mul_mat_v1_fill(a: bytes, a_type: str, a_ne: tuple[int, int], b: np.ndarray, heads: np.ndarray,
                    bias: np.ndarray, n_threads: int = 1) -> np.ndarray:
    """``ggml_mul_mat_sparse_attn_v1_fill(a, b, heads, bias)``: the rows of the heads marked 0,
    plus ``bias``, and 0 for the others (linear fill's product). ``b`` is ``(ne1, ne0)``."""
    b = np.ascontiguousarray(b, dtype=np.float32)
    bias = np.ascontiguousarray(bias, dtype=np.float32)
    check_args("v1", a_type, a_ne, tuple(reversed(b.shape)), heads, n_threads)
    if bias.shape != (a_ne[1],):
        raise ValueError(f"bias must have a's {a_ne[1]} rows, got shape {bias.shape}")
    c = _Ctx()
    g = c.g
    try:
        ta = c.tensor(GGML_TYPE[a_type], a_ne, a)
        tb = c.tensor(GGML_TYPE["F32"], tuple(reversed(b.shape)), b.tobytes())
        h = np.ascontiguousarray(heads, dtype=np.int32)
        th = c.tensor(GGML_TYPE_I32, (h.size,), h.tobytes())
        tbias = c.tensor(GGML_TYPE["F32"], (bias.size,), bias.tobytes())
        t = g.ggml_mul_mat_sparse_attn_v1_fill(c.ctx, ta, tb, th, tbias)
        return c.compute(t, n_threads, b.shape[:-1] + (a_ne[1],))
    finally:
        c.close()


def attention(k: np.ndarray, v: np.ndarray, q: np.ndarray, mask: np.ndarray, heads: np.ndarray | None,
              window: tuple[int, int] | None = None, n_threads: int = 1, flash: bool = False,
              inplace: bool = False, max_bias: float = 0.0, softcap: float = 0.0,
              cache_layout: bool = False, pages: tuple[int, np.ndarray] | None = None) -> np.ndarray:
    """One decode token's attention as llama builds it with a head mask, optionally with window
    fill: ``k``, ``v`` ``(n_head_kv, n_kv, d)`` (stored F16), ``q`` ``(n_head, d)``, ``mask``
    ``(n_kv,)`` (0 or -inf), scale 1/sqrt(d). Without ``flash``: v2 K*q, the head-masked softmax,
    v2 softmax*V (V transposed, as in the cache), the softmax ``inplace`` over K*q's result if
    asked (llama's graph allocator may do that); with ``flash``: flash attention with the head
    mask, or with ``heads`` None stock flash attention (``max_bias``: ALiBi slopes on the mask's
    values, ``softcap``: logit soft-capping; ``cache_layout``: K and V are views of one row per
    cell, as in llama's cache, instead of one block per KV head). ``pages``: (page, selection
    I32 ``(n_head_kv, ceil(n_kv/page))``), the token budget's pages on both v2 ops and the
    softmax between them, or on flash attention with the head mask. Returns ``(n_head, d)``."""
    n_head_kv, n_kv, d = k.shape
    n_head = q.shape[0]
    stock = heads is None  # flash attention without a head mask: stock llama.cpp's kernel
    if stock and (not flash or window):
        raise ValueError("attention: no head mask is for flash attention without a window only")
    heads = np.ones(n_head, np.int32) if stock else np.ascontiguousarray(heads, dtype=np.int32)
    if heads.shape != (n_head,) or n_head % n_head_kv or v.shape != k.shape or mask.shape != (n_kv,):
        raise ValueError("attention: shapes do not agree")
    if pages is not None:
        page, sel = pages[0], np.ascontiguousarray(pages[1], dtype=np.int32)
        if page < 1 or sel.shape != (n_head_kv, -(-n_kv // page)) or not np.isin(sel, (0, 1)).all():
            raise ValueError(f"pages: a 0/1 selection of shape {(n_head_kv, -(-n_kv // max(page, 1)))} is needed")
        if stock:
            raise ValueError("attention: pages go with a head mask")
    c = _Ctx()
    g = c.g
    f16 = GGML_TYPE["F16"]
    try:
        th = c.tensor(GGML_TYPE_I32, (n_head,), heads.tobytes())
        tp = c.tensor(GGML_TYPE_I32, (sel.shape[1], n_head_kv), sel.tobytes()) if pages is not None else None
        tq = c.tensor(GGML_TYPE["F32"], (d, 1, n_head), np.ascontiguousarray(q, np.float32).tobytes())
        scale = 1.0 / np.sqrt(d)
        if flash:
            if cache_layout:  # as llama's KV cache holds them: one row per cell, its KV heads side by side
                tk = g.ggml_permute(c.ctx, c.tensor(f16, (d, n_head_kv, n_kv), np.ascontiguousarray(
                    k.transpose(1, 0, 2)).astype(np.float16).tobytes()), 0, 2, 1, 3)
                tv = g.ggml_permute(c.ctx, c.tensor(f16, (d, n_head_kv, n_kv), np.ascontiguousarray(
                    v.transpose(1, 0, 2)).astype(np.float16).tobytes()), 0, 2, 1, 3)
            else:
                tk = c.tensor(f16, (d, n_kv, n_head_kv), k.astype(np.float16).tobytes())
                tv = c.tensor(f16, (d, n_kv, n_head_kv), v.astype(np.float16).tobytes())
            tm = c.tensor(f16, (n_kv, 1), mask.astype(np.float16).tobytes())
            t = g.ggml_flash_attn_ext(c.ctx, tq, tk, tv, tm, scale, max_bias, softcap)
            if not stock:
                g.ggml_flash_attn_ext_set_heads(t, th)
            if window:
                g.ggml_flash_attn_ext_set_window(t, *window)
            if tp is not None:
                g.ggml_flash_attn_ext_set_pages(t, tp, page)
            return c.compute(t, n_threads, (1, n_head, d))[0]
        if max_bias or softcap:
            raise ValueError("attention: max_bias and softcap are for flash attention only")
        tk = c.tensor(f16, (d, n_kv, n_head_kv), k.astype(np.float16).tobytes())
        tvt = c.tensor(f16, (n_kv, d, n_head_kv), np.ascontiguousarray(v.transpose(0, 2, 1)).astype(np.float16).tobytes())
        tm = c.tensor(GGML_TYPE["F32"], (n_kv, 1), mask.astype(np.float32).tobytes())
        kq = g.ggml_mul_mat_sparse_attn_v2(c.ctx, tk, tq, th)
        if window:
            g.ggml_mul_mat_sparse_attn_set_window(kq, tm, window[0], window[1], True)
        if tp is not None:
            g.ggml_mul_mat_sparse_attn_set_pages(kq, tp, page, True)
        c.allocate(kq)
        sm = (g.ggml_soft_max_ext_inplace if inplace else g.ggml_soft_max_ext)(c.ctx, kq, tm, scale, 0.0)
        g.ggml_soft_max_ext_set_heads(sm, th)
        if window:
            g.ggml_soft_max_ext_set_window(sm, *window)
        if tp is not None:
            g.ggml_soft_max_ext_set_pages(sm, tp, page)
        if not inplace:  # in place, sm is a view of kq's data
            c.allocate(sm)
        t = g.ggml_mul_mat_sparse_attn_v2(c.ctx, tvt, sm, th)
        if window:
            g.ggml_mul_mat_sparse_attn_set_window(t, tm, window[0], window[1], False)
        if tp is not None:
            g.ggml_mul_mat_sparse_attn_set_pages(t, tp, page, False)
        return c.compute(t, n_threads, (n_head, 1, d))[:, 0]
    finally:
        c.close()


def head_select_state(rule: str, value: float, targets=(), gain: float = 0.0, offset: float = 0.0,
                      kept: int = 0, chosen: int = 0) -> np.ndarray:
    """The I32 state ``ggml_head_select`` reads: rule and value, the density controller (gain,
    offset, per-layer targets) and the two counters."""
    if rule not in HEAD_RULES:
        raise ValueError(f"unknown rule {rule!r}; choose from {', '.join(HEAD_RULES)}")
    s = np.zeros(SLOT_TARGET + len(targets), np.int32)
    f = s.view(np.float32)
    s[SLOT_RULE] = HEAD_RULES[rule]
    f[SLOT_VALUE], f[SLOT_GAIN], f[SLOT_OFFSET] = value, gain, offset
    f[SLOT_TARGET:] = targets
    s.view(np.uint32)[SLOT_KEPT:SLOT_KEPT + 4] = [kept & 0xFFFFFFFF, kept >> 32, chosen & 0xFFFFFFFF, chosen >> 32]
    return s


def head_select_counts(state: np.ndarray) -> tuple[int, int]:
    """(kept, chosen) from a head selection state."""
    u = state.view(np.uint32)
    return int(u[SLOT_KEPT]) | int(u[SLOT_KEPT + 1]) << 32, int(u[SLOT_CHOSEN]) | int(u[SLOT_CHOSEN + 1]) << 32


def head_select(logits: np.ndarray, state: np.ndarray, il: int) -> tuple[np.ndarray, np.ndarray]:
    """``ggml_head_select(logits, state, il)`` on the CPU: layer il's mask and the state after it."""
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    state = np.ascontiguousarray(state, dtype=np.int32)
    if logits.ndim != 1 or state.ndim != 1 or not 0 <= il < state.size - SLOT_TARGET:
        raise ValueError(f"logits [n_head] and a state with a target for layer {il} are needed")
    c = _Ctx()
    try:
        tl = c.tensor(GGML_TYPE["F32"], (logits.size,), logits.tobytes())
        ts = c.tensor(GGML_TYPE_I32, (state.size,), state.tobytes())
        t = c.g.ggml_head_select(c.ctx, tl, ts, il)
        out = c.compute(t, 1, (logits.size + state.size,)).view(np.int32)
    finally:
        c.close()
    return out[:logits.size].copy(), out[logits.size:].copy()


def _bounds_array(bounds) -> tuple[np.ndarray, int]:
    """Page bounds as the kernels take them: float16 stays F16 (the CPU cache's type), anything
    else becomes F32; with the ggml type id."""
    f16 = np.asarray(bounds).dtype == np.float16
    return np.ascontiguousarray(bounds, dtype=np.float16 if f16 else np.float32), GGML_TYPE["F16" if f16 else "F32"]


def page_bounds(k: bytes, k_type: str, n_cells: int, d: int, n_head_kv: int, bounds: np.ndarray,
                idxs, page: int, n_threads: int = 1) -> np.ndarray:
    """``ggml_kv_page_bounds``: ``bounds`` (float32 or float16 ``(n_pages, n_head_kv, 2*d)``, min
    then max) with the pages that hold the cells ``idxs`` recomputed from ``k`` (``n_cells`` rows
    of ``d*n_head_kv`` values in ``k_type``, as the cache holds them). Returns the new bounds, of
    the type given."""
    bounds, b_type = _bounds_array(bounds)
    idx = np.ascontiguousarray(idxs, dtype=np.int64)
    if page < 1 or n_cells % page or bounds.shape != (n_cells // page, n_head_kv, 2 * d):
        raise ValueError(f"bounds must be {(n_cells // max(page, 1), n_head_kv, 2 * d)} and n_cells whole pages")
    if idx.ndim != 1 or idx.size == 0 or (idx < 0).any() or (idx >= n_cells).any():
        raise ValueError(f"idxs must be a non-empty vector of cells in [0, {n_cells})")
    c = _Ctx()
    try:
        tb = c.tensor(b_type, (2 * d, n_head_kv, n_cells // page), bounds.tobytes())
        tk = c.tensor(_type_id(k_type), (d * n_head_kv, n_cells), k)
        ti = c.tensor(GGML_TYPE_I64, (idx.size,), idx.tobytes())
        t = c.g.ggml_kv_page_bounds(c.ctx, tb, tk, ti, page)
        return c.compute(t, n_threads, bounds.shape, out=c.g.ggml_get_data(tb), dtype=bounds.dtype)
    finally:
        c.close()


def page_select(q: np.ndarray, bounds: np.ndarray, heads: np.ndarray, mask: np.ndarray, page: int,
                budget: int, n_sink: int, n_recent: int, n_threads: int = 1, score: int = 0,
                keys: np.ndarray | None = None, spread: float = 0.0, candidates: np.ndarray | None = None) -> np.ndarray:
    """``ggml_kv_page_select`` for one decode token: ``q`` ``(n_head, d)``, ``bounds``
    ``(n_pages, n_head_kv, 2*d)`` (float32, or float16 as the CPU's cache keeps them), ``mask``
    ``(n_kv,)`` (0 or -inf). Returns the selection,
    int32 ``(n_head_kv, ceil(n_kv/page))``. ``score``: ``bindings.KV_SCORES``' id of the page score;
    the exact one needs ``keys``, the F16 cache rows ``(n_kv, n_head_kv*d)``; ``spread`` goes with
    the midpoint one (``ggml_kv_page_select_set_spread``); ``candidates``, an earlier selection of
    the same shape, limits the scored pages to its own (``ggml_kv_page_select_set_candidates``)."""
    q = np.ascontiguousarray(q, dtype=np.float32)
    bounds, b_type = _bounds_array(bounds)
    heads = np.ascontiguousarray(heads, dtype=np.int32)
    n_head, d = q.shape
    n_pages, n_head_kv, d2 = bounds.shape
    npk = -(-mask.size // max(page, 1))
    if page < 1 or d2 != 2 * d or n_head % n_head_kv or heads.shape != (n_head,) or npk > n_pages:
        raise ValueError("page_select: shapes do not agree")
    if min(budget, n_sink, n_recent) < 0:
        raise ValueError("page_select: budget, n_sink and n_recent must be >= 0")
    if not 0.0 <= spread <= 1.0:
        raise ValueError("page_select: spread must be in [0, 1]")
    c = _Ctx()
    try:
        tq = c.tensor(GGML_TYPE["F32"], (d, n_head, 1), q.tobytes())
        tb = c.tensor(b_type, (2 * d, n_head_kv, n_pages), bounds.tobytes())
        th = c.tensor(GGML_TYPE_I32, (n_head,), heads.tobytes())
        tm = c.tensor(GGML_TYPE["F32"], (mask.size, 1), np.ascontiguousarray(mask, np.float32).tobytes())
        t = c.g.ggml_kv_page_select(c.ctx, tq, tb, th, tm, page, budget, n_sink, n_recent)
        c.g.ggml_kv_page_select_set_score(t, score)
        if spread:
            c.g.ggml_kv_page_select_set_spread(t, spread)
        if candidates is not None:
            cand = np.ascontiguousarray(candidates, dtype=np.int32)
            if cand.shape != (n_head_kv, npk):
                raise ValueError(f"page_select: candidates must be {(n_head_kv, npk)}")
            c.g.ggml_kv_page_select_set_candidates(t, c.tensor(GGML_TYPE_I32, (npk, n_head_kv), cand.tobytes()))
        if keys is not None:
            keys = np.ascontiguousarray(keys, dtype=np.float16)
            c.g.ggml_kv_page_select_set_keys(t, c.tensor(GGML_TYPE["F16"], (keys.shape[1], keys.shape[0]), keys.tobytes()))
        return c.compute(t, n_threads, (n_head_kv, npk)).view(np.int32).copy()
    finally:
        c.close()
