//! The SQL of [`RestoreStore`](super::rollouts::RestoreStore) shared by both backends,
//! expanded once per database by `impl_restore_store!`.

/// A restore row's columns, in `Restore` order.
macro_rules! restore_cols {
    () => {
        "id, installation_id, instance_id, environment, backup_id, status, error, duration_ms, \
         output_tail, created_at, started_at, finished_at"
    };
}

/// Implements [`RestoreStore`](super::rollouts::RestoreStore) for `$store` (with
/// `pool: Pool<_>` and the `raise_alert` of `impl_rollout_store!`); `$begin` opens a write
/// transaction and `$lock` is the row-lock suffix of a `SELECT` (`" FOR UPDATE"` or
/// nothing).
macro_rules! impl_restore_store {
    ($store:ty, $begin:expr, $lock:literal) => {
        #[async_trait::async_trait]
        impl $crate::store::rollouts::RestoreStore for $store {
            async fn schedule_restores(
                &self,
                count: i64,
                environment: &str,
                now: i64,
            ) -> $crate::Result<Vec<$crate::store::rollouts::Restore>> {
                let mut tx = self.pool.begin_with($begin).await?;
                let picked: Vec<(i64, String, Option<String>)> = sqlx::query_as(
                    "SELECT i.id, i.instance_id, (SELECT b.backup_id FROM backups b \
                     WHERE b.installation_id = i.id ORDER BY b.id DESC LIMIT 1) \
                     FROM installations i WHERE i.last_seen_at IS NOT NULL \
                     AND NOT EXISTS (SELECT 1 FROM restores r WHERE r.installation_id = i.id \
                     AND r.environment = $1 AND ((r.status = 'verified' AND r.finished_at >= $2) \
                     OR r.status IN ('scheduled', 'in_progress'))) \
                     ORDER BY i.last_seen_at DESC, i.id LIMIT $3",
                )
                .bind(environment)
                .bind(now - 7 * 86_400)
                .bind(count)
                .fetch_all(&mut *tx)
                .await?;
                let mut out = Vec::with_capacity(picked.len());
                for (installation_id, instance_id, backup_id) in picked {
                    out.push(
                        sqlx::query_as::<_, $crate::store::rollouts::Restore>(concat!(
                            "INSERT INTO restores (installation_id, instance_id, environment, backup_id, \
                             status, created_at) VALUES ($1, $2, $3, $4, 'scheduled', $5) RETURNING ",
                            restore_cols!()
                        ))
                        .bind(installation_id)
                        .bind(instance_id)
                        .bind(environment)
                        .bind(backup_id)
                        .bind(now)
                        .fetch_one(&mut *tx)
                        .await?,
                    );
                }
                tx.commit().await?;
                Ok(out)
            }

            async fn next_restore(
                &self,
                instance_id: &str,
                now: i64,
            ) -> $crate::Result<Option<$crate::store::rollouts::Restore>> {
                let mut tx = self.pool.begin_with($begin).await?;
                let found: Option<i64> = sqlx::query_scalar(
                    "SELECT id FROM restores WHERE instance_id = $1 AND status = 'scheduled' ORDER BY id LIMIT 1",
                )
                .bind(instance_id)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(id) = found else { return Ok(None) };
                let restore = sqlx::query_as::<_, $crate::store::rollouts::Restore>(concat!(
                    "UPDATE restores SET status = 'in_progress', started_at = $1 WHERE id = $2 RETURNING ",
                    restore_cols!()
                ))
                .bind(now)
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(Some(restore))
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
                if matches!(current.status.as_str(), "verified" | "failed" | "skipped") {
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
                    let detail = report.error.as_deref().unwrap_or("no detail");
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

            async fn list_restores(
                &self,
                limit: i64,
            ) -> $crate::Result<Vec<$crate::store::rollouts::Restore>> {
                Ok(sqlx::query_as::<_, $crate::store::rollouts::Restore>(concat!(
                    "SELECT ",
                    restore_cols!(),
                    " FROM restores ORDER BY id DESC LIMIT $1"
                ))
                .bind(limit)
                .fetch_all(&self.pool)
                .await?)
            }
        }
    };
}
