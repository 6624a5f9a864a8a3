#!/usr/bin/env bash
# The token budget (issue 30) on the CPU, SmolLM2-135M on 2 threads. Run it alone.
#   speed:    decode at 8192 tokens of held-out WikiText with fixed head densities and a 1024-cell
#             budget per KV group, against the fastest stock configuration in the same run, with
#             the per-part profile of each step (the page bounds and selection are "pages"):
#             figures/bench-budget-8192-text.json (about 8 min)
#   quality:  perplexity, KL and top-1 agreement after 8192 tokens of held-out WikiText, 4 windows
#             x 64 steps: every head with a 1024 and a 512 budget, the trained predictor at 0.7
#             with and without a 1024 budget, and sinks + window over the same 1024 cells (the
#             StreamingLLM point): figures/score-budget-8192.json (about 6 min)
#   ruler:    RULER at 4096 (4 subtasks x 10 samples, the first 10 of a 20-sample build) for
#             dense, the prepared predictor at 0.7 and 0.5, a 512-cell budget (the 1024/8192 ratio)
#             alone and with the predictor at 0.7, and sinks + window over 512 cells:
#             figures/ruler-smollm2-4096-budget.json (about 35 min)
#   score:    how a page is scored (:budget-score=): a passkey in filler at 4096 tokens, 10 trials,
#             budgets of 512, 256 and 128 cells, for the bound summed over a group's heads (sum,
#             the default), each head's bound relative to its best page (head-max), the midpoint
#             estimate q.(min+max)/2 (mid) and each head's exact largest q.k (exact, the oracle):
#             figures/needle-budget-score-4096.json (about 25 min); then the same scores' KL on
#             training text (scripts/kv-budget-settings.py --score, figures/kv-budget-score.json)
#   spread:   the midpoint plus a share of each page's spread along q (:budget-score=mid
#             :budget-spread=W, W 0.25, 0.5, 0.75; 0 is mid, 1 head-max's bound): the same passkeys
#             at 512 and 256 cells, figures/needle-budget-spread-4096.json, then their KL on
#             training text (scripts/kv-budget-settings.py --spread, figures/kv-budget-spread.json),
#             then W 0.75 on the ruler step's RULER samples at 512 cells, merged into its figure
#   pages:    page size: speed at density 0.7 with pages of 32 cells (figures/bench-budget-8192-
#             text-page32.json, about 6 min) and the quality step's trained 0.7 + 1024 row with pages
#             of 16, 32 and 64 cells (figures/score-budget-pages-8192.json, about 5 min)
#   rerank:   re-ranking (:budget-rerank=R: the sum's pages for R x the budget, then the exact score
#             among them): speed of the trained predictor at 0.7 with 1024 cells and R = 2 and 4
#             (figures/bench-budget-8192-text-rerank{2,4}.json, about 6 min each); KL on the quality
#             step's windows (figures/score-budget-rerank-8192.json, about 8 min) beside the same
#             windows without it (figures/score-budget-rerank-8192-base.json, about 6 min); RULER at
#             4096 with 512 cells re-ranked from 4x on the ruler step's samples, merged into its
#             figure (about 12 min); on training text (scripts/kv-budget-settings.py --rerank,
#             figures/kv-budget-rerank.json, about 15 min)
# The settings (page 16, 4 sinks, 64 recent cells) are chosen on training text by
# scripts/kv-budget-settings.py. STEPS=speed,quality,ruler,score,spread,pages,rerank picks parts
# (score, spread, pages and rerank are not in the default ones).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
PIA=$BIN/powerinfer-attn
TEXT=${TEXT:-../shared/data/wikitext-2-raw/wiki.test.raw}
STEPS=${STEPS:-speed,quality,ruler}
has() { [[ ",$STEPS," == *",$1,"* ]]; }

if has speed; then
	"$PIA" bench -d 8192 --density 1,0.7,0.5 --kv-budget "${BUDGET:-1024}" --text-file "$TEXT" \
		--predictor "trained:density=0.7:budget=${BUDGET:-1024}" -ctk f16 --reps 10 -t 2 --json > figures/bench-budget-8192-text.json
	"$PIA" show figures/bench-budget-8192-text.json
fi

if has pages; then  # not in the default STEPS: the page size, speed at density 0.7 and quality
	"$PIA" bench -d 8192 --density 0.7 --kv-budget "${BUDGET:-1024}" --kv-page 32 --text-file "$TEXT" \
		-ctk f16 --reps 10 -t 2 --json > figures/bench-budget-8192-text-page32.json
	"$PIA" score --text-file "$TEXT" -c 8192 --steps 64 --windows 4 -t 2 --json \
		--predictor trained:density=0.7:budget=1024 --predictor trained:density=0.7:budget=1024:budget-page=32 \
		--predictor trained:density=0.7:budget=1024:budget-page=64 > figures/score-budget-pages-8192.json
	"$PIA" show figures/score-budget-pages-8192.json
fi

if has quality; then
	"$PIA" score --text-file "$TEXT" -c 8192 --steps 64 --windows 4 -t 2 --json \
		--predictor all:budget=1024 --predictor all:budget=512 --predictor trained:density=0.7 \
		--predictor trained:density=0.7:budget=1024 --predictor none:fill=window:4+1020 > figures/score-budget-8192.json
	"$PIA" show figures/score-budget-8192.json
