//! The store suite: the same tests against SQLite and PostgreSQL.

use fleet_server::SloThresholds;
use fleet_server::store::{
    IngestRules, InstallationDetail, InstallationFilter, RecordOutcome, Store,
};
use serde_json::json;

use crate::support::{TestStore, incoming, on_both_backends};

on_both_backends!(
    first_heartbeat_creates_the_installation_and_a_time_series,
    a_later_batch_keeps_what_it_does_not_report,
    recent_heartbeats_are_each_installations_own_across_batches_and_pruning,
    v1_retry_is_acknowledged_once_and_same_timestamp_is_a_replay,
    slo_alert_is_deduplicated_per_type_and_resolved_when_the_breach_ends,
    payload_alerts_job_failures_and_backups_on_checksum_change,
    enrollment_can_be_required,
    list_filters_and_pagination,
    alerts_are_acknowledged_once,
    offline_alert_opens_once_and_a_heartbeat_resolves_it,
    late_heartbeats_open_no_alert_and_only_end_offline,
    forwarded_alerts_go_through_the_outbox,
    outbox_claims_are_exclusive_until_the_lease_ends,
    the_first_stored_server_key_wins,
    old_message_ids_are_pruned,
    failed_role_checks_are_counted_per_client_and_minute_and_pruned,
    time_series_is_pruned_oldest_first_and_the_installation_stays,
    old_job_failures_and_ended_deliveries_are_pruned_and_pending_ones_stay,
    resolved_alerts_past_retention_are_pruned_unless_a_delivery_is_pending,
    concurrent_writers_do_not_fail,
    retried_batches_in_opposite_orders_do_not_deadlock,
    command_output_stops_at_the_cap_of_both_streams_together,
    ended_targets_lose_their_output_after_the_retention_and_keep_their_result,
);

fn rules() -> IngestRules {
    IngestRules {
        slo: SloThresholds {
            p95_ms_max: 500.0,
            error_rate_max: 0.05,
            webhook_retry_rate_max: 0.0,
        },
        require_enrollment: false,
        forward_alerts: true,
        late_after: Some(std::time::Duration::from_secs(900)),
    }
}

/// The detail of an installation the test recorded.
async fn detail(store: &dyn Store, instance: &str) -> InstallationDetail {
    store
        .installation(instance)
        .await
        .expect("detail")
        .expect("exists")
}

fn applied(outcome: RecordOutcome) -> i64 {
    match outcome {
        RecordOutcome::Applied { installation_id } => installation_id,
        other => panic!("expected applied, got {other:?}"),
    }
}

async fn first_heartbeat_creates_the_installation_and_a_time_series(t: TestStore) {
    let s = &t.store;
    let batch = [
        incoming(
            "acme-001",
            json!({"version": "1.2.3", "release_channel": "stable", "cpu_usage_pct": 12.5,
            "checks": [{"name": "db", "ok": true, "latency_ms": 3}], "primary_region": "sa-east-1"}),
            None,
            1000,
        ),
        incoming("acme-001", json!({"cpu_usage_pct": 20.0}), None, 1060),
        incoming("beta-002", json!({"health": "degraded"}), None, 1060),
    ];
    let out = s.record_heartbeats(&batch, &rules()).await.expect("record");
    assert_eq!(
        applied(out[0]),
        applied(out[1]),
        "same installation within a batch"
    );
    assert_ne!(applied(out[0]), applied(out[2]));
    assert_eq!(s.heartbeat_count().await.expect("count"), 3);
    let d = detail(&**s, "acme-001").await;
    // A later heartbeat without version keeps the known one.
    assert_eq!(d.summary.version.as_deref(), Some("1.2.3"));
    assert_eq!(d.summary.first_seen_at, Some(1000));
    assert_eq!(d.summary.last_seen_at, Some(1060));
    assert_eq!(d.summary.scheme.as_deref(), Some("v0"));
    assert_eq!(d.recent.len(), 2);
    assert_eq!(d.recent[1].figures["cpu_usage_pct"], json!(20.0));
    assert_eq!(
        d.state["cpu_usage_pct"],
        json!(20.0),
        "latest state is the last heartbeat"
    );
    assert!(s.installation("nope").await.expect("query").is_none());
}

/// A known installation is updated in place: what a later heartbeat reports replaces the
/// stored value, what it leaves out stays, and the first sighting keeps its time.
async fn a_later_batch_keeps_what_it_does_not_report(t: TestStore) {
    let s = &t.store;
    let first = [incoming(
        "keep-001",
        json!({"domain": "keep.example.com", "client": "Keep SA", "version": "1.0.0",
        "release_channel": "stable", "health": "ok", "backup_checksum": "sha256-a",
        "cpu_usage_pct": 10.0}),
        None,
        1000,
    )];
    let id = applied(s.record_heartbeats(&first, &rules()).await.expect("record")[0]);
    let later = [incoming(
        "keep-001",
        json!({"health": "degraded", "version": "1.1.0", "cpu_usage_pct": 30.0}),
        Some(("msg-keep-2", 1060)),
        1060,
    )];
    let out = s.record_heartbeats(&later, &rules()).await.expect("record");
    assert_eq!(applied(out[0]), id, "the same installation row");

    let d = detail(&**s, "keep-001").await;
    assert_eq!(d.summary.id, id);
    assert_eq!(d.summary.domain.as_deref(), Some("keep.example.com"));
    assert_eq!(d.summary.client.as_deref(), Some("Keep SA"));
    assert_eq!(d.summary.release_channel.as_deref(), Some("stable"));
    assert_eq!(d.summary.version.as_deref(), Some("1.1.0"));
    assert_eq!(d.summary.health.as_deref(), Some("degraded"));
    assert_eq!(d.summary.scheme.as_deref(), Some("v1"));
    assert_eq!(d.summary.first_seen_at, Some(1000));
    assert_eq!(d.summary.last_seen_at, Some(1060));
    assert_eq!(d.state["cpu_usage_pct"], json!(30.0), "the latest state");
    assert_eq!(d.recent.len(), 2);

    // The stored checksum stayed, so reporting it again records no second backup.
    let again = [incoming(
        "keep-001",
        json!({"backup_checksum": "sha256-a"}),
        None,
        1120,
    )];
    s.record_heartbeats(&again, &rules()).await.expect("record");
    let d = detail(&**s, "keep-001").await;
    assert_eq!(d.backups.len(), 1);
}

/// The CPU figures of an installation's recent heartbeats, oldest first.
async fn recent_cpu(store: &dyn Store, instance: &str) -> Vec<f64> {
    detail(store, instance)
        .await
        .recent
        .iter()
        .map(|p| p.figures["cpu_usage_pct"].as_f64().expect("cpu"))
        .collect()
}

