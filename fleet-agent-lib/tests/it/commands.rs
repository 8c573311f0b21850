//! The command executor and its journal, without a control plane: each command id runs at
//! most once, output is journalled in order until acknowledged, disabled types are refused.

use std::sync::Arc;
use std::time::Duration;

use fleet_agent::CommandSettings;
use fleet_agent::commands::Executor;
use fleet_agent::logstream::Journal;
use fleet_core::command::{CommandEnvelope, CommandType, Frame};
use serde_json::json;

use crate::support::temp_dir;

async fn executor(settings: CommandSettings) -> (Executor, Journal, std::path::PathBuf) {
    let dir = temp_dir("commands");
    let journal = Journal::open(&dir.join("state.db")).await.expect("journal");
    let executor = Executor::new(
        journal.clone(),
        settings,
        None,
        Arc::new(tokio::sync::watch::channel(false).0),
    );
    (executor, journal, dir)
}

fn envelope(id: &str, kind: &str, payload: serde_json::Value) -> CommandEnvelope {
    serde_json::from_value(json!({"id": id, "type": kind, "payload": payload})).expect("envelope")
}

/// Results queued in the journal, in order.
pub async fn results(journal: &Journal) -> Vec<fleet_core::command::CommandResult> {
    journal
        .pending(0, 10_000)
        .await
        .expect("pending")
        .into_iter()
        .filter_map(|p| match Frame::decode(&p.body) {
            Ok(Frame::Result { result, .. }) => Some(result),
            _ => None,
        })
        .collect()
}

