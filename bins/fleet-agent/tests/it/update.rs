//! `UpdateAgent` through the real binary: download, SHA-256 and Ed25519 check against the
//! pinned key, atomic swap of `AGENT_BINARY_PATH`, restart into it in the same process
//! (exec), and the restarted agent confirms the update once its live channel is up.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use base64::Engine;
use ed25519_dalek::Signer as _;
use fleet_server::{ControlPlane, RoleTokens, SqliteStore};
use serde_json::json;
use sha2::Digest;

use crate::*;

const ADMIN: &str = "update-admin";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_agent_swaps_the_binary_restarts_and_confirms() {
    let dir = temp_dir("update");
    // The agent runs from its own copy, the file UpdateAgent replaces.
    let installed = dir.join("fleet-agent");
    std::fs::copy(env!("CARGO_BIN_EXE_fleet-agent"), &installed).expect("copy the binary");
    let new_binary = std::fs::read(env!("CARGO_BIN_EXE_fleet-agent")).expect("read the binary");
    let seed = [5u8; 32];
    let public = fleet_core::PrivateKey::from_seed(seed)
        .public_key()
        .to_base64();
    let signature = base64::engine::general_purpose::STANDARD.encode(
        ed25519_dalek::SigningKey::from_bytes(&seed)
            .sign(&new_binary)
            .to_bytes(),
    );
    let sha = hex::encode(sha2::Sha256::digest(&new_binary));
    let download = axum::Router::new().route(
        "/fleet-agent",
        axum::routing::get(move || {
            let bytes = new_binary.clone();
            async move { bytes }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let download_url = format!(
        "http://{}/fleet-agent",
        listener.local_addr().expect("addr")
    );
    tokio::spawn(async move { axum::serve(listener, download).await.expect("serve") });

    let store = SqliteStore::connect(&format!("sqlite://{}", dir.join("cp.db").display()))
        .await
        .expect("store");
    let router = ControlPlane::builder()
        .store(store)
        .secrets(
            fleet_core::SecretResolver::from_config(
                Some(&json!({ INSTANCE: SECRET }).to_string()),
                None,
            )
            .expect("secrets"),
        )
        .tokens(RoleTokens {
            admin: Some(ADMIN.into()),
            ..Default::default()
        })
        .build()
        .expect("control plane");
    let url = serve(router).await;

    let log = std::fs::File::create(dir.join("agent.log")).expect("log");
    let child = Command::new(&installed)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("INSTANCE_ID", INSTANCE)
        .env("CONTROL_PLANE_URL", &url)
        .env("AGENT_SECRET", SECRET)
        .env("AGENT_STATE_PATH", dir.join("state.db"))
        .env("AGENT_PORT", free_port().to_string())
        .env("AGENT_BINARY_PATH", &installed)
        .env("AGENT_UPDATE_PUBLIC_KEYS", &public)
        .env("HEARTBEAT_INTERVAL", "60")
        .env("AGENT_METRICS_URL", "off")
        .env("CONTAINERS_INTERVAL", "0")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start the installed agent");
    let mut agent = Guard(child);

    let done = run_command(
        &Client::new(),
        &url,
        ADMIN,
        json!({"command_type": "UpdateAgent", "targets": [INSTANCE],
               "payload": {"version": "2.0.0", "url": download_url, "sha256": sha, "signature": signature}}),
    )
    .await;
    let logs = || std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
    assert_eq!(
        done["targets"][0]["status"],
        "completed",
        "{done}\n{}",
        logs()
    );
    let previous = fleet_agent::commands::update_agent::previous_path(&installed);
    let marker = fleet_agent::commands::update_agent::marker_path(&installed);
    assert!(previous.exists(), "the previous binary is kept");
    assert_eq!(
        std::fs::metadata(&installed)
            .expect("installed")
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    // The same process (exec) comes back on the new binary and confirms the update.
    let confirmed = wait_until(60, || !marker.exists()).await;
    assert!(confirmed, "the update was never confirmed:\n{}", logs());
    assert!(
        agent.0.try_wait().expect("wait").is_none(),
        "the agent exited:\n{}",
        logs()
    );
    assert!(
        logs().contains("restarting into the new binary"),
        "{}",
        logs()
    );
    let done = run_command(
        &Client::new(),
        &url,
        ADMIN,
        json!({"command_type": "HEALTH_CHECK", "targets": [INSTANCE], "payload": {}}),
    )
    .await;
    assert_eq!(done["targets"][0]["status"], "completed", "{done}");
    sigterm_and_wait(&mut agent).await;
    if std::env::var_os("KEEP_UPDATE_LOG").is_some() {
        eprintln!("{}", logs());
    }
    let _ = std::fs::remove_dir_all(dir);
}

use reqwest::Client;
