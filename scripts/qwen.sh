#!/usr/bin/env bash
# The second model, Qwen2.5-Coder-0.5B-Instruct (qwen2, Q4_K_M, 14 query heads in 2 KV groups):
# a predictor trained on code (the standard-library modules in the first 45% of stdlib-text's
# text; its summary lists them), its quality on the held-out modules and on WikiText, and decode
# speed at 16384 tokens with per-head masks (Amdahl limit from the profile) and with KV-group masks.
# QUALITY_ONLY=1 stops after the quality tables; SKIP_COLLECT=1 reuses the collected data;
# RESUME=1 goes on with a collect that was stopped.
# About 1.5 h on 2 cores.
source "$(dirname "$0")/common.sh"
M=qwen2.5-coder-0.5b
CODE=$D/stdlib.txt
Q=$D/qwen
mkdir -p "$Q"

"$PIA" model "$M" > /dev/null
"$PIA" stdlib-text "$CODE"
if [ "${SKIP_COLLECT:-}" != 1 ]; then
	"$PIA" collect -m "$M" --text-file "$CODE" --out "$Q/data" -t 2 ${RESUME:+--resume}
	"$PIA" train-predictor "$Q/data" --out "$Q/pred.gguf" --fill linear
	"$PIA" calibrate -m "$M" --text-file "$CODE" -t 2 > /dev/null
fi

# quality: 8 windows x 128 steps of the held-out modules after 1024 tokens, and WikiText
"$PIA" score -m "$M" --text-file "$CODE" --prefix 1024 --windows 8 -t 2 --json --plot figures/qwen-pareto.png \
	--predictor random:10 --predictor static:10 --predictor oracle:0.8:fill-from=$Q/pred.gguf \
	--predictor trained:$Q/pred.gguf:density=0.7 --predictor trained:$Q/pred.gguf:density=0.7:fill=zero \
	> figures/qwen-score-code.json
"$PIA" score -m "$M" --text-file "$TEXT" --windows 4 -t 2 --json \
	--predictor trained:$Q/pred.gguf:density=0.7 > figures/qwen-score-wiki.json
"$PIA" show figures/qwen-score-code.json
"$PIA" show figures/qwen-score-wiki.json
[ "${QUALITY_ONLY:-}" = 1 ] && exit 0

# speed at 16384: per-head masks (with the Amdahl limit), then whole KV groups
"$PIA" bench -m "$M" -d 16384 --density 1,0.5,0.25 --reps 10 -t 2 --json > figures/qwen-bench.json
"$PIA" bench -m "$M" -d 16384 --density 0.5 --gqa --reps 10 -t 2 --no-profile --json > figures/qwen-bench-gqa.json
"$PIA" show figures/qwen-bench.json
"$PIA" show figures/qwen-bench-gqa.json
