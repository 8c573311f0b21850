//! Integration tests: the real server on 127.0.0.1:0, real HTTP, real SQLite and
//! PostgreSQL (`FLEET_TEST_POSTGRES_URL`), a real headless Chromium (`FLEET_TEST_CHROMIUM`).

mod alerts;
mod api;
mod archive;
mod auth;
mod browser;
mod commands;
mod compose;
mod hostile;
mod ingest;
mod jobs_waiting;
mod marketplace;
mod pages;
mod restores;
mod rollout_auth;
mod rollouts;
mod sessions;
mod store;
mod support;
mod webhook;
