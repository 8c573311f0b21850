//! The SQL of [`RolloutStore`](super::rollouts::RolloutStore) shared by both backends,
//! expanded once per database by `impl_rollout_store!`, with the transaction helpers of
//! its rollouts (one of which, `raise_alert`, the restore store in `restores_sql` uses too).
//!
//! Every change that reads and then writes runs in one transaction; PostgreSQL also locks
//! the rollout row (`FOR UPDATE`), SQLite takes its write lock up front (`BEGIN IMMEDIATE`),
//! so two reports ending the same batch cannot both start the next one.

/// The job row's columns, in `RolloutJob` order.
macro_rules! job_cols {
    () => {
        "j.id, j.rollout_id, j.kind, j.batch, j.instance_id, j.status, j.step, j.error, \
         j.canary_percent, j.metrics, j.duration_ms, j.output_tail, j.payload, j.created_at, \
         j.updated_at, j.started_at, j.finished_at"
    };
}
macro_rules! rollout_cols {
    () => {
        "r.id, r.kind, r.release_id, (SELECT rel.version FROM releases rel WHERE rel.id = r.release_id) AS version, \
         r.plugin_release_id, r.plugin_action, r.channel, r.settings, r.failure_threshold, \
         r.auto_advance, r.observe_secs, r.status, r.current_batch, r.batch_count, r.halt_reason, \
         r.created_at, r.updated_at"
    };
}

/// Targets inserted per statement when a rollout is created.
pub(crate) const ROLLOUT_JOB_CHUNK: usize = 2000;

/// One JSON array parameter for a statement over `rows` (tuples become arrays).
pub(crate) fn json<T: serde::Serialize + ?Sized>(rows: &T) -> String {
    // Serializing plain tuples of strings and numbers cannot fail.
    serde_json::to_string(rows).unwrap_or_else(|_| "[]".to_owned())
}

/// SQLite: inserts a rollout's jobs from `$5` = `[[batch, instance_id], ...]`; batch 0 starts
/// `pending`, the others wait `queued`. `$1` rollout, `$2` payload, `$3` kind, `$4` now.
pub(crate) const SQLITE_INSERT_JOBS: &str = "INSERT INTO rollout_jobs (rollout_id, payload, kind, \
    batch, instance_id, status, created_at, updated_at) \
    SELECT $1, $2, $3, value ->> 0, value ->> 1, \
    CASE WHEN value ->> 0 = 0 THEN 'pending' ELSE 'queued' END, $4, $4 FROM json_each($5)";

/// PostgreSQL: the same with `json_array_elements`.
pub(crate) const POSTGRES_INSERT_JOBS: &str = "INSERT INTO rollout_jobs (rollout_id, payload, kind, \
    batch, instance_id, status, created_at, updated_at) \
    SELECT $1, $2, $3, (e ->> 0)::bigint, e ->> 1, \
    CASE WHEN (e ->> 0)::bigint = 0 THEN 'pending' ELSE 'queued' END, $4, $4 \
    FROM json_array_elements($5::json) AS e";

/// The pipelines (`kind` names) in which instance `$1` has a job to hand out: what
/// `next_job` and `next_restore` would find, through the indexes they use
/// (`rollout_jobs_next` on instance, kind and status; `restores_instance` on instance and
/// status), so a connect costs a few index probes however long the instance's history.
pub(crate) const WAITING_PIPELINES: &str = "SELECT j.kind FROM rollout_jobs j \
    LEFT JOIN rollouts r ON r.id = j.rollout_id \
    WHERE j.instance_id = $1 AND j.kind IN ('update', 'plugin') \
    AND j.status IN ('pending', 'in_progress') AND (j.status = 'pending' OR j.step = 'accepted') \
    AND (r.id IS NULL OR r.status = 'running') \
    UNION SELECT 'restore' WHERE EXISTS \
    (SELECT 1 FROM restores WHERE instance_id = $1 AND status = 'scheduled')";

