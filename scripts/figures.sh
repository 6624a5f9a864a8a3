#!/usr/bin/env bash
# The figures of docs/results-cpu.md: quality on WikiText-2, the trained predictor's Pareto table, and decode
# speed at 2 threads (about 75 min on 2 cores). `powerinfer-attn show figures/FILE.json` prints
# a result's tables again. The predictor data and files go to vendor/predictor (git-ignored).
# Run through `make figures` (which sets up the environment first), or directly once it is set up.
source "$(dirname "$0")/common.sh"
PRED=$D/pred.gguf PRED_MEAN=$D/pred-mean.gguf PRED_ZERO=$D/pred-zero.gguf PRED_SHARE=$D/pred-share.gguf

"$PIA" calibrate --text-file "$TEXT" -t 2
"$PIA" collect --text-file "$TEXT" --out "$D/data" -t 2
"$PIA" train-predictor "$D/data" --out "$PRED"
"$PIA" train-predictor "$D/data" --fill mean --out "$PRED_MEAN"
"$PIA" train-predictor "$D/data" --fill zero --out "$PRED_ZERO"
"$PIA" train-predictor "$D/data" --label share --out "$PRED_SHARE"

"$PIA" score --text-file "$TEXT" --windows 8 -t 2 --json --plot figures/pareto.png \
	--predictor all --predictor oracle:0.8 --predictor oracle:0.85 --predictor oracle:0.9 \
	--predictor oracle:0.8:fill-from=$PRED --predictor oracle:0.85:fill-from=$PRED \
	--predictor oracle:0.9:fill-from=$PRED --predictor oracle:0.85:fill-from=$PRED_MEAN \
	--predictor static:7 --predictor random:7 \
	--predictor trained:$PRED:density=0.6 --predictor trained:$PRED:density=0.65 \
	--predictor trained:$PRED:density=0.7 --predictor trained:$PRED:density=0.75 \
	--predictor trained:$PRED:density=0.8 \
	--predictor trained:$PRED_MEAN:density=0.7 --predictor trained:$PRED_ZERO:density=0.7 \
	--predictor trained:$PRED_SHARE:density=0.7 > figures/score.json
"$PIA" score --text-file "$TEXT" --windows 32 -t 2 --json \
	--predictor oracle:0.8:fill-from=$PRED --predictor trained:$PRED:density=0.65 \
	--predictor trained:$PRED:density=0.7 --predictor trained:$PRED_SHARE:density=0.7 \
	> figures/score-32windows.json
"$PIA" bench -d 1024,4096,8192 --density 1,0.5,0.25 --reps 20 -t 2 \
	--json --plot figures/bench-2threads.png > figures/bench-2threads.json
"$PIA" bench -d 8192 --density 0.7 --predictor trained:$PRED --reps 10 -t 2 \
	--no-profile --json > figures/bench-trained-8192.json

for f in score score-32windows bench-2threads bench-trained-8192; do
	"$PIA" show figures/$f.json
done
