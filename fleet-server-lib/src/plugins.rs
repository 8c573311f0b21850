//! The plugin marketplace as the ERP has it: plugin releases (with the control-plane
//! versions they work with), signed requests from instances, approval (with the
//! compatibility check) creating a job, plugin rollouts carrying their action through every
//! batch, and the agent's `next` / `report`.

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use fleet_core::ValidationErrors;
use fleet_core::plugin::{
    MAX_PLUGIN_NAME_LEN, MAX_PLUGIN_VERSION_LEN, NextJobRequest, PluginAction, PluginReport,
    PluginRequest, PluginSpec, is_valid_plugin_name, is_valid_plugin_version,
};
use serde::Deserialize;

use crate::auth::{Admin, Support};
use crate::rollouts::{ListQuery, parse_body, path_id};
use crate::store::rollouts::{JobKind, JobReport, RecordedPluginRequest};
use crate::update_jobs::signed;
use crate::{Error, Result, Shared};

/// The control plane's own version, checked against a plugin release's `compatible` list.
pub const CONTROL_PLANE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Most entries in a plugin release's `compatible` list.
const MAX_COMPATIBLE: usize = 50;
/// Longest reason an admin may give for rejecting a plugin request, in characters (as the
/// schema's `maxLength` counts them).
pub(crate) const MAX_REJECTION_REASON_CHARS: usize = 500;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewPluginRelease {
    name: String,
    version: String,
    #[serde(default = "any_version")]
    compatible: Vec<String>,
    #[serde(default)]
    notes: Option<String>,
}

/// JSON Schema of [`NewPluginRelease`] (for `/openapi.json`); unknown keys are refused.
pub(crate) fn new_release_schema() -> serde_json::Value {
    use fleet_core::plugin::{plugin_name_schema, plugin_version_schema};
    let exact = serde_json::json!({
        "type": "string",
        "maxLength": MAX_PLUGIN_VERSION_LEN,
        "pattern": format!("^{COMPATIBLE_VERSION}$"),
    });
    let prefix = serde_json::json!({
        "type": "string",
        "maxLength": MAX_PLUGIN_VERSION_LEN + 2,
        "pattern": format!(r"^{COMPATIBLE_VERSION}\.\*$"),
    });
    let mut schema = fleet_core::schema::object(
        &["name", "version"],
        &[
            ("name", plugin_name_schema()),
            ("version", plugin_version_schema()),
            (
                "compatible",
                serde_json::json!({
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_COMPATIBLE,
                    "items": { "anyOf": [{ "const": "*" }, exact, prefix] },
                }),
            ),
            (
                "notes",
                fleet_core::schema::nullable(fleet_core::schema::plain_text(
                    fleet_core::Limits::default().max_message_len,
                )),
            ),
        ],
    );
    schema["additionalProperties"] = serde_json::json!(false);
    schema
}

fn any_version() -> Vec<String> {
    vec!["*".into()]
}

/// A version of [`is_valid_compatible`] as a JSON Schema pattern (without anchors).
const COMPATIBLE_VERSION: &str = r"[0-9A-Za-z][0-9A-Za-z+-]*(\.[0-9A-Za-z+-]+)*";

/// Whether `pattern` is an entry of `compatible` that
/// [`is_compatible`](crate::store::rollouts::is_compatible) reads as meant: `*`, a version
/// (`0.1.0`) or a version followed by `.*` (`0.1.*`). An empty part is refused: `` or `1..`
/// would match no version, so the release could never be approved, and `0.1*` would also
/// match 0.10.
fn is_valid_compatible(pattern: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let version = pattern.strip_suffix(".*").unwrap_or(pattern);
    is_valid_plugin_version(version) && version.split('.').all(|part| !part.is_empty())
}

/// `POST /api/plugins/releases` (admin).
pub(crate) async fn create_release(
    _: Admin,
    State(state): State<Shared>,
    body: Bytes,
) -> Result<Response> {
    let new: NewPluginRelease = parse_body(&body, &state.settings.limits)?;
    let mut errors = ValidationErrors::default();
    // The length is named on its own: a long name of valid characters is otherwise told
    // it is not a plugin name.
    if new.name.len() > MAX_PLUGIN_NAME_LEN {
        errors.push("name", format!("longer than {MAX_PLUGIN_NAME_LEN} bytes"));
    } else if !is_valid_plugin_name(&new.name) {
        errors.push(
            "name",
            "must be a plugin name such as billing-export or @acme/report",
        );
    }
    if new.version.len() > MAX_PLUGIN_VERSION_LEN {
        errors.push(
            "version",
            format!("longer than {MAX_PLUGIN_VERSION_LEN} bytes"),
        );
    } else if !is_valid_plugin_version(&new.version) {
        errors.push("version", "must be a version such as 1.2.3");
    }
    if new.compatible.is_empty() || new.compatible.len() > MAX_COMPATIBLE {
        errors.push(
            "compatible",
            format!("must list 1 to {MAX_COMPATIBLE} versions"),
        );
    }
    for (i, pattern) in new.compatible.iter().enumerate() {
        if !is_valid_compatible(pattern) {
            errors.push(
                format!("compatible[{i}]"),
                "must be `*`, a version such as 0.1.0, or a version and `.*` such as 0.1.*",
            );
        }
    }
    if let Some(notes) = &new.notes {
        fleet_core::validate::check_text(
            &mut errors,
            &fleet_core::validate::Path::Root.field("notes"),
            notes,
            state.settings.limits.max_message_len,
        );
    }
    if !errors.is_empty() {
        return Err(Error::Invalid(errors));
    }
    let release = state
        .store
        .create_plugin_release(
            &new.name,
            &new.version,
            &new.compatible,
            new.notes.as_deref(),
            fleet_core::unix_now(),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(release)).into_response())
}

