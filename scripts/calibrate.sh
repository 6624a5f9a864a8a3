#!/usr/bin/env bash
# The prepared predictors with and without calibration on the prompt (trained:...:calibrate=N),
# on held-out halves of several kinds of text after 4096 tokens, 6 windows x 128 steps (the
# windows of scripts/domains.sh's matrix, so the oracle rows there compare): SmolLM2-135M and
# Qwen2.5-Coder-0.5B, density 0.7 and 0.5.
#   figures/domains/calibrate-<model>-<kind>.json; ~45 min on 2 cores. Then the same with the fill's
#   constant term calibrated too (:calibrate-fill): figures/domains/calibrate-fill-<model>-<kind>.json.
# Needs the texts of scripts/domains.sh (STEPS=texts) and each model's `prepare`d predictor.
# MODELS="smollm2 qwen" KINDS="essays wiki code" (docs, chat: kinds of the training mix, held-out halves) N=128 WINDOWS=6 THREADS=2 scripts/calibrate.sh
# WIKI16=1 scripts/calibrate.sh: only SmolLM2's prepared predictor at 0.7, with and without
# calibrate=N, on the 16 windows x 128 steps after 4096 tokens of held-out WikiText that
# figures/score-long-pinned.json used (the WikiText-only predictor's +2.0% / KL 0.042 there):
# figures/domains/wiki16-prepared.json, about 12 min
set -euo pipefail
cd "$(dirname "$0")/.."
PIA=${PIA:-.venv/bin/powerinfer-attn}
C=vendor/corpus F=figures/domains N=${N:-128} T=${THREADS:-2} WINDOWS=${WINDOWS:-6}
mkdir -p "$F"
if [ -n "${WIKI16:-}" ]; then
	"$PIA" score --text-file "${TEXT:-../shared/data/wikitext-2-raw/wiki.test.raw}" --prefix 4096 --windows 16 -t "$T" --json \
		--predictor trained:density=0.7 --predictor "trained:density=0.7:calibrate=$N" > "$F/wiki16-prepared.json.tmp"
	mv "$F/wiki16-prepared.json.tmp" "$F/wiki16-prepared.json"
	"$PIA" show "$F/wiki16-prepared.json"
	exit 0
fi
for m in ${MODELS:-qwen smollm2}; do
	case $m in
		smollm2) M=() ORACLE=(--predictor "oracle:0.8:fill-from=$HOME/.cache/powerinfer-attn/predictors/SmolLM2-135M-Instruct.Q4_1.gguf") ;;
		qwen) M=(-m qwen2.5-coder-0.5b) ORACLE=(--predictor "oracle:0.8:fill-from=$HOME/.cache/powerinfer-attn/predictors/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf") ;;
		*) echo "unknown model $m (smollm2, qwen)" >&2; exit 1 ;;
	esac
	for k in ${KINDS:-essays wiki code}; do
		out=$F/calibrate-$m-$k.json
		[ -f "$out" ] && continue
		# the oracle is already in the Qwen essays figure of results-cpu (qwen-essays-4096-budget-ridge.json)
		# (and SmolLM2's essays, wiki and code in figures/domains/KIND.pred-prepared.json)
		o=("${ORACLE[@]}"); [ "$m/$k" = qwen/essays ] && o=(); [ -f "$F/$k.pred-prepared.json" ] && [ "$m" = smollm2 ] && o=()
		"$PIA" score "${M[@]}" --text-file "$C/$k.txt" --prefix 4096 --steps 128 --windows "$WINDOWS" -t "$T" --json \
			--predictor trained:density=0.7 --predictor "trained:density=0.7:calibrate=$N" \
			--predictor trained:density=0.5 --predictor "trained:density=0.5:calibrate=$N" "${o[@]}" > "$out.tmp"
		mv "$out.tmp" "$out"
		"$PIA" show "$out"
	done
done
# the fill's constant term moved too (:calibrate-fill), density 0.7 and 0.5: calibrate-fill-<model>-<kind>.json
for m in ${MODELS:-qwen smollm2}; do
	case $m in smollm2) M=() ;; qwen) M=(-m qwen2.5-coder-0.5b) ;; esac
	for k in ${KINDS:-essays wiki code}; do
		out=$F/calibrate-fill-$m-$k.json
		[ -f "$out" ] && continue
		"$PIA" score "${M[@]}" --text-file "$C/$k.txt" --prefix 4096 --steps 128 --windows "$WINDOWS" -t "$T" --json \
			--predictor "trained:density=0.7:calibrate=$N:calibrate-fill" --predictor "trained:density=0.5:calibrate=$N:calibrate-fill" \
			> "$out.tmp"
		mv "$out.tmp" "$out"
		"$PIA" show "$out"
	done
done
"${PIA%/powerinfer-attn}/python" scripts/calibrate-table.py | tee "$F/calibrate-table.md"
