//! Plugin jobs, reports and requests, and the rules for plugin names and versions.

use serde::{Deserialize, Serialize};

use crate::schema;
use crate::update::{JobReportHead, JobStatus};
use crate::validate::{Limits, Path, Validate, ValidationErrors, check_id};

/// What to do with a plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PluginAction {
    /// Install it (the default, as in the ERP agent).
    #[default]
    Install,
    /// Move to another version.
    Update,
    /// Uninstall it.
    Remove,
}

impl PluginAction {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Install => "install",
            Self::Update => "update",
            Self::Remove => "remove",
        }
    }
}

/// The plugin name rule of [`is_valid_plugin_name`] as a JSON Schema pattern.
pub const PLUGIN_NAME_PATTERN: &str = "^(@[a-z0-9][a-z0-9._-]*/)?[a-z0-9][a-z0-9._-]*$";
/// The plugin version rule of [`is_valid_plugin_version`] as a JSON Schema pattern.
pub const PLUGIN_VERSION_PATTERN: &str = "^[0-9A-Za-z][0-9A-Za-z.+-]*$";

/// JSON Schema of a plugin name.
pub fn plugin_name_schema() -> serde_json::Value {
    serde_json::json!({ "type": "string", "maxLength": MAX_PLUGIN_NAME_LEN, "pattern": PLUGIN_NAME_PATTERN })
}

/// JSON Schema of a plugin version.
pub fn plugin_version_schema() -> serde_json::Value {
    serde_json::json!({ "type": "string", "maxLength": MAX_PLUGIN_VERSION_LEN, "pattern": PLUGIN_VERSION_PATTERN })
}

/// JSON Schema of a plugin action.
pub fn plugin_action_schema() -> serde_json::Value {
    schema::one_of(&[
        PluginAction::Install,
        PluginAction::Update,
        PluginAction::Remove,
    ])
}

/// A step of the plugin pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)] // each variant is the pipeline step of the same name
pub enum PluginStep {
    Accepted,
    Install,
    Update,
    Remove,
    Smoke,
    Rollback,
    Done,
}

/// Longest plugin name, in bytes.
pub const MAX_PLUGIN_NAME_LEN: usize = 100;
/// Longest plugin version, in bytes.
pub const MAX_PLUGIN_VERSION_LEN: usize = 64;

/// Whether `name` is a safe plugin name: `[a-z0-9]` first, then `[a-z0-9._-]`, with at most
/// one `@scope/` prefix. Nothing a shell would interpret can pass.
pub fn is_valid_plugin_name(name: &str) -> bool {
    let bare = match name.strip_prefix('@') {
        Some(scoped) => match scoped.split_once('/') {
            Some((scope, rest)) if is_plain_name(scope) => rest,
            _ => return false,
        },
        None => name,
    };
    name.len() <= MAX_PLUGIN_NAME_LEN && is_plain_name(bare)
}

fn is_plain_name(text: &str) -> bool {
    let mut bytes = text.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && bytes.all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
}

/// Whether `version` is a safe version string: `[0-9A-Za-z]` first, then `[0-9A-Za-z.+-]`.
pub fn is_valid_plugin_version(version: &str) -> bool {
    let mut bytes = version.bytes();
    version.len() <= MAX_PLUGIN_VERSION_LEN
        && bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'-'))
}

/// A plugin and what to do with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginSpec {
    /// Plugin name.
    pub name: String,
    /// Plugin version.
    pub version: String,
    /// Install, update or remove.
    #[serde(default)]
    pub action: PluginAction,
}

impl Validate for PluginSpec {
    fn validate(&self, _limits: &Limits, at: &Path<'_>, errors: &mut ValidationErrors) {
        if !is_valid_plugin_name(&self.name) {
            errors.push(
                at.field("name").to_string(),
                "must be a plugin name such as billing-export or @acme/report",
            );
        }
        if !is_valid_plugin_version(&self.version) {
            errors.push(
                at.field("version").to_string(),
                "must be a version such as 1.2.3 or 2.0.0-rc.1",
            );
        }
    }
}

/// Body of `POST /api/plugins/next` (and `/api/restores/next`): who is asking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NextJobRequest {
    /// The asking instance.
    pub instance_id: String,
}

impl Validate for NextJobRequest {
    fn validate(&self, limits: &Limits, at: &Path<'_>, errors: &mut ValidationErrors) {
        check_id(
            errors,
            &at.field("instance_id"),
            &self.instance_id,
            limits.max_id_len,
        );
    }
}

impl NextJobRequest {
    /// JSON Schema of this body (for the OpenAPI document).
    pub fn json_schema() -> serde_json::Value {
        schema::object(&["instance_id"], &[("instance_id", schema::id())])
    }
}

/// A plugin job handed to an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginJob {
    /// Job id.
    pub job_id: String,
    /// The plugin and the action.
    pub plugin: PluginSpec,
    /// The settings of the rollout the job belongs to, as update jobs carry them (the agent
    /// reads `auto_rollback`); absent for a job of a single approved request, and from
    /// control planes older than the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<crate::update::RolloutSettings>,
}

impl PluginSpec {
    /// JSON Schema of a plugin and its action as the control plane sends them (in a job, and
    /// as a plugin job's payload).
    pub fn json_schema() -> serde_json::Value {
        schema::object(
            &["name", "version", "action"],
            &[
                ("name", schema::id()),
                ("version", schema::id()),
                ("action", plugin_action_schema()),
            ],
        )
    }
}

