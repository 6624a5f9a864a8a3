#!/usr/bin/env bash
# RULER on the GPU machine: subtasks at given lengths for dense (flash attention, every layer on
# the GPU: the fastest stock configuration there) and the model's prepared predictor. lm-eval is
# not on that machine and a run carries at most 64 MiB, so it goes in steps:
#   here:  scripts/gpu/ruler.sh pack     samples (eval --samples-out), one file per task and length,
#                                        the model in 56 MiB pieces (.gpu/model.00, .01, ...) and
#                                        the predictor into .gpu/; then scripts/gpu/pack.sh
#   there: `run.sh build` carrying src.tgz, wheels and model.00; one run per further piece
#          carrying it (the pieces stay on the machine while it is held); then
#          scripts/gpu/ruler.sh run      carrying .gpu/pred.gguf, .gpu/rs.tgz:
#                                        answers in $OUT/ruler-LENGTH-TASK.json
#   here:  scripts/gpu/ruler.sh score DIR   lm-eval's scorer over DIR's answers, merged into
#                                        figures/ruler-$FIG-gpu-LENGTH.json when it exists
# (the oracle at 0.5 of SmolLM2's table came from a later run: PREDS=oracle:0.6:fill-from=.gpu/pred.gguf)
# The defaults are SmolLM2-135M's table (4 subtasks, 4096 and 8192, 20 samples, the prepared
# predictor at 0.7 and 0.5, the oracle near 0.7, sinks + window only). Qwen2.5-Coder-0.5B's:
#   MODEL=qwen2.5-coder-0.5b FIG=qwen TASKS="niah_single_2 niah_multikey_1" LENGTHS="4096 16384" \
#   PREDS="trained:.gpu/pred.gguf:density=0.7 trained:.gpu/pred.gguf:density=0.5" scripts/gpu/ruler.sh pack|run|score
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
MODEL=${MODEL:-smollm2-135m}
FIG=${FIG:-smollm2}
TASKS=${TASKS:-niah_single_2 niah_multikey_1 ruler_vt ruler_cwe}
LENGTHS=${LENGTHS:-4096 8192}
SAMPLES=${SAMPLES:-20}
PREDS=${PREDS:-trained:.gpu/pred.gguf:density=0.7 trained:.gpu/pred.gguf:density=0.5 oracle:0.8:fill-from=.gpu/pred.gguf none:fill=window:4+60}
PIECE=$((56 * 1024 * 1024))

case ${1:-} in
pack)
	m=$("$BIN/powerinfer-attn" model "$MODEL")
	S=vendor/ruler-samples-$FIG-${LENGTHS// /-}-$SAMPLES.json
	[ "$FIG" != smollm2 ] || S=vendor/ruler-samples-4096-8192-20.json  # the committed table's samples
	[ -f "$S" ] || "$BIN/powerinfer-attn" eval -m "$m" --tasks "${TASKS// /,}" --lengths "${LENGTHS// /,}" \
		--samples "$SAMPLES" --samples-out "$S"
	mkdir -p .gpu
	rm -f .gpu/rs-*.json .gpu/model.*
	"$BIN/python" - "$S" <<-'E'
	import json, sys
	d = json.load(open(sys.argv[1]))
	for key in sorted({(s["length"], s["task"]) for s in d["samples"]}):
	    part = dict(d, samples=[s for s in d["samples"] if (s["length"], s["task"]) == key])
	    json.dump(part, open(".gpu/rs-%d-%s.json" % key, "w"))
	E
	(cd .gpu && tar -czf rs.tgz rs-*.json)
	split -b $PIECE -d -a 2 "$m" .gpu/model.
	basename "$m" > .gpu/model.name
	cp "$("$BIN/python" -c "from powerinfer_attn.predictors.specs import prepared_predictor_path; print(prepared_predictor_path('$m'))")" .gpu/pred.gguf
	ls -la .gpu
	;;
run)
	M=/tmp/$(cat .gpu/model.name)
	[ -f "$M" ] || cat .gpu/model.[0-9][0-9] > "$M"
	tar -C .gpu -xzf .gpu/rs.tgz
	for L in $LENGTHS; do for T in $TASKS; do
		scripts/gpu/run.sh ruler "$M" ".gpu/rs-$L-$T.json" "$L-$T" $PREDS 2>&1 | grep -v "^llama_\|^load\|^print_info" | tail -1
	done; done
	;;
score)
	dir=${2:?the folder with the answers}
	for L in $LENGTHS; do
		# a figure already there is merged with the new answers (other predictors, the same samples)
		f=figures/ruler-$FIG-gpu-$L.json args=()
		[ ! -f "$f" ] || args+=(--rescore "$f")
		for T in $TASKS; do args+=(--rescore "$dir/ruler-$L-$T.json"); done
		"$BIN/powerinfer-attn" eval "${args[@]}" --json > "$f.new" && mv "$f.new" "$f"
		"$BIN/powerinfer-attn" show "$f"
	done
	;;
*) sed -n 2,20p "$0"; exit 2 ;;
esac
