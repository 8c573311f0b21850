//! The local API on `AGENT_PORT`: `GET /health`, `GET /diagnostic` (the ops endpoint),
//! `POST /smoke` (checks now), `GET /metrics` (the application's metrics) and
//! `GET /metrics/agent` (the agent's own).
//!
//! When `AGENT_LOCAL_TOKEN` is set every route needs it in `x-agent-local-token`, compared in
//! constant time. Unlike the ERP agent, a token is mandatory on a non-loopback address
//! (enforced when binding).
//!
//! Without a token (loopback only) a request is answered only when its `Host` is a loopback
//! name and no web page sent it: a page on another site could otherwise read `/diagnostic`
//! (fetched with the agent's `AGENT_OPS_TOKEN`) through DNS rebinding, its own name
//! resolving to 127.0.0.1. Local tools (curl, an application's health check) send
//! `Host: 127.0.0.1:4010` or `localhost` and no `Origin`, so they work as before.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use fleet_core::signing::constant_time_eq;
use serde_json::json;

use crate::agent::Shared;
use crate::collectors::fetch_limited;

/// The header carrying the local token.
pub const HEADER_LOCAL_TOKEN: &str = "x-agent-local-token";

/// The local API as a router over the agent's shared state.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/diagnostic", get(diagnostic))
        .route("/smoke", post(smoke))
        .route("/metrics", get(app_metrics))
        .route("/metrics/agent", get(agent_metrics))
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            require_token,
        ))
        .with_state(shared)
}

async fn require_token(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    match &shared.config.local_token {
        // With a token, the token decides, whatever the Host (a non-loopback bind is reached
        // by other names) or the Origin: a web page can only send the header if it knows
        // the token, and a cross-origin page cannot send it at all without a CORS preflight,
        // which this API never grants.
        Some(expected) => {
            let given = request
                .headers()
                .get(HEADER_LOCAL_TOKEN)
                .map(HeaderValue::as_bytes)
                .unwrap_or_default();
            if !constant_time_eq(given, expected.as_bytes()) {
                return (
                    StatusCode::UNAUTHORIZED,
                    axum::Json(json!({"error": "unauthorized"})),
                )
                    .into_response();
            }
        }
        None => {
            if let Some(reason) = refusal_without_token(&request) {
                tracing::debug!(reason, "local API request refused");
                return (
                    StatusCode::FORBIDDEN,
                    format!("{reason}; set AGENT_LOCAL_TOKEN to serve other clients\n"),
                )
                    .into_response();
            }
        }
    }
    next.run(request).await
}

/// Why a request must not be answered without a token, if it must not: its `Host` is not a
/// loopback name (a DNS-rebound name, or an address other than loopback), or a web page sent
/// it (`Origin`, which browsers send on cross-origin requests, or a `Sec-Fetch-Site` naming
/// another site, which they send even where `Origin` is left out).
fn refusal_without_token(request: &Request) -> Option<&'static str> {
    let headers = request.headers();
    // HTTP/2 carries the authority in the URI rather than a Host header.
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()));
    if !host.is_some_and(is_loopback_host) {
        return Some(
            "the local API without AGENT_LOCAL_TOKEN answers only requests to 127.0.0.1, \
             localhost or [::1] (Host header)",
        );
    }
    if headers.contains_key(header::ORIGIN) {
        return Some(
            "the local API without AGENT_LOCAL_TOKEN does not answer web pages (Origin header)",
        );
    }
    let from_a_site = headers
        .get("sec-fetch-site")
        .is_some_and(|v| v != "none" && v != "same-origin");
    if from_a_site {
        return Some(
            "the local API without AGENT_LOCAL_TOKEN does not answer web pages \
             (Sec-Fetch-Site header)",
        );
    }
    None
}

/// Whether `host` (a `Host` header: a name or address, with or without a port) names this
/// machine's loopback interface: `localhost`, an IPv4 loopback address or `[::1]`.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((address, "")) => address,
            Some((address, port)) if port.strip_prefix(':').is_some_and(is_port) => address,
            _ => return false,
        },
        None => match host.rsplit_once(':') {
            Some((name, port)) if is_port(port) => name,
            Some(_) => return false,
            None => host,
        },
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A port number as written after the `:` (`4010`).
fn is_port(text: &str) -> bool {
    !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit())
}

async fn health(State(shared): State<Arc<Shared>>) -> Response {
    let c = &shared.config;
    let waiting = match shared.outbox.get() {
        Some(outbox) => outbox.stats().await.ok().map(|(n, _, _)| n),
        None => None,
    };
    let last = shared.stats.last_delivery_at.load(Ordering::Relaxed);
    axum::Json(json!({
        "ok": true,
        "instance_id": c.instance_id,
        "version": c.version,
        "agent_version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": shared.started.elapsed().as_secs(),
        "signature_scheme": c.signature_scheme.as_str(),
        "outbox_waiting": waiting,
        "last_delivery_at": (last > 0).then(|| crate::clock::rfc3339(last)),
    }))
    .into_response()
}

