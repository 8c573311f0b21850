//! `GET /openapi.json`: every route, generated from one table so it cannot fall behind.

use axum::Json;
use axum::response::IntoResponse;
use fleet_core::schema::{count, nullable, object};
use serde_json::{Value, json};

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Anyone.
    Public,
    /// An agent's v0/v1 signature.
    Signed,
    /// At least this role (`support`, `ops`, `admin`).
    Role(&'static str),
}

/// One route of the control plane.
pub(crate) struct RouteDoc {
    pub method: &'static str,
    pub path: &'static str,
    pub access: Access,
    pub summary: &'static str,
    pub responses: &'static [(u16, &'static str)],
}

pub(crate) const fn r(
    method: &'static str,
    path: &'static str,
    access: Access,
    summary: &'static str,
    responses: &'static [(u16, &'static str)],
) -> RouteDoc {
    RouteDoc {
        method,
        path,
        access,
        summary,
        responses,
    }
}

use Access::{Public, Role, Signed};

/// Every route the router serves.
pub(crate) const ROUTES: &[RouteDoc] = &[
    r(
        "post",
        "/api/heartbeats",
        Signed,
        "Record a heartbeat. Signed with v1 (webhook-id, webhook-timestamp, webhook-signature) or v0 (x-agent-signature). Idempotent on the v1 message id.",
        &[
            (200, "Recorded, or a retry acknowledged (duplicate: true)"),
            (401, "Signature missing, wrong, expired or replayed"),
            (403, "Instance not enrolled (when enrollment is required)"),
            (413, "Body too large"),
            (422, "Invalid payload; details lists every problem"),
            (503, "Storage unavailable; retry later"),
        ],
    ),
    r(
        "get",
        "/api/installations",
        Role("support"),
        "List installations, a page at a time, filtered by channel, health, text and whether archived (archived ones are hidden unless asked for).",
        &[
            (200, "A page: items, total, limit, offset"),
            (400, "Bad query"),
        ],
    ),
    r(
        "post",
        "/api/installations",
        Role("admin"),
        "Enroll an instance before its first heartbeat. Body: {\"instance_id\"}.",
        &[(201, "Enrolled"), (422, "Invalid body")],
    ),
    r(
        "get",
        "/api/installations/{instance_id}",
        Role("support"),
        "One installation: latest state, checks, alerts, job failures, backups, recent heartbeats, and its newest restore verifications (status, backup, environment, when, and why one did not verify).",
        &[(200, "The installation"), (404, "Unknown instance")],
    ),
    r(
        "post",
        "/api/installations/{instance_id}/archive",
        Role("admin"),
        "Archive an installation whose customer left (soft: nothing is deleted). It is hidden from the list (archived=true shows it), skipped by the offline sweep, new rollouts and restore scheduling; its open alerts are resolved, its rollout jobs not handed out yet and its scheduled restore verifications cancelled. Its next heartbeat makes it active again. Reads no body.",
        &[
            (200, "The installation, archived (archived_at set)"),
            (404, "Unknown instance"),
            (409, "Already archived"),
        ],
    ),
    r(
        "get",
        "/api/alerts",
        Role("support"),
        "Alerts across the fleet, newest first, a page at a time, each with its installation's instance id and its webhook delivery: pending (attempts, next try, last error), delivered, given_up (attempts, when, the last error with URL secrets redacted), or null (not forwarded, no webhook configured, or the delivery ended more than CONTROL_PLANE_HEARTBEAT_RETENTION_DAYS ago and was pruned).",
        &[
            (200, "A page: items, total, limit, offset"),
            (
                400,
                "Bad query: an unknown state, level or delivery, a malformed kind, a filter over 256 bytes, a bad limit or offset, or a delivery filter without a webhook",
            ),
        ],
    ),
    r(
        "post",
        "/api/alerts/{id}/ack",
        Role("ops"),
        "Acknowledge an alert.",
        &[(200, "The alert"), (404, "Unknown alert")],
    ),
    r(
        "get",
        "/healthz",
        Public,
        "Liveness and database reachability.",
        &[(200, "ok"), (503, "Database unreachable")],
    ),
    r(
        "get",
        "/metrics",
        Public,
        "Prometheus metrics of the control plane itself.",
        &[(200, "Text exposition")],
    ),
    r(
        "get",
        "/openapi.json",
        Public,
        "This document.",
        &[(200, "OpenAPI 3.1")],
    ),
    r(
        "get",
        "/",
        Role("support"),
        "Dashboard: installations, filtered and paged as GET /api/installations (HTML).",
        &[
            (200, "HTML"),
            (303, "Not logged in: to /login"),
            (400, "Bad query (HTML)"),
        ],
    ),
    r(
        "get",
        "/installations/{instance_id}",
        Role("support"),
        "Dashboard: one installation (HTML).",
        &[
            (200, "HTML"),
            (303, "Not logged in: to /login"),
            (404, "Unknown instance"),
        ],
    ),
    r(
        "post",
        "/installations/{instance_id}/archive",
        Role("admin"),
        "Dashboard form: archive the installation, as POST /api/installations/{instance_id}/archive.",
        &[
            (303, "Back to the installation"),
            (404, "Unknown instance"),
            (409, "Already archived (HTML)"),
        ],
    ),
    r(
        "get",
        "/alerts",
        Role("support"),
        "Dashboard: the fleet's alerts with their installations and webhook deliveries, filtered and paged as GET /api/alerts, and how many deliveries were given up (HTML).",
        &[
            (200, "HTML"),
            (303, "Not logged in: to /login"),
            (400, "Bad query (HTML)"),
        ],
    ),
    r(
        "post",
        "/alerts/{id}/ack",
        Role("ops"),
        "Dashboard form: acknowledge an alert, then return to the installation or to the alert list (back).",
        &[
            (303, "Back to the installation, or to back"),
            (400, "back is not an address of the alert list"),
            (404, "Unknown alert"),
        ],
    ),
    r(
        "get",
        "/login",
        Public,
        "Login form (HTML).",
        &[(200, "HTML"), (429, THROTTLED)],
    ),
    r(
        "post",
        "/login",
        Public,
        "Log in with a role token (form field token): starts a session and sets its id in an HttpOnly SameSite cookie.",
        &[
            (303, "Logged in: to /"),
            (401, "Wrong token"),
            (429, THROTTLED),
        ],
    ),
    r(
        "post",
        "/logout",
        Public,
        "Log out: end the session on the server and clear its cookie.",
        &[(303, "To /login")],
    ),
];

