"""Fetch the pinned llama.cpp tree, apply our patch series, build and install it.

The tree is the one vendored in the ``llama-cpp-python`` source distribution, so
one patched source tree gives both the engine (libllama, libggml) and the ctypes
bindings that match it.

Layout under the vendor directory (git-ignored):

    dist/       the downloaded sdist
    pristine/   the sdist unpacked, never modified
    src/        the patched tree that is built (only files that patches touch
                ever differ from pristine/, and they are rewritten only when
                their content changes, so the build dir stays incremental)
    build/      scikit-build-core's persistent CMake build dir

A build is identified by a digest of the sdist hash, the series, every patch and
the CMake arguments. The digest is written next to the installed package; a
second ``build`` with the same digest does nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Callable

SDIST_NAME = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_FILE = f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"

# mtmd (multimodal) is not needed and doubles the build time
DEFAULT_CMAKE_ARGS = [
    "-DLLAVA_BUILD=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DGGML_RPC=ON",  # libggml-rpc: `powerinfer-attn rpc-server` and --rpc (native/rpc.py)
]

# -march=native compiles ggml's AMX kernels in wherever the CPU reports AMX, and they die with
# SIGILL (ldtilecfg) where the kernel or hypervisor does not hand the process the tile state: seen
# on this project's 2-core x86-64 machines (2026-12-07), on the first prompt. They serve only
# prefill's quantized matrix products, so the patched and the stock build both leave them out
# (x86-64 only; the flags are passed as CMAKE_C_FLAGS/CMAKE_CXX_FLAGS).
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"

# `build --cuda`: ggml's CUDA backend too, for the GPU this machine has (nvcc's "native")
CUDA_CMAKE_ARGS = ["-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=native"]

STAMP_NAME = ".powerinfer_attn_build.json"
PATCH_SYMBOL = "llama_powerinfer_attn_version"

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
REPO_ROOT = PACKAGE_ROOT.parent


class BuildError(RuntimeError):
    """A build step failed; the message says which and what to do."""


class HashMismatch(BuildError):
    def __init__(self, path: Path, expected: str, actual: str):
        super().__init__(
            f"sha256 mismatch for {path}: expected {expected}, got {actual}. "
            f"The file is corrupt or not the pinned release; delete it (rm {path}) and run again "
            f"to download it afresh."
        )
        self.path, self.expected, self.actual = path, expected, actual


class PatchError(BuildError):
    def __init__(self, patch: str, file: str | None, detail: str, pristine: Path | None = None):
        where = f" at {file}" if file else ""
        tree = f"the pinned tree {pristine} (from {SDIST_FILE})" if pristine else f"the pinned tree ({SDIST_FILE})"
        super().__init__(
            f"patch {patch} does not apply{where}: {detail.strip()}\n"
            f"The tree was left untouched. Update the patch against {tree}: apply the series up to "
            f"{patch} in a copy of it, redo the rejected hunks by hand, and regenerate {patch} with "
            f"`git diff` (a/ b/ paths from the sdist root)."
        )
        self.patch, self.file = patch, file


Log = Callable[[str], None]


def _default_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise HashMismatch(path, expected, actual)


# --- the patch series -------------------------------------------------------


def read_series(patches_dir: Path) -> list[Path]:
    """Patch files named in ``series``, in order; ``#`` starts a comment."""
    series = patches_dir / "series"
    if not series.is_file():
        raise BuildError(f"no series file in {patches_dir}")
    out: list[Path] = []
    for lineno, raw in enumerate(series.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        p = patches_dir / line
        if not p.is_file():
            raise BuildError(f"{series}:{lineno}: patch {line} not found")
        if p in out:
            raise BuildError(f"{series}:{lineno}: patch {line} listed twice")
        out.append(p)
    return out


_DIFF_PATH = re.compile(r"^(?:---|\+\+\+) (?:a|b)/(\S+)")


def touched_files(patch: Path) -> set[str]:
    """Paths (relative to the tree root) that a unified diff reads or writes.

    The free-text header before the first hunk header is ignored; paths must carry
    git's a/ and b/ prefixes (``git diff`` output, applied with -p1).
    """
    text = patch.read_text()
    start = text.find("\ndiff --git ")
    body = text[start + 1:] if start >= 0 else text
    files = set()
    for line in body.splitlines():
        m = _DIFF_PATH.match(line)
        if m:
            files.add(m.group(1))
    return files


def series_digest(patches: list[Path], cmake_args: list[str]) -> str:
    h = hashlib.sha256()
    h.update(SDIST_SHA256.encode())
    for p in patches:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update("\0".join(cmake_args).encode())
    return h.hexdigest()


def _git_apply(patch: Path, tree: Path, check: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # keep git from discovering an enclosing repository (ours), which would make
    # it resolve the patch's paths against that repository's root
    env["GIT_CEILING_DIRECTORIES"] = str(tree.parent)
    cmd = ["git", "apply", "--whitespace=nowarn", "-p1"]
    if check:
        cmd.append("--check")
    return subprocess.run(cmd + [str(patch)], cwd=tree, env=env, capture_output=True, text=True)


_FAILED_FILE = re.compile(r"(?:patch failed|No such file|does not exist in index|already exists in working directory)\W*:?\s*([^\s:]+)")


def apply_series(patches: list[Path], pristine: Path, target: Path, log: Log = _default_log) -> set[str]:
    """Make ``target`` equal ``pristine`` plus the series.

    The patches are applied to a scratch copy of just the files they touch, so a
    patch that fails leaves ``target`` as it was. Files are written to ``target``
    only when their content changes; files touched by the previous series but not
    by this one are restored from pristine. Returns the set of touched files.
    """
    record = target / ".powerinfer_attn_applied.json"
    previously = set(json.loads(record.read_text())["files"]) if record.is_file() else set()
    touched: set[str] = set()
    for p in patches:
        touched |= touched_files(p)

    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".stage-") as tmp:
        stage = Path(tmp) / "tree"
        stage.mkdir()
        for rel in touched:
            src = pristine / rel
            if src.is_file():
                (stage / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, stage / rel)
        for p in patches:
            r = _git_apply(p, stage, check=True)
            if r.returncode == 0:
                r = _git_apply(p, stage, check=False)
            if r.returncode != 0:
                m = _FAILED_FILE.search(r.stderr)
                raise PatchError(p.name, m.group(1) if m else None, r.stderr, pristine)
            log(f"  applied {p.name}")

        changed = 0
        for rel in sorted(touched | previously):
            want = stage / rel if rel in touched else pristine / rel
            dst = target / rel
            if want.is_file():
                data = want.read_bytes()
                if not dst.is_file() or dst.read_bytes() != data:
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    dst.write_bytes(data)
                    changed += 1
            elif dst.exists():
                dst.unlink()
                changed += 1
    record.write_text(json.dumps({"files": sorted(touched)}, indent=1))
    log(f"  {len(patches)} patches, {len(touched)} files, {changed} rewritten")
    return touched


# --- the sdist ----------------------------------------------------------------


def fetch_sdist(dist_dir: Path, log: Log = _default_log) -> Path:
    """Download the pinned sdist with pip (the only network access) and verify it."""
    path = dist_dir / SDIST_FILE
    if not path.is_file():
        dist_dir.mkdir(parents=True, exist_ok=True)
        log(f"downloading {SDIST_NAME}=={SDIST_VERSION} source distribution")
        r = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "--disable-pip-version-check", "-d", str(dist_dir), f"{SDIST_NAME}=={SDIST_VERSION}"],
            capture_output=True, text=True,
        )
        if r.returncode != 0 or not path.is_file():
            raise BuildError(f"pip could not download {SDIST_NAME}=={SDIST_VERSION}:\n{r.stderr[-2000:]}")
    verify_sha256(path, SDIST_SHA256)
    return path


