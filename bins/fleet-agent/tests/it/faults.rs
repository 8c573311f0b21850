//! The fault tests of the reliability suite (RELIABILITY.md, "Faults"): real `fleet-server`
//! and `fleet-agent` processes, real PostgreSQL, real sockets. Each test prints its figures
//! (`cargo build -p fleet-server && cargo test -p fleet-agent --test it faults_ -- --nocapture`;
//! the server binary is looked up beside the agent's).
//!
//! Exactly once is checked with the agent's own ledger: the outbox numbers its messages
//! (SQLite AUTOINCREMENT), so after the agent stops, every message it ever queued is either
//! stored by the control plane, still waiting, or counted as dropped, and nothing is stored
//! twice.

use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet_agent::sender::{Outcome, Sender};
use fleet_core::{Heartbeat, Scheme, Secret, Signer};
use serde_json::{Value, json};
use sqlx::postgres::PgPool;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::rollout::{self, Api, Instance};
use crate::{Guard, agent_metric, free_port, service_env, sigterm_and_wait, temp_dir};

const ADMIN: &str = "faults-admin-token";
/// Every instance signs with this (`CONTROL_PLANE_AGENT_TOKEN`), so load generators may use
/// any instance id.
const SHARED_SECRET: &str = "faults-shared-agent-secret";

// ---------------------------------------------------------------------------------------
// Polling, processes, databases
// ---------------------------------------------------------------------------------------

/// Polls `probe` every 100 ms until it returns a value; panics with `what` after `secs`.
async fn eventually<T, F, Fut>(secs: u64, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "gave up after {secs} s waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `fleet-server serve` on `port` over `database_url`, logging to `dir/server.log`.
fn spawn_server(dir: &Path, port: u16, database_url: &str) -> Guard {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))
        .expect("server log");
    let child = Command::new(rollout::server_binary())
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("FLEET_LISTEN", format!("127.0.0.1:{port}"))
        .env("CONTROL_PLANE_DATABASE_URL", database_url)
        .env("CONTROL_PLANE_ADMIN_TOKEN", ADMIN)
        .env("CONTROL_PLANE_AGENT_TOKEN", SHARED_SECRET)
        .env("RUST_LOG", "info,sqlx=warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start fleet-server");
    Guard(child)
}

