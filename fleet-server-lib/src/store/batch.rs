//! Recording a batch of heartbeats: the plain functions both backends use to fold a batch
//! into rows (message-id bookkeeping, one upsert per installation, backup records, alert
//! planning).

use std::collections::{BTreeSet, HashMap};

use fleet_core::Heartbeat;

use crate::alerts::AlertSpec;
use crate::store::{HeartbeatPoint, IncomingHeartbeat, IngestRules, RecordOutcome};

/// The installation upsert's conflict clause, the same for both engines: the latest state,
/// and for each descriptive field the latest value reported. A heartbeat from an archived
/// installation makes it active again (`archived_at` is not indexed, so this keeps
/// PostgreSQL's updates HOT). Each engine appends what it
/// needs of its own (columns only it has, a `RETURNING` list).
macro_rules! upsert_installation_conflict {
    () => {
        concat!(
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
         state = excluded.state, \
         archived_at = NULL"
        )
    };
}

/// The outcomes of a batch before anything is written: `NotEnrolled` for each heartbeat
/// whose installation does not exist (`is_known` says which do) when enrollment is required,
/// nothing yet for the others.
pub(crate) fn enrollment_outcomes(
    batch: &[IncomingHeartbeat],
    require_enrollment: bool,
    is_known: impl Fn(&str) -> bool,
) -> Vec<Option<RecordOutcome>> {
    batch
        .iter()
        .map(|inc| {
            (require_enrollment && !is_known(&inc.heartbeat.instance_id))
                .then_some(RecordOutcome::NotEnrolled)
        })
        .collect()
}

/// The outcomes a batch answers: a heartbeat nothing was decided for was neither applied
/// nor refused, so it was a duplicate.
pub(crate) fn final_outcomes(outcomes: Vec<Option<RecordOutcome>>) -> Vec<RecordOutcome> {
    outcomes
        .into_iter()
        .map(|o| o.unwrap_or(RecordOutcome::Duplicate))
        .collect()
}

/// The v1 message ids of a batch: `fresh` holds the first heartbeat of each (instance,
/// message id), to be inserted into `seen_messages`; `repeats` the later ones of the same
/// batch. Heartbeats that already have an outcome, and v0 ones, are in neither.
///
/// `fresh` is in (instance, message id) order: a retry can put the same messages in two
/// concurrent batches, and inserting them in one order makes the second batch wait for the
/// first instead of both deadlocking on the unique index.
pub(crate) fn split_messages(
    batch: &[IncomingHeartbeat],
    outcomes: &[Option<RecordOutcome>],
) -> (Vec<usize>, Vec<usize>) {
    let mut first = std::collections::HashSet::new();
    let (mut fresh, mut repeats) = (Vec::new(), Vec::new());
    for (i, inc) in batch.iter().enumerate() {
        let Some(msg_id) = inc.msg_id.as_deref() else {
            continue;
        };
        if outcomes[i].is_some() {
            continue;
        }
        if first.insert((inc.heartbeat.instance_id.as_str(), msg_id)) {
            fresh.push(i);
        } else {
            repeats.push(i);
        }
    }
    let key = |i: usize| {
        (
            batch[i].heartbeat.instance_id.as_str(),
            batch[i].msg_id.as_deref(),
        )
    };
    fresh.sort_unstable_by(|&a, &b| key(a).cmp(&key(b)));
    (fresh, repeats)
}

/// The signing times seen for each message id during a batch. The first sighting of an id
/// applies; a later one with a new timestamp is a retry (acknowledged, not applied); one
/// whose timestamp was already seen for that id is a replay (refused).
#[derive(Default)]
pub(crate) struct MessageLedger<'a> {
    seen: HashMap<(&'a str, &'a str), Vec<Option<i64>>>,
}

impl<'a> MessageLedger<'a> {
    fn times(&mut self, inc: &'a IncomingHeartbeat) -> &mut Vec<Option<i64>> {
        let msg_id = inc.msg_id.as_deref().unwrap_or_default();
        self.seen
            .entry((inc.heartbeat.instance_id.as_str(), msg_id))
            .or_default()
    }

    /// A fresh message id the store had not seen: it applies.
    pub fn inserted(&mut self, inc: &'a IncomingHeartbeat) {
        self.times(inc).push(inc.signed_at);
    }

