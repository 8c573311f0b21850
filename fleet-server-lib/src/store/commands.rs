//! Persistence of remote commands, their per-target results and output, enrollment tokens
//! and issued secrets: the [`CommandStore`] trait, implemented by both SQL backends with
//! the same statements (expanded by `impl_command_store!`).

use async_trait::async_trait;
use fleet_core::command::{CommandType, Stream, TargetStatus};
use serde::Serialize;

use crate::Result;

/// A command as submitted, before it has targets.
#[derive(Debug, Clone)]
pub struct NewCommand {
    /// Command id (a UUID).
    pub id: String,
    /// What it does.
    pub command_type: CommandType,
    /// The validated payload.
    pub payload: serde_json::Value,
    /// Most targets released at once (`None`: all).
    pub max_concurrency: Option<u32>,
    /// `"3"` or `"10%"`.
    pub max_errors: Option<String>,
    /// The role that submitted it.
    pub created_by: String,
    /// Unix seconds.
    pub created_at: i64,
}

/// One target of a command.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct TargetRecord {
    /// The id the agent sees (its log chunks and results name it).
    pub target_id: String,
    /// The instance.
    pub instance_id: String,
    /// `queued`, `sent`, `running`, `completed`, `failed`, `timed_out`, `skipped`, `cancelled`.
    pub status: String,
    /// When it was released to the agent.
    pub sent_at: Option<i64>,
    /// Last change.
    pub updated_at: i64,
    /// Exit code of the process, if one ran.
    pub exit_code: Option<i64>,
    /// Why it failed.
    pub error: Option<String>,
    /// The agent's short log.
    pub logs: Option<String>,
    /// Structured result as JSON text.
    #[serde(skip)]
    pub data: Option<String>,
    /// Bytes of output stored, stdout and stderr together; once the output was deleted,
    /// how much there was.
    pub output_bytes: i64,
    /// The cap, in bytes, the output was cut at (`None`: nothing was left out).
    pub output_truncated_at_bytes: Option<i64>,
    /// When the retention sweep deleted the output (unix seconds).
    pub output_deleted_at: Option<i64>,
}

/// A command with its targets.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CommandRecord {
    /// Command id.
    pub id: String,
    /// Wire name of the type.
    pub command_type: String,
    /// The payload.
    pub payload: serde_json::Value,
    /// Concurrency limit.
    pub max_concurrency: Option<i64>,
    /// Error threshold.
    pub max_errors: Option<String>,
    /// `running`, `completed`, `cancelled` or `halted`.
    pub status: String,
    /// Submitting role.
    pub created_by: String,
    /// Unix seconds.
    pub created_at: i64,
    /// When every target ended.
    pub finished_at: Option<i64>,
    /// Per-target state, in submission order.
    pub targets: Vec<TargetRecord>,
}

/// A command in a list: what, who, when, and its targets counted by status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct CommandSummary {
    /// Command id.
    pub id: String,
    /// Wire name of the type.
    pub command_type: String,
    /// `running`, `completed`, `cancelled` or `halted`.
    pub status: String,
    /// Submitting role.
    pub created_by: String,
    /// Unix seconds.
    pub created_at: i64,
    /// When every target ended.
    pub finished_at: Option<i64>,
    /// Targets in all.
    pub total: i64,
    /// Targets `completed`.
    pub completed: i64,
    /// Targets `failed` or `timed_out`.
    pub failed: i64,
    /// Targets `sent`: released to their agent, which has not taken them yet (offline,
    /// or not connected since).
    pub sent: i64,
    /// Targets `running`: their agent took them.
    pub running: i64,
    /// Targets still `queued`.
    pub queued: i64,
    /// The first target's instance (by id), to name a one-target command.
    pub first_instance: Option<String>,
}

/// A target released to its agent: what to put on the wire.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Dispatch {
    /// The id the agent sees.
    pub target_id: String,
    /// Where it goes.
    pub instance_id: String,
    /// Wire name of the type.
    pub command_type: String,
    /// Payload JSON text.
    pub payload: String,
}

/// A stored piece of output.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredChunk {
    /// `stdout` or `stderr`.
    pub stream: String,
    /// Byte offset in the stream.
    pub pos: i64,
    /// The bytes.
    pub data: Vec<u8>,
}

/// What is known of a target's output besides its bytes.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TargetOutput {
    /// The target's status.
    pub status: String,
    /// Bytes of output stored, stdout and stderr together (after deletion: how many there
    /// were).
    pub output_bytes: i64,
    /// The cap, in bytes, the output was cut at (`None`: nothing was left out).
    pub output_truncated_at_bytes: Option<i64>,
    /// When the retention sweep deleted the output (unix seconds).
    pub output_deleted_at: Option<i64>,
}

