//! Recording a batch of heartbeats on PostgreSQL: each statement takes the batch as one
//! array parameter per column (`UNNEST`).
//!
//! The statement texts are fixed whatever the batch size, so each is prepared once and
//! cached (a multi-row `VALUES` list would be a new statement, parsed and planned again, for
//! every batch size). Arrays travel in the binary protocol: nothing is escaped on our side or
//! parsed on the server's.
//!
//! A batch usually takes two round trips. The first reads what the batch needs to know (its
//! installations, their open alerts, which of its message ids are stored already); the plain
//! functions of `batch` decide every outcome from that; the second is one statement that
//! writes it all and commits on its own, since a single statement is its own transaction.
//! What PostgreSQL spends per transaction and per statement (waking the backend, planning,
//! the commit's WAL flush) is as large as what it spends on a few dozen heartbeats, so fewer
//! of both is what makes ingest cheap. A batch that creates an installation or opens an
//! alert (the first heartbeat of an instance, the start of a breach) needs row ids the
//! database hands out, and is recorded in an explicit transaction instead
//! ([`PostgresStore::record_in_transaction`]).
//!
//! The writers of one server never share an installation (each installation's heartbeats go
//! to one writer), but another server on the same database may record a heartbeat of the
//! same installation between a batch's read and its write. The write statement stays right:
//! a message id stored in between makes it fail on the unique index, and the batch then
//! takes the transaction path, which waits for the other writer and answers the retried
//! messages as duplicates (the store test
//! `postgres_message_stored_between_a_batchs_read_and_write_is_answered_once` holds a batch
//! between its read and its write to check this); an alert resolved in between is not
//! resolved twice. One thing it cannot see: an alert another server opens in between stays
//! open through this batch even if this batch ends the breach, until the installation's next
//! heartbeat resolves it (opening one twice is prevented by the unique index on open
//! alerts).

use std::collections::{HashMap, HashSet};

use sqlx::Row;
use sqlx::postgres::{PgArguments, Postgres};

use super::PostgresStore;
use super::batch::{self, BackupRow, Merged, MessageLedger, OpenRef};
use crate::Result;
use crate::store::{IncomingHeartbeat, IngestRules, RecordOutcome};

type PgQuery<'q> = sqlx::query::Query<'q, Postgres, PgArguments>;

/// `$1`: the batch's instance ids; `$2`: the message ids of its v1 heartbeats. Rows with an
/// `id` are installations (one per open deduplicated alert, or one with a NULL alert); rows
/// without are stored messages, with their instance and signing time. The messages are
/// looked up by the leading column of their primary key alone: joined with the batch's
/// pairs, the planner hashed the whole table instead.
const READ_BATCH: &str = "SELECT i.id, i.instance_id, i.last_backup_checksum AS text, \
    a.id AS alert_id, a.dedup_key, NULL::bigint AS signed_at \
    FROM installations i LEFT JOIN alerts a ON a.installation_id = i.id \
    AND a.resolved_at IS NULL AND a.dedup_key IS NOT NULL \
    WHERE i.instance_id = ANY($1::text[]) \
    UNION ALL \
    SELECT NULL, instance_id, msg_id, NULL, NULL, signed_at FROM seen_messages \
    WHERE msg_id = ANY($2::text[])";

/// The opening of both write statements: the message ids (`$1`–`$4`) and the installations
/// (`$5`–`$15`), as common table expressions.
macro_rules! write_seen_and_installations {
    () => {
        concat!(
            "WITH seen AS (INSERT INTO seen_messages (instance_id, msg_id, signed_at, seen_at) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[])), \
             installation AS (INSERT INTO installations (instance_id, domain, client, version, \
             release_channel, health, scheme, first_seen_at, last_seen_at, \
             last_backup_checksum, state) \
             SELECT * FROM UNNEST($5::text[], $6::text[], $7::text[], $8::text[], $9::text[], \
             $10::text[], $11::text[], $12::bigint[], $13::bigint[], $14::text[], $15::text[])",
            upsert_installation_conflict!(),
            ")"
        )
    };
}

