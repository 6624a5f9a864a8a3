"""RULER, the long-context suite of EleutherAI's lm-evaluation-harness, for dense and sparse
decode: lm-eval's own task objects make the samples (prompts sized with the model's tokens) and
score the answers; what generates the answers is ours.

Three stages, each usable alone (so generation can run on another machine that lacks lm-eval):

1. ``build_samples``: lm-eval builds the tasks offline (``lm_eval_offline``), seeded, and each
   request's context, stop strings and token limit are taken as lm-eval would send them, with
   the document it is scored against.
2. ``generate_engine`` (``--via engine``): each sample's prompt is prefilled once, densely, as a
   server does with a prompt; the first answer token comes from that prefill, and every later
   one from a decode step: dense, then each predictor's engine from a copy of that state
   (``Engine.save_state``), so a sample's prefill is paid once for every predictor.
   ``generate_server`` (``--via server``): ``powerinfer-attn serve`` per predictor and
   lm-eval's ``local-completions`` client sending it the same task objects' requests (the
   peer's client end to end); decoding greedy, as the engine's.
3. ``rescore``: each answer through the task's ``process_results`` (RULER's string match: the
   share of expected strings found in the answer), means per task, length and predictor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import json
import random
import re
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

# RULER's subtasks that build their data offline (the two QA ones download theirs)
OFFLINE_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
                 "niah_multikey_3", "niah_multivalue", "niah_multiquery", "ruler_vt", "ruler_cwe", "ruler_fwe")
SAMPLES_PER_LENGTH = 500  # RULER makes this many per length, whatever --limit says
LM_EVAL_PIN = "lm-eval[api,ruler]==0.4.13"


@dataclasses.dataclass
class Sample:
    task: str
    length: int           # RULER's target length (max_seq_length), in the model's tokens
    doc_id: int           # index in the task's test split (lengths follow each other)
    context: str          # the prompt, as lm-eval sends it
    until: list[str]      # stop strings
    max_gen_toks: int
    doc: dict             # what process_results reads
    scorer: str           # "module:function" of the task's process_results

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Answer:
    text: str
    tokens: int
    density: float | None  # mean head density over its sparse steps (1 for dense; None: not known)


@dataclasses.dataclass
class Row:
    model: str
    predictor: str
    task: str
    length: int
    n: int
    score: float          # mean over the samples, 0-100 as RULER reports it
    density: float | None  # None through the server (its log has it)
    via: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _need_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"RULER needs lm-evaluation-harness: pip install '{LM_EVAL_PIN}' "
                           f"(or this package's [eval] extra)") from e


def check_tasks(tasks: Sequence[str]) -> None:
    bad = [t for t in tasks if t not in OFFLINE_TASKS]
    if bad or not tasks:
        raise ValueError(f"unknown or online-only RULER task(s) {', '.join(bad) or '(none given)'}; "
                         f"choose from {', '.join(OFFLINE_TASKS)}")


def load_tasks(model_path: Path, tasks: Sequence[str], lengths: Sequence[int], seed: int = 0) -> dict:
    """lm-eval's task objects, their data made offline with this model's tokenizer; ``seed``
    fixes the samples (variable tracking and word extraction draw from unseeded generators)."""
    from . import lm_eval_offline

    check_tasks(tasks)
    if not lengths or min(lengths) < 512:
        raise ValueError("RULER lengths of at least 512 tokens")
    _need_lm_eval()
    tok = str(lm_eval_offline.tokenizer_dir(model_path))
    with lm_eval_offline.offline(), contextlib.redirect_stdout(sys.stderr):
        from lm_eval.tasks import TaskManager

        random.seed(seed)
        np.random.seed(seed)
        tm = TaskManager(metadata={"max_seq_lengths": [int(x) for x in lengths], "tokenizer": tok})
        loaded = tm.load(list(tasks))
        found = loaded.get("tasks", loaded)
        return {name: found[name] for name in tasks}


def build_samples(task_objs: dict, lengths: Sequence[int], n: int) -> list[Sample]:
    """The first ``n`` samples of each length of each task, as lm-eval's requests."""
    if n < 1 or n > SAMPLES_PER_LENGTH:
        raise ValueError(f"samples per length: 1 to {SAMPLES_PER_LENGTH}")
    out = []
    for name, task in task_objs.items():
        docs = task.eval_docs
        by_len: dict[int, list[int]] = {}
        for i in range(len(docs)):
            by_len.setdefault(int(docs[i]["max_length"]), []).append(i)
        ids = []
        for length in lengths:
            if len(by_len.get(length, [])) < n:
                raise ValueError(f"{name}: {len(by_len.get(length, []))} samples of length {length}, {n} asked for")
            ids += by_len[length][:n]
        task.build_all_requests(limit=None, samples=ids, rank=0, world_size=1)
        fn = task.config.process_results
        scorer = f"{fn.__module__}:{fn.__name__}"
        for inst in sorted(task.instances, key=lambda x: x.doc_id):
            context, gen = inst.args
            doc = {k: v for k, v in inst.doc.items() if k != "input"}  # the context holds it
            out.append(Sample(name, int(doc["max_length"]), int(inst.doc_id), context, list(gen.get("until") or []),
                              int(gen.get("max_gen_toks", 256)), doc, scorer))
    return out


