//! `Heartbeat::decode`'s fast path: serde reads the body straight into a [`Heartbeat`],
//! without the `Value` tree the slow path builds (its allocations, map inserts and removals
//! and drop are most of a valid heartbeat's decoding time).
//!
//! It gives up the moment anything is not plainly valid, and `decode` then runs the slow path
//! on the same bytes. So every error still comes from `decode_fields`, and this module only
//! has to be exact on the bodies it accepts: for those it must build the very heartbeat the
//! slow path builds. Each field therefore follows its rule in `decode_fields` (same order
//! below, to read them side by side), through the same check helpers in `validate`. The keys
//! matched here must be exactly the keys `decode_fields` takes, or a key would land in one
//! path's `extra` and not the other's: the test `every_field_takes_the_fast_path` and the
//! differential tests in `tests/it/properties.rs` fail when a field is added to one only.
//!
//! A repeated key keeps its last value, as `serde_json::Map` does in the slow path; only an
//! earlier value that is itself invalid makes the fast path give up where the slow path would
//! not have complained.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use super::{
    AlertLevel, BYTES_MAX, CheckResult, Container, Heartbeat, HostInfo, JobFailure, PayloadAlert,
};
use crate::validate::{
    Limits, MAX_SLO_ERROR_RATE, MAX_SLO_P95_MS, MAX_SLO_WEBHOOK_RETRY_RATE, Path, ValidationErrors,
    as_count, check_id, check_range, check_size, check_text, is_rfc3339,
};

/// The heartbeat in `body` when it is valid and the fast path handles it, else `None`.
pub(super) fn decode(body: &[u8], limits: &Limits) -> Option<Heartbeat> {
    check_size(body, limits).ok()?;
    let mut de = serde_json::Deserializer::from_slice(body);
    let heartbeat = Object::<Heartbeat>::new(limits).deserialize(&mut de).ok()?;
    // Like `serde_json::from_slice`: only whitespace may follow the object.
    de.end().ok()?;
    Some(heartbeat)
}

/// The error that makes the fast path give up; its text is never shown, because the slow
/// path then decodes the body and reports what is wrong.
fn give_up<E: de::Error>() -> E {
    E::custom("left to the slow path")
}

/// Runs one of `validate`'s check helpers on a value and gives up if it finds a problem, so
/// both paths apply one rule.
fn passes<E: de::Error>(check: impl FnOnce(&mut ValidationErrors, &Path<'_>)) -> Result<(), E> {
    let mut errors = ValidationErrors::default();
    check(&mut errors, &Path::Root);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(give_up())
    }
}

/// A required field's value; missing or `null` means give up (the slow path's "is required").
fn required<T, E: de::Error>(value: Option<T>) -> Result<T, E> {
    value.ok_or_else(give_up)
}

/// `Fields::opt_string` (and, made required, `req_string`): a string or `null`.
fn string<'de, A: MapAccess<'de>>(map: &mut A, max: usize) -> Result<Option<String>, A::Error> {
    let value: Option<String> = map.next_value()?;
    if let Some(text) = &value {
        passes(|errors, at| check_text(errors, at, text, max))?;
    }
    Ok(value)
}

/// `Fields::req_id`'s value: a string or `null`, with the identifier rule.
fn id<'de, A: MapAccess<'de>>(map: &mut A, limits: &Limits) -> Result<Option<String>, A::Error> {
    let value: Option<String> = map.next_value()?;
    if let Some(text) = &value {
        passes(|errors, at| check_id(errors, at, text, limits.max_id_len))?;
    }
    Ok(value)
}

/// `Fields::opt_timestamp`: a string of at most 64 bytes that is an RFC 3339 date-time.
fn timestamp<'de, A: MapAccess<'de>>(map: &mut A) -> Result<Option<String>, A::Error> {
    let value = string(map, 64)?;
    match value {
        Some(text) if !is_rfc3339(&text) => Err(give_up()),
        value => Ok(value),
    }
}

