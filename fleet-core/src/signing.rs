//! Request signatures: v0 (the ERP instance agent's hex HMAC) and v1 (Standard Webhooks).
//!
//! Everything here works on the raw body bytes. Nothing is parsed before the signature is
//! checked, except [`locate_instance_id`], which borrows `instance_id` from the body to pick
//! the secret.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{KeyInit, Mac};
use sha2::Sha256;

use crate::locate::locate_instance_id;
use crate::resolver::SecretResolver;

type HmacSha256 = hmac::Hmac<Sha256>;

/// How far a v1 `webhook-timestamp` may be from the verifier's clock, in seconds.
pub const DEFAULT_TOLERANCE_SECS: i64 = 300;

/// Header carrying a v0 signature: lowercase hex HMAC-SHA256 of the raw body.
pub const HEADER_V0_SIGNATURE: &str = "x-agent-signature";
/// Standard Webhooks message id header.
pub const HEADER_WEBHOOK_ID: &str = "webhook-id";
/// Standard Webhooks timestamp header (unix seconds).
pub const HEADER_WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
/// Standard Webhooks signature header: space-separated `v1,<base64>` entries.
pub const HEADER_WEBHOOK_SIGNATURE: &str = "webhook-signature";

/// Longest accepted `webhook-id`, in bytes.
pub const MAX_MSG_ID_LEN: usize = 255;
/// Longest accepted `webhook-signature` header, in bytes (room for a handful of keys).
pub const MAX_SIGNATURE_HEADER_LEN: usize = 2048;
/// Most signature entries considered in one `webhook-signature` header.
pub const MAX_SIGNATURE_ENTRIES: usize = 16;

const WHSEC_PREFIX: &str = "whsec_";

/// Why a signed request was refused. Each variant is one stable [`kind`](Self::kind),
/// which the shared test vectors and the server's metrics use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// A header the scheme needs is absent.
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    /// A header is present but cannot be read (bad hex, bad length, bad number, too long).
    #[error("malformed header {header}: {reason}")]
    MalformedHeader {
        /// The header at fault.
        header: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The v1 timestamp is further than the tolerance from the verifier's clock.
    #[error("timestamp outside tolerance")]
    TimestampOutOfTolerance,
    /// The body names no instance, or one for which no secret is configured.
    #[error("no secret for instance")]
    NoSecret,
    /// The body carries no readable top-level `instance_id`.
    #[error("body has no readable instance_id")]
    MissingInstanceId,
    /// No signature matched any secret of the instance.
    #[error("signature mismatch")]
    SignatureMismatch,
    /// The v0 scheme is turned off on this verifier.
    #[error("v0 signatures are not accepted")]
    V0Disabled,
}

impl SignatureError {
    /// A short stable name for the error (`missing_header`, `signature_mismatch`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::MissingHeader(_) => "missing_header",
            Self::MalformedHeader { .. } => "malformed_header",
            Self::TimestampOutOfTolerance => "timestamp_out_of_tolerance",
            Self::NoSecret => "no_secret",
            Self::MissingInstanceId => "missing_instance_id",
            Self::SignatureMismatch => "signature_mismatch",
            Self::V0Disabled => "v0_disabled",
        }
    }
}

/// A signing secret. `whsec_<base64>` means the decoded bytes (as in Standard Webhooks);
/// anything else means its UTF-8 bytes, which is what the ERP instance agent uses.
///
/// The HMAC key schedule is computed once here, so each sign or verify only hashes the
/// message. `Debug` never prints the secret.
#[derive(Clone)]
pub struct Secret {
    keyed: HmacSha256,
}

impl Secret {
    /// Builds a secret from its configured text form.
    pub fn new(text: &str) -> Result<Self, InvalidSecret> {
        if text.is_empty() {
            return Err(InvalidSecret("secret is empty"));
        }
        match text.strip_prefix(WHSEC_PREFIX) {
            Some(encoded) => {
                let bytes = BASE64
                    .decode(encoded)
                    .map_err(|_| InvalidSecret("whsec_ secret is not valid base64"))?;
                if bytes.is_empty() {
                    return Err(InvalidSecret("whsec_ secret decodes to nothing"));
                }
                Ok(Self::from_bytes(&bytes))
            }
            None => Ok(Self::from_bytes(text.as_bytes())),
        }
    }

