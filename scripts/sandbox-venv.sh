#!/usr/bin/env bash
# The Python that runs AutoIF's verifier functions: a venv with upstream's extra names (`nltk`,
# `numpy as np`) and NLTK's English Punkt tokenizer data, nothing else.
#
#   scripts/sandbox-venv.sh install   # create / repair (idempotent, ~30 s from PyPI); prints the
#                                     # interpreter's path
#   scripts/sandbox-venv.sh python    # prints the interpreter's path; fails if not installed
#
# The venv lives at $IFLOOM_SANDBOX_VENV (default ~/.cache/ifloom/sandbox-venv); pipelines name
# it `sandbox.python: sandbox-venv` (pipelines/autoif.yaml does by default), or give the path
# printed here. The sandbox lets functions read the venv's site-packages and
# $VENV/nltk_data/tokenizers/punkt_tab (and punkt), nothing else outside their scratch folder.
#
# Why these versions (upstream, QwenLM/AutoIF requirements.txt: nltk 3.8.1, numpy 1.26.3):
# - nltk 3.9.2: 3.8.1 loads Punkt from a pickle (english.pickle), which 3.9 stopped doing
#   (unpickling is code execution); 3.9.x reads the same parameters from punkt_tab. On 9,738
#   real model answers 3.8.1 and 3.9.2 give identical sentence counts (benches/ifeval_ref_setup.sh
#   measured it; 3.10.2+ differ, hence the pin).
# - numpy 1.26.4 (the last of upstream's 1.26 line; its wheels cover Python 3.9-3.12), or 2.2.6
#   on Python 3.13+ where 1.26 has no wheel. `np.mean` and friends answer the same.
#
# Where the Punkt data comes from: the llama-index-core wheel on PyPI vendors NLTK's
# punkt_tab (llama_index/core/_static/nltk_cache/tokenizers/punkt_tab); only its data files are
# extracted, llama-index is never installed. No access to NLTK's own download server is needed.
set -euo pipefail

VENV="${IFLOOM_SANDBOX_VENV:-$HOME/.cache/ifloom/sandbox-venv}"
PY="$VENV/bin/python"
BASE_PY="${PYTHON:-python3}"
NLTK_DIR="$VENV/nltk_data"
PUNKT="$NLTK_DIR/tokenizers/punkt_tab/english"
NLTK=nltk==3.9.2
PUNKT_WHEEL=llama-index-core==0.14.25
# sha256 of punkt_tab/english/*, as the wheel above ships them (checked after extraction).
PUNKT_SUMS="$(cat <<'EOF'
92a3e070f43d9b4c5534758ca40ad7343b04e7e29bfe0c2eb658a39445a4f779  ./abbrev_types.txt
8e2da1225e4dd2cc9dba261ee231ccb134859e21b46006e7f472c5ee269af0cf  ./collocations.tab
4bbcca25ed3d3f06c02402abf8419b9f033b8adc06e7b482eca4e45f81a5dc4c  ./ortho_context.tab
f3f8535483e1dba487241b764945168123bca3209a9645e59acd1225dc76edac  ./sent_starters.txt
EOF
)"

say() { echo "[sandbox-venv] $*" >&2; }

usage() {
  echo "usage: $0 install | python" >&2
  exit 2
}

numpy_pin() {
  if "$1" -c 'import sys; sys.exit(0 if sys.version_info < (3, 13) else 1)'; then
    echo numpy==1.26.4
  else
    echo numpy==2.2.6
  fi
}

# The venv answers as the sandbox needs: nltk and numpy at the pins, sent_tokenize works with
# the data under the venv's own prefix and no environment at all (the workers get none).
works() {
  [ -x "$PY" ] || return 1
  env -i "$PY" -s -B - "$NLTK" "$(numpy_pin "$PY")" <<'EOF'
import sys
from importlib import metadata
for spec in sys.argv[1:]:
    name, version = spec.split("==")
    if metadata.version(name) != version:
        sys.exit("%s is %s, want %s" % (name, metadata.version(name), version))
import nltk
import numpy as np
got = nltk.sent_tokenize("Hello Mr. Smith. How are you? Fine.")
assert got == ["Hello Mr. Smith.", "How are you?", "Fine."], got
assert float(np.mean([1, 0, 1, 1])) == 0.75
EOF
}

cmd_install() {
  if works 2>/dev/null; then
    say "already installed in $VENV"
    echo "$PY"
    return
  fi
  if [ ! -x "$PY" ]; then
    say "creating $VENV with $("$BASE_PY" --version 2>&1)"
    "$BASE_PY" -m venv "$VENV"
  fi
  local pip=("$PY" -m pip --disable-pip-version-check -q)
  local numpy
  numpy="$(numpy_pin "$PY")"
  say "installing $NLTK $numpy"
  "${pip[@]}" install "$NLTK" "$numpy"
  if [ ! -f "$PUNKT/ortho_context.tab" ]; then
    local tmp
    tmp="$(mktemp -d)"
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'" EXIT
    say "extracting punkt_tab from $PUNKT_WHEEL (data files only)"
    "${pip[@]}" download --no-deps -d "$tmp" "$PUNKT_WHEEL"
    mkdir -p "$NLTK_DIR/tokenizers"
    "$PY" - "$(ls "$tmp"/llama_index_core-*.whl)" "$NLTK_DIR/tokenizers" <<'EOF'
import os, sys, zipfile
whl, dest = sys.argv[1], sys.argv[2]
prefix = "llama_index/core/_static/nltk_cache/tokenizers/"
n = 0
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        rel = name[len(prefix):] if name.startswith(prefix) else None
        if rel and rel.startswith("punkt_tab/english/") and not name.endswith("/"):
            out = os.path.join(dest, rel)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with open(out, "wb") as f:
                f.write(z.read(name))
            n += 1
if n == 0:
    sys.exit("no punkt_tab/english files in " + whl)
EOF
  fi
  (cd "$PUNKT" && echo "$PUNKT_SUMS" | sha256sum --quiet -c -) || {
    say "punkt_tab in $PUNKT does not match the pinned checksums"
    exit 1
  }
  # The data is read, never written, by the sandbox.
  chmod -R a-w "$NLTK_DIR"
  if ! works; then
    say "the venv in $VENV does not work (see above)"
    exit 1
  fi
  say "ok: $("$PY" --version 2>&1), $NLTK, $numpy, punkt_tab in $NLTK_DIR"
  echo "$PY"
}

cmd_python() {
  if works 2>/dev/null; then
    echo "$PY"
  else
    say "not installed (or broken) in $VENV: run scripts/sandbox-venv.sh install"
    exit 1
  fi
}

case "${1:-}" in
  install) cmd_install ;;
  python) cmd_python ;;
  *) usage ;;
esac
