//! The restore verification runner: poll `POST /api/restores/next`, run
//! `RESTORE_VERIFY_CMD` (with `RESTORE_ID`, `RESTORE_ENVIRONMENT`, `RESTORE_BACKUP_ID`) and
//! report `verified` (exit 0) or `failed` with the error, duration and output tail.
//!
//! While the command runs, the runner asks `POST /api/restores/status` every
//! `RESTORE_CANCEL_CHECK_SEC` how the verification stands. Once it ended on the control
//! plane (an operator cancelled it, it timed out), the command's process group is killed and
//! the job ends `cancelled` here, with nothing to report: the control plane already holds
//! the outcome and would refuse a report (409). A check that fails (network, 5xx, a control
//! plane without the route) never stops the command.

use std::sync::Arc;
use std::time::Duration;

use fleet_core::command::Pipeline;
use fleet_core::restore::RestoreStatus;
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
/// Where a running verification's status is asked.
pub const STATUS_PATH: &str = "/api/restores/status";
const KIND: &str = "restore";
/// The final status, in the agent's job state, of a verification the control plane ended
/// while its command ran.
pub const CANCELLED: &str = "cancelled";
/// The control plane's statuses of a verification that has not ended; any other ended it.
const OPEN: [&str; 2] = [
    RestoreStatus::Scheduled.as_str(),
    RestoreStatus::InProgress.as_str(),
];
/// Longest status taken from a status answer, in characters.
const MAX_STATUS_CHARS: usize = 64;
/// The shortest pause between two status checks, whatever the settings say.
const MIN_CANCEL_CHECK: Duration = Duration::from_secs(1);

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
        let step = Step {
            name: "restore-verify".into(),
            command,
            workdir: self.settings.workdir.clone(),
            timeout: self.settings.timeout,
            env: vec![
                ("RESTORE_ID".into(), id.clone()),
                ("RESTORE_ENVIRONMENT".into(), text(&job["environment"])),
                ("RESTORE_BACKUP_ID".into(), text(&job["backup_id"])),
            ],
        };
        let ran = {
            let run = self.runner.run(&step);
            let ended = self.ended_on_control_plane(&id);
            // A command that ended by itself is reported, even if the control plane ended
            // the verification in the same instant (it answers that report with a 409).
            tokio::select! {
                biased;
                outcome = run => Ok(outcome),
                status = ended => Err(status),
            }
            // Both futures are dropped here: a dropped step kills its process group.
        };
        let outcome = match ran {
            Ok(outcome) => outcome,
            Err(status) => {
                self.stopped(&id, &payload, &status).await?;
                return Ok(true);
            }
        };
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

    /// Asks the control plane every [`cancel_check`](RestoreSettings::cancel_check) how
    /// verification `id` stands, and returns its status once it ended there. Never returns
    /// while checks fail (network, 5xx, a 404 from a control plane without the route): the
    /// verification then runs to its end. The first failure is a warning, the next ones are
    /// logged at debug level.
    async fn ended_on_control_plane(&self, id: &str) -> String {
        let body = json!({"instance_id": self.instance_id, "restore_id": id});
        let pause = self.settings.cancel_check.max(MIN_CANCEL_CHECK);
        let mut warned = false;
        loop {
            tokio::time::sleep(pause).await;
            let problem = match self.client.post(STATUS_PATH, &body).await {
                Ok(answer) if answer.status == 200 => {
                    let status = answer
                        .body
                        .as_ref()
                        .and_then(|b| b["status"].as_str())
                        .filter(|s| !s.is_empty());
                    match status {
                        Some(status) if OPEN.contains(&status) => continue,
                        // Kept in the job's record: bounded, whatever the answer holds.
                        Some(status) => return status.chars().take(MAX_STATUS_CHARS).collect(),
                        None => "an answer without a status".to_owned(),
                    }
                }
                Ok(answer) => format!("HTTP {}", answer.status),
                Err(err) => err,
            };
            if warned {
                tracing::debug!(restore_id = id, %problem, "restore status check failed");
            } else {
                warned = true;
                tracing::warn!(
                    restore_id = id,
                    %problem,
                    "cannot ask the control plane whether the restore verification was \
                     cancelled; it keeps running"
                );
            }
        }
    }

    /// Ends verification `id`, whose command was stopped because the control plane ended it
    /// `status`, as [`CANCELLED`] here: neither failed nor run again, and not reported.
    async fn stopped(&self, id: &str, payload: &str, status: &str) -> Result<()> {
        tracing::info!(
            restore_id = id,
            control_plane_status = status,
            "restore verification cancelled by the control plane; its verify command was stopped"
        );
        let error = format!("stopped: the control plane ended the verification {status}");
        // The control plane holds the outcome and refuses a report on it, so none is kept:
        // a null report is never sent (`deliver_unreported`), even by an agent that stops
        // before it marks this one delivered.
        self.state
            .finish(KIND, id, payload, CANCELLED, Some(&error), &Value::Null)
            .await?;
        self.state.reported(KIND, id).await
    }
}

