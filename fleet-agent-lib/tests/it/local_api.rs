//! The local API over real HTTP.

use std::net::SocketAddr;
use std::time::Duration;

use fleet_agent::Agent;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

/// Sends `request` as it is (the headers a browser or `curl -H` would send) and returns the
/// status and the body.
async fn raw_http(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// `method path` over HTTP/1.1 with `headers` (each ending in CRLF).
fn request(method: &str, path: &str, headers: &str) -> String {
    format!("{method} {path} HTTP/1.1\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n")
}

/// An agent whose ops endpoint (read with its `AGENT_OPS_TOKEN`) is the stand-in app's, and
/// the local token given; returns its local API's address and what stops it.
async fn agent_with_ops(
    name: &str,
    token: Option<&str>,
) -> (
    SocketAddr,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<fleet_agent::Result<()>>,
) {
    let app = start_app().await;
    let dir = temp_dir(name);
    let mut c = config("http://127.0.0.1:9", &dir);
    c.local_token = token.map(str::to_owned);
    c.ops_url = Some(format!("http://{app}/ops"));
    c.ops_token = Some(OPS_TOKEN.into());
    c.heartbeat_interval = Duration::from_secs(3600);
    let mut agent = Agent::builder(c).build().unwrap();
    let addr = agent.bind().await.unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(agent.run(async {
        let _ = stopped.await;
    }));
    (addr, stop, task)
}

/// Without a token a web page must not read the local API: not through DNS rebinding (its
/// own name resolving to 127.0.0.1, so `Host` is that name) and not by a cross-origin
/// request to 127.0.0.1 (`Origin`, `Sec-Fetch-Site`). Local tools, which address 127.0.0.1
/// or localhost and send neither header, get their answers as before.
#[tokio::test]
async fn without_a_token_only_local_clients_addressing_loopback_are_answered() {
    let (addr, stop, task) = agent_with_ops("rebinding", None).await;
    let port = addr.port();
    for host in [
        format!("127.0.0.1:{port}"),
        "127.0.0.1".to_owned(),
        format!("localhost:{port}"),
        "LOCALHOST".to_owned(),
        format!("[::1]:{port}"),
    ] {
        let (status, body) = raw_http(
            addr,
            &request("GET", "/diagnostic", &format!("Host: {host}\r\n")),
        )
        .await;
        assert_eq!(status, 200, "Host: {host}: {body}");
        assert!(body.contains("jobsProcessed1h"), "Host: {host}: {body}");
    }
    // Typed into the address bar: no other site is involved.
    let typed = format!("Host: localhost:{port}\r\nSec-Fetch-Site: none\r\n");
    assert_eq!(
        raw_http(addr, &request("GET", "/health", &typed)).await.0,
        200
    );

    let refused = [
        "Host: evil.example\r\nOrigin: http://evil.example\r\n".to_owned(),
        "Host: evil.example\r\n".to_owned(),
        format!("Host: evil.example:{port}\r\n"),
        format!("Host: localhost.evil.example:{port}\r\n"),
        format!("Host: 127.0.0.1.nip.io:{port}\r\n"),
        format!("Host: 127.0.0.1:{port}\r\nOrigin: http://evil.example\r\n"),
        format!("Host: localhost:{port}\r\nOrigin: null\r\n"),
        format!("Host: 127.0.0.1:{port}\r\nSec-Fetch-Site: cross-site\r\n"),
    ];
    for headers in &refused {
        for (method, path) in [
            ("GET", "/diagnostic"),
            ("GET", "/health"),
            ("POST", "/smoke"),
        ] {
            let (status, body) = raw_http(addr, &request(method, path, headers)).await;
            assert_eq!(status, 403, "{method} {path} with {headers:?}: {body}");
            assert!(body.contains("AGENT_LOCAL_TOKEN"), "a reason: {body}");
            assert!(!body.contains("jobsProcessed1h"), "{body}");
        }
    }
    // HTTP/1.0 without any Host.
    let (status, _) = raw_http(addr, "GET /diagnostic HTTP/1.0\r\n\r\n").await;
    assert_eq!(status, 403);

    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

/// With a token the token decides, whatever `Host` and `Origin` say: a page that does not
/// know it gets 401, a client that knows it is answered.
#[tokio::test]
async fn with_a_token_the_token_decides() {
    let (addr, stop, task) = agent_with_ops("rebinding-token", Some("local-secret")).await;
    let page = "Host: evil.example\r\nOrigin: http://evil.example\r\n";
    let (status, body) = raw_http(addr, &request("GET", "/diagnostic", page)).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = raw_http(
        addr,
        &request(
            "GET",
            "/diagnostic",
            &format!("{page}x-agent-local-token: local-secret\r\n"),
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("jobsProcessed1h"), "{body}");
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}
