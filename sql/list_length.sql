-- A list column: items per row (constraints per instruction, turns per conversation) as
-- min / mean / p50 / p90 / max, with rows, nulls and empty lists.
-- Usage: ifloom sql --run runs/NAME -f sql/list_length.sql --param table=T --param column=C
SELECT count(*)                                                                     AS rows,
       count(*) - count(${column})                                                  AS nulls,
       sum(CASE WHEN cardinality(${column}) = 0 THEN 1 ELSE 0 END)                  AS empty,
       min(cardinality(${column}))                                                  AS min_items,
       round(avg(cardinality(${column})), 4)                                        AS mean_items,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY cardinality(${column}))          AS p50_items,
       percentile_cont(0.9) WITHIN GROUP (ORDER BY cardinality(${column}))          AS p90_items,
       max(cardinality(${column}))                                                  AS max_items
FROM ${table};
