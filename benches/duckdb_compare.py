#!/usr/bin/env python3
"""DuckDB baselines for `benches/engine.rs` (run by it; needs `pip install duckdb`).

On the same Parquet file ifloom queries (the input table materialized in a run directory):
  * the GROUP BY of the ifloom `sql` benchmark;
  * an exact dedup keeping the first row (in file order) of every key, written as
    ZSTD Parquet: once on the raw prompt, once on lower() + collapsed whitespace.

Each is timed best of --reps, in a fresh in-process connection (no process start-up).
Prints one JSON object on stdout.
"""

import argparse
import json
import os
import time

import duckdb

GROUPBY = (
    "SELECT category, count(*) AS n, avg(length(prompt)) AS avg_len "
    "FROM read_parquet({src}) GROUP BY category ORDER BY category"
)

# Keep the first occurrence in file order, like ifloom (lowest input position), and keep
# the file order of the kept rows.
DEDUP = """
COPY (
  SELECT * EXCLUDE (rn, file_row_number) FROM (
    SELECT *, row_number() OVER (PARTITION BY {key} ORDER BY file_row_number) AS rn
    FROM read_parquet({src}, file_row_number = true)
  )
  WHERE rn = 1
  ORDER BY file_row_number
) TO {out} (FORMAT parquet, COMPRESSION zstd)
"""

KEYS = {
    "exact": "prompt",
    # ifloom: lowercase, then split on whitespace and join with one space (trims too).
    "normalized": r"trim(regexp_replace(lower(prompt), '\s+', ' ', 'g'))",
}


def lit(s):
    return "'" + s.replace("'", "''") + "'"


def best_of(reps, fn):
    best = None
    result = None
    for _ in range(reps):
        con = duckdb.connect()
        t0 = time.perf_counter()
        result = fn(con)
        dt = time.perf_counter() - t0
        con.close()
        best = dt if best is None else min(best, dt)
    return best, result


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--input", required=True, help="Parquet file or glob")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    os.makedirs(a.out_dir, exist_ok=True)
    src = lit(a.input)

    res = {"duckdb": duckdb.__version__}
    con = duckdb.connect()
    res["threads"] = int(con.execute("SELECT current_setting('threads')").fetchone()[0])
    res["input_rows"] = con.execute(f"SELECT count(*) FROM read_parquet({src})").fetchone()[0]
    con.close()

    q = GROUPBY.format(src=src)
    res["groupby_s"], rows = best_of(a.reps, lambda c: c.execute(q).fetchall())
    res["groupby_rows"] = [[r[0], r[1], r[2]] for r in rows]

    for name, key in KEYS.items():
        out = os.path.join(a.out_dir, f"dedup_{name}.parquet")
        q = DEDUP.format(key=key, src=src, out=lit(out))
        res[f"dedup_{name}_s"], _ = best_of(a.reps, lambda c: c.execute(q).fetchall())
        con = duckdb.connect()
        res[f"dedup_{name}_kept"] = con.execute(
            f"SELECT count(*) FROM read_parquet({lit(out)})"
        ).fetchone()[0]
        con.close()

    print(json.dumps(res))


if __name__ == "__main__":
    main()
