"""Predictor specs: the command-line names of the predictors and the parser that makes them
(``get_predictor``). Before each sparse decode step, a predictor says which heads of each layer run.

A predictor is anything with ``engine.decode.Predictor``'s protocol: a ``name``, ``bind(engine)``
(called once the engine exists; checks that the predictor fits the model) and ``predict(state)
-> mask`` with ``mask`` ``[n_layer, n_head]`` of 0/1 (1 = head active); ``state`` is an
``engine.decode.StepState``. A predictor that needs to watch the graph has a ``hook`` (an
``engine.decode.TensorHook``) that the engine must be built with.

Built-in, by name (``get_predictor``), with what each costs per decode step:

- ``all``: every head. Nothing. The sparse path's exactness check.
- ``none:fill=window:S+W``: no head, every one windowed (below): the sinks-and-window-only
  baseline (StreamingLLM) that keeps perplexity and loses retrieval. Nothing.
- ``random:K[:SEED]``: K heads per layer drawn at random every step (seeded). A few
  microseconds. The floor any real predictor must beat.
- ``static:K[:FILE]``: the K heads of each layer with the highest mean importance on a
  calibration text (``powerinfer-attn calibrate``, stored as a small JSON file). Nothing.
- ``oracle:P`` / ``oracle-topk:K``: per token, the heads whose importance (norm of the
  contribution through ``wo``) covers fraction P of the layer's total, or the top K,
  measured on a dense step of the same state that is then rolled back. It costs a whole
  dense step plus the graph switch: an upper bound on quality, never a speed mode.
  ``:fill-from=PRED.gguf`` adds the fill that file holds (``fill.py``, mean or linear): skipped
  heads contribute what it predicts, and importance is the deviation from that (named
  ``oracle:P+mean`` or ``oracle:P+linear``).
- ``mask-file:PATH``: masks from a ``.npy`` array ``[steps, n_layer, n_head]``; step i uses
  ``masks[i]``. An array lookup.
- ``trained:PRED.gguf[:RULE=VALUE][:fill=zero]``: the predictor from ``train-predictor``,
  computed inside the decode graph (``in_graph``): one small matrix-vector product and a
  selection per layer, no Python per step. RULE (threshold, topk, mass) overrides the file's
  rule; ``density=D`` keeps the file's rule at the value that gave density D on the held-out
  data (0.30, 0.35, ..., 1.00), and for the threshold rule turns on density control
  (``Engine.set_head_density``): the threshold follows the text so that the mean density stays
  at D, each layer at its held-out share, at any context length (``gain=G`` sets its speed,
  ``gain=0`` keeps the fixed held-out threshold). A file trained with a fill runs with it
  (named ``...+mean`` or ``...+linear``); ``fill=zero`` turns it off. Its ``hook`` reads back the masks the graph chose (``observed``).
  ``calibrate=N`` shifts its per-head biases to each prompt, measured on the prompt's last N
  tokens decoded again densely before the first step (``calibrate.py``; engine paths, not the
  server).
  Without the file (``trained``, ``trained:density=0.7``) it is the one ``prepare`` stored for
  the model (``prepared_predictor_path``).

Any of them may end with ``:fill=window:S+W`` (``WindowFill``): a head the predictor skips still
attends, but over the first S and the last W KV cells only, instead of contributing nothing
(``Engine.set_head_window``; wq and wo then run dense). It replaces a trained file's own fill;
an oracle still ranks heads by their whole contribution.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..engine.decode import Predictor
from ..native.bindings import KV_PAGE, KV_PAGES, KV_SCORE, KV_SCORES
from ..native.model import cache_dir
from .basic import AllHeads, MaskFile, NoHeads, RandomHeads, StaticHeads
from .oracle import Oracle
from .trained import TrainedHeads
from .wrappers import KVBudget, WindowFill


NAMES = ("all", "none:fill=window:S+W", "random:K[:SEED]", "static:K[:FILE]", "oracle:P[:fill-from=PRED.gguf]", "oracle-topk:K[:fill-from=PRED.gguf]",
         "mask-file:PATH", "trained[:PRED.gguf][:RULE=VALUE][:gain=G][:calibrate=N[:calibrate-fill]][:fill=zero]", "any of them + :fill=window:S+W",
         "any of them + :budget=N (cells per KV group)[:budget-page=P][:budget-rerank=R]")

_WINDOW = re.compile(r":fill=window:(\d+)\+(\d+)$")

def with_budget(spec: str, kv_budget: int) -> str:
    """``spec`` with ``:budget=kv_budget`` unless it has a budget of its own or kv_budget is 0."""
    return spec if not kv_budget or ":budget=" in spec else spec + f":budget={kv_budget}"


def add_option(spec: str, option: str) -> str:
    """``spec`` with ``:option`` added, before a window fill, which must stay last."""
    window = _WINDOW.search(spec)
    return spec + f":{option}" if window is None else spec[:window.start()] + f":{option}" + spec[window.start():]


def default_calibration_path(model_path: str | Path) -> Path:
    return cache_dir() / "calibration" / (Path(model_path).name + ".json")


def prepared_predictor_path(model_path: str | Path) -> Path:
    """Where `prepare` stores the model's predictor, and where ``trained`` without a file looks."""
    return cache_dir() / "predictors" / (Path(model_path).stem + ".gguf")