async fn recent_heartbeats_are_each_installations_own_across_batches_and_pruning(t: TestStore) {
    let s = &t.store;
    let cpu = |instance: &str, value: f64, msg, at| {
        incoming(instance, json!({"cpu_usage_pct": value}), msg, at)
    };
    s.record_heartbeats(
        &[
            cpu("a", 1.0, None, 100),
            cpu("b", 50.0, None, 100),
            cpu("a", 2.0, None, 101),
        ],
        &rules(),
    )
    .await
    .expect("first batch");
    s.record_heartbeats(&[cpu("a", 3.0, Some(("m-1", 102)), 102)], &rules())
        .await
        .expect("second batch");
    // A retry is acknowledged, and does not enter the series a second time.
    let retry = s
        .record_heartbeats(
            &[
                cpu("b", 51.0, None, 103),
                cpu("a", 3.0, Some(("m-1", 103)), 103),
            ],
            &rules(),
        )
        .await
        .expect("third batch");
    assert_eq!(retry[1], RecordOutcome::Duplicate);
    assert_eq!(recent_cpu(&*t.store, "a").await, [1.0, 2.0, 3.0]);
    assert_eq!(recent_cpu(&*t.store, "b").await, [50.0, 51.0]);

    // The detail shows the 60 most recent.
    let many: Vec<_> = (0..70)
        .map(|i| cpu("c", f64::from(i), None, 200 + i64::from(i)))
        .collect();
    for batch in many.chunks(16) {
        s.record_heartbeats(batch, &rules()).await.expect("record");
    }
    let expected: Vec<f64> = (10..70).map(f64::from).collect();
    assert_eq!(recent_cpu(&*t.store, "c").await, expected);

    // Once the whole series is pruned, what comes next is all there is, even where a
    // database numbers the new rows from the start again.
    s.prune_heartbeats(1_000).await.expect("prune");
    assert_eq!(s.heartbeat_count().await.expect("count"), 0);
    assert_eq!(recent_cpu(&*t.store, "a").await, Vec::<f64>::new());
    let after: Vec<_> = [
        ("b", 60.0),
        ("b", 61.0),
        ("a", 4.0),
        ("a", 5.0),
        ("c", 99.0),
    ]
    .into_iter()
    .map(|(instance, value)| cpu(instance, value, None, 2_000))
    .collect();
    for batch in after.chunks(1) {
        s.record_heartbeats(batch, &rules()).await.expect("record");
    }
    assert_eq!(recent_cpu(&*t.store, "a").await, [4.0, 5.0]);
    assert_eq!(recent_cpu(&*t.store, "b").await, [60.0, 61.0]);
    assert_eq!(recent_cpu(&*t.store, "c").await, [99.0]);
}

async fn v1_retry_is_acknowledged_once_and_same_timestamp_is_a_replay(t: TestStore) {
    let s = &t.store;
    let first = incoming(
        "acme-001",
        json!({"job_failures": [{"message": "boom"}]}),
        Some(("msg-1", 1000)),
        1000,
    );
    assert!(matches!(
        s.record_heartbeats(std::slice::from_ref(&first), &rules())
            .await
            .expect("record")[0],
        RecordOutcome::Applied { .. }
    ));
    let retry = incoming(
        "acme-001",
        json!({"job_failures": [{"message": "boom"}]}),
        Some(("msg-1", 1100)),
        1100,
    );
    let replay = first.clone();
    let out = s
        .record_heartbeats(&[retry, replay], &rules())
        .await
        .expect("record");
    assert_eq!(out, [RecordOutcome::Duplicate, RecordOutcome::Replay]);
    // Within one batch too.
    let a = incoming("acme-001", json!({}), Some(("msg-2", 1200)), 1200);
    let b = incoming("acme-001", json!({}), Some(("msg-2", 1201)), 1201);
    let out = s
        .record_heartbeats(&[a, b], &rules())
        .await
        .expect("record");
    assert!(matches!(out[0], RecordOutcome::Applied { .. }));
    assert_eq!(out[1], RecordOutcome::Duplicate);
    assert_eq!(
        s.heartbeat_count().await.expect("count"),
        2,
        "nothing applied twice"
    );
    let d = detail(&**s, "acme-001").await;
    assert_eq!(d.job_failures.len(), 1);
    // The same id from another instance is another message.
    let other = incoming("beta-002", json!({}), Some(("msg-1", 1000)), 1300);
    assert!(matches!(
        s.record_heartbeats(&[other], &rules())
            .await
            .expect("record")[0],
        RecordOutcome::Applied { .. }
    ));
}

async fn slo_alert_is_deduplicated_per_type_and_resolved_when_the_breach_ends(t: TestStore) {
    let s = &t.store;
    for (at, p95) in [(1000, 800.0), (1060, 900.0), (1120, 950.0)] {
        s.record_heartbeats(
            &[incoming("acme-001", json!({"slo_p95_ms": p95}), None, at)],
            &rules(),
        )
        .await
        .expect("record");
    }
    let open = s.list_alerts(true, 100).await.expect("alerts");
    assert_eq!(
        open.len(),
        1,
        "one open alert while the breach lasts: {open:?}"
    );
    assert_eq!(
        (open[0].kind.as_str(), open[0].level.as_str()),
        ("slo_p95_ms", "error")
    );
    assert!(
        open[0].message.contains("800"),
        "the first value is reported"
    );
    // Another SLO type is its own alert.
    s.record_heartbeats(
        &[incoming(
            "acme-001",
            json!({"slo_error_rate": 0.2}),
            None,
            1180,
        )],
        &rules(),
    )
    .await
    .expect("record");
    assert_eq!(s.list_alerts(true, 100).await.expect("alerts").len(), 2);
    // Back under the maximum: resolved.
    s.record_heartbeats(
        &[incoming(
            "acme-001",
            json!({"slo_p95_ms": 120.0, "slo_error_rate": 0.0}),
            None,
            1240,
        )],
        &rules(),
    )
    .await
    .expect("record");
    assert!(s.list_alerts(true, 100).await.expect("alerts").is_empty());
    let all = s.list_alerts(false, 100).await.expect("alerts");
    assert!(all.iter().all(|a| a.resolved_at == Some(1240)));
    // A new breach is a new alert.
    s.record_heartbeats(
        &[incoming(
            "acme-001",
            json!({"slo_p95_ms": 700.0}),
            None,
            1300,
        )],
        &rules(),
    )
    .await
    .expect("record");
    assert_eq!(s.list_alerts(true, 100).await.expect("alerts").len(), 1);
    assert_eq!(s.list_alerts(false, 100).await.expect("alerts").len(), 3);
}

async fn payload_alerts_job_failures_and_backups_on_checksum_change(t: TestStore) {
    let s = &t.store;
    let backup = |sum: &str| {
        json!({"backup_checksum": sum, "backup_id": "b-1", "backup_size_bytes": 1024,
        "last_backup_at": "2026-02-11T02:00:00Z", "backup_status": "ok"})
    };
    let mut first = backup("sha-1");
    first["alerts"] = json!([{"level": "warning", "message": "Low disk"}, {"message": "no level"}]);
    first["job_failures"] = json!([{"queue": "billing", "message": "Timeout"}]);
    first["secrets_expired"] = json!(2);
    s.record_heartbeats(&[incoming("acme-001", first, None, 1000)], &rules())
        .await
        .expect("record");
    let mut again = backup("sha-1");
    again["alerts"] = json!([{"level": "warning", "message": "Low disk"}]);
    again["secrets_expired"] = json!(0);
    s.record_heartbeats(&[incoming("acme-001", again, None, 1060)], &rules())
        .await
        .expect("record");
    s.record_heartbeats(
        &[incoming("acme-001", backup("sha-2"), None, 1120)],
        &rules(),
    )
    .await
    .expect("record");
    let d = detail(&**s, "acme-001").await;
    let backups: Vec<&str> = d.backups.iter().map(|b| b.checksum.as_str()).collect();
    assert_eq!(
        backups,
        ["sha-2", "sha-1"],
        "one record per checksum change"
    );
    assert_eq!(d.backups[1].size_bytes, Some(1024));
    assert_eq!(d.job_failures.len(), 1);
    assert_eq!(d.job_failures[0].queue.as_deref(), Some("billing"));
    let mut kinds: Vec<(String, String, bool)> = d
        .alerts
        .iter()
        .map(|a| (a.kind.clone(), a.message.clone(), a.resolved_at.is_some()))
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            ("payload".into(), "Low disk".into(), true),
            ("payload".into(), "no level".into(), true),
            (
                "secrets".into(),
                "secrets need attention: 2 expired, 0 unverified".into(),
                true
            ),
        ],
        "repeated payload alert kept once; each resolved when it stopped being reported"
    );
    let levels: Vec<&str> = d
        .alerts
        .iter()
        .filter(|a| a.message == "no level")
        .map(|a| a.level.as_str())
        .collect();
    assert_eq!(levels, ["info"], "level defaults to info");
}

