#!/usr/bin/env bash
# Serving end to end: a dense and a sparse `powerinfer-attn serve` on this machine, 4096-token
# prompts of held-out WikiText and 128 streamed tokens per request (about 5 min on 2 cores).
# Needs scripts/long-context.sh's predictor (vendor/predictor/pred-long.gguf).
source "$(dirname "$0")/common.sh"
"$PIA" bench-serve --predictor "trained:$D/pred-long.gguf:density=0.7" --text-file "$TEXT" -t 2 --json \
	> figures/bench-serve.json
"$PIA" show figures/bench-serve.json
