-- Control-plane schema (SQLite). Times are unix seconds; JSON is stored as text.
CREATE TABLE installations (
    id INTEGER PRIMARY KEY,
    instance_id TEXT NOT NULL UNIQUE,
    domain TEXT,
    client TEXT,
    version TEXT,
    release_channel TEXT,
    health TEXT,
    scheme TEXT,
    enrolled_at BIGINT,
    first_seen_at BIGINT,
    last_seen_at BIGINT,
    last_backup_checksum TEXT,
    state TEXT
);
-- No index on last_seen_at: every heartbeat changes it, and an index would make every
-- update rewrite index entries (and, on PostgreSQL, rule out HOT updates). The offline
-- sweep scans the table instead, once per sweep.

CREATE TABLE heartbeats (
    id INTEGER PRIMARY KEY,
    installation_id BIGINT NOT NULL REFERENCES installations (id),
    received_at BIGINT NOT NULL,
    msg_id TEXT,
    figures TEXT NOT NULL
);
CREATE INDEX heartbeats_installation ON heartbeats (installation_id, id);

CREATE TABLE alerts (
    id INTEGER PRIMARY KEY,
    installation_id BIGINT NOT NULL REFERENCES installations (id),
    level TEXT NOT NULL,
    kind TEXT NOT NULL,
    dedup_key TEXT,
    message TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    resolved_at BIGINT,
    acknowledged_at BIGINT,
    acknowledged_by TEXT
);
CREATE INDEX alerts_installation ON alerts (installation_id, id);
-- One open alert per installation and key: this is what deduplicates SLO alerts.
CREATE UNIQUE INDEX alerts_open_key ON alerts (installation_id, dedup_key)
    WHERE resolved_at IS NULL AND dedup_key IS NOT NULL;

CREATE TABLE job_failures (
    id INTEGER PRIMARY KEY,
    installation_id BIGINT NOT NULL REFERENCES installations (id),
    queue TEXT,
    message TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX job_failures_installation ON job_failures (installation_id, id);

CREATE TABLE backups (
    id INTEGER PRIMARY KEY,
    installation_id BIGINT NOT NULL REFERENCES installations (id),
    backup_id TEXT,
    checksum TEXT NOT NULL,
    size_bytes BIGINT,
    bucket TEXT,
    path TEXT,
    status TEXT,
    backup_at TEXT,
    recorded_at BIGINT NOT NULL
);
CREATE INDEX backups_installation ON backups (installation_id, id);

CREATE TABLE seen_messages (
    instance_id TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    signed_at BIGINT NOT NULL,
    seen_at BIGINT NOT NULL,
    -- msg_id first: ids of our agent are time-ordered (UUIDv7), so inserts append.
    PRIMARY KEY (msg_id, instance_id)
) WITHOUT ROWID;
CREATE INDEX seen_messages_seen_at ON seen_messages (seen_at);

CREATE TABLE webhook_outbox (
    id INTEGER PRIMARY KEY,
    alert_id BIGINT NOT NULL,
    payload TEXT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    delivered_at BIGINT,
    failed_at BIGINT,
    last_error TEXT
);
CREATE INDEX webhook_outbox_due ON webhook_outbox (next_attempt_at)
    WHERE delivered_at IS NULL AND failed_at IS NULL;
