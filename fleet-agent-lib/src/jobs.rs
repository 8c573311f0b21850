//! What the plugin, restore and update pipelines do alike around their jobs: keep and
//! deliver a job's final report, deliver the final reports the control plane does not have
//! yet, and ask it for the next job.

use serde_json::{Value, json};

use crate::Result;
use crate::job_state::JobState;
use crate::pipeline::ControlPlaneClient;

/// Where one pipeline keeps and delivers the final reports of its jobs: its job records
/// (`kind` in the agent's job state) and the control-plane path that takes them.
pub(crate) struct Reports<'a> {
    pub state: &'a JobState,
    pub client: &'a ControlPlaneClient,
    pub kind: &'static str,
    pub report_path: &'static str,
}

impl Reports<'_> {
    /// Keeps `report` as the final report of job `job_id` (its `status`, `failed` when it
    /// has none, and its `error` go into the job's record), then posts it and marks it
    /// delivered once the control plane has it. A report not delivered now is sent again by
    /// [`deliver_unreported`](Self::deliver_unreported), also after a restart.
    pub async fn finish(&self, job_id: &str, payload: &str, report: &Value) -> Result<()> {
        let status = report["status"].as_str().unwrap_or("failed");
        let error = report["error"].as_str();
        self.state
            .finish(self.kind, job_id, payload, status, error, report)
            .await?;
        if self.client.report(self.report_path, report).await {
            self.state.reported(self.kind, job_id).await?;
        }
        Ok(())
    }

    /// Posts the final reports that have not reached the control plane yet, marking each
    /// one delivered once it has.
    pub async fn deliver_unreported(&self) -> Result<()> {
        for job in self.state.unreported(self.kind).await? {
            let report: Value = job
                .report
                .as_deref()
                .and_then(|r| serde_json::from_str(r).ok())
                .unwrap_or(Value::Null);
            // A report that cannot be read would never be taken: give it up rather than
            // retry it at every poll.
            if report.is_null() || self.client.report(self.report_path, &report).await {
                self.state.reported(self.kind, &job.job_id).await?;
            }
        }
        Ok(())
    }
}

/// Asks `next_path` for the next job of `instance_id`: the body of a 200 answer, else `null`
/// (no job). A request that fails counts as no job; its error goes to `log_failure`, for the
/// pipeline to log under its own name.
pub(crate) async fn next_job(
    client: &ControlPlaneClient,
    next_path: &str,
    instance_id: &str,
    log_failure: impl FnOnce(&str),
) -> Value {
    match client
        .post(next_path, &json!({"instance_id": instance_id}))
        .await
    {
        Ok(answer) if answer.status == 200 => answer.body.unwrap_or(Value::Null),
        Ok(_) => Value::Null,
        Err(err) => {
            log_failure(&err);
            Value::Null
        }
    }
}
