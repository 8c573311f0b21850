//! The SQL shared by both backends, expanded once per database by `impl_sql_store!`.
//! Recording heartbeats is the exception: each engine has its own statements for it
//! (`postgres_ingest.rs`, `sqlite_ingest.rs`) around the plain functions of `batch.rs`.

macro_rules! summary_select {
    () => {
        "SELECT i.id, i.instance_id, i.domain, i.client, i.version, i.release_channel, i.health, \
         i.scheme, i.enrolled_at, i.first_seen_at, i.last_seen_at, \
         (SELECT COUNT(*) FROM alerts a WHERE a.installation_id = i.id AND a.resolved_at IS NULL) AS open_alerts, \
         EXISTS (SELECT 1 FROM alerts a WHERE a.installation_id = i.id AND a.resolved_at IS NULL \
         AND a.dedup_key = 'offline') AS offline, i.archived_at FROM installations i"
    };
}
// $5 is `ArchivedFilter::as_str`.
// A health filter matches what the list's Health column shows: an installation that is
// offline is shown (and filtered) as `offline`, not as the health of its last heartbeat.
macro_rules! list_where {
    () => {
        " WHERE ($1 IS NULL OR i.release_channel = $1) \
         AND ($2 IS NULL OR (i.health = $2 AND NOT EXISTS (SELECT 1 FROM alerts a \
         WHERE a.installation_id = i.id AND a.dedup_key = 'offline' AND a.resolved_at IS NULL))) \
         AND ($3 IS NULL OR LOWER(i.instance_id) LIKE $3 ESCAPE '\\' \
         OR LOWER(COALESCE(i.domain, '')) LIKE $3 ESCAPE '\\' \
         OR LOWER(COALESCE(i.client, '')) LIKE $3 ESCAPE '\\') \
         AND ($4 = FALSE OR EXISTS (SELECT 1 FROM alerts a WHERE a.installation_id = i.id \
         AND a.dedup_key = 'offline' AND a.resolved_at IS NULL)) \
         AND (($5 = 'false' AND i.archived_at IS NULL) \
         OR ($5 = 'true' AND i.archived_at IS NOT NULL) OR $5 = 'all')"
    };
}
// An alert with its installation's instance id and its newest webhook delivery (an alert
// has one, but should it ever get another, it is still listed once).
macro_rules! alert_from {
    () => {
        " FROM alerts a JOIN installations i ON i.id = a.installation_id \
         LEFT JOIN webhook_outbox w ON w.id = \
         (SELECT MAX(o.id) FROM webhook_outbox o WHERE o.alert_id = a.id)"
    };
}
macro_rules! alert_select {
    () => {
        concat!(
            "SELECT a.id, a.installation_id, i.instance_id, a.level, a.kind, a.message, \
             a.created_at, a.resolved_at, a.acknowledged_at, a.acknowledged_by, \
             w.id AS delivery_id, w.attempts AS delivery_attempts, \
             w.next_attempt_at AS delivery_next_attempt_at, w.delivered_at AS delivery_delivered_at, \
             w.failed_at AS delivery_given_up_at, w.last_error AS delivery_last_error",
            alert_from!()
        )
    };
}
// The filters of `Store::alert_page`: $1 the state, $2 the level, $3 the kind, $4 the
// instance id, $5 the delivery (`AlertState::as_str`, `DeliveryFilter::as_str`).
macro_rules! alert_list_where {
    () => {
        " WHERE (($1 = 'open' AND a.resolved_at IS NULL) \
         OR ($1 = 'acknowledged' AND a.resolved_at IS NULL AND a.acknowledged_at IS NOT NULL) \
         OR ($1 = 'resolved' AND a.resolved_at IS NOT NULL) OR $1 = 'all') \
         AND ($2 IS NULL OR a.level = $2) AND ($3 IS NULL OR a.kind = $3) \
         AND ($4 IS NULL OR i.instance_id = $4) \
         AND ($5 IS NULL OR ($5 = 'none' AND w.id IS NULL) \
         OR ($5 = 'pending' AND w.id IS NOT NULL AND w.delivered_at IS NULL AND w.failed_at IS NULL) \
         OR ($5 = 'delivered' AND w.delivered_at IS NOT NULL) \
         OR ($5 = 'given_up' AND w.failed_at IS NOT NULL))"
    };
}

