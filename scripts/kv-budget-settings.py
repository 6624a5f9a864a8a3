"""The token budget's page size, sinks and recent window, chosen on training text (issue 30).

Every head kept (``all``), a 1024-cell budget per KV group after 8192 tokens, on the WikiText
articles `collect` trains on (``score --training-articles``: never the held-out half the tables
report): perplexity change, KL and its 99th percentile, top-1 agreement against dense, for page
8/16/32 with 4 sinks and 64 recent cells, a 256-cell recent window, 64 sinks, and the first one
or two layers reading every cell (as Quest keeps its first two). About 4 min on
2 cores; the result goes to figures/kv-budget-settings.json (print it again with `powerinfer-attn
show`).

    .venv/bin/python scripts/kv-budget-settings.py [TEXT]

With ``--score``: how a page is scored for a KV group instead (``:budget-score=``): the bound
summed over its heads (sum), each head's bound relative to its best page (head-max), the same
with q.(min+max)/2 (mid), and with the exact largest q.k over the page (exact: reads every key,
the oracle), at 1024 and 512 cells, on the same text and steps (figures/kv-budget-score.json).
With ``--spread``: mid plus 0.25, 0.5 and 0.75 of each page's spread along q
(``:budget-spread=``; 0 is mid, 1 the head-max bound), at 1024 and 512 cells
(figures/kv-budget-spread.json).
With ``--rerank``: re-ranking (``:budget-rerank=R``): the sum's pages for 2 and 4 times the
budget, then the exact score among them, at 1024 and 512 cells, beside the sum and the exact
score alone (figures/kv-budget-rerank.json).
"""

import json
import sys
from pathlib import Path

from powerinfer_attn.evaluation import compare as cmp
from powerinfer_attn.native.model import default_model_path
from powerinfer_attn.predictors.basic import AllHeads
from powerinfer_attn.predictors.wrappers import KVBudget

ARGS = [a for a in sys.argv[1:] if a not in ("--score", "--spread", "--rerank")]
TEXT = Path(ARGS[0] if ARGS else "../shared/data/wikitext-2-raw/wiki.test.raw")
BUDGET, CTX, STEPS, WINDOWS = 1024, 8192, 64, 2
# (page, sinks, recent, dense layers)
SETTINGS = [(16, 4, 64, 0), (8, 4, 64, 0), (16, 4, 256, 0), (32, 4, 64, 0), (16, 64, 64, 0), (16, 4, 64, 1), (16, 4, 64, 2)]

preds = []
if "--score" in sys.argv:
    for budget in (1024, 512):
        for score in ("sum", "head-max", "mid", "exact"):
            preds.append(KVBudget(AllHeads(), budget, score=score))
    name = "kv-budget-score.json"
elif "--spread" in sys.argv:
    for budget in (1024, 512):
        for spread in (0.25, 0.5, 0.75):
            preds.append(KVBudget(AllHeads(), budget, score="mid", spread=spread))
    name = "kv-budget-spread.json"
elif "--rerank" in sys.argv:
    for budget in (1024, 512):
        preds.append(KVBudget(AllHeads(), budget))
        for rerank in (2, 4):
            preds.append(KVBudget(AllHeads(), budget, rerank=rerank))
        preds.append(KVBudget(AllHeads(), budget, score="exact"))
    name = "kv-budget-rerank.json"
else:
    for page, sink, recent, dense in SETTINGS:
        p = KVBudget(AllHeads(), BUDGET, page, sink, recent, dense)
        p.name = f"all+budget:{BUDGET} page {page} sinks {sink} recent {recent}" + (f" dense layers {dense}" if dense else "")
        preds.append(p)
    name = "kv-budget-settings.json"
res = cmp.score(default_model_path(), TEXT, preds, CTX, STEPS, WINDOWS, threads=2, training=True)
out = Path(__file__).resolve().parent.parent / "figures" / name
out.write_text(json.dumps([r.to_json() for r in res], indent=1))
print(cmp.format_scores(res))
