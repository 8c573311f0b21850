//! The JSON Schemas the OpenAPI document publishes agree with the decoders: a body the
//! schema admits is accepted, and a body it refuses is refused, so a client generated from
//! the document sends what the control plane takes.

use fleet_core::Limits;
use fleet_core::command::SubmitCommand;
use fleet_core::plugin::{PluginReport, PluginRequest};
use fleet_core::registration::RegisterRequest;
use fleet_core::restore::RestoreReport;
use fleet_core::update::UpdateReport;
use fleet_core::validate::{Validate, decode};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// Checks each body against `T`'s schema and decoder, and that both give `accepted`.
fn agree_on<T: DeserializeOwned + Validate + std::fmt::Debug>(
    schema: &Value,
    bodies: &[Value],
    accepted: bool,
) {
    let validator = jsonschema::validator_for(schema).expect("the schema compiles");
    for body in bodies {
        let by_schema = validator.is_valid(body);
        let by_decoder = decode::<T>(body.to_string().as_bytes(), &Limits::default());
        assert_eq!(
            (by_schema, by_decoder.is_ok()),
            (accepted, accepted),
            "schema and decoder on {body}: {by_decoder:?}"
        );
    }
}

fn agree(schema: &Value, bodies: &[Value], accepted: bool) {
    agree_on::<SubmitCommand>(schema, bodies, accepted);
}

fn submit(command_type: &str, payload: Value) -> Value {
    json!({ "command_type": command_type, "targets": ["acme-001"], "payload": payload })
}