/// `Fields::opt_bool` (and `req_bool`): `true`, `false` or `null`.
fn flag<'de, A: MapAccess<'de>>(map: &mut A) -> Result<Option<bool>, A::Error> {
    map.next_value()
}

/// `Fields::opt_u64` (and `req_u64`). The number is read as a [`Number`], the very value the
/// slow path's `Value` holds, and converted by the same [`as_count`].
fn count<'de, A: MapAccess<'de>>(map: &mut A) -> Result<Option<u64>, A::Error> {
    let value: Option<Number> = map.next_value()?;
    value
        .map(|number| as_count(&number).ok_or_else(give_up))
        .transpose()
}

/// `Fields::opt_f64`: a number within `min..=max`, or `null`.
fn number<'de, A: MapAccess<'de>>(
    map: &mut A,
    min: f64,
    max: f64,
) -> Result<Option<f64>, A::Error> {
    let value: Option<Number> = map.next_value()?;
    let Some(number) = value else {
        return Ok(None);
    };
    let float = number.as_f64().ok_or_else(give_up)?;
    passes(|errors, at| check_range(errors, at, float, min, max))?;
    Ok(Some(float))
}

/// `Fields::array`: `null`, or an array of at most `max` objects, each read as a `T`.
fn list<'de, A: MapAccess<'de>, T: ReadObject>(
    map: &mut A,
    limits: &Limits,
    max: usize,
) -> Result<Vec<T>, A::Error> {
    let list = map.next_value_seed(OrNull(List {
        limits,
        max,
        item: PhantomData,
    }))?;
    Ok(list.unwrap_or_default())
}

/// `Fields::object`: `null`, or an object read as a `T`.
fn object<'de, A: MapAccess<'de>, T: ReadObject>(
    map: &mut A,
    limits: &Limits,
) -> Result<Option<T>, A::Error> {
    map.next_value_seed(OrNull(Object::new(limits)))
}

/// An unknown key: its value is kept as the slow path keeps it, parsed as a [`Value`].
fn unknown<'de, A: MapAccess<'de>>(
    map: &mut A,
    extra: &mut Map<String, Value>,
    key: Key<'de>,
) -> Result<(), A::Error> {
    // serde_json gives these keys a meaning of their own while parsing a `Value` (a raw value
    // or an arbitrary-precision number, with those features on), so the slow path may not see
    // an object here at all.
    if key.0.starts_with("$serde_json::private::") {
        return Err(give_up());
    }
    let value: Value = map.next_value()?;
    extra.insert(key.0.into_owned(), value);
    Ok(())
}

/// `Fields::rest`'s rule: at most `max_extra_keys` unknown keys in each object.
fn check_extra<E: de::Error>(extra: &Map<String, Value>, limits: &Limits) -> Result<(), E> {
    if extra.len() > limits.max_extra_keys {
        return Err(give_up());
    }
    Ok(())
}

/// An object key, borrowed from the body unless it had escapes: known keys are only matched,
/// so only unknown ones get a `String`.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Key<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_borrowed_str<E: de::Error>(self, key: &'de str) -> Result<Key<'de>, E> {
        Ok(Key(Cow::Borrowed(key)))
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Key<'de>, E> {
        Ok(Key(Cow::Owned(key.to_owned())))
    }

    fn visit_string<E: de::Error>(self, key: String) -> Result<Key<'de>, E> {
        Ok(Key(Cow::Owned(key)))
    }
}

/// A type the fast path reads from a JSON object, key by key.
trait ReadObject: Sized {
    /// Reads every entry of `map`; an error means give up.
    fn read<'de, A: MapAccess<'de>>(map: A, limits: &Limits) -> Result<Self, A::Error>;
}

/// Reads one JSON object as a `T`; anything else gives up.
struct Object<'l, T> {
    limits: &'l Limits,
    item: PhantomData<T>,
}

