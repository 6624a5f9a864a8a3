#!/usr/bin/env python3
"""A random head predictor file for a synthetic model (synthetic_model.py), for timing the
in-graph predictor and its fills on the GPU machine: what they cost does not depend on the
values, only on the shapes. Rule top-k with k = n_head / 2 (density 0.5 on every token);
fill zero, mean or linear (F16 [n_embd, n_head*d] per layer, as train-predictor writes it).

    synthetic_predictor.py MODEL.gguf OUT.gguf [zero|mean|linear]
"""

import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from powerinfer_attn.predictors import predictor_file  # noqa: E402


def main(argv: list[str]) -> None:
    model, out = Path(argv[0]), Path(argv[1])
    fill = argv[2] if len(argv) > 2 else "zero"
    if fill not in ("zero", "mean", "linear"):
        raise SystemExit(f"unknown fill {fill!r}: zero, mean or linear")
    fields = GGUFReader(str(model)).fields
    arch = fields["general.architecture"].contents()
    n_layer = int(fields[f"{arch}.block_count"].contents())
    n_embd = int(fields[f"{arch}.embedding_length"].contents())
    n_head = int(fields[f"{arch}.attention.head_count"].contents())
    d = n_embd // n_head
    rng = np.random.default_rng(0)
    ws = [(rng.normal(size=(n_head, n_embd)) * 0.02).astype(np.float32) for _ in range(n_layer)]
    bs = [rng.normal(size=n_head).astype(np.float32) for _ in range(n_layer)]
    means = [(rng.normal(size=(n_embd, n_head)) * 0.01).astype(np.float32) for _ in range(n_layer)] \
        if fill == "mean" else None
    linear = None
    if fill == "linear":  # one random layer repeated: the file is large enough as it is
        w = (rng.normal(size=(n_head * d, n_embd)) * 0.01).astype(np.float32)
        linear = (np.broadcast_to(w, (n_layer,) + w.shape), np.zeros((n_layer, n_head * d), np.float32))
    predictor_file.write_predictor(out, ws, bs, model.name, "topk", float(n_head // 2),
                                   {"note": "random weights, for timing only"}, means=means, linear=linear)
    print(f"{out}: {n_layer} layers, {n_head} heads, fill {fill}")


if __name__ == "__main__":
    main(sys.argv[1:])
