//! Collectors add figures to the heartbeat: the ops endpoint, the backup metadata file and the
//! application's Prometheus metrics here; host metrics in [`crate::metrics`] and containers in
//! [`crate::containers`].
//!
//! A collector that fails reports a failed check with its reason; the heartbeat still goes.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fleet_core::Heartbeat;
use fleet_core::error_chain;
use fleet_core::heartbeat::JobFailure;
use serde_json::{Map, Value};
use sqlx::Connection;

use crate::prometheus::parse_slo;

/// Adds figures to each heartbeat. Implement it to report your own; the agent records a
/// check named [`name`](Collector::name) that fails with the returned reason.
#[async_trait]
pub trait Collector: Send + Sync {
    /// The name of the check that reports this collector's health.
    fn name(&self) -> &str;

    /// Fills its fields of `heartbeat`. `Err` carries the reason shown to operators; fields
    /// already set stay, so a partial reading is still sent.
    async fn collect(&self, heartbeat: &mut Heartbeat) -> Result<(), String>;
}

/// Largest body read from the ops, metrics or diagnostic endpoints.
pub const MAX_FETCH_BYTES: usize = 4 * 1024 * 1024;

/// A failed request as shown in `checks[]`, `/diagnostic` and the logs: reqwest's message
/// and its causes, without the URL. reqwest puts the whole URL in its message, and a query
/// (`?api_key=…`, `?X-Amz-Signature=…`) would reach everyone who can read a heartbeat.
pub(crate) fn http_error(err: reqwest::Error) -> String {
    error_chain(&err.without_url())
}