/// How many leading bytes of a chunk of `len` bytes at `offset` in its stream may be stored
/// under the per-target cap `max_bytes`, with `stored` bytes of the target's output stored
/// already: nothing at or past the cap's offset in the stream, and nothing past the cap in
/// total (both streams together).
pub fn bytes_within_cap(offset: u64, len: usize, max_bytes: u64, stored: u64) -> usize {
    let room = max_bytes
        .saturating_sub(offset)
        .min(max_bytes.saturating_sub(stored));
    usize::try_from(room).map_or(len, |room| room.min(len))
}

/// The cap of a call to [`CommandStore::store_chunks`] as the database can hold it: offsets
/// are `BIGINT`, so nothing at or past `i64::MAX` is ever stored.
pub fn storable_cap(max_bytes: u64) -> u64 {
    max_bytes.min(i64::MAX as u64)
}

/// A target's output within one call to [`CommandStore::store_chunks`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct OutputCount {
    /// Bytes stored before the call.
    pub(crate) before: u64,
    /// Bytes stored now.
    pub(crate) stored: u64,
    /// Whether a chunk of this call passed the cap.
    pub(crate) truncated: bool,
}

/// Chunks deleted by one statement of [`CommandStore::prune_output`]: at most
/// 128 × 256 KiB, so one statement never holds the database's write lock for long.
pub const PRUNE_ROWS_PER_STATEMENT: i64 = 128;
/// Most chunks one call of [`CommandStore::prune_output`] deletes; the next sweep goes on.
pub const PRUNE_ROWS_PER_CALL: u64 = 8_192;
/// Most targets one call of [`CommandStore::prune_output`] looks at.
pub const PRUNE_TARGETS_PER_CALL: i64 = 500;

/// What an agent reported for one target.
#[derive(Debug, Clone)]
pub struct TargetUpdate<'a> {
    /// New status (`running`, `completed` or `failed`).
    pub status: TargetStatus,
    /// Exit code.
    pub exit_code: Option<i32>,
    /// Error text.
    pub error: Option<&'a str>,
    /// Short log.
    pub logs: Option<&'a str>,
    /// Structured result as JSON text.
    pub data: Option<String>,
}

/// The wire name of a target status.
pub fn target_status_str(status: TargetStatus) -> &'static str {
    match status {
        TargetStatus::Queued => "queued",
        TargetStatus::Sent => "sent",
        TargetStatus::Running => "running",
        TargetStatus::Completed => "completed",
        TargetStatus::Failed => "failed",
        TargetStatus::TimedOut => "timed_out",
        TargetStatus::Skipped => "skipped",
        TargetStatus::Cancelled => "cancelled",
    }
}

/// Whether a stored target status is final.
pub fn is_final(status: &str) -> bool {
    matches!(
        status,
        "completed" | "failed" | "timed_out" | "skipped" | "cancelled"
    )
}

/// What [`CommandStore::known_instances`] found of the ids it was asked about.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KnownInstances {
    /// Those with an installation or an issued secret.
    pub known: std::collections::HashSet<String>,
    /// Those of `known` whose installation is archived.
    pub archived: std::collections::HashSet<String>,
}

/// Persistence of commands. Both [`SqliteStore`](super::SqliteStore) and
/// [`PostgresStore`](super::PostgresStore) implement it; reach it through
/// [`Store::commands`](super::Store::commands).
#[async_trait]
pub trait CommandStore: Send + Sync {
    /// Stores a command and its targets (`(target_id, instance_id)`, all `queued`).
    async fn create_command(
        &self,
        command: &NewCommand,
        targets: &[(String, String)],
    ) -> Result<()>;

    /// Instance ids matched by a selector: a release channel, or every instance. Archived
    /// installations are left out.
    async fn select_instances(&self, channel: Option<&str>, limit: i64) -> Result<Vec<String>>;

    /// Those of `ids` the control plane has heard of (an installation, from a heartbeat or a
    /// listing, or a secret issued at enrollment), and which of them are archived.
    async fn known_instances(&self, ids: &[String]) -> Result<KnownInstances>;

    /// A command with its targets.
    async fn command(&self, id: &str) -> Result<Option<CommandRecord>>;

    /// The `limit` most recent commands, newest first, with their targets counted.
    async fn list_commands(&self, limit: i64) -> Result<Vec<CommandSummary>>;

    /// Releases as many queued targets as `max_concurrency` and `max_errors` allow, halts the
    /// command once `max_errors` is passed (queued targets become `skipped`), and marks it
    /// completed when every target ended. Returns the targets released now.
    async fn schedule(&self, command_id: &str, now: i64) -> Result<Vec<Dispatch>>;

    /// Targets released to `instance_id` that have not ended (to send again on connect).
    async fn pending_for(&self, instance_id: &str) -> Result<Vec<Dispatch>>;

    /// Records an agent's report on one of its own targets; returns the command id when the
    /// row changed (a report on an ended or foreign target changes nothing).
    async fn record_target(
        &self,
        target_id: &str,
        instance_id: &str,
        update: &TargetUpdate<'_>,
        now: i64,
    ) -> Result<Option<String>>;

