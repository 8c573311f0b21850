//! The agent side of updates: `POST /api/updates/next` and `POST /api/updates/report`, both
//! signed by the agent (v1 or v0, as heartbeats). The signature is checked over the raw body
//! before it is parsed, a v1 message id seen before with the same timestamp is refused as a
//! replay, and a report is accepted only for the instance's own job.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use fleet_core::plugin::{NextJobRequest, PluginReport, PluginRequest};
use fleet_core::restore::{RestoreReport, RestoreStatusRequest};
use fleet_core::update::{UpdateNextRequest, UpdateReport};
use fleet_core::validate::{Validate, decode};
use fleet_core::{DecodeError, SignatureHeaders};
use serde::de::DeserializeOwned;

use crate::store::rollouts::{JobKind, JobReport};
use crate::{Error, Result, Shared};

/// The body of a signed agent request: it names the instance it speaks for, which must be
/// the one whose secret signed it.
pub(crate) trait AgentRequest: DeserializeOwned + Validate {
    /// The instance the body speaks for.
    fn instance_id(&self) -> &str;
}

macro_rules! agent_requests {
    ($($body:ty),* $(,)?) => {$(
        impl AgentRequest for $body {
            fn instance_id(&self) -> &str {
                &self.instance_id
            }
        }
    )*};
}

agent_requests!(
    UpdateNextRequest,
    UpdateReport,
    NextJobRequest,
    PluginRequest,
    PluginReport,
    RestoreReport,
    RestoreStatusRequest,
);

/// Reads the body up to the limit, verifies the agent's signature over the raw bytes, then
/// decodes and validates it (422 with field paths). Any signature problem is a plain 401, and
/// so is a body that speaks for another instance than the one whose secret signed it.
pub(crate) async fn signed<T: AgentRequest>(
    state: &Shared,
    headers: &HeaderMap,
    body: Body,
) -> Result<T> {
    let limit = state.settings.limits.max_body_bytes;
    let body = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| Error::TooLarge { limit })?;
    let lookup =
        SignatureHeaders::from_lookup(|name| headers.get(name).and_then(|v| v.to_str().ok()));
    if state.settings.v0_only_for_heartbeats && lookup.scheme() == Some(fleet_core::Scheme::V0) {
        tracing::debug!("agent request refused: v0 is accepted on heartbeats only");
        return Err(Error::Unauthorized);
    }
    let now = fleet_core::unix_now();
    let verified = crate::registration::verify_agent_request(state, &body, &lookup, now)
        .await?
        .map_err(|err| {
            tracing::debug!(reason = err.kind(), "agent request refused");
            Error::Unauthorized
        })?;
    if let (Some(msg_id), Some(signed_at)) = (&verified.msg_id, verified.timestamp) {
        let replay = state
            .store
            .is_replay(&verified.instance_id, msg_id, signed_at, now)
            .await?;
        if replay {
            // Same answer as any other signature failure.
            tracing::debug!("agent request refused: replay");
            return Err(Error::Unauthorized);
        }
    }
    let parsed = decode::<T>(&body, &state.settings.limits).map_err(|err| match err {
        DecodeError::TooLarge { limit, .. } => Error::TooLarge { limit },
        DecodeError::Invalid(errors) => Error::Invalid(errors),
    })?;
    if parsed.instance_id() != verified.instance_id {
        tracing::debug!("agent request refused: signed for another instance");
        return Err(Error::Unauthorized);
    }
    Ok(parsed)
}

/// `POST /api/updates/next`: the oldest pending job with its manifest and rollout settings
/// (marked in progress, step `accepted`), or 204.
pub(crate) async fn next(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let request = signed::<UpdateNextRequest>(&state, &headers, body).await?;
    let handed = state
        .store
        .next_job(
            &request.instance_id,
            JobKind::Update,
            fleet_core::unix_now(),
        )
        .await?;
    let Some(handed) = handed else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let Some(manifest) = handed.manifest else {
        return Err(Error::Internal("update job without a release".into()));
    };
    Ok(Json(serde_json::json!({
        "job_id": handed.job.id.to_string(),
        "manifest": manifest,
        "rollout": handed.settings.unwrap_or_default(),
    }))
    .into_response())
}

/// `POST /api/updates/report`: only the documented statuses and steps (422 otherwise), only
/// for the instance's own job (404 otherwise).
pub(crate) async fn report(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let r = signed::<UpdateReport>(&state, &headers, body).await?;
    let mut metrics = serde_json::Map::new();
    for (name, value) in [
        ("metric_p95_ms", r.metric_p95_ms),
        ("metric_error_rate", r.metric_error_rate),
        ("metric_webhook_retry_rate", r.metric_webhook_retry_rate),
    ] {
        if let Some(v) = value.and_then(serde_json::Number::from_f64) {
            metrics.insert(name.into(), v.into());
        }
    }
    let step = r
        .step
        .and_then(|s| serde_json::to_value(s).ok())
        .and_then(|v| v.as_str().map(str::to_owned));
    let report = JobReport {
        job_id: r.job_id,
        status: r.status,
        step,
        error: r.error,
        canary_percent: r.canary_percent,
        metrics: (!metrics.is_empty()).then_some(serde_json::Value::Object(metrics)),
        duration_ms: r.duration_ms,
        output_tail: r.output_tail,
    };
    let job = state
        .store
        .report_job(
            &r.instance_id,
            JobKind::Update,
            &report,
            fleet_core::unix_now(),
            state.webhook_configured,
        )
        .await?;
    Ok(Json(serde_json::json!({ "ok": true, "status": job.status })).into_response())
}
