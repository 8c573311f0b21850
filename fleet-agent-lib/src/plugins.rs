//! The plugin pipeline: poll `POST /api/plugins/next`, validate the plugin name and version,
//! run the action's command (`PLUGIN_REMOVE_CMD` for remove, `PLUGIN_UPDATE_CMD` for update,
//! `PLUGIN_INSTALL_CMD` otherwise, as the ERP agent does) and then `PLUGIN_SMOKE_CMD` when
//! set, roll back with `PLUGIN_ROLLBACK_CMD` when either fails, and report each step.
//!
//! Name, version and action reach the commands as `PLUGIN_NAME`, `PLUGIN_VERSION` and
//! `PLUGIN_ACTION`, and as shell-quoted substitutions for `{{name}}`, `{{version}}` and
//! `{{action}}`. A name such as `x; rm -rf /` never gets that far: it is refused.
//!
//! The rollback also gets `PLUGIN_FAILED_STEP`. It runs unless the job's rollout said
//! `auto_rollback: false` (`rollout.auto_rollback`, as update jobs carry it; a job without it
//! rolls back). The job ends `rolled_back` when the rollback succeeds and `failed` when it
//! fails too. Each step is written to the state file before it runs: an agent stopped in the
//! action or smoke step rolls back on restart; one stopped in the rollback reports `failed`
//! and runs nothing again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_core::command::Pipeline;
use fleet_core::plugin::{PluginAction, PluginSpec, is_valid_plugin_name, is_valid_plugin_version};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::Result;
use crate::config::PluginSettings;
use crate::job_state::JobState;
use crate::jobs;
use crate::pipeline::{
    ControlPlaneClient, OUTPUT_TAIL_BYTES, PollNow, Step, StepOutcome, StepRunner, substitute,
};

/// Where jobs come from.
pub const NEXT_PATH: &str = "/api/plugins/next";
/// Where reports go.
pub const REPORT_PATH: &str = "/api/plugins/report";
const KIND: &str = "plugin";
/// The name of the rollback step, in reports and in the state file.
const ROLLBACK: &str = "rollback";

/// Refuses a plugin whose name or version a shell could read as more than one word.
fn check_spec(spec: &PluginSpec) -> std::result::Result<(), String> {
    if !is_valid_plugin_name(&spec.name) {
        return Err("refused: the plugin name is not a valid plugin name".into());
    }
    if !is_valid_plugin_version(&spec.version) {
        return Err("refused: the plugin version is not a valid version".into());
    }
    Ok(())
}

/// The command for `action` with the plugin substituted (quoted), or why there is none.
pub fn command_for(
    settings: &PluginSettings,
    spec: &PluginSpec,
) -> std::result::Result<String, String> {
    check_spec(spec)?;
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

/// The plugin of a job as handed out (or as kept in the state file), checked.
fn spec_of(job: &Value) -> std::result::Result<PluginSpec, String> {
    let spec = serde_json::from_value::<PluginSpec>(job["plugin"].clone())
        .map_err(|_| "refused: the job has no valid plugin".to_owned())?;
    check_spec(&spec)?;
    Ok(spec)
}

/// A plugin job being run: what each of its steps, the rollback included, gets.
struct Running<'a> {
    job_id: &'a str,
    spec: PluginSpec,
    env: Vec<(String, String)>,
    /// The rollout's `auto_rollback`: only an explicit `false` turns the rollback off, so
    /// jobs from a control plane that does not send it roll back.
    auto_rollback: bool,
}

impl<'a> Running<'a> {
    fn new(job_id: &'a str, spec: PluginSpec, job: &Value) -> Self {
        let env = vec![
            ("PLUGIN_NAME".to_owned(), spec.name.clone()),
            ("PLUGIN_VERSION".to_owned(), spec.version.clone()),
            ("PLUGIN_ACTION".to_owned(), spec.action.as_str().to_owned()),
            ("PLUGIN_JOB_ID".to_owned(), job_id.to_owned()),
        ];
        Self {
            job_id,
            spec,
            env,
            auto_rollback: job["rollout"]["auto_rollback"].as_bool() != Some(false),
        }
    }
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

