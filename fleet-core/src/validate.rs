//! Input validation with explicit limits. Every problem is reported with its field path
//! (`job_failures[2].message`), all at once, so a sender can fix its payload in one go.

use std::fmt;

use serde::de::DeserializeOwned;
use serde_json::{Map, Number, Value};

/// Largest p95 latency in ms accepted as an SLO figure (a heartbeat's, an update report's) or
/// threshold (a rollout's).
pub const MAX_SLO_P95_MS: f64 = 1.0e9;
/// Largest error rate, a fraction, accepted as an SLO figure or threshold.
pub const MAX_SLO_ERROR_RATE: f64 = 1.0;
/// Largest webhook retry rate accepted as an SLO figure or threshold.
pub const MAX_SLO_WEBHOOK_RETRY_RATE: f64 = 1.0e6;

/// Size limits for everything an agent or operator sends. The defaults suit a fleet of
/// ordinary instances; raise them deliberately, never remove them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted request body, in bytes (larger is a 413).
    pub max_body_bytes: usize,
    /// Longest identifier-like string (`instance_id`, names, versions), in bytes.
    pub max_id_len: usize,
    /// Longest short text (domain, client, image names, paths), in bytes.
    pub max_text_len: usize,
    /// Longest message text (alert and job-failure messages, errors, output tails), in bytes.
    pub max_message_len: usize,
    /// Most entries in `alerts`.
    pub max_alerts: usize,
    /// Most entries in `job_failures`.
    pub max_job_failures: usize,
    /// Most entries in `checks`.
    pub max_checks: usize,
    /// Most entries in `containers`.
    pub max_containers: usize,
    /// Most unknown top-level keys kept from a heartbeat.
    pub max_extra_keys: usize,
    /// Most targets in one command submission.
    pub max_targets: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            max_id_len: 128,
            max_text_len: 1024,
            max_message_len: 8 * 1024,
            max_alerts: 100,
            max_job_failures: 200,
            max_checks: 64,
            max_containers: 500,
            max_extra_keys: 128,
            max_targets: 10_000,
        }
    }
}

/// One problem with an input: where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Violation {
    /// Field path such as `job_failures[2].message`; empty for the document itself.
    pub path: String,
    /// What is wrong, for a person.
    pub message: String,
}

/// Every problem found in one input.
#[derive(Debug, Clone, PartialEq, Eq, Default, thiserror::Error)]
pub struct ValidationErrors {
    /// The problems, in document order.
    pub violations: Vec<Violation>,
}

impl ValidationErrors {
    /// Records a problem at `path`.
    pub fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.violations.push(Violation {
            path: path.into(),
            message: message.into(),
        });
    }

    /// Whether nothing was found.
    pub fn is_empty(&self) -> bool {
        self.violations.is_empty()
    }

    /// The paths of every problem, in order.
    pub fn paths(&self) -> Vec<&str> {
        self.violations.iter().map(|v| v.path.as_str()).collect()
    }

    /// `Ok(value)` when nothing was found, else `Err(self)`.
    pub fn into_result<T>(self, value: T) -> Result<T, Self> {
        if self.is_empty() {
            Ok(value)
        } else {
            Err(self)
        }
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} invalid field(s)", self.violations.len())?;
        for (i, v) in self.violations.iter().enumerate() {
            let sep = if i == 0 { ": " } else { "; " };
            let path = if v.path.is_empty() { "(body)" } else { &v.path };
            write!(f, "{sep}{path}: {}", v.message)?;
        }
        Ok(())
    }
}

/// Why a body could not be decoded: too large (413) or invalid (422).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The body is larger than [`Limits::max_body_bytes`].
    #[error("body of {actual} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The limit in force.
        limit: usize,
        /// The body's size.
        actual: usize,
    },
    /// The body is not valid JSON or breaks the schema or the limits.
    #[error(transparent)]
    Invalid(#[from] ValidationErrors),
}

