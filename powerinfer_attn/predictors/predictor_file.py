"""The head predictor file (a GGUF sidecar beside the model): written by ``train``, read by
``llama_head_predictor_load`` in the graph and by the Python predictors and fills.

Per layer ``N``: ``blk.N.head_pred.weight`` F32 ``[n_embd, n_head]`` (ggml order) and
``blk.N.head_pred.bias`` F32 ``[n_head]``; with mean fill ``blk.N.head_mean`` F32 ``[n_head,
n_embd]`` (each head's mean contribution through ``wo``); with linear fill
``blk.N.head_fill.weight`` F16 ``[n_embd, n_head*d]`` and ``blk.N.head_fill.bias`` F32
``[n_head*d]``. Metadata ``head_predictor.*``: kind, shapes, the model it belongs to, rule and
value, fill, and a JSON training summary.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .fill import HeadFill


def write_predictor(path: Path, ws: list[np.ndarray], bs: list[np.ndarray], model_name: str, rule: str,
                    value: float, summary: dict, means: list[np.ndarray] | None = None,
                    linear: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """The GGUF sidecar read by llama_head_predictor_load. ``ws[il]`` is ``[n_head, n_embd]``;
    with mean fill ``means[il]`` ``[n_embd, n_head]`` (column h: head h's mean contribution);
    with linear fill ``linear = (w [n_layer, n_head*d, n_embd], b [n_layer, n_head*d])``."""
    if means is not None and linear is not None:
        raise ValueError("a predictor file holds one fill: means or linear, not both")
    import gguf

    n_head, n_embd = ws[0].shape
    w = gguf.GGUFWriter(str(path), arch="head_predictor")
    w.add_string("head_predictor.kind", "linear")
    w.add_string("head_predictor.model_name", model_name)
    w.add_int32("head_predictor.n_layer", len(ws))
    w.add_int32("head_predictor.n_head", int(n_head))
    w.add_int32("head_predictor.n_embd", int(n_embd))
    w.add_string("head_predictor.rule", rule)
    w.add_float32("head_predictor.rule_value", float(value))
    w.add_string("head_predictor.fill", "mean" if means is not None else "linear" if linear is not None else "zero")
    w.add_string("head_predictor.training", json.dumps(summary))
    for il, (wl, bl) in enumerate(zip(ws, bs)):
        # numpy [n_head, n_embd] is ggml [n_embd, n_head]: row h holds head h's weights
        w.add_tensor(f"blk.{il}.head_pred.weight", np.ascontiguousarray(wl, np.float32))
        w.add_tensor(f"blk.{il}.head_pred.bias", np.ascontiguousarray(bl, np.float32))
        if means is not None:
            # numpy [n_embd, n_head] is ggml [n_head, n_embd], the layout the fill's product reads
            w.add_tensor(f"blk.{il}.head_mean", np.ascontiguousarray(means[il], np.float32))
        if linear is not None:
            # numpy [n_head*d, n_embd] is ggml [n_embd, n_head*d], wq's layout; F16 halves what a step reads
            w.add_tensor(f"blk.{il}.head_fill.weight", np.ascontiguousarray(linear[0][il], np.float16))
            w.add_tensor(f"blk.{il}.head_fill.bias", np.ascontiguousarray(linear[1][il], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_metadata(path: Path) -> dict:
    """The sidecar's ``head_predictor.*`` metadata, as Python values."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    out = {}
    for f in r.fields.values():
        if f.name.startswith("head_predictor."):
            v = f.contents()
            out[f.name.removeprefix("head_predictor.")] = v
    if "training" in out:
        out["training"] = json.loads(out["training"])
    return out


def read_fill(path: Path) -> tuple[str, HeadFill]:
    """The sidecar's fill: ``(kind, HeadFill)`` with its means or its linear map."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    ts = {t.name: t for t in r.tensors}
    n_layer = sum(1 for n in ts if n.endswith(".head_pred.weight"))
    if "blk.0.head_mean" in ts:
        # stored [n_head, n_embd] (ggml order): numpy rows are n_embd, columns heads
        return "mean", HeadFill(mean_post=np.stack([np.asarray(ts[f"blk.{il}.head_mean"].data, np.float32).T
                                                    for il in range(n_layer)]))
    if "blk.0.head_fill.weight" in ts:
        return "linear", HeadFill(w=np.stack([np.asarray(ts[f"blk.{il}.head_fill.weight"].data, np.float32)
                                              for il in range(n_layer)]),
                                  b=np.stack([np.asarray(ts[f"blk.{il}.head_fill.bias"].data, np.float32)
                                              for il in range(n_layer)]))
    return "zero", HeadFill()


def read_weights(path: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per layer the predictor's ``W [n_head, n_embd]`` and ``b [n_head]``."""
    from gguf import GGUFReader

    ts = {t.name: t for t in GGUFReader(str(path)).tensors}
    n_layer = sum(1 for n in ts if n.endswith(".head_pred.weight"))
    return ([np.asarray(ts[f"blk.{il}.head_pred.weight"].data, np.float32) for il in range(n_layer)],
            [np.asarray(ts[f"blk.{il}.head_pred.bias"].data, np.float32) for il in range(n_layer)])


def rewrite_biases(src: Path, out: Path, change, note: dict | None = None) -> None:
    """A copy of the predictor file ``src`` at ``out`` with layer ``il``'s bias replaced by
    ``change(il, bias)``; ``note`` is merged into its training summary."""
    meta = read_metadata(src)
    ws, bs = read_weights(src)
    bs = [np.asarray(change(il, b), np.float32) for il, b in enumerate(bs)]
    kind, fill = read_fill(src)
    means = [m.T for m in fill.mean_post] if kind == "mean" else None
    linear = (fill.w, fill.b) if kind == "linear" else None
    write_predictor(out, ws, bs, meta["model_name"], meta["rule"], float(meta["rule_value"]),
                    meta.get("training", {}) | (note or {}), means=means, linear=linear)