#[test]
fn submit_command_payloads_follow_their_command_type() {
    let schema = SubmitCommand::json_schema();
    let hex = "ab".repeat(32);
    agree(
        &schema,
        &[
            submit(
                "RunCommand",
                json!({"cmd": "uptime", "args": ["-p", "two\nlines\tok"], "env": {"LANG": "C", "_X1": ""},
                       "timeout_sec": 30, "shell": false}),
            ),
            submit("RunCommand", json!({"cmd": "df", "timeout_sec": null})),
            submit(
                "UpdateAgent",
                json!({"version": "1.2.3", "url": "https://example.com/agent", "sha256": hex}),
            ),
            submit(
                "UpdateAgent",
                json!({"version": "v2.0.0-rc.1+build-5.x", "url": "https://e/a"}),
            ),
            submit(
                "UpdateAgent",
                json!({"version": "0.10.0-alpha.0.x-y", "url": "https://e/a"}),
            ),
            submit(
                "UpdateAgent",
                json!({"version": "1.2.3+001", "url": "https://e/a"}),
            ),
            submit(
                "UpdateAgent",
                json!({"version": "999999999999999999.0.0-12345678901234567890123", "url": "https://e/a"}),
            ),
            submit(
                "UpdatePackage",
                json!({"packages": ["libstdc++6", "hello=2.10-3", "R"], "action": "install"}),
            ),
            submit(
                "DEPLOY_COMPOSE",
                json!({"project_name": "shop_2-a", "compose_file_base64": "c2VydmljZXM6IHt9"}),
            ),
            submit("STOP_COMPOSE", json!({"project_name": "shop"})),
            submit("STATUS", json!({"project_name": "shop"})),
            submit("HEALTH_CHECK", json!({})),
            json!({"command_type": "HEALTH_CHECK", "selector": {"all": true}}),
            json!({"command_type": "STATUS", "selector": {"channel": "stable"},
                   "payload": {"project_name": "shop"}}),
        ],
        true,
    );
    agree(
        &schema,
        &[
            submit("RunCommand", json!({"cmd": ""})),
            submit("RunCommand", json!({"cmd": "echo\u{1}"})),
            submit("RunCommand", json!({"cmd": "env", "args": ["a\rb"]})),
            submit("RunCommand", json!({"cmd": "env", "env": {"1X": "y"}})),
            submit("RunCommand", json!({"cmd": "env", "env": {"X": "\u{85}"}})),
            submit("RunCommand", json!({"cmd": "sleep", "timeout_sec": 0})),
            submit(
                "RunCommand",
                json!({"cmd": "sleep", "timeout_sec": 604_801}),
            ),
            submit("RunCommand", json!({"cmd": "sleep", "shell": null})),
            json!({"command_type": "RunCommand", "targets": ["acme-001"]}),
            submit(
                "UpdateAgent",
                json!({"version": "1.2.3", "url": "ftp://example.com/a"}),
            ),
            submit(
                "UpdateAgent",
                json!({"version": "1.2.3", "url": "https://e/a", "sha256": "abc"}),
            ),
            submit(
                "UpdateAgent",
                json!({"version": "1 2", "url": "https://e/a"}),
            ),
            submit(
                "UpdateAgent",
                json!({"version": "latest", "url": "https://e/a"}),
            ),
            submit(
                "UpdateAgent",
                json!({"version": "1.2", "url": "https://e/a"}),
            ),
            submit(
                "UpdateAgent",
                json!({"version": "01.2.3", "url": "https://e/a"}),
            ),
            submit(
                "UpdateAgent",
                json!({"version": "1.2.3-", "url": "https://e/a"}),
            ),
            submit(
                "UpdateAgent",
                json!({"version": "1.2.3-rc..1", "url": "https://e/a"}),
            ),
            submit(
                "UpdateAgent",
                json!({"version": "1.2.3-01", "url": "https://e/a"}),
            ),
            submit(
                "UpdateAgent",
                json!({"version": "1.2.3+", "url": "https://e/a"}),
            ),
            submit(
                "UpdateAgent",
                json!({"version": "1.2.1000000000000000000", "url": "https://e/a"}),
            ),
            submit(
                "UpdatePackage",
                json!({"packages": [], "action": "install"}),
            ),
            submit(
                "UpdatePackage",
                json!({"packages": ["-oAPT::x"], "action": "install"}),
            ),
            submit(
                "UpdatePackage",
                json!({"packages": ["hello-"], "action": "install"}),
            ),
            submit(
                "UpdatePackage",
                json!({"packages": ["hello"], "action": "purge"}),
            ),
            submit(
                "DEPLOY_COMPOSE",
                json!({"project_name": "../etc", "compose_file_base64": ""}),
            ),
            submit("STATUS", json!({"project_name": "p".repeat(65)})),
            submit("STOP_COMPOSE", json!({})),
            json!({"command_type": "HEALTH_CHECK"}),
            json!({"command_type": "HEALTH_CHECK", "targets": []}),
            json!({"command_type": "HEALTH_CHECK", "selector": {"all": false}}),
            json!({"command_type": "HEALTH_CHECK", "selector": {"channel": null}}),
            json!({"command_type": "HEALTH_CHECK", "selector": {"all": true, "channel": "c".repeat(129)}}),
            json!({"command_type": "HEALTH_CHECK", "selector": {"channel": "stable\u{7}"}}),
        ],
        false,
    );
}

/// `base` with `changes` merged in.
fn with(base: &Value, changes: Value) -> Value {
    let mut body = base.clone();
    for (key, value) in changes.as_object().expect("an object") {
        body[key] = value.clone();
    }
    body
}

/// `valid` is accepted, and each of `invalid` refused, by `T`'s schema and decoder alike.
fn accepts_one_refuses_the_rest<T: DeserializeOwned + Validate + std::fmt::Debug>(
    schema: Value,
    valid: &Value,
    invalid: &[Value],
) {
    agree_on::<T>(&schema, std::slice::from_ref(valid), true);
    agree_on::<T>(&schema, invalid, false);
}

