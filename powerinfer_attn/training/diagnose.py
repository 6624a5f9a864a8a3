"""Why a predictor file holds on one text and not on another: its choices against the oracle's,
layer by layer, on data that ``collect --fill-from FILE`` recorded from that text (each head's
importance is then the deviation of its output from the file's own fill).

Per layer, over the data's tokens, at the file's per-layer target densities for ``density``
(what density control steers each layer to):

- ``fill_left``: the share of the heads' output norm the fill leaves unexplained (sum of
  deviations over sum of norms; 1 would be no better than zeroing). A fill fitted on one text
  that misses on another raises every head's importance: the oracle loses too.
- ``density_fixed``: the density the file's own threshold gives on this text, against the
  layer's target. Density control corrects it at run time; a large gap says the logits' level
  moved (the features or the label shifted).
- ``regret``: the importance the predictor drops over what the oracle drops keeping the same
  number of heads at every token (1 = the oracle's ranking), with a threshold that meets the
  layer's target on this data. This is what density control cannot fix: the order of the heads.
- ``regret_spread``: the same against an oracle that keeps as many heads in the layer over the
  data but spreads them over the tokens as it likes: it adds how well the predictor tells the
  tokens that need many heads from those that need few (the threshold's level per token).
- ``dropped`` and ``dropped_oracle``: the share of the layer's importance each drops.

``report`` gives these per layer and their means; ``format_report`` a table of several texts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .collect import load_layer
from ..predictors.predictor_file import read_metadata, read_weights
from .train import select, value_for_density

_EPS = 1e-9


def _dropped(imp: np.ndarray, keep: np.ndarray) -> float:
    return float((imp * (1 - keep)).sum())


def _oracle_keep(imp: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per token the ``counts[t]`` heads of largest importance."""
    order = np.argsort(-imp, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(imp.shape[1])[None, :].repeat(len(imp), 0), axis=1)
    return (ranks < counts[:, None]).astype(np.int8)


def report(pred_path: Path, data_dir: Path, density: float = 0.7) -> dict:
    """The file's choices against the oracle's on ``data_dir`` (``collect --fill-from pred_path``)."""
    meta = json.loads((data_dir / "meta.json").read_text())
    fmeta = read_metadata(pred_path)
    summary = fmeta.get("training", {})
    if meta.get("fill_from") is None or Path(meta["fill_from"]).name != Path(pred_path).name:
        raise ValueError(f"{data_dir} was not collected with --fill-from {Path(pred_path).name}: its importances "
                         "are not deviations from this file's fill")
    key = f"{density:.2f}"
    targets = (summary.get("layer_density_for_density") or {}).get(key)
    if targets is None:
        raise ValueError(f"{pred_path} holds no per-layer densities for {key} (trained with the threshold rule?)")
    value = float(fmeta["rule_value"]) if abs(density - summary.get("heldout_density", -1)) < 0.02 else \
        float(summary["value_for_density"][key])
    ws, bs = read_weights(pred_path)
    layers = []
    for il, (w, b) in enumerate(zip(ws, bs)):
        x, dev, _ = load_layer(data_dir, il, "linear")
        imp_zero = np.concatenate([np.load(data_dir / f"imp-{c:05d}.npy")[:, il] for c in range(meta["chunks"])])
        logits = x @ w.T + b
        fixed = select("threshold", logits, value).mean()
        # the threshold that meets the layer's target on this data, as density control would
        keep = select("threshold", logits, value_for_density("threshold", [logits], targets[il]))
        oracle = _oracle_keep(dev, keep.sum(axis=1))
        total = float(dev.sum())
        d_pred, d_orc = _dropped(dev, keep), _dropped(dev, oracle)
        # the oracle free to spread the same number of heads over the tokens as it likes
        flat = np.sort(dev.ravel())[::-1]
        d_free = float(flat[int(keep.sum()):].sum())
        layers.append({"layer": il, "target": round(float(targets[il]), 4), "density_fixed": round(float(fixed), 4),
                       "fill_left": round(total / max(float(imp_zero.sum()), _EPS), 4),
                       "dropped": round(d_pred / max(total, _EPS), 4), "dropped_oracle": round(d_orc / max(total, _EPS), 4),
                       # a layer kept whole (target 1) drops nothing either way: no regret to speak of
                       "regret": round(d_pred / d_orc, 3) if d_orc > _EPS else None,
                       "regret_spread": round(d_pred / d_free, 3) if d_free > _EPS else None})
    mean = {k: round(float(np.mean([l[k] for l in layers if l[k] is not None])), 4)
            for k in ("density_fixed", "fill_left", "dropped", "dropped_oracle", "regret", "regret_spread")}
    return {"kind": "diagnose", "predictor": Path(pred_path).name, "data": str(data_dir),
            "text_file": meta["text_file"], "tokens": meta["tokens"], "seq_len": meta["seq_len"],
            "density": density, "layers": layers, "mean": mean}


def format_report(reports: list[dict]) -> str:
    """One table per measure: layers as rows, the reports' texts as columns."""
    if not reports:
        return "(no reports)"
    names = [Path(r["text_file"]).stem for r in reports]
    data = ", ".join(f"{n} {r['tokens']} tokens" for n, r in zip(names, reports))
    out = [f"{reports[0]['predictor']} at density {reports[0]['density']:g} (targets per layer from the file; data: {data})"]
    for key, what in (("regret", "importance dropped / the oracle's at the same counts (1 = the oracle's order)"),
                      ("regret_spread", "importance dropped / the oracle's with as many heads in the layer, spread "
                                        "over the tokens as it likes (which tokens get heads)"),
                      ("dropped", "share of importance dropped"),
                      ("density_fixed", "density at the file's fixed threshold (target in the first column)"),
                      ("fill_left", "share of the heads' output the fill leaves unexplained")):
        out.append(f"\n{key}: {what}")
        head = "layer | " + ("target | " if key == "density_fixed" else "") + " | ".join(names)
        out.append(head)
        for il in range(len(reports[0]["layers"])):
            cells = ["-" if r["layers"][il][key] is None else f"{r['layers'][il][key]:.3f}" for r in reports]
            tgt = [f"{reports[0]['layers'][il]['target']:.3f}"] if key == "density_fixed" else []
            out.append(f"{il:5d} | " + " | ".join(tgt + cells))
        out.append("mean  | " + ("       | " if key == "density_fixed" else "")
                   + " | ".join(f"{r['mean'][key]:.3f}" for r in reports))
    return "\n".join(out)


__all__ = ["format_report", "report"]
