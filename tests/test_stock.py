"""With sparse attention off, the patched library computes exactly what stock llama.cpp does:
the same dense logits, bit for bit, from the same sdist built without our patches
(`powerinfer-attn build --stock`, which `make test` runs)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from powerinfer_attn.native import build

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def stock_site(engine_lib):
    site = build.REPO_ROOT / "vendor" / "stock" / "site"
    if not (site / "llama_cpp").is_dir():
        if os.environ.get("POWERINFER_ATTN_REQUIRE_ENGINE"):
            pytest.fail(f"no stock build at {site}: run `powerinfer-attn build --stock`")
        pytest.skip(f"no stock build at {site}: run `powerinfer-attn build --stock`")
    return site


@pytest.mark.parametrize("which", ["default", "f32"])
def test_sparse_off_equals_stock(stock_site, engine, model_path, f32_model_path, tmp_path, which):
    from powerinfer_attn.engine.decode import Engine

    path = model_path if which == "default" else f32_model_path
    toks = engine.tokenize("Stock and patched builds must agree on every logit of this sentence.")
    with Engine(path, n_ctx=512, n_threads=2) as eng:
        # exercise the sparse switch first: turning it off again must restore the stock graph
        eng.set_sparse(True)
        eng.set_sparse(False)
        eng.prefill(toks[:4])
        ours = np.array([eng.step(t) for t in toks[4:]])
    out = tmp_path / "stock.npy"
    env = dict(os.environ, PYTHONPATH=str(stock_site))
    r = subprocess.run([sys.executable, str(HERE / "stock_logits.py"), str(path), str(out), "4", *map(str, toks)],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    stock = np.load(out)
    assert stock.shape == ours.shape
    assert np.array_equal(stock, ours)
