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

/// A size as people set and read it: `256 MiB` for a whole number of a unit, one decimal
/// otherwise (`1.5 KiB`, `1.1 GiB`), `1000 bytes` below a KiB; units up to PiB.
pub fn byte_size(bytes: i64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes.unsigned_abs() < 1024 {
        return format!("{bytes} bytes");
    }
    let mut unit = 0;
    let mut divisor: i64 = 1024;
    while bytes.unsigned_abs() / divisor.unsigned_abs() >= 1024 && unit < UNITS.len() - 1 {
        unit += 1;
        divisor *= 1024;
    }
    if bytes % divisor == 0 {
        format!("{} {}", bytes / divisor, UNITS[unit])
    } else {
        format!("{:.1} {}", bytes as f64 / divisor as f64, UNITS[unit])
    }
}

/// `text` with the userinfo, query and fragment of every URL in it (`scheme://…`) replaced by
/// `[redacted]`: `https://[redacted]@host/path?[redacted]`. For error texts and logs that
/// quote a request's URL (an HTTP client's "error sending request for url (…)"), where a
/// query can carry an API key or a presigned signature and the userinfo a password.
///
/// A URL ends at whitespace or a quote (`"`, `'`, `` ` ``, `<`, `>`), which a serialized URL
/// always percent-encodes; a `)` closing a `(` just before the URL is kept, with the
/// punctuation after it.
pub fn redact_url_secrets(text: &str) -> String {
    const REDACTED: &str = "[redacted]";
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut search = 0;
    while let Some(found) = text[search..].find("://") {
        let sep = search + found;
        let bytes = text.as_bytes();
        let mut start = sep;
        while start > copied
            && (bytes[start - 1].is_ascii_alphanumeric()
                || matches!(bytes[start - 1], b'+' | b'-' | b'.'))
        {
            start -= 1;
        }
        let after = sep + 3;
        let end = text[after..]
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '<' | '>'))
            .map_or(text.len(), |n| after + n);
        if start == sep {
            // No scheme before `://`: not a URL.
            search = after;
            continue;
        }
        out.push_str(&text[copied..after]);
        let rest = &text[after..end];
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        match authority.rsplit_once('@') {
            Some((_, host)) => {
                out.push_str(REDACTED);
                out.push('@');
                out.push_str(host);
            }
            None => out.push_str(authority),
        }
        let tail = &rest[authority_end..];
        match tail.find(['?', '#']) {
            Some(at) => {
                out.push_str(&tail[..=at]);
                out.push_str(REDACTED);
                // "for url (…): cause": the closing `)` and what punctuates it belong to
                // the text, provided nothing but punctuation follows it.
                let in_parens = start > 0 && bytes[start - 1] == b'(';
                if let Some(close) = tail.rfind(')').filter(|_| in_parens) {
                    let after = &tail[close..];
                    if after[1..]
                        .bytes()
                        .all(|b| matches!(b, b':' | b',' | b'.' | b';'))
                    {
                        out.push_str(after);
                    }
                }
            }
            None => out.push_str(tail),
        }
        copied = end;
        search = end;
    }
    out.push_str(&text[copied..]);
    out
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
    use super::byte_size;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(byte_size(1000), "1000 bytes");
        assert_eq!(byte_size(1536), "1.5 KiB");
        assert_eq!(byte_size(4096), "4 KiB");
        assert_eq!(byte_size(256 << 20), "256 MiB");
        assert_eq!(byte_size(100_000_000), "95.4 MiB");
        assert_eq!(byte_size(1_200_000_000), "1.1 GiB");
        assert_eq!(byte_size(3 << 40), "3 TiB");
        assert_eq!(byte_size(i64::MAX), "8192.0 PiB");
    }

    use super::{error_chain, redact_url_password, redact_url_secrets};

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

    #[test]
    fn url_userinfo_queries_and_fragments_are_redacted_from_texts() {
        let cases = [
            (
                "error sending request for url (http://127.0.0.1:1/ops?api_key=K1): refused",
                "error sending request for url (http://127.0.0.1:1/ops?[redacted]): refused",
            ),
            (
                "GET https://u:p@s3.example/b/k?X-Amz-Signature=S&X-Amz-Credential=C#f failed",
                "GET https://[redacted]@s3.example/b/k?[redacted] failed",
            ),
            ("http://h/p#access_token=T", "http://h/p#[redacted]"),
            (
                "redis://:pw@cache:6379/0",
                "redis://[redacted]@cache:6379/0",
            ),
            (
                "a \"http://h/?k=1\" and 'https://h2?k=2' and <ftp://h3/x?y>",
                "a \"http://h/?[redacted]\" and 'https://h2?[redacted]' and <ftp://h3/x?[redacted]>",
            ),
            // The query of a URL that is not in parentheses loses its `)` too, and text
            // after an inner `)` is taken as part of the query.
            ("see http://h/x?a=(b)", "see http://h/x?[redacted]"),
            ("(http://h/x?a=b)SECRET", "(http://h/x?[redacted]"),
            ("(http://h/x?a=b)SECRET).", "(http://h/x?[redacted])."),
            // Nothing secret: kept as it is.
            ("http://h:8080/p/q", "http://h:8080/p/q"),
            (
                "connect 127.0.0.1:5432: refused",
                "connect 127.0.0.1:5432: refused",
            ),
            (":// no scheme ?x=1", ":// no scheme ?x=1"),
            ("", ""),
            ("é https://h/?k=ü é", "é https://h/?[redacted] é"),
        ];
        for (text, shown) in cases {
            assert_eq!(redact_url_secrets(text), shown, "{text}");
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