    /// A fresh message id the store already had, signed at `stored`.
    pub fn already_stored(
        &mut self,
        inc: &'a IncomingHeartbeat,
        stored: Option<i64>,
    ) -> RecordOutcome {
        let times = self.times(inc);
        times.push(stored);
        times.push(inc.signed_at);
        if stored == inc.signed_at {
            RecordOutcome::Replay
        } else {
            RecordOutcome::Duplicate
        }
    }

    /// A message id seen earlier in the same batch.
    pub fn repeat(&mut self, inc: &'a IncomingHeartbeat) -> RecordOutcome {
        let times = self.times(inc);
        let outcome = if times.contains(&inc.signed_at) {
            RecordOutcome::Replay
        } else {
            RecordOutcome::Duplicate
        };
        times.push(inc.signed_at);
        outcome
    }
}

/// The heartbeats of a batch that still apply, folded into one upsert per installation, in
/// instance-id order (a stable order keeps concurrent writers from deadlocking).
pub(crate) fn merge_installations<'a>(
    batch: &'a [IncomingHeartbeat],
    outcomes: &[Option<RecordOutcome>],
) -> Vec<Merged<'a>> {
    let mut merged: HashMap<&str, Merged<'a>> = HashMap::new();
    for (i, inc) in batch.iter().enumerate() {
        if outcomes[i].is_none() {
            merged
                .entry(inc.heartbeat.instance_id.as_str())
                .or_insert_with(|| Merged::new(i))
                .add(i, &inc.heartbeat);
        }
    }
    let mut latest: Vec<Merged<'a>> = merged.into_values().collect();
    latest.sort_unstable_by_key(|m| batch[m.latest].heartbeat.instance_id.as_str());
    latest
}

/// Where an applied heartbeat goes in its installation's time series: its row id, and the
/// row id of the installation's heartbeat before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChainLink {
    pub id: i64,
    pub previous: Option<i64>,
}

/// Row ids for the heartbeats of a batch that still apply, from `first_id` up in batch
/// order, each linked to the one before it of the same installation: the previous one in
/// this batch, or else `stored_last(instance_id)`, the newest stored one. Reading an
/// installation's recent heartbeats follows these links instead of an index by installation,
/// which every heartbeat would have to update at a random place.
pub(crate) fn chain_heartbeats(
    batch: &[IncomingHeartbeat],
    outcomes: &[Option<RecordOutcome>],
    first_id: i64,
    stored_last: impl Fn(&str) -> Option<i64>,
) -> Vec<Option<ChainLink>> {
    let mut newest: HashMap<&str, Option<i64>> = HashMap::new();
    let mut next = first_id;
    batch
        .iter()
        .zip(outcomes)
        .map(|(inc, outcome)| {
            if outcome.is_some() {
                return None;
            }
            let instance_id = inc.heartbeat.instance_id.as_str();
            let newest = newest
                .entry(instance_id)
                .or_insert_with(|| stored_last(instance_id));
            let link = ChainLink {
                id: next,
                previous: *newest,
            };
            *newest = Some(next);
            next += 1;
            Some(link)
        })
        .collect()
}

/// A backup record to insert.
pub(crate) struct BackupRow<'a> {
    pub installation_id: i64,
    pub backup_id: Option<&'a str>,
    pub checksum: &'a str,
    pub size_bytes: Option<i64>,
    pub bucket: Option<&'a str>,
    pub path: Option<&'a str>,
    pub status: Option<&'a str>,
    pub backup_at: Option<&'a str>,
    pub recorded_at: i64,
}

/// A backup record for each applied heartbeat whose backup checksum differs from the last
/// one recorded (`checksums`: installation id → last checksum, as stored before the batch).
pub(crate) fn new_backups<'a>(
    mut checksums: HashMap<i64, Option<String>>,
    applied: &[(&'a IncomingHeartbeat, i64)],
) -> Vec<BackupRow<'a>> {
    let mut rows = Vec::new();
    for &(inc, id) in applied {
        let hb = &inc.heartbeat;
        let Some(sum) = hb.backup_checksum.as_ref() else {
            continue;
        };
        let previous = checksums.entry(id).or_default();
        if previous.as_ref() == Some(sum) {
            continue;
        }
        *previous = Some(sum.clone());
        rows.push(BackupRow {
            installation_id: id,
            backup_id: hb.backup_id.as_deref(),
            checksum: sum,
            size_bytes: hb.backup_size_bytes.map(|v| v.min(i64::MAX as u64) as i64),
            bucket: hb.backup_bucket.as_deref(),
            path: hb.backup_path.as_deref(),
            status: hb.backup_status.as_deref(),
            backup_at: hb.last_backup_at.as_deref(),
            recorded_at: inc.received_at,
        });
    }
    rows
}

