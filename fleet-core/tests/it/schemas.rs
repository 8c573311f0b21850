//! The JSON Schemas the OpenAPI document publishes agree with the decoders: a body the
//! schema admits is accepted, and a body it refuses is refused, so a client generated from
//! the document sends what the control plane takes.

use fleet_core::Limits;
use fleet_core::command::SubmitCommand;
use fleet_core::validate::decode;
use serde_json::{Value, json};

/// Checks each body against the schema and the decoder, and that both give `accepted`.
fn agree(schema: &Value, bodies: &[Value], accepted: bool) {
    let validator = jsonschema::validator_for(schema).expect("the schema compiles");
    for body in bodies {
        let by_schema = validator.is_valid(body);
        let by_decoder = decode::<SubmitCommand>(body.to_string().as_bytes(), &Limits::default());
        assert_eq!(
            (by_schema, by_decoder.is_ok()),
            (accepted, accepted),
            "schema and decoder on {body}: {by_decoder:?}"
        );
    }
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
        ],
        false,
    );
}
