//! The acceptance tests of rollouts: a real `fleet-server` and real `fleet-agent` processes,
//! real step scripts that change a version file and restart a small HTTP service (busybox
//! httpd), a smoke failure that rolls back and halts the rollout, and an agent SIGKILLed in
//! the middle of its migrate step.
//!
//! The server binary is looked up beside the agent binary (`cargo build` builds both; so
//! does the workspace test command).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fleet_core::manifest::{PrivateKey, ReleaseManifest};
use serde_json::{Value, json};

use crate::{Guard, free_port, temp_dir, wait_until};

pub(crate) const ADMIN: &str = "e2e-admin-token";
pub(crate) const OPS: &str = "e2e-ops-token";
pub(crate) const AGENT_SECRET: &str = "e2e-rollout-shared-secret";

pub(crate) fn release_key() -> PrivateKey {
    PrivateKey::from_seed([42; 32])
}

pub(crate) fn server_binary() -> PathBuf {
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_fleet-agent"));
    let server = agent.with_file_name("fleet-server");
    assert!(
        server.exists(),
        "{} is missing: build it first with `cargo build -p fleet-server` (the workspace test \
         command builds it)",
        server.display()
    );
    server
}

/// A running `fleet-server serve` on a free port with its own SQLite file.
pub(crate) struct Server {
    guard: Guard,
    pub(crate) url: String,
    db: PathBuf,
}

pub(crate) fn start_server(dir: &Path) -> Server {
    start_server_trusting(dir, &[release_key().public_key().to_base64()])
}

fn start_server_trusting(dir: &Path, keys: &[String]) -> Server {
    let port = free_port();
    let db = dir.join("fleet.db");
    let log = std::fs::File::create(dir.join("server.log")).expect("log");
    let child = Command::new(server_binary())
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("FLEET_LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "CONTROL_PLANE_DATABASE_URL",
            format!("sqlite://{}", db.display()),
        )
        .env("CONTROL_PLANE_ADMIN_TOKEN", ADMIN)
        .env("CONTROL_PLANE_OPS_TOKEN", OPS)
        .env("CONTROL_PLANE_AGENT_TOKEN", AGENT_SECRET)
        .env("CONTROL_PLANE_RELEASE_PUBLIC_KEYS", keys.join(","))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start fleet-server");
    Server {
        guard: Guard(child),
        url: format!("http://127.0.0.1:{port}"),
        db,
    }
}

