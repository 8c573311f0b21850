//! Archiving an installation whose customer left: hidden from the list, skipped by the
//! offline sweep, rollouts and restore scheduling, its open work resolved or cancelled, and
//! back with its next heartbeat; on SQLite and PostgreSQL.

use fleet_core::manifest::ManifestVerifier;
use fleet_server::SloThresholds;
use fleet_server::store::{ArchivedFilter, IngestRules, InstallationFilter, RecordOutcome, Store};
use serde_json::{Value, json};

use crate::commands::{TestAgent, submit, wait_connected};
use crate::restores::report_backup;
use crate::rollouts::{admin_post, agent_post, enroll, manifest, page, release_key};
use crate::support::{
    ADMIN, OPS, SHARED, SUPPORT, TestServer, TestStore, body, code, incoming, now,
    on_both_backends, post_form,
};

on_both_backends!(
    an_archived_installation_is_hidden_resolved_and_skipped,
    archiving_cancels_the_jobs_and_verifications_not_handed_out,
    a_rollout_passes_over_a_batch_left_empty_by_archiving,
    heartbeats_bring_archived_installations_back_on_every_write_path,
    the_installation_page_archives_for_admins_only,
    enrolling_an_archived_installation_makes_it_active_again,
    commands_neither_select_nor_target_archived_installations,
);

async fn server(t: &TestStore) -> TestServer {
    TestServer::start_with(t.store.clone(), |b| {
        b.manifest_verifier(ManifestVerifier::new(vec![release_key().public_key()]))
    })
    .await
}

/// Publishes release `version` on stable.
async fn publish(server: &TestServer, version: &str) {
    let signed = release_key()
        .sign_value(&serde_json::to_value(manifest(version)).expect("json"))
        .expect("sign");
    let (status, answer) = admin_post(server, "/api/releases", ADMIN, &signed).await;
    assert_eq!(status, 201, "{answer}");
}

/// `POST /api/installations/{instance}/archive` as the holder of `token`.
async fn archive(server: &TestServer, instance: &str, token: &str) -> (u16, Value) {
    let path = format!("/api/installations/{instance}/archive");
    admin_post(server, &path, token, &json!({})).await
}

/// The instance ids `GET /api/installations{query}` lists.
async fn listed(server: &TestServer, query: &str) -> Vec<String> {
    let path = format!("/api/installations{query}");
    let (status, list) = server.get_documented(&path, SUPPORT).await;
    assert_eq!(status, 200, "{path}: {list}");
    instance_ids(&list["items"])
}

/// The `instance_id` of every item of `items`.
fn instance_ids(items: &Value) -> Vec<String> {
    items
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["instance_id"].as_str().expect("instance_id").to_owned())
        .collect()
}

/// A heartbeat from `instance` with `extra` fields, signed v1.
async fn heartbeat(server: &TestServer, instance: &str, extra: Value) {
    let msg = uuid::Uuid::new_v4().to_string();
    let hb = body(instance, extra);
    assert_eq!(server.send_v1(SHARED, &msg, now(), &hb).await.status(), 200);
}

