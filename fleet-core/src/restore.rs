//! Restore verification: the control plane asks an instance to prove a backup restores.

use serde::{Deserialize, Serialize};

use crate::schema;
use crate::update::validate_report_tail;
use crate::validate::{Limits, Path, Validate, ValidationErrors, check_id};

/// Status of a restore verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestoreStatus {
    /// Scheduled, not yet handed out.
    Scheduled,
    /// Handed to the agent.
    InProgress,
    /// The backup restored and passed the checks.
    Verified,
    /// It did not.
    Failed,
    /// The agent could not try (no backup, no verify command).
    Skipped,
}

impl RestoreStatus {
    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::InProgress => "in_progress",
            Self::Verified => "verified",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
        }
    }
}

/// A restore verification handed to an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreJob {
    /// Restore id; the report names it.
    pub restore_id: String,
    /// Where to restore (`staging`).
    pub environment: String,
    /// The backup to restore, when the control plane knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_id: Option<String>,
}

impl RestoreJob {
    /// JSON Schema of this answer (for the OpenAPI document).
    pub fn json_schema() -> serde_json::Value {
        schema::object(
            &["restore_id", "environment"],
            &[
                ("restore_id", schema::id()),
                ("environment", schema::id()),
                ("backup_id", schema::id()),
            ],
        )
    }
}

/// The ids every agent body on a verification carries.
fn check_instance_and_restore(
    instance_id: &str,
    restore_id: &str,
    limits: &Limits,
    at: &Path<'_>,
    errors: &mut ValidationErrors,
) {
    check_id(
        errors,
        &at.field("instance_id"),
        instance_id,
        limits.max_id_len,
    );
    check_id(
        errors,
        &at.field("restore_id"),
        restore_id,
        limits.max_id_len,
    );
}

/// Body of `POST /api/restores/report`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestoreReport {
    /// The reporting instance.
    pub instance_id: String,
    /// The restore.
    pub restore_id: String,
    /// `verified`, `failed` or `skipped`.
    pub status: RestoreStatus,
    /// What was found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How long it took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// The last lines of the verify command's output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tail: Option<String>,
}

impl Validate for RestoreReport {
    fn validate(&self, limits: &Limits, at: &Path<'_>, errors: &mut ValidationErrors) {
        check_instance_and_restore(&self.instance_id, &self.restore_id, limits, at, errors);
        if !matches!(
            self.status,
            RestoreStatus::Verified | RestoreStatus::Failed | RestoreStatus::Skipped
        ) {
            errors.push(
                at.field("status").to_string(),
                "must be verified, failed or skipped",
            );
        }
        validate_report_tail(
            self.error.as_deref(),
            self.output_tail.as_deref(),
            limits,
            at,
            errors,
        );
    }
}

impl RestoreReport {
    /// JSON Schema of this body (for the OpenAPI document).
    pub fn json_schema() -> serde_json::Value {
        use RestoreStatus as R;
        let max = Limits::default().max_message_len;
        schema::object(
            &["instance_id", "restore_id", "status"],
            &[
                ("instance_id", schema::id()),
                ("restore_id", schema::id()),
                (
                    "status",
                    schema::one_of(&[R::Verified, R::Failed, R::Skipped]),
                ),
                ("error", schema::nullable(schema::plain_text(max))),
                ("duration_ms", schema::nullable(schema::count())),
                ("output_tail", schema::nullable(schema::plain_text(max))),
            ],
        )
    }
}

/// Body of `POST /api/restores/status`: an agent asks how the verification it runs stands
/// (the answer is `{restore_id, status}`), to stop its verify command once the control plane
/// ended it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreStatusRequest {
    /// The asking instance.
    pub instance_id: String,
    /// The verification, as `/api/restores/next` handed it out.
    pub restore_id: String,
}

impl Validate for RestoreStatusRequest {
    fn validate(&self, limits: &Limits, at: &Path<'_>, errors: &mut ValidationErrors) {
        check_instance_and_restore(&self.instance_id, &self.restore_id, limits, at, errors);
    }
}

impl RestoreStatusRequest {
    /// JSON Schema of the body; unknown keys are refused.
    pub fn json_schema() -> serde_json::Value {
        let mut schema = schema::object(
            &["instance_id", "restore_id"],
            &[("instance_id", schema::id()), ("restore_id", schema::id())],
        );
        schema["additionalProperties"] = false.into();
        schema
    }
}
