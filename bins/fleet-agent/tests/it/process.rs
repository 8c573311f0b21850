//! The binary as a process: configuration errors, SIGKILL with a full outbox, SIGTERM.

use std::process::Command;

use crate::receiver::{Receiver, Seen};
use crate::*;

#[test]
fn every_configuration_problem_is_named_at_once() {
    let out = Command::new(env!("CARGO_BIN_EXE_fleet-agent"))
        .env_clear()
        .env("HEARTBEAT_INTERVAL_MIN", "soon")
        .env("AGENT_BIND", "0.0.0.0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "INSTANCE_ID is required",
        "CONTROL_PLANE_URL is required",
        "AGENT_SECRET is required",
        "HEARTBEAT_INTERVAL_MIN",
        "AGENT_LOCAL_TOKEN must be set",
    ] {
        assert!(stderr.contains(needle), "{needle} missing from:\n{stderr}");
    }
}

#[test]
fn help_and_version_answer_and_any_other_argument_is_refused() {
    let run = |arg: &str| {
        Command::new(env!("CARGO_BIN_EXE_fleet-agent"))
            .env_clear()
            .arg(arg)
            .output()
            .unwrap()
    };
    let help = run("--help");
    assert_eq!(help.status.code(), Some(0));
    let text = String::from_utf8_lossy(&help.stdout);
    for needle in [
        "INSTANCE_ID",
        "CONTROL_PLANE_URL",
        "AGENT_SECRET",
        "AGENT_ENROLLMENT_TOKEN",
        "fleet-agent-lib/README.md",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    let version = run("--version");
    assert_eq!(version.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("fleet-agent {}", env!("CARGO_PKG_VERSION"))
    );
    // A setting given as a flag would otherwise be ignored without a word.
    let refused = run("--instance-id=shop-1");
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("unexpected argument --instance-id=shop-1") && stderr.contains("--help"),
        "{stderr}"
    );
}

/// Stop the receiver, let the agent queue N heartbeats, kill -9 the agent, restart both:
/// all N arrive exactly once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_a_full_outbox_loses_nothing_and_duplicates_nothing() {
    const N: f64 = 5.0;
    let dir = temp_dir("kill9");
    let seen = Seen::new(INSTANCE, SECRET);
    let receiver = Receiver::start_with(seen.clone(), 0).await;
    let port = receiver.addr.port();
    let local_port = free_port();
    let env = agent_env(&receiver.url(), &dir, local_port);
    let mut agent = Guard(spawn_agent(&env, &dir));

    assert!(
        wait_until(30, || !seen.accepted.lock().unwrap().is_empty()).await,
        "no heartbeat arrived; see {}",
        dir.display()
    );
    let first = seen.bodies()[0].clone();
    for check in first["checks"].as_array().unwrap() {
        // Every built-in source that is configured here is green.
        assert_eq!(check["ok"], true, "{check}");
    }
    let names: Vec<&str> = first["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, ["db", "redis", "db_size", "host", "containers"]);

    receiver.stop().await;
    let queued = wait_for_queued(local_port, N).await;
    assert!(queued >= N, "only {queued} queued");
    agent.0.kill().unwrap(); // SIGKILL
    agent.0.wait().unwrap();

    let stranded = waiting_ids(&dir).await;
    assert!(stranded.len() >= N as usize, "{stranded:?}");
    let before = seen.accepted.lock().unwrap().len();

    let receiver = Receiver::start_with(seen.clone(), port).await;
    let mut agent = Guard(spawn_agent(&env, &dir));
    let expect = before + stranded.len();
    assert!(
        wait_until(60, || seen.accepted.lock().unwrap().len() >= expect).await,
        "stranded messages did not all arrive; see {}",
        dir.display()
    );
    let ids: Vec<String> = seen
        .accepted
        .lock()
        .unwrap()
        .iter()
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(&ids[before..expect], &stranded[..], "in order, each once");
    let unique: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len());

    sigterm_and_wait(&mut agent).await;
    assert_eq!(
        seen.bad_signatures
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    receiver.stop().await;
}
