"""A predictor a user gets in one command: texts of several kinds (``corpus``), their training
articles mixed, ``collect`` over long sequences of the mix, ``train``, the retrieval heads pinned
(``retrieval``), stored in the model cache under the model's name (``predictors.
prepared_predictor_path``), where ``--predictor trained`` without a file finds it.

The kinds are code (standard-library source), docs (the interpreter's reference topics) and
chat (conversations the model writes itself), plus WikiText when a file of it is given; Paul
Graham's essays stay out (RULER's haystack). Every step keeps its output in a work directory
beside the cache and is skipped when that output exists, so a stopped run goes on where it
stopped (``collect`` resumes inside its run too).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from . import corpus
from .collect import collect
from ..native.model import cache_dir
from ..predictors.specs import prepared_predictor_path
from .retrieval import measure, pin
from .train import train

Say = Callable[[str], None]


def work_dir(model_path: Path) -> Path:
    return cache_dir() / "prepare" / Path(model_path).stem


RETRIEVAL_DISTANCES = (2048, 6144)


def _distances(seq_len: int) -> list[int]:
    return list(RETRIEVAL_DISTANCES) if seq_len >= 8192 else [seq_len // 4, seq_len // 2]


def step_totals(n_layer: int, conversations: int = 60, tokens: int = 32768, seq_len: int = 8192,
                sensitivity: bool = True) -> dict[str, int]:
    """How many units each step of ``prepare`` counts, for progress bars."""
    from .collect import SENSITIVITY_STEPS, fill_tokens

    return {"chat": conversations,
            "collect": tokens + fill_tokens(tokens, seq_len) + (SENSITIVITY_STEPS * n_layer if sensitivity else 0),
            "retrieval": 2 * len(_distances(seq_len))}


def prepare(model_path: Path, wiki: Path | None = None, out: Path | None = None, conversations: int = 60,
            tokens: int = 32768, seq_len: int = 8192, density: float = 0.7, pin_heads: int = 6,
            sensitivity: bool = True, threads: int | None = None, chat_tokens: int = 320, say: Say | None = None,
            progress: Callable[[str, int], None] | None = None) -> dict:
    """Make (or finish making) the model's predictor; returns what was made.

    ``progress(step, n)``: ``n`` more units of ``step`` done (``step_totals`` gives each step's
    total: conversations, tokens, copy runs)."""
    say = say or (lambda m: None)
    model_path = Path(model_path)
    work = work_dir(model_path)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(out) if out else prepared_predictor_path(model_path)
    if pin_heads < 0 or conversations < 1:
        raise ValueError("pin_heads >= 0 and conversations >= 1")

    def tick(step):
        return (lambda n: progress(step, n)) if progress else None

    texts = {}
    kinds = ["code", "docs", "chat"] + (["wiki"] if wiki else [])
    for kind in kinds:
        f = work / f"{kind}.txt"
        if not f.is_file():
            say(f"text: {kind}")
            text, names = corpus.kind_text(kind, model_path, wiki=wiki,
                                           **({"n": conversations, "threads": threads, "progress": tick("chat"),
                                               "max_tokens": chat_tokens}
                                              if kind == "chat" else {}))
            corpus.write(f, text, names, kind)
        texts[kind] = f.read_text(encoding="utf-8")
    mixed, taken = corpus.mix(texts)
    mix_file = work / "mix.txt"
    if not mix_file.is_file() or mix_file.read_text(encoding="utf-8") != mixed:
        corpus.write(mix_file, mixed, [], "mix", {"kinds": taken})
    say("mixed: " + ", ".join(f"{k} {v} characters" for k, v in taken.items()))

    data = work / "data"
    pred = work / "pred.gguf"
    if not (data / "meta.json").is_file():
        resume = (data / "plan.json").is_file() and (data / "fill.npz").is_file()
        say(f"collect: {tokens} tokens in sequences of {seq_len}" + (" (resuming)" if resume else ""))
        try:
            collect(model_path, mix_file, data, tokens, threads=threads, sensitivity=sensitivity,
                    progress=tick("collect"), seq_len=seq_len, resume=resume)
        except ValueError as e:
            if not resume or "cannot resume" not in str(e):
                raise
            collect(model_path, mix_file, data, tokens, threads=threads, sensitivity=sensitivity,
                    progress=tick("collect"), seq_len=seq_len)
    if not pred.is_file():
        say("train")
        train(data, pred, density=density)
    out.parent.mkdir(parents=True, exist_ok=True)
    pinned: list = []
    if pin_heads:
        say(f"retrieval heads: pin the top {pin_heads}")
        res = measure(model_path, _distances(seq_len), threads=threads, progress=tick("retrieval"))
        pinned = pin(pred, out, res.top(pin_heads))
    else:
        out.write_bytes(pred.read_bytes())
    summary = {"model": model_path.name, "predictor": str(out), "texts": taken, "pinned": pinned,
               "tokens": tokens, "seq_len": seq_len, "density": density}
    (work / "prepared.json").write_text(json.dumps(summary, indent=1))
    return summary


__all__ = ["prepare", "step_totals", "work_dir"]
