-- A text column: rows, nulls, distinct values, and its length in characters and in words
-- (whitespace-separated) as min / p50 / p90 / max (exact percentiles, interpolated).
-- Usage: ifloom sql --run runs/NAME -f sql/text_length.sql --param table=T --param column=C
SELECT count(*)                                                                     AS rows,
       count(${column})                                                             AS non_null,
       count(*) - count(${column})                                                  AS nulls,
       count(DISTINCT ${column})                                                    AS "distinct",
       min(character_length(${column}))                                             AS min_chars,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY character_length(${column}))     AS p50_chars,
       percentile_cont(0.9) WITHIN GROUP (ORDER BY character_length(${column}))     AS p90_chars,
       max(character_length(${column}))                                             AS max_chars,
       min(regexp_count(${column}, '\S+'))                                          AS min_words,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY regexp_count(${column}, '\S+'))  AS p50_words,
       percentile_cont(0.9) WITHIN GROUP (ORDER BY regexp_count(${column}, '\S+'))  AS p90_words,
       max(regexp_count(${column}, '\S+'))                                          AS max_words
FROM ${table};
