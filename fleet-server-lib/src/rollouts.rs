//! Rollouts: the pure rules (batches, advance, halt, SLO breach) and the operator API.
//!
//! A rollout's targets are frozen when it is created: every target gets a job row at once,
//! `queued` until its batch starts, so nothing is ever recomputed (the ERP recomputed the
//! batch at every advance and skipped or doubled instances). The rules below are plain
//! functions; the store applies them inside its transactions.

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fleet_core::command::Threshold;
use fleet_core::update::{RolloutSettings, Strategy};
use fleet_core::validate::{Limits, Path as FieldPath, Validate, ValidationErrors, check_id};
use serde::{Deserialize, Serialize};

use crate::auth::{Admin, Authed, Ops, Support};
use crate::store::rollouts::{JobKind, NewRollout, RolloutAction};
use crate::{Error, Result, Shared};

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutStatus {
    /// Batches run (and, with auto-advance, follow each other).
    Running,
    /// Stopped by an operator; running jobs finish, nothing new is handed out.
    Paused,
    /// Stopped by itself (failure threshold or SLO breach); see `halt_reason`.
    Halted,
    /// Stopped for good; jobs not yet handed out were cancelled.
    Cancelled,
    /// Every batch ended.
    Completed,
}

impl RolloutStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Halted => "halted",
            Self::Cancelled => "cancelled",
            Self::Completed => "completed",
        }
    }

    /// Parses a stored name.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "running" => Self::Running,
            "paused" => Self::Paused,
            "halted" => Self::Halted,
            "cancelled" => Self::Cancelled,
            "completed" => Self::Completed,
            _ => return None,
        })
    }
}

/// Job statuses stored beside the wire ones: `queued` (its batch has not started) and
/// `cancelled` (its rollout was cancelled before it was handed out).
pub mod job_status {
    /// Waiting for its batch.
    pub const QUEUED: &str = "queued";
    /// Its batch started; the agent has not asked yet.
    pub const PENDING: &str = "pending";
    /// Handed out.
    pub const IN_PROGRESS: &str = "in_progress";
    /// Cancelled with its rollout.
    pub const CANCELLED: &str = "cancelled";
}

/// How many jobs of one batch are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BatchCounts {
    /// Batch index, from 0.
    pub batch: i64,
    /// Jobs in the batch.
    pub total: u32,
    /// Not started (the batch has not begun).
    pub queued: u32,
    /// Started, not yet handed out.
    pub pending: u32,
    /// Handed out, running.
    pub in_progress: u32,
    /// Ended well.
    pub succeeded: u32,
    /// Ended badly without a rollback.
    pub failed: u32,
    /// Ended badly and rolled back.
    pub rolled_back: u32,
    /// Cancelled with the rollout.
    pub cancelled: u32,
}

impl BatchCounts {
    /// Counts `statuses` of the jobs of `batch`.
    pub fn of<'a>(batch: i64, statuses: impl IntoIterator<Item = &'a str>) -> Self {
        let mut c = Self {
            batch,
            ..Self::default()
        };
        for status in statuses {
            c.total += 1;
            match status {
                job_status::QUEUED => c.queued += 1,
                job_status::PENDING => c.pending += 1,
                job_status::IN_PROGRESS => c.in_progress += 1,
                "succeeded" => c.succeeded += 1,
                "failed" => c.failed += 1,
                "rolled_back" => c.rolled_back += 1,
                _ => c.cancelled += 1,
            }
        }
        c
    }

    /// Jobs that have not ended (pending or running).
    pub fn active(&self) -> u32 {
        self.pending + self.in_progress
    }

    /// Jobs that ended badly.
    pub fn failures(&self) -> u32 {
        self.failed + self.rolled_back
    }
}

/// Splits the frozen target list into batches of `batch_size` (the last may be smaller).
pub fn split_batches<T: Clone>(targets: &[T], batch_size: usize) -> Vec<Vec<T>> {
    targets
        .chunks(batch_size.max(1))
        .map(<[T]>::to_vec)
        .collect()
}

/// What the rollout does after a job of its current batch ended, or after a resume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Nothing changes.
    Stay,
    /// The rollout halts, for this reason.
    Halt(String),
    /// The next batch starts (auto-advance).
    StartNext,
    /// That was the last batch: the rollout is complete.
    Complete,
}

