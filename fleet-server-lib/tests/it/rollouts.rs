//! Releases, rollouts and update jobs over real HTTP, on SQLite and PostgreSQL.

use fleet_core::manifest::{ManifestVerifier, PrivateKey, ReleaseManifest, sign_manifest_hmac};
use serde_json::{Value, json};

use crate::support::{
    self, ADMIN, OPS, SHARED, SUPPORT, TestServer, TestStore, body, code, now, on_both_backends,
};

pub fn release_key() -> PrivateKey {
    PrivateKey::from_seed([9; 32])
}

pub fn manifest(version: &str) -> ReleaseManifest {
    ReleaseManifest {
        version: version.into(),
        sha: "abc123".into(),
        channel: "stable".into(),
        migrations_required: true,
        breaking_changes: false,
        released_at: "2026-11-01T10:00:00Z".into(),
        artifacts: None,
    }
}

async fn server(t: &TestStore) -> TestServer {
    TestServer::start_with(t.store.clone(), |b| {
        b.manifest_verifier(ManifestVerifier::new(vec![release_key().public_key()]))
    })
    .await
}

/// A heartbeat that puts `instance` on `channel` at `version`.
pub(crate) async fn enroll(server: &TestServer, instance: &str, channel: &str, version: &str) {
    let hb = body(
        instance,
        json!({"release_channel": channel, "version": version}),
    );
    let msg = uuid::Uuid::new_v4().to_string();
    assert_eq!(server.send_v1(SHARED, &msg, now(), &hb).await.status(), 200);
}

/// POSTs `body` to an agent endpoint, signed (v1) with the shared secret.
pub(crate) async fn agent_post(server: &TestServer, path: &str, body: &Value) -> (u16, Value) {
    let bytes = serde_json::to_vec(body).expect("json");
    let msg = uuid::Uuid::new_v4().to_string();
    let response = server.post_v1(path, SHARED, &msg, now(), &bytes).await;
    let status = response.status().as_u16();
    let answer = response.json().await.unwrap_or(Value::Null);
    // What an agent is handed is what /openapi.json says it is.
    check_post_answer(server, path, status, &answer).await;
    (status, answer)
}

/// Checks a success answer to `POST path` against the schema /openapi.json gives for it, if
/// it gives one.
async fn check_post_answer(server: &TestServer, path: &str, status: u16, answer: &Value) {
    if matches!(status, 200 | 201) {
        let (_, spec) = server.get_json("/openapi.json", SUPPORT).await;
        support::check_documented_answer(&spec, "post", path, status, answer);
    }
}

pub(crate) async fn admin_post(
    server: &TestServer,
    path: &str,
    token: &str,
    body: &Value,
) -> (u16, Value) {
    let response = server
        .client
        .post(server.at(path))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .expect("post");
    let status = response.status().as_u16();
    let answer = response.json().await.unwrap_or(Value::Null);
    // What an operator gets back is what /openapi.json says it is.
    check_post_answer(server, path, status, &answer).await;
    (status, answer)
}

async fn next(server: &TestServer, instance: &str) -> (u16, Value) {
    agent_post(
        server,
        "/api/updates/next",
        &json!({"instance_id": instance, "current_version": "1.0.0"}),
    )
    .await
}

async fn report(server: &TestServer, instance: &str, job: &Value, status: &str) -> (u16, Value) {
    agent_post(
        server,
        "/api/updates/report",
        &json!({"instance_id": instance, "job_id": job, "status": status, "step": "done",
                "duration_ms": 12}),
    )
    .await
}

