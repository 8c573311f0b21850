//! Recording a batch of heartbeats on SQLite: prepared statements, row by row, on a
//! connection kept for this alone.
//!
//! In process there is no round trip to save, so the JSON array parameters PostgreSQL gets
//! would only cost work: escaping each body into a string, and SQLite parsing it back. A
//! cached statement with bound values costs SQLite about half. The connection is the
//! ingest's own, so its page cache keeps the installations the batches update, and the
//! whole batch runs in one call on a blocking thread instead of one hand-off per statement.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, mpsc};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::batch::{self, MessageLedger, OpenRef, PendingAlert};
use super::sqlite::{BUSY_TIMEOUT, CACHE_SIZE, WAL_AUTOCHECKPOINT_PAGES};
use crate::store::{IncomingHeartbeat, IngestRules, RecordOutcome};
use crate::{Error, Result};

/// An installation with its open deduplicated alerts (one row each, or one row of NULLs):
/// one statement instead of two per heartbeat. Nothing of this batch raises an alert
/// before the rules run, so reading them first is the same as reading them last.
const SELECT_INSTALLATION: &str = "SELECT i.id, i.last_backup_checksum, i.last_heartbeat_id, \
    a.id, a.dedup_key \
    FROM installations i LEFT JOIN alerts a ON a.installation_id = i.id \
    AND a.resolved_at IS NULL AND a.dedup_key IS NOT NULL WHERE i.instance_id = ?1";
const INSERT_SEEN: &str = "INSERT INTO seen_messages (instance_id, msg_id, signed_at, seen_at) \
    VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING";
const SELECT_SEEN: &str =
    "SELECT signed_at FROM seen_messages WHERE instance_id = ?1 AND msg_id = ?2";
/// Without `RETURNING`: SQLite gathers returned rows in a temporary table, opened and closed
/// again on every execution (about 1.5 µs per heartbeat, BENCHMARKS.md). The batch knows the
/// row id of an installation that exists, and one it inserts is the last inserted row.
const UPSERT_INSTALLATION: &str = concat!(
    "INSERT INTO installations (instance_id, domain, client, version, release_channel, health, \
     scheme, first_seen_at, last_seen_at, last_backup_checksum, state, last_heartbeat_id) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    upsert_installation_conflict!(),
    ", last_heartbeat_id = excluded.last_heartbeat_id"
);
/// [`UPSERT_INSTALLATION`] for an installation the batch found: by row id, without the
/// insert attempt and the unique-index probe the upsert starts with. Its rules are those of
/// `upsert_installation_conflict!`, written for an update; the store suite's
/// `a_later_batch_keeps_what_it_does_not_report` holds the two to the same result.
const UPDATE_INSTALLATION: &str = "UPDATE installations SET domain = COALESCE(?2, domain), \
    client = COALESCE(?3, client), version = COALESCE(?4, version), \
    release_channel = COALESCE(?5, release_channel), health = COALESCE(?6, health), \
    scheme = ?7, first_seen_at = COALESCE(first_seen_at, ?8), last_seen_at = ?9, \
    last_backup_checksum = COALESCE(?10, last_backup_checksum), state = ?11, \
    last_heartbeat_id = ?12, archived_at = NULL WHERE id = ?1";
/// The next heartbeat row id. The transaction holds the database's write lock, so no other
/// writer can take the ids this batch gives its rows (and their links) before it inserts them.
const NEXT_HEARTBEAT_ID: &str = "SELECT COALESCE(MAX(id), 0) + 1 FROM heartbeats";
const INSERT_HEARTBEAT: &str = "INSERT INTO heartbeats (id, installation_id, received_at, msg_id, \
    figures, previous_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6)";
const INSERT_JOB_FAILURE: &str = "INSERT INTO job_failures (installation_id, queue, message, created_at) \
    VALUES (?1, ?2, ?3, ?4)";
