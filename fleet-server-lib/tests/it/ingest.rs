//! `POST /api/heartbeats` over real HTTP.

use std::time::Duration;

use fleet_server::store::IngestRules;
use fleet_server::{Settings, SloThresholds};
use serde_json::{Value, json};

use crate::support::{self, ADMIN, SECRET, SHARED, SUPPORT, TestServer, body, code, now};

/// Header pairs of one request.
type Headers = Vec<(&'static str, String)>;

async fn count(server: &TestServer) -> i64 {
    server.store.heartbeat_count().await.expect("count")
}

#[tokio::test]
async fn v0_signed_with_openssl_and_sent_with_curl_is_accepted() {
    let t = support::sqlite().await;
    let server = TestServer::start(t.store.clone()).await;
    let dir = support::TempDir::new();
    let file = dir.0.join("hb.json");
    // The ERP example payload, byte for byte as a shell script would send it.
    let payload = r#"{"instance_id":"acme-001","domain":"acme.com","client":"Acme SA","version":"1.2.3","release_channel":"stable","health":"ok","backup_status":"ok","db_ok":true,"redis_ok":true,"storage_ok":true,"jobs_failed":0,"last_backup_at":"2026-02-11T02:00:00Z","alerts":[{"level":"warning","message":"Low disk"}],"job_failures":[{"queue":"billing","message":"Timeout"}]}"#;
    std::fs::write(&file, payload).expect("write body");
    let openssl = tokio::process::Command::new("openssl")
        .args(["dgst", "-sha256", "-hmac", SECRET, "-r"])
        .arg(&file)
        .output()
        .await
        .expect("openssl must be installed");
    let stdout = String::from_utf8(openssl.stdout).expect("utf8");
    let signature = stdout
        .split_whitespace()
        .next()
        .expect("openssl printed a digest")
        .to_owned();
    assert_eq!(signature.len(), 64);
    let curl = tokio::process::Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H"])
        .arg(format!("x-agent-signature: {signature}"))
        .args(["-H", "content-type: application/json", "--data-binary"])
        .arg(format!("@{}", file.display()))
        .arg(server.at("/api/heartbeats"))
        .output()
        .await
        .expect("curl must be installed");
    assert_eq!(String::from_utf8_lossy(&curl.stdout), "200");
    let (status, detail) = server
        .get_json("/api/installations/acme-001", SUPPORT)
        .await;
    assert_eq!(status, 200);
    assert_eq!(detail["client"], "Acme SA");
    assert_eq!(detail["scheme"], "v0");
    assert_eq!(detail["job_failures"][0]["message"], "Timeout");
    assert_eq!(detail["alerts"][0]["message"], "Low disk");
}

#[tokio::test]
async fn v1_heartbeat_is_recorded_and_a_retry_is_acknowledged_without_being_applied() {
    let t = support::sqlite().await;
    let server = TestServer::start(t.store.clone()).await;
    let hb = body("acme-001", json!({"job_failures": [{"message": "boom"}]}));
    let ts = now();
    let first = server.send_v1(SECRET, "msg-1", ts, &hb).await;
    assert_eq!(first.status(), 200);
    let first: Value = first.json().await.expect("json");
    assert_eq!(
        (first["ok"].clone(), first["duplicate"].clone()),
        (json!(true), json!(false))
    );
    // The agent did not get the answer and re-sends: same id, fresh timestamp.
    let retry = server.send_v1(SECRET, "msg-1", ts + 1, &hb).await;
    assert_eq!(retry.status(), 200);
    let retry: Value = retry.json().await.expect("json");
    assert_eq!(retry["duplicate"], true);
    assert_eq!(count(&server).await, 1);
    let (_, detail) = server
        .get_json("/api/installations/acme-001", SUPPORT)
        .await;
    assert_eq!(detail["job_failures"].as_array().map(Vec::len), Some(1));
    // The shared fallback secret signs instances without their own.
    let other = server
        .send_v1(support::SHARED, "msg-1", ts, &body("other-7", json!({})))
        .await;
    assert_eq!(other.status(), 200);
}

#[tokio::test]
async fn tampered_replayed_expired_and_malformed_signatures_get_401_and_store_nothing() {
    let t = support::sqlite().await;
    let server = TestServer::start(t.store.clone()).await;
    let hb = body("acme-001", json!({}));
    let ts = now();
    assert_eq!(
        server.send_v1(SECRET, "msg-ok", ts, &hb).await.status(),
        200
    );
    let signed = support::signer(SECRET).headers("msg-x", ts, &hb);
    let post = |headers: Vec<(&'static str, String)>, body: Vec<u8>| {
        let mut request = server.client.post(server.at("/api/heartbeats")).body(body);
        for (k, v) in headers {
            request = request.header(k, v);
        }
        request.send()
    };
    let intruder = body("intruder-9", json!({}));
    let mut tampered = hb.clone();
    tampered[20] ^= 1;
    let cases: Vec<(&str, Headers, Vec<u8>)> = vec![
        ("tampered body", signed.pairs().to_vec(), tampered),
        (
            "other instance's body under this signature",
            signed.pairs().to_vec(),
            intruder.clone(),
        ),
        (
            "wrong secret",
            support::signer("not-the-secret")
                .headers("msg-y", ts, &intruder)
                .pairs()
                .to_vec(),
            intruder.clone(),
        ),
        (
            "expired",
            support::signer(SECRET)
                .headers("msg-old", ts - 600, &hb)
                .pairs()
                .to_vec(),
            hb.clone(),
        ),
        (
            "from the future",
            support::signer(SECRET)
                .headers("msg-new", ts + 600, &hb)
                .pairs()
                .to_vec(),
            hb.clone(),
        ),
        (
            "replayed",
            support::signer(SECRET)
                .headers("msg-ok", ts, &hb)
                .pairs()
                .to_vec(),
            hb.clone(),
        ),
        (
            "v1 signature of the wrong length",
            vec![
                ("webhook-id", "m".into()),
                ("webhook-timestamp", ts.to_string()),
                ("webhook-signature", "v1,AAAA".into()),
            ],
            hb.clone(),
        ),
        (
            "v0 signature of the wrong length",
            vec![("x-agent-signature", "abc123".into())],
            hb.clone(),
        ),
        (
            "v0 signature far too long",
            vec![("x-agent-signature", "a".repeat(5000))],
            hb.clone(),
        ),
        (
            "v0 signature not hex",
            vec![("x-agent-signature", "z".repeat(64))],
            hb.clone(),
        ),
        ("no signature", vec![], hb.clone()),
        (
            "v1 without timestamp",
            vec![
                ("webhook-id", "m".into()),
                ("webhook-signature", signed.signature.clone()),
            ],
            hb.clone(),
        ),
        (
            "timestamp not a number",
            vec![
                ("webhook-id", "m".into()),
                ("webhook-timestamp", "soon".into()),
                ("webhook-signature", signed.signature.clone()),
            ],
            hb.clone(),
        ),
        (
            "body without instance_id",
            support::signer(SECRET)
                .headers("m2", ts, b"{}")
                .pairs()
                .to_vec(),
            b"{}".to_vec(),
        ),
        (
            "not JSON",
            support::signer(SECRET)
                .headers("m3", ts, b"\xff\xfe")
                .pairs()
                .to_vec(),
            b"\xff\xfe".to_vec(),
        ),
    ];
    for (what, headers, body) in cases {
        let response = post(headers, body).await.expect("send");
        assert_eq!(response.status(), 401, "{what}");
        let error: Value = response.json().await.expect("json error body");
        assert_eq!(code(&error), "unauthorized", "{what}");
        assert_eq!(
            error["error"]["message"], "unauthorized",
            "{what}: one generic message"
        );
    }
    assert_eq!(
        count(&server).await,
        1,
        "nothing stored by refused requests"
    );
    let (status, _) = server
        .get_json("/api/installations/intruder-9", SUPPORT)
        .await;
    assert_eq!(status, 404, "no installation created");
    let text = server.metrics().await;
    for reason in [
        "signature_mismatch",
        "timestamp_out_of_tolerance",
        "malformed_header",
        "replay",
        "missing_instance_id",
    ] {
        assert!(
            text.contains(&format!(
                "fleet_heartbeats_rejected_total{{reason=\"{reason}\"}}"
            )),
            "{reason} counted:\n{text}"
        );
    }
}

#[tokio::test]
async fn limits_answer_413_and_invalid_payloads_422_with_every_path() {
    let t = support::sqlite().await;
    let server = TestServer::start(t.store.clone()).await;
    let huge = body("acme-001", json!({"pad": "x".repeat(2 * 1024 * 1024)}));
    let response = server.send_v1(SECRET, "big", now(), &huge).await;
    assert_eq!(response.status(), 413);
    let error: Value = response.json().await.expect("json");
    assert_eq!(code(&error), "payload_too_large");
    // Chunked, without Content-Length: still cut at the limit.
    let stream =
        futures_util::stream::iter((0..40).map(|_| Ok::<_, std::io::Error>(vec![b' '; 64 * 1024])));
    let response = server
        .client
        .post(server.at("/api/heartbeats"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 413);
    let invalid = br#"{"instance_id":"acme-001","db_ok":"yes","storage_ok":true,"jobs_failed":-1,"alerts":[{"level":"panic","message":"x"}]}"#;
    let response = server.send_v1(SECRET, "bad", now(), invalid).await;
    assert_eq!(response.status(), 422);
    let error: Value = response.json().await.expect("json");
    assert_eq!(code(&error), "invalid");
    let paths: Vec<&str> = error["error"]["details"]
        .as_array()
        .expect("details")
        .iter()
        .filter_map(|d| d["path"].as_str())
        .collect();
    assert_eq!(
        paths,
        ["db_ok", "redis_ok", "jobs_failed", "alerts[0].level"]
    );
    let many = body(
        "acme-001",
        json!({"alerts": vec![json!({"message": "m"}); 101]}),
    );
    assert_eq!(
        server.send_v1(SECRET, "many", now(), &many).await.status(),
        422
    );
    assert_eq!(count(&server).await, 0);
}

#[tokio::test]
async fn v0_can_be_refused_and_enrollment_can_be_required() {
    let t = support::sqlite().await;
    let settings = Settings {
        allow_v0: false,
        require_enrollment: true,
        ..Settings::default()
    };
    let server = TestServer::start_with(t.store.clone(), |b| b.settings(settings)).await;
    let hb = body("acme-001", json!({}));
    assert_eq!(server.send_v0(SECRET, &hb).await.status(), 401);
    let refused = server.send_v1(SECRET, "m1", now(), &hb).await;
    assert_eq!(refused.status(), 403);
    let error: Value = refused.json().await.expect("json");
    assert_eq!(code(&error), "not_enrolled");
    let enrolled = server
        .client
        .post(server.at("/api/installations"))
        .bearer_auth(ADMIN)
        .json(&json!({"instance_id": "acme-001"}))
        .send()
        .await
        .expect("enroll");
    assert_eq!(enrolled.status(), 201);
    for bad in [
        json!({"instance_id": "has space"}),
        json!({"instance_id": ""}),
        json!({"id": 1}),
    ] {
        let refused = server
            .client
            .post(server.at("/api/installations"))
            .bearer_auth(ADMIN)
            .json(&bad)
            .send()
            .await
            .expect("enroll");
        assert_eq!(refused.status(), 422, "{bad}");
    }
    assert_eq!(server.send_v1(SECRET, "m1", now(), &hb).await.status(), 200);
}

#[tokio::test]
async fn slo_breach_alerts_once_and_silence_raises_an_offline_alert() {
    let t = support::sqlite().await;
    let settings = Settings {
        slo: SloThresholds {
            p95_ms_max: 500.0,
            error_rate_max: 0.0,
            webhook_retry_rate_max: 0.0,
        },
        offline_after: Duration::from_secs(1),
        sweep_interval: Duration::from_millis(200),
        ..Settings::default()
    };
    let server = TestServer::start_with(t.store.clone(), |b| b.settings(settings)).await;
    for (i, p95) in [900.0, 950.0, 990.0].into_iter().enumerate() {
        let hb = body("acme-001", json!({"slo_p95_ms": p95}));
        assert_eq!(
            server
                .send_v1(SECRET, &format!("m{i}"), now(), &hb)
                .await
                .status(),
            200
        );
    }
    let (_, alerts) = server.get_json("/api/alerts", SUPPORT).await;
    let kinds: Vec<&str> = alerts["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|a| a["kind"].as_str())
        .collect();
    assert_eq!(kinds, ["slo_p95_ms"]);
    // Silence: the sweeper opens an offline alert within a few sweeps.
    let mut offline = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (_, list) = server
            .get_json("/api/installations?health=offline", SUPPORT)
            .await;
        if list["total"] == 1 {
            assert_eq!(list["items"][0]["offline"], json!(true), "{list}");
            offline = true;
            break;
        }
    }
    assert!(offline, "offline alert opened");
    let hb = body("acme-001", json!({"slo_p95_ms": 100.0}));
    assert_eq!(
        server.send_v1(SECRET, "m-back", now(), &hb).await.status(),
        200
    );
    let (_, alerts) = server.get_json("/api/alerts?open=true", SUPPORT).await;
    assert_eq!(
        alerts["items"],
        json!([]),
        "breach over and back online: nothing open"
    );
}

/// After an outage of the control plane itself, installations heard until it went down are
/// not declared offline at once, which would page for every agent still waiting to
/// reconnect: the silence while no one listened does not count until the threshold has
/// passed since the start. One silent since long before the outage is declared at once.
#[tokio::test]
async fn after_the_control_planes_own_outage_agents_get_the_offline_threshold_to_return() {
    let t = support::sqlite().await;
    // The control plane went down an hour ago, right after quiet's heartbeat; gone had been
    // silent for an hour already.
    let went_down = now() - 3600;
    t.store
        .record_heartbeats(
            &[
                support::incoming("gone", json!({}), None, went_down - 3600),
                support::incoming("quiet", json!({}), None, went_down),
            ],
            &IngestRules::default(),
        )
        .await
        .expect("record");
    let settings = Settings {
        offline_after: Duration::from_secs(2),
        sweep_interval: Duration::from_millis(100),
        ..Settings::default()
    };
    let started = std::time::Instant::now();
    let server = TestServer::start_with(t.store.clone(), |b| b.settings(settings)).await;
    let offline = async || {
        let (_, list) = server
            .get_json("/api/installations?health=offline", SUPPORT)
            .await;
        list["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|i| i["instance_id"].as_str().expect("id").to_owned())
            .collect::<Vec<_>>()
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        offline().await,
        ["gone"],
        "after {:?}: only the one silent before the outage",
        started.elapsed()
    );
    let deadline = started + Duration::from_secs(15);
    while offline().await.len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "quiet never declared offline"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

/// A heartbeat the database refuses gets 503, so its agent keeps it and sends it again, and
/// the heartbeats sent with it (batched with it when they arrive together) are recorded
/// and acknowledged.
#[tokio::test]
async fn a_heartbeat_the_database_refuses_does_not_sink_the_ones_sent_with_it() {
    let t = support::sqlite().await;
    // A real refusal: SQLite aborts the time-series row of one installation.
    let pool = sqlx::SqlitePool::connect(&t.url).await.expect("connect");
    sqlx::query(
        "CREATE TRIGGER refuse_poison BEFORE INSERT ON heartbeats \
         WHEN (SELECT instance_id FROM installations WHERE id = NEW.installation_id) = 'poison' \
         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
    )
    .execute(&pool)
    .await
    .expect("create trigger");
    pool.close().await;
    let server = TestServer::start(t.store.clone()).await;
    let ids: Vec<String> = (0..40)
        .map(|i| match i {
            20 => "poison".to_owned(),
            _ => format!("ok-{i:02}"),
        })
        .collect();
    let bodies: Vec<Vec<u8>> = ids.iter().map(|id| body(id, json!({}))).collect();
    let ts = now();
    let sends = bodies.iter().enumerate().map(|(i, hb)| {
        let msg = format!("msg-{i}");
        let server = &server;
        async move {
            server
                .send_v1(support::SHARED, &msg, ts, hb)
                .await
                .status()
                .as_u16()
        }
    });
    let statuses = futures_util::future::join_all(sends).await;
    for (id, status) in ids.iter().zip(&statuses) {
        let expected = if id == "poison" { 503 } else { 200 };
        assert_eq!(*status, expected, "{id}: {statuses:?}");
    }
    assert_eq!(count(&server).await, 39);
}

/// An installation row locked elsewhere (an operator's transaction left open) holds its
/// heartbeat up for the writers' lock timeout only: the agent gets a retryable 503 well
/// before its own 10 s timeout, and the same message is recorded once the lock is gone.
#[tokio::test]
async fn a_row_lock_held_elsewhere_answers_503_in_seconds_and_loses_nothing() {
    let t = support::postgres().await;
    let server = TestServer::start(t.store.clone()).await;
    server.seen("locked").await;
    let (side, holder) = t.lock_installation("locked").await;

    let hb = body("locked", json!({ "version": "2.0.0" }));
    let started = std::time::Instant::now();
    let answer = tokio::time::timeout(
        Duration::from_secs(9),
        server.send_v1(SHARED, "under-lock", now(), &hb),
    )
    .await
    .expect("the heartbeat waited for the lock as long as it was held");
    let waited = started.elapsed();
    assert_eq!(answer.status().as_u16(), 503);
    assert!(
        waited < Duration::from_secs(8),
        "answered after {waited:?}, the agent would have given up"
    );
    assert_eq!(
        count(&server).await,
        1,
        "only the first heartbeat is stored"
    );

    holder.rollback().await.expect("release the lock");
    let retried = server.send_v1(SHARED, "under-lock", now(), &hb).await;
    assert_eq!(retried.status().as_u16(), 200);
    assert_eq!(count(&server).await, 2);
    let (_, detail) = server
        .get_json("/api/installations?q=locked", SUPPORT)
        .await;
    assert_eq!(detail["items"][0]["version"], "2.0.0", "{detail}");
    server.stop().await;
    side.close().await;
    support::drop_schema(t.schema).await;
}

/// The shared `CONTROL_PLANE_AGENT_TOKEN` signs for instances that have no secret of their
/// own, never for an enrolled one: whoever holds the token every unlisted agent has would
/// otherwise send its heartbeats, take its jobs and register as it for its live channel.
#[tokio::test]
async fn the_shared_token_does_not_sign_for_an_enrolled_instance() {
    let t = support::sqlite().await;
    let server = TestServer::start(t.store.clone()).await;
    let enrollment = crate::commands::enrollment(&server, "enrolled-1").await;
    let registered: Value = server
        .client
        .post(server.at("/v1/agents/register"))
        .json(&json!({"instance_id": "enrolled-1", "enrollment_token": enrollment["enrollment_token"]}))
        .send()
        .await
        .expect("register")
        .json()
        .await
        .expect("json");
    let issued = registered["secret"]
        .as_str()
        .expect("issued secret")
        .to_owned();

    let heartbeat = body("enrolled-1", json!({}));
    let shared = server
        .send_v1(SHARED, "msg_shared_hb", now(), &heartbeat)
        .await;
    assert_eq!(
        shared.status().as_u16(),
        401,
        "the shared token, for an enrolled instance"
    );
    let own = server
        .send_v1(&issued, "msg_issued_hb", now(), &heartbeat)
        .await;
    assert_eq!(own.status().as_u16(), 200, "its issued secret");
    let asks = serde_json::to_vec(&json!({"instance_id": "enrolled-1"})).expect("json");
    for (n, path) in ["/api/updates/next", "/v1/agents/register"]
        .into_iter()
        .enumerate()
    {
        let answer = server
            .post_v1(path, SHARED, &format!("msg_shared_{n}"), now(), &asks)
            .await;
        assert_eq!(
            answer.status().as_u16(),
            401,
            "{path} with the shared token"
        );
    }
    let answer = server
        .post_v1(
            "/v1/agents/register",
            &issued,
            "msg_issued_register",
            now(),
            &asks,
        )
        .await;
    assert_eq!(
        answer.status().as_u16(),
        200,
        "register with the issued secret"
    );

    // An instance that neither is listed nor enrolled still signs with the shared token.
    let other = body("unlisted-1", json!({}));
    let answer = server.send_v1(SHARED, "msg_unlisted", now(), &other).await;
    assert_eq!(answer.status().as_u16(), 200);
    assert_eq!(count(&server).await, 2);
    server.stop().await;
}

/// An enrollment token presented with another instance's id is refused and stays usable by
/// the instance it was made for: a mistyped id does not burn it.
#[tokio::test]
async fn an_enrollment_token_for_another_instance_is_refused_without_being_used() {
    let t = support::sqlite().await;
    let server = TestServer::start(t.store.clone()).await;
    let enrollment = crate::commands::enrollment(&server, "edge-41").await;
    let register = |instance: &str| {
        server
            .client
            .post(server.at("/v1/agents/register"))
            .json(&json!({"instance_id": instance, "enrollment_token": enrollment["enrollment_token"]}))
            .send()
    };
    let wrong = register("edge-14").await.expect("register");
    assert_eq!(wrong.status().as_u16(), 401);
    let right = register("edge-41").await.expect("register");
    assert_eq!(right.status().as_u16(), 200, "the token is still unused");
    let again = register("edge-41").await.expect("register");
    assert_eq!(again.status().as_u16(), 401, "and used once only");
    server.stop().await;
}
