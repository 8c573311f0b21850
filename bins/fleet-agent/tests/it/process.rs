//! The binary as a process: configuration errors, SIGKILL with a full outbox, SIGTERM.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

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

/// A RUST_LOG that is not a filter is named, not dropped in silence.
#[test]
fn an_invalid_log_filter_is_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_fleet-agent"))
        .env_clear()
        .env("RUST_LOG", "info,fleet_agent=loud")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("RUST_LOG is not a valid log filter") && stderr.contains("INSTANCE_ID"),
        "{stderr}"
    );
}

/// The command settings' problems are named with the agent's, and an enrollment token is not
/// traded (nor the control plane asked) while the rest of the configuration is bad.
#[test]
fn command_and_enrollment_problems_are_named_with_the_rest() {
    let dir = temp_dir("config-all");
    let secret_file = dir.join("secret");
    let out = Command::new(env!("CARGO_BIN_EXE_fleet-agent"))
        .env_clear()
        .env("AGENT_COMMANDS_DISABLED", "Reboot")
        .env("HEARTBEAT_INTERVAL", "soon")
        .env("AGENT_ENROLLMENT_TOKEN", "one-time-token")
        .env("AGENT_SECRET_FILE", &secret_file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "AGENT_COMMANDS_DISABLED: unknown command type \"Reboot\"",
        "INSTANCE_ID is required",
        "CONTROL_PLANE_URL is required",
        "HEARTBEAT_INTERVAL must be",
    ] {
        assert!(stderr.contains(needle), "{needle} missing from:\n{stderr}");
    }
    // The token stands for the secret: its absence is no problem, and nothing was sent.
    assert!(!stderr.contains("AGENT_SECRET is required"), "{stderr}");
    assert!(!secret_file.exists());

    // A token without a file to keep the secret in is named, not silently ignored.
    let out = Command::new(env!("CARGO_BIN_EXE_fleet-agent"))
        .env_clear()
        .env("INSTANCE_ID", INSTANCE)
        .env("CONTROL_PLANE_URL", "http://127.0.0.1:9")
        .env("AGENT_ENROLLMENT_TOKEN", "one-time-token")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("AGENT_ENROLLMENT_TOKEN needs AGENT_SECRET_FILE"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
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

/// A control plane that stays down is one warning from each side of the agent (heartbeats,
/// the live channel's registration), not one per retry.
#[tokio::test]
async fn an_unreachable_control_plane_is_warned_about_once() {
    let dir = temp_dir("unreachable");
    let env: Vec<(String, String)> = [
        ("INSTANCE_ID", INSTANCE.to_owned()),
        (
            "CONTROL_PLANE_URL",
            format!("http://127.0.0.1:{}", free_port()),
        ),
        ("AGENT_SECRET", SECRET.to_owned()),
        ("HEARTBEAT_INTERVAL", "0.5".to_owned()),
        ("SEND_BACKOFF_BASE_MS", "100".to_owned()),
        ("SEND_BACKOFF_MAX", "1".to_owned()),
        ("AGENT_PORT", free_port().to_string()),
        (
            "AGENT_STATE_PATH",
            dir.join("state.db").display().to_string(),
        ),
        ("AGENT_METRICS_URL", "off".to_owned()),
        ("CONTAINERS_INTERVAL", "0".to_owned()),
        ("RUST_LOG", "info".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let mut agent = Guard(spawn_agent(&env, &dir));
    // Long enough for the live channel's backoff (1 s, 2 s, 4 s) to retry three times.
    tokio::time::sleep(Duration::from_secs(8)).await;
    sigterm_and_wait(&mut agent).await;
    let (_, log) = agent_logs(&dir).pop().expect("the agent's log");
    let warnings = |about: &str| {
        log.lines()
            .filter(|line| line.contains("WARN") && line.contains(about))
            .count()
    };
    assert_eq!(warnings("control plane unreachable"), 1, "{log}");
    assert_eq!(warnings("registration"), 1, "{log}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A control plane that refuses every v1 signature while its clock (its `Date` header) is
/// ten minutes ahead: the agent names the clock as the cause, not the secret, for its
/// heartbeats and for the live channel's registration, and an operator learns what to fix
/// from the log alone.
#[tokio::test]
async fn a_signature_refused_for_this_hosts_clock_is_named_as_such() {
    let seen = Seen::new(INSTANCE, SECRET);
    seen.set_mode(crate::receiver::Mode::ClockAhead(600));
    let receiver = Receiver::start_with(seen.clone(), 0).await;
    let dir = temp_dir("clock");
    let env = offline_env(&dir, &receiver.url(), free_port());
    let mut agent = Guard(spawn_agent(&env, &dir));
    // Until both sides of the agent (heartbeats, the live channel) have been refused.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let log = agent_logs(&dir)
            .pop()
            .map(|(_, log)| log)
            .unwrap_or_default();
        if log.contains("refused this agent's signature") && log.contains("registration failed") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not refused: {log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sigterm_and_wait(&mut agent).await;
    let (_, log) = agent_logs(&dir).pop().expect("the agent's log");
    let refused: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("ERROR") && line.contains("refused this agent's signature"))
        .collect();
    assert_eq!(refused.len(), 1, "{log}");
    assert!(
        refused[0].contains("this host's clock is")
            && refused[0].contains("s behind the control plane's")
            && refused[0].contains("set this host's clock (NTP)")
            && !refused[0].contains("check AGENT_SECRET"),
        "{log}"
    );
    let registration = log
        .lines()
        .find(|line| line.contains("registration failed"))
        .unwrap_or_else(|| panic!("no registration warning: {log}"));
    assert!(
        registration.contains("registration answered 401")
            && registration.contains("s behind the control plane's")
            && registration.contains("(NTP)"),
        "{registration}"
    );
    receiver.stop().await;
    let _ = std::fs::remove_dir_all(dir);
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

/// Starts the agent binary as [`spawn_agent`] does, under `umask 022` (the usual default):
/// the modes of the files it creates are then the agent's doing, not the test's umask.
fn spawn_agent_umask_022(env: &[(String, String)], dir: &Path) -> Child {
    let n = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    let log = std::fs::File::create(dir.join(format!("agent-{n}.log"))).unwrap();
    Command::new("/bin/sh")
        .args(["-c", "umask 022 && exec \"$0\""])
        .arg(env!("CARGO_BIN_EXE_fleet-agent"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start fleet-agent")
}

/// An agent without a control plane (its heartbeats wait in the outbox), with the live
/// channel on (so the command journal is opened too), state in `dir/state.db`.
fn offline_env(dir: &Path, control_plane: &str, local_port: u16) -> Vec<(String, String)> {
    [
        ("INSTANCE_ID", INSTANCE.to_owned()),
        ("CONTROL_PLANE_URL", control_plane.to_owned()),
        ("AGENT_SECRET", SECRET.to_owned()),
        ("HEARTBEAT_INTERVAL", "0.5".to_owned()),
        ("AGENT_PORT", local_port.to_string()),
        ("AGENT_LOCAL_TOKEN", LOCAL_TOKEN.to_owned()),
        (
            "AGENT_STATE_PATH",
            dir.join("state.db").display().to_string(),
        ),
        ("AGENT_METRICS_URL", "off".to_owned()),
        ("CONTAINERS_INTERVAL", "0".to_owned()),
        ("RUST_LOG", "info".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|err| panic!("{}: {err}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// The state file (queued heartbeats, job reports) and the command journal beside it (command
/// output) are 0600 with their `-wal` and `-shm`, under the usual umask 022; a state file an
/// older agent left 0644 is tightened, and the log says so, naming it.
#[tokio::test]
async fn state_files_are_readable_by_the_agent_s_user_only() {
    let fresh = temp_dir("modes-fresh");
    let older = temp_dir("modes-older");
    for name in ["state.db", "state.commands.db"] {
        let file = older.join(name);
        std::fs::write(&file, b"").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let unreachable = format!("http://127.0.0.1:{}", free_port());
    let mut agents = Vec::new();
    for dir in [&fresh, &older] {
        let port = free_port();
        agents.push((
            Guard(spawn_agent_umask_022(
                &offline_env(dir, &unreachable, port),
                dir,
            )),
            port,
        ));
    }
    for (_, port) in &agents {
        // A heartbeat written to the outbox: the state file's WAL exists by now.
        assert!(wait_for_queued(*port, 1.0).await >= 1.0);
    }
    for dir in [&fresh, &older] {
        for name in [
            "state.db",
            "state.db-wal",
            "state.db-shm",
            "state.commands.db",
        ] {
            assert_eq!(mode(&dir.join(name)), 0o600, "{}", dir.join(name).display());
        }
        for name in ["state.commands.db-wal", "state.commands.db-shm"] {
            let file = dir.join(name);
            if file.exists() {
                assert_eq!(mode(&file), 0o600, "{}", file.display());
            }
        }
    }
    for (mut agent, _) in agents {
        sigterm_and_wait(&mut agent).await;
    }
    let (_, log) = agent_logs(&older).pop().expect("the agent's log");
    for name in ["state.db", "state.commands.db"] {
        let named = log.lines().any(|line| {
            line.contains("WARN")
                && line.contains("open to other users")
                && line.contains(&older.join(name).display().to_string())
        });
        assert!(named, "no warning naming {name}:\n{log}");
    }
    let (_, log) = agent_logs(&fresh).pop().expect("the agent's log");
    assert!(!log.contains("open to other users"), "{log}");
    let _ = std::fs::remove_dir_all(fresh);
    let _ = std::fs::remove_dir_all(older);
}

/// Plain `http://` to another host still works (ERP setups on private networks use it) but
/// is warned about at start, naming `CONTROL_PLANE_URL`; to this machine it is not.
#[tokio::test]
async fn plain_http_to_another_host_is_warned_about_at_start() {
    // TEST-NET-1 (RFC 5737): another host that nothing answers.
    let cases = [
        ("remote", "http://192.0.2.1:8080", true),
        ("loopback", "http://127.0.0.1:9", false),
        ("localhost", "http://localhost:9", false),
    ];
    let mut agents = Vec::new();
    for (name, url, _) in cases {
        let dir = temp_dir(&format!("plain-http-{name}"));
        let env = offline_env(&dir, url, free_port());
        agents.push((Guard(spawn_agent(&env, &dir)), dir));
    }
    for ((_, url, warned), (agent, dir)) in cases.iter().zip(agents) {
        let started = wait_until(30, || {
            agent_logs(&dir)
                .iter()
                .any(|(_, log)| log.contains("fleet agent started"))
        })
        .await;
        assert!(
            started,
            "{url}: the agent did not start; see {}",
            dir.display()
        );
        // The warning comes before the start line: the whole of it is in the log by now.
        drop(agent);
        let (_, log) = agent_logs(&dir).pop().expect("the agent's log");
        let warnings: Vec<&str> = log
            .lines()
            .filter(|line| line.contains("WARN") && line.contains("CONTROL_PLANE_URL"))
            .collect();
        if *warned {
            assert_eq!(warnings.len(), 1, "{url}:\n{log}");
            assert!(
                warnings[0].contains("http://") && warnings[0].contains("https://"),
                "says why and what to do: {}",
                warnings[0]
            );
        } else {
            assert!(warnings.is_empty(), "{url}:\n{log}");
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
