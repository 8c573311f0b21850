//! fleetctl against a real control plane (in this process, on 127.0.0.1:0) with a real
//! agent connected: enroll, run with live output, commands show.

use std::sync::Arc;
use std::time::Duration;

use fleet_agent::{Agent, AgentConfig, CommandSettings};
use fleet_server::{ControlPlane, RoleTokens, SqliteStore};

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
    let store = SqliteStore::connect(&format!("sqlite://{}", dir.join("cp.db").display()))
        .await
        .expect("store");
    let secrets = fleet_core::SecretResolver::from_config(
        Some(&serde_json::json!({ INSTANCE: SECRET }).to_string()),
        None,
    )
    .expect("secrets");
    let router = ControlPlane::builder()
        .shared_store(Arc::new(store))
        .secrets(secrets)
        .tokens(RoleTokens {
            admin: Some(ADMIN.into()),
            ..Default::default()
        })
        .build()
        .expect("control plane");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_run_and_show() {
    let dir = scratch("remote");
    let url = start_server(&dir).await;

    let mut config = AgentConfig::new(INSTANCE, &url, fleet_core::Secret::new(SECRET).expect("s"));
    config.local_port = 0;
    config.state_path = dir.join("agent.db");
    config.heartbeat_interval = Duration::from_secs(3600);
    let agent = Agent::builder(config)
        .without_builtins()
        .commands(CommandSettings::default())
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
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

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