def unpack(sdist: Path, dest: Path, log: Log = _default_log) -> Path:
    """Unpack the sdist's top directory to ``dest`` once (atomically)."""
    marker = dest / ".complete"
    if marker.is_file():
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    log(f"unpacking {sdist.name}")
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".unpack-"))
    try:
        with tarfile.open(sdist) as tf:
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tf.extractall(tmp, **kwargs)
        (top,) = list(tmp.iterdir())
        top.rename(dest)
        marker.write_text(SDIST_SHA256 + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# --- what is installed ------------------------------------------------------


@dataclasses.dataclass
class Installed:
    package_dir: Path | None
    lib: Path | None
    patch_version: str | None
    stamp: dict | None

    @property
    def patched(self) -> bool:
        return self.patch_version is not None


def installed() -> Installed:
    """Inspect the llama_cpp package importable from this interpreter, without importing it."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return Installed(None, None, None, None)
    pkg = Path(list(spec.submodule_search_locations)[0])
    lib = library_path(pkg)
    stamp_file = pkg / STAMP_NAME
    stamp = json.loads(stamp_file.read_text()) if stamp_file.is_file() else None
    version = None
    if lib is not None:
        version = patch_version_of(lib)
    return Installed(pkg, lib, version, stamp)


def library_path(package_dir: Path) -> Path | None:
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    for d in ([Path(override)] if override else []) + [package_dir / "lib"]:
        for name in ("libllama.so", "libllama.dylib", "llama.dll"):
            if (d / name).is_file():
                return d / name
    return None


def patch_version_of(lib: Path) -> str | None:
    """The version string our patch series exports, or None for a stock library.

    Looked up in a child process: dlopen caches by path, so a library loaded here
    before a reinstall would keep answering for the old file.
    """
    code = (
        "import ctypes,sys\n"
        "h=ctypes.CDLL(sys.argv[1])\n"
        f"f=getattr(h,{PATCH_SYMBOL!r},None)\n"
        "if f is None: sys.exit(3)\n"
        "f.restype=ctypes.c_char_p\n"
        "print(f().decode())\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(lib)], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None


# --- the build --------------------------------------------------------------


@dataclasses.dataclass
class BuildResult:
    digest: str
    rebuilt: bool
    package_dir: Path | None


def cmake_args_from_env(cuda: bool = False) -> list[str]:
    extra = os.environ.get("CMAKE_ARGS", "").split()
    # quoted: scikit-build-core splits CMAKE_ARGS as a shell would
    no_amx = ([f'-DCMAKE_C_FLAGS="{NO_AMX_FLAGS}"', f'-DCMAKE_CXX_FLAGS="{NO_AMX_FLAGS}"']
              if platform.machine().lower() in ("x86_64", "amd64") else [])
    return DEFAULT_CMAKE_ARGS + no_amx + (CUDA_CMAKE_ARGS if cuda else []) + extra


def _find_program(env_var: str | None, names: tuple[str, ...]) -> str | None:
    """The program ``$env_var`` names (its first word: CC may be "ccache gcc"), else the first
    of ``names`` on PATH."""
    if env_var and os.environ.get(env_var, "").strip():
        try:
            first = shlex.split(os.environ[env_var])[0]
        except ValueError:  # unbalanced quotes
            first = os.environ[env_var].split()[0]
        return shutil.which(first)
    return next((found for found in map(shutil.which, names) if found), None)


def _python_tool(module: str) -> bool:
    """scikit-build-core also uses cmake/ninja from their PyPI packages (pip install cmake ninja)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return False
    # a plain directory called cmake/ on sys.path is a namespace package (no origin), not the tool
    return spec is not None and spec.origin not in (None, "namespace")


def check_toolchain() -> dict[str, str]:
    """Find what the build needs before the long pip build starts: a C and a C++ compiler
    (``$CC``/``$CXX`` if set), cmake (on PATH or the ``cmake`` Python package) and a build tool
    (make or ninja). Raises BuildError listing everything missing and what to install."""
    found: dict[str, str] = {}
    missing: list[str] = []
    for key, env_var, names, what in (
            ("cc", "CC", ("cc", "gcc", "clang"), "a C compiler"),
            ("cxx", "CXX", ("c++", "g++", "clang++"), "a C++ compiler")):
        prog = _find_program(env_var, names)
        if prog:
            found[key] = prog
        elif os.environ.get(env_var, "").strip():
            missing.append(f"{what}: {env_var}={os.environ[env_var]!r} is not found on PATH (fix or unset {env_var})")
        else:
            missing.append(f"{what} ({', '.join(names)} on PATH, or ${env_var})")
    cmake = _find_program(None, ("cmake", "cmake3"))
    if cmake or _python_tool("cmake"):
        found["cmake"] = cmake or "cmake (Python package)"
    else:
        missing.append("cmake (on PATH, or `pip install cmake` in this environment)")
    tool = _find_program(None, ("ninja", "make"))
    if tool or _python_tool("ninja") or os.environ.get("CMAKE_GENERATOR"):
        found["build_tool"] = tool or os.environ.get("CMAKE_GENERATOR") or "ninja (Python package)"
    else:
        missing.append("make or ninja")
    if missing:
        raise BuildError(
            "cannot build the patched llama.cpp, missing: " + "; ".join(missing) + ". "
            "Install a C/C++ toolchain and CMake (Debian/Ubuntu: `apt-get install build-essential cmake`; "
            "Fedora: `dnf install gcc gcc-c++ make cmake`; macOS: `xcode-select --install` and "
            "`brew install cmake`), then run `powerinfer-attn build` again."
        )
    return found


def build(vendor_dir: Path | None = None, patches_dir: Path | None = None, force: bool = False,
          log: Log = _default_log, cuda: bool = False) -> BuildResult:
    """``cuda``: build ggml's CUDA backend too (needs nvcc; the CPU backend stays)."""
    vendor_dir = Path(vendor_dir or os.environ.get("POWERINFER_ATTN_VENDOR", REPO_ROOT / "vendor"))
    patches_dir = Path(patches_dir or REPO_ROOT / "patches")
    patches = read_series(patches_dir)
    cmake_args = cmake_args_from_env(cuda)
    digest = series_digest(patches, cmake_args)

    inst = installed()
    if not force and inst.stamp and inst.stamp.get("digest") == digest and inst.patched:
        log(f"up to date: patched llama_cpp {inst.patch_version} at {inst.package_dir} "
            f"({len(patches)} patches, digest {digest[:12]})")
        return BuildResult(digest, False, inst.package_dir)

    check_toolchain()
    if cuda and not shutil.which("nvcc"):
        raise BuildError("build --cuda needs CUDA's compiler, nvcc, on PATH (the CUDA toolkit)")
    vendor_dir.mkdir(parents=True, exist_ok=True)
    sdist = fetch_sdist(vendor_dir / "dist", log)
    pristine = unpack(sdist, vendor_dir / "pristine", log)
    src = vendor_dir / "src"
    if not (src / ".complete").is_file():
        log("copying pristine tree to src/")
        if src.exists():
            shutil.rmtree(src)
        shutil.copytree(pristine, src, symlinks=True)
    log(f"applying {len(patches)} patches from {patches_dir / 'series'}")
    apply_series(patches, pristine, src, log)

    build_dir = vendor_dir / "build"
    log(f"building and installing the patched llama-cpp-python (build dir {build_dir}; "
        f"CMAKE_ARGS: {' '.join(cmake_args)})")
    env = dict(os.environ, CMAKE_ARGS=" ".join(cmake_args))
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
           "--force-reinstall", "--disable-pip-version-check",
           "-C", f"build-dir={build_dir}", str(src)]
    r = subprocess.run(cmd, env=env)
    if r.returncode != 0:
        raise BuildError(f"building the patched tree failed (exit {r.returncode}); see the compiler output above")

    inst = installed()
    if not inst.patched:
        raise BuildError(f"installed library {inst.lib} does not export {PATCH_SYMBOL}: the patches did not take")
    (inst.package_dir / STAMP_NAME).write_text(json.dumps({
        "digest": digest,
        "sdist_sha256": SDIST_SHA256,
        "patches": [p.name for p in patches],
        "cmake_args": cmake_args,
        "patch_version": inst.patch_version,
    }, indent=1))
    log(f"installed patched llama_cpp {inst.patch_version} at {inst.package_dir}")
    return BuildResult(digest, True, inst.package_dir)