/// Implements [`RolloutStore`] for `$store` (with `pool: Pool<$db>`, `jobs: JobAnnouncer`,
/// the `insert_alert` of `impl_sql_store!` and the `RECENT_HEARTBEATS` query
/// `impl_sql_store!` asks for); `$begin` opens a write transaction, `$lock` is the row-lock
/// suffix of a `SELECT` (`" FOR UPDATE"` or nothing) and `$insert_jobs` the backend's bulk
/// insert of a rollout's jobs.
macro_rules! impl_rollout_store {
    ($store:ty, $db:ty, $begin:expr, $lock:literal, $insert_jobs:expr) => {
        #[async_trait::async_trait]
        impl $crate::store::rollouts::RolloutStore for $store {
            async fn create_release(
                &self,
                version: &str,
                channel: &str,
                scheme: &str,
                manifest: &str,
                now: i64,
            ) -> $crate::Result<$crate::store::rollouts::Release> {
                let inserted = sqlx::query_as::<_, $crate::store::rollouts::Release>(
                    "INSERT INTO releases (version, channel, scheme, manifest, created_at) \
                     VALUES ($1, $2, $3, $4, $5) \
                     RETURNING id, version, channel, scheme, manifest, created_at",
                )
                .bind(version)
                .bind(channel)
                .bind(scheme)
                .bind(manifest)
                .bind(now)
                .fetch_one(&self.pool)
                .await;
                match inserted {
                    Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(
                        $crate::Error::Conflict(format!("release {version} already exists on channel {channel}")),
                    ),
                    other => Ok(other?),
                }
            }

            async fn list_releases(
                &self,
                limit: i64,
            ) -> $crate::Result<Vec<$crate::store::rollouts::Release>> {
                Ok(sqlx::query_as::<_, $crate::store::rollouts::Release>(
                    "SELECT id, version, channel, scheme, manifest, created_at FROM releases \
                     ORDER BY id DESC LIMIT $1",
                )
                .bind(limit)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn create_rollout(
                &self,
                new: &$crate::store::rollouts::NewRollout,
                now: i64,
            ) -> $crate::Result<$crate::store::rollouts::RolloutDetail> {
                use $crate::store::rollouts::JobKind;
                let mut tx = self.pool.begin_with($begin).await?;
                let invalid = |path: &str, text: &str| {
                    let mut errors = fleet_core::ValidationErrors::default();
                    errors.push(path, text);
                    $crate::Error::Invalid(errors)
                };
                let (release_id, target_version, payload) = match new.kind {
                    JobKind::Update => {
                        let found: Option<(i64, String)> = match (new.release_id, &new.version) {
                            (Some(id), _) => sqlx::query_as(
                                "SELECT id, version FROM releases WHERE id = $1",
                            )
                            .bind(id)
                            .fetch_optional(&mut *tx)
                            .await?,
                            (None, Some(version)) => sqlx::query_as(
                                "SELECT id, version FROM releases WHERE version = $1 AND channel = $2",
                            )
                            .bind(version)
                            .bind(&new.channel)
                            .fetch_optional(&mut *tx)
                            .await?,
                            (None, None) => None,
                        };
                        let (id, version) =
                            found.ok_or_else(|| invalid("release_id", "no such release"))?;
                        (Some(id), Some(version), None)
                    }
                    JobKind::Plugin => {
                        let found: Option<(String, String, bool, String)> = sqlx::query_as(
                            "SELECT name, version, approved, compatible FROM plugin_releases \
                             WHERE id = $1",
                        )
                        .bind(new.plugin_release_id)
                        .fetch_optional(&mut *tx)
                        .await?;
                        let (name, version, approved, compatible) = found
                            .ok_or_else(|| invalid("plugin_release_id", "no such plugin release"))?;
                        if !approved {
                            return Err($crate::Error::Conflict(
                                "the plugin release is not approved".into(),
                            ));
                        }
                        // The rule a single request's approval applies: a rollout is not a
                        // way around it.
                        let patterns: Vec<String> =
                            serde_json::from_str(&compatible).unwrap_or_default();
                        let control_plane = $crate::plugins::CONTROL_PLANE_VERSION;
                        if !$crate::store::rollouts::is_compatible(&patterns, control_plane) {
                            return Err($crate::Error::Conflict(format!(
                                "{name} {version} is not compatible with control plane {control_plane}"
                            )));
                        }
                        let spec = fleet_core::plugin::PluginSpec {
                            name,
                            version,
                            action: new.plugin_action,
                        };
                        (None, None, Some(serde_json::to_string(&spec).unwrap_or_default()))
                    }
                };
                // The frozen target set: the channel's instances not already on the version,
                // archived ones left out.
                let targets: Vec<String> = sqlx::query_scalar(
                    "SELECT instance_id FROM installations WHERE release_channel = $1 \
                     AND archived_at IS NULL AND ($2 IS NULL OR version IS NULL OR version <> $2) ORDER BY instance_id",
                )
                .bind(&new.channel)
                .bind(target_version.clone())
                .fetch_all(&mut *tx)
                .await?;
                // A rollout with nothing to do is refused rather than stored as done: an
                // operator who named the wrong channel or version learns it at once.
                if targets.is_empty() {
                    let why = match &target_version {
                        Some(version) => format!(
                            "no installation on channel {:?} needs {version}: each one runs it \
                             already, or none reports this channel",
                            new.channel
                        ),
                        None => format!("no installation reports channel {:?}", new.channel),
                    };
                    return Err(invalid("channel", &why));
                }
                let batches = $crate::rollouts::split_batches(&targets, new.settings.batch_size as usize);
                let status = "running";
                let settings = serde_json::to_string(&new.settings).unwrap_or_default();
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO rollouts (kind, release_id, plugin_release_id, plugin_action, channel, \
                     settings, failure_threshold, auto_advance, observe_secs, status, current_batch, \
                     batch_count, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 0, $11, $12, $12) RETURNING id",
                )
                .bind(new.kind.as_str())
                .bind(release_id)
                .bind(new.plugin_release_id.filter(|_| new.kind == JobKind::Plugin))
                .bind((new.kind == JobKind::Plugin).then(|| new.plugin_action.as_str()))
                .bind(&new.channel)
                .bind(settings)
                .bind(&new.failure_threshold)
                .bind(new.auto_advance)
                .bind(new.observe_secs)
                .bind(status)
                .bind(batches.len() as i64)
                .bind(now)
                .fetch_one(&mut *tx)
                .await?;
                // The frozen targets, a few thousand rows per statement: `[batch, instance]`.
                let rows: Vec<(i64, &str)> = batches
                    .iter()
                    .enumerate()
                    .flat_map(|(index, batch)| batch.iter().map(move |i| (index as i64, i.as_str())))
                    .collect();
                for chunk in rows.chunks($crate::store::rollouts_sql::ROLLOUT_JOB_CHUNK) {
                    sqlx::query($insert_jobs)
                        .bind(id)
                        .bind(payload.clone())
                        .bind(new.kind.as_str())
                        .bind(now)
                        .bind($crate::store::rollouts_sql::json(chunk))
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                self.jobs
                    .announce(new.kind.pipeline(), batches.into_iter().next().unwrap_or_default());
                self.rollout(id)
                    .await?
                    .ok_or_else(|| $crate::Error::Internal("created rollout vanished".into()))
            }

            async fn list_rollouts(
                &self,
                limit: i64,
            ) -> $crate::Result<Vec<$crate::store::rollouts::Rollout>> {
                Ok(sqlx::query_as::<_, $crate::store::rollouts::Rollout>(concat!(
                    "SELECT ",
                    rollout_cols!(),
                    " FROM rollouts r ORDER BY r.id DESC LIMIT $1"
                ))
                .bind(limit)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn rollout(
                &self,
                id: i64,
            ) -> $crate::Result<Option<$crate::store::rollouts::RolloutDetail>> {
                let Some(rollout) = sqlx::query_as::<_, $crate::store::rollouts::Rollout>(concat!(
                    "SELECT ",
                    rollout_cols!(),
                    " FROM rollouts r WHERE r.id = $1"
                ))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?
                else {
                    return Ok(None);
                };
                let jobs = sqlx::query_as::<_, $crate::store::rollouts::RolloutJob>(concat!(
                    "SELECT ",
                    job_cols!(),
                    " FROM rollout_jobs j WHERE j.rollout_id = $1 ORDER BY j.batch, j.instance_id"
                ))
                .bind(id)
                .fetch_all(&self.pool)
                .await?;
                let batches = (0..rollout.batch_count)
                    .map(|b| {
                        $crate::rollouts::BatchCounts::of(
                            b,
                            jobs.iter().filter(|j| j.batch == b).map(|j| j.status.as_str()),
                        )
                    })
                    .collect();
                let observed_until =
                    $crate::rollouts::observed_until(&rollout, &jobs, fleet_core::unix_now());
                Ok(Some($crate::store::rollouts::RolloutDetail {
                    rollout,
                    batches,
                    jobs,
                    observed_until,
                }))
            }

            async fn rollout_action(
                &self,
                id: i64,
                action: $crate::store::rollouts::RolloutAction,
                now: i64,
                forward: bool,
            ) -> $crate::Result<$crate::store::rollouts::RolloutDetail> {
                use $crate::rollouts::{Next, RolloutStatus};
                use $crate::store::rollouts::RolloutAction;
                let mut tx = self.pool.begin_with($begin).await?;
                let Some(row) = Self::lock_rollout(&mut tx, id).await? else {
                    return Err($crate::Error::NotFound);
                };
                let status: RolloutStatus = row.status;
                let (current_batch, batch_count, auto_advance) =
                    (row.current_batch, row.batch_count, row.auto_advance);
                let counts = Self::batch_counts(&mut tx, id, current_batch).await?;
                let new_status = $crate::rollouts::transition(status, action)
                    .map_err($crate::Error::Conflict)?;
                // Instances whose job the action makes available.
                let mut available = Vec::new();
                match action {
                    RolloutAction::Advance => {
                        $crate::rollouts::check_advance(status, &counts, current_batch, batch_count)
                            .map_err($crate::Error::Conflict)?;
                        available =
                            Self::apply_next(&mut tx, id, current_batch, Next::StartNext, None, now, forward)
                                .await?;
                    }
                    RolloutAction::Pause | RolloutAction::Resume | RolloutAction::Cancel => {
                        sqlx::query("UPDATE rollouts SET status = $1, updated_at = $2 WHERE id = $3")
                            .bind(new_status.as_str())
                            .bind(now)
                            .bind(id)
                            .execute(&mut *tx)
                            .await?;
                        if action == RolloutAction::Cancel {
                            sqlx::query(
                                "UPDATE rollout_jobs SET status = 'cancelled', updated_at = $1 \
                                 WHERE rollout_id = $2 AND status IN ('queued', 'pending')",
                            )
                            .bind(now)
                            .bind(id)
                            .execute(&mut *tx)
                            .await?;
                        }
                        if action == RolloutAction::Resume {
                            // The operator has seen the halt: its alert is resolved.
                            sqlx::query(
                                "UPDATE alerts SET resolved_at = $1 WHERE dedup_key = $2 AND resolved_at IS NULL",
                            )
                            .bind(now)
                            .bind(format!("rollout:{id}"))
                            .execute(&mut *tx)
                            .await?;
                            let next = $crate::rollouts::after_resume(
                                &counts,
                                auto_advance,
                                current_batch,
                                batch_count,
                                row.observing,
                            );
                            Self::apply_next(&mut tx, id, current_batch, next, None, now, forward).await?;
                            // Pending jobs are handed out again, those of a batch the resume
                            // started as well as those the pause held back.
                            available = sqlx::query_scalar(
                                "SELECT instance_id FROM rollout_jobs WHERE rollout_id = $1 AND status = 'pending'",
                            )
                            .bind(id)
                            .fetch_all(&mut *tx)
                            .await?;
                        }
                    }
                }
                tx.commit().await?;
                self.jobs.announce(row.kind.pipeline(), available);
                self.rollout(id).await?.ok_or($crate::Error::NotFound)
            }

            async fn next_job(
                &self,
                instance_id: &str,
                kind: $crate::store::rollouts::JobKind,
                now: i64,
            ) -> $crate::Result<Option<$crate::store::rollouts::HandedJob>> {
                let mut tx = self.pool.begin_with($begin).await?;
                // A job handed out whose answer never reached the agent (step still
                // `accepted`) is handed out again; the agent never runs a job id twice.
                let job = sqlx::query_as::<_, $crate::store::rollouts::RolloutJob>(concat!(
                    "SELECT ",
                    job_cols!(),
                    " FROM rollout_jobs j LEFT JOIN rollouts r ON r.id = j.rollout_id \
                     WHERE j.instance_id = $1 AND j.kind = $2 \
                     AND (j.status = 'pending' OR (j.status = 'in_progress' AND j.step = 'accepted')) \
                     AND (r.id IS NULL OR r.status = 'running') ORDER BY j.id LIMIT 1"
                ))
                .bind(instance_id)
                .bind(kind.as_str())
                .fetch_optional(&mut *tx)
                .await?;
                let Some(mut job) = job else {
                    return Ok(None);
                };
                if job.status == "pending" {
                    sqlx::query(
                        "UPDATE rollout_jobs SET status = 'in_progress', step = 'accepted', \
                         started_at = $1, updated_at = $1 WHERE id = $2",
                    )
                    .bind(now)
                    .bind(job.id)
                    .execute(&mut *tx)
                    .await?;
                    Self::insert_event(&mut tx, job.id, "in_progress", Some("accepted"), None, now).await?;
                    job.status = "in_progress".into();
                    job.step = Some("accepted".into());
                    job.started_at = Some(now);
                }
                let mut handed = $crate::store::rollouts::HandedJob {
                    job,
                    settings: None,
                    manifest: None,
                };
                // A job of a rollout carries its settings (a plugin job its auto_rollback); a
                // single approved request's plugin job has no rollout.
                if let Some(rollout_id) = handed.job.rollout_id {
                    let row: Option<(String, Option<String>)> = sqlx::query_as(
                        "SELECT r.settings, rel.manifest FROM rollouts r \
                         LEFT JOIN releases rel ON rel.id = r.release_id WHERE r.id = $1",
                    )
                    .bind(rollout_id)
                    .fetch_optional(&mut *tx)
                    .await?;
                    if let Some((settings, manifest)) = row {
                        handed.settings = serde_json::from_str(&settings).ok();
                        handed.manifest = manifest.and_then(|m| serde_json::from_str(&m).ok());
                    }
                }
                tx.commit().await?;
                Ok(Some(handed))
            }

            async fn report_job(
                &self,
                instance_id: &str,
                kind: $crate::store::rollouts::JobKind,
                report: &$crate::store::rollouts::JobReport,
                now: i64,
                forward: bool,
            ) -> $crate::Result<$crate::store::rollouts::RolloutJob> {
                let job_id: i64 = report.job_id.parse().map_err(|_| $crate::Error::NotFound)?;
                let mut tx = self.pool.begin_with($begin).await?;
                let job = sqlx::query_as::<_, $crate::store::rollouts::RolloutJob>(concat!(
                    "SELECT ",
                    job_cols!(),
                    " FROM rollout_jobs j WHERE j.id = $1 AND j.kind = $2",
                    $lock
                ))
                .bind(job_id)
                .bind(kind.as_str())
                .fetch_optional(&mut *tx)
                .await?;
                // Another instance's job looks exactly like a missing one.
                let Some(job) = job.filter(|j| j.instance_id == instance_id) else {
                    return Err($crate::Error::NotFound);
                };
                let status = report.status.as_str();
                if matches!(job.status.as_str(), "succeeded" | "failed" | "rolled_back") {
                    if job.status == status {
                        // A retried final report: acknowledged, recorded once.
                        return Ok(job);
                    }
                    return Err($crate::Error::Conflict(format!("the job already ended {}", job.status)));
                }
                if job.status != "in_progress" {
                    return Err($crate::Error::Conflict(format!("the job is {}", job.status)));
                }
                let terminal = report.status.is_terminal();
                let metrics = report.metrics.as_ref().map(|m| m.to_string());
                sqlx::query(
                    "UPDATE rollout_jobs SET status = $1, step = COALESCE($2, step), error = COALESCE($3, error), \
                     canary_percent = COALESCE($4, canary_percent), metrics = COALESCE($5, metrics), \
                     duration_ms = COALESCE($6, duration_ms), output_tail = COALESCE($7, output_tail), \
                     updated_at = $8, finished_at = CASE WHEN $9 THEN $8 ELSE finished_at END WHERE id = $10",
                )
                .bind(status)
                .bind(report.step.clone())
                .bind(report.error.clone())
                .bind(report.canary_percent.map(i64::from))
                .bind(metrics)
                .bind(report.duration_ms.map(|d| d.min(i64::MAX as u64) as i64))
                .bind(report.output_tail.clone())
                .bind(now)
                .bind(terminal)
                .bind(job.id)
                .execute(&mut *tx)
                .await?;
                Self::insert_event(&mut tx, job.id, status, report.step.as_deref(), report.error.as_deref(), now)
                    .await?;
                // Instances whose job an auto-advance makes available.
                let mut available = Vec::new();
                if let (true, Some(rollout_id)) = (terminal, job.rollout_id) {
                    if let Some(row) = Self::lock_rollout(&mut tx, rollout_id).await? {
                        let counts = Self::batch_counts(&mut tx, rollout_id, job.batch).await?;
                        let next = $crate::rollouts::after_job_end(
                            row.status,
                            &counts,
                            row.threshold,
                            row.auto_advance,
                            row.current_batch,
                            row.batch_count,
                            report.status.is_failure(),
                            row.observing,
                        );
                        let alert_on = Some(instance_id);
                        available =
                            Self::apply_next(&mut tx, rollout_id, row.current_batch, next, alert_on, now, forward)
                                .await?;
                    }
                }
                let job = sqlx::query_as::<_, $crate::store::rollouts::RolloutJob>(concat!(
                    "SELECT ",
                    job_cols!(),
                    " FROM rollout_jobs j WHERE j.id = $1"
                ))
                .bind(job.id)
                .fetch_one(&mut *tx)
                .await?;
                tx.commit().await?;
                self.jobs.announce(kind.pipeline(), available);
                Ok(job)
            }

            async fn job_events(
                &self,
                job_id: i64,
            ) -> $crate::Result<Vec<$crate::store::rollouts::JobEvent>> {
                Ok(sqlx::query_as::<_, $crate::store::rollouts::JobEvent>(
                    "SELECT id, status, step, error, created_at FROM rollout_job_events \
                     WHERE job_id = $1 ORDER BY id",
                )
                .bind(job_id)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn watch_rollout_slo(&self, now: i64, forward: bool) -> $crate::Result<u64> {
                use $crate::rollouts::{Next, RolloutStatus};
                // Heartbeats count from the later of the job's end and the rollout's last
                // change of status: a breach an operator resumed past does not halt it again.
                let candidates: Vec<(i64, i64, String, i64, String, i64)> = sqlx::query_as(
                    "SELECT r.id, r.current_batch, j.instance_id, \
                     CASE WHEN r.updated_at > j.finished_at THEN r.updated_at ELSE j.finished_at END, \
                     r.settings, i.id \
                     FROM rollout_jobs j JOIN rollouts r ON r.id = j.rollout_id \
                     JOIN installations i ON i.instance_id = j.instance_id \
                     WHERE r.status = 'running' AND r.kind = 'update' AND j.status = 'succeeded' \
                     AND j.finished_at >= $1 - r.observe_secs ORDER BY r.id, j.id",
                )
                .bind(now)
                .fetch_all(&self.pool)
                .await?;
                let mut halted = std::collections::BTreeSet::new();
                for (rollout_id, current_batch, instance_id, finished_at, settings, installation_id) in candidates {
                    if halted.contains(&rollout_id) {
                        continue;
                    }
                    let Ok(settings) = serde_json::from_str::<fleet_core::update::RolloutSettings>(&settings) else {
                        continue;
                    };
                    let figures: Vec<String> = sqlx::query(Self::RECENT_HEARTBEATS)
                        .bind(installation_id)
                        .bind(finished_at)
                        .bind(20i64)
                        .fetch_all(&self.pool)
                        .await?
                        .iter()
                        .map(|row| sqlx::Row::try_get(row, "figures"))
                        .collect::<std::result::Result<_, _>>()?;
                    // A heartbeat collected before the job ended (delivered late from the
                    // agent's outbox) measured the version before the update.
                    let breach = figures.iter().find_map(|f| {
                        let map = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(f).ok()?;
                        let collected_at = map
                            .get($crate::store::batch::COLLECTED_AT)
                            .and_then(serde_json::Value::as_i64);
                        if collected_at.is_some_and(|at| at < finished_at) {
                            return None;
                        }
                        $crate::rollouts::slo_breach(&settings, &map)
                    });
                    let Some(reason) = breach else { continue };
                    let mut tx = self.pool.begin_with($begin).await?;
                    let still_running = Self::lock_rollout(&mut tx, rollout_id)
                        .await?
                        .is_some_and(|row| row.status == RolloutStatus::Running);
                    if still_running {
                        let reason = format!("SLO breach on {instance_id} after its update: {reason}");
                        Self::apply_next(&mut tx, rollout_id, current_batch, Next::Halt(reason), Some(&instance_id), now, forward)
                            .await?;
                        halted.insert(rollout_id);
                    }
                    tx.commit().await?;
                }
                // Observed rollouts whose current batch ended: once its window is over
                // without a breach, complete the rollout or start the next batch. Decided
                // from a plain read first, so that a rollout still inside its window, or
                // waiting for an operator's advance, costs no write transaction.
                let ended: Vec<(i64, i64, i64, bool, i64, Option<i64>)> = sqlx::query_as(
                    "SELECT r.id, r.current_batch, r.batch_count, r.auto_advance, r.observe_secs, \
                     MAX(j.finished_at) FROM rollouts r \
                     JOIN rollout_jobs j ON j.rollout_id = r.id AND j.batch = r.current_batch \
                     WHERE r.status = 'running' AND r.kind = 'update' AND r.observe_secs > 0 \
                     GROUP BY r.id, r.current_batch, r.batch_count, r.auto_advance, r.observe_secs \
                     HAVING SUM(CASE WHEN j.status IN ('pending', 'in_progress') THEN 1 ELSE 0 END) = 0",
                )
                .fetch_all(&self.pool)
                .await?;
                for (rollout_id, batch, batch_count, auto_advance, observe_secs, ended_at) in ended {
                    let next = $crate::rollouts::after_observation(
                        ended_at.unwrap_or(now),
                        observe_secs,
                        now,
                        auto_advance,
                        batch,
                        batch_count,
                    );
                    if next == Next::Stay || halted.contains(&rollout_id) {
                        continue;
                    }
                    // Checked again under the lock: a report, an operator or another replica
                    // may have moved the rollout since the read.
                    let mut tx = self.pool.begin_with($begin).await?;
                    let Some(row) = Self::lock_rollout(&mut tx, rollout_id).await? else { continue };
                    let counts = Self::batch_counts(&mut tx, rollout_id, batch).await?;
                    if !row.observing
                        || row.status != RolloutStatus::Running
                        || row.current_batch != batch
                        || counts.active() > 0
                    {
                        continue;
                    }
                    tracing::info!(rollout = rollout_id, batch = batch + 1, "observation window over without a breach");
                    let available =
                        Self::apply_next(&mut tx, rollout_id, batch, next, None, now, forward).await?;
                    tx.commit().await?;
                    self.jobs.announce(row.kind.pipeline(), available);
                }
                Ok(halted.len() as u64)
            }

            async fn is_replay(
                &self,
                instance_id: &str,
                msg_id: &str,
                signed_at: i64,
                now: i64,
            ) -> $crate::Result<bool> {
                let inserted: Option<String> = sqlx::query_scalar(
                    "INSERT INTO seen_messages (instance_id, msg_id, signed_at, seen_at) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING msg_id",
                )
                .bind(instance_id)
                .bind(msg_id)
                .bind(signed_at)
                .bind(now)
                .fetch_optional(&self.pool)
                .await?;
                if inserted.is_some() {
                    return Ok(false);
                }
                let stored: Option<i64> = sqlx::query_scalar(
                    "SELECT signed_at FROM seen_messages WHERE instance_id = $1 AND msg_id = $2",
                )
                .bind(instance_id)
                .bind(msg_id)
                .fetch_optional(&self.pool)
                .await?;
                // A retry re-signs with a fresh timestamp; the same one again is a replay.
                Ok(stored == Some(signed_at))
            }

            async fn waiting_pipelines(
                &self,
                instance_id: &str,
            ) -> $crate::Result<Vec<fleet_core::command::Pipeline>> {
                let names: Vec<String> = sqlx::query_scalar($crate::store::rollouts_sql::WAITING_PIPELINES)
                    .bind(instance_id)
                    .fetch_all(&self.pool)
                    .await?;
                let mut pipelines: Vec<fleet_core::command::Pipeline> = names
                    .iter()
                    .filter_map(|name| fleet_core::command::Pipeline::parse(name))
                    .collect();
                // `UNION` leaves one row per pipeline, in no particular order.
                pipelines.sort();
                Ok(pipelines)
            }

            fn jobs_available(
                &self,
            ) -> Option<
                tokio::sync::broadcast::Receiver<std::sync::Arc<$crate::store::rollouts::JobsAvailable>>,
            > {
                Some(self.jobs.subscribe())
            }
        }

        impl $store {
            /// Locks a rollout row and reads what its rules need.
            async fn lock_rollout(
                tx: &mut sqlx::Transaction<'static, $db>,
                id: i64,
            ) -> $crate::Result<Option<$crate::store::rollouts::LockedRollout>> {
                let row: Option<(String, i64, i64, bool, String, String, String, i64)> =
                    sqlx::query_as(concat!(
                        "SELECT status, current_batch, batch_count, auto_advance, failure_threshold, \
                         kind, settings, observe_secs FROM rollouts WHERE id = $1",
                        $lock
                    ))
                    .bind(id)
                    .fetch_optional(&mut **tx)
                    .await?;
                Ok(row.map(
                    |(status, current_batch, batch_count, auto_advance, threshold, kind, settings, observe_secs)| {
                        $crate::store::rollouts::LockedRollout {
                            kind: $crate::store::rollouts::JobKind::parse(&kind)
                                .unwrap_or($crate::store::rollouts::JobKind::Update),
                            status: $crate::rollouts::RolloutStatus::parse(&status)
                                .unwrap_or($crate::rollouts::RolloutStatus::Cancelled),
                            current_batch,
                            batch_count,
                            auto_advance,
                            threshold: fleet_core::command::Threshold::parse(&threshold)
                                .unwrap_or(fleet_core::command::Threshold::Count(0)),
                            observing: serde_json::from_str(&settings).is_ok_and(|settings| {
                                $crate::rollouts::observes(&kind, &settings, observe_secs)
                            }),
                        }
                    },
                ))
            }

            async fn batch_counts(
                tx: &mut sqlx::Transaction<'static, $db>,
                rollout_id: i64,
                batch: i64,
            ) -> $crate::Result<$crate::rollouts::BatchCounts> {
                let statuses: Vec<String> = sqlx::query_scalar(
                    "SELECT status FROM rollout_jobs WHERE rollout_id = $1 AND batch = $2",
                )
                .bind(rollout_id)
                .bind(batch)
                .fetch_all(&mut **tx)
                .await?;
                Ok($crate::rollouts::BatchCounts::of(batch, statuses.iter().map(String::as_str)))
            }

            /// Cancels the jobs of `instance_id` not handed out yet (queued or pending), as
            /// its installation is being archived; they end now, so an observed rollout's
            /// window counts from here. A running rollout whose current batch that ended
            /// moves on as after a resume. Returns, by pipeline, the instances whose job that
            /// made available, to announce after the commit.
            ///
            /// Rollouts are locked before their jobs, in id order, as every other path
            /// takes them.
            pub(crate) async fn cancel_jobs_of_archived(
                tx: &mut sqlx::Transaction<'static, $db>,
                instance_id: &str,
                now: i64,
            ) -> $crate::Result<Vec<(fleet_core::command::Pipeline, Vec<String>)>> {
                use $crate::rollouts::RolloutStatus;
                let reason = $crate::store::sql::ARCHIVED;
                // A plugin request's own job has no rollout.
                sqlx::query(
                    "UPDATE rollout_jobs SET status = 'cancelled', error = $1, updated_at = $2, \
                     finished_at = $2 WHERE instance_id = $3 AND rollout_id IS NULL \
                     AND status IN ('queued', 'pending')",
                )
                .bind(reason)
                .bind(now)
                .bind(instance_id)
                .execute(&mut **tx)
                .await?;
                let rollouts: Vec<i64> = sqlx::query_scalar(
                    "SELECT DISTINCT rollout_id FROM rollout_jobs WHERE instance_id = $1 \
                     AND rollout_id IS NOT NULL AND status IN ('queued', 'pending') ORDER BY rollout_id",
                )
                .bind(instance_id)
                .fetch_all(&mut **tx)
                .await?;
                let mut available = Vec::new();
                for rollout_id in rollouts {
                    let Some(row) = Self::lock_rollout(tx, rollout_id).await? else { continue };
                    let batches: Vec<i64> = sqlx::query_scalar(
                        "UPDATE rollout_jobs SET status = 'cancelled', error = $1, updated_at = $2, \
                         finished_at = $2 WHERE rollout_id = $3 AND instance_id = $4 \
                         AND status IN ('queued', 'pending') RETURNING batch",
                    )
                    .bind(reason)
                    .bind(now)
                    .bind(rollout_id)
                    .bind(instance_id)
                    .fetch_all(&mut **tx)
                    .await?;
                    // A paused or halted rollout moves on when it is resumed.
                    if row.status != RolloutStatus::Running || !batches.contains(&row.current_batch) {
                        continue;
                    }
                    let counts = Self::batch_counts(tx, rollout_id, row.current_batch).await?;
                    let next = $crate::rollouts::after_resume(
                        &counts,
                        row.auto_advance,
                        row.current_batch,
                        row.batch_count,
                        row.observing,
                    );
                    let started =
                        Self::apply_next(tx, rollout_id, row.current_batch, next, None, now, false).await?;
                    available.push((row.kind.pipeline(), started));
                }
                Ok(available)
            }

            async fn insert_event(
                tx: &mut sqlx::Transaction<'static, $db>,
                job_id: i64,
                status: &str,
                step: Option<&str>,
                error: Option<&str>,
                now: i64,
            ) -> $crate::Result<()> {
                sqlx::query(
                    "INSERT INTO rollout_job_events (job_id, status, step, error, created_at) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(job_id)
                .bind(status)
                .bind(step)
                .bind(error)
                .bind(now)
                .execute(&mut **tx)
                .await?;
                Ok(())
            }

            /// Applies a rule's outcome to a locked rollout; returns the instances whose job
            /// it made available (those of the batch it started), to announce after the
            /// commit.
            #[allow(clippy::too_many_arguments)]
            async fn apply_next(
                tx: &mut sqlx::Transaction<'static, $db>,
                id: i64,
                current_batch: i64,
                next: $crate::rollouts::Next,
                alert_on: Option<&str>,
                now: i64,
                forward: bool,
            ) -> $crate::Result<Vec<String>> {
                use $crate::rollouts::Next;
                let mut started = Vec::new();
                match next {
                    Next::Stay => {}
                    Next::Halt(reason) => {
                        sqlx::query(
                            "UPDATE rollouts SET status = 'halted', halt_reason = $1, updated_at = $2 WHERE id = $3",
                        )
                        .bind(&reason)
                        .bind(now)
                        .bind(id)
                        .execute(&mut **tx)
                        .await?;
                        tracing::warn!(rollout = id, %reason, "rollout halted");
                        if let Some(instance_id) = alert_on {
                            Self::raise_alert(
                                tx,
                                instance_id,
                                $crate::alerts::kind::ROLLOUT_HALTED,
                                format!("rollout:{id}"),
                                format!("rollout {id} halted: {reason}"),
                                now,
                                forward,
                            )
                            .await?;
                        }
                    }
                    Next::StartNext => {
                        let batch_count: i64 =
                            sqlx::query_scalar("SELECT batch_count FROM rollouts WHERE id = $1")
                                .bind(id)
                                .fetch_one(&mut **tx)
                                .await?;
                        let mut next_batch = current_batch + 1;
                        // A batch whose every job was cancelled (its installations were
                        // archived) has nothing to run or watch: the rollout passes over it,
                        // and completes when that was the last.
                        loop {
                            started = sqlx::query_scalar(
                                "UPDATE rollout_jobs SET status = 'pending', updated_at = $1 \
                                 WHERE rollout_id = $2 AND batch = $3 AND status = 'queued' \
                                 RETURNING instance_id",
                            )
                            .bind(now)
                            .bind(id)
                            .bind(next_batch)
                            .fetch_all(&mut **tx)
                            .await?;
                            if !started.is_empty() || next_batch + 1 >= batch_count {
                                break;
                            }
                            next_batch += 1;
                        }
                        let status = if started.is_empty() && next_batch + 1 >= batch_count {
                            "completed"
                        } else {
                            "running"
                        };
                        sqlx::query(
                            "UPDATE rollouts SET current_batch = $1, status = $2, updated_at = $3 WHERE id = $4",
                        )
                        .bind(next_batch)
                        .bind(status)
                        .bind(now)
                        .bind(id)
                        .execute(&mut **tx)
                        .await?;
                    }
                    Next::Complete => {
                        sqlx::query("UPDATE rollouts SET status = 'completed', updated_at = $1 WHERE id = $2")
                            .bind(now)
                            .bind(id)
                            .execute(&mut **tx)
                            .await?;
                    }
                }
                Ok(started)
            }

            /// Opens an error alert on the instance's installation (forwarded when `forward`).
            #[allow(clippy::too_many_arguments)]
            async fn raise_alert(
                tx: &mut sqlx::Transaction<'static, $db>,
                instance_id: &str,
                kind: &'static str,
                key: String,
                message: String,
                now: i64,
                forward: bool,
            ) -> $crate::Result<()> {
                let installation: Option<i64> =
                    sqlx::query_scalar("SELECT id FROM installations WHERE instance_id = $1")
                        .bind(instance_id)
                        .fetch_optional(&mut **tx)
                        .await?;
                let Some(installation_id) = installation else { return Ok(()) };
                let alert = $crate::store::batch::PendingAlert {
                    installation_id,
                    instance_id,
                    spec: $crate::alerts::AlertSpec {
                        level: fleet_core::heartbeat::AlertLevel::Error,
                        kind,
                        key,
                        message,
                    },
                    created_at: now,
                    resolved_at: None,
                };
                Self::insert_alert(tx, &alert, forward).await?;
                Ok(())
            }
        }
    };
}
