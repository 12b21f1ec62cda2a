-- Latency of the requests an llm stage sent (rows answered from the cache left out), in ms.
-- `latency` and `cached` are the stage's `<output>_latency_ms` and `<output>_cached` columns.
-- Usage: ifloom sql --run runs/NAME -f sql/llm_latency.sql --param table=responses \
--          --param latency=response_latency_ms --param cached=response_cached
SELECT '${table}'                                                      AS stage,
       count(${latency})                                               AS sent,
       min(${latency})                                                 AS min_ms,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY ${latency})         AS p50_ms,
       percentile_cont(0.9) WITHIN GROUP (ORDER BY ${latency})         AS p90_ms,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY ${latency})        AS p99_ms,
       max(${latency})                                                 AS max_ms
FROM ${table}
WHERE NOT coalesce(${cached}, false);
