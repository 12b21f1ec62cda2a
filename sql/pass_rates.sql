-- Pass rates of a verdict table (one row per judged response). An instruction is the group of
-- responses sharing `${instruction}`. SFT pass rate: share of instructions with at least one
-- passing response; DPO pass rate: share with at least one passing and one failing response;
-- response pass rate: pass / (pass + fail); unjudged responses (the judge's answer did not
-- parse or left a question out) count in neither and have their own rate.
-- Usage: ifloom sql --run runs/NAME -f sql/pass_rates.sql --param table=judged \
--          --param "instruction=source_id || '/' || CAST(round AS VARCHAR)"
WITH per AS (
  SELECT ${instruction}                                          AS instruction,
         sum(CASE WHEN verdict = 'pass' THEN 1 ELSE 0 END)       AS n_pass,
         sum(CASE WHEN verdict = 'fail' THEN 1 ELSE 0 END)       AS n_fail,
         sum(CASE WHEN verdict = 'unjudged' THEN 1 ELSE 0 END)   AS n_unjudged
  FROM ${table}
  GROUP BY 1)
SELECT '${table}'                                                                 AS "table",
       count(*)                                                                  AS instructions,
       sum(n_pass + n_fail + n_unjudged)                                         AS responses,
       sum(n_pass)                                                               AS pass,
       sum(n_fail)                                                               AS fail,
       sum(n_unjudged)                                                           AS unjudged,
       round(avg(CASE WHEN n_pass > 0 THEN 1.0 ELSE 0.0 END), 4)                 AS sft_pass_rate,
       round(avg(CASE WHEN n_pass > 0 AND n_fail > 0 THEN 1.0 ELSE 0.0 END), 4)  AS dpo_pass_rate,
       round(CAST(sum(n_pass) AS DOUBLE) / nullif(sum(n_pass + n_fail), 0), 4)   AS response_pass_rate,
       round(CAST(sum(n_unjudged) AS DOUBLE) / nullif(sum(n_pass + n_fail + n_unjudged), 0), 4)
                                                                                 AS judge_parse_failure_rate
FROM per;