def sample_from_json(d: dict) -> Sample:
    return Sample(**d)


# --- stage 2: answers ---------------------------------------------------


def _decode(eng, first: int, sample: Sample, pred) -> Answer:
    """Greedy answer: ``first`` from the prefill, then decode steps (sparse with ``pred``) until
    an end-of-generation token, a stop string or the token limit, as llama-cpp-python's
    ``create_completion`` stops."""
    out, masks, text = [], [], ""
    tok = first
    if pred is not None:
        pred.restart(eng)  # density control starts anew for each sample, as the server does per request
    eng.set_sparse(pred is not None)
    try:
        for i in range(sample.max_gen_toks):
            if eng.is_eog(tok):
                break
            out.append(tok)
            text = eng.detokenize(out)
            cut = min((text.find(s) for s in sample.until if s and s in text), default=-1)
            if cut >= 0:
                text = text[:cut]
                break
            if len(out) == sample.max_gen_toks:
                break
            logits, mask = eng.decode_step(tok, pred, i)
            if mask is not None:
                masks.append(mask)
            tok = int(np.argmax(logits))
    finally:
        eng.set_sparse(False)
    return Answer(text, len(out), float(np.mean(masks)) if masks else 1.0)


def _prompt_tokens(model_path: Path, samples: Sequence[Sample]) -> tuple[list[list[int]], int]:
    """Each sample's prompt in llama.cpp's tokens (with BOS where the model adds one, as a server
    does), and the context size that holds the longest prompt and its answer."""
    from ..engine.decode import Engine

    with Engine(model_path, n_ctx=8) as eng:
        toks = [eng.tokenize(s.context) for s in samples]
    return toks, max(len(t) + s.max_gen_toks for t, s in zip(toks, samples)) + 8


def generate_engine(model_path: Path, samples: Sequence[Sample], predictors: Sequence, threads: int | None = None,
                    n_gpu_layers: int = 0, flash_attn: bool = False,
                    progress: Callable[[int], None] | None = None,
                    cache_types: tuple[str, str] = ("f16", "f16")) -> dict[str, list[Answer]]:
    """Answers of dense decode ("dense") and of each predictor, sample by sample."""
    from ..engine.decode import Engine, as_predictor, open_engine

    if not samples:
        raise ValueError("no samples")
    predictors = [as_predictor(p) for p in predictors]
    kw = dict(n_threads=threads, n_gpu_layers=n_gpu_layers, flash_attn=flash_attn, cache_type_k=cache_types[0],
              cache_type_v=cache_types[1])
    answers: dict[str, list[Answer]] = {"dense": []} | {p.name: [] for p in predictors}
    if len(answers) != 1 + len(predictors):
        raise ValueError("two predictors of the same name")
    toks, n_ctx = _prompt_tokens(model_path, samples)
    with contextlib.ExitStack() as stack:
        dense = stack.enter_context(Engine(model_path, n_ctx=n_ctx, **kw))
        engines = [stack.enter_context(open_engine(model_path, p, n_ctx=n_ctx, **kw)) for p in predictors]
        for s, t in zip(samples, toks):
            dense.reset()
            first = int(np.argmax(dense.prefill(t)))
            state = dense.save_state() if predictors else None
            answers["dense"].append(_decode(dense, first, s, None))
            for eng, p in zip(engines, predictors):
                eng.load_state(state)
                answers[p.name].append(_decode(eng, first, s, p))
            if progress:
                progress(1)
    return answers


