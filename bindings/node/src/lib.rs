//! `@fleet-sdk/node`: fleet-core's signer, verifier, heartbeat validation and manifest
//! verification for Node. Errors carry a stable `code` (the error kind), which `fleet.js`
//! turns into typed error classes.

use std::collections::HashMap;

use fleet_core::signing::SignatureHeaders;
use fleet_core::{
    DecodeError, Heartbeat, Limits, ManifestVerifier, PublicKey, Secret, SecretResolver,
};
use napi::bindgen_prelude::{AsyncTask, Buffer, Either};
use napi::{Env, Error, Result, Task};
use napi_derive::napi;

fn error(code: &str, message: impl Into<String>) -> Error {
    Error::new(
        napi::Status::GenericFailure,
        format!("{code}\u{1f}{}", message.into()),
    )
}

fn config_error(message: impl Into<String>) -> Error {
    error("config", message)
}

fn secret(text: &str) -> Result<Secret> {
    Secret::new(text).map_err(|e| config_error(e.to_string()))
}

fn signature_error(err: fleet_core::SignatureError) -> Error {
    error(err.kind(), err.to_string())
}

fn lowercase(headers: HashMap<String, String>) -> HashMap<String, String> {
    headers
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect()
}

fn signature_headers(map: &HashMap<String, String>) -> SignatureHeaders<'_> {
    SignatureHeaders::from_lookup(|name| map.get(name).map(String::as_str))
}

fn seconds(now: Option<i64>) -> i64 {
    now.unwrap_or_else(fleet_core::unix_now)
}

/// v0 signature: lowercase hex HMAC-SHA256 of `body` (the ERP instance agent's scheme).
#[napi(js_name = "signV0")]
pub fn sign_v0(secret_text: String, body: Either<Buffer, String>) -> Result<String> {
    Ok(fleet_core::sign_v0(&secret(&secret_text)?, bytes_of(&body)))
}

fn bytes_of(body: &Either<Buffer, String>) -> &[u8] {
    match body {
        Either::A(buffer) => buffer.as_ref(),
        Either::B(text) => text.as_bytes(),
    }
}

/// Signs messages with one secret.
#[napi]
pub struct Signer {
    inner: fleet_core::Signer,
}

#[napi]
impl Signer {
    /// A signer for `secret` (`whsec_<base64>` or any UTF-8 text).
    #[napi(constructor)]
    pub fn new(secret_text: String) -> Result<Self> {
        Ok(Self {
            inner: fleet_core::Signer::new(secret(&secret_text)?),
        })
    }

    /// The `webhook-signature` value (`v1,<base64>`) for `{msgId}.{timestamp}.{body}`.
    #[napi]
    pub fn sign(&self, msg_id: String, timestamp: i64, body: Either<Buffer, String>) -> String {
        self.inner.sign(&msg_id, timestamp, bytes_of(&body))
    }

    /// The three v1 headers; `timestamp` defaults to now.
    #[napi]
    pub fn headers(
        &self,
        msg_id: String,
        body: Either<Buffer, String>,
        timestamp: Option<i64>,
    ) -> HashMap<String, String> {
        self.inner
            .headers(&msg_id, seconds(timestamp), bytes_of(&body))
            .pairs()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect()
    }

    /// The v0 `x-agent-signature` value.
    #[napi(js_name = "signV0")]
    pub fn sign_v0(&self, body: Either<Buffer, String>) -> String {
        self.inner.sign_v0(bytes_of(&body))
    }

    /// Verifies v1 headers against this signer's secret; throws on failure.
    #[napi]
    pub fn verify(
        &self,
        body: Either<Buffer, String>,
        headers: HashMap<String, String>,
        now: Option<i64>,
    ) -> Result<()> {
        let map = lowercase(headers);
        self.inner
            .verify(bytes_of(&body), &signature_headers(&map), seconds(now))
            .map_err(signature_error)
    }
}

/// Options of a [`Verifier`].
#[napi(object)]
pub struct VerifierOptions {
    /// Accept v0 (`x-agent-signature`) requests; default true.
    pub allow_v0: Option<bool>,
    /// v1 timestamp tolerance in seconds; default 300.
    pub tolerance: Option<i64>,
}

/// What a verified request proved.
#[napi(object)]
pub struct VerifiedRequest {
    /// The instance that signed the request.
    pub instance_id: String,
    /// `v1` or `v0`.
    pub scheme: String,
    /// The v1 `webhook-id`; absent for v0.
    pub msg_id: Option<String>,
    /// The v1 `webhook-timestamp` (Unix seconds); absent for v0.
    pub timestamp: Option<i64>,
}

/// Verifies agent requests: finds `instance_id` in the raw body, resolves its secrets and
/// checks the signature in constant time. Parse the body only after it returns.
#[napi]
pub struct Verifier {
    inner: fleet_core::Verifier,
}

