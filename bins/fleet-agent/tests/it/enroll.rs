//! First start with a one-time enrollment token, through the real binary: it trades the
//! token for its secret, stores it with mode 0600, opens the live channel and runs a command;
//! a restart uses the stored secret (the token is spent).

use std::os::unix::fs::PermissionsExt;

use serde_json::{Value, json};

use crate::*;

const ADMIN: &str = "enroll-admin";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_enrolls_with_a_one_time_token_and_keeps_its_secret() {
    let dir = temp_dir("enroll");
    let url = serve_control_plane(&dir, ADMIN, false).await;
    let client = reqwest::Client::new();
    let created: Value = client
        .post(format!("{url}/v1/enrollments"))
        .bearer_auth(ADMIN)
        .json(&json!({"instance_id": "fresh-host-1"}))
        .send()
        .await
        .expect("enroll")
        .json()
        .await
        .expect("json");
    let token = created["enrollment_token"].as_str().expect("token");
    let secret_file = dir.join("secret");
    let env: Vec<(String, String)> = [
        ("INSTANCE_ID", "fresh-host-1".to_owned()),
        ("CONTROL_PLANE_URL", url.clone()),
        ("AGENT_ENROLLMENT_TOKEN", token.to_owned()),
        ("AGENT_SECRET_FILE", secret_file.display().to_string()),
        (
            "AGENT_STATE_PATH",
            dir.join("state.db").display().to_string(),
        ),
        ("AGENT_PORT", free_port().to_string()),
        ("HEARTBEAT_INTERVAL", "60".to_owned()),
        ("AGENT_METRICS_URL", "off".to_owned()),
        ("CONTAINERS_INTERVAL", "0".to_owned()),
        ("RUST_LOG", "info".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();

    let mut agent = Guard(spawn_agent(&env, &dir));
    let done = health_check(&client, &url, ADMIN, "fresh-host-1").await;
    assert_eq!(done["targets"][0]["status"], "completed", "{done}");
    let mode = std::fs::metadata(&secret_file)
        .expect("secret stored")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    sigterm_and_wait(&mut agent).await;
    // At RUST_LOG=info nothing below info is printed, the live channel's handshake included.
    for (path, text) in agent_logs(&dir) {
        assert!(
            text.contains("live channel connected"),
            "{}: {text}",
            path.display()
        );
        assert!(
            !text.contains("DEBUG") && !text.contains("TRACE"),
            "{}: {text}",
            path.display()
        );
    }

    // Restarted with the same (now spent) token: the stored secret is used.
    let mut agent = Guard(spawn_agent(&env, &dir));
    let done = health_check(&client, &url, ADMIN, "fresh-host-1").await;
    assert_eq!(done["targets"][0]["status"], "completed", "{done}");
    sigterm_and_wait(&mut agent).await;
    let _ = std::fs::remove_dir_all(dir);
}
