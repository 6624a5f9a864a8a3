#!/usr/bin/env python3
"""The table of docs/results-cpu.md from scripts/calibrate.sh's figures (and the oracle rows of the
same windows in figures/domains): prints markdown."""
import json, os
F = "figures/domains"
def rows(f):
    return json.load(open(f))["rows"] if os.path.exists(f) else []
def cell(r):
    return f"+{100*(r['ppl_sparse']/r['ppl_dense']-1):.1f}% / {r['kl_mean']:.3f}" if r else "-"
out = ["| model, text | 0.7, file's biases | 0.7, calibrate=128 | 0.7, calibrate=128:calibrate-fill | 0.5, file's biases "
       "| 0.5, calibrate=128 | 0.5, calibrate=128:calibrate-fill | oracle:0.8 + the file's fill (density) "
       "| 0.7 calibrate-fill, KL / the oracle's |",
       "|---|---|---|---|---|---|---|---|---|"]
for m, kinds in (("qwen", ("essays", "wiki", "code", "docs", "chat")), ("smollm2", ("essays", "wiki", "code", "docs", "chat"))):
    for k in kinds:
        rs = rows(f"{F}/calibrate-{m}-{k}.json")
        if not rs:
            continue
        tr = [r for r in rs if r["predictor"].startswith("trained")]
        orc = [r for r in rs if r["predictor"].startswith("oracle:0.8")]
        if not orc and m == "smollm2":
            orc = [r for r in rows(f"{F}/{k}.pred-prepared.json") if r["predictor"].startswith("oracle:0.8")]
        if not orc and m == "qwen" and k == "essays":
            orc = [r for r in rows(f"{F}/qwen-essays-4096-budget-ridge.json") if r["predictor"].startswith("oracle:0.8")]
        o = orc[0] if orc else None
        name = {"qwen": "Qwen2.5-Coder-0.5B", "smollm2": "SmolLM2-135M"}[m] + ", " + {"essays": "essays (never trained on)", "wiki": "WikiText (held-out)", "code": "code (held-out modules)",
                                                                                 "docs": "docs (held-out half)", "chat": "chat (held-out half)"}[k]
        cf = rows(f"{F}/calibrate-fill-{m}-{k}.json")
        f7 = next((r for r in cf if ":density=0.7:" in r["predictor"]), None)
        f5 = next((r for r in cf if ":density=0.5:" in r["predictor"]), None)
        out.append(f"| {name} | {cell(tr[0])} | {cell(tr[1])} | **{cell(f7)}** | {cell(tr[2])} | {cell(tr[3])} | {cell(f5)} | "
                   + (f"{cell(o)} ({o['density']:.2f})" if o else "-") + " | "
                   + (f"{f7['kl_mean']/o['kl_mean']:.2f}x" if o and f7 else "-") + " |")
print("\n".join(out))
