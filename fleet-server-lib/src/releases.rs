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
    // The operator's next step, when the server was not configured for the manifest's scheme.
    let hint = match err {
        ManifestError::SchemeNotAccepted("ed25519") => {
            " (no release public key is configured: set CONTROL_PLANE_RELEASE_PUBLIC_KEYS to the \
             key `fleetctl keys generate` printed)"
        }
        ManifestError::SchemeNotAccepted(_) => {
            " (set CONTROL_PLANE_RELEASE_SIGNING_SECRET to accept the ERP's HMAC-signed manifests)"
        }
        _ => "",
    };
    errors.push(
        path,
        format!("manifest refused ({}): {err}{hint}", err.kind()),
    );
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

#[cfg(test)]
mod tests {
    use super::*;

    fn message(err: &ManifestError) -> String {
        match refused(err) {
            Error::Invalid(errors) => errors.to_string(),
            other => panic!("not a 422: {other:?}"),
        }
    }

    #[test]
    fn a_scheme_the_server_is_not_set_up_for_names_the_setting() {
        let ed25519 = message(&ManifestError::SchemeNotAccepted("ed25519"));
        assert!(
            ed25519.contains("scheme_not_accepted")
                && ed25519.contains("CONTROL_PLANE_RELEASE_PUBLIC_KEYS"),
            "{ed25519}"
        );
        let hmac = message(&ManifestError::SchemeNotAccepted("hmac-sha256"));
        assert!(
            hmac.contains("CONTROL_PLANE_RELEASE_SIGNING_SECRET"),
            "{hmac}"
        );
        let mismatch = message(&ManifestError::SignatureMismatch);
        assert!(!mismatch.contains("CONTROL_PLANE_"), "{mismatch}");
    }
}