impl<'l, T> Object<'l, T> {
    fn new(limits: &'l Limits) -> Self {
        Self {
            limits,
            item: PhantomData,
        }
    }
}

impl<'de, T: ReadObject> DeserializeSeed<'de> for Object<'_, T> {
    type Value = T;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<T, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de, T: ReadObject> Visitor<'de> for Object<'_, T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::read(map, self.limits)
    }
}

/// Reads a JSON array of at most `max` objects, each as a `T`.
struct List<'l, T> {
    limits: &'l Limits,
    max: usize,
    item: PhantomData<T>,
}

impl<'de, T: ReadObject> DeserializeSeed<'de> for List<'_, T> {
    type Value = Vec<T>;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Vec<T>, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de, T: ReadObject> Visitor<'de> for List<'_, T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of objects")
    }

    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Vec<T>, S::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(Object::new(self.limits))? {
            if items.len() == self.max {
                return Err(give_up());
            }
            items.push(item);
        }
        Ok(items)
    }
}

/// `null` as absent (`Fields::take`), anything else read by the inner seed.
struct OrNull<S>(S);

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for OrNull<S> {
    type Value = Option<S::Value>;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de, S: DeserializeSeed<'de>> Visitor<'de> for OrNull<S> {
    type Value = Option<S::Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("null or a value")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        self.0.deserialize(deserializer).map(Some)
    }
}

impl ReadObject for Heartbeat {
    fn read<'de, A: MapAccess<'de>>(mut map: A, limits: &Limits) -> Result<Self, A::Error> {
        let (text, id_len) = (limits.max_text_len, limits.max_id_len);
        let m = &mut map;
        let mut hb = Heartbeat::default();
        // The required fields, `None` until seen with a value.
        let (mut instance_id, mut db_ok, mut redis_ok, mut storage_ok, mut jobs_failed) =
            (None, None, None, None, None);
        while let Some(key) = m.next_key::<Key>()? {
            match &*key.0 {
                "instance_id" => instance_id = id(m, limits)?,
                "db_ok" => db_ok = flag(m)?,
                "redis_ok" => redis_ok = flag(m)?,
                "storage_ok" => storage_ok = flag(m)?,
                "jobs_failed" => jobs_failed = count(m)?,
                "domain" => hb.domain = string(m, 253)?,
                "client" => hb.client = string(m, text)?,
                "version" => hb.version = string(m, id_len)?,
                "release_channel" => hb.release_channel = string(m, id_len)?,
                "health" => hb.health = string(m, id_len)?,
                "uptime_seconds" => hb.uptime_seconds = number(m, 0.0, 1.0e12)?,
                "search_ok" => hb.search_ok = flag(m)?,
                "secrets_expired" => hb.secrets_expired = count(m)?,
                "secrets_unverified" => hb.secrets_unverified = count(m)?,
                "slo_p95_ms" => hb.slo_p95_ms = number(m, 0.0, MAX_SLO_P95_MS)?,
                "slo_error_rate" => hb.slo_error_rate = number(m, 0.0, MAX_SLO_ERROR_RATE)?,
                "slo_webhook_retry_rate" => {
                    hb.slo_webhook_retry_rate = number(m, 0.0, MAX_SLO_WEBHOOK_RETRY_RATE)?
                }
                "slo_updated_at" => hb.slo_updated_at = timestamp(m)?,
                "last_backup_at" => hb.last_backup_at = timestamp(m)?,
                "backup_id" => hb.backup_id = string(m, text)?,
                "backup_size_bytes" => hb.backup_size_bytes = count(m)?,
                "backup_checksum" => hb.backup_checksum = string(m, 256)?,
                "backup_bucket" => hb.backup_bucket = string(m, text)?,
                "backup_path" => hb.backup_path = string(m, text)?,
                "backup_status" => hb.backup_status = string(m, id_len)?,
                "cpu_usage_pct" => hb.cpu_usage_pct = number(m, 0.0, 100.0)?,
                "memory_used_bytes" => hb.memory_used_bytes = count(m)?,
                "memory_total_bytes" => hb.memory_total_bytes = count(m)?,
                "disk_used_bytes" => hb.disk_used_bytes = count(m)?,
                "disk_total_bytes" => hb.disk_total_bytes = count(m)?,
                "network_rx_bytes" => hb.network_rx_bytes = count(m)?,
                "network_tx_bytes" => hb.network_tx_bytes = count(m)?,
                "db_size_bytes" => hb.db_size_bytes = count(m)?,
                "storage_size_bytes" => hb.storage_size_bytes = count(m)?,
                "jobs_processed_1h" => hb.jobs_processed_1h = count(m)?,
                "jobs_pending" => hb.jobs_pending = count(m)?,
                "outbox_dropped" => hb.outbox_dropped = count(m)?,
                "collected_at" => hb.collected_at = count(m)?,
                "alerts" => hb.alerts = list(m, limits, limits.max_alerts)?,
                "job_failures" => hb.job_failures = list(m, limits, limits.max_job_failures)?,
                "checks" => hb.checks = list(m, limits, limits.max_checks)?,
                "containers" => hb.containers = list(m, limits, limits.max_containers)?,
                "host" => hb.host = object(m, limits)?,
                _ => unknown(m, &mut hb.extra, key)?,
            }
        }
        hb.instance_id = required(instance_id)?;
        hb.db_ok = required(db_ok)?;
        hb.redis_ok = required(redis_ok)?;
        hb.storage_ok = required(storage_ok)?;
        hb.jobs_failed = required(jobs_failed)?;
        check_extra(&hb.extra, limits)?;
        Ok(hb)
    }
}