/// The latest state column: the body as received (verified JSON, so UTF-8). `from_utf8`
/// checks a word at a time; the lossy conversion, kept for a body that is not UTF-8 after
/// all, walks byte by byte.
pub(crate) fn state_text(body: &[u8]) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(body) {
        Ok(text) => std::borrow::Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(body),
    }
}

enum Figure {
    Int(Option<u64>),
    Float(Option<f64>),
}

/// The numeric figures of a heartbeat, as stored in its time-series row (a JSON object),
/// with when it was collected (at most when it arrived: an agent's clock ahead of ours does
/// not date figures in the future). Written directly: this runs once per heartbeat on the
/// ingest path.
pub(crate) fn figures_json(inc: &IncomingHeartbeat) -> String {
    let hb = &inc.heartbeat;
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
    let collected_at = hb.collected_at.map(|_| observed_at(inc));
    put(
        COLLECTED_AT,
        Int(collected_at.and_then(|at| u64::try_from(at).ok())),
    );
    out.push('}');
    out
}

/// When what `inc` reports was true: when its agent collected it, but never after it
/// arrived (an agent's clock ahead of ours does not date anything in the future); when it
/// arrived for an agent that does not say.
pub(crate) fn observed_at(inc: &IncomingHeartbeat) -> i64 {
    inc.heartbeat.collected_at.map_or(inc.received_at, |at| {
        i64::try_from(at).map_or(inc.received_at, |at| at.min(inc.received_at))
    })
}

/// The key of the collection time among a time-series row's figures, which
/// [`HeartbeatPoint::collected_at`] holds when the row is read.
pub(crate) const COLLECTED_AT: &str = "collected_at";