async fn an_archived_installation_is_hidden_resolved_and_skipped(t: TestStore) {
    let server = server(&t).await;
    report_backup(&server, "gone", "b-gone").await;
    report_backup(&server, "kept", "b-kept").await;
    heartbeat(
        &server,
        "gone",
        json!({"alerts": [{"level": "error", "message": "disk full"}]}),
    )
    .await;
    let (_, before) = server
        .get_documented("/api/installations/gone", SUPPORT)
        .await;
    assert_eq!(
        (before["open_alerts"].clone(), before["archived_at"].clone()),
        (json!(1), Value::Null)
    );

    for token in [SUPPORT, OPS] {
        let (status, _) = archive(&server, "gone", token).await;
        assert_eq!(status, 403, "only admin archives");
    }
    let at = now();
    // No body, as the other action routes take it.
    let response = server
        .client
        .post(server.at("/api/installations/gone/archive"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 200);
    let archived: Value = response.json().await.expect("json");
    let (_, spec) = server.get_json("/openapi.json", SUPPORT).await;
    crate::support::assert_documented_answer(
        &spec,
        "post",
        "/api/installations/gone/archive",
        &archived,
    );
    assert_eq!(archived["instance_id"], "gone");
    assert!(
        archived["archived_at"].as_i64().is_some_and(|a| a >= at),
        "{archived}"
    );
    assert_eq!(archived["open_alerts"], 0, "its alerts are resolved");

    let (status, again) = archive(&server, "gone", ADMIN).await;
    assert_eq!((status, code(&again)), (409, "conflict"), "{again}");
    let message = again["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("gone is already archived since")
            && message.contains("next heartbeat makes it active again"),
        "{message}"
    );
    let (status, unknown) = archive(&server, "nope", ADMIN).await;
    assert_eq!((status, code(&unknown)), (404, "not_found"), "{unknown}");

    // Hidden by default; archived=true shows only archived ones, all shows both.
    assert_eq!(listed(&server, "").await, ["kept"]);
    assert_eq!(listed(&server, "?archived=false").await, ["kept"]);
    assert_eq!(listed(&server, "?archived=true").await, ["gone"]);
    assert_eq!(listed(&server, "?archived=all").await, ["gone", "kept"]);
    assert_eq!(listed(&server, "?archived=").await, ["kept"], "empty: none");
    for bad in ["yes", "TRUE", "1"] {
        let (status, refused) = server
            .get_json(&format!("/api/installations?archived={bad}"), SUPPORT)
            .await;
        assert_eq!(status, 400, "{bad}: {refused}");
        assert_eq!(
            refused["error"]["message"], "bad request: archived must be one of false, true, all",
            "{refused}"
        );
    }
    let (_, total) = server
        .get_documented("/api/installations?archived=true", SUPPORT)
        .await;
    assert_eq!(total["total"], 1);
    let (_, detail) = server
        .get_documented("/api/installations/gone", SUPPORT)
        .await;
    assert_eq!(detail["archived_at"], archived["archived_at"]);

    let (_, open) = server
        .get_documented("/api/alerts?installation=gone", SUPPORT)
        .await;
    assert_eq!(open["total"], 0, "{open}");
    let (_, resolved) = server
        .get_documented("/api/alerts?installation=gone&state=resolved", SUPPORT)
        .await;
    assert_eq!(resolved["items"][0]["message"], "disk full", "{resolved}");
    assert_eq!(resolved["items"][0]["resolved_at"], archived["archived_at"]);

    // The offline sweep raises nothing for it, however long it stays silent.
    let later = now() + 86_400;
    let opened = t
        .store
        .mark_offline(later, later, false)
        .await
        .expect("sweep");
    assert_eq!(opened, 1, "kept alone went offline");
    let (_, detail) = server
        .get_documented("/api/installations/gone", SUPPORT)
        .await;
    assert_eq!(
        (detail["offline"].clone(), detail["open_alerts"].clone()),
        (json!(false), json!(0))
    );

    // A new rollout on its channel and restore scheduling leave it out.
    publish(&server, "2.0.0").await;
    let (status, rollout) = admin_post(
        &server,
        "/api/rollouts",
        ADMIN,
        &json!({"version": "2.0.0", "channel": "stable"}),
    )
    .await;
    assert_eq!(status, 201, "{rollout}");
    assert_eq!(instance_ids(&rollout["jobs"]), ["kept"]);
    let (status, scheduled) = admin_post(&server, "/api/restores/schedule", OPS, &json!({})).await;
    assert_eq!(status, 201, "{scheduled}");
    assert_eq!(instance_ids(&scheduled["items"]), ["kept"]);
    assert_eq!(scheduled["not_scheduled"]["archived"], 1, "{scheduled}");
    assert_eq!(
        scheduled["message"],
        "Scheduled 1 verification in staging. Not scheduled: 1 installation is archived."
    );

    // The dashboard's list hides it too, unless asked.
    let (_, html) = page(&server, "/", SUPPORT).await;
    assert!(html.contains("/installations/kept\""), "{html}");
    assert!(!html.contains("/installations/gone\""), "{html}");
    let (_, html) = page(&server, "/?archived=true", SUPPORT).await;
    assert!(
        html.contains("/installations/gone\"") && html.contains(">archived</span>"),
        "{html}"
    );
    assert!(!html.contains("/installations/kept\""), "{html}");
    assert!(html.contains("<option value=true selected>"), "{html}");

    // Its agent is still running: the next heartbeat brings it back.
    heartbeat(&server, "gone", json!({})).await;
    assert_eq!(listed(&server, "").await, ["gone", "kept"]);
    let (_, detail) = server
        .get_documented("/api/installations/gone", SUPPORT)
        .await;
    assert_eq!(detail["archived_at"], Value::Null);
    server.stop().await;
}

/// A rollout of 2.0.0 to the stable channel, one installation per batch, advancing by
/// itself; its id.
async fn one_by_one_rollout(server: &TestServer) -> i64 {
    let (status, rollout) = admin_post(
        server,
        "/api/rollouts",
        ADMIN,
        &json!({"version": "2.0.0", "channel": "stable", "batchSize": 1, "autoAdvance": true}),
    )
    .await;
    assert_eq!(status, 201, "{rollout}");
    rollout["id"].as_i64().expect("id")
}

async fn archiving_cancels_the_jobs_and_verifications_not_handed_out(t: TestStore) {
    let server = server(&t).await;
    // By instance id: a-gone is the first batch, b-kept the second.
    report_backup(&server, "a-gone", "b-1").await;
    report_backup(&server, "b-kept", "b-2").await;
    publish(&server, "2.0.0").await;
    let id = one_by_one_rollout(&server).await;
    let (status, scheduled) = admin_post(&server, "/api/restores/schedule", OPS, &json!({})).await;
    assert_eq!(status, 201, "{scheduled}");
    assert_eq!(instance_ids(&scheduled["items"]).len(), 2);

    let (status, _) = archive(&server, "a-gone", ADMIN).await;
    assert_eq!(status, 200);

    // Its pending job is cancelled, which ends the first batch: the rollout moves on.
    let (_, after) = server
        .get_documented(&format!("/api/rollouts/{id}"), SUPPORT)
        .await;
    assert_eq!(after["status"], "running", "{after}");
    assert_eq!(after["current_batch"], 1, "auto-advanced: {after}");
    let job = |instance: &str| {
        after["jobs"]
            .as_array()
            .expect("jobs")
            .iter()
            .find(|j| j["instance_id"] == instance)
            .cloned()
            .unwrap_or_else(|| panic!("no job for {instance}: {after}"))
    };
    assert_eq!(
        (
            job("a-gone")["status"].clone(),
            job("a-gone")["error"].clone()
        ),
        (json!("cancelled"), json!("the installation was archived"))
    );
    assert_eq!(job("b-kept")["status"], "pending");
    let (status, _) = agent_post(
        &server,
        "/api/updates/next",
        &json!({"instance_id": "a-gone", "current_version": "1.0.0"}),
    )
    .await;
    assert_eq!(
        status, 204,
        "nothing to hand out to an archived installation"
    );

    // Its scheduled verification is cancelled; the other one stays.
    let (_, restores) = server.get_documented("/api/restores", SUPPORT).await;
    let restore = |instance: &str| {
        restores["items"]
            .as_array()
            .expect("items")
            .iter()
            .find(|r| r["instance_id"] == instance)
            .map(|r| (r["status"].clone(), r["error"].clone()))
            .unwrap_or_else(|| panic!("no verification for {instance}: {restores}"))
    };
    assert_eq!(
        restore("a-gone"),
        (json!("cancelled"), json!("the installation was archived"))
    );
    assert_eq!(restore("b-kept"), (json!("scheduled"), Value::Null));
    let (status, _) = agent_post(
        &server,
        "/api/restores/next",
        &json!({"instance_id": "a-gone"}),
    )
    .await;
    assert_eq!(status, 204);
    server.stop().await;
}

/// Batches of one: an installation archived after the rollout was created leaves its batch
/// with nothing to run, which the rollout passes over (and completes after, when it was the
/// last) instead of waiting in it for ever.
async fn a_rollout_passes_over_a_batch_left_empty_by_archiving(t: TestStore) {
    let server = server(&t).await;
    for instance in ["a-kept", "b-gone", "c-kept", "d-gone"] {
        enroll(&server, instance, "stable", "1.0.0").await;
    }
    publish(&server, "2.0.0").await;
    let id = one_by_one_rollout(&server).await;
    for gone in ["b-gone", "d-gone"] {
        assert_eq!(archive(&server, gone, ADMIN).await.0, 200);
    }
    let update = |instance: &'static str| {
        let server = &server;
        async move {
            let (status, job) = agent_post(
                server,
                "/api/updates/next",
                &json!({"instance_id": instance, "current_version": "1.0.0"}),
            )
            .await;
            assert_eq!(status, 200, "{instance}: {job}");
            let (status, _) = agent_post(
                server,
                "/api/updates/report",
                &json!({"instance_id": instance, "job_id": job["job_id"], "status": "succeeded",
                        "step": "done", "duration_ms": 12}),
            )
            .await;
            assert_eq!(status, 200, "{instance}");
            let (_, after) = server
                .get_documented(&format!("/api/rollouts/{id}"), SUPPORT)
                .await;
            after
        }
    };
    let after = update("a-kept").await;
    assert_eq!(
        (after["status"].clone(), after["current_batch"].clone()),
        (json!("running"), json!(2)),
        "b-gone's batch passed over: {after}"
    );
    let after = update("c-kept").await;
    assert_eq!(
        (after["status"].clone(), after["current_batch"].clone()),
        (json!("completed"), json!(3)),
        "d-gone's batch was the last: {after}"
    );
    server.stop().await;
}

