//! The SQL of [`PluginStore`](super::rollouts::PluginStore) shared by both backends,
//! expanded once per database by `impl_plugin_store!`.

/// A plugin request row's columns, in `PluginRequestRecord` order.
macro_rules! plugin_request_cols {
    () => {
        "id, instance_id, name, version, action, reason, status, job_id, created_at, decided_at, \
         rejection_reason"
    };
}

/// How many times recording a plugin request looks for the pending copy it conflicted with
/// before giving up: the copy is gone only when it was decided between the two statements,
/// and the next attempt then records the request.
pub(crate) const PENDING_LOOKUPS: usize = 3;

/// Implements [`PluginStore`](super::rollouts::PluginStore) for `$store` (with
/// `pool: Pool<_>` and `jobs: JobAnnouncer`); `$begin` opens a write transaction and
/// `$lock` is the row-lock suffix of a `SELECT` (`" FOR UPDATE"` or nothing).
macro_rules! impl_plugin_store {
    ($store:ty, $begin:expr, $lock:literal) => {
        #[async_trait::async_trait]
        impl $crate::store::rollouts::PluginStore for $store {
            async fn create_plugin_release(
                &self,
                name: &str,
                version: &str,
                compatible: &[String],
                notes: Option<&str>,
                now: i64,
            ) -> $crate::Result<$crate::store::rollouts::PluginRelease> {
                let inserted = sqlx::query_as::<_, $crate::store::rollouts::PluginRelease>(
                    "INSERT INTO plugin_releases (name, version, compatible, approved, notes, created_at) \
                     VALUES ($1, $2, $3, TRUE, $4, $5) \
                     RETURNING id, name, version, compatible, approved, notes, created_at",
                )
                .bind(name)
                .bind(version)
                .bind(serde_json::to_string(compatible).unwrap_or_else(|_| "[]".into()))
                .bind(notes)
                .bind(now)
                .fetch_one(&self.pool)
                .await;
                match inserted {
                    Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(
                        $crate::Error::Conflict(format!("plugin {name} {version} already exists")),
                    ),
                    other => Ok(other?),
                }
            }

            async fn list_plugin_releases(
                &self,
                limit: i64,
            ) -> $crate::Result<Vec<$crate::store::rollouts::PluginRelease>> {
                Ok(sqlx::query_as::<_, $crate::store::rollouts::PluginRelease>(
                    "SELECT id, name, version, compatible, approved, notes, created_at \
                     FROM plugin_releases ORDER BY id DESC LIMIT $1",
                )
                .bind(limit)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn create_plugin_request(
                &self,
                request: &fleet_core::plugin::PluginRequest,
                now: i64,
            ) -> $crate::Result<$crate::store::rollouts::RecordedPluginRequest> {
                use $crate::store::rollouts::{PluginRequestRecord, RecordedPluginRequest};
                // The unique index on pending requests (`plugin_requests_one_pending`) turns a
                // copy into a conflict, even one that arrives while the first is being
                // recorded; the copy is then answered with the pending request.
                for _ in 0..$crate::store::plugins_sql::PENDING_LOOKUPS {
                    let inserted = sqlx::query_as::<_, PluginRequestRecord>(concat!(
                        "INSERT INTO plugin_requests (instance_id, name, version, action, reason, status, created_at) \
                         VALUES ($1, $2, $3, $4, $5, 'pending', $6) \
                         ON CONFLICT (instance_id, name, version, action) WHERE status = 'pending' \
                         DO NOTHING RETURNING ",
                        plugin_request_cols!()
                    ))
                    .bind(&request.instance_id)
                    .bind(&request.name)
                    .bind(&request.version)
                    .bind(request.action.as_str())
                    .bind(request.reason.clone())
                    .bind(now)
                    .fetch_optional(&self.pool)
                    .await?;
                    if let Some(record) = inserted {
                        return Ok(RecordedPluginRequest::Created(record));
                    }
                    let pending = sqlx::query_as::<_, PluginRequestRecord>(concat!(
                        "SELECT ",
                        plugin_request_cols!(),
                        " FROM plugin_requests WHERE instance_id = $1 AND name = $2 \
                         AND version = $3 AND action = $4 AND status = 'pending'"
                    ))
                    .bind(&request.instance_id)
                    .bind(&request.name)
                    .bind(&request.version)
                    .bind(request.action.as_str())
                    .fetch_optional(&self.pool)
                    .await?;
                    if let Some(record) = pending {
                        return Ok(RecordedPluginRequest::AlreadyPending(record));
                    }
                }
                Err($crate::Error::Internal(format!(
                    "plugin request of {} for {} {}: a pending copy kept being decided while it \
                     was recorded",
                    request.instance_id, request.name, request.version
                )))
            }

            async fn list_plugin_requests(
                &self,
                limit: i64,
            ) -> $crate::Result<Vec<$crate::store::rollouts::PluginRequestRecord>> {
                Ok(sqlx::query_as::<_, $crate::store::rollouts::PluginRequestRecord>(
                    "SELECT r.id, r.instance_id, r.name, r.version, r.action, r.reason, r.status, \
                     r.job_id, r.created_at, r.decided_at, r.rejection_reason, j.status AS job_status, \
                     j.step AS job_step, j.error AS job_error \
                     FROM plugin_requests r LEFT JOIN rollout_jobs j ON j.id = r.job_id \
                     ORDER BY r.id DESC LIMIT $1",
                )
                .bind(limit)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn approve_plugin_request(
                &self,
                id: i64,
                control_plane_version: &str,
                now: i64,
            ) -> $crate::Result<$crate::store::rollouts::PluginRequestRecord> {
                let mut tx = self.pool.begin_with($begin).await?;
                let request = sqlx::query_as::<_, $crate::store::rollouts::PluginRequestRecord>(concat!(
                    "SELECT ",
                    plugin_request_cols!(),
                    " FROM plugin_requests WHERE id = $1",
                    $lock
                ))
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or($crate::Error::NotFound)?;
                if request.status != "pending" {
                    return Err($crate::Error::Conflict(format!("the request is already {}", request.status)));
                }
                let release: Option<(String, bool)> = sqlx::query_as(
                    "SELECT compatible, approved FROM plugin_releases WHERE name = $1 AND version = $2",
                )
                .bind(&request.name)
                .bind(&request.version)
                .fetch_optional(&mut *tx)
                .await?;
                let Some((compatible, true)) = release else {
                    return Err($crate::Error::Conflict(format!(
                        "no approved release of {} {}",
                        request.name, request.version
                    )));
                };
                let patterns: Vec<String> = serde_json::from_str(&compatible).unwrap_or_default();
                if !$crate::store::rollouts::is_compatible(&patterns, control_plane_version) {
                    return Err($crate::Error::Conflict(format!(
                        "{} {} is not compatible with control plane {control_plane_version}",
                        request.name, request.version
                    )));
                }
                let action = match request.action.as_str() {
                    "update" => fleet_core::plugin::PluginAction::Update,
                    "remove" => fleet_core::plugin::PluginAction::Remove,
                    _ => fleet_core::plugin::PluginAction::Install,
                };
                let spec = fleet_core::plugin::PluginSpec {
                    name: request.name.clone(),
                    version: request.version.clone(),
                    action,
                };
                let job_id: i64 = sqlx::query_scalar(
                    "INSERT INTO rollout_jobs (rollout_id, payload, kind, batch, instance_id, status, \
                     created_at, updated_at) VALUES (NULL, $1, 'plugin', 0, $2, 'pending', $3, $3) RETURNING id",
                )
                .bind(serde_json::to_string(&spec).unwrap_or_default())
                .bind(&request.instance_id)
                .bind(now)
                .fetch_one(&mut *tx)
                .await?;
                let record = sqlx::query_as::<_, $crate::store::rollouts::PluginRequestRecord>(concat!(
                    "UPDATE plugin_requests SET status = 'approved', job_id = $1, decided_at = $2 \
                     WHERE id = $3 RETURNING ",
                    plugin_request_cols!()
                ))
                .bind(job_id)
                .bind(now)
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
                tx.commit().await?;
                self.jobs.announce(
                    fleet_core::command::Pipeline::Plugin,
                    vec![record.instance_id.clone()],
                );
                Ok($crate::store::rollouts::PluginRequestRecord {
                    job_status: Some($crate::rollouts::job_status::PENDING.into()),
                    ..record
                })
            }

            async fn reject_plugin_request(
                &self,
                id: i64,
                reason: Option<&str>,
                now: i64,
            ) -> $crate::Result<$crate::store::rollouts::PluginRequestRecord> {
                let mut tx = self.pool.begin_with($begin).await?;
                let request = sqlx::query_as::<_, $crate::store::rollouts::PluginRequestRecord>(concat!(
                    "SELECT ",
                    plugin_request_cols!(),
                    " FROM plugin_requests WHERE id = $1",
                    $lock
                ))
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or($crate::Error::NotFound)?;
                match (request.status.as_str(), request.job_id) {
                    ("pending", _) => {}
                    ("approved", Some(job_id)) => {
                        return Err($crate::Error::Conflict(format!(
                            "request {id} was already approved (job {job_id}) and can no longer be rejected"
                        )));
                    }
                    (status, _) => {
                        return Err($crate::Error::Conflict(format!(
                            "request {id} is already {status}"
                        )));
                    }
                }
                let record = sqlx::query_as::<_, $crate::store::rollouts::PluginRequestRecord>(concat!(
                    "UPDATE plugin_requests SET status = 'rejected', rejection_reason = $1, \
                     decided_at = $2 WHERE id = $3 RETURNING ",
                    plugin_request_cols!()
                ))
                .bind(reason)
                .bind(now)
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(record)
            }
        }
    };
}
