//! Release manifests: what a release is, signed so an agent can refuse anything else.
//!
//! The Ed25519 signature covers the RFC 8785 canonical JSON of the manifest object with its
//! signature fields removed, so fields unknown to this version are covered too. The ERP's
//! HMAC-signed manifests are accepted as a compatibility mode.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::canonical::to_canonical_vec;
use crate::schema;
use crate::signing::{Secret, constant_time_eq};
use crate::validate::{Limits, Path, Validate, ValidationErrors, check_id, check_text, is_rfc3339};

/// The keys of a manifest that are the signature, not what is signed.
pub const SIGNATURE_FIELDS: [&str; 3] = ["signature", "signature_scheme", "key_id"];

/// The fields the ERP control plane's HMAC covers, in the ERP's terms.
const LEGACY_SIGNED_FIELDS: [&str; 6] = [
    "version",
    "sha",
    "channel",
    "migrations_required",
    "breaking_changes",
    "released_at",
];

/// A downloadable artifact of a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// Where to fetch it.
    pub url: String,
    /// Lowercase hex SHA-256 of its bytes.
    pub sha256: String,
    /// Platform it is for (`linux-x86_64`), when it matters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// Size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// What a release is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseManifest {
    /// Version string (`1.4.0`).
    pub version: String,
    /// Source commit or image digest.
    pub sha: String,
    /// Release channel (`stable`, `beta`, ...).
    pub channel: String,
    /// Whether the update runs database migrations.
    pub migrations_required: bool,
    /// Whether the release breaks compatibility.
    pub breaking_changes: bool,
    /// RFC 3339 time of release.
    pub released_at: String,
    /// Artifacts, when the release ships any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifacts: Option<Vec<Artifact>>,
}

impl Validate for ReleaseManifest {
    fn validate(&self, limits: &Limits, at: &Path<'_>, errors: &mut ValidationErrors) {
        check_id(
            errors,
            &at.field("version"),
            &self.version,
            limits.max_id_len,
        );
        check_id(errors, &at.field("sha"), &self.sha, limits.max_id_len);
        check_id(
            errors,
            &at.field("channel"),
            &self.channel,
            limits.max_id_len,
        );
        if !is_rfc3339(&self.released_at) {
            errors.push(
                at.field("released_at").to_string(),
                "must be an RFC 3339 date-time",
            );
        }
        let list = at.field("artifacts");
        for (i, artifact) in self.artifacts.iter().flatten().enumerate() {
            let item = list.index(i);
            check_text(
                errors,
                &item.field("url"),
                &artifact.url,
                limits.max_text_len,
            );
            if artifact.sha256.len() != 64
                || !artifact.sha256.bytes().all(|b| b.is_ascii_hexdigit())
            {
                errors.push(item.field("sha256").to_string(), "must be 64 hex digits");
            }
        }
    }
}

/// How a manifest is signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ManifestScheme {
    /// Ed25519 over the canonical JSON (our default).
    #[default]
    Ed25519,
    /// The ERP control plane's HMAC-SHA256 hex (compatibility mode).
    HmacSha256,
}

/// A manifest with its signature, as stored and as sent in update jobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedManifest {
    /// The manifest.
    #[serde(flatten)]
    pub manifest: ReleaseManifest,
    /// Base64 Ed25519 signature, or hex HMAC in compatibility mode.
    pub signature: String,
    /// The scheme; absent means HMAC, which is what ERP manifests carry.
    #[serde(default = "legacy_scheme")]
    pub signature_scheme: ManifestScheme,
    /// Which key signed it (base64 public key), when the signer says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
}

fn legacy_scheme() -> ManifestScheme {
    ManifestScheme::HmacSha256
}