/// The rule after a job ended in `counts`' batch. Failures past the threshold halt a
/// running or paused rollout at once, even while other jobs of the batch still run; an
/// ended batch completes the rollout when it was the last, or starts the next one when
/// auto-advance is on and the rollout is running.
#[allow(clippy::too_many_arguments)]
pub fn after_job_end(
    status: RolloutStatus,
    counts: &BatchCounts,
    threshold: Threshold,
    auto_advance: bool,
    current_batch: i64,
    batch_count: i64,
    job_failed: bool,
    observing: bool,
) -> Next {
    if counts.batch != current_batch {
        return Next::Stay;
    }
    // Only a failure can newly pass the threshold; a success reported after a resume does
    // not halt the rollout again for the failures the operator already accepted.
    if job_failed
        && matches!(status, RolloutStatus::Running | RolloutStatus::Paused)
        && threshold.exceeded(counts.failures(), counts.total)
    {
        return Next::Halt(format!(
            "batch {} failed: {} of {} jobs failed, threshold {}",
            counts.batch + 1,
            counts.failures(),
            counts.total,
            threshold_text(threshold)
        ));
    }
    if status != RolloutStatus::Running || counts.active() > 0 {
        return Next::Stay;
    }
    batch_ended(auto_advance, current_batch, batch_count, observing)
}

/// What follows a batch whose every job ended: the rollout completes after its last batch,
/// or starts the next with auto-advance. A rollout that watches its updated instances'
/// heartbeats ([`observes`]) does neither yet: it waits out the observation window first
/// ([`after_observation`]), so that a breach can still halt it before the next batch.
fn batch_ended(auto_advance: bool, current_batch: i64, batch_count: i64, observing: bool) -> Next {
    if observing {
        Next::Stay
    } else if current_batch + 1 >= batch_count {
        Next::Complete
    } else if auto_advance {
        Next::StartNext
    } else {
        Next::Stay
    }
}

/// Whether a rollout waits out an observation window after each batch before it moves on:
/// an update rollout with an SLO maximum set and a window, the only kind with heartbeats to
/// watch against its maxima.
pub fn observes(kind: &str, settings: &RolloutSettings, observe_secs: i64) -> bool {
    let set = |max: Option<f64>| max.is_some_and(|m| m > 0.0);
    kind == "update"
        && observe_secs > 0
        && (set(settings.slo_p95_ms_max)
            || set(settings.slo_error_rate_max)
            || set(settings.slo_webhook_retry_rate_max))
}

/// Until when (Unix seconds) a running rollout watches its current batch, whose every job
/// ended, before it moves on: the batch's last job end plus the window. `None` while the
/// batch's jobs run, once the window is over, and for a rollout that does not observe.
pub fn observed_until(
    rollout: &crate::store::rollouts::Rollout,
    jobs: &[crate::store::rollouts::RolloutJob],
    now: i64,
) -> Option<i64> {
    let settings: RolloutSettings = serde_json::from_str(&rollout.settings).ok()?;
    if rollout.status != RolloutStatus::Running.as_str()
        || !observes(&rollout.kind, &settings, rollout.observe_secs)
    {
        return None;
    }
    let batch = || jobs.iter().filter(|j| j.batch == rollout.current_batch);
    let active = [job_status::PENDING, job_status::IN_PROGRESS];
    if batch().any(|j| active.contains(&j.status.as_str())) {
        return None;
    }
    let ended_at = batch().filter_map(|j| j.finished_at).max()?;
    let until = ended_at.saturating_add(rollout.observe_secs);
    (now < until).then_some(until)
}

/// The rule for a running, observed rollout whose current batch ended at `ended_at` (its
/// last job's end) without a breach so far: once the window is over, what [`batch_ended`]
/// would have done at the batch's end.
pub fn after_observation(
    ended_at: i64,
    observe_secs: i64,
    now: i64,
    auto_advance: bool,
    current_batch: i64,
    batch_count: i64,
) -> Next {
    if now < ended_at.saturating_add(observe_secs) {
        Next::Stay
    } else {
        batch_ended(auto_advance, current_batch, batch_count, false)
    }
}