impl ReadObject for PayloadAlert {
    fn read<'de, A: MapAccess<'de>>(mut map: A, limits: &Limits) -> Result<Self, A::Error> {
        let m = &mut map;
        let (mut level, mut message, mut extra) = (AlertLevel::Info, None, Map::new());
        while let Some(key) = m.next_key::<Key>()? {
            match &*key.0 {
                "level" => {
                    level = match string(m, 16)? {
                        None => AlertLevel::Info,
                        Some(text) => AlertLevel::parse(&text).ok_or_else(give_up)?,
                    }
                }
                "message" => message = string(m, limits.max_message_len)?,
                _ => unknown(m, &mut extra, key)?,
            }
        }
        check_extra(&extra, limits)?;
        Ok(Self {
            level,
            message: required(message)?,
            extra,
        })
    }
}

impl ReadObject for JobFailure {
    fn read<'de, A: MapAccess<'de>>(mut map: A, limits: &Limits) -> Result<Self, A::Error> {
        let m = &mut map;
        let (mut queue, mut message, mut extra) = (None, None, Map::new());
        while let Some(key) = m.next_key::<Key>()? {
            match &*key.0 {
                "queue" => queue = string(m, limits.max_id_len)?,
                "message" => message = string(m, limits.max_message_len)?,
                _ => unknown(m, &mut extra, key)?,
            }
        }
        check_extra(&extra, limits)?;
        Ok(Self {
            queue,
            message: required(message)?,
            extra,
        })
    }
}

impl ReadObject for CheckResult {
    fn read<'de, A: MapAccess<'de>>(mut map: A, limits: &Limits) -> Result<Self, A::Error> {
        let m = &mut map;
        let (mut name, mut ok, mut latency_ms, mut error) = (None, None, None, None);
        let mut extra = Map::new();
        while let Some(key) = m.next_key::<Key>()? {
            match &*key.0 {
                "name" => name = id(m, limits)?,
                "ok" => ok = flag(m)?,
                "latency_ms" => latency_ms = number(m, 0.0, 1.0e9)?,
                "error" => error = string(m, limits.max_message_len)?,
                _ => unknown(m, &mut extra, key)?,
            }
        }
        check_extra(&extra, limits)?;
        Ok(Self {
            name: required(name)?,
            ok: required(ok)?,
            latency_ms,
            error,
            extra,
        })
    }
}

