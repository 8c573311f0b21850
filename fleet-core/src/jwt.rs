//! Short-lived EdDSA (Ed25519) JSON Web Tokens for the live channel, and the JWKS that
//! publishes the verifying key (so an API gateway can check the same tokens).
//!
//! Only what fleet needs: header `{"alg":"EdDSA","typ":"JWT","kid"}`, claims
//! `{iss, sub, iat, exp, jti}`. The signature is checked before the claims are parsed, and
//! the `alg` must be `EdDSA` (no `none`, no algorithm confusion).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::manifest::{PrivateKey, PublicKey};

/// Longest token accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 4096;

/// Why a token was refused. Callers answer every variant with the same 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not three base64url parts of sane size.
    #[error("malformed token")]
    Malformed,
    /// Not `EdDSA`, or a key id this verifier does not know.
    #[error("unsupported algorithm or unknown key")]
    UnknownKey,
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// Past `exp` (or issued in the future).
    #[error("token expired")]
    Expired,
    /// Issued by someone else.
    #[error("wrong issuer")]
    WrongIssuer,
}

/// The claims fleet puts in an agent token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer (the control plane).
    pub iss: String,
    /// Subject: the instance id.
    pub sub: String,
    /// Issued at, unix seconds.
    pub iat: i64,
    /// Expires at, unix seconds.
    pub exp: i64,
    /// Token id.
    pub jti: String,
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    typ: Option<String>,
    #[serde(default)]
    kid: Option<String>,
}

/// The key id of a public key: base64url of the first 12 bytes of its SHA-256.
pub fn key_id(key: &PublicKey) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key.as_bytes());
    B64URL.encode(&digest[..12])
}

/// Signs tokens with an Ed25519 key. `Debug` is redacted.
#[derive(Clone)]
pub struct JwtSigner {
    key: SigningKey,
    public: PublicKey,
    kid: String,
    issuer: String,
}

impl std::fmt::Debug for JwtSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSigner")
            .field("kid", &self.kid)
            .field("issuer", &self.issuer)
            .field("key", &"[redacted]")
            .finish()
    }
}

impl JwtSigner {
    /// A signer over `key`, writing `issuer` into every token.
    pub fn new(key: &PrivateKey, issuer: impl Into<String>) -> Self {
        let public = key.public_key();
        let key = SigningKey::from_bytes(&seed_of(key));
        let kid = key_id(&public);
        Self {
            key,
            public,
            kid,
            issuer: issuer.into(),
        }
    }

    /// The verifying key.
    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    /// The key id written in the header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The issuer.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// A token for `subject` valid from `now` for `ttl_secs`.
    pub fn issue(&self, subject: &str, now: i64, ttl_secs: i64, jti: &str) -> (String, Claims) {
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: subject.to_owned(),
            iat: now,
            exp: now.saturating_add(ttl_secs),
            jti: jti.to_owned(),
        };
        (self.encode(&claims), claims)
    }

    /// Encodes and signs `claims`.
    pub fn encode(&self, claims: &Claims) -> String {
        let header = Header {
            alg: "EdDSA".into(),
            typ: Some("JWT".into()),
            kid: Some(self.kid.clone()),
        };
        let mut text = B64URL.encode(serde_json::to_vec(&header).unwrap_or_default());
        text.push('.');
        text.push_str(&B64URL.encode(serde_json::to_vec(claims).unwrap_or_default()));
        let signature = self.key.sign(text.as_bytes());
        text.push('.');
        text.push_str(&B64URL.encode(signature.to_bytes()));
        text
    }

    /// This key as a JSON Web Key Set (RFC 8037 OKP key).
    pub fn jwks(&self) -> serde_json::Value {
        jwks(&[self.public_key()])
    }
}

/// The JWKS document for `keys`.
pub fn jwks(keys: &[PublicKey]) -> serde_json::Value {
    let keys: Vec<_> = keys
        .iter()
        .map(|key| {
            serde_json::json!({
                "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig",
                "kid": key_id(key), "x": B64URL.encode(key.as_bytes()),
            })
        })
        .collect();
    serde_json::json!({ "keys": keys })
}

/// The 32-byte seed of a private key (it only exposes it as base64).
fn seed_of(key: &PrivateKey) -> [u8; 32] {
    base64::engine::general_purpose::STANDARD
        .decode(key.to_base64())
        .ok()
        .and_then(|v| v.try_into().ok())
        .unwrap_or([0; 32])
}

/// Verifies tokens against pinned keys and an issuer.
#[derive(Debug, Clone)]
pub struct JwtVerifier {
    keys: Vec<(String, VerifyingKey)>,
    issuer: String,
    leeway_secs: i64,
}

