//! Integration tests of the agent library against real PostgreSQL, Redis, podman's Docker API
//! and a real HTTP receiver. Services come from `scripts/services` (run by `scripts/test`);
//! a missing one fails the test with the command to run.

mod commands;
mod delivery;
mod local_api;
mod packages;
mod plugins;
mod receiver;
mod reconnect;
mod services;
mod support;