pub(crate) const LIST_SQL: &str = concat!(
    summary_select!(),
    list_where!(),
    " ORDER BY i.instance_id LIMIT $6 OFFSET $7"
);
pub(crate) const COUNT_SQL: &str = concat!("SELECT COUNT(*) FROM installations i", list_where!());
pub(crate) const DETAIL_SQL: &str = concat!(summary_select!(), " WHERE i.instance_id = $1");
pub(crate) const ALERTS_OF_SQL: &str = concat!(
    alert_select!(),
    " WHERE a.installation_id = $1 ORDER BY (a.resolved_at IS NULL) DESC, a.id DESC LIMIT 100"
);
pub(crate) const ALERT_PAGE_SQL: &str = concat!(
    alert_select!(),
    alert_list_where!(),
    " ORDER BY a.id DESC LIMIT $6 OFFSET $7"
);
pub(crate) const ALERT_COUNT_SQL: &str =
    concat!("SELECT COUNT(*)", alert_from!(), alert_list_where!());
pub(crate) const ALERT_SQL: &str = concat!(alert_select!(), " WHERE a.id = $1");

/// The error of the jobs and restore verifications an archive cancels.
pub(crate) const ARCHIVED: &str = "the installation was archived";

/// Why an installation archived since `since` (unix seconds) cannot be archived again.
pub(crate) fn already_archived(instance_id: &str, since: Option<i64>) -> String {
    let since = since
        .map(|at| format!(" since {} UTC", fleet_core::clock::human_utc(at)))
        .unwrap_or_default();
    format!(
        "installation {instance_id} is already archived{since}; its next heartbeat makes it active again"
    )
}