pub(crate) async fn wait_healthy(url: &str) {
    let client = reqwest::Client::new();
    for _ in 0..200 {
        if let Ok(r) = client.get(format!("{url}/healthz")).send().await
            && r.status().is_success()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("fleet-server did not become healthy at {url}");
}

/// One instance: its folder, the HTTP service's port, and the agent.
pub(crate) struct Instance {
    pub(crate) id: String,
    pub(crate) dir: PathBuf,
    port: u16,
    pub(crate) agent: Option<Guard>,
}

const RESTART: &str = r#"#!/bin/sh
# Restarts the instance's small HTTP service on the current version.
if [ -f service.pid ]; then kill "$(cat service.pid)" 2>/dev/null; sleep 0.2; fi
busybox httpd -f -p "127.0.0.1:$SERVICE_PORT" -h current >/dev/null 2>&1 </dev/null &
echo $! > service.pid
"#;

impl Instance {
    pub(crate) fn new(root: &Path, id: &str) -> Self {
        let dir = root.join(id);
        std::fs::create_dir_all(dir.join("current")).expect("dir");
        std::fs::write(dir.join("current/VERSION"), "1.0.0").expect("version");
        std::fs::write(dir.join("restart.sh"), RESTART).expect("script");
        let port = free_port();
        let me = Self {
            id: id.to_owned(),
            dir,
            port,
            agent: None,
        };
        let status = Command::new("sh")
            .arg("restart.sh")
            .current_dir(&me.dir)
            .env("SERVICE_PORT", port.to_string())
            .status()
            .expect("start the service");
        assert!(status.success());
        me
    }

    pub(crate) fn version_on_disk(&self) -> String {
        std::fs::read_to_string(self.dir.join("current/VERSION")).unwrap_or_default()
    }

    pub(crate) async fn version_served(&self) -> String {
        for _ in 0..40 {
            if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{}/VERSION", self.port)).await
                && r.status().is_success()
            {
                return r.text().await.unwrap_or_default();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        String::new()
    }

    fn env(&self, server: &str, migrate: &str) -> Vec<(String, String)> {
        let workdir = self.dir.display().to_string();
        [
            ("INSTANCE_ID", self.id.clone()),
            ("CONTROL_PLANE_URL", server.to_owned()),
            ("AGENT_SECRET", AGENT_SECRET.to_owned()),
            ("HEARTBEAT_INTERVAL", "1".to_owned()),
            ("AGENT_PORT", "0".to_owned()),
            ("AGENT_STATE_PATH", format!("{workdir}/agent-state.db")),
            ("RELEASE_CHANNEL", "stable".to_owned()),
            ("INSTANCE_VERSION", "1.0.0".to_owned()),
            ("AGENT_METRICS_URL", "off".to_owned()),
            ("CONTAINERS_INTERVAL", "0".to_owned()),
            ("PLUGIN_UPDATE_ENABLED", "false".to_owned()),
            ("UPDATE_POLL_SEC", "1".to_owned()),
            ("UPDATE_STEP_TIMEOUT_SEC", "60".to_owned()),
            ("UPDATE_WORKDIR", workdir),
            (
                "UPDATE_MANIFEST_PUBLIC_KEYS",
                release_key().public_key().to_base64(),
            ),
            ("SERVICE_PORT", self.port.to_string()),
            ("UPDATE_BACKUP_CMD", "cp current/VERSION backup.VERSION".to_owned()),
            (
                "UPDATE_PULL_CMD",
                "mkdir -p staged && printf %s \"$UPDATE_VERSION\" > staged/VERSION".to_owned(),
            ),
            ("UPDATE_MIGRATE_CMD", migrate.to_owned()),
            ("UPDATE_SMOKE_CMD", "test ! -e fail-smoke || { echo smoke failed >&2; exit 1; }".to_owned()),
            ("UPDATE_SWITCH_CMD", "cp staged/VERSION current/VERSION && sh restart.sh".to_owned()),
            (
                "UPDATE_HEALTHCHECK_URL",
                format!("http://127.0.0.1:{}/VERSION", self.port),
            ),
            (
                "UPDATE_ROLLBACK_CMD",
                "cp backup.VERSION current/VERSION && sh restart.sh && echo \"$UPDATE_FAILED_STEP\" >> rolled-back".to_owned(),
            ),
            ("RUST_LOG", "info".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    fn start_agent(&mut self, server: &str, migrate: &str) {
        self.start_agent_with(server, migrate, &[]);
    }

    pub(crate) fn start_agent_with(&mut self, server: &str, migrate: &str, extra: &[(&str, &str)]) {
        let log = std::fs::File::create(
            self.dir
                .join(format!("agent-{}.log", uuid::Uuid::new_v4().simple())),
        )
        .expect("log");
        let child: Child = Command::new(env!("CARGO_BIN_EXE_fleet-agent"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env(server, migrate))
            .envs(extra.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start fleet-agent");
        self.agent = Some(Guard(child));
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // Stop the HTTP service this test started (by its pid).
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("service.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}

pub(crate) struct Api {
    pub(crate) client: reqwest::Client,
    pub(crate) url: String,
}

impl Api {
    pub(crate) async fn call(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let url = format!("{}{path}", self.url);
        let mut request = match method {
            "GET" => self.client.get(url),
            _ => self.client.post(url),
        }
        .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub(crate) async fn rollout(&self, id: i64) -> Value {
        self.call("GET", &format!("/api/rollouts/{id}"), OPS, None)
            .await
            .1
    }

    /// Waits until the rollout satisfies `cond`, up to `secs`.
    pub(crate) async fn wait_rollout(
        &self,
        id: i64,
        secs: u64,
        what: &str,
        cond: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let rollout = self.rollout(id).await;
            if cond(&rollout) {
                return rollout;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("rollout never reached: {what}\n{rollout:#}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub(crate) async fn wait_installations(&self, n: usize) {
        for _ in 0..200 {
            let (_, page) = self.call("GET", "/api/installations", OPS, None).await;
            if page["items"].as_array().is_some_and(|i| i.len() >= n) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the agents never reported in");
    }

    pub(crate) async fn publish(&self, version: &str) -> i64 {
        self.publish_with(version, &release_key()).await
    }

    async fn publish_with(&self, version: &str, key: &PrivateKey) -> i64 {
        let manifest = ReleaseManifest {
            version: version.into(),
            sha: "0123abcd".into(),
            channel: "stable".into(),
            migrations_required: true,
            breaking_changes: false,
            released_at: "2026-11-20T10:00:00Z".into(),
            artifacts: None,
        };
        let value = serde_json::to_value(&manifest).expect("json");
        // Bad input first: unsigned and tampered manifests are refused.
        let (status, _) = self
            .call("POST", "/api/releases", ADMIN, Some(&value))
            .await;
        assert_eq!(status, 422, "unsigned manifest");
        let signed = key.sign_value(&value).expect("sign");
        let mut tampered = signed.clone();
        tampered["sha"] = "evil".into();
        let (status, error) = self
            .call("POST", "/api/releases", ADMIN, Some(&tampered))
            .await;
        assert_eq!(status, 422, "tampered manifest: {error}");
        let (status, release) = self
            .call("POST", "/api/releases", ADMIN, Some(&signed))
            .await;
        assert_eq!(status, 201, "{release}");
        release["id"].as_i64().expect("release id")
    }
}

pub(crate) fn job<'a>(rollout: &'a Value, instance: &str) -> &'a Value {
    rollout["jobs"]
        .as_array()
        .and_then(|jobs| jobs.iter().find(|j| j["instance_id"] == instance))
        .unwrap_or(&Value::Null)
}

fn batch_ended(rollout: &Value, batch: usize) -> bool {
    let b = &rollout["batches"][batch];
    b["pending"] == 0 && b["in_progress"] == 0 && b["queued"] == 0
}

#[tokio::test]
async fn six_agents_batch_two_smoke_failure_rolls_back_halts_and_resume_completes() {
    let root = temp_dir("rollout-six");
    let server = start_server(&root);
    wait_healthy(&server.url).await;
    let api = Api {
        client: reqwest::Client::new(),
        url: server.url.clone(),
    };
    let mut instances: Vec<Instance> = (1..=6)
        .map(|i| Instance::new(&root, &format!("shop-{i}")))
        .collect();
    for instance in &mut instances {
        instance.start_agent(&server.url, "echo migrating to \"$UPDATE_VERSION\"");
    }
    api.wait_installations(6).await;
    let release = api.publish("2.0.0").await;
    // The fourth instance (second in batch 2) will fail its smoke test.
    std::fs::write(instances[3].dir.join("fail-smoke"), "").expect("marker");
    let (status, rollout) = api
        .call(
            "POST",
            "/api/rollouts",
            ADMIN,
            Some(
                &json!({"release_id": release, "channel": "stable", "batch_size": 2,
                         "failure_threshold": 0}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{rollout}");
    let id = rollout["id"].as_i64().expect("id");
    assert_eq!(rollout["batch_count"], 3);
    let advance = format!("/api/rollouts/{id}/advance");
    let (status, _) = api.call("POST", &advance, ADMIN, None).await;
    assert_eq!(status, 409, "advance during a running batch");

    // Batch 1 succeeds: the new version is on disk and served.
    let after_first = api
        .wait_rollout(id, 60, "batch 1 ended", |r| batch_ended(r, 0))
        .await;
    for instance in &instances[..2] {
        assert_eq!(
            job(&after_first, &instance.id)["status"],
            "succeeded",
            "{after_first:#}"
        );
        assert_eq!(instance.version_on_disk(), "2.0.0");
        assert_eq!(instance.version_served().await, "2.0.0");
    }
    for instance in &instances[2..] {
        assert_eq!(instance.version_on_disk(), "1.0.0");
    }

    // Batch 2: shop-4's smoke fails, its rollback runs, and the rollout halts.
    let (status, _) = api.call("POST", &advance, ADMIN, None).await;
    assert_eq!(status, 200);
    let halted = api
        .wait_rollout(id, 60, "halted with batch 2 ended", |r| {
            r["status"] == "halted" && batch_ended(r, 1)
        })
        .await;
    assert_eq!(job(&halted, "shop-3")["status"], "succeeded");
    assert_eq!(
        job(&halted, "shop-4")["status"],
        "rolled_back",
        "{halted:#}"
    );
    assert_eq!(job(&halted, "shop-4")["step"], "smoke");
    assert!(
        halted["halt_reason"]
            .as_str()
            .is_some_and(|r| r.contains("batch 2"))
    );
    assert_eq!(instances[2].version_on_disk(), "2.0.0");
    assert_eq!(instances[3].version_on_disk(), "1.0.0");
    assert_eq!(instances[3].version_served().await, "1.0.0");
    assert_eq!(
        std::fs::read_to_string(instances[3].dir.join("rolled-back"))
            .unwrap_or_default()
            .trim(),
        "smoke",
        "the rollback ran after the smoke step"
    );
    // Batch 3 is not touched while halted, however often its agents ask.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = api.rollout(id).await;
    assert_eq!(still["status"], "halted");
    assert_eq!(still["batches"][2]["queued"], 2, "{still:#}");
    for instance in &instances[4..] {
        assert_eq!(instance.version_on_disk(), "1.0.0");
        assert!(!instance.dir.join("staged").exists(), "batch 3 was touched");
    }
    let (status, _) = api.call("POST", &advance, ADMIN, None).await;
    assert_eq!(status, 409, "advance while halted");

    // Resume (ops), advance (admin): the rest completes.
    let (status, _) = api
        .call("POST", &format!("/api/rollouts/{id}/resume"), OPS, None)
        .await;
    assert_eq!(status, 200);
    let (status, _) = api.call("POST", &advance, ADMIN, None).await;
    assert_eq!(status, 200);
    let done = api
        .wait_rollout(id, 60, "completed", |r| r["status"] == "completed")
        .await;
    assert_eq!(done["batches"][2]["succeeded"], 2, "{done:#}");
    let on_disk: Vec<String> = instances.iter().map(Instance::version_on_disk).collect();
    assert_eq!(
        on_disk,
        ["2.0.0", "2.0.0", "2.0.0", "1.0.0", "2.0.0", "2.0.0"]
    );
    for instance in &instances[4..] {
        assert_eq!(instance.version_served().await, "2.0.0");
    }
    // The agents report the version they now run.
    let mut versions = Vec::new();
    for _ in 0..50 {
        let (_, page) = api.call("GET", "/api/installations", OPS, None).await;
        versions = page["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .map(|i| i["version"].as_str().unwrap_or("").to_owned())
                    .collect()
            })
            .unwrap_or_default();
        if versions == ["2.0.0", "2.0.0", "2.0.0", "1.0.0", "2.0.0", "2.0.0"] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        versions,
        ["2.0.0", "2.0.0", "2.0.0", "1.0.0", "2.0.0", "2.0.0"]
    );

    // An unknown report status is refused with 422, even when properly signed.
    let body =
        serde_json::to_vec(&json!({"instance_id": "shop-1", "job_id": "1", "status": "exploded"}))
            .expect("json");
    let signer = fleet_core::Signer::new(fleet_core::Secret::new(AGENT_SECRET).expect("secret"));
    let mut request = api
        .client
        .post(format!("{}/api/updates/report", server.url))
        .body(body.clone());
    for (name, value) in signer
        .headers("msg_e2e_bad_status", fleet_core::unix_now(), &body)
        .pairs()
    {
        request = request.header(name, value);
    }
    assert_eq!(request.send().await.expect("send").status().as_u16(), 422);

    for instance in &mut instances {
        if let Some(agent) = instance.agent.as_mut() {
            crate::sigterm_and_wait(agent).await;
        }
    }
    drop(instances);
    drop(server);
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test]
async fn sigkill_during_migrate_ends_rolled_back_and_reported_once() {
    let root = temp_dir("rollout-sigkill");
    let server = start_server(&root);
    wait_healthy(&server.url).await;
    let api = Api {
        client: reqwest::Client::new(),
        url: server.url.clone(),
    };
    let mut instance = Instance::new(&root, "crashy-1");
    // The migrate step records each run and its process group, then takes its time.
    let migrate = "echo run >> migrate-runs; echo $$ > migrate.pgid; sleep 30";
    instance.start_agent(&server.url, migrate);
    api.wait_installations(1).await;
    let release = api.publish("2.0.0").await;
    let (status, rollout) = api
        .call(
            "POST",
            "/api/rollouts",
            ADMIN,
            Some(&json!({"release_id": release, "channel": "stable", "batch_size": 1})),
        )
        .await;
    assert_eq!(status, 201, "{rollout}");
    let id = rollout["id"].as_i64().expect("id");
    let pgid_file = instance.dir.join("migrate.pgid");
    assert!(
        wait_until(30, || pgid_file.exists()).await,
        "the migrate step never started"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = api.rollout(id).await;
    assert_eq!(job(&during, "crashy-1")["step"], "migrate", "{during:#}");
    // SIGKILL the agent mid-step; then end the orphaned step it started (its group).
    let mut agent = instance.agent.take().expect("agent");
    agent.0.kill().expect("SIGKILL");
    let _ = agent.0.wait();
    let pgid = std::fs::read_to_string(&pgid_file).expect("pgid");
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", pgid.trim())])
        .status();
    assert_eq!(
        job(&api.rollout(id).await, "crashy-1")["status"],
        "in_progress"
    );

    // After a restart the job ends rolled_back; the migrate step never runs again.
    instance.start_agent(&server.url, migrate);
    let ended = api
        .wait_rollout(id, 30, "the job ended", |r| {
            job(r, "crashy-1")["status"] != "in_progress"
        })
        .await;
    assert_eq!(
        job(&ended, "crashy-1")["status"],
        "rolled_back",
        "{ended:#}"
    );
    assert!(
        job(&ended, "crashy-1")["error"]
            .as_str()
            .is_some_and(|e| e.contains("migrate"))
    );
    assert_eq!(instance.version_on_disk(), "1.0.0");
    assert_eq!(instance.version_served().await, "1.0.0");
    // Another restart: nothing is re-run or re-reported.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut agent = instance.agent.take().expect("agent");
    crate::sigterm_and_wait(&mut agent).await;
    instance.start_agent(&server.url, migrate);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut agent = instance.agent.take().expect("agent");
    crate::sigterm_and_wait(&mut agent).await;
    let runs = std::fs::read_to_string(instance.dir.join("migrate-runs")).unwrap_or_default();
    assert_eq!(runs.lines().count(), 1, "migrate ran again");
    let rollbacks = std::fs::read_to_string(instance.dir.join("rolled-back")).unwrap_or_default();
    assert_eq!(
        rollbacks.lines().collect::<Vec<_>>(),
        ["migrate"],
        "one rollback"
    );

    // The control plane received exactly one final report.
    let Server { mut guard, db, .. } = server;
    let _ = guard.0.kill();
    let _ = guard.0.wait();
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
        .await
        .expect("open the server's database");
    let finals: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM rollout_job_events WHERE status IN ('succeeded', 'failed', 'rolled_back')",
    )
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!(finals, 1, "reported once");
    pool.close().await;
    drop(instance);
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test]
async fn the_agent_refuses_a_manifest_its_pinned_keys_do_not_verify() {
    let root = temp_dir("rollout-unpinned");
    // The control plane trusts a second key that this agent does not pin.
    let other = PrivateKey::from_seed([7; 32]);
    let server = start_server_trusting(
        &root,
        &[
            release_key().public_key().to_base64(),
            other.public_key().to_base64(),
        ],
    );
    wait_healthy(&server.url).await;
    let api = Api {
        client: reqwest::Client::new(),
        url: server.url.clone(),
    };
    let mut instance = Instance::new(&root, "careful-1");
    instance.start_agent(&server.url, "echo migrating");
    api.wait_installations(1).await;
    let release = api.publish_with("6.6.6", &other).await;
    let (status, rollout) = api
        .call(
            "POST",
            "/api/rollouts",
            ADMIN,
            Some(&json!({"release_id": release, "channel": "stable", "batch_size": 1})),
        )
        .await;
    assert_eq!(status, 201, "{rollout}");
    let id = rollout["id"].as_i64().expect("id");
    let ended = api
        .wait_rollout(id, 30, "the job ended", |r| {
            job(r, "careful-1")["status"] != "in_progress"
                && job(r, "careful-1")["status"] != "pending"
        })
        .await;
    let refused = job(&ended, "careful-1");
    assert_eq!(refused["status"], "failed", "{ended:#}");
    assert_eq!(refused["step"], "verify_manifest");
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("signature")),
        "{refused}"
    );
    assert!(!instance.dir.join("backup.VERSION").exists(), "no step ran");
    assert_eq!(instance.version_on_disk(), "1.0.0");
    let mut agent = instance.agent.take().expect("agent");
    crate::sigterm_and_wait(&mut agent).await;
    drop(instance);
    drop(server);
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test]
async fn plugin_jobs_run_quoted_and_restores_are_verified() {
    let root = temp_dir("plugins-restores");
    let server = start_server(&root);
    wait_healthy(&server.url).await;
    let api = Api {
        client: reqwest::Client::new(),
        url: server.url.clone(),
    };
    let mut instance = Instance::new(&root, "plug-1");
    let workdir = instance.dir.display().to_string();
    // A backup to verify: an installation that never reported one is passed over.
    let backup_meta = instance.dir.join("backup.json");
    std::fs::write(
        &backup_meta,
        json!({"lastBackupAt": "2026-12-01T03:00:00Z", "backupId": "b-7", "checksum": "sha256-b7",
               "sizeBytes": 1024, "status": "ok"})
        .to_string(),
    )
    .expect("backup metadata");
    let backup_meta = backup_meta.display().to_string();
    instance.start_agent_with(
        &server.url,
        "true",
        &[
            ("PLUGIN_UPDATE_ENABLED", "true"),
            ("PLUGIN_POLL_SEC", "1"),
            ("PLUGIN_WORKDIR", &workdir),
            (
                "PLUGIN_INSTALL_CMD",
                "printf '%s|%s|%s|%s\\n' {{name}} {{version}} {{action}} \"$PLUGIN_NAME\" >> plugins.log",
            ),
            ("PLUGIN_UPDATE_CMD", "printf 'update %s\\n' {{version}} >> plugins.log"),
            ("PLUGIN_SMOKE_CMD", "test -s plugins.log"),
            ("RESTORE_POLL_SEC", "1"),
            ("RESTORE_WORKDIR", &workdir),
            ("BACKUP_META_PATH", &backup_meta),
            (
                "RESTORE_VERIFY_CMD",
                "test \"$RESTORE_ENVIRONMENT\" = staging && echo restored \"$RESTORE_ID\"",
            ),
        ],
    );
    api.wait_installations(1).await;
    let (status, release) = api
        .call(
            "POST",
            "/api/plugins/releases",
            ADMIN,
            Some(&json!({"name": "@acme/report", "version": "1.2.0"})),
        )
        .await;
    assert_eq!(status, 201, "{release}");
    // The instance asks (signed), an admin approves, the agent installs.
    let body = serde_json::to_vec(&json!({"instance_id": "plug-1", "name": "@acme/report",
        "version": "1.2.0", "action": "install", "reason": "reports"}))
    .expect("json");
    let signer = fleet_core::Signer::new(fleet_core::Secret::new(AGENT_SECRET).expect("secret"));
    let mut request = api
        .client
        .post(format!("{}/api/plugins/requests", server.url))
        .body(body.clone());
    for (name, value) in signer
        .headers("msg_plugin_request", fleet_core::unix_now(), &body)
        .pairs()
    {
        request = request.header(name, value);
    }
    let response = request.send().await.expect("send");
    assert_eq!(response.status().as_u16(), 201);
    let created: Value = response.json().await.expect("json");
    let (status, approved) = api
        .call(
            "POST",
            &format!("/api/plugins/requests/{}/approve", created["id"]),
            ADMIN,
            None,
        )
        .await;
    assert_eq!(status, 200, "{approved}");
    let log = instance.dir.join("plugins.log");
    assert!(
        wait_until(30, || std::fs::read_to_string(&log)
            .is_ok_and(|l| l.lines().count() == 1))
        .await,
        "the install never ran"
    );
    assert_eq!(
        std::fs::read_to_string(&log).expect("log"),
        "@acme/report|1.2.0|install|@acme/report\n"
    );
    // A plugin rollout carries `update` to the instance.
    let (status, rollout) = api
        .call(
            "POST",
            "/api/plugins/rollouts",
            ADMIN,
            Some(
                &json!({"plugin_release_id": release["id"], "action": "update",
                         "channel": "stable", "batch_size": 1}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{rollout}");
    let done = api
        .wait_rollout(
            rollout["id"].as_i64().expect("id"),
            30,
            "plugin rollout completed",
            |r| r["status"] == "completed",
        )
        .await;
    assert_eq!(done["jobs"][0]["status"], "succeeded", "{done:#}");
    assert!(
        std::fs::read_to_string(&log)
            .expect("log")
            .ends_with("update 1.2.0\n")
    );

    // Restore verification: scheduled once the backup is known, run, reported verified.
    let mut installation = Value::Null;
    for _ in 0..100 {
        installation = api
            .call("GET", "/api/installations/plug-1", OPS, None)
            .await
            .1;
        if installation["backups"][0]["backup_id"] == "b-7" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        installation["backups"][0]["backup_id"], "b-7",
        "{installation:#}"
    );
    let (status, scheduled) = api
        .call(
            "POST",
            "/api/restores/schedule",
            OPS,
            Some(&json!({"count": 1})),
        )
        .await;
    assert_eq!(status, 201, "{scheduled}");
    let mut restores = Value::Null;
    for _ in 0..100 {
        restores = api.call("GET", "/api/restores", OPS, None).await.1;
        if restores["items"][0]["status"] == "verified" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(restores["items"][0]["status"], "verified", "{restores:#}");
    assert_eq!(restores["items"][0]["backup_id"], "b-7", "{restores:#}");
    assert!(
        restores["items"][0]["output_tail"]
            .as_str()
            .is_some_and(|t| t.contains("restored"))
    );
    let mut agent = instance.agent.take().expect("agent");
    crate::sigterm_and_wait(&mut agent).await;
    drop(instance);
    drop(server);
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test]
async fn a_failing_plugin_update_rolls_back_and_halts_its_rollout() {
    let root = temp_dir("plugin-rollback");
    let server = start_server(&root);
    wait_healthy(&server.url).await;
    let api = Api {
        client: reqwest::Client::new(),
        url: server.url.clone(),
    };
    let mut instance = Instance::new(&root, "plug-rb-1");
    let workdir = instance.dir.display().to_string();
    instance.start_agent_with(
        &server.url,
        "true",
        &[
            ("PLUGIN_UPDATE_ENABLED", "true"),
            ("PLUGIN_POLL_SEC", "1"),
            ("PLUGIN_WORKDIR", &workdir),
            (
                "PLUGIN_UPDATE_CMD",
                "echo {{version}} > plugin.version; echo the update broke >&2; exit 1",
            ),
            (
                "PLUGIN_ROLLBACK_CMD",
                "rm plugin.version && printf '%s|%s|%s\\n' \"$PLUGIN_FAILED_STEP\" \"$PLUGIN_ACTION\" {{version}} >> plugin-rollback",
            ),
        ],
    );
    api.wait_installations(1).await;
    let (status, release) = api
        .call(
            "POST",
            "/api/plugins/releases",
            ADMIN,
            Some(&json!({"name": "billing-export", "version": "2.1.0"})),
        )
        .await;
    assert_eq!(status, 201, "{release}");
    let (status, rollout) = api
        .call(
            "POST",
            "/api/plugins/rollouts",
            ADMIN,
            Some(
                &json!({"plugin_release_id": release["id"], "action": "update",
                         "channel": "stable", "batch_size": 1, "failure_threshold": 0}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{rollout}");
    let halted = api
        .wait_rollout(
            rollout["id"].as_i64().expect("id"),
            30,
            "plugin rollout halted",
            |r| r["status"] == "halted",
        )
        .await;
    let rolled_back = job(&halted, "plug-rb-1");
    assert_eq!(rolled_back["status"], "rolled_back", "{halted:#}");
    assert_eq!(rolled_back["step"], "update");
    assert!(
        rolled_back["error"]
            .as_str()
            .is_some_and(|e| e.contains("step update exited with status 1")),
        "{rolled_back}"
    );
    // The batch counts the rolled-back job as a failure, as for update rollouts.
    assert_eq!(halted["batches"][0]["rolled_back"], 1, "{halted:#}");
    assert!(
        halted["halt_reason"]
            .as_str()
            .is_some_and(|r| r.contains("batch 1")),
        "{halted:#}"
    );
    assert_eq!(
        std::fs::read_to_string(instance.dir.join("plugin-rollback")).unwrap_or_default(),
        "update|update|2.1.0\n"
    );
    assert!(!instance.dir.join("plugin.version").exists());
    let mut agent = instance.agent.take().expect("agent");
    crate::sigterm_and_wait(&mut agent).await;
    drop(instance);
    drop(server);
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test]
async fn blue_green_canary_shifts_traffic_and_rolls_back_on_an_slo_breach() {
    let root = temp_dir("rollout-canary");
    let server = start_server(&root);
    wait_healthy(&server.url).await;
    let api = Api {
        client: reqwest::Client::new(),
        url: server.url.clone(),
    };
    // Two instances; the second one's application reports 50% errors.
    let mut instances: Vec<Instance> = ["canary-1", "canary-2"]
        .iter()
        .map(|id| Instance::new(&root, id))
        .collect();
    let metrics = [
        "http_requests_total{status=\"200\"} 100\n",
        "http_requests_total{status=\"200\"} 50\nhttp_requests_total{status=\"500\"} 50\n",
    ];
    for (instance, text) in instances.iter_mut().zip(metrics) {
        std::fs::write(instance.dir.join("current/metrics"), text).expect("metrics");
        let metrics_url = format!("http://127.0.0.1:{}/metrics", instance.port);
        instance.start_agent_with(
            &server.url,
            "true",
            &[
                ("AGENT_METRICS_URL", &metrics_url),
                (
                    "UPDATE_GREEN_UP_CMD",
                    "cp -r current green && printf %s \"$UPDATE_VERSION\" > green/VERSION",
                ),
                ("UPDATE_MIGRATE_SAFE_CMD", "echo safe migration"),
                (
                    "UPDATE_PROXY_SHIFT_CMD",
                    "echo \"$UPDATE_CANARY_PERCENT\" >> shifts.log",
                ),
                (
                    "UPDATE_SWITCH_GREEN_CMD",
                    "cp green/VERSION current/VERSION && sh restart.sh",
                ),
            ],
        );
    }
    api.wait_installations(2).await;
    let release = api.publish("3.0.0").await;
    let (status, rollout) = api
        .call(
            "POST",
            "/api/rollouts",
            ADMIN,
            Some(
                &json!({"release_id": release, "channel": "stable", "batch_size": 2,
                         "strategy": "BLUE_GREEN_CANARY", "canary_steps": [10, 50, 100],
                         "canary_step_wait_sec": 0, "slo_error_rate_max": 0.1,
                         "failure_threshold": "50%"}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{rollout}");
    let id = rollout["id"].as_i64().expect("id");
    let done = api
        .wait_rollout(id, 60, "batch ended", |r| batch_ended(r, 0))
        .await;
    let healthy = job(&done, "canary-1");
    assert_eq!(healthy["status"], "succeeded", "{done:#}");
    let shifts = std::fs::read_to_string(instances[0].dir.join("shifts.log")).unwrap_or_default();
    assert_eq!(shifts.lines().collect::<Vec<_>>(), ["10", "50", "100"]);
    assert_eq!(instances[0].version_on_disk(), "3.0.0");
    let breached = job(&done, "canary-2");
    assert_eq!(breached["status"], "rolled_back", "{done:#}");
    assert_eq!(breached["step"], "canary");
    assert_eq!(breached["canary_percent"], 10, "stopped at the first step");
    assert!(
        breached["error"]
            .as_str()
            .is_some_and(|e| e.contains("error rate")),
        "{breached}"
    );
    assert!(
        breached["metrics"]["metric_error_rate"]
            .as_f64()
            .is_some_and(|r| r > 0.4)
    );
    assert_eq!(instances[1].version_on_disk(), "1.0.0");
    for instance in &mut instances {
        if let Some(agent) = instance.agent.as_mut() {
            crate::sigterm_and_wait(agent).await;
        }
    }
    drop(instances);
    drop(server);
    let _ = std::fs::remove_dir_all(&root);
}
