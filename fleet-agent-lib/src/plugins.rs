//! The plugin pipeline: poll `POST /api/plugins/next`, validate the plugin name and version,
//! run the action's command (`PLUGIN_REMOVE_CMD` for remove, `PLUGIN_UPDATE_CMD` for update,
//! `PLUGIN_INSTALL_CMD` otherwise, as the ERP agent does) and then `PLUGIN_SMOKE_CMD` when
//! set, and report each step.
//!
//! Name, version and action reach the command as `PLUGIN_NAME`, `PLUGIN_VERSION` and
//! `PLUGIN_ACTION`, and as shell-quoted substitutions for `{{name}}`, `{{version}}` and
//! `{{action}}`. A name such as `x; rm -rf /` never gets that far: it is refused.

use std::sync::Arc;
use std::time::Instant;

use fleet_core::plugin::{PluginAction, PluginSpec, is_valid_plugin_name, is_valid_plugin_version};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::Result;
use crate::config::PluginSettings;
use crate::job_state::JobState;
use crate::jobs;
use crate::pipeline::{ControlPlaneClient, Step, StepOutcome, StepRunner, substitute};

/// Where jobs come from.
pub const NEXT_PATH: &str = "/api/plugins/next";
/// Where reports go.
pub const REPORT_PATH: &str = "/api/plugins/report";
const KIND: &str = "plugin";

/// The command for `action` with the plugin substituted (quoted), or why there is none.
pub fn command_for(
    settings: &PluginSettings,
    spec: &PluginSpec,
) -> std::result::Result<String, String> {
    if !is_valid_plugin_name(&spec.name) {
        return Err("refused: the plugin name is not a valid plugin name".into());
    }
    if !is_valid_plugin_version(&spec.version) {
        return Err("refused: the plugin version is not a valid version".into());
    }
    let (template, variable) = match spec.action {
        PluginAction::Remove => (&settings.remove_cmd, "PLUGIN_REMOVE_CMD"),
        PluginAction::Update => (&settings.update_cmd, "PLUGIN_UPDATE_CMD"),
        PluginAction::Install => (&settings.install_cmd, "PLUGIN_INSTALL_CMD"),
    };
    let template = template
        .as_deref()
        .ok_or_else(|| format!("{variable} is not set"))?;
    Ok(substitute(template, &values(spec)))
}