/// Everything a batch of known installations writes, in one statement. The message ids go
/// in without `ON CONFLICT`: one stored since the batch's read fails the statement.
const WRITE_BATCH: &str = concat!(
    write_seen_and_installations!(),
    ", heartbeat AS (INSERT INTO heartbeats (installation_id, received_at, msg_id, figures) \
     SELECT * FROM UNNEST($16::bigint[], $17::bigint[], $18::text[], $19::text[])), \
     failure AS (INSERT INTO job_failures (installation_id, queue, message, created_at) \
     SELECT * FROM UNNEST($20::bigint[], $21::text[], $22::text[], $23::bigint[])), \
     backup AS (INSERT INTO backups (installation_id, backup_id, checksum, size_bytes, bucket, \
     path, status, backup_at, recorded_at) \
     SELECT * FROM UNNEST($24::bigint[], $25::text[], $26::text[], $27::bigint[], $28::text[], \
     $29::text[], $30::text[], $31::text[], $32::bigint[])) \
     UPDATE alerts SET resolved_at = $33 WHERE id = ANY($34::bigint[]) AND resolved_at IS NULL"
);

/// [`WRITE_BATCH`] for the usual batch, which has no job failure, new backup or alert to
/// resolve: the same first 19 parameters, and three tables fewer. Every table a statement
/// writes is opened, locked and set up for writing on each execution, however empty its
/// array: batches of one heartbeat cost PostgreSQL 30–60 µs less with this statement.
const WRITE_USUAL_BATCH: &str = concat!(
    write_seen_and_installations!(),
    " INSERT INTO heartbeats (installation_id, received_at, msg_id, figures) \
     SELECT * FROM UNNEST($16::bigint[], $17::bigint[], $18::text[], $19::text[])"
);

/// `$1`: instance ids → `id, instance_id, last_backup_checksum`.
const SELECT_INSTALLATIONS: &str = "SELECT id, instance_id, last_backup_checksum \
    FROM installations WHERE instance_id = ANY($1::text[])";

/// Inserts message ids; returns the ones that were new.
const INSERT_SEEN: &str = "INSERT INTO seen_messages (instance_id, msg_id, signed_at, seen_at) \
    SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[]) \
    ON CONFLICT DO NOTHING RETURNING instance_id, msg_id";

/// One row per installation → `id, instance_id`.
const UPSERT_INSTALLATIONS: &str = concat!(
    "INSERT INTO installations (instance_id, domain, client, version, release_channel, health, \
     scheme, first_seen_at, last_seen_at, last_backup_checksum, state) \
     SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
     $6::text[], $7::text[], $8::bigint[], $9::bigint[], $10::text[], $11::text[])",
    upsert_installation_conflict!(),
    " RETURNING id, instance_id"
);

const INSERT_HEARTBEATS: &str = "INSERT INTO heartbeats (installation_id, received_at, msg_id, figures) \
    SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::text[], $4::text[])";

const INSERT_JOB_FAILURES: &str = "INSERT INTO job_failures (installation_id, queue, message, created_at) \
    SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::bigint[])";

const INSERT_BACKUPS: &str = "INSERT INTO backups (installation_id, backup_id, checksum, size_bytes, \
    bucket, path, status, backup_at, recorded_at) \
    SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::text[], \
    $6::text[], $7::text[], $8::text[], $9::bigint[])";

/// `$1`: installation ids → their open deduplicated alerts.
const SELECT_OPEN_ALERTS: &str = "SELECT id, installation_id, dedup_key FROM alerts \
    WHERE installation_id = ANY($1::bigint[]) AND resolved_at IS NULL AND dedup_key IS NOT NULL";

/// `$1`: resolved_at, `$2`: alert ids.
const RESOLVE_ALERTS: &str =
    "UPDATE alerts SET resolved_at = $1 WHERE id = ANY($2::bigint[]) AND resolved_at IS NULL";

