#!/usr/bin/env bash
# A first UltraIF run on a laptop, no GPU: a real small model (SmolLM2-135M-Instruct served by
# llama.cpp on 127.0.0.1), pipelines/ultraif.yaml with the `local` param profile (8 of the
# data/ instructions, one augmentation round, K = 2, 256 tokens), then `ifloom stats` and the
# HTML report. The server is stopped on exit, whatever happens.
#
#   scripts/first-run.sh [RUN_DIR]        # default runs/ultraif-local
#
# The first call installs llama-cpp-python (compiles llama.cpp: ~8 min on 2 cores) and the
# model into ~/.cache/ifloom/llm-venv; later calls reuse them. The run itself takes a few
# minutes on 2 cores (about 5 measured here). IFLOOM_BIN picks the ifloom binary (default:
# `cargo run --release`); IFLOOM_LLM_PORT the server's port (default 8081).
set -euo pipefail
cd "$(dirname "$0")/.."

RUN="${1:-runs/ultraif-local}"
PORT="${IFLOOM_LLM_PORT:-8081}"
if [ -n "${IFLOOM_BIN:-}" ]; then
  ifloom() { "$IFLOOM_BIN" "$@"; }
else
  ifloom() { cargo run --quiet --release --bin ifloom -- "$@"; }
fi

echo "== model: llama.cpp + SmolLM2-135M-Instruct (installed once into ~/.cache/ifloom/llm-venv)" >&2
bash scripts/local-llm.sh install >/dev/null
URL="$(bash scripts/local-llm.sh start "$PORT")"
trap 'bash scripts/local-llm.sh stop >/dev/null 2>&1 || true' EXIT
export IFLOOM_LLM_URL="$URL"

echo "== run: pipelines/ultraif.yaml --profile local against $URL" >&2
start=$(date +%s)
ifloom run pipelines/ultraif.yaml --profile local --run-dir "$RUN"
echo "== finished in $(( $(date +%s) - start )) s" >&2

ifloom stats "$RUN"
ifloom report "$RUN" -o "$RUN/report.html"
