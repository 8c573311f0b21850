//! Checks and collectors against the real services: PostgreSQL, Redis, podman's Docker API.

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fleet_agent::Agent;
use fleet_agent::containers::Containers;

use crate::support::*;

fn check<'a>(hb: &'a fleet_core::Heartbeat, name: &str) -> &'a fleet_core::heartbeat::CheckResult {
    hb.checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no check {name} in {:?}", hb.checks))
}

#[tokio::test]
async fn all_checks_green_against_real_services() {
    let postgres = service_env("FLEET_TEST_POSTGRES_URL");
    let redis = service_env("FLEET_TEST_REDIS_URL");
    let docker = service_env("DOCKER_HOST");
    let app = start_app().await;
    let dir = temp_dir("green");
    let backup = dir.join("backup.json");
    std::fs::write(
        &backup,
        r#"{"lastBackupAt":"2026-02-11T02:00:00Z","id":"b-7","sizeBytes":1234,"checksum":"abc","bucket":"bk","path":"daily/b-7"}"#,
    )
    .unwrap();

    let mut c = config("http://127.0.0.1:9", &dir);
    c.database_url = Some(postgres);
    c.redis_url = Some(redis);
    c.storage_endpoint = Some(format!("http://{app}/storage/health"));
    // No scheme: the TCP fallback.
    c.search_url = Some(app.to_string());
    c.ops_url = Some(format!("http://{app}/ops"));
    c.ops_token = Some(OPS_TOKEN.into());
    c.metrics_url = Some(format!("http://{app}/metrics"));
    c.backup_meta_path = Some(backup);
    c.events_stats_url = Some(format!("http://{app}/events/stats"));
    let data = dir.join("data");
    std::fs::create_dir_all(data.join("uploads")).unwrap();
    std::fs::write(data.join("uploads/a.bin"), [7u8; 1000]).unwrap();
    c.storage_data_path = Some(data);
    c.primary_region = Some("sa-east-1".into());
    c.regional_endpoints = vec![fleet_agent::RegionalEndpoint {
        region: "sa-east-1".into(),
        endpoint: format!("http://{app}/storage/health"),
    }];
    c.docker_host = docker;
    c.containers_interval = Duration::from_secs(60);
    let agent = Agent::builder(c).build().unwrap();
    let hb = agent.heartbeat().await;

    for c in &hb.checks {
        assert!(c.ok, "check {} failed: {:?}", c.name, c.error);
        assert!(c.latency_ms.is_some());
    }
    let protocol = |name| {
        check(&hb, name).extra["protocol"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(protocol("db"), "postgres");
    assert_eq!(protocol("redis"), "redis");
    assert_eq!(protocol("storage"), "http");
    assert_eq!(protocol("search"), "tcp");
    let names: BTreeSet<_> = hb.checks.iter().map(|c| c.name.as_str()).collect();
    for n in [
        "db",
        "redis",
        "storage",
        "search",
        "ops",
        "backup",
        "slo",
        "host",
        "containers",
    ] {
        assert!(names.contains(n), "{n} missing from {names:?}");
    }
    assert!(hb.db_ok && hb.redis_ok && hb.storage_ok);
    assert_eq!(hb.search_ok, Some(true));
    assert_eq!(hb.health.as_deref(), Some("ok"));
    assert_eq!(hb.jobs_failed, 1);
    assert_eq!(hb.job_failures[0].queue.as_deref(), Some("billing"));
    assert_eq!(
        (hb.secrets_expired, hb.secrets_unverified),
        (Some(1), Some(2))
    );
    assert_eq!(hb.jobs_processed_1h, Some(42));
    assert_eq!(hb.slo_p95_ms, Some(180.0));
    assert_eq!(hb.slo_error_rate, Some(0.05));
    assert_eq!(hb.slo_webhook_retry_rate, Some(0.1));
    assert_eq!(hb.last_backup_at.as_deref(), Some("2026-02-11T02:00:00Z"));
    assert_eq!(hb.backup_id.as_deref(), Some("b-7"));
    assert!(hb.memory_total_bytes.unwrap() > 0 && hb.disk_total_bytes.unwrap() > 0);
    assert!(hb.network_rx_bytes.is_some() && hb.cpu_usage_pct.is_some());
    assert!(hb.host.as_ref().unwrap().hostname.is_some());
    assert!(hb.db_size_bytes.unwrap() > 0);
    assert_eq!(hb.storage_size_bytes, Some(1000));
    assert_eq!(hb.extra["events_total_1h"], 120);
    assert_eq!(hb.extra["events_avg_lag_ms"], 35.5);
    let region = &hb.extra["regional_health"][0];
    assert_eq!(
        (region["role"].as_str(), region["ok"].as_bool()),
        (Some("primary"), Some(true))
    );
    assert_eq!(hb.extra["primary_region"], "sa-east-1");
    // The heartbeat passes the protocol's own validation.
    fleet_core::Heartbeat::decode(&hb.to_vec(), &fleet_core::Limits::default()).unwrap();
}

/// A Redis server of this test's own, on a free port, so stopping it harms no one else.
struct OwnRedis {
    port: u16,
    child: Child,
}

impl OwnRedis {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/services redis)");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { port, child }
    }

    fn shutdown(&mut self) {
        let status = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "shutdown", "nosave"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli");
        // redis-cli reports the dropped connection as an error; what counts is the exit.
        let _ = status;
        let _ = self.child.wait();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn redis_stopped_gives_redis_ok_false_with_a_reason() {
    let postgres = service_env("FLEET_TEST_POSTGRES_URL");
    let mut redis = OwnRedis::start();
    let dir = temp_dir("redis-down");
    let mut c = config("http://127.0.0.1:9", &dir);
    c.database_url = Some(postgres);
    c.redis_url = Some(format!("redis://127.0.0.1:{}", redis.port));
    let agent = Agent::builder(c).build().unwrap();

    let before = agent.heartbeat().await;
    assert!(before.redis_ok, "{:?}", check(&before, "redis").error);

    redis.shutdown();
    let after = agent.heartbeat().await;
    assert!(!after.redis_ok);
    let reason = check(&after, "redis").error.clone().unwrap();
    assert!(reason.contains("refused"), "reason: {reason}");
    // Everything else still reports.
    assert!(after.db_ok, "{:?}", check(&after, "db").error);
    assert!(after.memory_total_bytes.is_some());
    assert_eq!(after.health.as_deref(), Some("degraded"));
}

#[tokio::test]
async fn redis_auth_is_sent_and_refusals_are_explained() {
    let redis = OwnRedis::start();
    let set = Command::new("redis-cli")
        .args([
            "-p",
            &redis.port.to_string(),
            "config",
            "set",
            "requirepass",
            "pw-123",
        ])
        .output()
        .unwrap();
    assert!(set.status.success());
    let dir = temp_dir("redis-auth");
    let mut c = config("http://127.0.0.1:9", &dir);
    c.redis_url = Some(format!("redis://:pw-123@127.0.0.1:{}", redis.port));
    let good = Agent::builder(c.clone()).build().unwrap().heartbeat().await;
    assert!(good.redis_ok, "{:?}", check(&good, "redis").error);
    c.redis_url = Some(format!("redis://:wrong@127.0.0.1:{}", redis.port));
    let bad = Agent::builder(c).build().unwrap().heartbeat().await;
    let reason = check(&bad, "redis").error.clone().unwrap();
    assert!(reason.starts_with("AUTH refused"), "{reason}");
    assert!(
        !reason.contains("wrong"),
        "the password must not leak: {reason}"
    );
}

#[tokio::test]
async fn a_wrong_postgres_password_fails_without_leaking_it() {
    let postgres = service_env("FLEET_TEST_POSTGRES_URL");
    let wrong = postgres.replace("fleet-test-password", "not-the-password");
    let dir = temp_dir("pg-wrong");
    let mut c = config("http://127.0.0.1:9", &dir);
    c.database_url = Some(wrong);
    let hb = Agent::builder(c).build().unwrap().heartbeat().await;
    assert!(!hb.db_ok);
    let reason = check(&hb, "db").error.clone().unwrap();
    assert!(reason.contains("password"), "{reason}");
    assert!(!reason.contains("not-the-password"), "{reason}");
}

const IMAGE: &str = "localhost/fleet-agent-it/busybox:1";

/// Builds a tiny image from the static busybox (no registry is reachable here).
pub fn ensure_busybox_image() {
    let exists = Command::new("podman")
        .args(["image", "exists", IMAGE])
        .status();
    if exists.map(|s| s.success()).unwrap_or(false) {
        return;
    }
    let dir = temp_dir("image");
    std::fs::copy("/bin/busybox", dir.join("busybox"))
        .expect("/bin/busybox (busybox-static) is needed to build the test image");
    std::fs::write(
        dir.join("Containerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\n",
    )
    .unwrap();
    let out = Command::new("podman")
        .args(["build", "-q", "-t", IMAGE])
        .arg(&dir)
        .output()
        .expect("podman");
    assert!(
        out.status.success(),
        "podman build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn podman_ids() -> BTreeSet<String> {
    let out = Command::new("podman")
        .args(["ps", "-a", "--no-trunc", "--format", "{{.ID}}"])
        .output()
        .expect("podman");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn the_container_list_matches_podman() {
    let docker = service_env("DOCKER_HOST");
    ensure_busybox_image();
    let name = format!("fleet-agent-it-{}", uuid::Uuid::new_v4().simple());
    let run = Command::new("podman")
        .args([
            "run",
            "-d",
            "--name",
            &name,
            IMAGE,
            "/bin/busybox",
            "sleep",
            "300",
        ])
        .output()
        .expect("podman run");
    assert!(
        run.status.success(),
        "podman run: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let id = String::from_utf8_lossy(&run.stdout).trim().to_owned();

    let containers = Containers::new(&docker, Duration::ZERO).unwrap();
    let mut matched = false;
    let mut last = String::new();
    // Other tests may start or remove containers meanwhile: compare when podman's own view
    // is the same before and after our listing.
    for _ in 0..10 {
        let before = podman_ids();
        let listed = containers.list().await.unwrap();
        let after = podman_ids();
        let ours: BTreeSet<String> = listed.iter().map(|c| c.id.clone()).collect();
        if before == after {
            last = format!("podman {before:?}\nagent  {ours:?}");
            if ours == before {
                let mine = listed.iter().find(|c| c.id == id).expect("our container");
                assert_eq!(mine.name.as_deref(), Some(name.as_str()));
                assert_eq!(mine.image.as_deref(), Some(IMAGE));
                assert_eq!(mine.state.as_deref(), Some("running"));
                matched = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = Command::new("podman")
        .args(["rm", "-f", "-t", "0", &name])
        .output();
    assert!(matched, "container lists differ:\n{last}");
}

#[tokio::test]
async fn a_down_region_fails_its_collector_but_not_health() {
    let postgres = service_env("FLEET_TEST_POSTGRES_URL");
    let redis = service_env("FLEET_TEST_REDIS_URL");
    let app = start_app().await;
    let dir = temp_dir("region-down");
    let mut c = config("http://127.0.0.1:9", &dir);
    c.database_url = Some(postgres);
    c.redis_url = Some(redis);
    c.regional_endpoints = vec![
        fleet_agent::RegionalEndpoint {
            region: "eu-west-1".into(),
            endpoint: format!("http://{app}/region/down"),
        },
        fleet_agent::RegionalEndpoint {
            region: "us-east-1".into(),
            endpoint: format!("http://{app}/storage/health"),
        },
    ];
    let hb = Agent::builder(c).build().unwrap().heartbeat().await;
    let regional = check(&hb, "regional");
    assert!(!regional.ok);
    assert_eq!(
        regional.error.as_deref(),
        Some("unhealthy regions: eu-west-1")
    );
    assert_eq!(hb.extra["regional_health"][1]["ok"], true);
    assert_eq!(hb.extra["regional_health"][1]["role"], "secondary");
    // The services are fine, so the instance is healthy.
    assert_eq!(hb.health.as_deref(), Some("ok"));
}

#[tokio::test]
async fn an_unreachable_engine_fails_its_check_but_not_the_heartbeat() {
    let dir = temp_dir("no-engine");
    let mut c = config("http://127.0.0.1:9", &dir);
    c.docker_host = format!("unix://{}", dir.join("missing.sock").display());
    c.containers_interval = Duration::from_secs(60);
    let hb = Agent::builder(c).build().unwrap().heartbeat().await;
    let containers = check(&hb, "containers");
    assert!(!containers.ok);
    assert!(
        containers
            .error
            .as_deref()
            .unwrap()
            .contains("container engine unreachable")
    );
    assert!(hb.memory_total_bytes.is_some());
}
