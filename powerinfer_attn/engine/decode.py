"""Step-by-step decode through the patched llama.cpp bindings.

The engine owns one model and one context. ``prefill`` runs the prompt densely;
``step`` decodes one token. Before each step of a sparse run a predictor is asked
for the ``activated_head`` mask ``[n_layer, n_head]`` (1 = head active), which the
engine hands to the library.

The engine takes masks and predictor files; it knows no predictor class. A predictor is
anything with the ``Predictor`` protocol (``predictor.py``; the ``predictors`` folder has the
built-in ones). The sparse controls are ``sparse_controls.SparseControls``, reading the graph's
tensors is ``hooks``; what they export is importable from here too.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..native import bindings as B
from ..native import rpc as rpc_mod
from ..native.bindings import EngineError, bindings
from .hooks import TensorHook, _eval_callback
from .predictor import Predictor, PredictorBase, StepState, as_predictor
from .sparse_controls import SparseControls, SparseFallbackWarning

__all__ = ["Engine", "EngineError", "Generation", "SeqState", "open_engine", "Predictor", "PredictorBase", "StepState",
           "as_predictor", "TensorHook", "SparseControls", "SparseFallbackWarning"]


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


class Engine(SparseControls):
    def __init__(self, model_path: str | os.PathLike, n_ctx: int = 2048, n_threads: int | None = None,
                 flash_attn: bool = False, n_batch: int = 512, repack: bool = True,
                 tensor_hook: TensorHook | None = None, cache_type_k: str = "f16", cache_type_v: str = "f16",
                 n_gpu_layers: int = 0, rpc: Sequence[str] | str = ()):
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
        ``rpc``: ggml RPC servers (``host:port``, ``powerinfer-attn rpc-server``) that take the
        offloaded layers instead of a local GPU: the last ``n_gpu_layers`` layers, split over the
        servers by their memory, the rest here. Every sparse op, the predictor and the fills run
        on the server holding the layer (their CPU kernels; wq and wo stay dense there, as on a
        GPU). A server of another protocol version (stock llama.cpp) is refused.
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
        self.rpc = rpc_mod.parse_endpoints(rpc) if rpc else []
        if self.rpc and n_gpu_layers == 0:
            raise EngineError("RPC servers take the offloaded layers: give n_gpu_layers (-ngl) > 0")
        devices = rpc_mod.server_devices(self.rpc) if self.rpc else rpc_mod.local_devices()
        if devices is not None:  # NULL-terminated; kept alive with the engine
            self._devices = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)
            mparams.devices = ctypes.cast(self._devices, ctypes.c_void_p)
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
        eng.flash_attn, eng.repack, eng.n_gpu_layers, eng.rpc = flash_attn, True, 0, []
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
        self.n_ubatch = C.llama_n_ubatch(self.ctx)
        self.n_past = 0
        # the token at each position decoded through this engine (a predictor calibrating on the
        # prompt decodes its end again); an attached engine's caller decodes itself: left empty
        self.tokens: list[int] = []
        self.graph_steps = {"dense": 0, "sparse": 0}  # sparse-mode steps by the graph they ran
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
        self.tokens = []

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
        self.tokens.extend(int(t) for t in tokens)
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
        del self.tokens[n_past:]

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
        return SeqState(buf, n, self.n_past, self.n_layer, self.n_head_kv, self.n_embd, self.flash_attn, self.cache_types,
                        tuple(self.tokens))

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
        self.tokens = list(state.tokens)

    def predicted_step(self, predictor: Predictor, i: int, token: int) -> tuple[np.ndarray, np.ndarray]:
        """Decode one token sparsely with the predictor's mask; (logits, the mask used).

        An in-graph predictor (``trained:``) computes the masks inside the step; any other
        predictor's mask is set first, and overrides a loaded in-graph predictor. Below
        ``sparse_min_ctx`` the step runs the stock graph and the mask used is every head.
        Step ``i`` 0 (the first of an answer, the prompt in the cache) first calls
        ``predictor.begin(self)``."""
        predictor = as_predictor(predictor)
        if i == 0:
            predictor.begin(self)
        if not self.next_step_sparse():
            self.graph_steps["dense"] += 1
            return self.step(token), np.ones((self.n_layer, self.n_head), np.int32)
        self.graph_steps["sparse"] += 1
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
    tokens: tuple[int, ...] = ()  # the token at each position, when the saving engine knew them


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