async fn wait_results(journal: &Journal, count: usize) -> Vec<fleet_core::command::CommandResult> {
    for _ in 0..200 {
        let found = results(journal).await;
        if found.len() >= count {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "expected {count} results, have {:?}",
        results(journal).await
    );
}

#[tokio::test]
async fn a_redelivered_command_answers_its_recorded_result_without_running_again() {
    let (executor, journal, dir) = executor(CommandSettings::default()).await;
    let counter = dir.join("runs");
    let command = envelope(
        "cmd-1",
        "RunCommand",
        json!({"cmd": format!("echo run >> {}; echo done", counter.display()), "shell": true}),
    );
    executor.accept(command.clone()).await.expect("accept");
    let first = wait_results(&journal, 2).await;
    assert_eq!(
        first[0].status,
        fleet_core::command::CommandStatus::InProgress
    );
    assert_eq!(
        first[1].status,
        fleet_core::command::CommandStatus::Completed
    );
    // Delivered again (a reconnect, a replica retry): the recorded answer, no second run.
    executor
        .accept(command.clone())
        .await
        .expect("accept again");
    let again = wait_results(&journal, 3).await;
    assert_eq!(again[2], first[1]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(std::fs::read_to_string(&counter).expect("ran"), "run\n");

    // Acknowledged frames are forgotten; the others stay.
    let pending = journal.pending(0, 100).await.expect("pending");
    let ids: Vec<String> = pending.iter().map(|p| p.frame_id.clone()).collect();
    journal.ack(&ids[..1]).await.expect("ack");
    assert_eq!(
        journal.backlog().await.expect("count") as usize,
        ids.len() - 1
    );

    // A journal reopened after a crash mid-run reports the command failed, never reruns it.
    sqlx_like_crash(&journal).await;
    let reopened = Journal::open(&dir.join("state.db")).await.expect("reopen");
    let executor = Executor::new(
        reopened.clone(),
        CommandSettings::default(),
        None,
        Arc::new(tokio::sync::watch::channel(false).0),
    );
    executor.recover().await.expect("recover");
    let last = results(&reopened).await.pop().expect("a result");
    assert_eq!(last.job_id, "crashed-1");
    assert_eq!(last.status, fleet_core::command::CommandStatus::Failed);
    let _ = std::fs::remove_dir_all(dir);
}

/// Leaves a command recorded as running, as a crash in the middle of it would.
async fn sqlx_like_crash(journal: &Journal) {
    assert_eq!(
        journal.begin("crashed-1").await.expect("begin"),
        fleet_agent::logstream::Begin::New
    );
}

#[tokio::test]
async fn disabled_and_unreadable_commands_fail() {
    let mut settings = CommandSettings::default();
    settings.disabled.insert(CommandType::RunCommand);
    let (executor, journal, dir) = executor(settings).await;
    executor
        .accept(envelope("c1", "RunCommand", json!({"cmd": "true"})))
        .await
        .expect("accept");
    let found = wait_results(&journal, 1).await;
    assert_eq!(found[0].status, fleet_core::command::CommandStatus::Failed);
    assert!(
        found[0]
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("disabled")
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn settings_come_from_the_environment_names() {
    let vars = [
        ("AGENT_COMMANDS_DISABLED", "RunCommand, UpdateAgent"),
        ("AGENT_PROJECTS_DIR", "/srv/projects"),
        ("AGENT_COMPOSE_COMMAND", "docker compose"),
        ("AGENT_COMMANDS_TIMEOUT_SECS", "60"),
    ];
    let settings = CommandSettings::from_lookup(|name| {
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| (*v).to_owned())
    })
    .expect("valid");
    assert!(settings.disabled.contains(&CommandType::RunCommand));
    assert!(settings.disabled.contains(&CommandType::UpdateAgent));
    assert_eq!(settings.compose_command, ["docker", "compose"]);
    assert_eq!(settings.default_timeout, Duration::from_secs(60));
    let bad = CommandSettings::from_lookup(|name| {
        (name == "AGENT_COMMANDS_DISABLED").then(|| "REBOOT".to_owned())
    });
    assert!(bad.is_err());
}

/// Serves `bytes` at `/agent` on 127.0.0.1; returns the URL.
async fn serve_binary(bytes: Vec<u8>) -> String {
    let app = axum::Router::new().route(
        "/agent",
        axum::routing::get(move || {
            let bytes = bytes.clone();
            async move { bytes }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/agent", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    url
}

#[tokio::test]
async fn update_agent_checks_digest_and_signature_then_swaps_atomically() {
    use base64::Engine;
    use ed25519_dalek::Signer as _;
    use sha2::Digest;
    let seed = [9u8; 32];
    let signing = ed25519_dalek::SigningKey::from_bytes(&seed);
    let public = fleet_core::PrivateKey::from_seed(seed).public_key();
    let new_binary = agent_script("2.0.0");
    let url = serve_binary(new_binary.clone()).await;
    let sha = hex::encode(sha2::Sha256::digest(&new_binary));
    let good =
        base64::engine::general_purpose::STANDARD.encode(signing.sign(&new_binary).to_bytes());
    let forged = base64::engine::general_purpose::STANDARD.encode(
        ed25519_dalek::SigningKey::from_bytes(&[1; 32])
            .sign(&new_binary)
            .to_bytes(),
    );

    let dir = temp_dir("update");
    let binary = dir.join("fleet-agent");
    std::fs::write(&binary, b"old agent").expect("old binary");
    let settings = CommandSettings {
        update_keys: vec![public],
        agent_binary: Some(binary.clone()),
        ..CommandSettings::default()
    };
    let journal = Journal::open(&dir.join("state.db")).await.expect("journal");
    let restart = Arc::new(tokio::sync::watch::channel(false).0);
    let executor = Executor::new(journal.clone(), settings, None, restart.clone());

    // A signature by a key that is not pinned: refused, nothing replaced.
    executor
        .accept(envelope(
            "u1",
            "UpdateAgent",
            json!({"version": "2.0.0", "url": url, "sha256": sha, "signature": forged}),
        ))
        .await
        .expect("accept");
    let found = wait_results(&journal, 2).await;
    assert_eq!(found[1].status, fleet_core::command::CommandStatus::Failed);
    assert_eq!(std::fs::read(&binary).expect("read"), b"old agent");
    assert!(!*restart.borrow());

    executor
        .accept(envelope(
            "u2",
            "UpdateAgent",
            json!({"version": "2.0.0", "url": url, "sha256": sha, "signature": good}),
        ))
        .await
        .expect("accept");
    // Installed: the agent is asked to restart into it; the command stays in progress.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !*restart.borrow() {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            results(&journal).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let found = results(&journal).await;
    assert_eq!(found.len(), 3, "{found:?}");
    assert_eq!(
        found[2].status,
        fleet_core::command::CommandStatus::InProgress
    );
    assert_eq!(std::fs::read(&binary).expect("read"), new_binary);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&binary)
            .expect("meta")
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    let previous = fleet_agent::commands::update_agent::previous_path(&binary);
    assert_eq!(
        std::fs::read(previous).expect("previous kept"),
        b"old agent"
    );
    assert!(fleet_agent::commands::update_agent::marker_path(&binary).exists());
    // The restarted agent confirms once its channel is up: COMPLETED, marker gone.
    fleet_agent::commands::update_agent::confirm(&binary, &journal)
        .await
        .expect("confirm");
    let found = results(&journal).await;
    assert_eq!(
        (found[3].job_id.as_str(), found[3].status),
        ("u2", fleet_core::command::CommandStatus::Completed)
    );
    assert!(!fleet_agent::commands::update_agent::marker_path(&binary).exists());

    // A file that exits 0 without the proof (no agent at all) is not installed.
    let not_an_agent =
        b"#!/bin/sh\n[ \"$1\" = --version ] && echo 'fleet-agent 3.0.0'\nexit 0\n".to_vec();
    let url = serve_binary(not_an_agent.clone()).await;
    let sha = hex::encode(sha2::Sha256::digest(&not_an_agent));
    let signature =
        base64::engine::general_purpose::STANDARD.encode(signing.sign(&not_an_agent).to_bytes());
    executor
        .accept(envelope(
            "u3",
            "UpdateAgent",
            json!({"version": "3.0.0", "url": url, "sha256": sha, "signature": signature}),
        ))
        .await
        .expect("accept");
    let found = wait_results(&journal, 6).await;
    assert_eq!(found[5].status, fleet_core::command::CommandStatus::Failed);
    let error = found[5].error.clone().unwrap_or_default();
    assert!(
        error.contains("without reporting a live channel"),
        "{error}"
    );
    assert_eq!(std::fs::read(&binary).expect("read"), new_binary);
    let _ = std::fs::remove_dir_all(dir);
}

/// Stands in for an agent binary of `version`: it answers `--version` and its trial run
/// (with the proof of the nonce) as `fleet-agent` does (bins/fleet-agent/tests/it/update.rs
/// runs the real binary).
fn agent_script(version: &str) -> Vec<u8> {
    format!(
        "#!/bin/sh\n[ \"$1\" = --version ] && echo 'fleet-agent {version}' && exit 0\n\
         [ -n \"$FLEET_AGENT_TRIAL\" ] && echo \"fleet-agent trial ok $FLEET_AGENT_TRIAL\"\n"
    )
    .into_bytes()
}

/// The key `UpdateBench` agents pin.
const UPDATE_SEED: [u8; 32] = [7u8; 32];

/// An agent of a given version on `<dir>/fleet-agent` ("running agent"), with the binary of
/// an earlier update kept beside it ("previous agent"), pinning `UPDATE_SEED`.
struct UpdateBench {
    dir: std::path::PathBuf,
    binary: std::path::PathBuf,
    journal: Journal,
    executor: Executor,
    restart: Arc<tokio::sync::watch::Sender<bool>>,
}

impl UpdateBench {
    async fn new(agent_version: &str, allow_downgrade: bool) -> Self {
        let dir = temp_dir("update-version");
        let binary = dir.join("fleet-agent");
        std::fs::write(&binary, b"running agent").expect("binary");
        std::fs::write(
            fleet_agent::commands::update_agent::previous_path(&binary),
            b"previous agent",
        )
        .expect("previous binary");
        let settings = CommandSettings {
            update_keys: vec![fleet_core::PrivateKey::from_seed(UPDATE_SEED).public_key()],
            agent_binary: Some(binary.clone()),
            agent_version: agent_version.to_owned(),
            allow_downgrade,
            ..CommandSettings::default()
        };
        let journal = Journal::open(&dir.join("state.db")).await.expect("journal");
        let restart = Arc::new(tokio::sync::watch::channel(false).0);
        let executor = Executor::new(journal.clone(), settings, None, restart.clone());
        Self {
            dir,
            binary,
            journal,
            executor,
            restart,
        }
    }

    /// Serves `bytes`, signed with the pinned key, as the binary of `asked_version`; returns
    /// the command's result once it ended, or its `IN_PROGRESS` once the agent was asked to
    /// restart into the installed binary.
    async fn update(
        &self,
        id: &str,
        bytes: Vec<u8>,
        asked_version: &str,
    ) -> fleet_core::command::CommandResult {
        use base64::Engine;
        use ed25519_dalek::Signer as _;
        use sha2::Digest;
        let signature = base64::engine::general_purpose::STANDARD.encode(
            ed25519_dalek::SigningKey::from_bytes(&UPDATE_SEED)
                .sign(&bytes)
                .to_bytes(),
        );
        let sha = hex::encode(sha2::Sha256::digest(&bytes));
        let url = serve_binary(bytes).await;
        self.executor
            .accept(envelope(
                id,
                "UpdateAgent",
                json!({"version": asked_version, "url": url, "sha256": sha,
                       "signature": signature}),
            ))
            .await
            .expect("accept");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let mine: Vec<_> = results(&self.journal)
                .await
                .into_iter()
                .filter(|r| r.job_id == id)
                .collect();
            let last = mine.last().cloned();
            match last {
                Some(r) if r.status != fleet_core::command::CommandStatus::InProgress => return r,
                Some(r) if *self.restart.borrow() => return r,
                _ => {}
            }
            assert!(std::time::Instant::now() < deadline, "{mine:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Nothing was installed: same binary, same previous binary, no marker, no download
    /// left behind, no restart.
    fn assert_nothing_swapped(&self) {
        use fleet_agent::commands::update_agent::{marker_path, previous_path};
        assert_eq!(std::fs::read(&self.binary).expect("read"), b"running agent");
        assert_eq!(
            std::fs::read(previous_path(&self.binary)).expect("read"),
            b"previous agent"
        );
        assert!(!marker_path(&self.binary).exists());
        assert!(!self.binary.with_extension("download").exists());
        assert!(!*self.restart.borrow());
    }

    /// The offered binary is installed and waits for the restart to confirm it.
    fn assert_installed(&self, bytes: &[u8], version: &str) {
        use fleet_agent::commands::update_agent::{marker_path, previous_path};
        assert_eq!(std::fs::read(&self.binary).expect("read"), bytes);
        assert_eq!(
            std::fs::read(previous_path(&self.binary)).expect("read"),
            b"running agent"
        );
        let marker: serde_json::Value = serde_json::from_slice(
            &std::fs::read(marker_path(&self.binary)).expect("the update marker"),
        )
        .expect("json");
        assert_eq!(marker["version"], version, "{marker}");
        assert!(*self.restart.borrow());
    }
}

impl Drop for UpdateBench {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn update_agent_refuses_an_older_binary_and_changes_nothing() {
    use fleet_core::command::CommandStatus;
    let bench = UpdateBench::new("1.4.0", false).await;
    // Validly signed and a working agent, but older than the running one.
    let result = bench.update("old", agent_script("1.2.0"), "1.2.0").await;
    assert_eq!(result.status, CommandStatus::Failed, "{result:?}");
    assert_eq!(
        result.error.as_deref(),
        Some(
            "refusing to downgrade from 1.4.0 to 1.2.0 (set AGENT_UPDATE_ALLOW_DOWNGRADE=true \
             to allow)"
        )
    );
    bench.assert_nothing_swapped();
}

#[tokio::test]
async fn update_agent_refuses_a_binary_that_is_not_the_asked_version() {
    use fleet_core::command::CommandStatus;
    let bench = UpdateBench::new("1.4.0", true).await;
    // The command's version is not signed: the binary's own answer counts, and it must be
    // what the operator asked for, even where downgrades are allowed.
    let result = bench.update("lie", agent_script("1.2.0"), "1.5.0").await;
    assert_eq!(result.status, CommandStatus::Failed, "{result:?}");
    let error = result.error.unwrap_or_default();
    assert!(
        error.contains(
            "the downloaded binary is version 1.2.0, not the 1.5.0 the command asked for"
        ),
        "{error}"
    );
    bench.assert_nothing_swapped();
    // A binary that cannot say which version it is is refused too.
    let silent = b"#!/bin/sh\necho 'fleet-agent'\n".to_vec();
    let result = bench.update("silent", silent, "1.5.0").await;
    assert_eq!(result.status, CommandStatus::Failed, "{result:?}");
    let error = result.error.unwrap_or_default();
    assert!(
        error.starts_with(
            "cannot tell the new binary's version: `--version` printed \"fleet-agent\""
        ),
        "{error}"
    );
    bench.assert_nothing_swapped();
}

#[tokio::test]
async fn update_agent_installs_an_older_binary_when_this_agent_allows_downgrades() {
    let bench = UpdateBench::new("1.4.0", true).await;
    let older = agent_script("1.2.0");
    let result = bench.update("old", older.clone(), "1.2.0").await;
    assert_eq!(
        result.status,
        fleet_core::command::CommandStatus::InProgress,
        "{result:?}"
    );
    bench.assert_installed(&older, "1.2.0");
}

#[tokio::test]
async fn update_agent_reinstalls_the_same_version() {
    let bench = UpdateBench::new("1.4.0", false).await;
    let same = agent_script("1.4.0");
    let result = bench.update("again", same.clone(), "v1.4.0").await;
    assert_eq!(
        result.status,
        fleet_core::command::CommandStatus::InProgress,
        "{result:?}"
    );
    bench.assert_installed(&same, "1.4.0");
}

#[tokio::test]
async fn update_agent_download_errors_never_quote_the_url() {
    let dir = temp_dir("update-url");
    let binary = dir.join("fleet-agent");
    std::fs::write(&binary, b"old agent").expect("old binary");
    let settings = CommandSettings {
        update_keys: vec![fleet_core::PrivateKey::from_seed([9; 32]).public_key()],
        agent_binary: Some(binary.clone()),
        ..CommandSettings::default()
    };
    let journal = Journal::open(&dir.join("state.db")).await.expect("journal");
    let executor = Executor::new(
        journal.clone(),
        settings,
        None,
        Arc::new(tokio::sync::watch::channel(false).0),
    );
    // A port nothing listens on (connection refused), and a server that answers 404.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let served = serve_binary(b"unused".to_vec()).await;
    let served = served
        .trim_start_matches("http://")
        .trim_end_matches("/agent");
    let cases = [
        (
            format!("http://user:SECRETPW@{closed}/agent?token=SECRETQ"),
            "connect",
        ),
        (
            format!("http://user:SECRETPW@{served}/missing?token=SECRETQ#SECRETF"),
            "404",
        ),
    ];
    for (i, (url, cause)) in cases.iter().enumerate() {
        executor
            .accept(envelope(
                &format!("u{i}"),
                "UpdateAgent",
                json!({"version": "2.0.0", "url": url, "sha256": "0".repeat(64),
                       "signature": "AA=="}),
            ))
            .await
            .expect("accept");
        let found = wait_results(&journal, 2 * (i + 1)).await;
        let result = &found[2 * i + 1];
        assert_eq!(result.status, fleet_core::command::CommandStatus::Failed);
        let error = result.error.clone().unwrap_or_default();
        assert!(error.starts_with("download failed: "), "{error}");
        assert!(error.to_lowercase().contains(cause), "{error}");
        assert!(
            !error.contains("SECRET") && !error.contains("user:"),
            "{error}"
        );
        assert!(!result.logs.contains("SECRET"), "{}", result.logs);
    }
    assert_eq!(std::fs::read(&binary).expect("read"), b"old agent");
    let _ = std::fs::remove_dir_all(dir);
}

/// An application's own HEALTH_CHECK, plugged in with a `CommandHandler`.
struct AppHealth;

#[fleet_agent::async_trait]
impl fleet_agent::CommandHandler for AppHealth {
    fn command_type(&self) -> CommandType {
        CommandType::HealthCheck
    }

    async fn run(
        &self,
        _command: &fleet_core::command::Command,
        output: &fleet_agent::commands::Output,
        _cancel: &tokio::sync::Notify,
    ) -> fleet_core::command::CommandResult {
        output
            .write(fleet_core::command::Stream::Stdout, b"queue depth 3\n")
            .await
            .expect("journal");
        let mut result = fleet_agent::commands::completed("", "app healthy");
        result.data = Some(json!({"queue_depth": 3}));
        result
    }
}

#[tokio::test]
async fn a_plugged_in_handler_replaces_the_built_in_one() {
    let (executor, journal, dir) = executor(CommandSettings::default()).await;
    let executor = executor.with_handlers(vec![Arc::new(AppHealth)]);
    executor
        .accept(envelope("h1", "HEALTH_CHECK", json!({})))
        .await
        .expect("accept");
    let found = wait_results(&journal, 2).await;
    assert_eq!(found[1].job_id, "h1");
    assert_eq!(found[1].data, Some(json!({"queue_depth": 3})));
    let logs: Vec<_> = journal
        .pending(0, 100)
        .await
        .expect("pending")
        .into_iter()
        .filter_map(|p| match Frame::decode(&p.body) {
            Ok(Frame::Logs { batch, .. }) => Some(batch.chunks[0].data.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(logs, ["queue depth 3\n"]);
    let _ = std::fs::remove_dir_all(dir);
}

/// A control plane that accepts the socket and then never reads it (so never answers a
/// ping): the agent gives up after the pong timeout and dials again.
#[tokio::test]
async fn a_silent_socket_is_dropped_after_the_pong_timeout_and_redialled() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let sockets = Arc::new(AtomicUsize::new(0));
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (count, keep) = (sockets.clone(), held.clone());
    let app = axum::Router::new()
        .route(
            "/v1/agents/register",
            axum::routing::post(|| async {
                axum::Json(json!({"instance_id": "silent-1", "token": "t",
                                  "expires_at": fleet_core::unix_now() + 3600}))
            }),
        )
        .route(
            "/v1/agents/connect",
            axum::routing::get(move |ws: axum::extract::ws::WebSocketUpgrade| {
                let (count, keep) = (count.clone(), keep.clone());
                async move {
                    ws.on_upgrade(move |socket| async move {
                        count.fetch_add(1, Ordering::SeqCst);
                        // Held, never read: pings stay unanswered.
                        keep.lock().unwrap().push(socket);
                    })
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });

    let settings = CommandSettings {
        ping_interval: Duration::from_millis(100),
        pong_timeout: Duration::from_millis(300),
        backoff_base: Duration::from_millis(50),
        backoff_max: Duration::from_millis(100),
        ..CommandSettings::default()
    };
    let (executor, _journal, dir) = executor(settings).await;
    let config = fleet_agent::channel::ChannelConfig {
        instance_id: "silent-1".into(),
        control_plane_url: url,
        secret: fleet_core::Secret::new("s").expect("secret"),
        version: "test".into(),
        executor,
        http: reqwest_client(),
        poll_now: Default::default(),
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let channel = tokio::spawn(fleet_agent::channel::run(config, stopped));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let dialled = sockets.load(Ordering::SeqCst);
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), channel).await;
    assert!(dialled >= 3, "dialled {dialled} times in 3 s");
    assert!(dialled <= 12, "dialled {dialled} times in 3 s: no backoff?");
    let _ = std::fs::remove_dir_all(dir);
}

fn reqwest_client() -> fleet_agent::channel::HttpClient {
    fleet_agent::channel::HttpClient::new()
}

/// Arguments full of shell syntax reach the program verbatim: without `shell` nothing
/// interprets them, and with `shell` they are positional parameters (`"$@"`), never pasted
/// into the command line. The canary file proves no injected command ran.
#[tokio::test]
async fn run_command_passes_shell_metacharacters_verbatim() {
    let (executor, journal, dir) = executor(CommandSettings::default()).await;
    let canary = dir.join("injected");
    let hostile: Vec<String> = vec![
        format!("; touch {}", canary.display()),
        format!("$(touch {})", canary.display()),
        format!("`touch {}`", canary.display()),
        format!("a && touch {} || b", canary.display()),
        "| cat /etc/passwd > x".into(),
        "*".into(),
        "$HOME".into(),
        "'\"\\".into(),
        "line\nbreak".into(),
    ];
    let expected: String = hostile.iter().map(|a| format!("<{a}>")).collect();
    let printf_args: Vec<String> = std::iter::once("<%s>".to_owned())
        .chain(hostile.iter().cloned())
        .collect();
    executor
        .accept(envelope(
            "plain",
            "RunCommand",
            json!({"cmd": "printf", "args": printf_args}),
        ))
        .await
        .expect("accept");
    executor
        .accept(envelope(
            "shell",
            "RunCommand",
            json!({"cmd": "printf '<%s>' \"$@\"", "args": hostile, "shell": true}),
        ))
        .await
        .expect("accept");
    let mut found = Vec::new();
    for _ in 0..400 {
        found = results(&journal)
            .await
            .into_iter()
            .filter(|r| r.status != fleet_core::command::CommandStatus::InProgress)
            .collect();
        if found.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(found.len(), 2, "both commands ended: {found:?}");
    for result in &found {
        assert_eq!(
            result.status,
            fleet_core::command::CommandStatus::Completed,
            "{result:?}"
        );
        assert_eq!(
            result.logs, expected,
            "{}: arguments verbatim",
            result.job_id
        );
    }
    assert!(!canary.exists(), "an injected command ran");
    let _ = std::fs::remove_dir_all(dir);
}

/// HEALTH_CHECK counts the other commands running, not itself: an idle agent says 0.
#[tokio::test]
async fn health_check_counts_the_other_running_commands() {
    let (executor, journal, _dir) = executor(CommandSettings::default()).await;
    executor
        .accept(envelope("health-1", "HEALTH_CHECK", json!({})))
        .await
        .expect("accept");
    let idle = wait_results(&journal, 2).await;
    assert_eq!(idle[1].data.as_ref().expect("data")["running_commands"], 0);
    executor
        .accept(envelope(
            "sleep-1",
            "RunCommand",
            json!({"cmd": "sleep", "args": ["30"]}),
        ))
        .await
        .expect("accept");
    executor
        .accept(envelope("health-2", "HEALTH_CHECK", json!({})))
        .await
        .expect("accept");
    let busy = wait_results(&journal, 5).await;
    let health = busy
        .iter()
        .find(|r| r.job_id == "health-2" && r.data.is_some())
        .expect("the second health check");
    assert_eq!(health.data.as_ref().expect("data")["running_commands"], 1);
    executor.cancel("sleep-1");
}
