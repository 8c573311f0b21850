//! Agent registration and enrollment.
//!
//! - `POST /v1/agents/register`: a v1-signed request (the agent's secret) or a one-time
//!   enrollment token buys a short-lived EdDSA JWT for the live channel. With a token, the
//!   answer also carries the secret issued to the instance (once).
//! - `GET /.well-known/jwks.json`: the key that verifies those tokens, for API gateways.
//! - `POST /v1/enrollments` (admin): a one-time enrollment token for an instance.
//!
//! Issued secrets are never stored: each is `HMAC(server key, instance_id, nonce)` and only
//! the nonce is kept, so a copy of the database alone does not hold any agent's secret, as
//! long as the server key comes from the configuration rather than from the database
//! ([`stored_jwt_key`](crate::stored_jwt_key)).

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use fleet_core::registration::{RegisterRequest, RegisterResponse};
use fleet_core::signing::Scheme;
use fleet_core::{Limits, Secret, SignatureHeaders, ValidationErrors};
use serde::Deserialize;
use sha2::Digest;

use crate::auth::Admin;
use crate::channel::command_store;
use crate::{Error, Result, Shared};

/// Largest registration body.
const MAX_REGISTER_BYTES: usize = 16 * 1024;

/// The SHA-256 hex of an enrollment token, as stored.
pub(crate) fn token_hash(token: &str) -> String {
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// The secret issued to `instance_id` with `nonce`: text the agent stores and uses as its
/// `AGENT_SECRET`.
pub(crate) fn issued_secret(master: &Secret, instance_id: &str, nonce: &str) -> String {
    hex::encode(master.hmac(&[
        b"fleet-issued-secret\0",
        instance_id.as_bytes(),
        b"\0",
        nonce.as_bytes(),
    ]))
}

/// The secret issued to `instance` at enrollment, if it enrolled.
pub(crate) async fn issued_secret_of(
    state: &Shared,
    commands: &dyn crate::store::commands::CommandStore,
    instance: &str,
) -> Result<Option<Secret>> {
    Ok(commands
        .issued_nonce(instance)
        .await?
        .and_then(|nonce| Secret::new(&issued_secret(&state.live.master, instance, &nonce)).ok()))
}

/// Verifies an agent's signed request over its raw bytes, with the secrets
/// [`agent_secrets`] names. An instance with a secret of its own in
/// `CONTROL_PLANE_AGENT_SECRETS` is checked against those first, without a store read, so
/// fleets configured that way pay nothing more; only when they fail is the secret issued at
/// enrollment tried. The outer error is the store failing; the inner one is the refusal, with
/// its reason for the log and the rejection metrics, never for the sender.
pub(crate) async fn verify_agent_request<'b>(
    state: &Shared,
    body: &'b [u8],
    lookup: &SignatureHeaders<'_>,
    now: i64,
) -> Result<std::result::Result<fleet_core::Verified<'b>, fleet_core::SignatureError>> {
    let Some(instance) = fleet_core::locate_instance_id(body) else {
        return Ok(state.verifier.verify(body, lookup, now));
    };
    let own = state.verifier.resolver().has_own_secret(&instance);
    let refused = if own {
        match state.verifier.verify(body, lookup, now) {
            Ok(verified) => return Ok(Ok(verified)),
            Err(refused) => Some(refused),
        }
    } else {
        None
    };
    let issued = match state.store.commands() {
        Some(commands) => issued_secret_of(state, commands, &instance).await?,
        None => None,
    };
    Ok(match (issued, refused) {
        (Some(issued), refused) => {
            let secrets = [issued];
            state
                .verifier
                .verify_with(body, lookup, now, |_| Some(secrets.as_slice()))
                .map_err(|err| refused.unwrap_or(err))
        }
        (None, Some(refused)) => Err(refused),
        // Neither a secret of its own nor an enrollment: the shared fallback, if configured.
        (None, None) => state.verifier.verify(body, lookup, now),
    })
}

/// Every secret `instance` may sign with: its own configured ones and the one issued to it at
/// enrollment; the shared `CONTROL_PLANE_AGENT_TOKEN` only when it has neither. An enrolled
/// instance is thereby never signed for with the token every unlisted agent holds.
pub(crate) async fn agent_secrets(
    state: &Shared,
    commands: &dyn crate::store::commands::CommandStore,
    instance: &str,
) -> Result<Vec<Secret>> {
    let resolver = state.verifier.resolver();
    let mut secrets: Vec<Secret> = if resolver.has_own_secret(instance) {
        resolver
            .resolve(instance)
            .map(<[Secret]>::to_vec)
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    match issued_secret_of(state, commands, instance).await? {
        Some(issued) => secrets.push(issued),
        None if secrets.is_empty() => {
            secrets.extend(resolver.resolve(instance).into_iter().flatten().cloned());
        }
        None => {}
    }
    Ok(secrets)
}

fn random_token() -> Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| Error::Internal(format!("no randomness: {e}")))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

fn invalid(path: &str, message: impl Into<String>) -> Error {
    let mut errors = ValidationErrors::default();
    errors.push(path, message);
    Error::Invalid(errors)
}

/// `GET /.well-known/jwks.json`.
pub(crate) async fn jwks(State(state): State<Shared>) -> Response {
    Json(state.live.signer.jwks()).into_response()
}

