-- Pass rate per constraint category: `categories` is a list parallel to the questions (the
-- category of question n at position n), as UltraIF's augmentation writes it.
-- Usage: ifloom sql --run runs/NAME -f sql/pass_rates_by_category.sql --param table=judged \
--          --param categories=categories
WITH q AS (
  SELECT unnest(scores) AS yes, unnest(${categories}) AS category
  FROM ${table}
  WHERE cardinality(scores) > 0)
SELECT '${table}'                                              AS "table",
       coalesce(category, '(none)')                            AS category,
       count(*)                                                AS asked,
       sum(CASE WHEN yes THEN 1 ELSE 0 END)                    AS yes,
       sum(CASE WHEN NOT yes THEN 1 ELSE 0 END)                AS no,
       round(avg(CASE WHEN yes THEN 1.0 WHEN NOT yes THEN 0.0 END), 4) AS pass_rate
FROM q
GROUP BY 2
ORDER BY 2;
