-- InfoBench's DRFR (Decomposed Requirements Following Ratio) of a table of yes/no answers
-- (one row per decomposed question, `kind: yes_no`): the share of YES among the questions
-- the judge answered, overall (by='all') or per slice (by=subset, by=category, by=label).
-- Questions without an answer (no YES/NO in the judge's text, request failed, not asked
-- after such an answer, no response) are left out of `drfr` and counted in `unjudged`;
-- `drfr_all` counts them as NO, as the reference script's bool_ratio does.
-- Usage: ifloom sql --run runs/NAME -f sql/drfr.sql --param table=infobench_answers --param by=subset
SELECT '${table}'                                                          AS "table",
       slice,
       count(*)                                                            AS questions,
       count(answer)                                                       AS judged,
       count(*) - count(answer)                                            AS unjudged,
       sum(CASE WHEN answer THEN 1 ELSE 0 END)                             AS yes,
       round(avg(CASE WHEN answer THEN 1.0 WHEN NOT answer THEN 0.0 END), 4) AS drfr,
       round(sum(CASE WHEN answer THEN 1.0 ELSE 0.0 END) / count(*), 4)    AS drfr_all
FROM (SELECT CAST(${by} AS VARCHAR) AS slice, answer FROM ${table})
GROUP BY slice
ORDER BY slice;
