//! The JSON API for operators: installations, alerts, health.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use fleet_core::ValidationErrors;
use fleet_core::heartbeat::AlertLevel;
use fleet_core::validate::Path as FieldPath;
use serde::{Deserialize, Serialize};

use crate::auth::{Admin, Authed, Ops, Support};
use crate::restores::RestoreSummary;
use crate::store::{
    Alert, AlertFilter, AlertState, ArchivedFilter, DeliveryFilter, InstallationDetail,
    InstallationFilter, InstallationSummary,
};
use crate::{AppState, Error, Result, Shared};

/// Largest page a client may ask for.
pub(crate) const MAX_PAGE: i64 = 500;
/// The installation list's page size when the query names none.
pub(crate) const INSTALLATION_PAGE: i64 = 50;
/// Longest filter value (text, channel, health), in bytes: longer than any instance id,
/// domain or client name, and short of what makes SQLite refuse a LIKE pattern.
pub(crate) const MAX_FILTER_LEN: usize = 256;

/// Query parameters of the installation list (API and dashboard).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ListQuery {
    pub channel: Option<String>,
    pub health: Option<String>,
    pub q: Option<String>,
    /// `false` (the default: archived installations hidden), `true` (only them) or `all`.
    pub archived: Option<String>,
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
        let (limit, offset) = page_bounds(self.limit, self.offset, default_limit)?;
        for (name, value) in [
            ("q", &self.q),
            ("channel", &self.channel),
            ("health", &self.health),
            ("archived", &self.archived),
        ] {
            check_filter_len(name, value)?;
        }
        let nonempty = |v: &Option<String>| v.clone().filter(|s| !s.trim().is_empty());
        // Only the named values, as the alert list's fixed sets; empty is the default.
        let archived = match self.archived.as_deref().filter(|s| !s.is_empty()) {
            Some(text) => one_of("archived", text, &ArchivedFilter::ALL, |a| a.as_str())?,
            None => ArchivedFilter::default(),
        };
        Ok(InstallationFilter {
            channel: nonempty(&self.channel),
            health: nonempty(&self.health),
            text: nonempty(&self.q).map(|s| s.trim().to_owned()),
            archived,
            limit,
            offset,
        })
    }
}

