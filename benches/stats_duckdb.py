"""The figures of `ifloom stats` on a judged table, computed by DuckDB (the baseline for
benches/stats.rs): pass rates overall, per round, per question and per category, and the
response length statistics and histogram. Prints JSON: best and all timings, the version and
the SFT pass rate (to check both tools describe the same data).

Usage: python3 benches/stats_duckdb.py JUDGED.parquet REPS
"""
import json
import sys
import time

import duckdb

path, reps = sys.argv[1], int(sys.argv[2])
t = f"read_parquet('{path}')"
per = f"""
  SELECT round, source_id || '/' || CAST(round AS VARCHAR) AS instruction,
         sum(CASE WHEN verdict = 'pass' THEN 1 ELSE 0 END) AS p,
         sum(CASE WHEN verdict = 'fail' THEN 1 ELSE 0 END) AS f,
         sum(CASE WHEN verdict = 'unjudged' THEN 1 ELSE 0 END) AS u
  FROM {t} GROUP BY 1, 2"""
rates = """count(*) AS instructions, sum(p + f + u) AS responses,
  round(avg(CASE WHEN p > 0 THEN 1.0 ELSE 0.0 END), 4) AS sft_pass_rate,
  round(avg(CASE WHEN p > 0 AND f > 0 THEN 1.0 ELSE 0.0 END), 4) AS dpo_pass_rate,
  round(sum(p) / nullif(sum(p + f), 0), 4) AS response_pass_rate,
  round(sum(u) / nullif(sum(p + f + u), 0), 4) AS unjudged_rate"""
queries = {
    "overall": f"WITH per AS ({per}) SELECT {rates} FROM per",
    "by_round": f"WITH per AS ({per}) SELECT round, {rates} FROM per GROUP BY round ORDER BY round",
    "by_question": f"""
      SELECT question, count(*), sum(CASE WHEN yes THEN 1 ELSE 0 END),
             round(avg(CASE WHEN yes THEN 1.0 WHEN NOT yes THEN 0.0 END), 4)
      FROM (SELECT unnest(scores) AS yes, unnest(generate_series(1, len(scores))) AS question
            FROM {t} WHERE len(scores) > 0)
      GROUP BY question ORDER BY question""",
    "by_category": f"""
      SELECT category, count(*), round(avg(CASE WHEN yes THEN 1.0 WHEN NOT yes THEN 0.0 END), 4)
      FROM (SELECT unnest(scores) AS yes, unnest(categories) AS category
            FROM {t} WHERE len(scores) > 0)
      GROUP BY category ORDER BY category""",
    "text": f"""
      SELECT count(*), count(response), count(DISTINCT response),
             min(length(response)), percentile_cont(0.5) WITHIN GROUP (ORDER BY length(response)),
             percentile_cont(0.9) WITHIN GROUP (ORDER BY length(response)), max(length(response)),
             min(len(string_split_regex(trim(response), '\\s+'))),
             percentile_cont(0.5) WITHIN GROUP (ORDER BY len(string_split_regex(trim(response), '\\s+'))),
             max(len(string_split_regex(trim(response), '\\s+')))
      FROM {t}""",
    "histogram": f"""
      SELECT CAST(floor(length(response) / 50) * 50 AS BIGINT) AS b, count(*)
      FROM {t} GROUP BY 1 ORDER BY 1""",
}

con = duckdb.connect()
times = []
sft = None
for _ in range(reps):
    start = time.perf_counter()
    for name, q in queries.items():
        rows = con.execute(q).fetchall()
        if name == "overall":
            sft = rows[0][2]
    times.append(time.perf_counter() - start)
print(json.dumps({"best_s": min(times), "all_s": [round(x, 3) for x in times],
                  "version": duckdb.__version__, "sft_pass_rate": float(sft)}))