fi

ruler_samples() {  # the RULER samples of the ruler step: 10 per subtask at 4096, the first of a 20-sample build
	S=vendor/ruler-samples-4096-8192-20.json
	[ -f "$S" ] || "$PIA" eval --lengths 4096,8192 --samples 20 --samples-out "$S"
	"$BIN/python" - "$S" vendor/ruler-4096-10.json <<-'E'
	import json, sys
	d = json.load(open(sys.argv[1]))
	tasks = ["niah_single_2", "niah_multikey_1", "ruler_vt", "ruler_cwe"]
	d["samples"] = [s for t in tasks for s in [s for s in d["samples"] if s["length"] == 4096 and s["task"] == t][:10]]
	json.dump(d, open(sys.argv[2], "w"))
	E
}

if has ruler; then
	ruler_samples
	"$PIA" eval --samples-in vendor/ruler-4096-10.json -t 2 --json --predictor trained:density=0.7 \
		--predictor trained:density=0.5 --predictor all:budget=512 --predictor trained:density=0.7:budget=512 \
		--predictor none:fill=window:4+508 > figures/ruler-smollm2-4096-budget.json
	"$PIA" show figures/ruler-smollm2-4096-budget.json
fi

if has score; then
	preds=()
	for b in 512 256 128; do for sc in sum head-max mid exact; do
		[ "$b" = 128 ] && [ "$sc" != sum ] && [ "$sc" != head-max ] && continue
		preds+=(--predictor "all:budget=$b$([ "$sc" = sum ] || echo ":budget-score=$sc")")
	done; done
	"$PIA" needle --lengths 4096 --trials 10 --haystack filler -t 2 "${preds[@]}" --json > figures/needle-budget-score-4096.json
	"$PIA" show figures/needle-budget-score-4096.json
	"$BIN/python" scripts/kv-budget-settings.py --score
fi

if has spread; then
	preds=()
	for b in 512 256; do for w in 0.25 0.5 0.75; do
		preds+=(--predictor "all:budget=$b:budget-score=mid:budget-spread=$w")
	done; done
	"$PIA" needle --lengths 4096 --trials 10 --haystack filler -t 2 "${preds[@]}" --json > figures/needle-budget-spread-4096.json
	"$PIA" show figures/needle-budget-spread-4096.json
	"$BIN/python" scripts/kv-budget-settings.py --spread
	# RULER at 4096 with 512 cells (the ruler step's samples), merged into its figure
	"$PIA" eval --samples-in vendor/ruler-4096-10.json -t 2 --json \
		--predictor all:budget=512:budget-score=mid:budget-spread=0.75 > figures/ruler-smollm2-4096-budget-spread.json
	"$PIA" eval --rescore figures/ruler-smollm2-4096-budget.json --rescore figures/ruler-smollm2-4096-budget-spread.json \
		--json > figures/ruler-smollm2-4096-budget.json.new && mv figures/ruler-smollm2-4096-budget.json.new figures/ruler-smollm2-4096-budget.json
	"$PIA" show figures/ruler-smollm2-4096-budget.json
fi

if has rerank; then  # not in the default STEPS
	for r in 2 4; do
		"$PIA" bench -d 8192 --density 0.7 --kv-budget "${BUDGET:-1024}" --text-file "$TEXT" \
			--predictor "trained:density=0.7:budget=${BUDGET:-1024}:budget-rerank=$r" -ctk f16 --reps 10 -t 2 --json \
			> figures/bench-budget-8192-text-rerank$r.json
		"$PIA" show figures/bench-budget-8192-text-rerank$r.json
	done
	"$PIA" score --text-file "$TEXT" -c 8192 --steps 64 --windows 4 -t 2 --json \
		--predictor all:budget=1024:budget-rerank=2 --predictor all:budget=1024:budget-rerank=4 \
		--predictor all:budget=512:budget-rerank=4 --predictor trained:density=0.7:budget=1024:budget-rerank=4 \
		> figures/score-budget-rerank-8192.json
	"$PIA" show figures/score-budget-rerank-8192.json
	# the same windows without re-ranking, this predictor file (the quality step's figure may be of an earlier one)
	"$PIA" score --text-file "$TEXT" -c 8192 --steps 64 --windows 4 -t 2 --json \
		--predictor all:budget=1024 --predictor trained:density=0.7 --predictor trained:density=0.7:budget=1024 \
		> figures/score-budget-rerank-8192-base.json
	"$PIA" show figures/score-budget-rerank-8192-base.json
	# RULER at 4096 with 512 cells re-ranked from 4x (the ruler step's samples), merged into its figure
	[ -f vendor/ruler-4096-10.json ] || ruler_samples
	"$PIA" eval --samples-in vendor/ruler-4096-10.json -t 2 --json \
		--predictor all:budget=512:budget-rerank=4 > figures/ruler-smollm2-4096-budget-rerank.json
	"$PIA" eval --rescore figures/ruler-smollm2-4096-budget.json --rescore figures/ruler-smollm2-4096-budget-rerank.json \
		--json > figures/ruler-smollm2-4096-budget.json.new && mv figures/ruler-smollm2-4096-budget.json.new figures/ruler-smollm2-4096-budget.json
	"$PIA" show figures/ruler-smollm2-4096-budget.json
	"$BIN/python" scripts/kv-budget-settings.py --rerank
fi
