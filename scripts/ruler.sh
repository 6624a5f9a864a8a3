#!/usr/bin/env bash
# RULER (lm-evaluation-harness's long-context suite) for SmolLM2-135M, offline: four subtasks at
# 4096 and 8192 tokens, SAMPLES per task and length, for dense, the long-context predictor with
# its retrieval heads pinned at density 0.7 and 0.5, the oracle with the same linear fill near
# 0.7 (oracle:0.8), and the sinks+window-only baseline (every head over 4 sinks + 60 recent cells,
# StreamingLLM's point); then one subtask through the server (lm-eval's own client) against the
# engine on the same samples. The predictor comes from scripts/long-context.sh's first steps
# (made here if missing: collect over 8192-token sequences, train, pin 6 retrieval heads).
# Each sample is one dense prefill shared by every predictor (--via engine). On 2 cores a sample
# costs about 40 s at 4096 and 100 s at 8192 for the five decoders: SAMPLES=20 is about 3 h;
# LENGTHS=4096 SAMPLES=10 about 30 min. TAG names the output (figures/ruler-TAG.json); the server-and-engine
# pair goes to figures/ruler-smollm2-via-{server,engine}.json whatever TAG is.
source "$(dirname "$0")/common.sh"
PRED_LONG=$D/pred-long.gguf PRED_PIN=$D/pred-long-pinned.gguf
SAMPLES=${SAMPLES:-20} LENGTHS=${LENGTHS:-4096,8192} TAG=${TAG:-smollm2}
TASKS=${TASKS:-niah_single_2,niah_multikey_1,ruler_vt,ruler_cwe}

if [ ! -f "$PRED_PIN" ]; then
	[ -f "$PRED_LONG" ] || {
		"$PIA" collect --text-file "$TEXT" --out "$D/data-long" --seq-len 8192 -t 2
		"$PIA" train-predictor "$D/data-long" --out "$PRED_LONG"
	}
	"$PIA" retrieval-heads --pin "$PRED_LONG" --top 6 --out "$PRED_PIN" -t 2 > /dev/null
fi

"$PIA" eval --tasks "$TASKS" --lengths "$LENGTHS" --samples "$SAMPLES" -t 2 --json \
	--predictor trained:$PRED_PIN:density=0.7 --predictor trained:$PRED_PIN:density=0.5 \
	--predictor oracle:0.8:fill-from=$PRED_PIN \
	--predictor none:fill=window:4+60 > figures/ruler-$TAG.json
"$PIA" show figures/ruler-$TAG.json

# the peer's client end to end: the same samples through `serve` and lm-eval's local-completions
# (VIA=0 skips it)
[ "${VIA:-1}" = 1 ] && for via in server engine; do
	"$PIA" eval --tasks niah_single_2 --lengths 4096 --samples "${SERVER_SAMPLES:-10}" -t 2 --json --via $via \
		--predictor trained:$PRED_PIN:density=0.7 > figures/ruler-smollm2-via-$via.json
	"$PIA" show figures/ruler-smollm2-via-$via.json
done
