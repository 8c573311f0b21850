//! Restore verification: operators schedule it for the installations with the freshest
//! heartbeats; agents fetch and report; a failed verification raises an error alert that is
//! forwarded.

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use fleet_core::ValidationErrors;
use fleet_core::plugin::NextJobRequest;
use fleet_core::restore::RestoreReport;
use serde::Deserialize;

use crate::auth::{Ops, Support};
use crate::rollouts::{ListQuery, parse_body};
use crate::update_jobs::signed;
use crate::{Error, Result, Shared};

/// The ERP's defaults.
const DEFAULT_COUNT: i64 = 5;
const DEFAULT_ENVIRONMENT: &str = "staging";
const MAX_COUNT: i64 = 1000;
/// Longest environment name, in bytes.
const MAX_ENVIRONMENT_LEN: usize = 64;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Schedule {
    #[serde(default)]
    count: Option<i64>,
    #[serde(default)]
    environment: Option<String>,
}

/// JSON Schema of [`Schedule`] (for `/openapi.json`); unknown keys are refused.
pub(crate) fn schedule_schema() -> serde_json::Value {
    let mut schema = fleet_core::schema::object(
        &[],
        &[
            (
                "count",
                serde_json::json!({ "type": ["integer", "null"], "minimum": 1, "maximum": MAX_COUNT }),
            ),
            ("environment", {
                let mut environment = fleet_core::schema::nullable(fleet_core::schema::id());
                environment["maxLength"] = MAX_ENVIRONMENT_LEN.into();
                environment
            }),
        ],
    );
    schema["additionalProperties"] = serde_json::json!(false);
    schema
}

/// `POST /api/restores/schedule` (ops): `{count (5), environment ("staging")}`.
pub(crate) async fn schedule(_: Ops, State(state): State<Shared>, body: Bytes) -> Result<Response> {
    let request: Schedule = if body.iter().all(u8::is_ascii_whitespace) {
        Schedule::default()
    } else {
        parse_body(&body, &state.settings.limits)?
    };
    let count = request.count.unwrap_or(DEFAULT_COUNT);
    let environment = request
        .environment
        .unwrap_or_else(|| DEFAULT_ENVIRONMENT.to_owned());
    let mut errors = ValidationErrors::default();
    if !(1..=MAX_COUNT).contains(&count) {
        errors.push("count", format!("must be between 1 and {MAX_COUNT}"));
    }
    fleet_core::validate::check_id(
        &mut errors,
        &fleet_core::validate::Path::Root.field("environment"),
        &environment,
        MAX_ENVIRONMENT_LEN,
    );
    if !errors.is_empty() {
        return Err(Error::Invalid(errors));
    }
    let items = state
        .store
        .schedule_restores(count, &environment, fleet_core::unix_now())
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "items": items })),
    )
        .into_response())
}

/// `GET /api/restores`.
pub(crate) async fn list(
    _: Support,
    State(state): State<Shared>,
    Query(query): Query<ListQuery>,
) -> Result<Response> {
    let items = state.store.list_restores(query.limit()?).await?;
    Ok(Json(serde_json::json!({ "items": items })).into_response())
}

/// `POST /api/restores/next` (agent): `{restore_id, environment, backup_id?}` or 204.
pub(crate) async fn next(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let request = signed::<NextJobRequest>(&state, &headers, body).await?;
    match state
        .store
        .next_restore(&request.instance_id, fleet_core::unix_now())
        .await?
    {
        None => Ok(StatusCode::NO_CONTENT.into_response()),
        Some(restore) => Ok(Json(fleet_core::restore::RestoreJob {
            restore_id: restore.id.to_string(),
            environment: restore.environment,
            backup_id: restore.backup_id,
        })
        .into_response()),
    }
}

/// `POST /api/restores/report` (agent): `verified`, `failed` or `skipped`.
pub(crate) async fn report(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let request = signed::<RestoreReport>(&state, &headers, body).await?;
    let restore = state
        .store
        .report_restore(&request, fleet_core::unix_now(), state.webhook_configured)
        .await?;
    Ok(Json(restore).into_response())
}
