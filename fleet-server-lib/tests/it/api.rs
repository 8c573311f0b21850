//! The operator API: listing, detail, acknowledgement, health, metrics, OpenAPI.

use serde_json::{Value, json};

use crate::support::{self, ADMIN, OPS, SECRET, SUPPORT, TestServer, body, code, now};

#[tokio::test]
async fn list_filters_paginates_and_refuses_bad_queries_with_400() {
    let t = support::sqlite().await;
    let server = TestServer::start(t.store.clone()).await;
    for i in 0..5 {
        let channel = if i < 2 { "beta" } else { "stable" };
        let hb = body(
            &format!("shop-{i}"),
            json!({"release_channel": channel, "client": format!("Shop {i}")}),
        );
        assert_eq!(
            server
                .send_v1(support::SHARED, "m", now(), &hb)
                .await
                .status(),
            200
        );
    }
    let (status, page) = server
        .get_json("/api/installations?limit=2&offset=2", SUPPORT)
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        (
            page["total"].clone(),
            page["items"].as_array().map(Vec::len)
        ),
        (json!(5), Some(2))
    );
    assert_eq!(page["items"][0]["instance_id"], "shop-2");
    let (_, beta) = server
        .get_json("/api/installations?channel=beta", SUPPORT)
        .await;
    assert_eq!(beta["total"], 2);
    let (_, text) = server
        .get_json("/api/installations?q=shop%204", SUPPORT)
        .await;
    assert_eq!(text["items"][0]["instance_id"], "shop-4");
    // A 60 KB text filter once reached SQLite, which refused the LIKE pattern: a 500.
    let long = format!("q={}", "a".repeat(60_000));
    for bad in ["limit=0", "limit=100000", "offset=-1", "limit=abc", &long] {
        let (status, error) = server
            .get_json(&format!("/api/installations?{bad}"), SUPPORT)
            .await;
        assert_eq!(
            (status, code(&error)),
            (400, "bad_request"),
            "{}",
            &bad[..bad.len().min(40)]
        );
    }
}