#[test]
fn pipeline_reports_and_requests_refuse_what_their_schemas_refuse() {
    let control = "a\u{1}b";
    let c1 = "a\u{85}b";
    let report = json!({"instance_id": "acme-001", "job_id": "7", "status": "failed",
        "error": "disk full\nretry\tlater", "output_tail": "last line", "duration_ms": 12});
    let update = with(
        &report,
        json!({"step": "migrate", "canary_percent": 10, "metric_p95_ms": 250.5,
               "metric_error_rate": 0.02, "metric_webhook_retry_rate": 3.0}),
    );
    let bad_heads = |base: &Value| {
        vec![
            with(base, json!({"status": "pending"})),
            with(base, json!({"instance_id": "acme 001"})),
            with(base, json!({"job_id": ""})),
            with(base, json!({"error": control})),
            with(base, json!({"output_tail": c1})),
            with(
                base,
                json!({"error": "x".repeat(Limits::default().max_message_len + 1)}),
            ),
        ]
    };
    let mut bad_updates = bad_heads(&update);
    bad_updates.extend([
        with(&update, json!({"canary_percent": 101})),
        with(&update, json!({"metric_error_rate": 1.5})),
        with(&update, json!({"metric_p95_ms": -1})),
        with(&update, json!({"metric_webhook_retry_rate": 2.0e6})),
        with(&update, json!({"step": "reboot"})),
    ]);
    accepts_one_refuses_the_rest::<UpdateReport>(
        UpdateReport::json_schema(),
        &update,
        &bad_updates,
    );
    let plugin = with(&report, json!({"step": "install"}));
    accepts_one_refuses_the_rest::<PluginReport>(
        PluginReport::json_schema(),
        &plugin,
        &bad_heads(&plugin),
    );

    let restore = json!({"instance_id": "acme-001", "restore_id": "3", "status": "verified",
        "output_tail": "ok"});
    accepts_one_refuses_the_rest::<RestoreReport>(
        RestoreReport::json_schema(),
        &restore,
        &[
            with(&restore, json!({"error": control})),
            with(&restore, json!({"restore_id": "3\n"})),
            with(&restore, json!({"status": "done"})),
        ],
    );

    let request = json!({"instance_id": "acme-001", "name": "billing-export",
        "version": "1.0.0", "action": "install", "reason": "asked by\tsupport"});
    accepts_one_refuses_the_rest::<PluginRequest>(
        PluginRequest::json_schema(),
        &request,
        &[
            with(&request, json!({"reason": control})),
            with(&request, json!({"name": "x; rm -rf /"})),
        ],
    );

    let register = json!({"instance_id": "edge-7", "hostname": "edge-7.local",
        "agent_version": "0.1.0", "architecture": "x86_64"});
    accepts_one_refuses_the_rest::<RegisterRequest>(
        RegisterRequest::json_schema(),
        &register,
        &[
            with(&register, json!({"hostname": control})),
            with(&register, json!({"architecture": "x".repeat(257)})),
        ],
    );
}

#[test]
fn heartbeat_text_fields_refuse_control_characters_in_both() {
    let schema = fleet_core::Heartbeat::json_schema();
    let validator = jsonschema::validator_for(&schema).expect("the schema compiles");
    let base = json!({"instance_id": "acme-001", "db_ok": true, "redis_ok": true,
        "storage_ok": true, "jobs_failed": 0, "client": "Acme\tSA",
        "alerts": [{"level": "warning", "message": "Low disk\nsoon"}]});
    let bad = [
        with(&base, json!({"client": "Acme\u{7}"})),
        with(&base, json!({"alerts": [{"message": "x\u{1b}[31m"}]})),
        with(
            &base,
            json!({"job_failures": [{"queue": "q", "message": "\u{0}"}]}),
        ),
    ];
    for (body, accepted) in std::iter::once((&base, true)).chain(bad.iter().map(|b| (b, false))) {
        let by_decoder =
            fleet_core::Heartbeat::decode(body.to_string().as_bytes(), &Limits::default());
        assert_eq!(
            (validator.is_valid(body), by_decoder.is_ok()),
            (accepted, accepted),
            "schema and decoder on {body}: {by_decoder:?}"
        );
    }
}