impl PluginJob {
    /// JSON Schema of this answer (for the OpenAPI document).
    pub fn json_schema() -> serde_json::Value {
        schema::object(
            &["job_id", "plugin"],
            &[
                ("job_id", schema::id()),
                ("plugin", PluginSpec::json_schema()),
                ("rollout", crate::update::RolloutSettings::json_schema()),
            ],
        )
    }
}

/// Body of `POST /api/plugins/report`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginReport {
    /// The reporting instance.
    pub instance_id: String,
    /// The job.
    pub job_id: String,
    /// Status, as for update jobs.
    pub status: JobStatus,
    /// The step about to run or that ended the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<PluginStep>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How long the step or job took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// The last lines of output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tail: Option<String>,
}

impl Validate for PluginReport {
    fn validate(&self, limits: &Limits, at: &Path<'_>, errors: &mut ValidationErrors) {
        JobReportHead {
            instance_id: &self.instance_id,
            job_id: &self.job_id,
            status: self.status,
            error: self.error.as_deref(),
            output_tail: self.output_tail.as_deref(),
        }
        .validate(limits, at, errors);
    }
}

impl PluginReport {
    /// JSON Schema of this body (for the OpenAPI document).
    pub fn json_schema() -> serde_json::Value {
        use PluginStep as S;
        let max = Limits::default().max_message_len;
        schema::object(
            &["instance_id", "job_id", "status"],
            &[
                ("instance_id", schema::id()),
                ("job_id", schema::id()),
                ("status", crate::update::reported_status_schema()),
                (
                    "step",
                    schema::nullable(schema::one_of(&[
                        S::Accepted,
                        S::Install,
                        S::Update,
                        S::Remove,
                        S::Smoke,
                        S::Rollback,
                        S::Done,
                    ])),
                ),
                ("error", schema::nullable(schema::plain_text(max))),
                ("duration_ms", schema::nullable(schema::count())),
                ("output_tail", schema::nullable(schema::plain_text(max))),
            ],
        )
    }
}

/// Body of `POST /api/plugins/requests`: an instance asks for a plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginRequest {
    /// The asking instance.
    pub instance_id: String,
    /// Plugin name.
    pub name: String,
    /// Wanted version.
    pub version: String,
    /// Install, update or remove.
    #[serde(default)]
    pub action: PluginAction,
    /// Why, for the approver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Validate for PluginRequest {
    fn validate(&self, limits: &Limits, at: &Path<'_>, errors: &mut ValidationErrors) {
        check_id(
            errors,
            &at.field("instance_id"),
            &self.instance_id,
            limits.max_id_len,
        );
        PluginSpec {
            name: self.name.clone(),
            version: self.version.clone(),
            action: self.action,
        }
        .validate(limits, at, errors);
        if let Some(reason) = &self.reason {
            crate::validate::check_text(
                errors,
                &at.field("reason"),
                reason,
                limits.max_message_len,
            );
        }
    }
}

impl PluginRequest {
    /// JSON Schema of this body (for the OpenAPI document).
    pub fn json_schema() -> serde_json::Value {
        schema::object(
            &["instance_id", "name", "version"],
            &[
                ("instance_id", schema::id()),
                ("name", plugin_name_schema()),
                ("version", plugin_version_schema()),
                ("action", plugin_action_schema()),
                (
                    "reason",
                    schema::nullable(schema::plain_text(Limits::default().max_message_len)),
                ),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::UpdateReport;
    use crate::validate::{DecodeError, decode};

    #[test]
    fn plugin_and_update_reports_refuse_the_same_bad_heads() {
        let limits = Limits::default();
        let long_id = "j".repeat(limits.max_id_len + 1);
        let long_tail = "x".repeat(limits.max_message_len + 1);
        let body = serde_json::json!({"instance_id": "acme\u{7}", "job_id": long_id,
            "status": "pending", "error": long_tail, "output_tail": "fine"})
        .to_string();
        let expected = ["instance_id", "job_id", "status", "error"];
        match decode::<PluginReport>(body.as_bytes(), &limits) {
            Err(DecodeError::Invalid(errors)) => assert_eq!(errors.paths(), expected),
            other => panic!("expected invalid, got {other:?}"),
        }
        match decode::<UpdateReport>(body.as_bytes(), &limits) {
            Err(DecodeError::Invalid(errors)) => assert_eq!(errors.paths(), expected),
            other => panic!("expected invalid, got {other:?}"),
        }
        let fine =
            r#"{"instance_id": "acme-1", "job_id": "7", "status": "failed", "error": "no space"}"#;
        assert!(decode::<PluginReport>(fine.as_bytes(), &limits).is_ok());
        assert!(decode::<UpdateReport>(fine.as_bytes(), &limits).is_ok());
    }

    #[test]
    fn plugin_names_refuse_shell_text() {
        for ok in ["billing-export", "a", "@acme/report.v2", "x_y-1.2"] {
            assert!(is_valid_plugin_name(ok), "{ok}");
        }
        for bad in [
            "",
            "x; rm -rf /",
            "../etc",
            "$(id)",
            "A",
            "@/x",
            "@a/",
            "a b",
            "-x",
            "a`b`",
            "@a/b/c",
        ] {
            assert!(!is_valid_plugin_name(bad), "{bad}");
        }
        assert!(is_valid_plugin_version("2.0.0-rc.1+build.5"));
        for bad in ["", "1.0;reboot", "-1", "1 0", "$(x)"] {
            assert!(!is_valid_plugin_version(bad), "{bad}");
        }
    }
}