async fn enrollment_can_be_required(t: TestStore) {
    let s = &t.store;
    let strict = IngestRules {
        require_enrollment: true,
        ..rules()
    };
    let out = s
        .record_heartbeats(
            &[incoming("new-1", json!({}), Some(("m1", 1000)), 1000)],
            &strict,
        )
        .await
        .expect("record");
    assert_eq!(out, [RecordOutcome::NotEnrolled]);
    assert_eq!(s.heartbeat_count().await.expect("count"), 0);
    let id = s.enroll("new-1", 1050).await.expect("enroll");
    assert_eq!(
        s.enroll("new-1", 1060).await.expect("enroll again"),
        id,
        "idempotent"
    );
    // The refused message id was not remembered: the agent's retry is applied.
    let out = s
        .record_heartbeats(
            &[incoming("new-1", json!({}), Some(("m1", 1100)), 1100)],
            &strict,
        )
        .await
        .expect("record");
    assert_eq!(
        out,
        [RecordOutcome::Applied {
            installation_id: id
        }]
    );
    let d = detail(&**s, "new-1").await;
    assert_eq!(d.summary.enrolled_at, Some(1050));
}

async fn list_filters_and_pagination(t: TestStore) {
    let s = &t.store;
    let mut batch = Vec::new();
    for i in 0..7 {
        let channel = if i % 2 == 0 { "stable" } else { "beta" };
        batch.push(incoming(
            &format!("shop-{i}"),
            json!({"release_channel": channel, "health": "ok",
            "client": format!("Client 100%_{i}"), "domain": format!("shop{i}.example.com")}),
            None,
            1000,
        ));
    }
    batch.push(incoming(
        "other",
        json!({"health": "degraded", "client": "ACME SA"}),
        None,
        1000,
    ));
    s.record_heartbeats(&batch, &rules()).await.expect("record");
    let list = |f: InstallationFilter| async move { s.list_installations(&f).await.expect("list") };
    let all = list(InstallationFilter {
        limit: 3,
        ..Default::default()
    })
    .await;
    assert_eq!((all.total, all.items.len()), (8, 3));
    assert_eq!(all.items[0].instance_id, "other", "ordered by instance id");
    let page3 = list(InstallationFilter {
        limit: 3,
        offset: 6,
        ..Default::default()
    })
    .await;
    let ids: Vec<&str> = page3.items.iter().map(|i| i.instance_id.as_str()).collect();
    assert_eq!(ids, ["shop-5", "shop-6"]);
    let beta = list(InstallationFilter {
        channel: Some("beta".into()),
        limit: 50,
        ..Default::default()
    })
    .await;
    assert_eq!(beta.total, 3);
    let degraded = list(InstallationFilter {
        health: Some("degraded".into()),
        limit: 50,
        ..Default::default()
    })
    .await;
    assert_eq!(degraded.items[0].instance_id, "other");
    let text = list(InstallationFilter {
        text: Some("acme".into()),
        limit: 50,
        ..Default::default()
    })
    .await;
    assert_eq!(text.total, 1, "case-insensitive match on the client");
    let domain = list(InstallationFilter {
        text: Some("SHOP3.example".into()),
        limit: 50,
        ..Default::default()
    })
    .await;
    assert_eq!(domain.items[0].instance_id, "shop-3");
    // LIKE wildcards in the user's text are literal.
    let literal = list(InstallationFilter {
        text: Some("100%_4".into()),
        limit: 50,
        ..Default::default()
    })
    .await;
    assert_eq!(literal.total, 1);
    let none = list(InstallationFilter {
        text: Some("_".into()),
        channel: Some("beta".into()),
        limit: 50,
        ..Default::default()
    })
    .await;
    assert_eq!(
        none.total, 3,
        "'_' matches the literal underscore in every client"
    );
}

async fn alerts_are_acknowledged_once(t: TestStore) {
    let s = &t.store;
    s.record_heartbeats(
        &[incoming(
            "acme-001",
            json!({"slo_p95_ms": 999.0}),
            None,
            1000,
        )],
        &rules(),
    )
    .await
    .expect("record");
    let alert = s.list_alerts(true, 10).await.expect("alerts").remove(0);
    let acked = s
        .acknowledge_alert(alert.id, "ops", 1100)
        .await
        .expect("ack")
        .expect("exists");
    assert_eq!(
        (acked.acknowledged_at, acked.acknowledged_by.as_deref()),
        (Some(1100), Some("ops"))
    );
    let again = s
        .acknowledge_alert(alert.id, "admin", 1200)
        .await
        .expect("ack")
        .expect("exists");
    assert_eq!(
        again.acknowledged_by.as_deref(),
        Some("ops"),
        "the first acknowledgement wins"
    );
    assert_eq!(acked.instance_id, "acme-001");
    assert!(
        s.acknowledge_alert(alert.id + 1000, "ops", 1200)
            .await
            .expect("ack")
            .is_none()
    );
}

/// Heartbeats delivered late from an agent's outbox (collected more than `late_after`
/// before they arrived) keep their figures but page nobody for conditions long over: they
/// open no alert and resolve none but `offline`. The first heartbeat on time reports what
/// still holds.
async fn late_heartbeats_open_no_alert_and_only_end_offline(t: TestStore) {
    let s = &t.store;
    let open_kinds = async || {
        let mut kinds: Vec<String> = detail(&**s, "late-1")
            .await
            .alerts
            .into_iter()
            .filter(|a| a.resolved_at.is_none())
            .map(|a| a.kind)
            .collect();
        kinds.sort();
        kinds
    };
    let queued = async || {
        s.outbox_claim(99_999, 99_999 + 60, 100)
            .await
            .expect("due")
            .len()
    };
    let error = json!({"alerts": [{"level": "error", "message": "disk full"}]});
    s.record_heartbeats(&[incoming("late-1", error, None, 1000)], &rules())
        .await
        .expect("record");
    assert_eq!(s.mark_offline(2000, 2500, true).await.expect("sweep"), 1);
    assert_eq!(open_kinds().await, ["offline", "payload"]);
    let forwarded = queued().await;

    // Collected at 1,060 (15 minutes is the limit), delivered at 10,000: a breach, and the
    // payload alert no longer reported.
    let late = json!({"collected_at": 1060, "slo_p95_ms": 999.0});
    let out = s
        .record_heartbeats(&[incoming("late-1", late, None, 10_000)], &rules())
        .await
        .expect("record");
    applied(out[0]);
    assert_eq!(open_kinds().await, ["payload"], "only offline ended");
    assert_eq!(queued().await, 0, "nothing forwarded: {forwarded} before");
    let d = detail(&**s, "late-1").await;
    let late_point = d.recent.last().expect("the late heartbeat's figures");
    assert_eq!(
        (late_point.collected_at, &late_point.figures["slo_p95_ms"]),
        (1060, &json!(999.0))
    );

    // On time, still breaching: the breach opens, dated when the agent saw it, and is
    // forwarded.
    let on_time = json!({"collected_at": 10_050, "slo_p95_ms": 999.0});
    s.record_heartbeats(&[incoming("late-1", on_time, None, 10_060)], &rules())
        .await
        .expect("record");
    assert_eq!(open_kinds().await, ["slo_p95_ms"]);
    assert_eq!(queued().await, 1);
    let breach = detail(&**s, "late-1")
        .await
        .alerts
        .into_iter()
        .find(|a| a.kind == "slo_p95_ms")
        .expect("the breach");
    assert_eq!(breach.created_at, 10_050);
}

