//! The update pipeline: poll `POST /api/updates/next`, refuse a manifest that does not
//! verify against the pinned keys, run the strategy's steps, roll back on any failure, and
//! report every step.
//!
//! - `BATCH`: backup → pull → migrate → smoke → switch → health.
//! - `BLUE_GREEN_CANARY`: backup → pull → green_up → migrate_safe → smoke → canary (for each
//!   percentage: `UPDATE_PROXY_SHIFT_CMD` with `UPDATE_CANARY_PERCENT`, wait, observe the SLO
//!   figures) → switch_green → health.
//!
//! A step whose command is not configured is skipped, as in the ERP agent. Each step is
//! written to the state file before it runs; an agent killed mid-step finds the job on
//! restart, runs the rollback and reports `rolled_back` once, and never runs a job id twice.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_core::command::Pipeline;
use fleet_core::manifest::ManifestVerifier;
use fleet_core::update::{RolloutSettings, Strategy, UpdateStep};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::Result;
use crate::config::UpdateSettings;
use crate::job_state::JobState;
use crate::jobs;
use crate::pipeline::{ControlPlaneClient, PollNow, Step, StepOutcome, StepRunner};

/// Where jobs come from.
pub const NEXT_PATH: &str = "/api/updates/next";
/// Where reports go.
pub const REPORT_PATH: &str = "/api/updates/report";
/// The job kind in the state file.
const KIND: &str = "update";
/// The state-file key of the version installed by the last successful update.
pub const INSTALLED_VERSION: &str = "installed_version";
/// Longest the health step polls `UPDATE_HEALTHCHECK_URL`.
const HEALTH_WINDOW: Duration = Duration::from_secs(120);

/// What a planned step does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run this shell command.
    Command(String),
    /// Poll this URL until it answers 2xx.
    Health(String),
    /// Shift traffic through the canary percentages, observing each.
    Canary,
}

/// The steps a strategy runs with these settings, in order (unconfigured ones left out).
pub fn plan(settings: &UpdateSettings, strategy: Strategy) -> Vec<(UpdateStep, Action)> {
    let cmd = |step: UpdateStep, c: &Option<String>| c.clone().map(|c| (step, Action::Command(c)));
    let mut steps: Vec<Option<(UpdateStep, Action)>> = vec![
        cmd(UpdateStep::Backup, &settings.backup_cmd),
        cmd(UpdateStep::Pull, &settings.pull_cmd),
    ];
    match strategy {
        Strategy::Batch => {
            steps.push(cmd(UpdateStep::Migrate, &settings.migrate_cmd));
            steps.push(cmd(UpdateStep::Smoke, &settings.smoke_cmd));
            steps.push(cmd(UpdateStep::Switch, &settings.switch_cmd));
        }
        Strategy::BlueGreenCanary => {
            steps.push(cmd(UpdateStep::GreenUp, &settings.green_up_cmd));
            steps.push(cmd(UpdateStep::MigrateSafe, &settings.migrate_safe_cmd));
            steps.push(cmd(UpdateStep::Smoke, &settings.smoke_cmd));
            steps.push(Some((UpdateStep::Canary, Action::Canary)));
            steps.push(cmd(UpdateStep::SwitchGreen, &settings.switch_green_cmd));
        }
    }
    steps.push(
        settings
            .healthcheck_url
            .clone()
            .map(|url| (UpdateStep::Health, Action::Health(url))),
    );
    steps.into_iter().flatten().collect()
}