def generate_server(model_path: Path, task_objs: dict, samples: Sequence[Sample], predictor: str | None,
                    threads: int | None = None, log: Callable[[str], None] | None = None) -> list[Answer]:
    """Answers through ``powerinfer-attn serve`` (``predictor`` None: dense) and lm-eval's
    ``local-completions`` client, for the samples' own task objects and documents."""
    from . import lm_eval_offline
    from ..serving.serve import ServerProcess

    _need_lm_eval()
    n_ctx = _prompt_tokens(model_path, samples)[1]
    tok = str(lm_eval_offline.tokenizer_dir(model_path))
    ids: dict[str, list[int]] = {}
    for s in samples:
        ids.setdefault(s.task, []).append(s.doc_id)
    args = ("--predictor", predictor) if predictor else ()
    with ServerProcess(model_path, *args, n_ctx=n_ctx, threads=threads) as srv, lm_eval_offline.offline(), \
            contextlib.redirect_stdout(sys.stderr):
        import lm_eval

        res = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"model": Path(model_path).name, "base_url": f"{srv.url}/v1/completions",
                        "tokenizer": tok, "tokenizer_backend": "huggingface", "tokenized_requests": False,
                        "num_concurrent": 1, "max_retries": 1, "timeout": 3600},
            tasks=[task_objs[t] for t in ids], samples=ids, log_samples=True,
            # greedy as the engine decodes: llama-cpp-python's server applies a 1.1 repeat
            # penalty unless the request says otherwise
            gen_kwargs={"repeat_penalty": 1.0},
            bootstrap_iters=0, verbosity="WARNING")
        logged = srv.stop()
    requests = [line for line in logged.splitlines() if line.startswith("request:")]
    if log:
        for line in requests:
            log(line)
    # the server logs each request's head density; lm-eval sends the requests in its own order,
    # so each answer gets the mean over the requests
    dens = [float(m.group(1)) for m in (re.search(r"head density ([0-9.]+)", x) for x in requests) if m]
    density = 1.0 if predictor is None else float(np.mean(dens)) if dens else None
    texts = {(t, int(x["doc_id"])): x["filtered_resps"][0] if isinstance(x["filtered_resps"][0], str)
             else x["filtered_resps"][0][0] for t in ids for x in res["samples"][t]}
    return [Answer(texts[(s.task, s.doc_id)], -1, density) for s in samples]


# --- stage 3: scores ----------------------------------------------------


def _scorer(name: str):
    module, _, fn = name.partition(":")
    return getattr(importlib.import_module(module), fn)


def can_score() -> bool:
    try:
        import lm_eval.tasks.ruler.common_utils  # noqa: F401  (imports transformers)
    except ImportError:
        return False
    return True


def sample_score(scorer: str, doc: dict, length: int, text: str) -> float:
    """The task's own score of one answer, 0-1."""
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = _scorer(scorer)(doc, [text])
    return float(metrics[str(length)])


def _rows(doc: dict) -> list[dict]:
    """Means per predictor, task and length of the per-sample scores in ``doc``."""
    groups: dict[tuple[str, str, int], list[dict]] = {}
    for s in doc["samples"]:
        for name, a in s["answers"].items():
            groups.setdefault((name, s["task"], s["length"]), []).append(a)
    rows = []
    for (name, task, length), ans in groups.items():
        dens = [a["density"] for a in ans if a["density"] is not None]
        rows.append(Row(doc["model"], name, task, length, len(ans), 100 * float(np.mean([a["score"] for a in ans])),
                        float(np.mean(dens)) if dens else None, doc["via"]).to_json())
    return rows


