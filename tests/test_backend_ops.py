"""ggml's own op test, test-backend-ops, with the cases ggml-tests.patch adds for the series' ops:
it must compile against the patched ggml, and every case must build its graph and compute on the
CPU (``-b CPU`` compares the CPU with itself, so this checks that the cases run and the kernels
are deterministic; on the GPU machine, ``scripts/gpu/run.sh backend-ops`` compares CUDA with the
CPU, which is the comparison that matters)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from powerinfer_attn.native import build

OPS = ["MUL_MAT_SPARSE_ATTN", "FLASH_ATTN_EXT_HEADS", "SOFT_MAX_HEADS", "HEAD_SELECT", "KV_PAGE_BOUNDS",
       "KV_PAGE_SELECT"]


@pytest.fixture(scope="module")
def backend_ops(engine_lib, tmp_path_factory):
    vendor = Path(os.environ.get("POWERINFER_ATTN_VENDOR", build.REPO_ROOT / "vendor"))
    src = vendor / "src" / "vendor" / "llama.cpp"
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None or not (src / "tests" / "test-backend-ops.cpp").is_file():
        pytest.skip("no C++ compiler or no patched tree in vendor/src")
    lib_dir = build.installed().lib.parent
    exe = tmp_path_factory.mktemp("backend-ops") / "test-backend-ops"
    subprocess.run([cxx, "-std=c++17", "-O1", "-w", f"-I{src / 'ggml' / 'include'}", str(src / "tests" / "test-backend-ops.cpp"),
                    f"-L{lib_dir}", "-lggml", "-lggml-base", f"-Wl,-rpath,{lib_dir}", "-lpthread", "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    return exe


@pytest.mark.parametrize("op", OPS)
def test_backend_ops_cases_run(backend_ops, op):
    r = subprocess.run([str(backend_ops), "-b", "CPU", "-o", op], capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    passed = re.findall(rf"^\s*{op}\(.*\): .*OK", out, re.M)
    assert passed, out[-3000:]
    assert not re.search(rf"^\s*{op}\(.*\): .*(FAIL|not supported)", out, re.M), out[-3000:]
