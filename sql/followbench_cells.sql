-- FollowBench's hard and soft satisfaction rates (YJiangcm/FollowBench
-- code/gpt4_based_evaluation.py, save_discriminative_evaluation; the rule-based half from
-- code/rule_based_evaluation.py) per constraint type and level, over a table with one row per
-- instruction (`kind: followbench`): HSR is the share of instructions whose added
-- constraints are all satisfied, SSR the mean share of added constraints satisfied (a rule
-- gives one verdict per instruction: 1 or 0 for both). Instructions without a verdict (no
-- response, judge request failed, an answer the reference's parser rejects) are left out of
-- the rates and counted in `unjudged`; the reference scores them -1 and asks for a manual
-- fix.
-- Usage: ifloom sql --run runs/NAME -f sql/followbench_cells.sql --param table=followbench
SELECT '${table}'                                                            AS "table",
       constraint_type,
       level,
       count(*)                                                              AS instructions,
       count(hard)                                                           AS evaluated,
       count(*) - count(hard)                                                AS unjudged,
       sum(CASE WHEN checker IS NOT NULL AND hard IS NOT NULL THEN 1 ELSE 0 END) AS rule_checked,
       round(avg(CASE WHEN hard THEN 1.0 WHEN NOT hard THEN 0.0 END), 4)     AS hsr,
       round(avg(soft), 4)                                                   AS ssr
FROM ${table}
GROUP BY constraint_type, level
ORDER BY constraint_type, level;
