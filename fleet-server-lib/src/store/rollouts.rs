//! Persistence of releases, rollouts and their jobs, the plugin marketplace and restore
//! verification: the [`RolloutStore`] trait and its types. The SQL both backends share is
//! in `rollouts_sql.rs`.

use std::sync::Arc;

use async_trait::async_trait;
use fleet_core::command::Pipeline;
use fleet_core::plugin::{PluginAction, PluginRequest};
use fleet_core::restore::RestoreReport;
use fleet_core::update::{JobStatus, RolloutSettings};
use serde::{Serialize, Serializer};

use crate::Result;
use crate::rollouts::BatchCounts;

/// What a rollout job installs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// A release, through the update pipeline.
    Update,
    /// A plugin action, through the plugin pipeline.
    Plugin,
}

impl JobKind {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Update => "update",
            Self::Plugin => "plugin",
        }
    }

    /// Reads a stored name.
    pub fn parse(text: &str) -> Option<Self> {
        [Self::Update, Self::Plugin]
            .into_iter()
            .find(|kind| kind.as_str() == text)
    }

    /// The agent pipeline that polls for jobs of this kind.
    pub fn pipeline(self) -> Pipeline {
        match self {
            Self::Update => Pipeline::Update,
            Self::Plugin => Pipeline::Plugin,
        }
    }
}

/// Jobs that became available to instances: a rollout batch started (at creation, on
/// advance, auto-advance or resume), a plugin request was approved, a restore verification
/// was scheduled. The store announces them once the transaction that made them available
/// committed ([`RolloutStore::jobs_available`]), so the control plane can tell the agents
/// connected to it to poll now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobsAvailable {
    /// The pipeline that polls for them.
    pub pipeline: Pipeline,
    /// The instances that have one.
    pub instance_ids: Vec<String>,
}

/// Announcements queued per listener before the oldest are dropped: a nudge lost that way
/// only leaves the job to the agent's next poll.
const ANNOUNCEMENTS_QUEUED: usize = 1024;

/// Where a built-in store announces [`JobsAvailable`]; every control plane built on the
/// store listens.
#[derive(Debug, Clone)]
pub(crate) struct JobAnnouncer(tokio::sync::broadcast::Sender<Arc<JobsAvailable>>);

impl Default for JobAnnouncer {
    fn default() -> Self {
        Self(tokio::sync::broadcast::channel(ANNOUNCEMENTS_QUEUED).0)
    }
}

impl JobAnnouncer {
    /// Announces that `instance_ids` have jobs for `pipeline`. Call it after the commit: an
    /// agent that polls before it finds nothing.
    pub fn announce(&self, pipeline: Pipeline, instance_ids: Vec<String>) {
        if instance_ids.is_empty() {
            return;
        }
        // With nobody listening (no control plane on this store) there is nobody to tell.
        let _ = self.0.send(Arc::new(JobsAvailable {
            pipeline,
            instance_ids,
        }));
    }

    /// A new listener, which receives what is announced from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Arc<JobsAvailable>> {
        self.0.subscribe()
    }
}

/// An operator action on a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutAction {
    /// Start the next batch.
    Advance,
    /// Stop handing out jobs.
    Pause,
    /// Continue after a pause or a halt.
    Resume,
    /// Stop for good.
    Cancel,
}

impl RolloutAction {
    /// The verb.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Advance => "advance",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Cancel => "cancel",
        }
    }
}

/// A validated rollout to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRollout {
    /// Update or plugin.
    pub kind: JobKind,
    /// The release (update rollouts), by id ...
    pub release_id: Option<i64>,
    /// ... or by version on the rollout's channel.
    pub version: Option<String>,
    /// The plugin release (plugin rollouts).
    pub plugin_release_id: Option<i64>,
    /// What every plugin job does.
    pub plugin_action: PluginAction,
    /// Instances of this channel are the targets.
    pub channel: String,
    /// Settings sent with each job.
    pub settings: RolloutSettings,
    /// Failures per batch that halt the rollout (`"0"`, `"25%"`).
    pub failure_threshold: String,
    /// Start the next batch as soon as one ends well.
    pub auto_advance: bool,
    /// Seconds an updated instance's heartbeats are watched against the SLO maxima.
    pub observe_secs: i64,
}

fn json_text<S: Serializer>(text: &Option<String>, s: S) -> std::result::Result<S::Ok, S::Error> {
    match text
        .as_deref()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok())
    {
        Some(value) => value.serialize(s),
        None => s.serialize_none(),
    }
}

