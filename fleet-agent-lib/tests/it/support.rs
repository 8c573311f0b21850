//! Shared helpers: service URLs from the environment, temporary directories, test configs and
//! a small "application" server standing in for the instance's storage, ops and metrics
//! endpoints.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use fleet_agent::AgentConfig;
use fleet_core::Secret;

pub const INSTANCE: &str = "it-agent-001";
pub const SECRET: &str = "it-agent-secret";
pub const OPS_TOKEN: &str = "ops-token";

/// A service URL the test command exports; panics with the fix when it is missing.
pub fn service_env(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "{name} is not set: these tests need real services. Run `eval \"$(scripts/services \
             postgres redis podman)\"` first, or run scripts/test."
        ),
    }
}

/// A fresh directory under the system temp dir.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "fleet-agent-it-{name}-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A config with fast intervals, no built-in sources configured, local API on a free port.
pub fn config(control_plane: &str, dir: &std::path::Path) -> AgentConfig {
    let mut c = AgentConfig::new(INSTANCE, control_plane, Secret::new(SECRET).unwrap());
    c.heartbeat_interval = Duration::from_millis(200);
    c.local_port = 0;
    c.state_path = dir.join("state.db");
    c.metrics_url = None;
    c.containers_interval = Duration::ZERO;
    c.buffer.backoff_base = Duration::from_millis(50);
    c.buffer.backoff_max = Duration::from_millis(500);
    c
}

pub const METRICS_TEXT: &str = "\
# TYPE http_request_duration_ms summary
http_request_duration_ms{quantile=\"0.95\"} 180
http_requests_total{status=\"200\"} 95
http_requests_total{status=\"500\"} 5
webhooks_total 10
webhook_retries_total 1
";

/// Starts the stand-in application: `/storage/health` (200), `/ops` and `/events/stats`
/// (Bearer [`OPS_TOKEN`]), `/metrics` (Prometheus text), `/region/down` (503).
pub async fn start_app() -> SocketAddr {
    async fn ops(headers: HeaderMap) -> impl IntoResponse {
        let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
        if auth != Some(&format!("Bearer {OPS_TOKEN}")) {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        axum::Json(serde_json::json!({
            "jobFailures": [{"queue": "billing", "message": "Timeout"}],
            "jobsProcessed1h": 42,
            "jobsPending": 3,
            "secrets": {"expired": 1, "unverified": 2}
        }))
        .into_response()
    }
    async fn events(headers: HeaderMap) -> impl IntoResponse {
        let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
        if auth != Some(&format!("Bearer {OPS_TOKEN}")) {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        axum::Json(serde_json::json!({"total1h": 120, "failed1h": 2, "avgLagMs": 35.5}))
            .into_response()
    }
    let app = Router::new()
        .route("/storage/health", get(|| async { "ok" }))
        .route("/events/stats", get(events))
        .route(
            "/region/down",
            get(|| async { StatusCode::SERVICE_UNAVAILABLE }),
        )
        .route("/ops", get(ops))
        .route("/metrics", get(|| async { METRICS_TEXT }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// Waits until `cond` holds, up to `secs`.
pub async fn wait_until(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    cond()
}
