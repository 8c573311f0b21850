-- Releases, rollouts and their jobs; plugin marketplace; restore verification (SQLite).
CREATE TABLE releases (
    id INTEGER PRIMARY KEY,
    version TEXT NOT NULL,
    channel TEXT NOT NULL,
    scheme TEXT NOT NULL,
    manifest TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (channel, version)
);

CREATE TABLE rollouts (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    release_id BIGINT,
    plugin_release_id BIGINT,
    plugin_action TEXT,
    channel TEXT NOT NULL,
    settings TEXT NOT NULL,
    failure_threshold TEXT NOT NULL,
    auto_advance BOOLEAN NOT NULL,
    observe_secs BIGINT NOT NULL,
    status TEXT NOT NULL,
    current_batch BIGINT NOT NULL,
    batch_count BIGINT NOT NULL,
    halt_reason TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- Every target of a rollout, frozen at creation: `queued` until its batch starts.
CREATE TABLE rollout_jobs (
    id INTEGER PRIMARY KEY,
    rollout_id BIGINT REFERENCES rollouts (id),
    payload TEXT,
    kind TEXT NOT NULL,
    batch BIGINT NOT NULL,
    instance_id TEXT NOT NULL,
    status TEXT NOT NULL,
    step TEXT,
    error TEXT,
    canary_percent BIGINT,
    metrics TEXT,
    duration_ms BIGINT,
    output_tail TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT
);
CREATE INDEX rollout_jobs_rollout ON rollout_jobs (rollout_id, batch);
CREATE INDEX rollout_jobs_next ON rollout_jobs (instance_id, kind, status, id);

-- Each report as received (the job row holds the latest).
CREATE TABLE rollout_job_events (
    id INTEGER PRIMARY KEY,
    job_id BIGINT NOT NULL REFERENCES rollout_jobs (id),
    status TEXT NOT NULL,
    step TEXT,
    error TEXT,
    created_at BIGINT NOT NULL
);
CREATE INDEX rollout_job_events_job ON rollout_job_events (job_id, id);

CREATE TABLE plugin_releases (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    compatible TEXT NOT NULL,
    approved BOOLEAN NOT NULL,
    notes TEXT,
    created_at BIGINT NOT NULL,
    UNIQUE (name, version)
);

CREATE TABLE plugin_requests (
    id INTEGER PRIMARY KEY,
    instance_id TEXT NOT NULL,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    action TEXT NOT NULL,
    reason TEXT,
    status TEXT NOT NULL,
    job_id BIGINT,
    created_at BIGINT NOT NULL,
    decided_at BIGINT
);

CREATE TABLE restores (
    id INTEGER PRIMARY KEY,
    installation_id BIGINT NOT NULL REFERENCES installations (id),
    instance_id TEXT NOT NULL,
    environment TEXT NOT NULL,
    backup_id TEXT,
    status TEXT NOT NULL,
    error TEXT,
    duration_ms BIGINT,
    output_tail TEXT,
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT
);
CREATE INDEX restores_instance ON restores (instance_id, status, id);
