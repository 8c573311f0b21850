//! Jobs reach an agent that holds its live channel within seconds, though its pollers wait
//! their default 10 minutes between polls: the control plane sends a `jobs_waiting` frame
//! when a rollout batch starts, a plugin request is approved or a restore verification is
//! scheduled, and only to agents that announced they read it; and when such an agent
//! connects with jobs waiting for it (announced while its socket was down). On SQLite and
//! PostgreSQL.

use std::time::{Duration, Instant};

use fleet_agent::{Agent, AgentConfig, CommandSettings};
use fleet_core::Secret;
use fleet_core::command::{JOBS_WAITING, Pipeline};
use fleet_server::store::rollouts::JobsAvailable;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::commands::{TestAgent, wait_connected};
use crate::rollouts::{admin_post, agent_post, enroll, manifest, release_key};
use crate::support::{
    ADMIN, OPS, SHARED, SUPPORT, TempDir, TestServer, TestStore, on_both_backends,
};

/// The instance the agent runs for (it signs with the shared fallback secret).
const AGENT: &str = "nudged-1";
/// An instance without an agent, first in instance order, so first in a rollout.
const OTHER: &str = "nudged-0";
/// The instance of the agent that reconnects, and of the bare channel told on connecting:
/// each its own, because PostgreSQL tests share `NOTIFY` (every test's control plane hears
/// the nudges of the others, per instance id), and a nudge from another test would pass
/// these without the control plane looking for jobs on connect.
const RECONNECTING: &str = "nudged-reconnecting";
const CONNECTING: &str = "nudged-connecting";
/// How soon a job must reach the connected agent: far below its 10-minute poll interval.
const WITHIN: Duration = Duration::from_secs(10);

/// A real agent with remote commands on (so it holds the live channel) and its pollers at
/// their defaults; its restore runner verifies with `true`.
struct PollingAgent {
    agent: TestAgent,
}

impl PollingAgent {
    async fn start(server: &TestServer) -> Self {
        Self::start_as(server, AGENT, CommandSettings::default().backoff_base).await
    }

    /// Like [`start`](Self::start), for `instance`, with `backoff_base` as the first
    /// reconnect delay (half to all of it, with jitter) once its socket drops.
    async fn start_as(server: &TestServer, instance: &str, backoff_base: Duration) -> Self {
        let dir = TempDir::new();
        let mut config =
            AgentConfig::new(instance, &server.url, Secret::new(SHARED).expect("secret"));
        config.local_port = 0;
        config.state_path = dir.0.join("state.db");
        config.heartbeat_interval = Duration::from_secs(3600);
        config.release_channel = Some("stable".into());
        config.version = Some("1.0.0".into());
        config.restore.verify_cmd = Some("true".into());
        for interval in [
            config.update.poll_interval,
            config.plugin.poll_interval,
            config.restore.poll_interval,
        ] {
            assert_eq!(
                interval,
                Duration::from_secs(600),
                "the default poll interval"
            );
        }
        let settings = CommandSettings {
            projects_dir: dir.0.join("projects"),
            backoff_base,
            ..CommandSettings::default()
        };
        let agent = Agent::builder(config)
            .without_builtins()
            .commands(settings)
            .build()
            .expect("agent");
        let agent = TestAgent::run(agent, dir);
        wait_connected(&server.client, &server.url, 1).await;
        // Its first heartbeat put it on the channel, and each poller asked once and now
        // waits out its 10 minutes: a job seen from here on came because it was told.
        wait_until("the agent's first heartbeat", || async {
            let (_, installation) = server
                .get_json(&format!("/api/installations/{instance}"), SUPPORT)
                .await;
            installation["release_channel"] == "stable"
        })
        .await;
        for path in [
            "/api/updates/next",
            "/api/plugins/next",
            "/api/restores/next",
        ] {
            wait_until(path, || async { polled(server, path).await }).await;
        }
        Self { agent }
    }

    async fn stop(self) {
        self.agent.stop().await;
    }
}

/// Whether `/metrics` counts an answer to a `POST path` that handed out nothing.
async fn polled(server: &TestServer, path: &str) -> bool {
    let text = server.metrics().await;
    let route = format!("route=\"{path}\"");
    text.lines()
        .any(|line| line.contains(&route) && line.contains("status=\"204\""))
}

