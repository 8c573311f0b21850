//! fleetctl against a real control plane (in this process, on 127.0.0.1:0) with a real
//! agent connected: enroll, run with live output, commands show.

use std::sync::Arc;
use std::time::Duration;

use fleet_agent::{Agent, AgentConfig, CommandSettings};
use fleet_server::{ControlPlane, ControlPlaneBuilder, LiveSettings, RoleTokens, SqliteStore};

const ADMIN: &str = "fleetctl-admin";
const INSTANCE: &str = "ctl-001";
const SECRET: &str = "ctl-agent-secret";

async fn fleetctl(url: &str, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_fleetctl"))
        .args(args)
        .env("FLEET_URL", url)
        .env("FLEET_TOKEN", ADMIN)
        .output()
        .await
        .expect("fleetctl runs")
}

/// A control plane on 127.0.0.1:0 over SQLite in `dir`, knowing `INSTANCE`'s secret;
/// returns its URL.
async fn start_server(dir: &std::path::Path) -> String {
    start_server_with(dir, |builder| builder).await
}

/// Like [`start_server`], with `configure` applied to the control plane's builder.
async fn start_server_with(
    dir: &std::path::Path,
    configure: impl FnOnce(ControlPlaneBuilder) -> ControlPlaneBuilder,
) -> String {
    let store = SqliteStore::connect(&format!("sqlite://{}", dir.join("cp.db").display()))
        .await
        .expect("store");
    let secrets = fleet_core::SecretResolver::from_config(
        // `shop-offline` is listed but never connects: an agent that is down.
        Some(
            &serde_json::json!({ INSTANCE: SECRET, "shop-offline": "offline-secret" }).to_string(),
        ),
        None,
    )
    .expect("secrets");
    let builder = ControlPlane::builder()
        .shared_store(Arc::new(store))
        .secrets(secrets)
        .tokens(RoleTokens {
            admin: Some(ADMIN.into()),
            ..Default::default()
        });
    let router = configure(builder).build().expect("control plane");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, router).await.expect("serve") });
    url
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fleetctl-{name}-{}", uuid_like()));
    std::fs::create_dir_all(&dir).expect("dir");
    dir
}