async fn offline_alert_opens_once_and_a_heartbeat_resolves_it(t: TestStore) {
    let s = &t.store;
    assert_eq!(
        s.last_heard().await.expect("last heard"),
        None,
        "nothing yet"
    );
    s.record_heartbeats(
        &[
            incoming("quiet", json!({}), None, 1000),
            incoming("busy", json!({}), None, 1500),
        ],
        &rules(),
    )
    .await
    .expect("record");
    s.enroll("never-seen", 1000).await.expect("enroll");
    assert_eq!(s.last_heard().await.expect("last heard"), Some(1500));
    assert_eq!(s.mark_offline(1200, 1600, true).await.expect("sweep"), 1);
    assert_eq!(
        s.mark_offline(1200, 1700, true).await.expect("sweep"),
        0,
        "already open"
    );
    let offline = s
        .list_installations(&InstallationFilter {
            health: Some("offline".into()),
            limit: 50,
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(offline.items.len(), 1);
    assert_eq!(
        (
            offline.items[0].instance_id.as_str(),
            offline.items[0].offline
        ),
        ("quiet", true)
    );
    s.record_heartbeats(&[incoming("quiet", json!({}), None, 1800)], &rules())
        .await
        .expect("record");
    assert!(
        s.list_alerts(true, 10).await.expect("alerts").is_empty(),
        "resolved by the heartbeat"
    );
}

async fn forwarded_alerts_go_through_the_outbox(t: TestStore) {
    let s = &t.store;
    let hb = json!({"slo_p95_ms": 999.0, "alerts": [{"level": "warning", "message": "Low disk"},
        {"level": "critical", "message": "Disk full"}]});
    s.record_heartbeats(&[incoming("acme-001", hb, None, 1000)], &rules())
        .await
        .expect("record");
    let due = s.outbox_claim(1000, 1000 + 60, 10).await.expect("due");
    assert_eq!(
        due.len(),
        2,
        "SLO and critical alerts are forwarded, the warning is not"
    );
    let bodies: Vec<serde_json::Value> = due
        .iter()
        .map(|d| serde_json::from_str(&d.payload).expect("json"))
        .collect();
    assert_eq!(bodies[0]["type"], "slo_p95_ms");
    assert_eq!(bodies[0]["instanceId"], "acme-001");
    assert!(bodies[0]["installationId"].is_i64() && bodies[0]["message"].is_string());
    s.outbox_failed(due[0].id, 1, Some(1010), "receiver answered 500", 1000)
        .await
        .expect("failed");
    s.outbox_delivered(due[1].id, 1000)
        .await
        .expect("delivered");
    assert!(
        s.outbox_claim(1005, 1005 + 60, 10)
            .await
            .expect("due")
            .is_empty(),
        "retry not due yet"
    );
    let retry = s.outbox_claim(1010, 1010 + 60, 10).await.expect("due");
    assert_eq!((retry.len(), retry[0].attempts), (1, 1));
    s.outbox_failed(retry[0].id, 2, None, "gave up", 1010)
        .await
        .expect("give up");
    assert!(
        s.outbox_claim(99_999, 99_999 + 60, 10)
            .await
            .expect("due")
            .is_empty()
    );
    // Without a webhook nothing is queued.
    let quiet = IngestRules {
        forward_alerts: false,
        ..rules()
    };
    s.record_heartbeats(
        &[incoming(
            "beta-002",
            json!({"slo_p95_ms": 999.0}),
            None,
            2000,
        )],
        &quiet,
    )
    .await
    .expect("record");
    assert!(
        s.outbox_claim(99_999, 99_999 + 60, 10)
            .await
            .expect("due")
            .is_empty()
    );
}

async fn outbox_claims_are_exclusive_until_the_lease_ends(t: TestStore) {
    let s = &t.store;
    let breach = json!({"slo_p95_ms": 999.0});
    let batch: Vec<_> = (0..30)
        .map(|i| incoming(&format!("claim-{i:02}"), breach.clone(), None, 1000))
        .collect();
    s.record_heartbeats(&batch, &rules()).await.expect("record");
    // Replicas polling at the same moment, each until it finds nothing due: every alert is
    // claimed by exactly one of them.
    let claims: Vec<_> = (0..4)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let claimed = s.outbox_claim(1000, 1100, 10).await.expect("claim");
                    if claimed.is_empty() {
                        return mine;
                    }
                    mine.extend(claimed.into_iter().map(|i| i.id));
                }
            })
        })
        .collect();
    let mut ids = Vec::new();
    for claim in claims {
        ids.extend(claim.await.expect("task"));
    }
    let distinct: std::collections::BTreeSet<i64> = ids.iter().copied().collect();
    assert_eq!((ids.len(), distinct.len()), (30, 30), "claimed {ids:?}");
    assert!(
        s.outbox_claim(1099, 1200, 50)
            .await
            .expect("claim")
            .is_empty()
    );
    // A replica that died mid-delivery: after the lease its rows are due again, once.
    let again = s.outbox_claim(1100, 1200, 50).await.expect("claim");
    assert_eq!(again.len(), 30);
    assert!(again.windows(2).all(|w| w[0].id < w[1].id), "oldest first");
    assert!(
        s.outbox_claim(1100, 1200, 50)
            .await
            .expect("claim")
            .is_empty()
    );
}

async fn the_first_stored_server_key_wins(t: TestStore) {
    // Replicas starting together each propose a key; all of them end up with the same one.
    let proposals: Vec<_> = (0..4)
        .map(|i| {
            let s = t.store.clone();
            tokio::spawn(async move {
                let commands = s.commands().expect("command store");
                commands
                    .server_key("example", &format!("key-{i}"), 1000)
                    .await
            })
        })
        .collect();
    let mut chosen = std::collections::BTreeSet::new();
    for proposal in proposals {
        chosen.insert(proposal.await.expect("task").expect("key"));
    }
    assert_eq!(chosen.len(), 1, "{chosen:?}");
    let key = fleet_server::stored_jwt_key(&*t.store).await.expect("key");
    let again = fleet_server::stored_jwt_key(&*t.store).await.expect("key");
    assert_eq!(key.to_base64(), again.to_base64());
}

async fn old_message_ids_are_pruned(t: TestStore) {
    let s = &t.store;
    s.record_heartbeats(
        &[incoming("acme-001", json!({}), Some(("old", 1000)), 1000)],
        &rules(),
    )
    .await
    .expect("record");
    s.record_heartbeats(
        &[incoming("acme-001", json!({}), Some(("new", 5000)), 5000)],
        &rules(),
    )
    .await
    .expect("record");
    assert_eq!(s.prune_messages(4000).await.expect("prune"), 1);
    s.ping().await.expect("ping");
}

async fn failed_role_checks_are_counted_per_client_and_minute_and_pruned(t: TestStore) {
    let s = &t.store;
    let count = |minute: i64, failures: &[(&str, u64)]| {
        let failures: Vec<(String, u64)> = failures
            .iter()
            .map(|(c, n)| ((*c).to_owned(), *n))
            .collect();
        async move {
            s.count_auth_failures(minute, &failures)
                .await
                .expect("count")
        }
    };
    let over = |minute: i64, limit: u64| async move {
        s.clients_over_auth_limit(minute, limit, 10)
            .await
            .expect("read")
    };
    count(960, &[("192.0.2.1", 2), ("192.0.2.2", 1)]).await;
    assert_eq!(over(960, 3).await, Vec::<String>::new());
    assert_eq!(over(960, 1).await, ["192.0.2.1", "192.0.2.2"]);
    // Another replica adds its own: together they reach the limit.
    count(960, &[("192.0.2.1", 1), ("192.0.2.3", 1)]).await;
    assert_eq!(over(960, 3).await, ["192.0.2.1"]);
    count(1020, &[("192.0.2.1", 1)]).await;
    assert_eq!(over(1020, 3).await, Vec::<String>::new(), "the next minute");
    assert_eq!(over(1020, 1).await, ["192.0.2.1"]);
    count(1020, &[]).await;
    assert_eq!(
        s.clients_over_auth_limit(960, 1, 2).await.expect("read"),
        ["192.0.2.1", "192.0.2.2"],
        "at most max"
    );
    s.prune_messages(1000).await.expect("prune");
    // The minute that started before the cutoff is gone, the later one stays.
    assert_eq!(over(960, 1).await, Vec::<String>::new());
    assert_eq!(over(1020, 1).await, ["192.0.2.1"]);
}