def rescore(doc: dict) -> dict:
    """``doc`` (an ``eval --json`` result) with every answer scored by its task's scorer and the
    table rows made anew."""
    if doc.get("kind") != "ruler":
        raise ValueError("not a RULER result (eval --json)")
    _need_lm_eval()
    for s in doc["samples"]:
        for a in s["answers"].values():
            a["score"] = sample_score(s["scorer"], s["doc"], s["length"], a["text"])
    doc["rows"] = _rows(doc)
    return doc


def merge(docs: Sequence[dict]) -> dict:
    """One result from several ``eval --json`` results over the same model: the samples of all
    (in the order first seen), each with the answers of every result that has it. Two results
    answering one sample under one predictor name must agree (dense is in each: a check that
    the runs decoded alike)."""
    if not docs:
        raise ValueError("nothing to merge")
    for d in docs:
        if d.get("kind") != "ruler":
            raise ValueError("not a RULER result (eval --json)")
    models = {d["model"] for d in docs}
    if len(models) != 1:
        raise ValueError(f"results of different models: {', '.join(sorted(models))}")
    out = {k: v for k, v in docs[0].items() if k not in ("samples", "rows")}
    out["seconds"] = round(sum(d.get("seconds", 0) for d in docs), 1)
    by_key: dict[tuple, dict] = {}
    for d in docs:
        for s in d["samples"]:
            key = (s["task"], s["length"], s["doc_id"])
            have = by_key.setdefault(key, {**s, "answers": {}})
            if have["doc"] != s["doc"]:
                raise ValueError(f"{key} is not the same sample in two results (RULER's samples depend on the seed "
                                 "and on every length built with it)")
            for name, a in s["answers"].items():
                old = have["answers"].get(name)
                if old is not None and old["text"] != a["text"]:
                    raise ValueError(f"{name} answers {key} differently in two results")
                have["answers"][name] = a
    names = {n for s in by_key.values() for n in s["answers"]}
    partial = sorted(n for n in names if any(n not in s["answers"] for s in by_key.values()))
    if partial:
        raise ValueError(f"{', '.join(partial)}: not answered for every sample")
    out["samples"] = list(by_key.values())
    out["rows"] = _rows(out) if all(a["score"] is not None for s in out["samples"] for a in s["answers"].values()) else []
    return out


def result_json(model_path: Path, samples: Sequence[Sample], answers: dict[str, list[Answer]], via: str,
                seed: int, seconds: float) -> dict:
    """The result ``eval --json`` prints: per sample what scores it and every answer, and the
    rows of the table (empty where lm-eval is not installed: ``rescore`` then fills them)."""
    for name, ans in answers.items():
        if len(ans) != len(samples):
            raise ValueError(f"{name}: {len(ans)} answers for {len(samples)} samples")
    doc = {"kind": "ruler", "model": Path(model_path).name, "via": via, "seed": seed, "seconds": round(seconds, 1),
           "samples": [{"task": s.task, "length": s.length, "doc_id": s.doc_id, "scorer": s.scorer,
                        "doc": {k: v for k, v in s.doc.items() if k != "input"},
                        "answers": {k: {"text": v[i].text, "tokens": v[i].tokens, "density": v[i].density,
                                        "score": None} for k, v in answers.items()}}
                       for i, s in enumerate(samples)],
           "rows": []}
    return rescore(doc) if can_score() else doc


def run_engine(model_path: Path, samples: Sequence[Sample], predictors: Sequence, seed: int = 0,
               threads: int | None = None, n_gpu_layers: int = 0, flash_attn: bool = False,
               progress: Callable[[int], None] | None = None, cache_types: tuple[str, str] = ("f16", "f16")) -> dict:
    t0 = time.time()
    answers = generate_engine(model_path, samples, predictors, threads, n_gpu_layers, flash_attn, progress, cache_types)
    doc = result_json(model_path, samples, answers, "engine", seed, time.time() - t0)
    return doc | {"n_gpu_layers": n_gpu_layers, "flash_attn": flash_attn, "cache_types": list(cache_types)}


