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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_run_and_show() {
    let dir = std::env::temp_dir().join(format!("fleetctl-remote-{}", uuid_like()));
    std::fs::create_dir_all(&dir).expect("dir");
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
