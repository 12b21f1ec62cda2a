-- What a dedup stage removed: each removed row next to the row it duplicates.
-- Usage: ifloom sql --run runs/NAME -f sql/duplicates_removed.sql --param stage=S --param column=C
SELECT r._id, r.${column} AS removed, k.${column} AS kept
FROM ${stage}__removed r
JOIN ${stage} k ON k._id = r._duplicate_of
ORDER BY r._id;
