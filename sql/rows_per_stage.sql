-- Rows, size and time of every finished table of a run (side tables such as dedup's
-- `<id>__removed` included), in the order they finished.
-- Usage: ifloom sql --run runs/NAME -f sql/rows_per_stage.sql
SELECT id, kind, rows, bytes, duration_ms
FROM ifloom_stages
ORDER BY finished_at, id;