/// The request body a route reads, with its media type and schema; `None` for routes that
/// read none. The schemas come from the body types themselves (`json_schema()` beside each).
fn request_body(method: &str, path: &str) -> Option<(&'static str, Value)> {
    use fleet_core::{command, manifest, plugin, registration, restore, update};
    let json = |schema: Value| Some(("application/json", schema));
    match (method, path) {
        ("post", "/api/heartbeats") => json(fleet_core::Heartbeat::json_schema()),
        ("post", "/api/installations") => json(crate::api::enroll_schema()),
        ("post", "/api/releases") => json(json!({ "oneOf": [
            manifest::SignedManifest::json_schema(),
            fleet_core::schema::object(&["manifest"], &[("manifest", manifest::SignedManifest::json_schema())]),
        ]})),
        ("post", "/api/rollouts") => json(crate::rollouts::create_rollout_schema()),
        ("post", "/api/plugins/rollouts") => json(crate::rollout_docs::plugin_rollout_schema()),
        ("post", "/api/updates/next") => json(update::UpdateNextRequest::json_schema()),
        ("post", "/api/updates/report") => json(update::UpdateReport::json_schema()),
        ("post", "/api/plugins/releases") => json(crate::plugins::new_release_schema()),
        ("post", "/api/plugins/requests") => json(plugin::PluginRequest::json_schema()),
        ("post", "/api/plugins/requests/{id}/reject") => json(crate::plugins::rejection_schema()),
        ("post", "/api/plugins/next") | ("post", "/api/restores/next") => {
            json(plugin::NextJobRequest::json_schema())
        }
        ("post", "/api/plugins/report") => json(plugin::PluginReport::json_schema()),
        ("post", "/api/restores/schedule") => json(crate::restores::schedule_schema()),
        ("post", "/api/restores/report") => json(restore::RestoreReport::json_schema()),
        ("post", "/api/restores/status") => json(restore::RestoreStatusRequest::json_schema()),
        ("post", "/v1/agents/register") => json(registration::RegisterRequest::json_schema()),
        ("post", "/v1/enrollments") => json(crate::registration::enrollment_schema()),
        ("post", "/v1/agents/poll") => json(crate::poll::poll_schema()),
        ("post", "/v1/commands/submit") => json(command::SubmitCommand::json_schema()),
        ("post", "/v1/commands/logs") => json(command::LogBatch::json_schema()),
        ("post", "/plugins/requests/{id}/reject") => Some((
            "application/x-www-form-urlencoded",
            crate::plugins::rejection_form_schema(),
        )),
        ("post", "/login") => Some((
            "application/x-www-form-urlencoded",
            fleet_core::schema::object(&["token"], &[("token", json!({ "type": "string" }))]),
        )),
        _ => None,
    }
}

