-- InfoBench's DRFR (Decomposed Requirements Following Ratio) of a table of yes/no answers
-- (one row per decomposed question, `kind: yes_no`), overall (by='all') or per slice
-- (by=subset, by=category, by=label). Three figures, named for what they count:
-- - `drfr` (the headline): the reference's own figure, `bool_ratio` of qinyiwei/InfoBench
--   evaluation.py: YES ÷ the questions the judge answered (`asked`). An answer with no
--   YES/NO counts as NO (the script stores None, which `if eva_value` counts false); the
--   questions never asked after it, and the items with no response (the script skips them
--   before asking), are not in the denominator. A judge request that failed for good is
--   left out too (the script retries it until it succeeds).
-- - `drfr_judged`: YES ÷ the questions with a readable YES/NO (`judged`).
-- - `drfr_all`: YES ÷ every question; anything not answered YES counts as NO.
-- Usage: ifloom sql --run runs/NAME -f sql/drfr.sql --param table=infobench_answers --param by=subset
SELECT '${table}'                                                          AS "table",
       slice,
       round(avg(CASE WHEN answer_ref THEN 1.0 WHEN NOT answer_ref THEN 0.0 END), 4) AS drfr,
       round(avg(CASE WHEN answer THEN 1.0 WHEN NOT answer THEN 0.0 END), 4) AS drfr_judged,
       round(sum(CASE WHEN answer THEN 1.0 ELSE 0.0 END) / count(*), 4)    AS drfr_all,
       count(*)                                                            AS questions,
       count(answer_ref)                                                   AS asked,
       count(answer)                                                       AS judged,
       count(*) - count(answer)                                            AS unjudged,
       sum(CASE WHEN answer THEN 1 ELSE 0 END)                             AS yes
FROM (SELECT CAST(${by} AS VARCHAR) AS slice, answer, answer_ref FROM ${table})
GROUP BY slice
ORDER BY slice;
