//! A compose project updated by a rollout, with podman: switching from image tag `:1` to
//! `:2`, whose health check fails, rolls back, and the `:1` container runs afterwards.

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::json;

use crate::rollout::{ADMIN, AGENT_SECRET, Api, job, release_key, start_server, wait_healthy};
use crate::{Guard, free_port, service_env, temp_dir};

/// Builds `image:tag` FROM scratch with static busybox; `/srv/health` only when `healthy`.
fn build_image(dir: &Path, image: &str, tag: &str, healthy: bool) {
    let ctx = dir.join(format!("image-{tag}"));
    std::fs::create_dir_all(ctx.join("srv")).expect("dir");
    std::fs::copy("/usr/bin/busybox", ctx.join("busybox")).expect(
        "static busybox at /usr/bin/busybox (busybox-static, installed by scripts/services podman)",
    );
    std::fs::write(ctx.join("srv/index.html"), format!("web {tag}\n")).expect("write");
    if healthy {
        std::fs::write(ctx.join("srv/health"), "ok\n").expect("write");
    }
    std::fs::write(
        ctx.join("Containerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nCOPY srv /srv\nENTRYPOINT [\"/bin/busybox\"]\n",
    )
    .expect("write");
    let out = Command::new("podman")
        .args(["build", "-q", "-t", &format!("{image}:{tag}"), "."])
        .current_dir(&ctx)
        .output()
        .expect("podman build");
    assert!(
        out.status.success(),
        "podman build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `image state` of the project's containers.
fn containers(project: &str) -> Vec<String> {
    let out = Command::new("podman")
        .args([
            "ps",
            "-a",
            "--filter",
            &format!("label=com.docker.compose.project={project}"),
            "--format",
            "{{.Image}} {{.State}}",
        ])
        .output()
        .expect("podman ps");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let mut words = l.split_whitespace();
            let image = words.next().unwrap_or_default();
            // Podman prints `running` or `Up 3 seconds`, depending on its version.
            let state = match words.next() {
                Some("Up" | "running") => "running",
                Some(other) => other,
                None => "unknown",
            };
            format!("{image} {state}")
        })
        .collect()
}

#[tokio::test]
async fn compose_switch_to_an_unhealthy_tag_rolls_back_to_the_running_old_one() {
    let docker_host = service_env("DOCKER_HOST");
    let root = temp_dir("compose-rollout");
    let id = uuid::Uuid::new_v4().simple().to_string();
    let image = format!("localhost/fleet-compose-it-{}/web", &id[..12]);
    let project = format!("fleetit{}", &id[..12]);
    build_image(&root, &image, "1", true);
    build_image(&root, &image, "2", false);
    let port = free_port();
    let workdir = root.join("project");
    std::fs::create_dir_all(&workdir).expect("dir");
    std::fs::write(
        workdir.join("docker-compose.yml"),
        format!(
            "version: \"3\"\nservices:\n  web:\n    image: \"{image}:${{WEB_TAG}}\"\n    \
             network_mode: host\n    stop_signal: SIGKILL\n    command: [\"httpd\", \"-f\", \"-p\", \"127.0.0.1:{port}\", \"-h\", \"/srv\"]\n"
        ),
    )
    .expect("compose file");
    std::fs::write(workdir.join(".env"), "WEB_TAG=1\n").expect("env");
    let compose = |args: &[&str]| {
        Command::new("docker-compose")
            .args(["-p", &project])
            .args(args)
            .current_dir(&workdir)
            .env("DOCKER_HOST", &docker_host)
            .output()
            .expect("docker-compose")
    };
    let up = compose(&["up", "-d"]);
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let health = format!("http://127.0.0.1:{port}/health");
    let healthy = || async {
        for _ in 0..50 {
            if reqwest::get(&health)
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        false
    };
    assert!(healthy().await, ":1 serves its health check");

    let server = start_server(&root);
    wait_healthy(&server.url).await;
    let api = Api {
        client: reqwest::Client::new(),
        url: server.url.clone(),
    };
    let up_cmd = format!("docker-compose -p {project} up -d");
    let env: Vec<(String, String)> = [
        ("INSTANCE_ID", "compose-1".to_owned()),
        ("CONTROL_PLANE_URL", server.url.clone()),
        ("AGENT_SECRET", AGENT_SECRET.to_owned()),
        ("HEARTBEAT_INTERVAL", "1".to_owned()),
        ("AGENT_PORT", "0".to_owned()),
        (
            "AGENT_STATE_PATH",
            root.join("agent.db").display().to_string(),
        ),
        ("RELEASE_CHANNEL", "stable".to_owned()),
        ("INSTANCE_VERSION", "1".to_owned()),
        ("AGENT_METRICS_URL", "off".to_owned()),
        ("CONTAINERS_INTERVAL", "0".to_owned()),
        ("DOCKER_HOST", docker_host.clone()),
        ("UPDATE_POLL_SEC", "1".to_owned()),
        ("UPDATE_STEP_TIMEOUT_SEC", "20".to_owned()),
        ("UPDATE_WORKDIR", workdir.display().to_string()),
        (
            "UPDATE_MANIFEST_PUBLIC_KEYS",
            release_key().public_key().to_base64(),
        ),
        ("UPDATE_BACKUP_CMD", "cp .env .env.previous".to_owned()),
        (
            "UPDATE_PULL_CMD",
            format!("docker image inspect \"{image}:$UPDATE_VERSION\" >/dev/null"),
        ),
        (
            "UPDATE_SWITCH_CMD",
            format!("printf 'WEB_TAG=%s\\n' \"$UPDATE_VERSION\" > .env && {up_cmd}"),
        ),
        ("UPDATE_HEALTHCHECK_URL", health.clone()),
        (
            "UPDATE_ROLLBACK_CMD",
            format!("cp .env.previous .env && {up_cmd}"),
        ),
        ("RUST_LOG", "info".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let log = std::fs::File::create(root.join("agent.log")).expect("log");
    let agent = Command::new(env!("CARGO_BIN_EXE_fleet-agent"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start fleet-agent");
    let mut agent = Guard(agent);
    api.wait_installations(1).await;
    let release = api.publish("2").await;
    let (status, rollout) = api
        .call(
            "POST",
            "/api/rollouts",
            ADMIN,
            Some(&json!({"release_id": release, "channel": "stable", "batch_size": 1})),
        )
        .await;
    assert_eq!(status, 201, "{rollout}");
    let rollout_id = rollout["id"].as_i64().expect("id");
    let ended = api
        .wait_rollout(rollout_id, 90, "the job ended", |r| {
            !matches!(
                job(r, "compose-1")["status"].as_str(),
                Some("pending" | "in_progress")
            )
        })
        .await;
    let result = job(&ended, "compose-1").clone();
    let running = containers(&project);
    let back_healthy = healthy().await;
    crate::sigterm_and_wait(&mut agent).await;
    let down = compose(&["down"]);
    for tag in ["1", "2"] {
        let _ = Command::new("podman")
            .args(["rmi", "-f", &format!("{image}:{tag}")])
            .output();
    }
    assert_eq!(result["status"], "rolled_back", "{ended:#}");
    assert_eq!(result["step"], "health");
    assert_eq!(ended["status"], "halted");
    assert_eq!(
        running,
        [format!("{image}:1 running")],
        "the :1 container runs again"
    );
    assert!(
        back_healthy,
        ":1 answers its health check after the rollback"
    );
    assert!(down.status.success());
    drop(server);
    let _ = std::fs::remove_dir_all(&root);
}
