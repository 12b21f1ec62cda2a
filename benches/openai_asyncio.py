#!/usr/bin/env python3
"""The baseline for `benches/llm.rs`: the same requests as the llm stage, sent by a plain
asyncio client built on the `openai` package (AsyncOpenAI + asyncio.Semaphore + gather), the
way Python data tools usually drive vLLM.

    python3 benches/openai_asyncio.py --base-url URL --input prompts.jsonl --max-in-flight 256

`--input` is JSONL with a `prompt` field per line (the bench writes it from the same rows it
gives ifloom). Each request is the one ifloom sends: a system and a user message, the same
temperature and max_tokens. Responses are kept in memory (no cache, no Parquet: the baseline
does strictly less work than ifloom). Prints one JSON object: wall time and CPU time of the
request phase (resource.getrusage(RUSAGE_SELF), so interpreter start-up and imports are
left out and reported apart), failures, and peak RSS.
"""

import argparse
import asyncio
import json
import resource
import time

_T0 = time.perf_counter()
import openai  # noqa: E402  (imported after _T0 so its import time is reported)

# The HTTP library openai is built on: httpx, or httpx2 in newer releases.
import openai._base_client as _base  # noqa: E402

httpx = getattr(_base, "httpx2", None) or getattr(_base, "httpx")

SYSTEM = "Answer briefly."


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def main(args) -> dict:
    with open(args.input, encoding="utf-8") as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    # The default connection pool keeps only 100 idle connections; give it max_in_flight so
    # the baseline is not handicapped by reconnecting (it is what a careful user would do).
    http = openai.DefaultAsyncHttpxClient(
        limits=httpx.Limits(
            max_connections=args.max_in_flight,
            max_keepalive_connections=args.max_in_flight,
            keepalive_expiry=30.0,
        )
    )
    client = openai.AsyncOpenAI(
        base_url=args.base_url, api_key="bench", max_retries=6, http_client=http
    )
    sem = asyncio.Semaphore(args.max_in_flight)
    failures = 0

    async def one(p: str):
        nonlocal failures
        async with sem:
            try:
                r = await client.chat.completions.create(
                    model=args.model,
                    messages=[
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": p},
                    ],
                    temperature=0.7,
                    max_tokens=256,
                )
                return r.choices[0].message.content
            except Exception:  # noqa: BLE001 - a failed row, counted like ifloom's dead letters
                failures += 1
                return None

    setup_cpu = cpu()
    t = time.perf_counter()
    out = await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - t
    req_cpu = cpu() - setup_cpu
    await client.close()
    return {
        "requests": len(prompts),
        "ok": sum(1 for o in out if o is not None),
        "failures": failures,
        "wall_s": wall,
        "cpu_s": req_cpu,
        "setup_cpu_s": setup_cpu,
        "setup_wall_s": t - _T0,
        "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "openai_version": openai.__version__,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--max-in-flight", type=int, default=256)
    ap.add_argument("--model", default="sim-model")
    print(json.dumps(asyncio.run(main(ap.parse_args()))))