async fn time_series_is_pruned_oldest_first_and_the_installation_stays(t: TestStore) {
    let s = &t.store;
    // More old rows than one pruning chunk, so the chunked delete has to go round.
    let old: Vec<_> = (0..5_200i64)
        .map(|i| incoming(&format!("old-{}", i % 7), json!({}), None, 1_000 + i))
        .collect();
    for batch in old.chunks(512) {
        s.record_heartbeats(batch, &rules()).await.expect("record");
    }
    s.record_heartbeats(
        &[
            incoming("old-0", json!({"cpu_usage_pct": 3.0}), None, 90_000),
            incoming("fresh", json!({}), None, 90_001),
        ],
        &rules(),
    )
    .await
    .expect("record");
    assert_eq!(s.heartbeat_count().await.expect("count"), 5_202);

    assert_eq!(s.prune_heartbeats(50_000).await.expect("prune"), 5_200);
    assert_eq!(s.heartbeat_count().await.expect("count"), 2);
    assert_eq!(
        s.prune_heartbeats(50_000).await.expect("prune"),
        0,
        "nothing left to prune"
    );
    // The installation and its latest state are not part of the time series.
    let page = s
        .list_installations(&InstallationFilter::default())
        .await
        .expect("list");
    assert_eq!(
        page.total, 8,
        "7 old installations and the fresh one remain"
    );
}

async fn old_job_failures_and_ended_deliveries_are_pruned_and_pending_ones_stay(t: TestStore) {
    let s = &t.store;
    let failures = json!([{"queue": "mail", "message": "smtp down"}, {"message": "boom"}]);
    // Three old SLO breaches (each an alert to forward) and two old job failures.
    let old: Vec<_> = (0..3)
        .map(|i| {
            let body = if i == 0 {
                json!({"slo_p95_ms": 999.0, "job_failures": failures})
            } else {
                json!({"slo_p95_ms": 999.0})
            };
            incoming(&format!("prune-{i}"), body, None, 1000)
        })
        .collect();
    s.record_heartbeats(&old, &rules()).await.expect("record");
    s.record_heartbeats(
        &[incoming(
            "prune-0",
            json!({"slo_p95_ms": 999.0, "job_failures": [{"message": "fresh"}]}),
            None,
            90_000,
        )],
        &rules(),
    )
    .await
    .expect("record");
    let claimed = s.outbox_claim(1000, 1100, 10).await.expect("claim");
    assert_eq!(claimed.len(), 3);
    s.outbox_delivered(claimed[0].id, 1001)
        .await
        .expect("delivered");
    s.outbox_failed(claimed[1].id, 8, None, "gave up", 1002)
        .await
        .expect("given up");
    // claimed[2] stays pending: a retry is due once its lease ends.

    assert_eq!(
        s.prune_records(50_000).await.expect("prune"),
        4,
        "two job failures and the two deliveries that ended"
    );
    assert_eq!(s.prune_records(50_000).await.expect("prune"), 0);
    let detail = s
        .installation("prune-0")
        .await
        .expect("detail")
        .expect("installation");
    let messages: Vec<_> = detail
        .job_failures
        .iter()
        .map(|f| f.message.as_str())
        .collect();
    assert_eq!(messages, ["fresh"]);
    assert_eq!(detail.alerts.len(), 1, "alerts are not pruned");
    let due = s.outbox_claim(2000, 2100, 10).await.expect("claim");
    assert_eq!(
        due.iter().map(|d| d.id).collect::<Vec<_>>(),
        [claimed[2].id],
        "the pending delivery is still due"
    );
}

async fn resolved_alerts_past_retention_are_pruned_unless_a_delivery_is_pending(t: TestStore) {
    let s = &t.store;
    let breach = || json!({"slo_p95_ms": 999.0});
    let healthy = || json!({"slo_p95_ms": 100.0});
    // Each installation breaches its SLO once (an alert to forward); some recover.
    let at = |instance: &str, body, when| incoming(instance, body, None, when);
    for (instance, breached, recovered) in [
        ("delivered", 1000, Some(2000)),
        ("pending", 1000, Some(2000)),
        ("still-open", 1000, None),
        ("recent", 60_000, Some(70_000)),
    ] {
        s.record_heartbeats(&[at(instance, breach(), breached)], &rules())
            .await
            .expect("breach");
        if let Some(when) = recovered {
            s.record_heartbeats(&[at(instance, healthy(), when)], &rules())
                .await
                .expect("recovery");
        }
    }
    // The first alert's delivery went out; the others' are still pending.
    let claimed = s.outbox_claim(1000, 1100, 1).await.expect("claim");
    assert_eq!(claimed.len(), 1);
    s.outbox_delivered(claimed[0].id, 1001)
        .await
        .expect("delivered");

    assert_eq!(
        s.prune_records(50_000).await.expect("prune"),
        2,
        "the delivery that ended and its resolved alert"
    );
    let alerts_of = |instance: &'static str| async move {
        let detail = s.installation(instance).await.expect("detail");
        detail.expect("installation").alerts.len()
    };
    assert_eq!(
        alerts_of("delivered").await,
        0,
        "resolved before the cutoff"
    );
    assert_eq!(alerts_of("pending").await, 1, "its delivery is pending");
    assert_eq!(alerts_of("still-open").await, 1, "open");
    assert_eq!(alerts_of("recent").await, 1, "resolved after the cutoff");
    assert_eq!(s.prune_records(50_000).await.expect("prune"), 0);
}

async fn concurrent_writers_do_not_fail(t: TestStore) {
    // The heartbeat writer, the offline sweeper and operators write at the same time; none
    // of them may fail because another committed first.
    let mut tasks = Vec::new();
    for i in 0..24i64 {
        let s = t.store.clone();
        tasks.push(tokio::spawn(async move {
            match i % 3 {
                0 => s.mark_offline(900 + i, 1000 + i, true).await.map(|_| ()),
                1 => s.enroll(&format!("e-{i}"), 1000 + i).await.map(|_| ()),
                _ => s
                    .record_heartbeats(
                        &[incoming(
                            &format!("c-{}", i % 4),
                            json!({"slo_p95_ms": 900.0}),
                            None,
                            800 + i,
                        )],
                        &rules(),
                    )
                    .await
                    .map(|_| ()),
            }
        }));
    }
    for task in tasks {
        task.await.expect("task").expect("no write fails");
    }
    assert_eq!(t.store.heartbeat_count().await.expect("count"), 8);
}

