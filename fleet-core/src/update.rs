//! Update jobs, their reports, and the rollout settings that travel with them.

use serde::{Deserialize, Serialize};

use crate::manifest::SignedManifest;
use crate::schema;
use crate::validate::{
    Limits, MAX_SLO_ERROR_RATE, MAX_SLO_P95_MS, MAX_SLO_WEBHOOK_RETRY_RATE, Path, Validate,
    ValidationErrors, check_id, check_range, check_text,
};

/// Status of an update (or plugin) job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Created, not yet handed to the agent.
    Pending,
    /// The agent is running it.
    InProgress,
    /// Done.
    Succeeded,
    /// Failed without a rollback (or the rollback itself failed).
    Failed,
    /// Failed and rolled back.
    RolledBack,
}

impl JobStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::InProgress => "in_progress",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::RolledBack => "rolled_back",
        }
    }

    /// Whether the job has ended.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::RolledBack)
    }

    /// Whether the job ended badly.
    pub fn is_failure(self) -> bool {
        matches!(self, Self::Failed | Self::RolledBack)
    }
}

/// JSON Schema of the statuses an agent may report (everything but `pending`).
pub fn reported_status_schema() -> serde_json::Value {
    use JobStatus as J;
    schema::one_of(&[J::InProgress, J::Succeeded, J::Failed, J::RolledBack])
}

/// A step of the update pipeline. `accepted` is recorded by the control plane when it hands
/// the job out; the others are reported by the agent before it runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)] // each variant is the pipeline step of the same name
pub enum UpdateStep {
    Accepted,
    VerifyManifest,
    Backup,
    Pull,
    Migrate,
    Smoke,
    Switch,
    Health,
    GreenUp,
    MigrateSafe,
    Canary,
    SwitchGreen,
    Rollback,
    Done,
}

/// How a release reaches an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Strategy {
    /// Stop, update in place, start.
    #[default]
    Batch,
    /// Start the new version beside the old and shift traffic by canary percentages.
    BlueGreenCanary,
}

/// Rollout settings sent with each job (the ERP's `rollout{}` object).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RolloutSettings {
    /// Update strategy.
    pub strategy: Strategy,
    /// Instances per batch.
    pub batch_size: u32,
    /// Canary traffic percentages, in order, ending at 100.
    pub canary_steps: Vec<u8>,
    /// Seconds to observe each canary step.
    pub canary_step_wait_sec: u32,
    /// p95 latency ceiling during the rollout (0 or absent: not checked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slo_p95_ms_max: Option<f64>,
    /// Error-rate ceiling (0..1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slo_error_rate_max: Option<f64>,
    /// Webhook-retry-rate ceiling.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slo_webhook_retry_rate_max: Option<f64>,
    /// Whether a failure runs the rollback command.
    pub auto_rollback: bool,
}

impl Default for RolloutSettings {
    fn default() -> Self {
        Self {
            strategy: Strategy::Batch,
            batch_size: 10,
            canary_steps: vec![5, 25, 100],
            canary_step_wait_sec: 120,
            slo_p95_ms_max: None,
            slo_error_rate_max: None,
            slo_webhook_retry_rate_max: None,
            auto_rollback: true,
        }
    }
}

impl Validate for RolloutSettings {
    fn validate(&self, _limits: &Limits, at: &Path<'_>, errors: &mut ValidationErrors) {
        if self.batch_size == 0 || self.batch_size > 10_000 {
            errors.push(
                at.field("batch_size").to_string(),
                "must be between 1 and 10000",
            );
        }
        let steps = at.field("canary_steps");
        if self.canary_steps.is_empty() || self.canary_steps.len() > 20 {
            errors.push(steps.to_string(), "must have 1 to 20 steps");
        }
        for (i, window) in self.canary_steps.windows(2).enumerate() {
            if window[1] <= window[0] {
                errors.push(
                    steps.index(i + 1).to_string(),
                    "must be larger than the step before",
                );
            }
        }
        if self.canary_steps.iter().any(|p| *p == 0 || *p > 100)
            || self.canary_steps.last() != Some(&100)
        {
            errors.push(
                steps.to_string(),
                "percentages must be 1..=100 and end at 100",
            );
        }
        if self.canary_step_wait_sec > 86_400 {
            errors.push(
                at.field("canary_step_wait_sec").to_string(),
                "must be at most 86400",
            );
        }
        for (name, value, max) in [
            ("slo_p95_ms_max", self.slo_p95_ms_max, MAX_SLO_P95_MS),
            (
                "slo_error_rate_max",
                self.slo_error_rate_max,
                MAX_SLO_ERROR_RATE,
            ),
            (
                "slo_webhook_retry_rate_max",
                self.slo_webhook_retry_rate_max,
                MAX_SLO_WEBHOOK_RETRY_RATE,
            ),
        ] {
            if let Some(value) = value {
                check_range(errors, &at.field(name), value, 0.0, max);
            }
        }
    }
}

