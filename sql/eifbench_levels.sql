-- EIFBench's three levels (Complex-IF EIFBench/8_metric.py) of a table of yes/no answers with
-- one row per scoring question (`main_id`, `sub_instruction_id`, `answer`, `answer_ref`): the
-- task level is the share of items whose judgements are all true; the constraint level the
-- mean over items of the share of true judgements; the sub-task level the mean over items of
-- the share of sub-instructions whose judgements are all true.
-- The headline levels are the reference's: every judgement counts (`answer_ref`: a text with
-- neither 是 nor 否 is 否, as 6_evaluation.py reads it; an item without a response is judged
-- on the text "None" by the pipeline, as the script does); only judge requests that failed
-- (the script's "Err") are left out, and an item with no judgement left is out of the levels.
-- The `readable_*` levels count only the judgements with a readable 是/否 (`answer`).
-- Usage: ifloom sql --run runs/NAME -f sql/eifbench_levels.sql --param table=eifbench_answers
WITH judged AS (
  SELECT main_id, sub_instruction_id, answer_ref AS ok FROM ${table} WHERE answer_ref IS NOT NULL),
readable AS (
  SELECT main_id, sub_instruction_id, answer AS ok FROM ${table} WHERE answer IS NOT NULL),
ref_subtasks AS (
  SELECT main_id, bool_and(ok) AS all_true FROM judged GROUP BY main_id, sub_instruction_id),
ref_items AS (
  SELECT main_id, bool_and(ok) AS all_true, avg(CASE WHEN ok THEN 1.0 ELSE 0.0 END) AS share_true
  FROM judged GROUP BY main_id),
ref_item_subtasks AS (
  SELECT main_id, avg(CASE WHEN all_true THEN 1.0 ELSE 0.0 END) AS share_subtasks
  FROM ref_subtasks GROUP BY main_id),
rd_subtasks AS (
  SELECT main_id, bool_and(ok) AS all_true FROM readable GROUP BY main_id, sub_instruction_id),
rd_items AS (
  SELECT main_id, bool_and(ok) AS all_true, avg(CASE WHEN ok THEN 1.0 ELSE 0.0 END) AS share_true
  FROM readable GROUP BY main_id),
rd_item_subtasks AS (
  SELECT main_id, avg(CASE WHEN all_true THEN 1.0 ELSE 0.0 END) AS share_subtasks
  FROM rd_subtasks GROUP BY main_id),
counts AS (
  SELECT count(DISTINCT main_id) AS items, count(*) AS questions,
         count(answer_ref) AS judged, count(answer) AS readable
  FROM ${table})
SELECT '${table}'                                                          AS "table",
       (SELECT round(avg(CASE WHEN all_true THEN 1.0 ELSE 0.0 END), 4) FROM ref_items) AS task_level_acc,
       (SELECT round(avg(share_true), 4) FROM ref_items)                   AS constraint_level_acc,
       (SELECT round(avg(share_subtasks), 4) FROM ref_item_subtasks)       AS subtask_level_acc,
       (SELECT round(avg(CASE WHEN all_true THEN 1.0 ELSE 0.0 END), 4) FROM rd_items) AS readable_task_level_acc,
       (SELECT round(avg(share_true), 4) FROM rd_items)                    AS readable_constraint_level_acc,
       (SELECT round(avg(share_subtasks), 4) FROM rd_item_subtasks)        AS readable_subtask_level_acc,
       c.items                                                             AS items,
       (SELECT count(*) FROM ref_items)                                    AS judged_items,
       c.questions                                                         AS questions,
       c.judged                                                            AS judged,
       c.questions - c.judged                                              AS unjudged,
       c.readable                                                          AS readable,
       c.judged - c.readable                                               AS unreadable
FROM counts c;