/// Starts `INSTANCE`'s agent (state in `dir`) against `url` and waits for its live channel.
async fn start_agent(url: &str, dir: &std::path::Path, settings: CommandSettings) {
    let mut config = AgentConfig::new(INSTANCE, url, fleet_core::Secret::new(SECRET).expect("s"));
    config.local_port = 0;
    config.state_path = dir.join("agent.db");
    config.heartbeat_interval = Duration::from_secs(3600);
    let agent = Agent::builder(config)
        .without_builtins()
        .commands(settings)
        .build()
        .expect("agent");
    tokio::spawn(async move { agent.run(std::future::pending()).await.expect("agent") });
    let client = reqwest::Client::new();
    for _ in 0..200 {
        let body: serde_json::Value = client
            .get(format!("{url}/v1/agents/connected"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .expect("get")
            .json()
            .await
            .expect("json");
        if body["connected"] == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the agent did not connect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_run_and_show() {
    let dir = scratch("remote");
    let url = start_server(&dir).await;
    start_agent(&url, &dir, CommandSettings::default()).await;

    let out = fleetctl(&url, &["enroll", "--instance-id", "shop-9"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("AGENT_ENROLLMENT_TOKEN=") && text.contains("#cloud-config"));
    // The expiry is a time a person reads, not unix seconds.
    let notice = String::from_utf8_lossy(&out.stderr);
    let until = notice
        .split("until ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap_or_else(|| panic!("no expiry in {notice}"));
    assert!(
        until.ends_with(" UTC") && until.contains('-') && until.contains(':'),
        "expiry shown as {until:?}"
    );

    let out = fleetctl(
        &url,
        &[
            "run", "--target", INSTANCE, "--", "printf", "%s\\n", "hello", "fleet",
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\nfleet\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let id = stderr
        .lines()
        .find_map(|l| l.strip_prefix("command "))
        .expect("the command id is printed")
        .to_owned();

    let out = fleetctl(&url, &["run", "--target", INSTANCE, "--", "false"]).await;
    assert!(!out.status.success());

    // One target at a time, none after the first failure: the offline one is skipped, not
    // waited for.
    let out = fleetctl(
        &url,
        &[
            "run",
            "--target",
            &format!("{INSTANCE},shop-offline"),
            "--max-concurrency",
            "1",
            "--max-errors",
            "0",
            "--",
            "false",
        ],
    )
    .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{INSTANCE}: failed (exit 1)"))
            && stderr.contains("shop-offline: skipped"),
        "{stderr}"
    );

    let out = fleetctl(&url, &["commands", "show", &id]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("RunCommand completed") && text.contains(INSTANCE),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Output past the control plane's cap: `run` prints what was stored and then says it was
/// cut, and so does `commands show`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_says_when_the_control_plane_cut_the_output() {
    let dir = scratch("cut");
    let url = start_server_with(&dir, |builder| {
        builder.live(LiveSettings {
            output_max_bytes: 4096,
            ..Default::default()
        })
    })
    .await;
    start_agent(&url, &dir, CommandSettings::default()).await;
    let out = fleetctl(
        &url,
        &[
            "run",
            "--target",
            INSTANCE,
            "--",
            "head",
            "-c",
            "10000",
            "/dev/zero",
        ],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(out.stdout, vec![0; 4096]);
    assert!(
        stderr.contains("\noutput truncated at 4 KiB by the control plane\n"),
        "{stderr}"
    );
    let id = stderr
        .lines()
        .find_map(|l| l.strip_prefix("command "))
        .expect("the command id is printed")
        .to_owned();
    let out = fleetctl(&url, &["commands", "show", &id]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("\n    output truncated at 4 KiB by the control plane"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// The next line of `from` into `line`, within 30 s.
async fn read_line(from: &mut (impl tokio::io::AsyncBufRead + Unpin), line: &mut String) {
    use tokio::io::AsyncBufReadExt;
    line.clear();
    tokio::time::timeout(Duration::from_secs(30), from.read_line(line))
        .await
        .expect("a line in time")
        .expect("read");
}

fn uuid_like() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    )
}

/// A target whose agent never takes the command: `run` says what it is waiting for, the
/// command is listed, and `commands cancel` withdraws it, which ends the `run` too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_no_agent_takes_is_announced_listed_and_cancelled() {
    use tokio::io::{AsyncReadExt, BufReader};
    let dir = scratch("pickup");
    let url = start_server(&dir).await;
    let mut run = tokio::process::Command::new(env!("CARGO_BIN_EXE_fleetctl"))
        .args(["run", "--target", "shop-offline", "--", "true"])
        .env("FLEET_URL", &url)
        .env("FLEET_TOKEN", ADMIN)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("fleetctl run starts");
    let mut stderr = BufReader::new(run.stderr.take().expect("stderr"));
    let mut line = String::new();
    read_line(&mut stderr, &mut line).await;
    let id = line
        .trim_end()
        .strip_prefix("command ")
        .expect("the command id comes first")
        .to_owned();
    read_line(&mut stderr, &mut line).await;
    assert!(
        line.starts_with("waiting for shop-offline:")
            && line.contains(&format!("fleetctl commands cancel {id}")),
        "{line}"
    );

    let out = fleetctl(&url, &["commands", "list"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    let row = table.lines().find(|l| l.starts_with(&id)).expect("listed");
    assert!(
        row.contains("RunCommand") && row.contains("running") && row.ends_with("shop-offline"),
        "{table}"
    );
    let out = fleetctl(&url, &["commands", "list", "--json", "--limit", "5"]).await;
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(listed["items"][0]["id"], id.as_str(), "{listed}");
    // Released to an agent that never took it: sent, not running.
    assert_eq!(listed["items"][0]["sent"], 1, "{listed}");
    assert_eq!(listed["items"][0]["running"], 0, "{listed}");

    let out = fleetctl(&url, &["commands", "cancel", &id]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 target(s)"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let status = tokio::time::timeout(Duration::from_secs(30), run.wait())
        .await
        .expect("run ends once the command is cancelled")
        .expect("wait");
    assert!(!status.success());
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).await.expect("read");
    assert!(rest.contains("shop-offline: cancelled"), "{rest}");

    let out = fleetctl(&url, &["commands", "show", &id]).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("cancelled"));
    // An id is checked before it becomes part of a URL path.
    let out = fleetctl(&url, &["commands", "show", "../../api/installations"]).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not a command id"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A deploy that fails says why: compose's own message (the end of its output) and how many
/// targets did not complete, not just "exited with 1" and the command's status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_deploy_shows_what_compose_said() {
    let dir = scratch("deploy");
    let url = start_server(&dir).await;
    // Stands in for a compose that cannot read the file (what docker-compose prints then).
    let compose = [
        "/bin/sh",
        "-c",
        "echo 'yaml.parser.ParserError: expected a flow sequence, line 1, column 11' >&2; exit 1",
        "fake-compose",
    ];
    let settings = CommandSettings {
        projects_dir: dir.join("projects"),
        compose_command: compose.iter().map(|a| (*a).to_owned()).collect(),
        ..CommandSettings::default()
    };
    start_agent(&url, &dir, settings).await;
    let file = dir.join("web.yml");
    std::fs::write(&file, "services: [this is: not valid\n").expect("compose file");
    let out = fleetctl(
        &url,
        &[
            "deploy",
            "--target",
            INSTANCE,
            "--project",
            "web",
            &file.display().to_string(),
        ],
    )
    .await;
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("DEPLOY_COMPOSE completed") && stdout.contains("failed"),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "--- {INSTANCE} (failed) ---\nyaml.parser.ParserError"
        )) && stderr.contains("fleetctl: 1 of 1 target(s) did not complete"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A TCP proxy to the control plane at `upstream` whose connections can all be cut at once
/// (a control plane restarting, a load balancer failing over): each send on the returned
/// sender cuts the connections open then. Returns the proxy's URL.
async fn cuttable_proxy(upstream: &str) -> (String, tokio::sync::watch::Sender<u32>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let upstream = upstream.trim_start_matches("http://").to_owned();
    let (cut, _) = tokio::sync::watch::channel(0u32);
    let cuts = cut.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let upstream = upstream.clone();
            let mut cut = cuts.subscribe();
            tokio::spawn(async move {
                let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    _ = cut.changed() => {}
                }
            });
        }
    });
    (url, cut)
}

/// `run` outlasts a lost connection to the control plane: it opens the output stream again
/// where it stopped and ends with the command, every line shown once, exit status 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_follows_on_after_the_connection_is_cut() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
    let dir = scratch("cut");
    let url = start_server(&dir).await;
    start_agent(&url, &dir, CommandSettings::default()).await;
    let (proxy, cut) = cuttable_proxy(&url).await;
    let gate = dir.join("gate");
    let script = format!(
        "echo one; while [ ! -e '{}' ]; do sleep 0.1; done; echo two; echo three",
        gate.display()
    );
    let mut run = tokio::process::Command::new(env!("CARGO_BIN_EXE_fleetctl"))
        .args(["run", "--target", INSTANCE, "--shell", "--", &script])
        .env("FLEET_URL", &proxy)
        .env("FLEET_TOKEN", ADMIN)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("fleetctl run starts");
    let mut stdout = BufReader::new(run.stdout.take().expect("stdout"));
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(30), stdout.read_line(&mut line))
        .await
        .expect("the first line in time")
        .expect("read");
    assert_eq!(line, "one\n");
    cut.send_modify(|n| *n += 1);
    // The rest of the output comes while fleetctl has no connection.
    std::fs::write(&gate, "").expect("gate");
    let status = tokio::time::timeout(Duration::from_secs(60), run.wait())
        .await
        .expect("run ends with the command")
        .expect("wait");
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).await.expect("read");
    let mut stderr = String::new();
    let mut err = run.stderr.take().expect("stderr");
    err.read_to_string(&mut stderr).await.expect("read");
    assert!(status.success(), "{stderr}");
    assert_eq!(rest, "two\nthree\n", "{stderr}");
    assert!(
        stderr.contains(&format!("{INSTANCE}: lost the output stream")),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// `fleetctl send` takes any command type and waits for it: a `HEALTH_CHECK` comes back
/// with what the agent found. A payload the control plane would refuse is not sent at all,
/// and the error names the field, whether given inline or as `@FILE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_takes_any_command_type_and_sends_no_payload_that_would_be_refused() {
    let dir = scratch("send");
    let url = start_server(&dir).await;
    let settings = CommandSettings {
        projects_dir: dir.join("projects"),
        ..CommandSettings::default()
    };
    start_agent(&url, &dir, settings).await;

    let out = fleetctl(&url, &["send", "--target", INSTANCE, "HEALTH_CHECK"]).await;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("HEALTH_CHECK completed"), "{stdout}");
    assert!(stdout.contains(&format!("\n{INSTANCE}: {{")), "{stdout}");

    let latest = r#"{"version": "latest", "url": "https://dl.example/fleet-agent"}"#;
    let file = dir.join("update.json");
    std::fs::write(&file, latest).expect("payload file");
    for payload in [latest.to_owned(), format!("@{}", file.display())] {
        let out = fleetctl(
            &url,
            &["send", "--target", INSTANCE, "UpdateAgent", &payload],
        )
        .await;
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("not sent") && stderr.contains("payload.version: must be a SemVer"),
            "{stderr}"
        );
    }
    let out = fleetctl(&url, &["send", "--target", INSTANCE, "STATUS", "{not json"]).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the payload is not JSON"),
        "{out:?}"
    );
    let listed: serde_json::Value = reqwest::Client::new()
        .get(format!("{url}/v1/commands"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    let sent = listed["items"].as_array().map_or(0, Vec::len);
    assert_eq!(sent, 1, "only the health check was sent: {listed}");
    let _ = std::fs::remove_dir_all(dir);
}
