-- Rows each decontaminating stage removed per reference set (benchmark): rows sharing an
-- n-gram with the set, and rows sharing none that are near duplicates of one of its texts
-- (counted only where `near_dup_threshold` is set). A row can count for several sets.
-- Usage: ifloom sql --run runs/NAME -f sql/contamination.sql
SELECT stage, reference,
       sum(CASE WHEN kind = 'hits' THEN value ELSE 0 END)      AS ngram_rows,
       sum(CASE WHEN kind = 'near_dups' THEN value ELSE 0 END) AS near_dup_rows
FROM (SELECT s.id AS stage, s.finished_at,
             regexp_replace(c.name, '^(hits|near_dups)_', '') AS reference,
             CASE WHEN starts_with(c.name, 'hits_') THEN 'hits' ELSE 'near_dups' END AS kind,
             c.value
      FROM ifloom_stages s
      JOIN ifloom_counters c ON c.stage = s.id
      WHERE array_has(s.capabilities, 'matches_references')
        AND (starts_with(c.name, 'hits_') OR starts_with(c.name, 'near_dups_')))
GROUP BY stage, reference
ORDER BY min(finished_at), stage, reference;
