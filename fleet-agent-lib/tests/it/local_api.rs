//! The local API over real HTTP.

use std::time::Duration;

use fleet_agent::Agent;
use tokio::sync::oneshot;

use crate::support::*;

#[tokio::test]
async fn routes_answer_and_the_token_is_required() {
    let app = start_app().await;
    let dir = temp_dir("local-api");
    let mut c = config("http://127.0.0.1:9", &dir);
    c.local_token = Some("local-secret".into());
    c.ops_url = Some(format!("http://{app}/ops"));
    c.ops_token = Some(OPS_TOKEN.into());
    c.metrics_url = Some(format!("http://{app}/metrics"));
    c.storage_endpoint = Some(format!("http://{app}/storage/health"));
    c.heartbeat_interval = Duration::from_secs(3600);
    let mut agent = Agent::builder(c).build().unwrap();
    let addr = agent.bind().await.unwrap();
    assert!(addr.ip().is_loopback());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(agent.run(async {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();
    let url = |path: &str| format!("http://{addr}{path}");

    for path in ["/health", "/diagnostic", "/metrics", "/metrics/agent"] {
        let r = http.get(url(path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path} without a token");
        let r = http
            .get(url(path))
            .header("x-agent-local-token", "local-secreT")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path} with a wrong token");
    }
    let get = |path: &str| {
        http.get(url(path))
            .header("x-agent-local-token", "local-secret")
            .send()
    };
    let health: serde_json::Value = get("/health").await.unwrap().json().await.unwrap();
    assert_eq!(health["ok"], true);
    assert_eq!(health["instance_id"], INSTANCE);
    let diag: serde_json::Value = get("/diagnostic").await.unwrap().json().await.unwrap();
    assert_eq!(diag["jobsProcessed1h"], 42);
    let metrics = get("/metrics").await.unwrap().text().await.unwrap();
    assert_eq!(metrics, METRICS_TEXT);
    let smoke: serde_json::Value = http
        .post(url("/smoke"))
        .header("x-agent-local-token", "local-secret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(smoke["storage_ok"], true);
    // No DATABASE_URL in this config: db fails and says why.
    assert_eq!(smoke["db_ok"], false);
    let db = smoke["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "db")
        .unwrap();
    assert_eq!(db["error"], "DATABASE_URL is not set");
    let own = get("/metrics/agent").await.unwrap().text().await.unwrap();
    for needle in [
        "fleet_agent_heartbeats_total",
        "fleet_agent_outbox_messages",
        "fleet_agent_resident_memory_bytes",
        "fleet_agent_check_ok{check=\"storage\"} 1",
    ] {
        assert!(own.contains(needle), "{needle} missing:\n{own}");
    }
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

/// `POST /smoke` refreshes the checks it runs; the collectors' series in `/metrics/agent`
/// stay as the last heartbeat left them instead of vanishing until the next one.
#[tokio::test]
async fn smoke_keeps_the_collectors_in_the_agent_metrics() {
    let dir = temp_dir("smoke-metrics");
    let mut c = config("http://127.0.0.1:9", &dir);
    c.heartbeat_interval = Duration::from_secs(3600);
    let mut agent = Agent::builder(c).build().unwrap();
    let addr = agent.bind().await.unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(agent.run(async {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();
    let own = || async {
        http.get(format!("http://{addr}/metrics/agent"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    // The first heartbeat is built at start, its collectors included.
    let mut before = String::new();
    for _ in 0..200 {
        before = own().await;
        if before.contains("fleet_agent_heartbeats_total 1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        before.contains("fleet_agent_check_ok{check=\"host\"} 1"),
        "{before}"
    );
    let smoke = http
        .post(format!("http://{addr}/smoke"))
        .send()
        .await
        .unwrap();
    assert_eq!(smoke.status(), 200);
    let after = own().await;
    for needle in [
        "fleet_agent_check_ok{check=\"db\"} 0",
        "fleet_agent_check_ok{check=\"host\"} 1",
    ] {
        assert!(after.contains(needle), "{needle} missing:\n{after}");
    }
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_non_loopback_address_needs_a_token() {
    let dir = temp_dir("bind");
    let mut c = config("http://127.0.0.1:9", &dir);
    c.local_bind = "0.0.0.0".parse().unwrap();
    let mut agent = Agent::builder(c).build().unwrap();
    let err = agent.bind().await.unwrap_err().to_string();
    assert!(err.contains("AGENT_LOCAL_TOKEN"), "{err}");
}