/// Body of `POST /api/updates/next`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateNextRequest {
    /// The asking instance.
    pub instance_id: String,
    /// Its running version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_version: Option<String>,
}

impl Validate for UpdateNextRequest {
    fn validate(&self, limits: &Limits, at: &Path<'_>, errors: &mut ValidationErrors) {
        check_id(
            errors,
            &at.field("instance_id"),
            &self.instance_id,
            limits.max_id_len,
        );
        if let Some(v) = &self.current_version {
            check_text(errors, &at.field("current_version"), v, limits.max_id_len);
        }
    }
}

impl UpdateNextRequest {
    /// JSON Schema of this body (for the OpenAPI document).
    pub fn json_schema() -> serde_json::Value {
        let max = Limits::default().max_id_len;
        schema::object(
            &["instance_id"],
            &[
                ("instance_id", schema::id()),
                ("current_version", schema::nullable(schema::plain_text(max))),
            ],
        )
    }
}

/// An update job handed to an agent (200 answer of `POST /api/updates/next`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateJob {
    /// Job id; every report names it.
    pub job_id: String,
    /// The signed release to install.
    pub manifest: SignedManifest,
    /// How to install it.
    #[serde(default)]
    pub rollout: RolloutSettings,
}

impl RolloutSettings {
    /// JSON Schema of the settings as the control plane sends them.
    pub fn json_schema() -> serde_json::Value {
        let ceiling = serde_json::json!({ "type": "number", "minimum": 0 });
        schema::object(
            &[
                "strategy",
                "batch_size",
                "canary_steps",
                "canary_step_wait_sec",
                "auto_rollback",
            ],
            &[
                (
                    "strategy",
                    schema::one_of(&[Strategy::Batch, Strategy::BlueGreenCanary]),
                ),
                ("batch_size", schema::count()),
                (
                    "canary_steps",
                    serde_json::json!({
                        "type": "array",
                        "items": { "type": "integer", "minimum": 0, "maximum": 100 }
                    }),
                ),
                ("canary_step_wait_sec", schema::count()),
                ("slo_p95_ms_max", ceiling.clone()),
                ("slo_error_rate_max", ceiling.clone()),
                ("slo_webhook_retry_rate_max", ceiling),
                ("auto_rollback", serde_json::json!({ "type": "boolean" })),
            ],
        )
    }
}

impl UpdateJob {
    /// JSON Schema of this answer (for the OpenAPI document).
    pub fn json_schema() -> serde_json::Value {
        schema::object(
            &["job_id", "manifest", "rollout"],
            &[
                ("job_id", schema::id()),
                ("manifest", SignedManifest::json_schema()),
                ("rollout", RolloutSettings::json_schema()),
            ],
        )
    }
}

/// Body of `POST /api/updates/report`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateReport {
    /// The reporting instance (must own the job).
    pub instance_id: String,
    /// The job.
    pub job_id: String,
    /// `in_progress` before each step, then `succeeded`, `failed` or `rolled_back`.
    pub status: JobStatus,
    /// The step about to run or that ended the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<UpdateStep>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Traffic share on the new version during a canary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_percent: Option<u8>,
    /// p95 latency observed during the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric_p95_ms: Option<f64>,
    /// Error rate observed during the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric_error_rate: Option<f64>,
    /// Webhook retry rate observed during the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric_webhook_retry_rate: Option<f64>,
    /// How long the step took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// The last lines of the step's output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tail: Option<String>,
}

