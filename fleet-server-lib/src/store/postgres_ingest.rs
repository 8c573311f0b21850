//! Recording a batch of heartbeats on PostgreSQL: each statement takes the batch as one
//! array parameter per column (`UNNEST`).
//!
//! The statement text is fixed whatever the batch size, so each is prepared once and cached
//! (a multi-row `VALUES` list would be a new statement, parsed and planned again, for every
//! batch size), and a batch costs one round trip per statement. Arrays travel in the binary
//! protocol: nothing is escaped on our side or parsed on the server's.

use std::collections::{HashMap, HashSet};

use sqlx::Row;

use super::PostgresStore;
use super::batch::{self, MessageLedger, OpenRef};
use crate::Result;
use crate::store::{IncomingHeartbeat, IngestRules, RecordOutcome};

/// Largest statement (in parameter bytes) sent at once over TCP; a larger batch goes in
/// pieces.
///
/// sqlx 0.9.0 does not set TCP_NODELAY (sqlx issue #4335, fixed upstream by #4336). A
/// message larger than the socket's initial send buffer (16 KiB on Linux) leaves in two
/// writes, and the second waits for the server's delayed ACK: 40 ms per statement. Below
/// that size a statement costs one round trip. Raise this once sqlx sets TCP_NODELAY.
const TCP_PIECE_BYTES: usize = 12 * 1024;

/// Largest statement sent at once over a Unix socket, which has no delayed ACK: a batch of
/// 512 heartbeats of ordinary size goes in one statement per table.
const SOCKET_PIECE_BYTES: usize = 1024 * 1024;

/// The largest statement a heartbeat batch sends at once on connections made with `options`.
pub(super) fn piece_bytes(options: &sqlx::postgres::PgConnectOptions) -> usize {
    if options.get_socket().is_some() {
        SOCKET_PIECE_BYTES
    } else {
        TCP_PIECE_BYTES
    }
}

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
    upsert_installation_tail!(),
    ", instance_id"
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
const RESOLVE_ALERTS: &str = "UPDATE alerts SET resolved_at = $1 WHERE id = ANY($2::bigint[])";

/// Splits `rows` into runs whose parameters stay under `limit` bytes (`bytes` estimates one
/// row); a single larger row is a run of its own.
fn pieces<T>(rows: &[T], limit: usize, bytes: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let mut runs = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (i, row) in rows.iter().enumerate() {
        let row_bytes = bytes(row) + 16;
        if i > start && size + row_bytes > limit {
            runs.push(&rows[start..i]);
            (start, size) = (i, 0);
        }
        size += row_bytes;
    }
    if start < rows.len() {
        runs.push(&rows[start..]);
    }
    runs
}

fn text_len(text: Option<&str>) -> usize {
    text.map_or(0, str::len)
}

