//! fleetctl against a real control plane (in-process, real HTTP, SQLite).

use std::process::{Command, Output};

use fleet_core::manifest::{ManifestVerifier, PrivateKey, ReleaseManifest};
use fleet_core::{Secret, SecretResolver, Signer};
use fleet_server::{ControlPlane, RoleTokens, SqliteStore};
use serde_json::{Value, json};

const ADMIN: &str = "ctl-admin-token";
const AGENTS: &str = "ctl-agent-secret";

fn key() -> PrivateKey {
    PrivateKey::from_seed([5; 32])
}

struct Fixture {
    url: String,
    dir: std::path::PathBuf,
    http: reqwest::Client,
}

impl Fixture {
    async fn start() -> Self {
        let dir =
            std::env::temp_dir().join(format!("fleetctl-api-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("dir");
        let store = SqliteStore::connect(&format!("sqlite://{}", dir.join("fleet.db").display()))
            .await
            .expect("store");
        let router = ControlPlane::builder()
            .store(store)
            .secrets(SecretResolver::from_config(None, Some(AGENTS)).expect("secrets"))
            .tokens(RoleTokens {
                admin: Some(ADMIN.into()),
                ..Default::default()
            })
            .manifest_verifier(ManifestVerifier::new(vec![key().public_key()]))
            .build()
            .expect("build");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            axum::serve(listener, router).await.expect("serve");
        });
        Self {
            url,
            dir,
            http: reqwest::Client::new(),
        }
    }

