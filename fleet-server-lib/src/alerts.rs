//! Alert rules as plain functions: what a heartbeat says about each condition, and which
//! alerts that opens or resolves. The store runs them inside its transaction.
//!
//! Every server-side alert has a *key* (`slo_p95_ms`, `secrets`, `payload:<hash>`...) and at
//! most one alert per installation and key is open at a time. The key never contains a
//! measured value: the ERP keyed its SLO dedup on a message with the value in it, so it never
//! deduplicated. A breach opens the alert once; a heartbeat showing the figure back under its
//! maximum resolves it.

use std::collections::BTreeSet;

use fleet_core::Heartbeat;
use fleet_core::heartbeat::AlertLevel;
use sha2::{Digest, Sha256};

/// Alert kinds raised by the control plane or relayed from instances.
pub mod kind {
    /// An item of the heartbeat's `alerts[]`.
    pub const PAYLOAD: &str = "payload";
    /// `slo_p95_ms` above `SLO_P95_MS_MAX`.
    pub const SLO_P95_MS: &str = "slo_p95_ms";
    /// `slo_error_rate` above `SLO_ERROR_RATE_MAX`.
    pub const SLO_ERROR_RATE: &str = "slo_error_rate";
    /// `slo_webhook_retry_rate` above `SLO_WEBHOOK_RETRY_RATE_MAX`.
    pub const SLO_WEBHOOK_RETRY_RATE: &str = "slo_webhook_retry_rate";
    /// Expired or unverified secrets on the instance.
    pub const SECRETS: &str = "secrets";
    /// No heartbeat for longer than the offline threshold.
    pub const OFFLINE: &str = "offline";
    /// A rollout halted by itself (failure threshold or SLO breach).
    pub const ROLLOUT_HALTED: &str = "rollout_halted";
    /// A restore verification failed.
    pub const RESTORE_FAILED: &str = "restore_failed";

    /// Every kind above, as the dashboard's alert filter suggests them.
    pub const ALL: [&str; 8] = [
        PAYLOAD,
        SLO_P95_MS,
        SLO_ERROR_RATE,
        SLO_WEBHOOK_RETRY_RATE,
        SECRETS,
        OFFLINE,
        ROLLOUT_HALTED,
        RESTORE_FAILED,
    ];
}

/// SLO maxima (`SLO_P95_MS_MAX`, `SLO_ERROR_RATE_MAX`, `SLO_WEBHOOK_RETRY_RATE_MAX`). As in
/// the ERP, a check runs only when its maximum is above 0.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SloThresholds {
    /// Highest acceptable p95 latency, in milliseconds.
    pub p95_ms_max: f64,
    /// Highest acceptable share of 5xx responses (0..1).
    pub error_rate_max: f64,
    /// Highest acceptable webhook retries per webhook.
    pub webhook_retry_rate_max: f64,
}

/// An alert a heartbeat asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertSpec {
    /// Severity.
    pub level: AlertLevel,
    /// One of [`kind`].
    pub kind: &'static str,
    /// The deduplication key (stable while the condition lasts).
    pub key: String,
    /// Text for people; may contain the measured value.
    pub message: String,
}

impl AlertSpec {
    /// Whether the alert goes to the alert webhook: everything the control plane raises
    /// itself, and instance alerts of level `error` or worse (an instance repeating a
    /// `warning` every heartbeat would otherwise page someone).
    pub fn forwarded(&self) -> bool {
        self.kind != kind::PAYLOAD || self.level >= AlertLevel::Error
    }
}

/// What one heartbeat says about the conditions it reports on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Evaluation {
    /// Conditions present now.
    pub raise: Vec<AlertSpec>,
    /// Keys of conditions the heartbeat shows to be fine now.
    pub clear: Vec<String>,
}