fn rules() -> IngestRules {
    IngestRules {
        slo: SloThresholds::default(),
        require_enrollment: false,
        forward_alerts: false,
        late_after: None,
    }
}

/// When `instance` was archived, or `None` while it is active.
async fn archived_at(store: &dyn Store, instance: &str) -> Option<i64> {
    store
        .installation(instance)
        .await
        .expect("detail")
        .expect("exists")
        .summary
        .archived_at
}

/// Archives each of `instances` at `at`.
async fn archive_all(store: &dyn Store, instances: &[&str], at: i64) {
    for instance in instances {
        let summary = store
            .archive_installation(instance, at)
            .await
            .expect("archive")
            .expect("exists");
        assert_eq!(summary.archived_at, Some(at));
    }
}

/// An operator who enrolls an archived instance again means it to be active: it is listed
/// and watched again before its agent's first heartbeat; its enrollment time stays the first.
async fn enrolling_an_archived_installation_makes_it_active_again(t: TestStore) {
    let s = &*t.store;
    s.enroll("back", 100).await.expect("enroll");
    archive_all(s, &["back"], 200).await;
    s.enroll("back", 300).await.expect("enroll again");
    let summary = s
        .installation("back")
        .await
        .expect("detail")
        .expect("exists")
        .summary;
    assert_eq!(
        (summary.archived_at, summary.enrolled_at),
        (None, Some(100))
    );
}