    /// Finishes what a crash interrupted, delivers pending final reports, then runs the next
    /// job. Returns whether a job ran.
    pub async fn poll_once(&self) -> Result<bool> {
        self.recover().await?;
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

    /// Jobs a crash interrupted: one stopped in its action or smoke step is rolled back (as
    /// a failure of that step); one stopped before its first step or in its rollback ends
    /// `failed`, with nothing run again.
    async fn recover(&self) -> Result<()> {
        for job in self.state.interrupted(KIND).await? {
            let step = job.step.clone().unwrap_or_else(|| "accepted".into());
            let error = if step == ROLLBACK {
                "the agent stopped during the rollback; it did not finish and was not run again"
                    .to_owned()
            } else {
                format!("the agent stopped during step {step}; the step did not finish")
            };
            tracing::warn!(job_id = %job.job_id, %step, "the agent stopped during a plugin step");
            let payload: Value = serde_json::from_str(&job.payload).unwrap_or(Value::Null);
            let spec = spec_of(&payload).ok();
            let report = match spec.filter(|_| job.step.is_some() && step != ROLLBACK) {
                Some(spec) => {
                    let running = Running::new(&job.job_id, spec, &payload);
                    let failure = StepOutcome::failed(error, Duration::ZERO);
                    self.fail(&running, &step, failure).await?
                }
                // A rollback cut short is not run again: if it is what stopped the agent
                // (it restarts the service the agent runs beside), it would do so at every
                // start.
                None => {
                    let mut report = self.report_body(&job.job_id, "failed", &step);
                    report["error"] = error.into();
                    report
                }
            };
            self.finish(&job.job_id, &job.payload, report).await?;
        }
        Ok(())
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
        let error = report["error"].as_str().unwrap_or("");
        tracing::info!(job_id, %status, error, "plugin job ended");
        self.reports().finish(job_id, payload, &report).await
    }

    fn report_body(&self, job_id: &str, status: &str, step: &str) -> Value {
        json!({"instance_id": self.instance_id, "job_id": job_id, "status": status,
               "step": step})
    }

    async fn run_job(&self, job_id: &str, job: &Value) -> Result<()> {
        let payload = job.to_string();
        let started = Instant::now();
        let prepared = spec_of(job)
            .and_then(|spec| command_for(&self.settings, &spec).map(|command| (spec, command)));
        let (spec, command) = match prepared {
            Ok(prepared) => prepared,
            Err(error) => {
                tracing::warn!(job_id, %error, "plugin job refused");
                let mut report = self.report_body(job_id, "failed", "accepted");
                report["error"] = error.into();
                return self.finish(job_id, &payload, report).await;
            }
        };
        self.state.begin(KIND, job_id, &payload).await?;
        let running = Running::new(job_id, spec, job);
        let mut steps = vec![(running.spec.action.as_str().to_owned(), command)];
        if let Some(smoke) = &self.settings.smoke_cmd {
            steps.push((
                "smoke".to_owned(),
                substitute(smoke, &values(&running.spec)),
            ));
        }
        for (name, command) in steps {
            self.state.step(KIND, job_id, &name).await?;
            self.client
                .report(REPORT_PATH, &self.report_body(job_id, "in_progress", &name))
                .await;
            let outcome = self.run_step(&running, &name, command, &[]).await;
            if !outcome.ok {
                let report = self.fail(&running, &name, outcome).await?;
                return self.finish(job_id, &payload, report).await;
            }
            let mut done = self.report_body(job_id, "in_progress", &name);
            done["duration_ms"] = outcome.duration_ms().into();
            if !outcome.output_tail.is_empty() {
                done["output_tail"] = outcome.output_tail.clone().into();
            }
            self.client.report(REPORT_PATH, &done).await;
        }
        let mut report = self.report_body(job_id, "succeeded", "done");
        report["duration_ms"] = u64::try_from(started.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .into();
        self.finish(job_id, &payload, report).await
    }

    async fn run_step(
        &self,
        running: &Running<'_>,
        name: &str,
        command: String,
        extra: &[(String, String)],
    ) -> StepOutcome {
        let mut env = running.env.clone();
        env.extend(extra.iter().cloned());
        self.runner
            .run(&Step {
                name: name.to_owned(),
                command,
                workdir: self.settings.workdir.clone(),
                timeout: self.settings.step_timeout,
                env,
            })
            .await
    }

    /// Runs the rollback (when `PLUGIN_ROLLBACK_CMD` is set and the rollout wants it) after
    /// `step` failed, and returns the final report: `rolled_back` at `step` when the rollback
    /// succeeded, else `failed` naming the step's failure and the rollback's.
    async fn fail(&self, running: &Running<'_>, step: &str, failure: StepOutcome) -> Result<Value> {
        let error = failure
            .error
            .clone()
            .unwrap_or_else(|| format!("step {step} failed"));
        let mut report = self.report_body(running.job_id, "failed", step);
        report["error"] = error.clone().into();
        report["duration_ms"] = failure.duration_ms().into();
        if !failure.output_tail.is_empty() {
            report["output_tail"] = failure.output_tail.clone().into();
        }
        let Some(template) = self
            .settings
            .rollback_cmd
            .as_deref()
            .filter(|_| running.auto_rollback)
        else {
            return Ok(report);
        };
        self.state.step(KIND, running.job_id, ROLLBACK).await?;
        self.client
            .report(
                REPORT_PATH,
                &self.report_body(running.job_id, "in_progress", ROLLBACK),
            )
            .await;
        let command = substitute(template, &values(&running.spec));
        let extra = [("PLUGIN_FAILED_STEP".to_owned(), step.to_owned())];
        let outcome = self.run_step(running, ROLLBACK, command, &extra).await;
        tracing::info!(
            job_id = running.job_id,
            failed_step = step,
            ok = outcome.ok,
            "plugin rollback ran"
        );
        if outcome.ok {
            report["status"] = "rolled_back".into();
        } else {
            report["error"] = format!(
                "{error}; the rollback failed too: {}",
                outcome.error.as_deref().unwrap_or("no reason given")
            )
            .into();
        }
        let tail = both_tails(step, &failure.output_tail, &outcome.output_tail);
        if !tail.is_empty() {
            report["output_tail"] = tail.into();
        }
        Ok(report)
    }
}

/// The failed step's output and the rollback's in one text of at most
/// [`OUTPUT_TAIL_BYTES`] (plus two headings), so that the report stays within the control
/// plane's limit: each keeps its last half, or more when the other is shorter.
fn both_tails(step: &str, failed: &str, rollback: &str) -> String {
    let half = OUTPUT_TAIL_BYTES / 2;
    let failed = last_bytes(failed, OUTPUT_TAIL_BYTES - rollback.len().min(half));
    let rollback = last_bytes(rollback, OUTPUT_TAIL_BYTES - failed.len());
    match (failed.is_empty(), rollback.is_empty()) {
        (true, true) => String::new(),
        (false, true) => failed.to_owned(),
        _ => format!("--- {step} ---\n{failed}\n--- {ROLLBACK} ---\n{rollback}"),
    }
}

/// The end of `text`, at most `max` bytes, starting at a character boundary.
fn last_bytes(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// Polls for plugin jobs every `PLUGIN_POLL_MIN` (or `PLUGIN_POLL_SEC`) until `stop`, and
/// at once when `poll_now` wakes it.
pub async fn run_loop(pipeline: PluginPipeline, poll_now: PollNow, stop: watch::Receiver<bool>) {
    let interval = pipeline.settings.poll_interval;
    let wake = poll_now.of(Pipeline::Plugin);
    crate::pipeline::poll_loop("plugin", interval, wake, stop, || pipeline.poll_once()).await;
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