fn json_text_required<S: Serializer>(text: &str, s: S) -> std::result::Result<S::Ok, S::Error> {
    serde_json::from_str::<serde_json::Value>(text)
        .unwrap_or(serde_json::Value::Null)
        .serialize(s)
}

/// A stored release.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Release {
    /// Row id (the ERP's `manifestId`).
    pub id: i64,
    /// Version.
    pub version: String,
    /// Channel.
    pub channel: String,
    /// `ed25519` or `hmac-sha256`.
    pub scheme: String,
    /// The signed manifest exactly as verified (unknown fields included).
    #[serde(serialize_with = "json_text_required")]
    pub manifest: String,
    /// When it was stored.
    pub created_at: i64,
}

/// A rollout.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Rollout {
    /// Row id.
    pub id: i64,
    /// `update` or `plugin`.
    pub kind: String,
    /// The release (update rollouts).
    pub release_id: Option<i64>,
    /// The release's version (update rollouts).
    pub version: Option<String>,
    /// The plugin release (plugin rollouts).
    pub plugin_release_id: Option<i64>,
    /// `install`, `update` or `remove` (plugin rollouts).
    pub plugin_action: Option<String>,
    /// Target channel.
    pub channel: String,
    /// The settings sent with each job.
    #[serde(serialize_with = "json_text_required")]
    pub settings: String,
    /// Failures per batch that halt it.
    pub failure_threshold: String,
    /// Whether batches follow each other by themselves.
    pub auto_advance: bool,
    /// SLO observation window after an instance updated, in seconds.
    pub observe_secs: i64,
    /// `running`, `paused`, `halted`, `cancelled` or `completed`.
    pub status: String,
    /// Index of the batch started last (from 0).
    pub current_batch: i64,
    /// Number of batches.
    pub batch_count: i64,
    /// Why it halted.
    pub halt_reason: Option<String>,
    /// When it was created.
    pub created_at: i64,
    /// Last change.
    pub updated_at: i64,
}

/// One target of a rollout (or a single approved plugin job).
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct RolloutJob {
    /// Row id; the wire `job_id` is its decimal text.
    pub id: i64,
    /// The rollout, if any.
    pub rollout_id: Option<i64>,
    /// `update` or `plugin`.
    pub kind: String,
    /// Batch index, from 0.
    pub batch: i64,
    /// The target instance.
    pub instance_id: String,
    /// `queued`, `pending`, `in_progress`, `succeeded`, `failed`, `rolled_back`, `cancelled`.
    pub status: String,
    /// Last step reported.
    pub step: Option<String>,
    /// Last error reported.
    pub error: Option<String>,
    /// Last canary percentage reported.
    pub canary_percent: Option<i64>,
    /// Last metrics reported (`metric_*`).
    #[serde(serialize_with = "json_text")]
    pub metrics: Option<String>,
    /// Duration of the last reported step or of the job.
    pub duration_ms: Option<i64>,
    /// Output tail of the last reported step.
    pub output_tail: Option<String>,
    /// Plugin jobs: `{name, version, action}`.
    #[serde(serialize_with = "json_text")]
    pub payload: Option<String>,
    /// When it was created.
    pub created_at: i64,
    /// Last change.
    pub updated_at: i64,
    /// When it was handed out.
    pub started_at: Option<i64>,
    /// When it ended.
    pub finished_at: Option<i64>,
}

/// A rollout with its per-batch counts and every job.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RolloutDetail {
    /// The rollout.
    #[serde(flatten)]
    pub rollout: Rollout,
    /// Counts per batch, in order.
    pub batches: Vec<BatchCounts>,
    /// Every job, by batch.
    pub jobs: Vec<RolloutJob>,
    /// Until when (Unix seconds) the current batch's updated instances are watched against
    /// the SLO maxima before the rollout moves on; `null` when it is not waiting for that.
    pub observed_until: Option<i64>,
}

/// A report as received from an agent, kind-independent.
#[derive(Debug, Clone, PartialEq)]
pub struct JobReport {
    /// The wire job id.
    pub job_id: String,
    /// The reported status (never `pending`).
    pub status: JobStatus,
    /// The step, in its wire name.
    pub step: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
    /// Canary percentage.
    pub canary_percent: Option<u8>,
    /// `metric_*` figures as a JSON object.
    pub metrics: Option<serde_json::Value>,
    /// Step or job duration.
    pub duration_ms: Option<u64>,
    /// Output tail.
    pub output_tail: Option<String>,
}

