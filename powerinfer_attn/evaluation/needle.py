"""Retrieval at long context: a five-digit pass key hidden in long text, asked for at the end.

Each trial builds a prompt of exactly ``length`` tokens: an instruction, a haystack with the
key's sentence at a depth spread evenly over the trials (0 = right after the instruction, 1 =
right before the question), and the question. The haystack is the classic repeated filler
(``filler``) or a run of real text from the held-out second half of a text file (``text``).
The prompt less its last token is prefilled once, densely; the dense engine and every
predictor's engine (from a copy of that state) then decode the last prompt token and greedy
answer tokens, the predictors' engines sparsely, so the answer is read through sparse attention
over the whole context. A trial is correct when the first number in the answer is the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from pathlib import Path
from typing import Callable

import numpy as np

from ..engine.decode import Engine, Predictor, open_engine
from ..engine.text import window_starts

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"
HAYSTACKS = ("filler", "text")


@dataclasses.dataclass
class NeedleResult:
    predictor: str       # "dense" for the dense baseline
    haystack: str
    length: int
    trials: int
    correct: int
    density: float       # mean head density over the answer steps (1 for dense)
    answers: list[str]   # the decoded answer of each trial
    keys: list[int]

    @property
    def accuracy(self) -> float:
        return self.correct / self.trials

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"accuracy": self.accuracy}


def answer_key(text: str) -> int | None:
    """The first whole number in ``text``, or None."""
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


def build_prompt(tokenize: Callable[[str], list[int]], length: int, depth: float, key: int,
                 haystack: list[int]) -> list[int]:
    """Exactly ``length`` tokens: instruction, haystack with the key's sentence at ``depth``
    (snapped back to the end of a haystack sentence when one is near), question."""
    head, needle, tail = tokenize(INSTRUCTION), tokenize(NEEDLE.format(key=key)), tokenize(QUESTION)
    n_hay = length - len(head) - len(needle) - len(tail)
    if n_hay < 0:
        raise ValueError(f"length {length} is too short for the prompt's fixed parts ({length - n_hay} tokens)")
    if len(haystack) < n_hay:
        raise ValueError(f"haystack of {len(haystack)} tokens, {n_hay} needed")
    hay = haystack[:n_hay]
    cut = round(depth * n_hay)
    return head + hay[:cut] + needle + hay[cut:] + tail


def _haystacks(eng: Engine, kind: str, n: int, trials: int, text: list[int] | None) -> list[list[int]]:
    """One haystack of ``n`` tokens per trial; ``text``: the text file's tokens (the text haystack)."""
    if kind == "filler":
        base = eng.tokenize(FILLER, add_bos=False)
        hay = (base * (n // len(base) + 1))[:n]
        return [hay] * trials
    # runs of the held-out second half, one per trial, spread over it
    return [text[s:s + n] for s in window_starts(len(text), n, trials)]


def _answer(eng: Engine, first: int, n: int, pred: Predictor | None) -> tuple[str, list[np.ndarray]]:
    """Greedy answer after decoding ``first`` (the prompt's last token), sparse with ``pred``."""
    out, masks = [], []
    tok = first
    eng.set_sparse(pred is not None)
    try:
        for i in range(n):
            logits, mask = eng.decode_step(tok, pred, i)
            if mask is not None:
                masks.append(mask)
            tok = int(np.argmax(logits))
            if eng.is_eog(tok):
                break
            out.append(tok)
    finally:
        eng.set_sparse(False)
    return eng.detokenize(out), masks


def run(model_path: Path, lengths: list[int], trials: int, predictors: list[Predictor],
        haystacks: list[str] = ("filler",), text_file: Path | None = None, answer_tokens: int = 8,
        threads: int | None = None, seed: int = 0, progress: Callable[[int], None] | None = None,
        engine_kw: dict | None = None) -> list[NeedleResult]:
    """Dense and each predictor on the same prompts; one result per (haystack, length, predictor).
    ``engine_kw`` goes to every engine (GPU layers, flash attention, cache types)."""
    kw = engine_kw or {}
    if trials < 1 or not lengths or min(lengths) < 64:
        raise ValueError("needle: at least one trial, and lengths of at least 64 tokens")
    for h in haystacks:
        if h not in HAYSTACKS:
            raise ValueError(f"unknown haystack {h!r}; choose from {', '.join(HAYSTACKS)}")
    if "text" in haystacks and text_file is None:
        raise ValueError("the text haystack needs a text file (--text-file or $POWERINFER_ATTN_TEXT)")
    n_ctx = max(lengths) + answer_tokens + 8
    results = []
    with contextlib.ExitStack() as stack:
        dense = stack.enter_context(Engine(model_path, n_ctx=n_ctx, n_threads=threads, **kw))
        engines = [stack.enter_context(open_engine(model_path, p, n_ctx=n_ctx, n_threads=threads, **kw))
                   for p in predictors]

        def tokenize(s):
            return dense.tokenize(s, add_bos=False)

        # the text file is tokenized once, not once per length
        text_toks = tokenize(text_file.read_text(encoding="utf-8", errors="replace")) if "text" in haystacks else None

        for hay_kind in haystacks:
            for length in lengths:
                rng = np.random.default_rng([seed, length])
                keys = [int(k) for k in rng.integers(10000, 100000, size=trials)]
                hays = _haystacks(dense, hay_kind, length, trials, text_toks)
                per = [dict(answers=[], correct=0, masks=[]) for _ in range(1 + len(predictors))]
                for t in range(trials):
                    depth = t / (trials - 1) if trials > 1 else 0.5
                    prompt = build_prompt(tokenize, length, depth, keys[t], hays[t])
                    dense.reset()
                    dense.prefill(prompt[:-1])
                    state = dense.save_state()
                    for j, (eng, pred) in enumerate([(dense, None)] + list(zip(engines, predictors))):
                        if j > 0:
                            eng.load_state(state)
                        text, masks = _answer(eng, prompt[-1], answer_tokens, pred)
                        per[j]["answers"].append(text)
                        per[j]["correct"] += answer_key(text) == keys[t]
                        per[j]["masks"].extend(masks)
                    if progress:
                        progress(1)
                for j, name in enumerate(["dense"] + [p.name for p in predictors]):
                    m = per[j]["masks"]
                    results.append(NeedleResult(name, hay_kind, length, trials, per[j]["correct"],
                                                float(np.mean(m)) if m else 1.0, per[j]["answers"], keys))
    return results


def format_table(results: list[NeedleResult]) -> str:
    """Markdown: per haystack and length, correct/trials for dense and each predictor."""
    names = list(dict.fromkeys(r.predictor for r in results))
    head = "| haystack | length | " + " | ".join(names) + " |"
    lines = [head, "|" + "---|" * (len(names) + 2)]
    for key in dict.fromkeys((r.haystack, r.length) for r in results):
        cells = []
        for n in names:
            r = next(x for x in results if (x.haystack, x.length) == key and x.predictor == n)
            cells.append(f"{r.correct}/{r.trials}" + ("" if n == "dense" else f" (density {r.density:.2f})"))
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
