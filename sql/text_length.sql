-- Length distribution (characters and words) of a text column.
-- Usage: ifloom sql --run runs/NAME -f sql/text_length.sql --param table=T --param column=C
SELECT count(*)                                                   AS rows,
       count(${column})                                           AS non_null,
       min(character_length(${column}))                           AS min_chars,
       approx_percentile_cont(0.5) WITHIN GROUP (ORDER BY character_length(${column})) AS p50_chars,
       approx_percentile_cont(0.9) WITHIN GROUP (ORDER BY character_length(${column})) AS p90_chars,
       max(character_length(${column}))                           AS max_chars,
       round(avg(array_length(string_to_array(trim(${column}), ' '))), 2) AS avg_words
FROM ${table};
