-- Bounds on command output (CONTROL_PLANE_COMMAND_OUTPUT_MAX_BYTES) and its retention
-- (CONTROL_PLANE_COMMAND_RETENTION_DAYS).
--   output_bytes: bytes of output stored for the target, stdout and stderr together. The cap
--     is checked against this count, not against offsets alone, so chunks that overlap or
--     repeat at new offsets cannot store more than the cap either. It stays after the
--     output is deleted: how much there was.
--   output_truncated_at_bytes: the cap (in bytes) the output was cut at; NULL while it is
--     complete.
--   output_deleted_at: when the retention sweep deleted the output (unix seconds).
ALTER TABLE command_targets ADD COLUMN output_bytes BIGINT NOT NULL DEFAULT 0;
ALTER TABLE command_targets ADD COLUMN output_truncated_at_bytes BIGINT;
ALTER TABLE command_targets ADD COLUMN output_deleted_at BIGINT;

-- Output stored before the cap existed counts against it.
UPDATE command_targets SET output_bytes = stored.bytes
FROM (SELECT target_id, SUM(LENGTH(data)) AS bytes FROM command_logs GROUP BY target_id) stored
WHERE stored.target_id = command_targets.target_id;

-- The targets whose output the retention sweep has yet to delete, oldest change first; a
-- target leaves the index once its output is deleted, so the sweep never scans old ones.
CREATE INDEX command_targets_output_kept ON command_targets (updated_at)
    WHERE output_deleted_at IS NULL;
