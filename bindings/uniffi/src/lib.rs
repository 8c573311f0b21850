//! fleet's signer, verifier, heartbeat validation and manifest verification for Kotlin and
//! Swift, through uniffi. Names follow each language's conventions (`signV0`, `Verifier`).

use std::collections::HashMap;
use std::sync::Arc;

use fleet_core::signing::SignatureHeaders;
use fleet_core::{
    DecodeError, Heartbeat, Limits, ManifestVerifier, PublicKey, Secret, SecretResolver,
};

uniffi::setup_scaffolding!();

/// Every error the bindings raise. `kind` is the stable error kind of the shared vectors.
#[derive(Debug, thiserror::Error, uniffi::Error)]
pub enum FleetError {
    /// A signed request was refused.
    #[error("{kind}: {detail}")]
    InvalidSignature {
        /// Stable kind, e.g. `signature_mismatch`.
        kind: String,
        /// For a person.
        detail: String,
    },
    /// A payload is invalid; `paths` lists every field path at fault, in order.
    #[error("{detail}")]
    Validation {
        /// Field paths such as `job_failures[2].message`.
        paths: Vec<String>,
        /// For a person.
        detail: String,
    },
    /// A release manifest was refused.
    #[error("{kind}: {detail}")]
    Manifest {
        /// Stable kind, e.g. `signature_mismatch`.
        kind: String,
        /// For a person.
        detail: String,
    },
    /// Secrets or keys that cannot be used.
    #[error("{detail}")]
    Config {
        /// For a person (never contains a secret).
        detail: String,
    },
}

fn secret(text: &str) -> Result<Secret, FleetError> {
    Secret::new(text).map_err(|e| FleetError::Config {
        detail: e.to_string(),
    })
}

fn signature_error(err: fleet_core::SignatureError) -> FleetError {
    FleetError::InvalidSignature {
        kind: err.kind().to_owned(),
        detail: err.to_string(),
    }
}

fn lowercase(headers: HashMap<String, String>) -> HashMap<String, String> {
    headers
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect()
}

fn lookup(map: &HashMap<String, String>) -> SignatureHeaders<'_> {
    SignatureHeaders::from_lookup(|name| map.get(name).map(String::as_str))
}

/// v0 signature: lowercase hex HMAC-SHA256 of `body`.
#[uniffi::export]
pub fn sign_v0(secret_text: String, body: Vec<u8>) -> Result<String, FleetError> {
    Ok(fleet_core::sign_v0(&secret(&secret_text)?, &body))
}

/// Signs messages with one secret.
#[derive(uniffi::Object)]
pub struct Signer {
    inner: fleet_core::Signer,
}

#[uniffi::export]
impl Signer {
    /// A signer for `secret_text` (`whsec_<base64>` or any UTF-8 text).
    #[uniffi::constructor]
    pub fn new(secret_text: String) -> Result<Arc<Self>, FleetError> {
        Ok(Arc::new(Self {
            inner: fleet_core::Signer::new(secret(&secret_text)?),
        }))
    }

    /// The `webhook-signature` value for `{msg_id}.{timestamp}.{body}`.
    pub fn sign(&self, msg_id: String, timestamp: i64, body: Vec<u8>) -> String {
        self.inner.sign(&msg_id, timestamp, &body)
    }

    /// The three v1 headers.
    pub fn headers(
        &self,
        msg_id: String,
        timestamp: i64,
        body: Vec<u8>,
    ) -> HashMap<String, String> {
        self.inner
            .headers(&msg_id, timestamp, &body)
            .pairs()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect()
    }

    /// The v0 `x-agent-signature` value.
    pub fn sign_v0(&self, body: Vec<u8>) -> String {
        self.inner.sign_v0(&body)
    }

    /// Verifies v1 headers against this secret at unix time `now`.
    pub fn verify(
        &self,
        body: Vec<u8>,
        headers: HashMap<String, String>,
        now: i64,
    ) -> Result<(), FleetError> {
        let map = lowercase(headers);
        self.inner
            .verify(&body, &lookup(&map), now)
            .map_err(signature_error)
    }
}