/// `%text%` for a case-insensitive `LIKE`, with the wildcards of the user's text escaped.
pub(crate) fn like_pattern(text: &str) -> String {
    let mut out = String::from("%");
    for c in text.to_lowercase().chars() {
        if matches!(c, '\\' | '%' | '_') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

/// Implements [`Store`](crate::store::Store) for `$store` (which has a `pool: Pool<$db>`);
/// `$begin` opens a write transaction; `$skip_locked` ends a `SELECT` that claims rows
/// (`" FOR UPDATE SKIP LOCKED"` or nothing); `$store` has inherent functions
/// `concurrency(&self) -> usize` for
/// [`Store::write_concurrency`](crate::store::Store::write_concurrency) and `record_batch`
/// for [`Store::record_heartbeats`](crate::store::Store::record_heartbeats), the one
/// statement path each engine has of its own, and the constant `RECENT_HEARTBEATS`, the one
/// query: each engine finds an installation's time series its own way.
macro_rules! impl_sql_store {
    ($store:ty, $db:ty, $begin:expr, $skip_locked:literal) => {
        #[async_trait::async_trait]
        impl $crate::store::Store for $store {
            fn commands(&self) -> Option<&dyn $crate::store::commands::CommandStore> {
                Some(self)
            }

            async fn record_heartbeats(
                &self,
                batch: &[$crate::store::IncomingHeartbeat],
                rules: &$crate::store::IngestRules,
            ) -> $crate::Result<Vec<$crate::store::RecordOutcome>> {
                self.record_batch(batch, rules).await
            }

            async fn enroll(&self, instance_id: &str, now: i64) -> $crate::Result<i64> {
                Ok(sqlx::query_scalar(
                    "INSERT INTO installations (instance_id, enrolled_at) VALUES ($1, $2) \
                     ON CONFLICT (instance_id) DO UPDATE SET \
                     enrolled_at = COALESCE(installations.enrolled_at, excluded.enrolled_at), \
                     archived_at = NULL \
                     RETURNING id",
                )
                .bind(instance_id)
                .bind(now)
                .fetch_one(&self.pool)
                .await?)
            }

            async fn list_installations(
                &self,
                filter: &$crate::store::InstallationFilter,
            ) -> $crate::Result<$crate::store::Page<$crate::store::InstallationSummary>> {
                let text = filter.text.as_deref().map($crate::store::sql::like_pattern);
                let offline = filter.health.as_deref() == Some("offline");
                let health = filter.health.clone().filter(|_| !offline);
                let items = sqlx::query_as::<_, $crate::store::InstallationSummary>($crate::store::sql::LIST_SQL)
                .bind(filter.channel.clone())
                .bind(health.clone())
                .bind(text.clone())
                .bind(offline)
                .bind(filter.archived.as_str())
                .bind(filter.limit)
                .bind(filter.offset)
                .fetch_all(&self.pool)
                .await?;
                let total: i64 = sqlx::query_scalar($crate::store::sql::COUNT_SQL)
                .bind(filter.channel.clone())
                .bind(health)
                .bind(text)
                .bind(offline)
                .bind(filter.archived.as_str())
                .fetch_one(&self.pool)
                .await?;
                Ok($crate::store::Page { items, total })
            }

            async fn installation(
                &self,
                instance_id: &str,
            ) -> $crate::Result<Option<$crate::store::InstallationDetail>> {
                use sqlx::Row;
                let Some(summary) = sqlx::query_as::<_, $crate::store::InstallationSummary>($crate::store::sql::DETAIL_SQL)
                .bind(instance_id)
                .fetch_optional(&self.pool)
                .await?
                else {
                    return Ok(None);
                };
                let state: Option<String> =
                    sqlx::query_scalar("SELECT state FROM installations WHERE id = $1")
                        .bind(summary.id)
                        .fetch_one(&self.pool)
                        .await?;
                let alerts = sqlx::query_as::<_, $crate::store::Alert>($crate::store::sql::ALERTS_OF_SQL)
                .bind(summary.id)
                .fetch_all(&self.pool)
                .await?;
                let job_failures = sqlx::query_as::<_, $crate::store::JobFailureRecord>(
                    "SELECT id, queue, message, created_at FROM job_failures \
                     WHERE installation_id = $1 ORDER BY id DESC LIMIT 100",
                )
                .bind(summary.id)
                .fetch_all(&self.pool)
                .await?;
                let backups = sqlx::query_as::<_, $crate::store::BackupRecord>(
                    "SELECT id, backup_id, checksum, size_bytes, bucket, path, status, backup_at, \
                     recorded_at FROM backups WHERE installation_id = $1 ORDER BY id DESC LIMIT 50",
                )
                .bind(summary.id)
                .fetch_all(&self.pool)
                .await?;
                let rows = sqlx::query(Self::RECENT_HEARTBEATS)
                    .bind(summary.id)
                    .bind(i64::MIN)
                    .bind(60i64)
                    .fetch_all(&self.pool)
                    .await?;
                let mut recent = Vec::with_capacity(rows.len());
                for row in rows.iter().rev() {
                    let figures: String = row.try_get("figures")?;
                    recent.push($crate::store::batch::point(row.try_get("received_at")?, &figures));
                }
                let state = state
                    .and_then(|s| serde_json::from_str(&s).ok())
                    .unwrap_or(serde_json::Value::Null);
                Ok(Some($crate::store::InstallationDetail {
                    summary,
                    state,
                    alerts,
                    job_failures,
                    backups,
                    recent,
                }))
            }

            async fn alert_page(
                &self,
                filter: &$crate::store::AlertFilter,
            ) -> $crate::Result<$crate::store::Page<$crate::store::Alert>> {
                let state = filter.state.as_str();
                let delivery = filter.delivery.map(|d| d.as_str());
                let items = if filter.limit > 0 {
                    sqlx::query_as::<_, $crate::store::Alert>($crate::store::sql::ALERT_PAGE_SQL)
                        .bind(state)
                        .bind(filter.level.as_deref())
                        .bind(filter.kind.as_deref())
                        .bind(filter.instance_id.as_deref())
                        .bind(delivery)
                        .bind(filter.limit)
                        .bind(filter.offset)
                        .fetch_all(&self.pool)
                        .await?
                } else {
                    Vec::new()
                };
                let total: i64 = sqlx::query_scalar($crate::store::sql::ALERT_COUNT_SQL)
                    .bind(state)
                    .bind(filter.level.as_deref())
                    .bind(filter.kind.as_deref())
                    .bind(filter.instance_id.as_deref())
                    .bind(delivery)
                    .fetch_one(&self.pool)
                    .await?;
                Ok($crate::store::Page { items, total })
            }

            async fn acknowledge_alert(
                &self,
                alert_id: i64,
                by: &str,
                now: i64,
            ) -> $crate::Result<Option<$crate::store::Alert>> {
                sqlx::query(
                    "UPDATE alerts SET acknowledged_at = $1, acknowledged_by = $2 \
                     WHERE id = $3 AND acknowledged_at IS NULL",
                )
                .bind(now)
                .bind(by)
                .bind(alert_id)
                .execute(&self.pool)
                .await?;
                Ok(sqlx::query_as::<_, $crate::store::Alert>($crate::store::sql::ALERT_SQL)
                .bind(alert_id)
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn archive_installation(
                &self,
                instance_id: &str,
                now: i64,
            ) -> $crate::Result<Option<$crate::store::InstallationSummary>> {
                let mut tx = self.pool.begin_with($begin).await?;
                let archived: Option<i64> = sqlx::query_scalar(
                    "UPDATE installations SET archived_at = $1 \
                     WHERE instance_id = $2 AND archived_at IS NULL RETURNING id",
                )
                .bind(now)
                .bind(instance_id)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(installation_id) = archived else {
                    let since: Option<Option<i64>> =
                        sqlx::query_scalar("SELECT archived_at FROM installations WHERE instance_id = $1")
                            .bind(instance_id)
                            .fetch_optional(&mut *tx)
                            .await?;
                    return match since {
                        None => Ok(None),
                        Some(since) => Err($crate::Error::Conflict(
                            $crate::store::sql::already_archived(instance_id, since),
                        )),
                    };
                };
                // Nobody is to act on an installation whose customer left.
                sqlx::query(
                    "UPDATE alerts SET resolved_at = $1 WHERE installation_id = $2 AND resolved_at IS NULL",
                )
                .bind(now)
                .bind(installation_id)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "UPDATE restores SET status = $1, error = $2, finished_at = $3 \
                     WHERE instance_id = $4 AND status = 'scheduled'",
                )
                .bind($crate::restores::CANCELLED)
                .bind($crate::store::sql::ARCHIVED)
                .bind(now)
                .bind(instance_id)
                .execute(&mut *tx)
                .await?;
                let available = Self::cancel_jobs_of_archived(&mut tx, instance_id, now).await?;
                tx.commit().await?;
                for (pipeline, instances) in available {
                    self.jobs.announce(pipeline, instances);
                }
                Ok(sqlx::query_as::<_, $crate::store::InstallationSummary>($crate::store::sql::DETAIL_SQL)
                    .bind(instance_id)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn mark_offline(&self, cutoff: i64, now: i64, forward: bool) -> $crate::Result<u64> {
                use sqlx::Row;
                let mut tx = self.pool.begin_with($begin).await?;
                // In id order: two sweeps that overlap raise their alerts in the same order,
                // so on PostgreSQL each waits for the other instead of deadlocking on the
                // open-alert index.
                let rows = sqlx::query(
                    "SELECT i.id, i.instance_id, i.last_seen_at FROM installations i \
                     WHERE i.last_seen_at < $1 AND i.archived_at IS NULL AND NOT EXISTS (SELECT 1 FROM alerts a \
                     WHERE a.installation_id = i.id AND a.dedup_key = 'offline' AND a.resolved_at IS NULL) \
                     ORDER BY i.id",
                )
                .bind(cutoff)
                .fetch_all(&mut *tx)
                .await?;
                let mut opened = 0;
                for row in rows {
                    let last_seen: i64 = row.try_get("last_seen_at")?;
                    let instance_id: String = row.try_get("instance_id")?;
                    let alert = $crate::store::batch::PendingAlert {
                        installation_id: row.try_get("id")?,
                        instance_id: &instance_id,
                        spec: $crate::alerts::offline_spec(last_seen, now),
                        created_at: now,
                        resolved_at: None,
                    };
                    if Self::insert_alert(&mut tx, &alert, forward).await? {
                        opened += 1;
                    }
                }
                tx.commit().await?;
                Ok(opened)
            }

            async fn outbox_claim(
                &self,
                now: i64,
                lease_until: i64,
                limit: i64,
            ) -> $crate::Result<Vec<$crate::store::OutboxItem>> {
                // On PostgreSQL a concurrent claim skips the rows this one has locked and
                // takes the next due ones; the outer `next_attempt_at <= $1` re-checks each
                // row against a lease taken meanwhile. SQLite runs one writer at a time.
                let mut claimed = sqlx::query_as::<_, $crate::store::OutboxItem>(concat!(
                    "UPDATE webhook_outbox SET next_attempt_at = $2 \
                     WHERE id IN (SELECT id FROM webhook_outbox \
                       WHERE delivered_at IS NULL AND failed_at IS NULL AND next_attempt_at <= $1 \
                       ORDER BY next_attempt_at, id LIMIT $3",
                    $skip_locked,
                    ") AND next_attempt_at <= $1 \
                     RETURNING id, alert_id, created_at, payload, attempts",
                ))
                .bind(now)
                .bind(lease_until)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
                // RETURNING has no order; alerts go out in the order they were raised.
                claimed.sort_unstable_by_key(|item| item.id);
                Ok(claimed)
            }

            async fn outbox_delivered(&self, id: i64, now: i64) -> $crate::Result<()> {
                sqlx::query(
                    "UPDATE webhook_outbox SET delivered_at = $1, attempts = attempts + 1 WHERE id = $2",
                )
                .bind(now)
                .bind(id)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn outbox_failed(
                &self,
                id: i64,
                attempts: i64,
                next_attempt_at: Option<i64>,
                error: &str,
                now: i64,
            ) -> $crate::Result<()> {
                sqlx::query(
                    "UPDATE webhook_outbox SET attempts = $1, next_attempt_at = COALESCE($2, next_attempt_at), \
                     failed_at = CASE WHEN $2 IS NULL THEN $3 ELSE NULL END, last_error = $4 WHERE id = $5",
                )
                .bind(attempts)
                .bind(next_attempt_at)
                .bind(now)
                .bind(error)
                .bind(id)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn prune_messages(&self, before: i64) -> $crate::Result<u64> {
                sqlx::query("DELETE FROM auth_failures WHERE minute < $1")
                    .bind(before)
                    .execute(&self.pool)
                    .await?;
                Ok(sqlx::query("DELETE FROM seen_messages WHERE seen_at < $1")
                    .bind(before)
                    .execute(&self.pool)
                    .await?
                    .rows_affected())
            }

            async fn count_auth_failures(
                &self,
                minute: i64,
                failures: &[(String, u64)],
            ) -> $crate::Result<()> {
                let mut tx = self.pool.begin().await?;
                for (client, count) in failures {
                    let count = i64::try_from(*count).unwrap_or(i64::MAX);
                    sqlx::query(
                        "INSERT INTO auth_failures (client, minute, failures) VALUES ($1, $2, $3) \
                         ON CONFLICT (client, minute) \
                         DO UPDATE SET failures = auth_failures.failures + excluded.failures",
                    )
                    .bind(client)
                    .bind(minute)
                    .bind(count)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn clients_over_auth_limit(
                &self,
                minute: i64,
                limit: u64,
                max: usize,
            ) -> $crate::Result<Vec<String>> {
                Ok(sqlx::query_scalar(
                    "SELECT client FROM auth_failures WHERE minute = $1 AND failures >= $2 \
                     ORDER BY client LIMIT $3",
                )
                .bind(minute)
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .bind(i64::try_from(max).unwrap_or(i64::MAX))
                .fetch_all(&self.pool)
                .await?)
            }

            async fn prune_heartbeats(&self, before: i64) -> $crate::Result<u64> {
                // Rows come in id order as they were received, so only the oldest ids are
                // looked at (a primary-key range, however big the table).
                self.delete_oldest(
                    "DELETE FROM heartbeats WHERE id IN \
                     (SELECT id FROM heartbeats ORDER BY id LIMIT $1) AND received_at < $2",
                    before,
                )
                .await
            }

            async fn prune_records(&self, before: i64) -> $crate::Result<u64> {
                let failures = self
                    .delete_oldest(
                        "DELETE FROM job_failures WHERE id IN \
                         (SELECT id FROM job_failures ORDER BY id LIMIT $1) AND created_at < $2",
                        before,
                    )
                    .await?;
                // Only deliveries that are over: a pending one stays however old it is.
                let deliveries = self
                    .delete_oldest(
                        "DELETE FROM webhook_outbox WHERE id IN \
                         (SELECT id FROM webhook_outbox \
                          WHERE delivered_at IS NOT NULL OR failed_at IS NOT NULL \
                          ORDER BY id LIMIT $1) \
                         AND COALESCE(delivered_at, failed_at) < $2",
                        before,
                    )
                    .await?;
                // Alerts resolved before the cutoff, after their deliveries (above): one
                // whose delivery is still pending stays until it is delivered or given up.
                let alerts = self
                    .delete_oldest(
                        "DELETE FROM alerts WHERE id IN \
                         (SELECT id FROM alerts WHERE resolved_at < $2 ORDER BY id LIMIT $1) \
                         AND id NOT IN (SELECT alert_id FROM webhook_outbox \
                          WHERE delivered_at IS NULL AND failed_at IS NULL)",
                        before,
                    )
                    .await?;
                Ok(failures + deliveries + alerts)
            }

            async fn heartbeat_count(&self) -> $crate::Result<i64> {
                Ok(sqlx::query_scalar("SELECT COUNT(*) FROM heartbeats")
                    .fetch_one(&self.pool)
                    .await?)
            }

            async fn last_heard(&self) -> $crate::Result<Option<i64>> {
                Ok(sqlx::query_scalar("SELECT MAX(last_seen_at) FROM installations")
                    .fetch_one(&self.pool)
                    .await?)
            }

            async fn ping(&self) -> $crate::Result<()> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }

            async fn create_session(
                &self,
                session: &$crate::store::DashboardSession,
            ) -> $crate::Result<()> {
                sqlx::query(
                    "INSERT INTO dashboard_sessions \
                     (id_hash, role, token_fingerprint, created_at, expires_at) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(&session.id_hash)
                .bind(&session.role)
                .bind(&session.token_fingerprint)
                .bind(session.created_at)
                .bind(session.expires_at)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn session(
                &self,
                id_hash: &str,
                now: i64,
            ) -> $crate::Result<Option<$crate::store::DashboardSession>> {
                Ok(sqlx::query_as::<_, $crate::store::DashboardSession>(
                    "SELECT id_hash, role, token_fingerprint, created_at, expires_at \
                     FROM dashboard_sessions WHERE id_hash = $1 AND expires_at > $2",
                )
                .bind(id_hash)
                .bind(now)
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn delete_session(&self, id_hash: &str) -> $crate::Result<()> {
                sqlx::query("DELETE FROM dashboard_sessions WHERE id_hash = $1")
                    .bind(id_hash)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn prune_sessions(&self, now: i64) -> $crate::Result<u64> {
                Ok(sqlx::query("DELETE FROM dashboard_sessions WHERE expires_at <= $1")
                    .bind(now)
                    .execute(&self.pool)
                    .await?
                    .rows_affected())
            }

            fn write_concurrency(&self) -> usize {
                self.concurrency()
            }
        }

        impl $store {
            /// Inserts one alert (skipped if the same key is already open, e.g. raised by
            /// another replica) and its outbox row; returns whether it was inserted.
            pub(crate) async fn insert_alert(
                tx: &mut sqlx::Transaction<'static, $db>,
                alert: &$crate::store::batch::PendingAlert<'_>,
                forward: bool,
            ) -> $crate::Result<bool> {
                let id: Option<i64> = sqlx::query_scalar(
                    "INSERT INTO alerts (installation_id, level, kind, dedup_key, message, created_at, resolved_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING RETURNING id",
                )
                .bind(alert.installation_id)
                .bind(alert.spec.level.as_str())
                .bind(alert.spec.kind)
                .bind(alert.spec.key.clone())
                .bind(alert.spec.message.clone())
                .bind(alert.created_at)
                .bind(alert.resolved_at)
                .fetch_optional(&mut **tx)
                .await?;
                let Some(id) = id else { return Ok(false) };
                if forward && alert.spec.forwarded() {
                    let payload = $crate::alerts::webhook_payload(
                        id,
                        alert.installation_id,
                        alert.instance_id,
                        &alert.spec,
                        alert.created_at,
                    );
                    sqlx::query(
                        "INSERT INTO webhook_outbox (alert_id, payload, attempts, next_attempt_at, created_at) \
                         VALUES ($1, $2, 0, $3, $3)",
                    )
                    .bind(id)
                    .bind(payload)
                    .bind(alert.created_at)
                    .execute(&mut **tx)
                    .await?;
                }
                Ok(true)
            }
        }

        impl $store {
            /// Runs `statement` (`$1`: a chunk size, `$2`: the cutoff), which deletes the
            /// oldest rows of one chunk that are older than the cutoff, until a chunk comes
            /// back short. At most a bounded number go per call, so one sweep never holds the
            /// write lock for long; the next sweep continues.
            async fn delete_oldest(
                &self,
                statement: &'static str,
                before: i64,
            ) -> $crate::Result<u64> {
                const CHUNK: i64 = 5_000;
                const CHUNKS_PER_CALL: usize = 20;
                let mut deleted = 0;
                for _ in 0..CHUNKS_PER_CALL {
                    let chunk = sqlx::query(statement)
                        .bind(CHUNK)
                        .bind(before)
                        .execute(&self.pool)
                        .await?
                        .rows_affected();
                    deleted += chunk;
                    if chunk < CHUNK as u64 {
                        break;
                    }
                }
                Ok(deleted)
            }
        }
    };
}