/// A message that knows its own semantic rules (lengths, ranges, formats).
pub trait Validate {
    /// Adds every problem of `self` to `errors`, with paths under `at`.
    fn validate(&self, limits: &Limits, at: &Path<'_>, errors: &mut ValidationErrors);
}

/// A field path being built while walking a document.
#[derive(Debug, Clone, Copy)]
pub enum Path<'a> {
    /// The document root.
    Root,
    /// A named field of the parent.
    Field(&'a Path<'a>, &'a str),
    /// An array element of the parent.
    Index(&'a Path<'a>, usize),
}

impl<'a> Path<'a> {
    /// The path of field `name` under this one.
    pub fn field(&'a self, name: &'a str) -> Path<'a> {
        Path::Field(self, name)
    }

    /// The path of element `index` under this one.
    pub fn index(&'a self, index: usize) -> Path<'a> {
        Path::Index(self, index)
    }
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Root => Ok(()),
            Path::Field(Path::Root, name) => f.write_str(name),
            Path::Field(parent, name) => write!(f, "{parent}.{name}"),
            Path::Index(parent, index) => write!(f, "{parent}[{index}]"),
        }
    }
}

/// Decodes a JSON body into `T`, checking the size, the types and then `T`'s own rules.
///
/// A type error names its field path (`rollout.batch_size: invalid type ...`).
pub fn decode<T: DeserializeOwned + Validate>(
    body: &[u8],
    limits: &Limits,
) -> Result<T, DecodeError> {
    check_size(body, limits)?;
    require_object(body)?;
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = serde_path_to_error::deserialize(&mut de);
    let value: T = match parsed {
        Ok(value) => match de.end() {
            Ok(()) => value,
            Err(err) => return Err(single_problem(String::new(), &err).into()),
        },
        Err(err) => {
            let path = err.path().to_string();
            let path = if path == "." { String::new() } else { path };
            return Err(single_problem(path, err.inner()).into());
        }
    };
    let mut errors = ValidationErrors::default();
    value.validate(limits, &Path::Root, &mut errors);
    Ok(errors.into_result(value)?)
}

fn single_problem(path: String, err: &serde_json::Error) -> ValidationErrors {
    let mut errors = ValidationErrors::default();
    errors.push(path, json_message(err));
    errors
}

/// Refuses a body that is not a JSON object. serde also fills a struct from a JSON array of
/// its fields in order (`[null, null]`), which no client means and no schema documents.
pub fn require_object(body: &[u8]) -> Result<(), ValidationErrors> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => Ok(()),
        _ => {
            let mut errors = ValidationErrors::default();
            errors.push(String::new(), "must be a JSON object");
            Err(errors)
        }
    }
}

/// Refuses a body over the size limit.
pub fn check_size(body: &[u8], limits: &Limits) -> Result<(), DecodeError> {
    if body.len() > limits.max_body_bytes {
        return Err(DecodeError::TooLarge {
            limit: limits.max_body_bytes,
            actual: body.len(),
        });
    }
    Ok(())
}

/// A serde_json error without the input echoed back.
pub(crate) fn json_message(err: &serde_json::Error) -> String {
    let text = err.to_string();
    // serde_json appends " at line L column C"; keep it, it helps find the spot.
    text.chars().take(300).collect()
}

/// Checks a string's length and that it has no control characters.
pub fn check_text(errors: &mut ValidationErrors, at: &Path<'_>, value: &str, max: usize) {
    if value.len() > max {
        errors.push(at.to_string(), format!("longer than {max} bytes"));
    } else if value
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        errors.push(at.to_string(), "contains control characters");
    }
}

/// Checks an identifier: non-empty, at most `max` bytes, no whitespace or control chars.
pub fn check_id(errors: &mut ValidationErrors, at: &Path<'_>, value: &str, max: usize) {
    if value.is_empty() {
        errors.push(at.to_string(), "must not be empty");
    } else if value.len() > max {
        errors.push(at.to_string(), format!("longer than {max} bytes"));
    } else if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        errors.push(
            at.to_string(),
            "must not contain whitespace or control characters",
        );
    }
}

/// Checks that a number is finite and within `min..=max`.
pub fn check_range(errors: &mut ValidationErrors, at: &Path<'_>, value: f64, min: f64, max: f64) {
    if !value.is_finite() || value < min || value > max {
        errors.push(at.to_string(), format!("must be between {min} and {max}"));
    }
}

