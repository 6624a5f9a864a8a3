"""bench and the per-op profile: what they measure and report, on a short context."""

import json

import numpy as np
import pytest

from powerinfer_attn.evaluation import bench
from powerinfer_attn.evaluation import profile
from powerinfer_attn.engine.decode import Engine


def test_part_of_names():
    assert profile.part_of("Qcur-3", "MUL_MAT") == "wq"
    assert profile.part_of("Qcur-3", "MUL_MAT_SPARSE_ATTN") == "wq"
    assert profile.part_of("Qcur-3 (view) (permuted)", "PERMUTE") == "other"
    assert profile.part_of("Qcur-3", "ROPE") == "other"
    assert profile.part_of("kq-12", "MUL_MAT") == "kq"
    assert profile.part_of("kq_soft_max-12", "SOFT_MAX") == "softmax"
    assert profile.part_of("kqv-0", "MUL_MAT_SPARSE_ATTN") == "kqv"
    assert profile.part_of("attn_out-29", "MUL_MAT") == "wo"
    assert profile.part_of("node_193", "FLASH_ATTN_EXT") == "flash_attn"
    assert profile.part_of("ffn_up-1", "MUL_MAT") == "ffn"
    assert profile.part_of("result_output", "MUL_MAT") == "output"


def test_amdahl_limit():
    assert profile.amdahl_limit(0.0, 0.5) == 1.0
    assert profile.amdahl_limit(0.6, 1.0) == pytest.approx(1.0)
    assert profile.amdahl_limit(1.0, 0.25) == pytest.approx(4.0)
    assert profile.amdahl_limit(0.75, 0.5) == pytest.approx(1 / (0.25 + 0.375))


@pytest.mark.timing
def test_budget_limit_scales_the_softmax_with_the_budget():
    """With a token budget the softmax runs over the selected pages only, so it shrinks with the
    budget's share as K*q and softmax*V do; wq and wo with the head density alone."""
    prof = {"parts_ms": {"kq": 8.0, "kqv": 4.0, "softmax": 2.0, "wq": 1.0, "wo": 1.0, "ffn": 4.0}}
    after = 4.0 + 0.5 * 2.0 + 0.5 * (1024 / 8192) * 14.0
    assert bench.budget_limit(prof, 0.5, 1024, 8192) == pytest.approx(20.0 / after)
    assert bench.budget_limit(prof, 1.0, 8192, 8192) == pytest.approx(1.0)  # a budget that covers it all


def test_profile_accounts_for_the_step(model_path):
    timer = profile.NodeTimer()
    with Engine(model_path, n_ctx=320, n_threads=2, tensor_hook=timer) as eng:
        toks = bench._context_tokens(eng, 257, None)
        eng.prefill(toks[:256])

        def step():
            bench._timed_step(eng, toks[256], 256)

        # a timing measurement: another process on the 2 cores can upset one attempt, not three
        for attempt in range(3):
            eng.set_sparse(False)
            dense = profile.profile_steps(eng, timer, step, 3)
            eng.set_sparse(True)
            eng.set_mask(bench.heads_for_density(1 / 3, eng.n_layer, eng.n_head, eng.n_head_kv))
            sparse = profile.profile_steps(eng, timer, step, 3)
            if profile.trustworthy(dense, 0.35) and profile.trustworthy(sparse, 0.35):
                break
        assert eng.n_past == 256  # every profiled step was rolled back
    for p in (dense, sparse):
        # every node was seen; the corrected parts add up to about the plain step
        assert p["nodes"] > 10 * eng.n_layer
        assert profile.trustworthy(p, 0.35)
        assert 0.0 < p["skippable_share"] < 1.0
        for part in ("wq", "kq", "softmax", "kqv", "wo", "ffn"):
            assert p["parts_ms"][part] > 0.0, (p is sparse, part, p["parts_ms"])


