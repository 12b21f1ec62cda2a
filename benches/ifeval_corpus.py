#!/usr/bin/env python3
"""IFEval response corpora for the reference/agreement benchmarks (issue 22).

Two modes (standard library only; any python3 works):

  Join real answers to the 541 prompts (rows the checks can run on):
    python3 benches/ifeval_corpus.py --join RESPONSES.jsonl --out ROWS.jsonl
  RESPONSES.jsonl has `response` and `key` or `prompt` per line (google-research's
  input_response_data_*.jsonl shape and lm-eval's both work). Output rows:
  key, prompt, instruction_id_list, kwargs (from input_data.jsonl), response.

  Throughput corpus: cycle the 541 prompts, answers drawn from real model answers
  plus deterministic perturbations, so both verdicts occur for every instruction type:
    python3 benches/ifeval_corpus.py --n 100000 --out corpus.jsonl \
        [--responses DIR_OR_FILES ...] [--seed 22]
  Default responses: every *.jsonl starting with input_response_data_ in
  ~/.cache/ifloom/ifeval-responses (see the report in issue 22). Output rows carry
  key (0..n-1), prompt, instruction_id_list, kwargs, response, plus diagnostics:
  ifeval_key, source (model file), perturbation (names of the edits applied).
  Same inputs + same seed => byte-identical output.

Prompt matching: exact prompt first; otherwise by whitespace-normalised prompt; and
one known alias: some copies of the response files (google-research's older
input_response_data_gpt4_20231107_145030.jsonl, M-IFEval's English set) carry the
older text of prompt 2785 ("...at least one placeholder...") where input_data.jsonl
says "...at least 3 placeholders...". Those answers are attached to key 2785 with the
current kwargs (num_placeholders=3).
"""

import argparse
import glob
import json
import os
import random
import re
import sys

DEFAULT_INPUT = "/work/shared/data/ifeval/input_data.jsonl"
DEFAULT_RESPONSES = os.path.expanduser("~/.cache/ifloom/ifeval-responses")

ALIASES = {
    "at least one placeholder (an example of a placeholder is [address])":
        "at least 3 placeholders (an example of a placeholder is [address])",
}


def norm(s):
    return " ".join(s.split())


def load_inputs(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(l) for l in f if l.strip()]


class Matcher:
    def __init__(self, inputs):
        self.by_key = {r["key"]: r for r in inputs}
        self.by_prompt = {r["prompt"]: r for r in inputs}
        self.by_norm = {norm(r["prompt"]): r for r in inputs}

    def find(self, rec):
        if "key" in rec and rec["key"] in self.by_key:
            return self.by_key[rec["key"]]
        p = rec.get("prompt")
        if p is None:
            return None
        if p in self.by_prompt:
            return self.by_prompt[p]
        for old, new in ALIASES.items():
            if old in p:
                q = p.replace(old, new)
                if q in self.by_prompt:
                    return self.by_prompt[q]
        return self.by_norm.get(norm(p))


def read_responses(path, matcher):
    """Returns {ifeval key: response} and the count of unmatched lines."""
    out, unmatched = {}, 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            inp = matcher.find(rec)
            if inp is None:
                unmatched += 1
                continue
            resp = rec.get("response")
            if resp is None and isinstance(rec.get("resps"), list):  # lm-eval samples
                resp = rec["resps"][0][0] if rec["resps"] and rec["resps"][0] else None
            out[inp["key"]] = "" if resp is None else resp
    return out, unmatched


def row_for(inp, response, key=None, **extra):
    row = {
        "key": inp["key"] if key is None else key,
        "prompt": inp["prompt"],
        "instruction_id_list": inp["instruction_id_list"],
        "kwargs": inp["kwargs"],
        "response": response,
    }
    row.update(extra)
    return row


# ---------------------------------------------------------------- perturbations
# Each takes (text, rng, ctx) and returns new text. ctx has the prompt and a random
# other real answer. All are deterministic given rng.

FILLER = ("The quick brown fox jumps over the lazy dog. Rivers carry silt to the sea. "
          "Every answer here is written for a benchmark, not for a reader.")


def p_drop_line(t, rng, ctx):
    lines = t.split("\n")
    if len(lines) > 1:
        del lines[rng.randrange(len(lines))]
    return "\n".join(lines)


