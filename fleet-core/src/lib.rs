#![doc = include_str!("../README.md")]

pub mod canonical;
pub mod command;
pub mod heartbeat;
pub mod jwt;
pub mod locate;
pub mod manifest;
pub mod plugin;
pub mod prometheus;
pub mod registration;
pub mod resolver;
pub mod restore;
pub mod schema;
pub mod signing;
pub mod update;
pub mod validate;

pub use heartbeat::Heartbeat;
pub use locate::locate_instance_id;
pub use manifest::{
    ManifestError, ManifestVerifier, PrivateKey, PublicKey, ReleaseManifest, SignedManifest,
};
pub use resolver::SecretResolver;
pub use signing::{
    Scheme, Secret, SignatureError, SignatureHeaders, SignedHeaders, Signer, Verified, Verifier,
    sign_v0,
};
pub use validate::{DecodeError, Limits, ValidationErrors, Violation};

/// Everything that can go wrong in fleet-core.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A signed request was refused.
    #[error(transparent)]
    Signature(#[from] SignatureError),
    /// A body was too large or invalid.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A manifest was refused.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// Configuration values that cannot be used; each entry names one problem.
    #[error("invalid configuration: {}", .0.join("; "))]
    Config(Vec<String>),
}

impl From<ValidationErrors> for Error {
    fn from(errors: ValidationErrors) -> Self {
        Self::Decode(DecodeError::Invalid(errors))
    }
}

/// `Result` with fleet-core's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The current unix time in seconds, for callers that do not inject a clock.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}
