//! Alert forwarding to a real local HTTP receiver.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use fleet_core::{Secret, SignatureHeaders};
use fleet_server::{Settings, SloThresholds, WebhookConfig};
use serde_json::{Value, json};

use crate::support::{self, SECRET, TestServer, body, now};

const RECEIVER_SECRET: &str = "whsec_cmVjZWl2ZXItc2VjcmV0LWJ5dGVz";

/// What the receiver saw, and how many of the next requests it fails.
#[derive(Default)]
struct Seen {
    requests: Vec<(HeaderMap, Vec<u8>)>,
    fail_next: usize,
}

type Shared = Arc<Mutex<Seen>>;

async fn receive(
    State(seen): State<Shared>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let mut seen = seen.lock().expect("lock");
    seen.requests.push((headers, body.to_vec()));
    if seen.fail_next > 0 {
        seen.fail_next -= 1;
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::NO_CONTENT
    }
}

/// Serves the receiver on `listener` until the test ends.
fn serve_receiver(listener: tokio::net::TcpListener, seen: Shared) {
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(seen);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
}

fn config(url: String) -> WebhookConfig {
    WebhookConfig {
        token: Some("hook-bearer".into()),
        secret: Some(Secret::new(RECEIVER_SECRET).expect("secret")),
        poll_interval: Duration::from_millis(100),
        first_backoff: Duration::from_secs(1),
        ..WebhookConfig::new(url)
    }
}

fn settings() -> Settings {
    Settings {
        slo: SloThresholds {
            p95_ms_max: 500.0,
            error_rate_max: 0.0,
            webhook_retry_rate_max: 0.0,
        },
        ..Settings::default()
    }
}

async fn wait_for(seen: &Shared, what: impl Fn(&Seen) -> bool) {
    for _ in 0..100 {
        if what(&seen.lock().expect("lock")) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the receiver did not see what was expected in 10 s");
}

#[tokio::test]
async fn alerts_are_delivered_with_bearer_and_v1_signature_and_retried_after_failures() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let seen: Shared = Arc::new(Mutex::new(Seen {
        fail_next: 2,
        ..Seen::default()
    }));
    serve_receiver(listener, seen.clone());
    let t = support::sqlite().await;
    let server = TestServer::start_with(t.store.clone(), |b| {
        b.settings(settings()).webhook(config(url))
    })
    .await;
    let hb = body("acme-001", json!({"slo_p95_ms": 800.0}));
    let started = std::time::Instant::now();
    assert_eq!(server.send_v1(SECRET, "m1", now(), &hb).await.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "ingest does not wait for the receiver"
    );
    // A second breach report does not re-send: the alert is deduplicated.
    assert_eq!(server.send_v1(SECRET, "m2", now(), &hb).await.status(), 200);
    wait_for(&seen, |s| s.requests.len() >= 3).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = seen.lock().expect("lock");
    assert_eq!(
        seen.requests.len(),
        3,
        "two failures, then one success, then nothing"
    );
    let ids: Vec<&str> = seen
        .requests
        .iter()
        .map(|(h, _)| h["webhook-id"].to_str().expect("id"))
        .collect();
    assert!(
        ids.iter().all(|id| *id == ids[0]),
        "the id is stable across attempts: {ids:?}"
    );
    let (headers, raw) = &seen.requests[2];
    assert_eq!(headers["authorization"], "Bearer hook-bearer");
    let lookup =
        SignatureHeaders::from_lookup(|name| headers.get(name).and_then(|v| v.to_str().ok()));
    support::signer(RECEIVER_SECRET)
        .verify(raw, &lookup, now())
        .expect("a valid Standard Webhooks signature");
    let payload: Value = serde_json::from_slice(raw).expect("json");
    assert_eq!(payload["type"], "slo_p95_ms");
    assert_eq!(payload["instanceId"], "acme-001");
    assert!(payload["installationId"].is_i64());
    assert!(
        payload["message"]
            .as_str()
            .expect("message")
            .contains("800")
    );
}

