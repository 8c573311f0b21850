//! Builds the container image from `deploy/agent.Containerfile` with podman, runs it, and
//! sees its heartbeats arrive.

use std::process::Command;
use std::time::Duration;

use crate::receiver::Receiver;
use crate::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_container_image_runs_and_its_heartbeats_arrive() {
    service_env("DOCKER_HOST"); // podman is set up by the same script
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let tag = format!(
        "localhost/fleet-agent-it/agent:{}",
        uuid::Uuid::new_v4().simple()
    );
    let build = Command::new(root.join("deploy/build-image.sh"))
        .arg(env!("CARGO_BIN_EXE_fleet-agent"))
        .arg(&tag)
        .output()
        .expect("run deploy/build-image.sh");
    assert!(
        build.status.success(),
        "image build failed:\n{}{}",
        String::from_utf8_lossy(&build.stdout),
        String::from_utf8_lossy(&build.stderr)
    );

    let receiver = Receiver::start(INSTANCE, SECRET).await;
    let name = format!("fleet-agent-it-{}", uuid::Uuid::new_v4().simple());
    // Host networking (this machine's podman has no bridge), so 127.0.0.1 is the host's.
    let run = Command::new("podman")
        .args(["run", "-d", "--name", &name, "--network", "host"])
        .args(["-e", &format!("INSTANCE_ID={INSTANCE}")])
        .args(["-e", &format!("CONTROL_PLANE_URL={}", receiver.url())])
        .args(["-e", &format!("AGENT_SECRET={SECRET}")])
        .args(["-e", "HEARTBEAT_INTERVAL=1"])
        .args(["-e", &format!("AGENT_PORT={}", free_port())])
        .args(["-e", "AGENT_METRICS_URL=off"])
        .args(["-e", "CONTAINERS_INTERVAL=0"])
        .arg(&tag)
        .output()
        .expect("podman run");
    let cleanup = || {
        let _ = Command::new("podman")
            .args(["rm", "-f", "-t", "2", &name])
            .output();
        let _ = Command::new("podman").args(["rmi", "-f", &tag]).output();
    };
    if !run.status.success() {
        cleanup();
        panic!("podman run: {}", String::from_utf8_lossy(&run.stderr));
    }
    let seen = receiver.seen.clone();
    let arrived = wait_until(60, || seen.accepted.lock().unwrap().len() >= 2).await;
    let logs = Command::new("podman")
        .args(["logs", &name])
        .output()
        .unwrap();
    // A clean stop on the engine's SIGTERM.
    let stop = Command::new("podman")
        .args(["stop", "-t", "10", &name])
        .output()
        .unwrap();
    let state = Command::new("podman")
        .args(["inspect", "-f", "{{.State.ExitCode}}", &name])
        .output()
        .unwrap();
    cleanup();
    assert!(
        arrived,
        "no heartbeats from the container:\n{}",
        String::from_utf8_lossy(&logs.stderr)
    );
    assert!(stop.status.success());
    assert_eq!(
        String::from_utf8_lossy(&state.stdout).trim(),
        "0",
        "exit code after SIGTERM"
    );
    let body = &seen.bodies()[0];
    assert_eq!(body["instance_id"], INSTANCE);
    tokio::time::sleep(Duration::from_millis(10)).await;
    receiver.stop().await;
}