/// What kind of answer a route gives when it succeeds, which fixes its media types.
fn success_media(path: &str) -> &'static [&'static str] {
    match path {
        "/metrics" => &["text/plain"],
        "/v1/commands/{id}/logs" => &["application/octet-stream", "text/event-stream"],
        p if p.starts_with("/api/")
            || p.starts_with("/v1/")
            || p.starts_with("/.well-known/")
            || p == "/healthz"
            || p == "/openapi.json" =>
        {
            &["application/json"]
        }
        _ => &["text/html"],
    }
}

/// Any integer (an id, a time in Unix seconds).
pub(crate) fn integer() -> Value {
    json!({ "type": "integer" })
}

/// Any string.
pub(crate) fn string() -> Value {
    json!({ "type": "string" })
}

/// An integer, or `null` when there is none.
pub(crate) fn maybe_integer() -> Value {
    nullable(integer())
}

/// A string, or `null` when there is none.
pub(crate) fn maybe_string() -> Value {
    nullable(string())
}

/// `true` or `false`.
pub(crate) fn boolean() -> Value {
    json!({ "type": "boolean" })
}

/// An array whose every item is `items`.
pub(crate) fn array(items: Value) -> Value {
    json!({ "type": "array", "items": items })
}

/// A reference to the component schema `name`.
pub(crate) fn component(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

/// An array of the component schema `name`.
pub(crate) fn array_of(name: &str) -> Value {
    array(component(name))
}

/// `{items}`: what every list route answers, an array of the component schema `name`.
pub(crate) fn items_of(name: &str) -> Value {
    object(&["items"], &[("items", array_of(name))])
}

/// An object whose every field is always present (those that may have no value are `null`
/// then).
pub(crate) fn every_field(fields: &[(&'static str, Value)]) -> Value {
    let names: Vec<&str> = fields.iter().map(|(name, _)| *name).collect();
    object(&names, fields)
}

/// The body of a route's success answer (200, or 201 for a route that creates something),
/// for the routes whose answer has a schema: what an agent reads (heartbeat
/// acknowledgements, the jobs and commands it is handed, its registration), and what
/// operators read and get back from the installation, alert, release, rollout, marketplace,
/// restore and command routes. Tests check real answers against them.
fn success_schema(method: &str, path: &str) -> Option<Value> {
    use fleet_core::{command, registration};
    let schema = match (method, path) {
        ("get", "/api/installations") => object(
            &["items", "total", "limit", "offset"],
            &[
                ("items", array_of("InstallationSummary")),
                ("total", count()),
                ("limit", count()),
                ("offset", count()),
            ],
        ),
        ("post", "/api/heartbeats") => object(
            &["ok", "duplicate"],
            &[
                ("ok", json!({ "const": true })),
                ("duplicate", boolean()),
                ("installation_id", integer()),
            ],
        ),
        ("get", "/api/installations/{instance_id}") => component("Installation"),
        ("post", "/api/installations/{instance_id}/archive") => component("InstallationSummary"),
        ("get", "/api/alerts") => object(
            &["items", "total", "limit", "offset"],
            &[
                ("items", array_of("Alert")),
                ("total", count()),
                ("limit", count()),
                ("offset", count()),
            ],
        ),
        ("post", "/api/alerts/{id}/ack") => component("Alert"),
        ("get", "/.well-known/jwks.json") => object(
            &["keys"],
            &[(
                "keys",
                array(every_field(&[
                    ("kty", json!({ "const": "OKP" })),
                    ("crv", json!({ "const": "Ed25519" })),
                    ("alg", json!({ "const": "EdDSA" })),
                    ("use", json!({ "const": "sig" })),
                    ("kid", string()),
                    ("x", string()),
                ])),
            )],
        ),
        ("post", "/v1/agents/register") => registration::RegisterResponse::json_schema(),
        ("post", "/v1/enrollments") => every_field(&[
            ("instance_id", fleet_core::schema::id()),
            ("enrollment_token", string()),
            ("expires_at", integer()),
        ]),
        ("get", "/v1/agents/connected") => every_field(&[("connected", count())]),
        ("post", "/v1/agents/poll") => every_field(&[
            ("acked", array(fleet_core::schema::id())),
            (
                "refused",
                array(every_field(&[("id", string()), ("message", string())])),
            ),
            ("commands", array(command::CommandEnvelope::json_schema())),
            ("cancel", array(fleet_core::schema::id())),
        ]),
        ("post", "/v1/commands/logs") => every_field(&[("ok", json!({ "const": true }))]),
        ("post", "/v1/commands/submit") => every_field(&[
            ("id", string()),
            (
                "targets",
                json!({ "type": "array", "minItems": 1, "items": every_field(&[
                    ("target_id", string()),
                    ("instance_id", fleet_core::schema::id()),
                ]) }),
            ),
        ]),
        ("get", "/v1/commands") => items_of("CommandSummary"),
        ("get", "/v1/commands/{id}") => component("Command"),
        ("post", "/v1/commands/{id}/cancel") => {
            every_field(&[("id", string()), ("cancelled", count())])
        }
        _ => return crate::rollout_docs::success_schema(method, path),
    };
    Some(schema)
}

/// The schemas [`success_schema`] refers to, by name.
fn answer_schemas() -> Vec<(&'static str, Value)> {
    use fleet_core::command::CommandType;
    use fleet_core::schema::one_of;
    let summary_fields = [
        ("id", integer()),
        ("instance_id", string()),
        ("domain", maybe_string()),
        ("client", maybe_string()),
        ("version", maybe_string()),
        ("release_channel", maybe_string()),
        ("health", maybe_string()),
        (
            "scheme",
            nullable(json!({ "type": "string", "enum": ["v0", "v1"] })),
        ),
        ("enrolled_at", maybe_integer()),
        ("first_seen_at", maybe_integer()),
        ("last_seen_at", maybe_integer()),
        ("open_alerts", count()),
        ("offline", boolean()),
        ("archived_at", maybe_integer()),
    ];
    let mut detail_fields = summary_fields.to_vec();
    detail_fields.extend([
        ("state", json!({ "type": ["object", "null"] })),
        ("alerts", array_of("Alert")),
        (
            "job_failures",
            array(every_field(&[
                ("id", integer()),
                ("queue", maybe_string()),
                ("message", string()),
                ("created_at", integer()),
            ])),
        ),
        (
            "backups",
            array(every_field(&[
                ("id", integer()),
                ("backup_id", maybe_string()),
                ("checksum", string()),
                ("size_bytes", maybe_integer()),
                ("bucket", maybe_string()),
                ("path", maybe_string()),
                ("status", maybe_string()),
                ("backup_at", maybe_string()),
                ("recorded_at", integer()),
            ])),
        ),
        (
            "recent",
            array(every_field(&[
                ("received_at", integer()),
                ("collected_at", integer()),
                (
                    "figures",
                    json!({ "type": "object", "additionalProperties": { "type": "number" } }),
                ),
            ])),
        ),
        (
            "restores",
            json!({
                "type": "array",
                "maxItems": crate::restores::RECENT_RESTORES,
                "items": component("RestoreSummary"),
            }),
        ),
    ]);
    let mut schemas = vec![
        ("InstallationSummary", every_field(&summary_fields)),
        ("Installation", every_field(&detail_fields)),
        (
            "Alert",
            every_field(&[
                ("id", integer()),
                ("installation_id", integer()),
                ("instance_id", string()),
                ("level", string()),
                ("kind", string()),
                ("message", string()),
                ("created_at", integer()),
                ("resolved_at", maybe_integer()),
                ("acknowledged_at", maybe_integer()),
                ("acknowledged_by", maybe_string()),
                ("delivery", nullable(alert_delivery_schema())),
            ]),
        ),
        ("Command", command_schema()),
        (
            "CommandSummary",
            every_field(&[
                ("id", string()),
                ("command_type", one_of(&CommandType::ALL)),
                ("status", command_status()),
                ("created_by", command_submitter()),
                ("created_at", integer()),
                ("finished_at", maybe_integer()),
                ("total", count()),
                ("completed", count()),
                ("failed", count()),
                ("sent", count()),
                ("running", count()),
                ("queued", count()),
                ("first_instance", maybe_string()),
            ]),
        ),
    ];
    schemas.extend(crate::rollout_docs::answer_schemas());
    schemas
}

/// An alert's webhook delivery ([`crate::store::AlertDelivery`]).
fn alert_delivery_schema() -> Value {
    use crate::store::DeliveryState;
    every_field(&[
        ("state", fleet_core::schema::one_of(&DeliveryState::ALL)),
        ("attempts", count()),
        ("next_attempt_at", maybe_integer()),
        ("delivered_at", maybe_integer()),
        ("given_up_at", maybe_integer()),
        ("last_error", maybe_string()),
    ])
}

/// `GET /v1/commands/{id}`: the command (its payload with the secrets hidden from
/// `support`) and every target with its structured result `data` as JSON.
fn command_schema() -> Value {
    use fleet_core::command::{CommandType, TargetStatus};
    use fleet_core::schema::one_of;
    let target = every_field(&[
        ("target_id", string()),
        ("instance_id", fleet_core::schema::id()),
        (
            "status",
            one_of(&[
                TargetStatus::Queued,
                TargetStatus::Sent,
                TargetStatus::Running,
                TargetStatus::Completed,
                TargetStatus::Failed,
                TargetStatus::TimedOut,
                TargetStatus::Skipped,
                TargetStatus::Cancelled,
            ]),
        ),
        ("sent_at", maybe_integer()),
        ("updated_at", integer()),
        ("exit_code", maybe_integer()),
        ("error", maybe_string()),
        ("logs", maybe_string()),
        // Whatever the agent reported, or null.
        ("data", json!({})),
        ("output_bytes", count()),
        ("output_truncated_at_bytes", nullable(count())),
        ("output_deleted_at", maybe_integer()),
    ]);
    every_field(&[
        ("id", string()),
        ("command_type", one_of(&CommandType::ALL)),
        ("payload", json!({ "type": "object" })),
        (
            "max_concurrency",
            nullable(json!({ "type": "integer", "minimum": 1 })),
        ),
        ("max_errors", maybe_string()),
        ("status", command_status()),
        ("created_by", command_submitter()),
        ("created_at", integer()),
        ("finished_at", maybe_integer()),
        ("targets", array(target)),
    ])
}

/// A command's own status.
fn command_status() -> Value {
    json!({ "type": "string", "enum": ["running", "completed", "cancelled", "halted"] })
}

/// The roles that may submit commands.
fn command_submitter() -> Value {
    json!({ "type": "string", "enum": ["ops", "admin"] })
}

/// The error body every JSON error answer carries.
fn error_schema() -> Value {
    json!({
        "type": "object",
        "required": ["error"],
        "properties": { "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": { "type": "string" },
                "message": { "type": "string" },
                "details": { "type": "array", "items": {
                    "type": "object",
                    "required": ["path", "message"],
                    "properties": { "path": { "type": "string" }, "message": { "type": "string" } }
                }}
            }
        }}
    })
}

/// A client that failed too many role-token checks within a minute.
const THROTTLED: &str = "Too many failed role-token checks from this client within a minute; \
    the credentials were not checked, and Retry-After says in how many seconds to try again";

/// The answers every route of a kind can give besides its own: who may call it, whether it
/// reads a body, whether its path names something that may not exist, whether it reads a
/// query string.
fn common_responses(route: &RouteDoc, has_body: bool) -> Vec<(u16, &'static str)> {
    let mut extra = Vec::new();
    match route.access {
        Public => {}
        Signed => extra.push((
            401,
            "Signature missing, wrong, expired or replayed: every request without a valid agent signature",
        )),
        // A dashboard page or form sends a visitor without a valid login to the login page.
        Role(role) if success_media(route.path) == ["text/html"] => {
            extra.push((303, "Not logged in: to /login"));
            if role != "support" {
                extra.push((403, "The login's role is below the one this page needs"));
            }
            extra.push((429, THROTTLED));
        }
        Role(role) => {
            extra.push((401, "No or unknown token"));
            if role != "support" {
                extra.push((403, "The token's role is below the one this route needs"));
            }
            extra.push((429, THROTTLED));
        }
    }
    if has_body {
        extra.push((413, "Body over the limit"));
        extra.push((
            422,
            "Invalid body; details lists every problem with its path",
        ));
    }
    if route.path.contains('{') {
        extra.push((404, "Nothing with that id"));
    }
    let stateless = matches!(
        (route.method, route.path),
        (
            "get",
            "/healthz" | "/metrics" | "/openapi.json" | "/.well-known/jwks.json" | "/login"
        )
    );
    if !stateless {
        extra.push((
            503,
            "The database did not answer in time (unreachable, or a row lock held elsewhere \
             outlasted the lock timeout); retry later",
        ));
    }
    if !crate::query_docs::query_parameters(route.method, route.path).is_empty() {
        extra.push((400, "Bad query: a parameter its schema does not allow"));
    }
    extra
}

fn operation(route: &RouteDoc) -> Value {
    let body = request_body(route.method, route.path);
    let mut statuses: Vec<(u16, &str)> = route.responses.to_vec();
    for (status, description) in common_responses(route, body.is_some()) {
        if !statuses.iter().any(|(s, _)| *s == status) {
            statuses.push((status, description));
        }
    }
    let html_route = success_media(route.path) == ["text/html"];
    let mut responses = serde_json::Map::new();
    for (status, description) in statuses {
        let mut response = json!({ "description": description });
        let media: &[&str] = match status {
            101 | 204 | 303 => &[],
            200..=299 => success_media(route.path),
            // The dashboard answers a refused login, a low role, a refused action and (for a
            // page, not a form) a bad query or an unknown id with a page.
            401 | 403 | 409 | 429 | 503 if html_route => &["text/html"],
            400 | 404 if html_route && route.method == "get" => &["text/html"],
            _ => &["application/json"],
        };
        if !media.is_empty() {
            let mut content = serde_json::Map::new();
            for m in media {
                let entry = if status >= 400 && *m == "application/json" {
                    json!({ "schema": { "$ref": "#/components/schemas/Error" } })
                } else if let (200 | 201, Some(schema)) =
                    (status, success_schema(route.method, route.path))
                {
                    json!({ "schema": schema })
                } else {
                    json!({})
                };
                content.insert((*m).to_owned(), entry);
            }
            response["content"] = Value::Object(content);
        }
        responses.insert(status.to_string(), response);
    }
    let mut op = json!({ "summary": route.summary, "responses": responses });
    if let Some((media, schema)) = body {
        // Scheduling restores takes its defaults from an empty body, and a rejection needs
        // no reason.
        let required = !matches!(
            route.path,
            "/api/restores/schedule" | "/api/plugins/requests/{id}/reject"
        );
        op["requestBody"] =
            json!({ "required": required, "content": { media: { "schema": schema } } });
    }
    match route.access {
        Public => op["security"] = json!([]),
        Signed => op["security"] = json!([{ "agentSignatureV1": [] }, { "agentSignatureV0": [] }]),
        Role(role) => {
            op["security"] = json!([{ "bearer": [] }, { "cookie": [] }]);
            op["x-fleet-role"] = json!(role);
        }
    }
    let mut params: Vec<Value> = route
        .path
        .split('/')
        .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
        .map(|name| json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" } }))
        .collect();
    params.extend(crate::query_docs::query_parameters(
        route.method,
        route.path,
    ));
    if !params.is_empty() {
        op["parameters"] = Value::Array(params);
    }
    op
}

/// Every documented route.
fn all_routes() -> impl Iterator<Item = &'static RouteDoc> {
    ROUTES
        .iter()
        .chain(crate::rollout_docs::ROUTES)
        .chain(crate::commands::ROUTES)
}

/// The OpenAPI document.
pub(crate) fn spec() -> Value {
    let mut paths = serde_json::Map::new();
    for route in all_routes() {
        let entry = paths.entry(route.path).or_insert_with(|| json!({}));
        entry[route.method] = operation(route);
    }
    let mut schemas = serde_json::Map::new();
    schemas.insert("Error".into(), error_schema());
    for (name, schema) in answer_schemas() {
        schemas.insert(name.into(), schema);
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "fleet control plane",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Heartbeat ingest, installations, alerts, roles. Error bodies are {\"error\": {\"code\", \"message\"}}; roles are support < ops < admin (x-fleet-role is the least role a route needs)."
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": { "type": "http", "scheme": "bearer", "description": "A role token (CONTROL_PLANE_{SUPPORT,OPS,ADMIN}_TOKEN). The admin token is also accepted in x-cp-admin-token." },
                "cookie": { "type": "apiKey", "in": "cookie", "name": "cp_token", "description": "A session id set by POST /login (never a role token): refused once it expires (CONTROL_PLANE_SESSION_HOURS), after POST /logout, or when its role's token changed." },
                "agentSignatureV1": { "type": "apiKey", "in": "header", "name": "webhook-signature", "description": "Standard Webhooks: v1,<base64 HMAC-SHA256 of {webhook-id}.{webhook-timestamp}.{body}>" },
                "agentSignatureV0": { "type": "apiKey", "in": "header", "name": "x-agent-signature", "description": "Hex HMAC-SHA256 of the raw body (ERP instance agent)" }
            }
        }
    })
}

