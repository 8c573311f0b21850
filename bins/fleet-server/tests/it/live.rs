//! Real `fleet-server` processes: a server killed (SIGKILL) with 1,000 heartbeats in flight
//! on SQLite keeps every acknowledged one; on the live channel, a server killed while a
//! 50 MB output streams loses nothing and stores no chunk twice; two replicas on one
//! PostgreSQL route a command to an agent connected to the other one (LISTEN/NOTIFY), and
//! either serves its logs, and so is the news that a job waits for it (`jobs_waiting`).

use std::process::Stdio;
use std::str::FromStr;
use std::time::{Duration, Instant};

use fleet_agent::{Agent, AgentConfig, CommandSettings};
use fleet_core::Secret;
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use crate::{BIN, free_addr, temp_dir};

const ADMIN: &str = "live-admin-token";
const INSTANCE: &str = "live-001";
const SECRET: &str = "live-agent-secret";
/// A fixed test key (base64 of 32 bytes), shared by the replicas and across restarts.
const JWT_KEY: &str = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";

fn serve(addr: &str, database_url: &str) -> Child {
    Command::new(BIN)
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("FLEET_LISTEN", addr)
        .env("CONTROL_PLANE_DATABASE_URL", database_url)
        .env("CONTROL_PLANE_ADMIN_TOKEN", ADMIN)
        .env(
            "CONTROL_PLANE_AGENT_SECRETS",
            json!({ INSTANCE: SECRET }).to_string(),
        )
        .env("CONTROL_PLANE_JWT_KEY", JWT_KEY)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start fleet-server")
}

/// A `fleet-server serve` on an SQLite file in a new directory, up and answering.
struct OnSqlite {
    dir: std::path::PathBuf,
    db: String,
    addr: String,
    base: String,
    client: reqwest::Client,
    server: Child,
}

impl OnSqlite {
    async fn start(name: &str) -> Self {
        let dir = temp_dir(name);
        let db = format!("sqlite://{}", dir.join("fleet.db").display());
        let addr = free_addr();
        let base = format!("http://{addr}");
        let client = reqwest::Client::new();
        let server = serve(&addr, &db);
        wait_up(&client, &base).await;
        Self {
            dir,
            db,
            addr,
            base,
            client,
            server,
        }
    }
}