    /// Builds a secret from raw key bytes.
    pub fn from_bytes(key: &[u8]) -> Self {
        // HMAC accepts keys of any length, so this cannot fail.
        let keyed = <HmacSha256 as KeyInit>::new_from_slice(key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        Self { keyed }
    }

    fn mac(&self) -> HmacSha256 {
        self.keyed.clone()
    }

    /// HMAC-SHA256 of the concatenation of `parts`.
    pub fn hmac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut mac = self.mac();
        for part in parts {
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// A secret string that cannot be used (empty, or a `whsec_` value that is not base64).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid secret: {0}")]
pub struct InvalidSecret(pub &'static str);

/// v0: lowercase hex HMAC-SHA256 of the raw body, as the ERP instance agent sends it in
/// `x-agent-signature`.
pub fn sign_v0(secret: &Secret, body: &[u8]) -> String {
    hex::encode(secret.hmac(&[body]))
}

/// Checks a v0 signature in constant time. A value that is not 64 hex digits is a
/// [`SignatureError::MalformedHeader`], never a panic.
pub fn verify_v0(secret: &Secret, body: &[u8], signature_hex: &str) -> Result<(), SignatureError> {
    let expected = decode_v0(signature_hex)?;
    verify_v0_decoded(std::slice::from_ref(secret), body, &expected)
}

fn decode_v0(signature_hex: &str) -> Result<[u8; 32], SignatureError> {
    let malformed = |reason| SignatureError::MalformedHeader {
        header: HEADER_V0_SIGNATURE,
        reason,
    };
    let trimmed = signature_hex.trim();
    if trimmed.len() != 64 {
        return Err(malformed("expected 64 hex digits"));
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(trimmed, &mut out).map_err(|_| malformed("not hexadecimal"))?;
    Ok(out)
}

fn verify_v0_decoded(
    secrets: &[Secret],
    body: &[u8],
    expected: &[u8; 32],
) -> Result<(), SignatureError> {
    let mut matched = false;
    // Every secret is tried even after a match so the time taken does not tell which one did.
    for secret in secrets {
        let mut mac = secret.mac();
        mac.update(body);
        matched |= mac.verify_slice(expected).is_ok();
    }
    if matched {
        Ok(())
    } else {
        Err(SignatureError::SignatureMismatch)
    }
}

/// The three Standard Webhooks headers of a v1-signed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHeaders {
    /// `webhook-id`: the message id, stable across retries.
    pub id: String,
    /// `webhook-timestamp`: unix seconds when this attempt was signed.
    pub timestamp: i64,
    /// `webhook-signature`: `v1,<base64>`.
    pub signature: String,
}

impl SignedHeaders {
    /// The headers as `(name, value)` pairs, ready for an HTTP client.
    pub fn pairs(&self) -> [(&'static str, String); 3] {
        [
            (HEADER_WEBHOOK_ID, self.id.clone()),
            (HEADER_WEBHOOK_TIMESTAMP, self.timestamp.to_string()),
            (HEADER_WEBHOOK_SIGNATURE, self.signature.clone()),
        ]
    }
}

/// Signs messages with one secret, in both schemes.
#[derive(Clone, Debug)]
pub struct Signer {
    secret: Secret,
}

impl Signer {
    /// A signer for `secret`.
    pub fn new(secret: Secret) -> Self {
        Self { secret }
    }

    /// The v1 `webhook-signature` value (`v1,<base64>`) for `{id}.{timestamp}.{body}`.
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        let mac = v1_mac(&self.secret, msg_id, timestamp, body);
        format!("v1,{}", BASE64.encode(mac))
    }

    /// All three v1 headers for a message.
    pub fn headers(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> SignedHeaders {
        SignedHeaders {
            id: msg_id.to_owned(),
            timestamp,
            signature: self.sign(msg_id, timestamp, body),
        }
    }

    /// The v0 `x-agent-signature` value for `body`.
    pub fn sign_v0(&self, body: &[u8]) -> String {
        sign_v0(&self.secret, body)
    }

    /// Verifies a v1-signed message against this signer's secret.
    pub fn verify(
        &self,
        body: &[u8],
        headers: &SignatureHeaders<'_>,
        now: i64,
    ) -> Result<(), SignatureError> {
        verify_v1(
            std::slice::from_ref(&self.secret),
            body,
            headers,
            now,
            DEFAULT_TOLERANCE_SECS,
        )
    }
}

fn v1_mac(secret: &Secret, msg_id: &str, timestamp: i64, body: &[u8]) -> [u8; 32] {
    let ts = itoa_buf(timestamp);
    secret.hmac(&[msg_id.as_bytes(), b".", ts.as_bytes(), b".", body])
}

/// Decimal text of a timestamp without a heap allocation.
struct TimestampText {
    buf: [u8; 20],
    start: usize,
}

impl TimestampText {
    fn as_bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

fn itoa_buf(value: i64) -> TimestampText {
    let mut buf = [0u8; 20];
    let mut pos = buf.len();
    let negative = value < 0;
    let mut rest = value.unsigned_abs();
    loop {
        pos -= 1;
        buf[pos] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if negative {
        pos -= 1;
        buf[pos] = b'-';
    }
    TimestampText { buf, start: pos }
}

/// The signature headers of one request, borrowed from wherever the caller keeps them.
/// Header names are matched by the caller; fill only what the request carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SignatureHeaders<'a> {
    /// `x-agent-signature` (v0).
    pub v0_signature: Option<&'a str>,
    /// `webhook-id` (v1).
    pub webhook_id: Option<&'a str>,
    /// `webhook-timestamp` (v1).
    pub webhook_timestamp: Option<&'a str>,
    /// `webhook-signature` (v1).
    pub webhook_signature: Option<&'a str>,
}

impl<'a> SignatureHeaders<'a> {
    /// Collects the headers through a lookup function that is given lowercase header names.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<&'a str>) -> Self {
        Self {
            v0_signature: lookup(HEADER_V0_SIGNATURE),
            webhook_id: lookup(HEADER_WEBHOOK_ID),
            webhook_timestamp: lookup(HEADER_WEBHOOK_TIMESTAMP),
            webhook_signature: lookup(HEADER_WEBHOOK_SIGNATURE),
        }
    }

    /// The scheme these headers use: v1 whenever `webhook-signature` is present.
    pub fn scheme(&self) -> Option<Scheme> {
        if self.webhook_signature.is_some() {
            Some(Scheme::V1)
        } else if self.v0_signature.is_some() {
            Some(Scheme::V0)
        } else {
            None
        }
    }
}

/// A signature scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    /// Hex HMAC of the body, no timestamp, no id: kept for the ERP instance agent.
    V0,
    /// Standard Webhooks.
    V1,
}

impl Scheme {
    /// `"v0"` or `"v1"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::V0 => "v0",
            Scheme::V1 => "v1",
        }
    }
}

/// Reads and range-checks the v1 id and timestamp headers.
fn v1_envelope<'h>(
    headers: &SignatureHeaders<'h>,
    now: i64,
    tolerance: i64,
) -> Result<(&'h str, i64, &'h str), SignatureError> {
    let id = headers
        .webhook_id
        .ok_or(SignatureError::MissingHeader(HEADER_WEBHOOK_ID))?;
    let ts_text = headers
        .webhook_timestamp
        .ok_or(SignatureError::MissingHeader(HEADER_WEBHOOK_TIMESTAMP))?;
    let sig = headers
        .webhook_signature
        .ok_or(SignatureError::MissingHeader(HEADER_WEBHOOK_SIGNATURE))?;
    if id.is_empty() || id.len() > MAX_MSG_ID_LEN || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(SignatureError::MalformedHeader {
            header: HEADER_WEBHOOK_ID,
            reason: "expected 1 to 255 visible ASCII characters",
        });
    }
    let timestamp = parse_timestamp(ts_text)?;
    if timestamp.abs_diff(now) > tolerance.unsigned_abs() {
        return Err(SignatureError::TimestampOutOfTolerance);
    }
    if sig.len() > MAX_SIGNATURE_HEADER_LEN {
        return Err(SignatureError::MalformedHeader {
            header: HEADER_WEBHOOK_SIGNATURE,
            reason: "header too long",
        });
    }
    Ok((id, timestamp, sig))
}

