//! The SQL of [`RestoreStore`](super::rollouts::RestoreStore) shared by both backends,
//! expanded once per database by `impl_restore_store!`.

/// A restore row's columns, in `Restore` order.
macro_rules! restore_cols {
    () => {
        "id, installation_id, instance_id, environment, backup_id, status, error, duration_ms, \
         output_tail, created_at, started_at, finished_at"
    };
}

/// Why installation `i` is not scheduled in environment `$1` (verified since `$2` counts as
/// recent), or `due`: the first reason of [`NotScheduled`](super::rollouts::NotScheduled)
/// that applies. Restores are matched by instance id, which their index leads with.
macro_rules! restore_class {
    () => {
        "CASE WHEN i.last_seen_at IS NULL THEN 'never_reported' \
         WHEN EXISTS (SELECT 1 FROM restores r WHERE r.instance_id = i.instance_id \
         AND r.status IN ('scheduled', 'in_progress') AND r.environment = $1) THEN 'open' \
         WHEN EXISTS (SELECT 1 FROM restores r WHERE r.instance_id = i.instance_id \
         AND r.status = 'verified' AND r.environment = $1 AND r.finished_at >= $2) \
         THEN 'verified_recently' \
         WHEN NOT EXISTS (SELECT 1 FROM backups b WHERE b.installation_id = i.id \
         AND b.backup_id IS NOT NULL AND b.backup_id <> '') THEN 'no_backup' \
         ELSE 'due' END"
    };
}

/// The verifications with no news by `$1`: scheduled before it and never taken, or handed
/// out before it and never reported.
macro_rules! stale_restores {
    () => {
        "((status = 'scheduled' AND created_at < $1) \
         OR (status = 'in_progress' AND started_at < $1))"
    };
}