/// Sends `request` and reads at most [`MAX_FETCH_BYTES`] of a 2xx answer. An error names
/// what failed, never the URL.
pub async fn fetch_limited(request: reqwest::RequestBuilder) -> Result<Vec<u8>, String> {
    let mut response = request.send().await.map_err(http_error)?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("HTTP {status}"));
    }
    if response
        .content_length()
        .is_some_and(|n| n > MAX_FETCH_BYTES as u64)
    {
        return Err(format!("answer larger than {MAX_FETCH_BYTES} bytes"));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(http_error)? {
        if body.len() + chunk.len() > MAX_FETCH_BYTES {
            return Err(format!("answer larger than {MAX_FETCH_BYTES} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The ERP ops endpoint (`AGENT_OPS_URL`, Bearer `AGENT_OPS_TOKEN`): job failures, jobs
/// processed and pending, expired and unverified secrets.
pub struct OpsCollector {
    client: reqwest::Client,
    url: String,
    token: Option<String>,
}

impl OpsCollector {
    /// Reads `url` with `token` as Bearer.
    pub fn new(client: reqwest::Client, url: &str, token: Option<&str>) -> Self {
        Self {
            client,
            url: url.to_owned(),
            token: token.map(str::to_owned),
        }
    }

    /// Fetches the ops JSON as it is (also served by the local `/diagnostic`).
    pub async fn fetch(&self) -> Result<Vec<u8>, String> {
        let mut request = self.client.get(&self.url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        fetch_limited(request)
            .await
            .map_err(|e| format!("ops endpoint: {e}"))
    }
}

#[async_trait]
impl Collector for OpsCollector {
    fn name(&self) -> &str {
        "ops"
    }

    async fn collect(&self, hb: &mut Heartbeat) -> Result<(), String> {
        let body = self.fetch().await?;
        let ops: Value =
            serde_json::from_slice(&body).map_err(|e| format!("ops endpoint JSON: {e}"))?;
        apply_ops(&ops, hb);
        Ok(())
    }
}

/// Copies the ops endpoint's figures into the heartbeat.
pub fn apply_ops(ops: &Value, hb: &mut Heartbeat) {
    let max = fleet_core::Limits::default().max_job_failures;
    let message_limit = fleet_core::Limits::default().max_message_len;
    if let Some(failures) = ops.get("jobFailures").and_then(Value::as_array) {
        hb.jobs_failed = failures.len() as u64;
        hb.job_failures = failures
            .iter()
            .take(max)
            .map(|f| {
                let text = ["message", "error", "failedReason", "reason"]
                    .iter()
                    .find_map(|k| f.get(*k).and_then(Value::as_str))
                    .map(str::to_owned)
                    .unwrap_or_else(|| f.to_string());
                JobFailure {
                    queue: ["queue", "queueName", "name"]
                        .iter()
                        .find_map(|k| f.get(*k).and_then(Value::as_str))
                        .map(|q| q.chars().take(128).collect()),
                    message: text.chars().take(message_limit).collect(),
                    extra: Map::new(),
                }
            })
            .collect();
    }
    let number = |v: Option<&Value>| v.and_then(Value::as_f64).filter(|n| *n >= 0.0);
    if let Some(n) = number(ops.get("jobsProcessed1h")) {
        hb.jobs_processed_1h = Some(hb.jobs_processed_1h.unwrap_or(0).max(n as u64));
    }
    if let Some(n) = number(ops.get("jobsPending")) {
        hb.jobs_pending = Some(hb.jobs_pending.unwrap_or(0).max(n as u64));
    }
    let secrets = ops.get("secrets");
    hb.secrets_expired = Some(number(secrets.and_then(|s| s.get("expired"))).unwrap_or(0.0) as u64);
    hb.secrets_unverified =
        Some(number(secrets.and_then(|s| s.get("unverified"))).unwrap_or(0.0) as u64);
}

/// The backup metadata file (`BACKUP_META_PATH`): `lastBackupAt`, and `backupId`/`id`,
/// `sizeBytes`, `checksum`, `bucket`, `path`, `status` when present.
pub struct BackupCollector {
    path: PathBuf,
}

impl BackupCollector {
    /// Reads the JSON file at `path` at each heartbeat.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }
}

#[async_trait]
impl Collector for BackupCollector {
    fn name(&self) -> &str {
        "backup"
    }

    async fn collect(&self, hb: &mut Heartbeat) -> Result<(), String> {
        let text = tokio::fs::read(&self.path)
            .await
            .map_err(|e| format!("read {}: {e}", self.path.display()))?;
        let meta: Value = serde_json::from_slice(&text)
            .map_err(|e| format!("{} is not JSON: {e}", self.path.display()))?;
        apply_backup(&meta, hb)
    }
}

/// Copies backup metadata into the heartbeat; a `lastBackupAt` that is not RFC 3339 is an
/// error (the control plane would refuse the whole heartbeat for it).
pub fn apply_backup(meta: &Value, hb: &mut Heartbeat) -> Result<(), String> {
    let text = |keys: &[&str]| {
        keys.iter().find_map(|k| match meta.get(*k) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        })
    };
    hb.backup_id = text(&["backupId", "id"]);
    hb.backup_size_bytes = meta.get("sizeBytes").and_then(Value::as_u64);
    hb.backup_checksum = text(&["checksum"]);
    hb.backup_bucket = text(&["bucket"]);
    hb.backup_path = text(&["path"]);
    hb.backup_status = text(&["status"]);
    match meta.get("lastBackupAt").and_then(Value::as_str) {
        None => Err("no lastBackupAt in the backup metadata".into()),
        Some(at) if fleet_core::validate::is_rfc3339(at) => {
            hb.last_backup_at = Some(at.to_owned());
            Ok(())
        }
        Some(at) => Err(format!("lastBackupAt {at:?} is not an RFC 3339 timestamp")),
    }
}

/// The application's Prometheus text (`AGENT_METRICS_URL`): p95, 5xx share, webhook retry
/// rate, jobs processed and pending.
pub struct SloCollector {
    client: reqwest::Client,
    url: String,
}

impl SloCollector {
    /// Reads the exposition text at `url`.
    pub fn new(client: reqwest::Client, url: &str) -> Self {
        Self {
            client,
            url: url.to_owned(),
        }
    }
}

#[async_trait]
impl Collector for SloCollector {
    fn name(&self) -> &str {
        "slo"
    }

    async fn collect(&self, hb: &mut Heartbeat) -> Result<(), String> {
        let body = fetch_limited(self.client.get(&self.url))
            .await
            .map_err(|e| format!("metrics endpoint: {e}"))?;
        let slo = parse_slo(&String::from_utf8_lossy(&body));
        hb.slo_p95_ms = slo.p95_ms;
        hb.slo_error_rate = slo.error_rate;
        hb.slo_webhook_retry_rate = slo.webhook_retry_rate;
        hb.slo_updated_at = Some(crate::clock::now_rfc3339());
        if let Some(n) = slo.jobs_processed {
            hb.jobs_processed_1h = Some(hb.jobs_processed_1h.unwrap_or(0).max(n));
        }
        if let Some(n) = slo.jobs_pending {
            hb.jobs_pending = Some(hb.jobs_pending.unwrap_or(0).max(n));
        }
        Ok(())
    }
}

/// A value refreshed at most once per interval; failures are not kept, so the next call
/// tries again.
pub(crate) struct Every<T> {
    interval: Duration,
    last: Mutex<Option<(Instant, T)>>,
}

impl<T: Clone> Every<T> {
    pub(crate) fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: Mutex::new(None),
        }
    }

    pub(crate) async fn get<F>(&self, refresh: impl FnOnce() -> F) -> Result<T, String>
    where
        F: Future<Output = Result<T, String>>,
    {
        {
            let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, value)) = &*last
                && at.elapsed() < self.interval
            {
                return Ok(value.clone());
            }
        }
        let value = refresh().await?;
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), value.clone()));
        Ok(value)
    }
}

