"""Text shared by training and scoring: WikiText articles, the train/held-out split, windows.

A text file is split into articles: WikiText's top-level `` = Title = `` headings, or the
``# ---- NAME`` lines that start each module of ``stdlib_text`` and each article of ``corpus`` (so code is split by
module). ``collect`` trains on the
whole articles that end in its first ``TRAIN_FRACTION``; ``score`` reads windows from the second
half of its tokens (``window_starts``), so no predictor is scored on what it was trained on.
"""

from __future__ import annotations

import os
import re
import sysconfig
from pathlib import Path

import numpy as np

TEXT_ENV = "POWERINFER_ATTN_TEXT"
TRAIN_FRACTION = 0.45

_HEADING = re.compile(r"^ = [^=].* = $|^# ---- \S+$")

# A text of another kind than WikiText, present on every machine: these modules of the running
# interpreter's standard library (Python source), in this order.
STDLIB_MODULES = ("argparse", "ast", "calendar", "configparser", "csv", "dataclasses", "difflib", "enum",
                  "fractions", "functools", "gettext", "heapq", "inspect", "ipaddress", "pathlib", "pickle",
                  "pprint", "random", "shutil", "statistics", "string", "subprocess", "tarfile", "textwrap",
                  "threading", "tokenize", "typing", "uuid", "zipfile")


def is_heading(line: str) -> bool:
    """Does ``line`` (without its newline) start an article: a WikiText top-level heading or ``# ---- NAME``?"""
    return _HEADING.match(line) is not None


def split_articles(text: str) -> list[tuple[int, int, str]]:
    """``(start, end, title)`` character spans of the articles (WikiText) or modules (``stdlib_text``) in ``text``."""
    starts: list[tuple[int, str]] = []
    pos = 0
    for line in text.splitlines(keepends=True):
        if is_heading(line.rstrip("\n")):
            starts.append((pos, line.strip(" =\n").removeprefix("# ---- ")))
        pos += len(line)
    if not starts:
        return [(0, len(text), "")]
    spans = []
    for i, (s, title) in enumerate(starts):
        e = starts[i + 1][0] if i + 1 < len(starts) else len(text)
        spans.append((s, e, title))
    return spans


def training_articles(text: str, fraction: float = TRAIN_FRACTION) -> list[tuple[int, int, str]]:
    """The whole articles that end in the first ``fraction`` of the text."""
    return [a for a in split_articles(text) if a[1] <= fraction * len(text)]


def require_training_articles(text: str, source: Path) -> list[tuple[int, int, str]]:
    """``training_articles``, or a ValueError naming ``source`` when there are none."""
    arts = training_articles(text)
    if not arts:
        raise ValueError(f"{source}: no whole article ends in its first {TRAIN_FRACTION:.0%}")
    return arts


def resolve_text_file(path: str | os.PathLike | None) -> Path:
    p = path or os.environ.get(TEXT_ENV)
    if not p:
        raise ValueError(f"no text file: pass --text-file or set {TEXT_ENV} "
                         f"(e.g. the WikiText-2 test split, wiki.test.raw)")
    p = Path(p)
    if not p.is_file():
        raise FileNotFoundError(f"text file not found: {p}")
    return p


def text_tokens(eng, path: Path, training: bool = False) -> list[int]:
    """The tokens of ``path`` (``eng.tokenize``, no BOS, control tokens parsed), or with ``training`` of the training articles only."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if training:
        text = text[:require_training_articles(text, path)[-1][1]]
    # control tokens as tokens: a chat written by `corpus` holds its template's markers (WikiText and
    # code tokenize the same either way)
    return eng.tokenize(text, add_bos=False, special=True)


def window_starts(n_tokens: int, length: int, windows: int, first_half: bool = False,
                  whole: bool = False) -> list[int]:
    """``windows`` start offsets of windows of ``length`` tokens, evenly spaced over one half
    (the second unless ``first_half``), or over all of it with ``whole``."""
    lo, hi = (0, n_tokens) if whole else (0, n_tokens // 2) if first_half else (n_tokens // 2, n_tokens)
    span = hi - lo - length
    if span < 0 or windows < 1:
        raise ValueError(f"text too short: {hi - lo} tokens in that part, windows need {length}")
    if windows == 1:
        return [lo]
    return [lo + round(i * span / (windows - 1)) for i in range(windows)]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def stdlib_text(modules: tuple[str, ...] = STDLIB_MODULES) -> tuple[str, list[str]]:
    """The source of ``modules`` of this interpreter's standard library, one after another, and
    the modules found (a module that is a package or absent in this version is left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, found = [], []
    for m in modules:
        f = root / (m.replace(".", "/") + ".py")
        if f.is_file():
            parts.append(f"# ---- {m}.py\n" + f.read_text(encoding="utf-8", errors="replace"))
            found.append(m)
    if not found:
        raise ValueError(f"none of the modules {', '.join(modules)} is a file under {root}")
    return "".join(parts), found
