#!/usr/bin/env python3
"""Python reference verdicts for IFEval (issue 22): Google's checks, run as
google-research/instruction_following_eval/evaluation_lib.py runs them.

The checks come from PyPI `if-verifiable` 0.1.2, whose if_verifiable/ifeval/
instructions*.py are a copy of google-research's instruction_following_eval
(verified: same AST as the 2025 upstream copy, apart from absl logging -> logging).
Set the environment up with benches/ifeval_ref_setup.sh and run with that venv:

    ~/.cache/ifloom/ifeval-ref-venv/bin/python benches/ifeval_reference.py IN.jsonl [-o OUT.jsonl]
        [--workers N] [--time]

IN.jsonl: one row per line with key, prompt, instruction_id_list, kwargs (list of
dicts, aligned with instruction_id_list), response. (benches/ifeval_corpus.py --join
builds such rows from input_data.jsonl plus a prompt/response file.)

OUT (stdout by default), one line per input row, in input order:
    {"key", "instruction_id_list", "strict": [bool], "loose": [bool],
     "prompt_strict": bool, "prompt_loose": bool, "error": null | str}

Semantics, per evaluation_lib.test_instruction_following_strict / _loose:
  * kwargs: None-valued entries are dropped first (as lm-eval does; the HF copy of the
    data carries every key with nulls), then build_description(**kwargs); if
    get_instruction_args() has a "prompt" key, build_description(prompt=prompt) again.
    The instruction object is built separately for strict and for loose, as upstream.
  * strict: response.strip() non-empty and check_following(response).
  * loose: any of, in upstream's order: response, response without '*', without first
    line, without last line, without both, and those three without '*' (the line
    removals are .strip()ped); each must be non-empty after strip().
Deviations, all for inputs on which upstream would crash instead:
  * response null/missing -> treated as "" (every verdict False).
  * an unknown instruction id, bad kwargs, or an exception inside check_following
    makes that instruction False (strict and loose) and sets "error" to the message;
    the other instructions of the row are still evaluated. --raise re-raises instead.
Variant: --letter-frequency literal reproduces google-research commit 3f357bd, whose
LetterFrequencyChecker counts a non-letter `letter` ('#', '!') as given; if-verifiable
(and google-research's code as of the published results) replaces it by a random letter.
Determinism:
  * langdetect is random unless DetectorFactory.seed is set; we set seed = 0 (the
    value lm-eval's harness and most reproductions use). Each detect() call builds a
    fresh detector seeded with 0, so a verdict depends only on the text, not on order
    or on the worker that ran it.
  * `random` is reseeded per row (from the key) so build_description's random
    defaults for *missing* kwargs are reproducible; with complete kwargs no check
    depends on them.
"""

import argparse
import importlib.util
import json
import logging
import os
import random
import sys
import time
import types
import zlib


def _setup_reference():
    # NLTK data: the venv made by ifeval_ref_setup.sh keeps punkt_tab in <venv>/nltk_data.
    if "NLTK_DATA" not in os.environ:
        cand = os.path.join(sys.prefix, "nltk_data")
        if os.path.isdir(cand):
            os.environ["NLTK_DATA"] = cand
    # if_verifiable/__init__.py imports `datasets` (HF hub); we need only the ifeval
    # subpackage, so register a stub parent package that points at the same files.
    if "if_verifiable" not in sys.modules:
        spec = importlib.util.find_spec("if_verifiable")
        if spec is None:
            sys.exit("if_verifiable not installed: run benches/ifeval_ref_setup.sh and use its venv")
        stub = types.ModuleType("if_verifiable")
        stub.__path__ = list(spec.submodule_search_locations)
        sys.modules["if_verifiable"] = stub
    import langdetect

    # langdetect is nondeterministic unless seeded: seed 0, see module docstring.
    langdetect.DetectorFactory.seed = 0
    from if_verifiable.ifeval import instructions_registry  # noqa: E402

    # Upstream logs (absl) an error for every text langdetect cannot classify; that is
    # noise here and slows the run down.
    logging.disable(logging.CRITICAL)
    return instructions_registry.INSTRUCTION_DICT


INSTRUCTION_DICT = _setup_reference()
RAISE = False
LETTER_LITERAL = False


def _build(instruction_id, kw, prompt):
    cls = INSTRUCTION_DICT[instruction_id]
    inst = cls(instruction_id)
    kw = {k: v for k, v in (kw or {}).items() if v is not None}
    inst.build_description(**kw)
    if LETTER_LITERAL and instruction_id == "keywords:letter_frequency":
        # google-research commit 3f357bd's LetterFrequencyChecker: any one-character
        # `letter` is used as given; only an empty or longer one is replaced at random.
        letter = kw.get("letter")
        if letter and len(letter) == 1:
            inst._letter = letter.strip().lower()
    args = inst.get_instruction_args()
    if args and "prompt" in args:
        inst.build_description(prompt=prompt)
    return inst


