#!/usr/bin/env bash
# The second model, Qwen2.5-Coder-0.5B-Instruct (qwen2, Q4_K_M, 14 query heads in 2 KV groups):
# a predictor trained on code (the standard-library modules in the first 45% of stdlib-text's
# text; the summary lists them), its quality on the held-out modules and on WikiText, and decode
# speed at 4096, 8192 and 16384 tokens with per-head and with KV-group masks.
# QUALITY_ONLY=1 stops after the quality tables; SKIP_COLLECT=1 reuses the collected data.
# About 2 h on 2 cores.
source "$(dirname "$0")/common.sh"
M=qwen2.5-coder-0.5b
CODE=$D/stdlib.txt
Q=$D/qwen
mkdir -p "$Q"

"$PIA" model "$M" > /dev/null
"$PIA" stdlib-text "$CODE"
if [ "${SKIP_COLLECT:-}" != 1 ]; then
	"$PIA" collect -m "$M" --text-file "$CODE" --out "$Q/data" -t 2
	"$PIA" train-predictor "$Q/data" --out "$Q/pred.gguf" --fill linear
	"$PIA" calibrate -m "$M" --text-file "$CODE" -t 2 > /dev/null
fi

# quality: 16 windows x 128 steps of the held-out modules after 1024 tokens, and WikiText
PREDS=(--predictor random:10 --predictor static:10 --predictor oracle:0.8:fill=$Q/pred.gguf
	--predictor trained:$Q/pred.gguf:density=0.6 --predictor trained:$Q/pred.gguf:density=0.7
	--predictor trained:$Q/pred.gguf:density=0.7:fill=zero --predictor trained:$Q/pred.gguf:density=0.7:fill=window:4+60)
"$PIA" score -m "$M" --text-file "$CODE" --prefix 1024 --windows 16 -t 2 --json --plot figures/qwen-pareto.png \
	"${PREDS[@]}" > figures/qwen-score-code.json
"$PIA" score -m "$M" --text-file "$TEXT" --windows 8 -t 2 --json \
	--predictor trained:$Q/pred.gguf:density=0.7 --predictor oracle:0.8:fill=$Q/pred.gguf > figures/qwen-score-wiki.json
"$PIA" show figures/qwen-score-code.json
"$PIA" show figures/qwen-score-wiki.json
[ "${QUALITY_ONLY:-}" = 1 ] && exit 0

# speed: per-head masks (with the Amdahl limit from the profile), then whole KV groups
"$PIA" bench -m "$M" --ctx 4096,8192,16384 --density 1,0.5,0.25 --reps 10 -t 2 --json > figures/qwen-bench.json
"$PIA" bench -m "$M" --ctx 16384 --density 0.5 --gqa --reps 10 -t 2 --json > figures/qwen-bench-gqa.json
"$PIA" show figures/qwen-bench.json
"$PIA" show figures/qwen-bench-gqa.json