/// `db_size_bytes`: `pg_database_size(current_database())`, on the metrics interval.
pub struct DbSizeCollector {
    url: String,
    every: Every<u64>,
}

impl DbSizeCollector {
    /// Measures the PostgreSQL database at `url` at most once per `interval`.
    pub fn new(url: &str, interval: Duration) -> Self {
        Self {
            url: url.to_owned(),
            every: Every::new(interval),
        }
    }
}

#[async_trait]
impl Collector for DbSizeCollector {
    fn name(&self) -> &str {
        "db_size"
    }

    async fn collect(&self, hb: &mut Heartbeat) -> Result<(), String> {
        let url = &self.url;
        let size = self
            .every
            .get(|| async move {
                let redact = |e: sqlx::Error| crate::checks::redact(&e.to_string(), url);
                let mut conn = sqlx::PgConnection::connect(url).await.map_err(redact)?;
                let size: i64 =
                    sqlx::query_scalar("SELECT pg_database_size(current_database())::bigint")
                        .fetch_one(&mut conn)
                        .await
                        .map_err(redact)?;
                let _ = conn.close().await;
                Ok(size.max(0) as u64)
            })
            .await?;
        hb.db_size_bytes = Some(size);
        Ok(())
    }
}

/// `storage_size_bytes`: the total size of the files under `STORAGE_DATA_PATH` (symbolic
/// links not followed), on the metrics interval.
pub struct StorageSizeCollector {
    path: PathBuf,
    every: Every<u64>,
}

impl StorageSizeCollector {
    /// Measures `path` at most once per `interval`.
    pub fn new(path: impl Into<PathBuf>, interval: Duration) -> Self {
        Self {
            path: path.into(),
            every: Every::new(interval),
        }
    }
}

/// Bytes of the regular files under `root` (or of `root` itself when it is a file).
pub fn tree_size(root: &Path) -> std::io::Result<u64> {
    let meta = std::fs::symlink_metadata(root)?;
    if !meta.is_dir() {
        return Ok(meta.len());
    }
    let mut total = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        // An unreadable subdirectory is skipped rather than failing the whole figure.
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                total = total.saturating_add(entry.metadata().map(|m| m.len()).unwrap_or(0));
            }
        }
    }
    Ok(total)
}

#[async_trait]
impl Collector for StorageSizeCollector {
    fn name(&self) -> &str {
        "storage_size"
    }

    async fn collect(&self, hb: &mut Heartbeat) -> Result<(), String> {
        let path = self.path.clone();
        let size = self
            .every
            .get(|| async move {
                let shown = path.display().to_string();
                tokio::task::spawn_blocking(move || tree_size(&path))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("{shown}: {e}"))
            })
            .await?;
        hb.storage_size_bytes = Some(size);
        Ok(())
    }
}

