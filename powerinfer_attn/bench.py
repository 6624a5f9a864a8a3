"""Decode speed: dense against sparse at fixed head densities, at several context lengths.

For each context length the KV cache is filled once (dense prefill) in two contexts of the
same model: one decodes densely (the stock graph), the other sparsely (one graph for every
density: the mask is an input). Each timed step decodes one token at position ``ctx`` and
is then removed from the cache again, so every step sees the same context. Steps are
interleaved in pairs, dense then sparse at one density, so that drift in the machine's speed
hits both alike. Reported: the median step time of each configuration as tok/s, and as the
ratio the median over pairs of dense step time / sparse step time.

The masks are fixed for the whole run (the same heads every step), so the figures are about
the kernels, not a predictor. ``heads_for_density`` says which heads stay on.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from typing import Callable

import numpy as np

from .engine import Engine


def heads_for_density(density: float, n_layer: int, n_head: int, n_head_kv: int, gqa: bool = False) -> np.ndarray:
    """A fixed mask keeping round(density * n_head) heads per layer.

    Plain: heads are spread evenly over the KV groups (head h belongs to group h // (n_head/n_head_kv)).
    ``gqa``: whole KV groups are kept first, so the K/V of dropped groups are never read.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    k = max(1, int(round(density * n_head)))
    group = n_head // n_head_kv
    if gqa:
        order = list(range(n_head))  # group 0 first, then group 1, ...
    else:
        # round-robin over groups: h = 0, group, 2*group, ..., 1, group+1, ...
        order = [g * group + i for i in range(group) for g in range(n_head_kv)]
    mask = np.zeros((n_layer, n_head), np.int32)
    mask[:, order[:k]] = 1
    return mask


@dataclasses.dataclass
class BenchRow:
    ctx: int
    mode: str            # "dense" or "sparse"
    density: float
    tok_s: float
    step_ms: float
    ratio: float | None  # sparse tok/s / dense tok/s, same context, same run
    flash_attn: bool


def _timed_step(eng: Engine, token: int, ctx: int) -> float:
    t0 = time.perf_counter()
    eng.step(token)
    dt = time.perf_counter() - t0
    eng.rollback(ctx)  # every step decodes at the same position
    return dt


def _fill(eng: Engine, ctx: int, tokens: list[int]) -> None:
    eng.reset()
    eng.prefill(tokens[:ctx])


def _filler_tokens(eng: Engine, n: int) -> list[int]:
    base = eng.tokenize("The quick brown fox jumps over the lazy dog while the river runs to the sea. ", add_bos=False)
    return (base * (n // len(base) + 1))[:n]


def run(model_path, ctxs: list[int], densities: list[float], threads: int, reps: int,
        flash_attn: str = "auto", gqa: bool = False, progress: Callable[[str], None] | None = None) -> dict:
    """Measure; returns a dict ready for JSON (rows plus the set-up)."""
    say = progress or (lambda m: print(m, file=sys.stderr, flush=True))
    rows: list[BenchRow] = []
    choices = {}
    for ctx in ctxs:
        n_ctx = ctx + 16
        fa_options = {"on": [True], "off": [False], "auto": [False, True]}[flash_attn]
        # the dense baseline is the fastest stock configuration: try each flash-attention setting
        best = None
        for fa in fa_options:
            with Engine(model_path, n_ctx=n_ctx, n_threads=threads, flash_attn=fa) as eng:
                toks = _filler_tokens(eng, ctx + 1)
                say(f"ctx {ctx}: filling the cache, flash attention {'on' if fa else 'off'}")
                _fill(eng, ctx, toks)
                _timed_step(eng, toks[ctx], ctx)  # warm-up
                times = [_timed_step(eng, toks[ctx], ctx) for _ in range(max(3, reps // 4))]
            med = statistics.median(times)
            say(f"ctx {ctx}: dense, flash attention {'on' if fa else 'off'}: {1 / med:.1f} tok/s")
            if best is None or med < best[1]:
                best = (fa, med)
        fa = best[0]
        choices[ctx] = fa
        with Engine(model_path, n_ctx=n_ctx, n_threads=threads, flash_attn=fa) as dense, \
                Engine(model_path, n_ctx=n_ctx, n_threads=threads, flash_attn=fa) as sparse:
            toks = _filler_tokens(dense, ctx + 1)
            say(f"ctx {ctx}: filling two caches (dense, sparse), flash attention {'on' if fa else 'off'}")
            _fill(dense, ctx, toks)
            _fill(sparse, ctx, toks)
            sparse.set_sparse(True)
            masks = {d: heads_for_density(d, sparse.n_layer, sparse.n_head, sparse.n_head_kv, gqa) for d in densities}
            # warm-up: build both graphs
            _timed_step(dense, toks[ctx], ctx)
            sparse.set_mask(masks[densities[0]])
            _timed_step(sparse, toks[ctx], ctx)
            times = {"dense": []} | {d: [] for d in densities}
            ratios = {d: [] for d in densities}
            for r in range(reps):
                # each sparse step is paired with a dense step right before it, so that the
                # ratio of the pair is not moved by drift in the machine's speed
                for d in densities:
                    t_dense = _timed_step(dense, toks[ctx], ctx)
                    sparse.set_mask(masks[d])
                    t_sparse = _timed_step(sparse, toks[ctx], ctx)
                    times["dense"].append(t_dense)
                    times[d].append(t_sparse)
                    ratios[d].append(t_dense / t_sparse)
            dense_med = statistics.median(times["dense"])
            rows.append(BenchRow(ctx, "dense", 1.0, 1 / dense_med, dense_med * 1e3, None, fa))
            for d in densities:
                med = statistics.median(times[d])
                ratio = statistics.median(ratios[d])
                rows.append(BenchRow(ctx, "sparse", d, 1 / med, med * 1e3, ratio, fa))
                say(f"ctx {ctx}: sparse density {d:g}: {1 / med:.1f} tok/s ({ratio:.3f}x dense {1 / dense_med:.1f})")
    return {
        "model": str(model_path),
        "threads": threads,
        "reps": reps,
        "gqa_masks": gqa,
        "flash_attn": {str(c): ("on" if v else "off") for c, v in choices.items()},
        "repacked_weights": "default (on); the Q4_1 default model has no repackable weights",
        "rows": [dataclasses.asdict(r) for r in rows],
    }


def format_table(result: dict) -> str:
    lines = ["| ctx | flash attn | dense tok/s | " + " | ".join(
        f"sparse {r['density']:g}" for r in result["rows"] if r["mode"] == "sparse" and r["ctx"] == result["rows"][0]["ctx"]) + " |"]
    lines.append("|" + "---|" * (lines[0].count("|") - 1))
    by_ctx: dict[int, list[dict]] = {}
    for r in result["rows"]:
        by_ctx.setdefault(r["ctx"], []).append(r)
    for ctx, rs in by_ctx.items():
        dense = next(r for r in rs if r["mode"] == "dense")
        cells = [f"{r['tok_s']:.1f} ({r['ratio']:.2f}x)" for r in rs if r["mode"] == "sparse"]
        lines.append(f"| {ctx} | {'on' if dense['flash_attn'] else 'off'} | {dense['tok_s']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
