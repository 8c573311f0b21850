//! Restore verification as an operator follows it: on the installation, with the reason
//! of a failure, timed out when no agent reports, never run without a backup, an empty
//! schedule explained, a cancelled one stopped on the agent that runs it. On SQLite and
//! PostgreSQL.

use std::path::Path;
use std::time::{Duration, Instant};

use fleet_agent::{Agent, AgentConfig};
use fleet_core::Secret;
use serde_json::{Value, json};

use crate::commands::TestAgent;
use crate::rollouts::{admin_post, agent_post, enroll, page};
use crate::support::{
    ADMIN, OPS, SECRET, SHARED, SUPPORT, TempDir, TestServer, TestStore, body, code, now,
    on_both_backends, post_form,
};

/// A heartbeat from `instance` reporting backup `backup_id` (its checksum derived from it).
pub(crate) async fn report_backup(server: &TestServer, instance: &str, backup_id: &str) {
    let hb = body(
        instance,
        json!({"release_channel": "stable", "version": "1.0.0", "backup_id": backup_id,
               "backup_checksum": format!("sha256:{backup_id}"),
               "last_backup_at": "2026-11-20T02:00:00Z"}),
    );
    let msg = uuid::Uuid::new_v4().to_string();
    assert_eq!(server.send_v1(SHARED, &msg, now(), &hb).await.status(), 200);
}

/// Hands `instance` its scheduled verification and reports `report` for it; returns the id.
async fn run_verification(server: &TestServer, instance: &str, report: Value) -> String {
    let (status, job) = agent_post(
        server,
        "/api/restores/next",
        &json!({"instance_id": instance}),
    )
    .await;
    assert_eq!(status, 200, "{instance}: {job}");
    let mut body = json!({"instance_id": instance, "restore_id": job["restore_id"]});
    body.as_object_mut()
        .expect("object")
        .extend(report.as_object().expect("object").clone());
    let (status, reported) = agent_post(server, "/api/restores/report", &body).await;
    assert_eq!(status, 200, "{reported}");
    job["restore_id"].as_str().expect("id").to_owned()
}

/// What a failing verify command reports: the runner's error says only how it exited, the
/// cause is the output's last line.
fn failed_with_checksum_mismatch() -> Value {
    json!({"status": "failed", "error": "step restore-verify exited with status 4",
           "output_tail": "restoring b-r1 into staging\n<checksum mismatch: expected ab12, got cd34>\n\n",
           "duration_ms": 900})
}

