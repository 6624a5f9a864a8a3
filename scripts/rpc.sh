#!/usr/bin/env bash
# The RPC figures of docs/usage.md (Across machines): two `rpc-server`s on 127.0.0.1 (2 threads
# each), bench at 4096 tokens with the output layer and the last 19 layers on them (a loopback
# figure: the servers share this machine's cores with the client, one running at a time), then
# the bytes per token that cross the wire (scripts/rpc-wire.py starts servers of its own).
# About 3 minutes on 2 cores; run it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
P1=${P1:-50111} P2=${P2:-50112}
"$BIN/powerinfer-attn" rpc-server --port "$P1" -t 2 > /dev/null 2>&1 & s1=$!
"$BIN/powerinfer-attn" rpc-server --port "$P2" -t 2 > /dev/null 2>&1 & s2=$!
trap 'kill $s1 $s2 2>/dev/null; wait $s1 $s2 2>/dev/null || true' EXIT
sleep 3
"$BIN/powerinfer-attn" bench -d 4096 --density 0.5 --predictor trained:density=0.7 --rpc "127.0.0.1:$P1,127.0.0.1:$P2" \
	-ngl 20 -t 2 --reps 20 --json > figures/bench-rpc-loopback.json
"$BIN/powerinfer-attn" show figures/bench-rpc-loopback.json
"$BIN/python" scripts/rpc-wire.py --ctx 4096 --steps 16 --density 0.5 --predictor trained:density=0.7 \
	--json figures/rpc-wire.json > /dev/null
