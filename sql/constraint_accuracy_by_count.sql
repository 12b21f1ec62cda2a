-- The accuracies of a table of per-constraint judge scores (`kind: constraint_scores`) split
-- by the number of constraints per instruction (TRACE: 1-15), as sql/constraint_accuracy.sql
-- counts them: the mean overall score (the reference's figure), constraint level (satisfied
-- ÷ scored) and instruction level (every constraint satisfied; left out when none failed but
-- one has no score).
-- Usage: ifloom sql --run runs/NAME -f sql/constraint_accuracy_by_count.sql --param table=trace_scores
WITH i AS (
  SELECT CAST(cardinality(satisfied) AS BIGINT) AS n_constraints, satisfied, all_satisfied,
         overall_score
  FROM ${table}),
c AS (SELECT n_constraints, unnest(satisfied) AS ok FROM i),
per_constraint AS (
  SELECT n_constraints, count(*) AS constraints, count(*) - count(ok) AS unscored,
         round(avg(CASE WHEN ok THEN 1.0 WHEN NOT ok THEN 0.0 END), 4) AS constraint_level_acc
  FROM c GROUP BY n_constraints),
per_instruction AS (
  SELECT n_constraints, count(*) AS instructions,
         round(avg(overall_score), 4) AS mean_overall,
         round(avg(CASE WHEN all_satisfied THEN 1.0 WHEN NOT all_satisfied THEN 0.0 END), 4)
           AS instruction_level_acc,
         count(*) - count(all_satisfied) AS instructions_unscored
  FROM i GROUP BY n_constraints)
SELECT p.n_constraints, p.mean_overall, c.constraint_level_acc, p.instruction_level_acc,
       p.instructions, c.constraints, c.unscored, p.instructions_unscored
FROM per_instruction p LEFT JOIN per_constraint c ON c.n_constraints = p.n_constraints
ORDER BY p.n_constraints;
