-- Constraint-level accuracy per constraint category, for a `constraint_scores` table with a
-- list of categories aligned with its constraints (TRACE's `levels2`): satisfied ÷ scored, and
-- the unscored constraints counted.
-- Usage: ifloom sql --run runs/NAME -f sql/constraint_accuracy_by_category.sql --param table=trace_scores --param categories=categories
SELECT category,
       count(*)                                                        AS constraints,
       count(ok)                                                       AS scored,
       count(*) - count(ok)                                            AS unscored,
       round(avg(CASE WHEN ok THEN 1.0 WHEN NOT ok THEN 0.0 END), 4)   AS constraint_level_acc
FROM (SELECT unnest(${categories}) AS category, unnest(satisfied) AS ok FROM ${table})
GROUP BY category
ORDER BY constraints DESC, category;