/// A job handed to an agent, with what it needs.
#[derive(Debug, Clone, PartialEq)]
pub struct HandedJob {
    /// The job.
    pub job: RolloutJob,
    /// Jobs of a rollout: its settings.
    pub settings: Option<RolloutSettings>,
    /// Update jobs: the signed manifest exactly as stored.
    pub manifest: Option<serde_json::Value>,
}

/// One report of a job, as received.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct JobEvent {
    /// Row id.
    pub id: i64,
    /// The reported status.
    pub status: String,
    /// The reported step.
    pub step: Option<String>,
    /// The reported error.
    pub error: Option<String>,
    /// When it arrived.
    pub created_at: i64,
}

/// A plugin release in the marketplace.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct PluginRelease {
    /// Row id.
    pub id: i64,
    /// Plugin name.
    pub name: String,
    /// Plugin version.
    pub version: String,
    /// Control-plane versions it works with (JSON list; `*` and `0.1.*` patterns).
    #[serde(serialize_with = "json_text_required")]
    pub compatible: String,
    /// Whether it may be installed.
    pub approved: bool,
    /// Notes for operators.
    pub notes: Option<String>,
    /// When it was published.
    pub created_at: i64,
}

/// A plugin request from an instance.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct PluginRequestRecord {
    /// Row id.
    pub id: i64,
    /// The asking instance.
    pub instance_id: String,
    /// Plugin name.
    pub name: String,
    /// Wanted version.
    pub version: String,
    /// `install`, `update` or `remove`.
    pub action: String,
    /// Why, from the instance.
    pub reason: Option<String>,
    /// `pending`, `approved` or `rejected`.
    pub status: String,
    /// The job approval created.
    pub job_id: Option<i64>,
    /// When it arrived.
    pub created_at: i64,
    /// When it was approved or rejected.
    pub decided_at: Option<i64>,
    /// Why it was rejected, when the admin said (or, for a copy of a pending request stored
    /// before copies were refused, which request it copied).
    pub rejection_reason: Option<String>,
    /// How the job is doing (`pending`, `in_progress`, `succeeded`, `failed`, `rolled_back`),
    /// once approved: a single request's job belongs to no rollout, so this is where its
    /// outcome shows.
    #[sqlx(default)]
    pub job_status: Option<String>,
    /// The step the job reached, or failed or rolled back at.
    #[sqlx(default)]
    pub job_step: Option<String>,
    /// Why the job failed.
    #[sqlx(default)]
    pub job_error: Option<String>,
}

/// What [`PluginStore::create_plugin_request`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordedPluginRequest {
    /// The request is new: recorded, pending.
    Created(PluginRequestRecord),
    /// The instance already had the same request pending: that one, unchanged.
    AlreadyPending(PluginRequestRecord),
}

/// A restore verification.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Restore {
    /// Row id; the wire `restore_id` is its decimal text.
    pub id: i64,
    /// The installation's row id.
    pub installation_id: i64,
    /// The instance.
    pub instance_id: String,
    /// Where to restore (`staging`).
    pub environment: String,
    /// The backup to restore, when known.
    pub backup_id: Option<String>,
    /// `scheduled`, `in_progress`, `verified`, `failed`, `skipped` (by the agent, or by the
    /// control plane when the installation has no backup to verify), `timed_out` (no
    /// report within the restore timeout) or `cancelled` (by an operator).
    pub status: String,
    /// What went wrong.
    pub error: Option<String>,
    /// How long the verification took.
    pub duration_ms: Option<i64>,
    /// Output tail of the verify command.
    pub output_tail: Option<String>,
    /// When it was scheduled.
    pub created_at: i64,
    /// When it was handed out.
    pub started_at: Option<i64>,
    /// When it was reported.
    pub finished_at: Option<i64>,
}

/// Whether a plugin release marked compatible with `patterns` works with `version`
/// (`*`, an exact version, or a prefix ending in `*` such as `0.1.*`).
pub fn is_compatible(patterns: &[String], version: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => version.starts_with(prefix),
        None => p == version,
    })
}

/// Releases, rollouts and the jobs they hand out, and the replay check of signed pipeline
/// requests. Implemented by both backends.
#[async_trait]
pub trait RolloutStore: Send + Sync {
    /// Stores a verified release; 409 when the channel already has that version.
    async fn create_release(
        &self,
        version: &str,
        channel: &str,
        scheme: &str,
        manifest: &str,
        now: i64,
    ) -> Result<Release>;