/// Implements [`RestoreStore`](super::rollouts::RestoreStore) for `$store` (with
/// `pool: Pool<_>`, `jobs: JobAnnouncer` and the `raise_alert` of `impl_rollout_store!`);
/// `$begin` opens a write transaction and `$lock` is the row-lock suffix of a `SELECT`
/// (`" FOR UPDATE"` or nothing).
macro_rules! impl_restore_store {
    ($store:ty, $begin:expr, $lock:literal) => {
        #[async_trait::async_trait]
        impl $crate::store::rollouts::RestoreStore for $store {
            async fn schedule_restores(
                &self,
                count: i64,
                environment: &str,
                now: i64,
            ) -> $crate::Result<$crate::store::rollouts::RestoreSchedule> {
                let recent = now - $crate::restores::RECENT_VERIFICATION_SECS;
                let mut tx = self.pool.begin_with($begin).await?;
                // Archived installations are never scheduled, only counted.
                let classes: Vec<(String, i64)> = sqlx::query_as(concat!(
                    "SELECT class, COUNT(*) FROM (SELECT CASE WHEN i.archived_at IS NOT NULL \
                     THEN 'archived' ELSE ",
                    restore_class!(),
                    " END AS class FROM installations i) c GROUP BY class"
                ))
                .bind(environment)
                .bind(recent)
                .fetch_all(&mut *tx)
                .await?;
                // The freshest installations of a class, with their latest backup's id.
                let candidates = concat!(
                    "SELECT id, instance_id, backup_id FROM (SELECT i.id, i.instance_id, \
                     i.last_seen_at, (SELECT b.backup_id FROM backups b \
                     WHERE b.installation_id = i.id AND b.backup_id IS NOT NULL \
                     AND b.backup_id <> '' ORDER BY b.id DESC LIMIT 1) AS backup_id, ",
                    restore_class!(),
                    " AS class FROM installations i WHERE i.archived_at IS NULL) c WHERE class = $3 \
                     AND NOT EXISTS (SELECT 1 FROM restores r WHERE r.instance_id = c.instance_id \
                     AND r.environment = $1 AND r.status = 'skipped' AND r.started_at IS NULL \
                     AND $3 = 'no_backup') \
                     ORDER BY last_seen_at DESC, id LIMIT $4"
                );
                let mut items = Vec::new();
                // A verification with no backup id would run the verify command on nothing
                // and could pass: those installations get a `skipped` record instead, once
                // per environment (the control plane's own are the skipped ones never
                // handed out), so an operator sees why on the installation.
                for (class, status, error) in [
                    ("due", "scheduled", None),
                    ("no_backup", "skipped", Some($crate::restores::NO_BACKUP)),
                ] {
                    let picked: Vec<(i64, String, Option<String>)> = sqlx::query_as(candidates)
                        .bind(environment)
                        .bind(recent)
                        .bind(class)
                        .bind(count)
                        .fetch_all(&mut *tx)
                        .await?;
                    let finished_at = error.map(|_| now);
                    for (installation_id, instance_id, backup_id) in picked {
                        items.push(
                            sqlx::query_as::<_, $crate::store::rollouts::Restore>(concat!(
                                "INSERT INTO restores (installation_id, instance_id, environment, \
                                 backup_id, status, error, created_at, finished_at) \
                                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING ",
                                restore_cols!()
                            ))
                            .bind(installation_id)
                            .bind(instance_id)
                            .bind(environment)
                            .bind(backup_id)
                            .bind(status)
                            .bind(error)
                            .bind(now)
                            .bind(finished_at)
                            .fetch_one(&mut *tx)
                            .await?,
                        );
                    }
                }
                tx.commit().await?;
                self.jobs.announce(
                    fleet_core::command::Pipeline::Restore,
                    items
                        .iter()
                        .filter(|r| r.status == "scheduled")
                        .map(|r| r.instance_id.clone())
                        .collect(),
                );
                let scheduled = items.iter().filter(|r| r.status == "scheduled").count() as i64;
                let mut not_scheduled = $crate::store::rollouts::NotScheduled::default();
                for (class, n) in classes {
                    match class.as_str() {
                        "never_reported" => not_scheduled.never_reported = n,
                        "open" => not_scheduled.open = n,
                        "verified_recently" => not_scheduled.verified_recently = n,
                        "no_backup" => not_scheduled.no_backup = n,
                        "archived" => not_scheduled.archived = n,
                        _ => not_scheduled.beyond_count = n - scheduled,
                    }
                }
                Ok($crate::store::rollouts::RestoreSchedule {
                    items,
                    not_scheduled,
                })
            }

            async fn next_restore(
                &self,
                instance_id: &str,
                now: i64,
            ) -> $crate::Result<Option<$crate::store::rollouts::Restore>> {
                let mut tx = self.pool.begin_with($begin).await?;
                // Scheduled before backups were required: handing them out would verify
                // nothing and could pass.
                sqlx::query(
                    "UPDATE restores SET status = 'skipped', error = $1, finished_at = $2 \
                     WHERE instance_id = $3 AND status = 'scheduled' \
                     AND (backup_id IS NULL OR backup_id = '')",
                )
                .bind($crate::restores::NO_BACKUP)
                .bind(now)
                .bind(instance_id)
                .execute(&mut *tx)
                .await?;
                let found: Option<i64> = sqlx::query_scalar(
                    "SELECT id FROM restores WHERE instance_id = $1 AND status = 'scheduled' ORDER BY id LIMIT 1",
                )
                .bind(instance_id)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(id) = found else {
                    tx.commit().await?;
                    return Ok(None);
                };
                // Still scheduled: on PostgreSQL an operator may have cancelled it since the
                // SELECT, and a cancelled verification is never handed out.
                let restore = sqlx::query_as::<_, $crate::store::rollouts::Restore>(concat!(
                    "UPDATE restores SET status = 'in_progress', started_at = $1 \
                     WHERE id = $2 AND status = 'scheduled' RETURNING ",
                    restore_cols!()
                ))
                .bind(now)
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(restore)
            }

            async fn report_restore(
                &self,
                report: &fleet_core::restore::RestoreReport,
                now: i64,
                forward: bool,
            ) -> $crate::Result<$crate::store::rollouts::Restore> {
                let id: i64 = report.restore_id.parse().map_err(|_| $crate::Error::NotFound)?;
                let mut tx = self.pool.begin_with($begin).await?;
                let current = sqlx::query_as::<_, $crate::store::rollouts::Restore>(concat!(
                    "SELECT ",
                    restore_cols!(),
                    " FROM restores WHERE id = $1",
                    $lock
                ))
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?
                .filter(|r| r.instance_id == report.instance_id)
                .ok_or($crate::Error::NotFound)?;
                let status = report.status.as_str();
                if current.status == $crate::restores::CANCELLED {
                    return Err($crate::Error::Conflict(format!(
                        "restore verification {id} was cancelled by an operator: its result is not recorded"
                    )));
                }
                if matches!(
                    current.status.as_str(),
                    "verified" | "failed" | "skipped" | $crate::restores::TIMED_OUT
                ) {
                    if current.status == status {
                        return Ok(current);
                    }
                    return Err($crate::Error::Conflict(format!("the restore already ended {}", current.status)));
                }
                let restore = sqlx::query_as::<_, $crate::store::rollouts::Restore>(concat!(
                    "UPDATE restores SET status = $1, error = $2, duration_ms = $3, output_tail = $4, \
                     finished_at = $5, started_at = COALESCE(started_at, $5) WHERE id = $6 RETURNING ",
                    restore_cols!()
                ))
                .bind(status)
                .bind(report.error.clone())
                .bind(report.duration_ms.map(|d| d.min(i64::MAX as u64) as i64))
                .bind(report.output_tail.clone())
                .bind(now)
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
                if report.status == fleet_core::restore::RestoreStatus::Failed {
                    let detail = $crate::restores::failure_detail(&restore)
                        .unwrap_or_else(|| "no detail".into());
                    Self::raise_alert(
                        &mut tx,
                        &report.instance_id,
                        $crate::alerts::kind::RESTORE_FAILED,
                        format!("restore:{id}"),
                        format!(
                            "restore verification {id} failed in {}: {detail}",
                            restore.environment
                        ),
                        now,
                        forward,
                    )
                    .await?;
                }
                tx.commit().await?;
                Ok(restore)
            }

            async fn cancel_restore(
                &self,
                id: i64,
                error: &str,
                now: i64,
            ) -> $crate::Result<$crate::store::rollouts::Restore> {
                let mut tx = self.pool.begin_with($begin).await?;
                let current = sqlx::query_as::<_, $crate::store::rollouts::Restore>(concat!(
                    "SELECT ",
                    restore_cols!(),
                    " FROM restores WHERE id = $1",
                    $lock
                ))
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or($crate::Error::NotFound)?;
                if !matches!(current.status.as_str(), "scheduled" | "in_progress") {
                    return Err($crate::Error::Conflict(format!(
                        "restore verification {id} already ended {}: only a scheduled or handed-out one can be cancelled",
                        current.status
                    )));
                }
                let restore = sqlx::query_as::<_, $crate::store::rollouts::Restore>(concat!(
                    "UPDATE restores SET status = $1, error = $2, finished_at = $3 WHERE id = $4 RETURNING ",
                    restore_cols!()
                ))
                .bind($crate::restores::CANCELLED)
                .bind(error)
                .bind(now)
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(restore)
            }

            async fn instance_restore(
                &self,
                instance_id: &str,
                id: i64,
            ) -> $crate::Result<Option<$crate::store::rollouts::Restore>> {
                // By the primary key; the instance is matched so another's stays unseen.
                Ok(sqlx::query_as::<_, $crate::store::rollouts::Restore>(concat!(
                    "SELECT ",
                    restore_cols!(),
                    " FROM restores WHERE id = $1 AND instance_id = $2"
                ))
                .bind(id)
                .bind(instance_id)
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn list_restores(
                &self,
                instance_id: Option<&str>,
                limit: i64,
            ) -> $crate::Result<Vec<$crate::store::rollouts::Restore>> {
                // Two statements rather than `$1 IS NULL OR …`, which a generic plan could
                // only answer with a scan of every restore.
                let query = match instance_id {
                    Some(instance_id) => sqlx::query_as::<_, $crate::store::rollouts::Restore>(
                        concat!(
                            "SELECT ",
                            restore_cols!(),
                            " FROM restores WHERE instance_id = $1 ORDER BY id DESC LIMIT $2"
                        ),
                    )
                    .bind(instance_id),
                    None => sqlx::query_as::<_, $crate::store::rollouts::Restore>(concat!(
                        "SELECT ",
                        restore_cols!(),
                        " FROM restores ORDER BY id DESC LIMIT $1"
                    )),
                };
                Ok(query.bind(limit).fetch_all(&self.pool).await?)
            }

            async fn time_out_restores(
                &self,
                timeout_secs: i64,
                now: i64,
                forward: bool,
            ) -> $crate::Result<u64> {
                let cutoff = now.saturating_sub(timeout_secs);
                // Looked for outside a write transaction first: the sweep runs every 30 s
                // by default and almost always finds nothing, and on SQLite a write
                // transaction would hold back the heartbeat writer meanwhile.
                let any: Option<i64> = sqlx::query_scalar(concat!(
                    "SELECT id FROM restores WHERE ",
                    stale_restores!(),
                    " LIMIT 1"
                ))
                .bind(cutoff)
                .fetch_optional(&self.pool)
                .await?;
                if any.is_none() {
                    return Ok(0);
                }
                let mut tx = self.pool.begin_with($begin).await?;
                let stale = sqlx::query_as::<_, $crate::store::rollouts::Restore>(concat!(
                    "SELECT ",
                    restore_cols!(),
                    " FROM restores WHERE ",
                    stale_restores!(),
                    " ORDER BY id LIMIT $2",
                    $lock
                ))
                .bind(cutoff)
                .bind($crate::restores::TIMEOUTS_PER_SWEEP)
                .fetch_all(&mut *tx)
                .await?;
                let timed_out = stale.len() as u64;
                for restore in stale {
                    let reason = $crate::restores::timeout_reason(&restore.status, timeout_secs);
                    sqlx::query(
                        "UPDATE restores SET status = $1, error = $2, finished_at = $3 WHERE id = $4",
                    )
                    .bind($crate::restores::TIMED_OUT)
                    .bind(&reason)
                    .bind(now)
                    .bind(restore.id)
                    .execute(&mut *tx)
                    .await?;
                    Self::raise_alert(
                        &mut tx,
                        &restore.instance_id,
                        $crate::alerts::kind::RESTORE_FAILED,
                        format!("restore:{}", restore.id),
                        format!(
                            "restore verification {} timed out in {}: {reason}",
                            restore.id, restore.environment
                        ),
                        now,
                        forward,
                    )
                    .await?;
                }
                tx.commit().await?;
                Ok(timed_out)
            }
        }
    };
}