fn parse_timestamp(text: &str) -> Result<i64, SignatureError> {
    let malformed = SignatureError::MalformedHeader {
        header: HEADER_WEBHOOK_TIMESTAMP,
        reason: "expected unix seconds",
    };
    if text.is_empty() || text.len() > 12 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed);
    }
    text.parse().map_err(|_| malformed)
}

/// Verifies a v1 message against any of `secrets` (several during a rotation).
///
/// Entries of `webhook-signature` with another version, or whose base64 does not decode to
/// 32 bytes, are skipped, as Standard Webhooks libraries do; one matching entry is enough.
pub fn verify_v1(
    secrets: &[Secret],
    body: &[u8],
    headers: &SignatureHeaders<'_>,
    now: i64,
    tolerance_secs: i64,
) -> Result<(), SignatureError> {
    let (id, timestamp, header) = v1_envelope(headers, now, tolerance_secs)?;
    verify_v1_parsed(secrets, body, id, timestamp, header)
}

/// The signature check of [`verify_v1`] on headers [`v1_envelope`] already read.
fn verify_v1_parsed(
    secrets: &[Secret],
    body: &[u8],
    id: &str,
    timestamp: i64,
    header: &str,
) -> Result<(), SignatureError> {
    let candidates = v1_candidates(header);
    if candidates.is_empty() {
        return Err(SignatureError::SignatureMismatch);
    }
    let ts = itoa_buf(timestamp);
    let mut matched = false;
    for secret in secrets {
        let mut mac = secret.mac();
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(ts.as_bytes());
        mac.update(b".");
        mac.update(body);
        let computed = mac.finalize().into_bytes();
        for candidate in &candidates {
            matched |= constant_time_eq(&computed, candidate);
        }
    }
    if matched {
        Ok(())
    } else {
        Err(SignatureError::SignatureMismatch)
    }
}