/// A heartbeat clears `archived_at` whichever statement records it: on PostgreSQL the one
/// statement of a batch of known installations (with or without job failures) and the
/// transaction of a batch that creates one; on SQLite the update by row id and the upsert.
async fn heartbeats_bring_archived_installations_back_on_every_write_path(t: TestStore) {
    let s = &*t.store;
    let hb = |instance: &str, extra: Value, at: i64| {
        let msg = uuid::Uuid::new_v4().to_string();
        incoming(instance, extra, Some((&msg, at)), at)
    };
    let stable = json!({"release_channel": "stable"});
    s.record_heartbeats(
        &[hb("a", stable.clone(), 1000), hb("b", stable.clone(), 1000)],
        &rules(),
    )
    .await
    .expect("record");
    assert!(
        s.archive_installation("nope", 1100)
            .await
            .expect("archive")
            .is_none()
    );
    archive_all(s, &["a", "b"], 1100).await;
    let err = s.archive_installation("a", 1150).await.expect_err("twice");
    assert!(
        matches!(&err, fleet_server::Error::Conflict(why) if why.contains("already archived")),
        "{err:?}"
    );
    let list = |archived| async move {
        let filter = InstallationFilter {
            archived,
            limit: 50,
            ..Default::default()
        };
        let page = s.list_installations(&filter).await.expect("list");
        let ids: Vec<String> = page.items.into_iter().map(|i| i.instance_id).collect();
        (page.total, ids)
    };
    assert_eq!(list(ArchivedFilter::Hidden).await, (0, vec![]));
    assert_eq!(list(ArchivedFilter::Only).await.0, 2);

    // One heartbeat of one of them.
    s.record_heartbeats(&[hb("a", json!({}), 1200)], &rules())
        .await
        .expect("record");
    assert_eq!(archived_at(s, "a").await, None);
    assert_eq!(archived_at(s, "b").await, Some(1100), "b sent nothing");

    // A batch of several heartbeats of known installations.
    archive_all(s, &["a"], 1300).await;
    let out = s
        .record_heartbeats(
            &[
                hb("a", json!({}), 1400),
                hb("b", json!({}), 1400),
                hb("a", json!({}), 1401),
            ],
            &rules(),
        )
        .await
        .expect("record");
    assert!(
        out.iter()
            .all(|o| matches!(o, RecordOutcome::Applied { .. })),
        "{out:?}"
    );
    assert_eq!(
        (archived_at(s, "a").await, archived_at(s, "b").await),
        (None, None)
    );

    // A batch with a job failure (PostgreSQL's longer statement).
    archive_all(s, &["a", "b"], 1500).await;
    s.record_heartbeats(
        &[
            hb(
                "a",
                json!({"job_failures": [{"queue": "q", "message": "boom"}]}),
                1600,
            ),
            hb("b", json!({}), 1600),
        ],
        &rules(),
    )
    .await
    .expect("record");
    assert_eq!(
        (archived_at(s, "a").await, archived_at(s, "b").await),
        (None, None)
    );

    // A batch that creates an installation beside archived ones (PostgreSQL's transaction).
    archive_all(s, &["a", "b"], 1700).await;
    s.record_heartbeats(
        &[
            hb("b", json!({}), 1800),
            hb("c", stable.clone(), 1800),
            hb("a", json!({}), 1800),
        ],
        &rules(),
    )
    .await
    .expect("record");
    for instance in ["a", "b", "c"] {
        assert_eq!(archived_at(s, instance).await, None, "{instance}");
    }
    assert_eq!(
        list(ArchivedFilter::Hidden).await,
        (3, vec!["a".into(), "b".into(), "c".into()])
    );
    assert_eq!(list(ArchivedFilter::Only).await, (0, vec![]));
}

