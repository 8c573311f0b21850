//! Recording a batch: the statements of each engine (the whole batch is ONE JSON array
//! parameter), the parameters, and the plain functions that fold a batch into rows.

use std::collections::{BTreeSet, HashMap};

use fleet_core::Heartbeat;

use crate::alerts::AlertSpec;
use crate::store::{HeartbeatPoint, IncomingHeartbeat};

/// The statements that take a whole batch as ONE JSON array parameter. Their text is fixed
/// whatever the batch size, so each is prepared once and cached (a multi-row `VALUES` list
/// would be a new statement, parsed and planned again, for every batch size), and a batch
/// of any size costs one round trip per statement. Only the way a JSON array becomes rows
/// differs between the engines (`json_each` and `jsonb_array_elements`).
pub(crate) struct BatchSql {
    /// Largest parameter sent in one statement; a larger batch is sent in pieces.
    pub piece_bytes: usize,
    /// `$1`: `["instance_id", ...]` → `id, instance_id, last_backup_checksum`.
    pub select_installations: &'static str,
    /// `$1`: `[[instance_id, msg_id, signed_at, seen_at], ...]` → inserted `instance_id, msg_id`.
    pub insert_seen: &'static str,
    /// `$1`: `[[[instance_id, domain, client, version], [release_channel, health, scheme],
    /// [first_seen_at, last_seen_at, backup_checksum], state], ...]` → `id, instance_id`.
    pub upsert_installations: &'static str,
    /// `$1`: `[[installation_id, received_at, msg_id, figures], ...]`.
    pub insert_heartbeats: &'static str,
    /// `$1`: `[[installation_id, queue, message, created_at], ...]`.
    pub insert_job_failures: &'static str,
    /// `$1`: `[[[installation_id, backup_id, checksum], [size_bytes, bucket, path],
    /// [status, backup_at, recorded_at]], ...]`.
    pub insert_backups: &'static str,
    /// `$1`: `[installation_id, ...]` → open `id, installation_id, dedup_key`.
    pub select_open_alerts: &'static str,
    /// `$1`: resolved_at, `$2`: `[alert_id, ...]`.
    pub resolve_alerts: &'static str,
}

/// The upsert's conflict clause, the same for both engines.
macro_rules! upsert_installations_tail {
    () => {
        " ON CONFLICT (instance_id) DO UPDATE SET \
         domain = COALESCE(excluded.domain, installations.domain), \
         client = COALESCE(excluded.client, installations.client), \
         version = COALESCE(excluded.version, installations.version), \
         release_channel = COALESCE(excluded.release_channel, installations.release_channel), \
         health = COALESCE(excluded.health, installations.health), \
         scheme = excluded.scheme, \
         first_seen_at = COALESCE(installations.first_seen_at, excluded.first_seen_at), \
         last_seen_at = excluded.last_seen_at, \
         last_backup_checksum = COALESCE(excluded.last_backup_checksum, installations.last_backup_checksum), \
         state = excluded.state \
         RETURNING id, instance_id"
    };
}

/// SQLite: `json_each` and the `->>` operator (SQLite 3.38+). `WHERE true` keeps the parser
/// from reading `ON CONFLICT` as part of the `SELECT`'s join.
pub(crate) const SQLITE_BATCH: BatchSql = BatchSql {
    // In process: no network, no reason to split.
    piece_bytes: usize::MAX,
    select_installations: "SELECT id, instance_id, last_backup_checksum FROM installations \
        WHERE instance_id IN (SELECT value FROM json_each($1))",
    insert_seen: "INSERT INTO seen_messages (instance_id, msg_id, signed_at, seen_at) \
        SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3 FROM json_each($1) WHERE true \
        ON CONFLICT DO NOTHING RETURNING instance_id, msg_id",
    upsert_installations: concat!(
        "INSERT INTO installations (instance_id, domain, client, version, release_channel, health, \
         scheme, first_seen_at, last_seen_at, last_backup_checksum, state) \
         SELECT value ->> '$[0][0]', value ->> '$[0][1]', value ->> '$[0][2]', value ->> '$[0][3]', \
         value ->> '$[1][0]', value ->> '$[1][1]', value ->> '$[1][2]', \
         value ->> '$[2][0]', value ->> '$[2][1]', value ->> '$[2][2]', value ->> '$[3]' \
         FROM json_each($1) WHERE true",
        upsert_installations_tail!()
    ),
    insert_heartbeats: "INSERT INTO heartbeats (installation_id, received_at, msg_id, figures) \
        SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3 FROM json_each($1)",
    insert_job_failures: "INSERT INTO job_failures (installation_id, queue, message, created_at) \
        SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3 FROM json_each($1)",
    insert_backups: "INSERT INTO backups (installation_id, backup_id, checksum, size_bytes, bucket, \
        path, status, backup_at, recorded_at) \
        SELECT value ->> '$[0][0]', value ->> '$[0][1]', value ->> '$[0][2]', value ->> '$[1][0]', \
        value ->> '$[1][1]', value ->> '$[1][2]', value ->> '$[2][0]', value ->> '$[2][1]', \
        value ->> '$[2][2]' FROM json_each($1)",
    select_open_alerts: "SELECT id, installation_id, dedup_key FROM alerts \
        WHERE resolved_at IS NULL AND dedup_key IS NOT NULL \
        AND installation_id IN (SELECT value FROM json_each($1))",
    resolve_alerts: "UPDATE alerts SET resolved_at = $1 WHERE id IN (SELECT value FROM json_each($2))",
};