/// Verifies agent requests: finds `instance_id` in the raw body, resolves its secrets and
/// checks the signature in constant time.
#[derive(uniffi::Object)]
pub struct Verifier {
    inner: fleet_core::Verifier,
}

#[uniffi::export]
impl Verifier {
    /// `secrets_json`: CONTROL_PLANE_AGENT_SECRETS (instance id → secret or [secrets]);
    /// `fallback`: CONTROL_PLANE_AGENT_TOKEN. A config error when neither gives a secret.
    #[uniffi::constructor]
    pub fn new(
        secrets_json: Option<String>,
        fallback: Option<String>,
        allow_v0: bool,
    ) -> Result<Arc<Self>, FleetError> {
        let resolver = SecretResolver::from_config(secrets_json.as_deref(), fallback.as_deref())
            .map_err(|e| FleetError::Config {
                detail: e.to_string(),
            })?;
        // As in the other bindings: a verifier without secrets would refuse every request.
        if resolver.is_empty() {
            return Err(FleetError::Config {
                detail: "no agent secrets: pass secretsJson (CONTROL_PLANE_AGENT_SECRETS) or \
                         fallback (CONTROL_PLANE_AGENT_TOKEN)"
                    .into(),
            });
        }
        Ok(Arc::new(Self {
            inner: fleet_core::Verifier::new(resolver).allow_v0(allow_v0),
        }))
    }

    /// Verifies `body` at unix time `now`; returns the instance id.
    pub fn verify(
        &self,
        body: Vec<u8>,
        headers: HashMap<String, String>,
        now: i64,
    ) -> Result<String, FleetError> {
        let map = lowercase(headers);
        self.inner
            .verify(&body, &lookup(&map), now)
            .map(|v| v.instance_id.into_owned())
            .map_err(signature_error)
    }
}

/// Validates a heartbeat body; returns it as JSON text (unknown keys kept).
#[uniffi::export]
pub fn validate_heartbeat(body: Vec<u8>) -> Result<String, FleetError> {
    match Heartbeat::decode(&body, &Limits::default()) {
        Ok(heartbeat) => Ok(String::from_utf8(heartbeat.to_vec()).unwrap_or_default()),
        Err(DecodeError::TooLarge { limit, actual }) => Err(FleetError::Validation {
            paths: vec![String::new()],
            detail: format!("body of {actual} bytes exceeds the limit of {limit} bytes"),
        }),
        Err(DecodeError::Invalid(errors)) => Err(FleetError::Validation {
            paths: errors.violations.iter().map(|v| v.path.clone()).collect(),
            detail: errors.to_string(),
        }),
    }
}

/// Verifies a release manifest (JSON text) against base64 Ed25519 public keys and, in
/// compatibility mode, the ERP's HMAC secret. Returns the manifest JSON.
#[uniffi::export]
pub fn verify_manifest(
    manifest_json: String,
    public_keys: Vec<String>,
    hmac_secret: Option<String>,
) -> Result<String, FleetError> {
    let manifest_error = |kind: &str, detail: String| FleetError::Manifest {
        kind: kind.to_owned(),
        detail,
    };
    let value: serde_json::Value = serde_json::from_str(&manifest_json)
        .map_err(|e| manifest_error("malformed", format!("manifest is not JSON: {e}")))?;
    let keys = public_keys
        .iter()
        .map(|k| {
            PublicKey::from_base64(k).map_err(|e| FleetError::Config {
                detail: format!("public key: {e}"),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut verifier = ManifestVerifier::new(keys);
    if let Some(text) = hmac_secret {
        verifier = verifier.with_hmac_secret(secret(&text)?);
    }
    verifier
        .verify_value(&value)
        .map(|_| manifest_json.clone())
        .map_err(|e| manifest_error(e.kind(), e.to_string()))
}