def run_server(model_path: Path, task_objs: dict, samples: Sequence[Sample], predictors: Sequence[str],
               seed: int = 0, threads: int | None = None, progress: Callable[[int], None] | None = None,
               log: Callable[[str], None] | None = None) -> dict:
    t0 = time.time()
    answers = {}
    from ..predictors.specs import get_predictor

    for spec in [None] + list(predictors):
        name = "dense" if spec is None else get_predictor(spec, model_path).name
        answers[name] = generate_server(model_path, task_objs, samples, spec, threads, log)
        if progress:
            progress(len(samples))
    return result_json(model_path, samples, answers, "server", seed, time.time() - t0)


def run(model_path: Path, tasks: Sequence[str], lengths: Sequence[int], n: int, predictors: Sequence,
        via: str = "engine", threads: int | None = None, n_gpu_layers: int = 0, seed: int = 0,
        progress: Callable[[int], None] | None = None, log: Callable[[str], None] | None = None) -> dict:
    """The three stages from Python: ``predictors`` are Predictor objects (engine) or their
    names (server)."""
    task_objs = load_tasks(model_path, tasks, lengths, seed)
    samples = build_samples(task_objs, lengths, n)
    if via == "engine":
        return run_engine(model_path, samples, predictors, seed, threads, n_gpu_layers, progress=progress)
    if via == "server":
        return run_server(model_path, task_objs, samples, predictors, seed, threads, progress, log)
    raise ValueError(f"via engine or server, not {via!r}")


def write_samples(path: Path, samples: Sequence[Sample], model_path: Path, seed: int) -> None:
    path.write_text(json.dumps({"kind": "ruler-samples", "model": Path(model_path).name, "seed": seed,
                                "samples": [s.to_json() for s in samples]}))


def read_samples(path: Path) -> list[Sample]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("kind") != "ruler-samples":
        raise ValueError(f"{path}: not a RULER samples file (eval --samples-out)")
    return [Sample(**d) for d in data["samples"]]


def format_result(doc: dict) -> str:
    """What ``eval`` and ``show`` print: a line naming the model and the path, then the table."""
    head = f"{doc['model']}: RULER via {doc['via']}; cells: score (difference from dense)"
    return head + "\n" + (format_table(doc) if doc["rows"] else "(not scored: run `eval --rescore` with lm-eval)")


def format_table(doc: dict) -> str:
    """Markdown: a row per task and length, a column per predictor (score, and the difference
    from dense), then the mean over tasks per length."""
    rows = doc["rows"]
    names = list(dict.fromkeys(r["predictor"] for r in rows))
    keys = list(dict.fromkeys((r["task"], r["length"]) for r in rows))
    get = {(r["task"], r["length"], r["predictor"]): r for r in rows}

    def cell(v, d, name):
        return f"{v:.1f}" if name == "dense" or d is None else f"{v:.1f} ({v - d:+.1f})"

    lines = ["| task | length | n | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 3)]
    for task, length in keys:
        dense = get.get((task, length, "dense"))
        cells = [cell(get[(task, length, p)]["score"], dense and dense["score"], p) for p in names]
        lines.append(f"| {task} | {length} | {get[(task, length, names[0])]['n']} | " + " | ".join(cells) + " |")
    for length in dict.fromkeys(k[1] for k in keys):
        means = {p: float(np.mean([get[(t, length, p)]["score"] for t, L in keys if L == length])) for p in names}
        d = means.get("dense")
        lines.append(f"| **mean** | {length} | | " + " | ".join(cell(means[p], d, p) for p in names) + " |")
    dens = {p: [r["density"] for r in rows if r["predictor"] == p and r["density"] is not None] for p in names}
    lines.append("| head density | | | " + " | ".join(f"{np.mean(dens[p]):.3f}" if dens[p] else "-" for p in names) + " |")
    return "\n".join(lines)
