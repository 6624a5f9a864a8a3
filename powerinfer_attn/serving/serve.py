"""An OpenAI-compatible HTTP server with sparse decode: llama-cpp-python's own server
(``llama_cpp.server``: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` with SSE
streaming, the chat template from the GGUF) over a ``Llama`` that ``sparsify`` turned sparse,
plus ``/health`` and one log line per request (tokens, tok/s, head density).

Requests run one at a time (llama-cpp-python's server holds one lock around the model); a new
request waits for the running one instead of interrupting it.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from .sparsify import head_density, predictor_name, restart, sparsify
from .sparsify import sparse_min_ctx as sparse_min_ctx_of


def make_app(model_path: Path, predictor: str | None = None, n_ctx: int = 4096, threads: int | None = None,
             log: Callable[[str], None] | None = None, engine_kw: dict | None = None, sparse_min_ctx: int | str = 0):
    """The FastAPI app: ``predictor`` None serves dense. ``engine_kw``: ``Engine``'s n_gpu_layers,
    flash_attn, cache_type_k and cache_type_v, given to llama-cpp-python's model settings.
    ``sparse_min_ctx``: as ``sparsify``'s (the stock graph for tokens at positions below it)."""
    from llama_cpp.server import app as server_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    say = log or (lambda m: print(m, file=sys.stderr, flush=True))
    _validation_errors_are_4xx()
    settings = dict(model=str(model_path), model_alias=Path(model_path).name, n_ctx=n_ctx, verbose=False)
    if threads:
        settings |= dict(n_threads=threads, n_threads_batch=threads)
    kw = engine_kw or {}
    if kw:
        from ..native.bindings import CACHE_TYPES

        settings |= dict(n_gpu_layers=kw.get("n_gpu_layers", 0), flash_attn=bool(kw.get("flash_attn", False)),
                         type_k=CACHE_TYPES[kw.get("cache_type_k", "f16")], type_v=CACHE_TYPES[kw.get("cache_type_v", "f16")])
    app = server_app.create_app(server_settings=ServerSettings(interrupt_requests=False),
                                model_settings=[ModelSettings(**settings)])
    llm = server_app._llama_proxy._current_model
    if predictor:
        sparsify(llm, predictor, sparse_min_ctx, say)
    _log_requests(llm, say)
    mode = predictor_name(llm) or "dense"
    min_ctx = sparse_min_ctx_of(llm)
    if min_ctx:
        mode += f", stock graph below {min_ctx} tokens"
    say(f"serving {Path(model_path).name} ({mode}), n_ctx {n_ctx}")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": Path(model_path).name, "decode": mode}

    return app


def _validation_errors_are_4xx() -> None:
    """llama-cpp-python's route handler answers every exception with a 500; with this FastAPI a
    request body that fails validation reaches it too. That is the client's error: 422, with
    pydantic's message, as FastAPI's own handler would answer."""
    from fastapi.exceptions import RequestValidationError
    from llama_cpp.server import errors

    handler = errors.RouteErrorHandler
    if getattr(handler, "_powerinfer_attn_422", False):
        return
    inner = handler.error_message_wrapper

    def wrapper(self, error, body=None):
        if isinstance(error, RequestValidationError):
            detail = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in error.errors())
            return 422, errors.ErrorResponse(message=detail, type="invalid_request_error", param=None, code=None)
        return inner(self, error, body)

    handler.error_message_wrapper = wrapper
    handler._powerinfer_attn_422 = True


def _log_requests(llm, say: Callable[[str], None]) -> None:
    """Wrap the ``Llama``'s ``create_completion``, which completions and chat completions (through
    the chat handler) both go through, to log each request when it ends."""
    inner = llm.create_completion

    def logged(*args, **kwargs):
        head_density(llm)  # start the count for this request
        restart(llm)  # and the density control: an answer does not depend on earlier requests
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        if not kwargs.get("stream"):
            usage = out["usage"]
            _say(say, llm, usage["prompt_tokens"], usage["completion_tokens"], time.perf_counter() - t0, None)
            return out
        return _stream(out, t0, llm, say)

    llm.create_completion = logged


def _stream(chunks, t0: float, llm, say):
    first, n = None, 0
    for chunk in chunks:
        if first is None:
            first = time.perf_counter() - t0
        n += 1
        yield chunk
    _say(say, llm, None, n, time.perf_counter() - t0, first)


def _say(say, llm, prompt_tokens, generated: int, seconds: float, ttft: float | None) -> None:
    d = head_density(llm)
    parts = [f"request: {generated} tokens generated"]
    if prompt_tokens is not None:
        parts.append(f"{prompt_tokens} prompt tokens")
    parts.append(f"{seconds:.2f} s ({generated / seconds:.1f} tok/s)" if seconds > 0 else "0 s")
    if ttft is not None:
        parts.append(f"first token after {ttft * 1000:.0f} ms")
    parts.append("dense" if predictor_name(llm) is None else
                 f"head density {d:.3f}" if d is not None else "head density n/a (no decode step)")
    say(", ".join(parts))


def serve(model_path: Path, predictor: str | None, host: str, port: int, n_ctx: int, threads: int | None,
          engine_kw: dict | None = None, sparse_min_ctx: int | str = 0) -> None:
    import uvicorn

    uvicorn.run(make_app(model_path, predictor, n_ctx, threads, engine_kw=engine_kw, sparse_min_ctx=sparse_min_ctx),
                host=host, port=port, log_level="warning")


class ServerProcess:
    """``powerinfer-attn serve`` in a subprocess on a free local port, up once ``/health``
    answers; ``stop`` ends it and returns what it logged."""

    def __init__(self, model_path, *args: str, n_ctx: int = 4096, threads: int | None = None, timeout: float = 180):
        import httpx

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "powerinfer_attn.cli", "serve", "--model", str(model_path),
               "--port", str(self.port), "-c", str(n_ctx), *args]
        if threads:
            cmd += ["-t", str(threads)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s")

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.stderr.read()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