fn values(spec: &PluginSpec) -> [(&'static str, &str); 3] {
    [
        ("name", spec.name.as_str()),
        ("version", spec.version.as_str()),
        ("action", spec.action.as_str()),
    ]
}

/// The plugin pipeline of one agent.
pub struct PluginPipeline {
    instance_id: String,
    settings: PluginSettings,
    client: ControlPlaneClient,
    state: Arc<JobState>,
    runner: Arc<dyn StepRunner>,
}

impl PluginPipeline {
    /// A pipeline for `instance_id`.
    pub fn new(
        instance_id: &str,
        settings: PluginSettings,
        client: ControlPlaneClient,
        state: Arc<JobState>,
        runner: Arc<dyn StepRunner>,
    ) -> Self {
        Self {
            instance_id: instance_id.to_owned(),
            settings,
            client,
            state,
            runner,
        }
    }

    /// Reports what a crash interrupted, delivers pending final reports, then runs the next
    /// job. Returns whether a job ran.
    pub async fn poll_once(&self) -> Result<bool> {
        for job in self.state.interrupted(KIND).await? {
            let step = job.step.clone().unwrap_or_else(|| "accepted".into());
            let report = json!({"instance_id": self.instance_id, "job_id": job.job_id,
                "status": "failed", "step": step,
                "error": format!("the agent stopped during step {step}; the step did not finish")});
            self.finish(&job.job_id, &job.payload, report).await?;
        }
        self.reports().deliver_unreported().await?;
        let job = jobs::next_job(&self.client, NEXT_PATH, &self.instance_id, |err| {
            tracing::warn!(%err, "cannot ask for a plugin job");
        })
        .await;
        let Some(job_id) = job["job_id"].as_str().map(str::to_owned) else {
            return Ok(false);
        };
        if self.state.get(KIND, &job_id).await?.is_some() {
            return Ok(false);
        }
        self.run_job(&job_id, &job).await?;
        Ok(true)
    }

    /// Where this pipeline keeps and delivers its final reports.
    fn reports(&self) -> jobs::Reports<'_> {
        jobs::Reports {
            state: &self.state,
            client: &self.client,
            kind: KIND,
            report_path: REPORT_PATH,
        }
    }

    async fn finish(&self, job_id: &str, payload: &str, report: Value) -> Result<()> {
        let status = report["status"].as_str().unwrap_or("failed");
        tracing::info!(job_id, %status, "plugin job ended");
        self.reports().finish(job_id, payload, &report).await
    }

    async fn run_job(&self, job_id: &str, job: &Value) -> Result<()> {
        let payload = job.to_string();
        let started = Instant::now();
        let base = json!({"instance_id": self.instance_id, "job_id": job_id});
        let with = |status: &str, step: &str| {
            let mut r = base.clone();
            r["status"] = status.into();
            r["step"] = step.into();
            r
        };
        let prepared = serde_json::from_value::<PluginSpec>(job["plugin"].clone())
            .map_err(|_| "refused: the job has no valid plugin".to_owned())
            .and_then(|spec| command_for(&self.settings, &spec).map(|command| (spec, command)));
        let (spec, command) = match prepared {
            Ok(prepared) => prepared,
            Err(error) => {
                tracing::warn!(job_id, %error, "plugin job refused");
                let mut report = with("failed", "accepted");
                report["error"] = error.into();
                return self.finish(job_id, &payload, report).await;
            }
        };
        self.state.begin(KIND, job_id, &payload).await?;
        let env = vec![
            ("PLUGIN_NAME".to_owned(), spec.name.clone()),
            ("PLUGIN_VERSION".to_owned(), spec.version.clone()),
            ("PLUGIN_ACTION".to_owned(), spec.action.as_str().to_owned()),
            ("PLUGIN_JOB_ID".to_owned(), job_id.to_owned()),
        ];
        let mut steps = vec![(spec.action.as_str().to_owned(), command)];
        if let Some(smoke) = &self.settings.smoke_cmd {
            steps.push(("smoke".to_owned(), substitute(smoke, &values(&spec))));
        }
        for (name, command) in steps {
            self.state.step(KIND, job_id, &name).await?;
            self.client
                .report(REPORT_PATH, &with("in_progress", &name))
                .await;
            let outcome = self
                .runner
                .run(&Step {
                    name: name.clone(),
                    command,
                    workdir: self.settings.workdir.clone(),
                    timeout: self.settings.step_timeout,
                    env: env.clone(),
                })
                .await;
            if !outcome.ok {
                let report = failure(with("failed", &name), &outcome);
                return self.finish(job_id, &payload, report).await;
            }
            let mut done = with("in_progress", &name);
            done["duration_ms"] = outcome.duration_ms().into();
            if !outcome.output_tail.is_empty() {
                done["output_tail"] = outcome.output_tail.clone().into();
            }
            self.client.report(REPORT_PATH, &done).await;
        }
        let mut report = with("succeeded", "done");
        report["duration_ms"] = u64::try_from(started.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .into();
        self.finish(job_id, &payload, report).await
    }
}

fn failure(mut report: Value, outcome: &StepOutcome) -> Value {
    report["error"] = outcome.error.clone().unwrap_or_default().into();
    report["duration_ms"] = outcome.duration_ms().into();
    if !outcome.output_tail.is_empty() {
        report["output_tail"] = outcome.output_tail.clone().into();
    }
    report
}

/// Polls for plugin jobs every `PLUGIN_POLL_MIN` (or `PLUGIN_POLL_SEC`) until `stop`.
pub async fn run_loop(pipeline: PluginPipeline, stop: watch::Receiver<bool>) {
    let interval = pipeline.settings.poll_interval;
    crate::pipeline::poll_loop("plugin", interval, stop, || pipeline.poll_once()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> PluginSettings {
        let mut s = crate::AgentConfig::new(
            "a",
            "http://x",
            fleet_core::Secret::new("s").expect("secret"),
        )
        .plugin;
        s.install_cmd = Some("npm install {{name}}@{{version}} # {{action}}".into());
        s.remove_cmd = Some("npm remove {{name}}".into());
        s
    }

    fn spec(name: &str, action: PluginAction) -> PluginSpec {
        PluginSpec {
            name: name.into(),
            version: "1.2.0".into(),
            action,
        }
    }

    #[test]
    fn the_action_picks_the_command_and_values_are_quoted() {
        assert_eq!(
            command_for(&settings(), &spec("@acme/report", PluginAction::Install)),
            Ok("npm install '@acme/report'@'1.2.0' # 'install'".into())
        );
        assert_eq!(
            command_for(&settings(), &spec("billing", PluginAction::Remove)),
            Ok("npm remove 'billing'".into())
        );
        assert_eq!(
            command_for(&settings(), &spec("billing", PluginAction::Update)),
            Err("PLUGIN_UPDATE_CMD is not set".into())
        );
    }

    #[test]
    fn hostile_names_and_versions_are_refused() {
        for name in ["x; rm -rf /", "$(id)", "a`b`", "../etc"] {
            assert!(
                command_for(&settings(), &spec(name, PluginAction::Install)).is_err(),
                "{name}"
            );
        }
        let mut bad = spec("ok", PluginAction::Install);
        bad.version = "1.0;reboot".into();
        assert!(command_for(&settings(), &bad).is_err());
    }
}