/// Decoded `v1` entries of a `webhook-signature` header, at most [`MAX_SIGNATURE_ENTRIES`].
fn v1_candidates(header: &str) -> Vec<[u8; 32]> {
    header
        .split(' ')
        .filter(|entry| !entry.is_empty())
        .take(MAX_SIGNATURE_ENTRIES)
        .filter_map(|entry| entry.strip_prefix("v1,"))
        .filter_map(|encoded| {
            let mut out = [0u8; 33];
            match BASE64.decode_slice(encoded, &mut out) {
                Ok(32) => out[..32].try_into().ok(),
                _ => None,
            }
        })
        .collect()
}

/// Compares two byte strings without an early exit.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// What a successful verification established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified<'b> {
    /// The `instance_id` from the body, borrowed when it needs no unescaping.
    pub instance_id: std::borrow::Cow<'b, str>,
    /// Which scheme the request used.
    pub scheme: Scheme,
    /// The v1 message id (absent for v0).
    pub msg_id: Option<String>,
    /// The v1 timestamp (absent for v0).
    pub timestamp: Option<i64>,
}

/// Verifies signed agent requests: finds `instance_id` in the raw body, resolves its
/// secrets, and checks the v1 or v0 signature in constant time. Parse the body only after
/// this succeeds.
#[derive(Clone, Debug)]
pub struct Verifier {
    resolver: SecretResolver,
    tolerance_secs: i64,
    allow_v0: bool,
}

impl Verifier {
    /// A verifier over `resolver` with the default tolerance, accepting v0.
    pub fn new(resolver: SecretResolver) -> Self {
        Self {
            resolver,
            tolerance_secs: DEFAULT_TOLERANCE_SECS,
            allow_v0: true,
        }
    }

    /// Sets whether v0 signatures are accepted (they are by default, for existing agents).
    pub fn allow_v0(mut self, allow: bool) -> Self {
        self.allow_v0 = allow;
        self
    }

    /// Sets the v1 timestamp tolerance in seconds (its magnitude: a negative value counts as
    /// positive, and `i64::MIN` as `i64::MAX`).
    pub fn tolerance_secs(mut self, secs: i64) -> Self {
        self.tolerance_secs = secs.saturating_abs();
        self
    }