pub(crate) fn point(received_at: i64, figures: &str) -> HeartbeatPoint {
    let mut figures: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(figures).unwrap_or_default();
    let collected_at = figures
        .remove(COLLECTED_AT)
        .and_then(|at| at.as_i64())
        .unwrap_or(received_at);
    HeartbeatPoint {
        received_at,
        collected_at,
        figures,
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

/// Whether `inc` was collected longer than `late_after` before it arrived.
fn arrived_late(inc: &IncomingHeartbeat, late_after: Option<std::time::Duration>) -> bool {
    late_after.is_some_and(|late_after| {
        let late_after = i64::try_from(late_after.as_secs()).unwrap_or(i64::MAX);
        observed_at(inc) < inc.received_at.saturating_sub(late_after)
    })
}

/// Runs the alert rules over the applied heartbeats of a batch, in order. A heartbeat that
/// arrived late ([`IngestRules::late_after`]) only ends an open `offline` alert.
pub(crate) fn plan_alerts<'a>(
    applied: &[(&'a IncomingHeartbeat, i64)],
    mut open: HashMap<i64, HashMap<String, OpenRef>>,
    rules: &IngestRules,
) -> (Vec<PendingAlert<'a>>, Vec<i64>) {
    let mut pending: Vec<PendingAlert<'a>> = Vec::new();
    let mut resolve_ids = Vec::new();
    for &(inc, installation_id) in applied {
        let refs = open.entry(installation_id).or_default();
        let (to_open, to_resolve) = if arrived_late(inc, rules.late_after) {
            let offline = crate::alerts::kind::OFFLINE;
            let ended = refs.contains_key(offline).then(|| offline.to_owned());
            (Vec::new(), ended.into_iter().collect())
        } else {
            let eval = crate::alerts::evaluate(&inc.heartbeat, &rules.slo);
            let keys: BTreeSet<String> = refs.keys().cloned().collect();
            let (to_open, to_resolve) = crate::alerts::reconcile(&eval, &keys);
            (to_open.into_iter().cloned().collect(), to_resolve)
        };
        for key in to_resolve {
            match refs.remove(&key) {
                Some(OpenRef::Stored(id)) => resolve_ids.push(id),
                Some(OpenRef::Pending(i)) => pending[i].resolved_at = Some(observed_at(inc)),
                None => {}
            }
        }
        for spec in to_open {
            refs.insert(spec.key.clone(), OpenRef::Pending(pending.len()));
            pending.push(PendingAlert {
                installation_id,
                instance_id: &inc.heartbeat.instance_id,
                spec,
                created_at: observed_at(inc),
                resolved_at: None,
            });
        }
    }
    (pending, resolve_ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `heartbeat` as received at `received_at`, signed v0.
    fn incoming(heartbeat: Heartbeat, received_at: i64) -> IncomingHeartbeat {
        IncomingHeartbeat {
            heartbeat,
            scheme: fleet_core::signing::Scheme::V0,
            msg_id: None,
            signed_at: None,
            received_at,
            body: b"{}".to_vec(),
        }
    }

    #[test]
    fn applied_heartbeats_get_ids_in_batch_order_linked_per_installation() {
        let incoming = |instance: &str| incoming(Heartbeat::new(instance), 1_000);
        let batch = ["a", "b", "a", "a", "c"].map(incoming);
        // The third heartbeat was a duplicate: it gets no row and breaks no link.
        let outcomes = [None, None, Some(RecordOutcome::Duplicate), None, None];
        let stored_last = |instance: &str| (instance == "a").then_some(7);
        let link = |id, previous| Some(ChainLink { id, previous });
        assert_eq!(
            chain_heartbeats(&batch, &outcomes, 20, stored_last),
            [
                link(20, Some(7)),
                link(21, None),
                None,
                link(22, Some(20)),
                link(23, None)
            ]
        );
    }

    #[test]
    fn figures_are_a_json_object_of_the_numbers() {
        let mut hb = Heartbeat::new("a");
        hb.cpu_usage_pct = Some(12.5);
        hb.uptime_seconds = Some(60.0);
        hb.memory_used_bytes = Some(4_000_000_000);
        hb.slo_error_rate = Some(0.001);
        hb.outbox_dropped = Some(7);
        hb.collected_at = Some(900);
        let inc = incoming(hb, 1_000);
        let parsed: serde_json::Value = serde_json::from_str(&figures_json(&inc)).expect("json");
        assert_eq!(
            parsed,
            serde_json::json!({"jobs_failed": 0, "cpu_usage_pct": 12.5, "uptime_seconds": 60.0,
                "memory_used_bytes": 4_000_000_000u64, "slo_error_rate": 0.001,
                "outbox_dropped": 7, "collected_at": 900})
        );
        let read = point(inc.received_at, &figures_json(&inc));
        assert_eq!((read.received_at, read.collected_at), (1_000, 900));
        assert!(!read.figures.contains_key("collected_at"), "{read:?}");
    }

    #[test]
    fn a_heartbeat_arrived_late_when_collected_before_the_limit() {
        let limit = Some(std::time::Duration::from_secs(900));
        let at = |collected_at: Option<u64>| {
            let mut hb = Heartbeat::new("a");
            hb.collected_at = collected_at;
            incoming(hb, 10_000)
        };
        assert!(arrived_late(&at(Some(9_099)), limit));
        assert!(!arrived_late(&at(Some(9_100)), limit), "at the limit");
        assert!(
            !arrived_late(&at(None), limit),
            "an agent that does not say"
        );
        assert!(!arrived_late(&at(Some(0)), None), "no limit");
        assert!(!arrived_late(&at(Some(u64::MAX)), limit));
    }

    #[test]
    fn a_heartbeat_is_collected_no_later_than_it_arrived() {
        let mut hb = Heartbeat::new("a");
        let read = |hb: &Heartbeat| {
            let inc = incoming(hb.clone(), 1_000);
            point(inc.received_at, &figures_json(&inc)).collected_at
        };
        assert_eq!(read(&hb), 1_000, "an agent that does not say: at arrival");
        hb.collected_at = Some(5_000);
        assert_eq!(read(&hb), 1_000, "a clock ahead of ours");
        hb.collected_at = Some(u64::MAX);
        assert_eq!(read(&hb), 1_000);
    }
}
