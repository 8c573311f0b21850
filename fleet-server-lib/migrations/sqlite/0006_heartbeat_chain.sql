-- The time series without an index by installation. Each heartbeat row points to the
-- installation's heartbeat before it, and the installation to its newest one, so the recent
-- heartbeats of one installation are found by following the links from the installation
-- row, which every heartbeat rewrites anyway. The index (installation_id, id) it replaces
-- took an entry at a random place for every heartbeat: about one more page for SQLite to
-- write to the WAL at each commit, per heartbeat.
ALTER TABLE heartbeats ADD COLUMN previous_id BIGINT;
ALTER TABLE installations ADD COLUMN last_heartbeat_id BIGINT;

-- Link the rows already stored, while the old index can still find them.
UPDATE heartbeats SET previous_id = (
    SELECT MAX(h.id) FROM heartbeats h
    WHERE h.installation_id = heartbeats.installation_id AND h.id < heartbeats.id
);
UPDATE installations SET last_heartbeat_id = (
    SELECT MAX(h.id) FROM heartbeats h WHERE h.installation_id = installations.id
);

DROP INDEX heartbeats_installation;
