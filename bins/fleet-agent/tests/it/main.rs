//! End-to-end tests of the `fleet-agent` binary: configuration errors, SIGTERM, SIGKILL with
//! a full outbox, the container image, and the fault tests of RELIABILITY.md (`faults`).
//! They use the real services from `scripts/services` and fail with the command to run when
//! those are missing.

#[path = "../../../../fleet-agent-lib/tests/it/receiver.rs"]
mod receiver;

mod compose_rollout;
mod control_plane;
mod enroll;
mod faults;
mod image;
mod process;
mod rollout;
mod secrets;
mod unit;
mod update;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The instance id the tests use.
pub const INSTANCE: &str = "e2e-agent-001";
/// The agent secret the tests use.
pub const SECRET: &str = "e2e-agent-secret";
/// The local API token the tests use.
pub const LOCAL_TOKEN: &str = "e2e-local-token";

/// A service URL the test command exports; panics with the fix when it is missing.
pub fn service_env(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "{name} is not set: these tests need real services. Run `eval \"$(scripts/services \
             postgres redis podman)\"` first, or run scripts/test."
        ),
    }
}

/// A fresh directory under the system temp dir.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "fleet-agent-e2e-{name}-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Serves `router` on a fresh 127.0.0.1 port for the rest of the test; returns its URL.
pub async fn serve(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, router).await.expect("serve") });
    url
}

/// A control plane on SQLite in `dir` with the `admin` token and, when given, the test
/// instance's secret; returns its URL.
pub async fn serve_control_plane(dir: &Path, admin: &str, with_secret: bool) -> String {
    let store =
        fleet_server::SqliteStore::connect(&format!("sqlite://{}", dir.join("cp.db").display()))
            .await
            .expect("store");
    let mut builder = fleet_server::ControlPlane::builder().store(store);
    if with_secret {
        builder = builder.secrets(
            fleet_core::SecretResolver::from_config(
                Some(&serde_json::json!({ INSTANCE: SECRET }).to_string()),
                None,
            )
            .expect("secrets"),
        );
    }
    let router = builder
        .tokens(fleet_server::RoleTokens {
            admin: Some(admin.into()),
            ..Default::default()
        })
        .build()
        .expect("control plane");
    serve(router).await
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The environment of an agent with every check on: real PostgreSQL, Redis and podman.
pub fn agent_env(control_plane: &str, dir: &Path, local_port: u16) -> Vec<(String, String)> {
    [
        ("INSTANCE_ID", INSTANCE.to_owned()),
        ("CONTROL_PLANE_URL", control_plane.to_owned()),
        ("AGENT_SECRET", SECRET.to_owned()),
        ("HEARTBEAT_INTERVAL", "1".to_owned()),
        ("AGENT_PORT", local_port.to_string()),
        ("AGENT_LOCAL_TOKEN", LOCAL_TOKEN.to_owned()),
        (
            "AGENT_STATE_PATH",
            dir.join("state.db").display().to_string(),
        ),
        ("DATABASE_URL", service_env("FLEET_TEST_POSTGRES_URL")),
        ("REDIS_URL", service_env("FLEET_TEST_REDIS_URL")),
        ("DOCKER_HOST", service_env("DOCKER_HOST")),
        ("CONTAINERS_INTERVAL", "5".to_owned()),
        ("METRICS_INTERVAL", "5".to_owned()),
        ("AGENT_METRICS_URL", "off".to_owned()),
        ("SEND_BACKOFF_BASE_MS", "100".to_owned()),
        ("SEND_BACKOFF_MAX", "1".to_owned()),
        ("BUFFER_MAX_SIZE", "1000".to_owned()),
        ("RUST_LOG", "info".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Starts the agent binary with exactly `env` (plus PATH), logging to `dir/agent-N.log`.
pub fn spawn_agent(env: &[(String, String)], dir: &Path) -> Child {
    let n = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    let log = std::fs::File::create(dir.join(format!("agent-{n}.log"))).unwrap();
    Command::new(env!("CARGO_BIN_EXE_fleet-agent"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start fleet-agent")
}

/// The logs of the agents [`spawn_agent`] started in `dir`, oldest first: path and text.
pub fn agent_logs(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("agent dir")
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "log"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("log");
            (path, text)
        })
        .collect()
}

/// Reads one figure from the agent's own metrics.
pub async fn agent_metric(port: u16, name: &str) -> Option<f64> {
    let text = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/metrics/agent"))
        .header("x-agent-local-token", LOCAL_TOKEN)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Waits until `cond` holds, up to `secs`.
pub async fn wait_until(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cond()
}

/// Kills the agent process if a test fails before stopping it.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The ids waiting in the outbox at `dir` (the agent must be stopped), oldest first.
pub async fn waiting_ids(dir: &Path) -> Vec<String> {
    let bounds = fleet_agent::outbox::Bounds {
        max_messages: 1000,
        max_bytes: 1 << 30,
        max_age: Duration::from_secs(3600),
    };
    fleet_agent::outbox::Outbox::open(&dir.join("state.db"), bounds)
        .await
        .unwrap()
        .waiting_ids()
        .await
        .unwrap()
}

/// Waits until the agent's outbox holds at least `n` messages (read from its local API).
pub async fn wait_for_queued(local_port: u16, n: f64) -> f64 {
    let mut queued = 0.0;
    for _ in 0..300 {
        queued = agent_metric(local_port, "fleet_agent_outbox_messages")
            .await
            .unwrap_or(0.0);
        if queued >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    queued
}

/// Submits a command (the body of `POST /v1/commands/submit`) with an admin `token`;
/// returns its id.
pub async fn submit_command(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    body: serde_json::Value,
) -> String {
    let submitted: serde_json::Value = client
        .post(format!("{url}/v1/commands/submit"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .expect("submit")
        .json()
        .await
        .expect("json");
    submitted["id"]
        .as_str()
        .unwrap_or_else(|| panic!("refused: {submitted}"))
        .to_owned()
}

/// The command `id` once it is no longer running, or as it stands after `secs` (so the
/// caller's assertion shows where it got stuck).
pub async fn wait_command(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    id: &str,
    secs: u64,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let shown: serde_json::Value = client
            .get(format!("{url}/v1/commands/{id}"))
            .bearer_auth(token)
            .send()
            .await
            .expect("show")
            .json()
            .await
            .expect("json");
        if shown["status"] != "running" || tokio::time::Instant::now() > deadline {
            return shown;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Submits a command and returns it once it is no longer running (120 s at most).
pub async fn run_command(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    let id = submit_command(client, url, token, body).await;
    wait_command(client, url, token, &id, 120).await
}

/// A `HEALTH_CHECK` of `instance`, run to its end.
pub async fn health_check(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    instance: &str,
) -> serde_json::Value {
    let body =
        serde_json::json!({"command_type": "HEALTH_CHECK", "targets": [instance], "payload": {}});
    run_command(client, url, token, body).await
}

/// Sends SIGTERM and expects a clean exit within 10 s.
pub async fn sigterm_and_wait(agent: &mut Guard) {
    let status = Command::new("kill")
        .args(["-TERM", &agent.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    for _ in 0..100 {
        if let Some(status) = agent.0.try_wait().unwrap() {
            assert!(status.success(), "exit after SIGTERM: {status:?}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the agent did not stop within 10 s of SIGTERM");
}