impl SignedManifest {
    /// JSON Schema of a signed manifest (for the OpenAPI document): the manifest's fields
    /// with `signature`, `signature_scheme` and `key_id` beside them.
    pub fn json_schema() -> Value {
        let max = Limits::default().max_text_len;
        let artifact = schema::object(
            &["url", "sha256"],
            &[
                ("url", schema::plain_text(max)),
                (
                    "sha256",
                    serde_json::json!({ "type": "string", "pattern": "^[0-9a-fA-F]{64}$" }),
                ),
                ("platform", schema::nullable(schema::text(max))),
                ("size", schema::nullable(schema::count())),
            ],
        );
        let boolean = serde_json::json!({ "type": "boolean" });
        // Every field the ERP's HMAC covers is required, and the signature beside them.
        let required: Vec<&str> = LEGACY_SIGNED_FIELDS
            .into_iter()
            .chain(["signature"])
            .collect();
        schema::object(
            &required,
            &[
                ("version", schema::id()),
                ("sha", schema::id()),
                ("channel", schema::id()),
                ("migrations_required", boolean.clone()),
                ("breaking_changes", boolean),
                (
                    "released_at",
                    serde_json::json!({ "type": "string", "format": "date-time" }),
                ),
                (
                    "artifacts",
                    schema::nullable(serde_json::json!({ "type": "array", "items": artifact })),
                ),
                ("signature", schema::text(max)),
                (
                    "signature_scheme",
                    schema::one_of(&[ManifestScheme::Ed25519, ManifestScheme::HmacSha256]),
                ),
                ("key_id", schema::nullable(schema::text(max))),
            ],
        )
    }
}

/// Why a manifest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Not a JSON object with the manifest fields.
    #[error("malformed manifest: {0}")]
    Malformed(String),
    /// A key or signature that is not the expected base64 or hex of the expected length.
    #[error("bad encoding: {0}")]
    BadEncoding(&'static str),
    /// The manifest's scheme is not accepted by this verifier (no key or secret for it).
    #[error("signature scheme {0} is not accepted here")]
    SchemeNotAccepted(&'static str),
    /// The signature does not verify against any pinned key.
    #[error("manifest signature does not verify")]
    SignatureMismatch,
}

impl ManifestError {
    /// A short stable name for the error.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::BadEncoding(_) => "bad_encoding",
            Self::SchemeNotAccepted(_) => "scheme_not_accepted",
            Self::SignatureMismatch => "signature_mismatch",
        }
    }
}

/// An Ed25519 public key, written as base64 of its 32 raw bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// Parses base64 of the raw 32 bytes.
    pub fn from_base64(text: &str) -> Result<Self, ManifestError> {
        let bytes = BASE64
            .decode(text.trim())
            .map_err(|_| ManifestError::BadEncoding("public key is not base64"))?;
        let raw: [u8; 32] = bytes
            .try_into()
            .map_err(|_| ManifestError::BadEncoding("public key must be 32 bytes"))?;
        VerifyingKey::from_bytes(&raw)
            .map(Self)
            .map_err(|_| ManifestError::BadEncoding("not an Ed25519 point"))
    }

    /// Base64 of the raw 32 bytes.
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0.as_bytes())
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        self.0.as_bytes()
    }
}

/// An Ed25519 private key (the 32-byte seed), written as base64. `Debug` is redacted.
#[derive(Clone)]
pub struct PrivateKey(SigningKey);

impl PrivateKey {
    /// A key from a 32-byte seed; draw the seed from the operating system's RNG.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&seed))
    }

    /// Parses base64 of the 32-byte seed.
    pub fn from_base64(text: &str) -> Result<Self, ManifestError> {
        let bytes = BASE64
            .decode(text.trim())
            .map_err(|_| ManifestError::BadEncoding("private key is not base64"))?;
        let seed: [u8; 32] = bytes
            .try_into()
            .map_err(|_| ManifestError::BadEncoding("private key must be 32 bytes"))?;
        Ok(Self::from_seed(seed))
    }

    /// Base64 of the 32-byte seed. Keep it offline.
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0.to_bytes())
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// Signs a manifest object (any signature fields in it are ignored and replaced).
    pub fn sign_value(&self, manifest: &Value) -> Result<Value, ManifestError> {
        let mut object = unsigned_object(manifest)?;
        let signature = self
            .0
            .sign(&to_canonical_vec(&Value::Object(object.clone())));
        object.insert(
            "signature".into(),
            BASE64.encode(signature.to_bytes()).into(),
        );
        object.insert("signature_scheme".into(), "ed25519".into());
        object.insert("key_id".into(), self.public_key().to_base64().into());
        Ok(Value::Object(object))
    }

    /// Signs a typed manifest.
    pub fn sign(&self, manifest: &ReleaseManifest) -> SignedManifest {
        let value = serde_json::to_value(manifest).unwrap_or(Value::Null);
        let signature = self.0.sign(&to_canonical_vec(&value));
        SignedManifest {
            manifest: manifest.clone(),
            signature: BASE64.encode(signature.to_bytes()),
            signature_scheme: ManifestScheme::Ed25519,
            key_id: Some(self.public_key().to_base64()),
        }
    }
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateKey([redacted])")
    }
}

