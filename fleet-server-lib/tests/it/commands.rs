//! Remote commands end to end: the real control plane on 127.0.0.1:0 and a real agent
//! (fleet-agent-lib) dialling its live channel, real processes, SQLite and PostgreSQL.

use std::path::Path;
use std::time::{Duration, Instant};

use axum::response::IntoResponse;
use fleet_agent::{Agent, AgentConfig, CommandSettings};
use fleet_core::Secret;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::support::{self, ADMIN, OPS, SECRET, SUPPORT, TempDir, TestServer, TestStore};

pub const INSTANCE: &str = "acme-001";

/// A running in-process agent with remote commands on.
pub struct TestAgent {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    pub dir: TempDir,
}

impl TestAgent {
    pub async fn start(url: &str, instance: &str, secret: &str, projects: Option<&Path>) -> Self {
        Self::start_in(url, instance, secret, projects, TempDir::new()).await
    }

    pub async fn start_in(
        url: &str,
        instance: &str,
        secret: &str,
        projects: Option<&Path>,
        dir: TempDir,
    ) -> Self {
        let mut config = AgentConfig::new(instance, url, Secret::new(secret).expect("secret"));
        config.local_port = 0;
        config.state_path = dir.0.join("state.db");
        config.heartbeat_interval = Duration::from_secs(3600);
        let mut settings = CommandSettings {
            projects_dir: projects
                .map(Path::to_path_buf)
                .unwrap_or_else(|| dir.0.join("projects")),
            ..CommandSettings::default()
        };
        settings.backoff_max = Duration::from_secs(2);
        let agent = Agent::builder(config)
            .without_builtins()
            .commands(settings)
            .build()
            .expect("agent");
        Self::run(agent, dir)
    }

    /// Runs `agent`, built by the caller, until [`stop`](Self::stop); `dir` lives as long.
    pub fn run(agent: Agent, dir: TempDir) -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            agent
                .run(async {
                    let _ = stopped.await;
                })
                .await
                .expect("agent run");
        });
        Self {
            stop: Some(stop),
            task: Some(task),
            dir,
        }
    }

    pub async fn stop(mut self) -> TempDir {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        TempDir(std::mem::take(&mut self.dir.0))
    }
}

