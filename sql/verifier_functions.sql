-- AutoIF's cross-validation of LLM-written verifier functions (a `cross_validate` table, one
-- row per instruction): how many answers parsed and compiled, distinct functions and test
-- cases, how many survived, and the instructions kept; with by=drop_reason, the instructions
-- per reason they were dropped (null: kept).
-- Usage: ifloom sql --run runs/NAME -f sql/verifier_functions.sql --param table=verified_instructions --param by="'all'"
SELECT '${table}'                                   AS "table",
       slice,
       count(*)                                     AS instructions,
       sum(CASE WHEN kept THEN 1 ELSE 0 END)        AS kept,
       sum(n_answers)                               AS answers,
       sum(n_parsed)                                AS parsed,
       sum(n_compiled)                              AS compiled,
       sum(n_functions)                             AS functions,
       sum(cardinality(kept_functions))             AS functions_kept,
       sum(n_cases)                                 AS cases,
       sum(coalesce(n_cases_kept, 0))               AS cases_kept
FROM (SELECT CAST(${by} AS VARCHAR) AS slice, * FROM ${table})
GROUP BY slice
ORDER BY slice;