async fn retried_batches_in_opposite_orders_do_not_deadlock(t: TestStore) {
    // A client that retries a request whose answer was lost can have its messages in two
    // batches at once, each in its own order. Both batches must commit, and every message
    // must count once.
    const INSTANCES: i64 = 48;
    const ROUNDS: i64 = 6;
    for round in 0..ROUNDS {
        let batch = |signed_at: i64| -> Vec<_> {
            (0..INSTANCES)
                .map(|k| {
                    let msg = format!("m-{round}-{k}");
                    incoming(&format!("r-{k}"), json!({}), Some((&msg, signed_at)), 900)
                })
                .collect()
        };
        let first = batch(800 + round);
        let mut retry = batch(801 + round);
        retry.reverse();
        let (a, b) = (t.store.clone(), t.store.clone());
        let (first, retry) = tokio::join!(
            tokio::spawn(async move { a.record_heartbeats(&first, &rules()).await }),
            tokio::spawn(async move { b.record_heartbeats(&retry, &rules()).await }),
        );
        let outcomes = [first, retry].map(|r| r.expect("task").expect("no batch fails"));
        let applied = outcomes
            .iter()
            .flatten()
            .filter(|o| matches!(o, RecordOutcome::Applied { .. }))
            .count() as i64;
        assert_eq!(
            applied, INSTANCES,
            "each message applies once (round {round})"
        );
    }
    assert_eq!(
        t.store.heartbeat_count().await.expect("count"),
        INSTANCES * ROUNDS
    );
}

/// `sqlite::memory:` records and reads back like a file database (heartbeats go through a
/// connection of their own), and leaves no file behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_sqlite_records_and_leaves_nothing_behind() {
    let temporary_files = || {
        std::fs::read_dir(std::env::temp_dir())
            .expect("temp dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with("fleet-memory-"))
            .collect::<std::collections::BTreeSet<_>>()
    };
    let before = temporary_files();
    let store = fleet_server::store::open("sqlite::memory:")
        .await
        .expect("open");
    let created: Vec<_> = temporary_files().difference(&before).cloned().collect();
    assert!(!created.is_empty(), "the database is a temporary file");
    let out = store
        .record_heartbeats(
            &[incoming("mem-001", json!({"version": "9.9.9"}), None, 1000)],
            &rules(),
        )
        .await
        .expect("record");
    applied(out[0]);
    let detail = store
        .installation("mem-001")
        .await
        .expect("read")
        .expect("recorded");
    assert_eq!(detail.summary.version.as_deref(), Some("9.9.9"));
    assert_eq!(detail.recent.len(), 1);
    drop(store);
    let left: Vec<_> = temporary_files()
        .intersection(&created.into_iter().collect())
        .cloned()
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// On PostgreSQL a claim in progress on another replica holds no other claim up: the rows
/// it locked are skipped and the next due ones are taken at once.
#[tokio::test]
async fn postgres_claims_skip_the_rows_another_claim_holds() {
    let t = crate::support::postgres().await;
    let batch: Vec<_> = (0..6)
        .map(|i| {
            incoming(
                &format!("skip-{i}"),
                json!({"slo_p95_ms": 999.0}),
                None,
                1000,
            )
        })
        .collect();
    t.store
        .record_heartbeats(&batch, &rules())
        .await
        .expect("record");
    let other_replica = t.other_connection().await;
    let mut in_progress = other_replica.begin().await.expect("begin");
    let held: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM webhook_outbox ORDER BY id LIMIT 2 FOR UPDATE")
            .fetch_all(&mut *in_progress)
            .await
            .expect("lock two rows");

    let claimed = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        t.store.outbox_claim(1000, 1100, 10),
    )
    .await
    .expect("a claim must not wait for rows another claim holds")
    .expect("claim");
    let claimed: Vec<i64> = claimed.iter().map(|item| item.id).collect();
    assert_eq!(claimed.len(), 4, "{claimed:?}");
    assert!(
        claimed.iter().all(|id| !held.contains(id)),
        "{claimed:?} {held:?}"
    );
    in_progress.rollback().await.expect("rollback");
    other_replica.close().await;
    crate::support::drop_schema(t.schema).await;
}

/// A batch goes in one statement per table however large its parameters, over a Unix socket
/// as over TCP: a batch of 96 heartbeats of about 1.5 KiB each is recorded whole, and each
/// installation keeps its own latest state.
#[tokio::test]
async fn postgres_records_a_large_batch_over_tcp_and_over_a_unix_socket() {
    for url in [
        crate::support::postgres_url(),
        crate::support::postgres_socket_url(),
    ] {
        large_batch_recorded_whole(crate::support::postgres_at(url).await).await;
    }
}

async fn large_batch_recorded_whole(t: TestStore) {
    let padding = "p".repeat(1_200);
    let batch = |signed_at: i64| -> Vec<_> {
        (0..96)
            .map(|i| {
                let msg = format!("sock-msg-{i:03}");
                incoming(
                    &format!("sock-{i:03}"),
                    json!({"version": format!("1.0.{i}"), "primary_region": padding}),
                    Some((&msg, signed_at)),
                    1000,
                )
            })
            .collect()
    };
    let outcomes = t
        .store
        .record_heartbeats(&batch(1000), &rules())
        .await
        .expect("record");
    assert_eq!(outcomes.len(), 96);
    for outcome in outcomes {
        applied(outcome);
    }
    assert_eq!(t.store.heartbeat_count().await.expect("count"), 96);
    let detail = t
        .store
        .installation("sock-077")
        .await
        .expect("read")
        .expect("recorded");
    assert_eq!(detail.summary.version.as_deref(), Some("1.0.77"));
    // The same messages again, signed anew as a retry is, are acknowledged and applied
    // nothing twice.
    let again = t
        .store
        .record_heartbeats(&batch(1001), &rules())
        .await
        .expect("record again");
    assert!(
        again.iter().all(|o| *o == RecordOutcome::Duplicate),
        "{again:?}"
    );
    assert_eq!(t.store.heartbeat_count().await.expect("count"), 96);
    crate::support::drop_schema(t.schema).await;
}

/// A SQLite database from before the heartbeats were linked: the migration links the rows
/// it holds, and new heartbeats continue each installation's series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_links_the_heartbeats_stored_before_an_upgrade() {
    let dir = crate::support::TempDir::new();
    let old_migrations = dir.0.join("migrations");
    std::fs::create_dir(&old_migrations).expect("dir");
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
    for entry in std::fs::read_dir(&source).expect("migrations") {
        let name = entry.expect("entry").file_name();
        if name.to_string_lossy().as_ref() < "0006" {
            std::fs::copy(source.join(&name), old_migrations.join(&name)).expect("copy");
        }
    }
    let url = format!("sqlite://{}?mode=rwc", dir.0.join("fleet.db").display());
    let pool = sqlx::SqlitePool::connect(&url).await.expect("connect");
    sqlx::migrate::Migrator::new(old_migrations.as_path())
        .await
        .expect("old migrations")
        .run(&pool)
        .await
        .expect("old schema");
    sqlx::raw_sql(
        "INSERT INTO installations (id, instance_id) VALUES (1, 'a'), (2, 'b'); \
         INSERT INTO heartbeats (installation_id, received_at, figures) VALUES \
         (1, 100, '{\"cpu_usage_pct\": 1.0}'), (2, 100, '{\"cpu_usage_pct\": 50.0}'), \
         (1, 101, '{\"cpu_usage_pct\": 2.0}');",
    )
    .execute(&pool)
    .await
    .expect("rows of the old schema");
    pool.close().await;

    let store = fleet_server::store::open(&url).await.expect("upgrade");
    store
        .record_heartbeats(
            &[incoming("a", json!({"cpu_usage_pct": 3.0}), None, 102)],
            &rules(),
        )
        .await
        .expect("record");
    assert_eq!(recent_cpu(&*store, "a").await, [1.0, 2.0, 3.0]);
    assert_eq!(recent_cpu(&*store, "b").await, [50.0]);
}