    /// The instance a target belongs to, and its command.
    async fn target_owner(&self, target_id: &str) -> Result<Option<(String, String)>>;

    /// A target's status.
    async fn target_status(&self, target_id: &str) -> Result<Option<String>>;

    /// Stores chunks `(target, stream, offset, bytes)` in one transaction, once per
    /// `(target, stream, offset)`; returns how many were new.
    ///
    /// Each target stores at most `max_bytes` of output, stdout and stderr together (see
    /// [`bytes_within_cap`]): of a chunk that passes the cap only the part below it is
    /// stored, and the target is marked truncated at `max_bytes`. A chunk already stored
    /// whole at its offset is a redelivery and changes nothing. Chunks of a target whose
    /// output the retention sweep deleted, or of an unknown target, are dropped.
    async fn store_chunks(
        &self,
        chunks: &[(String, Stream, u64, Vec<u8>)],
        max_bytes: u64,
    ) -> Result<u64>;

    /// A target's status and what is known of its output.
    async fn target_output(&self, target_id: &str) -> Result<Option<TargetOutput>>;

    /// Deletes the output of targets that ended (or last changed) before `ended_before` and
    /// marks it deleted at `now`; the targets' records and results stay. Bounded per call
    /// ([`PRUNE_ROWS_PER_STATEMENT`], [`PRUNE_ROWS_PER_CALL`], [`PRUNE_TARGETS_PER_CALL`]),
    /// oldest first, so a sweep never holds the write lock for long; the next one goes on.
    /// Returns how many chunks went.
    async fn prune_output(&self, ended_before: i64, now: i64) -> Result<u64>;

    /// Chunks of one target from offset `from` on (per stream), ordered by stream and offset.
    async fn read_chunks(
        &self,
        target_id: &str,
        stream: Option<Stream>,
        from: i64,
        limit: i64,
    ) -> Result<Vec<StoredChunk>>;

    /// Cancels a command: queued targets become `skipped`, released ones `cancelled`.
    /// Returns the targets that were released (to tell their agents), or `None` if unknown.
    async fn cancel_command(&self, id: &str, now: i64) -> Result<Option<Vec<Dispatch>>>;

    /// Stores a one-time enrollment token (its SHA-256 hex).
    async fn create_enrollment(
        &self,
        token_hash: &str,
        instance_id: &str,
        now: i64,
        expires_at: i64,
    ) -> Result<()>;

    /// Uses an enrollment token issued for `instance_id` once; `true` when it was valid,
    /// unused and for that instance. A token presented for another instance stays unused,
    /// so a mistyped id does not burn it.
    async fn consume_enrollment(
        &self,
        token_hash: &str,
        instance_id: &str,
        now: i64,
    ) -> Result<bool>;

    /// Records the nonce the instance's issued secret derives from.
    async fn set_issued_nonce(&self, instance_id: &str, nonce: &str, now: i64) -> Result<()>;

    /// The nonce of the instance's issued secret.
    async fn issued_nonce(&self, instance_id: &str) -> Result<Option<String>>;

    /// The server key stored under `name`, storing `candidate` first if there is none: the
    /// first process to ask decides, every later one (a restart, a replica) gets the same.
    async fn server_key(&self, name: &str, candidate: &str, now: i64) -> Result<String>;

    /// Marks targets `timed_out`: released but unanswered since before `sent_before`, or
    /// running without news since before `running_before`. Returns their command ids.
    async fn time_out_targets(
        &self,
        sent_before: i64,
        running_before: i64,
        now: i64,
    ) -> Result<Vec<String>>;

    /// Remembers a signed message id; `false` when it was seen before (a replay). Unlike
    /// [`RolloutStore::is_replay`](crate::store::rollouts::RolloutStore::is_replay), any
    /// earlier use of the id counts, whatever its timestamp.
    async fn remember_message(
        &self,
        instance_id: &str,
        msg_id: &str,
        signed_at: i64,
        now: i64,
    ) -> Result<bool>;

    /// A PostgreSQL pool and the channel for `LISTEN/NOTIFY` between the replicas sharing
    /// this store's schema (`None` on SQLite).
    fn replica_channel(&self) -> Option<(sqlx::PgPool, String)> {
        None
    }
}