/// The rule after an operator resumed a rollout: its current batch's failures were
/// accepted; an ended batch completes the rollout or, with auto-advance, starts the next.
pub fn after_resume(
    counts: &BatchCounts,
    auto_advance: bool,
    current_batch: i64,
    batch_count: i64,
    observing: bool,
) -> Next {
    if counts.active() > 0 {
        Next::Stay
    } else {
        batch_ended(auto_advance, current_batch, batch_count, observing)
    }
}

/// Whether `advance` may start the next batch: 409 (as text) while the current batch has
/// pending or running jobs, or when the rollout is not running, or when no batch is left.
pub fn check_advance(
    status: RolloutStatus,
    current: &BatchCounts,
    current_batch: i64,
    batch_count: i64,
) -> std::result::Result<(), String> {
    if status != RolloutStatus::Running {
        return Err(format!("the rollout is {}", status.as_str()));
    }
    if current.active() > 0 {
        return Err(format!(
            "batch {} still has {} pending or running jobs",
            current_batch + 1,
            current.active()
        ));
    }
    if current_batch + 1 >= batch_count {
        return Err("no batch is left".into());
    }
    Ok(())
}

/// The status an operator action leads to, or why it is refused (409).
pub fn transition(
    status: RolloutStatus,
    action: RolloutAction,
) -> std::result::Result<RolloutStatus, String> {
    use RolloutStatus::*;
    match (action, status) {
        (RolloutAction::Pause, Running) => Ok(Paused),
        (RolloutAction::Resume, Paused | Halted) => Ok(Running),
        (RolloutAction::Cancel, Running | Paused | Halted) => Ok(Cancelled),
        (RolloutAction::Advance, _) => Ok(status),
        (action, status) => Err(format!(
            "cannot {} a rollout that is {}",
            action.as_str(),
            status.as_str()
        )),
    }
}

/// `"3"` or `"10%"`.
pub fn threshold_text(threshold: Threshold) -> String {
    match threshold {
        Threshold::Count(n) => n.to_string(),
        Threshold::Percent(p) => format!("{p}%"),
    }
}

/// The first SLO figure of a heartbeat above the rollout's maxima, as a reason. A maximum
/// that is absent or 0 is not checked (as in the ERP).
pub fn slo_breach(
    settings: &RolloutSettings,
    figures: &serde_json::Map<String, serde_json::Value>,
) -> Option<String> {
    let checks = [
        ("slo_p95_ms", settings.slo_p95_ms_max),
        ("slo_error_rate", settings.slo_error_rate_max),
        (
            "slo_webhook_retry_rate",
            settings.slo_webhook_retry_rate_max,
        ),
    ];
    checks.into_iter().find_map(|(name, max)| {
        let max = max.filter(|m| *m > 0.0)?;
        let value = figures.get(name)?.as_f64()?;
        (value > max).then(|| format!("{name} {value} is above the rollout's maximum {max}"))
    })
}

/// Default observation window after an instance updated: 10 minutes.
pub const DEFAULT_OBSERVE_SECS: i64 = 600;

/// Body of `POST /api/rollouts`. The ERP's camelCase names are accepted too.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateRollout {
    /// The release (its id); or give `version` (and the channel picks the release).
    #[serde(default, alias = "manifestId")]
    release_id: Option<i64>,
    #[serde(default)]
    version: Option<String>,
    channel: String,
    #[serde(default = "default_batch_size", alias = "batchSize")]
    batch_size: u32,
    #[serde(default)]
    strategy: Strategy,
    #[serde(default, alias = "canarySteps")]
    canary_steps: Option<Vec<u8>>,
    #[serde(default, alias = "canaryStepWaitSec")]
    canary_step_wait_sec: Option<u32>,
    #[serde(default, alias = "sloP95MsMax")]
    slo_p95_ms_max: Option<f64>,
    #[serde(default, alias = "sloErrorRateMax")]
    slo_error_rate_max: Option<f64>,
    #[serde(default, alias = "sloWebhookRetryRateMax")]
    slo_webhook_retry_rate_max: Option<f64>,
    #[serde(default, alias = "autoRollback")]
    auto_rollback: Option<bool>,
    /// `"0"` (default: any failure halts), `"2"` or `"25%"`, per batch.
    #[serde(default, alias = "failureThreshold")]
    failure_threshold: Option<serde_json::Value>,
    #[serde(default, alias = "autoAdvance")]
    auto_advance: bool,
    /// Seconds an updated instance's heartbeats are watched for SLO breaches.
    #[serde(default, alias = "observeSecs")]
    observe_secs: Option<i64>,
    /// Plugin rollouts: the plugin release and the action carried through every batch.
    #[serde(default)]
    plugin_release_id: Option<i64>,
    #[serde(default)]
    action: Option<fleet_core::plugin::PluginAction>,
}

