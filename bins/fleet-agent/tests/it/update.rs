//! `UpdateAgent` through the real binary: download, SHA-256 and Ed25519 check against the
//! pinned key, a trial run of the downloaded file, atomic swap of `AGENT_BINARY_PATH`,
//! restart into it in the same process (exec), confirmation once the live channel is up;
//! and the two ways back to the previous binary: a file that crashes at start is never
//! installed, and one that passes its trial but keeps failing afterwards is replaced by the
//! previous binary after `MAX_STARTS` restarts (the test restarts it as systemd's
//! `Restart=always` would). The version is the one the downloaded file answers to
//! `--version`: an older one is refused unless the agent sets `AGENT_UPDATE_ALLOW_DOWNGRADE`.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use base64::Engine;
use ed25519_dalek::Signer as _;
use fleet_agent::commands::update_agent::{marker_path, previous_path};
use reqwest::Client;
use serde_json::{Value, json};
use sha2::Digest;

use crate::*;

const ADMIN: &str = "update-admin";
const SEED: [u8; 32] = [5u8; 32];

/// A control plane, a download server and an installed copy of the agent binary.
struct Bench {
    dir: PathBuf,
    installed: PathBuf,
    url: String,
    downloads: String,
    files: Arc<Mutex<HashMap<String, Vec<u8>>>>,
}

impl Bench {
    async fn new(name: &str) -> Self {
        let dir = temp_dir(name);
        // The agent runs from its own copy, the file UpdateAgent replaces.
        let installed = dir.join("fleet-agent");
        std::fs::copy(env!("CARGO_BIN_EXE_fleet-agent"), &installed).expect("copy the binary");
        let files: Arc<Mutex<HashMap<String, Vec<u8>>>> = Default::default();
        let served = files.clone();
        let download = axum::Router::new().route(
            "/{name}",
            axum::routing::get(
                move |axum::extract::Path(name): axum::extract::Path<String>| {
                    let bytes = served.lock().unwrap().get(&name).cloned();
                    async move { bytes.ok_or(axum::http::StatusCode::NOT_FOUND) }
                },
            ),
        );
        let downloads = serve(download).await;

        let url = serve_control_plane(&dir, ADMIN, true).await;
        Self {
            dir,
            installed,
            url,
            downloads,
            files,
        }
    }

    /// Serves `bytes` and returns the `UpdateAgent` command for them, signed with the pinned
    /// test key.
    fn offer(&self, name: &str, version: &str, bytes: Vec<u8>) -> Value {
        let signature = base64::engine::general_purpose::STANDARD.encode(
            ed25519_dalek::SigningKey::from_bytes(&SEED)
                .sign(&bytes)
                .to_bytes(),
        );
        let sha = hex::encode(sha2::Sha256::digest(&bytes));
        self.files.lock().unwrap().insert(name.to_owned(), bytes);
        json!({"command_type": "UpdateAgent", "targets": [INSTANCE],
               "payload": {"version": version, "url": format!("{}/{name}", self.downloads),
                           "sha256": sha, "signature": signature}})
    }

