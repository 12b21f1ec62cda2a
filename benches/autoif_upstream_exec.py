"""The upstream way of running AutoIF verifier functions (Qwen's code/7_query_vertification.py
and 3_cross_validation.py): exec each function's source in this one process, then call it on
each input under signal.alarm(5). No sandbox: a hostile function here can do anything.

Reads a JSON file {"pairs": [[source, input], ...]} (grouped by source), writes to the file
named second (functions may print):
{"calls", "seconds", "cpu_s", "max_rss_kb", "results": [int-or-null per pair]}.
"""
import json
import resource
import signal
import sys
import time


def timeout_handler(signum, frame):
    raise TimeoutError("Function execution timed out")


def main():
    pairs = json.load(open(sys.argv[1]))["pairs"]
    t0 = time.perf_counter()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    results = []
    compiled = {}
    for source, arg in pairs:
        if source not in compiled:
            local_vars = {}
            try:
                exec(source, globals(), local_vars)
                # Helpers defined beside evaluate resolve as in step 3 (module globals).
                globals().update(local_vars)
                compiled[source] = local_vars.get("evaluate")
            except Exception:
                compiled[source] = None
        f = compiled[source]
        if f is None:
            results.append(None)
            continue
        try:
            signal.signal(signal.SIGALRM, timeout_handler)
            signal.alarm(5)
            res = f(arg)
        except Exception:
            res = None
        finally:
            signal.alarm(0)
        try:
            results.append(int(res) if res is not None else None)
        except Exception:
            results.append(None)
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    with open(sys.argv[2], "w") as out:
        json.dump({"calls": len(pairs), "seconds": seconds, "cpu_s": cpu,
                   "max_rss_kb": r1.ru_maxrss, "results": results}, out)


main()