async fn an_installation_shows_its_newest_restore_verifications(t: TestStore) {
    let server = TestServer::start(t.store.clone()).await;
    report_backup(&server, "r1", "b-r1").await;
    report_backup(&server, "r2", "b-r2").await;
    // Seven rounds for r1 (r2 once): failed until the last, which verifies.
    let mut ids = Vec::new();
    for round in 0..7 {
        let (status, done) =
            admin_post(&server, "/api/restores/schedule", OPS, &json!({"count": 5})).await;
        assert_eq!(status, 201, "{done}");
        let report = if round == 6 {
            json!({"status": "verified", "output_tail": "restored"})
        } else {
            failed_with_checksum_mismatch()
        };
        ids.push(run_verification(&server, "r1", report).await);
    }
    let (status, detail) = server
        .get_documented("/api/installations/r1", SUPPORT)
        .await;
    assert_eq!(status, 200, "{detail}");
    let restores = detail["restores"].as_array().expect("restores");
    let shown: Vec<String> = restores.iter().map(|r| r["id"].to_string()).collect();
    let newest: Vec<String> = ids.iter().rev().take(5).cloned().collect();
    assert_eq!(shown, newest, "the 5 newest, newest first");
    assert_eq!(restores[0]["status"], "verified");
    assert_eq!(restores[0]["reason"], Value::Null);
    assert_eq!(restores[1]["status"], "failed");
    assert_eq!(restores[1]["environment"], "staging");
    assert_eq!(restores[1]["backup_id"], "b-r1");
    assert!(restores[1]["finished_at"].is_i64());
    assert_eq!(
        restores[1]["reason"],
        "step restore-verify exited with status 4 — restoring b-r1 into staging / \
         <checksum mismatch: expected ab12, got cd34>"
    );

    let (status, html) = page(&server, "/installations/r1", SUPPORT).await;
    assert_eq!(status, 200);
    let section = html
        .split("<h2>Restore verifications</h2>")
        .nth(1)
        .expect("a restore section");
    assert!(
        section.contains("&lt;checksum mismatch: expected ab12, got cd34&gt;"),
        "{section}"
    );
    assert!(section.contains("b-r1") && section.contains("verified"));

    // The list filtered by instance: r1's only; an unknown one has none; a bad one is a 400.
    let (_, mine) = server
        .get_documented("/api/restores?instance=r1&limit=100", SUPPORT)
        .await;
    let instances: Vec<&Value> = mine["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|r| &r["instance_id"])
        .collect();
    assert_eq!(instances.len(), 7, "{mine}");
    assert!(instances.iter().all(|i| *i == "r1"), "{mine}");
    let (_, all) = server.get_documented("/api/restores", SUPPORT).await;
    assert_eq!(all["items"].as_array().map(Vec::len), Some(8));
    let (_, none) = server
        .get_documented("/api/restores?instance=nobody", SUPPORT)
        .await;
    assert_eq!(none["items"], json!([]));
    let (status, error) = server
        .get_json("/api/restores?instance=a%20b", SUPPORT)
        .await;
    assert_eq!((status, code(&error)), (400, "bad_request"), "{error}");
    let long = "i".repeat(300);
    let (status, _) = server
        .get_json(&format!("/api/restores?instance={long}"), SUPPORT)
        .await;
    assert_eq!(status, 400);
    server.stop().await;
}

async fn the_failure_reason_shows_on_the_restores_page_and_in_the_alert(t: TestStore) {
    let server = TestServer::start(t.store.clone()).await;
    report_backup(&server, "r1", "b-r1").await;
    report_backup(&server, "r2", "b-r2").await;
    admin_post(&server, "/api/restores/schedule", OPS, &json!({})).await;
    run_verification(&server, "r1", failed_with_checksum_mismatch()).await;
    // A cause as long as a report may carry: the alert (forwarded to a webhook) stays short.
    let long_line = format!("corrupt page {}", "7".repeat(7000));
    run_verification(
        &server,
        "r2",
        json!({"status": "failed", "error": "step restore-verify exited with status 2",
               "output_tail": format!("{long_line}\n")}),
    )
    .await;

    let (status, html) = page(&server, "/restores", SUPPORT).await;
    assert_eq!(status, 200);
    assert!(
        html.contains("step restore-verify exited with status 4 — restoring b-r1 into staging / &lt;checksum mismatch: expected ab12, got cd34&gt;"),
        "{html}"
    );
    assert!(
        !html.contains(&long_line),
        "the long cause is cut on the page"
    );

    let (_, alerts) = server.get_json("/api/alerts", SUPPORT).await;
    let message = |instance: &str| {
        alerts["items"]
            .as_array()
            .expect("items")
            .iter()
            .find(|a| a["kind"] == "restore_failed" && a["instance_id"] == instance)
            .and_then(|a| a["message"].as_str())
            .unwrap_or_else(|| panic!("no restore_failed alert for {instance}: {alerts}"))
            .to_owned()
    };
    let r1 = message("r1");
    assert!(
        r1.ends_with(
            "failed in staging: step restore-verify exited with status 4 — restoring b-r1 \
             into staging / <checksum mismatch: expected ab12, got cd34>"
        ),
        "{r1}"
    );
    let r2 = message("r2");
    assert!(r2.contains("corrupt page 777"), "{r2}");
    assert!(
        r2.chars().count() < 700,
        "bounded: {} chars",
        r2.chars().count()
    );
    server.stop().await;
}

async fn stuck_restores_time_out_and_can_be_scheduled_again(t: TestStore) {
    let server = TestServer::start_with(t.store.clone(), |b| {
        b.settings(fleet_server::Settings {
            sweep_interval: Duration::from_millis(100),
            restore_timeout: Duration::from_secs(1),
            ..fleet_server::Settings::default()
        })
    })
    .await;
    report_backup(&server, "gone", "b-1").await;
    report_backup(&server, "silent", "b-2").await;
    let (_, first) = admin_post(&server, "/api/restores/schedule", OPS, &json!({})).await;
    assert_eq!(first["scheduled"], 2, "{first}");
    // "silent" takes its job and never reports; "gone" never even asks.
    let (status, job) = agent_post(
        &server,
        "/api/restores/next",
        &json!({"instance_id": "silent"}),
    )
    .await;
    assert_eq!(status, 200);

    let mut restores = Value::Null;
    for _ in 0..100 {
        restores = server.get_json("/api/restores", SUPPORT).await.1;
        let items = restores["items"].as_array().expect("items");
        if items.iter().all(|r| r["status"] == "timed_out") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let error_of = |instance: &str| {
        restores["items"]
            .as_array()
            .expect("items")
            .iter()
            .find(|r| r["instance_id"] == instance && r["status"] == "timed_out")
            .and_then(|r| r["error"].as_str())
            .unwrap_or_else(|| panic!("{instance} did not time out: {restores:#}"))
            .to_owned()
    };
    assert!(
        error_of("gone").starts_with("no agent took it within 1 s"),
        "{restores:#}"
    );
    assert_eq!(
        error_of("silent"),
        "no report within 1 s of being handed out"
    );
    server.get_documented("/api/restores", SUPPORT).await;

    let (_, alerts) = server.get_json("/api/alerts", SUPPORT).await;
    let timed_out = alerts["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|a| {
            a["kind"] == "restore_failed"
                && a["level"] == "error"
                && a["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("timed out in staging"))
        })
        .count();
    assert_eq!(timed_out, 2, "{alerts}");

    // The late report is refused (the agent takes a 409 as final); scheduling works again.
    let (status, late) = agent_post(
        &server,
        "/api/restores/report",
        &json!({"instance_id": "silent", "restore_id": job["restore_id"], "status": "verified"}),
    )
    .await;
    assert_eq!((status, code(&late)), (409, "conflict"), "{late}");
    let (status, again) = admin_post(&server, "/api/restores/schedule", OPS, &json!({})).await;
    assert_eq!(status, 201);
    assert_eq!(again["scheduled"], 2, "{again}");
    server.stop().await;
}

async fn installations_without_a_backup_are_skipped_with_the_reason(t: TestStore) {
    let server = TestServer::start(t.store.clone()).await;
    report_backup(&server, "with-backup", "b-1").await;
    enroll(&server, "no-backup", "stable", "1.0.0").await;
    // A checksum without the backup's id names nothing the verify command could restore.
    let hb = body("no-id", json!({"backup_checksum": "sha256:abc"}));
    let msg = uuid::Uuid::new_v4().to_string();
    assert_eq!(server.send_v1(SHARED, &msg, now(), &hb).await.status(), 200);

    let (status, done) = admin_post(&server, "/api/restores/schedule", OPS, &json!({})).await;
    assert_eq!(status, 201, "{done}");
    assert_eq!(done["scheduled"], 1);
    assert_eq!(done["not_scheduled"]["no_backup"], 2, "{done}");
    let items = done["items"].as_array().expect("items");
    let of = |instance: &str| {
        items
            .iter()
            .find(|r| r["instance_id"] == instance)
            .unwrap_or_else(|| panic!("{instance} not in {done}"))
    };
    assert_eq!(of("with-backup")["status"], "scheduled");
    assert_eq!(of("with-backup")["backup_id"], "b-1");
    for instance in ["no-backup", "no-id"] {
        let skipped = of(instance);
        assert_eq!(skipped["status"], "skipped", "{skipped}");
        assert!(
            skipped["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("no backup to verify")),
            "{skipped}"
        );
        assert!(skipped["finished_at"].is_i64());
        let (status, _) = agent_post(
            &server,
            "/api/restores/next",
            &json!({"instance_id": instance}),
        )
        .await;
        assert_eq!(status, 204, "{instance} is never handed a verification");
    }
    let message = done["message"].as_str().expect("message");
    assert!(
        message.starts_with("Scheduled 1 verification in staging.")
            && message.contains("2 installations have no backup to verify"),
        "{message}"
    );

    // Recorded once per environment, not at every schedule.
    let (_, again) = admin_post(&server, "/api/restores/schedule", OPS, &json!({})).await;
    assert_eq!(again["items"], json!([]), "{again}");
    // Once it reports a backup, it is scheduled with it.
    report_backup(&server, "no-backup", "b-9").await;
    let (_, later) = admin_post(&server, "/api/restores/schedule", OPS, &json!({})).await;
    assert_eq!(later["items"][0]["instance_id"], "no-backup", "{later}");
    assert_eq!(later["items"][0]["backup_id"], "b-9");
    let (_, detail) = server
        .get_documented("/api/installations/no-id", SUPPORT)
        .await;
    assert_eq!(detail["restores"][0]["status"], "skipped");
    assert!(
        detail["restores"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("no backup to verify")),
        "{detail}"
    );
    server.stop().await;
}

async fn an_empty_schedule_says_why(t: TestStore) {
    let server = TestServer::start(t.store.clone()).await;
    let (status, empty) = admin_post(&server, "/api/restores/schedule", OPS, &json!({})).await;
    assert_eq!(status, 201);
    assert_eq!(
        empty["message"],
        "Nothing scheduled in staging. No installation is registered."
    );
    for id in ["v1", "v2", "v3"] {
        report_backup(&server, id, &format!("b-{id}")).await;
    }
    let (status, _) = admin_post(
        &server,
        "/api/installations",
        ADMIN,
        &json!({"instance_id": "silent"}),
    )
    .await;
    assert_eq!(status, 201);
    let (_, first) = admin_post(&server, "/api/restores/schedule", OPS, &json!({"count": 1})).await;
    assert_eq!(first["scheduled"], 1);
    assert_eq!(
        first["not_scheduled"],
        json!({"never_reported": 1, "open": 0, "verified_recently": 0, "no_backup": 0,
               "beyond_count": 2, "archived": 0})
    );
    let verified = first["items"][0]["instance_id"]
        .as_str()
        .expect("instance")
        .to_owned();
    run_verification(&server, &verified, json!({"status": "verified"})).await;
    let (_, second) =
        admin_post(&server, "/api/restores/schedule", OPS, &json!({"count": 5})).await;
    assert_eq!(second["scheduled"], 2, "{second}");
    // Every installation covered: nothing to do, and the answer says why.
    let (status, covered) = admin_post(&server, "/api/restores/schedule", OPS, &json!({})).await;
    assert_eq!(status, 201);
    assert_eq!(covered["items"], json!([]));
    assert_eq!(
        covered["message"],
        "Nothing scheduled in staging. Not scheduled: 2 installations have a verification \
         open there, 1 installation was verified there in the last 7 days, 1 installation has \
         not sent a heartbeat yet."
    );
    // Another environment is scheduled on its own.
    let (_, qa) = admin_post(
        &server,
        "/api/restores/schedule",
        OPS,
        &json!({"environment": "qa"}),
    )
    .await;
    assert_eq!(qa["scheduled"], 3, "{qa}");
    server.stop().await;
}

/// A 5,000-character reason stays in its cell: the page shows its start and opens to the
/// rest, and cells wrap text that has no spaces.
async fn a_long_plugin_request_reason_is_shown_folded(t: TestStore) {
    let server = TestServer::start(t.store.clone()).await;
    let reason = "x".repeat(5000);
    let (status, created) = agent_post(
        &server,
        "/api/plugins/requests",
        &json!({"instance_id": "p1", "name": "billing-export", "version": "1.2.0",
                "action": "install", "reason": reason}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let (status, html) = page(&server, "/plugins", SUPPORT).await;
    assert_eq!(status, 200);
    let folded = format!(
        "<details><summary>{}…</summary>{reason}</details>",
        "x".repeat(199)
    );
    assert!(html.contains(&folded), "the reason is folded: {html:.2000}");
    assert_eq!(
        html.matches(&reason).count(),
        1,
        "shown whole only when opened"
    );
    assert!(
        html.contains("overflow-wrap:anywhere"),
        "cells wrap long words"
    );
    server.stop().await;
}

/// An operator cancels a verification, scheduled or handed out: no agent is handed it, a
/// late report is refused, the installation is scheduled again at once, the installation
/// shows it, and no alert is raised. One that ended cannot be cancelled.
async fn a_cancelled_verification_is_not_run_and_can_be_scheduled_again(t: TestStore) {
    let server = TestServer::start(t.store.clone()).await;
    report_backup(&server, "waiting", "b-1").await;
    report_backup(&server, "running", "b-2").await;
    let (_, first) = admin_post(&server, "/api/restores/schedule", OPS, &json!({})).await;
    assert_eq!(first["scheduled"], 2, "{first}");
    let id_of = |instance: &str| {
        first["items"]
            .as_array()
            .expect("items")
            .iter()
            .find(|r| r["instance_id"] == instance)
            .map(|r| r["id"].to_string())
            .unwrap_or_else(|| panic!("{instance} not scheduled: {first}"))
    };
    let (waiting, running) = (id_of("waiting"), id_of("running"));
    let (status, job) = agent_post(
        &server,
        "/api/restores/next",
        &json!({"instance_id": "running"}),
    )
    .await;
    assert_eq!(status, 200, "{job}");
    let cancel = |id: &str| format!("/api/restores/{id}/cancel");

    let (status, _) = admin_post(&server, &cancel(&waiting), SUPPORT, &json!({})).await;
    assert_eq!(status, 403, "support only reads");
    let (status, cancelled) = admin_post(&server, &cancel(&waiting), OPS, &json!({})).await;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(cancelled["error"], "cancelled by ops");
    assert!(cancelled["finished_at"].is_i64(), "{cancelled}");
    let (status, _) = agent_post(
        &server,
        "/api/restores/next",
        &json!({"instance_id": "waiting"}),
    )
    .await;
    assert_eq!(status, 204, "a cancelled verification is not handed out");

    let (status, cancelled) = admin_post(&server, &cancel(&running), ADMIN, &json!({})).await;
    assert_eq!(
        (status, &cancelled["status"]),
        (200, &json!("cancelled")),
        "{cancelled}"
    );
    let (status, late) = agent_post(
        &server,
        "/api/restores/report",
        &json!({"instance_id": "running", "restore_id": job["restore_id"], "status": "verified"}),
    )
    .await;
    assert_eq!((status, code(&late)), (409, "conflict"), "{late}");
    assert!(
        late["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("was cancelled")),
        "{late}"
    );

    // Ended: 409, whether cancelled or verified; unknown: 404.
    let (status, error) = admin_post(&server, &cancel(&waiting), OPS, &json!({})).await;
    assert_eq!((status, code(&error)), (409, "conflict"), "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("already ended cancelled")),
        "{error}"
    );
    for unknown in ["999999", "abc"] {
        assert_eq!(
            admin_post(&server, &cancel(unknown), OPS, &json!({}))
                .await
                .0,
            404
        );
    }

    let (_, again) = admin_post(&server, "/api/restores/schedule", OPS, &json!({})).await;
    assert_eq!(again["scheduled"], 2, "both are due again at once: {again}");
    let verified = run_verification(&server, "waiting", json!({"status": "verified"})).await;
    let (status, error) = admin_post(&server, &cancel(&verified), OPS, &json!({})).await;
    assert_eq!(status, 409, "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("already ended verified")),
        "{error}"
    );

    let (_, detail) = server
        .get_documented("/api/installations/running", SUPPORT)
        .await;
    let shown: Vec<(&Value, &Value)> = detail["restores"]
        .as_array()
        .expect("restores")
        .iter()
        .map(|r| (&r["status"], &r["reason"]))
        .collect();
    assert_eq!(
        shown,
        [
            (&json!("scheduled"), &Value::Null),
            (&json!("cancelled"), &json!("cancelled by admin"))
        ]
    );
    let (_, html) = page(&server, "/installations/waiting", SUPPORT).await;
    let section = html
        .split("<h2>Restore verifications</h2>")
        .nth(1)
        .expect("a restore section");
    assert!(
        section.contains("cancelled</span>") && section.contains("cancelled by ops"),
        "{section}"
    );
    assert_no_failure_alert(&server).await;
    server.stop().await;
}

/// An installation's page offers ops and admin a Cancel form on its verifications still
/// open (scheduled or handed out); posting it cancels as the API does and goes back to the
/// installation; an ended one gets the 409 page, an unknown id the JSON 404.
async fn the_installation_page_cancels_open_verifications_for_ops_and_admin(t: TestStore) {
    let server = TestServer::start(t.store.clone()).await;
    report_backup(&server, "waiting", "b-1").await;
    report_backup(&server, "running", "b-2").await;
    let (_, scheduled) = admin_post(&server, "/api/restores/schedule", OPS, &json!({})).await;
    let id_of = |instance: &str| scheduled_id(&scheduled, instance);
    let (waiting, running) = (id_of("waiting"), id_of("running"));
    let (status, _) = agent_post(
        &server,
        "/api/restores/next",
        &json!({"instance_id": "running"}),
    )
    .await;
    assert_eq!(status, 200, "handed out");
    let cancel = |id: &str| format!("/restores/{id}/cancel");
    let form_of = |id: &str| format!("action=\"/restores/{id}/cancel\"");

    let (_, html) = page(&server, "/installations/waiting", SUPPORT).await;
    assert!(!html.contains("/cancel\""), "support cannot cancel: {html}");
    let refused = post_form(&server, &cancel(&waiting), SUPPORT, &[]).await;
    assert_eq!(refused.status, 403, "{refused:?}");
    for (instance, id) in [("waiting", &waiting), ("running", &running)] {
        let (_, html) = page(&server, &format!("/installations/{instance}"), OPS).await;
        assert!(html.contains(&form_of(id)), "{instance}: {html}");
    }

    let done = post_form(&server, &cancel(&waiting), OPS, &[]).await;
    assert_eq!(
        (done.status, done.location.as_str()),
        (303, "/installations/waiting"),
        "{done:?}"
    );
    let done = post_form(&server, &cancel(&running), ADMIN, &[]).await;
    assert_eq!(
        (done.status, done.location.as_str()),
        (303, "/installations/running"),
        "{done:?}"
    );
    let (_, listed) = server.get_json("/api/restores", SUPPORT).await;
    let ended = |id: &str| {
        listed["items"]
            .as_array()
            .expect("items")
            .iter()
            .find(|r| r["id"].as_i64() == id.parse().ok())
            .map(|r| (r["status"].clone(), r["error"].clone()))
            .expect("listed")
    };
    assert_eq!(
        ended(&waiting),
        (json!("cancelled"), json!("cancelled by ops"))
    );
    assert_eq!(
        ended(&running),
        (json!("cancelled"), json!("cancelled by admin"))
    );
    let (_, html) = page(&server, "/installations/waiting", ADMIN).await;
    assert!(!html.contains("/cancel\""), "ended: no form: {html}");

    let refused = post_form(&server, &cancel(&waiting), OPS, &[]).await;
    assert_eq!(refused.status, 409, "{refused:?}");
    assert!(refused.content_type.starts_with("text/html"), "{refused:?}");
    assert!(
        refused.body.contains("already ended cancelled"),
        "{}",
        refused.body
    );
    for unknown in ["999999", "abc"] {
        let refused = post_form(&server, &cancel(unknown), OPS, &[]).await;
        assert_eq!(refused.status, 404, "{refused:?}");
        let error: Value = serde_json::from_str(&refused.body).expect("a JSON error");
        assert_eq!(code(&error), "not_found", "{error}");
    }
    server.stop().await;
}

/// The status an agent reads of verification `restore_id` (`instance` asking): the answer,
/// checked against /openapi.json when it is a success.
async fn status_of(server: &TestServer, instance: &str, restore_id: &str) -> (u16, Value) {
    agent_post(
        server,
        "/api/restores/status",
        &json!({"instance_id": instance, "restore_id": restore_id}),
    )
    .await
}

/// An agent asks how its own verification stands: scheduled, handed out, cancelled,
/// verified. Another instance's verification is as unknown as one that does not exist (404);
/// a bad signature is a 401, a malformed body a 422 naming the field.
async fn the_status_route_answers_only_the_instances_own_verification(t: TestStore) {
    let server = TestServer::start(t.store.clone()).await;
    report_backup(&server, "asks-1", "b-1").await;
    report_backup(&server, "asks-2", "b-2").await;
    let (_, scheduled) = admin_post(&server, "/api/restores/schedule", OPS, &json!({})).await;
    let id_of = |instance: &str| scheduled_id(&scheduled, instance);
    let (mine, theirs) = (id_of("asks-1"), id_of("asks-2"));
    let answer = |id: &str, status: &str| json!({"restore_id": id, "status": status});

    assert_eq!(
        status_of(&server, "asks-1", &mine).await,
        (200, answer(&mine, "scheduled"))
    );
    let (status, job) = agent_post(
        &server,
        "/api/restores/next",
        &json!({"instance_id": "asks-1"}),
    )
    .await;
    assert_eq!((status, &job["restore_id"]), (200, &json!(mine)), "{job}");
    assert_eq!(
        status_of(&server, "asks-1", &mine).await,
        (200, answer(&mine, "in_progress"))
    );

    // Another instance's verification, an unknown one and an id no verification can have
    // all answer the same 404.
    for (asking, id) in [
        ("asks-1", theirs.as_str()),
        ("asks-2", mine.as_str()),
        ("asks-1", "999999"),
        ("asks-1", "abc"),
        ("nobody", mine.as_str()),
    ] {
        let (status, error) = status_of(&server, asking, id).await;
        assert_eq!(
            (status, code(&error)),
            (404, "not_found"),
            "{asking} asking {id}: {error}"
        );
        assert!(!error.to_string().contains("asks-"), "{error}");
    }

    let (status, _) = admin_post(
        &server,
        &format!("/api/restores/{mine}/cancel"),
        OPS,
        &json!({}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        status_of(&server, "asks-1", &mine).await,
        (200, answer(&mine, "cancelled"))
    );
    run_verification(&server, "asks-2", json!({"status": "verified"})).await;
    assert_eq!(
        status_of(&server, "asks-2", &theirs).await,
        (200, answer(&theirs, "verified"))
    );

    // Signed with a secret that is not the instance's (acme-001's), or not signed: 401, as on
    // every agent route.
    let asks =
        serde_json::to_vec(&json!({"instance_id": "asks-1", "restore_id": mine})).expect("json");
    let wrong = server
        .post_v1("/api/restores/status", SECRET, "m-wrong", now(), &asks)
        .await;
    assert_eq!(wrong.status().as_u16(), 401);
    let unsigned = server
        .client
        .post(server.at("/api/restores/status"))
        .body(asks.clone())
        .send()
        .await
        .expect("send");
    assert_eq!(unsigned.status().as_u16(), 401);
    // The same message again is a replay.
    let signed_at = now();
    let first = server
        .post_v1("/api/restores/status", SHARED, "m-once", signed_at, &asks)
        .await;
    assert_eq!(first.status().as_u16(), 200);
    let again = server
        .post_v1("/api/restores/status", SHARED, "m-once", signed_at, &asks)
        .await;
    assert_eq!(again.status().as_u16(), 401, "a replay");

    for (bad, path) in [
        (
            json!({"instance_id": "asks-1", "restore_id": mine, "status": "failed"}),
            "status",
        ),
        (json!({"instance_id": "asks-1"}), ""),
        (
            json!({"instance_id": "asks-1", "restore_id": 7}),
            "restore_id",
        ),
        (
            json!({"instance_id": "asks-1", "restore_id": "a b"}),
            "restore_id",
        ),
        (
            json!({"instance_id": "asks-1", "restore_id": "7".repeat(300)}),
            "restore_id",
        ),
    ] {
        let (status, error) = agent_post(&server, "/api/restores/status", &bad).await;
        assert_eq!((status, code(&error)), (422, "invalid"), "{bad}: {error}");
        if !path.is_empty() {
            assert_eq!(error["error"]["details"][0]["path"], path, "{bad}: {error}");
        }
    }
    server.stop().await;
}

/// Whether process `pid` still runs (a zombie waiting to be reaped does not).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat.rsplit(')').next().unwrap_or("").trim_start();
        !state.starts_with(['Z', 'X'])
    })
}

/// How many answers `/metrics` counts to `POST path` with `status` (any status when `None`).
async fn answered(server: &TestServer, path: &str, status: Option<u16>) -> u64 {
    let text = server.metrics().await;
    let route = format!("route=\"{path}\"");
    text.lines()
        .filter(|line| line.starts_with("fleet_http_requests_total{") && line.contains(&route))
        .filter(|line| status.is_none_or(|s| line.contains(&format!("status=\"{s}\""))))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// A real agent runs a verify command that would take a minute, asking every second whether
/// it was cancelled; an operator cancels the verification; the agent kills the command
/// within a few checks, reports nothing, and the verification stays cancelled, without an
/// alert.
async fn a_cancelled_verification_is_stopped_on_the_agent(t: TestStore) {
    const INSTANCE: &str = "stops-1";
    let server = TestServer::start(t.store.clone()).await;
    report_backup(&server, INSTANCE, "b-1").await;
    let (_, scheduled) = admin_post(&server, "/api/restores/schedule", OPS, &json!({})).await;
    assert_eq!(scheduled["scheduled"], 1, "{scheduled}");
    let id = scheduled["items"][0]["id"].to_string();

    let dir = TempDir::new();
    let at =
        |name: &str| fleet_agent::pipeline::shell_quote(&dir.0.join(name).display().to_string());
    let mut config = AgentConfig::new(INSTANCE, &server.url, Secret::new(SHARED).expect("secret"));
    config.local_port = 0;
    config.state_path = dir.0.join("state.db");
    config.heartbeat_interval = Duration::from_secs(3600);
    config.update.enabled = false;
    config.plugin.enabled = false;
    config.restore.poll_interval = Duration::from_secs(1);
    config.restore.cancel_check = Duration::from_secs(1);
    config.restore.verify_cmd = Some(format!(
        "sleep 60 & echo $! > {}; wait; touch {}",
        at("started"),
        at("finished")
    ));
    let agent = TestAgent::run(
        Agent::builder(config)
            .without_builtins()
            .build()
            .expect("agent"),
        dir,
    );

    let started = agent.dir.0.join("started");
    let pid = wait_for_pid(&started).await;
    assert!(running(pid), "the verify command runs");
    let (_, listed) = server
        .get_json(&format!("/api/restores?instance={INSTANCE}"), SUPPORT)
        .await;
    assert_eq!(listed["items"][0]["status"], "in_progress", "{listed}");
    // The agent asks while the command runs, and goes on.
    let deadline = Instant::now() + Duration::from_secs(10);
    while answered(&server, "/api/restores/status", Some(200)).await == 0 {
        assert!(Instant::now() < deadline, "the agent never asked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(running(pid), "an in-progress answer does not stop it");

    let (status, cancelled) = admin_post(
        &server,
        &format!("/api/restores/{id}/cancel"),
        OPS,
        &json!({}),
    )
    .await;
    assert_eq!((status, &cancelled["status"]), (200, &json!("cancelled")));
    let cancelled_at = Instant::now();
    // Checks come every second: a few of them at most.
    while running(pid) {
        assert!(
            cancelled_at.elapsed() < Duration::from_secs(8),
            "the verify command still runs {:?} after the cancel",
            cancelled_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Time for a report to arrive if one were sent, and for another poll.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !agent.dir.0.join("finished").exists(),
        "the command never went on"
    );
    assert_eq!(
        answered(&server, "/api/restores/report", None).await,
        0,
        "nothing is reported"
    );
    let (_, listed) = server
        .get_json(&format!("/api/restores?instance={INSTANCE}"), SUPPORT)
        .await;
    let items = listed["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{listed}");
    assert_eq!(
        (&items[0]["status"], &items[0]["error"]),
        (&json!("cancelled"), &json!("cancelled by ops")),
        "{listed}"
    );
    assert_no_failure_alert(&server).await;
    agent.stop().await;
    server.stop().await;
}

/// A cancelled verification raises no `restore_failed` alert.
async fn assert_no_failure_alert(server: &TestServer) {
    let (_, alerts) = server.get_json("/api/alerts", SUPPORT).await;
    assert!(
        alerts["items"]
            .as_array()
            .expect("items")
            .iter()
            .all(|a| a["kind"] != "restore_failed"),
        "a cancel raises no alert: {alerts}"
    );
}

/// The id of `instance`'s verification in the answer of `POST /api/restores/schedule`.
fn scheduled_id(scheduled: &Value, instance: &str) -> String {
    scheduled["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|r| r["instance_id"] == instance)
        .map(|r| r["id"].to_string())
        .unwrap_or_else(|| panic!("{instance} not scheduled: {scheduled}"))
}

/// The pid the verify command wrote to `file`, within 20 s.
async fn wait_for_pid(file: &Path) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(pid) = std::fs::read_to_string(file)
            .ok()
            .and_then(|text| text.trim().parse().ok())
        {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "the agent never started the verify command"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

on_both_backends!(
    the_status_route_answers_only_the_instances_own_verification,
    a_cancelled_verification_is_stopped_on_the_agent,
    the_installation_page_cancels_open_verifications_for_ops_and_admin,
    a_cancelled_verification_is_not_run_and_can_be_scheduled_again,
    an_installation_shows_its_newest_restore_verifications,
    the_failure_reason_shows_on_the_restores_page_and_in_the_alert,
    stuck_restores_time_out_and_can_be_scheduled_again,
    installations_without_a_backup_are_skipped_with_the_reason,
    an_empty_schedule_says_why,
    a_long_plugin_request_reason_is_shown_folded,
);