async fn the_installation_page_archives_for_admins_only(t: TestStore) {
    let server = server(&t).await;
    enroll(&server, "gone", "stable", "1.0.0").await;
    let form = "action=\"/installations/gone/archive\"";
    for token in [SUPPORT, OPS] {
        let (_, html) = page(&server, "/installations/gone", token).await;
        assert!(!html.contains(form), "only admin archives: {html}");
        let refused = post_form(&server, "/installations/gone/archive", token, &[]).await;
        assert_eq!(refused.status, 403, "{refused:?}");
    }
    let (_, html) = page(&server, "/installations/gone", ADMIN).await;
    assert!(html.contains(form), "{html}");
    assert!(!html.contains("id=archived"), "{html}");

    let done = post_form(&server, "/installations/gone/archive", ADMIN, &[]).await;
    assert_eq!(
        (done.status, done.location.as_str()),
        (303, "/installations/gone"),
        "{done:?}"
    );
    for token in [SUPPORT, ADMIN] {
        let (status, html) = page(&server, "/installations/gone", token).await;
        assert_eq!(status, 200);
        assert!(
            html.contains("<p id=archived class=warn>Archived since ")
                && html.contains("Its next heartbeat makes it active again."),
            "{html}"
        );
        assert!(!html.contains(form), "archived already: no form: {html}");
    }

    let refused = post_form(&server, "/installations/gone/archive", ADMIN, &[]).await;
    assert_eq!(refused.status, 409, "{refused:?}");
    assert!(refused.content_type.starts_with("text/html"), "{refused:?}");
    assert!(
        refused.body.contains("gone is already archived since")
            && refused.body.contains("href=\"/installations/gone\""),
        "{}",
        refused.body
    );
    let unknown = post_form(&server, "/installations/nope/archive", ADMIN, &[]).await;
    assert_eq!(unknown.status, 404, "{unknown:?}");
    let error: Value = serde_json::from_str(&unknown.body).expect("a JSON error");
    assert_eq!(code(&error), "not_found", "{error}");

    // The list: hidden by default, with a select to show them.
    let (_, html) = page(&server, "/", SUPPORT).await;
    assert!(!html.contains("/installations/gone\""), "{html}");
    assert!(
        html.contains("<select name=archived")
            && html.contains("<option value=false selected>Active</option>")
            && html.contains("href=\"/?archived=true\""),
        "{html}"
    );
    let (_, html) = page(&server, "/?archived=all", SUPPORT).await;
    assert!(html.contains("/installations/gone\""), "{html}");
    let (status, html) = page(&server, "/?archived=maybe", SUPPORT).await;
    assert_eq!(status, 400);
    assert!(
        html.contains("archived must be one of false, true, all"),
        "{html}"
    );
    server.stop().await;
}

