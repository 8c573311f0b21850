//! The heartbeat: the ERP instance agent's payload, field for field, plus our extensions.
//!
//! Decoding collects every problem with its path instead of stopping at the first, and keeps
//! unknown keys (`primary_region`, `iam_*`, `events_*`, ...) so agents older and newer than
//! this control plane interoperate.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::validate::{
    DecodeError, Fields, Limits, MAX_SLO_ERROR_RATE, MAX_SLO_P95_MS, MAX_SLO_WEBHOOK_RETRY_RATE,
    Path, ValidationErrors, check_size, json_message,
};

mod fast;

/// Severity of an alert.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum AlertLevel {
    /// Worth knowing.
    #[default]
    Info,
    /// Needs attention soon.
    Warning,
    /// Something is broken.
    Error,
    /// Broken and urgent.
    Critical,
}

impl AlertLevel {
    /// The wire name (`info`, `warning`, `error`, `critical`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Error => "error",
            Self::Critical => "critical",
        }
    }

    /// Parses a wire name; `warn` is accepted for `warning`.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "info" => Self::Info,
            "warning" | "warn" => Self::Warning,
            "error" => Self::Error,
            "critical" => Self::Critical,
            _ => return None,
        })
    }
}

/// An alert raised by the instance itself (`alerts[]`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PayloadAlert {
    /// Severity; `info` when the sender leaves it out.
    pub level: AlertLevel,
    /// What happened.
    pub message: String,
    /// Unknown keys, kept.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A failed background job (`job_failures[]`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobFailure {
    /// The queue the job ran on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// The failure message.
    pub message: String,
    /// Unknown keys, kept.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The result of one health check (`checks[]`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckResult {
    /// The check's name (`db`, `redis`, `storage`, or a custom one).
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// How long it took.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Unknown keys, kept.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A container seen on the host (`containers[]`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Container {
    /// Engine id.
    pub id: String,
    /// Name without the leading slash.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Image reference.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Engine state (`running`, `exited`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Human status (`Up 2 hours`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Unknown keys, kept.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Facts about the host (`host{}`).
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct HostInfo {
    /// Host name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Operating system (`linux`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    /// CPU architecture (`x86_64`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// Logical CPUs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_count: Option<u64>,
    /// One-minute load average.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_1m: Option<f64>,
    /// Seconds since boot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uptime_seconds: Option<u64>,
    /// Unknown keys, kept.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A heartbeat as `POST /api/heartbeats` receives it.
///
/// Required: `instance_id`, `db_ok`, `redis_ok`, `storage_ok`, `jobs_failed`. Optional
/// fields may be absent or `null`. `events_*` and other unknown keys are in [`extra`](Self::extra).
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
#[allow(missing_docs)] // the fields are the wire protocol; DESIGN.md section 3 describes them.
pub struct Heartbeat {
    pub instance_id: String,
    pub db_ok: bool,
    pub redis_ok: bool,
    pub storage_ok: bool,
    pub jobs_failed: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release_channel: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uptime_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub search_ok: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secrets_expired: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secrets_unverified: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slo_p95_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slo_error_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slo_webhook_retry_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slo_updated_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_backup_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_size_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_checksum: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_bucket: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_usage_pct: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_used_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_total_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_used_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_total_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network_rx_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network_tx_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub db_size_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage_size_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jobs_processed_1h: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jobs_pending: Option<u64>,
    /// Messages the agent's outbox dropped since its last delivered heartbeat.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbox_dropped: Option<u64>,
    /// When the agent collected this heartbeat (unix seconds). A heartbeat delivered late
    /// from the agent's outbox keeps it, so the control plane knows when its figures were
    /// measured, not only when they arrived. Agents that do not send it are read as
    /// collecting at arrival.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub collected_at: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<PayloadAlert>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub job_failures: Vec<JobFailure>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<CheckResult>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<Container>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<HostInfo>,
    /// Unknown keys, kept as they came.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

const BYTES_MAX: f64 = 1.0e18;

impl Heartbeat {
    /// A heartbeat with the required fields set and everything else empty.
    pub fn new(instance_id: impl Into<String>) -> Self {
        Self {
            instance_id: instance_id.into(),
            ..Self::default()
        }
    }

    /// Decodes and validates a raw body: 413-style [`DecodeError::TooLarge`] over the body
    /// limit, else every problem at once in [`DecodeError::Invalid`].
    pub fn decode(body: &[u8], limits: &Limits) -> Result<Self, DecodeError> {
        match Self::decode_fast(body, limits) {
            Some(heartbeat) => Ok(heartbeat),
            None => Self::decode_slow(body, limits),
        }
    }

    /// [`decode`](Self::decode)'s fast path alone: the heartbeat when `body` is valid and
    /// `decode` would return exactly it, `None` when `decode` takes the slow path instead
    /// (any problem, or anything the fast path does not handle). Public for the differential
    /// tests and the benchmarks.
    #[doc(hidden)]
    pub fn decode_fast(body: &[u8], limits: &Limits) -> Option<Self> {
        fast::decode(body, limits)
    }

    /// [`decode`](Self::decode)'s slow path alone: parse a [`Value`], then
    /// [`from_value`](Self::from_value). It produces every error `decode` returns and is the
    /// reference the fast path is tested against. Public for those tests and the benchmarks.
    #[doc(hidden)]
    pub fn decode_slow(body: &[u8], limits: &Limits) -> Result<Self, DecodeError> {
        check_size(body, limits)?;
        let value: Value = serde_json::from_slice(body).map_err(|err| {
            let mut errors = ValidationErrors::default();
            errors.push("", json_message(&err));
            errors
        })?;
        Ok(Self::from_value(value, limits)?)
    }

    /// Validates an already-parsed JSON value.
    pub fn from_value(value: Value, limits: &Limits) -> Result<Self, ValidationErrors> {
        let mut errors = ValidationErrors::default();
        let Value::Object(map) = value else {
            errors.push("", "a heartbeat must be a JSON object");
            return Err(errors);
        };
        let root = Path::Root;
        let mut f = Fields::new(map, &root, &mut errors, limits);
        let heartbeat = decode_fields(&mut f);
        errors.into_result(heartbeat)
    }

    /// The `events_*` figures the instance sent, from the unknown keys.
    pub fn events(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.extra
            .iter()
            .filter(|(k, _)| k.starts_with("events_"))
            .map(|(k, v)| (k.as_str(), v))
    }

    /// Serializes to JSON bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        // Serializing plain data to memory cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

impl Heartbeat {
    /// JSON Schema of a heartbeat (for the OpenAPI document): the required fields and the
    /// common optional ones with their bounds. Unknown keys are kept, so any other key is
    /// allowed; `decode` is the full rule.
    pub fn json_schema() -> Value {
        let l = Limits::default();
        let boolean = json!({ "type": "boolean" });
        let number = crate::schema::number;
        let text = |max: usize| crate::schema::plain_text(max);
        let list =
            // `null` reads as an empty list, as for the optional scalars.
            |max: usize, item: Value| {
                crate::schema::nullable(json!({ "type": "array", "maxItems": max, "items": item }))
            };
        crate::schema::object(
            &[
                "instance_id",
                "db_ok",
                "redis_ok",
                "storage_ok",
                "jobs_failed",
            ],
            &[
                ("instance_id", crate::schema::id()),
                ("db_ok", boolean.clone()),
                ("redis_ok", boolean.clone()),
                ("storage_ok", boolean.clone()),
                ("jobs_failed", crate::schema::count()),
                ("domain", crate::schema::nullable(text(253))),
                ("client", crate::schema::nullable(text(l.max_text_len))),
                ("version", crate::schema::nullable(text(l.max_id_len))),
                (
                    "release_channel",
                    crate::schema::nullable(text(l.max_id_len)),
                ),
                ("health", crate::schema::nullable(text(l.max_id_len))),
                ("uptime_seconds", crate::schema::nullable(number(1.0e12))),
                ("search_ok", crate::schema::nullable(boolean)),
                (
                    "slo_p95_ms",
                    crate::schema::nullable(number(MAX_SLO_P95_MS)),
                ),
                (
                    "slo_error_rate",
                    crate::schema::nullable(number(MAX_SLO_ERROR_RATE)),
                ),
                (
                    "slo_webhook_retry_rate",
                    crate::schema::nullable(number(MAX_SLO_WEBHOOK_RETRY_RATE)),
                ),
                ("cpu_usage_pct", crate::schema::nullable(number(100.0))),
                (
                    "collected_at",
                    crate::schema::nullable(crate::schema::count()),
                ),
                (
                    "alerts",
                    list(
                        l.max_alerts,
                        crate::schema::object(
                            &["message"],
                            &[
                                (
                                    "level",
                                    crate::schema::nullable(crate::schema::one_of(&[
                                        AlertLevel::Info,
                                        AlertLevel::Warning,
                                        AlertLevel::Error,
                                        AlertLevel::Critical,
                                    ])),
                                ),
                                ("message", text(l.max_message_len)),
                            ],
                        ),
                    ),
                ),
                (
                    "job_failures",
                    list(
                        l.max_job_failures,
                        crate::schema::object(
                            &["message"],
                            &[
                                ("queue", crate::schema::nullable(text(l.max_id_len))),
                                ("message", text(l.max_message_len)),
                            ],
                        ),
                    ),
                ),
                (
                    "checks",
                    list(
                        l.max_checks,
                        crate::schema::object(
                            &["name", "ok"],
                            &[
                                ("name", crate::schema::id()),
                                ("ok", json!({ "type": "boolean" })),
                                (
                                    "latency_ms",
                                    crate::schema::nullable(
                                        json!({ "type": "number", "minimum": 0 }),
                                    ),
                                ),
                                ("error", crate::schema::nullable(text(l.max_message_len))),
                            ],
                        ),
                    ),
                ),
                (
                    "containers",
                    list(
                        l.max_containers,
                        crate::schema::object(&["id"], &[("id", crate::schema::id())]),
                    ),
                ),
            ],
        )
    }
}

fn decode_fields(f: &mut Fields<'_, '_>) -> Heartbeat {
    let l = f.limits().clone();
    let text = l.max_text_len;
    let id = l.max_id_len;
    Heartbeat {
        instance_id: f.req_id("instance_id"),
        db_ok: f.req_bool("db_ok"),
        redis_ok: f.req_bool("redis_ok"),
        storage_ok: f.req_bool("storage_ok"),
        jobs_failed: f.req_u64("jobs_failed"),
        domain: f.opt_string("domain", 253),
        client: f.opt_string("client", text),
        version: f.opt_string("version", id),
        release_channel: f.opt_string("release_channel", id),
        health: f.opt_string("health", id),
        uptime_seconds: f.opt_f64("uptime_seconds", 0.0, 1.0e12),
        search_ok: f.opt_bool("search_ok"),
        secrets_expired: f.opt_u64("secrets_expired"),
        secrets_unverified: f.opt_u64("secrets_unverified"),
        slo_p95_ms: f.opt_f64("slo_p95_ms", 0.0, MAX_SLO_P95_MS),
        slo_error_rate: f.opt_f64("slo_error_rate", 0.0, MAX_SLO_ERROR_RATE),
        slo_webhook_retry_rate: f.opt_f64(
            "slo_webhook_retry_rate",
            0.0,
            MAX_SLO_WEBHOOK_RETRY_RATE,
        ),
        slo_updated_at: f.opt_timestamp("slo_updated_at"),
        last_backup_at: f.opt_timestamp("last_backup_at"),
        backup_id: f.opt_string("backup_id", text),
        backup_size_bytes: f.opt_u64("backup_size_bytes"),
        backup_checksum: f.opt_string("backup_checksum", 256),
        backup_bucket: f.opt_string("backup_bucket", text),
        backup_path: f.opt_string("backup_path", text),
        backup_status: f.opt_string("backup_status", id),
        cpu_usage_pct: f.opt_f64("cpu_usage_pct", 0.0, 100.0),
        memory_used_bytes: f.opt_u64("memory_used_bytes"),
        memory_total_bytes: f.opt_u64("memory_total_bytes"),
        disk_used_bytes: f.opt_u64("disk_used_bytes"),
        disk_total_bytes: f.opt_u64("disk_total_bytes"),
        network_rx_bytes: f.opt_u64("network_rx_bytes"),
        network_tx_bytes: f.opt_u64("network_tx_bytes"),
        db_size_bytes: f.opt_u64("db_size_bytes"),
        storage_size_bytes: f.opt_u64("storage_size_bytes"),
        jobs_processed_1h: f.opt_u64("jobs_processed_1h"),
        jobs_pending: f.opt_u64("jobs_pending"),
        outbox_dropped: f.opt_u64("outbox_dropped"),
        collected_at: f.opt_u64("collected_at"),
        alerts: f.array("alerts", l.max_alerts, |a| PayloadAlert {
            level: match a.opt_string("level", 16) {
                None => AlertLevel::Info,
                Some(level) => AlertLevel::parse(&level).unwrap_or_else(|| {
                    a.bad("level", "must be info, warning, error or critical");
                    AlertLevel::Info
                }),
            },
            message: a.req_string("message", l.max_message_len),
            extra: a.rest(),
        }),
        job_failures: f.array("job_failures", l.max_job_failures, |j| JobFailure {
            queue: j.opt_string("queue", id),
            message: j.req_string("message", l.max_message_len),
            extra: j.rest(),
        }),
        checks: f.array("checks", l.max_checks, |c| CheckResult {
            name: c.req_id("name"),
            ok: c.req_bool("ok"),
            latency_ms: c.opt_f64("latency_ms", 0.0, 1.0e9),
            error: c.opt_string("error", l.max_message_len),
            extra: c.rest(),
        }),
        containers: f.array("containers", l.max_containers, |c| Container {
            id: c.req_id("id"),
            name: c.opt_string("name", text),
            image: c.opt_string("image", text),
            state: c.opt_string("state", id),
            status: c.opt_string("status", text),
            extra: c.rest(),
        }),
        host: f.object("host", |h| HostInfo {
            hostname: h.opt_string("hostname", 253),
            os: h.opt_string("os", id),
            arch: h.opt_string("arch", id),
            cpu_count: h.opt_u64("cpu_count"),
            load_1m: h.opt_f64("load_1m", 0.0, BYTES_MAX),
            uptime_seconds: h.opt_u64("uptime_seconds"),
            extra: h.rest(),
        }),
        extra: f.rest(),
    }
}

impl<'de> Deserialize<'de> for Heartbeat {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Heartbeat::from_value(value, &Limits::default()).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(json: &str) -> Result<Heartbeat, DecodeError> {
        Heartbeat::decode(json.as_bytes(), &Limits::default())
    }

    fn paths(json: &str) -> Vec<String> {
        match decode(json) {
            Err(DecodeError::Invalid(e)) => e.violations.into_iter().map(|v| v.path).collect(),
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn erp_example_payload_decodes_and_keeps_unknown_keys() {
        let hb = decode(
            r#"{"instance_id":"acme-001","domain":"acme.com","client":"Acme SA","version":"1.2.3",
            "release_channel":"stable","health":"ok","backup_status":"ok","db_ok":true,"redis_ok":true,
            "storage_ok":true,"jobs_failed":0,"last_backup_at":"2026-02-11T02:00:00Z","slo_p95_ms":null,
            "alerts":[{"level":"warning","message":"Low disk"},{"message":"no level"}],
            "job_failures":[{"queue":"billing","message":"Timeout"}],
            "primary_region":"sa-east-1","events_total_1h":12,"iam_users":3}"#,
        )
        .expect("valid");
        assert_eq!(hb.instance_id, "acme-001");
        assert_eq!(hb.alerts[1].level, AlertLevel::Info);
        assert_eq!(hb.slo_p95_ms, None);
        assert_eq!(
            hb.extra.get("primary_region"),
            Some(&Value::from("sa-east-1"))
        );
        assert_eq!(hb.events().count(), 1);
        let round: Heartbeat = serde_json::from_slice(&hb.to_vec()).expect("round trip");
        assert_eq!(round, hb);
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let got = paths(
            r#"{"instance_id":"","db_ok":"yes","storage_ok":true,"jobs_failed":-1,
            "cpu_usage_pct":250,"last_backup_at":"last night","collected_at":-3,
            "job_failures":[{"message":"ok"},{"queue":"q"},{"message":7}],"alerts":[{"level":"panic","message":"x"}]}"#,
        );
        assert_eq!(
            got,
            [
                "instance_id",
                "db_ok",
                "redis_ok",
                "jobs_failed",
                "last_backup_at",
                "cpu_usage_pct",
                "collected_at",
                "alerts[0].level",
                "job_failures[1].message",
                "job_failures[2].message",
            ]
        );
    }

    #[test]
    fn limits_are_enforced() {
        let too_big = format!(
            r#"{{"instance_id":"a","pad":"{}"}}"#,
            "x".repeat(2 * 1024 * 1024)
        );
        assert!(matches!(
            decode(&too_big),
            Err(DecodeError::TooLarge { .. })
        ));
        let many = format!(
            r#"{{"instance_id":"a","db_ok":true,"redis_ok":true,"storage_ok":true,"jobs_failed":0,"alerts":[{}]}}"#,
            vec![r#"{"message":"m"}"#; 101].join(",")
        );
        assert_eq!(paths(&many), ["alerts"]);
        let long = format!(
            r#"{{"instance_id":"a","db_ok":true,"redis_ok":true,"storage_ok":true,"jobs_failed":0,"version":"{}"}}"#,
            "9".repeat(200)
        );
        assert_eq!(paths(&long), ["version"]);
    }

    #[test]
    fn non_objects_and_bad_json_are_invalid_not_panics() {
        assert_eq!(paths("[]"), [""]);
        assert_eq!(paths("{"), [""]);
        assert_eq!(paths("\"x\""), [""]);
    }
}
