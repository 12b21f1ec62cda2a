-- Pass rate per evaluation question position (Question 1, 2, ...: in UltraIF question n was
-- added by augmentation round n) over the judged responses: the share of YES among the
-- answers the judge gave for that question (a missing answer counts in `unanswered`).
-- Usage: ifloom sql --run runs/NAME -f sql/pass_rates_by_question.sql --param table=judged
WITH q AS (
  SELECT unnest(scores) AS yes, unnest(generate_series(1, cardinality(scores))) AS question
  FROM ${table}
  WHERE cardinality(scores) > 0)
SELECT '${table}'                                              AS "table",
       question,
       count(*)                                                AS asked,
       sum(CASE WHEN yes THEN 1 ELSE 0 END)                    AS yes,
       sum(CASE WHEN NOT yes THEN 1 ELSE 0 END)                AS no,
       sum(CASE WHEN yes IS NULL THEN 1 ELSE 0 END)            AS unanswered,
       round(avg(CASE WHEN yes THEN 1.0 WHEN NOT yes THEN 0.0 END), 4) AS pass_rate
FROM q
GROUP BY question
ORDER BY question;