    /// Releases, newest first.
    async fn list_releases(&self, limit: i64) -> Result<Vec<Release>>;

    /// Creates a rollout: freezes its targets (instances of the channel not already on
    /// the version), splits them into batches and starts the first.
    async fn create_rollout(&self, new: &NewRollout, now: i64) -> Result<RolloutDetail>;

    /// Rollouts, newest first.
    async fn list_rollouts(&self, limit: i64) -> Result<Vec<Rollout>>;

    /// One rollout with its counts and jobs.
    async fn rollout(&self, id: i64) -> Result<Option<RolloutDetail>>;

    /// Advance, pause, resume or cancel: 404 unknown, 409 when the rules refuse.
    async fn rollout_action(
        &self,
        id: i64,
        action: RolloutAction,
        now: i64,
        forward: bool,
    ) -> Result<RolloutDetail>;

    /// Hands the instance its oldest pending job of `kind` (marking it in progress, step
    /// `accepted`), or `None`.
    async fn next_job(
        &self,
        instance_id: &str,
        kind: JobKind,
        now: i64,
    ) -> Result<Option<HandedJob>>;

    /// Records an agent's report on its own job, then applies the rollout rules (halt on
    /// the failure threshold, auto-advance, completion). 404 for a job that is not the
    /// instance's; 409 for a report that contradicts an ended job.
    async fn report_job(
        &self,
        instance_id: &str,
        kind: JobKind,
        report: &JobReport,
        now: i64,
        forward: bool,
    ) -> Result<RolloutJob>;

    /// Every report received for a job, oldest first.
    async fn job_events(&self, job_id: i64) -> Result<Vec<JobEvent>>;

    /// Halts running rollouts whose updated instances' heartbeats breach the rollout's SLO
    /// maxima within the observation window; returns how many halted.
    async fn watch_rollout_slo(&self, now: i64, forward: bool) -> Result<u64>;

    /// Remembers a v1 message id of a signed pipeline request (next, report, request) and
    /// answers `true` when it was already seen with the same timestamp: a replay, refused. (A
    /// retry signs the same id again with a new timestamp, and is let through.)
    async fn is_replay(
        &self,
        instance_id: &str,
        msg_id: &str,
        signed_at: i64,
        now: i64,
    ) -> Result<bool>;

    /// Listens for the jobs this store makes available from now on (rollouts, plugin
    /// approvals and restore schedules alike), each announced after its commit. The control
    /// plane subscribes when it is built and tells connected agents to poll at once. `None`
    /// (the default) for a store that does not announce: agents then find their jobs at
    /// their next poll.
    fn jobs_available(&self) -> Option<tokio::sync::broadcast::Receiver<Arc<JobsAvailable>>> {
        None
    }

    /// The pipelines in which `instance_id` has a job its next poll would be handed (an
    /// update or plugin job of a running rollout or an approved request, and a scheduled
    /// restore verification), in [`Pipeline`] order. The control plane asks once when an
    /// agent that reads `jobs_waiting` frames connects, since the announcements made while
    /// its socket was down reached nobody. The default answers none: such an agent then
    /// finds its jobs at its next regular poll.
    async fn waiting_pipelines(&self, _instance_id: &str) -> Result<Vec<Pipeline>> {
        Ok(Vec::new())
    }
}

/// The plugin marketplace: releases, requests from instances, approvals. Implemented by
/// both backends.
#[async_trait]
pub trait PluginStore: Send + Sync {
    /// Publishes a plugin release; 409 when that name and version exist.
    async fn create_plugin_release(
        &self,
        name: &str,
        version: &str,
        compatible: &[String],
        notes: Option<&str>,
        now: i64,
    ) -> Result<PluginRelease>;

    /// Plugin releases, newest first.
    async fn list_plugin_releases(&self, limit: i64) -> Result<Vec<PluginRelease>>;

    /// Records a (verified) request from an instance, or, when the instance already has the
    /// same request (plugin, version and action) pending, answers that one and records
    /// nothing: at most one is ever pending, however many arrive at once.
    async fn create_plugin_request(
        &self,
        request: &PluginRequest,
        now: i64,
    ) -> Result<RecordedPluginRequest>;

    /// Plugin requests, newest first.
    async fn list_plugin_requests(&self, limit: i64) -> Result<Vec<PluginRequestRecord>>;