/// The status of `GET /healthz`, or `None` when it did not answer within 2 s.
async fn health(client: &reqwest::Client, url: &str) -> Option<u16> {
    client
        .get(format!("{url}/healthz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// One figure of the control plane's `/metrics` (0 when absent), e.g.
/// `fleet_heartbeats_rejected_total{reason="replay"}`.
async fn server_metric(url: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

async fn wait_healthy(url: &str, secs: u64) {
    let client = reqwest::Client::new();
    eventually(secs, &format!("{url}/healthz to answer 200"), || async {
        (health(&client, url).await == Some(200)).then_some(())
    })
    .await;
}

/// A database of its own on the shared PostgreSQL of `scripts/services`, dropped at the end.
struct SharedDb {
    admin: PgPool,
    name: String,
    url: String,
    pool: PgPool,
}

impl SharedDb {
    async fn create(prefix: &str) -> Self {
        let base = service_env("FLEET_TEST_POSTGRES_URL");
        let admin = PgPool::connect(&base).await.expect("connect to PostgreSQL");
        let name = format!("fleet_faults_{prefix}_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .expect("create the test database");
        let mut url = reqwest::Url::from_str(&base).expect("FLEET_TEST_POSTGRES_URL");
        url.set_path(&format!("/{name}"));
        let url = url.to_string();
        let pool = PgPool::connect_lazy(&url).expect("pool");
        Self {
            admin,
            name,
            url,
            pool,
        }
    }

    async fn drop_db(self) {
        self.pool.close().await;
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&self.admin)
        .await;
        self.admin.close().await;
    }
}

/// A control plane of a test's own: a folder, a database on the shared PostgreSQL, a port;
/// `fleet-server` runs on them between `start` and `kill`, as often as the test wants.
struct Plane {
    root: PathBuf,
    db: SharedDb,
    port: u16,
    url: String,
    server: Option<Guard>,
}

impl Plane {
    /// Everything but the server process.
    async fn new(name: &str) -> Self {
        let port = free_port();
        Self {
            root: temp_dir(&format!("fault-{name}")),
            db: SharedDb::create(name).await,
            port,
            url: format!("http://127.0.0.1:{port}"),
            server: None,
        }
    }

    /// Starts `fleet-server` and waits until it is healthy.
    async fn start(&mut self) {
        self.server = Some(spawn_server(&self.root, self.port, &self.db.url));
        wait_healthy(&self.url, 60).await;
    }

    /// SIGKILL, and wait for the process to be gone.
    fn kill(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.0.kill();
            let _ = server.0.wait();
        }
    }

    async fn finish(mut self) {
        self.kill();
        let Plane { root, db, .. } = self;
        db.drop_db().await;
        let _ = std::fs::remove_dir_all(root);
    }
}

/// A stored heartbeat: instance, message id, numeric figures.
struct Row {
    instance: String,
    msg_id: String,
    figures: Value,
}

/// Every stored heartbeat, in the order the control plane stored them.
async fn stored(pool: &PgPool) -> Vec<Row> {
    // Before the server's first start the tables do not exist yet: nothing is stored.
    let rows: Vec<(String, Option<String>, String)> = sqlx::query_as(
        "SELECT i.instance_id, h.msg_id, h.figures FROM heartbeats h \
         JOIN installations i ON i.id = h.installation_id ORDER BY h.id",
    )
    .fetch_all(pool)
    .await
    .unwrap_or_default();
    rows.into_iter()
        .map(|(instance, msg_id, figures)| Row {
            instance,
            msg_id: msg_id.unwrap_or_default(),
            figures: serde_json::from_str(&figures).unwrap_or(Value::Null),
        })
        .collect()
}

fn ids_of(rows: &[Row], instance: &str) -> Vec<String> {
    rows.iter()
        .filter(|r| r.instance == instance)
        .map(|r| r.msg_id.clone())
        .collect()
}

// ---------------------------------------------------------------------------------------
// Agents and their ledgers
// ---------------------------------------------------------------------------------------

/// A real `fleet-agent` process with its own state directory and local API.
struct AgentProc {
    guard: Guard,
    dir: PathBuf,
    local_port: u16,
    instance: String,
}

impl AgentProc {
    /// Heartbeats every 0.2 s, a quick backoff (100 ms → 1 s), only the outbox and sender
    /// (no checks, collectors or live channel): what is measured is delivery.
    fn start(root: &Path, instance: &str, url: &str, extra: &[(&str, &str)]) -> Self {
        let dir = root.join(instance);
        std::fs::create_dir_all(&dir).expect("agent dir");
        let local_port = free_port();
        let mut env: Vec<(String, String)> = [
            ("INSTANCE_ID", instance.to_owned()),
            ("CONTROL_PLANE_URL", url.to_owned()),
            ("AGENT_SECRET", SHARED_SECRET.to_owned()),
            ("HEARTBEAT_INTERVAL", "0.2".to_owned()),
            ("AGENT_PORT", local_port.to_string()),
            ("AGENT_LOCAL_TOKEN", crate::LOCAL_TOKEN.to_owned()),
            (
                "AGENT_STATE_PATH",
                dir.join("state.db").display().to_string(),
            ),
            ("AGENT_METRICS_URL", "off".to_owned()),
            ("CONTAINERS_INTERVAL", "0".to_owned()),
            ("AGENT_COMMANDS_ENABLED", "false".to_owned()),
            ("PLUGIN_UPDATE_ENABLED", "false".to_owned()),
            ("SEND_BACKOFF_BASE_MS", "100".to_owned()),
            ("SEND_BACKOFF_MAX", "1".to_owned()),
            ("RUST_LOG", "info".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (k, v) in extra {
            env.retain(|(name, _)| name != k);
            env.push(((*k).to_owned(), (*v).to_owned()));
        }
        Self {
            guard: Guard(crate::spawn_agent(&env, &dir)),
            dir,
            local_port,
            instance: instance.to_owned(),
        }
    }

    /// What the agent has logged so far (all its runs in its directory).
    fn log(&self) -> String {
        crate::agent_logs(&self.dir)
            .into_iter()
            .map(|(_, text)| text)
            .collect()
    }

    /// A figure of the agent's local API; -1 when it does not answer, so that waiting for
    /// "0 messages waiting" cannot pass on a dead agent.
    async fn metric(&self, name: &str) -> f64 {
        agent_metric(self.local_port, name).await.unwrap_or(-1.0)
    }

    /// Waits until the outbox is empty, then stops the agent with SIGTERM and reads its
    /// ledger.
    async fn drain_and_stop(mut self, secs: u64) -> Ledger {
        let what = format!("{}'s outbox to drain", self.instance);
        eventually(secs, &what, || async {
            (self.metric("fleet_agent_outbox_messages").await == 0.0).then_some(())
        })
        .await;
        sigterm_and_wait(&mut self.guard).await;
        Ledger::read(&self.dir).await
    }
}

/// What an agent's outbox says about every message it ever queued (read after it stopped).
#[derive(Debug)]
struct Ledger {
    /// Messages ever queued (the outbox's AUTOINCREMENT high-water mark).
    pushed: usize,
    /// Ids still waiting, oldest first.
    waiting: Vec<String>,
    /// Messages the bounds dropped, ever.
    dropped: usize,
    /// Drops not yet put into a queued heartbeat.
    dropped_unreported: usize,
    /// Drops put into heartbeats still waiting (the agent stopped before their delivery was
    /// acknowledged), by message id: reported once they are delivered.
    dropped_carried_by_waiting: Vec<(String, usize)>,
}

impl Ledger {
    async fn read(dir: &Path) -> Self {
        let mut conn = SqliteConnectOptions::new()
            .filename(dir.join("state.db"))
            .read_only(true)
            .connect()
            .await
            .expect("open the agent's outbox");
        let pushed: i64 = sqlx::query_scalar(
            "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0)",
        )
        .fetch_one(&mut conn)
        .await
        .expect("sequence");
        let waiting: Vec<String> = sqlx::query_scalar("SELECT msg_id FROM outbox ORDER BY seq")
            .fetch_all(&mut conn)
            .await
            .expect("waiting");
        let counter = |name: &'static str| {
            sqlx::query_scalar::<_, i64>("SELECT value FROM counters WHERE name = ?").bind(name)
        };
        let dropped = counter("dropped_total")
            .fetch_one(&mut conn)
            .await
            .expect("dropped_total");
        let dropped_unreported = counter("dropped_unreported")
            .fetch_one(&mut conn)
            .await
            .expect("dropped_unreported");
        let dropped_carried_by_waiting: Vec<(String, i64)> =
            sqlx::query_as("SELECT msg_id, carried_dropped FROM outbox ORDER BY seq")
                .fetch_all(&mut conn)
                .await
                .expect("carried drops");
        let _ = conn.close().await;
        Self {
            pushed: pushed as usize,
            waiting,
            dropped: dropped as usize,
            dropped_unreported: dropped_unreported as usize,
            dropped_carried_by_waiting: dropped_carried_by_waiting
                .into_iter()
                .map(|(id, n)| (id, n as usize))
                .collect(),
        }
    }

    /// Every message queued is stored once (in queue order), still waiting, or dropped.
    fn assert_exactly_once(&self, instance: &str, stored_ids: &[String]) {
        let unique: HashSet<&String> = stored_ids.iter().collect();
        assert_eq!(
            unique.len(),
            stored_ids.len(),
            "{instance}: a heartbeat was stored twice"
        );
        // Message ids are UUIDv7: queue order is id order.
        let mut sorted = stored_ids.to_vec();
        sorted.sort();
        assert_eq!(sorted, stored_ids, "{instance}: stored out of order");
        // A send cut short by the stop may have been applied: that message (the oldest
        // waiting) goes again at the next start and is acknowledged as a duplicate.
        let both: Vec<&String> = self
            .waiting
            .iter()
            .filter(|id| unique.contains(id))
            .collect();
        assert!(
            both.len() <= 1 && both.iter().all(|id| **id == self.waiting[0]),
            "{instance}: stored messages still waiting: {both:?}"
        );
        assert_eq!(
            self.pushed,
            stored_ids.len() + self.waiting.len() - both.len() + self.dropped,
            "{instance}: queued = stored + waiting + dropped ({self:?})"
        );
    }
}

// ---------------------------------------------------------------------------------------
// A load generator that behaves like an outbox: same id, fresh signature, until a 2xx
// ---------------------------------------------------------------------------------------

/// Signed heartbeats through the agent library's own `Sender` (v1 signature, fresh
/// timestamp per attempt, never the timestamp of an earlier attempt of the same message).
#[derive(Clone)]
struct Load {
    sender: Sender,
}

impl Load {
    fn new(url: &str, timeout: Duration) -> Self {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .expect("client");
        let signer = Signer::new(Secret::new(SHARED_SECRET).expect("secret"));
        Self {
            sender: Sender::new(client, url, signer, Scheme::V1),
        }
    }

    fn message(instance: &str) -> (String, Vec<u8>) {
        let msg_id = format!("msg_{}", uuid::Uuid::now_v7().simple());
        (msg_id, Heartbeat::new(instance).to_vec())
    }

    /// One attempt: `Delivered` for a 2xx (applied now, or a duplicate of an applied one).
    async fn post(&self, msg_id: &str, body: &[u8]) -> Outcome {
        self.sender.send(msg_id, "/api/heartbeats", body).await
    }
}

// ---------------------------------------------------------------------------------------
// 1. kill -9 the control plane with 1,000 heartbeats in flight
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_kill9_control_plane_with_1000_heartbeats_in_flight() {
    const LOAD: usize = 1000;
    let mut plane = Plane::new("kill9").await;
    plane.start().await;
    let (root, url, pool) = (plane.root.clone(), plane.url.clone(), plane.db.pool.clone());
    let agents: Vec<AgentProc> = (0..3)
        .map(|i| AgentProc::start(&root, &format!("kill9-agent-{i}"), &url, &[]))
        .collect();
    eventually(60, "every agent's first heartbeat stored", || async {
        let rows = stored(&pool).await;
        agents
            .iter()
            .all(|a| !ids_of(&rows, &a.instance).is_empty())
            .then_some(())
    })
    .await;

    // 1,000 signed heartbeats from 20 instances, all sent at once.
    let load = Load::new(&url, Duration::from_secs(60));
    let messages: Vec<(String, Vec<u8>)> = (0..LOAD)
        .map(|i| Load::message(&format!("kill9-load-{:02}", i % 20)))
        .collect();
    let acked = Arc::new(Mutex::new(HashSet::<String>::new()));
    let tenth = Arc::new(tokio::sync::Notify::new());
    let mut tasks = tokio::task::JoinSet::new();
    for (msg_id, body) in messages.clone() {
        let (load, acked, tenth) = (load.clone(), acked.clone(), tenth.clone());
        tasks.spawn(async move {
            if load.post(&msg_id, &body).await == Outcome::Delivered {
                let mut acked = acked.lock().unwrap();
                acked.insert(msg_id);
                if acked.len() == LOAD / 10 {
                    tenth.notify_one();
                }
            }
        });
    }
    // SIGKILL as soon as 10 % are answered (the answering task wakes this one; polling
    // would be late on a fast machine): the rest are on the wire, queued or being written.
    tokio::time::timeout(Duration::from_secs(60), tenth.notified())
        .await
        .expect("the first 100 acknowledgements within 60 s");
    plane.kill();
    let killed_at = Instant::now();
    let acked_at_kill = acked.lock().unwrap().len();
    while tasks.join_next().await.is_some() {}
    let acked: HashSet<String> = acked.lock().unwrap().clone();
    assert!(
        acked.len() < LOAD,
        "every heartbeat was answered before the kill: nothing was in flight"
    );

    // Every heartbeat that got a 2xx is in the database.
    let rows = stored(&pool).await;
    let stored_ids: HashSet<String> = rows.iter().map(|r| r.msg_id.clone()).collect();
    let lost: Vec<&String> = acked.difference(&stored_ids).collect();
    assert!(lost.is_empty(), "acknowledged but not stored: {lost:?}");
    let load_ids: HashSet<&String> = messages.iter().map(|(id, _)| id).collect();
    let stored_load = stored_ids.iter().filter(|id| load_ids.contains(id)).count();

    // The agents keep queueing while the control plane is down.
    for agent in &agents {
        let what = format!("{} to queue heartbeats", agent.instance);
        eventually(60, &what, || async {
            (agent.metric("fleet_agent_outbox_messages").await >= 3.0).then_some(())
        })
        .await;
    }
    plane.start().await;
    let down_for = killed_at.elapsed();

    // The load generator redelivers what was not acknowledged, as an outbox would: same id,
    // fresh signature. A message stored before the kill is acknowledged as a duplicate (a
    // same-second retry would have been refused as a replay before the sender's fix).
    let unacked: Vec<(String, Vec<u8>)> = messages
        .iter()
        .filter(|(id, _)| !acked.contains(id))
        .cloned()
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    for (msg_id, body) in unacked.clone() {
        let load = load.clone();
        tasks.spawn(async move {
            let answer = load.post(&msg_id, &body).await;
            assert_eq!(answer, Outcome::Delivered, "redelivery of {msg_id}");
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.expect("redelivery");
    }

    // The agents' outboxes deliver the rest, each message once, in order.
    let mut figures = Vec::new();
    for agent in agents {
        let instance = agent.instance.clone();
        let ledger = agent.drain_and_stop(60).await;
        let rows = stored(&pool).await;
        let ids = ids_of(&rows, &instance);
        ledger.assert_exactly_once(&instance, &ids);
        figures.push(format!(
            "{instance}: {} queued, {} stored",
            ledger.pushed,
            ids.len()
        ));
    }
    let rows = stored(&pool).await;
    let load_rows: Vec<&String> = rows
        .iter()
        .filter(|r| r.instance.starts_with("kill9-load-"))
        .map(|r| &r.msg_id)
        .collect();
    let unique: HashSet<&&String> = load_rows.iter().collect();
    assert_eq!(
        unique.len(),
        load_rows.len(),
        "a heartbeat was stored twice"
    );
    assert_eq!(load_rows.len(), LOAD, "every heartbeat stored once");

    println!(
        "FAULT kill9: {LOAD} heartbeats sent at once; SIGKILL after {acked_at_kill} answers \
         ({} in flight); {} acknowledged in all, all {} stored; {stored_load} stored at the \
         kill ({} stored but unanswered); {} redelivered after the restart, all acknowledged \
         (the stored ones as duplicates); {LOAD} stored once in the end; control plane down {:.1} s; \
         agents: {}",
        LOAD - acked_at_kill,
        acked.len(),
        acked.len(),
        stored_load - acked.len(),
        unacked.len(),
        down_for.as_secs_f64(),
        figures.join("; "),
    );
    plane.finish().await;
}

// ---------------------------------------------------------------------------------------
// 2. Restart PostgreSQL under load (a private instance, so other tests are not disturbed)
// ---------------------------------------------------------------------------------------

/// A PostgreSQL cluster of this test's own, on a free port, in a temporary directory.
struct PrivatePg {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
}

impl PrivatePg {
    fn init(root: &Path) -> Self {
        let versions = std::fs::read_dir("/usr/lib/postgresql").unwrap_or_else(|_| {
            panic!(
                "PostgreSQL is not installed: run `eval \"$(scripts/services postgres)\"` first, \
                 or run scripts/test"
            )
        });
        let bin = versions
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let v: u32 = e.file_name().to_str()?.parse().ok()?;
                Some((v, e.path().join("bin")))
            })
            .max()
            .map(|(_, bin)| bin)
            .expect("a PostgreSQL version under /usr/lib/postgresql");
        let home = root.join("pg");
        std::fs::create_dir_all(&home).expect("pg dir");
        // PostgreSQL refuses to run as root: the cluster belongs to `postgres` then.
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&home)
                .status()
                .expect("chown");
            assert!(status.success());
        }
        let me = Self {
            bin,
            data: home.join("data"),
            port: free_port(),
        };
        let mut initdb = me.command("initdb");
        // Local trust auth (the cluster lives only as long as the test), no fsync at init.
        let options = ["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"];
        initdb.arg("-D").arg(&me.data).args(options);
        run_ok(initdb, "initdb");
        me
    }

    fn command(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        if is_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            Command::new(path)
        }
    }

    fn pg_ctl(&self, args: &[&str]) {
        let mut pg_ctl = self.command("pg_ctl");
        pg_ctl.arg("-D").arg(&self.data).args(args);
        run_ok(pg_ctl, &format!("pg_ctl {args:?}"));
    }

    fn start(&self) {
        let log = self.data.with_file_name("postgres.log");
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.data.display()
        );
        self.pg_ctl(&[
            "-l",
            &log.display().to_string(),
            "-o",
            &options,
            "-w",
            "-t",
            "60",
            "start",
        ]);
    }

    /// Stops at once, without a checkpoint: what was committed must come back from the WAL.
    fn stop_immediately(&self) {
        self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
    }

    fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs `command` (no stdin) and panics with its output unless it succeeds.
fn run_ok(mut command: Command, what: &str) {
    let out = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Steady signed load: `workers` senders, each retrying one message until it gets a 2xx
/// (same id, fresh signature), then the next.
struct Steady {
    acked: Arc<Mutex<Vec<String>>>,
    /// Attempts answered with another status (a 503 while the database is away).
    refused: Arc<AtomicUsize>,
    /// Attempts with no answer at all (connection error or the client's timeout).
    unanswered: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    tasks: tokio::task::JoinSet<Option<String>>,
}

impl Steady {
    fn start(load: &Load, prefix: &str, workers: usize) -> Self {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(AtomicUsize::new(0));
        let unanswered = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..workers {
            let (load, acked, refused, unanswered, stop) = (
                load.clone(),
                acked.clone(),
                refused.clone(),
                unanswered.clone(),
                stop.clone(),
            );
            let instance = format!("{prefix}-{w}");
            tasks.spawn(async move {
                let mut stopping_since: Option<Instant> = None;
                loop {
                    if stop.load(Ordering::Relaxed) {
                        return None;
                    }
                    let (msg_id, body) = Load::message(&instance);
                    loop {
                        match load.post(&msg_id, &body).await {
                            Outcome::Delivered => {
                                acked.lock().unwrap().push(msg_id);
                                break;
                            }
                            // The sender names an HTTP answer "HTTP <status>".
                            Outcome::Retry { reason, .. } if !reason.starts_with("HTTP ") => {
                                unanswered.fetch_add(1, Ordering::Relaxed)
                            }
                            _ => refused.fetch_add(1, Ordering::Relaxed),
                        };
                        if stop.load(Ordering::Relaxed) {
                            // Keep trying a while, then report the message never acked.
                            let since = *stopping_since.get_or_insert_with(Instant::now);
                            if since.elapsed() > Duration::from_secs(60) {
                                return Some(msg_id);
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
        }
        Self {
            acked,
            refused,
            unanswered,
            stop,
            tasks,
        }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Stops the senders; returns the acknowledged ids and those never acknowledged.
    async fn stop(mut self) -> (Vec<String>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut never = Vec::new();
        while let Some(joined) = self.tasks.join_next().await {
            never.extend(joined.expect("load task"));
        }
        let acked = self.acked.lock().unwrap().clone();
        (acked, never)
    }
}

/// One `/healthz` sample: when, and the status (`None`: no answer within 2 s).
type Sample = (Instant, Option<u16>);

/// `/healthz` sampled every 100 ms.
struct HealthLog {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl HealthLog {
    fn start(url: &str) -> Self {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, halt, url) = (samples.clone(), stop.clone(), url.to_owned());
        let task = tokio::spawn(async move {
            let client = reqwest::Client::new();
            while !halt.load(Ordering::Relaxed) {
                let status = health(&client, &url).await;
                s.lock().unwrap().push((Instant::now(), status));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Self {
            samples,
            stop,
            task,
        }
    }

    /// The first sample after `after` that satisfies `cond`.
    fn first(&self, after: Instant, cond: impl Fn(Option<u16>) -> bool) -> Option<Instant> {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .find(|(at, s)| *at > after && cond(*s))
            .map(|(at, _)| *at)
    }

    fn between(&self, from: Instant, to: Instant) -> Vec<Option<u16>> {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, _)| *at >= from && *at <= to)
            .map(|(_, s)| *s)
            .collect()
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_postgres_restart_under_load() {
    let root = temp_dir("fault-pg-restart");
    let pg = PrivatePg::init(&root);
    pg.start();
    let admin = PgPool::connect(&pg.url("postgres"))
        .await
        .expect("connect to the private PostgreSQL");
    sqlx::query("CREATE DATABASE fleet")
        .execute(&admin)
        .await
        .expect("create database");
    admin.close().await;
    let db_url = pg.url("fleet");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut server = spawn_server(&root, port, &db_url);
    wait_healthy(&url, 60).await;

    let agent = AgentProc::start(&root, "pg-agent", &url, &[]);
    let load = Load::new(&url, Duration::from_secs(10));
    // 32 senders: a writer batch holds many heartbeats when PostgreSQL goes away.
    let steady = Steady::start(&load, "pg-load", 32);
    let healthz = HealthLog::start(&url);
    eventually(60, "the load to be acknowledged", || async {
        (steady.acked() >= 40).then_some(())
    })
    .await;

    // PostgreSQL goes away at once (no checkpoint), stays away 12 s (longer than the
    // senders' 10 s timeout), comes back.
    let down_at = Instant::now();
    pg.stop_immediately();
    let acked_before = steady.acked();
    let unhealthy_at = eventually(30, "/healthz to report unhealthy", || async {
        healthz.first(down_at, |s| s != Some(200))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    let acked_in_outage = steady.acked() - acked_before;
    pg.start();
    let up_at = Instant::now();
    let healthy_at = eventually(60, "/healthz to recover by itself", || async {
        healthz.first(up_at, |s| s == Some(200))
    })
    .await;
    let acked_at_recovery = steady.acked();
    eventually(60, "the load to be acknowledged again", || async {
        (steady.acked() >= acked_at_recovery + 40).then_some(())
    })
    .await;
    let recovered_at = Instant::now();
    let refused = steady.refused.load(Ordering::Relaxed);
    let unanswered = steady.unanswered.load(Ordering::Relaxed);
    let (acked, never) = steady.stop().await;
    let outage_samples = healthz.between(unhealthy_at, healthy_at);
    healthz.stop().await;

    // While PostgreSQL was away the health endpoint answered 503 at once, every time.
    let no_answer = outage_samples.iter().filter(|s| s.is_none()).count();
    assert_eq!(
        no_answer,
        0,
        "/healthz did not answer within 2 s {no_answer} times while PostgreSQL was down \
         ({} samples: {outage_samples:?})",
        outage_samples.len()
    );
    assert!(
        outage_samples
            .iter()
            .filter(|s| **s != Some(200))
            .all(|s| *s == Some(503)),
        "{outage_samples:?}"
    );
    assert!(never.is_empty(), "never acknowledged: {never:?}");
    // Every heartbeat sent meanwhile got its 503 before the sender's 10 s timeout, so
    // agents learn the control plane is there but its database is not, and retry.
    assert!(
        refused > 0,
        "no heartbeat was refused while PostgreSQL was down"
    );
    assert_eq!(
        unanswered, 0,
        "heartbeats got no answer within 10 s while PostgreSQL was down"
    );

    // Nothing acknowledged is lost; nothing is stored twice.
    let pool = PgPool::connect(&db_url).await.expect("connect");
    let rows = stored(&pool).await;
    let stored_ids: HashSet<&String> = rows.iter().map(|r| &r.msg_id).collect();
    let lost: Vec<&String> = acked.iter().filter(|id| !stored_ids.contains(id)).collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    assert_eq!(stored_ids.len(), rows.len(), "a heartbeat was stored twice");
    let ledger = agent.drain_and_stop(60).await;
    let rows = stored(&pool).await;
    let agent_ids = ids_of(&rows, "pg-agent");
    ledger.assert_exactly_once("pg-agent", &agent_ids);
    pool.close().await;

    println!(
        "FAULT pg-restart: {} heartbeats acknowledged to the load generator, all stored; \
         {acked_in_outage} answered 2xx while PostgreSQL was down; \
         {refused} attempts answered 503 and retried, {unanswered} unanswered; /healthz unhealthy {:.1} s after the \
         stop, healthy again {:.1} s after PostgreSQL was back (unhealthy for {:.1} s in all, \
         {} samples, all 503); load acknowledged again {:.1} s after PostgreSQL was back; \
         agent: {} queued, {} stored once, in order",
        acked.len(),
        (unhealthy_at - down_at).as_secs_f64(),
        (healthy_at - up_at).as_secs_f64(),
        (healthy_at - unhealthy_at).as_secs_f64(),
        outage_samples.len(),
        (recovered_at - up_at).as_secs_f64(),
        ledger.pushed,
        agent_ids.len(),
    );
    let _ = server.0.kill();
    let _ = server.0.wait();
    drop(pg);
    let _ = std::fs::remove_dir_all(&root);
}

// ---------------------------------------------------------------------------------------
// 3. Cut the network between agent and control plane
// ---------------------------------------------------------------------------------------

/// A TCP proxy that can be cut: while cut, it forwards nothing in either direction and
/// answers nothing (connections are accepted and held silent, like packets into a black
/// hole), so the agent sees timeouts, not refusals. It can also lose answers: the request
/// reaches the control plane, which applies it, and the connection drops before the answer.
struct Proxy {
    port: u16,
    cut: watch::Sender<bool>,
    /// Bumped to close every open connection (the client must open new ones).
    reset: watch::Sender<u64>,
    lose_answers: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let (cut, watching) = watch::channel(false);
        let (reset, resets) = watch::channel(0u64);
        let lose_answers = Arc::new(AtomicUsize::new(0));
        let lose = lose_answers.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let lossy = lose
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                tokio::spawn(Self::relay(
                    client,
                    upstream,
                    (watching.clone(), resets.clone()),
                    lossy,
                ));
            }
        });
        Self {
            port,
            cut,
            reset,
            lose_answers,
            task,
        }
    }

    async fn relay(
        mut client: TcpStream,
        upstream: u16,
        (mut cut, mut reset): (watch::Receiver<bool>, watch::Receiver<u64>),
        lossy: bool,
    ) {
        reset.mark_unchanged();
        if !*cut.borrow() {
            let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                return;
            };
            if lossy {
                // Forward the request; once the answer starts, drop both ends unanswered.
                let (mut from_client, _) = client.split();
                let (mut from_server, mut to_server) = server.split();
                let mut answer = [0u8; 1];
                tokio::select! {
                    _ = tokio::io::copy(&mut from_client, &mut to_server) => {}
                    _ = tokio::io::AsyncReadExt::read(&mut from_server, &mut answer) => {}
                }
                return;
            }
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
                _ = reset.changed() => return,
                _ = cut.wait_for(|c| *c) => {}
            }
        }
        // Cut: hold the connection without a byte until the network is back, then drop it.
        let _ = cut.wait_for(|c| !*c).await;
        drop(client);
    }

    fn set_cut(&self, cut: bool) {
        let _ = self.cut.send(cut);
    }

    /// The next `n` connections lose their first answer; open connections are closed, so
    /// the client opens new ones.
    fn lose_answers(&self, n: usize) {
        self.lose_answers.store(n, Ordering::SeqCst);
        self.reset.send_modify(|r| *r += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_network_cut_agent_buffers_reconnects_and_delivers_in_order() {
    const SEND_TIMEOUT: Duration = Duration::from_secs(2);
    const BACKOFF_MAX: Duration = Duration::from_secs(2);
    let mut plane = Plane::new("netcut").await;
    plane.start().await;
    let (root, url, pool) = (plane.root.clone(), plane.url.clone(), plane.db.pool.clone());
    let proxy = Proxy::start(plane.port).await;
    let via_proxy = format!("http://127.0.0.1:{}", proxy.port);
    let agent = AgentProc::start(
        &root,
        "netcut-agent",
        &via_proxy,
        &[("SEND_TIMEOUT_MS", "2000"), ("SEND_BACKOFF_MAX", "2")],
    );
    let count = || async { ids_of(&stored(&pool).await, "netcut-agent").len() };
    eventually(60, "heartbeats through the proxy", || async {
        (count().await >= 3).then_some(())
    })
    .await;

    // Cut for at least three send timeouts and until ten heartbeats wait.
    let failures_before = agent.metric("fleet_agent_send_failures_total").await;
    proxy.set_cut(true);
    let cut_at = Instant::now();
    let stored_at_cut = count().await;
    eventually(60, "heartbeats to queue up during the cut", || async {
        let queued = agent.metric("fleet_agent_outbox_messages").await;
        (queued >= 10.0 && cut_at.elapsed() >= 3 * SEND_TIMEOUT).then_some(())
    })
    .await;
    let failures = agent.metric("fleet_agent_send_failures_total").await - failures_before;
    assert!(failures >= 1.0, "no send timed out during the cut");
    let queued_at_heal = agent.metric("fleet_agent_outbox_messages").await;
    // Heartbeats stored during the cut were on their way before it (answer lost at most).
    let stored_at_heal = count().await;
    assert!(
        stored_at_heal <= stored_at_cut + 1,
        "the cut let heartbeats through"
    );
    proxy.set_cut(false);
    let healed_at = Instant::now();
    let cut_for = healed_at - cut_at;

    // Back within one send timeout plus one backoff (plus a slow machine's slack).
    let first_delivery = eventually(60, "the first delivery after the cut", || async {
        (count().await > stored_at_heal).then(|| healed_at.elapsed())
    })
    .await;
    assert!(
        first_delivery <= SEND_TIMEOUT + BACKOFF_MAX + Duration::from_secs(5),
        "reconnected only after {first_delivery:?}"
    );
    let drained = eventually(60, "the outbox to drain", || async {
        (agent.metric("fleet_agent_outbox_messages").await == 0.0).then(|| healed_at.elapsed())
    })
    .await;
    // The cut is one outage in the agent's log: one warning, not one per failed attempt,
    // and a line when it is over.
    assert!(
        failures >= 2.0,
        "only {failures} attempts failed during the cut"
    );
    let log = agent.log();
    let warnings = log
        .lines()
        .filter(|line| line.contains("WARN") && line.contains("control plane unreachable"))
        .count();
    assert_eq!(warnings, 1, "{log}");
    assert!(
        log.lines()
            .any(|line| line.contains("INFO") && line.contains("control plane reachable again")),
        "{log}"
    );

    // Answers lost: three requests reach the control plane and are applied, their answers
    // never come back. The agent retries at once; each retry must be taken as a duplicate,
    // not refused as a replay (which would look like a wrong secret).
    const LOST: usize = 3;
    let duplicates_before = server_metric(&url, "fleet_heartbeats_duplicate_total").await;
    let failures_before = agent.metric("fleet_agent_send_failures_total").await;
    proxy.lose_answers(LOST);
    eventually(60, "the lost answers to be retried", || async {
        let failures = agent.metric("fleet_agent_send_failures_total").await;
        (proxy.lose_answers.load(Ordering::SeqCst) == 0
            && failures >= failures_before + LOST as f64)
            .then_some(())
    })
    .await;
    let retried_at = Instant::now();
    let stored_after_losses = count().await;
    eventually(60, "deliveries after the lost answers", || async {
        (count().await >= stored_after_losses + 5).then_some(())
    })
    .await;
    let duplicates =
        server_metric(&url, "fleet_heartbeats_duplicate_total").await - duplicates_before;
    let replays = server_metric(&url, "fleet_heartbeats_rejected_total{reason=\"replay\"}").await;
    assert!(
        duplicates >= 1.0,
        "no lost answer was retried as a duplicate"
    );
    assert_eq!(replays, 0.0, "a retry was refused as a replay");
    let unauthorized = agent.metric("fleet_agent_unauthorized_total").await;
    assert_eq!(
        unauthorized, 0.0,
        "a retry after a lost answer was refused as a replay"
    );
    let after_losses = retried_at.elapsed();

    let ledger = agent.drain_and_stop(60).await;
    let ids = ids_of(&stored(&pool).await, "netcut-agent");
    ledger.assert_exactly_once("netcut-agent", &ids);

    println!(
        "FAULT netcut (lost answers): {LOST} answers lost after the control plane applied \
         the heartbeat; retried at once: {duplicates} acknowledged as duplicates, 0 refused \
         as replays; 5 more delivered {:.2} s later",
        after_losses.as_secs_f64()
    );
    println!(
        "FAULT netcut: cut for {:.1} s; {failures} sends timed out or failed; {queued_at_heal} \
         heartbeats waiting at the heal; first delivery {:.2} s after the heal (bound: send \
         timeout {} s + backoff max {} s); outbox empty {:.2} s after the heal; {} queued in \
         all, {} stored once, in order",
        cut_for.as_secs_f64(),
        first_delivery.as_secs_f64(),
        SEND_TIMEOUT.as_secs(),
        BACKOFF_MAX.as_secs(),
        drained.as_secs_f64(),
        ledger.pushed,
        ids.len(),
    );
    drop(proxy);
    plane.finish().await;
}

// ---------------------------------------------------------------------------------------
// 4. Fill the outbox past BUFFER_MAX_SIZE
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_outbox_past_its_bound_stays_bounded_and_reports_drops() {
    const BOUND: f64 = 5.0;
    let mut plane = Plane::new("bound").await;
    let (root, url, pool) = (plane.root.clone(), plane.url.clone(), plane.db.pool.clone());
    // No control plane yet: every heartbeat stays in the outbox.
    let agent = AgentProc::start(
        &root,
        "bound-agent",
        &url,
        &[("BUFFER_MAX_SIZE", "5"), ("HEARTBEAT_INTERVAL", "0.1")],
    );
    let largest = std::cell::Cell::new(0.0f64);
    let made = eventually(60, "40 heartbeats made", || async {
        let queued = agent.metric("fleet_agent_outbox_messages").await;
        largest.set(largest.get().max(queued));
        let made = agent.metric("fleet_agent_heartbeats_total").await;
        (made >= 40.0).then_some(made)
    })
    .await;
    let largest = largest.get();
    assert!(largest <= BOUND, "the outbox held {largest} > {BOUND}");
    let dropped = agent.metric("fleet_agent_outbox_dropped_total").await;
    assert!(
        dropped >= made - BOUND - 1.0,
        "{made} made, {dropped} dropped"
    );

    // The control plane comes up; what reaches it says how many were dropped.
    plane.start().await;
    let ledger = agent.drain_and_stop(60).await;
    let rows = stored(&pool).await;
    let ids = ids_of(&rows, "bound-agent");
    ledger.assert_exactly_once("bound-agent", &ids);
    let reported: u64 = rows
        .iter()
        .filter(|r| r.instance == "bound-agent")
        .filter_map(|r| r.figures["outbox_dropped"].as_u64())
        .sum();
    // A heartbeat still waiting when the agent stopped reports its drops once delivered
    // (one delivered but not yet acknowledged is stored, and counted above already).
    let carried: usize = ledger
        .dropped_carried_by_waiting
        .iter()
        .filter(|(id, _)| !ids.contains(id))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(
        reported as usize + ledger.dropped_unreported + carried,
        ledger.dropped,
        "every drop is reported to the control plane exactly once, or is still on its way"
    );
    println!(
        "FAULT bound: BUFFER_MAX_SIZE=5; {made} heartbeats made while the control plane was \
         away; the outbox never held more than {largest}; {} dropped (oldest first), {reported} \
         of them reported in stored heartbeats' outbox_dropped, {} still to report; {} queued \
         in all, {} stored once, in order",
        ledger.dropped,
        ledger.dropped_unreported + carried,
        ledger.pushed,
        ids.len(),
    );
    plane.finish().await;
}

// ---------------------------------------------------------------------------------------
// 5. A pipeline step that hangs, forks children and ignores SIGTERM
// ---------------------------------------------------------------------------------------

fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

/// Whether `pid` is gone (or a zombie nobody reaped yet: it runs no more code).
fn dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // Format: `pid (comm) state ...`; comm may hold spaces, so look after the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_hanging_step_is_killed_with_its_process_group_and_rolled_back() {
    const TIMEOUT_SECS: u64 = 3;
    let root = temp_dir("fault-hang");
    let server = rollout::start_server(&root);
    rollout::wait_healthy(&server.url).await;
    let api = Api {
        client: reqwest::Client::new(),
        url: server.url.clone(),
    };
    let mut instance = Instance::new(&root, "hang-1");
    // The step ignores SIGTERM, starts a child and a grandchild that ignore it too, writes
    // every pid, and waits forever.
    let migrate = "date +%s.%N > step.started; trap '' TERM; echo $$ > step.pids; \
                   sh -c 'trap \"\" TERM; sleep 600' & echo $! >> step.pids; \
                   ( trap '' TERM; sleep 600 & echo $! >> step.pids; wait ) & \
                   echo $! >> step.pids; wait";
    instance.start_agent_with(
        &server.url,
        migrate,
        &[("UPDATE_STEP_TIMEOUT_SEC", &TIMEOUT_SECS.to_string())],
    );
    api.wait_installations(1).await;
    let release = api.publish("2.0.0").await;
    let (status, created) = api
        .call(
            "POST",
            "/api/rollouts",
            rollout::ADMIN,
            Some(&json!({"release_id": release, "channel": "stable", "batch_size": 1})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_i64().expect("id");
    let pid_file = instance.dir.join("step.pids");
    let pids: Vec<u32> = eventually(60, "the step and its children to start", || async {
        let text = std::fs::read_to_string(&pid_file).unwrap_or_default();
        let pids: Vec<u32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        (pids.len() >= 4).then_some(pids)
    })
    .await;
    assert!(
        pids.iter().all(|&p| !dead(p)),
        "the step's processes run: {pids:?}"
    );
    // The step ignores SIGTERM: had it died of this one, its error would not be a timeout.
    let _ = Command::new("kill")
        .args(["-TERM", &pids[0].to_string()])
        .status();

    let all_dead = eventually(
        TIMEOUT_SECS + 60,
        "every process of the step to die",
        || {
            let pids = &pids;
            async move { pids.iter().all(|&p| dead(p)).then(unix_seconds) }
        },
    )
    .await;
    let step_started: f64 = std::fs::read_to_string(instance.dir.join("step.started"))
        .expect("step start time")
        .trim()
        .parse()
        .expect("seconds");
    let dead_after = all_dead - step_started;
    let ended = api
        .wait_rollout(id, 60, "the job ended", |r| {
            rollout::job(r, "hang-1")["status"] != "in_progress"
        })
        .await;
    let job = rollout::job(&ended, "hang-1");
    assert_eq!(job["status"], "rolled_back", "{ended:#}");
    assert_eq!(job["step"], "migrate", "{ended:#}");
    assert!(
        job["error"]
            .as_str()
            .is_some_and(|e| e.contains("timed out")),
        "{job}"
    );
    assert_eq!(
        std::fs::read_to_string(instance.dir.join("rolled-back"))
            .unwrap_or_default()
            .trim(),
        "migrate",
        "the rollback ran after the migrate step"
    );
    assert_eq!(instance.version_on_disk(), "1.0.0");
    assert_eq!(instance.version_served().await, "1.0.0");
    println!(
        "FAULT hang: step timeout {TIMEOUT_SECS} s; {} processes (step, child, subshell, \
         grandchild: pids {pids:?}) all dead {dead_after:.2} s after the step started \
         ({:.2} s past the timeout, polled every 0.1 s); SIGTERM ignored; job rolled_back \
         at step migrate, rollback ran, version 1.0.0 on disk and served",
        pids.len(),
        dead_after - TIMEOUT_SECS as f64,
    );
    if let Some(agent) = instance.agent.as_mut() {
        sigterm_and_wait(agent).await;
    }
    drop(instance);
    drop(server);
    let _ = std::fs::remove_dir_all(&root);
}