/// The ERP compatibility signature: hex HMAC-SHA256 over the key-sorted JSON of the six
/// legacy fields.
pub fn sign_manifest_hmac(secret: &Secret, manifest: &Value) -> Result<String, ManifestError> {
    Ok(hex::encode(secret.hmac(&[&legacy_signed_bytes(manifest)?])))
}

fn legacy_signed_bytes(manifest: &Value) -> Result<Vec<u8>, ManifestError> {
    let object = manifest
        .as_object()
        .ok_or_else(|| ManifestError::Malformed("not a JSON object".into()))?;
    let mut picked = Map::new();
    for key in LEGACY_SIGNED_FIELDS {
        let value = object
            .get(key)
            .ok_or_else(|| ManifestError::Malformed(format!("missing {key}")))?;
        picked.insert(key.to_owned(), value.clone());
    }
    Ok(to_canonical_vec(&Value::Object(picked)))
}

fn unsigned_object(manifest: &Value) -> Result<Map<String, Value>, ManifestError> {
    let mut object = manifest
        .as_object()
        .cloned()
        .ok_or_else(|| ManifestError::Malformed("not a JSON object".into()))?;
    for key in SIGNATURE_FIELDS {
        object.remove(key);
    }
    Ok(object)
}

/// Verifies manifests against pinned Ed25519 public keys and, in compatibility mode, the
/// ERP's HMAC secret.
#[derive(Clone, Debug, Default)]
pub struct ManifestVerifier {
    keys: Vec<PublicKey>,
    hmac_secret: Option<Secret>,
}

impl ManifestVerifier {
    /// A verifier trusting `keys`.
    pub fn new(keys: Vec<PublicKey>) -> Self {
        Self {
            keys,
            hmac_secret: None,
        }
    }

    /// Also accepts HMAC-signed manifests made with `secret` (the ERP's
    /// `CONTROL_PLANE_RELEASE_SIGNING_SECRET`).
    pub fn with_hmac_secret(mut self, secret: Secret) -> Self {
        self.hmac_secret = Some(secret);
        self
    }

    /// The pinned keys.
    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    /// Verifies a manifest given as JSON and returns it typed. The signature is checked
    /// before the manifest fields are trusted.
    pub fn verify_value(&self, manifest: &Value) -> Result<SignedManifest, ManifestError> {
        let object = manifest
            .as_object()
            .ok_or_else(|| ManifestError::Malformed("not a JSON object".into()))?;
        let signature = object
            .get("signature")
            .and_then(Value::as_str)
            .ok_or_else(|| ManifestError::Malformed("missing signature".into()))?;
        let scheme = match object.get("signature_scheme") {
            None | Some(Value::Null) => ManifestScheme::HmacSha256,
            Some(value) => serde_json::from_value(value.clone())
                .map_err(|_| ManifestError::Malformed("unknown signature_scheme".into()))?,
        };
        match scheme {
            ManifestScheme::Ed25519 => self.verify_ed25519(manifest, signature)?,
            ManifestScheme::HmacSha256 => self.verify_hmac(manifest, signature)?,
        }
        let signed: SignedManifest = serde_json::from_value(manifest.clone())
            .map_err(|e| ManifestError::Malformed(e.to_string()))?;
        let mut errors = ValidationErrors::default();
        signed
            .manifest
            .validate(&Limits::default(), &Path::Root, &mut errors);
        if !errors.is_empty() {
            return Err(ManifestError::Malformed(errors.to_string()));
        }
        Ok(signed)
    }

    /// Verifies a typed manifest.
    pub fn verify(&self, signed: &SignedManifest) -> Result<(), ManifestError> {
        let value =
            serde_json::to_value(signed).map_err(|e| ManifestError::Malformed(e.to_string()))?;
        self.verify_value(&value).map(drop)
    }