/// `POST /v1/agents/register`.
pub(crate) async fn register(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response> {
    if body.len() > MAX_REGISTER_BYTES {
        return Err(Error::TooLarge {
            limit: MAX_REGISTER_BYTES,
        });
    }
    let commands = command_store(state.store.as_ref())?;
    let now = fleet_core::unix_now();
    let lookup =
        SignatureHeaders::from_lookup(|name| headers.get(name).and_then(|v| v.to_str().ok()));
    let signed = lookup.scheme().is_some();
    let mut issued = None;
    let request: RegisterRequest = if signed {
        // Signature first, over the raw bytes; only then is the body parsed.
        let instance = fleet_core::locate_instance_id(&body)
            .ok_or(Error::Unauthorized)?
            .into_owned();
        let secrets = agent_secrets(&state, commands, &instance).await?;
        if lookup.scheme() != Some(Scheme::V1) {
            // v0 has no timestamp or id: a captured request could be replayed for a token.
            return Err(Error::Unauthorized);
        }
        let verified = state
            .verifier
            .verify_with(&body, &lookup, now, |_| Some(secrets.as_slice()))
            .map_err(|err| {
                tracing::debug!(reason = err.kind(), "registration refused");
                Error::Unauthorized
            })?;
        let msg_id = verified.msg_id.clone().unwrap_or_default();
        let signed_at = verified.timestamp.unwrap_or(now);
        if !commands
            .remember_message(&instance, &msg_id, signed_at, now)
            .await?
        {
            return Err(Error::Unauthorized);
        }
        let request = parse(&body, &state.settings.limits)?;
        if request.instance_id != instance {
            return Err(Error::Unauthorized);
        }
        request
    } else {
        let request = parse(&body, &state.settings.limits)?;
        let token = request
            .enrollment_token
            .as_deref()
            .ok_or(Error::Unauthorized)?;
        let instance = request.instance_id.clone();
        if !commands
            .consume_enrollment(&token_hash(token), &instance, now)
            .await?
        {
            return Err(Error::Unauthorized);
        }
        let nonce = random_token()?;
        commands.set_issued_nonce(&instance, &nonce, now).await?;
        issued = Some(issued_secret(&state.live.master, &instance, &nonce));
        tracing::info!(instance_id = %instance, "instance enrolled with a one-time token");
        request
    };
    let ttl = i64::try_from(state.live.settings.token_ttl.as_secs()).unwrap_or(3600);
    let (token, claims) = state.live.signer.issue(
        &request.instance_id,
        now,
        ttl,
        &uuid::Uuid::new_v4().to_string(),
    );
    Ok(Json(RegisterResponse {
        instance_id: request.instance_id,
        token,
        expires_at: claims.exp,
        secret: issued,
    })
    .into_response())
}

fn parse(body: &[u8], limits: &Limits) -> Result<RegisterRequest> {
    decode_body(body, limits)
}

/// Decodes and validates a JSON body; problems become 413/422.
pub(crate) fn decode_body<T>(body: &[u8], limits: &Limits) -> Result<T>
where
    T: serde::de::DeserializeOwned + fleet_core::validate::Validate,
{
    fleet_core::validate::decode(body, limits).map_err(|err| match err {
        fleet_core::DecodeError::TooLarge { limit, .. } => Error::TooLarge { limit },
        fleet_core::DecodeError::Invalid(errors) => Error::Invalid(errors),
    })
}

#[derive(Deserialize)]
struct EnrollmentBody {
    instance_id: String,
    #[serde(default)]
    ttl_secs: Option<u64>,
}

/// JSON Schema of [`EnrollmentBody`] (for `/openapi.json`).
pub(crate) fn enrollment_schema() -> serde_json::Value {
    fleet_core::schema::object(
        &["instance_id"],
        &[
            ("instance_id", fleet_core::schema::id()),
            (
                "ttl_secs",
                serde_json::json!({ "type": ["integer", "null"], "minimum": 60, "maximum": 2_592_000 }),
            ),
        ],
    )
}

/// `POST /v1/enrollments {"instance_id", "ttl_secs"?}` (admin): a one-time token, shown once.
pub(crate) async fn create_enrollment(
    _: Admin,
    State(state): State<Shared>,
    body: Bytes,
) -> Result<Response> {
    let parsed: EnrollmentBody = crate::rollouts::parse_body(&body, &state.settings.limits)?;
    let id = parsed.instance_id.trim();
    let max = state.settings.limits.max_id_len;
    if id.is_empty() || id.len() > max || id.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(invalid(
            "instance_id",
            format!("must be 1 to {max} bytes without spaces or control characters"),
        ));
    }
    let ttl = parsed
        .ttl_secs
        .unwrap_or(state.live.settings.enrollment_ttl.as_secs());
    if !(60..=30 * 86_400).contains(&ttl) {
        return Err(invalid("ttl_secs", "must be between 60 and 2592000"));
    }
    let commands = command_store(state.store.as_ref())?;
    let now = fleet_core::unix_now();
    let token = random_token()?;
    let expires_at = now + ttl as i64;
    state.store.enroll(id, now).await?;
    commands
        .create_enrollment(&token_hash(&token), id, now, expires_at)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({
            "instance_id": id, "enrollment_token": token, "expires_at": expires_at,
        })),
    )
        .into_response())
}