/// `GET /api/plugins/releases`.
pub(crate) async fn list_releases(
    _: Support,
    State(state): State<Shared>,
    Query(query): Query<ListQuery>,
) -> Result<Response> {
    let items = state.store.list_plugin_releases(query.limit()?).await?;
    Ok(Json(serde_json::json!({ "items": items })).into_response())
}

/// `POST /api/plugins/requests`, signed by the instance: 201 with the new request, or 200
/// with the pending one when the instance asks again for the same plugin, version and
/// action, so the admin's list holds each request once.
pub(crate) async fn create_request(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let request = signed::<PluginRequest>(&state, &headers, body).await?;
    let recorded = state
        .store
        .create_plugin_request(&request, fleet_core::unix_now())
        .await?;
    Ok(match recorded {
        RecordedPluginRequest::Created(record) => (StatusCode::CREATED, Json(record)),
        RecordedPluginRequest::AlreadyPending(record) => (StatusCode::OK, Json(record)),
    }
    .into_response())
}

/// `GET /api/plugins/requests`.
pub(crate) async fn list_requests(
    _: Support,
    State(state): State<Shared>,
    Query(query): Query<ListQuery>,
) -> Result<Response> {
    let items = state.store.list_plugin_requests(query.limit()?).await?;
    Ok(Json(serde_json::json!({ "items": items })).into_response())
}

/// `POST /api/plugins/requests/:id/approve` (admin): 409 without an approved, compatible
/// release of that name and version.
pub(crate) async fn approve(
    _: Admin,
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response> {
    Ok(Json(approve_by_id(&state, &id).await?).into_response())
}

/// Approves the request `id` (as the path gives it) and creates its job: the API route and
/// the dashboard's Approve form.
pub(crate) async fn approve_by_id(
    state: &Shared,
    id: &str,
) -> Result<crate::store::rollouts::PluginRequestRecord> {
    state
        .store
        .approve_plugin_request(path_id(id)?, CONTROL_PLANE_VERSION, fleet_core::unix_now())
        .await
}

/// Body of `POST /api/plugins/requests/{id}/reject`; it may be empty.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rejection {
    #[serde(default)]
    reason: Option<String>,
}

/// JSON Schema of [`Rejection`] (for `/openapi.json`); unknown keys are refused.
pub(crate) fn rejection_schema() -> serde_json::Value {
    let mut schema = fleet_core::schema::object(
        &[],
        &[(
            "reason",
            fleet_core::schema::nullable(fleet_core::schema::plain_text(
                MAX_REJECTION_REASON_CHARS,
            )),
        )],
    );
    schema["additionalProperties"] = serde_json::json!(false);
    schema
}

/// JSON Schema of the dashboard's Reject form (`POST /plugins/requests/{id}/reject`): the
/// reason as in [`rejection_schema`], but never null, which a form cannot say.
pub(crate) fn rejection_form_schema() -> serde_json::Value {
    let mut schema = fleet_core::schema::object(
        &[],
        &[(
            "reason",
            fleet_core::schema::plain_text(MAX_REJECTION_REASON_CHARS),
        )],
    );
    schema["additionalProperties"] = serde_json::json!(false);
    schema
}

/// A rejection's reason as the API and the dashboard's Reject form take it: at most
/// [`MAX_REJECTION_REASON_CHARS`] characters of plain text (422 otherwise), trimmed; a blank
/// one says nothing and is stored as none.
pub(crate) fn rejection_reason(reason: Option<&str>) -> Result<Option<&str>> {
    if let Some(reason) = reason {
        let mut errors = ValidationErrors::default();
        let at = fleet_core::validate::Path::Root.field("reason");
        if reason.chars().count() > MAX_REJECTION_REASON_CHARS {
            errors.push(
                at.to_string(),
                format!("longer than {MAX_REJECTION_REASON_CHARS} characters"),
            );
        } else {
            // The length was checked in characters above; this checks which characters.
            fleet_core::validate::check_text(&mut errors, &at, reason, usize::MAX);
        }
        if !errors.is_empty() {
            return Err(Error::Invalid(errors));
        }
    }
    Ok(reason.map(str::trim).filter(|r| !r.is_empty()))
}

