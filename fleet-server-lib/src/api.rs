//! The JSON API for operators: installations, alerts, health.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use fleet_core::ValidationErrors;
use fleet_core::validate::Path as FieldPath;
use serde::{Deserialize, Serialize};

use crate::auth::{Admin, Authed, Ops, Support};
use crate::restores::RestoreSummary;
use crate::store::{InstallationDetail, InstallationFilter};
use crate::{Error, Result, Shared};

/// Largest page a client may ask for.
pub(crate) const MAX_PAGE: i64 = 500;
/// Longest filter value (text, channel, health), in bytes: longer than any instance id,
/// domain or client name, and short of what makes SQLite refuse a LIKE pattern.
pub(crate) const MAX_FILTER_LEN: usize = 256;

/// Query parameters of the installation list (API and dashboard).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ListQuery {
    pub channel: Option<String>,
    pub health: Option<String>,
    pub q: Option<String>,
    pub limit: Option<i64>,
    pub offset: Option<i64>,
}

impl ListQuery {
    /// Reads the query string; a malformed one is a 400, never a 500.
    pub fn from_uri(uri: &Uri) -> Result<Self> {
        Query::<Self>::try_from_uri(uri)
            .map(|q| q.0)
            .map_err(|e| Error::BadRequest(e.body_text()))
    }

    pub fn filter(&self, default_limit: i64) -> Result<InstallationFilter> {
        let limit = self.limit.unwrap_or(default_limit);
        let offset = self.offset.unwrap_or(0);
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(Error::BadRequest(format!(
                "limit must be between 1 and {MAX_PAGE}"
            )));
        }
        if offset < 0 {
            return Err(Error::BadRequest("offset must not be negative".into()));
        }
        for (name, value) in [
            ("q", &self.q),
            ("channel", &self.channel),
            ("health", &self.health),
        ] {
            if value.as_ref().is_some_and(|v| v.len() > MAX_FILTER_LEN) {
                return Err(Error::BadRequest(format!(
                    "{name} must be at most {MAX_FILTER_LEN} bytes"
                )));
            }
        }
        let nonempty = |v: &Option<String>| v.clone().filter(|s| !s.trim().is_empty());
        Ok(InstallationFilter {
            channel: nonempty(&self.channel),
            health: nonempty(&self.health),
            text: nonempty(&self.q).map(|s| s.trim().to_owned()),
            limit,
            offset,
        })
    }
}

pub(crate) async fn list_installations(
    _: Support,
    State(state): State<Shared>,
    uri: Uri,
) -> Result<Response> {
    let filter = ListQuery::from_uri(&uri)?.filter(50)?;
    let page = state.store.list_installations(&filter).await?;
    Ok(Json(serde_json::json!({
        "items": page.items, "total": page.total, "limit": filter.limit, "offset": filter.offset
    }))
    .into_response())
}

/// `GET /api/installations/{instance_id}`: the installation with its recent restore
/// verifications.
#[derive(Serialize)]
struct InstallationAnswer {
    #[serde(flatten)]
    detail: InstallationDetail,
    /// The newest restore verifications, newest first.
    restores: Vec<RestoreSummary>,
}

pub(crate) async fn installation(
    _: Support,
    State(state): State<Shared>,
    Path(instance_id): Path<String>,
) -> Result<Response> {
    let Some(detail) = state.store.installation(&instance_id).await? else {
        return Err(Error::NotFound);
    };
    let restores = crate::restores::recent(&state, &detail.summary.instance_id).await?;
    Ok(Json(InstallationAnswer { detail, restores }).into_response())
}

#[derive(Deserialize)]
struct EnrollBody {
    instance_id: String,
}

/// JSON Schema of [`EnrollBody`] (for `/openapi.json`).
pub(crate) fn enroll_schema() -> serde_json::Value {
    fleet_core::schema::object(
        &["instance_id"],
        &[("instance_id", fleet_core::schema::id())],
    )
}

/// `POST /api/installations {"instance_id"}`: registers an instance before its first
/// heartbeat (needed when enrollment is required).
pub(crate) async fn enroll(_: Admin, State(state): State<Shared>, body: Bytes) -> Result<Response> {
    let parsed: EnrollBody = crate::rollouts::parse_body(&body, &state.settings.limits)?;
    // The same rule as a heartbeat's `instance_id`, so an enrolled id can send heartbeats.
    let id = parsed.instance_id.as_str();
    let mut errors = ValidationErrors::default();
    let root = FieldPath::Root;
    fleet_core::validate::check_id(
        &mut errors,
        &root.field("instance_id"),
        id,
        state.settings.limits.max_id_len,
    );
    if !errors.is_empty() {
        return Err(Error::Invalid(errors));
    }
    let row = state.store.enroll(id, fleet_core::unix_now()).await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "id": row, "instance_id": id })),
    )
        .into_response())
}

#[derive(Deserialize)]
struct AlertQuery {
    open: Option<bool>,
    limit: Option<i64>,
}

pub(crate) async fn list_alerts(
    _: Support,
    State(state): State<Shared>,
    uri: Uri,
) -> Result<Response> {
    let query = Query::<AlertQuery>::try_from_uri(&uri)
        .map_err(|e| Error::BadRequest(e.body_text()))?
        .0;
    let limit = query.limit.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(Error::BadRequest(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    let alerts = state
        .store
        .list_alerts(query.open.unwrap_or(true), limit)
        .await?;
    Ok(Json(serde_json::json!({ "items": alerts })).into_response())
}

/// Parses an alert id from the path; anything else is a 404, as for an unknown id.
pub(crate) fn alert_id(text: &str) -> Result<i64> {
    text.parse::<i64>().map_err(|_| Error::NotFound)
}

pub(crate) async fn acknowledge(
    Authed(role): Ops,
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response> {
    let id = alert_id(&id)?;
    match state
        .store
        .acknowledge_alert(id, role.as_str(), fleet_core::unix_now())
        .await?
    {
        Some(alert) => Ok(Json(alert).into_response()),
        None => Err(Error::NotFound),
    }
}

/// Longest `/healthz` waits for the database. A probe must get an answer (503) while the
/// database is down, not hang until the pool gives up on connecting (seconds later) and the
/// prober's own timeout fires first.
const HEALTH_PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

pub(crate) async fn healthz(State(state): State<Shared>) -> Response {
    let ping = tokio::time::timeout(HEALTH_PING_TIMEOUT, state.store.ping()).await;
    match ping.unwrap_or(Err(Error::Unavailable)) {
        Ok(()) => Json(serde_json::json!({ "status": "ok" })).into_response(),
        Err(err) => {
            tracing::warn!(error = %err, "health check: database unreachable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({ "status": "unavailable" })),
            )
                .into_response()
        }
    }
}

/// The answer for a path no route has: the JSON error for API clients, a page for a
/// browser (one that asks for HTML), which would otherwise show a raw JSON body.
pub(crate) async fn not_found(headers: axum::http::HeaderMap) -> Response {
    let wants_html = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"));
    if wants_html {
        crate::dashboard::not_found_page()
    } else {
        Error::NotFound.into_response()
    }
}