_BUDGET = re.compile(r":budget=([^:]*)")
_BUDGET_SCORE = re.compile(r":budget-score=([^:]*)")
_BUDGET_SPREAD = re.compile(r":budget-spread=([^:]*)")
_BUDGET_PAGE = re.compile(r":budget-page=([^:]*)")
_BUDGET_RERANK = re.compile(r":budget-rerank=([^:]*)")


def get_predictor(spec: str, model_path: str | Path) -> Predictor:
    """A predictor from its command-line name (see the module doc). Call ``bind(engine)`` next."""
    budgets, scores, spreads = _BUDGET.findall(spec), _BUDGET_SCORE.findall(spec), _BUDGET_SPREAD.findall(spec)
    pages, reranks = _BUDGET_PAGE.findall(spec), _BUDGET_RERANK.findall(spec)
    if (scores or spreads or pages or reranks) and not budgets:
        raise ValueError(f"bad predictor {spec!r}: :budget-score=, :budget-spread=, :budget-page= and :budget-rerank= "
                         "go with a :budget=N")
    if budgets:
        if len(budgets) > 1 or not budgets[0].isdigit():
            raise ValueError(f"bad predictor {spec!r}: a token budget is one :budget=N, N a number of cells")
        if len(scores) > 1 or scores and scores[0] not in KV_SCORES:
            raise ValueError(f"bad predictor {spec!r}: :budget-score= is one of {', '.join(KV_SCORES)}")
        try:
            spread = float(spreads[0]) if len(spreads) == 1 else None if spreads else 0.0
        except ValueError:
            spread = None
        if spread is None or not 0.0 <= spread <= 1.0 or (spread and (scores or [KV_SCORE])[0] != "mid"):
            raise ValueError(f"bad predictor {spec!r}: :budget-spread= is one number in [0, 1], with :budget-score=mid")
        if len(pages) > 1 or pages and pages[0] not in [str(p) for p in KV_PAGES]:
            raise ValueError(f"bad predictor {spec!r}: :budget-page= is one of {', '.join(map(str, KV_PAGES))} cells")
        if len(reranks) > 1 or reranks and not (reranks[0].isdigit() and 2 <= int(reranks[0]) <= 16):
            raise ValueError(f"bad predictor {spec!r}: :budget-rerank= is one factor from 2 to 16")
        rest = spec
        for pattern in (_BUDGET, _BUDGET_SCORE, _BUDGET_SPREAD, _BUDGET_PAGE, _BUDGET_RERANK):
            rest = pattern.sub("", rest)
        inner = get_predictor(rest, model_path)
        return KVBudget(inner, int(budgets[0]), page=int(pages[0]) if pages else KV_PAGE,
                        score=scores[0] if scores else KV_SCORE, spread=spread,
                        rerank=int(reranks[0]) if reranks else 0)
    window = _WINDOW.search(spec)
    if window:
        base = spec[:window.start()]
        inner = (NoHeads() if base == "none" else
                 get_predictor(base + (":fill=zero" if base.startswith("trained:") else ""), model_path))
        return WindowFill(inner, int(window.group(1)), int(window.group(2)))
    if ":fill=window" in spec:
        raise ValueError(f"bad predictor {spec!r}: window fill is :fill=window:S+W (two integers), at the end")
    kind, _, arg = spec.partition(":")
    try:
        if kind == "all" and not arg:
            return AllHeads()
        if kind == "none" and not arg:  # with window fill it returned above
            raise ValueError("none keeps no head: it needs window fill, none:fill=window:S+W")
        if kind == "random" and arg:
            k, _, seed = arg.partition(":")
            return RandomHeads(int(k), int(seed) if seed else 0)
        if kind == "static" and arg:
            k, _, path = arg.partition(":")
            return StaticHeads(int(k), path or default_calibration_path(model_path))
        if kind in ("oracle", "oracle-topk") and arg:
            value, _, opt = arg.partition(":")
            fill_from = None
            if opt:
                if opt.startswith("fill="):  # the spelling before fill= meant a fill kind only
                    raise ValueError(f"bad predictor {spec!r}: the oracle's fill file is fill-from=PRED.gguf "
                                     f"(fill= names a fill kind: zero, mean, linear, window)")
                if not opt.startswith("fill-from="):
                    raise ValueError(f"bad predictor {spec!r}: the option is fill-from=PRED.gguf")
                fill_from = opt.removeprefix("fill-from=")
            if kind == "oracle":
                return Oracle(model_path, fraction=float(value), fill_from=fill_from)
            return Oracle(model_path, k=int(value), fill_from=fill_from)
        if kind == "mask-file" and arg:
            return MaskFile(arg)
        if kind == "trained":
            # trained or trained:OPTS...: the predictor `prepare` made for this model
            parts = arg.split(":") if arg else []
            if not parts or "=" in parts[0]:
                found = prepared_predictor_path(model_path)
                if not found.is_file():
                    raise ValueError(f"no prepared predictor for {Path(model_path).name} (looked in {found}): "
                                     "run `powerinfer-attn prepare`, or give trained:PRED.gguf")
                parts = [str(found)] + parts
            path, *opts = parts
            rule = value = fill = gain = calibrate = None
            calibrate_fill = False
            for opt in opts:
                name, eq, val = opt.partition("=")
                if eq and name == "fill" and fill is None:
                    fill = val
                elif eq and name in ("threshold", "topk", "mass", "density") and rule is None:
                    rule, value = name, float(val)
                elif eq and name == "gain" and gain is None:
                    gain = float(val)
                elif eq and name == "calibrate" and calibrate is None:
                    calibrate = int(val)
                elif not eq and name == "calibrate-fill" and not calibrate_fill:
                    calibrate_fill = True
                else:
                    raise ValueError(f"bad predictor {spec!r}: after the file come at most one rule "
                                     f"(threshold=V, topk=K, mass=P or density=D), gain=G, calibrate=N[:calibrate-fill] and fill=FILL")
            return TrainedHeads(path, rule, value, fill, gain, calibrate or 0, calibrate_fill)
    except ValueError as e:
        if "invalid literal" in str(e) or "could not convert" in str(e):
            raise ValueError(f"bad predictor {spec!r}: {e}; choose from: {', '.join(NAMES)}") from e
        raise
    raise ValueError(f"unknown predictor {spec!r}; choose from: {', '.join(NAMES)}")
