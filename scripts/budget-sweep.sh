#!/usr/bin/env bash
# How strongly per-layer sensitivity should shape the budgets: predictors trained with offsets
# A*log(sensitivity) for several A (defaults otherwise: linear fill, level label), scored at
# density 0.7 on windows of the *training* articles (the held-out half is not looked at to
# choose A). Needs the data `scripts/figures.sh` collects (vendor/predictor/data).
source "$(dirname "$0")/common.sh"
BUDGETS=${BUDGETS:-0 0.5 1 2}

preds=()
for a in $BUDGETS; do
	"$PIA" train-predictor "$D/data" --layer-budget "$a" --out "$D/pred-budget-$a.gguf"
	preds+=(--predictor "trained:$D/pred-budget-$a.gguf:density=0.7")
done
"$PIA" score --text-file "$TEXT" --training-articles --windows 8 -t 2 --json \
	"${preds[@]}" --predictor "oracle:0.8:fill-from=$D/pred.gguf" > figures/budget-sweep.json
"$PIA" show figures/budget-sweep.json
