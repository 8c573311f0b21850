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

/// An error followed by its causes, each once: `error sending request: connection refused`.
/// HTTP clients such as reqwest keep the useful part of a failure in the causes, and their
/// own message alone ("error sending request for url") does not say what went wrong.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The current unix time in seconds, for callers that do not inject a clock.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    /// An error with a message and an optional cause, as HTTP clients nest theirs.
    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn error_chain_names_every_cause_once() {
        let refused = Layer("connection refused", None);
        let connect = Layer("tcp connect error", Some(Box::new(refused)));
        let top = Layer("error sending request", Some(Box::new(connect)));
        assert_eq!(
            error_chain(&top),
            "error sending request: tcp connect error: connection refused"
        );
        // A cause the message already quotes is not repeated.
        let quoted = Layer(
            "request failed: timed out",
            Some(Box::new(Layer("timed out", None))),
        );
        assert_eq!(error_chain(&quoted), "request failed: timed out");
        assert_eq!(error_chain(&Layer("alone", None)), "alone");
    }
}