def build_stock(vendor_dir: Path | None = None, log: Log = _default_log) -> Path:
    """Build the unpatched tree into ``vendor/stock/site`` (not the current environment), as the
    reference for "with sparse off the patched engine behaves exactly as stock llama.cpp".
    Returns the directory to put on PYTHONPATH. Idempotent like ``build``."""
    vendor_dir = Path(vendor_dir or os.environ.get("POWERINFER_ATTN_VENDOR", REPO_ROOT / "vendor"))
    cmake_args = cmake_args_from_env()
    digest = series_digest([], cmake_args)
    stock = vendor_dir / "stock"
    site = stock / "site"
    stamp = site / STAMP_NAME
    if stamp.is_file() and json.loads(stamp.read_text()).get("digest") == digest:
        log(f"up to date: stock llama_cpp at {site}")
        return site
    check_toolchain()
    vendor_dir.mkdir(parents=True, exist_ok=True)
    sdist = fetch_sdist(vendor_dir / "dist", log)
    pristine = unpack(sdist, vendor_dir / "pristine", log)
    src = stock / "src"
    if not (src / ".complete").is_file():
        if src.exists():
            shutil.rmtree(src)
        shutil.copytree(pristine, src, symlinks=True)  # the build writes libraries into its source tree
    log(f"building the stock (unpatched) llama-cpp-python into {site}")
    env = dict(os.environ, CMAKE_ARGS=" ".join(cmake_args))
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
                        "--upgrade", "--disable-pip-version-check", "--target", str(site),
                        "-C", f"build-dir={stock / 'build'}", str(src)], env=env)
    if r.returncode != 0:
        raise BuildError(f"building the stock tree failed (exit {r.returncode}); see the compiler output above")
    stamp.write_text(json.dumps({"digest": digest, "cmake_args": cmake_args}, indent=1))
    return site


def check(patches_dir: Path | None = None) -> dict:
    """Is the importable llama_cpp ours, and built from the current series?"""
    patches_dir = Path(patches_dir or REPO_ROOT / "patches")
    inst = installed()
    cuda = bool(inst.stamp) and "-DGGML_CUDA=ON" in inst.stamp.get("cmake_args", [])
    digest = series_digest(read_series(patches_dir), cmake_args_from_env(cuda))
    libs = sorted(inst.lib.parent.glob("libggml-*.so")) if inst.lib else []
    return {
        # ggml's backends in the installed library (libggml-cpu.so, libggml-cuda.so, ...)
        "backends": [p.name[len("libggml-"):-len(".so")] for p in libs if p.name != "libggml-base.so"],
        "package_dir": str(inst.package_dir) if inst.package_dir else None,
        "library": str(inst.lib) if inst.lib else None,
        "patched": inst.patched,
        "patch_version": inst.patch_version,
        "current": bool(inst.stamp and inst.stamp.get("digest") == digest),
        "digest": digest,
    }