    /// Runs fleetctl with the control plane's URL and the admin token.
    async fn ctl(&self, args: &[&str]) -> Output {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let (url, dir) = (self.url.clone(), self.dir.clone());
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_fleetctl"))
                .current_dir(dir)
                .env("FLEET_URL", url)
                .env("FLEET_TOKEN", ADMIN)
                .args(args)
                .output()
                .expect("fleetctl runs")
        })
        .await
        .expect("join")
    }

    /// A signed agent request (as the instance's agent sends it).
    async fn agent(&self, path: &str, body: Value) -> (u16, Value) {
        let bytes = serde_json::to_vec(&body).expect("json");
        let signer = Signer::new(Secret::new(AGENTS).expect("secret"));
        let msg = format!("msg_{}", uuid::Uuid::new_v4().simple());
        let mut request = self
            .http
            .post(format!("{}{path}", self.url))
            .body(bytes.clone());
        for (name, value) in signer.headers(&msg, fleet_core::unix_now(), &bytes).pairs() {
            request = request.header(name, value);
        }
        let response = request.send().await.expect("send");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// A heartbeat of `instance_id`, healthy but for what `extra` says; it must be accepted.
    async fn heartbeat(&self, instance_id: &str, extra: Value) {
        let mut body = json!({"instance_id": instance_id, "db_ok": true, "redis_ok": true,
                              "storage_ok": true, "jobs_failed": 0});
        body.as_object_mut()
            .expect("object")
            .extend(extra.as_object().expect("object").clone());
        let (status, answer) = self.agent("/api/heartbeats", body).await;
        assert_eq!(status, 200, "{answer}");
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_rollout_plugin_and_restore_commands() {
    let f = Fixture::start().await;
    for id in ["i1", "i2"] {
        let (status, _) = f
            .agent(
                "/api/heartbeats",
                json!({"instance_id": id, "db_ok": true, "redis_ok": true, "storage_ok": true,
                       "jobs_failed": 0, "release_channel": "stable", "version": "1.0.0"}),
            )
            .await;
        assert_eq!(status, 200);
    }
    let manifest = ReleaseManifest {
        version: "2.0.0".into(),
        sha: "cafe01".into(),
        channel: "stable".into(),
        migrations_required: false,
        breaking_changes: false,
        released_at: "2026-11-21T08:00:00Z".into(),
        artifacts: None,
    };
    let signed = key()
        .sign_value(&serde_json::to_value(&manifest).expect("json"))
        .expect("sign");
    std::fs::write(f.dir.join("signed.json"), signed.to_string()).expect("write");
    let mut tampered = signed.clone();
    tampered["version"] = "9.9.9".into();
    std::fs::write(f.dir.join("tampered.json"), tampered.to_string()).expect("write");

    let out = f.ctl(&["release", "create", "tampered.json"]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("HTTP 422") && stderr(&out).contains("signature"),
        "{}",
        stderr(&out)
    );
    let out = f.ctl(&["release", "create", "signed.json"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("release 2.0.0 cafe01 on stable stored as #1"),
        "{}",
        stdout(&out)
    );
    let out = f.ctl(&["release", "list", "--json"]).await;
    let list: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(list["items"][0]["version"], "2.0.0");

    let out = f
        .ctl(&[
            "rollout",
            "create",
            "--release",
            "1",
            "--channel",
            "stable",
            "--batch-size",
            "1",
        ])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("rollout 1 (update to 2.0.0 on stable): running"),
        "{text}"
    );
    assert!(
        text.contains("batch  1 [....................] 0/1 1 pending"),
        "{text}"
    );
    let out = f.ctl(&["rollout", "advance", "1"]).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("HTTP 409"), "{}", stderr(&out));

    // The two agents do their jobs; advance in between.
    for (id, advance) in [("i1", true), ("i2", false)] {
        let (_, job) = f
            .agent("/api/updates/next", json!({"instance_id": id}))
            .await;
        let (status, _) = f
            .agent(
                "/api/updates/report",
                json!({"instance_id": id, "job_id": job["job_id"], "status": "succeeded"}),
            )
            .await;
        assert_eq!(status, 200);
        if advance {
            let out = f.ctl(&["rollout", "advance", "1"]).await;
            assert!(out.status.success(), "{}", stderr(&out));
        }
    }
    let out = f.ctl(&["rollout", "watch", "1", "--interval", "1"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains(": completed"), "{text}");
    assert!(
        text.contains("batch  2 [####################] 1/1 1 succeeded"),
        "{text}"
    );
    let out = f.ctl(&["rollout", "pause", "1"]).await;
    assert!(stderr(&out).contains("HTTP 409"), "{}", stderr(&out));
    let out = f.ctl(&["rollout", "list"]).await;
    assert!(stdout(&out).contains("completed"));

    let out = f
        .ctl(&[
            "plugin",
            "release",
            "--name",
            "billing-export",
            "--version",
            "1.2.0",
            "--compatible",
            "0.1.*",
        ])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("plugin billing-export 1.2.0 published as #1"));
    let out = f
        .ctl(&[
            "plugin",
            "release",
            "--name",
            "x; rm -rf /",
            "--version",
            "1",
        ])
        .await;
    assert!(stderr(&out).contains("HTTP 422"), "{}", stderr(&out));
    let (status, request) = f
        .agent(
            "/api/plugins/requests",
            json!({"instance_id": "i1", "name": "billing-export", "version": "1.2.0"}),
        )
        .await;
    assert_eq!(status, 201);
    let out = f
        .ctl(&["plugin", "approve", &request["id"].to_string()])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("approved: job"), "{}", stdout(&out));
    let (status, unwanted) = f
        .agent(
            "/api/plugins/requests",
            json!({"instance_id": "i2", "name": "billing-export", "version": "1.2.0"}),
        )
        .await;
    assert_eq!(status, 201);
    let out = f
        .ctl(&[
            "plugin",
            "reject",
            &unwanted["id"].to_string(),
            "--reason",
            "not licensed here",
        ])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out)
            .contains("rejected: i2 will not install billing-export 1.2.0 (not licensed here)"),
        "{}",
        stdout(&out)
    );
    let out = f.ctl(&["plugin", "requests"]).await;
    assert!(
        stdout(&out).contains("not licensed here"),
        "{}",
        stdout(&out)
    );
    let out = f
        .ctl(&[
            "plugin",
            "rollout",
            "--release",
            "1",
            "--action",
            "remove",
            "--channel",
            "stable",
            "--json",
        ])
        .await;
    let rollout: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(rollout["plugin_action"], "remove");

    let out = f.ctl(&["restore", "schedule", "--count", "1"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("scheduled"));
    let out = f.ctl(&["restore", "list", "--json"]).await;
    let restores: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(restores["items"].as_array().map(Vec::len), Some(1));

    // Once i1 reports a backup it is scheduled; an operator cancels that verification.
    let (status, _) = f
        .agent(
            "/api/heartbeats",
            json!({"instance_id": "i1", "db_ok": true, "redis_ok": true, "storage_ok": true,
                   "jobs_failed": 0, "backup_id": "b-1", "backup_checksum": "sha256:b-1"}),
        )
        .await;
    assert_eq!(status, 200);
    let out = f.ctl(&["restore", "schedule", "--json"]).await;
    let done: Value = serde_json::from_slice(&out.stdout).expect("json");
    let scheduled = done["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["status"] == "scheduled")
        .unwrap_or_else(|| panic!("nothing scheduled: {done}"))["id"]
        .to_string();
    let out = f.ctl(&["restore", "cancel", &scheduled]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!(
            "restore verification {scheduled} of i1 in staging cancelled"
        )),
        "{}",
        stdout(&out)
    );
    let out = f.ctl(&["restore", "cancel", &scheduled]).await;
    assert!(stderr(&out).contains("HTTP 409"), "{}", stderr(&out));
    let _ = std::fs::remove_dir_all(&f.dir);
}

