//! The plugin pipeline against a stand-in control plane (axum on 127.0.0.1 that verifies the
//! signatures, hands out the jobs it is given and keeps the reports, each decoded as the
//! protocol's `PluginReport`), with real shell commands in a temporary directory: a failing
//! action or smoke step rolls back with `PLUGIN_ROLLBACK_CMD`, a failing rollback ends the
//! job `failed`, and an agent stopped mid-job rolls back once on restart.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use fleet_agent::PluginSettings;
use fleet_agent::job_state::JobState;
use fleet_agent::pipeline::{ControlPlaneClient, OUTPUT_TAIL_BYTES, ShellRunner};
use fleet_agent::plugins::PluginPipeline;
use fleet_core::plugin::PluginReport;
use fleet_core::{Limits, Scheme, Secret, SecretResolver, SignatureHeaders, Signer, Verifier};
use serde_json::{Value, json};

use crate::support::{INSTANCE, SECRET, config, temp_dir};

/// The stand-in control plane's state.
struct ControlPlane {
    verifier: Verifier,
    jobs: Mutex<VecDeque<Value>>,
    reports: Mutex<Vec<Value>>,
    /// Reports the control plane would refuse, with the reason.
    refused: Mutex<Vec<String>>,
}

impl ControlPlane {
    /// Starts it with `jobs` to hand out, in order; returns it and its URL.
    async fn start(jobs: Vec<Value>) -> (Arc<Self>, String) {
        let map = json!({ INSTANCE: SECRET }).to_string();
        let resolver = SecretResolver::from_config(Some(&map), None).expect("secret map");
        let me = Arc::new(Self {
            verifier: Verifier::new(resolver),
            jobs: Mutex::new(jobs.into()),
            reports: Mutex::new(Vec::new()),
            refused: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/api/plugins/next", post(next))
            .route("/api/plugins/report", post(report))
            .with_state(me.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
        (me, url)
    }

    fn verified(&self, headers: &HeaderMap, body: &[u8]) -> bool {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        self.verifier
            .verify(
                body,
                &SignatureHeaders::from_lookup(header),
                fleet_core::unix_now(),
            )
            .is_ok()
    }

    /// The reports of `job_id`, in arrival order; none may have been refused.
    fn reports_of(&self, job_id: &str) -> Vec<Value> {
        assert_eq!(*self.refused.lock().unwrap(), Vec::<String>::new());
        self.reports
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r["job_id"] == job_id)
            .cloned()
            .collect()
    }
}

async fn next(State(cp): State<Arc<ControlPlane>>, headers: HeaderMap, body: Bytes) -> Response {
    if !cp.verified(&headers, &body) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    match cp.jobs.lock().unwrap().pop_front() {
        Some(job) => axum::Json(job).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    }
}

async fn report(State(cp): State<Arc<ControlPlane>>, headers: HeaderMap, body: Bytes) -> Response {
    if !cp.verified(&headers, &body) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if let Err(err) = fleet_core::validate::decode::<PluginReport>(&body, &Limits::default()) {
        let body = String::from_utf8_lossy(&body);
        cp.refused.lock().unwrap().push(format!("{err:?}: {body}"));
        return StatusCode::UNPROCESSABLE_ENTITY.into_response();
    }
    let value: Value = serde_json::from_slice(&body).expect("json");
    cp.reports.lock().unwrap().push(value);
    StatusCode::OK.into_response()
}

/// Settings whose commands run in `dir`; the rollback writes its environment (and the
/// quoted substitution of the name) to `rollback.env`.
fn settings(dir: &Path) -> PluginSettings {
    let mut s = config("http://unused", dir).plugin;
    s.workdir = Some(dir.to_owned());
    s.install_cmd = Some("echo installing {{name}}; touch installed".into());
    s.update_cmd = Some("echo updating >> update-runs; echo update broke >&2; exit 3".into());
    s.rollback_cmd = Some(
        "printf '%s|%s|%s|%s|%s|%s|%s\\n' \"$PLUGIN_NAME\" \"$PLUGIN_VERSION\" \
         \"$PLUGIN_ACTION\" \"$PLUGIN_JOB_ID\" \"$PLUGIN_FAILED_STEP\" {{name}} {{action}} \
         >> rollback.env; echo rolled back"
            .into(),
    );
    s
}

fn job(id: &str, action: &str) -> Value {
    json!({"job_id": id, "plugin": {"name": "@acme/report", "version": "1.2.0", "action": action}})
}

async fn start_pipeline(url: &str, dir: &Path, settings: PluginSettings) -> PluginPipeline {
    let state = JobState::open(&dir.join("state.db")).await.expect("state");
    let client = ControlPlaneClient::new(
        reqwest::Client::new(),
        url,
        Signer::new(Secret::new(SECRET).expect("secret")),
        Scheme::V1,
    );
    PluginPipeline::new(
        INSTANCE,
        settings,
        client,
        Arc::new(state),
        Arc::new(ShellRunner),
    )
}

fn statuses(reports: &[Value]) -> Vec<(String, String)> {
    reports
        .iter()
        .map(|r| {
            (
                r["status"].as_str().unwrap_or("").to_owned(),
                r["step"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test]
async fn a_failing_update_rolls_back_with_the_jobs_environment() {
    let dir = temp_dir("plugin-rollback");
    let (cp, url) = ControlPlane::start(vec![job("41", "update")]).await;
    let pipeline = start_pipeline(&url, &dir, settings(&dir)).await;
    assert!(pipeline.poll_once().await.expect("poll"), "the job ran");
    let reports = cp.reports_of("41");
    assert_eq!(
        statuses(&reports),
        pairs(&[
            ("in_progress", "update"),
            ("in_progress", "rollback"),
            ("rolled_back", "update"),
        ]),
        "{reports:#?}"
    );
    let last = &reports[2];
    assert!(
        last["error"]
            .as_str()
            .is_some_and(|e| e.contains("step update exited with status 3")),
        "{last}"
    );
    let tail = last["output_tail"].as_str().unwrap_or("");
    assert!(
        tail.contains("update broke") && tail.contains("rolled back"),
        "{tail}"
    );
    assert_eq!(
        read(&dir.join("rollback.env")),
        "@acme/report|1.2.0|update|41|update|@acme/report|update\n",
        "the rollback's environment and substitutions"
    );
    assert_eq!(read(&dir.join("update-runs")).lines().count(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_failing_rollback_ends_failed_naming_both_with_bounded_output() {
    let dir = temp_dir("plugin-rollback-fails");
    let (cp, url) = ControlPlane::start(vec![job("42", "update")]).await;
    let mut s = settings(&dir);
    // Both write far more than a report may carry.
    s.update_cmd = Some("head -c 20000 /dev/zero | tr '\\0' u; echo update-end; exit 3".into());
    s.rollback_cmd = Some(
        "head -c 20000 /dev/zero | tr '\\0' r; echo rollback-end; touch rollback-ran; exit 4"
            .into(),
    );
    let pipeline = start_pipeline(&url, &dir, s).await;
    assert!(pipeline.poll_once().await.expect("poll"));
    let reports = cp.reports_of("42");
    assert_eq!(
        statuses(&reports),
        pairs(&[
            ("in_progress", "update"),
            ("in_progress", "rollback"),
            ("failed", "update"),
        ]),
        "{reports:#?}"
    );
    assert!(dir.join("rollback-ran").exists());
    let error = reports[2]["error"].as_str().unwrap_or("");
    assert!(
        error.contains("step update exited with status 3")
            && error.contains("the rollback failed too: step rollback exited with status 4"),
        "{error}"
    );
    let tail = reports[2]["output_tail"].as_str().unwrap_or("");
    assert!(
        tail.contains("update-end") && tail.contains("rollback-end"),
        "both outputs' ends: {tail}"
    );
    assert!(tail.len() <= OUTPUT_TAIL_BYTES + 64, "{} bytes", tail.len());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn no_rollback_without_a_command_or_when_the_rollout_turns_it_off() {
    // Without PLUGIN_ROLLBACK_CMD the job fails at its step, as it always did.
    let dir = temp_dir("plugin-no-rollback");
    let (cp, url) = ControlPlane::start(vec![job("43", "update")]).await;
    let mut s = settings(&dir);
    s.rollback_cmd = None;
    let pipeline = start_pipeline(&url, &dir, s).await;
    assert!(pipeline.poll_once().await.expect("poll"));
    let reports = cp.reports_of("43");
    assert_eq!(
        statuses(&reports),
        pairs(&[("in_progress", "update"), ("failed", "update")]),
        "{reports:#?}"
    );
    assert!(
        reports[1]["error"]
            .as_str()
            .is_some_and(|e| e.contains("status 3") && !e.contains("rollback"))
    );
    let _ = std::fs::remove_dir_all(&dir);

    // With it, the rollout's `auto_rollback: false` is honoured, and `true` rolls back.
    let dir = temp_dir("plugin-rollout-says");
    let mut off = job("44", "update");
    off["rollout"] = json!({"auto_rollback": false});
    let mut on = job("45", "update");
    on["rollout"] = json!({"auto_rollback": true, "strategy": "BATCH"});
    let (cp, url) = ControlPlane::start(vec![off, on]).await;
    let pipeline = start_pipeline(&url, &dir, settings(&dir)).await;
    assert!(pipeline.poll_once().await.expect("poll"));
    assert_eq!(
        statuses(&cp.reports_of("44")),
        pairs(&[("in_progress", "update"), ("failed", "update")])
    );
    assert_eq!(read(&dir.join("rollback.env")), "", "no rollback for 44");
    assert!(pipeline.poll_once().await.expect("poll"));
    assert_eq!(
        statuses(&cp.reports_of("45")).last().cloned(),
        Some(("rolled_back".to_owned(), "update".to_owned()))
    );
    assert_eq!(read(&dir.join("rollback.env")).lines().count(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_failing_smoke_step_rolls_back_the_install() {
    let dir = temp_dir("plugin-smoke");
    let (cp, url) = ControlPlane::start(vec![job("46", "install")]).await;
    let mut s = settings(&dir);
    s.smoke_cmd = Some("test -e installed && echo smoke says no && exit 1".into());
    s.rollback_cmd = Some(format!(
        "{} && rm installed",
        s.rollback_cmd.clone().expect("set")
    ));
    let pipeline = start_pipeline(&url, &dir, s).await;
    assert!(pipeline.poll_once().await.expect("poll"));
    let reports = cp.reports_of("46");
    assert_eq!(
        statuses(&reports),
        pairs(&[
            ("in_progress", "install"),
            ("in_progress", "install"),
            ("in_progress", "smoke"),
            ("in_progress", "rollback"),
            ("rolled_back", "smoke"),
        ]),
        "{reports:#?}"
    );
    assert_eq!(
        read(&dir.join("rollback.env")),
        "@acme/report|1.2.0|install|46|smoke|@acme/report|install\n"
    );
    assert!(!dir.join("installed").exists(), "the rollback undid it");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn an_agent_stopped_mid_job_rolls_back_once_and_never_runs_the_action_again() {
    let dir = temp_dir("plugin-crash");
    // What an agent killed in job 47's update step, and in job 48's rollback, left on disk.
    {
        let state = JobState::open(&dir.join("state.db")).await.expect("state");
        for (id, step) in [("47", "update"), ("48", "rollback")] {
            let payload = job(id, "update").to_string();
            state.begin("plugin", id, &payload).await.expect("begin");
            state.step("plugin", id, step).await.expect("step");
        }
    }
    // The control plane hands both out again (its answers were lost): neither runs again.
    let (cp, url) = ControlPlane::start(vec![job("47", "update"), job("48", "update")]).await;
    let pipeline = start_pipeline(&url, &dir, settings(&dir)).await;
    assert!(!pipeline.poll_once().await.expect("poll"));
    assert!(!pipeline.poll_once().await.expect("poll"));
    assert!(!pipeline.poll_once().await.expect("poll"));

    let reports = cp.reports_of("47");
    assert_eq!(
        statuses(&reports),
        pairs(&[("in_progress", "rollback"), ("rolled_back", "update")]),
        "{reports:#?}"
    );
    assert!(
        reports[1]["error"]
            .as_str()
            .is_some_and(|e| e.contains("stopped during step update"))
    );
    let reports = cp.reports_of("48");
    assert_eq!(
        statuses(&reports),
        pairs(&[("failed", "rollback")]),
        "{reports:#?}"
    );
    assert!(
        reports[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("stopped during the rollback"))
    );
    assert_eq!(
        read(&dir.join("rollback.env")),
        "@acme/report|1.2.0|update|47|update|@acme/report|update\n",
        "one rollback, for 47"
    );
    assert!(
        !dir.join("update-runs").exists(),
        "the action never ran again"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
