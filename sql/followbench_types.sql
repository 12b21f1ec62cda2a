-- FollowBench per constraint type (content, situation, style, format, example, mixed) and
-- over all types ('all': the mean over types): HSR and SSR as the mean over levels 1-5 of the
-- type's rates at each level (sql/followbench_cells.sql), the same weighted by level as the
-- reference's aggregator.py scores them ((l1 + 2 l2 + 3 l3 + 4 l4 + 5 l5) / 15), and CSL,
-- the consistent satisfaction levels: per instruction group (an `example_id` of a type, its
-- levels 1-5) the number of consecutive levels from level 1 whose constraints are all
-- satisfied, averaged over groups. A group's CSL is known when the first level not
-- satisfied failed (or all passed); when that level has no verdict the group is left out
-- of CSL and counted in `csl_undetermined` (the reference counts -1 as a failure there).
-- Usage: ifloom sql --run runs/NAME -f sql/followbench_types.sql --param table=followbench
WITH cells AS (
  SELECT constraint_type, level, count(*) AS n, count(hard) AS evaluated,
         avg(CASE WHEN hard THEN 1.0 WHEN NOT hard THEN 0.0 END) AS hsr,
         avg(soft) AS ssr
  FROM ${table}
  GROUP BY constraint_type, level),
rates AS (
  SELECT constraint_type, sum(n) AS instructions, sum(n) - sum(evaluated) AS unjudged,
         avg(hsr) AS hsr, avg(ssr) AS ssr,
         sum(level * hsr) / sum(CASE WHEN hsr IS NOT NULL THEN level END) AS hsr_weighted,
         sum(level * ssr) / sum(CASE WHEN ssr IS NOT NULL THEN level END) AS ssr_weighted
  FROM cells
  GROUP BY constraint_type),
groups AS (
  SELECT constraint_type, example_id,
         min(CASE WHEN NOT coalesce(hard, false) THEN level END) AS first_not_met,
         min(CASE WHEN NOT hard THEN level END)                  AS first_failed,
         max(level)                                              AS top
  FROM ${table}
  GROUP BY constraint_type, example_id),
consistency AS (
  SELECT constraint_type, count(*) AS groups,
         count(csl) AS csl_groups, avg(csl) AS csl
  FROM (SELECT constraint_type,
               CASE WHEN first_not_met IS NULL THEN top
                    WHEN first_not_met = first_failed THEN first_not_met - 1 END AS csl
        FROM groups)
  GROUP BY constraint_type),
per_type AS (
  SELECT r.constraint_type, c.groups, r.instructions, r.unjudged, r.hsr, r.ssr,
         r.hsr_weighted, r.ssr_weighted, c.csl_groups, c.csl
  FROM rates r JOIN consistency c ON c.constraint_type = r.constraint_type),
with_all AS (
  SELECT 0 AS ord, * FROM per_type
  UNION ALL
  SELECT 1, 'all', sum(groups), sum(instructions), sum(unjudged), avg(hsr), avg(ssr),
         avg(hsr_weighted), avg(ssr_weighted), sum(csl_groups), avg(csl)
  FROM per_type)
SELECT '${table}'                   AS "table",
       constraint_type,
       groups,
       instructions,
       unjudged,
       round(hsr, 4)                AS hsr,
       round(ssr, 4)                AS ssr,
       round(hsr_weighted, 4)       AS hsr_weighted,
       round(ssr_weighted, 4)       AS ssr_weighted,
       groups - csl_groups          AS csl_undetermined,
       round(csl, 4)                AS csl
FROM with_all
ORDER BY ord, constraint_type;