/// PostgreSQL: `jsonb_array_elements` (parsed once; with `json` every `->>` would parse its
/// element again) with casts from text.
pub(crate) const POSTGRES_BATCH: BatchSql = BatchSql {
    // sqlx 0.9.0 does not set TCP_NODELAY (sqlx issue #4335, fixed upstream by #4336). A
    // message larger than the socket's initial send buffer (16 KiB on Linux) leaves in two
    // writes, and the second waits for the server's delayed ACK: 40 ms per statement. Below
    // that size a statement costs one round trip. Raise this once sqlx sets TCP_NODELAY.
    piece_bytes: 12 * 1024,
    // LATERAL: one index probe per id. With `IN (SELECT ...)` the planner, which cannot
    // size a set-returning function, may hash-join over a scan of the whole table.
    select_installations: "SELECT i.id, i.instance_id, i.last_backup_checksum \
        FROM jsonb_array_elements_text($1::jsonb) AS k(v) CROSS JOIN LATERAL \
        (SELECT id, instance_id, last_backup_checksum FROM installations WHERE instance_id = k.v) AS i",
    insert_seen: "INSERT INTO seen_messages (instance_id, msg_id, signed_at, seen_at) \
        SELECT e ->> 0, e ->> 1, (e ->> 2)::bigint, (e ->> 3)::bigint \
        FROM jsonb_array_elements($1::jsonb) AS e \
        ON CONFLICT DO NOTHING RETURNING instance_id, msg_id",
    upsert_installations: concat!(
        "INSERT INTO installations (instance_id, domain, client, version, release_channel, health, \
         scheme, first_seen_at, last_seen_at, last_backup_checksum, state) \
         SELECT e #>> '{0,0}', e #>> '{0,1}', e #>> '{0,2}', e #>> '{0,3}', \
         e #>> '{1,0}', e #>> '{1,1}', e #>> '{1,2}', \
         (e #>> '{2,0}')::bigint, (e #>> '{2,1}')::bigint, e #>> '{2,2}', e ->> 3 \
         FROM jsonb_array_elements($1::jsonb) AS e",
        upsert_installations_tail!()
    ),
    insert_heartbeats: "INSERT INTO heartbeats (installation_id, received_at, msg_id, figures) \
        SELECT (e ->> 0)::bigint, (e ->> 1)::bigint, e ->> 2, e ->> 3 FROM jsonb_array_elements($1::jsonb) AS e",
    insert_job_failures: "INSERT INTO job_failures (installation_id, queue, message, created_at) \
        SELECT (e ->> 0)::bigint, e ->> 1, e ->> 2, (e ->> 3)::bigint FROM jsonb_array_elements($1::jsonb) AS e",
    insert_backups: "INSERT INTO backups (installation_id, backup_id, checksum, size_bytes, bucket, \
        path, status, backup_at, recorded_at) \
        SELECT (e #>> '{0,0}')::bigint, e #>> '{0,1}', e #>> '{0,2}', (e #>> '{1,0}')::bigint, \
        e #>> '{1,1}', e #>> '{1,2}', e #>> '{2,0}', e #>> '{2,1}', (e #>> '{2,2}')::bigint \
        FROM jsonb_array_elements($1::jsonb) AS e",
    select_open_alerts: "SELECT a.id, a.installation_id, a.dedup_key \
        FROM jsonb_array_elements_text($1::jsonb) AS k(v) CROSS JOIN LATERAL \
        (SELECT id, installation_id, dedup_key FROM alerts WHERE installation_id = k.v::bigint \
        AND resolved_at IS NULL AND dedup_key IS NOT NULL) AS a",
    resolve_alerts: "UPDATE alerts SET resolved_at = $1 \
        WHERE id IN (SELECT (jsonb_array_elements_text($2::jsonb))::bigint)",
};

