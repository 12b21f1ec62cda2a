-- IFEval's four accuracies of a table of `ifeval` verdicts (one row per response): prompt
-- level (every instruction of the prompt followed) and instruction level (each instruction
-- on its own), strict and loose, named as lm-eval names them. Instructions that could not be
-- checked (unknown id, bad kwargs: `ifeval_error` says why) are left out of the rates and
-- counted in `unchecked`; a prompt with one of them is left out of the prompt-level rates.
-- Usage: ifloom sql --run runs/NAME -f sql/ifeval_accuracy.sql --param table=ifeval_verdicts
WITH prompts AS (
  SELECT count(*)                                                            AS prompts,
         avg(CASE WHEN prompt_strict THEN 1.0 WHEN NOT prompt_strict THEN 0.0 END) AS strict_acc,
         avg(CASE WHEN prompt_loose THEN 1.0 WHEN NOT prompt_loose THEN 0.0 END)   AS loose_acc
  FROM ${table}),
instructions AS (
  SELECT count(*)                                              AS instructions,
         count(*) - count(s)                                   AS unchecked,
         avg(CASE WHEN s THEN 1.0 WHEN NOT s THEN 0.0 END)     AS strict_acc,
         avg(CASE WHEN l THEN 1.0 WHEN NOT l THEN 0.0 END)     AS loose_acc
  FROM (SELECT unnest(strict) AS s, unnest(loose) AS l FROM ${table}))
SELECT '${table}'                        AS "table",
       p.prompts                         AS prompts,
       i.instructions                    AS instructions,
       round(p.strict_acc, 4)            AS prompt_level_strict_acc,
       round(i.strict_acc, 4)            AS inst_level_strict_acc,
       round(p.loose_acc, 4)             AS prompt_level_loose_acc,
       round(i.loose_acc, 4)             AS inst_level_loose_acc,
       i.unchecked                       AS unchecked
FROM prompts p CROSS JOIN instructions i;