async fn diagnostic(State(shared): State<Arc<Shared>>) -> Response {
    let Some(ops) = &shared.ops else {
        // The ERP agent's answer, kept for scripts that read it.
        return axum::Json(json!({"ok": false, "error": "OPS URL not configured"})).into_response();
    };
    match ops.fetch().await {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(error) => (
            StatusCode::BAD_GATEWAY,
            axum::Json(json!({"ok": false, "error": error})),
        )
            .into_response(),
    }
}

async fn smoke(State(shared): State<Arc<Shared>>) -> Response {
    let checks = shared.run_checks().await;
    let ok_of = |name: &str| checks.iter().find(|r| r.name == name).map(|r| r.ok);
    axum::Json(json!({
        "ok": checks.iter().all(|r| r.ok),
        "db_ok": ok_of("db").unwrap_or(false),
        "redis_ok": ok_of("redis").unwrap_or(false),
        "storage_ok": ok_of("storage").unwrap_or(true),
        "search_ok": ok_of("search").unwrap_or(true),
        "checks": checks,
    }))
    .into_response()
}

async fn app_metrics(State(shared): State<Arc<Shared>>) -> Response {
    let Some(url) = &shared.config.metrics_url else {
        return (StatusCode::NOT_FOUND, "AGENT_METRICS_URL is not set\n").into_response();
    };
    match fetch_limited(shared.http.get(url)).await {
        Ok(body) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response(),
        Err(error) => (
            StatusCode::BAD_GATEWAY,
            format!("metrics unavailable: {error}\n"),
        )
            .into_response(),
    }
}

async fn agent_metrics(State(shared): State<Arc<Shared>>) -> Response {
    let s = &shared.stats;
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    let counter = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
    metric(
        "fleet_agent_heartbeats_total",
        "counter",
        "Heartbeats built.",
        counter(&s.heartbeats),
    );
    metric(
        "fleet_agent_messages_delivered_total",
        "counter",
        "Messages the control plane accepted.",
        counter(&s.delivered),
    );
    metric(
        "fleet_agent_send_failures_total",
        "counter",
        "Attempts that will be retried (network, timeout, 429, 5xx).",
        counter(&s.send_failures),
    );
    metric(
        "fleet_agent_unauthorized_total",
        "counter",
        "Attempts answered 401 or 403.",
        counter(&s.unauthorized),
    );
    metric(
        "fleet_agent_messages_rejected_total",
        "counter",
        "Messages refused for good (other 4xx) and dropped.",
        counter(&s.rejected),
    );
    metric(
        "fleet_agent_uptime_seconds",
        "gauge",
        "Seconds since the agent started.",
        shared.started.elapsed().as_secs_f64().floor(),
    );
    metric(
        "fleet_agent_last_delivery_timestamp_seconds",
        "gauge",
        "Unix time of the last accepted message (0: none yet).",
        s.last_delivery_at.load(Ordering::Relaxed) as f64,
    );
    if let Some(Ok((waiting, bytes, dropped))) = match shared.outbox.get() {
        Some(outbox) => Some(outbox.stats().await),
        None => None,
    } {
        metric(
            "fleet_agent_outbox_messages",
            "gauge",
            "Messages waiting.",
            waiting as f64,
        );
        metric(
            "fleet_agent_outbox_bytes",
            "gauge",
            "Bytes waiting.",
            bytes as f64,
        );
        metric(
            "fleet_agent_outbox_dropped_total",
            "counter",
            "Messages dropped to stay within the outbox bounds.",
            dropped as f64,
        );
    }
    if let Some(rss) = resident_bytes() {
        metric(
            "fleet_agent_resident_memory_bytes",
            "gauge",
            "Resident set size of the agent process.",
            rss as f64,
        );
    }
    let checks = shared
        .last_checks
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if !checks.is_empty() {
        let _ = writeln!(
            out,
            "# HELP fleet_agent_check_ok Whether the last run of a check passed.\n# TYPE fleet_agent_check_ok gauge"
        );
        for check in &checks {
            let name = check.name.replace(['\\', '"', '\n'], "_");
            let _ = writeln!(
                out,
                "fleet_agent_check_ok{{check=\"{name}\"}} {}",
                u8::from(check.ok)
            );
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// The process's resident set size, from `VmRSS` in `/proc/self/status`.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::is_loopback_host;

    #[test]
    fn only_loopback_names_count_as_loopback_hosts() {
        for host in [
            "127.0.0.1",
            "127.0.0.1:4010",
            "127.1.2.3:80",
            "localhost",
            "LocalHost:4010",
            "[::1]",
            "[::1]:4010",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "",
            "evil.example",
            "evil.example:4010",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "127.0.0.1:4010:80",
            "127.0.0.1:",
            "127.0.0.1:port",
            "10.0.0.5:4010",
            "[::1]x",
            "[::2]:4010",
            "::1",
            "0.0.0.0",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }
}
