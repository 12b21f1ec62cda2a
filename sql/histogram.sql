-- Histogram of a numeric expression over a table, in buckets of width ${bucket}; `from` is
-- the bucket's lower bound. E.g. expr=character_length(response), word_count(prompt),
-- cardinality(questions), response_latency_ms.
-- Usage: ifloom sql --run runs/NAME -f sql/histogram.sql --param table=T \
--          --param "expr=character_length(C)" --param bucket=50
SELECT CAST(floor(CAST(${expr} AS DOUBLE) / ${bucket}) * ${bucket} AS BIGINT) AS "from",
       count(*)                                                               AS rows
FROM ${table}
WHERE ${expr} IS NOT NULL
GROUP BY 1
ORDER BY 1;