const INSERT_BACKUP: &str = "INSERT INTO backups (installation_id, backup_id, checksum, size_bytes, \
    bucket, path, status, backup_at, recorded_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)";
const RESOLVE_ALERT: &str = "UPDATE alerts SET resolved_at = ?1 WHERE id = ?2";
const INSERT_ALERT: &str = "INSERT INTO alerts (installation_id, level, kind, dedup_key, message, \
    created_at, resolved_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT DO NOTHING RETURNING id";
const INSERT_OUTBOX: &str = "INSERT INTO webhook_outbox (alert_id, payload, attempts, \
    next_attempt_at, created_at) VALUES (?1, ?2, 0, ?3, ?3)";

/// An installation the batch's first statement found.
struct Known {
    id: i64,
    backup_checksum: Option<String>,
    last_heartbeat_id: Option<i64>,
}

/// How often the background checkpoint copies what the write-ahead log gained into the
/// database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// The connection that records heartbeats. One batch at a time holds it.
pub(crate) struct IngestConnection {
    connection: Mutex<Connection>,
    /// Dropped with the connection, which ends the background checkpoint.
    _checkpoints: mpsc::Sender<()>,
}

impl std::fmt::Debug for IngestConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestConnection").finish_non_exhaustive()
    }
}

impl IngestConnection {
    /// Opens the database file the pool uses (already migrated, already in WAL mode) with
    /// the same durability and waiting rules as the pool's connections.
    pub fn open(path: &Path) -> Result<Self> {
        let connection = open_durable(path)?;
        connection.pragma_update(None, "foreign_keys", "ON")?;
        connection.pragma_update(None, "cache_size", CACHE_SIZE)?;
        connection.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)?;
        connection.set_prepared_statement_cache_capacity(32);
        Ok(Self {
            connection: Mutex::new(connection),
            _checkpoints: spawn_checkpoints(path)?,
        })
    }

    /// Records `batch` in one transaction; see
    /// [`Store::record_heartbeats`](crate::store::Store::record_heartbeats). Blocks.
    pub fn record(
        &self,
        batch: &[IncomingHeartbeat],
        rules: &IngestRules,
    ) -> Result<Vec<RecordOutcome>> {
        let mut connection = self
            .connection
            .lock()
            .map_err(|_| Error::Internal("the ingest connection's lock is poisoned".into()))?;
        let tx = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;

        // Installations that exist already, with their last backup checksum, their newest
        // heartbeat and the keys of their open alerts (an installation this batch creates has
        // none).
        let mut known: HashMap<&str, Option<Known>> = HashMap::new();
        let mut open: HashMap<i64, HashMap<String, OpenRef>> = HashMap::new();
        {
            let mut select = tx.prepare_cached(SELECT_INSTALLATION)?;
            for inc in batch {
                let instance_id = inc.heartbeat.instance_id.as_str();
                if known.contains_key(instance_id) {
                    continue;
                }
                let mut row = None;
                let mut rows = select.query([instance_id])?;
                while let Some(r) = rows.next()? {
                    let id: i64 = r.get(0)?;
                    if let (Some(alert_id), Some(key)) = (r.get(3)?, r.get(4)?) {
                        open.entry(id)
                            .or_default()
                            .insert(key, OpenRef::Stored(alert_id));
                    }
                    row = Some(Known {
                        id,
                        backup_checksum: r.get(1)?,
                        last_heartbeat_id: r.get(2)?,
                    });
                }
                known.insert(instance_id, row);
            }
        }
        let mut outcomes = batch::enrollment_outcomes(batch, rules.require_enrollment, |id| {
            known.get(id).is_some_and(Option::is_some)
        });

        let (fresh, repeats) = batch::split_messages(batch, &outcomes);
        let mut ledger = MessageLedger::default();
        {
            let mut insert = tx.prepare_cached(INSERT_SEEN)?;
            let mut select = tx.prepare_cached(SELECT_SEEN)?;
            for i in fresh {
                let inc = &batch[i];
                let (instance_id, msg_id) = (
                    inc.heartbeat.instance_id.as_str(),
                    inc.msg_id.as_deref().unwrap_or_default(),
                );
                let signed_at = inc.signed_at.unwrap_or(inc.received_at);
                if insert.execute(params![instance_id, msg_id, signed_at, inc.received_at])? == 1 {
                    ledger.inserted(inc);
                } else {
                    let stored: Option<i64> = select
                        .query_row([instance_id, msg_id], |r| r.get(0))
                        .optional()?;
                    outcomes[i] = Some(ledger.already_stored(inc, stored));
                }
            }
        }
        for i in repeats {
            outcomes[i] = Some(ledger.repeat(&batch[i]));
        }

        let first_id: i64 = tx.query_row(NEXT_HEARTBEAT_ID, [], |r| r.get(0))?;
        let links = batch::chain_heartbeats(batch, &outcomes, first_id, |instance_id| {
            known
                .get(instance_id)
                .and_then(|k| k.as_ref()?.last_heartbeat_id)
        });
        let link_of = |i: usize| {
            links[i].ok_or_else(|| Error::Internal("an applied heartbeat has no row id".into()))
        };

        let mut row_ids: HashMap<&str, i64> = HashMap::new();
        {
            let mut upsert = tx.prepare_cached(UPSERT_INSTALLATION)?;
            let mut update = tx.prepare_cached(UPDATE_INSTALLATION)?;
            for m in batch::merge_installations(batch, &outcomes) {
                let inc = &batch[m.latest];
                let instance_id = inc.heartbeat.instance_id.as_str();
                let known_id = known
                    .get(instance_id)
                    .and_then(|k| k.as_ref())
                    .map(|k| k.id);
                let (statement, key): (_, &dyn rusqlite::ToSql) = match &known_id {
                    Some(id) => (&mut update, id),
                    None => (&mut upsert, &instance_id),
                };
                statement.execute(params![
                    key,
                    m.domain,
                    m.client,
                    m.version,
                    m.release_channel,
                    m.health,
                    inc.scheme.as_str(),
                    batch[m.first].received_at,
                    inc.received_at,
                    m.backup_checksum,
                    batch::state_text(&inc.body),
                    link_of(m.latest)?.id,
                ])?;
                // Not there when the transaction took the write lock, so inserted now.
                let id = known_id.unwrap_or_else(|| tx.last_insert_rowid());
                row_ids.insert(instance_id, id);
            }
        }

        // The applied heartbeats with their installations, and beside them their rows' links.
        let (mut applied, mut applied_links) = (Vec::new(), Vec::new());
        for (i, inc) in batch.iter().enumerate() {
            if outcomes[i].is_some() {
                continue;
            }
            let Some(&id) = row_ids.get(inc.heartbeat.instance_id.as_str()) else {
                return Err(Error::Internal("upsert returned no row".into()));
            };
            outcomes[i] = Some(RecordOutcome::Applied {
                installation_id: id,
            });
            applied.push((inc, id));
            applied_links.push(link_of(i)?);
        }

        {
            // The time series, and job failures one row each, as the ERP records them.
            let mut insert = tx.prepare_cached(INSERT_HEARTBEAT)?;
            let mut failure = tx.prepare_cached(INSERT_JOB_FAILURE)?;
            for (&(inc, id), link) in applied.iter().zip(&applied_links) {
                let figures = batch::figures_json(inc);
                insert.execute(params![
                    link.id,
                    id,
                    inc.received_at,
                    inc.msg_id,
                    figures,
                    link.previous
                ])?;
                for f in &inc.heartbeat.job_failures {
                    failure.execute(params![id, f.queue, f.message, inc.received_at])?;
                }
            }
        }

        // A backup record whenever the reported checksum differs from the last one.
        let checksums = known
            .into_values()
            .flatten()
            .map(|k| (k.id, k.backup_checksum))
            .collect();
        let backups = batch::new_backups(checksums, &applied);
        if !backups.is_empty() {
            let mut insert = tx.prepare_cached(INSERT_BACKUP)?;
            for b in backups {
                insert.execute(params![
                    b.installation_id,
                    b.backup_id,
                    b.checksum,
                    b.size_bytes,
                    b.bucket,
                    b.path,
                    b.status,
                    b.backup_at,
                    b.recorded_at
                ])?;
            }
        }

        // Alerts: run the rules over the open keys read at the start.
        let (pending, resolve_ids) = batch::plan_alerts(&applied, open, rules);
        if !resolve_ids.is_empty() {
            let resolved_at = batch.last().map(|b| b.received_at).unwrap_or_default();
            let mut resolve = tx.prepare_cached(RESOLVE_ALERT)?;
            for id in resolve_ids {
                resolve.execute([resolved_at, id])?;
            }
        }
        for alert in &pending {
            insert_alert(&tx, alert, rules.forward_alerts)?;
        }

        tx.commit()?;
        Ok(batch::final_outcomes(outcomes))
    }
}