#[napi]
impl Verifier {
    /// `secrets`: the JSON text of CONTROL_PLANE_AGENT_SECRETS (instance id → secret or
    /// [secrets]), or null; `fallback`: CONTROL_PLANE_AGENT_TOKEN, or null. Throws with code
    /// `config` when neither gives a secret.
    #[napi(constructor)]
    pub fn new(
        secrets: Option<String>,
        fallback: Option<String>,
        options: Option<VerifierOptions>,
    ) -> Result<Self> {
        let resolver = SecretResolver::from_config(secrets.as_deref(), fallback.as_deref())
            .map_err(|e| config_error(e.to_string()))?;
        // A verifier without secrets refuses every request; that is always an unset
        // environment variable, so say so now rather than with a 401 per heartbeat.
        if resolver.is_empty() {
            return Err(config_error(
                "no agent secrets: set CONTROL_PLANE_AGENT_SECRETS (`secrets`) or \
                 CONTROL_PLANE_AGENT_TOKEN (`fallback`)",
            ));
        }
        let mut inner = fleet_core::Verifier::new(resolver);
        if let Some(options) = options {
            inner = inner.allow_v0(options.allow_v0.unwrap_or(true));
            if let Some(t) = options.tolerance {
                inner = inner.tolerance_secs(t);
            }
        }
        Ok(Self { inner })
    }

    /// Verifies `body` with its `headers`; returns the instance id or throws.
    #[napi]
    pub fn verify(
        &self,
        body: Either<Buffer, String>,
        headers: HashMap<String, String>,
        now: Option<i64>,
    ) -> Result<String> {
        let map = lowercase(headers);
        self.inner
            .verify(bytes_of(&body), &signature_headers(&map), seconds(now))
            .map(|v| v.instance_id.into_owned())
            .map_err(signature_error)
    }

    /// Like `verify`, with the scheme and the v1 message id and timestamp, which a replay
    /// check needs.
    #[napi(js_name = "verifyRequest")]
    pub fn verify_request(
        &self,
        body: Either<Buffer, String>,
        headers: HashMap<String, String>,
        now: Option<i64>,
    ) -> Result<VerifiedRequest> {
        let map = lowercase(headers);
        self.inner
            .verify(bytes_of(&body), &signature_headers(&map), seconds(now))
            .map(|v| VerifiedRequest {
                instance_id: v.instance_id.into_owned(),
                scheme: v.scheme.as_str().to_owned(),
                msg_id: v.msg_id,
                timestamp: v.timestamp,
            })
            .map_err(signature_error)
    }

    /// Like `verify`, on the libuv thread pool, for large bodies.
    #[napi(js_name = "verifyAsync", ts_return_type = "Promise<string>")]
    pub fn verify_async(
        &self,
        body: Buffer,
        headers: HashMap<String, String>,
        now: Option<i64>,
    ) -> AsyncTask<VerifyTask> {
        AsyncTask::new(VerifyTask {
            verifier: self.inner.clone(),
            body: body.to_vec(),
            headers: lowercase(headers),
            now: seconds(now),
        })
    }
}

/// The work of `verifyAsync`.
pub struct VerifyTask {
    verifier: fleet_core::Verifier,
    body: Vec<u8>,
    headers: HashMap<String, String>,
    now: i64,
}

impl Task for VerifyTask {
    type Output = String;
    type JsValue = String;

    fn compute(&mut self) -> Result<String> {
        self.verifier
            .verify(&self.body, &signature_headers(&self.headers), self.now)
            .map(|v| v.instance_id.into_owned())
            .map_err(signature_error)
    }

    fn resolve(&mut self, _env: Env, output: String) -> Result<String> {
        Ok(output)
    }
}

/// Validates a heartbeat body and returns it as JSON text (unknown keys kept). Throws with
/// code `validation` (message lists every path) or `too_large`.
#[napi(js_name = "validateHeartbeatJson")]
pub fn validate_heartbeat_json(body: Either<Buffer, String>) -> Result<String> {
    match Heartbeat::decode(bytes_of(&body), &Limits::default()) {
        Ok(heartbeat) => Ok(String::from_utf8(heartbeat.to_vec()).unwrap_or_default()),
        Err(DecodeError::TooLarge { limit, actual }) => Err(error(
            "too_large",
            format!("body of {actual} bytes exceeds the limit of {limit} bytes"),
        )),
        Err(DecodeError::Invalid(errors)) => {
            let list: Vec<serde_json::Value> = errors
                .violations
                .iter()
                .map(|v| serde_json::json!({"path": v.path, "message": v.message}))
                .collect();
            Err(error(
                "validation",
                serde_json::Value::Array(list).to_string(),
            ))
        }
    }
}

/// Verifies a release manifest (JSON text) against base64 Ed25519 public keys and, in
/// compatibility mode, the ERP's HMAC secret. Returns the manifest JSON or throws with the
/// manifest error kind as code.
#[napi(js_name = "verifyManifestJson")]
pub fn verify_manifest_json(
    manifest: String,
    public_keys: Vec<String>,
    hmac_secret: Option<String>,
) -> Result<String> {
    let value: serde_json::Value = serde_json::from_str(&manifest)
        .map_err(|e| error("malformed", format!("manifest is not JSON: {e}")))?;
    let keys = public_keys
        .iter()
        .map(|k| PublicKey::from_base64(k).map_err(|e| config_error(format!("public key: {e}"))))
        .collect::<Result<Vec<_>>>()?;
    let mut verifier = ManifestVerifier::new(keys);
    if let Some(text) = hmac_secret {
        verifier = verifier.with_hmac_secret(secret(&text)?);
    }
    verifier
        .verify_value(&value)
        .map(|_| manifest)
        .map_err(|e| error(e.kind(), e.to_string()))
}