/// The wire name of a step.
pub fn step_name(step: UpdateStep) -> String {
    serde_json::to_value(step)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The first SLO figure above the rollout's maxima (0 or absent: not checked).
pub fn slo_problem(
    rollout: &RolloutSettings,
    figures: &crate::prometheus::SloFigures,
) -> Option<String> {
    [
        ("p95 latency", figures.p95_ms, rollout.slo_p95_ms_max),
        ("error rate", figures.error_rate, rollout.slo_error_rate_max),
        (
            "webhook retry rate",
            figures.webhook_retry_rate,
            rollout.slo_webhook_retry_rate_max,
        ),
    ]
    .into_iter()
    .find_map(|(what, value, max)| {
        let (value, max) = (value?, max.filter(|m| *m > 0.0)?);
        (value > max).then(|| format!("SLO breach during the canary: {what} {value} above {max}"))
    })
}

/// The update pipeline of one agent.
pub struct UpdatePipeline {
    instance_id: String,
    settings: UpdateSettings,
    metrics_url: Option<String>,
    client: ControlPlaneClient,
    http: reqwest::Client,
    state: Arc<JobState>,
    runner: Arc<dyn StepRunner>,
    version: Arc<std::sync::Mutex<Option<String>>>,
}

/// A job being run.
struct Running<'a> {
    job_id: &'a str,
    rollout: RolloutSettings,
    env: Vec<(String, String)>,
}

