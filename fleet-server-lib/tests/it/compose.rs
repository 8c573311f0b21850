//! Compose deploys end to end with the real container engine (podman with its Docker API,
//! docker-compose v1): DEPLOY_COMPOSE of a busybox httpd project answers on its port,
//! STATUS lists its container, STOP_COMPOSE stops it, `../etc` is refused with nothing
//! written. Needs `DOCKER_HOST` from `scripts/services podman`.

use std::process::Command;
use std::time::Duration;

use base64::Engine;
use serde_json::json;

use crate::commands::{INSTANCE, TestAgent, submit, wait_connected, wait_done};
use crate::support::{self, ADMIN, OPS, SECRET, TempDir, TestServer};

fn docker_host() -> String {
    match std::env::var("DOCKER_HOST") {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "DOCKER_HOST is not set: the compose test needs podman's Docker API. Run \
             `eval \"$(scripts/services podman)\"` first, or run scripts/test."
        ),
    }
}

/// Builds `FROM scratch` + static busybox; returns the tag.
fn build_image(dir: &std::path::Path) -> String {
    let tag = format!("localhost/fleet-test/web:{}", uuid::Uuid::new_v4().simple());
    std::fs::copy("/bin/busybox", dir.join("busybox")).expect("busybox-static is installed");
    std::fs::write(dir.join("index.html"), "hello from fleet\n").expect("index");
    std::fs::write(
        dir.join("Containerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nCOPY index.html /srv/index.html\n\
         CMD [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"18080\", \"-h\", \"/srv\"]\n",
    )
    .expect("containerfile");
    let built = Command::new("podman")
        .args(["build", "-t", &tag, "-f"])
        .arg(dir.join("Containerfile"))
        .arg(dir)
        .output()
        .expect("podman build");
    assert!(
        built.status.success(),
        "podman build: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    tag
}

async fn get(url: &str) -> Option<String> {
    let response = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    response.text().await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_deploy_status_stop_with_podman() {
    docker_host();
    let store = support::sqlite().await;
    let server = TestServer::start(store.store.clone()).await;
    let build_dir = TempDir::new();
    let tag = build_image(&build_dir.0);
    let projects = TempDir::new();
    let agent = TestAgent::start(&server.url, INSTANCE, SECRET, Some(&projects.0)).await;
    wait_connected(&server.client, &server.url, 1).await;

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let project = format!("web{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let compose = format!(
        "version: \"2\"\nservices:\n  web:\n    image: {tag}\n    network_mode: host\n    \
         command: [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"127.0.0.1:{port}\", \"-h\", \"/srv\"]\n"
    );
    let encoded = base64::engine::general_purpose::STANDARD.encode(&compose);
    let cleanup = |project: &str| {
        let _ = Command::new("docker-compose")
            .args(["-p", project, "-f"])
            .arg(projects.0.join(project).join("docker-compose.yml"))
            .arg("down")
            .output();
        let _ = Command::new("podman").args(["rmi", "-f", &tag]).output();
    };

    let (status, body) = submit(
        &server.client,
        &server.url,
        ADMIN,
        json!({"command_type": "DEPLOY_COMPOSE", "targets": [INSTANCE],
               "payload": {"project_name": project, "compose_file_base64": encoded}}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().expect("id").to_owned();
    let done = wait_done(&server.client, &server.url, &id, Duration::from_secs(120)).await;
    if done["status"] != "completed" {
        cleanup(&project);
        panic!("deploy failed: {done}");
    }
    // Private to the agent's user (a compose file can hold secrets), and compose still
    // reads it.
    use std::os::unix::fs::PermissionsExt;
    let dir_mode = std::fs::metadata(projects.0.join(&project))
        .expect("project dir")
        .permissions()
        .mode()
        & 0o777;
    let file_mode = std::fs::metadata(projects.0.join(&project).join("docker-compose.yml"))
        .expect("compose file")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!((dir_mode, file_mode), (0o700, 0o600));

    let url = format!("http://127.0.0.1:{port}/index.html");
    let mut answer = None;
    for _ in 0..100 {
        answer = get(&url).await;
        if answer.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if answer.as_deref() != Some("hello from fleet\n") {
        cleanup(&project);
        panic!("the service does not answer: {answer:?}");
    }

    // A compose file compose cannot read fails to deploy and leaves the running project
    // reachable: its previous file is put back, so STATUS and STOP_COMPOSE still work.
    let broken =
        base64::engine::general_purpose::STANDARD.encode("services: [this is: not valid\n");
    let (_, body) = submit(
        &server.client,
        &server.url,
        ADMIN,
        json!({"command_type": "DEPLOY_COMPOSE", "targets": [INSTANCE],
               "payload": {"project_name": project, "compose_file_base64": broken}}),
    )
    .await;
    let id = body["id"].as_str().expect("id").to_owned();
    let done = wait_done(&server.client, &server.url, &id, Duration::from_secs(120)).await;
    let kept = std::fs::read_to_string(projects.0.join(&project).join("docker-compose.yml"))
        .unwrap_or_default();
    if done["targets"][0]["status"] != "failed"
        || !done["targets"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("previous compose file was put back"))
        || kept != compose
    {
        cleanup(&project);
        panic!("a broken deploy replaced the running project's file: {done}\n{kept}");
    }
    if get(&url).await.as_deref() != Some("hello from fleet\n") {
        cleanup(&project);
        panic!("the service stopped answering after a failed deploy");
    }

    // STATUS lists the container (ops may ask).
    let (_, body) = submit(
        &server.client,
        &server.url,
        OPS,
        json!({"command_type": "STATUS", "targets": [INSTANCE], "payload": {"project_name": project}}),
    )
    .await;
    let id = body["id"].as_str().expect("id").to_owned();
    let done = wait_done(&server.client, &server.url, &id, Duration::from_secs(60)).await;
    let containers = done["targets"][0]["data"]["containers"].clone();
    let listed = containers.as_array().is_some_and(|list| {
        list.iter()
            .any(|c| c.as_str().is_some_and(|c| c.contains(&project)))
    });
    if !listed {
        cleanup(&project);
        panic!("STATUS does not list the container: {done}");
    }

    // STATUS of an unknown project is not a failure.
    let (_, body) = submit(
        &server.client,
        &server.url,
        OPS,
        json!({"command_type": "STATUS", "targets": [INSTANCE], "payload": {"project_name": "nothing-here"}}),
    )
    .await;
    let id = body["id"].as_str().expect("id").to_owned();
    let done = wait_done(&server.client, &server.url, &id, Duration::from_secs(30)).await;
    assert_eq!(done["targets"][0]["status"], "completed", "{done}");
    assert_eq!(done["targets"][0]["data"]["exists"], false);

    // STOP_COMPOSE stops it.
    let (_, body) = submit(
        &server.client,
        &server.url,
        ADMIN,
        json!({"command_type": "STOP_COMPOSE", "targets": [INSTANCE], "payload": {"project_name": project}}),
    )
    .await;
    let id = body["id"].as_str().expect("id").to_owned();
    let done = wait_done(&server.client, &server.url, &id, Duration::from_secs(120)).await;
    assert_eq!(done["targets"][0]["status"], "completed", "{done}");
    let mut stopped = false;
    for _ in 0..50 {
        if get(&url).await.is_none() {
            stopped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cleanup(&project);
    assert!(stopped, "the service still answers after STOP_COMPOSE");

    // `../etc` is refused by the control plane, and by the agent itself, writing nothing.
    let before: Vec<_> = std::fs::read_dir(&projects.0)
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    let (status, _) = submit(
        &server.client,
        &server.url,
        ADMIN,
        json!({"command_type": "DEPLOY_COMPOSE", "targets": [INSTANCE],
               "payload": {"project_name": "../etc", "compose_file_base64": encoded}}),
    )
    .await;
    assert_eq!(status, 422);
    // The agent refuses it too (a control plane that skipped validation changes nothing).
    let state = TempDir::new();
    let journal = fleet_agent::logstream::Journal::open(&state.0.join("state.db"))
        .await
        .expect("journal");
    let executor = fleet_agent::commands::Executor::new(
        journal.clone(),
        fleet_agent::CommandSettings {
            projects_dir: projects.0.join("inner"),
            ..Default::default()
        },
        None,
        std::sync::Arc::new(tokio::sync::watch::channel(false).0),
    );
    let envelope: fleet_core::command::CommandEnvelope = serde_json::from_value(json!({
        "id": "evil-1", "type": "DEPLOY_COMPOSE",
        "payload": {"project_name": "../etc", "compose_file_base64": encoded}
    }))
    .expect("envelope");
    executor.accept(envelope).await.expect("accept");
    let frames = journal.pending(0, 10).await.expect("frames");
    let last = String::from_utf8_lossy(&frames.last().expect("a result").body).into_owned();
    assert!(
        last.contains("FAILED") && last.contains("project_name"),
        "{last}"
    );
    let after: Vec<_> = std::fs::read_dir(&projects.0)
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(before, after);
    assert!(!projects.0.join("etc").exists() && !projects.0.join("inner").exists());

    agent.stop().await;
    server.stop().await;
}