/// A connection to `path` that waits for locks as the pool's do and syncs as they do: each
/// commit, and a checkpoint before the log starts over.
fn open_durable(path: &Path) -> Result<Connection> {
    let connection = Connection::open(path)?;
    connection.busy_timeout(BUSY_TIMEOUT)?;
    connection.pragma_update(None, "synchronous", "FULL")?;
    Ok(connection)
}

/// Copies the write-ahead log into the database file every [`CHECKPOINT_EVERY`] on a
/// connection and thread of its own, until the returned sender is dropped.
///
/// The commit that takes the log past [`WAL_AUTOCHECKPOINT_PAGES`] still checkpoints, since
/// only a writer can start the log over, but by then these passive checkpoints have copied
/// nearly all of it. Left to that commit alone, the copying held up the single writer, and
/// every request waiting for it, for tens of milliseconds at a time. A passive checkpoint
/// never waits for the writer, nor the writer for it.
fn spawn_checkpoints(path: &Path) -> Result<mpsc::Sender<()>> {
    let connection = open_durable(path)?;
    let (stop, stopped) = mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("fleet-sqlite-checkpoint".into())
        .spawn(move || {
            let mut last_error = None;
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(CHECKPOINT_EVERY)
            {
                let result = connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
                let error = result.err().map(|err| err.to_string());
                if error.is_some() && error != last_error {
                    // Once per kind of failure: it repeats every tick while it lasts.
                    tracing::warn!(error = error.as_deref(), "a background checkpoint failed");
                }
                last_error = error;
            }
        })
        .map_err(|err| Error::Internal(format!("cannot start the checkpoint thread: {err}")))?;
    Ok(stop)
}

/// Inserts one alert (skipped if the same key is already open) and, when it is forwarded,
/// its webhook outbox row.
fn insert_alert(tx: &Connection, alert: &PendingAlert<'_>, forward: bool) -> Result<()> {
    let id: Option<i64> = tx
        .prepare_cached(INSERT_ALERT)?
        .query_row(
            params![
                alert.installation_id,
                alert.spec.level.as_str(),
                alert.spec.kind,
                alert.spec.key,
                alert.spec.message,
                alert.created_at,
                alert.resolved_at
            ],
            |r| r.get(0),
        )
        .optional()?;
    let Some(id) = id else { return Ok(()) };
    if forward && alert.spec.forwarded() {
        let payload = crate::alerts::webhook_payload(
            id,
            alert.installation_id,
            alert.instance_id,
            &alert.spec,
            alert.created_at,
        );
        tx.prepare_cached(INSERT_OUTBOX)?
            .execute(params![id, payload, alert.created_at])?;
    }
    Ok(())
}