/// One JSON array parameter for a statement over `rows` (tuples become arrays).
pub(crate) fn json<T: serde::Serialize + ?Sized>(rows: &T) -> String {
    // Serializing plain tuples of strings and numbers cannot fail.
    serde_json::to_string(rows).unwrap_or_else(|_| "[]".to_owned())
}

/// Batch parameters: `rows` as JSON arrays (tuples become arrays) of at most `limit` bytes
/// each (a single larger row is a piece of its own).
pub(crate) fn json_pieces<T: serde::Serialize>(rows: &[T], limit: usize) -> Vec<String> {
    let mut pieces = Vec::new();
    let mut current = String::from("[");
    for row in rows {
        // Serializing plain tuples of strings and numbers cannot fail.
        let text = serde_json::to_string(row).unwrap_or_else(|_| "null".to_owned());
        if current.len() > 1 && current.len() + text.len() + 1 > limit {
            current.push(']');
            pieces.push(std::mem::replace(&mut current, String::from("[")));
        }
        if current.len() > 1 {
            current.push(',');
        }
        current.push_str(&text);
    }
    if current.len() > 1 {
        current.push(']');
        pieces.push(current);
    }
    pieces
}

enum Figure {
    Int(Option<u64>),
    Float(Option<f64>),
}

/// The numeric figures of a heartbeat, as stored in its time-series row (a JSON object).
/// Written directly: this runs once per heartbeat on the ingest path.
pub(crate) fn figures_json(hb: &Heartbeat) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(320);
    out.push('{');
    // Integers as integers, other figures as floats (`{:?}` keeps the `.0`), as serde_json
    // writes them.
    let mut put = |name: &str, value: Figure| {
        let sep = if out.len() > 1 { "," } else { "" };
        let _ = match value {
            Figure::Int(Some(v)) => write!(out, "{sep}\"{name}\":{v}"),
            Figure::Float(Some(v)) if v.is_finite() => write!(out, "{sep}\"{name}\":{v:?}"),
            _ => Ok(()),
        };
    };
    use Figure::{Float, Int};
    put("jobs_failed", Int(Some(hb.jobs_failed)));
    put("uptime_seconds", Float(hb.uptime_seconds));
    put("cpu_usage_pct", Float(hb.cpu_usage_pct));
    put("memory_used_bytes", Int(hb.memory_used_bytes));
    put("memory_total_bytes", Int(hb.memory_total_bytes));
    put("disk_used_bytes", Int(hb.disk_used_bytes));
    put("disk_total_bytes", Int(hb.disk_total_bytes));
    put("network_rx_bytes", Int(hb.network_rx_bytes));
    put("network_tx_bytes", Int(hb.network_tx_bytes));
    put("db_size_bytes", Int(hb.db_size_bytes));
    put("storage_size_bytes", Int(hb.storage_size_bytes));
    put("jobs_processed_1h", Int(hb.jobs_processed_1h));
    put("jobs_pending", Int(hb.jobs_pending));
    put("slo_p95_ms", Float(hb.slo_p95_ms));
    put("slo_error_rate", Float(hb.slo_error_rate));
    put("slo_webhook_retry_rate", Float(hb.slo_webhook_retry_rate));
    put("secrets_expired", Int(hb.secrets_expired));
    put("secrets_unverified", Int(hb.secrets_unverified));
    // Heartbeats the agent's outbox dropped (bounds passed while the control plane was
    // away): kept, or the count the agent reports would reach nobody.
    put("outbox_dropped", Int(hb.outbox_dropped));
    out.push('}');
    out
}

pub(crate) fn point(received_at: i64, figures: &str) -> HeartbeatPoint {
    HeartbeatPoint {
        received_at,
        figures: serde_json::from_str(figures).unwrap_or_default(),
    }
}

/// One installation's heartbeats within a batch, folded into the row to upsert.
pub(crate) struct Merged<'a> {
    pub first: usize,
    pub latest: usize,
    pub domain: Option<&'a String>,
    pub client: Option<&'a String>,
    pub version: Option<&'a String>,
    pub release_channel: Option<&'a String>,
    pub health: Option<&'a String>,
    pub backup_checksum: Option<&'a String>,
}