impl ReadObject for Container {
    fn read<'de, A: MapAccess<'de>>(mut map: A, limits: &Limits) -> Result<Self, A::Error> {
        let (text, id_len) = (limits.max_text_len, limits.max_id_len);
        let m = &mut map;
        let (mut container_id, mut name, mut image, mut state, mut status) =
            (None, None, None, None, None);
        let mut extra = Map::new();
        while let Some(key) = m.next_key::<Key>()? {
            match &*key.0 {
                "id" => container_id = id(m, limits)?,
                "name" => name = string(m, text)?,
                "image" => image = string(m, text)?,
                "state" => state = string(m, id_len)?,
                "status" => status = string(m, text)?,
                _ => unknown(m, &mut extra, key)?,
            }
        }
        check_extra(&extra, limits)?;
        Ok(Self {
            id: required(container_id)?,
            name,
            image,
            state,
            status,
            extra,
        })
    }
}

impl ReadObject for HostInfo {
    fn read<'de, A: MapAccess<'de>>(mut map: A, limits: &Limits) -> Result<Self, A::Error> {
        let id_len = limits.max_id_len;
        let m = &mut map;
        let mut host = HostInfo::default();
        while let Some(key) = m.next_key::<Key>()? {
            match &*key.0 {
                "hostname" => host.hostname = string(m, 253)?,
                "os" => host.os = string(m, id_len)?,
                "arch" => host.arch = string(m, id_len)?,
                "cpu_count" => host.cpu_count = count(m)?,
                "load_1m" => host.load_1m = number(m, 0.0, BYTES_MAX)?,
                "uptime_seconds" => host.uptime_seconds = count(m)?,
                _ => unknown(m, &mut host.extra, key)?,
            }
        }
        check_extra(&host.extra, limits)?;
        Ok(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn both(body: &str) -> (Option<Heartbeat>, Result<Heartbeat, crate::DecodeError>) {
        let limits = Limits::default();
        (
            decode(body.as_bytes(), &limits),
            Heartbeat::decode_slow(body.as_bytes(), &limits),
        )
    }

    #[test]
    fn every_field_takes_the_fast_path() {
        let extra = |key: &str| Map::from_iter([(key.to_owned(), Value::from(1))]);
        // No `..Default::default()`: a new field has to be added here, and so to the fast path.
        let full = Heartbeat {
            instance_id: "acme-001".into(),
            db_ok: true,
            redis_ok: false,
            storage_ok: true,
            jobs_failed: 1,
            domain: Some("acme.example.com".into()),
            client: Some("Acme SA".into()),
            version: Some("1.2.3".into()),
            release_channel: Some("stable".into()),
            health: Some("ok".into()),
            uptime_seconds: Some(3601.5),
            search_ok: Some(false),
            secrets_expired: Some(2),
            secrets_unverified: Some(3),
            slo_p95_ms: Some(120.5),
            slo_error_rate: Some(0.25),
            slo_webhook_retry_rate: Some(0.5),
            slo_updated_at: Some("2026-02-11T02:00:00.000Z".into()),
            last_backup_at: Some("2026-02-11T02:00:00+01:00".into()),
            backup_id: Some("b-1".into()),
            backup_size_bytes: Some(4),
            backup_checksum: Some("sha256-abc".into()),
            backup_bucket: Some("backups".into()),
            backup_path: Some("acme/2026-02-11.tar".into()),
            backup_status: Some("ok".into()),
            cpu_usage_pct: Some(12.5),
            memory_used_bytes: Some(5),
            memory_total_bytes: Some(6),
            disk_used_bytes: Some(7),
            disk_total_bytes: Some(8),
            network_rx_bytes: Some(9),
            network_tx_bytes: Some(10),
            db_size_bytes: Some(11),
            storage_size_bytes: Some(12),
            jobs_processed_1h: Some(13),
            jobs_pending: Some(14),
            outbox_dropped: Some(15),
            collected_at: Some(1_770_000_000),
            alerts: vec![PayloadAlert {
                level: AlertLevel::Critical,
                message: "Low disk".into(),
                extra: extra("alert_extra"),
            }],
            job_failures: vec![JobFailure {
                queue: Some("billing".into()),
                message: "Timeout".into(),
                extra: extra("failure_extra"),
            }],
            checks: vec![CheckResult {
                name: "db".into(),
                ok: false,
                latency_ms: Some(2.5),
                error: Some("refused".into()),
                extra: extra("check_extra"),
            }],
            containers: vec![Container {
                id: "c0ffee".into(),
                name: Some("web".into()),
                image: Some("erp:2".into()),
                state: Some("running".into()),
                status: Some("Up 2 hours".into()),
                extra: extra("container_extra"),
            }],
            host: Some(HostInfo {
                hostname: Some("host-1".into()),
                os: Some("linux".into()),
                arch: Some("x86_64".into()),
                cpu_count: Some(8),
                load_1m: Some(0.5),
                uptime_seconds: Some(86400),
                extra: extra("host_extra"),
            }),
            extra: extra("events_total_1h"),
        };
        let body = String::from_utf8(full.to_vec()).expect("utf-8");
        let (fast, slow) = both(&body);
        assert_eq!(fast.as_ref(), Some(&full));
        assert_eq!(slow, Ok(full));
    }

    #[test]
    fn a_repeated_key_keeps_its_last_value_as_in_the_slow_path() {
        let body = r#"{"instance_id":"a","db_ok":true,"redis_ok":true,"storage_ok":true,
            "jobs_failed":1,"jobs_failed":2,"domain":"x","domain":null,"zz":1,"zz":[2]}"#;
        let (fast, slow) = both(body);
        let fast = fast.expect("the fast path accepts it");
        assert_eq!((fast.jobs_failed, fast.domain.as_deref()), (2, None));
        assert_eq!(fast.extra.get("zz"), Some(&serde_json::json!([2])));
        assert_eq!(Ok(fast), slow);
    }

    #[test]
    fn anything_invalid_is_left_to_the_slow_path() {
        let required = r#""instance_id":"a","db_ok":true,"redis_ok":true,"storage_ok":true"#;
        for body in [
            "[]".to_owned(),
            format!("{{{required}}}"),
            format!(r#"{{{required},"jobs_failed":null}}"#),
            format!(r#"{{{required},"jobs_failed":-1}}"#),
            format!(r#"{{{required},"jobs_failed":0,"cpu_usage_pct":100.5}}"#),
            format!(r#"{{{required},"jobs_failed":0,"last_backup_at":"today"}}"#),
            format!(r#"{{{required},"jobs_failed":0,"checks":[{{"name":"db"}}]}}"#),
            format!(r#"{{{required},"jobs_failed":0,"alerts":[null]}}"#),
            format!(r#"{{{required},"jobs_failed":0}} x"#),
        ] {
            let (fast, slow) = both(&body);
            assert_eq!(fast, None, "{body}");
            assert!(slow.is_err(), "{body}");
        }
    }

    #[test]
    fn keys_serde_json_reserves_are_left_to_the_slow_path() {
        let body = r#"{"instance_id":"a","db_ok":true,"redis_ok":true,"storage_ok":true,
            "jobs_failed":0,"$serde_json::private::RawValue":"1"}"#;
        let (fast, slow) = both(body);
        assert_eq!(fast, None);
        // serde_json (with its `raw_value` feature) reserves the key only as an object's first
        // key, so here the slow path keeps it as an unknown key in every build.
        assert!(slow.is_ok());
    }
}