    /// `program` (the installed binary, or a supervisor around it) with the agent's
    /// environment, logging to `agent.log`.
    fn command(&self, program: &str) -> Command {
        let public = fleet_core::PrivateKey::from_seed(SEED)
            .public_key()
            .to_base64();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .expect("log");
        let mut command = Command::new(program);
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("INSTANCE_ID", INSTANCE)
            .env("CONTROL_PLANE_URL", &self.url)
            .env("AGENT_SECRET", SECRET)
            .env("AGENT_STATE_PATH", self.dir.join("state.db"))
            .env("AGENT_PORT", free_port().to_string())
            .env("AGENT_BINARY_PATH", &self.installed)
            .env("AGENT_UPDATE_PUBLIC_KEYS", &public)
            .env("AGENT_UPDATE_CONFIRM_SECS", "60")
            .env("HEARTBEAT_INTERVAL", "60")
            .env("AGENT_METRICS_URL", "off")
            .env("CONTAINERS_INTERVAL", "0")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        command
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    fn installed_sha(&self) -> String {
        hex::encode(sha2::Sha256::digest(
            std::fs::read(&self.installed).expect("read the installed binary"),
        ))
    }

    /// Waits until a HEALTH_CHECK completes (the agent is connected) and returns its data.
    async fn healthy(&self) -> Value {
        let done = run_command(
            &Client::new(),
            &self.url,
            ADMIN,
            json!({"command_type": "HEALTH_CHECK", "targets": [INSTANCE], "payload": {}}),
        )
        .await;
        assert_eq!(
            done["targets"][0]["status"],
            "completed",
            "{done}\n{}",
            self.logs()
        );
        done["targets"][0]["data"].clone()
    }
}

/// A script as the bytes of an "agent binary" (the agent makes the download executable).
fn script(text: &str) -> Vec<u8> {
    text.as_bytes().to_vec()
}

/// The first line of a script that answers `--version` as `fleet-agent <version>` does.
fn answers_version(version: &str) -> String {
    format!("#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'fleet-agent {version}'; exit 0; fi\n")
}

/// Older than the agent under test (this workspace's version, 0.1.0 or later).
const OLDER: &str = "0.0.1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_agent_swaps_the_binary_restarts_and_confirms() {
    let bench = Bench::new("update").await;
    let new_binary = std::fs::read(env!("CARGO_BIN_EXE_fleet-agent")).expect("read the binary");
    // The same version again: a re-install, allowed.
    let version = env!("CARGO_PKG_VERSION");
    let command = bench.offer("fleet-agent", version, new_binary);
    let mut agent = Guard(
        bench
            .command(&bench.installed.display().to_string())
            .spawn()
            .expect("start the installed agent"),
    );
    let client = Client::new();
    let id = submit_command(&client, &bench.url, ADMIN, command).await;
    let done = wait_command(&client, &bench.url, ADMIN, &id, 120).await;
    let target = &done["targets"][0];
    assert_eq!(target["status"], "completed", "{done}\n{}", bench.logs());
    // The trial run's own output is the command's log.
    let trial = Client::new()
        .get(format!("{}/v1/commands/{id}/logs?stream=stderr", bench.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("logs")
        .text()
        .await
        .expect("text");
    assert!(trial.contains("trial: the live channel opened"), "{trial}");
    assert_eq!(target["data"]["version"], version, "{done}");
    // COMPLETED is recorded by the new process once its channel is up, so by now the
    // marker is gone and the process (same pid: exec) runs the new file.
    assert!(!marker_path(&bench.installed).exists(), "{}", bench.logs());
    assert!(
        previous_path(&bench.installed).exists(),
        "the previous binary is kept"
    );
    assert_eq!(
        std::fs::metadata(&bench.installed)
            .expect("installed")
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    assert!(
        agent.0.try_wait().expect("wait").is_none(),
        "the agent exited:\n{}",
        bench.logs()
    );
    let logs = bench.logs();
    assert!(logs.contains("restarting into the new binary"), "{logs}");
    bench.healthy().await;
    sigterm_and_wait(&mut agent).await;
    let _ = std::fs::remove_dir_all(&bench.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_binary_that_crashes_at_start_is_never_installed() {
    let bench = Bench::new("update-crash").await;
    let before = bench.installed_sha();
    let mut agent = Guard(
        bench
            .command(&bench.installed.display().to_string())
            .spawn()
            .expect("start the installed agent"),
    );
    let pid = agent.0.id();
    // Validly signed, but it dies once it starts as an agent.
    let bad = script(&format!(
        "{}echo 'fatal: cannot start the new agent' >&2\nexit 1\n",
        answers_version("6.6.6")
    ));
    let done = run_command(
        &Client::new(),
        &bench.url,
        ADMIN,
        bench.offer("bad-agent", "6.6.6", bad),
    )
    .await;
    let target = &done["targets"][0];
    assert_eq!(target["status"], "failed", "{done}\n{}", bench.logs());
    let error = target["error"].as_str().unwrap_or_default();
    for needle in [
        "the new binary (6.6.6) did not reconnect",
        "exited with status 1",
        "fatal: cannot start the new agent",
        "the previous binary stays",
    ] {
        assert!(error.contains(needle), "{needle:?} not in {error:?}");
    }
    // The same process, on the same file, still connected and answering.
    assert_eq!(bench.installed_sha(), before);
    assert!(!marker_path(&bench.installed).exists());
    assert!(!bench.installed.with_extension("download").exists());
    assert!(
        agent.0.try_wait().expect("wait").is_none(),
        "{}",
        bench.logs()
    );
    bench.healthy().await;
    assert_eq!(agent.0.id(), pid);
    sigterm_and_wait(&mut agent).await;
    let _ = std::fs::remove_dir_all(&bench.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_binary_that_keeps_failing_after_its_trial_gives_way_to_the_previous_one() {
    let bench = Bench::new("update-restarts").await;
    let before = bench.installed_sha();
    // A real agent binary that passes its trial and then fails at every real start, after
    // it counted the start (a configuration it rejects, read after the update marker).
    let real = bench.dir.join("real-agent");
    std::fs::copy(env!("CARGO_BIN_EXE_fleet-agent"), &real).expect("copy");
    let flaky = script(&format!(
        "{}if [ -z \"$FLEET_AGENT_TRIAL\" ]; then AGENT_SIGNATURE_SCHEME=broken; \
         export AGENT_SIGNATURE_SCHEME; fi\nexec '{}' \"$@\"\n",
        answers_version("7.0.0"),
        real.display()
    ));
    // systemd's Restart=always, as a shell loop around the installed path (passed as $0,
    // never pasted into the script).
    let mut supervisor = bench.command("sh");
    supervisor
        .arg("-c")
        .arg("while :; do \"$0\"; echo \"exited with $?\" >&2; sleep 0.2; done")
        .arg(&bench.installed);
    std::os::unix::process::CommandExt::process_group(&mut supervisor, 0);
    let supervisor = Guard(supervisor.spawn().expect("start the supervisor"));
    let group = supervisor.0.id();
    let stop_group = GroupKill(group);

    bench.healthy().await;
    let done = run_command(
        &Client::new(),
        &bench.url,
        ADMIN,
        bench.offer("flaky-agent", "7.0.0", flaky),
    )
    .await;
    let target = &done["targets"][0];
    assert_eq!(target["status"], "failed", "{done}\n{}", bench.logs());
    let error = target["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("the new binary (7.0.0) started 3 times without reconnecting")
            && error.contains("the previous binary was restored"),
        "{error:?}\n{}",
        bench.logs()
    );
    assert_eq!(bench.installed_sha(), before, "the previous binary is back");
    assert!(!marker_path(&bench.installed).exists());
    let logs = bench.logs();
    assert!(
        logs.contains("AGENT_SIGNATURE_SCHEME must be v1 or v0"),
        "{logs}"
    );
    assert!(logs.contains("agent update rolled back"), "{logs}");
    // Back on the previous binary, connected.
    bench.healthy().await;
    drop(stop_group);
    drop(supervisor);
    let _ = std::fs::remove_dir_all(&bench.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_agent_binary_is_installed_only_where_the_agent_allows_downgrades() {
    let bench = Bench::new("update-downgrade").await;
    let before = bench.installed_sha();
    // A real agent that says it is an older version: validly signed, and it would pass its
    // trial.
    let real = bench.dir.join("real-agent");
    std::fs::copy(env!("CARGO_BIN_EXE_fleet-agent"), &real).expect("copy");
    let older = script(&format!(
        "{}exec '{}' \"$@\"\n",
        answers_version(OLDER),
        real.display()
    ));
    let mut agent = Guard(
        bench
            .command(&bench.installed.display().to_string())
            .spawn()
            .expect("start the installed agent"),
    );
    let client = Client::new();
    let done = run_command(
        &client,
        &bench.url,
        ADMIN,
        bench.offer("older-agent", OLDER, older.clone()),
    )
    .await;
    let target = &done["targets"][0];
    assert_eq!(target["status"], "failed", "{done}\n{}", bench.logs());
    assert_eq!(
        target["error"],
        format!(
            "refusing to downgrade from {} to {OLDER} (set AGENT_UPDATE_ALLOW_DOWNGRADE=true to \
             allow)",
            env!("CARGO_PKG_VERSION")
        ),
        "{done}"
    );
    assert_eq!(bench.installed_sha(), before);
    assert!(!previous_path(&bench.installed).exists());
    assert!(!marker_path(&bench.installed).exists());
    assert!(!bench.installed.with_extension("download").exists());
    assert!(
        agent.0.try_wait().expect("wait").is_none(),
        "{}",
        bench.logs()
    );
    bench.healthy().await;
    sigterm_and_wait(&mut agent).await;

    // The same agent, configured on its own host to accept downgrades.
    let mut allowing = bench.command(&bench.installed.display().to_string());
    allowing.env("AGENT_UPDATE_ALLOW_DOWNGRADE", "true");
    let mut agent = Guard(allowing.spawn().expect("start the installed agent"));
    let id = submit_command(
        &client,
        &bench.url,
        ADMIN,
        bench.offer("older-agent", OLDER, older),
    )
    .await;
    let done = wait_command(&client, &bench.url, ADMIN, &id, 120).await;
    let target = &done["targets"][0];
    assert_eq!(target["status"], "completed", "{done}\n{}", bench.logs());
    assert_eq!(target["data"]["version"], OLDER, "{done}");
    assert!(previous_path(&bench.installed).exists());
    assert!(!marker_path(&bench.installed).exists(), "{}", bench.logs());
    bench.healthy().await;
    sigterm_and_wait(&mut agent).await;
    let _ = std::fs::remove_dir_all(&bench.dir);
}

/// Kills the whole process group (the supervisor loop and the agent) when dropped.
struct GroupKill(u32);

impl Drop for GroupKill {
    fn drop(&mut self) {
        // `--` is essential: without it procps `kill` reads `-KILL -10` as `kill -KILL -1`
        // and kills every process the user may signal. Group 0 or 1 is never ours to kill.
        if self.0 > 1 {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.0)])
                .status();
        }
    }
}