/// `fleetctl alerts` lists the fleet's alerts one aligned line each, filtered as asked;
/// `alerts ack ID` acknowledges one; a filter value it does not know is named with the ones
/// it does, before anything is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_are_listed_filtered_and_acknowledged() {
    let f = Fixture::start().await;
    let long = format!("Disk full on /var: {}", "x".repeat(120));
    for (id, extra) in [
        (
            "edge-1",
            json!({"alerts": [{"level": "warning", "message": "Disk at 80%"}]}),
        ),
        (
            "edge-2",
            json!({"secrets_expired": 1, "alerts": [{"level": "critical", "message": long}]}),
        ),
    ] {
        f.heartbeat(id, extra).await;
    }

    let out = f.ctl(&["alerts"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let listed = stdout(&out);
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 4, "a header and three alerts: {listed}");
    assert!(
        lines[0].starts_with("ID  RAISED (UTC)  ") && lines[0].ends_with("DELIVERY  MESSAGE"),
        "{listed}"
    );
    // Aligned: every line's message starts where the header's does.
    let message_at = lines[0].find("MESSAGE").expect("message column");
    for line in &lines[1..] {
        assert_eq!(&line[message_at - 2..message_at], "  ", "{listed}");
        assert_ne!(line.as_bytes()[message_at], b' ', "{listed}");
    }
    assert!(
        listed.contains("Disk at 80%") && listed.contains("Disk full on /var: xxx"),
        "{listed}"
    );
    assert!(
        !listed.contains(&long),
        "the long message is shortened: {listed}"
    );
    let out = f.ctl(&["alerts", "--json"]).await;
    let answer: Value = serde_json::from_slice(&out.stdout).expect("json");
    let raised = answer["items"][0]["created_at"]
        .as_i64()
        .expect("created_at");
    assert!(
        lines[1].contains(&fleet_core::clock::human_utc(raised)),
        "raised at, in UTC: {listed}"
    );

    let out = f
        .ctl(&["alerts", "--kind", "secrets", "--instance", "edge-2"])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let secrets = stdout(&out);
    assert_eq!(secrets.lines().count(), 2, "{secrets}");
    let row = secrets.lines().nth(1).expect("a row");
    assert!(
        row.contains("secrets") && row.contains("edge-2") && row.contains("open"),
        "{row}"
    );
    let id = row.split_whitespace().next().expect("id").to_owned();

    let out = f.ctl(&["alerts", "ack", &id]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).trim(),
        format!("alert {id} (secrets on edge-2) acknowledged by admin")
    );
    let out = f
        .ctl(&["alerts", "--state", "acknowledged", "--json"])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let acknowledged: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(acknowledged["total"], 1, "{acknowledged}");
    assert_eq!(acknowledged["items"][0]["id"].to_string(), id);
    let out = f.ctl(&["alerts", "--level", "critical"]).await;
    let critical = stdout(&out);
    assert_eq!(critical.lines().count(), 2, "{critical}");
    assert!(
        critical.contains("edge-2") && critical.contains("Disk full"),
        "{critical}"
    );

    // Refused before anything is sent, naming the values it takes.
    let out = f.ctl(&["alerts", "--state", "closed"]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("invalid value 'closed' for '--state <STATE>'")
            && stderr(&out).contains("open, acknowledged, resolved, all"),
        "{}",
        stderr(&out)
    );
    // What only the control plane knows, it says.
    let out = f.ctl(&["alerts", "--delivery", "pending"]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("HTTP 400") && stderr(&out).contains("no alert webhook"),
        "{}",
        stderr(&out)
    );
    let out = f.ctl(&["alerts", "ack", "999999"]).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("HTTP 404"), "{}", stderr(&out));
    let out = f.ctl(&["alerts", "--kind", "payload", "ack", &id]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("takes none of them"),
        "{}",
        stderr(&out)
    );
}