def _randomized(inst, kw, prompt):
    """True if build_description filled an argument at random: a kwarg missing or
    None, or a given value it rejected (keywords:letter_frequency replaces any
    `letter` that is not one ASCII letter, e.g. IFEval's '#' (key 1122) and '!'
    (key 1129), by random.choice(string.ascii_letters)). Confirmed by rebuilding
    under another random state, so deterministic defaults are not flagged."""
    used = inst.get_instruction_args() or {}
    given = {k: v for k, v in (kw or {}).items() if v is not None}
    suspect = False
    for k in inst.get_instruction_args_keys():
        if k == "prompt":
            continue
        if k not in given or str(given[k]).strip().lower() != str(used.get(k)).strip().lower():
            suspect = True
    if not suspect:
        return False
    state = random.getstate()
    try:
        outs = set()
        for seed in (1, 2, 3):
            random.seed(seed)
            outs.add(json.dumps(_build(inst.id, kw, prompt).get_instruction_args(), sort_keys=True, default=str))
        return len(outs) > 1
    except Exception:  # noqa: BLE001
        return True
    finally:
        random.setstate(state)


def loose_variants(response):
    r = response.split("\n")
    response_remove_first = "\n".join(r[1:]).strip()
    response_remove_last = "\n".join(r[:-1]).strip()
    response_remove_both = "\n".join(r[1:-1]).strip()
    revised_response = response.replace("*", "")
    return [
        response,
        revised_response,
        response_remove_first,
        response_remove_last,
        response_remove_both,
        response_remove_first.replace("*", ""),
        response_remove_last.replace("*", ""),
        response_remove_both.replace("*", ""),
    ]


def evaluate_row(row):
    """Returns (result dict, number of check_following calls)."""
    key = row.get("key")
    prompt = row.get("prompt") or ""
    response = row.get("response")
    if response is None:
        response = ""
    ids = row["instruction_id_list"]
    kwargs = row.get("kwargs") or [{} for _ in ids]
    random.seed(zlib.crc32(str(key).encode()))
    variants = loose_variants(response)
    strict, loose, errors, randomized, calls = [], [], [], [], 0
    for i, iid in enumerate(ids):
        kw = kwargs[i] if i < len(kwargs) else {}
        try:
            inst = _build(iid, kw, prompt)
            if _randomized(inst, kw, prompt):
                randomized.append(i)
            calls += bool(response.strip())
            s = bool(response.strip() and inst.check_following(response))
            inst = _build(iid, kw, prompt)
            lo = False
            for r in variants:
                if r.strip():
                    calls += 1
                    if inst.check_following(r):
                        lo = True
                        break
        except Exception as e:  # noqa: BLE001 - upstream would crash; we record it
            if RAISE:
                raise
            errors.append(f"{iid}: {type(e).__name__}: {e}")
            s = lo = False
        strict.append(s)
        loose.append(lo)
    out = {
        "key": key,
        "instruction_id_list": ids,
        "strict": strict,
        "loose": loose,
        "prompt_strict": all(strict),
        "prompt_loose": all(loose),
        "error": "; ".join(errors) if errors else None,
        # indices of instructions whose arguments the reference drew at random (see
        # _randomized): their verdicts depend on Python's random state, not the text.
        "randomized": randomized,
    }
    return out, calls


def _eval_line(line):
    row = json.loads(line)
    out, calls = evaluate_row(row)
    return json.dumps(out), len(row["instruction_id_list"]), calls


def _init_worker(raise_, letter_literal):
    global RAISE, LETTER_LITERAL
    RAISE = raise_
    LETTER_LITERAL = letter_literal


def main(argv=None):
    global RAISE, LETTER_LITERAL
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("input", help="JSONL with key, prompt, instruction_id_list, kwargs, response")
    ap.add_argument("-o", "--out", help="output JSONL (default stdout)")
    ap.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    ap.add_argument("--time", action="store_true", help="print rows/s and checks/s to stderr")
    ap.add_argument("--raise", dest="raise_", action="store_true",
                    help="re-raise exceptions from the reference instead of recording them")
    ap.add_argument("--letter-frequency", choices=["random", "literal"], default="random",
                    help="keywords:letter_frequency with a non-letter `letter` (IFEval keys 1122 '#', "
                         "1129 '!'): 'random' = if-verifiable / google-research as of the published "
                         "results (replaced by a random ASCII letter); 'literal' = google-research "
                         "commit 3f357bd (the character is counted as given)")
    ap.add_argument("--chunksize", type=int, default=32)
    a = ap.parse_args(argv)
    RAISE = a.raise_
    LETTER_LITERAL = a.letter_frequency == "literal"

    with open(a.input, encoding="utf-8") as f:
        lines = [l for l in f if l.strip()]
    out = open(a.out, "w", encoding="utf-8") if a.out else sys.stdout
    n_rows = n_instr = n_calls = 0
    t0 = time.perf_counter()
    if a.workers <= 1:
        results = map(_eval_line, lines)
        pool = None
    else:
        import multiprocessing as mp

        pool = mp.get_context("fork").Pool(a.workers, initializer=_init_worker,
                                            initargs=(a.raise_, LETTER_LITERAL))
        results = pool.imap(_eval_line, lines, chunksize=a.chunksize)
    for js, ni, nc in results:
        out.write(js + "\n")
        n_rows += 1
        n_instr += ni
        n_calls += nc
    if pool is not None:
        pool.close()
        pool.join()
    dt = time.perf_counter() - t0
    if a.out:
        out.close()
    if a.time:
        print(
            f"ifeval_reference: {n_rows} rows, {n_instr} instructions (each judged strict+loose), "
            f"{n_calls} check_following calls in {dt:.2f}s with {a.workers} worker(s): "
            f"{n_rows / dt:.1f} rows/s, {n_instr / dt:.1f} instructions/s, "
            f"{n_calls / dt:.1f} check_following calls/s",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
