#!/usr/bin/env python3
"""Real model answers for the reference-agreement fixtures (issue 33, item 5).

    python3 benches/reference_answers.py ifeval   --url URL --model M --n 300 > ifeval_answers.jsonl
    python3 benches/reference_answers.py followbench --url URL --model M > followbench_answers.jsonl

Standard library only. Asks an OpenAI-compatible server (benches/reference_fixtures.sh starts
llama.cpp's server with SmolLM2-135M-Instruct, scripts/local-llm.sh) one prompt at a time,
the prompt as the only user message, temperature 0, at most 256 tokens (IFEval) or 128
(FollowBench):
  * ifeval: N of the 541 prompts of ../shared/data/ifeval/input_data.jsonl, evenly spread
    over the keys (index round(i * 541 / N)), all 25 instruction types among them; output
    rows {key, prompt, instruction_id_list, kwargs, response} (benches/ifeval_reference.py's
    input);
  * followbench: the 150 instructions of ../shared/data/followbench/data that the reference
    checks by rule other than the example type (the 13 rule-based sources; format 22 and 30;
    levels 1-5);
    output rows {instruction, response} (benches/followbench_reference.py's input).
A request that fails (e.g. a prompt longer than the server's context) gives response null.
"""

import argparse
import json
import os
import sys
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data")
RULE_SOURCES = ["E2E", "WIKIEVENTS", "CONLL2003", "text_editing", "cnn_dailymail", "xsum",
                "samsum", "gigaword", "arxiv", "BBH_logical", "BBH_time", "self_made_space",
                "gsm_8k"]
TYPES = ["content", "situation", "style", "format", "example", "mixed"]


def ask(url, model, prompt, max_tokens):
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}],
                       "temperature": 0.0, "max_tokens": max_tokens}).encode()
    req = urllib.request.Request(url.rstrip("/") + "/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.load(r)["choices"][0]["message"]["content"]
    except Exception as e:  # noqa: BLE001 - a failed request is recorded as no answer
        print(f"request failed: {e}", file=sys.stderr)
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["ifeval", "followbench"])
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="default: 256 for ifeval, 128 for followbench (its rules check short answers)")
    args = ap.parse_args()
    if args.max_tokens is None:
        args.max_tokens = 256 if args.what == "ifeval" else 128
    if args.what == "ifeval":
        with open(os.path.join(DATA, "ifeval", "input_data.jsonl"), encoding="utf-8") as f:
            rows = sorted((json.loads(l) for l in f if l.strip()), key=lambda r: r["key"])
        picked = sorted({round(i * len(rows) / args.n) for i in range(args.n)})
        for k, i in enumerate(picked):
            r = rows[i]
            r["response"] = ask(args.url, args.model, r["prompt"], args.max_tokens)
            print(json.dumps(r, ensure_ascii=False), flush=True)
            print(f"{k + 1}/{len(picked)}", file=sys.stderr)
    else:
        n = 0
        for ty in TYPES:
            with open(os.path.join(DATA, "followbench", "data", f"{ty}_constraints.json"),
                      encoding="utf-8") as f:
                data = json.load(f)
            for d in data:
                if d["level"] == 0:
                    continue
                # The example type's 200 answer templates are left out: their check is a
                # template match, and the `target` set of the fixture covers them.
                if ty == "example" or not (d["source"] in RULE_SOURCES
                        or (d["category"] == "format" and d["example_id"] in [22, 30])):
                    continue
                resp = ask(args.url, args.model, d["instruction"], args.max_tokens)
                print(json.dumps({"instruction": d["instruction"], "response": resp},
                                 ensure_ascii=False), flush=True)
                n += 1
                print(f"{n}/150", file=sys.stderr)


if __name__ == "__main__":
    main()
