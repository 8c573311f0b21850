-- An installation an operator archived (its customer left): hidden from the list, skipped
-- by the offline sweep, rollouts and restore scheduling, until a heartbeat brings it back.
-- Unix seconds; NULL while it is active, which every existing row is.
-- No index: every heartbeat rewrites its installation row (setting this column to NULL),
-- and an indexed column changed by that update would rule out HOT updates. The list and
-- the sweeps scan the table anyway.
ALTER TABLE installations ADD COLUMN archived_at BIGINT;
