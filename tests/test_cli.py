"""The command line's shared flags: llama.cpp's spellings on every command that decodes, the old
spellings refused (or noted) with the new one named."""

import json

import pytest
from click.testing import CliRunner

from powerinfer_attn.cli import main

DECODERS = ("generate", "score", "eval", "serve", "needle", "compare")


@pytest.mark.parametrize("command", DECODERS)
def test_every_decoding_command_takes_llama_cpp_flags(command):
    out = CliRunner().invoke(main, [command, "--help"]).output
    for flag in ("-m,", "-t,", "-ngl", "-fa", "-ctk", "-ctv"):
        assert flag in out, f"{command} lacks {flag}"
    if command not in ("eval", "needle"):  # they size each sample's context themselves
        assert "-c," in out  # score: the context before the scored steps (its --prefix)


@pytest.mark.parametrize("command", DECODERS)
def test_old_no_flash_attn_names_the_new_flag(command):
    r = CliRunner().invoke(main, [command, "--no-flash-attn"])
    assert r.exit_code == 2 and "-fa off" in r.output


def test_generate_old_ctx_names_the_new_flag():
    r = CliRunner().invoke(main, ["generate", "-p", "x", "--ctx", "64"])
    assert r.exit_code == 2 and "-c/--ctx-size" in r.output


def test_flash_attn_bare_is_on_and_takes_on_off(monkeypatch):
    """-fa on|off, and a bare --flash-attn (the old switch) still means on; what reaches the engine."""
    import powerinfer_attn.evaluation.compare as cmp

    seen = []

    def fake_score(*args, engine_kw=None, **kw):
        seen.append(engine_kw)
        return []

    monkeypatch.setattr(cmp, "score", fake_score)
    monkeypatch.setenv("POWERINFER_ATTN_TEXT", __file__)
    for flags, want in ((["--flash-attn"], True), (["-fa", "off"], False), (["-fa", "on", "-ctv", "q8_0"], True), ([], False)):
        r = CliRunner().invoke(main, ["score", "--predictor", "all", "-m", __file__, *flags])
        assert seen, r.output
        assert seen[-1]["flash_attn"] is want
    assert seen[-2]["cache_type_v"] == "q8_0" and seen[-1]["n_gpu_layers"] == 0
    r = CliRunner().invoke(main, ["score", "--predictor", "all", "-fa", "maybe"])
    assert r.exit_code == 2


def test_bench_depth_and_the_old_ctx_spelling(monkeypatch):
    import powerinfer_attn.evaluation.bench as bench_mod

    got = []
    monkeypatch.setattr(bench_mod, "run", lambda model, ctxs, *a, **k: got.append(ctxs) or (_ for _ in ()).throw(ValueError("stop")))
    r = CliRunner().invoke(main, ["bench", "-m", __file__, "-d", "128,256"])
    assert got[-1] == [128, 256], r.output
    r = CliRunner().invoke(main, ["bench", "-m", __file__, "--ctx", "512"])
    assert got[-1] == [512] and "-d/--depth" in r.output


def test_bench_takes_c_ctk_ctv_and_the_old_cache_types(monkeypatch):
    import powerinfer_attn.evaluation.bench as bench_mod

    got = []
    monkeypatch.setattr(bench_mod, "run", lambda *a, **k: got.append(k) or (_ for _ in ()).throw(ValueError("stop")))
    CliRunner().invoke(main, ["bench", "-m", __file__, "-d", "128", "-c", "4096", "-ctk", "f16", "-ctv", "f16"])
    assert got[-1]["n_ctx"] == 4096 and got[-1]["caches"] == ("f16",)
    r = CliRunner().invoke(main, ["bench", "-m", __file__, "--cache-types", "q8_0"])
    assert got[-1]["caches"] == ("q8_0",) and "-ctk/-ctv" in r.output
    r = CliRunner().invoke(main, ["bench", "-m", __file__, "-ctk", "f16", "-ctv", "q8_0"])
    assert r.exit_code == 2 and "-ctv must list the same types" in r.output


