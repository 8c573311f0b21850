//! Plugin marketplace and restore verification over real HTTP, on SQLite and PostgreSQL.

use fleet_core::plugin::{PluginAction, PluginRequest};
use fleet_server::store::Store;
use fleet_server::store::rollouts::RecordedPluginRequest;
use serde_json::{Value, json};

use crate::rollouts::{admin_post, agent_post, enroll, page};
use crate::support::{
    ADMIN, OPS, SUPPORT, TestServer, TestStore, code, on_both_backends, post_form,
};

async fn plugin_releases_requests_approval_and_rollouts(t: TestStore) {
    let server = TestServer::start(t.store.clone()).await;
    enroll(&server, "m1", "stable", "1.0.0").await;
    enroll(&server, "m2", "stable", "1.0.0").await;
    let (status, release) = admin_post(
        &server,
        "/api/plugins/releases",
        ADMIN,
        &json!({"name": "billing-export", "version": "1.2.0", "compatible": ["0.1.*"]}),
    )
    .await;
    assert_eq!(status, 201, "{release}");
    let (status, error) = admin_post(
        &server,
        "/api/plugins/releases",
        ADMIN,
        &json!({"name": "x; rm -rf /", "version": "1.0.0"}),
    )
    .await;
    assert_eq!((status, code(&error)), (422, "invalid"));
    let (status, _) = admin_post(
        &server,
        "/api/plugins/releases",
        ADMIN,
        &json!({"name": "billing-export", "version": "1.2.0"}),
    )
    .await;
    assert_eq!(status, 409);
    admin_post(
        &server,
        "/api/plugins/releases",
        ADMIN,
        &json!({"name": "report", "version": "2.0.0", "compatible": ["9.*"]}),
    )
    .await;

    // Requests are signed by the instance; a hostile name is refused at the door.
    let request = |name: &str, version: &str| json!({"instance_id": "m1", "name": name, "version": version, "action": "install"});
    let (status, ok) = agent_post(
        &server,
        "/api/plugins/requests",
        &request("billing-export", "1.2.0"),
    )
    .await;
    assert_eq!(status, 201, "{ok}");
    let (status, _) = agent_post(&server, "/api/plugins/requests", &request("$(id)", "1")).await;
    assert_eq!(status, 422);
    let (_, incompatible) = agent_post(
        &server,
        "/api/plugins/requests",
        &request("report", "2.0.0"),
    )
    .await;
    let (_, unknown) =
        agent_post(&server, "/api/plugins/requests", &request("nothing", "1.0")).await;
    let approve = |r: &Value| format!("/api/plugins/requests/{}/approve", r["id"]);
    let (status, error) = admin_post(&server, &approve(&incompatible), ADMIN, &json!({})).await;
    assert_eq!(status, 409, "{error}");
    assert!(error.to_string().contains("not compatible"));
    assert_eq!(
        admin_post(&server, &approve(&unknown), ADMIN, &json!({}))
            .await
            .0,
        409
    );
    assert_eq!(
        admin_post(&server, &approve(&ok), OPS, &json!({})).await.0,
        403
    );
    let (status, approved) = admin_post(&server, &approve(&ok), ADMIN, &json!({})).await;
    assert_eq!(
        (status, approved["status"].clone()),
        (200, json!("approved")),
        "{approved}"
    );
    assert_eq!(approved["job_status"], "pending", "{approved}");
    assert_eq!(
        admin_post(&server, &approve(&ok), ADMIN, &json!({}))
            .await
            .0,
        409
    );

    let (status, job) =
        agent_post(&server, "/api/plugins/next", &json!({"instance_id": "m1"})).await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(
        job["plugin"],
        json!({"name": "billing-export", "version": "1.2.0", "action": "install"})
    );
    let (status, _) = agent_post(
        &server,
        "/api/plugins/report",
        &json!({"instance_id": "m1", "job_id": job["job_id"], "status": "in_progress", "step": "install"}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = agent_post(
        &server,
        "/api/plugins/report",
        &json!({"instance_id": "m1", "job_id": job["job_id"], "status": "done"}),
    )
    .await;
    assert_eq!(status, 422, "unknown status");
    let (status, _) = agent_post(
        &server,
        "/api/plugins/report",
        &json!({"instance_id": "m1", "job_id": job["job_id"], "status": "succeeded", "step": "done",
                "duration_ms": 40}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        agent_post(&server, "/api/plugins/next", &json!({"instance_id": "m1"}))
            .await
            .0,
        204
    );

    // A single request's job belongs to no rollout: the request shows how it ended.
    let (status, failing) = agent_post(
        &server,
        "/api/plugins/requests",
        &json!({"instance_id": "m2", "name": "billing-export", "version": "1.2.0", "action": "install"}),
    )
    .await;
    assert_eq!(status, 201, "{failing}");
    admin_post(&server, &approve(&failing), ADMIN, &json!({})).await;
    let (_, job) = agent_post(&server, "/api/plugins/next", &json!({"instance_id": "m2"})).await;
    let (status, _) = agent_post(
        &server,
        "/api/plugins/report",
        &json!({"instance_id": "m2", "job_id": job["job_id"], "status": "failed", "step": "install",
                "error": "step install exited with status 3"}),
    )
    .await;
    assert_eq!(status, 200);
    let (_, listed) = server
        .get_documented("/api/plugins/requests", SUPPORT)
        .await;
    let request = |id: &Value| {
        listed["items"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| &r["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("request {id} not listed: {listed}"))
    };
    let succeeded = request(&ok["id"]);
    assert_eq!(succeeded["job_status"], "succeeded", "{succeeded}");
    let failed = request(&failing["id"]);
    assert_eq!(
        (
            &failed["job_status"],
            &failed["job_step"],
            &failed["job_error"]
        ),
        (
            &json!("failed"),
            &json!("install"),
            &json!("step install exited with status 3")
        ),
        "{failed}"
    );
    let (_, html) = page(&server, "/plugins", SUPPORT).await;
    assert!(
        html.contains("failed</span> at install: step install exited with status 3"),
        "{html}"
    );

    // A plugin rollout carries its action through every batch; an admin starts the next.
    let (status, rollout) = admin_post(
        &server,
        "/api/plugins/rollouts",
        ADMIN,
        &json!({"plugin_release_id": release["id"], "action": "update", "channel": "stable",
                "batch_size": 1, "auto_advance": false}),
    )
    .await;
    assert_eq!(status, 201, "{rollout}");
    assert_eq!(rollout["kind"], "plugin");
    assert_eq!(rollout["plugin_action"], "update");
    for (batch, instance) in ["m1", "m2"].into_iter().enumerate() {
        if batch > 0 {
            let (status, advanced) = admin_post(
                &server,
                &format!("/api/plugins/rollouts/{}/advance", rollout["id"]),
                ADMIN,
                &json!({}),
            )
            .await;
            assert_eq!(status, 200, "{advanced}");
        }
        let (status, job) = agent_post(
            &server,
            "/api/plugins/next",
            &json!({"instance_id": instance}),
        )
        .await;
        assert_eq!(status, 200, "{instance}: {job}");
        assert_eq!(job["plugin"]["action"], "update");
        let (status, _) = agent_post(
            &server,
            "/api/plugins/report",
            &json!({"instance_id": instance, "job_id": job["job_id"], "status": "succeeded"}),
        )
        .await;
        assert_eq!(status, 200);
    }
    let (_, done) = server
        .get_documented(&format!("/api/rollouts/{}", rollout["id"]), SUPPORT)
        .await;
    assert_eq!(done["status"], "completed", "{done}");
    let (_, requests) = server
        .get_documented("/api/plugins/requests", SUPPORT)
        .await;
    assert_eq!(requests["items"].as_array().map(Vec::len), Some(4));
    let (_, releases) = server
        .get_documented("/api/plugins/releases", SUPPORT)
        .await;
    assert_eq!(
        releases["items"].as_array().map(Vec::len),
        Some(2),
        "{releases}"
    );
    server.stop().await;
}

async fn restores_schedule_verify_and_alert_on_failure(t: TestStore) {
    let server = TestServer::start_with(t.store.clone(), |b| {
        b.webhook(fleet_server::WebhookConfig::new("http://127.0.0.1:9/hook"))
    })
    .await;
    for id in ["r1", "r2", "r3"] {
        crate::restores::report_backup(&server, id, &format!("b-{id}")).await;
    }
    let (status, first) =
        admin_post(&server, "/api/restores/schedule", OPS, &json!({"count": 2})).await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(first["items"].as_array().map(Vec::len), Some(2));
    assert_eq!(first["items"][0]["environment"], "staging");
    let (status, _) = admin_post(&server, "/api/restores/schedule", SUPPORT, &json!({})).await;
    assert_eq!(status, 403);
    let (_, second) = admin_post(&server, "/api/restores/schedule", OPS, &json!({})).await;
    assert_eq!(
        second["items"].as_array().map(Vec::len),
        Some(1),
        "open ones are skipped"
    );
    let (status, _) =
        admin_post(&server, "/api/restores/schedule", OPS, &json!({"count": 0})).await;
    assert_eq!(status, 422);

    let mut outcomes = Vec::new();
    for (id, verdict) in [("r1", "verified"), ("r2", "failed"), ("r3", "skipped")] {
        let (status, job) =
            agent_post(&server, "/api/restores/next", &json!({"instance_id": id})).await;
        assert_eq!(status, 200, "{id}: {job}");
        let (status, reported) = agent_post(
            &server,
            "/api/restores/report",
            &json!({"instance_id": id, "restore_id": job["restore_id"], "status": verdict,
                    "error": (verdict == "failed").then_some("checksum mismatch"), "duration_ms": 900}),
        )
        .await;
        assert_eq!(status, 200, "{reported}");
        outcomes.push(reported["status"].clone());
        let (status, _) = agent_post(
            &server,
            "/api/restores/report",
            &json!({"instance_id": "r3", "restore_id": job["restore_id"], "status": "verified"}),
        )
        .await;
        assert!(
            status == 404 || id == "r3",
            "only the instance's own restore"
        );
    }
    assert_eq!(outcomes, ["verified", "failed", "skipped"]);
    assert_eq!(
        agent_post(&server, "/api/restores/next", &json!({"instance_id": "r1"}))
            .await
            .0,
        204
    );
    let (_, alerts) = server.get_json("/api/alerts", SUPPORT).await;
    let failed: Vec<&Value> = alerts["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|a| a["kind"] == "restore_failed")
        .collect();
    assert_eq!(failed.len(), 1, "{alerts}");
    assert_eq!(failed[0]["level"], "error");
    assert!(
        failed[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("checksum mismatch"))
    );
    // Verified in the last 7 days: skipped; failed or skipped: scheduled again.
    let (_, again) = admin_post(&server, "/api/restores/schedule", OPS, &json!({"count": 5})).await;
    let mut ids: Vec<&str> = again["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|r| r["instance_id"].as_str())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["r2", "r3"]);
    let (_, list) = server.get_documented("/api/restores", SUPPORT).await;
    assert_eq!(list["items"].as_array().map(Vec::len), Some(5));
    server.stop().await;
}

/// The schema /openapi.json gives for the body of `POST path`.
fn request_schema(spec: &Value, path: &str) -> jsonschema::Validator {
    let schema =
        &spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"];
    jsonschema::validator_for(schema).expect("the schema compiles")
}

/// Each body is refused with a 422 naming its field, or published, as the documented schema
/// says; `compatible` takes `*`, versions and `0.1.*`, never a pattern that matches nothing
/// (which no approval could ever pass) or more than it reads (`0.1*` matches 0.10).
async fn plugin_release_bodies_are_refused_as_documented(t: TestStore) {
    let server = TestServer::start(t.store.clone()).await;
    let (_, spec) = server.get_json("/openapi.json", SUPPORT).await;
    let documented = request_schema(&spec, "/api/plugins/releases");
    let release = |i: usize, extra: Value| {
        let mut body = json!({"name": format!("p{i}"), "version": "1.0.0"});
        body.as_object_mut()
            .expect("object")
            .extend(extra.as_object().expect("object").clone());
        body
    };
    let refused = [
        (json!({"compatible": [""]}), "compatible[0]"),
        (json!({"compatible": ["*", "1.."]}), "compatible[1]"),
        (json!({"compatible": ["0.1*"]}), "compatible[0]"),
        (json!({"compatible": ["0.1.0*"]}), "compatible[0]"),
        (json!({"compatible": [".*"]}), "compatible[0]"),
        (json!({"compatible": ["1.*.*"]}), "compatible[0]"),
        (json!({"compatible": ["1."]}), "compatible[0]"),
        (json!({"name": "a".repeat(101)}), "name"),
        (json!({"version": "1".repeat(65)}), "version"),
        (json!({"notes": "bell\u{7}"}), "notes"),
    ];
    for (i, (extra, field)) in refused.into_iter().enumerate() {
        let body = release(i, extra);
        let (status, error) = admin_post(&server, "/api/plugins/releases", ADMIN, &body).await;
        assert_eq!((status, code(&error)), (422, "invalid"), "{body}: {error}");
        assert_eq!(error["error"]["details"][0]["path"], field, "{error}");
        assert!(!documented.is_valid(&body), "documented as valid: {body}");
    }
    let (_, error) = admin_post(
        &server,
        "/api/plugins/releases",
        ADMIN,
        &release(0, json!({"name": "a".repeat(101)})),
    )
    .await;
    assert_eq!(
        error["error"]["details"][0]["message"], "longer than 100 bytes",
        "the length is named, not the characters"
    );
    let (_, releases) = server.get_json("/api/plugins/releases", SUPPORT).await;
    assert_eq!(releases["items"], json!([]), "nothing stored half-way");

    let published = [
        json!({"compatible": ["*"]}),
        json!({"compatible": ["0.1.*", "0.1.0", "2.0.0-rc.*"]}),
        json!({"notes": "line one\nline two"}),
    ];
    for (i, extra) in published.into_iter().enumerate() {
        let body = release(i, extra);
        let (status, answer) = admin_post(&server, "/api/plugins/releases", ADMIN, &body).await;
        assert_eq!(status, 201, "{body}: {answer}");
        assert!(documented.is_valid(&body), "documented as invalid: {body}");
    }
    server.stop().await;
}

/// Publishes a plugin release; returns the body of a rollout of it on `stable` with `extra`'s
/// keys added.
async fn plugin_rollout_body(server: &TestServer) -> impl Fn(Value) -> Value + use<> {
    let (_, release) = admin_post(
        server,
        "/api/plugins/releases",
        ADMIN,
        &json!({"name": "billing-export", "version": "1.2.0"}),
    )
    .await;
    move |extra: Value| {
        let mut body = json!({"plugin_release_id": release["id"], "channel": "stable"});
        body.as_object_mut()
            .expect("object")
            .extend(extra.as_object().expect("object").clone());
        body
    }
}

/// A plugin rollout refuses, naming the field, the settings only an update rollout uses:
/// they were stored and then ignored, so `version` silently installed the release's own.
async fn plugin_rollouts_refuse_update_settings(t: TestStore) {
    let server = TestServer::start(t.store.clone()).await;
    enroll(&server, "p1", "stable", "1.0.0").await;
    let rollout = plugin_rollout_body(&server).await;
    for (extra, field) in [
        (json!({"version": "1.3.0"}), "version"),
        (json!({"release_id": 1}), "release_id"),
        (json!({"manifestId": 1}), "manifestId"),
        (json!({"strategy": "BLUE_GREEN_CANARY"}), "strategy"),
        (json!({"canary_steps": [50, 100]}), "canary_steps"),
        (json!({"canaryStepWaitSec": 5}), "canaryStepWaitSec"),
        (json!({"action": "nuke"}), "action"),
    ] {
        let body = rollout(extra);
        let (status, error) = admin_post(&server, "/api/plugins/rollouts", ADMIN, &body).await;
        assert_eq!((status, code(&error)), (422, "invalid"), "{body}: {error}");
        assert_eq!(error["error"]["details"][0]["path"], field, "{error}");
    }
    let (_, rollouts) = server.get_json("/api/rollouts", SUPPORT).await;
    assert_eq!(rollouts["items"], json!([]), "nothing stored half-way");
    let (status, created) = admin_post(
        &server,
        "/api/plugins/rollouts",
        ADMIN,
        &rollout(json!({"strategy": "BATCH", "version": null, "action": "remove"})),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["plugin_action"], "remove");
    server.stop().await;
}

/// `POST /api/plugins/rollouts` documents its own body: what the handler refuses (the update
/// settings, other strategies, no plugin release) the schema refuses too, and what it takes
/// the schema takes; the update rollouts' body is documented apart.
async fn plugin_rollout_bodies_are_documented_as_taken(t: TestStore) {
    let server = TestServer::start(t.store.clone()).await;
    let (_, spec) = server.get_json("/openapi.json", SUPPORT).await;
    let documented = request_schema(&spec, "/api/plugins/rollouts");
    enroll(&server, "p1", "stable", "1.0.0").await;
    let rollout = plugin_rollout_body(&server).await;
    for body in [
        rollout(json!({"version": "1.3.0"})),
        rollout(json!({"release_id": 1})),
        rollout(json!({"manifestId": 1})),
        rollout(json!({"strategy": "BLUE_GREEN_CANARY"})),
        rollout(json!({"strategy": null})),
        rollout(json!({"canary_steps": [50, 100]})),
        rollout(json!({"canarySteps": [100]})),
        rollout(json!({"canary_step_wait_sec": 5})),
        rollout(json!({"canaryStepWaitSec": 5})),
        rollout(json!({"action": "nuke"})),
        json!({"channel": "stable"}),
        json!({"channel": "stable", "plugin_release_id": null}),
    ] {
        let (status, error) = admin_post(&server, "/api/plugins/rollouts", ADMIN, &body).await;
        assert_eq!(status, 422, "{body}: {error}");
        assert!(!documented.is_valid(&body), "documented as valid: {body}");
    }
    for body in [
        rollout(
            json!({"strategy": "BATCH", "version": null, "manifestId": null,
                       "canary_steps": null, "action": "remove", "batch_size": 1}),
        ),
        rollout(json!({"failure_threshold": "25%", "auto_advance": true})),
    ] {
        assert!(documented.is_valid(&body), "documented as invalid: {body}");
        let (status, created) = admin_post(&server, "/api/plugins/rollouts", ADMIN, &body).await;
        assert_eq!(status, 201, "{body}: {created}");
    }
    let update = request_schema(&spec, "/api/rollouts");
    assert!(update.is_valid(&json!({"version": "1.3.0", "channel": "stable"})));
    server.stop().await;
}

/// The schedule body's documented schema refuses what the handler refuses.
async fn restore_schedule_bodies_are_refused_as_documented(t: TestStore) {
    let server = TestServer::start(t.store.clone()).await;
    let (_, spec) = server.get_json("/openapi.json", SUPPORT).await;
    let documented = request_schema(&spec, "/api/restores/schedule");
    for (body, accepted) in [
        (json!({}), true),
        (json!({"environment": "e".repeat(64), "count": 1}), true),
        (json!({"environment": "e".repeat(65)}), false),
        (json!({"environment": "qa", "every": "day"}), false),
        (json!({"count": 0}), false),
        (json!({"environment": "eu-west_2"}), true),
        // The name reaches the agent's verify command: nothing a path or a shell reads.
        (json!({"environment": "../../etc"}), false),
        (json!({"environment": "$(id)"}), false),
        (json!({"environment": "qa/x"}), false),
        (json!({"environment": "-rf"}), false),
    ] {
        let (status, answer) = admin_post(&server, "/api/restores/schedule", OPS, &body).await;
        assert_eq!(status == 201, accepted, "{body}: {answer}");
        assert_eq!(documented.is_valid(&body), accepted, "{body}");
    }
    server.stop().await;
}

/// The plugin request `instance` sends for billing-export 1.2.0 with `action`.
fn billing_request(instance: &str, action: &str) -> Value {
    json!({"instance_id": instance, "name": "billing-export", "version": "1.2.0", "action": action})
}

/// The listed requests of `instance` for billing-export 1.2.0 with `action`, newest first.
async fn listed_copies(server: &TestServer, instance: &str, action: &str) -> Vec<Value> {
    let (status, listed) = server
        .get_documented("/api/plugins/requests", SUPPORT)
        .await;
    assert_eq!(status, 200, "{listed}");
    listed["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|r| {
            r["instance_id"] == instance
                && r["name"] == "billing-export"
                && r["version"] == "1.2.0"
                && r["action"] == action
        })
        .cloned()
        .collect()
}

/// POSTs an empty body to `path` as `token`; checks a success answer against /openapi.json.
async fn post_empty(server: &TestServer, path: &str, token: &str) -> (u16, Value) {
    let response = server
        .client
        .post(server.at(path))
        .bearer_auth(token)
        .send()
        .await
        .expect("post");
    let status = response.status().as_u16();
    let answer = response.json().await.unwrap_or(Value::Null);
    let (_, spec) = server.get_json("/openapi.json", SUPPORT).await;
    crate::support::check_documented_answer(&spec, "post", path, status, &answer);
    (status, answer)
}

/// An instance that asks again for what it already asked for gets its pending request back
/// (200, same id) instead of a second row in the admin's list; once that one is decided, the
/// same request is a new one.
async fn a_repeated_plugin_request_is_answered_with_the_pending_one(t: TestStore) {
    let server = TestServer::start(t.store.clone()).await;
    admin_post(
        &server,
        "/api/plugins/releases",
        ADMIN,
        &json!({"name": "billing-export", "version": "1.2.0"}),
    )
    .await;
    let (status, first) = agent_post(
        &server,
        "/api/plugins/requests",
        &billing_request("m1", "install"),
    )
    .await;
    assert_eq!(status, 201, "{first}");
    let mut again = billing_request("m1", "install");
    again["reason"] = json!("still waiting");
    for body in [billing_request("m1", "install"), again] {
        let (status, answer) = agent_post(&server, "/api/plugins/requests", &body).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer, first, "the pending request, unchanged");
    }
    // Another action, version or instance is another request.
    let mut other_version = billing_request("m1", "install");
    other_version["version"] = json!("1.3.0");
    for body in [
        billing_request("m1", "update"),
        other_version,
        billing_request("m2", "install"),
    ] {
        let (status, answer) = agent_post(&server, "/api/plugins/requests", &body).await;
        assert_eq!(status, 201, "{body}: {answer}");
    }
    assert_eq!(listed_copies(&server, "m1", "install").await.len(), 1);

    // Rejected, then approved: each time the same request afterwards is a new one.
    let (status, _) = admin_post(
        &server,
        &format!("/api/plugins/requests/{}/reject", first["id"]),
        ADMIN,
        &json!({}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, second) = agent_post(
        &server,
        "/api/plugins/requests",
        &billing_request("m1", "install"),
    )
    .await;
    assert_eq!(status, 201, "{second}");
    assert_ne!(second["id"], first["id"]);
    let (status, _) = admin_post(
        &server,
        &format!("/api/plugins/requests/{}/approve", second["id"]),
        ADMIN,
        &json!({}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, third) = agent_post(
        &server,
        "/api/plugins/requests",
        &billing_request("m1", "install"),
    )
    .await;
    assert_eq!(status, 201, "{third}");
    let (status, repeated) = agent_post(
        &server,
        "/api/plugins/requests",
        &billing_request("m1", "install"),
    )
    .await;
    assert_eq!((status, &repeated["id"]), (200, &third["id"]), "{repeated}");
    let statuses: Vec<Value> = listed_copies(&server, "m1", "install")
        .await
        .iter()
        .map(|r| r["status"].clone())
        .collect();
    assert_eq!(
        statuses,
        [json!("pending"), json!("approved"), json!("rejected")]
    );
    server.stop().await;
}

/// Identical requests that arrive together make one row: one is recorded (201), every other
/// one is answered with it (200).
async fn concurrent_identical_plugin_requests_make_one_row(t: TestStore) {
    let server = TestServer::start(t.store.clone()).await;
    let body = billing_request("m1", "install");
    let answers = futures_util::future::join_all(
        (0..8).map(|_| agent_post(&server, "/api/plugins/requests", &body)),
    )
    .await;
    let created = answers.iter().filter(|(status, _)| *status == 201).count();
    assert_eq!(created, 1, "{answers:?}");
    assert!(
        answers
            .iter()
            .all(|(status, answer)| matches!(status, 200 | 201)
                && answer["id"] == answers[0].1["id"]),
        "{answers:?}"
    );
    assert_eq!(listed_copies(&server, "m1", "install").await.len(), 1);
    server.stop().await;
}

/// An admin turns a request down, saying why; the reason is shown with the request, and a
/// request already decided cannot be rejected.
async fn plugin_requests_are_rejected_with_a_reason(t: TestStore) {
    let server = TestServer::start(t.store.clone()).await;
    admin_post(
        &server,
        "/api/plugins/releases",
        ADMIN,
        &json!({"name": "billing-export", "version": "1.2.0"}),
    )
    .await;
    let (_, turned_down) = agent_post(
        &server,
        "/api/plugins/requests",
        &billing_request("m1", "install"),
    )
    .await;
    let reject = |r: &Value| format!("/api/plugins/requests/{}/reject", r["id"]);
    let reason = json!({"reason": "billing-export needs a licence on this instance"});
    for token in [SUPPORT, OPS] {
        let (status, _) = admin_post(&server, &reject(&turned_down), token, &reason).await;
        assert_eq!(status, 403);
    }

    // Bodies the handler refuses, naming the field, and the documented schema refuses too.
    let (_, spec) = server.get_json("/openapi.json", SUPPORT).await;
    let documented = request_schema(&spec, "/api/plugins/requests/{id}/reject");
    for (body, field) in [
        (json!({"reason": 5}), "reason"),
        (json!({"reason": "r".repeat(501)}), "reason"),
        (json!({"reason": "ä".repeat(501)}), "reason"),
        (json!({"reason": "bell\u{7}"}), "reason"),
        (json!({"why": "no"}), "why"),
    ] {
        let (status, error) = admin_post(&server, &reject(&turned_down), ADMIN, &body).await;
        assert_eq!((status, code(&error)), (422, "invalid"), "{body}: {error}");
        assert_eq!(error["error"]["details"][0]["path"], field, "{error}");
        assert!(!documented.is_valid(&body), "documented as valid: {body}");
    }
    assert!(documented.is_valid(&json!({"reason": "ä".repeat(500)})));
    assert!(documented.is_valid(&json!({"reason": null})));

    let (status, rejected) = admin_post(&server, &reject(&turned_down), ADMIN, &reason).await;
    assert_eq!(status, 200, "{rejected}");
    assert_eq!(rejected["id"], turned_down["id"]);
    assert_eq!(rejected["status"], "rejected");
    assert_eq!(rejected["rejection_reason"], reason["reason"]);
    assert!(rejected["decided_at"].is_i64(), "{rejected}");
    assert_eq!(rejected["job_id"], Value::Null);

    // Decided already: 409 saying how; nothing changes.
    let (status, error) = admin_post(&server, &reject(&turned_down), ADMIN, &json!({})).await;
    assert_eq!((status, code(&error)), (409, "conflict"), "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("already rejected")),
        "{error}"
    );
    let (status, _) = admin_post(
        &server,
        &format!("/api/plugins/requests/{}/approve", turned_down["id"]),
        ADMIN,
        &json!({}),
    )
    .await;
    assert_eq!(status, 409, "a rejected request is not approved");
    let (_, approved) = agent_post(
        &server,
        "/api/plugins/requests",
        &billing_request("m2", "install"),
    )
    .await;
    admin_post(
        &server,
        &format!("/api/plugins/requests/{}/approve", approved["id"]),
        ADMIN,
        &json!({}),
    )
    .await;
    let (status, error) = admin_post(&server, &reject(&approved), ADMIN, &reason).await;
    assert_eq!((status, code(&error)), (409, "conflict"), "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("already approved")),
        "{error}"
    );
    for unknown in ["999999", "abc"] {
        let path = format!("/api/plugins/requests/{unknown}/reject");
        assert_eq!(admin_post(&server, &path, ADMIN, &json!({})).await.0, 404);
    }

    // No body, or a blank reason: rejected without one.
    let (_, quiet) = agent_post(
        &server,
        "/api/plugins/requests",
        &billing_request("m3", "install"),
    )
    .await;
    let (status, answer) = post_empty(&server, &reject(&quiet), ADMIN).await;
    assert_eq!(
        (status, &answer["rejection_reason"]),
        (200, &Value::Null),
        "{answer}"
    );
    let (_, blank) = agent_post(
        &server,
        "/api/plugins/requests",
        &billing_request("m4", "install"),
    )
    .await;
    let (status, answer) =
        admin_post(&server, &reject(&blank), ADMIN, &json!({"reason": "  \n"})).await;
    assert_eq!(
        (status, &answer["rejection_reason"]),
        (200, &Value::Null),
        "{answer}"
    );

    let listed = listed_copies(&server, "m1", "install").await;
    assert_eq!(
        listed[0]["rejection_reason"], reason["reason"],
        "{listed:?}"
    );
    let (_, html) = page(&server, "/plugins", SUPPORT).await;
    assert!(
        html.contains("rejected</span>: billing-export needs a licence on this instance"),
        "{html}"
    );
    server.stop().await;
}

/// Plugin requests as a control plane that stored copies left them (the instance's reason
/// names each row): three copies of one pending request, the same plugin with another
/// action, an approved one, and another instance's.
const REQUESTS_WITH_COPIES: &str = "INSERT INTO plugin_requests \
    (instance_id, name, version, action, reason, status, created_at) VALUES \
    ('m1', 'billing-export', '1.2.0', 'install', 'first', 'pending', 100), \
    ('m1', 'billing-export', '1.2.0', 'install', 'copy', 'pending', 101), \
    ('m1', 'billing-export', '1.2.0', 'install', 'second copy', 'pending', 102), \
    ('m1', 'billing-export', '1.2.0', 'update', 'update', 'pending', 103), \
    ('m1', 'billing-export', '1.2.0', 'install', 'approved', 'approved', 104), \
    ('m2', 'billing-export', '1.2.0', 'install', 'other instance', 'pending', 105);";

/// After the upgrade of [`REQUESTS_WITH_COPIES`]: the oldest of the copies is still pending,
/// the later ones are rejected naming it, the rest is untouched, and asking again answers the
/// oldest.
async fn copies_are_closed_by_the_upgrade(store: &dyn Store) {
    let listed = store.list_plugin_requests(100).await.expect("list");
    let row = |reason: &str| {
        listed
            .iter()
            .find(|r| r.reason.as_deref() == Some(reason))
            .unwrap_or_else(|| panic!("{reason} not listed: {listed:#?}"))
    };
    let first = row("first");
    assert_eq!(first.status, "pending");
    for copy in ["copy", "second copy"] {
        let closed = row(copy);
        assert_eq!(closed.status, "rejected", "{closed:?}");
        assert_eq!(
            closed.rejection_reason.as_deref(),
            Some(format!("a copy of request {}, which was already pending", first.id).as_str())
        );
        assert!(closed.decided_at.is_some(), "{closed:?}");
    }
    for (reason, status) in [
        ("first", "pending"),
        ("update", "pending"),
        ("approved", "approved"),
        ("other instance", "pending"),
    ] {
        assert_eq!(row(reason).status, status);
        assert_eq!(row(reason).rejection_reason, None);
    }
    let again = store
        .create_plugin_request(
            &PluginRequest {
                instance_id: "m1".into(),
                name: "billing-export".into(),
                version: "1.2.0".into(),
                action: PluginAction::Install,
                reason: None,
            },
            200,
        )
        .await
        .expect("request");
    assert!(
        matches!(&again, RecordedPluginRequest::AlreadyPending(r) if r.id == first.id),
        "{again:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_closes_plugin_request_copies_stored_before_the_upgrade() {
    let (store, _dir) = crate::support::sqlite_upgraded("0009", REQUESTS_WITH_COPIES).await;
    copies_are_closed_by_the_upgrade(&*store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_closes_plugin_request_copies_stored_before_the_upgrade() {
    let (store, schema) = crate::support::postgres_upgraded("0010", REQUESTS_WITH_COPIES).await;
    copies_are_closed_by_the_upgrade(&store).await;
    drop(store);
    crate::support::drop_schema(Some(schema)).await;
}

/// Publishes the billing-export 1.2.0 release and sends a pending install request from each
/// of `instances`; their ids, in order.
async fn pending_billing_requests(server: &TestServer, instances: &[&str]) -> Vec<String> {
    admin_post(
        server,
        "/api/plugins/releases",
        ADMIN,
        &json!({"name": "billing-export", "version": "1.2.0"}),
    )
    .await;
    let mut requests = Vec::new();
    for instance in instances {
        let (status, request) = agent_post(
            server,
            "/api/plugins/requests",
            &billing_request(instance, "install"),
        )
        .await;
        assert!(matches!(status, 200 | 201), "{request}");
        requests.push(request["id"].to_string());
    }
    requests
}

/// A dashboard form posted for an unknown id gets the API's JSON 404.
fn assert_json_not_found(refused: &crate::support::FormAnswer) {
    assert_eq!(refused.status, 404, "{refused:?}");
    let error: Value = serde_json::from_str(&refused.body).expect("a JSON error");
    assert_eq!(code(&error), "not_found", "{error}");
}

/// The Plugins page's Reject form: only an admin sees it, only on pending requests; posting it
/// rejects as the API does and goes back to the page; a decided request gets the 409 page, an
/// unknown id the JSON 404, an invalid reason the JSON 422.
async fn the_plugins_page_rejects_pending_requests_for_admins(t: TestStore) {
    let server = TestServer::start(t.store.clone()).await;
    let requests = pending_billing_requests(&server, &["m1", "m2", "m3"]).await;
    let (turned_down, approved, quiet) = (&requests[0], &requests[1], &requests[2]);
    let (status, _) = admin_post(
        &server,
        &format!("/api/plugins/requests/{approved}/approve"),
        ADMIN,
        &json!({}),
    )
    .await;
    assert_eq!(status, 200);
    let form_of = |id: &str| format!("action=\"/plugins/requests/{id}/reject\"");
    let reject = |id: &str| format!("/plugins/requests/{id}/reject");

    for token in [SUPPORT, OPS] {
        let (_, html) = page(&server, "/plugins", token).await;
        assert!(
            !html.contains("/reject\""),
            "no Reject form for {token}: {html}"
        );
        let refused = post_form(&server, &reject(turned_down), token, &[("reason", "no")]).await;
        assert_eq!(refused.status, 403, "{refused:?}");
    }
    let (_, html) = page(&server, "/plugins", ADMIN).await;
    assert!(html.contains(&form_of(turned_down)), "{html}");
    assert!(html.contains(&form_of(quiet)), "{html}");
    assert!(
        !html.contains(&form_of(approved)),
        "decided: no form: {html}"
    );

    // What the API refuses in a reason, the form refuses with the same JSON error.
    for fields in [
        vec![("reason", "bell\u{7}")],
        vec![("reason", &*"r".repeat(501))],
        vec![("why", "no")],
    ] {
        let refused = post_form(&server, &reject(turned_down), ADMIN, &fields).await;
        assert_eq!(refused.status, 422, "{fields:?}: {refused:?}");
        let error: Value = serde_json::from_str(&refused.body).expect("a JSON error");
        assert_eq!(code(&error), "invalid", "{error}");
    }

    let reason = "billing-export needs a licence on this instance";
    let done = post_form(&server, &reject(turned_down), ADMIN, &[("reason", reason)]).await;
    assert_eq!(
        (done.status, done.location.as_str()),
        (303, "/plugins"),
        "{done:?}"
    );
    let blank = post_form(&server, &reject(quiet), ADMIN, &[("reason", "  ")]).await;
    assert_eq!(blank.status, 303, "{blank:?}");
    let (_, listed) = server
        .get_documented("/api/plugins/requests", SUPPORT)
        .await;
    let decided = |id: &str| {
        listed["items"]
            .as_array()
            .expect("items")
            .iter()
            .find(|r| r["id"].as_i64() == id.parse().ok())
            .map(|r| (r["status"].clone(), r["rejection_reason"].clone()))
            .expect("listed")
    };
    assert_eq!(decided(turned_down), (json!("rejected"), json!(reason)));
    assert_eq!(decided(quiet), (json!("rejected"), Value::Null));
    let (_, html) = page(&server, "/plugins", ADMIN).await;
    assert!(
        !html.contains("/reject\""),
        "nothing left to reject: {html}"
    );

    for (id, how) in [
        (turned_down, "already rejected"),
        (approved, "already approved"),
    ] {
        let refused = post_form(&server, &reject(id), ADMIN, &[("reason", "")]).await;
        assert_eq!(refused.status, 409, "{refused:?}");
        assert!(refused.content_type.starts_with("text/html"), "{refused:?}");
        assert!(refused.body.contains(how), "{}", refused.body);
    }
    for unknown in ["999999", "abc"] {
        let refused = post_form(&server, &reject(unknown), ADMIN, &[("reason", "")]).await;
        assert_json_not_found(&refused);
    }
    server.stop().await;
}

/// The Plugins page's Approve form: only an admin sees it, only on pending requests; posting
/// it approves as the API does (the job is created) and goes back to the page; a decided
/// request gets the 409 page saying why, an unknown id the JSON 404.
async fn the_plugins_page_approves_pending_requests_for_admins(t: TestStore) {
    let server = TestServer::start(t.store.clone()).await;
    let requests = pending_billing_requests(&server, &["p1", "p2"]).await;
    let (wanted, turned_down) = (&requests[0], &requests[1]);
    let (status, _) = admin_post(
        &server,
        &format!("/api/plugins/requests/{turned_down}/reject"),
        ADMIN,
        &json!({}),
    )
    .await;
    assert_eq!(status, 200);
    let form_of = |id: &str| format!("action=\"/plugins/requests/{id}/approve\"");
    let approve = |id: &str| format!("/plugins/requests/{id}/approve");

    for token in [SUPPORT, OPS] {
        let (_, html) = page(&server, "/plugins", token).await;
        assert!(
            !html.contains("/approve\""),
            "no Approve form for {token}: {html}"
        );
        let refused = post_form(&server, &approve(wanted), token, &[]).await;
        assert_eq!(refused.status, 403, "{refused:?}");
    }
    let (_, html) = page(&server, "/plugins", ADMIN).await;
    assert!(html.contains(&form_of(wanted)), "{html}");
    assert!(
        !html.contains(&form_of(turned_down)),
        "decided: no form: {html}"
    );

    let done = post_form(&server, &approve(wanted), ADMIN, &[]).await;
    assert_eq!(
        (done.status, done.location.as_str()),
        (303, "/plugins"),
        "{done:?}"
    );
    let (_, listed) = server
        .get_documented("/api/plugins/requests", SUPPORT)
        .await;
    let approved = listed["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|r| r["id"].as_i64() == wanted.parse().ok())
        .expect("listed")
        .clone();
    assert_eq!(approved["status"], "approved", "{approved}");
    assert!(approved["job_id"].is_i64(), "a job is created: {approved}");
    let (_, html) = page(&server, "/plugins", ADMIN).await;
    assert!(
        !html.contains("/approve\""),
        "nothing left to approve: {html}"
    );

    for (id, how) in [
        (wanted, "already approved"),
        (turned_down, "already rejected"),
    ] {
        let refused = post_form(&server, &approve(id), ADMIN, &[]).await;
        assert_eq!(refused.status, 409, "{refused:?}");
        assert!(refused.content_type.starts_with("text/html"), "{refused:?}");
        assert!(refused.body.contains(how), "{}", refused.body);
    }
    for unknown in ["999999", "abc"] {
        assert_json_not_found(&post_form(&server, &approve(unknown), ADMIN, &[]).await);
    }
    server.stop().await;
}

on_both_backends!(
    the_plugins_page_approves_pending_requests_for_admins,
    the_plugins_page_rejects_pending_requests_for_admins,
    a_repeated_plugin_request_is_answered_with_the_pending_one,
    concurrent_identical_plugin_requests_make_one_row,
    plugin_requests_are_rejected_with_a_reason,
    plugin_releases_requests_approval_and_rollouts,
    restores_schedule_verify_and_alert_on_failure,
    plugin_release_bodies_are_refused_as_documented,
    plugin_rollouts_refuse_update_settings,
    plugin_rollout_bodies_are_documented_as_taken,
    restore_schedule_bodies_are_refused_as_documented,
);