    fn verify_ed25519(&self, manifest: &Value, signature: &str) -> Result<(), ManifestError> {
        if self.keys.is_empty() {
            return Err(ManifestError::SchemeNotAccepted("ed25519"));
        }
        let bytes = BASE64
            .decode(signature)
            .map_err(|_| ManifestError::BadEncoding("signature is not base64"))?;
        let raw: [u8; 64] = bytes
            .try_into()
            .map_err(|_| ManifestError::BadEncoding("signature must be 64 bytes"))?;
        let signature = ed25519_dalek::Signature::from_bytes(&raw);
        let message = to_canonical_vec(&Value::Object(unsigned_object(manifest)?));
        self.keys
            .iter()
            .any(|key| key.0.verify_strict(&message, &signature).is_ok())
            .then_some(())
            .ok_or(ManifestError::SignatureMismatch)
    }

    fn verify_hmac(&self, manifest: &Value, signature: &str) -> Result<(), ManifestError> {
        let secret = self
            .hmac_secret
            .as_ref()
            .ok_or(ManifestError::SchemeNotAccepted("hmac-sha256"))?;
        let mut expected = [0u8; 32];
        hex::decode_to_slice(signature.trim(), &mut expected)
            .map_err(|_| ManifestError::BadEncoding("HMAC signature must be 64 hex digits"))?;
        let computed = secret.hmac(&[&legacy_signed_bytes(manifest)?]);
        constant_time_eq(&computed, &expected)
            .then_some(())
            .ok_or(ManifestError::SignatureMismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn manifest() -> ReleaseManifest {
        ReleaseManifest {
            version: "1.4.0".into(),
            sha: "abc123".into(),
            channel: "stable".into(),
            migrations_required: true,
            breaking_changes: false,
            released_at: "2026-11-01T10:00:00Z".into(),
            artifacts: None,
        }
    }

    #[test]
    fn ed25519_round_trip_and_tamper() {
        let key = PrivateKey::from_seed([7; 32]);
        let verifier = ManifestVerifier::new(vec![key.public_key()]);
        let signed = key.sign(&manifest());
        verifier.verify(&signed).expect("verifies");
        let mut tampered = signed.clone();
        tampered.manifest.version = "6.6.6".into();
        assert_eq!(
            verifier.verify(&tampered),
            Err(ManifestError::SignatureMismatch)
        );
        let other = ManifestVerifier::new(vec![PrivateKey::from_seed([8; 32]).public_key()]);
        assert_eq!(other.verify(&signed), Err(ManifestError::SignatureMismatch));
    }

    #[test]
    fn unknown_fields_are_covered_by_the_signature() {
        let key = PrivateKey::from_seed([1; 32]);
        let verifier = ManifestVerifier::new(vec![key.public_key()]);
        let mut value = serde_json::to_value(manifest()).expect("json");
        value["rollout_note"] = json!("read me");
        let mut signed = key.sign_value(&value).expect("sign");
        verifier.verify_value(&signed).expect("verifies");
        signed["rollout_note"] = json!("changed");
        assert_eq!(
            verifier.verify_value(&signed).map(drop),
            Err(ManifestError::SignatureMismatch)
        );
    }

    #[test]
    fn hmac_compatibility_mode() {
        let secret = Secret::new("release-secret").expect("secret");
        let mut value = serde_json::to_value(manifest()).expect("json");
        value["signature"] = sign_manifest_hmac(&secret, &value).expect("sign").into();
        let verifier = ManifestVerifier::default().with_hmac_secret(secret);
        verifier.verify_value(&value).expect("verifies");
        assert_eq!(
            ManifestVerifier::default().verify_value(&value).map(drop),
            Err(ManifestError::SchemeNotAccepted("hmac-sha256"))
        );
    }

    #[test]
    fn keys_round_trip_through_base64() {
        let key = PrivateKey::from_seed([3; 32]);
        let again = PrivateKey::from_base64(&key.to_base64()).expect("parse");
        assert_eq!(again.public_key(), key.public_key());
        assert_eq!(
            PublicKey::from_base64(&key.public_key().to_base64()),
            Ok(key.public_key())
        );
        assert!(PublicKey::from_base64("AAAA").is_err());
        assert!(!format!("{key:?}").contains(&key.to_base64()));
    }
}
