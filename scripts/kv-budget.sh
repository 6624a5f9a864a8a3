#!/usr/bin/env bash
# The token budget (issue 30) on the CPU: decode speed at 8192 tokens of held-out WikiText with
# fixed head densities and a 1024-cell budget per KV group, against the fastest stock
# configuration in the same run, with the per-part profile of each step (the budget's page
# bounds and selection are the "pages" part). About 8 min on 2 cores; run it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
TEXT=${TEXT:-../shared/data/wikitext-2-raw/wiki.test.raw}
"$BIN/powerinfer-attn" bench -d 8192 --density 1,0.7,0.5 --kv-budget "${BUDGET:-1024}" --text-file "$TEXT" \
	--cache-types f16 --reps 10 -t 2 --json > figures/bench-budget-8192-text.json
"$BIN/powerinfer-attn" show figures/bench-budget-8192-text.json