/// JSON Schema of [`CreateRollout`] (for `/openapi.json`); unknown keys are refused.
pub(crate) fn create_rollout_schema() -> serde_json::Value {
    use fleet_core::schema::{id, one_of};
    use serde_json::json;
    let int = json!({ "type": ["integer", "null"], "minimum": 0 });
    let rate = json!({ "type": ["number", "null"], "minimum": 0 });
    let mut schema = fleet_core::schema::object(
        &["channel"],
        &[
            ("release_id", int.clone()),
            ("version", json!({ "type": ["string", "null"] })),
            ("channel", id()),
            (
                "batch_size",
                json!({ "type": "integer", "minimum": 1, "maximum": u32::MAX }),
            ),
            (
                "strategy",
                one_of(&[Strategy::Batch, Strategy::BlueGreenCanary]),
            ),
            (
                "canary_steps",
                json!({ "type": ["array", "null"], "items": { "type": "integer", "minimum": 0, "maximum": 100 } }),
            ),
            ("canary_step_wait_sec", int.clone()),
            ("slo_p95_ms_max", rate.clone()),
            ("slo_error_rate_max", rate.clone()),
            ("slo_webhook_retry_rate_max", rate),
            ("auto_rollback", json!({ "type": ["boolean", "null"] })),
            (
                "failure_threshold",
                json!({ "type": ["string", "integer", "null"] }),
            ),
            ("auto_advance", json!({ "type": "boolean" })),
            ("observe_secs", int.clone()),
            ("plugin_release_id", int),
            (
                "action",
                fleet_core::schema::nullable(fleet_core::plugin::plugin_action_schema()),
            ),
        ],
    );
    // The ERP's camelCase names are accepted as aliases of the same fields.
    for (alias, name) in [
        ("manifestId", "release_id"),
        ("batchSize", "batch_size"),
        ("canarySteps", "canary_steps"),
        ("canaryStepWaitSec", "canary_step_wait_sec"),
        ("sloP95MsMax", "slo_p95_ms_max"),
        ("sloErrorRateMax", "slo_error_rate_max"),
        ("sloWebhookRetryRateMax", "slo_webhook_retry_rate_max"),
        ("autoRollback", "auto_rollback"),
        ("failureThreshold", "failure_threshold"),
        ("autoAdvance", "auto_advance"),
        ("observeSecs", "observe_secs"),
    ] {
        schema["properties"][alias] = schema["properties"][name].clone();
    }
    schema["additionalProperties"] = json!(false);
    schema
}

fn default_batch_size() -> u32 {
    10
}

impl CreateRollout {
    fn settings(&self) -> RolloutSettings {
        let defaults = RolloutSettings::default();
        RolloutSettings {
            strategy: self.strategy,
            batch_size: self.batch_size,
            canary_steps: self.canary_steps.clone().unwrap_or(defaults.canary_steps),
            canary_step_wait_sec: self
                .canary_step_wait_sec
                .unwrap_or(defaults.canary_step_wait_sec),
            slo_p95_ms_max: self.slo_p95_ms_max,
            slo_error_rate_max: self.slo_error_rate_max,
            slo_webhook_retry_rate_max: self.slo_webhook_retry_rate_max,
            auto_rollback: self.auto_rollback.unwrap_or(defaults.auto_rollback),
        }
    }