/// Heartbeats reach the SQLite database file itself within moments, not only its
/// write-ahead log: a background checkpoint copies them, long before the log is long enough
/// for a commit to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_copies_the_log_into_the_database_file_in_the_background() {
    let dir = crate::support::TempDir::new();
    let url = format!("sqlite://{}?mode=rwc", dir.0.join("fleet.db").display());
    let store = fleet_server::store::open(&url).await.expect("open");
    let batch = [
        incoming("a", json!({}), None, 100),
        incoming("b", json!({}), None, 100),
    ];
    store
        .record_heartbeats(&batch, &rules())
        .await
        .expect("record");

    // A copy of the database file without its log holds what was checkpointed.
    let copy = dir.0.join("copy.db");
    let copy_url = format!("sqlite://{}", copy.display());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        std::fs::copy(dir.0.join("fleet.db"), &copy).expect("copy");
        let pool = sqlx::SqlitePool::connect(&copy_url)
            .await
            .expect("open copy");
        let in_file: Option<i64> = sqlx::query_scalar("SELECT COUNT(*) FROM heartbeats")
            .fetch_one(&pool)
            .await
            .ok();
        pool.close().await;
        for stale in ["copy.db", "copy.db-wal", "copy.db-shm"] {
            let _ = std::fs::remove_file(dir.0.join(stale));
        }
        if in_file == Some(2) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "after 5 s the database file holds {in_file:?} heartbeats"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// PostgreSQL writes a batch of known installations in one statement after a first round
/// trip has read what the batch needs. A message id that another writer stores between the
/// two (a retry recorded by the other writer) must fail that statement, and the batch must
/// then answer the heartbeat as a duplicate on its transaction path instead of applying it
/// twice. The test holds the batch's write on a table lock, stores the message id the way
/// the other writer would, and lets the write go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_message_stored_between_a_batchs_read_and_write_is_answered_once() {
    let t = crate::support::postgres().await;
    let side = t.other_connection().await;

    // A known installation, so that the next batch takes the one-statement path.
    let first = [incoming("race-001", json!({}), Some(("m-0", 850)), 900)];
    applied(
        t.store
            .record_heartbeats(&first, &rules())
            .await
            .expect("first")[0],
    );

    // Readers pass a SHARE lock; the write statement, which inserts into the time series,
    // waits for it.
    let mut hold = side.begin().await.expect("begin");
    sqlx::query("LOCK TABLE heartbeats IN SHARE MODE")
        .execute(&mut *hold)
        .await
        .expect("lock");
    let store = t.store.clone();
    let batch = tokio::spawn(async move {
        let retried = [incoming("race-001", json!({}), Some(("m-1", 901)), 1000)];
        store.record_heartbeats(&retried, &rules()).await
    });

    // Wait until the batch has read and its write waits for the lock.
    let waiting = "SELECT COUNT(*) FROM pg_locks \
        WHERE relation = 'heartbeats'::regclass AND NOT granted";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let n: i64 = sqlx::query_scalar(waiting)
            .fetch_one(&side)
            .await
            .expect("pg_locks");
        if n > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the batch's write never waited for the lock"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(!batch.is_finished(), "the batch waits for its write");

    // The other writer records the same message, from an earlier signature, and commits.
    sqlx::query(
        "INSERT INTO seen_messages (instance_id, msg_id, signed_at, seen_at) \
         VALUES ('race-001', 'm-1', 899, 999)",
    )
    .execute(&side)
    .await
    .expect("the other writer's message id");
    hold.rollback().await.expect("release the lock");

    let outcome = batch.await.expect("task").expect("the batch does not fail");
    assert_eq!(
        outcome,
        vec![RecordOutcome::Duplicate],
        "a message stored meanwhile is answered as a duplicate"
    );
    assert_eq!(
        t.store.heartbeat_count().await.expect("count"),
        1,
        "and is not applied again"
    );
    let detail = detail(&*t.store, "race-001").await;
    assert_eq!(
        detail.summary.last_seen_at,
        Some(900),
        "nothing of it was written"
    );
    side.close().await;
    crate::support::drop_schema(t.schema).await;
}

/// A PostgreSQL that cannot be reached is named with the reason, not only with the pool's
/// "timed out while waiting for an open connection".
#[tokio::test]
async fn opening_an_unreachable_postgres_says_why() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let err = fleet_server::store::open(&format!("postgres://fleet:fleet@127.0.0.1:{port}/fleet"))
        .await
        .err()
        .expect("nothing listens there");
    let text = err.to_string();
    assert!(text.contains("Connection refused"), "{text}");
}

/// `store::open_with` gives PostgreSQL the writer count it is asked for, and SQLite its one
/// writer whatever it is asked.
#[tokio::test]
async fn a_store_opened_with_a_writer_count_records_with_that_many_on_postgres() {
    use fleet_server::store::{OpenOptions, open_with};
    let t = crate::support::postgres().await;
    let schema = t.schema.clone().expect("a PostgreSQL store");
    let separator = if t.url.contains('?') { '&' } else { '?' };
    let url = format!("{}{separator}options=-c%20search_path%3D{schema}", t.url);
    for writers in [1, 5] {
        let store = open_with(
            &url,
            OpenOptions {
                postgres_writers: writers,
            },
        )
        .await
        .expect("open");
        assert_eq!(store.write_concurrency(), writers);
        let outcome = store
            .record_heartbeats(
                &[incoming("writers", json!({}), None, 1000 + writers as i64)],
                &rules(),
            )
            .await
            .expect("record");
        applied(outcome[0]);
    }
    // Both stores wrote in the test's own schema.
    assert_eq!(t.store.heartbeat_count().await.expect("count"), 2);
    // A file of its own, not `sqlite::memory:`: the in-memory test counts the temporary
    // files that appear while it runs, and would take this store's for its own.
    let dir = crate::support::TempDir::new();
    let sqlite = open_with(
        &format!("sqlite://{}", dir.0.join("writers.db").display()),
        OpenOptions {
            postgres_writers: 5,
        },
    )
    .await
    .expect("open sqlite");
    assert_eq!(sqlite.write_concurrency(), 1);
    crate::support::drop_schema(t.schema).await;
}

/// A command with one target per instance, released to its agents at `now`; returns the
/// target ids.
async fn released_command(t: &TestStore, id: &str, instances: &[&str], now: i64) -> Vec<String> {
    use fleet_core::command::CommandType;
    use fleet_server::store::commands::NewCommand;
    let commands = t.store.commands().expect("command store");
    let targets: Vec<(String, String)> = instances
        .iter()
        .map(|instance| (format!("{id}-{instance}"), (*instance).to_owned()))
        .collect();
    let command = NewCommand {
        id: id.to_owned(),
        command_type: CommandType::RunCommand,
        payload: json!({"cmd": "true"}),
        max_concurrency: None,
        max_errors: None,
        created_by: "admin".into(),
        created_at: now,
    };
    commands
        .create_command(&command, &targets)
        .await
        .expect("create");
    commands.schedule(id, now).await.expect("schedule");
    targets.into_iter().map(|(target, _)| target).collect()
}

/// The stored output of one stream of `target`, in offset order.
async fn stored_output(
    t: &TestStore,
    target: &str,
    stream: fleet_core::command::Stream,
) -> Vec<u8> {
    let chunks = t
        .store
        .commands()
        .expect("command store")
        .read_chunks(target, Some(stream), 0, 10_000)
        .await
        .expect("read");
    chunks.into_iter().flat_map(|c| c.data).collect()
}

