#![doc = include_str!("../README.md")]

pub mod canonical;
pub mod clock;
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

/// `text` with every byte but the unreserved characters (`A-Z a-z 0-9 - _ . ~`)
/// percent-encoded: safe as a URL path segment, a query value or a cookie value.
pub fn percent_encode(text: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// `text` as it may be logged or shown in an error: a URL's password
/// (`scheme://user:[redacted]@host/…`) and the value of every `password=` setting, in a query
/// string or a `key=value` connection string, replaced by `[redacted]`. Anything else is kept.
pub fn redact_url_password(text: &str) -> String {
    let mut shown = match text.split_once("://") {
        Some((scheme, rest)) => {
            let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            let (authority, tail) = rest.split_at(authority_end);
            match authority.rsplit_once('@') {
                Some((userinfo, host)) if userinfo.contains(':') => {
                    let user = userinfo.split_once(':').map_or("", |(user, _)| user);
                    format!("{scheme}://{user}:[redacted]@{host}{tail}")
                }
                _ => text.to_owned(),
            }
        }
        None => text.to_owned(),
    };
    const KEY: &str = "password=";
    let mut from = 0;
    while let Some(found) = shown[from..].to_ascii_lowercase().find(KEY) {
        let start = from + found;
        let at_boundary = start == 0 || matches!(shown.as_bytes()[start - 1], b'?' | b'&' | b' ');
        let value_start = start + KEY.len();
        let value_end = value_start + setting_value_len(&shown[value_start..]);
        if at_boundary {
            shown.replace_range(value_start..value_end, "[redacted]");
            from = value_start + "[redacted]".len();
        } else {
            from = value_end;
        }
    }
    shown
}

/// The length of a setting's value at the start of `rest`: up to the next `&`, space or `#`,
/// or a whole single-quoted value (`'a b\'c'`), as libpq connection strings allow.
fn setting_value_len(rest: &str) -> usize {
    if !rest.starts_with('\'') {
        return rest.find(['&', ' ', '#']).unwrap_or(rest.len());
    }
    let mut escaped = false;
    for (at, c) in rest.char_indices().skip(1) {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '\'' => return at + 1,
            _ => {}
        }
    }
    rest.len()
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
    use super::{error_chain, redact_url_password};

    #[test]
    fn passwords_are_redacted_from_urls_and_connection_strings() {
        let cases = [
            (
                "postgres://fleet:s3cret@db.internal:5432/fleet",
                "postgres://fleet:[redacted]@db.internal:5432/fleet",
            ),
            (
                "postgres://fleet@%2Fvar%2Frun/fleet?Password=s3cret&sslmode=disable",
                "postgres://fleet@%2Fvar%2Frun/fleet?Password=[redacted]&sslmode=disable",
            ),
            (
                "postgres://a:b@h/db?sslmode=require&password=s3cret",
                "postgres://a:[redacted]@h/db?sslmode=require&password=[redacted]",
            ),
            (
                "host=db user=fleet password=s3cret dbname=fleet",
                "host=db user=fleet password=[redacted] dbname=fleet",
            ),
            (
                r"host=db password='s3 cr\'et' dbname=fleet",
                "host=db password=[redacted] dbname=fleet",
            ),
            ("password='never closed", "password=[redacted]"),
            // Nothing secret: kept as it is.
            (
                "sqlite:///var/lib/fleet/fleet.db",
                "sqlite:///var/lib/fleet/fleet.db",
            ),
            (
                "https://cp.example.com/api?mypassword=x",
                "https://cp.example.com/api?mypassword=x",
            ),
            ("https://user@cp.example.com", "https://user@cp.example.com"),
            ("not a url", "not a url"),
        ];
        for (text, shown) in cases {
            assert_eq!(redact_url_password(text), shown, "{text}");
        }
    }

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