impl Validate for UpdateReport {
    fn validate(&self, limits: &Limits, at: &Path<'_>, errors: &mut ValidationErrors) {
        JobReportHead {
            instance_id: &self.instance_id,
            job_id: &self.job_id,
            status: self.status,
            error: self.error.as_deref(),
            output_tail: self.output_tail.as_deref(),
        }
        .validate(limits, at, errors);
        if self.canary_percent.is_some_and(|p| p > 100) {
            errors.push(
                at.field("canary_percent").to_string(),
                "must be between 0 and 100",
            );
        }
        for (name, value, max) in [
            ("metric_p95_ms", self.metric_p95_ms, MAX_SLO_P95_MS),
            (
                "metric_error_rate",
                self.metric_error_rate,
                MAX_SLO_ERROR_RATE,
            ),
            (
                "metric_webhook_retry_rate",
                self.metric_webhook_retry_rate,
                MAX_SLO_WEBHOOK_RETRY_RATE,
            ),
        ] {
            if let Some(value) = value {
                check_range(errors, &at.field(name), value, 0.0, max);
            }
        }
    }
}

impl UpdateReport {
    /// JSON Schema of this body (for the OpenAPI document).
    pub fn json_schema() -> serde_json::Value {
        use UpdateStep as S;
        let max = Limits::default().max_message_len;
        let steps = [
            S::Accepted,
            S::VerifyManifest,
            S::Backup,
            S::Pull,
            S::Migrate,
            S::Smoke,
            S::Switch,
            S::Health,
            S::GreenUp,
            S::MigrateSafe,
            S::Canary,
            S::SwitchGreen,
            S::Rollback,
            S::Done,
        ];
        schema::object(
            &["instance_id", "job_id", "status"],
            &[
                ("instance_id", schema::id()),
                ("job_id", schema::id()),
                ("status", reported_status_schema()),
                ("step", schema::nullable(schema::one_of(&steps))),
                ("error", schema::nullable(schema::plain_text(max))),
                (
                    "canary_percent",
                    schema::nullable(
                        serde_json::json!({ "type": "integer", "minimum": 0, "maximum": 100 }),
                    ),
                ),
                (
                    "metric_p95_ms",
                    schema::nullable(schema::number(MAX_SLO_P95_MS)),
                ),
                (
                    "metric_error_rate",
                    schema::nullable(schema::number(MAX_SLO_ERROR_RATE)),
                ),
                (
                    "metric_webhook_retry_rate",
                    schema::nullable(schema::number(MAX_SLO_WEBHOOK_RETRY_RATE)),
                ),
                ("duration_ms", schema::nullable(schema::count())),
                ("output_tail", schema::nullable(schema::plain_text(max))),
            ],
        )
    }
}

/// What update and plugin reports share, checked in one place: both ids, a status an agent
/// may report (`pending` is the control plane's alone), and the free-text parts.
pub(crate) struct JobReportHead<'a> {
    pub instance_id: &'a str,
    pub job_id: &'a str,
    pub status: JobStatus,
    pub error: Option<&'a str>,
    pub output_tail: Option<&'a str>,
}

impl Validate for JobReportHead<'_> {
    fn validate(&self, limits: &Limits, at: &Path<'_>, errors: &mut ValidationErrors) {
        check_id(
            errors,
            &at.field("instance_id"),
            self.instance_id,
            limits.max_id_len,
        );
        check_id(errors, &at.field("job_id"), self.job_id, limits.max_id_len);
        if self.status == JobStatus::Pending {
            errors.push(
                at.field("status").to_string(),
                "an agent reports in_progress, succeeded, failed or rolled_back",
            );
        }
        validate_report_tail(self.error, self.output_tail, limits, at, errors);
    }
}

/// Checks the free-text parts shared by every pipeline report.
pub(crate) fn validate_report_tail(
    error: Option<&str>,
    output_tail: Option<&str>,
    limits: &Limits,
    at: &Path<'_>,
    errors: &mut ValidationErrors,
) {
    if let Some(error) = error {
        check_text(errors, &at.field("error"), error, limits.max_message_len);
    }
    if let Some(tail) = output_tail {
        check_text(
            errors,
            &at.field("output_tail"),
            tail,
            limits.max_message_len,
        );
    }
}
