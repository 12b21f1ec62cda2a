-- Histogram of a text column's length in characters, in buckets of ${bucket} characters.
-- Usage: ifloom sql --run runs/NAME -f sql/length_histogram.sql --param table=T --param column=C --param bucket=50
SELECT (character_length(${column}) / ${bucket}) * ${bucket} AS from_chars,
       count(*)                                              AS rows
FROM ${table}
GROUP BY 1
ORDER BY 1;