/// Waits up to 30 s for `check` to hold.
async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits, from now on, for `status` to say the agent took its job; fails past [`WITHIN`].
async fn taken_within<F, Fut>(what: &str, mut status: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = String>,
{
    let started = Instant::now();
    loop {
        let current = status().await;
        if !matches!(current.as_str(), "queued" | "pending" | "scheduled") {
            return;
        }
        assert!(
            started.elapsed() < WITHIN,
            "{what}: still {current} after {WITHIN:?}; the agent was not told"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The status of the agent's job in rollout `id`.
async fn rollout_job_status(server: &TestServer, id: &Value) -> String {
    let (_, rollout) = server
        .get_json(&format!("/api/rollouts/{id}"), SUPPORT)
        .await;
    rollout["jobs"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|job| job["instance_id"] == AGENT)
        .and_then(|job| job["status"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// The status of the job of plugin request `id`.
async fn request_job_status(server: &TestServer, id: &Value) -> String {
    let (_, requests) = server.get_json("/api/plugins/requests", SUPPORT).await;
    requests["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["id"] == *id)
        .and_then(|r| r["job_status"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// How many agents hold a live channel.
async fn connected(server: &TestServer) -> u64 {
    let (_, body) = server.get_json("/v1/agents/connected", SUPPORT).await;
    body["connected"].as_u64().expect("a count")
}

async fn server(t: &TestStore) -> TestServer {
    TestServer::start_with(t.store.clone(), |b| {
        b.manifest_verifier(fleet_core::manifest::ManifestVerifier::new(vec![
            release_key().public_key(),
        ]))
    })
    .await
}

/// A signed release of version 2.0.0.
async fn release(server: &TestServer) -> Value {
    let signed = release_key()
        .sign_value(&serde_json::to_value(manifest("2.0.0")).expect("json"))
        .expect("sign");
    let (status, release) = admin_post(server, "/api/releases", ADMIN, &signed).await;
    assert_eq!(status, 201, "{release}");
    release
}

/// A plugin release the agent may be handed.
async fn plugin_release(server: &TestServer) -> Value {
    let (status, release) = admin_post(
        server,
        "/api/plugins/releases",
        ADMIN,
        &json!({"name": "billing-export", "version": "1.2.0"}),
    )
    .await;
    assert_eq!(status, 201, "{release}");
    release
}

/// An update rollout's next batch and a new plugin rollout's first one reach the agent.
async fn rollout_batches_reach_a_connected_agent_within_seconds(t: TestStore) {
    let server = server(&t).await;
    enroll(&server, OTHER, "stable", "1.0.0").await;
    let agent = PollingAgent::start(&server).await;

    // One instance per batch: the other instance's first, the agent's second.
    let release = release(&server).await;
    let (status, rollout) = admin_post(
        &server,
        "/api/rollouts",
        ADMIN,
        &json!({"release_id": release["id"], "channel": "stable", "batch_size": 1}),
    )
    .await;
    assert_eq!(status, 201, "{rollout}");
    let id = rollout["id"].clone();
    let (status, job) = agent_post(
        &server,
        "/api/updates/next",
        &json!({"instance_id": OTHER, "current_version": "1.0.0"}),
    )
    .await;
    assert_eq!(status, 200, "{job}");
    let (status, _) = agent_post(
        &server,
        "/api/updates/report",
        &json!({"instance_id": OTHER, "job_id": job["job_id"], "status": "succeeded",
                "step": "done"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(rollout_job_status(&server, &id).await, "queued");
    let (status, advanced) = admin_post(
        &server,
        &format!("/api/rollouts/{id}/advance"),
        ADMIN,
        &json!({}),
    )
    .await;
    assert_eq!(status, 200, "{advanced}");
    taken_within("the update job of the advanced batch", || {
        rollout_job_status(&server, &id)
    })
    .await;

    // A plugin rollout starts its first batch when it is created.
    let plugin = plugin_release(&server).await;
    let (status, rollout) = admin_post(
        &server,
        "/api/plugins/rollouts",
        ADMIN,
        &json!({"plugin_release_id": plugin["id"], "channel": "stable", "batch_size": 2}),
    )
    .await;
    assert_eq!(status, 201, "{rollout}");
    let id = rollout["id"].clone();
    taken_within("the plugin job of a new rollout", || {
        rollout_job_status(&server, &id)
    })
    .await;
    agent.stop().await;
    server.stop().await;
}

/// An approved plugin request and a scheduled restore verification reach the agent.
async fn approvals_and_restores_reach_a_connected_agent_within_seconds(t: TestStore) {
    let server = server(&t).await;
    let agent = PollingAgent::start(&server).await;

    plugin_release(&server).await;
    let (status, request) = agent_post(
        &server,
        "/api/plugins/requests",
        &json!({"instance_id": AGENT, "name": "billing-export", "version": "1.2.0",
                "action": "install"}),
    )
    .await;
    assert_eq!(status, 201, "{request}");
    let approve = format!("/api/plugins/requests/{}/approve", request["id"]);
    let (status, approved) = admin_post(&server, &approve, ADMIN, &json!({})).await;
    assert_eq!(status, 200, "{approved}");
    taken_within("the job of an approved plugin request", || {
        request_job_status(&server, &request["id"])
    })
    .await;

    crate::restores::report_backup(&server, AGENT, "b-1").await;
    let (status, scheduled) =
        admin_post(&server, "/api/restores/schedule", OPS, &json!({"count": 1})).await;
    assert_eq!(status, 201, "{scheduled}");
    assert_eq!(scheduled["items"][0]["instance_id"], AGENT, "{scheduled}");
    taken_within("a scheduled restore verification", || async {
        let (_, restores) = server
            .get_json(&format!("/api/restores?instance={AGENT}"), SUPPORT)
            .await;
        restores["items"][0]["status"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    })
    .await;
    agent.stop().await;
    server.stop().await;
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A bare live channel of `instance`, announcing `capabilities` when given.
async fn bare_channel(server: &TestServer, instance: &str, capabilities: Option<&str>) -> Socket {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let registered = fleet_agent::channel::register(
        &server.client,
        &server.url,
        instance,
        &Secret::new(SHARED).expect("secret"),
        "1.0.0",
    )
    .await
    .expect("register");
    let mut request = format!(
        "ws{}/v1/agents/connect",
        server.url.trim_start_matches("http")
    )
    .into_client_request()
    .expect("request");
    let headers = request.headers_mut();
    headers.insert(
        "authorization",
        format!("Bearer {}", registered.token)
            .parse()
            .expect("header"),
    );
    if let Some(capabilities) = capabilities {
        headers.insert(
            "x-agent-capabilities",
            capabilities.parse().expect("header"),
        );
    }
    let (socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("connect");
    socket
}

/// The next text frame within `wait`, if any (pings are skipped).
async fn next_frame(socket: &mut Socket, wait: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let message = tokio::time::timeout_at(deadline, socket.next())
            .await
            .ok()?;
        match message.expect("the channel is open").expect("read") {
            Message::Text(text) => return Some(serde_json::from_str(text.as_str()).expect("json")),
            Message::Close(_) => panic!("the control plane closed the channel"),
            _ => {}
        }
    }
}

/// Approves a new plugin request of `instance`: a job for its plugin pipeline. Returns the
/// request.
async fn approve_a_request(server: &TestServer, instance: &str) -> Value {
    let (status, request) = agent_post(
        server,
        "/api/plugins/requests",
        &json!({"instance_id": instance, "name": "billing-export", "version": "1.2.0",
                "action": "install"}),
    )
    .await;
    assert_eq!(status, 201, "{request}");
    let approve = format!("/api/plugins/requests/{}/approve", request["id"]);
    assert_eq!(admin_post(server, &approve, ADMIN, &json!({})).await.0, 200);
    request
}

/// An agent that announced no capabilities (every agent before this one) gets no frame it
/// would not understand; one that announces `jobs_waiting`, among capabilities the control
/// plane does not know, is told which pipeline has a job.
async fn only_agents_that_announced_it_are_told(t: TestStore) {
    // Its own instance: the frames it counts must not include another test's nudges.
    const TOLD: &str = "nudged-told";
    let server = server(&t).await;
    enroll(&server, TOLD, "stable", "1.0.0").await;
    plugin_release(&server).await;

    let mut older = bare_channel(&server, TOLD, None).await;
    wait_connected(&server.client, &server.url, 1).await;
    approve_a_request(&server, TOLD).await;
    let unexpected = next_frame(&mut older, Duration::from_secs(2)).await;
    assert_eq!(
        unexpected, None,
        "an older agent got a frame it cannot read"
    );
    drop(older);
    wait_connected(&server.client, &server.url, 0).await;

    let mut newer = bare_channel(&server, TOLD, Some("teleport, JOBS_WAITING")).await;
    wait_connected(&server.client, &server.url, 1).await;
    // The job approved above still waits: the agent is told as it connects.
    let on_connect = next_frame(&mut newer, WITHIN)
        .await
        .expect("told on connecting");
    assert_eq!(
        on_connect["payload"],
        json!({"pipelines": ["plugin"]}),
        "{on_connect}"
    );
    approve_a_request(&server, TOLD).await;
    let frame = next_frame(&mut newer, WITHIN)
        .await
        .expect("a jobs_waiting frame");
    assert_eq!(frame["type"], "jobs_waiting", "{frame}");
    assert_eq!(
        frame["payload"],
        json!({"pipelines": ["plugin"]}),
        "{frame}"
    );
    assert!(
        frame["id"].as_str().is_some_and(|id| !id.is_empty()),
        "{frame}"
    );
    // The frame is not the agent's to send.
    use futures_util::SinkExt;
    newer
        .send(Message::Text(frame.to_string().into()))
        .await
        .expect("send");
    let refused = next_frame(&mut newer, WITHIN).await.expect("an answer");
    assert_eq!(
        (refused["type"].clone(), refused["id"].clone()),
        (json!("error"), frame["id"].clone()),
        "{refused}"
    );
    server.stop().await;
}

/// A job made available while the agent's socket is down (a network blip, a control plane
/// restart) was announced to nobody, and the agent does not poll when it reconnects: it is
/// told on connecting, and takes the job within seconds rather than at its next poll.
async fn a_job_made_available_while_disconnected_is_taken_on_reconnect(t: TestStore) {
    let server = server(&t).await;
    // It dials again 2 to 4 s after its socket drops: time enough to make a job available
    // while it is away.
    let agent = PollingAgent::start_as(&server, RECONNECTING, Duration::from_secs(4)).await;
    plugin_release(&server).await;

    // Another connection of the instance replaces the agent's socket; closed in turn, it
    // leaves the instance without one until the agent dials again.
    drop(bare_channel(&server, RECONNECTING, None).await);
    wait_connected(&server.client, &server.url, 0).await;
    let request = approve_a_request(&server, RECONNECTING).await;
    assert_eq!(
        connected(&server).await,
        0,
        "the agent was back before the job was made available: nothing tested"
    );
    taken_within("a job made available while the agent was away", || {
        request_job_status(&server, &request["id"])
    })
    .await;
    agent.stop().await;
    server.stop().await;
}

/// What a bare channel of [`CONNECTING`] announcing `capabilities` is sent as it connects:
/// the pipelines its one `jobs_waiting` frame names, or `None` when it gets no frame. It is
/// closed again.
async fn told_on_connect(server: &TestServer, capabilities: Option<&str>) -> Option<Value> {
    let mut socket = bare_channel(server, CONNECTING, capabilities).await;
    let told = next_frame(&mut socket, Duration::from_secs(2)).await;
    if let Some(frame) = &told {
        assert_eq!(frame["type"], "jobs_waiting", "{frame}");
        let again = next_frame(&mut socket, Duration::from_secs(1)).await;
        assert_eq!(again, None, "a second frame after {frame}");
    }
    drop(socket);
    wait_connected(&server.client, &server.url, 0).await;
    told.map(|frame| frame["payload"]["pipelines"].clone())
}

/// An agent that announced `jobs_waiting` is told on connecting, in one frame, of every
/// pipeline a poll would hand a job now (not a paused rollout's job); with nothing waiting,
/// or without the capability, it is sent nothing.
async fn a_connecting_agent_is_told_of_the_jobs_waiting_for_it(t: TestStore) {
    let server = server(&t).await;
    enroll(&server, CONNECTING, "stable", "1.0.0").await;
    plugin_release(&server).await;
    assert_eq!(
        told_on_connect(&server, Some(JOBS_WAITING)).await,
        None,
        "told of jobs when none wait"
    );

    approve_a_request(&server, CONNECTING).await;
    assert_eq!(
        told_on_connect(&server, Some(JOBS_WAITING)).await,
        Some(json!(["plugin"]))
    );

    let release = release(&server).await;
    let (status, rollout) = admin_post(
        &server,
        "/api/rollouts",
        ADMIN,
        &json!({"release_id": release["id"], "channel": "stable"}),
    )
    .await;
    assert_eq!(status, 201, "{rollout}");
    crate::restores::report_backup(&server, CONNECTING, "b-1").await;
    let (status, scheduled) =
        admin_post(&server, "/api/restores/schedule", OPS, &json!({"count": 1})).await;
    assert_eq!(status, 201, "{scheduled}");
    assert_eq!(
        scheduled["items"][0]["instance_id"], CONNECTING,
        "{scheduled}"
    );
    assert_eq!(
        told_on_connect(&server, Some(JOBS_WAITING)).await,
        Some(json!(["update", "plugin", "restore"]))
    );
    assert_eq!(
        told_on_connect(&server, None).await,
        None,
        "an older agent got a frame it cannot read"
    );

    let pause = format!("/api/rollouts/{}/pause", rollout["id"]);
    assert_eq!(admin_post(&server, &pause, OPS, &json!({})).await.0, 200);
    assert_eq!(
        told_on_connect(&server, Some(JOBS_WAITING)).await,
        Some(json!(["plugin", "restore"])),
        "a paused rollout hands out no job"
    );
    server.stop().await;
}

/// The next announcement, within a few seconds.
async fn announced(
    jobs: &mut tokio::sync::broadcast::Receiver<std::sync::Arc<JobsAvailable>>,
) -> JobsAvailable {
    let received = tokio::time::timeout(Duration::from_secs(5), jobs.recv())
        .await
        .expect("an announcement")
        .expect("open");
    (*received).clone()
}

fn jobs_for(pipeline: Pipeline, instance_ids: &[&str]) -> JobsAvailable {
    JobsAvailable {
        pipeline,
        instance_ids: instance_ids.iter().map(|id| (*id).to_owned()).collect(),
    }
}

/// The store announces every way a job becomes available, after its commit: a rollout's
/// first batch, a batch started by a report (auto-advance), the pending jobs a resume hands
/// out again, an approved plugin request and scheduled restore verifications; and nothing
/// for what makes no job available.
async fn the_store_announces_jobs_as_they_become_available(t: TestStore) {
    let server = server(&t).await;
    let mut jobs = t
        .store
        .jobs_available()
        .expect("the built-in stores announce");
    for instance in ["a1", "a2", "a3"] {
        crate::restores::report_backup(&server, instance, &format!("b-{instance}")).await;
    }
    let release = release(&server).await;
    let (status, rollout) = admin_post(
        &server,
        "/api/rollouts",
        ADMIN,
        &json!({"release_id": release["id"], "channel": "stable", "batch_size": 2,
                "auto_advance": true}),
    )
    .await;
    assert_eq!(status, 201, "{rollout}");
    let id = rollout["id"].clone();
    assert_eq!(
        announced(&mut jobs).await,
        jobs_for(Pipeline::Update, &["a1", "a2"])
    );
    for instance in ["a1", "a2"] {
        let (status, job) = agent_post(
            &server,
            "/api/updates/next",
            &json!({"instance_id": instance, "current_version": "1.0.0"}),
        )
        .await;
        assert_eq!(status, 200, "{job}");
        agent_post(
            &server,
            "/api/updates/report",
            &json!({"instance_id": instance, "job_id": job["job_id"], "status": "succeeded",
                    "step": "done"}),
        )
        .await;
    }
    assert_eq!(
        announced(&mut jobs).await,
        jobs_for(Pipeline::Update, &["a3"]),
        "the last report of batch 1 started batch 2"
    );
    let act = |action: &str| format!("/api/rollouts/{id}/{action}");
    assert_eq!(
        admin_post(&server, &act("pause"), OPS, &json!({})).await.0,
        200
    );
    assert_eq!(
        admin_post(&server, &act("resume"), OPS, &json!({})).await.0,
        200
    );
    assert_eq!(
        announced(&mut jobs).await,
        jobs_for(Pipeline::Update, &["a3"]),
        "a paused job is handed out again"
    );

    plugin_release(&server).await;
    let (_, request) = agent_post(
        &server,
        "/api/plugins/requests",
        &json!({"instance_id": "a2", "name": "billing-export", "version": "1.2.0",
                "action": "install"}),
    )
    .await;
    let approve = format!("/api/plugins/requests/{}/approve", request["id"]);
    assert_eq!(
        admin_post(&server, &approve, ADMIN, &json!({})).await.0,
        200
    );
    assert_eq!(
        announced(&mut jobs).await,
        jobs_for(Pipeline::Plugin, &["a2"])
    );
    let (status, _) =
        admin_post(&server, "/api/restores/schedule", OPS, &json!({"count": 2})).await;
    assert_eq!(status, 201);
    let mut restores = announced(&mut jobs).await;
    restores.instance_ids.sort();
    assert_eq!(restores.pipeline, Pipeline::Restore);
    assert_eq!(restores.instance_ids.len(), 2, "{restores:?}");
    // A pause and a cancel make nothing available.
    assert_eq!(
        admin_post(&server, &act("pause"), OPS, &json!({})).await.0,
        200
    );
    assert_eq!(
        admin_post(&server, &act("cancel"), ADMIN, &json!({}))
            .await
            .0,
        200
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), jobs.recv())
            .await
            .is_err(),
        "announced without a job"
    );
    server.stop().await;
}

on_both_backends!(
    rollout_batches_reach_a_connected_agent_within_seconds,
    approvals_and_restores_reach_a_connected_agent_within_seconds,
    only_agents_that_announced_it_are_told,
    a_job_made_available_while_disconnected_is_taken_on_reconnect,
    a_connecting_agent_is_told_of_the_jobs_waiting_for_it,
    the_store_announces_jobs_as_they_become_available,
);