/// Evaluates a heartbeat against the SLO maxima, its secrets figures and its `alerts[]`.
pub fn evaluate(hb: &Heartbeat, slo: &SloThresholds) -> Evaluation {
    let mut out = Evaluation::default();
    // Any heartbeat ends an offline spell.
    out.clear.push(kind::OFFLINE.to_owned());
    let checks = [
        (
            kind::SLO_P95_MS,
            hb.slo_p95_ms,
            slo.p95_ms_max,
            "p95 latency",
            " ms",
        ),
        (
            kind::SLO_ERROR_RATE,
            hb.slo_error_rate,
            slo.error_rate_max,
            "error rate",
            "",
        ),
        (
            kind::SLO_WEBHOOK_RETRY_RATE,
            hb.slo_webhook_retry_rate,
            slo.webhook_retry_rate_max,
            "webhook retry rate",
            "",
        ),
    ];
    for (kind, value, max, what, unit) in checks {
        // An absent figure says nothing: the breach neither starts nor ends.
        let (Some(value), true) = (value, max > 0.0) else {
            continue;
        };
        if value > max {
            out.raise.push(AlertSpec {
                level: AlertLevel::Error,
                kind,
                key: kind.to_owned(),
                message: format!(
                    "SLO breach: {what} {value}{unit} is above the maximum {max}{unit}"
                ),
            });
        } else {
            out.clear.push(kind.to_owned());
        }
    }
    let expired = hb.secrets_expired.unwrap_or(0);
    let unverified = hb.secrets_unverified.unwrap_or(0);
    if expired > 0 || unverified > 0 {
        out.raise.push(AlertSpec {
            level: AlertLevel::Warning,
            kind: kind::SECRETS,
            key: kind::SECRETS.to_owned(),
            message: format!("secrets need attention: {expired} expired, {unverified} unverified"),
        });
    } else if hb.secrets_expired.is_some() || hb.secrets_unverified.is_some() {
        out.clear.push(kind::SECRETS.to_owned());
    }
    let mut seen = BTreeSet::new();
    for alert in &hb.alerts {
        let key = payload_key(alert.level, &alert.message);
        if seen.insert(key.clone()) {
            out.raise.push(AlertSpec {
                level: alert.level,
                kind: kind::PAYLOAD,
                key,
                message: alert.message.clone(),
            });
        }
    }
    out
}

/// The key of an instance alert: its level and a hash of its text (messages can be 8 KiB,
/// too long for an index entry).
pub fn payload_key(level: AlertLevel, message: &str) -> String {
    let digest = Sha256::digest(message.as_bytes());
    format!(
        "{}:{}:{}",
        kind::PAYLOAD,
        level.as_str(),
        hex::encode(&digest[..12])
    )
}

/// Given the keys open now, which specs to open and which keys to resolve. Instance alerts
/// are resolved when a heartbeat no longer carries them: the agent reports its current
/// conditions each time.
pub fn reconcile<'e>(
    eval: &'e Evaluation,
    open: &BTreeSet<String>,
) -> (Vec<&'e AlertSpec>, Vec<String>) {
    let to_open = eval
        .raise
        .iter()
        .filter(|spec| !open.contains(&spec.key))
        .collect();
    let raised: BTreeSet<&str> = eval.raise.iter().map(|s| s.key.as_str()).collect();
    let to_resolve = open
        .iter()
        .filter(|key| {
            let payload_gone = key.starts_with("payload:") && !raised.contains(key.as_str());
            payload_gone || eval.clear.iter().any(|c| c == *key)
        })
        .cloned()
        .collect();
    (to_open, to_resolve)
}

/// The offline alert for an installation last seen at `last_seen_at`.
pub fn offline_spec(last_seen_at: i64, now: i64) -> AlertSpec {
    AlertSpec {
        level: AlertLevel::Error,
        kind: kind::OFFLINE,
        key: kind::OFFLINE.to_owned(),
        message: format!(
            "no heartbeat for {}",
            duration_text(now.saturating_sub(last_seen_at))
        ),
    }
}

/// A span of seconds as people read it, to the two largest units: `45 s`, `15 min`,
/// `2 h 5 min`, `3 d 4 h`. An installation found offline after the control plane itself was
/// down for days was "no heartbeat for 273600 s".
fn duration_text(secs: i64) -> String {
    let secs = secs.max(0);
    let (d, h, m) = (secs / 86_400, secs % 86_400 / 3600, secs % 3600 / 60);
    match secs {
        0..60 => format!("{secs} s"),
        60..3600 => format!("{m} min"),
        3600..86_400 if m > 0 => format!("{h} h {m} min"),
        3600..86_400 => format!("{h} h"),
        _ if h > 0 => format!("{d} d {h} h"),
        _ => format!("{d} d"),
    }
}