#[tokio::test]
async fn undelivered_alerts_survive_a_restart() {
    // Reserve a port for the receiver, but do not listen yet: deliveries fail.
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = reserved.local_addr().expect("addr");
    drop(reserved);
    let url = format!("http://{addr}/hook");
    let t = support::sqlite().await;
    let first = TestServer::start_with(t.store.clone(), |b| {
        b.settings(settings()).webhook(config(url.clone()))
    })
    .await;
    let hb = body("acme-001", json!({"slo_p95_ms": 800.0}));
    assert_eq!(first.send_v1(SECRET, "m1", now(), &hb).await.status(), 200);
    // Let at least one attempt fail, then stop the control plane.
    for _ in 0..50 {
        let metrics = first
            .client
            .get(first.at("/metrics"))
            .send()
            .await
            .expect("metrics");
        if metrics
            .text()
            .await
            .expect("text")
            .contains("fleet_webhook_failed_attempts_total 1")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    first.stop().await;
    drop(t.store);

    let seen: Shared = Arc::new(Mutex::new(Seen::default()));
    serve_receiver(
        tokio::net::TcpListener::bind(addr).await.expect("rebind"),
        seen.clone(),
    );
    let store = support::reopen_sqlite(&t.url).await;
    let _second =
        TestServer::start_with(store, |b| b.settings(settings()).webhook(config(url))).await;
    wait_for(&seen, |s| !s.requests.is_empty()).await;
    let seen = seen.lock().expect("lock");
    let payload: Value = serde_json::from_slice(&seen.requests[0].1).expect("json");
    assert_eq!(payload["type"], "slo_p95_ms");
}

#[tokio::test]
async fn webhook_ids_are_not_reused_once_the_sweep_has_emptied_the_outbox() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let seen: Shared = Arc::new(Mutex::new(Seen::default()));
    serve_receiver(listener, seen.clone());
    let t = support::sqlite().await;
    let server = TestServer::start_with(t.store.clone(), |b| {
        b.settings(settings()).webhook(config(url))
    })
    .await;
    let breach = |instance| body(instance, json!({"slo_p95_ms": 800.0}));
    let sent = server
        .send_v1(SECRET, "m1", now(), &breach("acme-001"))
        .await;
    assert_eq!(sent.status(), 200);
    wait_for(&seen, |s| s.requests.len() == 1).await;
    // The retention sweep removes the delivery once it is old enough: here, at once. The
    // table is then empty, and SQLite hands the next row the same id again.
    t.store.prune_records(now() + 10).await.expect("prune");
    let sent = server
        .send_v1(support::SHARED, "m1", now(), &breach("beta-002"))
        .await;
    assert_eq!(sent.status(), 200);
    wait_for(&seen, |s| s.requests.len() == 2).await;
    server.stop().await;
    let seen = seen.lock().expect("lock");
    let ids: Vec<&str> = seen
        .requests
        .iter()
        .map(|(h, _)| h["webhook-id"].to_str().expect("id"))
        .collect();
    assert_ne!(
        ids[0], ids[1],
        "a receiver deduplicating on webhook-id would drop the second alert"
    );
}

#[tokio::test]
async fn a_delivery_stuck_on_one_replica_holds_back_no_other_alert() {
    // Replica A's receiver never answers within A's timeout.
    let hanging = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hanging_url = format!("http://{}/hook", hanging.local_addr().expect("addr"));
    let stuck: Shared = Arc::new(Mutex::new(Seen::default()));
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(
                |State(seen): State<Shared>, body: axum::body::Bytes| async move {
                    seen.lock()
                        .expect("lock")
                        .requests
                        .push((HeaderMap::new(), body.to_vec()));
                    tokio::time::sleep(Duration::from_secs(120)).await;
                    StatusCode::NO_CONTENT
                },
            ),
        )
        .with_state(stuck.clone());
    tokio::spawn(async move {
        let _ = axum::serve(hanging, app).await;
    });
    let t = support::sqlite().await;
    let a = TestServer::start_with(t.store.clone(), |b| {
        b.settings(settings()).webhook(WebhookConfig {
            timeout: Duration::from_secs(60),
            ..config(hanging_url)
        })
    })
    .await;
    for instance in ["shop-1", "shop-2", "shop-3"] {
        let hb = body(instance, json!({"slo_p95_ms": 800.0}));
        let sent = a.send_v1(support::SHARED, "m1", now(), &hb).await;
        assert_eq!(sent.status(), 200);
    }
    wait_for(&stuck, |s| s.requests.len() == 1).await;

    // Replica B (or the same server after a restart) delivers the alerts A is not sending:
    // A's claim covers only the one it is stuck on.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let seen: Shared = Arc::new(Mutex::new(Seen::default()));
    serve_receiver(listener, seen.clone());
    let b = TestServer::start_with(t.store.clone(), |b| {
        b.settings(settings()).webhook(config(url))
    })
    .await;
    wait_for(&seen, |s| s.requests.len() == 2).await;
    let instances: Vec<String> = seen
        .lock()
        .expect("lock")
        .requests
        .iter()
        .map(|(_, raw)| {
            let payload: Value = serde_json::from_slice(raw).expect("json");
            payload["instanceId"].as_str().expect("instance").to_owned()
        })
        .collect();
    assert_eq!(instances, ["shop-2", "shop-3"], "in the order raised");
    assert_eq!(stuck.lock().expect("lock").requests.len(), 1);
    b.stop().await;
}