/// The application's event statistics (`AGENT_EVENTS_STATS_URL`, Bearer ops token):
/// `total1h`, `failed1h`, `avgLagMs` become `events_total_1h`, `events_failed_1h`,
/// `events_avg_lag_ms`.
pub struct EventsCollector {
    client: reqwest::Client,
    url: String,
    token: String,
}

impl EventsCollector {
    /// Reads `url` with `token` as Bearer.
    pub fn new(client: reqwest::Client, url: &str, token: &str) -> Self {
        Self {
            client,
            url: url.to_owned(),
            token: token.to_owned(),
        }
    }
}

#[async_trait]
impl Collector for EventsCollector {
    fn name(&self) -> &str {
        "events"
    }

    async fn collect(&self, hb: &mut Heartbeat) -> Result<(), String> {
        let body = fetch_limited(self.client.get(&self.url).bearer_auth(&self.token))
            .await
            .map_err(|e| format!("events endpoint: {e}"))?;
        let stats: Value =
            serde_json::from_slice(&body).map_err(|e| format!("events endpoint JSON: {e}"))?;
        for (from, to) in [
            ("total1h", "events_total_1h"),
            ("failed1h", "events_failed_1h"),
            ("avgLagMs", "events_avg_lag_ms"),
        ] {
            if let Some(n) = stats.get(from).filter(|v| v.is_number()) {
                hb.extra.insert(to.into(), n.clone());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ops_figures_and_failures() {
        let mut hb = Heartbeat::new("i");
        apply_ops(
            &json!({"jobFailures":[{"queue":"billing","message":"Timeout"},{"failedReason":"boom"}],
                    "jobsProcessed1h": 12, "jobsPending": 3, "secrets":{"expired":1,"unverified":2}}),
            &mut hb,
        );
        assert_eq!(hb.jobs_failed, 2);
        assert_eq!(hb.job_failures[0].queue.as_deref(), Some("billing"));
        assert_eq!(hb.job_failures[1].message, "boom");
        assert_eq!((hb.jobs_processed_1h, hb.jobs_pending), (Some(12), Some(3)));
        assert_eq!(
            (hb.secrets_expired, hb.secrets_unverified),
            (Some(1), Some(2))
        );
    }

    #[test]
    fn tree_size_adds_files_and_skips_links() {
        let dir = std::env::temp_dir().join(format!("fleet-agent-tree-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        std::fs::write(dir.join("x"), [0u8; 10]).unwrap();
        std::fs::write(dir.join("a/b/y"), [0u8; 5]).unwrap();
        std::os::unix::fs::symlink(dir.join("x"), dir.join("a/link")).unwrap();
        assert_eq!(tree_size(&dir).unwrap(), 15);
        assert_eq!(tree_size(&dir.join("x")).unwrap(), 10);
        assert!(tree_size(&dir.join("missing")).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn every_caches_successes_not_failures() {
        let every = Every::new(Duration::from_secs(60));
        assert!(
            every
                .get(|| async { Err::<u8, _>("down".to_owned()) })
                .await
                .is_err()
        );
        assert_eq!(every.get(|| async { Ok(1u8) }).await, Ok(1));
        assert_eq!(every.get(|| async { Ok(2u8) }).await, Ok(1));
    }

    #[test]
    fn backup_fields_and_bad_timestamps() {
        let mut hb = Heartbeat::new("i");
        apply_backup(
            &json!({"lastBackupAt":"2026-02-11T02:00:00Z","id":"b-1","sizeBytes":10,"checksum":"abc","bucket":"bk","path":"p/x"}),
            &mut hb,
        )
        .unwrap();
        assert_eq!(hb.last_backup_at.as_deref(), Some("2026-02-11T02:00:00Z"));
        assert_eq!(hb.backup_id.as_deref(), Some("b-1"));
        assert_eq!(hb.backup_size_bytes, Some(10));
        let mut hb = Heartbeat::new("i");
        let err = apply_backup(&json!({"lastBackupAt":"last night"}), &mut hb).unwrap_err();
        assert!(err.contains("RFC 3339"));
        assert_eq!(hb.last_backup_at, None);
    }
}