async fn releases_are_verified_before_they_are_stored(t: TestStore) {
    let server = server(&t).await;
    let value = serde_json::to_value(manifest("2.0.0")).expect("json");
    // Unsigned, HMAC without a configured secret, tampered, signed by another key.
    let (status, error) = admin_post(&server, "/api/releases", ADMIN, &value).await;
    assert_eq!((status, code(&error)), (422, "invalid"), "{error}");
    let secret = fleet_core::Secret::new("release-secret").expect("secret");
    let mut hmac = value.clone();
    hmac["signature"] = sign_manifest_hmac(&secret, &value).expect("sign").into();
    let (status, error) = admin_post(&server, "/api/releases", ADMIN, &hmac).await;
    assert_eq!(status, 422);
    assert!(error.to_string().contains("scheme_not_accepted"), "{error}");
    let signed = release_key().sign_value(&value).expect("sign");
    let mut tampered = signed.clone();
    tampered["version"] = "6.6.6".into();
    let (status, error) = admin_post(&server, "/api/releases", ADMIN, &tampered).await;
    assert_eq!(status, 422);
    assert!(error.to_string().contains("signature_mismatch"), "{error}");
    let other = PrivateKey::from_seed([1; 32])
        .sign_value(&value)
        .expect("sign");
    assert_eq!(
        admin_post(&server, "/api/releases", ADMIN, &other).await.0,
        422
    );
    // Only admin may publish.
    assert_eq!(
        admin_post(&server, "/api/releases", OPS, &signed).await.0,
        403
    );
    let (status, release) = admin_post(&server, "/api/releases", ADMIN, &signed).await;
    assert_eq!(status, 201, "{release}");
    assert_eq!(release["version"], "2.0.0");
    assert_eq!(release["scheme"], "ed25519");
    let (status, _) = admin_post(
        &server,
        "/api/releases",
        ADMIN,
        &json!({"manifest": release["manifest"]}),
    )
    .await;
    assert_eq!(status, 409, "the same version twice on a channel");
    let (status, list) = server.get_documented("/api/releases", SUPPORT).await;
    assert_eq!(
        (status, list["items"].as_array().map(Vec::len)),
        (200, Some(1))
    );
    server.stop().await;
}

