-- EIFBench's three levels (Complex-IF EIFBench/8_metric.py) of a table of yes/no answers with
-- one row per scoring question (`main_id`, `sub_instruction_id`, `answer`): the task level is
-- the share of items whose judgements are all true; the constraint level the mean over items
-- of the share of true judgements; the sub-task level the mean over items of the share of
-- sub-instructions whose judgements are all true. Questions without a judgement (request
-- failed, no 是/否 in the answer, no response) are left out, as the script leaves out failed
-- requests, and counted in `unjudged`; an item with none judged is left out of the levels.
-- Usage: ifloom sql --run runs/NAME -f sql/eifbench_levels.sql --param table=eifbench_answers
WITH judged AS (
  SELECT main_id, sub_instruction_id, answer FROM ${table} WHERE answer IS NOT NULL),
subtasks AS (
  SELECT main_id, sub_instruction_id, bool_and(answer) AS all_true
  FROM judged GROUP BY main_id, sub_instruction_id),
items AS (
  SELECT main_id, bool_and(answer) AS all_true,
         avg(CASE WHEN answer THEN 1.0 ELSE 0.0 END) AS share_true
  FROM judged GROUP BY main_id),
item_subtasks AS (
  SELECT main_id, avg(CASE WHEN all_true THEN 1.0 ELSE 0.0 END) AS share_subtasks
  FROM subtasks GROUP BY main_id),
counts AS (
  SELECT count(DISTINCT main_id) AS items, count(*) AS questions,
         count(*) - count(answer) AS unjudged
  FROM ${table})
SELECT '${table}'                                                          AS "table",
       c.items                                                             AS items,
       (SELECT count(*) FROM items)                                        AS judged_items,
       c.questions                                                         AS questions,
       c.unjudged                                                          AS unjudged,
       (SELECT round(avg(CASE WHEN all_true THEN 1.0 ELSE 0.0 END), 4) FROM items) AS task_level_acc,
       (SELECT round(avg(share_true), 4) FROM items)                       AS constraint_level_acc,
       (SELECT round(avg(share_subtasks), 4) FROM item_subtasks)           AS subtask_level_acc
FROM counts c;
