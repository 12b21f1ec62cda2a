-- Constraint- and instruction-level accuracy of a table of per-constraint judge scores
-- (`kind: constraint_scores`, one row per instruction). The headline, `mean_overall`, is the
-- figure the reference script reports (Complex-IF TRACE `trace.py`): the mean of the judge's
-- overall score, read from the first `Constraints Overall Score: [[d]]`, over the
-- instructions that have one. A constraint is satisfied when its score reached the stage's
-- `pass_score`; constraints the judge gave no score are left out of the constraint level and
-- counted (`unscored`); an instruction counts at the instruction level when every
-- constraint is satisfied, and is left out (counted in `instructions_unscored`) when none
-- failed but one has no score.
-- Usage: ifloom sql --run runs/NAME -f sql/constraint_accuracy.sql --param table=trace_scores
WITH c AS (SELECT unnest(satisfied) AS ok FROM ${table})
SELECT '${table}'                                                               AS "table",
       (SELECT round(avg(overall_score), 4) FROM ${table})                      AS mean_overall,
       (SELECT round(avg(CASE WHEN ok THEN 1.0 WHEN NOT ok THEN 0.0 END), 4) FROM c)
                                                                                AS constraint_level_acc,
       (SELECT round(avg(CASE WHEN all_satisfied THEN 1.0 WHEN NOT all_satisfied THEN 0.0 END), 4)
        FROM ${table})                                                          AS instruction_level_acc,
       (SELECT count(*) FROM ${table})                                          AS instructions,
       (SELECT count(overall_score) FROM ${table})                              AS with_overall,
       (SELECT count(*) FROM c)                                                 AS constraints,
       (SELECT count(*) - count(ok) FROM c)                                     AS unscored,
       (SELECT count(*) - count(all_satisfied) FROM ${table})                   AS instructions_unscored;
