"""Train a per-layer linear head predictor from ``collect``'s data and write it as a GGUF sidecar.

Per layer ``il``, logits = ``W x + b`` with ``x`` the layer's attn_norm output (what the
in-graph predictor reads), fitted by ridge regression in numpy. Targets, by selection rule:

- ``threshold`` (default) and ``topk``, with ``label``:
  ``level`` (default): ``log(importance)`` less the layer's mean ``log(total importance)``
  over the data; one threshold then keeps more heads at the tokens where the heads deviate
  more from their fill than usual in that layer, and fewer where the fill stands in well.
  ``share``: ``log(importance / the layer's total importance)``; one threshold then
  keeps a per-token number of heads per layer, on the same scale in every layer.
  ``residual``: ``log(importance / residual norm)``, how much a head's contribution would move
  the residual stream it is added to; one threshold then also sets a budget per layer. It
  scored worse on WikiText-2 (README): the residual norm is dominated by a few very large
  dimensions in the later layers, which makes their heads look unimportant.
- ``mass``: each head's share of the layer's total importance, selected by the mass rule.

With ``fill`` ``mean`` or ``linear`` (``predictors/fill.py``; linear is the default when the data has it)
a skipped head contributes what that fill puts in its place instead of nothing
(``Engine.set_head_fill``), so the importance the targets are made of is each contribution's
deviation from it, and the file carries the fill.

The data's chunks are split in order (they follow the articles): the last ``holdout`` of them
are never fitted, and choose the ridge strength per layer and the threshold that gives
``density`` on average.

The file's layout is in ``predictor_file.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from ..native.bindings import FILLS
from .collect import has_fill, load_layer
from ..predictors.fill import HeadFill
from ..predictors.importance import mass_mask, topk_mask
from ..predictors.predictor_file import write_predictor

RULES = ("threshold", "topk", "mass")
LABELS = ("residual", "share", "level")
LAMBDAS = (0.1, 1.0, 10.0, 100.0)
DENSITY_GRID = tuple(round(0.3 + 0.05 * i, 2) for i in range(15))  # 0.30 .. 1.00
_EPS = 1e-6


def targets(rule: str, importance: np.ndarray, resid: np.ndarray, label: str = "residual") -> np.ndarray:
    share = importance / np.maximum(importance.sum(axis=1, keepdims=True), _EPS)
    if rule == "mass":
        return share
    if label == "share":
        return np.log(share + _EPS)
    if label == "residual":
        return np.log(importance / np.maximum(resid[:, None], _EPS) + _EPS)
    if label == "level":
        total = np.log(np.maximum(importance.sum(axis=1), _EPS))
        return np.log(importance + _EPS) - total.mean()
    raise ValueError(f"unknown label {label!r}; choose from {', '.join(LABELS)}")


def ridge(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """``(W [n_out, n_in], b [n_out])`` minimising ``|x W^T + b - y|^2 + lam |W|^2`` (b not penalised)."""
    mx, my = x.mean(axis=0), y.mean(axis=0)
    xc = (x - mx).astype(np.float64)
    a = xc.T @ xc
    a[np.diag_indices_from(a)] += lam
    w = np.linalg.solve(a, xc.T @ (y - my).astype(np.float64)).T
    return w.astype(np.float32), (my - w @ mx).astype(np.float32)


def select(rule: str, logits: np.ndarray, value: float) -> np.ndarray:
    """The masks the in-graph selection makes from ``logits [..., n_head]`` (llama-head-predictor.cpp):
    every rule keeps at least the head with the largest logit."""
    flat = logits.reshape(-1, logits.shape[-1])
    if rule == "threshold":
        mask = (flat > value).astype(np.int32) | topk_mask(flat, 1)
    elif rule == "topk":
        mask = topk_mask(flat, int(value))
    elif rule == "mass":
        clipped = np.maximum(flat, 0.0)
        mask = np.where(clipped.sum(axis=1, keepdims=True) > 0, mass_mask(clipped + 0.0, value), topk_mask(flat, 1))
    else:
        raise ValueError(f"unknown rule {rule!r}; choose from {', '.join(RULES)}")
    return mask.reshape(logits.shape)


def value_for_density(rule: str, logits: list[np.ndarray], density: float) -> float:
    """The rule's value whose held-out mean density (with the keep-the-top-head floor) is closest
    to ``density``: a threshold or a mass fraction by bisection, k by rounding."""
    n_head = logits[0].shape[-1]
    if rule == "topk":
        return float(min(n_head, max(1, round(density * n_head))))
    # density falls as the threshold rises, and rises with the mass fraction
    lo, hi = ((min(float(l.min()) for l in logits) - 1, max(float(l.max()) for l in logits) + 1)
              if rule == "threshold" else (0.0, 1.0))
    for _ in range(50):
        mid = (lo + hi) / 2
        d = np.mean([select(rule, l, mid).mean() for l in logits])
        if (d > density) == (rule == "threshold"):
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def layer_offsets(sensitivity: list[float], strength: float = 1.0) -> np.ndarray:
    """Per-layer logit offsets from layer sensitivities: ``strength * log(s_l)`` centred, so that
    under one threshold a layer where dropping costs more keeps more heads. Strength 1 keeps a
    head when sensitivity x predicted share clears the threshold: the cheapest heads to drop go
    first if the output's change grows linearly with the dropped share; more than 1 leans
    harder on the sensitive layers."""
    logs = np.log(np.maximum(np.asarray(sensitivity, np.float64), 1e-9))
    return (strength * (logs - logs.mean())).astype(np.float32)


def train(data_dir: Path, out: Path, rule: str = "threshold", density: float = 0.7, value: float | None = None,
          holdout: float = 0.2, label: str = "level", layer_budget: float = 1.0, fill: str | None = None,
          progress: Callable[[str], None] | None = None) -> dict:
    """Fit, choose the rule's value (``value``, or what gives ``density`` on the held-out data),
    write ``out``; returns the training summary."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose from {', '.join(RULES)}")
    if not 0.0 < density <= 1.0 or not 0.0 < holdout < 1.0:
        raise ValueError("density must be in (0, 1] and holdout in (0, 1)")
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{data_dir} holds no collected data (no meta.json); run `powerinfer-attn collect`")
    meta = json.loads(meta_path.read_text())
    n_layer, n_head, n_embd = meta["n_layer"], meta["n_head"], meta["n_embd"]
    if fill is None:
        fill = next(k for k in ("linear", "mean", "zero") if has_fill(data_dir, k))
    if fill not in FILLS:
        raise ValueError(f"unknown fill {fill!r}; choose from {', '.join(FILLS)}")
    if not has_fill(data_dir, fill):
        raise FileNotFoundError(f"{data_dir} holds no data for {fill} fill (collected by an older version): collect again")
    head_fill = HeadFill.load(data_dir / "fill.npz") if fill != "zero" else None
    # the sensitivities measured with this fill in place, where collect measured them
    sens_key = "layer_sensitivity_linear" if fill == "linear" and meta.get("layer_sensitivity_linear") else "layer_sensitivity"
    sens = meta.get(sens_key)
    if layer_budget < 0:
        raise ValueError("layer_budget (the strength of the per-layer offsets) must be >= 0")
    use_budget = layer_budget > 0 and sens is not None and rule == "threshold" and label in ("share", "level")
    if layer_budget > 0 and sens is None and progress:
        progress("no layer sensitivities in the data (collect --no-sensitivity): one budget for all layers")
    offsets = layer_offsets(sens, layer_budget) if use_budget else np.zeros(n_layer, np.float32)
    ws, bs, held_logits, held_targets, layers = [], [], [], [], []
    for il in range(n_layer):
        x, imp, resid = load_layer(data_dir, il, fill)
        y = targets(rule, imp, resid, label)
        cut = int(len(x) * (1 - holdout))
        if cut < n_embd or len(x) - cut < 16:
            raise ValueError(f"too little data: {len(x)} tokens; collect more (at least {2 * n_embd})")
        best = None
        for lam in LAMBDAS:
            w, b = ridge(x[:cut], y[:cut], lam)
            err = float(((x[cut:] @ w.T + b - y[cut:]) ** 2).mean())
            if best is None or err < best[0]:
                best = (err, lam, w, b)
        err, lam, w, b = best
        var = float(((y[cut:] - y[cut:].mean(axis=0)) ** 2).mean())
        b = b + offsets[il]  # the layer's budget (zero without sensitivities)
        ws.append(w)
        bs.append(b)
        held_logits.append(x[cut:] @ w.T + b)
        held_targets.append(y[cut:])
        layers.append({"layer": il, "ridge_lambda": lam, "heldout_r2": round(1 - err / max(var, 1e-12), 4)})
        if progress:
            progress(f"layer {il}: ridge lambda {lam:g}, held-out R^2 {layers[-1]['heldout_r2']:.3f}")
    if value is None:
        value = value_for_density(rule, held_logits, density)
    held_density = [float(select(rule, l, value).mean()) for l in held_logits]
    # the rule's value for other densities, so that one file serves a whole density sweep
    by_density = {f"{d:.2f}": round(value_for_density(rule, held_logits, d), 5) for d in DENSITY_GRID}
    # what each layer keeps at that value: the targets of density control (Engine.set_head_density)
    layers_by_density = {k: [round(float(select(rule, l, v).mean()), 4) for l in held_logits]
                         for k, v in by_density.items()} if rule == "threshold" else None
    # a text written by `corpus-mix` says which kinds of text it holds (FILE.json beside it)
    sidecar = Path(str(meta.get("text_file", "")) + ".json")
    texts = json.loads(sidecar.read_text()).get("kinds") if meta.get("text_file") and sidecar.is_file() else None
    summary = {
        "data": meta["articles"],
        "texts": texts or {"text_file": Path(meta.get("text_file", "?")).name},
        "tokens": meta["tokens"],
        "heldout_fraction": holdout,
        "target": "share of the layer's importance" if rule == "mass" else
                  "log(share of the layer's importance)" if label == "share" else
                  "log(importance) - the layer's mean log(total importance)" if label == "level" else
                  "log(norm of the head's contribution through wo / norm of the residual stream)",
        "rule": rule,
        "rule_value": float(value),
        "fill": fill,
        "heldout_density": round(float(np.mean(held_density)), 4),
        "heldout_density_per_layer": [round(d, 4) for d in held_density],
        "value_for_density": by_density,
        "layer_density_for_density": layers_by_density,
        "layer_budget_strength": float(layer_budget) if use_budget else 0.0,
        "layer_offsets": [round(float(o), 4) for o in offsets] if use_budget else None,
        "layer_sensitivity": sens_key if use_budget else None,
        "heldout_r2_mean": round(float(np.mean([l["heldout_r2"] for l in layers])), 4),
        "layers": layers,
    }
    write_predictor(out, ws, bs, meta["model_name"], rule, float(value), summary,
                    means=[m.T for m in head_fill.mean_post] if fill == "mean" else None,
                    linear=(head_fill.w, head_fill.b) if fill == "linear" else None)
    return summary
