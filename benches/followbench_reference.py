#!/usr/bin/env python3
"""FollowBench rule verdicts made by the reference's own code (issue 33, item 5).

    python benches/followbench_reference.py --upstream FOLLOWBENCH_CHECKOUT/code \\
        --data ../shared/data/followbench/data --responses SET.jsonl [--set NAME] > OUT.jsonl

Runs YJiangcm/FollowBench `code/rule_based_evaluation.py` unchanged (imported from the
checkout given by --upstream; nothing of it is copied here) on every instruction the
reference checks by rule, the 350 of the English data:
  * the five non-example types (`rule_evaluation`'s loop): level > 0 and a rule-based
    source -> rule_evaluation_<source>(generation, target, level); level > 0, category
    format and example_id 22 or 30 -> rule_evaluation_format(generation, example_id, level);
  * the example type (`evaluate_example_constraint`): check_match(target without
    "{instruction}\\n", generation).
The per-row calls are the ones those loops make; as a check that this driver walks the rows
as the reference does, the verdicts are summed per level and compared with what the
reference's own aggregate functions (`rule_evaluation`, `evaluate_example_constraint`)
return on the same answers written as its api_output files (exit 1 on a difference).

--responses: JSONL with `instruction` (the data's instruction text) and `response`
(null: no answer; the row is skipped, the reference cannot run on it). Output, one line per
rule row in data order: {"set", "constraint_type", "example_id", "level", "source",
"response", "verdict"} (the instruction is the data's row of that type, example_id and
level) with verdict true/false (the reference's True/False or 1/0).

Environment: python 3.11 with matplotlib (imported by the module, unused by the rules):
benches/followbench_ref_setup.sh.
"""

import argparse
import json
import os
import sys
import tempfile

TYPES = ["content", "situation", "style", "format", "example", "mixed"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--upstream", required=True, help="FollowBench checkout's code/ folder")
    ap.add_argument("--data", required=True, help="folder of the six *_constraints.json")
    ap.add_argument("--responses", required=True)
    ap.add_argument("--set", default="set")
    args = ap.parse_args()

    sys.path.insert(0, os.path.abspath(args.upstream))
    import matplotlib

    matplotlib.use("Agg")
    import rule_based_evaluation as rbe  # the reference, unchanged

    responses = {}
    with open(args.responses, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                responses[r["instruction"]] = r["response"]

    rule_sources = ["E2E", "WIKIEVENTS", "CONLL2003", "text_editing", "cnn_dailymail", "xsum",
                    "samsum", "gigaword", "arxiv", "BBH_logical", "BBH_time",
                    "self_made_space", "gsm_8k"]
    out = []
    sums = {}
    for ty in TYPES:
        with open(os.path.join(args.data, f"{ty}_constraints.json"), encoding="utf-8") as f:
            data = json.load(f)
        per_level = [0, 0, 0, 0, 0]
        for d in data:
            if d["level"] == 0:
                continue
            gen = responses.get(d["instruction"])
            if ty == "example":
                if gen is None:
                    continue
                template = d["target"].replace("{instruction}\n", "")
                v = rbe.check_match(template, gen)
            elif d["source"] in rule_sources:
                if gen is None:
                    continue
                v = getattr(rbe, f"rule_evaluation_{d['source']}")(gen, d["target"], d["level"])
            elif d["category"] == "format" and d["example_id"] in [22, 30]:
                if gen is None:
                    continue
                v = rbe.rule_evaluation_format(gen, d["example_id"], d["level"])
            else:
                continue
            per_level[d["level"] - 1] += v
            out.append({"set": args.set, "constraint_type": ty, "example_id": d["example_id"],
                        "level": d["level"], "source": d.get("source"), "response": gen,
                        "verdict": bool(v)})
        sums[ty] = per_level

    # The reference's own aggregates over the same answers, from its api_output files.
    complete = len(out) == 350
    if complete:
        with tempfile.TemporaryDirectory() as tmp:
            model = "m"
            os.makedirs(os.path.join(tmp, model))
            for ty in TYPES:
                with open(os.path.join(args.data, f"{ty}_constraints.json"), encoding="utf-8") as f:
                    data = json.load(f)
                with open(os.path.join(tmp, model, f"{ty}_constraint.jsonl"), "w", encoding="utf-8") as f:
                    for d in data:
                        if d["level"] == 0:
                            continue
                        gen = responses.get(d["instruction"], "")
                        f.write(json.dumps({"prompt": d["instruction"],
                                            "choices": [{"message": {"content": gen}}]}) + "\n")
            for ty in TYPES:
                if ty == "example":
                    ref = example_levels(rbe, args.data, tmp, model)
                else:
                    ref, _ = rbe.rule_evaluation(args.data, tmp, ty, model)
                if list(ref) != sums[ty]:
                    print(f"driver and reference aggregate differ for {ty}: {sums[ty]} vs {ref}",
                          file=sys.stderr)
                    sys.exit(1)
        print("[followbench_reference] per-level sums equal the reference's aggregates",
              file=sys.stderr)
    for r in out:
        print(json.dumps(r, ensure_ascii=False))


def example_levels(rbe, data_path, api_output_path, model):
    """The per-level counts evaluate_example_constraint computes (it returns rates rounded for
    printing; the counts are rebuilt from its `results` by the same formula)."""
    rates = rbe.evaluate_example_constraint(data_path, api_output_path, model)
    with open(os.path.join(data_path, "example_constraints.json"), encoding="utf-8") as f:
        n_group = len(json.load(f)) // 5
    return [round(float(r) / 100 * n_group) for r in rates]


if __name__ == "__main__":
    main()