@pytest.mark.timing
def test_run_reports_ratios_limits_and_plot(model_path, tmp_path):
    res = bench.run(model_path, [64], [1.0, 0.5], threads=2, reps=3, flash_attn="off", progress=lambda m: None)
    json.dumps(res)  # JSON-ready
    rows = res["rows"]
    assert [r["mode"] for r in rows] == ["dense", "sparse", "sparse"]
    dense, all_heads, half = rows
    assert dense["ratio"] is None and dense["flash_attn"] is False
    assert half["kept"] == pytest.approx(np.round(0.5 * 9) / 9)
    # a limit is given exactly when the profile adds up to the step (timing: a loaded machine
    # can spoil it, which test_profile_accounts_for_the_step checks with retries)
    faithful = profile.trustworthy(res["profiles"]["64"]["dense"])
    assert (half["limit"] is not None) == faithful
    if faithful:
        assert all_heads["kept"] == 1.0 and all_heads["limit"] == pytest.approx(1.0)
        assert 1.0 < half["limit"] < 1 / half["kept"]
    for r in rows[1:]:
        assert r["ratio"] > 0.3 and r["tok_s"] > 0
    assert set(res["profiles"]["64"]["sparse"]) == {"1.0", "0.5"}
    assert all(ops == 7 for ops in res["sparse_layer_ops"])  # wq, attention and wo all sparse
    table = bench.format_table(res)
    assert "| 64 | FA off" in table and "density 0.5" in table
    assert "| 64 | sparse 0.5 |" in bench.format_profile(res)
    out = tmp_path / "bench.png"
    bench.plot(res, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_show_prints_saved_results(tmp_path):
    from click.testing import CliRunner

    from powerinfer_attn.cli import main

    bench_json = tmp_path / "bench.json"
    bench_json.write_text(json.dumps({
        "model": "/m/x.gguf", "threads": 2, "reps": 3, "gqa_masks": False, "profiles": {},
        "rows": [
            {"ctx": 64, "mode": "dense", "density": 1.0, "kept": 1.0, "tok_s": 50.0, "step_ms": 20.0,
             "ratio": None, "limit": None, "flash_attn": False, "repack": True},
            {"ctx": 64, "mode": "sparse", "density": 0.5, "kept": 4 / 9, "tok_s": 60.0, "step_ms": 16.7,
             "ratio": 1.2, "limit": 1.5, "flash_attn": False, "repack": True},
        ]}))
    out = CliRunner().invoke(main, ["show", str(bench_json)])
    assert out.exit_code == 0, out.output
    assert "| 64 | FA off, repack on | 50.0 | 60.0 (1.20x of 1.50x) |" in out.output
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    out = CliRunner().invoke(main, ["show", str(bad)])
    assert out.exit_code != 0 and "not a score, needle, eval, bench, bench-serve, diagnose or retrieval-heads result" in out.output
    needle_json = tmp_path / "needle.json"
    needle_json.write_text(json.dumps([
        {"predictor": p, "haystack": "filler", "length": 1024, "trials": 2, "correct": c, "density": d,
         "answers": ["1", "2"], "keys": [1, 3], "accuracy": c / 2} for p, c, d in (("dense", 2, 1.0), ("all", 1, 0.7))]))
    out = CliRunner().invoke(main, ["show", str(needle_json)])
    assert out.exit_code == 0 and "| filler | 1024 | 2/2 | 1/2 (density 0.70) |" in out.output, out.output


def test_skipped_byte_share(model_path):
    """Every part sparse skips all the skippable bytes; a dense wo (a K-quant fallback) leaves a
    share that grows with the context, as the K/V rows outweigh wq and wo."""
    n_layer = 30
    assert bench.skipped_byte_share(model_path, 1024, [7] * n_layer) == pytest.approx(1.0)
    short, long = (bench.skipped_byte_share(model_path, c, [3] * n_layer) for c in (256, 8192))
    assert 0.3 < short < long < 1.0
    # a quantized cache holds fewer K/V bytes: wo weighs more
    assert bench.skipped_byte_share(model_path, 8192, [3] * n_layer, "q8_0") < long
    assert bench.skipped_byte_share(model_path, 8192, [0] * n_layer) == 0.0
    # wq and wo on a GPU are not skippable there: the K/V rows are all of it
    assert bench.skipped_byte_share(model_path, 256, [2 | 8] * n_layer) == pytest.approx(1.0)


def test_byte_share(model_path):
    """The share of a step's bytes head sparsity can skip: none of an empty cache's on the GPU
    (wq and wo run dense there), growing with the context towards 1; on the CPU wq and wo too."""
    assert bench.byte_share(model_path, 0, gpu=True) == 0.0
    gpu = [bench.byte_share(model_path, c, gpu=True) for c in (1024, 8192, 65536)]
    assert 0.0 < gpu[0] < gpu[1] < gpu[2] < 1.0
    assert bench.byte_share(model_path, 8192) > gpu[1]
    assert bench.byte_share(model_path, 8192, "q8_0", gpu=True) < gpu[1]