impl PostgresStore {
    /// [`Store::record_heartbeats`](crate::store::Store::record_heartbeats) on PostgreSQL.
    pub(crate) async fn record_batch(
        &self,
        batch: &[IncomingHeartbeat],
        rules: &IngestRules,
    ) -> Result<Vec<RecordOutcome>> {
        let mut outcomes: Vec<Option<RecordOutcome>> = vec![None; batch.len()];
        let limit = self.piece_bytes;
        let mut tx = self.pool().begin().await?;

        // Installations that exist already, with their last backup checksum.
        let mut known: HashMap<String, (i64, Option<String>)> = HashMap::new();
        let ids: Vec<&str> = {
            let set: HashSet<&str> = batch
                .iter()
                .map(|b| b.heartbeat.instance_id.as_str())
                .collect();
            set.into_iter().collect()
        };
        for run in pieces(&ids, limit, |id| id.len()) {
            let rows = sqlx::query(SELECT_INSTALLATIONS)
                .bind(run)
                .fetch_all(&mut *tx)
                .await?;
            for row in rows {
                known.insert(
                    row.try_get("instance_id")?,
                    (row.try_get("id")?, row.try_get("last_backup_checksum")?),
                );
            }
        }
        if rules.require_enrollment {
            for (i, inc) in batch.iter().enumerate() {
                if !known.contains_key(&inc.heartbeat.instance_id) {
                    outcomes[i] = Some(RecordOutcome::NotEnrolled);
                }
            }
        }

        let (fresh, repeats) = batch::split_messages(batch, &outcomes);
        let mut ledger = MessageLedger::default();
        let mut inserted = HashSet::new();
        for run in pieces(&fresh, limit, |&i| {
            batch[i].heartbeat.instance_id.len() + text_len(batch[i].msg_id.as_deref())
        }) {
            let column = |f: fn(&IncomingHeartbeat) -> &str| -> Vec<&str> {
                run.iter().map(|&i| f(&batch[i])).collect()
            };
            let signed_at: Vec<i64> = run
                .iter()
                .map(|&i| batch[i].signed_at.unwrap_or(batch[i].received_at))
                .collect();
            let seen_at: Vec<i64> = run.iter().map(|&i| batch[i].received_at).collect();
            let returned = sqlx::query(INSERT_SEEN)
                .bind(column(|inc| inc.heartbeat.instance_id.as_str()))
                .bind(column(|inc| inc.msg_id.as_deref().unwrap_or_default()))
                .bind(signed_at)
                .bind(seen_at)
                .fetch_all(&mut *tx)
                .await?;
            for row in returned {
                let key: (String, String) = (row.try_get(0)?, row.try_get(1)?);
                inserted.insert(key);
            }
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

        let latest = batch::merge_installations(batch, &outcomes);
        let mut row_ids: HashMap<String, i64> = HashMap::new();
        for run in pieces(&latest, limit, |m| batch[m.latest].body.len() + 128) {
            let text =
                |f: for<'m> fn(&'m batch::Merged<'m>) -> Option<&'m String>| -> Vec<Option<&str>> {
                    run.iter().map(|m| f(m).map(String::as_str)).collect()
                };
            let latest_of = |m: &batch::Merged<'_>| &batch[m.latest];
            let returned = sqlx::query(UPSERT_INSTALLATIONS)
                .bind(
                    run.iter()
                        .map(|m| latest_of(m).heartbeat.instance_id.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(text(|m| m.domain))
                .bind(text(|m| m.client))
                .bind(text(|m| m.version))
                .bind(text(|m| m.release_channel))
                .bind(text(|m| m.health))
                .bind(
                    run.iter()
                        .map(|m| latest_of(m).scheme.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    run.iter()
                        .map(|m| batch[m.first].received_at)
                        .collect::<Vec<_>>(),
                )
                .bind(
                    run.iter()
                        .map(|m| latest_of(m).received_at)
                        .collect::<Vec<_>>(),
                )
                .bind(text(|m| m.backup_checksum))
                .bind(
                    run.iter()
                        .map(|m| batch::state_text(&latest_of(m).body))
                        .collect::<Vec<_>>(),
                )
                .fetch_all(&mut *tx)
                .await?;
            for row in returned {
                row_ids.insert(row.try_get("instance_id")?, row.try_get("id")?);
            }
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

        // The time series: one row per applied heartbeat.
        let figures: Vec<String> = applied
            .iter()
            .map(|(inc, _)| batch::figures_json(&inc.heartbeat))
            .collect();
        let rows: Vec<_> = applied.iter().zip(&figures).collect();
        for run in pieces(&rows, limit, |(_, f)| f.len() + 64) {
            sqlx::query(INSERT_HEARTBEATS)
                .bind(run.iter().map(|((_, id), _)| *id).collect::<Vec<_>>())
                .bind(
                    run.iter()
                        .map(|((inc, _), _)| inc.received_at)
                        .collect::<Vec<_>>(),
                )
                .bind(
                    run.iter()
                        .map(|((inc, _), _)| inc.msg_id.as_deref())
                        .collect::<Vec<_>>(),
                )
                .bind(run.iter().map(|(_, f)| f.as_str()).collect::<Vec<_>>())
                .execute(&mut *tx)
                .await?;
        }

        // Job failures, one row each, as the ERP records them.
        let failures: Vec<_> = applied
            .iter()
            .flat_map(|(inc, id)| {
                inc.heartbeat
                    .job_failures
                    .iter()
                    .map(move |f| (*id, f, inc.received_at))
            })
            .collect();
        for run in pieces(&failures, limit, |(_, f, _)| f.message.len() + 64) {
            sqlx::query(INSERT_JOB_FAILURES)
                .bind(run.iter().map(|(id, _, _)| *id).collect::<Vec<_>>())
                .bind(
                    run.iter()
                        .map(|(_, f, _)| f.queue.as_deref())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    run.iter()
                        .map(|(_, f, _)| f.message.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(run.iter().map(|(_, _, at)| *at).collect::<Vec<_>>())
                .execute(&mut *tx)
                .await?;
        }

        // A backup record whenever the reported checksum differs from the last one.
        let checksums = known.into_values().collect();
        let backups = batch::new_backups(checksums, &applied);
        for run in pieces(&backups, limit, |b| {
            b.checksum.len() + text_len(b.path) + text_len(b.bucket) + 128
        }) {
            sqlx::query(INSERT_BACKUPS)
                .bind(run.iter().map(|b| b.installation_id).collect::<Vec<_>>())
                .bind(run.iter().map(|b| b.backup_id).collect::<Vec<_>>())
                .bind(run.iter().map(|b| b.checksum).collect::<Vec<_>>())
                .bind(run.iter().map(|b| b.size_bytes).collect::<Vec<_>>())
                .bind(run.iter().map(|b| b.bucket).collect::<Vec<_>>())
                .bind(run.iter().map(|b| b.path).collect::<Vec<_>>())
                .bind(run.iter().map(|b| b.status).collect::<Vec<_>>())
                .bind(run.iter().map(|b| b.backup_at).collect::<Vec<_>>())
                .bind(run.iter().map(|b| b.recorded_at).collect::<Vec<_>>())
                .execute(&mut *tx)
                .await?;
        }

        // Alerts: load the open keys of the batch's installations, run the rules.
        let mut open: HashMap<i64, HashMap<String, OpenRef>> = HashMap::new();
        let installation_ids: Vec<i64> = {
            let set: HashSet<i64> = applied.iter().map(|(_, id)| *id).collect();
            set.into_iter().collect()
        };
        for run in pieces(&installation_ids, limit, |_| 8) {
            let rows = sqlx::query(SELECT_OPEN_ALERTS)
                .bind(run)
                .fetch_all(&mut *tx)
                .await?;
            for row in rows {
                let key: String = row.try_get("dedup_key")?;
                open.entry(row.try_get("installation_id")?)
                    .or_default()
                    .insert(key, OpenRef::Stored(row.try_get("id")?));
            }
        }
        let (pending, resolve_ids) = batch::plan_alerts(&applied, open, &rules.slo);
        let resolved_at = batch.last().map(|b| b.received_at).unwrap_or_default();
        for run in pieces(&resolve_ids, limit, |_| 8) {
            sqlx::query(RESOLVE_ALERTS)
                .bind(resolved_at)
                .bind(run)
                .execute(&mut *tx)
                .await?;
        }
        for alert in &pending {
            Self::insert_alert(&mut tx, alert, rules.forward_alerts).await?;
        }

        tx.commit().await?;
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or(RecordOutcome::Duplicate))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_unix_socket_takes_large_pieces() {
        use std::str::FromStr;
        let options = |url| sqlx::postgres::PgConnectOptions::from_str(url).expect("url");
        assert_eq!(
            piece_bytes(&options("postgres://u:p@127.0.0.1:5432/db")),
            TCP_PIECE_BYTES
        );
        assert_eq!(
            piece_bytes(&options("postgres://u:p@db.example.com/db")),
            TCP_PIECE_BYTES
        );
        assert_eq!(
            piece_bytes(&options("postgres://u:p@%2Fvar%2Frun%2Fpostgresql/db")),
            SOCKET_PIECE_BYTES
        );
        assert_eq!(
            piece_bytes(&options(
                "postgres://u:p@localhost/db?host=/var/run/postgresql"
            )),
            SOCKET_PIECE_BYTES
        );
    }

    #[test]
    fn pieces_stay_under_the_limit_and_keep_every_row_in_order() {
        let rows: Vec<String> = (0..300)
            .map(|i| format!("{i:04}{}", "x".repeat(400)))
            .collect();
        let runs = pieces(&rows, TCP_PIECE_BYTES, |r| r.len());
        assert!(runs.len() > 1);
        for run in &runs {
            let bytes: usize = run.iter().map(|r| r.len() + 16).sum();
            assert!(bytes <= TCP_PIECE_BYTES, "{bytes}");
        }
        let back: Vec<&String> = runs.iter().flat_map(|r| r.iter()).collect();
        assert_eq!(back, rows.iter().collect::<Vec<_>>());
        let huge = ["y".repeat(TCP_PIECE_BYTES * 2)];
        assert_eq!(
            pieces(&huge, TCP_PIECE_BYTES, |r| r.len()).len(),
            1,
            "an oversized row is a run of its own"
        );
        assert!(pieces::<String>(&[], TCP_PIECE_BYTES, |r| r.len()).is_empty());
    }
}
