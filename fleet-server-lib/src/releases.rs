//! Releases: `POST /api/releases` (admin) stores a manifest whose signature verifies against
//! the pinned Ed25519 keys (or, in compatibility mode, the ERP's HMAC secret); anything else
//! is refused with the reason. `GET /api/releases` lists them.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fleet_core::ValidationErrors;
use fleet_core::manifest::{ManifestError, ManifestScheme};

use crate::auth::{Admin, Support};
use crate::rollouts::{ListQuery, parse_body};
use crate::{Error, Result, Shared};

/// Why a manifest was refused, as a 422 naming the signature.
fn refused(err: &ManifestError) -> Error {
    let mut errors = ValidationErrors::default();
    let path = match err {
        ManifestError::Malformed(_) => "",
        _ => "signature",
    };
    errors.push(path, format!("manifest refused ({}): {err}", err.kind()));
    Error::Invalid(errors)
}

/// `POST /api/releases`: the body is the signed manifest, or `{"manifest": {...}}`.
pub(crate) async fn create(_: Admin, State(state): State<Shared>, body: Bytes) -> Result<Response> {
    let value: serde_json::Value = parse_body(&body, &state.settings.limits)?;
    let manifest = match value.get("manifest") {
        Some(inner) if inner.is_object() => inner.clone(),
        _ => value,
    };
    let signed = state
        .manifests
        .verify_value(&manifest)
        .map_err(|err| refused(&err))?;
    let scheme = match signed.signature_scheme {
        ManifestScheme::Ed25519 => "ed25519",
        ManifestScheme::HmacSha256 => "hmac-sha256",
    };
    let release = state
        .store
        .create_release(
            &signed.manifest.version,
            &signed.manifest.channel,
            scheme,
            &manifest.to_string(),
            fleet_core::unix_now(),
        )
        .await?;
    tracing::info!(
        version = %release.version,
        channel = %release.channel,
        scheme,
        "release stored"
    );
    Ok((StatusCode::CREATED, Json(release)).into_response())
}

/// `GET /api/releases`.
pub(crate) async fn list(
    _: Support,
    State(state): State<Shared>,
    Query(query): Query<ListQuery>,
) -> Result<Response> {
    let items = state.store.list_releases(query.limit()?).await?;
    Ok(Json(serde_json::json!({ "items": items })).into_response())
}