async fn rollout_freezes_targets_halts_on_failure_and_resumes(t: TestStore) {
    let server = server(&t).await;
    for i in 1..=5 {
        enroll(&server, &format!("a{i}"), "stable", "1.0.0").await;
    }
    enroll(&server, "already", "stable", "2.0.0").await;
    enroll(&server, "beta-1", "beta", "1.0.0").await;
    let signed = release_key()
        .sign_value(&serde_json::to_value(manifest("2.0.0")).expect("json"))
        .expect("sign");
    let (_, release) = admin_post(&server, "/api/releases", ADMIN, &signed).await;
    // A channel where nothing needs the release: refused, and nothing is stored.
    for channel in ["nightly", "beta-of-nobody"] {
        let (status, error) = admin_post(
            &server,
            "/api/rollouts",
            ADMIN,
            &json!({"release_id": release["id"], "channel": channel}),
        )
        .await;
        assert_eq!((status, code(&error)), (422, "invalid"), "{error}");
        assert_eq!(error["error"]["details"][0]["path"], "channel", "{error}");
        assert!(
            error.to_string().contains("no installation on channel"),
            "{error}"
        );
    }
    let (_, listed) = server.get_documented("/api/rollouts", SUPPORT).await;
    assert_eq!(
        listed["items"].as_array().map(Vec::len),
        Some(0),
        "{listed}"
    );
    let (status, rollout) = admin_post(
        &server,
        "/api/rollouts",
        ADMIN,
        &json!({"release_id": release["id"], "channel": "stable", "batch_size": 2,
                "failure_threshold": 0}),
    )
    .await;
    assert_eq!(status, 201, "{rollout}");
    let id = rollout["id"].as_i64().expect("id");
    let targets: Vec<&str> = rollout["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .filter_map(|j| j["instance_id"].as_str())
        .collect();
    assert_eq!(
        targets,
        ["a1", "a2", "a3", "a4", "a5"],
        "frozen, channel only, not on 2.0.0"
    );
    assert_eq!(rollout["batch_count"], 3);
    assert_eq!(rollout["batches"][0]["pending"], 2);
    assert_eq!(rollout["batches"][1]["queued"], 2);

    // A new instance joining the channel later is not added.
    enroll(&server, "a0-late", "stable", "1.0.0").await;
    assert_eq!(next(&server, "a0-late").await.0, 204);

    let advance = format!("/api/rollouts/{id}/advance");
    let (status, error) = admin_post(&server, &advance, ADMIN, &json!({})).await;
    assert_eq!(
        (status, code(&error)),
        (409, "conflict"),
        "batch 1 is pending"
    );
    assert_eq!(
        admin_post(&server, "/api/rollouts/999999/advance", ADMIN, &json!({}))
            .await
            .0,
        404
    );
    assert_eq!(admin_post(&server, &advance, OPS, &json!({})).await.0, 403);

    // Batch 1: the job comes with the manifest (verifiable) and the settings.
    let (status, job) = next(&server, "a1").await;
    assert_eq!(status, 200, "{job}");
    ManifestVerifier::new(vec![release_key().public_key()])
        .verify_value(&job["manifest"])
        .expect("the agent can verify what it gets");
    assert_eq!(job["rollout"]["batch_size"], 2);
    assert_eq!(next(&server, "a3").await.0, 204, "batch 2 has not started");
    let a1 = job["job_id"].clone();
    // A replayed request (same message id and timestamp) is refused.
    let replay_body = serde_json::to_vec(&json!({"instance_id": "a3"})).expect("json");
    let signed_at = now();
    for expected in [204, 401] {
        let response = server
            .post_v1(
                "/api/updates/next",
                SHARED,
                "msg_replayed",
                signed_at,
                &replay_body,
            )
            .await;
        assert_eq!(response.status().as_u16(), expected);
    }
    // The documented statuses only; only the instance's own job.
    let (status, error) = report(&server, "a1", &a1, "exploded").await;
    assert_eq!((status, code(&error)), (422, "invalid"), "{error}");
    let (status, _) = agent_post(
        &server,
        "/api/updates/report",
        &json!({"instance_id": "a1", "job_id": a1, "status": "in_progress", "step": "teleport"}),
    )
    .await;
    assert_eq!(status, 422, "unknown step");
    assert_eq!(
        report(&server, "a2", &a1, "succeeded").await.0,
        404,
        "a2 does not own it"
    );
    let (status, _) = agent_post(
        &server,
        "/api/updates/report",
        &json!({"instance_id": "a1", "job_id": a1, "status": "in_progress", "step": "migrate",
                "canary_percent": 5, "metric_p95_ms": 120.5}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(report(&server, "a1", &a1, "succeeded").await.0, 200);
    let (_, a2) = next(&server, "a2").await;
    let (status, error) = admin_post(&server, &advance, ADMIN, &json!({})).await;
    assert_eq!(status, 409, "a2 still runs: {error}");
    assert_eq!(
        report(&server, "a2", &a2["job_id"], "succeeded").await.0,
        200
    );
    let (status, after) = admin_post(&server, &advance, ADMIN, &json!({})).await;
    assert_eq!(
        (status, after["current_batch"].clone()),
        (200, json!(1)),
        "{after}"
    );

    // Batch 2: one rollback halts the rollout at once; batch 3 is untouched.
    let (_, a3) = next(&server, "a3").await;
    let (_, a4) = next(&server, "a4").await;
    assert_eq!(
        report(&server, "a4", &a4["job_id"], "rolled_back").await.0,
        200
    );
    let (_, halted) = server
        .get_documented(&format!("/api/rollouts/{id}"), SUPPORT)
        .await;
    assert_eq!(halted["status"], "halted", "{halted}");
    assert!(
        halted["halt_reason"]
            .as_str()
            .is_some_and(|r| r.contains("1 of 2"))
    );
    assert_eq!(
        report(&server, "a3", &a3["job_id"], "succeeded").await.0,
        200
    );
    let (_, still) = server
        .get_documented(&format!("/api/rollouts/{id}"), SUPPORT)
        .await;
    assert_eq!(
        still["status"], "halted",
        "a later success does not un-halt it"
    );
    assert_eq!(still["batches"][1]["succeeded"], 1);
    assert_eq!(still["batches"][1]["rolled_back"], 1);
    assert_eq!(still["batches"][2]["queued"], 1);
    let (status, _) = admin_post(&server, &advance, ADMIN, &json!({})).await;
    assert_eq!(status, 409, "halted");
    assert_eq!(next(&server, "a5").await.0, 204);
    let (_, alerts) = server.get_json("/api/alerts", SUPPORT).await;
    let halt_alerts: Vec<&Value> = alerts["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|a| a["kind"] == "rollout_halted")
        .collect();
    assert_eq!(halt_alerts.len(), 1, "{alerts}");
    assert_eq!(halt_alerts[0]["instance_id"], "a4");

    // A retried final report is acknowledged and recorded once; a contradicting one is 409.
    assert_eq!(
        report(&server, "a4", &a4["job_id"], "rolled_back").await.0,
        200
    );
    assert_eq!(
        report(&server, "a4", &a4["job_id"], "succeeded").await.0,
        409
    );
    let a4_id: i64 = a4["job_id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("id");
    let events = t.store.job_events(a4_id).await.expect("events");
    assert_eq!(
        events.iter().filter(|e| e.status == "rolled_back").count(),
        1,
        "{events:?}"
    );

    // Resume (ops may), advance, finish.
    let (status, resumed) = admin_post(
        &server,
        &format!("/api/rollouts/{id}/resume"),
        OPS,
        &json!({}),
    )
    .await;
    assert_eq!((status, resumed["status"].clone()), (200, json!("running")));
    assert_eq!(
        admin_post(&server, &advance, ADMIN, &json!({})).await.0,
        200
    );
    let (_, a5) = next(&server, "a5").await;
    assert_eq!(
        report(&server, "a5", &a5["job_id"], "succeeded").await.0,
        200
    );
    let (_, done) = server
        .get_documented(&format!("/api/rollouts/{id}"), SUPPORT)
        .await;
    assert_eq!(done["status"], "completed", "{done}");
    let (_, list) = server.get_documented("/api/rollouts", SUPPORT).await;
    assert_eq!(list["items"][0]["id"], id);
    server.stop().await;
}

async fn pause_cancel_and_auto_advance(t: TestStore) {
    let server = server(&t).await;
    for i in 1..=3 {
        enroll(&server, &format!("p{i}"), "stable", "1.0.0").await;
    }
    let signed = release_key()
        .sign_value(&serde_json::to_value(manifest("3.0.0")).expect("json"))
        .expect("sign");
    admin_post(&server, "/api/releases", ADMIN, &signed).await;
    let (status, rollout) = admin_post(
        &server,
        "/api/rollouts",
        ADMIN,
        &json!({"version": "3.0.0", "channel": "stable", "batchSize": 1, "autoAdvance": true}),
    )
    .await;
    assert_eq!(status, 201, "{rollout}");
    let id = rollout["id"].as_i64().expect("id");
    let (_, p1) = next(&server, "p1").await;
    assert_eq!(
        report(&server, "p1", &p1["job_id"], "succeeded").await.0,
        200
    );
    let (_, after) = server
        .get_documented(&format!("/api/rollouts/{id}"), SUPPORT)
        .await;
    assert_eq!(after["current_batch"], 1, "auto-advanced: {after}");
    let (status, paused) = admin_post(
        &server,
        &format!("/api/rollouts/{id}/pause"),
        OPS,
        &json!({}),
    )
    .await;
    assert_eq!((status, paused["status"].clone()), (200, json!("paused")));
    assert_eq!(
        next(&server, "p2").await.0,
        204,
        "nothing handed out while paused"
    );
    assert_eq!(
        admin_post(
            &server,
            &format!("/api/rollouts/{id}/pause"),
            OPS,
            &json!({})
        )
        .await
        .0,
        409
    );
    let (status, cancelled) = admin_post(
        &server,
        &format!("/api/rollouts/{id}/cancel"),
        ADMIN,
        &json!({}),
    )
    .await;
    assert_eq!(
        (status, cancelled["status"].clone()),
        (200, json!("cancelled"))
    );
    assert_eq!(cancelled["batches"][1]["cancelled"], 1);
    assert_eq!(cancelled["batches"][2]["cancelled"], 1);
    let (status, _) = admin_post(
        &server,
        "/api/rollouts",
        ADMIN,
        &json!({"channel": "stable"}),
    )
    .await;
    assert_eq!(status, 422, "no release named");
    server.stop().await;
}

/// Enrolls `{prefix}1` and `{prefix}2` on stable at 1.0.0, publishes `version` and rolls it
/// out one instance per batch with auto-advance, a p95 maximum of 500 ms and a window of
/// 60 s; returns the rollout's id.
async fn observed_rollout(server: &TestServer, prefix: &str, version: &str) -> i64 {
    for i in 1..=2 {
        enroll(server, &format!("{prefix}{i}"), "stable", "1.0.0").await;
    }
    let signed = release_key()
        .sign_value(&serde_json::to_value(manifest(version)).expect("json"))
        .expect("sign");
    admin_post(server, "/api/releases", ADMIN, &signed).await;
    let (_, rollout) = admin_post(
        server,
        "/api/rollouts",
        ADMIN,
        &json!({"version": version, "channel": "stable", "batch_size": 1, "slo_p95_ms_max": 500.0,
                "auto_advance": true, "observe_secs": 60}),
    )
    .await;
    rollout["id"].as_i64().expect("id")
}

async fn slo_breach_after_update_halts_the_rollout(t: TestStore) {
    let server = server(&t).await;
    let id = observed_rollout(&server, "s", "4.0.0").await;
    let (_, s1) = next(&server, "s1").await;
    assert_eq!(
        report(&server, "s1", &s1["job_id"], "succeeded").await.0,
        200
    );
    let halted_now = async || {
        t.store
            .watch_rollout_slo(now(), false)
            .await
            .expect("watch")
    };
    assert_eq!(halted_now().await, 0);
    // Auto-advance waits out s1's observation window: s2 gets nothing yet.
    assert_eq!(next(&server, "s2").await.0, 204);
    // Delivered late from s1's outbox, collected before its update: the old version's
    // figures, which do not count against the new one.
    let late = body(
        "s1",
        json!({"release_channel": "stable", "version": "1.0.0", "slo_p95_ms": 950.0,
               "collected_at": now() - 300}),
    );
    assert_eq!(
        server
            .send_v1(SHARED, "slo-late", now(), &late)
            .await
            .status(),
        200
    );
    assert_eq!(halted_now().await, 0);
    let (_, running) = server
        .get_documented(&format!("/api/rollouts/{id}"), SUPPORT)
        .await;
    assert_eq!(running["status"], "running", "{running}");
    let hb = body(
        "s1",
        json!({"release_channel": "stable", "version": "4.0.0", "slo_p95_ms": 912.0}),
    );
    assert_eq!(
        server.send_v1(SHARED, "slo-1", now(), &hb).await.status(),
        200
    );
    // The background watcher may have got there first; either way it halts exactly once.
    assert!(halted_now().await <= 1);
    let (_, halted) = server
        .get_documented(&format!("/api/rollouts/{id}"), SUPPORT)
        .await;
    assert_eq!(halted["status"], "halted");
    let reason = halted["halt_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("s1") && reason.contains("slo_p95_ms"),
        "{reason}"
    );
    // The breach came before the next batch was handed out: s2 was never touched, even once
    // the window is over.
    t.store
        .watch_rollout_slo(now() + 120, false)
        .await
        .expect("watch");
    assert_eq!(next(&server, "s2").await.0, 204);
    server.stop().await;
}

/// Without a breach, an observed rollout starts its next batch (auto-advance) and completes
/// only once each batch's window is over.
async fn an_observed_rollout_moves_on_after_a_clean_window(t: TestStore) {
    let server = server(&t).await;
    let id = observed_rollout(&server, "w", "4.1.0").await;
    let status = async || {
        let (_, shown) = server
            .get_documented(&format!("/api/rollouts/{id}"), SUPPORT)
            .await;
        (shown["status"].clone(), shown["current_batch"].clone())
    };
    let (_, w1) = next(&server, "w1").await;
    report(&server, "w1", &w1["job_id"], "succeeded").await;
    let healthy = body("w1", json!({"version": "4.1.0", "slo_p95_ms": 120.0}));
    assert_eq!(
        server
            .send_v1(SHARED, "clean-1", now(), &healthy)
            .await
            .status(),
        200
    );
    let (_, shown) = server
        .get_documented(&format!("/api/rollouts/{id}"), SUPPORT)
        .await;
    let until = shown["observed_until"].as_i64().expect("observed until");
    assert!((now() + 55..=now() + 60).contains(&until), "{shown}");
    let (_, html) = page(&server, &format!("/rollouts/{id}"), SUPPORT).await;
    assert!(
        html.contains("id=observing") && html.contains("Watching batch 1"),
        "{html}"
    );
    t.store
        .watch_rollout_slo(now() + 30, false)
        .await
        .expect("watch");
    assert_eq!(status().await, (json!("running"), json!(0)), "mid-window");
    assert_eq!(next(&server, "w2").await.0, 204);
    t.store
        .watch_rollout_slo(now() + 61, false)
        .await
        .expect("watch");
    assert_eq!(
        status().await,
        (json!("running"), json!(1)),
        "the window is over"
    );
    let (_, shown) = server
        .get_documented(&format!("/api/rollouts/{id}"), SUPPORT)
        .await;
    assert_eq!(
        shown["observed_until"],
        Value::Null,
        "batch 2 runs: {shown}"
    );
    let (code, w2) = next(&server, "w2").await;
    assert_eq!(code, 200, "{w2}");
    report(&server, "w2", &w2["job_id"], "succeeded").await;
    assert_eq!(
        status().await.0,
        json!("running"),
        "the last batch is watched too"
    );
    t.store
        .watch_rollout_slo(now() + 61, false)
        .await
        .expect("watch");
    assert_eq!(status().await.0, json!("completed"));
    server.stop().await;
}

async fn a_halt_raises_an_alert_that_is_forwarded(t: TestStore) {
    let server = TestServer::start_with(t.store.clone(), |b| {
        b.manifest_verifier(ManifestVerifier::new(vec![release_key().public_key()]))
            // Nothing listens there: the delivery stays in the outbox for the test to see.
            .webhook(fleet_server::WebhookConfig::new("http://127.0.0.1:9/hook"))
    })
    .await;
    enroll(&server, "h1", "stable", "1.0.0").await;
    let signed = release_key()
        .sign_value(&serde_json::to_value(manifest("7.0.0")).expect("json"))
        .expect("sign");
    admin_post(&server, "/api/releases", ADMIN, &signed).await;
    let (_, rollout) = admin_post(
        &server,
        "/api/rollouts",
        ADMIN,
        &json!({"version": "7.0.0", "channel": "stable"}),
    )
    .await;
    let (_, job) = next(&server, "h1").await;
    assert_eq!(report(&server, "h1", &job["job_id"], "failed").await.0, 200);
    let (_, halted) = server
        .get_json(&format!("/api/rollouts/{}", rollout["id"]), SUPPORT)
        .await;
    assert_eq!(halted["status"], "halted");
    let due = t
        .store
        .outbox_claim(now() + 3600, now() + 3600 + 60, 100)
        .await
        .expect("outbox");
    let forwarded: Vec<Value> = due
        .iter()
        .filter_map(|item| serde_json::from_str::<Value>(&item.payload).ok())
        .filter(|p| p["type"] == "rollout_halted")
        .collect();
    assert_eq!(forwarded.len(), 1, "{due:?}");
    assert_eq!(forwarded[0]["instanceId"], "h1");
    assert_eq!(forwarded[0]["level"], "error");
    server.stop().await;
}

async fn a_large_fleet_is_frozen_into_batches_in_one_go(t: TestStore) {
    let now = now();
    let heartbeats: Vec<_> = (0..3000)
        .map(|i| {
            support::incoming(
                &format!("big-{i:05}"),
                json!({"release_channel": "stable", "version": "1.0.0"}),
                None,
                now,
            )
        })
        .collect();
    t.store
        .record_heartbeats(&heartbeats, &Default::default())
        .await
        .expect("record");
    let signed = release_key()
        .sign_value(&serde_json::to_value(manifest("8.0.0")).expect("json"))
        .expect("sign");
    let release = t
        .store
        .create_release("8.0.0", "stable", "ed25519", &signed.to_string(), now)
        .await
        .expect("release");
    let started = std::time::Instant::now();
    let new = fleet_server::store::rollouts::NewRollout {
        kind: fleet_server::store::rollouts::JobKind::Update,
        release_id: Some(release.id),
        version: None,
        plugin_release_id: None,
        plugin_action: Default::default(),
        channel: "stable".into(),
        settings: fleet_core::update::RolloutSettings {
            batch_size: 500,
            ..Default::default()
        },
        failure_threshold: "1%".into(),
        auto_advance: false,
        observe_secs: 600,
    };
    let detail = t.store.create_rollout(&new, now).await.expect("create");
    let took = started.elapsed();
    assert_eq!(detail.jobs.len(), 3000);
    assert_eq!(detail.batches.len(), 6);
    assert_eq!(detail.batches[0].pending, 500);
    assert!(detail.batches[1..].iter().all(|b| b.queued == 500));
    assert_eq!(
        detail.jobs[500].instance_id, "big-00500",
        "ordered, batch by batch"
    );
    assert!(took < std::time::Duration::from_secs(20), "took {took:?}");
}

/// The plugin rollout routes act on plugin rollouts only, by the marketplace's rules, and a
/// body of the wrong shape is refused naming the field.
async fn plugin_rollouts_keep_to_plugins_and_their_compatibility(t: TestStore) {
    let server = server(&t).await;
    enroll(&server, "k1", "stable", "1.0.0").await;
    // A release for another control plane: approving a request for it is refused, and a
    // rollout must not be the way around that.
    let (status, release) = admin_post(
        &server,
        "/api/plugins/releases",
        ADMIN,
        &json!({"name": "report", "version": "2.0.0", "compatible": ["9.*"]}),
    )
    .await;
    assert_eq!(status, 201, "{release}");
    let (status, error) = admin_post(
        &server,
        "/api/plugins/rollouts",
        ADMIN,
        &json!({"plugin_release_id": release["id"], "channel": "stable"}),
    )
    .await;
    assert_eq!((status, code(&error)), (409, "conflict"), "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not compatible")),
        "{error}"
    );
    let (_, rollouts) = server.get_json("/api/rollouts", SUPPORT).await;
    assert_eq!(rollouts["items"], json!([]), "nothing stored: {rollouts}");

    // An update rollout's id on the plugin route is unknown there.
    let signed = release_key()
        .sign_value(&serde_json::to_value(manifest("3.0.0")).expect("json"))
        .expect("sign");
    admin_post(&server, "/api/releases", ADMIN, &signed).await;
    let (status, update) = admin_post(
        &server,
        "/api/rollouts",
        ADMIN,
        &json!({"version": "3.0.0", "channel": "stable", "batchSize": 1}),
    )
    .await;
    assert_eq!(status, 201, "{update}");
    let id = update["id"].as_i64().expect("id");
    let (status, _) = admin_post(
        &server,
        &format!("/api/plugins/rollouts/{id}/advance"),
        ADMIN,
        &json!({}),
    )
    .await;
    assert_eq!(status, 404);
    let (_, still) = server
        .get_json(&format!("/api/rollouts/{id}"), SUPPORT)
        .await;
    assert_eq!(still["current_batch"], update["current_batch"], "{still}");

    // A plugin rollout's jobs carry its settings, as update jobs do: the agent skips the
    // rollback when the rollout turned it off.
    let (_, fitting) = admin_post(
        &server,
        "/api/plugins/releases",
        ADMIN,
        &json!({"name": "report", "version": "2.1.0"}),
    )
    .await;
    let (status, created) = admin_post(
        &server,
        "/api/plugins/rollouts",
        ADMIN,
        &json!({"plugin_release_id": fitting["id"], "channel": "stable", "autoRollback": false}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let (status, job) = agent_post(
        &server,
        "/api/plugins/next",
        &json!({"instance_id": "k1", "current_version": "1.0.0"}),
    )
    .await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["plugin"]["name"], "report", "{job}");
    assert_eq!(job["rollout"]["auto_rollback"], false, "{job}");

    // A value of the wrong type names its field.
    for (path, body, field) in [
        (
            "/api/plugins/releases",
            json!({"name": "x", "version": "1.0.0", "compatible": "*"}),
            "compatible",
        ),
        (
            "/api/plugins/releases",
            json!({"name": "x", "version": "1.0.0", "compatible": ["*", 7]}),
            "compatible[1]",
        ),
        (
            "/api/rollouts",
            json!({"version": "3.0.0", "channel": "stable", "batchSize": "ten"}),
            "batchSize",
        ),
    ] {
        let (status, error) = admin_post(&server, path, ADMIN, &body).await;
        assert_eq!((status, code(&error)), (422, "invalid"), "{body}: {error}");
        assert_eq!(
            error["error"]["details"][0]["path"], field,
            "{body}: {error}"
        );
    }
    server.stop().await;
}

on_both_backends!(
    plugin_rollouts_keep_to_plugins_and_their_compatibility,
    a_large_fleet_is_frozen_into_batches_in_one_go,
    a_halt_raises_an_alert_that_is_forwarded,
    releases_are_verified_before_they_are_stored,
    rollout_freezes_targets_halts_on_failure_and_resumes,
    pause_cancel_and_auto_advance,
    slo_breach_after_update_halts_the_rollout,
    an_observed_rollout_moves_on_after_a_clean_window,
);

/// A dashboard page as `token` sees it.
pub(crate) async fn page(server: &TestServer, path: &str, token: &str) -> (u16, String) {
    let response = server
        .client
        .get(server.at(path))
        .bearer_auth(token)
        .send()
        .await
        .expect("get");
    (
        response.status().as_u16(),
        response.text().await.unwrap_or_default(),
    )
}

#[tokio::test]
async fn dashboard_pages_show_releases_rollouts_plugins_and_restores() {
    let t = support::sqlite().await;
    let server = server(&t).await;
    for i in 1..=3 {
        enroll(&server, &format!("d{i}"), "stable", "1.0.0").await;
    }
    let signed = release_key()
        .sign_value(&serde_json::to_value(manifest("5.0.0")).expect("json"))
        .expect("sign");
    admin_post(&server, "/api/releases", ADMIN, &signed).await;
    let (_, rollout) = admin_post(
        &server,
        "/api/rollouts",
        ADMIN,
        &json!({"version": "5.0.0", "channel": "stable", "batch_size": 2}),
    )
    .await;
    let id = rollout["id"].as_i64().expect("id");
    let (status, html) = page(&server, "/releases", SUPPORT).await;
    assert_eq!(status, 200);
    assert!(html.contains("5.0.0") && html.contains("ed25519"));
    let (_, html) = page(&server, "/rollouts", SUPPORT).await;
    assert!(html.contains(&format!("href=\"/rollouts/{id}\"")));
    let (status, html) = page(&server, &format!("/rollouts/{id}"), SUPPORT).await;
    assert_eq!(status, 200);
    assert!(
        html.contains("http-equiv=refresh"),
        "a running rollout refreshes itself"
    );
    assert!(html.contains("id=batches") && html.contains("d3"));
    assert!(
        !html.contains("<button>advance</button>"),
        "support sees no buttons"
    );
    let (_, html) = page(&server, &format!("/rollouts/{id}"), ADMIN).await;
    assert!(html.contains("<button>advance</button>"));
    // The buttons post with the session; the rules are the API's.
    let post = |token: &'static str| {
        server
            .client
            .post(server.at(&format!("/rollouts/{id}/advance")))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(post(SUPPORT).await.expect("post").status().as_u16(), 403);
    assert_eq!(post(OPS).await.expect("post").status().as_u16(), 403);
    let conflict = post(ADMIN).await.expect("post");
    assert_eq!(conflict.status().as_u16(), 409);
    assert!(
        conflict
            .text()
            .await
            .unwrap_or_default()
            .contains("still has 2 pending")
    );
    let paused = server
        .client
        .post(server.at(&format!("/rollouts/{id}/pause")))
        .bearer_auth(OPS)
        .send()
        .await
        .expect("post");
    assert_eq!(paused.status().as_u16(), 303);
    let (_, html) = page(&server, "/rollouts/999999", SUPPORT).await;
    assert!(html.contains("No rollout"));
    for path in ["/plugins", "/restores"] {
        let (status, _) = page(&server, path, SUPPORT).await;
        assert_eq!(status, 200, "{path}");
    }
    let anonymous = server
        .client
        .get(server.at("/rollouts"))
        .send()
        .await
        .expect("get");
    assert_eq!(anonymous.status().as_u16(), 303, "to /login");
    server.stop().await;
}

/// `CONTROL_PLANE_ALLOW_V0=heartbeats`: a v0 request has no id and no time, so a captured
/// report could be sent again forever; with the setting, v0 still carries heartbeats (the
/// ERP's agents keep reporting) and is refused on the other agent routes, where v1 goes on.
#[tokio::test]
async fn v0_can_be_kept_to_heartbeats() {
    let store = support::sqlite().await;
    let v0_post = |server: &TestServer, path: &'static str, bytes: Vec<u8>| {
        let request = server
            .client
            .post(server.at(path))
            .header("x-agent-signature", support::signer(SHARED).sign_v0(&bytes))
            .body(bytes);
        async move { request.send().await.expect("send").status().as_u16() }
    };
    let next = serde_json::to_vec(&json!({"instance_id": "erp-7", "current_version": "1.0.0"}))
        .expect("json");
    let heartbeat = body("erp-7", json!({}));

    let everywhere = TestServer::start(store.store.clone()).await;
    assert_eq!(
        v0_post(&everywhere, "/api/heartbeats", heartbeat.clone()).await,
        200
    );
    let answered = v0_post(&everywhere, "/api/updates/next", next.clone()).await;
    assert!(matches!(answered, 200 | 204), "v0 update poll: {answered}");
    everywhere.stop().await;

    let kept = TestServer::start_with(store.store.clone(), |b| {
        b.settings(fleet_server::Settings {
            v0_only_for_heartbeats: true,
            ..Default::default()
        })
    })
    .await;
    assert_eq!(v0_post(&kept, "/api/heartbeats", heartbeat).await, 200);
    assert_eq!(v0_post(&kept, "/api/updates/next", next.clone()).await, 401);
    let (status, _) = agent_post(
        &kept,
        "/api/updates/next",
        &json!({"instance_id": "erp-7", "current_version": "1.0.0"}),
    )
    .await;
    assert!(matches!(status, 200 | 204), "v1 update poll: {status}");
    kept.stop().await;
}
