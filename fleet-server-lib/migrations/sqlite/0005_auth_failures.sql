-- Failed role-token checks per client address and minute, so that replicas sharing the
-- database hold a guesser back together instead of each granting its own allowance.
-- Rows of minutes past the message-id retention are pruned with the message ids.
CREATE TABLE auth_failures (
    client TEXT NOT NULL,
    minute BIGINT NOT NULL,
    failures BIGINT NOT NULL,
    PRIMARY KEY (client, minute)
);
CREATE INDEX auth_failures_minute ON auth_failures (minute);
