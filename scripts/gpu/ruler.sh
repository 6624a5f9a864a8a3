#!/usr/bin/env bash
# RULER on the GPU machine for SmolLM2-135M: the four subtasks at 4096 and 8192 tokens, 20 samples
# each, for dense (flash attention, the fastest stock configuration there), the prepared predictor
# at density 0.7 and 0.5, the oracle near 0.7 and sinks + window only. lm-eval is not on that
# machine and a run carries at most 64 MiB, so it goes in three steps:
#   here:  scripts/gpu/ruler.sh pack     samples (eval --samples-out), one file per task and length,
#                                        the model in two pieces and the predictor into .gpu/
#          (and scripts/gpu/pack.sh, then `run.sh build` there carrying src.tgz, wheels, model.a)
#   there: scripts/gpu/ruler.sh run      carrying .gpu/model.b, .gpu/pred.gguf, .gpu/rs.tgz:
#                                        answers in $OUT/ruler-LENGTH-TASK.json
#   here:  scripts/gpu/ruler.sh score DIR   lm-eval's scorer over DIR's answers:
#                                        figures/ruler-smollm2-gpu-LENGTH.json
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
TASKS="niah_single_2 niah_multikey_1 ruler_vt ruler_cwe"
LENGTHS="4096 8192"
NAME=SmolLM2-135M-Instruct.Q4_1.gguf

case ${1:-} in
pack)
	S=vendor/ruler-samples-4096-8192-20.json
	[ -f "$S" ] || "$BIN/powerinfer-attn" eval --lengths 4096,8192 --samples 20 --samples-out "$S"
	mkdir -p .gpu
	"$BIN/python" - "$S" <<-'E'
	import json, sys
	d = json.load(open(sys.argv[1]))
	for key in sorted({(s["length"], s["task"]) for s in d["samples"]}):
	    part = dict(d, samples=[s for s in d["samples"] if (s["length"], s["task"]) == key])
	    json.dump(part, open(".gpu/rs-%d-%s.json" % key, "w"))
	E
	(cd .gpu && tar -czf rs.tgz rs-*.json)
	m=$("$BIN/powerinfer-attn" model)
	head -c 57671680 "$m" > .gpu/model.a
	tail -c +57671681 "$m" > .gpu/model.b
	cp "$("$BIN/python" -c "from powerinfer_attn.predictors.specs import prepared_predictor_path; print(prepared_predictor_path('$m'))")" .gpu/pred.gguf
	ls -la .gpu
	;;
run)
	M=/tmp/$NAME
	[ -f "$M" ] || cat .gpu/model.a .gpu/model.b > "$M"
	tar -C .gpu -xzf .gpu/rs.tgz
	for L in $LENGTHS; do for T in $TASKS; do
		scripts/gpu/run.sh ruler "$M" ".gpu/rs-$L-$T.json" "$L-$T" \
			trained:.gpu/pred.gguf:density=0.7 trained:.gpu/pred.gguf:density=0.5 \
			oracle:0.8:fill-from=.gpu/pred.gguf none:fill=window:4+60 2>&1 | grep -v "^llama_\|^load\|^print_info" | tail -1
	done; done
	;;
score)
	dir=${2:?the folder with the answers}
	for L in $LENGTHS; do
		args=(); for T in $TASKS; do args+=(--rescore "$dir/ruler-$L-$T.json"); done
		"$BIN/powerinfer-attn" eval "${args[@]}" --json > "figures/ruler-smollm2-gpu-$L.json"
		"$BIN/powerinfer-attn" show "figures/ruler-smollm2-gpu-$L.json"
	done
	;;
*) sed -n 2,12p "$0"; exit 2 ;;
esac
