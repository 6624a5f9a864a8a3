#!/usr/bin/env bash
# A predictor that holds on text it was never trained on (SmolLM2-135M): texts of five kinds,
# a predictor trained on four of them mixed (the essays, RULER's haystack, held out of training
# as the unseen kind), the WikiText-only predictor diagnosed on each kind against the oracle, and
# the matrix of perplexity change and KL (and KL over the oracle's with the same fill) after
# 4096 tokens, for both predictors at density 0.7 and 0.5, on each kind's held-out half.
#   texts:     vendor/corpus/{wiki,code,docs,chat,essays}.txt (chat: ~10 min on 2 cores, once)
#   predictor: vendor/predictor/pred-mix-pinned.gguf (collect ~15 min, train, pin 6 heads)
#   diagnose:  figures/domains/diagnose-<predictor>.{json,txt} (~3 min per kind and predictor)
#   matrix:    figures/domains/<kind>.<predictor>.json, figures/domains/matrix.txt (~5 min per cell pair)
#   budget:    figures/domains/budget-<kind>.json: the WikiText predictor with and without its per-layer
#              budgets (train-predictor --no-layer-budget on the same data) and the oracle, on BUDGET_KINDS
#   prepared:  figures/domains/<kind>.pred-prepared.json: the predictor `prepare` makes, on wiki and essays
#              (STEPS=prepared; not in the default steps), figures/domains/matrix-prepared.txt
#   ruler:     figures/ruler-smollm2-4096-mix.json: RULER at 4096 (4 subtasks x 10, the samples a 4096,8192
#              build makes) for dense and the mixed predictor at 0.7 (~40 min at THREADS=1)
# The WikiText-only predictor is scripts/ruler.sh's (made here if missing). STEPS=diagnose,matrix
# runs a part; WINDOWS (6) and KINDS narrow the matrix; THREADS (2) per command.
source "$(dirname "$0")/common.sh"
C=vendor/corpus F=figures/domains
PRED_WIKI=$D/pred-long-pinned.gguf PRED_MIX=$D/pred-mix-pinned.gguf PRED_PREP=$D/pred-prepared.gguf
KINDS=${KINDS:-wiki code docs chat essays} WINDOWS=${WINDOWS:-6} STEPS=${STEPS:-texts,train,diagnose,matrix,budget,ruler} T=${THREADS:-2}
mkdir -p "$C" "$F"
has() { [[ ",$STEPS," == *",$1,"* ]]; }