async fn command_output_stops_at_the_cap_of_both_streams_together(t: TestStore) {
    use fleet_core::command::Stream::{Stderr, Stdout};
    const CAP: u64 = 1000;
    let commands = t.store.commands().expect("command store");
    let targets = released_command(&t, "cap", &["acme-001", "acme-002"], 1000).await;
    let (cut, exact) = (&targets[0], &targets[1]);
    let chunk = |target: &str, stream, offset: u64, byte: u8, len: usize| {
        (target.to_owned(), stream, offset, vec![byte; len])
    };
    // 600 bytes of stderr, then stdout: 400 of its first 500 fit under the cap (both streams
    // count together), its next chunk none.
    let stored = commands
        .store_chunks(
            &[
                chunk(cut, Stderr, 0, b'e', 600),
                chunk(cut, Stdout, 0, b'a', 500),
                chunk(cut, Stdout, 500, b'b', 100),
            ],
            CAP,
        )
        .await
        .expect("store");
    assert_eq!(stored, 2);
    assert_eq!(stored_output(&t, cut, Stderr).await, vec![b'e'; 600]);
    assert_eq!(stored_output(&t, cut, Stdout).await, vec![b'a'; 400]);
    let output = commands
        .target_output(cut)
        .await
        .expect("read")
        .expect("target");
    assert_eq!(
        (output.output_bytes, output.output_truncated_at_bytes),
        (1000, Some(1000))
    );
    // Chunks at fresh offsets store nothing more, however they overlap; offsets past what
    // a database integer holds are acknowledged like any other chunk past the cap.
    let stored = commands
        .store_chunks(
            &[
                chunk(cut, Stdout, 1, b'x', 10),
                chunk(cut, Stderr, 600, b'y', 10),
                chunk(cut, Stdout, i64::MAX as u64, b'z', 10),
                chunk(cut, Stdout, i64::MAX as u64 + 1, b'z', 10),
                chunk(cut, Stdout, u64::MAX, b'z', 10),
            ],
            CAP,
        )
        .await
        .expect("store");
    assert_eq!(stored, 0);
    let again = commands
        .target_output(cut)
        .await
        .expect("read")
        .expect("target");
    assert_eq!(again, output);

    // Output of exactly the cap is whole, and stays so when its chunks come again (an agent
    // resending what the control plane stored before it restarted).
    let whole = [
        chunk(exact, Stdout, 0, b'a', 700),
        chunk(exact, Stdout, 700, b'b', 300),
    ];
    assert_eq!(commands.store_chunks(&whole, CAP).await.expect("store"), 2);
    assert_eq!(commands.store_chunks(&whole, CAP).await.expect("store"), 0);
    let output = commands
        .target_output(exact)
        .await
        .expect("read")
        .expect("target");
    assert_eq!(
        (output.output_bytes, output.output_truncated_at_bytes),
        (1000, None)
    );
    assert_eq!(stored_output(&t, exact, Stdout).await.len(), 1000);
}

async fn ended_targets_lose_their_output_after_the_retention_and_keep_their_result(t: TestStore) {
    use fleet_core::command::{Stream::Stdout, TargetStatus};
    use fleet_server::store::commands::{PRUNE_ROWS_PER_STATEMENT, TargetUpdate};
    let commands = t.store.commands().expect("command store");
    let targets =
        released_command(&t, "retention", &["acme-001", "acme-002", "acme-003"], 1000).await;
    let (old, recent, running) = (&targets[0], &targets[1], &targets[2]);
    // The old target's output spans several delete statements.
    let chunks = PRUNE_ROWS_PER_STATEMENT as u64 * 2 + 5;
    for target in [old, recent, running] {
        let rows: Vec<_> = (0..chunks)
            .map(|n| (target.clone(), Stdout, n * 4, b"out\n".to_vec()))
            .collect();
        commands.store_chunks(&rows, u64::MAX).await.expect("store");
    }
    let done = |exit_code| TargetUpdate {
        status: TargetStatus::Completed,
        exit_code: Some(exit_code),
        error: None,
        logs: Some("summary"),
        data: None,
    };
    for (target, instance, at) in [(old, "acme-001", 2_000), (recent, "acme-002", 9_000)] {
        commands
            .record_target(target, instance, &done(7), at)
            .await
            .expect("record")
            .expect("changed");
    }

    let deleted = commands.prune_output(5_000, 10_000).await.expect("prune");
    assert_eq!(deleted, chunks);
    assert!(stored_output(&t, old, Stdout).await.is_empty());
    // Ended after the cutoff, or still running (however old): kept.
    assert_eq!(
        stored_output(&t, recent, Stdout).await.len() as u64,
        chunks * 4
    );
    assert_eq!(
        stored_output(&t, running, Stdout).await.len() as u64,
        chunks * 4
    );
    let output = commands
        .target_output(old)
        .await
        .expect("read")
        .expect("target");
    assert_eq!(output.output_deleted_at, Some(10_000));
    assert_eq!(output.output_bytes as u64, chunks * 4, "how much there was");
    // The record and its result stay.
    let record = commands
        .command("retention")
        .await
        .expect("read")
        .expect("command");
    let target = &record.targets[0];
    assert_eq!(
        (
            target.status.as_str(),
            target.exit_code,
            target.logs.as_deref()
        ),
        ("completed", Some(7), Some("summary"))
    );
    assert_eq!(target.output_deleted_at, Some(10_000));
    // A chunk resent that late is dropped, and a second sweep finds nothing more.
    let late = [(old.clone(), Stdout, 0, b"late".to_vec())];
    assert_eq!(
        commands.store_chunks(&late, u64::MAX).await.expect("store"),
        0
    );
    assert!(stored_output(&t, old, Stdout).await.is_empty());
    assert_eq!(
        commands.prune_output(5_000, 11_000).await.expect("prune"),
        0
    );
    let output = commands
        .target_output(old)
        .await
        .expect("read")
        .expect("target");
    assert_eq!(output.output_deleted_at, Some(10_000), "marked once");
}

/// Replicas of one control plane (one schema) share a `NOTIFY` channel; a control plane kept
/// in another schema of the same database has its own, so neither hears the other's command
/// routing and job news.
#[tokio::test]
async fn postgres_replicas_share_a_notify_channel_and_other_schemas_do_not_hear_it() {
    use sqlx::postgres::PgListener;
    let a = crate::support::postgres().await;
    let b = crate::support::postgres().await;
    let schema_a = a.schema.as_deref().expect("schema");
    let replica =
        fleet_server::PostgresStore::connect_with(crate::support::schema_options(&a.url, schema_a))
            .await
            .expect("a second replica on the same schema");
    let channel = |store: &dyn Store| {
        store
            .commands()
            .and_then(|c| c.replica_channel())
            .expect("PostgreSQL has a replica channel")
    };
    let (pool_a, channel_a) = channel(a.store.as_ref());
    let (_, channel_replica) = channel(&replica);
    let (pool_b, channel_b) = channel(b.store.as_ref());
    assert_eq!(channel_a, channel_replica);
    assert_ne!(channel_a, channel_b);
    assert_ne!(
        channel_a, "fleet_commands",
        "public keeps the name older replicas use"
    );

    let mut hears_a = PgListener::connect_with(&pool_a).await.expect("listener");
    hears_a
        .listen(&channel_a)
        .await
        .expect("LISTEN on a's channel");
    let mut hears_b = PgListener::connect_with(&pool_b).await.expect("listener");
    hears_b
        .listen(&channel_b)
        .await
        .expect("LISTEN on b's channel");
    sqlx::query("SELECT pg_notify($1, 'deliver')")
        .bind(&channel_a)
        .execute(&pool_a)
        .await
        .expect("notify");
    let heard = tokio::time::timeout(std::time::Duration::from_secs(5), hears_a.recv())
        .await
        .expect("a replica of a hears it")
        .expect("notification");
    assert_eq!(heard.payload(), "deliver");
    let overheard =
        tokio::time::timeout(std::time::Duration::from_millis(500), hears_b.recv()).await;
    assert!(overheard.is_err(), "b heard a's note: {overheard:?}");
    crate::support::drop_schema(a.schema).await;
    crate::support::drop_schema(b.schema).await;
}