def test_bench_refuses_a_context_smaller_than_its_depth():
    from powerinfer_attn.evaluation import bench as bench_mod

    # refused before anything loads (the model path is not even read)
    with pytest.raises(ValueError, match="smaller than the deepest -d"):
        bench_mod.run("no-such.gguf", [256, 1024], [1.0], 1, 3, n_ctx=1024)


def _score_rows():
    from pathlib import Path

    return json.loads((Path(__file__).resolve().parent.parent / "figures" / "score-budget-8192.json").read_text())


def test_results_carry_their_kind_and_o_picks_the_format(monkeypatch):
    import powerinfer_attn.evaluation.compare as cmp

    rows = _score_rows()
    rows = rows["rows"] if isinstance(rows, dict) else rows
    monkeypatch.setattr(cmp, "score", lambda *a, **k: [cmp.ScoreResult(**r) for r in rows])
    monkeypatch.setenv("POWERINFER_ATTN_TEXT", __file__)
    args = ["score", "--predictor", "all", "-m", __file__]
    as_json = CliRunner().invoke(main, args + ["--json"])
    as_o = CliRunner().invoke(main, args + ["-o", "json"])
    assert as_json.exit_code == 0 and as_o.exit_code == 0, as_json.output + as_o.output
    doc = json.loads(as_json.stdout)
    assert doc == json.loads(as_o.stdout) and doc["kind"] == "score" and doc["rows"] == rows
    md = CliRunner().invoke(main, args + ["-o", "md"])
    assert md.exit_code == 0 and "| predictor |" in md.stdout
    assert CliRunner().invoke(main, args + ["-o", "html"]).exit_code == 2


def test_show_reads_kinds_and_the_files_written_before_them(tmp_path):
    rows = _score_rows()
    rows = rows["rows"] if isinstance(rows, dict) else rows
    old, new, odd = tmp_path / "old.json", tmp_path / "new.json", tmp_path / "odd.json"
    old.write_text(json.dumps(rows))
    new.write_text(json.dumps({"kind": "score", "rows": rows}))
    odd.write_text(json.dumps({"kind": "generate", "text": "x"}))
    a, b = (CliRunner().invoke(main, ["show", str(f)]) for f in (old, new))
    assert a.exit_code == 0 and a.output == b.output and "| predictor |" in a.output
    both = CliRunner().invoke(main, ["show", str(old), str(new)])  # one matrix of the two
    assert both.exit_code == 0, both.output
    r = CliRunner().invoke(main, ["show", str(odd)])
    assert r.exit_code == 1 and "a generate result has no table" in r.output


def test_show_prints_diagnose_results_old_and_new(tmp_path):
    from pathlib import Path

    old = Path(__file__).resolve().parent.parent / "figures" / "domains" / "diagnose-pred-long-pinned.json"
    new = tmp_path / "d.json"
    new.write_text(json.dumps({"kind": "diagnose", "rows": json.loads(old.read_text())}))
    outs = [CliRunner().invoke(main, ["show", str(f)]) for f in (old, new)]
    assert all(o.exit_code == 0 for o in outs) and "regret" in outs[0].output and outs[0].output == outs[1].output


def test_generate_reports_the_graph_of_each_step(model_path):
    def run(min_ctx):
        r = CliRunner().invoke(main, ["generate", "-m", str(model_path), "-p", "The capital of France is", "-n", "4",
                                      "-t", "2", "--sparse", "--predictor", "all", "--sparse-min-ctx", min_ctx, "--json"])
        assert r.exit_code == 0, r.output
        return json.loads(r.output[r.output.index("{"):])

    below, above = run("1000"), run("0")
    assert below["graph_steps"] == {"dense": 3, "sparse": 0} and below["sparse_min_ctx"] == 1000
    assert above["graph_steps"] == {"dense": 0, "sparse": 3} and above["tokens"] == below["tokens"]
