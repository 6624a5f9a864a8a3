#!/usr/bin/env python3
"""Which layers cost a trained predictor its KL on a text: per decode step, the oracle's top-K masks
(importance measured on a dense step of the same state) in every layer but one, where the
predictor's own top-K masks are used, against the dense step. Dense history (each step ends
on the dense step), teacher-forced.

usage: scripts/swap-layers.py MODEL PRED.gguf TEXT PREFIX STEPS WINDOWS K
  e.g. qwen2.5-coder-0.5b ~/.cache/powerinfer-attn/predictors/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
       vendor/corpus/essays.txt 4096 48 3 10  (~7 min on 2 cores; figures/domains/swap-layers-qwen-essays.txt)"""
import sys

from pathlib import Path
import numpy as np

from powerinfer_attn.engine.decode import Engine
from powerinfer_attn.engine.hooks import Hooks
from powerinfer_attn.engine.text import text_tokens, window_starts, log_softmax
from powerinfer_attn.predictors.trained import TrainedHeads
from powerinfer_attn.predictors.importance import HeadContributions, topk_mask
from powerinfer_attn.predictors.predictor_file import read_fill
from powerinfer_attn.native.model import resolve_model

model = resolve_model(sys.argv[1]); pred = Path(sys.argv[2]); text = Path(sys.argv[3])
pre, steps, windows, K = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
tr = TrainedHeads(pred, "topk", K)
kind, fill = read_fill(pred)

with Engine(model, n_ctx=64, n_threads=2) as probe:
    L, H = probe.n_layer, probe.n_head
hc = HeadContributions(model, L, H, fill=fill)
kl = lambda ld, ls: float((np.exp(ld) * (ld - ls)).sum())
KP, KO, KS, DP, DO = [], [], [], [], []
with Engine(model, n_ctx=pre + steps + 8, n_threads=2, tensor_hook=Hooks(tr.hook, hc)) as eng:
    tr.bind(eng)
    toks = text_tokens(eng, text, False)
    for s0 in window_starts(len(toks), pre + steps + 1, windows):
        win = toks[s0:s0 + pre + steps + 1]
        eng.reset(); hc.active = False
        eng.set_sparse(False)
        eng.prefill(win[:pre])
        for i, t in enumerate(win[pre:pre + steps]):
            pos = eng.n_past
            eng.set_sparse(True)
            lp, mp = eng.predicted_step(tr, i, t); eng.rollback(pos)
            eng.use_head_predictor(False)
            eng.set_sparse(False); hc.active = True
            ldn = log_softmax(eng.step(t)[None])[0]; hc.active = False
            imp = hc.per_token_dev[kind][-1]
            mo = topk_mask(imp, K)
            eng.rollback(pos)
            eng.set_sparse(True)
            eng.set_mask(mo); lo = eng.step(t); eng.rollback(pos)
            ks = []
            for il in range(L):
                m = mo.copy(); m[il] = mp[il]
                eng.set_mask(m); ks.append(kl(ldn, log_softmax(eng.step(t)[None])[0])); eng.rollback(pos)
            eng.set_sparse(False)
            eng.step(t)  # keep the dense history
            KP.append(kl(ldn, log_softmax(lp[None])[0])); KO.append(kl(ldn, log_softmax(lo[None])[0])); KS.append(ks)
            DP.append((imp * (1 - mp)).sum(1) / imp.sum(1)); DO.append((imp * (1 - mo)).sum(1) / imp.sum(1))
        KS_ = np.array(KS)
        print(f"window {s0}: KL pred {np.mean(KP):.4f} oracle {np.mean(KO):.4f}; oracle+pred layer l - oracle:",
              np.round(KS_.mean(0) - np.mean(KO), 4).tolist(), flush=True)
KS_ = np.array(KS)
print(f"all windows: KL pred {np.mean(KP):.4f} oracle {np.mean(KO):.4f}; per layer (oracle + pred in layer l) - oracle:", np.round(KS_.mean(0) - np.mean(KO), 4).tolist())
