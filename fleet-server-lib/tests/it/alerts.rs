//! The fleet's alerts in one list, as `GET /api/alerts` and the `/alerts` page show them:
//! filtered and paged, each with its installation and the state of its webhook delivery
//! (delivered, given up with its error, pending with its next try, or none), on SQLite and
//! PostgreSQL.

use std::time::Duration;

use axum::http::StatusCode;
use fleet_server::{Settings, SloThresholds, WebhookConfig};
use serde_json::{Value, json};

use crate::support::{
    self, OPS, SHARED, SUPPORT, TestServer, TestStore, body, code, now, on_both_backends,
};

on_both_backends!(the_fleet_alert_list_filters_pages_and_shows_each_delivery);

/// The installation whose alerts the receiver refuses.
const REFUSED: &str = "shop-2";

/// SLO maxima, so a heartbeat can raise a forwarded alert.
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

/// Forwarding to `url`, polled often; a single attempt, so a refused delivery is given up
/// at once.
fn one_attempt(url: String) -> WebhookConfig {
    WebhookConfig {
        max_attempts: 1,
        poll_interval: Duration::from_millis(100),
        ..WebhookConfig::new(url)
    }
}

/// A webhook receiver that answers 500 to the alerts of [`REFUSED`] and 204 to the others;
/// returns its URL.
async fn receiver() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(|body: axum::body::Bytes| async move {
            let alert: Value = serde_json::from_slice(&body).unwrap_or_default();
            if alert["instanceId"] == REFUSED {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::NO_CONTENT
            }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    url
}

/// Sends `extra` in a heartbeat of `instance` (signed with the shared secret).
async fn report(server: &TestServer, instance: &str, extra: Value) {
    let msg = uuid::Uuid::new_v4().to_string();
    let sent = server
        .send_v1(SHARED, &msg, now(), &body(instance, extra))
        .await;
    assert_eq!(sent.status(), 200, "{instance}");
}

/// A control plane forwarding to [`receiver`], with four alerts from three installations
/// once every delivery ended:
/// - shop-1: an SLO breach, delivered, then resolved;
/// - shop-2: an SLO breach, given up (the receiver answers 500);
/// - shop-3: an instance's `warning` (not forwarded: no delivery) and `error` (delivered).
async fn fleet_with_deliveries(t: &TestStore) -> TestServer {
    let url = receiver().await;
    let server = TestServer::start_with(t.store.clone(), |b| {
        b.settings(settings()).webhook(one_attempt(url))
    })
    .await;
    report(&server, "shop-1", json!({"slo_p95_ms": 800.0})).await;
    report(&server, REFUSED, json!({"slo_p95_ms": 900.0})).await;
    report(
        &server,
        "shop-3",
        json!({"alerts": [{"level": "warning", "message": "Disk at 80%"},
                          {"level": "error", "message": "Queue <stuck>"}]}),
    )
    .await;
    report(&server, "shop-1", json!({"slo_p95_ms": 100.0})).await;
    for _ in 0..100 {
        let (status, pending) = server
            .get_json("/api/alerts?state=all&delivery=pending", SUPPORT)
            .await;
        assert_eq!(status, 200, "{pending}");
        if pending["total"] == 0 {
            return server;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the deliveries did not end within 10 s");
}

/// `(instance, message)` of each listed alert, in the order listed.
fn listed(page: &Value) -> Vec<(String, String)> {
    page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|a| {
            let field = |name: &str| a[name].as_str().expect(name).to_owned();
            (field("instance_id"), field("message"))
        })
        .collect()
}

/// The instances of the listed alerts, in the order listed.
fn instances(page: &Value) -> Vec<String> {
    listed(page).into_iter().map(|(i, _)| i).collect()
}

async fn the_fleet_alert_list_filters_pages_and_shows_each_delivery(t: TestStore) {
    let server = fleet_with_deliveries(&t).await;

    // The default: open alerts of every installation, newest first, each with its delivery.
    let (status, open) = server.get_documented("/api/alerts", SUPPORT).await;
    assert_eq!(status, 200, "{open}");
    assert_eq!(
        (
            open["total"].clone(),
            open["limit"].clone(),
            open["offset"].clone()
        ),
        (json!(3), json!(100), json!(0)),
        "{open}"
    );
    let ids: Vec<i64> = open["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|a| a["id"].as_i64().expect("id"))
        .collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");
    assert_eq!(instances(&open), ["shop-3", "shop-3", REFUSED]);
    let by_message = |page: &Value, message: &str| -> Value {
        page["items"]
            .as_array()
            .expect("items")
            .iter()
            .find(|a| a["message"].as_str().is_some_and(|m| m.contains(message)))
            .unwrap_or_else(|| panic!("no alert saying {message}: {page}"))
            .clone()
    };
    let refused = by_message(&open, "900");
    assert_eq!(refused["delivery"]["state"], "given_up", "{refused}");
    assert_eq!(refused["delivery"]["attempts"], 1, "{refused}");
    assert!(refused["delivery"]["given_up_at"].is_i64(), "{refused}");
    assert!(
        refused["delivery"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("receiver answered 500")),
        "the error that made it give up: {refused}"
    );
    let delivered = by_message(&open, "Queue <stuck>");
    assert_eq!(
        (
            &delivered["delivery"]["state"],
            &delivered["delivery"]["last_error"]
        ),
        (&json!("delivered"), &Value::Null),
        "{delivered}"
    );
    assert_eq!(
        by_message(&open, "Disk at 80%")["delivery"],
        Value::Null,
        "an instance's warning is not forwarded"
    );

    // Each filter alone.
    let (_, resolved) = server
        .get_documented("/api/alerts?state=resolved", SUPPORT)
        .await;
    assert_eq!(instances(&resolved), ["shop-1"], "{resolved}");
    assert_eq!(resolved["items"][0]["delivery"]["state"], "delivered");
    let refused_id = refused["id"].as_i64().expect("id");
    let ack = server
        .client
        .post(server.at(&format!("/api/alerts/{refused_id}/ack")))
        .bearer_auth(OPS)
        .send()
        .await
        .expect("ack");
    assert_eq!(ack.status(), 200);
    let ack: Value = ack.json().await.expect("json");
    assert_eq!(ack["delivery"]["state"], "given_up", "{ack}");
    let (_, spec) = server.get_json("/openapi.json", SUPPORT).await;
    support::assert_answer_conforms(&spec, "post", "/api/alerts/{id}/ack", &ack);
    for (query, expected) in [
        ("state=acknowledged", vec![REFUSED]),
        ("state=all", vec!["shop-3", "shop-3", REFUSED, "shop-1"]),
        ("level=warning", vec!["shop-3"]),
        ("level=error&state=all", vec!["shop-3", REFUSED, "shop-1"]),
        ("kind=slo_p95_ms&state=all", vec![REFUSED, "shop-1"]),
        ("kind=payload", vec!["shop-3", "shop-3"]),
        ("installation=shop-3", vec!["shop-3", "shop-3"]),
        ("installation=%20shop-1%20&state=all", vec!["shop-1"]),
        ("installation=nobody", vec![]),
        ("delivery=given_up&state=all", vec![REFUSED]),
        ("delivery=delivered&state=all", vec!["shop-3", "shop-1"]),
        ("delivery=none&state=all", vec!["shop-3"]),
        ("delivery=pending&state=all", vec![]),
        // An empty value is no filter, as the page's form sends its empty fields.
        (
            "state=&level=&kind=&installation=&delivery=",
            vec!["shop-3", "shop-3", REFUSED],
        ),
        ("open=false", vec!["shop-3", "shop-3", REFUSED, "shop-1"]),
    ] {
        let (status, page) = server
            .get_documented(&format!("/api/alerts?{query}"), SUPPORT)
            .await;
        assert_eq!(status, 200, "{query}: {page}");
        assert_eq!(instances(&page), expected, "{query}: {page}");
        assert_eq!(page["total"], expected.len(), "{query}: {page}");
    }

    // Pages of two: together they are the whole list, once each.
    let (_, all) = server.get_json("/api/alerts?state=all", SUPPORT).await;
    let mut paged = Vec::new();
    for offset in [0, 2, 4] {
        let (status, page) = server
            .get_documented(
                &format!("/api/alerts?state=all&limit=2&offset={offset}"),
                SUPPORT,
            )
            .await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(
            (
                page["total"].clone(),
                page["limit"].clone(),
                page["offset"].clone()
            ),
            (json!(4), json!(2), json!(offset)),
            "{page}"
        );
        paged.extend(listed(&page));
    }
    assert_eq!(paged, listed(&all));
    server.stop().await;
}

/// GETs the page `path` as `token`: status, content type, CSP and body.
async fn page(server: &TestServer, path: &str, token: &str) -> (u16, String, String, String) {
    let response = server
        .client
        .get(server.at(path))
        .bearer_auth(token)
        .header("accept", "text/html")
        .send()
        .await
        .expect("get");
    let status = response.status().as_u16();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (kind, policy) = (header("content-type"), header("content-security-policy"));
    (status, kind, policy, response.text().await.expect("text"))
}

#[tokio::test]
async fn the_alerts_page_shows_deliveries_given_up_and_acknowledges_for_ops_only() {
    let t = support::sqlite().await;
    let server = fleet_with_deliveries(&t).await;

    let (status, kind, policy, html) = page(&server, "/alerts", SUPPORT).await;
    assert_eq!(status, 200, "{html}");
    assert!(kind.starts_with("text/html"), "{kind}");
    assert!(policy.contains("default-src 'none'"), "{policy}");
    assert!(
        html.contains("<a href=\"/alerts\">Alerts</a>"),
        "in the header: {html}"
    );
    assert!(
        html.contains(
            "href=\"/alerts?offset=0&state=all&delivery=given_up\">1 delivery given up</a>"
        ),
        "{html}"
    );
    assert!(
        html.contains("href=\"/installations/shop-2\"")
            && html.contains("href=\"/installations/shop-3\""),
        "each alert links to its installation: {html}"
    );
    assert!(
        html.contains("given up</span> after 1 attempt")
            && html.contains("receiver answered 500")
            && html.contains("delivered</span>")
            && html.contains(">none</span>"),
        "{html}"
    );
    assert!(
        html.contains("Queue &lt;stuck&gt;") && !html.contains("Queue <stuck>"),
        "{html}"
    );
    assert!(
        !html.contains("Acknowledge"),
        "support cannot acknowledge: {html}"
    );

    // Ops gets the button; it returns to the list it was pressed on.
    let (_, api) = server.get_json("/api/alerts", SUPPORT).await;
    let refused = api["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|a| a["instance_id"] == REFUSED)
        .expect("shop-2's alert")
        .clone();
    let id = refused["id"].as_i64().expect("id");
    let (_, _, _, html) = page(&server, "/alerts?level=error", OPS).await;
    let form = format!("action=\"/alerts/{id}/ack?back=%2Falerts%3Foffset%3D0%26level%3Derror\"");
    assert!(html.contains(&form), "{form} in {html}");
    assert!(html.contains("<button>Acknowledge</button>"), "{html}");
    let bad_back = server
        .client
        .post(server.at(&format!("/alerts/{id}/ack?back=https://evil.example/")))
        .bearer_auth(OPS)
        .send()
        .await
        .expect("ack");
    assert_eq!(
        bad_back.status(),
        400,
        "a form cannot send the browser elsewhere"
    );
    let error: Value = bad_back.json().await.expect("json");
    assert_eq!(code(&error), "bad_request", "{error}");
    let ack = server
        .client
        .post(server.at(&format!(
            "/alerts/{id}/ack?back=%2Falerts%3Foffset%3D0%26level%3Derror"
        )))
        .bearer_auth(OPS)
        .send()
        .await
        .expect("ack");
    assert_eq!(ack.status(), 303);
    assert_eq!(ack.headers()["location"], "/alerts?offset=0&level=error");
    let (_, _, _, html) = page(&server, "/alerts?offset=0&level=error", OPS).await;
    assert!(html.contains("acknowledged by ops"), "{html}");

    // The link in the header: only the delivery given up, resolved or not.
    let (status, _, _, html) = page(
        &server,
        "/alerts?offset=0&state=all&delivery=given_up",
        SUPPORT,
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        html.contains("shop-2") && !html.contains("shop-3") && html.contains("1–1 of 1"),
        "{html}"
    );

    // Paging keeps the filters and the page size.
    let (_, _, _, html) = page(&server, "/alerts?state=all&limit=2", SUPPORT).await;
    assert!(
        html.contains("1–2 of 4")
            && html.contains("href=\"/alerts?offset=2&limit=2&state=all\">next →"),
        "{html}"
    );
    let (_, _, _, html) = page(&server, "/alerts?state=all&limit=2&offset=9", SUPPORT).await;
    assert!(
        html.contains("past the last of the 4 matching alerts")
            && html.contains("href=\"/alerts?offset=0&limit=2&state=all\""),
        "{html}"
    );

    // An installation's page shows its alerts' deliveries too.
    let (_, _, _, html) = page(&server, "/installations/shop-2", SUPPORT).await;
    assert!(
        html.contains("given up</span>") && html.contains("receiver answered 500"),
        "{html}"
    );
    let (_, _, _, html) = page(&server, "/installations/shop-1", SUPPORT).await;
    assert!(html.contains("delivered</span>"), "{html}");
    server.stop().await;
}

#[tokio::test]
async fn bad_alert_filters_are_refused_with_400_on_the_api_and_the_page() {
    let t = support::sqlite().await;
    let server = TestServer::start(t.store.clone()).await;
    report(
        &server,
        "shop-1",
        json!({"alerts": [{"level": "error", "message": "x"}]}),
    )
    .await;
    let long = format!("installation={}", "a".repeat(300));
    for bad in [
        "state=bogus",
        "state=%20open",
        "state=open&state=all",
        "open=maybe",
        "open=true&state=all",
        "level=loud",
        "level=warn",
        "kind=Offline",
        "kind=slo%20p95",
        &format!("kind={}", "a".repeat(65)),
        &long,
        "installation=shop%091",
        "installation=shop%001",
        "limit=0",
        "limit=501",
        "limit=abc",
        "offset=-1",
        // No webhook is configured: no alert has a delivery to filter by.
        "delivery=given_up",
    ] {
        let shown = &bad[..bad.len().min(40)];
        let (status, error) = server
            .get_json(&format!("/api/alerts?{bad}"), SUPPORT)
            .await;
        assert_eq!(
            (status, code(&error)),
            (400, "bad_request"),
            "{shown}: {error}"
        );
        let (status, kind, _, html) = page(&server, &format!("/alerts?{bad}"), SUPPORT).await;
        assert_eq!(status, 400, "{shown}");
        assert!(kind.starts_with("text/html"), "{shown}: {kind}");
        assert!(
            html.contains("Back to the installations"),
            "{shown}: {html}"
        );
    }
    let (_, error) = server
        .get_json("/api/alerts?delivery=given_up", SUPPORT)
        .await;
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("CONTROL_PLANE_ALERT_WEBHOOK_URL")),
        "{error}"
    );
    let (_, _, _, html) = page(&server, "/alerts?state=bogus", SUPPORT).await;
    assert!(
        html.contains("state must be one of open, acknowledged, resolved, all"),
        "{html}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_pending_delivery_shows_its_next_try_and_none_shows_once_forwarding_is_off() {
    // A receiver that is not there, and a retry an hour later: the delivery stays pending.
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/hook", reserved.local_addr().expect("addr"));
    drop(reserved);
    let t = support::sqlite().await;
    let forwarding = TestServer::start_with(t.store.clone(), |b| {
        b.settings(settings()).webhook(WebhookConfig {
            max_attempts: 3,
            first_backoff: Duration::from_secs(3600),
            ..one_attempt(url)
        })
    })
    .await;
    report(&forwarding, "shop-1", json!({"slo_p95_ms": 800.0})).await;
    let mut pending = Value::Null;
    for _ in 0..100 {
        let (_, page) = forwarding
            .get_documented("/api/alerts?delivery=pending", SUPPORT)
            .await;
        pending = page["items"][0]["delivery"].clone();
        if pending["attempts"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(pending["state"], "pending", "{pending}");
    assert_eq!(pending["attempts"], 1, "{pending}");
    let next = pending["next_attempt_at"].as_i64().expect("next try");
    assert!(next > now() + 3000, "retried in an hour: {pending}");
    assert!(
        pending["last_error"]
            .as_str()
            .is_some_and(|e| e.starts_with("request failed")),
        "{pending}"
    );
    let (_, _, _, html) = page(&forwarding, "/installations/shop-1", SUPPORT).await;
    assert!(
        html.contains("pending</span> after 1 attempt, next try"),
        "{html}"
    );
    forwarding.stop().await;

    // The same database without a webhook: nothing is forwarded, so no delivery is shown,
    // nor its column, and none can be filtered by.
    let plain = TestServer::start_with(t.store.clone(), |b| b.settings(settings())).await;
    let (_, listed) = plain.get_documented("/api/alerts", SUPPORT).await;
    assert_eq!(listed["items"][0]["delivery"], Value::Null, "{listed}");
    let (_, detail) = plain.get_json("/api/installations/shop-1", SUPPORT).await;
    assert_eq!(detail["alerts"][0]["delivery"], Value::Null, "{detail}");
    let (status, _, _, html) = page(&plain, "/alerts", SUPPORT).await;
    assert_eq!(status, 200);
    assert!(
        html.contains("Alerts are not forwarded") && !html.contains("<th>Delivery</th>"),
        "{html}"
    );
    plain.stop().await;
}