/// `POST /api/plugins/requests/:id/reject` (admin): `{reason}` (optional) is kept and shown
/// with the request; 409 when it was already approved or rejected.
pub(crate) async fn reject(
    _: Admin,
    State(state): State<Shared>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response> {
    let id = path_id(&id)?;
    let rejection: Rejection = if body.iter().all(u8::is_ascii_whitespace) {
        Rejection::default()
    } else {
        parse_body(&body, &state.settings.limits)?
    };
    let reason = rejection_reason(rejection.reason.as_deref())?;
    let record = state
        .store
        .reject_plugin_request(id, reason, fleet_core::unix_now())
        .await?;
    Ok(Json(record).into_response())
}

/// Keys of a rollout body that name an update release; a plugin rollout names its release
/// with `plugin_release_id`.
const UPDATE_RELEASE_KEYS: [&str; 3] = ["release_id", "manifestId", "version"];
/// Keys of a rollout body for the canary steps of BLUE_GREEN_CANARY updates.
const CANARY_KEYS: [&str; 4] = [
    "canary_steps",
    "canarySteps",
    "canary_step_wait_sec",
    "canaryStepWaitSec",
];

/// `POST /api/plugins/rollouts` (admin): a rollout whose every job carries the action.
///
/// The body is the update rollouts' one, so the settings only an update uses are refused
/// here: the store would keep them and the plugin pipeline ignore them, and an operator who
/// gave `version` would get the release's version installed without a word.
pub(crate) async fn create_rollout(
    _: Admin,
    State(state): State<Shared>,
    body: Bytes,
) -> Result<Response> {
    let fields: serde_json::Map<String, serde_json::Value> =
        parse_body(&body, &state.settings.limits)?;
    let given = |key: &str| fields.get(key).is_some_and(|v| !v.is_null());
    let mut errors = ValidationErrors::default();
    for key in UPDATE_RELEASE_KEYS.into_iter().filter(|k| given(k)) {
        errors.push(
            key,
            "names an update release: a plugin rollout names its plugin release with plugin_release_id",
        );
    }
    if given("strategy") && fields["strategy"] != "BATCH" {
        errors.push(
            "strategy",
            "must be BATCH: the plugin pipeline has no canary steps",
        );
    }
    for key in CANARY_KEYS.into_iter().filter(|k| given(k)) {
        errors.push(key, "the plugin pipeline has no canary steps");
    }
    if given("action") && serde_json::from_value::<PluginAction>(fields["action"].clone()).is_err()
    {
        errors.push("action", "must be install, update or remove");
    }
    if !errors.is_empty() {
        return Err(Error::Invalid(errors));
    }
    crate::rollouts::create_kind(&state, JobKind::Plugin, &body).await
}

/// `POST /api/plugins/next`: `{job_id, plugin{name, version, action}}` or 204.
pub(crate) async fn next(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let request = signed::<NextJobRequest>(&state, &headers, body).await?;
    let handed = state
        .store
        .next_job(
            &request.instance_id,
            JobKind::Plugin,
            fleet_core::unix_now(),
        )
        .await?;
    let Some(handed) = handed else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let plugin: PluginSpec = handed
        .job
        .payload
        .as_deref()
        .and_then(|p| serde_json::from_str(p).ok())
        .ok_or_else(|| Error::Internal("plugin job without its plugin".into()))?;
    let job = fleet_core::plugin::PluginJob {
        job_id: handed.job.id.to_string(),
        plugin,
        rollout: handed.settings,
    };
    Ok(Json(job).into_response())
}

/// `POST /api/plugins/report`: the documented statuses and steps, the instance's own job.
pub(crate) async fn report(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let r = signed::<PluginReport>(&state, &headers, body).await?;
    let step = r
        .step
        .and_then(|s| serde_json::to_value(s).ok())
        .and_then(|v| v.as_str().map(str::to_owned));
    let report = JobReport {
        job_id: r.job_id,
        status: r.status,
        step,
        error: r.error,
        canary_percent: None,
        metrics: None,
        duration_ms: r.duration_ms,
        output_tail: r.output_tail,
    };
    let job = state
        .store
        .report_job(
            &r.instance_id,
            JobKind::Plugin,
            &report,
            fleet_core::unix_now(),
            state.webhook_configured,
        )
        .await?;
    Ok(Json(serde_json::json!({ "ok": true, "status": job.status })).into_response())
}
