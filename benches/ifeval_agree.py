#!/usr/bin/env python3
"""Agreement between reference IFEval verdicts and ours (issue 22).

    python3 benches/ifeval_agree.py REF.jsonl OURS.{jsonl,parquet} [--rows ROWS.jsonl]
        [--list N] [--min PCT] [--json]
    python3 benches/ifeval_agree.py --accuracy VERDICTS.{jsonl,parquet} [...]

REF: output of benches/ifeval_reference.py (key, instruction_id_list, strict, loose,
prompt_strict, prompt_loose). OURS: JSONL of the same shape, or a Parquet file with
columns key, strict, loose (lists of bool; prompt_strict / prompt_loose / instruction_id_list
optional; Parquet needs pyarrow, which the reference venv has). Rows are matched by key
(compared as strings).

Prints instruction-level agreement (strict, loose; overall and per instruction type),
prompt-level agreement, the four accuracies of each side, and the disagreeing
(key, instruction id, mode) with a short response excerpt when --rows gives the rows
that were judged (the reference's input). --min PCT exits 1 when an instruction-level
agreement (strict or loose) is below PCT. --accuracy prints the four accuracies
(prompt strict/loose, instruction strict/loose) of each file given.
"""

import argparse
import collections
import json
import sys


def load(path):
    """Returns {key(str): row dict}."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PAR1" or path.endswith(".parquet"):
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(l) for l in f if l.strip()]
    out = {}
    for r in rows:
        r = dict(r)
        r["strict"] = [bool(x) for x in (r.get("strict") or [])]
        r["loose"] = [bool(x) for x in (r.get("loose") or [])]
        if r.get("prompt_strict") is None:
            r["prompt_strict"] = all(r["strict"])
        if r.get("prompt_loose") is None:
            r["prompt_loose"] = all(r["loose"])
        out[str(r["key"])] = r
    return out


def accuracies(rows):
    n = len(rows)
    ni = sum(len(r["strict"]) for r in rows.values())
    return {
        "prompt_strict": 100.0 * sum(r["prompt_strict"] for r in rows.values()) / max(n, 1),
        "prompt_loose": 100.0 * sum(r["prompt_loose"] for r in rows.values()) / max(n, 1),
        "instruction_strict": 100.0 * sum(sum(r["strict"]) for r in rows.values()) / max(ni, 1),
        "instruction_loose": 100.0 * sum(sum(r["loose"]) for r in rows.values()) / max(ni, 1),
        "prompts": n,
        "instructions": ni,
    }


def fmt_acc(a):
    return (f"prompt strict {a['prompt_strict']:.2f}  prompt loose {a['prompt_loose']:.2f}  "
            f"instruction strict {a['instruction_strict']:.2f}  instruction loose {a['instruction_loose']:.2f}  "
            f"({a['prompts']} prompts, {a['instructions']} instructions)")


def excerpt(s, n=160):
    s = (s or "").replace("\n", "\\n")
    return s if len(s) <= n else s[: n - 3] + "..."


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--accuracy", action="store_true", help="only print the four accuracies of each file")
    ap.add_argument("--rows", help="JSONL rows that were judged (key, response): for excerpts")
    ap.add_argument("--list", type=int, default=50, help="disagreements to list (default 50, -1 = all)")
    ap.add_argument("--min", type=float, help="exit 1 if strict or loose instruction agreement < MIN %%")
    ap.add_argument("--json", action="store_true", help="print a JSON summary instead of text")
    a = ap.parse_args(argv)

    if a.accuracy:
        for p in a.files:
            acc = accuracies(load(p))
            print(json.dumps({"file": p, **acc}) if a.json else f"{p}: {fmt_acc(acc)}")
        return 0
    if len(a.files) != 2:
        ap.error("give REF and OURS (or --accuracy FILES...)")
    ref, ours = load(a.files[0]), load(a.files[1])
    responses = {}
    if a.rows:
        with open(a.rows, encoding="utf-8") as f:
            for l in f:
                if l.strip():
                    r = json.loads(l)
                    responses[str(r["key"])] = r.get("response")

    common = [k for k in ref if k in ours]
    only_ref = [k for k in ref if k not in ours]
    only_ours = [k for k in ours if k not in ref]
    per_type = collections.defaultdict(lambda: {"n": 0, "strict": 0, "loose": 0})
    tot = {"n": 0, "strict": 0, "loose": 0}
    prompt_agree = {"strict": 0, "loose": 0}
    shape_mismatch = []
    disagreements = []
    rnd = {"n": 0, "strict": 0, "loose": 0}  # reference-randomized instructions
    for k in common:
        r, o = ref[k], ours[k]
        ids = r.get("instruction_id_list") or o.get("instruction_id_list") or [f"#{i}" for i in range(len(r["strict"]))]
        if len(o["strict"]) != len(r["strict"]) or len(o["loose"]) != len(r["loose"]):
            shape_mismatch.append(k)
        rset = set(r.get("randomized") or [])
        for i, iid in enumerate(ids):
            if i in rset:
                rnd["n"] += 1
            d = per_type[iid]
            d["n"] += 1
            tot["n"] += 1
            for mode in ("strict", "loose"):
                rv = r[mode][i] if i < len(r[mode]) else None
                ov = o[mode][i] if i < len(o[mode]) else None
                if rv == ov:
                    d[mode] += 1
                    tot[mode] += 1
                    rnd[mode] += i in rset
                else:
                    disagreements.append((k, iid, mode, rv, ov, i in rset))
        for mode in ("strict", "loose"):
            prompt_agree[mode] += r[f"prompt_{mode}"] == o[f"prompt_{mode}"]

    def pct(x, n):
        return 100.0 * x / n if n else float("nan")

    summary = {
        "ref": a.files[0], "ours": a.files[1],
        "rows_compared": len(common), "only_in_ref": len(only_ref), "only_in_ours": len(only_ours),
        "instruction_rows_with_other_length": len(shape_mismatch),
        "instructions": tot["n"],
        "instruction_agreement_strict": pct(tot["strict"], tot["n"]),
        "instruction_agreement_loose": pct(tot["loose"], tot["n"]),
        # The reference draws some arguments at random (ifeval_reference.py flags them in
        # "randomized": e.g. letter_frequency with letter '#' or '!'); agreement on the rest:
        "reference_randomized_instructions": rnd["n"],
        "instruction_agreement_strict_excl_randomized": pct(tot["strict"] - rnd["strict"], tot["n"] - rnd["n"]),
        "instruction_agreement_loose_excl_randomized": pct(tot["loose"] - rnd["loose"], tot["n"] - rnd["n"]),
        "prompt_agreement_strict": pct(prompt_agree["strict"], len(common)),
        "prompt_agreement_loose": pct(prompt_agree["loose"], len(common)),
        "per_type": {t: {"n": d["n"], "strict": pct(d["strict"], d["n"]), "loose": pct(d["loose"], d["n"])}
                     for t, d in sorted(per_type.items())},
        "accuracy_ref": accuracies({k: ref[k] for k in common}),
        "accuracy_ours": accuracies({k: ours[k] for k in common}),
        "disagreements": [{"key": k, "instruction_id": iid, "mode": m, "ref": rv, "ours": ov,
                           "ref_randomized": rz,
                           "response": excerpt(responses.get(k)) if responses else None}
                          for k, iid, m, rv, ov, rz in disagreements],
    }
    if a.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"rows compared {len(common)} (only in ref {len(only_ref)}, only in ours {len(only_ours)}); "
              f"rows whose verdict lists differ in length: {len(shape_mismatch)}")
        print(f"instruction-level agreement over {tot['n']}: strict {summary['instruction_agreement_strict']:.3f}%  "
              f"loose {summary['instruction_agreement_loose']:.3f}%")
        if rnd["n"]:
            print(f"  excluding {rnd['n']} instructions whose arguments the reference drew at random: "
                  f"strict {summary['instruction_agreement_strict_excl_randomized']:.3f}%  "
                  f"loose {summary['instruction_agreement_loose_excl_randomized']:.3f}%")
        print(f"prompt-level agreement over {len(common)}: strict {summary['prompt_agreement_strict']:.3f}%  "
              f"loose {summary['prompt_agreement_loose']:.3f}%")
        print(f"ref : {fmt_acc(summary['accuracy_ref'])}")
        print(f"ours: {fmt_acc(summary['accuracy_ours'])}")
        print("per instruction type (n, strict agree %, loose agree %):")
        for t, d in summary["per_type"].items():
            flag = "" if d["strict"] == 100 and d["loose"] == 100 else "   <--"
            print(f"  {t:50s} {d['n']:7d} {d['strict']:8.3f} {d['loose']:8.3f}{flag}")
        lim = len(disagreements) if a.list < 0 else a.list
        print(f"disagreements: {len(disagreements)}" + (f" (first {lim})" if lim < len(disagreements) else ""))
        for d in summary["disagreements"][:lim]:
            line = f"  key={d['key']} {d['instruction_id']} {d['mode']}: ref={d['ref']} ours={d['ours']}"
            if d["ref_randomized"]:
                line += " [reference drew this instruction's arguments at random]"
            if d["response"] is not None:
                line += f"  | {d['response']}"
            print(line)
    if a.min is not None and (summary["instruction_agreement_strict"] < a.min
                              or summary["instruction_agreement_loose"] < a.min):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
