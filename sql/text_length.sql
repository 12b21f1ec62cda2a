-- A text column: rows, nulls, distinct values, and its length in characters and in words
-- (whitespace-separated, ifloom's word_count) as min / p50 / p90 / max (exact percentiles,
-- interpolated). Lengths are computed once per row in the inner query.
-- Usage: ifloom sql --run runs/NAME -f sql/text_length.sql --param table=T --param column=C
SELECT count(*)                                          AS rows,
       count(v)                                          AS non_null,
       count(*) - count(v)                               AS nulls,
       count(DISTINCT v)                                 AS "distinct",
       min(c)                                            AS min_chars,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY c)    AS p50_chars,
       percentile_cont(0.9) WITHIN GROUP (ORDER BY c)    AS p90_chars,
       max(c)                                            AS max_chars,
       min(w)                                            AS min_words,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY w)    AS p50_words,
       percentile_cont(0.9) WITHIN GROUP (ORDER BY w)    AS p90_words,
       max(w)                                            AS max_words
FROM (SELECT ${column} AS v,
             character_length(${column}) AS c,
             word_count(${column}) AS w
      FROM ${table});
