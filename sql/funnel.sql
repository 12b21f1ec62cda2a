-- The funnel: for every stage (side tables left out) the rows it read, the rows it wrote, the
-- share kept and why rows went (an export keeps its input as its table: its reason says how many
-- records went into the files). Stages are described by what their kind can do
-- (`ifloom_stages.capabilities`). A stage reading several tables (a join, a union of rounds)
-- shows the tables it combines instead of a ratio.
-- Usage: ifloom sql --run runs/NAME -f sql/funnel.sql
WITH c AS (
  SELECT stage,
         sum(CASE WHEN name = 'removed' THEN value ELSE 0 END)        AS removed,
         sum(CASE WHEN name = 'failures' THEN value ELSE 0 END)       AS failures,
         sum(CASE WHEN name = 'parse_failures' THEN value ELSE 0 END) AS parse_failures,
         sum(CASE WHEN name = 'unjudged' THEN value ELSE 0 END)       AS unjudged,
         sum(CASE WHEN name = 'written' THEN value ELSE 0 END)        AS written,
         sum(CASE WHEN name = 'skipped' THEN value ELSE 0 END)        AS skipped,
         sum(CASE WHEN name = 'truncated' THEN value ELSE 0 END)      AS truncated
  FROM ifloom_counters
  GROUP BY stage),
s AS (SELECT * FROM ifloom_stages WHERE kind NOT LIKE '%:%')
SELECT s.id                                                   AS stage,
       s.kind,
       CASE WHEN s.parents = '' THEN '' ELSE s.parents END     AS from_tables,
       p.rows                                                 AS rows_in,
       s.rows                                                 AS rows_out,
       CASE WHEN p.rows > 0 THEN round(CAST(s.rows AS DOUBLE) / p.rows, 4) END AS kept,
       CASE
         WHEN s.kind = 'input' THEN 'input'
         WHEN p.rows IS NULL THEN 'combines ' || s.parents
         WHEN array_has(s.capabilities, 'removes_rows')
           THEN CAST(coalesce(c.removed, 0) AS VARCHAR) || ' ' || s.removed_rows
         WHEN array_has(s.capabilities, 'sends_requests')
           THEN CAST(coalesce(c.failures, 0) AS VARCHAR) || ' request failures (dead-lettered), '
                                  || CAST(coalesce(c.parse_failures, 0) AS VARCHAR) || ' parse failures (kept, unparsed)'
         WHEN s.kind = 'export' THEN CAST(coalesce(c.written, 0) AS VARCHAR) || ' records written, '
                                     || CAST(coalesce(c.skipped, 0) AS VARCHAR) || ' empty skipped, '
                                     || CAST(coalesce(c.truncated, 0) AS VARCHAR) || ' truncated left out'
         WHEN array_has(s.capabilities, 'produces_verdicts')
           THEN CAST(coalesce(c.unjudged, 0) AS VARCHAR) || ' unjudged (kept, in neither SFT nor DPO)'
         WHEN s.rows < p.rows THEN CAST(p.rows - s.rows AS VARCHAR) || ' filtered out by the stage''s query'
         WHEN s.rows > p.rows THEN 'one input row became several'
         ELSE ''
       END                                                    AS reason
FROM s
LEFT JOIN ifloom_stages p ON p.id = s.parents
LEFT JOIN c ON c.stage = s.id
ORDER BY s.finished_at, s.id;
