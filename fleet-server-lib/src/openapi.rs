//! `GET /openapi.json`: every route, generated from one table so it cannot fall behind.

use axum::Json;
use axum::response::IntoResponse;
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
        "List installations. Query: channel, health (or offline), q (text in instance id, domain, client), limit (1-500, default 50), offset.",
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
        "One installation: latest state, checks, alerts, job failures, backups, recent heartbeats.",
        &[(200, "The installation"), (404, "Unknown instance")],
    ),
    r(
        "get",
        "/api/alerts",
        Role("support"),
        "Alerts across the fleet, newest first. Query: open (default true), limit.",
        &[(200, "items")],
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
        "Dashboard: installations (HTML).",
        &[(200, "HTML"), (303, "Not logged in: to /login")],
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
        "/alerts/{id}/ack",
        Role("ops"),
        "Dashboard form: acknowledge an alert.",
        &[(303, "Back to the installation"), (404, "Unknown alert")],
    ),
    r(
        "get",
        "/login",
        Public,
        "Login form (HTML).",
        &[(200, "HTML")],
    ),
    r(
        "post",
        "/login",
        Public,
        "Log in with a role token (form field token); sets HttpOnly SameSite cookies.",
        &[(303, "Logged in: to /"), (401, "Wrong token")],
    ),
    r(
        "post",
        "/logout",
        Public,
        "Clear the login cookies.",
        &[(303, "To /login")],
    ),
];

fn operation(route: &RouteDoc) -> Value {
    let mut responses = serde_json::Map::new();
    for (status, description) in route.responses {
        responses.insert(status.to_string(), json!({ "description": description }));
    }
    let mut op = json!({ "summary": route.summary, "responses": responses });
    match route.access {
        Public => op["security"] = json!([]),
        Signed => op["security"] = json!([{ "agentSignatureV1": [] }, { "agentSignatureV0": [] }]),
        Role(role) => {
            op["security"] = json!([{ "bearer": [] }, { "cookie": [] }]);
            op["x-fleet-role"] = json!(role);
        }
    }
    if route.path.contains('{') {
        let params: Vec<Value> = route
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" } }))
            .collect();
        op["parameters"] = Value::Array(params);
    }
    op
}

/// The OpenAPI document.
pub(crate) fn spec() -> Value {
    let mut paths = serde_json::Map::new();
    for route in ROUTES
        .iter()
        .chain(crate::rollout_docs::ROUTES)
        .chain(crate::commands::ROUTES)
    {
        let entry = paths.entry(route.path).or_insert_with(|| json!({}));
        entry[route.method] = operation(route);
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "fleet control plane",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Heartbeat ingest, installations, alerts, roles. Error bodies are {\"error\": {\"code\", \"message\"}}; roles are support < ops < admin (x-fleet-role is the least role a route needs)."
        },
        "paths": paths,
        "components": { "securitySchemes": {
            "bearer": { "type": "http", "scheme": "bearer", "description": "A role token (CONTROL_PLANE_{SUPPORT,OPS,ADMIN}_TOKEN). The admin token is also accepted in x-cp-admin-token." },
            "cookie": { "type": "apiKey", "in": "cookie", "name": "cp_token", "description": "Set by POST /login together with cp_role." },
            "agentSignatureV1": { "type": "apiKey", "in": "header", "name": "webhook-signature", "description": "Standard Webhooks: v1,<base64 HMAC-SHA256 of {webhook-id}.{webhook-timestamp}.{body}>" },
            "agentSignatureV0": { "type": "apiKey", "in": "header", "name": "x-agent-signature", "description": "Hex HMAC-SHA256 of the raw body (ERP instance agent)" }
        }}
    })
}

pub(crate) async fn document() -> impl IntoResponse {
    Json(spec())
}