/// Binds the `seen_messages` rows of the heartbeats at `fresh`: instance id, message id,
/// signing time, arrival.
fn bind_seen<'q>(
    query: PgQuery<'q>,
    batch: &'q [IncomingHeartbeat],
    fresh: &[usize],
) -> PgQuery<'q> {
    let rows = || fresh.iter().map(|&i| &batch[i]);
    query
        .bind(
            rows()
                .map(|inc| inc.heartbeat.instance_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            rows()
                .map(|inc| inc.msg_id.as_deref().unwrap_or_default())
                .collect::<Vec<_>>(),
        )
        .bind(
            rows()
                .map(|inc| inc.signed_at.unwrap_or(inc.received_at))
                .collect::<Vec<_>>(),
        )
        .bind(rows().map(|inc| inc.received_at).collect::<Vec<_>>())
}

/// Binds the installation rows of `merged`, in the columns of [`UPSERT_INSTALLATIONS`].
fn bind_installations<'q>(
    query: PgQuery<'q>,
    batch: &'q [IncomingHeartbeat],
    merged: &[Merged<'q>],
) -> PgQuery<'q> {
    let text = |f: fn(&Merged<'q>) -> Option<&'q String>| -> Vec<Option<&'q str>> {
        merged.iter().map(|m| f(m).map(String::as_str)).collect()
    };
    let latest = || merged.iter().map(|m| &batch[m.latest]);
    query
        .bind(
            latest()
                .map(|inc| inc.heartbeat.instance_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(text(|m| m.domain))
        .bind(text(|m| m.client))
        .bind(text(|m| m.version))
        .bind(text(|m| m.release_channel))
        .bind(text(|m| m.health))
        .bind(latest().map(|inc| inc.scheme.as_str()).collect::<Vec<_>>())
        .bind(
            merged
                .iter()
                .map(|m| batch[m.first].received_at)
                .collect::<Vec<_>>(),
        )
        .bind(latest().map(|inc| inc.received_at).collect::<Vec<_>>())
        .bind(text(|m| m.backup_checksum))
        .bind(
            latest()
                .map(|inc| batch::state_text(&inc.body))
                .collect::<Vec<_>>(),
        )
}

/// Binds the time-series rows of the applied heartbeats.
fn bind_heartbeats<'q>(
    query: PgQuery<'q>,
    applied: &[(&'q IncomingHeartbeat, i64)],
) -> PgQuery<'q> {
    query
        .bind(applied.iter().map(|(_, id)| *id).collect::<Vec<_>>())
        .bind(
            applied
                .iter()
                .map(|(inc, _)| inc.received_at)
                .collect::<Vec<_>>(),
        )
        .bind(
            applied
                .iter()
                .map(|(inc, _)| inc.msg_id.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            applied
                .iter()
                .map(|(inc, _)| batch::figures_json(inc))
                .collect::<Vec<_>>(),
        )
}

/// Binds the job failures of the applied heartbeats, one row each, as the ERP records them.
fn bind_failures<'q>(query: PgQuery<'q>, applied: &[(&'q IncomingHeartbeat, i64)]) -> PgQuery<'q> {
    let failures: Vec<_> = applied
        .iter()
        .flat_map(|&(inc, id)| {
            inc.heartbeat
                .job_failures
                .iter()
                .map(move |f| (id, f, inc.received_at))
        })
        .collect();
    query
        .bind(failures.iter().map(|(id, _, _)| *id).collect::<Vec<_>>())
        .bind(
            failures
                .iter()
                .map(|(_, f, _)| f.queue.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            failures
                .iter()
                .map(|(_, f, _)| f.message.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(failures.iter().map(|(_, _, at)| *at).collect::<Vec<_>>())
}

/// Binds the backup records.
fn bind_backups<'q>(query: PgQuery<'q>, backups: &[BackupRow<'q>]) -> PgQuery<'q> {
    query
        .bind(
            backups
                .iter()
                .map(|b| b.installation_id)
                .collect::<Vec<_>>(),
        )
        .bind(backups.iter().map(|b| b.backup_id).collect::<Vec<_>>())
        .bind(backups.iter().map(|b| b.checksum).collect::<Vec<_>>())
        .bind(backups.iter().map(|b| b.size_bytes).collect::<Vec<_>>())
        .bind(backups.iter().map(|b| b.bucket).collect::<Vec<_>>())
        .bind(backups.iter().map(|b| b.path).collect::<Vec<_>>())
        .bind(backups.iter().map(|b| b.status).collect::<Vec<_>>())
        .bind(backups.iter().map(|b| b.backup_at).collect::<Vec<_>>())
        .bind(backups.iter().map(|b| b.recorded_at).collect::<Vec<_>>())
}

/// The distinct instance ids of a batch.
fn instance_ids(batch: &[IncomingHeartbeat]) -> Vec<&str> {
    let set: HashSet<&str> = batch
        .iter()
        .map(|b| b.heartbeat.instance_id.as_str())
        .collect();
    set.into_iter().collect()
}

/// What the first round trip of a batch found.
#[derive(Default)]
struct BatchState {
    /// Installations by instance id: row id and last backup checksum.
    known: HashMap<String, (i64, Option<String>)>,
    /// Open deduplicated alerts by installation id.
    open: HashMap<i64, HashMap<String, OpenRef>>,
    /// Stored message ids by (instance id, message id): their signing time.
    stored: HashMap<(String, String), i64>,
}

impl PostgresStore {
    /// [`Store::record_heartbeats`](crate::store::Store::record_heartbeats) on PostgreSQL.
    pub(crate) async fn record_batch(
        &self,
        batch: &[IncomingHeartbeat],
        rules: &IngestRules,
    ) -> Result<Vec<RecordOutcome>> {
        let state = self.read_batch(batch).await?;
        let mut outcomes = batch::enrollment_outcomes(batch, rules.require_enrollment, |id| {
            state.known.contains_key(id)
        });

        let (fresh, repeats) = batch::split_messages(batch, &outcomes);
        let mut ledger = MessageLedger::default();
        let mut new_messages = Vec::with_capacity(fresh.len());
        for i in fresh {
            let inc = &batch[i];
            let stored = (!state.stored.is_empty())
                .then(|| {
                    let key = (
                        inc.heartbeat.instance_id.clone(),
                        inc.msg_id.clone().unwrap_or_default(),
                    );
                    state.stored.get(&key).copied()
                })
                .flatten();
            match stored {
                Some(signed_at) => outcomes[i] = Some(ledger.already_stored(inc, Some(signed_at))),
                None => {
                    ledger.inserted(inc);
                    new_messages.push(i);
                }
            }
        }
        for i in repeats {
            outcomes[i] = Some(ledger.repeat(&batch[i]));
        }

        let merged = batch::merge_installations(batch, &outcomes);
        let all_known = merged.iter().all(|m| {
            state
                .known
                .contains_key(&batch[m.latest].heartbeat.instance_id)
        });
        if !all_known {
            return self.record_in_transaction(batch, rules).await;
        }
        let mut applied = Vec::new();
        for (i, inc) in batch.iter().enumerate() {
            if outcomes[i].is_some() {
                continue;
            }
            let (id, _) = state.known[&inc.heartbeat.instance_id];
            outcomes[i] = Some(RecordOutcome::Applied {
                installation_id: id,
            });
            applied.push((inc, id));
        }
        let checksums = state.known.into_values().collect();
        let backups = batch::new_backups(checksums, &applied);
        let (pending, resolve_ids) = batch::plan_alerts(&applied, state.open, rules);
        if !pending.is_empty() {
            return self.record_in_transaction(batch, rules).await;
        }

        if !applied.is_empty() {
            let usual = backups.is_empty()
                && resolve_ids.is_empty()
                && applied
                    .iter()
                    .all(|(inc, _)| inc.heartbeat.job_failures.is_empty());
            let statement = if usual {
                WRITE_USUAL_BATCH
            } else {
                WRITE_BATCH
            };
            let query = bind_seen(sqlx::query(statement), batch, &new_messages);
            let query = bind_heartbeats(bind_installations(query, batch, &merged), &applied);
            let query = if usual {
                query
            } else {
                bind_backups(bind_failures(query, &applied), &backups)
                    .bind(batch.last().map(|b| b.received_at).unwrap_or_default())
                    .bind(resolve_ids)
            };
            let written = query.execute(&self.ingest).await;
            match written {
                Ok(_) => {}
                // A message id stored since the read: a retry of this batch's messages is
                // being recorded by another writer. The transaction path waits for it and
                // answers those heartbeats as duplicates.
                Err(sqlx::Error::Database(err)) if err.is_unique_violation() => {
                    return self.record_in_transaction(batch, rules).await;
                }
                Err(err) => return Err(err.into()),
            }
        }
        Ok(batch::final_outcomes(outcomes))
    }

    /// The first round trip of a batch: [`READ_BATCH`].
    async fn read_batch(&self, batch: &[IncomingHeartbeat]) -> Result<BatchState> {
        let msg_ids: Vec<&str> = batch
            .iter()
            .filter_map(|inc| inc.msg_id.as_deref())
            .collect();
        let rows = sqlx::query(READ_BATCH)
            .bind(instance_ids(batch))
            .bind(msg_ids)
            .fetch_all(&self.ingest)
            .await?;
        let mut state = BatchState::default();
        for row in rows {
            let instance_id: String = row.try_get("instance_id")?;
            let text: Option<String> = row.try_get("text")?;
            match row.try_get::<Option<i64>, _>("id")? {
                Some(id) => {
                    if let (Some(alert_id), Some(key)) = (
                        row.try_get::<Option<i64>, _>("alert_id")?,
                        row.try_get::<Option<String>, _>("dedup_key")?,
                    ) {
                        state
                            .open
                            .entry(id)
                            .or_default()
                            .insert(key, OpenRef::Stored(alert_id));
                    }
                    state.known.insert(instance_id, (id, text));
                }
                None => {
                    let signed_at: i64 = row.try_get("signed_at")?;
                    state
                        .stored
                        .insert((instance_id, text.unwrap_or_default()), signed_at);
                }
            }
        }
        Ok(state)
    }

    /// Records a batch in an explicit transaction, statement by statement: the path of a
    /// batch that creates installations or opens alerts, whose row ids the later statements
    /// need. The open alerts are read after the installation rows are locked, so a batch of
    /// the same installation recorded at the same time is seen whole or not at all.
    async fn record_in_transaction(
        &self,
        batch: &[IncomingHeartbeat],
        rules: &IngestRules,
    ) -> Result<Vec<RecordOutcome>> {
        let mut tx = self.ingest.begin().await?;

        // Installations that exist already, with their last backup checksum.
        let mut known: HashMap<String, (i64, Option<String>)> = HashMap::new();
        let rows = sqlx::query(SELECT_INSTALLATIONS)
            .bind(instance_ids(batch))
            .fetch_all(&mut *tx)
            .await?;
        for row in rows {
            known.insert(
                row.try_get("instance_id")?,
                (row.try_get("id")?, row.try_get("last_backup_checksum")?),
            );
        }
        let mut outcomes = batch::enrollment_outcomes(batch, rules.require_enrollment, |id| {
            known.contains_key(id)
        });

        let (fresh, repeats) = batch::split_messages(batch, &outcomes);
        let mut ledger = MessageLedger::default();
        let mut inserted = HashSet::new();
        let returned = if fresh.is_empty() {
            Vec::new()
        } else {
            bind_seen(sqlx::query(INSERT_SEEN), batch, &fresh)
                .fetch_all(&mut *tx)
                .await?
        };
        for row in returned {
            let key: (String, String) = (row.try_get(0)?, row.try_get(1)?);
            inserted.insert(key);
        }
        for &i in &fresh {
            let inc = &batch[i];
            let msg_id = inc.msg_id.as_deref().unwrap_or_default();
            let instance_id = inc.heartbeat.instance_id.as_str();
            if inserted.contains(&(instance_id.to_owned(), msg_id.to_owned())) {
                ledger.inserted(inc);
                continue;
            }
            let stored: Option<i64> = sqlx::query_scalar(
                "SELECT signed_at FROM seen_messages WHERE instance_id = $1 AND msg_id = $2",
            )
            .bind(instance_id)
            .bind(msg_id)
            .fetch_optional(&mut *tx)
            .await?;
            outcomes[i] = Some(ledger.already_stored(inc, stored));
        }
        for i in repeats {
            outcomes[i] = Some(ledger.repeat(&batch[i]));
        }

        let merged = batch::merge_installations(batch, &outcomes);
        let mut row_ids: HashMap<String, i64> = HashMap::new();
        let returned = bind_installations(sqlx::query(UPSERT_INSTALLATIONS), batch, &merged)
            .fetch_all(&mut *tx)
            .await?;
        for row in returned {
            row_ids.insert(row.try_get("instance_id")?, row.try_get("id")?);
        }

        let mut applied = Vec::new();
        for (i, inc) in batch.iter().enumerate() {
            if outcomes[i].is_some() {
                continue;
            }
            let Some(&id) = row_ids.get(&inc.heartbeat.instance_id) else {
                return Err(crate::Error::Internal("upsert returned no row".into()));
            };
            outcomes[i] = Some(RecordOutcome::Applied {
                installation_id: id,
            });
            applied.push((inc, id));
        }

        // The time series, one row per applied heartbeat, and the job failures.
        if !applied.is_empty() {
            bind_heartbeats(sqlx::query(INSERT_HEARTBEATS), &applied)
                .execute(&mut *tx)
                .await?;
        }
        if applied
            .iter()
            .any(|(inc, _)| !inc.heartbeat.job_failures.is_empty())
        {
            bind_failures(sqlx::query(INSERT_JOB_FAILURES), &applied)
                .execute(&mut *tx)
                .await?;
        }

        // A backup record whenever the reported checksum differs from the last one.
        let checksums = known.into_values().collect();
        let backups = batch::new_backups(checksums, &applied);
        if !backups.is_empty() {
            bind_backups(sqlx::query(INSERT_BACKUPS), &backups)
                .execute(&mut *tx)
                .await?;
        }

        // Alerts: load the open keys of the batch's installations, run the rules.
        let mut open: HashMap<i64, HashMap<String, OpenRef>> = HashMap::new();
        let installation_ids: Vec<i64> = {
            let set: HashSet<i64> = applied.iter().map(|(_, id)| *id).collect();
            set.into_iter().collect()
        };
        let rows = sqlx::query(SELECT_OPEN_ALERTS)
            .bind(installation_ids)
            .fetch_all(&mut *tx)
            .await?;
        for row in rows {
            let key: String = row.try_get("dedup_key")?;
            open.entry(row.try_get("installation_id")?)
                .or_default()
                .insert(key, OpenRef::Stored(row.try_get("id")?));
        }
        let (pending, resolve_ids) = batch::plan_alerts(&applied, open, rules);
        if !resolve_ids.is_empty() {
            let resolved_at = batch.last().map(|b| b.received_at).unwrap_or_default();
            sqlx::query(RESOLVE_ALERTS)
                .bind(resolved_at)
                .bind(resolve_ids)
                .execute(&mut *tx)
                .await?;
        }
        for alert in &pending {
            Self::insert_alert(&mut tx, alert, rules.forward_alerts).await?;
        }

        tx.commit().await?;
        Ok(batch::final_outcomes(outcomes))
    }
}