impl JwtVerifier {
    /// Accepts tokens of `issuer` signed by any of `keys`.
    pub fn new(keys: &[PublicKey], issuer: impl Into<String>) -> Self {
        let keys = keys
            .iter()
            .filter_map(|k| {
                VerifyingKey::from_bytes(k.as_bytes())
                    .ok()
                    .map(|v| (key_id(k), v))
            })
            .collect();
        Self {
            keys,
            issuer: issuer.into(),
            leeway_secs: 30,
        }
    }

    /// Verifies `token` at unix time `now` and returns its claims.
    pub fn verify(&self, token: &str, now: i64) -> Result<Claims, JwtError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(JwtError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed);
        };
        let header: Header = B64URL
            .decode(h)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(JwtError::Malformed)?;
        if header.alg != "EdDSA" {
            return Err(JwtError::UnknownKey);
        }
        let signature: [u8; 64] = B64URL
            .decode(s)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(JwtError::Malformed)?;
        let signature = Signature::from_bytes(&signature);
        let signed = &token[..h.len() + 1 + c.len()];
        let candidates: Vec<&VerifyingKey> = match &header.kid {
            Some(kid) => self
                .keys
                .iter()
                .filter(|(id, _)| id == kid)
                .map(|(_, k)| k)
                .collect(),
            None => self.keys.iter().map(|(_, k)| k).collect(),
        };
        if candidates.is_empty() {
            return Err(JwtError::UnknownKey);
        }
        if !candidates
            .iter()
            .any(|k| k.verify(signed.as_bytes(), &signature).is_ok())
        {
            return Err(JwtError::BadSignature);
        }
        let claims: Claims = B64URL
            .decode(c)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(JwtError::Malformed)?;
        if claims.iss != self.issuer {
            return Err(JwtError::WrongIssuer);
        }
        if now > claims.exp.saturating_add(self.leeway_secs)
            || claims.iat > now.saturating_add(self.leeway_secs)
        {
            return Err(JwtError::Expired);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> JwtSigner {
        JwtSigner::new(&PrivateKey::from_seed([7; 32]), "fleet")
    }

    #[test]
    fn round_trip_and_expiry() {
        let signer = signer();
        let (token, claims) = signer.issue("acme-001", 1000, 3600, "j1");
        let verifier = JwtVerifier::new(&[signer.public_key()], "fleet");
        assert_eq!(verifier.verify(&token, 1000), Ok(claims));
        assert_eq!(
            verifier.verify(&token, 1000 + 3600 + 31),
            Err(JwtError::Expired)
        );
        assert_eq!(
            JwtVerifier::new(&[signer.public_key()], "other").verify(&token, 1000),
            Err(JwtError::WrongIssuer)
        );
    }

    #[test]
    fn tampering_and_other_keys_are_refused() {
        let signer = signer();
        let (token, _) = signer.issue("acme-001", 1000, 3600, "j1");
        let other = JwtSigner::new(&PrivateKey::from_seed([8; 32]), "fleet");
        let verifier = JwtVerifier::new(&[other.public_key()], "fleet");
        assert_eq!(verifier.verify(&token, 1000), Err(JwtError::UnknownKey));
        let verifier = JwtVerifier::new(&[signer.public_key()], "fleet");
        let (forged, _) = other.issue("acme-002", 1000, 3600, "j1");
        let parts: Vec<&str> = token.split('.').collect();
        let forged_parts: Vec<&str> = forged.split('.').collect();
        let mixed = format!("{}.{}.{}", parts[0], forged_parts[1], parts[2]);
        assert_eq!(verifier.verify(&mixed, 1000), Err(JwtError::BadSignature));
        assert_eq!(verifier.verify("a.b", 1000), Err(JwtError::Malformed));
        let none = format!("{}.{}.", B64URL.encode(br#"{"alg":"none"}"#), parts[1]);
        assert_eq!(verifier.verify(&none, 1000), Err(JwtError::UnknownKey));
    }

    #[test]
    fn jwks_publishes_the_raw_key() {
        let signer = signer();
        let doc = signer.jwks();
        assert_eq!(doc["keys"][0]["kty"], "OKP");
        assert_eq!(doc["keys"][0]["crv"], "Ed25519");
        assert_eq!(doc["keys"][0]["kid"], signer.kid());
        let x = B64URL
            .decode(doc["keys"][0]["x"].as_str().expect("x"))
            .expect("base64url");
        assert_eq!(x, signer.public_key().as_bytes());
    }
}