async fn wait_up(client: &reqwest::Client, base: &str) {
    for _ in 0..200 {
        if let Ok(r) = client.get(format!("{base}/healthz")).send().await
            && r.status().is_success()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{base} never came up");
}

async fn connected(client: &reqwest::Client, base: &str) -> u64 {
    client
        .get(format!("{base}/v1/agents/connected"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .ok()
        .map(|r| r.json::<Value>())
        .expect("answer")
        .await
        .ok()
        .and_then(|v| v["connected"].as_u64())
        .unwrap_or(0)
}

async fn wait_connected(client: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while connected(client, base).await != 1 {
        assert!(
            Instant::now() < deadline,
            "the agent never connected to {base}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct TestAgent {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

fn start_agent(base: &str, dir: &std::path::Path) -> TestAgent {
    let mut config = AgentConfig::new(INSTANCE, base, Secret::new(SECRET).expect("secret"));
    config.local_port = 0;
    config.state_path = dir.join("agent-state.db");
    config.heartbeat_interval = Duration::from_secs(3600);
    let settings = CommandSettings {
        backoff_max: Duration::from_secs(1),
        projects_dir: dir.join("projects"),
        ..CommandSettings::default()
    };
    let agent = Agent::builder(config)
        .without_builtins()
        .commands(settings)
        .build()
        .expect("agent");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        agent
            .run(async {
                let _ = stopped.await;
            })
            .await
            .expect("agent");
    });
    TestAgent { stop, task }
}

async fn submit(client: &reqwest::Client, base: &str, body: Value) -> String {
    let response = client
        .post(format!("{base}/v1/commands/submit"))
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await
        .expect("submit");
    assert_eq!(response.status().as_u16(), 201);
    let body: Value = response.json().await.expect("json");
    body["id"].as_str().expect("id").to_owned()
}

async fn show(client: &reqwest::Client, base: &str, id: &str) -> Value {
    client
        .get(format!("{base}/v1/commands/{id}"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("show")
        .json()
        .await
        .expect("json")
}

async fn wait_done(client: &reqwest::Client, base: &str, id: &str, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let body = show(client, base, id).await;
        if body["status"] != "running" {
            return body;
        }
        assert!(Instant::now() < deadline, "still running: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn stdout_of(client: &reqwest::Client, base: &str, id: &str) -> Vec<u8> {
    client
        .get(format!("{base}/v1/commands/{id}/logs?stream=stdout"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("logs")
        .bytes()
        .await
        .expect("bytes")
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_stream_ends_with_the_whole_log_once() {
    let OnSqlite {
        dir,
        db,
        addr,
        base,
        client,
        mut server,
    } = OnSqlite::start("live").await;
    let agent = start_agent(&base, &dir);
    wait_connected(&client, &base).await;

    // 50 MiB of numbered lines, produced over a few seconds so the kill lands mid-stream.
    let script = "for i in $(seq 0 49); do seq $((i*200000)) $((i*200000+199999)); sleep 0.05; done \
                  | head -c 52428800";
    let id = submit(
        &client,
        &base,
        json!({"command_type": "RunCommand", "targets": [INSTANCE],
               "payload": {"cmd": script, "shell": true}}),
    )
    .await;
    let pool = sqlx::SqlitePool::connect(&db).await.expect("open db");
    let target: String = loop {
        let body = show(&client, &base, &id).await;
        if let Some(t) = body["targets"][0]["target_id"].as_str() {
            break t.to_owned();
        }
    };
    // Kill once part of the output is stored.
    let deadline = Instant::now() + Duration::from_secs(60);
    let stored_at_kill = loop {
        let stored: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(LENGTH(data)), 0) FROM command_logs WHERE target_id = $1",
        )
        .bind(&target)
        .fetch_one(&pool)
        .await
        .expect("count");
        if stored >= 4 * 1024 * 1024 {
            break stored;
        }
        assert!(Instant::now() < deadline, "output never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    server.start_kill().expect("SIGKILL");
    let _ = server.wait().await;
    assert!(
        stored_at_kill < 52_428_800,
        "the output was complete before the kill"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut server = serve(&addr, &db);
    wait_up(&client, &base).await;
    let done = wait_done(&client, &base, &id, Duration::from_secs(180)).await;
    assert_eq!(done["targets"][0]["status"], "completed", "{done}");

    let expected = std::process::Command::new("/bin/sh")
        .args(["-c", script])
        .output()
        .expect("run locally")
        .stdout;
    // The result arrives after every chunk (one ordered journal), so the log is complete.
    let stored = stdout_of(&client, &base, &id).await;
    assert_eq!(stored.len(), expected.len());
    assert!(stored == expected, "stored log differs from the output");
    // No chunk twice, no overlap: each chunk starts where the previous ended.
    let chunks: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT pos, LENGTH(data) FROM command_logs WHERE target_id = $1 AND stream = 'stdout' ORDER BY pos",
    )
    .bind(&target)
    .fetch_all(&pool)
    .await
    .expect("chunks");
    let mut next = 0;
    for (pos, len) in &chunks {
        assert_eq!(*pos, next, "gap or overlap at {pos}");
        next = pos + len;
    }
    let _ = agent.stop.send(());
    let _ = agent.task.await;
    server.start_kill().ok();
    let _ = server.wait().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// SIGKILL while 1,000 heartbeats are in flight on the embedded SQLite: every heartbeat that
/// got a 2xx is in the database, the server comes back on the same file, and a redelivered
/// acknowledged heartbeat is a duplicate, not a second row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_keeps_every_acknowledged_heartbeat_through_a_kill() {
    const LOAD: usize = 1000;
    let OnSqlite {
        dir,
        db,
        addr,
        base,
        client,
        mut server,
    } = OnSqlite::start("kill9-sqlite").await;

    let signer = fleet_core::Signer::new(Secret::new(SECRET).expect("secret"));
    let post = |msg_id: String, n: usize| {
        let (client, url, signer) = (
            client.clone(),
            format!("{base}/api/heartbeats"),
            signer.clone(),
        );
        async move {
            let mut heartbeat = fleet_core::Heartbeat::new(INSTANCE);
            heartbeat.db_ok = true;
            heartbeat.jobs_pending = Some(n as u64);
            let body = heartbeat.to_vec();
            let signed = signer.headers(&msg_id, fleet_core::unix_now(), &body);
            let mut request = client.post(url).header("content-type", "application/json");
            for (name, value) in signed.pairs() {
                request = request.header(name, value);
            }
            match request.body(body).send().await {
                Ok(r) if r.status().is_success() => r.json::<Value>().await.ok(),
                _ => None,
            }
        }
    };
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let tenth = std::sync::Arc::new(tokio::sync::Notify::new());
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..LOAD {
        let (request, acked, tenth) = (
            post(format!("msg_kill9_{n:04}"), n),
            acked.clone(),
            tenth.clone(),
        );
        tasks.spawn(async move {
            if let Some(answer) = request.await {
                assert_eq!(answer["duplicate"], false, "{answer}");
                let mut acked = acked.lock().expect("lock");
                acked.push(format!("msg_kill9_{n:04}"));
                if acked.len() == LOAD / 10 {
                    tenth.notify_one();
                }
            }
        });
    }
    tokio::time::timeout(Duration::from_secs(60), tenth.notified())
        .await
        .expect("the first 100 acknowledgements within 60 s");
    server.start_kill().expect("SIGKILL");
    let _ = server.wait().await;
    while let Some(joined) = tasks.join_next().await {
        joined.expect("load task");
    }
    let acked = acked.lock().expect("lock").clone();
    assert!(acked.len() < LOAD, "nothing was in flight at the kill");

    // Read the file the killed process left, as it left it.
    let pool = sqlx::SqlitePool::connect(&db).await.expect("open db");
    let stored: std::collections::HashSet<String> =
        sqlx::query_scalar::<_, String>("SELECT msg_id FROM heartbeats")
            .fetch_all(&pool)
            .await
            .expect("stored")
            .into_iter()
            .collect();
    let lost: Vec<&String> = acked.iter().filter(|id| !stored.contains(*id)).collect();
    assert!(lost.is_empty(), "acknowledged but not stored: {lost:?}");
    println!(
        "sqlite kill -9: {} of {LOAD} heartbeats acknowledged before the kill, {} stored",
        acked.len(),
        stored.len()
    );
    pool.close().await;

    // The server starts again on the same file; an acknowledged message sent again (signed
    // in a later second, as a retry is: the same id and time would be a replay) is a
    // duplicate and adds no row.
    let mut server = serve(&addr, &db);
    wait_up(&client, &base).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let again = post(acked[0].clone(), 0)
        .await
        .expect("redelivery answered");
    assert_eq!(again["duplicate"], true, "{again}");
    let pool = sqlx::SqlitePool::connect(&db).await.expect("open db");
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM heartbeats WHERE msg_id = $1")
        .bind(&acked[0])
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(rows, 1);
    pool.close().await;
    server.start_kill().ok();
    let _ = server.wait().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// Waits until `/metrics` at `base` counts an answer to `POST path` that handed out no job:
/// the agent's poller asked once and now waits out its interval.
async fn wait_polled(client: &reqwest::Client, base: &str, path: &str) {
    let route = format!("route=\"{path}\"");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .unwrap_or_default();
        if metrics
            .lines()
            .any(|line| line.contains(&route) && line.contains("status=\"204\""))
        {
            return;
        }
        assert!(Instant::now() < deadline, "the agent never polled {path}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes a plugin release at `base`, requests it as the agent (signed with its secret)
/// and approves the request; returns the request's id.
async fn approve_plugin_request(client: &reqwest::Client, base: &str) -> Value {
    let admin = |path: &str, body: Value| {
        client
            .post(format!("{base}{path}"))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
    };
    let published = admin(
        "/api/plugins/releases",
        json!({"name": "billing-export", "version": "1.2.0"}),
    )
    .await
    .expect("publish");
    assert_eq!(published.status().as_u16(), 201);
    let body = serde_json::to_vec(&json!({"instance_id": INSTANCE, "name": "billing-export",
        "version": "1.2.0", "action": "install"}))
    .expect("json");
    let signer = fleet_core::Signer::new(Secret::new(SECRET).expect("secret"));
    let msg_id = format!("msg_{}", uuid::Uuid::new_v4().simple());
    let mut request = client
        .post(format!("{base}/api/plugins/requests"))
        .header("content-type", "application/json")
        .body(body.clone());
    for (name, value) in signer
        .headers(&msg_id, fleet_core::unix_now(), &body)
        .pairs()
    {
        request = request.header(name, value);
    }
    let response = request.send().await.expect("request");
    assert_eq!(response.status().as_u16(), 201);
    let created: Value = response.json().await.expect("json");
    let approved = admin(
        &format!("/api/plugins/requests/{}/approve", created["id"]),
        json!({}),
    )
    .await
    .expect("approve");
    assert_eq!(approved.status().as_u16(), 200);
    created["id"].clone()
}

/// The status of the job of plugin request `id`.
async fn plugin_job_status(client: &reqwest::Client, base: &str, id: &Value) -> String {
    let requests: Value = client
        .get(format!("{base}/api/plugins/requests"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("requests")
        .json()
        .await
        .expect("json");
    requests["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| &r["id"] == id)
        .and_then(|r| r["job_status"].as_str())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_route_commands_through_postgres() {
    let url = match std::env::var("FLEET_TEST_POSTGRES_URL") {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "FLEET_TEST_POSTGRES_URL is not set: the replica test needs a real PostgreSQL. Run \
             `eval \"$(scripts/services postgres)\"` first, or run scripts/test."
        ),
    };
    let schema = format!("fleet_live_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::PgPool::connect(&url).await.expect("connect");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&admin)
        .await
        .expect("schema");
    let mut parsed = reqwest::Url::from_str(&url).expect("url");
    parsed
        .query_pairs_mut()
        .append_pair("options[search_path]", &schema);
    let db = parsed.to_string();
    let dir = temp_dir("live");
    let client = reqwest::Client::new();
    let (addr_a, addr_b) = (free_addr(), free_addr());
    let (base_a, base_b) = (format!("http://{addr_a}"), format!("http://{addr_b}"));
    let mut a = serve(&addr_a, &db);
    wait_up(&client, &base_a).await;
    let mut b = serve(&addr_b, &db);
    wait_up(&client, &base_b).await;

    // The agent holds its socket to replica B; the command is submitted to replica A.
    let agent = start_agent(&base_b, &dir);
    wait_connected(&client, &base_b).await;
    assert_eq!(connected(&client, &base_a).await, 0);
    let id = submit(
        &client,
        &base_a,
        json!({"command_type": "RunCommand", "targets": [INSTANCE],
               "payload": {"cmd": "echo", "args": ["routed through", "LISTEN/NOTIFY"]}}),
    )
    .await;
    let done = wait_done(&client, &base_a, &id, Duration::from_secs(30)).await;
    assert_eq!(done["targets"][0]["status"], "completed", "{done}");
    let expected = b"routed through LISTEN/NOTIFY\n".to_vec();
    assert_eq!(stdout_of(&client, &base_a, &id).await, expected);
    assert_eq!(stdout_of(&client, &base_b, &id).await, expected);

    // A plugin job approved on replica A reaches the agent's plugin poller (10 minutes
    // between polls) within seconds: A tells B, which holds the socket.
    wait_polled(&client, &base_b, "/api/plugins/next").await;
    let job = approve_plugin_request(&client, &base_a).await;
    let started = Instant::now();
    loop {
        let status = plugin_job_status(&client, &base_a, &job).await;
        if status != "pending" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the approved plugin job is still pending: the agent on replica B was not told"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let _ = agent.stop.send(());
    let _ = agent.task.await;
    a.start_kill().ok();
    b.start_kill().ok();
    let _ = a.wait().await;
    let _ = b.wait().await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(&admin)
        .await
        .expect("drop schema");
    let _ = std::fs::remove_dir_all(dir);
}