impl UpdatePipeline {
    /// A pipeline for `instance_id`; `version` is the running version, shared with the
    /// heartbeat and updated after a successful update.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        instance_id: &str,
        settings: UpdateSettings,
        metrics_url: Option<String>,
        client: ControlPlaneClient,
        http: reqwest::Client,
        state: Arc<JobState>,
        runner: Arc<dyn StepRunner>,
        version: Arc<std::sync::Mutex<Option<String>>>,
    ) -> Self {
        Self {
            instance_id: instance_id.to_owned(),
            settings,
            metrics_url,
            client,
            http,
            state,
            runner,
            version,
        }
    }

    fn current_version(&self) -> Option<String> {
        self.version
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Finishes what a crash interrupted, delivers undelivered final reports, then asks for
    /// the next job and runs it. Returns whether a job ran.
    pub async fn poll_once(&self) -> Result<bool> {
        self.recover().await?;
        self.reports().deliver_unreported().await?;
        let body =
            json!({"instance_id": self.instance_id, "current_version": self.current_version()});
        let answer = match self.client.post(NEXT_PATH, &body).await {
            Ok(answer) => answer,
            Err(err) => {
                tracing::warn!(%err, "cannot ask for an update job");
                return Ok(false);
            }
        };
        match answer.status {
            204 => return Ok(false),
            200 => {}
            status => {
                tracing::warn!(status, "the control plane did not hand out an update job");
                return Ok(false);
            }
        }
        let Some(job) = answer.body else {
            tracing::warn!("an update job without a body");
            return Ok(false);
        };
        let Some(job_id) = job.get("job_id").and_then(Value::as_str).map(str::to_owned) else {
            tracing::warn!("an update job without a job_id");
            return Ok(false);
        };
        if let Some(seen) = self.state.get(KIND, &job_id).await? {
            // Handed out again (our answer was lost, or an old control plane): never run
            // twice; make sure its final report gets there.
            tracing::info!(job_id, state = %seen.state, "update job already run here; not again");
            self.reports().deliver_unreported().await?;
            return Ok(false);
        }
        self.run_job(&job_id, &job).await?;
        Ok(true)
    }

    async fn report(&self, body: Value) -> bool {
        self.client.report(REPORT_PATH, &body).await
    }

    fn report_body(&self, job_id: &str, status: &str, step: UpdateStep) -> Value {
        json!({"instance_id": self.instance_id, "job_id": job_id, "status": status,
               "step": step_name(step)})
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

    /// Records the final status, then reports it; the report is retried at the next poll
    /// until the control plane has it.
    async fn finish(&self, job_id: &str, payload: &str, report: Value) -> Result<()> {
        let status = report["status"].as_str().unwrap_or("failed");
        let error = report["error"].as_str().unwrap_or("");
        tracing::info!(job_id, %status, error, "update job ended");
        self.reports().finish(job_id, payload, &report).await
    }

    /// Jobs a crash interrupted: roll back (when the rollout asks for it) and report once.
    async fn recover(&self) -> Result<()> {
        for job in self.state.interrupted(KIND).await? {
            let payload: Value = serde_json::from_str(&job.payload).unwrap_or(Value::Null);
            let rollout: RolloutSettings =
                serde_json::from_value(payload["rollout"].clone()).unwrap_or_default();
            let step = job.step.clone().unwrap_or_else(|| "accepted".into());
            tracing::warn!(job_id = %job.job_id, %step, "the agent stopped during an update step; rolling back");
            let running = Running {
                job_id: &job.job_id,
                env: job_env(&job.job_id, &payload, self.current_version()),
                rollout,
            };
            let failure = StepOutcome::failed(
                format!("the agent stopped during step {step}; the step did not finish"),
                Duration::ZERO,
            );
            let report = self.fail(&running, &step, failure).await?;
            self.finish(&job.job_id, &job.payload, report).await?;
        }
        Ok(())
    }

    async fn run_job(&self, job_id: &str, job: &Value) -> Result<()> {
        let payload = job.to_string();
        let started = Instant::now();
        let verifier = ManifestVerifier::new(self.settings.manifest_public_keys.clone());
        let manifest = match verifier.verify_value(&job["manifest"]) {
            Ok(signed) => signed,
            Err(err) => {
                tracing::error!(job_id, error = %err, "update refused: the manifest does not verify against UPDATE_MANIFEST_PUBLIC_KEYS");
                let mut report = self.report_body(job_id, "failed", UpdateStep::VerifyManifest);
                report["error"] = format!("manifest refused: {err}").into();
                return self.finish(job_id, &payload, report).await;
            }
        };
        let rollout: RolloutSettings =
            serde_json::from_value(job["rollout"].clone()).unwrap_or_default();
        self.state.begin(KIND, job_id, &payload).await?;
        let running = Running {
            job_id,
            env: job_env(job_id, job, self.current_version()),
            rollout,
        };
        tracing::info!(job_id, version = %manifest.manifest.version, strategy = ?running.rollout.strategy, "update started");
        for (step, action) in plan(&self.settings, running.rollout.strategy) {
            let name = step_name(step);
            self.state.step(KIND, job_id, &name).await?;
            if step != UpdateStep::Canary {
                self.report(self.report_body(job_id, "in_progress", step))
                    .await;
            }
            let outcome = match &action {
                Action::Command(command) => self.run_step(&running, &name, command, &[]).await,
                Action::Health(url) => self.health(url).await,
                Action::Canary => self.canary(&running).await,
            };
            if !outcome.ok {
                let report = self.fail(&running, &name, outcome).await?;
                return self.finish(job_id, &payload, report).await;
            }
            if step != UpdateStep::Canary {
                // The step's duration and output, for the operator.
                self.report(with_outcome(
                    self.report_body(job_id, "in_progress", step),
                    &outcome,
                ))
                .await;
            }
        }
        let version = manifest.manifest.version.clone();
        self.state.set_value(INSTALLED_VERSION, &version).await?;
        *self.version.lock().unwrap_or_else(|p| p.into_inner()) = Some(version);
        let mut report = self.report_body(job_id, "succeeded", UpdateStep::Done);
        report["duration_ms"] = u64::try_from(started.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .into();
        self.finish(job_id, &payload, report).await
    }

    async fn run_step(
        &self,
        running: &Running<'_>,
        name: &str,
        command: &str,
        extra: &[(String, String)],
    ) -> StepOutcome {
        let mut env = running.env.clone();
        env.push(("UPDATE_STEP".into(), name.to_owned()));
        env.extend(extra.iter().cloned());
        let step = Step {
            name: name.to_owned(),
            command: command.to_owned(),
            workdir: self.settings.workdir.clone(),
            timeout: self.settings.step_timeout,
            env,
        };
        let outcome = self.runner.run(&step).await;
        tracing::info!(
            job_id = running.job_id,
            step = name,
            ok = outcome.ok,
            ms = outcome.duration_ms(),
            "update step ran"
        );
        outcome
    }

    /// Polls the health URL until it answers 2xx, within the step timeout (at most 2 min).
    async fn health(&self, url: &str) -> StepOutcome {
        let started = Instant::now();
        let window = self.settings.step_timeout.min(HEALTH_WINDOW);
        let mut last = String::new();
        while started.elapsed() < window {
            match self
                .http
                .get(url)
                .timeout(Duration::from_secs(5))
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => {
                    return StepOutcome {
                        ok: true,
                        exit_code: None,
                        timed_out: false,
                        duration: started.elapsed(),
                        output_tail: format!("HTTP {}", r.status().as_u16()),
                        error: None,
                    };
                }
                Ok(r) => last = format!("HTTP {}", r.status().as_u16()),
                Err(err) => last = fleet_core::error_chain(&err),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        StepOutcome::failed(
            format!(
                "health check did not pass within {} s: {last}",
                window.as_secs()
            ),
            started.elapsed(),
        )
    }

    /// Shifts traffic through each canary percentage, waits, and checks the SLO figures.
    async fn canary(&self, running: &Running<'_>) -> StepOutcome {
        let started = Instant::now();
        let mut tail = String::new();
        for percent in running.rollout.canary_steps.clone() {
            let mut report = self.report_body(running.job_id, "in_progress", UpdateStep::Canary);
            report["canary_percent"] = percent.into();
            self.report(report).await;
            if let Some(command) = &self.settings.proxy_shift_cmd {
                let extra = [("UPDATE_CANARY_PERCENT".to_owned(), percent.to_string())];
                let outcome = self.run_step(running, "canary", command, &extra).await;
                tail = outcome.output_tail.clone();
                if !outcome.ok {
                    return outcome;
                }
            }
            tokio::time::sleep(Duration::from_secs(u64::from(
                running.rollout.canary_step_wait_sec,
            )))
            .await;
            if let Some(url) = &self.metrics_url {
                let figures = match self
                    .http
                    .get(url)
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await
                {
                    Ok(r) if r.status().is_success() => {
                        crate::prometheus::parse_slo(&r.text().await.unwrap_or_default())
                    }
                    _ => crate::prometheus::SloFigures::default(),
                };
                let mut report =
                    self.report_body(running.job_id, "in_progress", UpdateStep::Canary);
                report["canary_percent"] = percent.into();
                for (name, value) in [
                    ("metric_p95_ms", figures.p95_ms),
                    ("metric_error_rate", figures.error_rate),
                    ("metric_webhook_retry_rate", figures.webhook_retry_rate),
                ] {
                    if let Some(v) = value {
                        report[name] = v.into();
                    }
                }
                self.report(report).await;
                if let Some(problem) = slo_problem(&running.rollout, &figures) {
                    let mut out =
                        StepOutcome::failed(format!("{problem} at {percent}%"), started.elapsed());
                    out.output_tail = tail;
                    return out;
                }
            }
        }
        StepOutcome {
            ok: true,
            exit_code: None,
            timed_out: false,
            duration: started.elapsed(),
            output_tail: tail,
            error: None,
        }
    }

    /// Runs the rollback (when the rollout wants it and a command is set) after `step`
    /// failed, and returns the final report.
    async fn fail(&self, running: &Running<'_>, step: &str, failure: StepOutcome) -> Result<Value> {
        let error = failure
            .error
            .clone()
            .unwrap_or_else(|| format!("step {step} failed"));
        let mut report = json!({
            "instance_id": self.instance_id, "job_id": running.job_id, "status": "failed",
            "step": step, "error": error, "duration_ms": failure.duration_ms(),
        });
        if !failure.output_tail.is_empty() {
            report["output_tail"] = failure.output_tail.clone().into();
        }
        let rollback = self
            .settings
            .rollback_cmd
            .clone()
            .filter(|_| running.rollout.auto_rollback);
        if let Some(command) = rollback {
            self.state.step(KIND, running.job_id, "rollback").await?;
            self.report(self.report_body(running.job_id, "in_progress", UpdateStep::Rollback))
                .await;
            let extra = [("UPDATE_FAILED_STEP".to_owned(), step.to_owned())];
            let outcome = self.run_step(running, "rollback", &command, &extra).await;
            if outcome.ok {
                report["status"] = "rolled_back".into();
            } else {
                report["error"] = format!(
                    "{error}; the rollback failed too: {}",
                    outcome.error.unwrap_or_default()
                )
                .into();
            }
        }
        Ok(report)
    }
}

/// Adds a step's duration and output tail to a report.
fn with_outcome(mut report: Value, outcome: &StepOutcome) -> Value {
    report["duration_ms"] = outcome.duration_ms().into();
    if !outcome.output_tail.is_empty() {
        report["output_tail"] = outcome.output_tail.clone().into();
    }
    report
}

/// The environment every update step gets.
fn job_env(job_id: &str, job: &Value, current: Option<String>) -> Vec<(String, String)> {
    let text = |v: &Value| v.as_str().map(str::to_owned).unwrap_or_default();
    let manifest = &job["manifest"];
    vec![
        ("UPDATE_JOB_ID".into(), job_id.to_owned()),
        ("UPDATE_VERSION".into(), text(&manifest["version"])),
        ("UPDATE_SHA".into(), text(&manifest["sha"])),
        ("UPDATE_CHANNEL".into(), text(&manifest["channel"])),
        (
            "UPDATE_PREVIOUS_VERSION".into(),
            current.unwrap_or_default(),
        ),
    ]
}

/// Polls for update jobs every `UPDATE_POLL_MIN` (or `UPDATE_POLL_SEC`) until `stop`, and
/// at once again after a job ran or when `poll_now` wakes it.
pub async fn run_loop(pipeline: UpdatePipeline, poll_now: PollNow, stop: watch::Receiver<bool>) {
    let interval = pipeline.settings.poll_interval;
    let wake = poll_now.of(Pipeline::Update);
    crate::pipeline::poll_loop("update", interval, wake, stop, || pipeline.poll_once()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> UpdateSettings {
        let mut s = crate::AgentConfig::new(
            "a",
            "http://x",
            fleet_core::Secret::new("s").expect("secret"),
        )
        .update;
        s.backup_cmd = Some("b".into());
        s.migrate_cmd = Some("m".into());
        s.smoke_cmd = Some("s".into());
        s.switch_cmd = Some("w".into());
        s.healthcheck_url = Some("http://h".into());
        s
    }

    #[test]
    fn batch_plan_follows_the_erp_order_and_skips_unset_steps() {
        let names: Vec<String> = plan(&settings(), Strategy::Batch)
            .into_iter()
            .map(|(s, _)| step_name(s))
            .collect();
        assert_eq!(names, ["backup", "migrate", "smoke", "switch", "health"]);
    }

    #[test]
    fn blue_green_plan_has_the_canary_between_smoke_and_switch_green() {
        let mut s = settings();
        s.green_up_cmd = Some("g".into());
        s.switch_green_cmd = Some("sg".into());
        let names: Vec<String> = plan(&s, Strategy::BlueGreenCanary)
            .into_iter()
            .map(|(s, _)| step_name(s))
            .collect();
        assert_eq!(
            names,
            [
                "backup",
                "green_up",
                "smoke",
                "canary",
                "switch_green",
                "health"
            ]
        );
    }

    #[test]
    fn slo_problem_checks_set_maxima_only() {
        let rollout = RolloutSettings {
            slo_error_rate_max: Some(0.05),
            ..RolloutSettings::default()
        };
        let mut figures = crate::prometheus::SloFigures {
            p95_ms: Some(9_999.0),
            error_rate: Some(0.01),
            ..Default::default()
        };
        assert_eq!(slo_problem(&rollout, &figures), None);
        figures.error_rate = Some(0.2);
        assert!(slo_problem(&rollout, &figures).is_some_and(|p| p.contains("error rate")));
    }
}