pub(crate) async fn document() -> impl IntoResponse {
    Json(spec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_body_route_and_error_is_described() {
        let spec = spec();
        let mut problems = Vec::new();
        for route in all_routes() {
            let op = &spec["paths"][route.path][route.method];
            let responses = op["responses"].as_object().expect("responses");
            let name = format!("{} {}", route.method, route.path);
            // Every signed route reads a body it verifies; an unsigned caller gets 401.
            if route.access == Signed && route.method == "post" {
                if op["requestBody"].is_null() {
                    problems.push(format!("{name}: no request body"));
                }
                if !responses.contains_key("401") {
                    problems.push(format!("{name}: 401 undocumented"));
                }
            }
            let reads_body = !op["requestBody"].is_null();
            let body_errors = responses.contains_key("413") && responses.contains_key("422");
            if reads_body && !body_errors {
                problems.push(format!("{name}: reads a body but 413/422 undocumented"));
            }
            for (status, response) in responses {
                let json_error = &response["content"]["application/json"]["schema"]["$ref"];
                if status.starts_with('4')
                    && !response["content"]["application/json"].is_null()
                    && json_error != "#/components/schemas/Error"
                {
                    problems.push(format!("{name} {status}: not the Error schema"));
                }
            }
        }
        assert!(problems.is_empty(), "{problems:#?}");
    }

    /// Every route whose handler reads a query string, with the names it reads. A parameter
    /// added to a handler goes here and into `query_docs::query_parameters` together.
    const QUERIES: &[(&str, &str, &[&str])] = &[
        ("get", "/api/installations", INSTALLATION_LIST),
        ("get", "/", INSTALLATION_LIST),
        ("get", "/api/alerts", ALERT_LIST),
        ("get", "/alerts", ALERT_LIST),
        ("post", "/alerts/{id}/ack", &["back"]),
        ("get", "/api/releases", &["limit"]),
        ("get", "/api/rollouts", &["limit"]),
        ("get", "/api/plugins/releases", &["limit"]),
        ("get", "/api/plugins/requests", &["limit"]),
        ("get", "/api/restores", &["instance", "limit"]),
        ("get", "/v1/commands", &["limit"]),
        (
            "get",
            "/v1/commands/{id}/logs",
            &["target", "stream", "follow"],
        ),
    ];
    const INSTALLATION_LIST: &[&str] = &["channel", "health", "q", "archived", "limit", "offset"];
    const ALERT_LIST: &[&str] = &[
        "state",
        "open",
        "level",
        "kind",
        "installation",
        "delivery",
        "limit",
        "offset",
    ];

    /// The names `T`'s `Deserialize` reads: the fields it hands `deserialize_struct`.
    fn fields_of<T: serde::de::DeserializeOwned>() -> &'static [&'static str] {
        use serde::de::{Error as _, Visitor, value::Error};
        struct Names<'a>(&'a mut &'static [&'static str]);
        impl<'de> serde::Deserializer<'de> for Names<'_> {
            type Error = Error;
            fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Error> {
                Err(Error::custom("not a struct"))
            }
            fn deserialize_struct<V: Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                _: V,
            ) -> Result<V::Value, Error> {
                *self.0 = fields;
                Err(Error::custom("names read"))
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
                byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
                enum identifier ignored_any
            }
        }
        let mut names: &'static [&'static str] = &[];
        let _ = T::deserialize(Names(&mut names));
        names
    }

    fn sorted<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
        let mut names: Vec<&str> = names.into_iter().collect();
        names.sort_unstable();
        names
    }

    #[test]
    fn every_query_a_handler_reads_is_declared_with_a_schema() {
        let spec = spec();
        let mut problems = Vec::new();
        for route in all_routes() {
            let name = format!("{} {}", route.method, route.path);
            let op = &spec["paths"][route.path][route.method];
            let declared: Vec<&Value> = op["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["in"] == "query")
                .collect();
            let expected = QUERIES
                .iter()
                .find(|(m, p, _)| (*m, *p) == (route.method, route.path))
                .map_or(&[][..], |(_, _, names)| *names);
            let names = sorted(declared.iter().filter_map(|p| p["name"].as_str()));
            if names != sorted(expected.iter().copied()) {
                problems.push(format!("{name}: declares {names:?}, reads {expected:?}"));
            }
            for parameter in declared {
                let at = format!("{name} ?{}", parameter["name"]);
                if parameter["required"] != false {
                    problems.push(format!("{at}: not optional"));
                }
                if parameter["description"].as_str().is_none_or(str::is_empty) {
                    problems.push(format!("{at}: no description"));
                }
                let schema = &parameter["schema"];
                match jsonschema::validator_for(schema) {
                    Err(err) => problems.push(format!("{at}: {err}")),
                    Ok(_) if schema["type"].is_null() => problems.push(format!("{at}: no type")),
                    Ok(v) if !schema["default"].is_null() && !v.is_valid(&schema["default"]) => {
                        problems.push(format!("{at}: its default does not fit its schema"));
                    }
                    Ok(_) => {}
                }
            }
            // A query the handler refuses is an answer the route documents.
            if !expected.is_empty() && op["responses"]["400"].is_null() {
                problems.push(format!("{name}: 400 undocumented"));
            }
        }
        for (method, path, _) in QUERIES {
            if spec["paths"][*path][*method].is_null() {
                problems.push(format!("{method} {path}: no such route"));
            }
        }
        assert!(problems.is_empty(), "{problems:#?}");
    }

    /// The table above against the handlers' own query types, where a test can reach them:
    /// a field added to one of them without its documentation fails here.
    #[test]
    fn the_declared_queries_are_the_fields_the_handlers_read() {
        let table = |path: &str| {
            let (_, _, names) = QUERIES.iter().find(|(_, p, _)| *p == path).expect(path);
            sorted(names.iter().copied())
        };
        for (fields, paths) in [
            (
                fields_of::<crate::api::ListQuery>(),
                &["/api/installations", "/"][..],
            ),
            (
                fields_of::<crate::api::AlertListQuery>(),
                &["/api/alerts", "/alerts"],
            ),
            (
                fields_of::<crate::rollouts::ListQuery>(),
                &[
                    "/api/releases",
                    "/api/rollouts",
                    "/api/plugins/releases",
                    "/api/plugins/requests",
                ],
            ),
            (
                fields_of::<crate::restores::RestoreQuery>(),
                &["/api/restores"],
            ),
            (
                fields_of::<crate::commands::LogQuery>(),
                &["/v1/commands/{id}/logs"],
            ),
        ] {
            assert!(!fields.is_empty(), "{paths:?}: no fields read");
            for path in paths {
                assert_eq!(sorted(fields.iter().copied()), table(path), "{path}");
            }
        }
    }
}
