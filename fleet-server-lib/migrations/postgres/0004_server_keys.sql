-- Keys the control plane generates for itself when none is configured, so that they survive
-- restarts and replicas sharing the database use the same one (e.g. the key that signs agent
-- tokens and derives the secrets issued at enrollment).
CREATE TABLE server_keys (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
