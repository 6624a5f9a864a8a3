#!/usr/bin/env bash
# Quality and speed at long context, where sparse decode pays: a predictor trained on long
# sequences (collect --seq-len 8192), scored after 4096 and 8192 tokens of held-out WikiText
# against the short-context predictor and the oracle; the density that density=D gives on three
# texts at 128 and 8192 tokens; pass-key retrieval up to 8192; decode speed at 8192 on real text.
# The long-context predictor is also written with its 6 strongest retrieval heads pinned (always
# kept; `retrieval-heads`), the file the retrieval and speed runs use.
# Needs scripts/figures.sh's predictor (vendor/predictor/pred.gguf). About 2.5 h on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
TEXT=${TEXT:-../shared/data/wikitext-2-raw/wiki.test.raw}
PIA="$BIN/powerinfer-attn"
D=vendor/predictor
PRED=$D/pred.gguf PRED_LONG=$D/pred-long.gguf PRED_PIN=$D/pred-long-pinned.gguf CODE=$D/stdlib.txt
WINDOWS=${WINDOWS:-16}

mkdir -p figures "$D"
[ -f "$PRED" ] || { echo "no $PRED: run scripts/figures.sh first" >&2; exit 1; }
if [ "${SKIP_COLLECT:-}" != 1 ]; then  # SKIP_COLLECT=1: reuse data-long and pred-long.gguf
	"$PIA" collect --text-file "$TEXT" --out "$D/data-long" --seq-len 8192 -t 2
	"$PIA" train-predictor "$D/data-long" --out "$PRED_LONG"
fi
"$PIA" stdlib-text "$CODE"
# the heads that copy from far back (induction score on a repeated random run, 2048 and 6144
# tokens back), the top 6 pinned in a copy of the long-context predictor
"$PIA" retrieval-heads --pin "$PRED_LONG" --top 6 --out "$PRED_PIN" -t 2 --json > figures/retrieval-heads.json

# quality after 4096 and 8192 tokens, WINDOWS windows x 128 steps of the held-out half
"$PIA" score --text-file "$TEXT" --prefix 4096,8192 --windows "$WINDOWS" -t 2 --json --plot figures/pareto-long.png \
	--predictor oracle:0.8:fill-from=$PRED_LONG \
	--predictor trained:$PRED:density=0.7 \
	--predictor trained:$PRED_LONG:density=0.6 --predictor trained:$PRED_LONG:density=0.7 \
	--predictor trained:$PRED_LONG:density=0.7:gain=0 --predictor trained:$PRED_LONG:density=0.8 > figures/score-long.json
# the same windows with the retrieval heads pinned, beside the oracle at the same density
"$PIA" score --text-file "$TEXT" --prefix 4096,8192 --windows "$WINDOWS" -t 2 --json \
	--predictor oracle:0.8:fill-from=$PRED_LONG --predictor trained:$PRED_PIN:density=0.7 > figures/score-long-pinned.json
# the fills at long context: linear (the file's own), zero and window fill (4 sinks + 60 recent
# cells), each at density 0.5 and 0.7; WINDOWS_FILLS windows x 128 steps
FILLS=()
for d in 0.5 0.7; do
	FILLS+=(--predictor trained:$PRED_LONG:density=$d --predictor trained:$PRED_LONG:density=$d:fill=zero
		--predictor trained:$PRED_LONG:density=$d:fill=window:4+60)
done
"$PIA" score --text-file "$TEXT" --prefix 4096,8192 --windows "${WINDOWS_FILLS:-4}" -t 2 --json \
	--plot figures/pareto-long-fills.png "${FILLS[@]}" > figures/score-long-fills.json
# the density asked for against the density kept: WikiText and standard-library source at 128 and 8192
"$PIA" score --text-file "$TEXT" --prefix 128 --windows "$WINDOWS" -t 2 --json \
	--predictor trained:$PRED:density=0.7 --predictor trained:$PRED_LONG:density=0.7 \
	--predictor trained:$PRED_LONG:density=0.7:gain=0 --predictor trained:$PRED_PIN:density=0.7 > figures/score-long-128.json
"$PIA" score --text-file "$CODE" --prefix 128,8192 --windows 4 --steps 64 -t 2 --json \
	--predictor trained:$PRED_LONG:density=0.7 --predictor trained:$PRED_LONG:density=0.7:gain=0 \
	--predictor trained:$PRED_PIN:density=0.7 > figures/score-code.json
# retrieval: dense against the long-context predictor without and with its retrieval heads pinned
"$PIA" needle --lengths 1024,2048,4096,8192 --trials 10 --haystack filler,text --text-file "$TEXT" -t 2 --json \
	--predictor trained:$PRED_LONG:density=0.7 --predictor trained:$PRED_PIN:density=0.7 > figures/needle.json
# speed at 8192 with the predictor's cost, on real text and on bench's filler; the window fill's
# cost at fixed densities and with the trained predictor
"$PIA" bench -d 128,8192 --density 1,0.7 --predictor trained:$PRED_PIN:density=0.7 --text-file "$TEXT" \
	--reps 10 -t 2 --no-profile --json > figures/bench-trained-8192-text.json
# flash attention on both sides: the grouped decode kernel with a head mask against stock's
"$PIA" bench -d 8192 --density 1,0.7 --flash-attn on -ctk f16 --text-file "$TEXT" \
	--reps 10 -t 2 --no-profile --json > figures/bench-fa-grouped-8192-text.json
"$PIA" bench -d 8192 --density 0.7,0.5 --window 4+60 --predictor trained:$PRED_LONG:density=0.7:fill=window:4+60 \
	--text-file "$TEXT" --reps 10 -t 2 --no-profile --json > figures/bench-window-8192-text.json
"$PIA" bench -d 128,8192 --density 0.7 --predictor trained:$PRED_PIN:density=0.7 \
	--reps 10 -t 2 --no-profile --json > figures/bench-trained-8192-filler.json

for f in retrieval-heads score-long score-long-pinned score-long-fills score-long-128 score-code needle bench-trained-8192-text bench-fa-grouped-8192-text bench-window-8192-text \
	bench-trained-8192-filler; do
	"$PIA" show figures/$f.json
done
