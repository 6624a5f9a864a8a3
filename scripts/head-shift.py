#!/usr/bin/env python3
"""Per head, where a trained predictor goes wrong on a text: how often each head is its layer's top
head (largest deviation from its fill) on the text and on the training data, how often the
predictor's top-K drops it then, its mean and 99th-percentile deviation on each, and the
correlation of its logit with log(deviation) on each.

usage: scripts/head-shift.py PRED.gguf TEXT_DATA TRAIN_DATA K LAYERS
  TEXT_DATA: collect -m M --text-file T --out DIR --tokens 8192 --seq-len 4096 --no-sensitivity --fill-from PRED.gguf
  TRAIN_DATA: the data the predictor was trained on (prepare's work folder: .../prepare/MODEL/data)
  e.g. K=10 LAYERS=4,17,20 for Qwen2.5-Coder-0.5B on the essays (figures/domains/head-shift-qwen-essays.txt)"""
import sys
from pathlib import Path

import numpy as np

from powerinfer_attn.training.collect import load_layer
from powerinfer_attn.predictors.importance import topk_mask
from powerinfer_attn.predictors.predictor_file import read_weights
pred, d, mix, K = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
ws, bs = read_weights(pred)
for il in map(int, sys.argv[5].split(",")):
    x, dev, res = load_layer(d, il, "linear")
    xm, devm, _ = load_layer(mix, il, "linear")
    lg = x @ ws[il].T + bs[il]
    keep = topk_mask(lg, K)
    top = dev.argmax(1)
    print(f"layer {il}: head | top-1 share (essays / mix) | missed when top-1 | mean dev (essays / mix) | p99 dev | corr(logit, log dev) essays / mix")
    lgm = xm @ ws[il].T + bs[il]
    for h in range(dev.shape[1]):
        ist = top == h
        miss = (1 - keep[ist, h]).mean() if ist.any() else float('nan')
        c = np.corrcoef(lg[:, h], np.log(dev[:, h] + 1e-6))[0, 1]; cm = np.corrcoef(lgm[:, h], np.log(devm[:, h] + 1e-6))[0, 1]
        print(f"  {h:2d} | {ist.mean():.3f} / {(devm.argmax(1) == h).mean():.3f} | {miss:.2f} | {dev[:, h].mean():.3f} / {devm[:, h].mean():.3f} | {np.percentile(dev[:, h], 99):.3f} / {np.percentile(devm[:, h], 99):.3f} | {c:.2f} / {cm:.2f}")
