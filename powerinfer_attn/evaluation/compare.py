"""Does head pruning keep the model's output? Dense against sparse, two ways.

``compare``: greedy generation from one prompt, dense and sparse, token by token.

``score``: teacher-forced quality on a text. Each window is ``prefix + steps + 1`` tokens: the
prefix is prefilled densely (once, its KV cache then copied to every predictor's engine), then
``steps`` tokens are fed one at a time, once through plain dense decode and once through sparse
decode with the predictor's mask, and each step's logits are scored on the next token.
Several prefix lengths can be scored in one run (a table for each). Reported: perplexity (dense and sparse), KL(dense || sparse) per
token, top-1 agreement with dense, and the mean density per layer.

Windows are spread evenly over the second half of the text's tokens; ``calibrate`` (static
predictor) reads the first half, so a static predictor is never scored on its own
calibration text.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Callable

import numpy as np

from ..engine.decode import Engine, Predictor, open_engine
from ..predictors.importance import HeadContributions
from ..engine.text import log_softmax, text_tokens, window_starts

Progress = Callable[[int], None]


@dataclasses.dataclass
class ScoreResult:
    predictor: str
    windows: int
    prefix: int
    steps: int
    ppl_dense: float
    ppl_sparse: float
    kl_mean: float
    top1_agreement: float
    density: float
    density_per_layer: list[float]
    text: str = "held-out half"
    # the tail of KL(dense || sparse) over the scored tokens, as llama-perplexity's KL statistics
    # report it: a few very wrong tokens show here and hardly in the mean (None: older results)
    kl_median: float | None = None
    kl_p99: float | None = None
    kl_max: float | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def score(model_path: Path, text_file: Path, predictors: list[Predictor], prefix: int | list[int] = 128,
          steps: int = 128, windows: int = 8, threads: int | None = None, dump_logits: Path | None = None,
          progress: Progress | None = None, training: bool = False, engine_kw: dict | None = None) -> list[ScoreResult]:
    """Score each predictor on the same windows against one dense pass, for each prefix length
    (``prefix``: one length or several; one result per predictor and length, in that order).

    Each window's prefix is prefilled once, densely, and its KV cache copied into every
    predictor's engine (``Engine.save_state``/``load_state``): a long prefix costs one prefill,
    not one per predictor. ``dump_logits`` writes the first predictor's sparse logits at the first
    prefix length. The windows lie in the text's second half, which no predictor is trained or
    calibrated on; with ``training`` they are spread over the articles that ``collect`` trains
    on instead (to tune a predictor's settings without looking at the held-out text).
    ``engine_kw`` goes to every engine (flash attention, cache types)."""
    kw = engine_kw or {}
    prefixes = [prefix] if isinstance(prefix, int) else list(prefix)
    if not prefixes or min(prefixes) < 1:
        raise ValueError(f"prefix lengths must be >= 1, got {prefixes}")
    n_ctx = max(prefixes) + steps + 8
    results = []
    with contextlib.ExitStack() as stack:
        dense = stack.enter_context(Engine(model_path, n_ctx=n_ctx, n_threads=threads, **kw))
        sparse_engines = [stack.enter_context(open_engine(model_path, p, n_ctx=n_ctx, n_threads=threads, **kw))
                          for p in predictors]
        toks = text_tokens(dense, text_file, training)
        for k, pre in enumerate(prefixes):
            starts = window_starts(len(toks), pre + steps + 1, windows, whole=training)
            acc = [dict(nll_d=[], nll_s=[], kl=[], agree=[], masks=[]) for _ in predictors]
            dumped = []
            for s0 in starts:
                win = toks[s0:s0 + pre + steps + 1]
                targets = np.array(win[pre + 1:pre + steps + 1])
                idx = np.arange(steps)
                dense.reset()
                dense.prefill(win[:pre])
                state = dense.save_state()
                d_logits = np.array([dense.step(t) for t in win[pre:pre + steps]])
                ld = log_softmax(d_logits)
                if progress:
                    progress(steps)
                for j, (pred, eng) in enumerate(zip(predictors, sparse_engines)):
                    eng.load_state(state)
                    s_logits, masks = _sparse_steps(eng, pred, win[pre:pre + steps])
                    if progress:
                        progress(steps)
                    if j == 0 and k == 0 and dump_logits is not None:
                        dumped.append(s_logits.astype(np.float32))
                    ls = log_softmax(s_logits)
                    a = acc[j]
                    a["nll_d"].append(-ld[idx, targets])
                    a["nll_s"].append(-ls[idx, targets])
                    a["kl"].append((np.exp(ld) * (ld - ls)).sum(axis=1))
                    a["agree"].append(d_logits.argmax(axis=1) == s_logits.argmax(axis=1))
                    a["masks"].extend(masks)
            if k == 0 and dump_logits is not None:
                np.save(dump_logits, dumped[0] if len(dumped) == 1 else np.stack(dumped))
            for pred, a in zip(predictors, acc):
                masks = np.array(a["masks"])
                kl = np.concatenate(a["kl"])
                results.append(ScoreResult(
                    predictor=pred.name, windows=len(starts), prefix=pre, steps=steps,
                    ppl_dense=float(np.exp(np.concatenate(a["nll_d"]).mean())),
                    ppl_sparse=float(np.exp(np.concatenate(a["nll_s"]).mean())),
                    kl_mean=float(kl.mean()),
                    top1_agreement=float(np.concatenate(a["agree"]).mean()),
                    density=float(masks.mean()),
                    density_per_layer=[round(float(x), 4) for x in masks.mean(axis=(0, 2))],
                    text="training articles" if training else "held-out half",
                    kl_median=float(np.median(kl)), kl_p99=float(np.percentile(kl, 99)), kl_max=float(kl.max()),
                ))
    return results


def _sparse_steps(eng: Engine, pred: Predictor, tokens: list[int]):
    """Teacher-forced sparse decode of ``tokens`` from the engine's current state."""
    eng.set_sparse(True)
    logits, masks = [], []
    try:
        for i, t in enumerate(tokens):
            lg, mask = eng.predicted_step(pred, i, t)
            masks.append(mask)
            logits.append(lg)
    finally:
        eng.set_sparse(False)
    return np.array(logits), masks


def format_scores(results: list[ScoreResult]) -> str:
    """Markdown, one table per prefix length (a heading before each when there are several)."""
    prefixes = list(dict.fromkeys(r.prefix for r in results))
    out = []
    for pre in prefixes:
        rs = [r for r in results if r.prefix == pre]
        if len(prefixes) > 1:
            out += [""] if out else []
            out += [f"prefix {pre} ({rs[0].windows} windows x {rs[0].steps} steps):", ""]
        out.append("| predictor | mean density | perplexity dense | perplexity sparse | change | KL(dense\\|\\|sparse) "
                   "| KL median | KL 99% | KL max | top-1 agreement |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in rs:
            tail = " | ".join("-" if v is None else f"{v:.4f}" for v in (r.kl_median, r.kl_p99, r.kl_max))
            out.append(f"| {r.predictor} | {r.density:.3f} | {r.ppl_dense:.3f} | {r.ppl_sparse:.3f} | "
                       f"{100 * (r.ppl_sparse / r.ppl_dense - 1):+.1f}% | {r.kl_mean:.4f} | {tail} | {r.top1_agreement:.3f} |")
    return "\n".join(out)


def oracle_kl_at(oracles: list[ScoreResult], density: float) -> float:
    """The oracle's mean KL at ``density``: between the two oracle runs that bracket it,
    log-linear in density (an oracle's density follows its mass fraction, not a target); else
    the nearest run's."""
    pts = sorted((o.density, o.kl_mean) for o in oracles)
    below = [p for p in pts if p[0] <= density]
    above = [p for p in pts if p[0] >= density]
    if below and above and above[0][0] > below[-1][0] and min(below[-1][1], above[0][1]) > 0:
        (d0, k0), (d1, k1) = below[-1], above[0]
        t = (density - d0) / (d1 - d0)
        return float(np.exp(np.log(k0) + t * (np.log(k1) - np.log(k0))))
    return min(pts, key=lambda p: abs(p[0] - density))[1]


def format_matrix(runs: list[tuple[str, list[ScoreResult]]]) -> str:
    """Several ``score`` runs as one markdown matrix: a row per predictor, a column per text
    (``runs``: (text, that run's results), several runs per text allowed). A cell is the change
    in perplexity, the mean KL, the density and, for a trained predictor, its KL over that of
    the oracle scored in the same run (the same fill) at its density (``oracle_kl_at``)."""
    texts = list(dict.fromkeys(t for t, _ in runs))
    cells: dict[tuple[str, str], str] = {}
    rows: list[str] = []
    for text, results in runs:
        oracles = [r for r in results if r.predictor.startswith("oracle")]
        # an oracle runs with the fill of the run's trained file: say which, so runs do not mix
        files = list(dict.fromkeys(r.predictor.split(":")[1] for r in results if r.predictor.startswith("trained:")))
        for r in results:
            if r.predictor.startswith("oracle") and files:
                r = dataclasses.replace(r, predictor=f"{r.predictor} (fill of {', '.join(files)})")
            rows += [r.predictor] if r.predictor not in rows else []
            cell = f"{100 * (r.ppl_sparse / r.ppl_dense - 1):+.1f}% / {r.kl_mean:.3f} @{r.density:.2f}"
            if r.predictor.startswith("trained") and oracles:
                cell += f" ({r.kl_mean / max(oracle_kl_at(oracles, r.density), 1e-12):.2f}x)"
            cells[(r.predictor, text)] = cell
    out = ["| predictor | " + " | ".join(texts) + " |", "|---|" + "---|" * len(texts)]
    for name in rows:
        out.append(f"| {name} | " + " | ".join(cells.get((name, t), "") for t in texts) + " |")
    return "\n".join(out)


def family(name: str) -> str:
    """The predictor family of a result name, one line of a Pareto plot: ``oracle:0.8+mean`` ->
    ``oracle+mean``; a trained predictor's file stays in it, and a fixed threshold (``gain=0``)
    is a family of its own: ``trained:p.gguf:density=0.6`` -> ``trained:p.gguf``; so is each
    fill, window fill with its sizes (``...+window:4+60``)."""
    base, plus, fill = name.partition("+")
    parts = base.split(":")
    head = parts[0] + (f":{parts[1]}" if parts[0] == "trained" and len(parts) > 1 else "")
    if parts[0] == "trained" and "gain=0" in parts:
        head += ":fixed"
    return head + (f"+{fill}" if plus and (fill in ("mean", "linear") or fill.startswith("window:")) else "")


def plot_pareto(results: list[dict], path) -> None:
    """Density against perplexity change, one line per predictor family (a Pareto chart), one
    panel per prefix length."""
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib: pip install 'powerinfer-attn[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefixes = list(dict.fromkeys(r.get("prefix", 0) for r in results))
    fig, axes = plt.subplots(1, len(prefixes), figsize=(6.4 * len(prefixes), 4.2), squeeze=False)
    for ax, pre in zip(axes[0], prefixes):
        fams: dict[str, list[tuple[float, float]]] = {}
        for r in results:
            if r.get("prefix", 0) == pre:
                fams.setdefault(family(r["predictor"]), []).append(
                    (r["density"], 100 * (r["ppl_sparse"] / r["ppl_dense"] - 1)))
        for fam, pts in fams.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", label=fam)
        ax.set_yscale("symlog", linthresh=10)
        ax.set_xlabel("mean head density")
        ax.set_ylabel("perplexity change vs dense (%)")
        if len(prefixes) > 1:
            ax.set_title(f"after {pre} tokens")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def calibrate(model_path: Path, text_file: Path, out: Path, tokens: int = 8192, batch: int = 512,
              threads: int | None = None, progress: Progress | None = None) -> dict:
    """Mean per-head importance over the first half of a text, for the static predictor."""
    n_layer = n_head = 0
    with Engine(model_path, n_ctx=batch + 8, n_threads=threads, n_batch=batch) as probe:
        toks = text_tokens(probe, text_file)
        n_layer, n_head = probe.n_layer, probe.n_head
    half = toks[:len(toks) // 2][:tokens]
    hook = HeadContributions(model_path, n_layer, n_head, moments=True)
    total = np.zeros((n_layer, n_head), np.float64)
    count = 0
    with Engine(model_path, n_ctx=batch + 8, n_threads=threads, n_batch=batch, tensor_hook=hook) as eng:
        for s0 in range(0, len(half) - 1, batch):
            chunk = half[s0:s0 + batch]
            eng.reset()
            eng.prefill(chunk)
            total += hook.per_token.sum(axis=0)
            count += hook.per_token.shape[0]
            if progress:
                progress(len(chunk))
    result = {
        "model_name": Path(model_path).name,
        "text_file": str(text_file),
        "tokens": count,
        "n_layer": n_layer,
        "n_head": n_head,
        "importance": (total / max(count, 1)).round(6).tolist(),
        # how constant each head's contribution is: a head near 1 could be replaced by its
        # mean instead of zero when it is skipped (mean fill, fill.py)
        "mean_explained": hook.mean_explained().round(4).tolist(),
        "mean_explained_overall": round(hook.mean_explained_overall(), 4),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


@dataclasses.dataclass
class CompareResult:
    predictor: str
    prompt: str
    dense_tokens: list[int]
    sparse_tokens: list[int]
    dense_text: str
    sparse_text: str
    first_divergence: int | None
    agreement: float
    density: float
    dense_tok_s: float
    sparse_tok_s: float

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def compare(model_path: Path, prompt: str, n: int, predictor: Predictor, threads: int | None = None,
            n_ctx: int = 2048, engine_kw: dict | None = None) -> CompareResult:
    """Greedy text dense, then sparse, from one prompt. ``engine_kw`` goes to both engines (GPU
    layers, flash attention, cache types)."""
    kw = engine_kw or {}
    with Engine(model_path, n_ctx=n_ctx, n_threads=threads, **kw) as dense:
        gd = dense.generate(prompt, n, stop_at_eog=False)
    with open_engine(model_path, predictor, n_ctx=n_ctx, n_threads=threads, **kw) as sparse:
        gs = sparse.generate(prompt, n, predictor=predictor, stop_at_eog=False)
        sparse_text = gs.text
        dense_text = sparse.detokenize(gd.tokens)
    first = next((i for i, (a, b) in enumerate(zip(gd.tokens, gs.tokens)) if a != b), None)
    agree = float(np.mean([a == b for a, b in zip(gd.tokens, gs.tokens)])) if gd.tokens else 1.0
    return CompareResult(predictor.name, prompt, gd.tokens, gs.tokens, dense_text, sparse_text, first, agree,
                         float(np.mean(gs.masks)) if gs.masks else 1.0, gd.decode_tok_s, gs.decode_tok_s)