/// The page size and offset a list query asks for (`default_limit` when it names none),
/// refused unless the size is 1 to [`MAX_PAGE`] and the offset not negative.
fn page_bounds(limit: Option<i64>, offset: Option<i64>, default_limit: i64) -> Result<(i64, i64)> {
    let limit = limit.unwrap_or(default_limit);
    let offset = offset.unwrap_or(0);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(Error::BadRequest(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    if offset < 0 {
        return Err(Error::BadRequest("offset must not be negative".into()));
    }
    Ok((limit, offset))
}

/// Refuses a filter value longer than [`MAX_FILTER_LEN`].
fn check_filter_len(name: &str, value: &Option<String>) -> Result<()> {
    if value.as_ref().is_some_and(|v| v.len() > MAX_FILTER_LEN) {
        return Err(Error::BadRequest(format!(
            "{name} must be at most {MAX_FILTER_LEN} bytes"
        )));
    }
    Ok(())
}

/// Query parameters of the fleet's alert list (`GET /api/alerts` and the `/alerts` page).
/// An empty value is the same as none, as a dashboard form sends its empty fields.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct AlertListQuery {
    pub state: Option<String>,
    /// What the list took before `state`: `true` is `state=open`, `false` is `state=all`.
    pub open: Option<bool>,
    pub level: Option<String>,
    pub kind: Option<String>,
    pub installation: Option<String>,
    pub delivery: Option<String>,
    pub limit: Option<i64>,
    pub offset: Option<i64>,
}

/// Longest alert kind a filter takes, in bytes.
pub(crate) const MAX_KIND_LEN: usize = 64;

impl AlertListQuery {
    /// Reads the query string; a malformed one is a 400, never a 500.
    pub fn from_uri(uri: &Uri) -> Result<Self> {
        Query::<Self>::try_from_uri(uri)
            .map(|q| q.0)
            .map_err(|e| Error::BadRequest(e.body_text()))
    }

    /// The store's filter. `forwarding` says whether alerts are forwarded to a webhook:
    /// without one, no alert has a delivery to filter by.
    pub fn filter(&self, default_limit: i64, forwarding: bool) -> Result<AlertFilter> {
        let (limit, offset) = page_bounds(self.limit, self.offset, default_limit)?;
        for (name, value) in [
            ("state", &self.state),
            ("level", &self.level),
            ("kind", &self.kind),
            ("installation", &self.installation),
            ("delivery", &self.delivery),
        ] {
            check_filter_len(name, value)?;
        }
        // Only the named values: " open" is refused rather than read as the default.
        let given = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());
        let state = match (given(&self.state), self.open) {
            (Some(_), Some(_)) => {
                return Err(Error::BadRequest(
                    "give state or open, not both (open is the older name)".into(),
                ));
            }
            (Some(text), None) => one_of("state", &text, &AlertState::ALL, |s| s.as_str())?,
            (None, Some(false)) => AlertState::All,
            (None, Some(true) | None) => AlertState::Open,
        };
        let level = given(&self.level)
            .map(|text| one_of("level", &text, &ALERT_LEVELS, |l| l.as_str()))
            .transpose()?
            .map(|level| level.as_str().to_owned());
        let kind = given(&self.kind);
        if let Some(kind) = &kind
            && (kind.len() > MAX_KIND_LEN
                || !kind
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'))
        {
            return Err(Error::BadRequest(format!(
                "kind must be at most {MAX_KIND_LEN} lowercase letters, digits and underscores, \
                 such as offline or slo_p95_ms"
            )));
        }
        let delivery = given(&self.delivery)
            .map(|text| one_of("delivery", &text, &DeliveryFilter::ALL, |d| d.as_str()))
            .transpose()?;
        if delivery.is_some() && !forwarding {
            return Err(Error::BadRequest(
                "no alert webhook is configured (CONTROL_PLANE_ALERT_WEBHOOK_URL), so no alert \
                 has a delivery to filter by"
                    .into(),
            ));
        }
        let instance_id = self
            .installation
            .as_deref()
            .map(str::trim)
            .filter(|id| !id.is_empty());
        if instance_id.is_some_and(|id| id.chars().any(|c| c.is_control() || c.is_whitespace())) {
            return Err(Error::BadRequest(
                "installation must be an instance id: no whitespace or control characters".into(),
            ));
        }
        Ok(AlertFilter {
            state,
            level,
            kind,
            instance_id: instance_id.map(str::to_owned),
            delivery,
            limit,
            offset,
        })
    }
}

/// The levels an alert list filters by, by their wire names only (`warn`, which a
/// heartbeat may say, is stored as `warning`).
pub(crate) const ALERT_LEVELS: [AlertLevel; 4] = [
    AlertLevel::Info,
    AlertLevel::Warning,
    AlertLevel::Error,
    AlertLevel::Critical,
];

/// The value of `values` whose wire name is `text`, or a 400 that lists them.
fn one_of<T: Copy>(
    name: &str,
    text: &str,
    values: &[T],
    wire: impl Fn(T) -> &'static str,
) -> Result<T> {
    values
        .iter()
        .copied()
        .find(|v| wire(*v) == text)
        .ok_or_else(|| {
            let names: Vec<&str> = values.iter().map(|v| wire(*v)).collect();
            Error::BadRequest(format!("{name} must be one of {}", names.join(", ")))
        })
}

/// Hides the deliveries of `alerts` unless alerts are forwarded: an outbox row left from an
/// earlier configuration would show a delivery nothing attempts any more.
pub(crate) fn deliveries_if_forwarding(state: &AppState, alerts: &mut [Alert]) {
    if !state.webhook_configured {
        for alert in alerts {
            alert.delivery = None;
        }
    }
}

pub(crate) async fn list_installations(
    _: Support,
    State(state): State<Shared>,
    uri: Uri,
) -> Result<Response> {
    let filter = ListQuery::from_uri(&uri)?.filter(INSTALLATION_PAGE)?;
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
    let Some(mut detail) = state.store.installation(&instance_id).await? else {
        return Err(Error::NotFound);
    };
    let restores = crate::restores::recent(&state, &detail.summary.instance_id).await?;
    deliveries_if_forwarding(&state, &mut detail.alerts);
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

/// `POST /api/installations/{instance_id}/archive` (admin): archives the installation of a
/// customer who left; its summary, 404 for an unknown instance, 409 when it is archived
/// already. Reads no body.
pub(crate) async fn archive(
    _: Admin,
    State(state): State<Shared>,
    Path(instance_id): Path<String>,
) -> Result<Response> {
    let summary = archive_by_id(&state, &instance_id).await?;
    Ok(Json(summary).into_response())
}

/// Archives the installation of `instance_id`
/// ([`Store::archive_installation`](crate::Store::archive_installation)); shared by the API
/// and the dashboard's form.
pub(crate) async fn archive_by_id(
    state: &Shared,
    instance_id: &str,
) -> Result<InstallationSummary> {
    let summary = state
        .store
        .archive_installation(instance_id, fleet_core::unix_now())
        .await?
        .ok_or(Error::NotFound)?;
    tracing::info!(instance_id, "installation archived");
    Ok(summary)
}

/// Alerts listed when the query names no limit.
pub(crate) const ALERT_PAGE: i64 = 100;

/// `GET /api/alerts`: one page of the fleet's alerts, newest first.
pub(crate) async fn list_alerts(
    _: Support,
    State(state): State<Shared>,
    uri: Uri,
) -> Result<Response> {
    let filter = AlertListQuery::from_uri(&uri)?.filter(ALERT_PAGE, state.webhook_configured)?;
    let mut page = state.store.alert_page(&filter).await?;
    deliveries_if_forwarding(&state, &mut page.items);
    Ok(Json(serde_json::json!({
        "items": page.items, "total": page.total, "limit": filter.limit, "offset": filter.offset
    }))
    .into_response())
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
        Some(mut alert) => {
            deliveries_if_forwarding(&state, std::slice::from_mut(&mut alert));
            Ok(Json(alert).into_response())
        }
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