if has texts; then
	"$PIA" corpus wiki "$C/wiki.txt" --text-file "$TEXT"
	for k in code docs essays; do [ -f "$C/$k.txt" ] || "$PIA" corpus $k "$C/$k.txt"; done
	[ -f "$C/chat.txt" ] || "$PIA" corpus chat "$C/chat.txt" --conversations 60 -t $T
	# the articles of WikiText's second half, none of which any predictor trains on: collect reads
	# a text's first part, so this is the held-out WikiText that `diagnose` judges on
	"$BIN/python" - "$TEXT" "$C/wiki-heldout.txt" <<-'E'
	import sys
	from powerinfer_attn.engine.text import split_articles
	t = open(sys.argv[1]).read()
	start = next(s for s, _, _ in split_articles(t) if s >= len(t) // 2)
	open(sys.argv[2], "w").write(t[start:])
	E
fi

if has train && [ ! -f "$PRED_MIX" ]; then
	[ -f "$PRED_WIKI" ] || { echo "run scripts/ruler.sh first (it makes $PRED_WIKI)" >&2; exit 1; }
	"$PIA" corpus-mix "$C/mix.txt" wiki="$C/wiki.txt" code="$C/code.txt" docs="$C/docs.txt" chat="$C/chat.txt"
	"$PIA" collect --text-file "$C/mix.txt" --out "$D/data-mix" --seq-len 8192 -t $T
	"$PIA" train-predictor "$D/data-mix" --out "$D/pred-mix.gguf"
	"$PIA" retrieval-heads --pin "$D/pred-mix.gguf" --top 6 --out "$PRED_MIX" -t $T > /dev/null
fi

# the predictor `prepare` makes (its own mix of wiki, code, docs and chat, the fill fitted on the
# mix, 6 retrieval heads pinned: about 60 min on 2 cores), scored as a matrix row on PREP_KINDS
if has prepared; then
	[ -f "$PRED_PREP" ] || "$PIA" prepare --text-file "$TEXT" --out "$PRED_PREP" -t $T
	for k in ${PREP_KINDS:-wiki essays}; do
		"$PIA" score --text-file "$C/$k.txt" --prefix 4096 --steps 128 --windows "$WINDOWS" -t $T --json \
			--predictor trained:$PRED_PREP:density=0.7 --predictor trained:$PRED_PREP:density=0.5 \
			--predictor oracle:0.8:fill-from=$PRED_PREP --predictor oracle:0.6:fill-from=$PRED_PREP > "$F/$k.pred-prepared.json"
	done
	"$PIA" show $(for k in ${PREP_KINDS:-wiki essays}; do ls "$F/$k".*.json; done) | tee "$F/matrix-prepared.txt"
fi

if has diagnose; then
	for P in "$PRED_WIKI" "$PRED_MIX"; do
		[ -f "$P" ] || continue
		n=$(basename "$P" .gguf) dirs=()
		for k in wiki-heldout code docs chat essays; do
			d=$D/diag-$n-$k
			[ -f "$d/meta.json" ] || "$PIA" collect --text-file "$C/$k.txt" --out "$d" --tokens 8192 --seq-len 4096 \
				--no-sensitivity --fill-from "$P" -t $T > /dev/null
			dirs+=("$d")
		done
		"$PIA" diagnose "$P" "${dirs[@]}" --json > "$F/diagnose-$n.json"
		"$PIA" diagnose "$P" "${dirs[@]}" | tee "$F/diagnose-$n.txt"
	done
fi

if has matrix; then
	for k in $KINDS; do
		for P in "$PRED_WIKI" "$PRED_MIX"; do
			n=$(basename "$P" .gguf)
			"$PIA" score --text-file "$C/$k.txt" --prefix 4096 --steps 128 --windows "$WINDOWS" -t $T --json \
				--predictor trained:$P:density=0.7 --predictor trained:$P:density=0.5 \
				--predictor oracle:0.8:fill-from=$P --predictor oracle:0.6:fill-from=$P > "$F/$k.$n.json"
		done
	done
	"$PIA" show $(for k in $KINDS; do ls "$F/$k".*.json; done) | tee "$F/matrix.txt"
fi

if has budget; then
	[ -f "$D/pred-long-nobudget.gguf" ] || "$PIA" train-predictor "$D/data-long" --out "$D/pred-long-nobudget.gguf" --no-layer-budget
	for k in ${BUDGET_KINDS:-essays}; do
		"$PIA" score --text-file "$C/$k.txt" --prefix 4096 --steps 128 --windows "$WINDOWS" -t $T --json \
			--predictor trained:$D/pred-long.gguf:density=0.7 --predictor trained:$D/pred-long-nobudget.gguf:density=0.7 \
			--predictor oracle:0.8:fill-from=$D/pred-long.gguf > "$F/budget-$k.json"
		"$PIA" show "$F/budget-$k.json"
	done
fi

if has ruler; then
	S=$D/ruler-samples-4096-8192.json
	[ -f "$S" ] || "$PIA" eval --lengths 4096,8192 --samples 10 --samples-out "$S"
	"$BIN/python" - "$S" "$D/ruler-samples-4096.json" <<-'E'
	import json, sys
	d = json.load(open(sys.argv[1]))
	d["samples"] = [s for s in d["samples"] if s["length"] == 4096]
	json.dump(d, open(sys.argv[2], "w"))
	E
	"$PIA" eval --samples-in "$D/ruler-samples-4096.json" -t $T --json \
		--predictor trained:$PRED_MIX:density=0.7 > figures/ruler-smollm2-4096-mix.json
	"$PIA" show figures/ruler-smollm2-4096-mix.json
fi
