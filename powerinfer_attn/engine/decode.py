"""Step-by-step decode through the patched llama.cpp bindings.

The engine owns one model and one context. ``prefill`` runs the prompt densely;
``step`` decodes one token. Before each step of a sparse run a predictor is asked
for the ``activated_head`` mask ``[n_layer, n_head]`` (1 = head active), which the
engine hands to the library.

The engine takes masks and predictor files; it knows no predictor class. A predictor is
anything with the ``Predictor`` protocol below (the ``predictors`` folder has the built-in ones).
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from ..native import bindings as B
from ..native.bindings import KV_DENSE_LAYERS, KV_PAGE, KV_PAGES, KV_RECENT, KV_SINK, EngineError, bindings


class SparseFallbackWarning(UserWarning):
    """Sparse decode is on, but some parts of some layers run on the dense op (see
    ``Engine.layer_ops``): the result is still exact, those parts are just not skipped."""


class TensorHook:
    """Called for graph tensors whose name passes ``wants`` (e.g. ``kqv-12``), right after
    they are computed, with their float32 data as a writable array of ggml shape reversed
    (numpy ``(ne3, ne2, ne1, ne0)``). Writing to it changes what later ops read."""

    def wants(self, name: str) -> bool:
        raise NotImplementedError

    def __call__(self, name: str, data: np.ndarray) -> None:
        raise NotImplementedError


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


@dataclasses.dataclass
class Generation:
    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    prefill_s: float
    decode_s: float
    masks: list[np.ndarray] | None = None

    @property
    def decode_tok_s(self) -> float:
        # the first generated token comes from the prefill; every later one is one decode step
        steps = max(len(self.tokens) - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 and steps else 0.0


def _check_gguf_file(path: Path) -> None:
    """Refuse what is plainly not a GGUF before llama.cpp sees it, naming the file."""
    if not path.is_file():
        raise EngineError(f"model file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if size == 0:
        raise EngineError(f"model file {path} is empty")
    if magic != b"GGUF":
        raise EngineError(f"model file {path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")


def _load_error(path: Path) -> str:
    """Why llama.cpp refused ``path``: its last error lines, if it logged any."""
    why = [line for line in B.recent_errors() if line and "failed to load model" not in line]
    detail = f": {why[-1]}" if why else ""
    return f"llama.cpp could not load {path} (a truncated or corrupt GGUF, or one it does not understand){detail}"


class Engine:
    def __init__(self, model_path: str | os.PathLike, n_ctx: int = 2048, n_threads: int | None = None,
                 flash_attn: bool = False, n_batch: int = 512, repack: bool = True,
                 tensor_hook: TensorHook | None = None, cache_type_k: str = "f16", cache_type_v: str = "f16",
                 n_gpu_layers: int = 0):
        """``repack``: let the CPU backend repack weights it knows how to (Q4_0, Q8_0, ... on
        AVX2); repacked wq/wo are read by the dense op even in sparse mode (see ``layer_ops``).
        ``cache_type_k``/``cache_type_v``: the KV cache's types (``bindings.CACHE_TYPES``); a
        quantized V cache needs flash attention, as in llama.cpp.
        ``n_gpu_layers``: layers to offload to a GPU (llama.cpp's -ngl; needs a library built
        with ``powerinfer-attn build --cuda``). On the GPU sparse decode needs flash attention:
        the path without it (v2 and the head-masked softmax) is CPU-only, as are caches other
        than F16 and Q8_0; llama.cpp's scheduler runs those on the CPU (``set_sparse`` warns).
        The in-graph predictor and all its fills (window fill's attention included) run on each
        layer's device.
        ``tensor_hook``: observe (and possibly modify in place) graph tensors as they are
        computed, through llama.cpp's eval callback; see ``TensorHook``."""
        C = bindings()
        self.C = C
        self.model_path = Path(model_path)
        _check_gguf_file(self.model_path)
        self.n_threads = n_threads or min(os.cpu_count() or 1, 16)
        self.flash_attn = flash_attn
        self.kv_budget: tuple[int, int, int, int, int] | None = None  # set_kv_budget's (budget, page, sinks, recent, dense layers)
        self.repack = repack
        for kind, t in (("K", cache_type_k), ("V", cache_type_v)):
            if t not in B.CACHE_TYPES:
                raise EngineError(f"unknown {kind} cache type {t!r}; choose from {', '.join(B.CACHE_TYPES)}")
        if cache_type_v not in ("f32", "f16", "bf16") and not flash_attn:
            raise EngineError(f"a {cache_type_v} V cache needs flash attention (llama.cpp quantizes V only with it)")
        self.cache_types = (cache_type_k, cache_type_v)

        mparams = C.llama_model_default_params()
        mparams.use_extra_bufts = repack
        mparams.n_gpu_layers = n_gpu_layers
        self.n_gpu_layers = n_gpu_layers
        B.clear_errors()
        self.model = C.llama_model_load_from_file(str(self.model_path).encode(), mparams)
        if not self.model:
            raise EngineError(_load_error(self.model_path))
        self.vocab = C.llama_model_get_vocab(self.model)

        cparams = C.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_threads = self.n_threads
        cparams.n_threads_batch = self.n_threads
        cparams.flash_attn_type = 1 if flash_attn else 0  # LLAMA_FLASH_ATTN_TYPE_ENABLED / _DISABLED
        cparams.type_k = B.CACHE_TYPES[cache_type_k]
        cparams.type_v = B.CACHE_TYPES[cache_type_v]
        cparams.no_perf = True
        self._hook = tensor_hook
        self._hook_errors = []
        if tensor_hook is not None:
            self._cb = _eval_callback(tensor_hook, self._hook_errors)  # keep alive as long as the context
            cparams.cb_eval = self._cb
            cparams.cb_eval_user_data = None
        self.ctx = C.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            C.llama_model_free(self.model)
            self.model = None
            raise EngineError(f"llama.cpp could not create a context (n_ctx={n_ctx})")

        self._owns = True
        self._read_shape()

    @classmethod
    def attach(cls, model_path: str | os.PathLike, model, ctx, flash_attn: bool = False) -> "Engine":
        """An engine over a model and context that someone else made and frees (a
        ``llama_cpp.Llama``'s ``model`` and ``ctx``): the sparse switch, masks, predictor files
        and fills work on it; ``close`` only lets go of the pointers."""
        eng = cls.__new__(cls)
        eng.C = bindings()
        eng.model_path = Path(model_path)
        eng.model, eng.ctx = model, ctx
        eng.vocab = eng.C.llama_model_get_vocab(model)
        eng.n_threads = int(eng.C.llama_n_threads(ctx))
        eng.flash_attn, eng.repack, eng.n_gpu_layers = flash_attn, True, 0
        eng.cache_types = ("f16", "f16")
        eng._hook, eng._hook_errors = None, []
        eng._owns = False
        eng._read_shape()
        return eng

    def _read_shape(self) -> None:
        C = self.C
        self.n_ctx = C.llama_n_ctx(self.ctx)
        self.n_layer = C.llama_model_n_layer(self.model)
        self.n_head = C.llama_model_n_head(self.model)
        self.n_head_kv = C.llama_model_n_head_kv(self.model)
        self.n_embd = C.llama_model_n_embd(self.model)
        self.n_vocab = C.llama_vocab_n_tokens(self.vocab)
        self.n_past = 0
        self._warned_fallback = False
        self._head_predictor: Path | None = None

    # --- lifetime -------------------------------------------------------

    def close(self) -> None:
        """Free the context and the model (unless attached to someone else's); every later call
        raises EngineError."""
        owns = getattr(self, "_owns", True)
        if getattr(self, "ctx", None):
            if owns:
                self.C.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            if owns:
                self.C.llama_model_free(self.model)
            self.model = None
        self.vocab = None

    @property
    def closed(self) -> bool:
        return not getattr(self, "ctx", None)

    def _check_open(self) -> None:
        # the C API takes the freed pointers without complaint: refuse here instead
        if self.closed:
            raise EngineError(f"the engine for {self.model_path.name} is closed (no model or context)")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # --- text -----------------------------------------------------------

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of ``text``; with ``special`` the control tokens' texts (``<|im_start|>``, as a
        chat template writes them) become those tokens instead of being spelled out."""
        self._check_open()
        data = text.encode()
        n_max = len(data) + 8
        buf = (self.C.llama_token * n_max)()
        n = self.C.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_bos, special)
        if n < 0:
            raise EngineError(f"tokenization failed ({n})")
        return list(buf[:n])

    def token_piece(self, token: int) -> bytes:
        self._check_open()
        self._check_token(token)
        buf = ctypes.create_string_buffer(64)
        n = self.C.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.C.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_piece(t) for t in tokens).decode("utf-8", errors="replace")

    def chat_prompt(self, messages: Sequence[dict]) -> str:
        """The prompt for ``messages`` (``{"role", "content"}``) by the model's own chat template
        (``tokenizer.chat_template`` in the GGUF), ending where the assistant's answer starts."""
        self._check_open()
        C = self.C
        tmpl = C.llama_model_chat_template(self.model, None)
        if not tmpl:
            raise EngineError(f"{self.model_path.name} has no chat template")
        msgs = (C.llama_chat_message * len(messages))(
            *[C.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages])
        size = 1024 + 2 * sum(len(m["content"].encode()) for m in messages)
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = C.llama_chat_apply_template(tmpl, msgs, len(messages), True, buf, size)
            if n < 0:
                raise EngineError(f"llama.cpp does not know {self.model_path.name}'s chat template")
            if n <= size:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = n
        raise EngineError("chat template output did not fit")

    def is_eog(self, token: int) -> bool:
        self._check_open()
        return bool(self.C.llama_vocab_is_eog(self.vocab, token))

    # --- decode ---------------------------------------------------------

    def reset(self) -> None:
        self._check_open()
        self.C.llama_memory_clear(self.C.llama_get_memory(self.ctx), True)
        self.n_past = 0

    def _check_token(self, token) -> None:
        if not 0 <= int(token) < self.n_vocab:
            raise EngineError(f"token id {int(token)} is out of range: the vocabulary has {self.n_vocab} tokens")

    def _check_room(self, n: int) -> None:
        if self.n_past + n > self.n_ctx:
            raise EngineError(f"context full: {self.n_past} positions used + {n} new token{'s' * (n != 1)} > n_ctx {self.n_ctx} "
                              f"(use a larger n_ctx, a shorter prompt or fewer tokens, or roll back)")

    def _decode(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        self._check_open()
        n = len(tokens)
        if n == 0:
            raise EngineError("nothing to decode: empty token list")
        self._check_room(n)
        for t in tokens:
            self._check_token(t)
        C = self.C
        batch = C.llama_batch_init(n, 0, 1)
        try:
            for i, t in enumerate(tokens):
                batch.token[i] = t
                batch.pos[i] = self.n_past + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = all_logits or i == n - 1
            batch.n_tokens = n
            rc = C.llama_decode(self.ctx, batch)
            if self._hook is not None and self._hook_errors:
                err = self._hook_errors.pop()
                self._hook_errors.clear()
                raise EngineError(f"tensor hook failed: {err}") from err
            if rc != 0:
                raise EngineError(f"llama_decode failed with {rc}")
        finally:
            C.llama_batch_free(batch)
        self.n_past += n
        rows = range(n) if all_logits else [n - 1]
        out = np.empty((len(rows), self.n_vocab), dtype=np.float32)
        for j, i in enumerate(rows):
            ptr = C.llama_get_logits_ith(self.ctx, i)
            out[j] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        return out if all_logits else out[0]

    def rollback(self, n_past: int) -> None:
        """Forget every position from ``n_past`` on (the KV cache entries and the count)."""
        self._check_open()
        if not 0 <= n_past <= self.n_past:
            raise EngineError(f"cannot roll back to {n_past}: {self.n_past} positions decoded")
        self.C.llama_memory_seq_rm(self.C.llama_get_memory(self.ctx), 0, n_past, -1)
        self.n_past = n_past

    def prefill(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Dense prompt evaluation in n_batch chunks; logits of the last token (or of all).
        A prompt that does not fit the rest of the context is refused before anything runs."""
        self._check_open()
        if len(tokens) == 0:
            raise EngineError("empty prompt: at least one token is needed")
        self._check_room(len(tokens))
        for t in tokens:
            self._check_token(t)
        C = self.C
        n_batch = C.llama_n_batch(self.ctx)
        outs = []
        for s in range(0, len(tokens), n_batch):
            outs.append(self._decode(tokens[s:s + n_batch], all_logits))
        return np.concatenate(outs) if all_logits else outs[-1]

    def step(self, token: int) -> np.ndarray:
        """Decode one token at the next position; its logits."""
        return self._decode([token])

    # --- sequence state -------------------------------------------------

    def save_state(self) -> "SeqState":
        """The decoded sequence (its KV cache cells and positions) as bytes, through llama.cpp's
        ``llama_state_seq_get_data``: one dense prefill can then serve several engines."""
        self._check_open()
        C = self.C
        size = C.llama_state_seq_get_size(self.ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        n = C.llama_state_seq_get_data(self.ctx, buf, size, 0)
        if n == 0 and self.n_past > 0:
            raise EngineError("llama_state_seq_get_data wrote nothing")
        return SeqState(buf, n, self.n_past, self.n_layer, self.n_head_kv, self.n_embd, self.flash_attn, self.cache_types)

    def load_state(self, state: "SeqState") -> None:
        """Replace this engine's sequence with ``state`` (from ``save_state`` of an engine of the
        same model and flash-attention setting, whose V cache has the same layout). Decoding then
        goes on exactly as after the prefill that made it."""
        self._check_open()
        shape = (self.n_layer, self.n_head_kv, self.n_embd, self.flash_attn, self.cache_types)
        theirs = (state.n_layer, state.n_head_kv, state.n_embd, state.flash_attn, state.cache_types)
        if theirs != shape:
            raise EngineError(f"sequence state of another model, flash-attention setting or cache type: "
                              f"(n_layer, n_head_kv, n_embd, flash_attn, cache types) {shape} here, {theirs} in the state")
        if state.n_past > self.n_ctx:
            raise EngineError(f"sequence state of {state.n_past} positions does not fit n_ctx {self.n_ctx}")
        self.reset()
        if state.size and self.C.llama_state_seq_set_data(self.ctx, state.data, state.size, 0) == 0:
            raise EngineError("llama_state_seq_set_data refused the state (see the log above)")
        self.n_past = state.n_past

    # --- sparse attention ----------------------------------------------

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

    def _warn_off_gpu_kernel(self, what: str) -> None:
        """Warn when the head-masked attention of layers on a GPU cannot run there (its kernel,
        ggml-cuda.patch, needs flash attention and F16 or Q8_0 K and V)."""
        if self.n_gpu_layers == 0 or (self.flash_attn and self.cache_types in (("f16", "f16"), ("q8_0", "q8_0"))):
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
                      n_dense_layers: int = KV_DENSE_LAYERS) -> None:
        """Token budget: in sparse decode each KV group's active heads read only about ``budget``
        cached cells, the pages of ``page`` cells whose bound on q.k is highest, always with the
        pages of the first ``n_sink`` and last ``n_recent`` cells the token sees (chosen in the
        graph per step and layer); the first ``n_dense_layers`` layers read every cell. A budget
        that covers the context reads all of it, as without one; ``0`` turns it off. Needs flash
        attention off (the budget runs in the v2 path)."""
        self._check_open()
        if budget < 0 or n_sink < 0 or n_recent < 0 or n_dense_layers < 0:
            raise ValueError(f"kv budget: budget, sinks, recent cells and dense layers must be >= 0 "
                             f"(got {budget}, {n_sink}, {n_recent}, {n_dense_layers})")
        if page not in KV_PAGES:
            raise ValueError(f"kv budget: page must be one of {', '.join(map(str, KV_PAGES))} cells (got {page})")
        if not hasattr(self.C, "llama_set_kv_budget"):
            raise EngineError("this library has no token budget (rebuild: powerinfer-attn build)")
        if budget and self.flash_attn:
            raise EngineError("a token budget runs without flash attention: make the engine with flash_attn=False (-fa off)")
        if budget and self.n_gpu_layers:
            raise EngineError("a token budget runs on the CPU only for now: make the engine with n_gpu_layers=0")
        rc = self.C.llama_set_kv_budget(self.ctx, int(budget), int(page), int(n_sink), int(n_recent), int(n_dense_layers))
        if rc != 0:
            raise EngineError(f"llama_set_kv_budget returned {rc}: {' '.join(B.recent_errors()[-1:])}")
        self.kv_budget = (int(budget), int(page), int(n_sink), int(n_recent), int(n_dense_layers)) if budget else None

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

    def predicted_step(self, predictor: Predictor, i: int, token: int) -> tuple[np.ndarray, np.ndarray]:
        """Decode one token sparsely with the predictor's mask; (logits, the mask used).

        An in-graph predictor (``trained:``) computes the masks inside the step; any other
        predictor's mask is set first, and overrides a loaded in-graph predictor."""
        predictor = as_predictor(predictor)
        if predictor.in_graph:
            self.use_head_predictor(True)
            logits = self.step(token)
            return logits, predictor.observed()
        if self._head_predictor is not None:
            self.use_head_predictor(False)
        mask = self.check_mask(predictor.predict(StepState(i, self.n_past, token, self)))
        self.set_mask(mask)
        return self.step(token), mask

    def decode_step(self, token: int, predictor: Predictor | None = None, i: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
        """One decode step of ``token``: dense without a predictor, else ``predicted_step`` (step
        ``i`` of its answer); (logits, the mask used or None)."""
        if predictor is None:
            return self.step(token), None
        return self.predicted_step(predictor, i, token)

    def generate(self, prompt: str | Sequence[int], n: int, predictor: Predictor | None = None,
                 stop_at_eog: bool = True, sample: Callable[[np.ndarray], int] | None = None,
                 on_token: Callable[[int], None] | None = None) -> Generation:
        """Generation of up to n tokens, greedy unless ``sample`` (logits -> token, e.g. a
        ``sampling.Sampler``) is given; sparse decode when a predictor is given. ``on_token`` is
        called with each token as soon as it is chosen (streaming).

        The prompt is always prefilled densely. Before each decode step the predictor
        gives the mask for that step.
        """
        prompt_tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        self.reset()
        t0 = time.perf_counter()
        logits = self.prefill(prompt_tokens)
        t1 = time.perf_counter()
        out: list[int] = []
        masks: list[np.ndarray] | None = [] if predictor is not None else None
        self.set_sparse(predictor is not None)
        try:
            for i in range(n):
                tok = int(np.argmax(logits)) if sample is None else sample(logits)
                out.append(tok)
                eog = stop_at_eog and self.is_eog(tok)
                if on_token is not None and not eog:
                    on_token(tok)
                if eog or i == n - 1:
                    break
                logits, mask = self.decode_step(tok, predictor, i)
                if mask is not None:
                    masks.append(mask)
        finally:
            self.set_sparse(False)
        t2 = time.perf_counter()
        return Generation(prompt_tokens, out, self.detokenize(out), t1 - t0, t2 - t1, masks)


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


@dataclasses.dataclass
class SeqState:
    """A decoded sequence saved by ``Engine.save_state``, with what must match to load it."""
    data: ctypes.Array
    size: int
    n_past: int
    n_layer: int
    n_head_kv: int
    n_embd: int
    flash_attn: bool
    cache_types: tuple[str, str]


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
    forget what earlier sequences taught it (a density controller's state), before a new one."""

    name = "predictor"
    hook: TensorHook | None = None
    in_graph = False

    def restart(self, engine: Engine) -> None:
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


def open_engine(model_path, predictor: Predictor | None = None, **kwargs) -> Engine:
    """An engine built for ``predictor`` (with its tensor hook, if it has one) and the
    predictor bound to it."""
    predictor = as_predictor(predictor)
    eng = Engine(model_path, tensor_hook=predictor.hook if predictor is not None else None, **kwargs)
    if predictor is not None:
        try:
            predictor.bind(eng)
        except BaseException:
            eng.close()
            raise
    return eng