/// Polls for verifications every `RESTORE_POLL_MIN` (or `RESTORE_POLL_SEC`) until `stop`,
/// and at once when `poll_now` wakes it.
pub async fn run_loop(runner: RestoreRunner, poll_now: PollNow, stop: watch::Receiver<bool>) {
    let interval = runner.settings.poll_interval;
    let wake = poll_now.of(Pipeline::Restore);
    crate::pipeline::poll_loop("restore", interval, wake, stop, || runner.poll_once()).await;
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;
    use std::time::Instant;

    use axum::Router;
    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};
    use axum::routing::post;
    use fleet_core::{Scheme, Secret, Signer};

    use super::*;
    use crate::pipeline::{ShellRunner, shell_quote};

    /// How the stand-in control plane answers `POST /api/restores/status`.
    #[derive(Debug, Clone, Copy)]
    enum StatusRoute {
        /// 200 with this status.
        Says(&'static str),
        /// No such route (an older control plane): 404.
        Missing,
        /// 500.
        Failing,
        /// Slower than the client's timeout.
        Hanging,
    }

    /// A stand-in control plane: hands out verification `7` once, answers status checks as
    /// told, keeps the reports.
    struct ControlPlane {
        status: StatusRoute,
        job: Mutex<Option<Value>>,
        checks: Mutex<usize>,
        reports: Mutex<Vec<Value>>,
        /// Answer reports with a 409, as the control plane does on a cancelled verification.
        refuse_reports: bool,
    }

    async fn next(State(cp): State<Arc<ControlPlane>>) -> Response {
        match cp.job.lock().unwrap().take() {
            Some(job) => axum::Json(job).into_response(),
            None => StatusCode::NO_CONTENT.into_response(),
        }
    }

    async fn report(State(cp): State<Arc<ControlPlane>>, body: Bytes) -> Response {
        let report: Value = serde_json::from_slice(&body).expect("a JSON report");
        cp.reports.lock().unwrap().push(report.clone());
        if cp.refuse_reports {
            let error = json!({"error": {"code": "conflict", "message": "was cancelled"}});
            return (StatusCode::CONFLICT, axum::Json(error)).into_response();
        }
        axum::Json(report).into_response()
    }

    async fn status(State(cp): State<Arc<ControlPlane>>, body: Bytes) -> Response {
        *cp.checks.lock().unwrap() += 1;
        let asked: Value = serde_json::from_slice(&body).unwrap_or_default();
        match cp.status {
            StatusRoute::Says(status) => {
                axum::Json(json!({"restore_id": asked["restore_id"], "status": status}))
                    .into_response()
            }
            StatusRoute::Missing => StatusCode::NOT_FOUND.into_response(),
            StatusRoute::Failing => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
            StatusRoute::Hanging => {
                tokio::time::sleep(Duration::from_secs(5)).await;
                StatusCode::OK.into_response()
            }
        }
    }

    impl ControlPlane {
        /// Starts it on 127.0.0.1; returns it and its URL.
        async fn start(status_route: StatusRoute) -> (Arc<Self>, String) {
            Self::start_refusing(status_route, false).await
        }

        /// Like [`start`](Self::start), answering reports with a 409 when `refuse_reports`.
        async fn start_refusing(
            status_route: StatusRoute,
            refuse_reports: bool,
        ) -> (Arc<Self>, String) {
            let me = Arc::new(Self {
                status: status_route,
                job: Mutex::new(Some(
                    json!({"restore_id": "7", "environment": "staging", "backup_id": "b-7"}),
                )),
                checks: Mutex::new(0),
                reports: Mutex::new(Vec::new()),
                refuse_reports,
            });
            let app = Router::new()
                .route(NEXT_PATH, post(next))
                .route(REPORT_PATH, post(report));
            // Without the route, every status check meets axum's own 404 (counted here).
            let app = match status_route {
                StatusRoute::Missing => app.fallback(status),
                _ => app.route(STATUS_PATH, post(status)),
            }
            .with_state(me.clone());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let url = format!("http://{}", listener.local_addr().expect("addr"));
            tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
            (me, url)
        }

        fn checks(&self) -> usize {
            *self.checks.lock().unwrap()
        }

        fn reports(&self) -> Vec<Value> {
            self.reports.lock().unwrap().clone()
        }
    }

    /// A fresh directory, removed on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(format!("fleet-restore-{}", uuid::Uuid::new_v4()));
            std::fs::create_dir_all(&dir).expect("dir");
            Self(dir)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A runner of `command` against the control plane at `url`, checking every second.
    async fn runner(url: &str, dir: &Path, command: &str) -> RestoreRunner {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(500))
            .build()
            .expect("client");
        let signer = Signer::new(Secret::new("restore-secret").expect("secret"));
        let settings = RestoreSettings {
            enabled: true,
            poll_interval: Duration::from_secs(600),
            timeout: Duration::from_secs(120),
            workdir: Some(dir.to_owned()),
            verify_cmd: Some(command.to_owned()),
            cancel_check: Duration::from_secs(1),
        };
        let state = JobState::open(&dir.join("state.db")).await.expect("state");
        RestoreRunner::new(
            "restore-1",
            settings,
            ControlPlaneClient::new(http, url, signer, Scheme::V1),
            Arc::new(state),
            Arc::new(ShellRunner),
        )
    }

    /// Whether process `pid` still runs (a zombie waiting to be reaped does not).
    fn running(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with(['Z', 'X'])
        })
    }

    /// A verify command that writes `started` with the pid of its long sleep, and `finished`
    /// only if that sleep ends.
    fn long_command(dir: &Path) -> String {
        let at = |name: &str| shell_quote(&dir.join(name).display().to_string());
        format!(
            "sleep 60 & echo $! > {}; wait; touch {}",
            at("started"),
            at("finished")
        )
    }

    #[tokio::test]
    async fn a_verification_the_control_plane_ended_is_stopped_and_not_reported() {
        let dir = Dir::new();
        let (cp, url) = ControlPlane::start(StatusRoute::Says("cancelled")).await;
        let runner = runner(&url, &dir.0, &long_command(&dir.0)).await;
        let began = Instant::now();
        let ran = tokio::time::timeout(Duration::from_secs(20), runner.poll_once())
            .await
            .expect("stopped well before the command's end")
            .expect("state");
        assert!(ran);
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "{:?}",
            began.elapsed()
        );
        let pid: u32 = std::fs::read_to_string(dir.0.join("started"))
            .expect("the command started")
            .trim()
            .parse()
            .expect("a pid");
        let deadline = Instant::now() + Duration::from_secs(5);
        while running(pid) {
            assert!(Instant::now() < deadline, "the verify command still runs");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!dir.0.join("finished").exists());
        assert!(cp.checks() >= 1);
        assert_eq!(cp.reports(), Vec::<Value>::new(), "nothing is reported");

        let job = runner
            .state
            .get(KIND, "7")
            .await
            .expect("get")
            .expect("kept");
        assert_eq!(job.state, "finished");
        assert_eq!(job.final_status.as_deref(), Some(CANCELLED));
        assert_eq!(
            job.error.as_deref(),
            Some("stopped: the control plane ended the verification cancelled")
        );
        assert!(job.reported);
        assert!(
            runner
                .state
                .interrupted(KIND)
                .await
                .expect("list")
                .is_empty()
        );
        assert!(
            runner
                .state
                .unreported(KIND)
                .await
                .expect("list")
                .is_empty()
        );
        // The next poll has nothing to deliver and nothing to run.
        assert!(!runner.poll_once().await.expect("poll"));
        assert_eq!(cp.reports(), Vec::<Value>::new());
    }

    #[tokio::test]
    async fn a_status_check_that_fails_never_stops_the_verification() {
        let cases = [
            StatusRoute::Missing,
            StatusRoute::Failing,
            StatusRoute::Hanging,
            StatusRoute::Says("in_progress"),
        ];
        let runs = cases.map(|route| async move {
            let dir = Dir::new();
            let (cp, url) = ControlPlane::start(route).await;
            let runner = runner(&url, &dir.0, "sleep 2.5; echo restored").await;
            assert!(runner.poll_once().await.expect("state"), "{route:?}");
            (route, cp)
        });
        for (route, cp) in futures_util::future::join_all(runs).await {
            assert!(cp.checks() >= 1, "{route:?}: never asked");
            let reports = cp.reports();
            assert_eq!(reports.len(), 1, "{route:?}: {reports:?}");
            assert_eq!(reports[0]["status"], "verified", "{route:?}: {reports:?}");
            assert_eq!(reports[0]["restore_id"], "7");
            assert!(
                reports[0]["output_tail"]
                    .as_str()
                    .is_some_and(|t| t.contains("restored")),
                "{route:?}: {reports:?}"
            );
        }
    }

    /// The command ended by itself just after an operator cancelled its verification, before
    /// a check saw it: the control plane refuses the report (409), which is final, so it is
    /// not sent again at the next poll, nor after a restart.
    #[tokio::test]
    async fn a_report_refused_with_a_conflict_is_delivered_once() {
        let dir = Dir::new();
        let (cp, url) = ControlPlane::start_refusing(StatusRoute::Says("in_progress"), true).await;
        let first = runner(&url, &dir.0, "exit 3").await;
        assert!(first.poll_once().await.expect("state"));
        assert_eq!(cp.reports().len(), 1);
        assert_eq!(cp.reports()[0]["status"], "failed");
        let job = first
            .state
            .get(KIND, "7")
            .await
            .expect("get")
            .expect("kept");
        assert_eq!(job.final_status.as_deref(), Some("failed"));
        assert!(job.reported, "a 409 is final");
        assert!(!first.poll_once().await.expect("poll"));
        let again = runner(&url, &dir.0, "exit 3").await;
        assert!(!again.poll_once().await.expect("poll"));
        assert_eq!(cp.reports().len(), 1, "sent once");
    }
}