#[test]
fn log_chunks_are_base64_when_they_say_so_and_bounded_in_both() {
    use base64::Engine;
    use fleet_core::command::{LogBatch, MAX_CHUNK_BYTES};
    let base64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let batch = |chunks: Vec<Value>| json!({ "instance_id": "acme-001", "command_id": "cmd-1", "chunks": chunks });
    let chunk = |data: String, encoding: Option<&str>| {
        let mut chunk = json!({ "offset": 0, "stream": "stdout", "data": data });
        if let Some(encoding) = encoding {
            chunk["encoding"] = json!(encoding);
        }
        chunk
    };
    let schema = LogBatch::json_schema();
    agree_on::<LogBatch>(
        &schema,
        &[
            batch(vec![chunk("hello\n".into(), None)]),
            batch(vec![chunk("hello\n".into(), Some("utf8"))]),
            batch(vec![chunk(String::new(), Some("base64"))]),
            batch(vec![
                chunk(base64(b"\xff\xfe"), Some("base64")),
                chunk(base64(b"a"), Some("base64")),
                chunk(base64(b"ab"), Some("base64")),
                chunk(base64(b"abc"), Some("base64")),
            ]),
            batch(vec![chunk("x".repeat(MAX_CHUNK_BYTES), None)]),
            batch(vec![chunk(
                base64(&vec![0xff; MAX_CHUNK_BYTES]),
                Some("base64"),
            )]),
        ],
        true,
    );
    agree_on::<LogBatch>(
        &schema,
        &[
            batch(vec![chunk("not base64!".into(), Some("base64"))]),
            batch(vec![chunk("YWJj\n".into(), Some("base64"))]),
            batch(vec![chunk("YWI".into(), Some("base64"))]),
            batch(vec![chunk("YR==".into(), Some("base64"))]),
            batch(vec![chunk("x".repeat(MAX_CHUNK_BYTES + 1), None)]),
            batch(vec![chunk(
                base64(&vec![0xff; MAX_CHUNK_BYTES + 3]),
                Some("base64"),
            )]),
            batch(vec![chunk("hello".into(), Some("latin1"))]),
        ],
        false,
    );
}

#[test]
fn the_jobs_an_agent_is_handed_serialize_as_their_schemas_say() {
    use fleet_core::plugin::{PluginAction, PluginJob, PluginSpec};
    use fleet_core::restore::RestoreJob;
    use fleet_core::update::{RolloutSettings, Strategy};

    let admits = |schema: Value, answer: Value| {
        let validator = jsonschema::validator_for(&schema).expect("the schema compiles");
        let problems: Vec<String> = validator
            .iter_errors(&answer)
            .map(|e| e.to_string())
            .collect();
        assert!(problems.is_empty(), "{answer}: {problems:?}");
    };
    let of_a_rollout = RolloutSettings {
        auto_rollback: false,
        ..RolloutSettings::default()
    };
    for (action, rollout) in [
        (PluginAction::Install, None),
        (PluginAction::Update, Some(of_a_rollout)),
        (PluginAction::Remove, None),
    ] {
        let job = PluginJob {
            job_id: "17".into(),
            plugin: PluginSpec {
                name: "billing-export".into(),
                version: "1.2.0".into(),
                action,
            },
            rollout,
        };
        admits(
            PluginJob::json_schema(),
            serde_json::to_value(job).expect("json"),
        );
    }
    for backup_id in [None, Some("b-42".to_owned())] {
        let job = RestoreJob {
            restore_id: "3".into(),
            environment: "staging".into(),
            backup_id,
        };
        admits(
            RestoreJob::json_schema(),
            serde_json::to_value(job).expect("json"),
        );
    }
    let canary = RolloutSettings {
        strategy: Strategy::BlueGreenCanary,
        slo_p95_ms_max: Some(800.0),
        slo_error_rate_max: Some(0.02),
        slo_webhook_retry_rate_max: Some(0.1),
        ..RolloutSettings::default()
    };
    for settings in [RolloutSettings::default(), canary] {
        admits(
            RolloutSettings::json_schema(),
            serde_json::to_value(settings).expect("json"),
        );
    }
    // And refuses what an agent could not act on.
    let validator = jsonschema::validator_for(&PluginJob::json_schema()).expect("compiles");
    assert!(!validator.is_valid(
        &json!({"job_id": "1", "plugin": {"name": "x", "version": "1", "action": "explode"}})
    ));
}
