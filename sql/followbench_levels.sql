-- FollowBench's HSR and SSR per constraint level (1-5), as the paper's level-categorized
-- results give them: the mean over constraint types of each type's rate at that level (see
-- sql/followbench_cells.sql for the rates and what is left out). A type with no verdict at a
-- level is left out of that level's mean.
-- Usage: ifloom sql --run runs/NAME -f sql/followbench_levels.sql --param table=followbench
WITH cells AS (
  SELECT constraint_type, level, count(*) AS n, count(hard) AS evaluated,
         avg(CASE WHEN hard THEN 1.0 WHEN NOT hard THEN 0.0 END) AS hsr,
         avg(soft) AS ssr
  FROM ${table}
  GROUP BY constraint_type, level)
SELECT '${table}'                   AS "table",
       level,
       count(hsr)                   AS constraint_types,
       sum(n)                       AS instructions,
       sum(n) - sum(evaluated)      AS unjudged,
       round(avg(hsr), 4)           AS hsr,
       round(avg(ssr), 4)           AS ssr
FROM cells
GROUP BY level
ORDER BY level;
