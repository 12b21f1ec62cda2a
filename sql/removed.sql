-- What the stages that remove rows (dedup, minhash, decontaminate) removed, and why (clusters found by
-- minhash, hits per reference set of decontaminate).
-- Usage: ifloom sql --run runs/NAME -f sql/removed.sql
SELECT s.id AS stage, s.kind, c.name AS counter, c.value
FROM ifloom_stages s
JOIN ifloom_counters c ON c.stage = s.id
WHERE array_has(s.capabilities, 'removes_rows')
ORDER BY s.finished_at, s.id, c.name;