    fn threshold(&self, errors: &mut ValidationErrors) -> Threshold {
        let parsed = match &self.failure_threshold {
            None => Some(Threshold::Count(0)),
            Some(serde_json::Value::Number(n)) => n
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Threshold::Count),
            Some(serde_json::Value::String(s)) => Threshold::parse(s),
            Some(_) => None,
        };
        parsed.unwrap_or_else(|| {
            errors.push(
                "failure_threshold",
                "must be a count such as 2 or a percentage such as \"25%\"",
            );
            Threshold::Count(0)
        })
    }

    /// Validates and turns the body into what the store creates.
    pub(crate) fn into_new(self, kind: JobKind, limits: &Limits) -> Result<NewRollout> {
        let mut errors = ValidationErrors::default();
        check_id(
            &mut errors,
            &FieldPath::Root.field("channel"),
            &self.channel,
            limits.max_id_len,
        );
        if let Some(v) = &self.version {
            check_id(
                &mut errors,
                &FieldPath::Root.field("version"),
                v,
                limits.max_id_len,
            );
        }
        let settings = self.settings();
        settings.validate(limits, &FieldPath::Root, &mut errors);
        let threshold = self.threshold(&mut errors);
        let observe_secs = self.observe_secs.unwrap_or(DEFAULT_OBSERVE_SECS);
        if !(0..=7 * 86_400).contains(&observe_secs) {
            errors.push("observe_secs", "must be between 0 and 604800");
        }
        match kind {
            JobKind::Update => {
                if self.release_id.is_none() && self.version.is_none() {
                    errors.push("release_id", "name the release (release_id or version)");
                }
            }
            JobKind::Plugin => {
                if self.plugin_release_id.is_none() {
                    errors.push("plugin_release_id", "name the plugin release");
                }
            }
        }
        if !errors.is_empty() {
            return Err(Error::Invalid(errors));
        }
        Ok(NewRollout {
            kind,
            release_id: self.release_id,
            version: self.version,
            plugin_release_id: self.plugin_release_id,
            plugin_action: self.action.unwrap_or_default(),
            channel: self.channel,
            settings,
            failure_threshold: threshold_text(threshold),
            auto_advance: self.auto_advance,
            observe_secs,
        })
    }
}

/// Parses a JSON body into `T`, answering 422 with the field path when it does not fit.
pub(crate) fn parse_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
    limits: &Limits,
) -> Result<T> {
    if body.len() > limits.max_body_bytes {
        return Err(Error::TooLarge {
            limit: limits.max_body_bytes,
        });
    }
    fleet_core::validate::require_object(body).map_err(Error::Invalid)?;
    let mut input = serde_json::Deserializer::from_slice(body);
    // The path of the field that does not fit (`count`, `compatible[0]`), as the validation
    // rules name theirs: serde's own error names no field.
    serde_path_to_error::deserialize(&mut input).map_err(|err| {
        let mut errors = ValidationErrors::default();
        let path = field_path(err.path());
        let text: String = err.inner().to_string().chars().take(300).collect();
        errors.push(path, text);
        Error::Invalid(errors)
    })
}

/// `path` written as validation errors write theirs: `a.b`, `list[2]`, `""` for the body.
fn field_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    use std::fmt::Write as _;
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Map { key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Seq { index } => {
                let _ = write!(out, "[{index}]");
            }
            Segment::Enum { .. } | Segment::Unknown => {}
        }
    }
    // A key is the client's text: echo a bounded piece of it.
    out.chars().take(200).collect()
}

/// Parses a numeric id from the path; anything else is a 404, as for an unknown id.
pub(crate) fn path_id(text: &str) -> Result<i64> {
    text.parse::<i64>().map_err(|_| Error::NotFound)
}

/// Query of the lists that read only a page size: releases, rollouts, plugin releases and
/// plugin requests (its `/openapi.json` entry is in `query_docs::query_parameters`).
#[derive(Debug, Deserialize)]
pub(crate) struct ListQuery {
    /// Page size, 1 to [`MAX_PAGE`](crate::api::MAX_PAGE); [`Self::DEFAULT_LIMIT`] when not
    /// given.
    limit: Option<i64>,
}

impl ListQuery {
    /// The page size when the query names none.
    pub(crate) const DEFAULT_LIMIT: i64 = 100;

    /// The page size asked for, or a 400 outside 1 to [`MAX_PAGE`](crate::api::MAX_PAGE).
    pub(crate) fn limit(&self) -> Result<i64> {
        let limit = self.limit.unwrap_or(Self::DEFAULT_LIMIT);
        if !(1..=crate::api::MAX_PAGE).contains(&limit) {
            return Err(Error::BadRequest(format!(
                "limit must be between 1 and {}",
                crate::api::MAX_PAGE
            )));
        }
        Ok(limit)
    }
}