/// `fleetctl installations` lists the registry one aligned line each, filtered as asked, and
/// `installations show ID` shows one with its failing checks and open alerts; an unknown id
/// is the control plane's 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installations_are_listed_filtered_and_shown() {
    let f = Fixture::start().await;
    for (id, extra) in [
        (
            "shop-1",
            json!({"health": "ok", "version": "1.2.3", "release_channel": "stable",
                   "client": "Acme SA"}),
        ),
        (
            "shop-2",
            json!({"health": "degraded", "version": "1.2.0", "release_channel": "beta",
                   "checks": [{"name": "db", "ok": false, "error": "connection refused"}],
                   "checks_skipped": ["redis"],
                   "alerts": [{"level": "critical", "message": "Queue stuck"}],
                   "job_failures": [{"queue": "billing", "message": "Timeout"}]}),
        ),
    ] {
        f.heartbeat(id, extra).await;
    }

    let out = f.ctl(&["installations"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let listed = stdout(&out);
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 3, "a header and two installations: {listed}");
    assert!(lines[0].starts_with("INSTANCE  HEALTH  "), "{listed}");
    let client_at = lines[0].find("CLIENT").expect("client column");
    assert_eq!(&lines[1][client_at..], "Acme SA", "{listed}");
    assert!(
        lines[1].starts_with("shop-1") && lines[1].contains("1.2.3") && lines[1].contains("stable"),
        "{listed}"
    );

    let out = f
        .ctl(&["installations", "--health", "degraded", "--channel", "beta"])
        .await;
    let degraded = stdout(&out);
    assert_eq!(degraded.lines().count(), 2, "{degraded}");
    assert!(degraded.contains("shop-2"), "{degraded}");
    let out = f.ctl(&["installations", "--search", "acme"]).await;
    let found = stdout(&out);
    assert!(
        found.contains("shop-1") && !found.contains("shop-2"),
        "{found}"
    );

    let out = f.ctl(&["installations", "show", "shop-2"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let shown = stdout(&out);
    for needle in [
        "health degraded, version 1.2.0, channel beta",
        "db FAILED: connection refused",
        "redis skipped (not checked on this node)",
        "open alerts: 1",
        "critical payload: Queue stuck",
        "job failures: 1",
        "billing: Timeout",
    ] {
        assert!(shown.contains(needle), "{needle:?} in {shown}");
    }
    let out = f.ctl(&["installations", "show", "nope"]).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("HTTP 404"), "{}", stderr(&out));
    let out = f
        .ctl(&["installations", "--health", "ok", "show", "shop-1"])
        .await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("`installations show ID` takes none of them"),
        "{}",
        stderr(&out)
    );
    let _ = std::fs::remove_dir_all(&f.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installations_are_archived_and_listed_by_archived() {
    let f = Fixture::start().await;
    for id in ["shop-1", "shop-2"] {
        f.heartbeat(id, json!({"health": "ok", "release_channel": "stable"}))
            .await;
    }
    let out = f.ctl(&["installations", "archive", "shop-2"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let said = stdout(&out);
    assert_eq!(said.lines().count(), 1, "one line: {said}");
    assert!(
        said.starts_with("installation shop-2 archived at ")
            && said
                .trim_end()
                .ends_with("UTC; its next heartbeat brings it back"),
        "{said}"
    );
    let out = f.ctl(&["installations", "archive", "shop-2"]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("HTTP 409") && stderr(&out).contains("already archived"),
        "{}",
        stderr(&out)
    );
    let out = f.ctl(&["installations", "archive", "nope"]).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("HTTP 404"), "{}", stderr(&out));

    let listed = |out: &Output| -> Vec<String> {
        stdout(out)
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().next().unwrap_or_default().to_owned())
            .collect()
    };
    let out = f.ctl(&["installations"]).await;
    assert_eq!(listed(&out), ["shop-1"], "{}", stdout(&out));
    let out = f.ctl(&["installations", "--archived", "true"]).await;
    assert_eq!(listed(&out), ["shop-2"], "{}", stdout(&out));
    assert!(stdout(&out).contains("ok, archived"), "{}", stdout(&out));
    let out = f.ctl(&["installations", "--archived", "all"]).await;
    assert_eq!(listed(&out), ["shop-1", "shop-2"], "{}", stdout(&out));
    let out = f.ctl(&["installations", "--archived", "false"]).await;
    assert_eq!(listed(&out), ["shop-1"], "{}", stdout(&out));
    // The fixed set is checked before anything is sent.
    let out = f.ctl(&["installations", "--archived", "yes"]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("possible values: false, true, all"),
        "{}",
        stderr(&out)
    );
    let out = f
        .ctl(&["installations", "--archived", "all", "archive", "shop-1"])
        .await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("`installations archive ID` takes none of them"),
        "{}",
        stderr(&out)
    );
    let out = f.ctl(&["installations", "show", "shop-2"]).await;
    assert!(
        stdout(&out).contains("its next heartbeat brings it back"),
        "{}",
        stdout(&out)
    );

    // Its agent is still running: the next heartbeat brings it back.
    f.heartbeat("shop-2", json!({})).await;
    let out = f.ctl(&["installations"]).await;
    assert_eq!(listed(&out), ["shop-1", "shop-2"], "{}", stdout(&out));
    let _ = std::fs::remove_dir_all(&f.dir);
}
