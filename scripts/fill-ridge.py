"""How well a linear fill fitted on one kind of text stands in on another, by ridge strength
(FILL_RIDGE in powerinfer_attn/predictors/fill.py). Needs the texts of scripts/domains.sh in vendor/corpus.
For each text, dense runs over TOKENS tokens of its training articles (sequences of 2048)
accumulate each layer's sums; a fill fitted on some texts is then judged on each by the share
of the heads' output energy it leaves (sum over heads of |o - fill(x)|^2 over |o|^2, the mean
over layers; 1 = no better than zeroing). Fits on code and docs are judged on their own
training data there (in-sample); wiki-heldout and essays are never fitted on.
Usage: .venv/bin/python scripts/fill-ridge.py [TOKENS] -> figures/domains/fill-ridge.json"""
import json
import sys
from pathlib import Path

import numpy as np

from powerinfer_attn.engine.decode import Engine
from powerinfer_attn.predictors.fill import _NAMED, FillFitter
from powerinfer_attn.native.model import default_model_path
from powerinfer_attn.engine.text import text_tokens


class Fitter(FillFitter):
    """FillFitter's sums, and the sum of the squared outputs (to judge a fill on these tokens)."""

    def __call__(self, name, data):
        what, il = _NAMED.match(name).group(1), int(_NAMED.match(name).group(2))
        if what != "attn_norm":
            rows = data.reshape(-1, data.shape[-1]).astype(np.float64)
            if not hasattr(self, "soo"):
                self.soo = np.zeros((self.n_layer, rows.shape[1]))
            self.soo[il] += (rows ** 2).sum(axis=0)
        super().__call__(name, data)


mp = default_model_path()
C = Path("vendor/corpus")
texts = {"wiki": C / "wiki.txt", "wiki-heldout": C / "wiki-heldout.txt", "code": C / "code.txt", "docs": C / "docs.txt",
         "essays": C / "essays.txt"}
if (C / "chat.txt").exists():
    texts["chat"] = C / "chat.txt"
N, SEQ = int(sys.argv[1]) if len(sys.argv) > 1 else 8192, 2048
sums = {}
for k, f in texts.items():
    hook = Fitter(30)
    with Engine(mp, n_ctx=SEQ + 8, n_threads=2, n_batch=512, tensor_hook=hook) as eng:
        toks = text_tokens(eng, f, training=True)
        step = len(toks) // (N // SEQ)
        for s in range(N // SEQ):
            seq = toks[s * step:s * step + SEQ]
            eng.reset()
            for s0 in range(0, len(seq), 512):
                eng.prefill(seq[s0:s0 + 512], all_logits=True)
    sums[k] = hook
    print(k, "collected", flush=True)

def fit(hooks, lam):
    n = sum(h.n for h in hooks); sx = sum(h.sx for h in hooks); so = sum(h.so for h in hooks)
    sxx = sum(h.sxx for h in hooks); sxo = sum(h.sxo for h in hooks)
    W, B = [], []
    for il in range(30):
        mx, mo = sx[il] / n[il], so[il] / n[il]
        cxx = sxx[il] - n[il] * np.outer(mx, mx); cxo = sxo[il] - n[il] * np.outer(mx, mo)
        cxx[np.diag_indices_from(cxx)] += lam
        w = np.linalg.solve(cxx, cxo).T
        W.append(w); B.append(mo - w @ mx)
    return W, B

def err(h, W, B):
    out = []
    for il in range(30):
        w, b = W[il], B[il]
        e = h.soo[il].sum() - 2 * np.trace(w @ h.sxo[il]) - 2 * b @ h.so[il] + np.trace(w @ h.sxx[il] @ w.T) \
            + 2 * b @ (w @ h.sx[il]) + h.n[il] * b @ b
        out.append(e / h.soo[il].sum())
    return float(np.mean(out))

evals = [k for k in texts if k != "wiki"]
res = {}
for train in (["wiki"], ["wiki", "code", "docs"] + (["chat"] if "chat" in texts else [])):
    for lam in (10, 100, 1e3, 1e4, 1e5):
        W, B = fit([sums[t] for t in train], lam)
        row = {e: round(err(sums[e], W, B), 4) for e in evals}
        res[f"{'+'.join(train)} lam={lam:g}"] = row
        print(f"{'+'.join(train):24s} lam={lam:<7g}", " ".join(f"{e}={v:.3f}" for e, v in row.items()), flush=True)
json.dump(res, open("figures/domains/fill-ridge.json", "w"), indent=1)