/// `$lock`: what locks the command row in a transaction (`FOR UPDATE` on PostgreSQL;
/// nothing on SQLite, where `BEGIN IMMEDIATE` already serializes writers).
macro_rules! impl_command_store {
    ($store:ty, $begin:expr, $lock:expr, $($extra:tt)*) => {
        #[async_trait::async_trait]
        impl $crate::store::commands::CommandStore for $store {
            async fn create_command(
                &self,
                command: &$crate::store::commands::NewCommand,
                targets: &[(String, String)],
            ) -> $crate::Result<()> {
                let mut tx = self.pool().begin_with($begin).await?;
                sqlx::query(
                    "INSERT INTO commands (id, command_type, payload, max_concurrency, max_errors, \
                     status, created_by, created_at) VALUES ($1, $2, $3, $4, $5, 'running', $6, $7)",
                )
                .bind(&command.id)
                .bind(command.command_type.as_str())
                .bind(command.payload.to_string())
                .bind(command.max_concurrency.map(i64::from))
                .bind(&command.max_errors)
                .bind(&command.created_by)
                .bind(command.created_at)
                .execute(&mut *tx)
                .await?;
                for (seq, (target_id, instance_id)) in targets.iter().enumerate() {
                    sqlx::query(
                        "INSERT INTO command_targets (target_id, command_id, instance_id, seq, \
                         status, updated_at) VALUES ($1, $2, $3, $4, 'queued', $5)",
                    )
                    .bind(target_id)
                    .bind(&command.id)
                    .bind(instance_id)
                    .bind(seq as i64)
                    .bind(command.created_at)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn select_instances(
                &self,
                channel: Option<&str>,
                limit: i64,
            ) -> $crate::Result<Vec<String>> {
                Ok(sqlx::query_scalar(
                    "SELECT instance_id FROM installations \
                     WHERE ($1 IS NULL OR release_channel = $1) AND archived_at IS NULL \
                     ORDER BY instance_id LIMIT $2",
                )
                .bind(channel)
                .bind(limit)
                .fetch_all(self.pool())
                .await?)
            }

            async fn known_instances(
                &self,
                ids: &[String],
            ) -> $crate::Result<$crate::store::commands::KnownInstances> {
                // One statement per 500 ids: both databases take `$n` placeholders, and a
                // list this long stays far below either's limit on bound parameters.
                let mut found = $crate::store::commands::KnownInstances::default();
                for part in ids.chunks(500) {
                    let list = (1..=part.len())
                        .map(|n| format!("${n}"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    let sql = format!(
                        "SELECT instance_id, archived_at FROM installations \
                         WHERE instance_id IN ({list}) UNION ALL \
                         SELECT instance_id, NULL FROM issued_secrets WHERE instance_id IN ({list})"
                    );
                    // Safe: the text holds only the placeholders made above, no input.
                    let mut query =
                        sqlx::query_as::<_, (String, Option<i64>)>(sqlx::AssertSqlSafe(sql));
                    for id in part {
                        query = query.bind(id);
                    }
                    for (instance, archived_at) in query.fetch_all(self.pool()).await? {
                        if archived_at.is_some() {
                            found.archived.insert(instance.clone());
                        }
                        found.known.insert(instance);
                    }
                }
                Ok(found)
            }

            async fn command(
                &self,
                id: &str,
            ) -> $crate::Result<Option<$crate::store::commands::CommandRecord>> {
                use sqlx::Row;
                let Some(row) = sqlx::query(
                    "SELECT id, command_type, payload, max_concurrency, max_errors, status, \
                     created_by, created_at, finished_at FROM commands WHERE id = $1",
                )
                .bind(id)
                .fetch_optional(self.pool())
                .await?
                else {
                    return Ok(None);
                };
                let targets = sqlx::query_as::<_, $crate::store::commands::TargetRecord>(
                    "SELECT target_id, instance_id, status, sent_at, updated_at, exit_code, error, \
                     logs, data, output_bytes, output_truncated_at_bytes, output_deleted_at \
                     FROM command_targets WHERE command_id = $1 ORDER BY seq",
                )
                .bind(id)
                .fetch_all(self.pool())
                .await?;
                let payload: String = row.try_get("payload")?;
                Ok(Some($crate::store::commands::CommandRecord {
                    id: row.try_get("id")?,
                    command_type: row.try_get("command_type")?,
                    payload: serde_json::from_str(&payload).unwrap_or_default(),
                    max_concurrency: row.try_get("max_concurrency")?,
                    max_errors: row.try_get("max_errors")?,
                    status: row.try_get("status")?,
                    created_by: row.try_get("created_by")?,
                    created_at: row.try_get("created_at")?,
                    finished_at: row.try_get("finished_at")?,
                    targets,
                }))
            }

            async fn list_commands(
                &self,
                limit: i64,
            ) -> $crate::Result<Vec<$crate::store::commands::CommandSummary>> {
                Ok(sqlx::query_as::<_, $crate::store::commands::CommandSummary>(
                    "SELECT c.id, c.command_type, c.status, c.created_by, c.created_at, \
                     c.finished_at, COUNT(t.target_id) AS total, \
                     COALESCE(SUM(CASE WHEN t.status = 'completed' THEN 1 ELSE 0 END), 0) AS completed, \
                     COALESCE(SUM(CASE WHEN t.status IN ('failed', 'timed_out') THEN 1 ELSE 0 END), 0) AS failed, \
                     COALESCE(SUM(CASE WHEN t.status = 'sent' THEN 1 ELSE 0 END), 0) AS sent, \
                     COALESCE(SUM(CASE WHEN t.status = 'running' THEN 1 ELSE 0 END), 0) AS running, \
                     COALESCE(SUM(CASE WHEN t.status = 'queued' THEN 1 ELSE 0 END), 0) AS queued, \
                     MIN(t.instance_id) AS first_instance \
                     FROM commands c LEFT JOIN command_targets t ON t.command_id = c.id \
                     GROUP BY c.id, c.command_type, c.status, c.created_by, c.created_at, c.finished_at \
                     ORDER BY c.created_at DESC, c.id DESC LIMIT $1",
                )
                .bind(limit)
                .fetch_all(self.pool())
                .await?)
            }

            async fn schedule(
                &self,
                command_id: &str,
                now: i64,
            ) -> $crate::Result<Vec<$crate::store::commands::Dispatch>> {
                use sqlx::Row;
                let mut tx = self.pool().begin_with($begin).await?;
                let Some(row) = sqlx::query(concat!(
                    "SELECT status, max_concurrency, max_errors FROM commands WHERE id = $1",
                    $lock
                ))
                .bind(command_id)
                .fetch_optional(&mut *tx)
                .await?
                else {
                    return Ok(Vec::new());
                };
                let status: String = row.try_get("status")?;
                if status != "running" {
                    return Ok(Vec::new());
                }
                let max_concurrency: Option<i64> = row.try_get("max_concurrency")?;
                let max_errors: Option<String> = row.try_get("max_errors")?;
                let counts = sqlx::query(
                    "SELECT COUNT(*) AS total, \
                     COALESCE(SUM(CASE WHEN status IN ('sent', 'running') THEN 1 ELSE 0 END), 0) AS inflight, \
                     COALESCE(SUM(CASE WHEN status IN ('failed', 'timed_out') THEN 1 ELSE 0 END), 0) AS failed, \
                     COALESCE(SUM(CASE WHEN status = 'queued' THEN 1 ELSE 0 END), 0) AS queued \
                     FROM command_targets WHERE command_id = $1",
                )
                .bind(command_id)
                .fetch_one(&mut *tx)
                .await?;
                let total: i64 = counts.try_get("total")?;
                let inflight: i64 = counts.try_get("inflight")?;
                let failed: i64 = counts.try_get("failed")?;
                let queued: i64 = counts.try_get("queued")?;
                let halted = max_errors
                    .as_deref()
                    .and_then(fleet_core::command::Threshold::parse)
                    .is_some_and(|t| {
                        t.exceeded(
                            u32::try_from(failed).unwrap_or(u32::MAX),
                            u32::try_from(total).unwrap_or(u32::MAX),
                        )
                    });
                let mut released = Vec::new();
                if halted {
                    sqlx::query(
                        "UPDATE command_targets SET status = 'skipped', updated_at = $2 \
                         WHERE command_id = $1 AND status = 'queued'",
                    )
                    .bind(command_id)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                    // Targets still running are awaited; the schedule after the last one
                    // ends closes the command.
                    if inflight == 0 {
                        sqlx::query(
                            "UPDATE commands SET status = 'halted', finished_at = $2 WHERE id = $1",
                        )
                        .bind(command_id)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                    }
                } else if queued > 0 {
                    let room = match max_concurrency {
                        Some(max) => (max - inflight).max(0),
                        None => queued,
                    };
                    if room > 0 {
                        released = sqlx::query_as::<_, $crate::store::commands::Dispatch>(
                            "UPDATE command_targets SET status = 'sent', sent_at = $2, updated_at = $2 \
                             WHERE target_id IN (SELECT target_id FROM command_targets \
                             WHERE command_id = $1 AND status = 'queued' ORDER BY seq LIMIT $3) \
                             RETURNING target_id, instance_id, \
                             (SELECT command_type FROM commands WHERE id = $1) AS command_type, \
                             (SELECT payload FROM commands WHERE id = $1) AS payload",
                        )
                        .bind(command_id)
                        .bind(now)
                        .bind(room)
                        .fetch_all(&mut *tx)
                        .await?;
                    }
                } else if inflight == 0 {
                    sqlx::query(
                        "UPDATE commands SET status = 'completed', finished_at = $2 WHERE id = $1",
                    )
                    .bind(command_id)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(released)
            }

            async fn pending_for(
                &self,
                instance_id: &str,
            ) -> $crate::Result<Vec<$crate::store::commands::Dispatch>> {
                Ok(sqlx::query_as::<_, $crate::store::commands::Dispatch>(
                    "SELECT t.target_id, t.instance_id, c.command_type, c.payload \
                     FROM command_targets t JOIN commands c ON c.id = t.command_id \
                     WHERE t.instance_id = $1 AND t.status IN ('sent', 'running') \
                     ORDER BY t.sent_at, t.seq",
                )
                .bind(instance_id)
                .fetch_all(self.pool())
                .await?)
            }

            async fn record_target(
                &self,
                target_id: &str,
                instance_id: &str,
                update: &$crate::store::commands::TargetUpdate<'_>,
                now: i64,
            ) -> $crate::Result<Option<String>> {
                let status = $crate::store::commands::target_status_str(update.status);
                Ok(sqlx::query_scalar(
                    "UPDATE command_targets SET status = $3, updated_at = $4, \
                     exit_code = COALESCE($5, exit_code), error = COALESCE($6, error), \
                     logs = COALESCE($7, logs), data = COALESCE($8, data) \
                     WHERE target_id = $1 AND instance_id = $2 AND status IN ('sent', 'running') \
                     RETURNING command_id",
                )
                .bind(target_id)
                .bind(instance_id)
                .bind(status)
                .bind(now)
                .bind(update.exit_code.map(i64::from))
                .bind(update.error)
                .bind(update.logs)
                .bind(update.data.as_deref())
                .fetch_optional(self.pool())
                .await?)
            }

            async fn target_owner(
                &self,
                target_id: &str,
            ) -> $crate::Result<Option<(String, String)>> {
                Ok(sqlx::query_as(
                    "SELECT instance_id, command_id FROM command_targets WHERE target_id = $1",
                )
                .bind(target_id)
                .fetch_optional(self.pool())
                .await?)
            }

            async fn target_status(&self, target_id: &str) -> $crate::Result<Option<String>> {
                Ok(
                    sqlx::query_scalar("SELECT status FROM command_targets WHERE target_id = $1")
                        .bind(target_id)
                        .fetch_optional(self.pool())
                        .await?,
                )
            }

            async fn store_chunks(
                &self,
                chunks: &[(String, fleet_core::command::Stream, u64, Vec<u8>)],
                max_bytes: u64,
            ) -> $crate::Result<u64> {
                use sqlx::Row;
                let max_bytes = $crate::store::commands::storable_cap(max_bytes);
                let mut tx = self.pool().begin_with($begin).await?;
                // Each target's count is read once, under its row's lock on PostgreSQL and
                // in target order, so two batches for one target (two replicas) add up
                // instead of both passing the cap, and never wait on each other in a cycle.
                let names: std::collections::BTreeSet<&str> =
                    chunks.iter().map(|(target, ..)| target.as_str()).collect();
                let mut counts = std::collections::BTreeMap::new();
                for target in names {
                    let row = sqlx::query(concat!(
                        "SELECT output_bytes, output_deleted_at FROM command_targets \
                         WHERE target_id = $1",
                        $lock
                    ))
                    .bind(target)
                    .fetch_optional(&mut *tx)
                    .await?;
                    let Some(row) = row else { continue };
                    let deleted: Option<i64> = row.try_get("output_deleted_at")?;
                    if deleted.is_some() {
                        continue;
                    }
                    let stored = u64::try_from(row.try_get::<i64, _>("output_bytes")?)
                        .unwrap_or_default();
                    counts.insert(
                        target,
                        $crate::store::commands::OutputCount {
                            before: stored,
                            stored,
                            truncated: false,
                        },
                    );
                }
                let mut new = 0;
                for (target, stream, offset, data) in chunks {
                    let Some(count) = counts.get_mut(target.as_str()) else {
                        continue;
                    };
                    let keep = $crate::store::commands::bytes_within_cap(
                        *offset,
                        data.len(),
                        max_bytes,
                        count.stored,
                    );
                    // Below the cap the offset fits: keep > 0 means offset < max_bytes.
                    let pos = i64::try_from(*offset).ok();
                    if keep < data.len() {
                        // A chunk stored whole before (redelivered once the count reached
                        // the cap) was not cut: nothing to do.
                        let stored_len: Option<i64> = match pos {
                            Some(pos) => {
                                sqlx::query_scalar(
                                    "SELECT CAST(LENGTH(data) AS BIGINT) FROM command_logs \
                                     WHERE target_id = $1 AND stream = $2 AND pos = $3",
                                )
                                .bind(target)
                                .bind(stream.as_str())
                                .bind(pos)
                                .fetch_optional(&mut *tx)
                                .await?
                            }
                            None => None,
                        };
                        if stored_len.is_some_and(|len| len >= data.len() as i64) {
                            continue;
                        }
                        count.truncated = true;
                    }
                    let (Some(pos), true) = (pos, keep > 0) else {
                        continue;
                    };
                    let inserted = sqlx::query(
                        "INSERT INTO command_logs (target_id, stream, pos, data) \
                         VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                    )
                    .bind(target)
                    .bind(stream.as_str())
                    .bind(pos)
                    .bind(&data[..keep])
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    if inserted > 0 {
                        count.stored += keep as u64;
                        new += inserted;
                    }
                }
                for (target, count) in &counts {
                    if count.stored == count.before && !count.truncated {
                        continue;
                    }
                    sqlx::query(
                        "UPDATE command_targets SET output_bytes = $2, \
                         output_truncated_at_bytes = COALESCE(output_truncated_at_bytes, $3) \
                         WHERE target_id = $1",
                    )
                    .bind(*target)
                    .bind(i64::try_from(count.stored).unwrap_or(i64::MAX))
                    .bind(count.truncated.then_some(max_bytes as i64))
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(new)
            }

            async fn target_output(
                &self,
                target_id: &str,
            ) -> $crate::Result<Option<$crate::store::commands::TargetOutput>> {
                Ok(sqlx::query_as::<_, $crate::store::commands::TargetOutput>(
                    "SELECT status, output_bytes, output_truncated_at_bytes, output_deleted_at \
                     FROM command_targets WHERE target_id = $1",
                )
                .bind(target_id)
                .fetch_optional(self.pool())
                .await?)
            }

            async fn prune_output(&self, ended_before: i64, now: i64) -> $crate::Result<u64> {
                use $crate::store::commands::{
                    PRUNE_ROWS_PER_CALL, PRUNE_ROWS_PER_STATEMENT, PRUNE_TARGETS_PER_CALL,
                };
                // An ended target changes no more, so its last change is when it ended.
                let targets: Vec<String> = sqlx::query_scalar(
                    "SELECT target_id FROM command_targets \
                     WHERE output_deleted_at IS NULL AND updated_at < $1 \
                     AND status IN ('completed', 'failed', 'timed_out', 'skipped', 'cancelled') \
                     ORDER BY updated_at LIMIT $2",
                )
                .bind(ended_before)
                .bind(PRUNE_TARGETS_PER_CALL)
                .fetch_all(self.pool())
                .await?;
                let mut deleted = 0;
                for target in &targets {
                    loop {
                        if deleted >= PRUNE_ROWS_PER_CALL {
                            return Ok(deleted);
                        }
                        let batch = sqlx::query(
                            "DELETE FROM command_logs WHERE target_id = $1 AND (stream, pos) IN \
                             (SELECT stream, pos FROM command_logs WHERE target_id = $1 LIMIT $2)",
                        )
                        .bind(target)
                        .bind(PRUNE_ROWS_PER_STATEMENT)
                        .execute(self.pool())
                        .await?
                        .rows_affected();
                        deleted += batch;
                        if batch < PRUNE_ROWS_PER_STATEMENT as u64 {
                            break;
                        }
                    }
                    // Marked and emptied in one transaction: a chunk stored since the
                    // deletes above goes too, and one that comes later is dropped, since
                    // storing reads the mark under the same row lock.
                    let mut tx = self.pool().begin_with($begin).await?;
                    sqlx::query(
                        "UPDATE command_targets SET output_deleted_at = $2 \
                         WHERE target_id = $1 AND output_deleted_at IS NULL",
                    )
                    .bind(target)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                    deleted += sqlx::query("DELETE FROM command_logs WHERE target_id = $1")
                        .bind(target)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    tx.commit().await?;
                }
                Ok(deleted)
            }

            async fn read_chunks(
                &self,
                target_id: &str,
                stream: Option<fleet_core::command::Stream>,
                from: i64,
                limit: i64,
            ) -> $crate::Result<Vec<$crate::store::commands::StoredChunk>> {
                Ok(sqlx::query_as::<_, $crate::store::commands::StoredChunk>(
                    "SELECT stream, pos, data FROM command_logs \
                     WHERE target_id = $1 AND ($2 IS NULL OR stream = $2) AND pos >= $3 \
                     ORDER BY stream, pos LIMIT $4",
                )
                .bind(target_id)
                .bind(stream.map(|s| s.as_str()))
                .bind(from)
                .bind(limit)
                .fetch_all(self.pool())
                .await?)
            }

            async fn cancel_command(
                &self,
                id: &str,
                now: i64,
            ) -> $crate::Result<Option<Vec<$crate::store::commands::Dispatch>>> {
                let mut tx = self.pool().begin_with($begin).await?;
                let found: Option<String> = sqlx::query_scalar(concat!(
                    "SELECT status FROM commands WHERE id = $1",
                    $lock
                ))
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
                if found.is_none() {
                    return Ok(None);
                }
                sqlx::query(
                    "UPDATE command_targets SET status = 'skipped', updated_at = $2 \
                     WHERE command_id = $1 AND status = 'queued'",
                )
                .bind(id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                let running = sqlx::query_as::<_, $crate::store::commands::Dispatch>(
                    "UPDATE command_targets SET status = 'cancelled', updated_at = $2 \
                     WHERE command_id = $1 AND status IN ('sent', 'running') \
                     RETURNING target_id, instance_id, '' AS command_type, '' AS payload",
                )
                .bind(id)
                .bind(now)
                .fetch_all(&mut *tx)
                .await?;
                sqlx::query(
                    "UPDATE commands SET status = 'cancelled', finished_at = COALESCE(finished_at, $2) \
                     WHERE id = $1 AND status = 'running'",
                )
                .bind(id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(Some(running))
            }

            async fn create_enrollment(
                &self,
                token_hash: &str,
                instance_id: &str,
                now: i64,
                expires_at: i64,
            ) -> $crate::Result<()> {
                sqlx::query(
                    "INSERT INTO enrollment_tokens (token_hash, instance_id, created_at, expires_at) \
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(token_hash)
                .bind(instance_id)
                .bind(now)
                .bind(expires_at)
                .execute(self.pool())
                .await?;
                Ok(())
            }

            async fn consume_enrollment(
                &self,
                token_hash: &str,
                instance_id: &str,
                now: i64,
            ) -> $crate::Result<bool> {
                Ok(sqlx::query_scalar::<_, String>(
                    "UPDATE enrollment_tokens SET used_at = $2 \
                     WHERE token_hash = $1 AND instance_id = $3 AND used_at IS NULL \
                     AND expires_at > $2 RETURNING instance_id",
                )
                .bind(token_hash)
                .bind(now)
                .bind(instance_id)
                .fetch_optional(self.pool())
                .await?
                .is_some())
            }

            async fn set_issued_nonce(
                &self,
                instance_id: &str,
                nonce: &str,
                now: i64,
            ) -> $crate::Result<()> {
                sqlx::query(
                    "INSERT INTO issued_secrets (instance_id, nonce, created_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (instance_id) DO UPDATE SET nonce = excluded.nonce, \
                     created_at = excluded.created_at",
                )
                .bind(instance_id)
                .bind(nonce)
                .bind(now)
                .execute(self.pool())
                .await?;
                Ok(())
            }

            async fn time_out_targets(
                &self,
                sent_before: i64,
                running_before: i64,
                now: i64,
            ) -> $crate::Result<Vec<String>> {
                let mut ids: Vec<String> = sqlx::query_scalar(
                    "UPDATE command_targets SET status = 'timed_out', updated_at = $3, \
                     error = 'no answer from the agent in time' \
                     WHERE (status = 'sent' AND sent_at < $1) OR (status = 'running' AND updated_at < $2) \
                     RETURNING command_id",
                )
                .bind(sent_before)
                .bind(running_before)
                .bind(now)
                .fetch_all(self.pool())
                .await?;
                ids.sort();
                ids.dedup();
                Ok(ids)
            }

            async fn remember_message(
                &self,
                instance_id: &str,
                msg_id: &str,
                signed_at: i64,
                now: i64,
            ) -> $crate::Result<bool> {
                Ok(sqlx::query(
                    "INSERT INTO seen_messages (instance_id, msg_id, signed_at, seen_at)                      VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                )
                .bind(instance_id)
                .bind(msg_id)
                .bind(signed_at)
                .bind(now)
                .execute(self.pool())
                .await?
                .rows_affected()
                    == 1)
            }

            $($extra)*

            async fn issued_nonce(&self, instance_id: &str) -> $crate::Result<Option<String>> {
                Ok(sqlx::query_scalar("SELECT nonce FROM issued_secrets WHERE instance_id = $1")
                    .bind(instance_id)
                    .fetch_optional(self.pool())
                    .await?)
            }

            async fn server_key(
                &self,
                name: &str,
                candidate: &str,
                now: i64,
            ) -> $crate::Result<String> {
                sqlx::query(
                    "INSERT INTO server_keys (name, value, created_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (name) DO NOTHING",
                )
                .bind(name)
                .bind(candidate)
                .bind(now)
                .execute(self.pool())
                .await?;
                Ok(sqlx::query_scalar("SELECT value FROM server_keys WHERE name = $1")
                    .bind(name)
                    .fetch_one(self.pool())
                    .await?)
            }
        }
    };
}

impl_command_store!(super::SqliteStore, "BEGIN IMMEDIATE", "",);
impl_command_store!(
    super::PostgresStore,
    "BEGIN",
    " FOR UPDATE",
    fn replica_channel(&self) -> Option<(sqlx::PgPool, String)> {
        Some((self.pool().clone(), self.notify_channel.clone()))
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_keeps_what_fits_under_the_cap_by_offset_and_in_total() {
        // Below the cap, whole; straddling it, the part below; at or past it, nothing.
        assert_eq!(bytes_within_cap(0, 600, 1000, 0), 600);
        assert_eq!(bytes_within_cap(600, 600, 1000, 600), 400);
        assert_eq!(bytes_within_cap(1000, 10, 1000, 1000), 0);
        // The other stream (or overlapping chunks) used the room: the total counts.
        assert_eq!(bytes_within_cap(0, 600, 1000, 700), 300);
        assert_eq!(bytes_within_cap(5, 10, 1000, 1000), 0);
        // Offsets that no database integer holds are past any cap.
        assert_eq!(bytes_within_cap(u64::MAX, 10, storable_cap(u64::MAX), 0), 0);
        assert_eq!(
            bytes_within_cap(i64::MAX as u64, 10, storable_cap(u64::MAX), 0),
            0
        );
        assert_eq!(storable_cap(u64::MAX), i64::MAX as u64);
    }
}
