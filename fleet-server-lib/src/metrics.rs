//! The control plane's own Prometheus metrics (`GET /metrics`).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};

use crate::Shared;

/// Requests to one route by (method, status).
type RouteCounts = BTreeMap<(&'static str, u16), u64>;

/// Counters, updated with relaxed atomics (and a short lock for labelled ones).
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    /// Route template → (method, status) → count. Keyed so that counting a request on a
    /// route already seen allocates nothing.
    requests: Mutex<BTreeMap<String, RouteCounts>>,
    rejections: Mutex<BTreeMap<&'static str, u64>>,
    accepted: AtomicU64,
    duplicates: AtomicU64,
    batches: AtomicU64,
    batched: AtomicU64,
    webhook_delivered: AtomicU64,
    webhook_failed: AtomicU64,
    webhook_abandoned: AtomicU64,
    offline_opened: AtomicU64,
}

impl Metrics {
    pub fn accepted(&self) {
        self.accepted.fetch_add(1, Relaxed);
    }

    pub fn duplicate(&self) {
        self.duplicates.fetch_add(1, Relaxed);
    }

    /// A refused heartbeat, by stable reason (`signature_mismatch`, `too_large`, ...).
    pub fn rejected(&self, reason: &'static str) {
        if let Ok(mut map) = self.rejections.lock() {
            *map.entry(reason).or_default() += 1;
        }
    }

    pub fn batch(&self, size: usize) {
        self.batches.fetch_add(1, Relaxed);
        self.batched.fetch_add(size as u64, Relaxed);
    }

    pub fn webhook(&self, delivered: bool, abandoned: bool) {
        let counter = match (delivered, abandoned) {
            (true, _) => &self.webhook_delivered,
            (false, false) => &self.webhook_failed,
            (false, true) => &self.webhook_abandoned,
        };
        counter.fetch_add(1, Relaxed);
    }

    pub fn offline(&self, opened: u64) {
        self.offline_opened.fetch_add(opened, Relaxed);
    }

    /// One finished request, by method, route template and status.
    pub fn request(&self, method: &'static str, route: &str, status: u16) {
        if let Ok(mut map) = self.requests.lock() {
            let by_status = match map.get_mut(route) {
                Some(by_status) => by_status,
                None => map.entry(route.to_owned()).or_default(),
            };
            *by_status.entry((method, status)).or_default() += 1;
        }
    }

    /// The Prometheus text exposition.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP fleet_http_requests_total HTTP requests by method, route and status.\n# TYPE fleet_http_requests_total counter"
        );
        if let Ok(map) = self.requests.lock() {
            for (route, by_status) in map.iter() {
                let route = route.replace('\\', "\\\\").replace('"', "\\\"");
                for ((method, status), n) in by_status {
                    let _ = writeln!(
                        out,
                        "fleet_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {n}"
                    );
                }
            }
        }
        let simple = [
            (
                "fleet_heartbeats_accepted_total",
                "Heartbeats recorded.",
                &self.accepted,
            ),
            (
                "fleet_heartbeats_duplicate_total",
                "Retried heartbeats acknowledged without being applied again.",
                &self.duplicates,
            ),
            (
                "fleet_ingest_batches_total",
                "Transactions committed by the heartbeat writer.",
                &self.batches,
            ),
            (
                "fleet_ingest_batched_heartbeats_total",
                "Heartbeats handed to the writer.",
                &self.batched,
            ),
            (
                "fleet_webhook_delivered_total",
                "Alert webhook deliveries that succeeded.",
                &self.webhook_delivered,
            ),
            (
                "fleet_webhook_failed_attempts_total",
                "Alert webhook attempts that failed and will be retried.",
                &self.webhook_failed,
            ),
            (
                "fleet_webhook_abandoned_total",
                "Alert webhook deliveries given up after the last attempt.",
                &self.webhook_abandoned,
            ),
            (
                "fleet_offline_alerts_total",
                "Offline alerts opened.",
                &self.offline_opened,
            ),
        ];
        for (name, help, value) in simple {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP fleet_heartbeats_rejected_total Heartbeats refused, by reason.\n# TYPE fleet_heartbeats_rejected_total counter"
        );
        if let Ok(map) = self.rejections.lock() {
            for (reason, n) in map.iter() {
                let _ = writeln!(
                    out,
                    "fleet_heartbeats_rejected_total{{reason=\"{reason}\"}} {n}"
                );
            }
        }
        out
    }
}

pub(crate) async fn render(State(state): State<Shared>) -> Response {
    let mut text = state.metrics.text();
    let _ = writeln!(
        text,
        "# HELP fleet_ingest_queued_heartbeats Heartbeats in each writer's queue, not yet in a batch (a full queue holds 8 batches; more requests wait to enter it).\n# TYPE fleet_ingest_queued_heartbeats gauge"
    );
    for (writer, queued) in state.writers.queued().into_iter().enumerate() {
        let _ = writeln!(
            text,
            "fleet_ingest_queued_heartbeats{{writer=\"{writer}\"}} {queued}"
        );
    }
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        text,
    )
        .into_response()
}
