//! The restore verification runner: poll `POST /api/restores/next`, run
//! `RESTORE_VERIFY_CMD` (with `RESTORE_ID`, `RESTORE_ENVIRONMENT`, `RESTORE_BACKUP_ID`) and
//! report `verified` (exit 0) or `failed` with the error, duration and output tail.

use std::sync::Arc;

use fleet_core::command::Pipeline;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::Result;
use crate::config::RestoreSettings;
use crate::job_state::JobState;
use crate::jobs;
use crate::pipeline::{ControlPlaneClient, PollNow, Step, StepRunner};

/// Where verifications come from.
pub const NEXT_PATH: &str = "/api/restores/next";
/// Where outcomes go.
pub const REPORT_PATH: &str = "/api/restores/report";
const KIND: &str = "restore";

/// The restore verification runner of one agent.
pub struct RestoreRunner {
    instance_id: String,
    settings: RestoreSettings,
    client: ControlPlaneClient,
    state: Arc<JobState>,
    runner: Arc<dyn StepRunner>,
}

impl RestoreRunner {
    /// A runner for `instance_id`.
    pub fn new(
        instance_id: &str,
        settings: RestoreSettings,
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

    /// Where this pipeline keeps and delivers its final reports.
    fn reports(&self) -> jobs::Reports<'_> {
        jobs::Reports {
            state: &self.state,
            client: &self.client,
            kind: KIND,
            report_path: REPORT_PATH,
        }
    }

    async fn finish(&self, id: &str, payload: &str, report: Value) -> Result<()> {
        let status = report["status"].as_str().unwrap_or("failed");
        tracing::info!(restore_id = id, %status, "restore verification ended");
        self.reports().finish(id, payload, &report).await
    }

    /// Reports what a crash interrupted, delivers pending reports, then runs the next
    /// verification. Returns whether one ran.
    pub async fn poll_once(&self) -> Result<bool> {
        for job in self.state.interrupted(KIND).await? {
            let report = json!({"instance_id": self.instance_id, "restore_id": job.job_id,
                "status": "failed", "error": "the agent stopped during the verification"});
            self.finish(&job.job_id, &job.payload, report).await?;
        }
        self.reports().deliver_unreported().await?;
        let job = jobs::next_job(&self.client, NEXT_PATH, &self.instance_id, |err| {
            tracing::warn!(%err, "cannot ask for a restore verification");
        })
        .await;
        let Some(id) = job["restore_id"].as_str().map(str::to_owned) else {
            return Ok(false);
        };
        if self.state.get(KIND, &id).await?.is_some() {
            return Ok(false);
        }
        let payload = job.to_string();
        let mut report = json!({"instance_id": self.instance_id, "restore_id": id});
        let Some(command) = self.settings.verify_cmd.clone() else {
            report["status"] = "skipped".into();
            report["error"] = "RESTORE_VERIFY_CMD is not set".into();
            self.finish(&id, &payload, report).await?;
            return Ok(true);
        };
        self.state.begin(KIND, &id, &payload).await?;
        self.state.step(KIND, &id, "verify").await?;
        let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        let outcome = self
            .runner
            .run(&Step {
                name: "restore-verify".into(),
                command,
                workdir: self.settings.workdir.clone(),
                timeout: self.settings.timeout,
                env: vec![
                    ("RESTORE_ID".into(), id.clone()),
                    ("RESTORE_ENVIRONMENT".into(), text(&job["environment"])),
                    ("RESTORE_BACKUP_ID".into(), text(&job["backup_id"])),
                ],
            })
            .await;
        report["status"] = if outcome.ok { "verified" } else { "failed" }.into();
        report["duration_ms"] = outcome.duration_ms().into();
        if let Some(error) = &outcome.error {
            report["error"] = error.clone().into();
        }
        if !outcome.output_tail.is_empty() {
            report["output_tail"] = outcome.output_tail.clone().into();
        }
        self.finish(&id, &payload, report).await?;
        Ok(true)
    }
}

/// Polls for verifications every `RESTORE_POLL_MIN` (or `RESTORE_POLL_SEC`) until `stop`,
/// and at once when `poll_now` wakes it.
pub async fn run_loop(runner: RestoreRunner, poll_now: PollNow, stop: watch::Receiver<bool>) {
    let interval = runner.settings.poll_interval;
    let wake = poll_now.of(Pipeline::Restore);
    crate::pipeline::poll_loop("restore", interval, wake, stop, || runner.poll_once()).await;
}