/// Installations as a control plane from before archiving stored them.
const OLD_INSTALLATIONS: &str = "INSERT INTO installations \
    (instance_id, release_channel, version, first_seen_at, last_seen_at) VALUES \
    ('old-1', 'stable', '1.0.0', 100, 100), ('old-2', 'stable', '1.0.0', 100, 100);";

/// After the upgrade: the installations stored before are active and listed, can be
/// archived, and a heartbeat brings one back.
async fn installations_from_before_can_be_archived(store: &dyn Store) {
    let filter = InstallationFilter {
        limit: 50,
        ..Default::default()
    };
    let page = store.list_installations(&filter).await.expect("list");
    assert_eq!(page.total, 2);
    assert!(page.items.iter().all(|i| i.archived_at.is_none()));
    archive_all(store, &["old-1"], 200).await;
    let page = store.list_installations(&filter).await.expect("list");
    assert_eq!(page.items[0].instance_id, "old-2");
    assert_eq!(page.total, 1);
    let msg = uuid::Uuid::new_v4().to_string();
    store
        .record_heartbeats(
            &[incoming("old-1", json!({}), Some((&msg, 300)), 300)],
            &rules(),
        )
        .await
        .expect("record");
    assert_eq!(archived_at(store, "old-1").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_archives_installations_stored_before_the_upgrade() {
    let (store, _dir) = crate::support::sqlite_upgraded("0011", OLD_INSTALLATIONS).await;
    installations_from_before_can_be_archived(&*store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_archives_installations_stored_before_the_upgrade() {
    let (store, schema) = crate::support::postgres_upgraded("0012", OLD_INSTALLATIONS).await;
    installations_from_before_can_be_archived(&store).await;
    drop(store);
    crate::support::drop_schema(Some(schema)).await;
}

/// A command to an archived installation would hold a `max_concurrency` slot until the
/// delivery timeout: a selector leaves archived installations out, and naming one is refused
/// unless it is connected (alive, and active again with its next heartbeat).
async fn commands_neither_select_nor_target_archived_installations(t: TestStore) {
    let server = server(&t).await;
    let stable = json!({"release_channel": "stable"});
    for instance in ["a-gone", "b-kept"] {
        heartbeat(&server, instance, stable.clone()).await;
    }
    assert_eq!(archive(&server, "a-gone", ADMIN).await.0, 200);
    let health = |extra: Value| {
        let mut body = json!({"command_type": "HEALTH_CHECK", "payload": {}});
        body.as_object_mut()
            .expect("object")
            .extend(extra.as_object().expect("object").clone());
        body
    };
    let submitted = |answer: &Value| -> Vec<String> {
        answer["targets"]
            .as_array()
            .expect("targets")
            .iter()
            .map(|t| t["instance_id"].as_str().expect("instance_id").to_owned())
            .collect()
    };
    let (client, url) = (&server.client, &server.url);

    for selector in [json!({"all": true}), json!({"channel": "stable"})] {
        let (status, answer) =
            submit(client, url, OPS, health(json!({"selector": selector}))).await;
        assert_eq!(status, 201, "{selector}: {answer}");
        assert_eq!(submitted(&answer), ["b-kept"], "{selector}: {answer}");
        let path = format!("/v1/commands/{}/cancel", answer["id"].as_str().expect("id"));
        assert_eq!(admin_post(&server, &path, ADMIN, &json!({})).await.0, 200);
    }

    let (_, before) = server.get_json("/v1/commands", SUPPORT).await;
    let (status, refused) = submit(
        client,
        url,
        OPS,
        health(json!({"targets": ["b-kept", "a-gone", "never-seen"]})),
    )
    .await;
    assert_eq!(status, 422, "{refused}");
    let messages: Vec<&str> = refused["error"]["details"]
        .as_array()
        .expect("details")
        .iter()
        .map(|d| {
            assert_eq!(d["path"], "targets", "{refused}");
            d["message"].as_str().expect("message")
        })
        .collect();
    assert_eq!(messages.len(), 2, "{refused}");
    assert!(
        messages[0].starts_with("unknown instance: never-seen ("),
        "{refused}"
    );
    assert_eq!(
        messages[1],
        "archived instance: a-gone (its next heartbeat, or enrolling it again, makes it \
         active); nothing was submitted"
    );
    let (_, after) = server.get_json("/v1/commands", SUPPORT).await;
    assert_eq!(after, before, "nothing was submitted");

    assert_eq!(archive(&server, "b-kept", ADMIN).await.0, 200);
    let (status, refused) =
        submit(client, url, OPS, health(json!({"selector": {"all": true}}))).await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(
        refused["error"]["details"][0]["message"],
        "matches no active instance (archived installations are never selected)"
    );

    // Connected: alive, so a target even while still archived. Its agent sends one heartbeat
    // as it starts, and no other for an hour.
    let agent = TestAgent::start(url, "c-live", SHARED, None).await;
    wait_connected(client, url, 1).await;
    let seen = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while server
        .get_json("/api/installations/c-live", SUPPORT)
        .await
        .0
        != 200
    {
        assert!(std::time::Instant::now() < seen, "no heartbeat from c-live");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(archive(&server, "c-live", ADMIN).await.0, 200);
    let (status, answer) = submit(client, url, OPS, health(json!({"targets": ["c-live"]}))).await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(submitted(&answer), ["c-live"]);
    let (_, detail) = server.get_json("/api/installations/c-live", SUPPORT).await;
    assert!(detail["archived_at"].is_i64(), "still archived: {detail}");
    agent.stop().await;
    server.stop().await;
}

/// An operator's transaction left open on an installation's row makes archiving it a
/// retryable 503 after PostgreSQL's lock timeout, documented as such, instead of a request
/// (and a pooled connection) held for as long as the transaction stays open; nothing changes
/// until the lock is gone.
#[tokio::test]
async fn a_row_lock_held_elsewhere_makes_an_api_write_a_503_in_seconds() {
    let t = crate::support::postgres().await;
    let server = server(&t).await;
    heartbeat(&server, "locked", json!({})).await;
    let (side, holder) = t.lock_installation("locked").await;

    let started = std::time::Instant::now();
    let (status, answer) = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        archive(&server, "locked", ADMIN),
    )
    .await
    .expect("the request waited for the lock as long as it was held");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "answered after {:?}",
        started.elapsed()
    );
    assert_eq!(status, 503, "{answer}");
    assert_eq!(
        answer["error"],
        json!({"code": "unavailable", "message": "the database is unreachable or busy; retry later"})
    );
    let (_, spec) = server.get_json("/openapi.json", SUPPORT).await;
    assert!(
        spec["paths"]["/api/installations/{instance_id}/archive"]["post"]["responses"]["503"]
            .is_object(),
        "the 503 is documented"
    );
    let (_, detail) = server.get_json("/api/installations/locked", SUPPORT).await;
    assert_eq!(detail["archived_at"], Value::Null, "nothing changed");

    holder.rollback().await.expect("release the lock");
    let (status, archived) = archive(&server, "locked", ADMIN).await;
    assert_eq!(status, 200, "{archived}");
    server.stop().await;
    side.close().await;
    crate::support::drop_schema(t.schema).await;
}