#[tokio::test]
async fn detail_shows_state_checks_alerts_failures_backups_and_recent_figures() {
    let t = support::sqlite().await;
    let server = TestServer::start(t.store.clone()).await;
    let started = now();
    // Collected an hour ago (delivered late from the agent's outbox), not said, and by a
    // clock ten minutes ahead of ours.
    let collected = [json!(started - 3600), Value::Null, json!(started + 600)];
    for (i, cpu) in [10.0, 20.0, 30.0].into_iter().enumerate() {
        let hb = body(
            "acme-001",
            json!({
                "collected_at": collected[i],
                "cpu_usage_pct": cpu, "memory_used_bytes": 512, "memory_total_bytes": 1024,
                "checks": [{"name": "db", "ok": true, "latency_ms": 2.5}, {"name": "smtp", "ok": false, "error": "refused"}],
                "alerts": [{"level": "critical", "message": "Disk full"}],
                "job_failures": [{"queue": "mail", "message": format!("failure {i}")}],
                "backup_checksum": "sha-1", "backup_id": "b1", "iam_users": 4
            }),
        );
        assert_eq!(
            server
                .send_v1(SECRET, &format!("m{i}"), now(), &hb)
                .await
                .status(),
            200
        );
    }
    let (status, d) = server
        .get_documented("/api/installations/acme-001", SUPPORT)
        .await;
    assert_eq!(status, 200);
    let times: Vec<(i64, i64)> = d["recent"]
        .as_array()
        .expect("recent")
        .iter()
        .map(|p| {
            assert!(p["figures"].get("collected_at").is_none(), "{p}");
            let at = |key: &str| p[key].as_i64().expect(key);
            (at("received_at"), at("collected_at"))
        })
        .collect();
    assert!(
        times.iter().all(|&(received, _)| received >= started),
        "{times:?}"
    );
    assert_eq!(times[0].1, started - 3600, "{times:?}");
    assert_eq!(times[1].1, times[1].0, "at arrival: {times:?}");
    assert_eq!(times[2].1, times[2].0, "never after arrival: {times:?}");
    assert_eq!(d["state"]["checks"][1]["error"], "refused");
    assert_eq!(d["state"]["iam_users"], 4, "unknown keys kept");
    assert_eq!(d["recent"].as_array().map(Vec::len), Some(3));
    assert_eq!(d["recent"][2]["figures"]["cpu_usage_pct"], 30.0);
    assert_eq!(d["job_failures"].as_array().map(Vec::len), Some(3));
    assert_eq!(d["backups"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        d["alerts"].as_array().map(Vec::len),
        Some(1),
        "repeated alert kept once"
    );
    assert_eq!(d["open_alerts"], 1);
    let alert = d["alerts"][0]["id"].as_i64().expect("id");
    let ack = server
        .client
        .post(server.at(&format!("/api/alerts/{alert}/ack")))
        .bearer_auth(OPS)
        .send()
        .await
        .expect("ack");
    assert_eq!(ack.status(), 200);
    let ack: Value = ack.json().await.expect("json");
    assert_eq!(ack["acknowledged_by"], "ops");

    // Each answer is what /openapi.json says it is, also for an installation enrolled by an
    // operator that has sent nothing yet (no state, most fields null).
    let enroll = server
        .client
        .post(server.at("/api/installations"))
        .bearer_auth(ADMIN)
        .json(&json!({"instance_id": "enrolled-quiet"}))
        .send()
        .await
        .expect("enroll");
    assert_eq!(enroll.status(), 201);
    let (_, spec) = server.get_json("/openapi.json", SUPPORT).await;
    let (_, list) = server.get_json("/api/installations", SUPPORT).await;
    assert_eq!(list["total"], 2, "{list}");
    let (_, quiet) = server
        .get_json("/api/installations/enrolled-quiet", SUPPORT)
        .await;
    assert_eq!(quiet["state"], Value::Null, "{quiet}");
    let (_, alerts) = server.get_json("/api/alerts", SUPPORT).await;
    let hb = body("acme-001", json!({}));
    let mut acknowledgements = Vec::new();
    // A retry: the same message id, signed again later.
    for signed_at in [now(), now() + 1] {
        let answer = server.send_v1(SECRET, "m-twice", signed_at, &hb).await;
        acknowledgements.push(answer.json::<Value>().await.expect("json"));
    }
    assert_eq!(
        (
            &acknowledgements[0]["duplicate"],
            &acknowledgements[1]["duplicate"]
        ),
        (&json!(false), &json!(true)),
        "{acknowledgements:?}"
    );
    for (method, path, answer) in [
        ("post", "/api/heartbeats", &acknowledgements[0]),
        ("post", "/api/heartbeats", &acknowledgements[1]),
        ("get", "/api/installations", &list),
        ("get", "/api/installations/{instance_id}", &d),
        ("get", "/api/installations/{instance_id}", &quiet),
        ("get", "/api/alerts", &alerts),
        ("post", "/api/alerts/{id}/ack", &ack),
    ] {
        support::assert_answer_conforms(&spec, method, path, answer);
    }
    for missing in ["/api/alerts/999999/ack", "/api/alerts/not-a-number/ack"] {
        let response = server
            .client
            .post(server.at(missing))
            .bearer_auth(OPS)
            .send()
            .await
            .expect("ack");
        assert_eq!(response.status(), 404, "{missing}");
    }
    let (status, error) = server.get_json("/api/installations/unknown", SUPPORT).await;
    assert_eq!((status, code(&error)), (404, "not_found"));
}

#[tokio::test]
async fn health_metrics_openapi_and_unknown_routes() {
    let t = support::sqlite().await;
    let server = TestServer::start(t.store.clone()).await;
    let (status, health) = server.get_json("/healthz", SUPPORT).await;
    assert_eq!((status, health), (200, json!({"status": "ok"})));
    assert_eq!(
        server
            .send_v1(SECRET, "m", now(), &body("acme-001", json!({})))
            .await
            .status(),
        200
    );
    let metrics = server
        .client
        .get(server.at("/metrics"))
        .send()
        .await
        .expect("metrics");
    assert!(
        metrics.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/plain")
    );
    let text = metrics.text().await.expect("text");
    assert!(text.contains("fleet_heartbeats_accepted_total 1"), "{text}");
    // SQLite has one writer, and nothing waits for it once the heartbeat was answered.
    assert!(
        text.contains("# TYPE fleet_ingest_queued_heartbeats gauge\nfleet_ingest_queued_heartbeats{writer=\"0\"} 0\n"),
        "{text}"
    );
    assert!(
        text.contains(
            r#"fleet_http_requests_total{method="POST",route="/api/heartbeats",status="200"} 1"#
        ),
        "{text}"
    );
    let (_, spec) = server.get_json("/openapi.json", SUPPORT).await;
    assert_eq!(spec["openapi"], "3.1.0");
    assert_eq!(
        spec["paths"]["/api/alerts/{id}/ack"]["post"]["x-fleet-role"],
        "ops"
    );
    let (status, error) = server.get_json("/no/such/route", SUPPORT).await;
    assert_eq!((status, code(&error)), (404, "not_found"));
}

/// The page bounds /openapi.json declares are the handlers' own: on every list route, a
/// `limit` at either end of its schema is taken and one past either end refused with 400,
/// and so for `offset`; where the answer says its limit, it is the declared default.
#[tokio::test]
async fn every_list_takes_the_page_bounds_it_declares_and_refuses_one_past_them() {
    let t = support::sqlite().await;
    let server = TestServer::start(t.store.clone()).await;
    let (_, spec) = server.get_json("/openapi.json", SUPPORT).await;
    let mut lists = Vec::new();
    let mut problems = Vec::new();
    for (path, operations) in spec["paths"].as_object().expect("paths") {
        let parameters = operations["get"]["parameters"].as_array();
        let schema_of = |name: &str| {
            parameters
                .into_iter()
                .flatten()
                .find(|p| p["in"] == "query" && p["name"] == name)
                .map(|p| &p["schema"])
        };
        let Some(limit) = schema_of("limit") else {
            continue;
        };
        lists.push(path.as_str());
        let bound = |schema: &Value, key: &str| schema[key].as_i64().expect(key);
        let (min, max) = (bound(limit, "minimum"), bound(limit, "maximum"));
        let mut probes = vec![
            (format!("limit={min}"), 200),
            (format!("limit={max}"), 200),
            (format!("limit={}", min - 1), 400),
            (format!("limit={}", max + 1), 400),
        ];
        if let Some(offset) = schema_of("offset") {
            let (min, max) = (bound(offset, "minimum"), bound(offset, "maximum"));
            probes.extend([
                (format!("offset={min}"), 200),
                (format!("offset={max}"), 200),
                (format!("offset={}", min - 1), 400),
                (format!("offset={}", i128::from(max) + 1), 400),
            ]);
        }
        for (query, want) in probes {
            let (status, _) = server.get_json(&format!("{path}?{query}"), SUPPORT).await;
            if status != want {
                problems.push(format!("GET {path}?{query}: {status}, want {want}"));
            }
        }
        let (status, answer) = server.get_json(path, SUPPORT).await;
        if status != 200 {
            problems.push(format!("GET {path}: {status}"));
        } else if !answer["limit"].is_null() && answer["limit"] != limit["default"] {
            problems.push(format!(
                "GET {path}: limit {} by default, declared {}",
                answer["limit"], limit["default"]
            ));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
    lists.sort_unstable();
    assert_eq!(
        lists,
        [
            "/",
            "/alerts",
            "/api/alerts",
            "/api/installations",
            "/api/plugins/releases",
            "/api/plugins/requests",
            "/api/releases",
            "/api/restores",
            "/api/rollouts",
            "/v1/commands",
        ]
    );
}