    /// The resolver this verifier consults.
    pub fn resolver(&self) -> &SecretResolver {
        &self.resolver
    }

    /// Verifies `body` with its headers at unix time `now`, using the configured secrets.
    pub fn verify<'b>(
        &self,
        body: &'b [u8],
        headers: &SignatureHeaders<'_>,
        now: i64,
    ) -> Result<Verified<'b>, SignatureError> {
        self.verify_with(body, headers, now, |id| self.resolver.resolve(id))
    }

    /// Like [`verify`](Self::verify), but asks `secrets_for` for the instance's secrets, so
    /// a server can add secrets it issued at enrollment.
    pub fn verify_with<'b, 's>(
        &self,
        body: &'b [u8],
        headers: &SignatureHeaders<'_>,
        now: i64,
        secrets_for: impl FnOnce(&str) -> Option<&'s [Secret]>,
    ) -> Result<Verified<'b>, SignatureError> {
        let scheme = headers
            .scheme()
            .ok_or(SignatureError::MissingHeader(HEADER_WEBHOOK_SIGNATURE))?;
        if scheme == Scheme::V0 && !self.allow_v0 {
            return Err(SignatureError::V0Disabled);
        }
        // Header shape is checked before any secret is looked up, so a malformed request
        // costs nothing and says nothing about which instances exist.
        enum Checked<'h> {
            V0([u8; 32]),
            V1(&'h str, i64, &'h str),
        }
        let checked = match scheme {
            Scheme::V0 => Checked::V0(decode_v0(headers.v0_signature.unwrap_or_default())?),
            Scheme::V1 => {
                let (id, timestamp, header) = v1_envelope(headers, now, self.tolerance_secs)?;
                Checked::V1(id, timestamp, header)
            }
        };
        let instance_id = locate_instance_id(body).ok_or(SignatureError::MissingInstanceId)?;
        let secrets = secrets_for(&instance_id)
            .filter(|s| !s.is_empty())
            .ok_or(SignatureError::NoSecret)?;
        match checked {
            Checked::V0(expected) => {
                verify_v0_decoded(secrets, body, &expected)?;
                Ok(Verified {
                    instance_id,
                    scheme,
                    msg_id: None,
                    timestamp: None,
                })
            }
            Checked::V1(id, ts, header) => {
                verify_v1_parsed(secrets, body, id, ts, header)?;
                let msg_id = Some(id.to_owned());
                let timestamp = Some(ts);
                Ok(Verified {
                    instance_id,
                    scheme,
                    msg_id,
                    timestamp,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(text: &str) -> Secret {
        Secret::new(text).expect("valid secret")
    }

    #[test]
    fn v0_matches_known_hmac() {
        // HMAC-SHA256("key", "The quick brown fox jumps over the lazy dog"), RFC 4231 style.
        let sig = sign_v0(
            &secret("key"),
            b"The quick brown fox jumps over the lazy dog",
        );
        assert_eq!(
            sig,
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
    }

    #[test]
    fn v1_matches_standard_webhooks_reference() {
        // The example from the Standard Webhooks specification.
        let signer = Signer::new(secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"));
        let body = br#"{"test": 2432232314}"#;
        let sig = signer.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn timestamp_text_is_decimal() {
        for value in [0i64, 7, 10, 1_614_265_330, -42, i64::MAX, i64::MIN] {
            assert_eq!(
                std::str::from_utf8(itoa_buf(value).as_bytes()).ok(),
                Some(value.to_string().as_str())
            );
        }
    }

    #[test]
    fn any_tolerance_is_taken_without_overflow() {
        for secs in [i64::MIN, -300, 0, 300, i64::MAX] {
            let verifier = Verifier::new(SecretResolver::default()).tolerance_secs(secs);
            assert_eq!(verifier.tolerance_secs, secs.saturating_abs());
        }
    }

    #[test]
    fn debug_never_prints_the_secret() {
        let s = secret("hunter2-super-secret");
        let signer = Signer::new(s.clone());
        assert!(!format!("{s:?}{signer:?}").contains("hunter2"));
    }

    #[test]
    fn whsec_secret_must_be_base64() {
        assert!(Secret::new("whsec_!!!").is_err());
        assert!(Secret::new("").is_err());
    }
}
