-- An installation an operator archived (its customer left): hidden from the list, skipped
-- by the offline sweep, rollouts and restore scheduling, until a heartbeat brings it back.
-- Unix seconds; NULL while it is active, which every existing row is.
-- No index: every heartbeat rewrites its installation row (setting this column to NULL),
-- and an index would be one more entry to rewrite on each of them.
ALTER TABLE installations ADD COLUMN archived_at BIGINT;