def p_drop_first_line(t, rng, ctx):
    return "\n".join(t.split("\n")[1:])


def p_drop_last_line(t, rng, ctx):
    return "\n".join(t.split("\n")[:-1])


def p_upper(t, rng, ctx):
    return t.upper()


def p_lower(t, rng, ctx):
    return t.lower()


def p_title(t, rng, ctx):
    return t.title()


def p_no_commas(t, rng, ctx):
    return t.replace(",", "")


def p_add_commas(t, rng, ctx):
    return t.replace(" and ", ", and ", 3) + ", indeed"


def p_postscript(t, rng, ctx):
    tag = rng.choice(["P.S.", "P.P.S", "P.S", "p.s.", "PS:"])
    return t.rstrip() + f"\n\n{tag} Thanks for reading."


def p_wrap_quotes(t, rng, ctx):
    return '"' + t.strip() + '"'


def p_strip_quotes(t, rng, ctx):
    return t.strip().strip('"')


def p_json_block(t, rng, ctx):
    body = json.dumps({"answer": t}, ensure_ascii=rng.random() < 0.5)
    return rng.choice([body, "```json\n" + body + "\n```", "```\n" + body + "\n```", "{" + t[:40]])


def p_truncate(t, rng, ctx):
    words = t.split(" ")
    return " ".join(words[: max(1, len(words) // rng.choice([2, 3, 5]))])


def p_double(t, rng, ctx):
    return t + "\n\n" + t


def p_remove_stars(t, rng, ctx):
    return t.replace("*", "")


def p_highlight(t, rng, ctx):
    words = t.split(" ")
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(words))
        words[i] = "*" + words[i] + "*"
    return " ".join(words)


def p_bullets(t, rng, ctx):
    sents = [s for s in re.split(r"(?<=[.!?])\s+", t.strip()) if s][: rng.randint(1, 6)]
    mark = rng.choice(["* ", "- ", "*"])
    return "\n".join(mark + s for s in sents)


def p_separators(t, rng, ctx):
    return t + "\n******\n" + ctx["other"][:400]


def p_sections(t, rng, ctx):
    paras = [p for p in t.split("\n\n") if p.strip()]
    word = rng.choice(["SECTION", "Section", "PARAGRAPH", "Day", "PART"])
    return "\n\n".join(f"{word} {i + 1}\n{p}" for i, p in enumerate(paras))


def p_one_paragraph(t, rng, ctx):
    return re.sub(r"\s*\n\s*", " ", t)


def p_split_paragraphs(t, rng, ctx):
    return re.sub(r"(?<=[.!?]) ", "\n\n", t, count=rng.randint(1, 8))


def p_markdown_divider(t, rng, ctx):
    return t.replace("\n\n", "\n\n***\n\n", rng.randint(1, 5))


def p_end_phrase(t, rng, ctx):
    return t.rstrip() + " " + rng.choice(["Is there anything else I can help with?",
                                          "Any other questions?", "Peace!", "Let me know if you have additional questions."])


def p_repeat_prompt(t, rng, ctx):
    return ctx["prompt"] + "\n" + t


def p_placeholders(t, rng, ctx):
    return t + " " + " ".join(rng.sample(["[name]", "[address]", "[date]", "[company]", "[x]"], rng.randint(1, 4)))


def p_title_tag(t, rng, ctx):
    return rng.choice(["<<A Title>>\n", "<<>>", "<Title>\n", "<<title>> "]) + t


def p_swap_other(t, rng, ctx):
    return ctx["other"]


def p_non_ascii(t, rng, ctx):
    return t + rng.choice([" — café naïve 🙂", " Привет мир, это тест.", " 這是一個測試。", " Ünïcödé ß"])


def p_filler(t, rng, ctx):
    return t + "\n\n" + FILLER * rng.randint(1, 6)


def p_word_repeat(t, rng, ctx):
    words = re.findall(r"[A-Za-z]{4,}", t)
    if not words:
        return t
    w = rng.choice(words)
    return t + (" " + w) * rng.randint(1, 12)


def p_letters(t, rng, ctx):
    return t.replace(rng.choice("etaoin"), "")


def p_capital_words(t, rng, ctx):
    words = t.split(" ")
    for _ in range(rng.randint(1, 25)):
        i = rng.randrange(len(words))
        words[i] = words[i].upper()
    return " ".join(words)


def p_edge(t, rng, ctx):
    return rng.choice(["", "   \n ", "*", "**", "\n", "\"\"", "P.S.", "{}", "My answer is yes."])


PERTURBATIONS = [
    p_drop_line, p_drop_first_line, p_drop_last_line, p_upper, p_lower, p_title, p_no_commas,
    p_add_commas, p_postscript, p_wrap_quotes, p_strip_quotes, p_json_block, p_truncate, p_double,
    p_remove_stars, p_highlight, p_bullets, p_separators, p_sections, p_one_paragraph,
    p_split_paragraphs, p_markdown_divider, p_end_phrase, p_repeat_prompt, p_placeholders,
    p_title_tag, p_swap_other, p_non_ascii, p_filler, p_word_repeat, p_letters, p_capital_words,
]


def perturb(text, rng, ctx):
    """~30%: unchanged real answer; ~1%: an edge-case text; else 1-2 edits."""
    x = rng.random()
    if x < 0.30:
        return text, []
    if x < 0.31:
        return p_edge(text, rng, ctx), ["edge"]
    names = []
    for f in rng.sample(PERTURBATIONS, 1 if rng.random() < 0.7 else 2):
        text = f(text, rng, ctx)
        names.append(f.__name__[2:])
    return text, names


def response_files(paths):
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += glob.glob(os.path.join(p, "input_response_data_*.jsonl"))
        else:
            files.append(p)
    # the superseded copy of the gpt4 file is a near duplicate: skip it by default
    files = [f for f in files if not f.endswith(".v83282e4.jsonl")]
    return sorted(set(files))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input", default=DEFAULT_INPUT, help="IFEval input_data.jsonl")
    ap.add_argument("--join", help="prompt/response JSONL to join to input_data (join mode)")
    ap.add_argument("--n", type=int, help="rows to generate (corpus mode)")
    ap.add_argument("--responses", nargs="*", default=[DEFAULT_RESPONSES],
                    help="response files or directories (corpus mode)")
    ap.add_argument("--seed", type=int, default=22)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    inputs = load_inputs(a.input)
    matcher = Matcher(inputs)

    if a.join:
        resp, unmatched = read_responses(a.join, matcher)
        missing = [r["key"] for r in inputs if r["key"] not in resp]
        with open(a.out, "w", encoding="utf-8") as o:
            for inp in inputs:
                if inp["key"] in resp:
                    o.write(json.dumps(row_for(inp, resp[inp["key"]]), ensure_ascii=False) + "\n")
        print(f"joined {len(resp)} of {len(inputs)} prompts from {a.join}; unmatched lines: {unmatched}; "
              f"prompts without a response: {len(missing)} {missing[:10]}", file=sys.stderr)
        return

    if not a.n:
        ap.error("give --join FILE or --n N")
    files = response_files(a.responses)
    if not files:
        sys.exit(f"no response files in {a.responses}")
    pools = {r["key"]: [] for r in inputs}  # key -> [(source, response)]
    for f in files:
        resp, _ = read_responses(f, matcher)
        src = os.path.basename(f)[len("input_response_data_"):-len(".jsonl")]
        for k, v in resp.items():
            pools[k].append((src, v))
    all_answers = [v for k in sorted(pools) for _, v in pools[k]]
    rng = random.Random(a.seed)
    with open(a.out, "w", encoding="utf-8") as o:
        for i in range(a.n):
            inp = inputs[i % len(inputs)]
            pool = pools[inp["key"]]
            if pool:
                src, text = pool[rng.randrange(len(pool))]
            else:
                src, text = "none", ""
            ctx = {"prompt": inp["prompt"], "other": all_answers[rng.randrange(len(all_answers))]}
            text, names = perturb(text, rng, ctx)
            o.write(json.dumps(row_for(inp, text, key=i, ifeval_key=inp["key"], source=src,
                                       perturbation=names), ensure_ascii=False) + "\n")
    print(f"wrote {a.n} rows to {a.out} from {len(files)} response files, seed {a.seed}", file=sys.stderr)


if __name__ == "__main__":
    main()
