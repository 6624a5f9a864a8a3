"""RULER through lm-eval, offline: the tokenizer directory made from the GGUF, the table, and
`eval` end to end (one subtask, one short length, two samples) through the engine and through
the server with lm-eval's own client."""

import json
import subprocess
import sys

import pytest

from powerinfer_attn.evaluation import ruler
from powerinfer_attn.predictors.basic import NoHeads
from powerinfer_attn.predictors.wrappers import WindowFill
from powerinfer_attn.predictors.specs import get_predictor


def _doc(rows_scores):
    """A result with one sample per (predictor, task, length, score)."""
    samples = []
    for task, length, answers in rows_scores:
        samples.append({"task": task, "length": length, "doc_id": 0, "scorer": "x:y", "doc": {},
                        "answers": {p: {"text": "", "tokens": 1, "density": d, "score": sc}
                                    for p, (sc, d) in answers.items()}})
    doc = {"kind": "ruler", "model": "m.gguf", "via": "engine", "samples": samples}
    doc["rows"] = ruler._rows(doc)
    return doc


def test_table_has_a_cell_per_task_and_predictor_with_the_difference_from_dense():
    doc = _doc([("niah_single_2", 4096, {"dense": (1.0, 1.0), "p": (0.5, 0.7)}),
                ("niah_single_2", 4096, {"dense": (1.0, 1.0), "p": (1.0, 0.6)}),
                ("ruler_vt", 4096, {"dense": (0.8, 1.0), "p": (0.4, 0.65)})])
    table = ruler.format_table(doc)
    assert "| niah_single_2 | 4096 | 2 | 100.0 | 75.0 (-25.0) |" in table
    assert "| ruler_vt | 4096 | 1 | 80.0 | 40.0 (-40.0) |" in table
    assert "| **mean** | 4096 | | 90.0 | 57.5 (-32.5) |" in table
    rows = {(r["predictor"], r["task"]): r for r in doc["rows"]}
    assert rows[("p", "niah_single_2")]["density"] == pytest.approx(0.65)


def test_merge_joins_the_predictors_of_runs_over_the_same_samples():
    def run(answers):  # answers: {doc_id: {predictor: (text, score)}}
        return {"kind": "ruler", "model": "m.gguf", "via": "engine", "seconds": 2.0,
                "samples": [{"task": "ruler_vt", "length": 4096, "doc_id": i, "scorer": "x:y", "doc": {},
                             "answers": {p: {"text": t, "tokens": 1, "density": 1.0, "score": sc}
                                         for p, (t, sc) in a.items()}} for i, a in answers.items()],
                "rows": []}
    a = run({0: {"dense": ("7", 1.0), "p": ("7", 1.0)}, 1: {"dense": ("3", 1.0), "p": ("4", 0.0)}})
    b = run({0: {"dense": ("7", 1.0), "q": ("5", 0.0)}, 1: {"dense": ("3", 1.0), "q": ("3", 1.0)}})
    m = ruler.merge([a, b])
    assert [sorted(s["answers"]) for s in m["samples"]] == [["dense", "p", "q"]] * 2
    assert m["seconds"] == 4.0
    assert {r["predictor"]: r["score"] for r in m["rows"]} == {"dense": 100.0, "p": 50.0, "q": 50.0}
    with pytest.raises(ValueError, match="differently"):  # dense must decode alike in both runs
        ruler.merge([a, run({0: {"dense": ("8", 0.0)}, 1: {"dense": ("3", 1.0)}})])
    with pytest.raises(ValueError, match="every sample"):
        ruler.merge([a, run({0: {"dense": ("7", 1.0), "q": ("5", 0.0)}})])
    other = run({0: {"dense": ("7", 1.0)}, 1: {"dense": ("3", 1.0)}})
    other["samples"][1]["doc"] = {"outputs": ["9"]}
    with pytest.raises(ValueError, match="not the same sample"):
        ruler.merge([a, other])
    with pytest.raises(ValueError, match="different models"):
        ruler.merge([a, {**b, "model": "n.gguf"}])


def test_unknown_and_online_tasks_are_refused():
    for bad in (["qa_squad"], ["niah_single_9"], []):
        with pytest.raises(ValueError, match="RULER task"):
            ruler.check_tasks(bad)


def test_none_predictor_needs_window_fill(tmp_path):
    p = get_predictor("none:fill=window:4+60", tmp_path / "m.gguf")
    assert isinstance(p, WindowFill) and isinstance(p.inner, NoHeads) and p.name == "none+window:4+60"
    with pytest.raises(ValueError, match="window fill"):
        get_predictor("none", tmp_path / "m.gguf")