impl<'a> Merged<'a> {
    pub fn new(first: usize) -> Self {
        Self {
            first,
            latest: first,
            domain: None,
            client: None,
            version: None,
            release_channel: None,
            health: None,
            backup_checksum: None,
        }
    }

    pub fn add(&mut self, index: usize, hb: &'a Heartbeat) {
        self.latest = index;
        let fields = [
            (&mut self.domain, &hb.domain),
            (&mut self.client, &hb.client),
            (&mut self.version, &hb.version),
            (&mut self.release_channel, &hb.release_channel),
            (&mut self.health, &hb.health),
            (&mut self.backup_checksum, &hb.backup_checksum),
        ];
        for (slot, value) in fields {
            if let Some(value) = value {
                *slot = Some(value);
            }
        }
    }
}

/// An alert the batch opens; `resolved_at` is set when a later heartbeat of the same batch
/// already ends it.
pub(crate) struct PendingAlert<'a> {
    pub installation_id: i64,
    pub instance_id: &'a str,
    pub spec: AlertSpec,
    pub created_at: i64,
    pub resolved_at: Option<i64>,
}

/// Where an open key stands during a batch.
#[derive(Clone, Copy)]
pub(crate) enum OpenRef {
    Stored(i64),
    Pending(usize),
}

/// Runs the alert rules over the applied heartbeats of a batch, in order.
pub(crate) fn plan_alerts<'a>(
    applied: &[(&'a IncomingHeartbeat, i64)],
    mut open: HashMap<i64, HashMap<String, OpenRef>>,
    slo: &crate::alerts::SloThresholds,
) -> (Vec<PendingAlert<'a>>, Vec<i64>) {
    let mut pending: Vec<PendingAlert<'a>> = Vec::new();
    let mut resolve_ids = Vec::new();
    for &(inc, installation_id) in applied {
        let eval = crate::alerts::evaluate(&inc.heartbeat, slo);
        let refs = open.entry(installation_id).or_default();
        let keys: BTreeSet<String> = refs.keys().cloned().collect();
        let (to_open, to_resolve) = crate::alerts::reconcile(&eval, &keys);
        for key in to_resolve {
            match refs.remove(&key) {
                Some(OpenRef::Stored(id)) => resolve_ids.push(id),
                Some(OpenRef::Pending(i)) => pending[i].resolved_at = Some(inc.received_at),
                None => {}
            }
        }
        for spec in to_open {
            refs.insert(spec.key.clone(), OpenRef::Pending(pending.len()));
            pending.push(PendingAlert {
                installation_id,
                instance_id: &inc.heartbeat.instance_id,
                spec: spec.clone(),
                created_at: inc.received_at,
                resolved_at: None,
            });
        }
    }
    (pending, resolve_ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_stay_under_the_limit_and_keep_every_row_in_order() {
        let rows: Vec<(u32, String)> = (0..300).map(|i| (i, "x".repeat(400))).collect();
        let limit = 12 * 1024;
        let pieces = json_pieces(&rows, limit);
        assert!(pieces.len() > 1);
        assert_eq!(json_pieces(&rows, usize::MAX).len(), 1);
        let mut back: Vec<(u32, String)> = Vec::new();
        for piece in &pieces {
            assert!(piece.len() <= limit, "{}", piece.len());
            back.extend(serde_json::from_str::<Vec<(u32, String)>>(piece).expect("json"));
        }
        assert_eq!(back, rows);
        let huge = [(0u32, "y".repeat(limit * 2))];
        assert_eq!(
            json_pieces(&huge, limit).len(),
            1,
            "an oversized row is a piece of its own"
        );
        assert!(json_pieces::<u32>(&[], limit).is_empty());
    }

    #[test]
    fn figures_are_a_json_object_of_the_numbers() {
        let mut hb = Heartbeat::new("a");
        hb.cpu_usage_pct = Some(12.5);
        hb.uptime_seconds = Some(60.0);
        hb.memory_used_bytes = Some(4_000_000_000);
        hb.slo_error_rate = Some(0.001);
        hb.outbox_dropped = Some(7);
        let parsed: serde_json::Value = serde_json::from_str(&figures_json(&hb)).expect("json");
        assert_eq!(
            parsed,
            serde_json::json!({"jobs_failed": 0, "cpu_usage_pct": 12.5, "uptime_seconds": 60.0,
                "memory_used_bytes": 4_000_000_000u64, "slo_error_rate": 0.001,
                "outbox_dropped": 7})
        );
    }
}