    /// Approves a request: needs an approved release of that name and version that is
    /// compatible with `control_plane_version` (409 otherwise), and creates the job.
    async fn approve_plugin_request(
        &self,
        id: i64,
        control_plane_version: &str,
        now: i64,
    ) -> Result<PluginRequestRecord>;

    /// Rejects a pending request, keeping `reason`: 404 unknown, 409 when it was already
    /// approved or rejected.
    async fn reject_plugin_request(
        &self,
        id: i64,
        reason: Option<&str>,
        now: i64,
    ) -> Result<PluginRequestRecord>;
}

/// Why installations were passed over by [`RestoreStore::schedule_restores`], counted. Each
/// installation counts once, under the first reason that applies, in this order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct NotScheduled {
    /// Enrolled, but no heartbeat yet.
    pub never_reported: i64,
    /// A verification is already scheduled or in progress in the environment.
    pub open: i64,
    /// Verified in the environment in the last 7 days.
    pub verified_recently: i64,
    /// No backup with an id reported: nothing to verify. The first time, a `skipped`
    /// verification with the reason is recorded for it.
    pub no_backup: i64,
    /// Due, but past the requested count.
    pub beyond_count: i64,
    /// Archived by an operator: never scheduled.
    pub archived: i64,
}

/// What [`RestoreStore::schedule_restores`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct RestoreSchedule {
    /// The verifications recorded: `scheduled` ones, and `skipped` ones for installations
    /// with no backup.
    pub items: Vec<Restore>,
    /// The installations passed over, by reason.
    pub not_scheduled: NotScheduled,
}

/// Restore verifications: scheduling, handing out, reports, timeouts. Implemented by both
/// backends.
#[async_trait]
pub trait RestoreStore: Send + Sync {
    /// Schedules verifications of their latest backup for up to `count` installations with
    /// the freshest heartbeats, skipping any verified in `environment` in the last 7 days or
    /// with one already open there. Installations with no backup to verify are never
    /// scheduled: up to `count` of them get a `skipped` verification with the reason, once
    /// per environment.
    async fn schedule_restores(
        &self,
        count: i64,
        environment: &str,
        now: i64,
    ) -> Result<RestoreSchedule>;

    /// Hands the instance its oldest scheduled verification, or `None`.
    async fn next_restore(&self, instance_id: &str, now: i64) -> Result<Option<Restore>>;

    /// Records the outcome of the instance's own verification; a `failed` one raises an
    /// error alert (forwarded when `forward`).
    async fn report_restore(
        &self,
        report: &RestoreReport,
        now: i64,
        forward: bool,
    ) -> Result<Restore>;

    /// Cancels a verification that is scheduled or handed out: no agent is handed it any
    /// more, a report on it is refused, and the installation can be scheduled again. `error`
    /// says who cancelled it. 404 unknown, 409 when it already ended.
    async fn cancel_restore(&self, id: i64, error: &str, now: i64) -> Result<Restore>;

    /// The instance's own verification `id` as it stands, for its agent to learn whether it
    /// still runs; `None` when there is none with that id or it is another instance's.
    async fn instance_restore(&self, instance_id: &str, id: i64) -> Result<Option<Restore>>;

    /// Restore verifications, newest first; only the instance's when `instance_id` is given.
    async fn list_restores(&self, instance_id: Option<&str>, limit: i64) -> Result<Vec<Restore>>;

    /// Marks `timed_out` the verifications no agent took within `timeout_secs` of being
    /// scheduled, and those handed out that got no report within `timeout_secs`, so the
    /// installation can be scheduled again; each raises a `restore_failed` alert (forwarded
    /// when `forward`). Handles a bounded number per call (the next call continues) and
    /// returns how many it marked.
    async fn time_out_restores(&self, timeout_secs: i64, now: i64, forward: bool) -> Result<u64>;
}

/// A rollout row locked for a change, with what its rules need.
#[derive(Debug, Clone)]
pub(crate) struct LockedRollout {
    /// What its jobs install.
    pub kind: JobKind,
    pub status: crate::rollouts::RolloutStatus,
    pub current_batch: i64,
    pub batch_count: i64,
    pub auto_advance: bool,
    /// Failures per batch that halt it.
    pub threshold: fleet_core::command::Threshold,
    /// Whether it waits out an observation window after each batch
    /// ([`observes`](crate::rollouts::observes)).
    pub observing: bool,
}