@pytest.mark.engine
def test_tokenizer_dir_gives_llama_cpp_token_ids(model_path, engine):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from powerinfer_attn.evaluation.lm_eval_offline import tokenizer_dir

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir(model_path)))
    text = ("The quick brown fox, 12345 and 3.14159; don't I'LL go?\n\n  tabs\t\there   spaces\n"
            "üñíçødé 日本語 VAR QPWKZ = 40213\n") * 20
    assert tok(text).input_ids == engine.tokenize(text, add_bos=False)


@pytest.fixture(scope="module")
def eval_runs(model_path, tmp_path_factory):
    """`eval` on niah_single_2 at 1024 tokens, 2 samples: via the engine (dense, every head, the
    window-only baseline) and via the server (dense, every head), each as the CLI prints it."""
    pytest.importorskip("lm_eval")
    out = {}
    base = [sys.executable, "-m", "powerinfer_attn.cli", "eval", "--tasks", "niah_single_2", "--lengths", "1024",
            "--samples", "2", "-t", "2", "--json", "--model", str(model_path), "--predictor", "all"]
    for via, extra in (("engine", ["--predictor", "none:fill=window:4+60"]), ("server", [])):
        r = subprocess.run(base + ["--via", via] + extra, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        out[via] = json.loads(r.stdout)
    return out


@pytest.mark.engine
def test_eval_engine_scores_every_predictor_and_all_heads_answers_as_dense(eval_runs):
    doc = eval_runs["engine"]
    assert doc["kind"] == "ruler" and len(doc["samples"]) == 2
    rows = {r["predictor"]: r for r in doc["rows"]}
    assert set(rows) == {"dense", "all", "none+window:4+60"}
    for r in rows.values():
        assert r["task"] == "niah_single_2" and r["length"] == 1024 and r["n"] == 2 and 0 <= r["score"] <= 100
    for s in doc["samples"]:
        assert s["doc"]["outputs"] and s["answers"]["dense"]["tokens"] > 0
        # sparse decode with every head is dense decode, token for token
        assert s["answers"]["all"]["text"] == s["answers"]["dense"]["text"]
        assert s["answers"]["all"]["density"] == 1.0
        assert s["answers"]["none+window:4+60"]["density"] == 0.0
        # the score is RULER's string match: the share of expected values in the answer
        for a in s["answers"].values():
            assert a["score"] == sum(o.lower() in a["text"].lower() for o in s["doc"]["outputs"]) / len(s["doc"]["outputs"])
    assert rows["all"]["score"] == rows["dense"]["score"]


@pytest.mark.engine
def test_eval_server_answers_as_the_engine_for_the_same_samples(eval_runs):
    eng, srv = eval_runs["engine"], eval_runs["server"]
    assert srv["via"] == "server" and {r["predictor"] for r in srv["rows"]} == {"dense", "all"}
    # the density the sparse server logged for its requests (every head: 1)
    assert {r["predictor"]: r["density"] for r in srv["rows"]} == {"dense": 1.0, "all": 1.0}
    assert [(s["doc_id"], s["doc"]["outputs"]) for s in srv["samples"]] == \
        [(s["doc_id"], s["doc"]["outputs"]) for s in eng["samples"]]
    for se, ss in zip(eng["samples"], srv["samples"]):
        for p in ("dense", "all"):
            assert ss["answers"][p]["text"].strip() == se["answers"][p]["text"].strip()
    assert {r["predictor"]: r["score"] for r in srv["rows"]} == \
        {r["predictor"]: r["score"] for r in eng["rows"] if r["predictor"] in ("dense", "all")}


@pytest.mark.engine
def test_samples_file_round_trip_and_rescore(model_path, tmp_path, eval_runs):
    """Stage by stage, as on a machine without lm-eval: samples written, answered from the file,
    then scored by rescore to the same table."""
    samples_file, result = tmp_path / "s.json", tmp_path / "r.json"
    common = [sys.executable, "-m", "powerinfer_attn.cli", "eval", "--model", str(model_path), "-t", "2"]
    r = subprocess.run(common + ["--tasks", "niah_single_2", "--lengths", "1024", "--samples", "2",
                                 "--samples-out", str(samples_file)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(common + ["--samples-in", str(samples_file), "--json", "--predictor", "all"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    for a in (s["answers"] for s in doc["samples"]):
        a["dense"]["score"] = a["all"]["score"] = None
    doc["rows"] = []
    result.write_text(json.dumps(doc))
    r = subprocess.run(common + ["--rescore", str(result), "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads(r.stdout)
    want = {(x["predictor"], x["score"]) for x in eval_runs["engine"]["rows"] if x["predictor"] in ("dense", "all")}
    assert {(x["predictor"], x["score"]) for x in again["rows"]} == want