/// `POST /api/rollouts` (admin).
pub(crate) async fn create(_: Admin, State(state): State<Shared>, body: Bytes) -> Result<Response> {
    create_kind(&state, JobKind::Update, &body).await
}

/// Shared by update and plugin rollouts.
pub(crate) async fn create_kind(state: &Shared, kind: JobKind, body: &[u8]) -> Result<Response> {
    let request: CreateRollout = parse_body(body, &state.settings.limits)?;
    let new = request.into_new(kind, &state.settings.limits)?;
    let detail = state
        .store
        .create_rollout(&new, fleet_core::unix_now())
        .await?;
    Ok((StatusCode::CREATED, Json(detail)).into_response())
}

/// `GET /api/rollouts`.
pub(crate) async fn list(
    _: Support,
    State(state): State<Shared>,
    Query(query): Query<ListQuery>,
) -> Result<Response> {
    let items = state.store.list_rollouts(query.limit()?).await?;
    Ok(Json(serde_json::json!({ "items": items })).into_response())
}

/// `GET /api/rollouts/:id`: the rollout, per-batch counts and every job.
pub(crate) async fn show(
    _: Support,
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response> {
    let id = path_id(&id)?;
    match state.store.rollout(id).await? {
        Some(detail) => Ok(Json(detail).into_response()),
        None => Err(Error::NotFound),
    }
}

async fn act(state: &Shared, id: &str, action: RolloutAction) -> Result<Response> {
    let id = path_id(id)?;
    let detail = state
        .store
        .rollout_action(id, action, fleet_core::unix_now(), state.webhook_configured)
        .await?;
    Ok(Json(detail).into_response())
}

/// `POST /api/rollouts/:id/advance` (admin): 404 unknown, 409 while the batch runs or
/// when the rollout is not running.
pub(crate) async fn advance(
    _: Admin,
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response> {
    act(&state, &id, RolloutAction::Advance).await
}

/// `POST /api/plugins/rollouts/:id/advance` (admin): as [`advance`], for a plugin rollout
/// only; another rollout's id is a 404 here, so the plugin route cannot start an update's
/// next batch.
pub(crate) async fn advance_plugin(
    _: Admin,
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response> {
    let rollout_id = path_id(&id)?;
    match state.store.rollout(rollout_id).await? {
        Some(detail) if detail.rollout.kind == JobKind::Plugin.as_str() => {}
        _ => return Err(Error::NotFound),
    }
    act(&state, &id, RolloutAction::Advance).await
}

/// `POST /api/rollouts/:id/pause` (ops).
pub(crate) async fn pause(
    _: Ops,
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response> {
    act(&state, &id, RolloutAction::Pause).await
}

/// `POST /api/rollouts/:id/resume` (ops).
pub(crate) async fn resume(
    _: Ops,
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response> {
    act(&state, &id, RolloutAction::Resume).await
}

/// `POST /api/rollouts/:id/cancel` (admin).
pub(crate) async fn cancel(
    Authed(_): Admin,
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response> {
    act(&state, &id, RolloutAction::Cancel).await
}

/// How often updated instances' heartbeats are checked against their rollout's SLO maxima.
pub(crate) const SLO_WATCH_INTERVAL: Duration = Duration::from_secs(5);

/// Watches updated instances' heartbeats during their observation window and halts a
/// rollout on an SLO breach. Stops when the control plane is dropped.
pub(crate) fn spawn_watcher(state: std::sync::Weak<crate::AppState>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SLO_WATCH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(state) = state.upgrade() else { return };
            match state
                .store
                .watch_rollout_slo(fleet_core::unix_now(), state.webhook_configured)
                .await
            {
                Ok(0) => {}
                Ok(n) => tracing::warn!(halted = n, "rollouts halted on an SLO breach"),
                Err(err) => tracing::warn!(error = %err, "rollout SLO watch failed"),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(batch: i64, statuses: &[&str]) -> BatchCounts {
        BatchCounts::of(batch, statuses.iter().copied())
    }

    #[test]
    fn batches_keep_the_frozen_order_and_size() {
        let targets: Vec<u32> = (1..=5).collect();
        assert_eq!(
            split_batches(&targets, 2),
            vec![vec![1, 2], vec![3, 4], vec![5]]
        );
        assert_eq!(split_batches(&targets, 10), vec![targets.clone()]);
        assert!(split_batches::<u32>(&[], 3).is_empty());
        assert_eq!(
            split_batches(&targets, 0).len(),
            5,
            "size 0 is treated as 1"
        );
    }

    #[test]
    fn one_failure_over_a_count_threshold_halts_at_once() {
        let c = counts(1, &["rolled_back", "in_progress"]);
        let next = after_job_end(
            RolloutStatus::Running,
            &c,
            Threshold::Count(0),
            true,
            1,
            3,
            true,
            false,
        );
        assert!(
            matches!(next, Next::Halt(ref r) if r.contains("1 of 2")),
            "{next:?}"
        );
        let next = after_job_end(
            RolloutStatus::Running,
            &c,
            Threshold::Count(1),
            true,
            1,
            3,
            true,
            false,
        );
        assert_eq!(next, Next::Stay, "still running, under the threshold");
    }

    #[test]
    fn percent_threshold_counts_against_the_batch() {
        let c = counts(0, &["failed", "succeeded", "succeeded", "succeeded"]);
        let at = |p| {
            after_job_end(
                RolloutStatus::Running,
                &c,
                Threshold::Percent(p),
                false,
                0,
                2,
                true,
                false,
            )
        };
        assert_eq!(at(25.0), Next::Stay);
        assert!(matches!(at(20.0), Next::Halt(_)));
    }

    #[test]
    fn an_ended_batch_advances_only_with_auto_advance_and_completes_at_the_end() {
        let done = counts(0, &["succeeded", "succeeded"]);
        let t = Threshold::Count(0);
        assert_eq!(
            after_job_end(RolloutStatus::Running, &done, t, false, 0, 2, false, false),
            Next::Stay
        );
        assert_eq!(
            after_job_end(RolloutStatus::Running, &done, t, true, 0, 2, false, false),
            Next::StartNext
        );
        assert_eq!(
            after_job_end(RolloutStatus::Running, &done, t, false, 0, 1, false, false),
            Next::Complete
        );
        assert_eq!(
            after_job_end(RolloutStatus::Paused, &done, t, true, 0, 2, false, false),
            Next::Stay,
            "a paused rollout does not advance"
        );
        assert_eq!(
            after_job_end(RolloutStatus::Running, &done, t, true, 1, 3, false, false),
            Next::Stay,
            "a late report of an earlier batch changes nothing"
        );
    }

    #[test]
    fn an_observed_rollout_moves_on_only_when_its_window_is_over() {
        let done = counts(0, &["succeeded", "succeeded"]);
        let t = Threshold::Count(0);
        // The batch ended: an observed rollout neither starts the next batch nor completes.
        assert_eq!(
            after_job_end(RolloutStatus::Running, &done, t, true, 0, 2, false, true),
            Next::Stay
        );
        assert_eq!(
            after_job_end(RolloutStatus::Running, &done, t, false, 0, 1, false, true),
            Next::Stay
        );
        assert_eq!(after_resume(&done, true, 0, 2, true), Next::Stay);
        // A failure past the threshold still halts at once.
        let failed = counts(0, &["failed", "succeeded"]);
        assert!(matches!(
            after_job_end(RolloutStatus::Running, &failed, t, true, 0, 2, true, true),
            Next::Halt(_)
        ));
        // The window: 600 s from the batch's last job end.
        assert_eq!(after_observation(1_000, 600, 1_599, true, 0, 2), Next::Stay);
        assert_eq!(
            after_observation(1_000, 600, 1_600, true, 0, 2),
            Next::StartNext
        );
        assert_eq!(
            after_observation(1_000, 600, 1_600, false, 0, 2),
            Next::Stay
        );
        assert_eq!(
            after_observation(1_000, 600, 1_600, false, 1, 2),
            Next::Complete
        );
    }

    #[test]
    fn only_an_update_rollout_with_an_slo_maximum_and_a_window_is_observed() {
        let with = |p95: Option<f64>| RolloutSettings {
            slo_p95_ms_max: p95,
            ..RolloutSettings::default()
        };
        assert!(observes("update", &with(Some(500.0)), 600));
        assert!(!observes("update", &with(Some(500.0)), 0), "no window");
        assert!(!observes("update", &with(None), 600), "nothing to watch");
        assert!(
            !observes("update", &with(Some(0.0)), 600),
            "0 is off, as in the ERP"
        );
        assert!(!observes("plugin", &with(Some(500.0)), 600));
        let error_rate = RolloutSettings {
            slo_error_rate_max: Some(0.05),
            ..RolloutSettings::default()
        };
        assert!(observes("update", &error_rate, 60));
    }

    #[test]
    fn a_success_after_resume_does_not_halt_again() {
        let c = counts(1, &["rolled_back", "succeeded"]);
        let t = Threshold::Count(0);
        assert_eq!(
            after_job_end(RolloutStatus::Running, &c, t, false, 1, 3, false, false),
            Next::Stay
        );
        assert_eq!(after_resume(&c, false, 1, 3, false), Next::Stay);
        assert_eq!(after_resume(&c, true, 1, 3, false), Next::StartNext);
        assert_eq!(after_resume(&c, false, 2, 3, false), Next::Complete);
        assert_eq!(
            after_resume(&counts(1, &["in_progress"]), true, 1, 3, false),
            Next::Stay
        );
    }

    #[test]
    fn advance_is_refused_while_the_batch_runs_or_the_rollout_is_halted() {
        let running = counts(0, &["succeeded", "in_progress"]);
        let pending = counts(0, &["pending", "succeeded"]);
        let done = counts(0, &["succeeded", "rolled_back"]);
        assert!(check_advance(RolloutStatus::Running, &running, 0, 3).is_err());
        assert!(check_advance(RolloutStatus::Running, &pending, 0, 3).is_err());
        assert!(check_advance(RolloutStatus::Halted, &done, 0, 3).is_err());
        assert!(
            check_advance(RolloutStatus::Running, &done, 2, 3).is_err(),
            "none left"
        );
        assert_eq!(check_advance(RolloutStatus::Running, &done, 0, 3), Ok(()));
    }

    #[test]
    fn operator_transitions() {
        use RolloutAction::*;
        use RolloutStatus::*;
        assert_eq!(transition(Running, Pause), Ok(Paused));
        assert_eq!(transition(Halted, Resume), Ok(Running));
        assert_eq!(transition(Paused, Cancel), Ok(Cancelled));
        assert!(transition(Completed, Cancel).is_err());
        assert!(transition(Running, Resume).is_err());
        assert!(transition(Cancelled, Pause).is_err());
    }

    #[test]
    fn slo_breach_checks_only_set_maxima() {
        let settings = RolloutSettings {
            slo_p95_ms_max: Some(500.0),
            slo_error_rate_max: Some(0.0),
            ..RolloutSettings::default()
        };
        let figures = |v: serde_json::Value| v.as_object().cloned().unwrap_or_default();
        assert_eq!(
            slo_breach(
                &settings,
                &figures(serde_json::json!({"slo_p95_ms": 400.0, "slo_error_rate": 0.9}))
            ),
            None
        );
        assert!(
            slo_breach(
                &settings,
                &figures(serde_json::json!({"slo_p95_ms": 812.5}))
            )
            .is_some_and(|r| r.contains("812.5"))
        );
    }

    #[test]
    fn create_body_accepts_erp_names_and_checks_threshold() {
        let body =
            br#"{"manifestId": 3, "channel": "stable", "batchSize": 2, "autoRollback": false,
            "failure_threshold": "50%"}"#;
        let parsed: CreateRollout = parse_body(body, &Limits::default()).expect("parse");
        let new = parsed
            .into_new(JobKind::Update, &Limits::default())
            .expect("valid");
        assert_eq!(new.release_id, Some(3));
        assert_eq!(new.settings.batch_size, 2);
        assert!(!new.settings.auto_rollback);
        assert_eq!(new.failure_threshold, "50%");
        let bad: CreateRollout = parse_body(
            br#"{"release_id": 1, "channel": "stable", "batch_size": 0, "failure_threshold": "lots"}"#,
            &Limits::default(),
        )
        .expect("parse");
        let Err(Error::Invalid(errors)) = bad.into_new(JobKind::Update, &Limits::default()) else {
            panic!("must be invalid");
        };
        assert_eq!(errors.paths(), ["batch_size", "failure_threshold"]);
    }
}