/// The alert webhook body: the ERP's `{message, instanceId, installationId, type}` plus
/// `level`, `alertId` and `createdAt`.
pub fn webhook_payload(
    alert_id: i64,
    installation_id: i64,
    instance_id: &str,
    spec: &AlertSpec,
    created_at: i64,
) -> String {
    serde_json::json!({
        "message": spec.message,
        "instanceId": instance_id,
        "installationId": installation_id,
        "type": spec.kind,
        "level": spec.level.as_str(),
        "alertId": alert_id,
        "createdAt": created_at,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_core::heartbeat::PayloadAlert;

    fn slo() -> SloThresholds {
        SloThresholds {
            p95_ms_max: 500.0,
            error_rate_max: 0.05,
            webhook_retry_rate_max: 0.0,
        }
    }

    fn open_keys(keys: &[&str]) -> BTreeSet<String> {
        keys.iter().map(|k| (*k).to_owned()).collect()
    }

    #[test]
    fn breach_opens_once_with_a_key_free_of_the_value() {
        let mut hb = Heartbeat::new("a");
        hb.slo_p95_ms = Some(812.0);
        let first = evaluate(&hb, &slo());
        hb.slo_p95_ms = Some(900.0);
        let second = evaluate(&hb, &slo());
        assert_eq!(first.raise[0].key, second.raise[0].key);
        assert_ne!(first.raise[0].message, second.raise[0].message);
        let (open, _) = reconcile(&second, &open_keys(&["slo_p95_ms"]));
        assert!(open.is_empty(), "already open: no second alert");
    }

    #[test]
    fn breach_end_resolves_and_absent_figure_does_not() {
        let mut hb = Heartbeat::new("a");
        let open = open_keys(&["slo_p95_ms", "offline"]);
        let (_, resolve) = reconcile(&evaluate(&hb, &slo()), &open);
        assert_eq!(resolve, ["offline"], "no figure: the breach is not over");
        hb.slo_p95_ms = Some(100.0);
        let (_, resolve) = reconcile(&evaluate(&hb, &slo()), &open);
        assert_eq!(resolve, ["offline", "slo_p95_ms"]);
    }

    #[test]
    fn a_maximum_of_zero_turns_the_check_off() {
        let mut hb = Heartbeat::new("a");
        hb.slo_webhook_retry_rate = Some(1000.0);
        assert!(evaluate(&hb, &slo()).raise.is_empty());
    }

    #[test]
    fn offline_alerts_say_how_long_in_units_people_read() {
        let text = |secs: i64| offline_spec(1000, 1000 + secs).message;
        assert_eq!(text(45), "no heartbeat for 45 s");
        assert_eq!(text(900), "no heartbeat for 15 min");
        assert_eq!(text(7200), "no heartbeat for 2 h");
        assert_eq!(text(7500), "no heartbeat for 2 h 5 min");
        assert_eq!(text(273_600), "no heartbeat for 3 d 4 h");
        assert_eq!(text(172_800), "no heartbeat for 2 d");
        assert_eq!(offline_spec(1000, 900).message, "no heartbeat for 0 s");
    }

    #[test]
    fn secrets_and_payload_alerts() {
        let mut hb = Heartbeat::new("a");
        hb.secrets_expired = Some(1);
        hb.alerts.push(PayloadAlert {
            level: AlertLevel::Warning,
            message: "Low disk".into(),
            extra: Default::default(),
        });
        let eval = evaluate(&hb, &slo());
        let kinds: Vec<_> = eval.raise.iter().map(|s| s.kind).collect();
        assert_eq!(kinds, ["secrets", "payload"]);
        assert!(eval.raise[0].forwarded() && !eval.raise[1].forwarded());
        let payload = eval.raise[1].key.clone();
        hb.alerts.clear();
        hb.secrets_expired = Some(0);
        let (_, resolve) = reconcile(&evaluate(&hb, &slo()), &open_keys(&[&payload, "secrets"]));
        assert_eq!(resolve.len(), 2);
    }
}