/// Waits until `count` agents hold a socket to the server at `url`.
pub async fn wait_connected(client: &reqwest::Client, url: &str, count: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let body: Value = client
            .get(format!("{url}/v1/agents/connected"))
            .bearer_auth(SUPPORT)
            .send()
            .await
            .expect("connected")
            .json()
            .await
            .unwrap_or(Value::Null);
        if body["connected"].as_u64() == Some(count) {
            return;
        }
        assert!(Instant::now() < deadline, "agents did not connect: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Submits a command as `token`; returns the status and body.
pub async fn submit(client: &reqwest::Client, url: &str, token: &str, body: Value) -> (u16, Value) {
    let response = client
        .post(format!("{url}/v1/commands/submit"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .expect("submit");
    let status = response.status().as_u16();
    let answer = response.json().await.unwrap_or(Value::Null);
    if status == 201 {
        conforms(client, url, "post", "/v1/commands/submit", &answer).await;
    }
    (status, answer)
}

/// Checks a success answer of the requested `method path` against /openapi.json.
pub async fn conforms(
    client: &reqwest::Client,
    url: &str,
    method: &str,
    path: &str,
    answer: &Value,
) {
    let spec: Value = client
        .get(format!("{url}/openapi.json"))
        .send()
        .await
        .expect("openapi")
        .json()
        .await
        .expect("json");
    support::assert_documented_answer(&spec, method, path, answer);
}

/// Polls `GET /v1/commands/:id` until the command is no longer running.
pub async fn wait_done(client: &reqwest::Client, url: &str, id: &str, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let body: Value = client
            .get(format!("{url}/v1/commands/{id}"))
            .bearer_auth(SUPPORT)
            .send()
            .await
            .expect("show")
            .json()
            .await
            .expect("json");
        if body["status"] != "running" {
            conforms(client, url, "get", &format!("/v1/commands/{id}"), &body).await;
            return body;
        }
        assert!(Instant::now() < deadline, "command still running: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs a `HEALTH_CHECK` on `instance` as ops and returns the ended command.
pub async fn health_check(server: &TestServer, instance: &str) -> Value {
    let (_, body) = submit(
        &server.client,
        &server.url,
        OPS,
        json!({"command_type": "HEALTH_CHECK", "targets": [instance], "payload": {}}),
    )
    .await;
    let id = body["id"]
        .as_str()
        .unwrap_or_else(|| panic!("refused: {body}"))
        .to_owned();
    wait_done(&server.client, &server.url, &id, Duration::from_secs(60)).await
}

/// The whole stored output of one target's stream.
pub async fn output(client: &reqwest::Client, url: &str, id: &str, stream: &str) -> Vec<u8> {
    let response = client
        .get(format!("{url}/v1/commands/{id}/logs?stream={stream}"))
        .bearer_auth(SUPPORT)
        .send()
        .await
        .expect("logs");
    assert_eq!(response.status().as_u16(), 200);
    response.bytes().await.expect("bytes").to_vec()
}

async fn server(store: &TestStore) -> TestServer {
    TestServer::start(store.store.clone()).await
}

async fn run_command_streams_output_and_exit_codes(store: TestStore) {
    let server = server(&store).await;
    let agent = TestAgent::start(&server.url, INSTANCE, SECRET, None).await;
    wait_connected(&server.client, &server.url, 1).await;

    let (status, body) = submit(
        &server.client,
        &server.url,
        ADMIN,
        json!({"command_type": "RunCommand", "targets": [INSTANCE],
               "payload": {"cmd": "printf", "args": ["%s|%s", "a b", "$(id)"]}}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().expect("id").to_owned();
    let done = wait_done(&server.client, &server.url, &id, Duration::from_secs(20)).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["targets"][0]["status"], "completed");
    assert_eq!(done["targets"][0]["exit_code"], 0);
    // No shell: the arguments arrive as they were sent, `$(id)` included.
    assert_eq!(
        output(&server.client, &server.url, &id, "stdout").await,
        b"a b|$(id)"
    );

    // A failing program: FAILED with its exit code and stderr.
    let (_, body) = submit(
        &server.client,
        &server.url,
        ADMIN,
        json!({"command_type": "RunCommand", "targets": [INSTANCE],
               "payload": {"cmd": "echo oops >&2; exit 3", "shell": true}}),
    )
    .await;
    let id = body["id"].as_str().expect("id").to_owned();
    let done = wait_done(&server.client, &server.url, &id, Duration::from_secs(20)).await;
    assert_eq!(done["targets"][0]["status"], "failed", "{done}");
    assert_eq!(done["targets"][0]["exit_code"], 3);
    assert_eq!(
        output(&server.client, &server.url, &id, "stderr").await,
        b"oops\n"
    );

    // A timeout kills the whole process group, the background child included.
    let marker = agent.dir.0.join("survivor");
    let script = format!("(sleep 3; touch {}) & sleep 60", marker.display());
    let started = Instant::now();
    let (_, body) = submit(
        &server.client,
        &server.url,
        ADMIN,
        json!({"command_type": "RunCommand", "targets": [INSTANCE],
               "payload": {"cmd": script, "shell": true, "timeout_sec": 1}}),
    )
    .await;
    let id = body["id"].as_str().expect("id").to_owned();
    let done = wait_done(&server.client, &server.url, &id, Duration::from_secs(20)).await;
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(done["targets"][0]["status"], "failed", "{done}");
    assert!(
        done["targets"][0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("timed out"),
        "{done}"
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        !marker.exists(),
        "a child of the timed-out command survived"
    );

    agent.stop().await;
    server.stop().await;
}

async fn roles_limits_and_tokens(store: TestStore) {
    let server = server(&store).await;
    let run =
        json!({"command_type": "RunCommand", "targets": [INSTANCE], "payload": {"cmd": "true"}});
    assert_eq!(
        submit(&server.client, &server.url, OPS, run.clone())
            .await
            .0,
        403
    );
    assert_eq!(
        submit(&server.client, &server.url, SUPPORT, run.clone())
            .await
            .0,
        403
    );
    assert_eq!(
        submit(&server.client, &server.url, "nope", run).await.0,
        401
    );
    let status = json!({"command_type": "STATUS", "targets": [INSTANCE], "payload": {"project_name": "web"}});
    assert_eq!(
        submit(&server.client, &server.url, OPS, status).await.0,
        201
    );
    let bad = json!({"command_type": "STATUS", "targets": [INSTANCE], "payload": {"project_name": "../etc"}});
    let (code, body) = submit(&server.client, &server.url, OPS, bad).await;
    assert_eq!(code, 422);
    assert_eq!(body["error"]["details"][0]["path"], "payload.project_name");
    let none = json!({"command_type": "HEALTH_CHECK", "payload": {}});
    assert_eq!(submit(&server.client, &server.url, OPS, none).await.0, 422);
    // An agent installs only a binary stating the asked version, so a version no binary can
    // state is refused here rather than by every agent in turn.
    let latest = json!({"command_type": "UpdateAgent", "targets": [INSTANCE],
        "payload": {"version": "latest", "url": "https://dl.example/agent"}});
    let (code, body) = submit(&server.client, &server.url, ADMIN, latest).await;
    assert_eq!(code, 422, "{body}");
    assert_eq!(body["error"]["details"][0]["path"], "payload.version");
    // A compose file that no agent could read is refused before it is sent to any.
    for (file, why) in [
        ("!!!", "is not valid base64"),
        ("", "the compose file is empty"),
    ] {
        let deploy = json!({"command_type": "DEPLOY_COMPOSE", "targets": [INSTANCE],
            "payload": {"project_name": "web", "compose_file_base64": file}});
        let (code, body) = submit(&server.client, &server.url, ADMIN, deploy).await;
        assert_eq!(code, 422, "{body}");
        assert_eq!(
            body["error"]["details"][0],
            json!({"path": "payload.compose_file_base64", "message": why})
        );
    }

    // The live channel needs a token; a forged one is refused before the upgrade.
    let response = server
        .client
        .get(server.at("/v1/agents/connect"))
        .bearer_auth("a.b.c")
        .send()
        .await
        .expect("connect");
    assert_eq!(response.status().as_u16(), 401);

    // JWKS publishes the key that verifies registration tokens.
    let (code, jwks) = server.get_documented("/.well-known/jwks.json", "").await;
    assert_eq!(code, 200);
    assert_eq!(jwks["keys"][0]["alg"], "EdDSA");
    let client = reqwest::Client::new();
    let answer = fleet_agent::channel::register(
        &client,
        &server.url,
        INSTANCE,
        &Secret::new(SECRET).expect("secret"),
        "1.0.0",
    )
    .await
    .expect("register");
    let key = fleet_core::PublicKey::from_base64(&{
        use base64::Engine;
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(jwks["keys"][0]["x"].as_str().expect("x"))
            .expect("x");
        base64::engine::general_purpose::STANDARD.encode(x)
    })
    .expect("key");
    let claims = fleet_core::jwt::JwtVerifier::new(&[key], "fleet-control-plane")
        .verify(&answer.token, support::now())
        .expect("token verifies with the published key");
    assert_eq!(claims.sub, INSTANCE);
    // A wrong secret is refused.
    let wrong = fleet_agent::channel::register(
        &client,
        &server.url,
        INSTANCE,
        &Secret::new("wrong").expect("secret"),
        "1.0.0",
    )
    .await;
    assert!(wrong.is_err());
    // The answers as /openapi.json gives them: a signed registration, the live count.
    let bytes = serde_json::to_vec(&json!({"instance_id": INSTANCE})).expect("json");
    let response = server
        .post_v1(
            "/v1/agents/register",
            SECRET,
            "msg-register",
            support::now(),
            &bytes,
        )
        .await;
    assert_eq!(response.status().as_u16(), 200);
    let registered: Value = response.json().await.expect("json");
    assert!(registered.get("secret").is_none(), "{registered}");
    conforms(
        &client,
        &server.url,
        "post",
        "/v1/agents/register",
        &registered,
    )
    .await;
    let (code, connected) = server.get_documented("/v1/agents/connected", SUPPORT).await;
    assert_eq!((code, connected), (200, json!({"connected": 0})));
    server.stop().await;
}

async fn max_errors_stops_further_targets(store: TestStore) {
    let server = server(&store).await;
    let agent = TestAgent::start(&server.url, INSTANCE, SECRET, None).await;
    wait_connected(&server.client, &server.url, 1).await;
    server.seen("never-connected-002").await;
    let (status, body) = submit(
        &server.client,
        &server.url,
        ADMIN,
        json!({"command_type": "RunCommand", "targets": [INSTANCE, "never-connected-002"],
               "max_concurrency": 1, "max_errors": "0", "payload": {"cmd": "false"}}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().expect("id").to_owned();
    let done = wait_done(&server.client, &server.url, &id, Duration::from_secs(20)).await;
    assert_eq!(done["status"], "halted", "{done}");
    assert_eq!(done["targets"][0]["status"], "failed");
    assert_eq!(done["targets"][1]["status"], "skipped");
    agent.stop().await;
    server.stop().await;
}

async fn large_output_streams_byte_for_byte(store: TestStore) {
    let server = server(&store).await;
    let agent = TestAgent::start(&server.url, INSTANCE, SECRET, None).await;
    wait_connected(&server.client, &server.url, 1).await;
    // 20 MB with one 200 KiB line (no newline for far longer than 64 KiB), then numbered lines.
    let script = "head -c 204800 /dev/zero | tr '\\0' x; echo; seq 1 2500000";
    let (_, body) = submit(
        &server.client,
        &server.url,
        ADMIN,
        json!({"command_type": "RunCommand", "targets": [INSTANCE],
               "payload": {"cmd": script, "shell": true}}),
    )
    .await;
    let id = body["id"].as_str().expect("id").to_owned();
    let done = wait_done(&server.client, &server.url, &id, Duration::from_secs(180)).await;
    assert_eq!(done["status"], "completed", "{done}");
    let expected = std::process::Command::new("/bin/sh")
        .args(["-c", script])
        .output()
        .expect("run locally")
        .stdout;
    let stored = output(&server.client, &server.url, &id, "stdout").await;
    assert_eq!(stored.len(), expected.len());
    assert!(stored == expected, "stored output differs");
    agent.stop().await;
    server.stop().await;
}

async fn follow_streams_live_then_ends(store: TestStore) {
    let server = server(&store).await;
    let agent = TestAgent::start(&server.url, INSTANCE, SECRET, None).await;
    wait_connected(&server.client, &server.url, 1).await;
    let (_, body) = submit(
        &server.client,
        &server.url,
        ADMIN,
        json!({"command_type": "RunCommand", "targets": [INSTANCE],
               "payload": {"cmd": "for i in 1 2 3; do echo line$i; sleep 0.3; done", "shell": true}}),
    )
    .await;
    let id = body["id"].as_str().expect("id").to_owned();
    let response = server
        .client
        .get(server.at(&format!("/v1/commands/{id}/logs?follow=true")))
        .bearer_auth(SUPPORT)
        .send()
        .await
        .expect("follow");
    assert_eq!(response.status().as_u16(), 200);
    let text = tokio::time::timeout(Duration::from_secs(20), response.text())
        .await
        .expect("the stream ends with the command")
        .expect("text");
    let mut out = String::new();
    let mut ended = false;
    for line in text.lines() {
        if let Some(data) = line.strip_prefix("data: ") {
            let value: Value = serde_json::from_str(data).expect("json");
            if let Some(piece) = value["data"].as_str() {
                out.push_str(piece);
            }
            if value["status"] == "completed" {
                ended = true;
            }
        }
    }
    assert_eq!(out, "line1\nline2\nline3\n");
    assert!(ended, "{text}");

    // Each output event's id says where the streams go on; sent back as Last-Event-ID (what
    // a client that lost the stream does), the output resumes there instead of from the start.
    let first_id = text
        .lines()
        .find_map(|l| l.strip_prefix("id: "))
        .expect("output events carry ids")
        .to_owned();
    assert_eq!(first_id, "6,0", "{text}");
    let follow_from = |last: String| {
        server
            .client
            .get(server.at(&format!("/v1/commands/{id}/logs?follow=true")))
            .bearer_auth(SUPPORT)
            .header("last-event-id", last)
            .send()
    };
    let resumed = follow_from(first_id)
        .await
        .expect("follow")
        .text()
        .await
        .expect("text");
    let rest: String = resumed
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v["data"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(rest, "line2\nline3\n", "{resumed}");
    for bad in ["x", "-1,0", "6"] {
        let response = follow_from(bad.to_owned()).await.expect("follow");
        assert_eq!(response.status().as_u16(), 400, "{bad}");
    }
    agent.stop().await;
    server.stop().await;
}

/// Cancels command `id` as admin; returns the answer, checked against /openapi.json.
async fn cancel(server: &TestServer, id: &str) -> Value {
    let path = format!("/v1/commands/{id}/cancel");
    let response = server
        .client
        .post(server.at(&path))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("cancel");
    assert_eq!(response.status().as_u16(), 200);
    let answer: Value = response.json().await.expect("json");
    conforms(&server.client, &server.url, "post", &path, &answer).await;
    answer
}

async fn cancel_kills_a_running_command(store: TestStore) {
    let server = server(&store).await;
    let agent = TestAgent::start(&server.url, INSTANCE, SECRET, None).await;
    wait_connected(&server.client, &server.url, 1).await;
    let (_, body) = submit(
        &server.client,
        &server.url,
        ADMIN,
        json!({"command_type": "RunCommand", "targets": [INSTANCE],
               "payload": {"cmd": "sleep", "args": ["60"]}}),
    )
    .await;
    let id = body["id"].as_str().expect("id").to_owned();
    // Wait until it runs.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, shown) = server
            .get_json(&format!("/v1/commands/{id}"), SUPPORT)
            .await;
        if shown["targets"][0]["status"] == "running" {
            break;
        }
        assert!(Instant::now() < deadline, "{shown}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cancelled = cancel(&server, &id).await;
    assert_eq!(cancelled, json!({"id": id, "cancelled": 1}));
    let (_, shown) = server
        .get_documented(&format!("/v1/commands/{id}"), SUPPORT)
        .await;
    assert_eq!(shown["status"], "cancelled");
    assert_eq!(shown["targets"][0]["status"], "cancelled");
    // The agent killed it: its journal holds no running command for long.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let dir = agent.stop().await;
    let journal = fleet_agent::logstream::Journal::open(&fleet_agent::logstream::journal_path(
        &dir.0.join("state.db"),
    ))
    .await
    .expect("journal");
    assert!(journal.interrupted().await.expect("ids").is_empty());
    server.stop().await;
}

/// Creates a one-time enrollment token for `instance` as admin; returns the answer, checked
/// against /openapi.json.
pub(crate) async fn enrollment(server: &TestServer, instance: &str) -> Value {
    let response = server
        .client
        .post(server.at("/v1/enrollments"))
        .bearer_auth(ADMIN)
        .json(&json!({ "instance_id": instance }))
        .send()
        .await
        .expect("enroll");
    assert_eq!(response.status().as_u16(), 201);
    let body: Value = response.json().await.expect("json");
    conforms(
        &server.client,
        &server.url,
        "post",
        "/v1/enrollments",
        &body,
    )
    .await;
    body
}

async fn enrollment_token_buys_a_secret_once(store: TestStore) {
    let server = server(&store).await;
    let body = enrollment(&server, "new-host-7").await;
    let token = body["enrollment_token"].as_str().expect("token").to_owned();
    let dir = TempDir::new();
    let path = dir.0.join("agent.secret");
    let secret = fleet_agent::enroll::enroll(&server.url, "new-host-7", &token, &path)
        .await
        .expect("enrolled");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).expect("file").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(std::fs::read_to_string(&path).expect("read"), secret);
    // Used once.
    assert!(
        fleet_agent::enroll::enroll(&server.url, "new-host-7", &token, &dir.0.join("again"))
            .await
            .is_err()
    );
    // Registering with a token answers the issued secret, once, as /openapi.json says.
    let enrolled = enrollment(&server, "new-host-8").await;
    let response = server
        .client
        .post(server.at("/v1/agents/register"))
        .json(
            &json!({"instance_id": "new-host-8", "enrollment_token": enrolled["enrollment_token"]}),
        )
        .send()
        .await
        .expect("register");
    assert_eq!(response.status().as_u16(), 200);
    let registered: Value = response.json().await.expect("json");
    assert!(registered["secret"].is_string(), "{registered}");
    conforms(
        &server.client,
        &server.url,
        "post",
        "/v1/agents/register",
        &registered,
    )
    .await;
    // The issued secret signs the agent's job polls (updates, plugins, restore checks) as
    // well as its heartbeats; another secret, or the same message again, is refused.
    let asks = json!({"instance_id": "new-host-7"});
    let asks = serde_json::to_vec(&asks).expect("json");
    for (n, path) in [
        "/api/updates/next",
        "/api/plugins/next",
        "/api/restores/next",
    ]
    .into_iter()
    .enumerate()
    {
        let msg_id = format!("msg_enrolled_poll_{n}");
        let answer = server
            .post_v1(path, &secret, &msg_id, support::now(), &asks)
            .await;
        assert_eq!(answer.status().as_u16(), 204, "{path}");
        let again = server
            .post_v1(path, &secret, &msg_id, support::now(), &asks)
            .await;
        assert_eq!(again.status().as_u16(), 401, "{path}: a replay");
        let wrong = server
            .post_v1(
                path,
                "not-the-issued-secret",
                &format!("{msg_id}_wrong"),
                support::now(),
                &asks,
            )
            .await;
        assert_eq!(wrong.status().as_u16(), 401, "{path}: another secret");
    }
    let heartbeat = support::body("new-host-7", json!({}));
    let answer = server
        .send_v1(
            &secret,
            "msg_enrolled_heartbeat",
            support::now(),
            &heartbeat,
        )
        .await;
    assert_eq!(answer.status().as_u16(), 200);
    // The issued secret signs registrations and opens the live channel.
    let agent = TestAgent::start(&server.url, "new-host-7", &secret, None).await;
    wait_connected(&server.client, &server.url, 1).await;
    let done = health_check(&server, "new-host-7").await;
    assert_eq!(done["targets"][0]["status"], "completed", "{done}");
    assert!(done["targets"][0]["data"]["uptime_secs"].is_u64(), "{done}");
    agent.stop().await;
    server.stop().await;
}

async fn unanswered_targets_time_out_and_the_command_goes_on(store: TestStore) {
    let server = TestServer::start_with(store.store.clone(), |b| {
        b.live(fleet_server::LiveSettings {
            delivery_timeout: Duration::from_secs(1),
            ..Default::default()
        })
    })
    .await;
    let agent = TestAgent::start(&server.url, INSTANCE, SECRET, None).await;
    wait_connected(&server.client, &server.url, 1).await;
    server.seen("offline-003").await;
    let (_, body) = submit(
        &server.client,
        &server.url,
        OPS,
        json!({"command_type": "HEALTH_CHECK", "targets": ["offline-003", INSTANCE],
               "max_concurrency": 1, "payload": {}}),
    )
    .await;
    let id = body["id"].as_str().expect("id").to_owned();
    let done = wait_done(&server.client, &server.url, &id, Duration::from_secs(30)).await;
    assert_eq!(done["targets"][0]["status"], "timed_out", "{done}");
    assert_eq!(done["targets"][1]["status"], "completed", "{done}");
    agent.stop().await;
    server.stop().await;
}

/// Tokens of 31 s are renewed about every second (30 s before expiry) on the open channel,
/// which stays up and keeps working.
#[tokio::test]
async fn tokens_are_renewed_before_they_expire() {
    let store = support::sqlite().await;
    let server = TestServer::start_with(store.store.clone(), |b| {
        b.live(fleet_server::LiveSettings {
            token_ttl: Duration::from_secs(31),
            ..Default::default()
        })
    })
    .await;
    let agent = TestAgent::start(&server.url, INSTANCE, SECRET, None).await;
    wait_connected(&server.client, &server.url, 1).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let pool = sqlx::SqlitePool::connect(&store.url).await.expect("db");
    let registrations: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM seen_messages WHERE instance_id = $1")
            .bind(INSTANCE)
            .fetch_one(&pool)
            .await
            .expect("count");
    assert!(registrations >= 3, "only {registrations} registrations");
    let done = health_check(&server, INSTANCE).await;
    assert_eq!(done["targets"][0]["status"], "completed", "{done}");
    agent.stop().await;
    server.stop().await;
}

support::on_both_backends!(
    unanswered_targets_time_out_and_the_command_goes_on,
    run_command_streams_output_and_exit_codes,
    roles_limits_and_tokens,
    max_errors_stops_further_targets,
    large_output_streams_byte_for_byte,
    follow_streams_live_then_ends,
    cancel_kills_a_running_command,
    enrollment_token_buys_a_secret_once,
    commands_are_listed_in_the_dashboard_and_the_api,
    output_past_the_cap_is_acknowledged_and_not_stored,
    offsets_past_what_the_database_holds_are_acknowledged_and_not_stored,
    the_sweep_deletes_old_output_and_the_logs_say_so,
    output_deleted_while_it_is_read_ends_saying_so,
    targets_the_control_plane_never_heard_of_are_refused,
);

/// Stores `chunks` as the output of `target` (of [`INSTANCE`]) and records it completed at
/// `ended_at`, as its agent would have.
async fn ended_with_output(
    commands: &dyn fleet_server::store::commands::CommandStore,
    target: &str,
    chunks: &[(String, fleet_core::command::Stream, u64, Vec<u8>)],
    ended_at: i64,
) {
    use fleet_core::command::TargetStatus;
    use fleet_server::store::commands::TargetUpdate;
    commands
        .store_chunks(chunks, u64::MAX)
        .await
        .expect("store");
    let completed = TargetUpdate {
        status: TargetStatus::Completed,
        exit_code: Some(0),
        error: None,
        logs: None,
        data: None,
    };
    commands
        .record_target(target, INSTANCE, &completed, ended_at)
        .await
        .expect("record")
        .expect("changed");
}

/// Output the retention sweep deletes while a reader is part way through it ends with the
/// deletion told (a line of the whole output, `output_deleted_at` in the followed output's
/// `end` event), not as if the command had printed no more.
async fn output_deleted_while_it_is_read_ends_saying_so(store: TestStore) {
    use fleet_core::command::Stream;
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 768;
    let server = server(&store).await;
    let commands = store.store.commands().expect("command store");
    let now = support::now();
    for follow in [false, true] {
        let (id, target) = run_on(&server, INSTANCE).await;
        let chunks: Vec<_> = (0..CHUNKS)
            .map(|i| {
                let line = format!("{i:07} {}\n", "x".repeat(CHUNK - 9));
                (
                    target.clone(),
                    Stream::Stdout,
                    (i * CHUNK) as u64,
                    line.into_bytes(),
                )
            })
            .collect();
        ended_with_output(commands, &target, &chunks, now - 2 * 86_400).await;

        let mut response = server
            .client
            .get(server.at(&format!("/v1/commands/{id}/logs?follow={follow}")))
            .bearer_auth(SUPPORT)
            .send()
            .await
            .expect("logs");
        assert_eq!(response.status().as_u16(), 200);
        let mut read = response
            .chunk()
            .await
            .expect("read")
            .expect("a first piece")
            .to_vec();
        while commands
            .prune_output(now - 86_400, now)
            .await
            .expect("prune")
            > 0
        {}
        while let Some(piece) = response.chunk().await.expect("read") {
            read.extend_from_slice(&piece);
        }
        let text = String::from_utf8(read).expect("text");
        let size = fleet_core::byte_size((CHUNK * CHUNKS) as i64);
        if follow {
            let end = text
                .rsplit("event: end\ndata: ")
                .next()
                .and_then(|rest| rest.lines().next())
                .expect("an end event");
            let end: Value = serde_json::from_str(end).expect("json");
            assert_eq!(end["status"], "completed", "{end}");
            assert!(
                end["output_deleted_at"]
                    .as_i64()
                    .is_some_and(|at| at >= now),
                "{end}"
            );
            assert_eq!(end["output_bytes"], (CHUNK * CHUNKS) as i64, "{end}");
        } else {
            let note = format!("\n[the output of this target ({size}) was deleted at ");
            assert!(
                text.trim_end()
                    .ends_with("its status, exit code and result are kept]")
                    && text.contains(&note),
                "ends with: {:?}",
                &text[text.len().saturating_sub(300)..]
            );
        }
        assert!(
            text.len() < CHUNK * CHUNKS,
            "the test read the output before it was deleted ({} bytes)",
            text.len()
        );
    }
    server.stop().await;
}

/// A submission naming an instance nobody set up (a typo) is refused whole, naming it,
/// instead of holding a `max_concurrency` slot until the delivery timeout; an instance known
/// by a heartbeat, by its own configured secret, or by a socket (the shared token, no row)
/// is a target.
async fn targets_the_control_plane_never_heard_of_are_refused(store: TestStore) {
    let server = server(&store).await;
    let health =
        |targets: Value| json!({"command_type": "HEALTH_CHECK", "targets": targets, "payload": {}});
    let (code, body) = submit(
        &server.client,
        &server.url,
        OPS,
        health(json!([INSTANCE, "acme-0O1", "shop-9"])),
    )
    .await;
    assert_eq!(code, 422, "{body}");
    assert_eq!(body["error"]["details"][0]["path"], "targets");
    let message = body["error"]["details"][0]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        message.starts_with("unknown instance: acme-0O1, shop-9 (")
            && message.contains("nothing was submitted"),
        "{message}"
    );
    let (_, listed) = server.get_json("/v1/commands", SUPPORT).await;
    assert_eq!(listed["items"], json!([]), "{listed}");

    // Known by a heartbeat signed with the shared token.
    let heartbeat = server
        .send_v1(
            support::SHARED,
            "hb-shop-9",
            support::now(),
            &support::body("shop-9", json!({})),
        )
        .await;
    assert_eq!(heartbeat.status().as_u16(), 200);
    // Known only by its socket: the shared token, no heartbeat, no row.
    let agent = TestAgent::start(&server.url, "edge-3", support::SHARED, None).await;
    wait_connected(&server.client, &server.url, 1).await;
    let (code, body) = submit(
        &server.client,
        &server.url,
        OPS,
        health(json!([INSTANCE, "shop-9", "edge-3"])),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["targets"].as_array().map(Vec::len), Some(3), "{body}");
    let id = body["id"].as_str().expect("id").to_owned();
    cancel(&server, &id).await;
    agent.stop().await;
    server.stop().await;
}

/// The dashboard's command pages and `GET /v1/commands` over each backend's SQL (the browser
/// test drives the pages in Chromium on SQLite).
async fn commands_are_listed_in_the_dashboard_and_the_api(store: TestStore) {
    let server = server(&store).await;
    let agent = TestAgent::start(&server.url, INSTANCE, SECRET, None).await;
    wait_connected(&server.client, &server.url, 1).await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let done = health_check(&server, INSTANCE).await;
        ids.push(done["id"].as_str().expect("id").to_owned());
    }
    let page = |path: String| page(&server, path, SUPPORT);
    let (status, list) = page("/commands".into()).await;
    assert_eq!(status, 200);
    // Newest first, each with its counts.
    let newest = list.find(&ids[1]).expect("second listed");
    let oldest = list.find(&ids[0]).expect("first listed");
    assert!(newest < oldest, "{list}");
    assert_eq!(list.matches("1 completed · 0 failed").count(), 2, "{list}");
    let (status, detail) = page(format!("/commands/{}", ids[0])).await;
    assert_eq!(status, 200);
    assert!(
        detail.contains("HEALTH_CHECK")
            && detail.contains(INSTANCE)
            && detail.contains("completed"),
        "{detail}"
    );

    let (status, text) = page("/v1/commands".into()).await;
    assert_eq!(status, 200, "{text}");
    let listed: Value = serde_json::from_str(&text).expect("json");
    conforms(&server.client, &server.url, "get", "/v1/commands", &listed).await;
    let items = listed["items"].as_array().expect("items");
    assert_eq!(items.len(), 2, "{listed}");
    assert_eq!(items[0]["id"], ids[1].as_str(), "newest first: {listed}");
    assert_eq!(items[1]["id"], ids[0].as_str(), "{listed}");
    for item in items {
        assert_eq!(item["command_type"], "HEALTH_CHECK", "{item}");
        assert_eq!(item["status"], "completed", "{item}");
        assert_eq!((&item["total"], &item["completed"]), (&json!(1), &json!(1)));
        assert_eq!(item["first_instance"], INSTANCE, "{item}");
    }
    let (status, text) = page("/v1/commands?limit=1".into()).await;
    assert_eq!(status, 200, "{text}");
    let listed: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(
        listed["items"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
    assert_eq!(listed["items"][0]["id"], ids[1].as_str(), "{listed}");
    for bad in ["limit=0", "limit=501", "limit=many"] {
        let (status, text) = page(format!("/v1/commands?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {text}");
        assert!(text.contains("limit"), "{bad}: {text}");
    }
    agent.stop().await;
    server.stop().await;
}

/// GETs `path` as `token`: the status and the text of the answer.
async fn page(server: &TestServer, path: String, token: &str) -> (u16, String) {
    let response = server
        .client
        .get(server.at(&path))
        .bearer_auth(token)
        .send()
        .await
        .expect("page");
    (
        response.status().as_u16(),
        response.text().await.expect("text"),
    )
}

/// The command page offers a Cancel form to the roles that may cancel the command, and the
/// form cancels it; a role below that gets no form and a 403.
#[tokio::test]
async fn the_dashboard_cancels_a_command_for_the_roles_that_may() {
    let store = support::sqlite().await;
    let server = server(&store).await;
    let page = |path: String, token: &'static str| page(&server, path, token);
    let press = |path: String, token: &'static str| {
        let server = &server;
        async move {
            let response = reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("client")
                .post(server.at(&path))
                .bearer_auth(token)
                .send()
                .await
                .expect("post");
            let to = response
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            (response.status().as_u16(), to)
        }
    };
    // Nobody takes these: the targets never connect.
    server.seen("never-connected-005").await;
    let (_, check) = submit(
        &server.client,
        &server.url,
        OPS,
        json!({"command_type": "HEALTH_CHECK", "targets": ["never-connected-005"], "payload": {}}),
    )
    .await;
    let check = check["id"].as_str().expect("id").to_owned();
    let (_, run) = submit(
        &server.client,
        &server.url,
        ADMIN,
        json!({"command_type": "RunCommand", "targets": ["never-connected-005"],
               "payload": {"cmd": "true"}}),
    )
    .await;
    let run = run["id"].as_str().expect("id").to_owned();

    let form = format!("action=\"/commands/{check}/cancel\"");
    assert!(
        page(format!("/commands/{check}"), OPS)
            .await
            .1
            .contains(&form)
    );
    assert!(
        !page(format!("/commands/{check}"), SUPPORT)
            .await
            .1
            .contains(&form)
    );
    assert_eq!(
        press(format!("/commands/{check}/cancel"), SUPPORT).await.0,
        403
    );
    // RunCommand changes the host: only admin may cancel it.
    let run_form = format!("action=\"/commands/{run}/cancel\"");
    assert!(
        !page(format!("/commands/{run}"), OPS)
            .await
            .1
            .contains(&run_form)
    );
    assert!(
        page(format!("/commands/{run}"), ADMIN)
            .await
            .1
            .contains(&run_form)
    );
    assert_eq!(press(format!("/commands/{run}/cancel"), OPS).await.0, 403);
    assert_eq!(
        press(format!("/commands/{check}/cancel"), OPS).await,
        (303, format!("/commands/{check}"))
    );
    let (status, shown) = server
        .get_json(&format!("/v1/commands/{check}"), SUPPORT)
        .await;
    assert_eq!(status, 200);
    assert_eq!(shown["status"], "cancelled", "{shown}");
    assert_eq!(shown["targets"][0]["status"], "cancelled", "{shown}");
    let (_, after) = page(format!("/commands/{check}"), OPS).await;
    assert!(!after.contains(&form), "no form once it ended: {after}");
    let (_, still) = server
        .get_json(&format!("/v1/commands/{run}"), SUPPORT)
        .await;
    assert_eq!(
        still["status"], "running",
        "the refused cancel changed nothing: {still}"
    );
    assert_eq!(press(format!("/commands/{run}/cancel"), ADMIN).await.0, 303);
    assert_eq!(
        press("/commands/no-such-command/cancel".into(), ADMIN)
            .await
            .0,
        404
    );
    server.stop().await;
}

/// A control plane behind a "proxy" that refuses WebSocket upgrades, so agents must fall
/// back to `POST /v1/agents/poll`; returns its URL and the serving task.
async fn polling_only_server(store: &TestStore) -> (String, tokio::task::JoinHandle<()>) {
    let router = fleet_server::ControlPlane::builder()
        .shared_store(store.store.clone())
        .secrets(support::resolver())
        .tokens(support::tokens())
        .build()
        .expect("build")
        .layer(axum::middleware::from_fn(
            |request: axum::extract::Request, next: axum::middleware::Next| async move {
                if request.uri().path() == "/v1/agents/connect" {
                    return axum::http::StatusCode::BAD_GATEWAY.into_response();
                }
                next.run(request).await
            },
        ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let serving = tokio::spawn(async move { axum::serve(listener, router).await.expect("serve") });
    (url, serving)
}

/// The agent falls back to `POST /v1/agents/poll` and still runs commands.
#[tokio::test]
async fn polling_fallback_runs_commands_without_a_socket() {
    let store = support::sqlite().await;
    let (url, serving) = polling_only_server(&store).await;
    let client = reqwest::Client::new();
    let agent = TestAgent::start(&url, INSTANCE, SECRET, None).await;
    let (status, body) = submit(
        &client,
        &url,
        ADMIN,
        json!({"command_type": "RunCommand", "targets": [INSTANCE],
               "payload": {"cmd": "echo", "args": ["over plain HTTPS"]}}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().expect("id").to_owned();
    let done = wait_done(&client, &url, &id, Duration::from_secs(60)).await;
    assert_eq!(done["targets"][0]["status"], "completed", "{done}");
    assert_eq!(
        output(&client, &url, &id, "stdout").await,
        b"over plain HTTPS\n"
    );
    // A poll must be signed: an unsigned one is refused.
    let response = client
        .post(format!("{url}/v1/agents/poll"))
        .json(&json!({"instance_id": INSTANCE, "frames": []}))
        .send()
        .await
        .expect("poll");
    assert_eq!(response.status().as_u16(), 401);
    agent.stop().await;
    serving.abort();
}

/// Output that JSON escapes to twice its size (every byte a quote) still arrives over polls,
/// whole: 24 chunks of it in one poll would pass the control plane's 8 MiB limit, a poll
/// refused with 413 at every try and a command that never ended.
#[tokio::test]
async fn polling_fallback_delivers_output_that_escapes_large() {
    let store = support::sqlite().await;
    let (url, serving) = polling_only_server(&store).await;
    let client = reqwest::Client::new();
    let agent = TestAgent::start(&url, INSTANCE, SECRET, None).await;
    let script = "head -c 10000000 /dev/zero | tr '\\0' '\"'";
    let (status, body) = submit(
        &client,
        &url,
        ADMIN,
        json!({"command_type": "RunCommand", "targets": [INSTANCE],
               "payload": {"cmd": script, "shell": true}}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().expect("id").to_owned();
    let done = wait_done(&client, &url, &id, Duration::from_secs(90)).await;
    assert_eq!(done["targets"][0]["status"], "completed", "{done}");
    let stored = output(&client, &url, &id, "stdout").await;
    assert_eq!(stored.len(), 10_000_000);
    assert!(stored.iter().all(|b| *b == b'"'));
    agent.stop().await;
    serving.abort();
}

/// Whether process `pid` is gone (or a zombie waiting for a reaper).
fn process_gone(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

/// A cancel reaches an agent that has no socket: its next poll answer names the running
/// command, and the agent kills the command's whole process group.
#[tokio::test]
async fn polling_fallback_delivers_cancel_and_kills_the_process_group() {
    let store = support::sqlite().await;
    let (url, serving) = polling_only_server(&store).await;
    let client = reqwest::Client::new();
    let agent = TestAgent::start(&url, INSTANCE, SECRET, None).await;
    let pid_file = agent.dir.0.join("background.pid");
    // A shell that leaves a background child in its process group, then waits.
    let (status, body) = submit(
        &client,
        &url,
        ADMIN,
        json!({"command_type": "RunCommand", "targets": [INSTANCE],
               "payload": {"cmd": "sh", "args": ["-c",
                   "sleep 600 & echo $! > \"$0\"; echo started; wait",
                   pid_file.display().to_string()]}}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().expect("id").to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    let pid = loop {
        if let Ok(pid) = std::fs::read_to_string(&pid_file)
            && !pid.trim().is_empty()
        {
            break pid.trim().to_owned();
        }
        assert!(Instant::now() < deadline, "the command never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!process_gone(&pid));
    let response = client
        .post(format!("{url}/v1/commands/{id}/cancel"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("cancel");
    assert_eq!(response.status().as_u16(), 200);
    // The agent polls every few seconds; the background child dies with its group.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !process_gone(&pid) {
        assert!(
            Instant::now() < deadline,
            "the cancelled command's process group still runs"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let shown = wait_done(&client, &url, &id, Duration::from_secs(10)).await;
    assert_eq!(shown["status"], "cancelled", "{shown}");
    assert_eq!(shown["targets"][0]["status"], "cancelled", "{shown}");
    // Its output so far still arrives over polls.
    let deadline = Instant::now() + Duration::from_secs(60);
    while output(&client, &url, &id, "stdout").await != b"started\n" {
        assert!(Instant::now() < deadline, "the output never arrived");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    agent.stop().await;
    serving.abort();
}

/// A TCP proxy to `upstream` standing for the network between an agent and the control
/// plane: `true` on the returned sender cuts every connection and refuses new ones until
/// `false`. Returns the proxy's URL.
async fn breakable_link(upstream: &str) -> (String, tokio::sync::watch::Sender<bool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let upstream = upstream.trim_start_matches("http://").to_owned();
    let (broken, _) = tokio::sync::watch::channel(false);
    let link = broken.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let mut down = link.subscribe();
            if *down.borrow_and_update() {
                continue;
            }
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    _ = down.wait_for(|down| *down) => {}
                }
            });
        }
    });
    (url, broken)
}

/// A command cancelled while its agent had no socket (a network blip) is stopped once the
/// agent is back: the cancel frame went nowhere then, and the process would otherwise run
/// on to its own end (up to days) under a command shown as cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_while_the_agent_is_away_stops_the_command_when_it_returns() {
    let store = support::sqlite().await;
    let server = server(&store).await;
    let (link, broken) = breakable_link(&server.url).await;
    let agent = TestAgent::start(&link, INSTANCE, SECRET, None).await;
    wait_connected(&server.client, &server.url, 1).await;
    let pid_file = agent.dir.0.join("child.pid");
    let (status, body) = submit(
        &server.client,
        &server.url,
        ADMIN,
        json!({"command_type": "RunCommand", "targets": [INSTANCE],
               "payload": {"cmd": "sh", "args": ["-c",
                   "sleep 600 & echo $! > \"$0\"; wait", pid_file.display().to_string()]}}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().expect("id").to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    let pid = loop {
        if let Ok(pid) = std::fs::read_to_string(&pid_file)
            && !pid.trim().is_empty()
        {
            break pid.trim().to_owned();
        }
        assert!(Instant::now() < deadline, "the command never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    broken.send_replace(true);
    wait_connected(&server.client, &server.url, 0).await;
    let answer = cancel(&server, &id).await;
    assert_eq!(answer["cancelled"], 1, "{answer}");
    broken.send_replace(false);
    wait_connected(&server.client, &server.url, 1).await;

    let deadline = Instant::now() + Duration::from_secs(30);
    while !process_gone(&pid) {
        assert!(
            Instant::now() < deadline,
            "the command cancelled while its agent was away still runs"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent.stop().await;
    server.stop().await;
}

/// `POST /v1/commands/logs` (agent-svc shape): signed, idempotent, only for own commands.
#[tokio::test]
async fn http_log_chunks_are_stored_once_for_their_own_instance() {
    let store = support::sqlite().await;
    let server = TestServer::start(store.store.clone()).await;
    let (_, body) = submit(
        &server.client,
        &server.url,
        ADMIN,
        json!({"command_type": "RunCommand", "targets": [INSTANCE], "payload": {"cmd": "true"}}),
    )
    .await;
    let id = body["id"].as_str().expect("id").to_owned();
    let target = body["targets"][0]["target_id"]
        .as_str()
        .expect("target")
        .to_owned();
    let post = |instance: &'static str, secret: &'static str, msg: &'static str, data: Value| {
        let (server, target) = (&server, &target);
        async move {
            let body = serde_json::to_vec(&json!({
                "instance_id": instance, "command_id": target, "chunks": data,
            }))
            .expect("json");
            let response = server
                .post_v1("/v1/commands/logs", secret, msg, support::now(), &body)
                .await;
            let status = response.status();
            if status == 200 {
                let answer: Value = response.json().await.expect("json");
                conforms(
                    &server.client,
                    &server.url,
                    "post",
                    "/v1/commands/logs",
                    &answer,
                )
                .await;
            }
            status
        }
    };
    let chunks = json!([{"offset": 0, "stream": "stdout", "data": "hello "},
                        {"offset": 6, "stream": "stdout", "data": "world\n"}]);
    assert_eq!(post(INSTANCE, SECRET, "l1", chunks.clone()).await, 200);
    // Sent again (a retry): acknowledged, stored once.
    assert_eq!(post(INSTANCE, SECRET, "l2", chunks.clone()).await, 200);
    // The same signed message again: a replay.
    assert_eq!(post(INSTANCE, SECRET, "l2", chunks.clone()).await, 401);
    // Another instance may not write this command's output.
    let other = post(
        "other-009",
        support::SHARED,
        "l3",
        json!([{"offset": 12, "stream": "stdout", "data": "x"}]),
    );
    assert_eq!(other.await, 422);
    assert_eq!(
        output(&server.client, &server.url, &id, "stdout").await,
        b"hello world\n"
    );
    server.stop().await;
}

/// A poll's ids are checked like every other id: a control character in the instance id or
/// an over-long running command id is a 422 naming the field.
#[tokio::test]
async fn poll_ids_are_validated() {
    let store = support::sqlite().await;
    let server = server(&store).await;
    let long = "x".repeat(1000);
    for (i, (body, field)) in [
        (
            json!({"instance_id": "bad\u{f}id", "frames": []}),
            "instance_id",
        ),
        (
            json!({"instance_id": "poller-1", "running": [long]}),
            "running[0]",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let bytes = serde_json::to_vec(&body).expect("json");
        let response = server
            .post_v1(
                "/v1/agents/poll",
                support::SHARED,
                &format!("msg-poll-{i}"),
                support::now(),
                &bytes,
            )
            .await;
        assert_eq!(response.status(), 422, "{field}");
        let answer: Value = response.json().await.expect("json");
        assert_eq!(answer["error"]["details"][0]["path"], field, "{answer}");
    }
}

/// A poll answers what it stored, what it refused, the commands waiting for the agent and
/// the running ones to stop, as /openapi.json says.
#[tokio::test]
async fn poll_answers_acks_refusals_commands_and_cancels() {
    let store = support::sqlite().await;
    let server = server(&store).await;
    let instance = "poller-2";
    server.seen(instance).await;
    let (status, submitted) = submit(
        &server.client,
        &server.url,
        ADMIN,
        json!({"command_type": "RunCommand", "targets": [instance],
               "payload": {"cmd": "sleep", "args": ["60"], "timeout_sec": 120}}),
    )
    .await;
    assert_eq!(status, 201, "{submitted}");
    let id = submitted["id"].as_str().expect("id").to_owned();
    let target = submitted["targets"][0]["target_id"].clone();
    let poll = |msg: &'static str, body: Value| {
        let server = &server;
        async move {
            let bytes = serde_json::to_vec(&body).expect("json");
            let response = server
                .post_v1(
                    "/v1/agents/poll",
                    support::SHARED,
                    msg,
                    support::now(),
                    &bytes,
                )
                .await;
            assert_eq!(response.status().as_u16(), 200);
            let answer: Value = response.json().await.expect("json");
            conforms(
                &server.client,
                &server.url,
                "post",
                "/v1/agents/poll",
                &answer,
            )
            .await;
            answer
        }
    };
    let running = json!({"type": "result", "id": "frame-1",
                         "payload": {"job_id": target, "status": "IN_PROGRESS"}});
    let unreadable = json!({"type": "teleport", "id": "frame-2", "payload": {}});
    let answer = poll(
        "msg-poll-a",
        json!({"instance_id": instance, "frames": [running, unreadable]}),
    )
    .await;
    assert_eq!(answer["acked"], json!(["frame-1"]), "{answer}");
    assert_eq!(answer["refused"][0]["id"], "frame-2", "{answer}");
    assert_eq!(answer["commands"][0]["id"], target, "{answer}");
    assert_eq!(answer["commands"][0]["type"], "RunCommand", "{answer}");
    cancel(&server, &id).await;
    let answer = poll(
        "msg-poll-b",
        json!({"instance_id": instance, "running": [target]}),
    )
    .await;
    assert_eq!(answer["cancel"], json!([target]), "{answer}");
    assert_eq!(answer["commands"], json!([]), "{answer}");
    server.stop().await;
}

/// A bare live channel of `instance`: the test writes the frames, the control plane answers.
struct RawChannel {
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl RawChannel {
    async fn open(url: &str, instance: &str, secret: &str) -> Self {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let registered = fleet_agent::channel::register(
            &reqwest::Client::new(),
            url,
            instance,
            &Secret::new(secret).expect("secret"),
            "1.0.0",
        )
        .await
        .expect("register");
        let mut request = format!("ws{}/v1/agents/connect", url.trim_start_matches("http"))
            .into_client_request()
            .expect("request");
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {}", registered.token)
                .parse()
                .expect("header"),
        );
        let (socket, _) = tokio_tungstenite::connect_async(request)
            .await
            .expect("connect");
        Self { socket }
    }

    /// Sends `frame` and waits for the control plane to acknowledge it.
    async fn send_acknowledged(&mut self, frame: Value) {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let id = frame["id"].clone();
        self.socket
            .send(Message::Text(frame.to_string().into()))
            .await
            .expect("send");
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("no acknowledgement of {frame}"))
                .expect("the channel is open")
                .expect("read");
            let Message::Text(text) = message else {
                continue;
            };
            let answer: Value = serde_json::from_str(text.as_str()).expect("json");
            match answer["type"].as_str() {
                Some("ack")
                    if answer["payload"]["ids"]
                        .as_array()
                        .is_some_and(|ids| ids.contains(&id)) =>
                {
                    return;
                }
                Some("error") if answer["id"] == id => panic!("refused: {answer}"),
                // The commands waiting for the agent, sent when it connects.
                _ => {}
            }
        }
    }
}

/// A log frame of one chunk.
fn log_frame(frame_id: &str, target: &str, stream: &str, offset: u64, data: &str) -> Value {
    json!({"type": "logs", "id": frame_id, "payload": {"command_id": target,
           "chunks": [{"offset": offset, "stream": stream, "data": data}]}})
}

/// Submits a `RunCommand` to `instance` (whose agent the test plays); returns its id and its
/// target's id.
async fn run_on(server: &TestServer, instance: &str) -> (String, String) {
    let (status, body) = submit(
        &server.client,
        &server.url,
        ADMIN,
        json!({"command_type": "RunCommand", "targets": [instance], "payload": {"cmd": "true"}}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    (
        body["id"].as_str().expect("id").to_owned(),
        body["targets"][0]["target_id"]
            .as_str()
            .expect("target")
            .to_owned(),
    )
}

/// POSTs chunks of `target` to `/v1/commands/logs` as [`INSTANCE`], signed as message
/// `msg`; returns the status.
async fn post_chunks(server: &TestServer, msg: &str, target: &str, chunks: Value) -> u16 {
    let body = serde_json::to_vec(&json!({
        "instance_id": INSTANCE, "command_id": target, "chunks": chunks,
    }))
    .expect("json");
    let response = server
        .post_v1("/v1/commands/logs", SECRET, msg, support::now(), &body)
        .await;
    let status = response.status().as_u16();
    if status == 200 {
        let answer: Value = response.json().await.expect("json");
        conforms(
            &server.client,
            &server.url,
            "post",
            "/v1/commands/logs",
            &answer,
        )
        .await;
    }
    status
}

/// The first target of command `id` as `GET /v1/commands/{id}` shows it.
async fn shown_target(server: &TestServer, id: &str) -> Value {
    let (status, shown) = server
        .get_documented(&format!("/v1/commands/{id}"), SUPPORT)
        .await;
    assert_eq!(status, 200, "{shown}");
    shown["targets"][0].clone()
}

/// The `end` event of following command `id`'s output.
async fn followed_end(server: &TestServer, id: &str) -> Value {
    let text = server
        .client
        .get(server.at(&format!("/v1/commands/{id}/logs?follow=true")))
        .bearer_auth(SUPPORT)
        .send()
        .await
        .expect("follow")
        .text()
        .await
        .expect("text");
    let mut events = text.split("\n\n");
    let end = events
        .find(|event| event.starts_with("event: end"))
        .unwrap_or_else(|| panic!("no end event: {text}"));
    let data = end
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .expect("data");
    serde_json::from_str(data).expect("json")
}

/// What the whole output ends with when the control plane cut it at 1000 bytes.
const CUT_AT_1000: &str = "\n[output truncated at 1000 bytes by the control plane \
                           (CONTROL_PLANE_COMMAND_OUTPUT_MAX_BYTES)]\n";

/// Output past the per-target cap, over the live channel and over HTTP, is acknowledged (so
/// the agent's spool drains) but not stored: exactly the cap is, stdout and stderr together,
/// and the command, its whole output and its followed output say it was cut.
async fn output_past_the_cap_is_acknowledged_and_not_stored(store: TestStore) {
    let server = TestServer::start_with(store.store.clone(), |b| {
        b.live(fleet_server::LiveSettings {
            output_max_bytes: 1000,
            ..Default::default()
        })
    })
    .await;

    // Over the live channel: 600 bytes, then a chunk that straddles the cap (400 of it
    // stored), one past it, and stderr once the cap is reached.
    let (id, target) = run_on(&server, INSTANCE).await;
    let mut channel = RawChannel::open(&server.url, INSTANCE, SECRET).await;
    let (a, b) = ("a".repeat(600), "b".repeat(600));
    for frame in [
        log_frame("w1", &target, "stdout", 0, &a),
        log_frame("w2", &target, "stdout", 600, &b),
        log_frame("w3", &target, "stdout", 1200, "past the cap"),
        log_frame("w4", &target, "stderr", 0, "no room left"),
        json!({"type": "result", "id": "w5",
               "payload": {"job_id": target, "status": "COMPLETED", "exit_code": 0}}),
        // Resent after the end (as after a restart of the control plane): still acknowledged.
        log_frame("w6", &target, "stdout", 0, &a),
    ] {
        channel.send_acknowledged(frame).await;
    }
    let shown = shown_target(&server, &id).await;
    assert_eq!(shown["status"], "completed", "{shown}");
    assert_eq!(
        (&shown["output_bytes"], &shown["output_truncated_at_bytes"]),
        (&json!(1000), &json!(1000)),
        "{shown}"
    );
    let stdout = output(&server.client, &server.url, &id, "stdout").await;
    let expected = format!("{a}{}{CUT_AT_1000}", &b[..400]);
    assert_eq!(String::from_utf8_lossy(&stdout), expected);
    let stderr = output(&server.client, &server.url, &id, "stderr").await;
    assert_eq!(String::from_utf8_lossy(&stderr), CUT_AT_1000);
    let end = followed_end(&server, &id).await;
    assert_eq!(
        end,
        json!({"status": "completed", "output_bytes": 1000, "output_truncated_at_bytes": 1000,
               "output_deleted_at": null})
    );

    // Over HTTP: the same, and chunks at fresh offsets that overlap what is stored (a
    // holder of the agent's secret filling the disk) store nothing more.
    let (id, target) = run_on(&server, INSTANCE).await;
    let (x, y) = ("x".repeat(700), "y".repeat(700));
    let chunks = json!([{"offset": 0, "stream": "stdout", "data": x},
                        {"offset": 700, "stream": "stdout", "data": y}]);
    assert_eq!(post_chunks(&server, "cap-1", &target, chunks).await, 200);
    for (n, offset) in [1, 2, 3].into_iter().enumerate() {
        let overlap = json!([{"offset": offset, "stream": "stdout", "data": "z".repeat(500)}]);
        let msg = format!("cap-overlap-{n}");
        assert_eq!(post_chunks(&server, &msg, &target, overlap).await, 200);
    }
    let shown = shown_target(&server, &id).await;
    assert_eq!(
        (&shown["output_bytes"], &shown["output_truncated_at_bytes"]),
        (&json!(1000), &json!(1000)),
        "{shown}"
    );
    let stdout = output(&server.client, &server.url, &id, "stdout").await;
    assert_eq!(
        String::from_utf8_lossy(&stdout),
        format!("{x}{}{CUT_AT_1000}", &y[..300])
    );

    // Output of exactly the cap is whole: nothing said.
    let (id, target) = run_on(&server, INSTANCE).await;
    let chunks = json!([{"offset": 0, "stream": "stderr", "data": "e".repeat(1000)}]);
    assert_eq!(
        post_chunks(&server, "cap-exact", &target, chunks).await,
        200
    );
    let shown = shown_target(&server, &id).await;
    assert_eq!(shown["output_truncated_at_bytes"], Value::Null, "{shown}");
    let stderr = output(&server.client, &server.url, &id, "stderr").await;
    assert_eq!(stderr, vec![b'e'; 1000]);
    server.stop().await;
}

/// Offsets that do not fit the database's integers (u64::MAX, i64::MAX + 1) are past any
/// cap: acknowledged, not stored, and no error.
async fn offsets_past_what_the_database_holds_are_acknowledged_and_not_stored(store: TestStore) {
    let server = server(&store).await;
    let (id, target) = run_on(&server, INSTANCE).await;
    let mut channel = RawChannel::open(&server.url, INSTANCE, SECRET).await;
    for (n, offset) in [u64::MAX, i64::MAX as u64 + 1, i64::MAX as u64]
        .into_iter()
        .enumerate()
    {
        channel
            .send_acknowledged(log_frame(
                &format!("far-{n}"),
                &target,
                "stdout",
                offset,
                "far",
            ))
            .await;
        let chunks = json!([{"offset": offset, "stream": "stderr", "data": "far"}]);
        let msg = format!("far-http-{n}");
        assert_eq!(post_chunks(&server, &msg, &target, chunks).await, 200);
    }
    let shown = shown_target(&server, &id).await;
    assert_eq!(shown["output_bytes"], 0, "{shown}");
    assert_eq!(
        shown["output_truncated_at_bytes"],
        json!(256 * 1024 * 1024),
        "{shown}"
    );
    for stream in ["stdout", "stderr"] {
        let body = output(&server.client, &server.url, &id, stream).await;
        assert_eq!(
            String::from_utf8_lossy(&body),
            "\n[output truncated at 256 MiB by the control plane \
             (CONTROL_PLANE_COMMAND_OUTPUT_MAX_BYTES)]\n"
        );
    }
    server.stop().await;
}

/// The periodic sweep deletes the output of targets that ended before the retention and
/// keeps their results; the logs route answers 410 saying so, the dashboard too, and a
/// target that ended recently keeps its output.
async fn the_sweep_deletes_old_output_and_the_logs_say_so(store: TestStore) {
    use fleet_core::command::Stream;
    let server = TestServer::start_with(store.store.clone(), |b| {
        b.settings(fleet_server::Settings {
            sweep_interval: Duration::from_millis(100),
            ..Default::default()
        })
        .live(fleet_server::LiveSettings {
            output_retention: Some(Duration::from_secs(86_400)),
            ..Default::default()
        })
    })
    .await;
    let commands = store.store.commands().expect("command store");
    let now = support::now();
    let mut ids = Vec::new();
    // Ended two days ago, and a minute ago.
    for ended_at in [now - 2 * 86_400, now - 60] {
        let (id, target) = run_on(&server, INSTANCE).await;
        let chunk = (target.clone(), Stream::Stdout, 0, b"hello\n".to_vec());
        ended_with_output(commands, &target, &[chunk], ended_at).await;
        ids.push(id);
    }
    let (old, recent) = (&ids[0], &ids[1]);
    let logs = |id: &str, follow: bool| {
        server
            .client
            .get(server.at(&format!("/v1/commands/{id}/logs?follow={follow}")))
            .bearer_auth(SUPPORT)
            .send()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while logs(old, false).await.expect("logs").status() != 410 {
        assert!(
            Instant::now() < deadline,
            "the old output was never deleted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for follow in [false, true] {
        let response = logs(old, follow).await.expect("logs");
        assert_eq!(response.status().as_u16(), 410);
        let answer: Value = response.json().await.expect("json");
        assert_eq!(support::code(&answer), "gone", "{answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("(6 bytes) was deleted at")
                && message.contains("CONTROL_PLANE_COMMAND_RETENTION_DAYS"),
            "{message}"
        );
    }
    let shown = shown_target(&server, old).await;
    assert_eq!(
        (
            &shown["status"],
            &shown["exit_code"],
            &shown["output_bytes"]
        ),
        (&json!("completed"), &json!(0), &json!(6)),
        "the record stays: {shown}"
    );
    assert!(
        shown["output_deleted_at"]
            .as_i64()
            .is_some_and(|at| at >= now),
        "{shown}"
    );
    let (_, page) = page(&server, format!("/commands/{old}"), SUPPORT).await;
    assert!(
        page.contains("id=\"output-deleted-0\"") && page.contains("6 bytes, deleted"),
        "{page}"
    );
    assert_eq!(
        output(&server.client, &server.url, recent, "stdout").await,
        b"hello\n"
    );
    assert_eq!(
        shown_target(&server, recent).await["output_deleted_at"],
        Value::Null
    );
    server.stop().await;
}
