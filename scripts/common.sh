# Sourced by the pipelines in scripts/: run from the repository root, with the environment that
# `make setup` made (BIN) and the WikiText-2 test split (TEXT); predictor data and files go to
# vendor/predictor (git-ignored).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN=${BIN:-.venv/bin}
TEXT=${TEXT:-../shared/data/wikitext-2-raw/wiki.test.raw}
PIA="$BIN/powerinfer-attn"
D=vendor/predictor
mkdir -p figures "$D"