/// Checks an array length.
pub fn check_len<T>(errors: &mut ValidationErrors, at: &Path<'_>, items: &[T], max: usize) {
    if items.len() > max {
        errors.push(at.to_string(), format!("more than {max} items"));
    }
}

/// Whether `text` is an RFC 3339 date-time such as `2026-02-11T02:00:00.000Z`.
pub fn is_rfc3339(text: &str) -> bool {
    let b = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| {
        b.get(range)
            .is_some_and(|s| s.iter().all(u8::is_ascii_digit))
    };
    if b.len() < 20 || b.len() > 40 {
        return false;
    }
    let shape = digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && matches!(b[10], b'T' | b't' | b' ')
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19);
    if !shape {
        return false;
    }
    let num = |r: std::ops::Range<usize>| text[r].parse::<u32>().unwrap_or(99);
    if !(1..=12).contains(&num(5..7))
        || !(1..=31).contains(&num(8..10))
        || num(11..13) > 23
        || num(14..16) > 59
        || num(17..19) > 60
    {
        return false;
    }
    let mut rest = &b[19..];
    if rest.first() == Some(&b'.') {
        let frac = rest[1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if frac == 0 {
            return false;
        }
        rest = &rest[1 + frac..];
    }
    match rest {
        [b'Z' | b'z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] => [h1, h2, m1, m2].iter().all(|c| c.is_ascii_digit()),
        _ => false,
    }
}

/// A JSON number as a count: a non-negative integer, or a whole float such as `3.0`, which is
/// what some senders write for counts, below 9e15 where f64 still holds every whole number.
pub(crate) fn as_count(number: &Number) -> Option<u64> {
    number.as_u64().or_else(|| match number.as_f64() {
        Some(f) if f >= 0.0 && f.fract() == 0.0 && f < 9.0e15 => Some(f as u64),
        _ => None,
    })
}

/// Reads fields out of a JSON object one by one, recording every problem with its path;
/// what is left at the end are the unknown keys, which callers keep.
pub(crate) struct Fields<'e, 'p> {
    map: Map<String, Value>,
    at: &'p Path<'p>,
    errors: &'e mut ValidationErrors,
    limits: &'e Limits,
}

impl<'e, 'p> Fields<'e, 'p> {
    pub(crate) fn new(
        map: Map<String, Value>,
        at: &'p Path<'p>,
        errors: &'e mut ValidationErrors,
        limits: &'e Limits,
    ) -> Self {
        Self {
            map,
            at,
            errors,
            limits,
        }
    }

    pub(crate) fn limits(&self) -> &Limits {
        self.limits
    }

    pub(crate) fn bad(&mut self, key: &str, message: impl Into<String>) {
        let path = self.at.field(key).to_string();
        self.errors.push(path, message);
    }

    /// The value of `key`, treating JSON `null` as absent.
    fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key).filter(|v| !v.is_null())
    }

    fn required<T>(&mut self, key: &str, got: Option<T>, present: bool) -> Option<T> {
        if !present {
            self.bad(key, "is required");
        }
        got
    }

    pub(crate) fn req_string(&mut self, key: &str, max: usize) -> String {
        let present = self.map.get(key).is_some_and(|v| !v.is_null());
        let got = self.opt_string(key, max);
        self.required(key, got, present).unwrap_or_default()
    }

    pub(crate) fn req_id(&mut self, key: &str) -> String {
        let present = self.map.get(key).is_some_and(|v| !v.is_null());
        let got = self.take(key).and_then(|v| match v {
            Value::String(s) => Some(s),
            _ => {
                self.bad(key, "must be a string");
                None
            }
        });
        if let Some(value) = &got {
            let max = self.limits.max_id_len;
            check_id(self.errors, &self.at.field(key), value, max);
        }
        self.required(key, got, present).unwrap_or_default()
    }

    pub(crate) fn opt_string(&mut self, key: &str, max: usize) -> Option<String> {
        match self.take(key)? {
            Value::String(s) => {
                check_text(self.errors, &self.at.field(key), &s, max);
                Some(s)
            }
            _ => {
                self.bad(key, "must be a string");
                None
            }
        }
    }

    pub(crate) fn opt_timestamp(&mut self, key: &str) -> Option<String> {
        let value = self.opt_string(key, 64)?;
        if !is_rfc3339(&value) {
            self.bad(key, "must be an RFC 3339 date-time");
        }
        Some(value)
    }

    pub(crate) fn req_bool(&mut self, key: &str) -> bool {
        let present = self.map.get(key).is_some_and(|v| !v.is_null());
        let got = self.opt_bool(key);
        self.required(key, got, present).unwrap_or_default()
    }

    pub(crate) fn opt_bool(&mut self, key: &str) -> Option<bool> {
        match self.take(key)? {
            Value::Bool(b) => Some(b),
            _ => {
                self.bad(key, "must be true or false");
                None
            }
        }
    }

    pub(crate) fn req_u64(&mut self, key: &str) -> u64 {
        let present = self.map.get(key).is_some_and(|v| !v.is_null());
        let got = self.opt_u64(key);
        self.required(key, got, present).unwrap_or_default()
    }

    pub(crate) fn opt_u64(&mut self, key: &str) -> Option<u64> {
        match self.take(key)?.as_number().and_then(as_count) {
            Some(n) => Some(n),
            None => {
                self.bad(key, "must be a non-negative integer");
                None
            }
        }
    }

    pub(crate) fn opt_f64(&mut self, key: &str, min: f64, max: f64) -> Option<f64> {
        match self.take(key)?.as_f64() {
            Some(f) => {
                check_range(self.errors, &self.at.field(key), f, min, max);
                Some(f)
            }
            None => {
                self.bad(key, "must be a number");
                None
            }
        }
    }

    /// Reads an array of objects, decoding each with `item`.
    pub(crate) fn array<T>(
        &mut self,
        key: &str,
        max: usize,
        mut item: impl FnMut(&mut Fields<'_, '_>) -> T,
    ) -> Vec<T> {
        let Some(value) = self.take(key) else {
            return Vec::new();
        };
        let Value::Array(values) = value else {
            self.bad(key, "must be an array");
            return Vec::new();
        };
        if values.len() > max {
            self.bad(key, format!("more than {max} items"));
            return Vec::new();
        }
        let field = self.at.field(key);
        let mut out = Vec::with_capacity(values.len());
        for (i, value) in values.into_iter().enumerate() {
            let at = field.index(i);
            match value {
                Value::Object(map) => {
                    let mut fields = Fields::new(map, &at, self.errors, self.limits);
                    out.push(item(&mut fields));
                }
                _ => self.errors.push(at.to_string(), "must be an object"),
            }
        }
        out
    }

    /// Reads a nested object, decoding it with `item`.
    pub(crate) fn object<T>(
        &mut self,
        key: &str,
        item: impl FnOnce(&mut Fields<'_, '_>) -> T,
    ) -> Option<T> {
        match self.take(key)? {
            Value::Object(map) => {
                let at = self.at.field(key);
                let mut fields = Fields::new(map, &at, self.errors, self.limits);
                Some(item(&mut fields))
            }
            _ => {
                self.bad(key, "must be an object");
                None
            }
        }
    }

    /// The keys nobody asked for, kept as they came.
    pub(crate) fn rest(&mut self) -> Map<String, Value> {
        let rest = std::mem::take(&mut self.map);
        if rest.len() > self.limits.max_extra_keys {
            let (max, at) = (self.limits.max_extra_keys, self.at.to_string());
            self.errors
                .push(at, format!("more than {max} unknown fields"));
        }
        rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_render_like_javascript() {
        let root = Path::Root;
        let list = root.field("job_failures");
        let item = list.index(2);
        assert_eq!(item.field("message").to_string(), "job_failures[2].message");
        assert_eq!(root.to_string(), "");
    }

    #[test]
    fn rfc3339_accepts_node_iso_strings_and_refuses_others() {
        for ok in [
            "2026-02-11T02:00:00Z",
            "2026-02-11T02:00:00.000Z",
            "2026-02-11T02:00:00+01:00",
        ] {
            assert!(is_rfc3339(ok), "{ok}");
        }
        for bad in [
            "2026-02-11",
            "yesterday",
            "2026-13-11T02:00:00Z",
            "2026-02-11T02:00:00",
            "2026-02-11T02:00:00.Z",
        ] {
            assert!(!is_rfc3339(bad), "{bad}");
        }
    }
}
