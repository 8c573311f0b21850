-- Browser sessions of the dashboard: /login creates one and gives the browser only its random
-- id, in the cp_token cookie. Rows hold the SHA-256 of that id, never the id itself, so a copy
-- of the database logs nobody in. token_fingerprint ties a session to the role token it was
-- created with: once that token is rotated, the session is refused. Expired rows are deleted
-- by the periodic sweep.
CREATE TABLE dashboard_sessions (
    id_hash TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    token_fingerprint TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX dashboard_sessions_expires_at ON dashboard_sessions (expires_at);
