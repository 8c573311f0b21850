-- Remote commands (issue 6). Times are unix seconds; JSON is stored as text.
CREATE TABLE commands (
    id TEXT PRIMARY KEY,
    command_type TEXT NOT NULL,
    payload TEXT NOT NULL,
    max_concurrency BIGINT,
    max_errors TEXT,
    -- running, completed, cancelled, halted (max_errors passed)
    status TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    finished_at BIGINT
);

-- One row per target; target_id is the command id the agent sees (unique per target), so
-- an agent's log chunks and results name exactly one row.
CREATE TABLE command_targets (
    target_id TEXT PRIMARY KEY,
    command_id TEXT NOT NULL REFERENCES commands (id),
    instance_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    status TEXT NOT NULL,
    sent_at BIGINT,
    updated_at BIGINT NOT NULL,
    exit_code BIGINT,
    error TEXT,
    logs TEXT,
    data TEXT
);
CREATE INDEX command_targets_command ON command_targets (command_id, seq);
CREATE INDEX command_targets_instance ON command_targets (instance_id, status);

-- Output, stored once per (target, stream, offset): a redelivered chunk changes nothing.
CREATE TABLE command_logs (
    target_id TEXT NOT NULL,
    stream TEXT NOT NULL,
    pos BIGINT NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (target_id, stream, pos)
);

-- One-time enrollment tokens, stored as SHA-256 hex.
CREATE TABLE enrollment_tokens (
    token_hash TEXT PRIMARY KEY,
    instance_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT
);

-- Secrets issued at enrollment are derived from the server key and this nonce; the secret
-- itself is never stored.
CREATE TABLE issued_secrets (
    instance_id TEXT PRIMARY KEY,
    nonce TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
