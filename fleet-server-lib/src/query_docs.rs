//! The query parameters of the routes that read a query string, for `/openapi.json`:
//! [`query_parameters`] is the one table of them, and the schemas here are the ones the
//! lists share (a page's size and offset, a filter's text, an instance id, a fixed set).
//! Each schema says what the handler accepts, no more and no less where JSON Schema can
//! say it, so a client (or schemathesis) generating from it is neither refused for a value
//! the document allows nor accepted for one it forbids.

use serde_json::{Value, json};

use crate::api::{MAX_FILTER_LEN, MAX_PAGE};

/// The query parameters of `method path`, in the order the document lists them; none for a
/// route that reads no query string.
pub(crate) fn query_parameters(method: &str, path: &str) -> Vec<Value> {
    match (method, path) {
        ("get", "/api/installations") => installation_list(crate::api::INSTALLATION_PAGE),
        ("get", "/") => installation_list(crate::dashboard::PAGE_SIZE),
        ("get", "/api/alerts" | "/alerts") | ("post", "/alerts/{id}/ack") => {
            crate::alert_pages::query_parameters(method, path)
        }
        (
            "get",
            "/api/releases" | "/api/rollouts" | "/api/plugins/releases" | "/api/plugins/requests",
        ) => vec![limit(crate::rollouts::ListQuery::DEFAULT_LIMIT)],
        ("get", "/api/restores") => vec![
            optional(
                "instance",
                "Only this instance's verifications; empty is every instance's",
                instance_id_or_empty(),
            ),
            limit(crate::restores::LIST_PAGE),
        ],
        ("get", "/v1/commands" | "/v1/commands/{id}/logs") => {
            crate::commands::query_parameters(method, path)
        }
        _ => Vec::new(),
    }
}

/// `api::ListQuery`: the installation list's filters and page, `default_limit` rows unless
/// `limit` says otherwise.
fn installation_list(default_limit: i64) -> Vec<Value> {
    vec![
        optional(
            "channel",
            "Only installations on this release channel (at most 256 bytes); empty or blank \
             is no filter",
            filter_text(),
        ),
        optional(
            "health",
            "Only installations of this health: as reported (ok, degraded, ...) of those not \
             offline, or offline (at most 256 bytes); empty or blank is no filter",
            filter_text(),
        ),
        optional(
            "q",
            "Only installations with this text in their instance id, domain or client (at \
             most 256 bytes, trimmed); empty or blank is no filter",
            filter_text(),
        ),
        optional(
            "archived",
            "false: active installations only (the default, as is empty); true: archived \
             ones only; all: both",
            choice(crate::store::ArchivedFilter::ALL.map(|a| a.as_str())),
        ),
        limit(default_limit),
        offset(),
    ]
}

/// An optional query parameter `name`: what it does and the values it takes.
pub(crate) fn optional(name: &str, description: &str, schema: Value) -> Value {
    json!({ "name": name, "in": "query", "required": false,
            "description": description, "schema": schema })
}

/// One of `values`, spelled exactly so (no other case, no surrounding space).
pub(crate) fn one_of<'a>(values: impl IntoIterator<Item = &'a str>) -> Value {
    let values: Vec<&str> = values.into_iter().collect();
    json!({ "type": "string", "enum": values })
}

/// One of `values`, or empty, which the handler reads as no filter, as a dashboard form
/// sends its empty fields.
pub(crate) fn choice<'a>(values: impl IntoIterator<Item = &'a str>) -> Value {
    one_of(std::iter::once("").chain(values))
}

/// `limit`: the page size, 1 to [`MAX_PAGE`], `default` when not given.
pub(crate) fn limit(default: i64) -> Value {
    optional(
        "limit",
        "How many to list at most (the page size)",
        json!({ "type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": default }),
    )
}

/// `offset`: how many of the matching rows the page skips.
pub(crate) fn offset() -> Value {
    optional(
        "offset",
        "How many of the matching ones to skip, for the pages after the first",
        json!({ "type": "integer", "minimum": 0, "maximum": i64::MAX, "default": 0 }),
    )
}

/// A filter's free text, of at most [`MAX_FILTER_LEN`] bytes. JSON Schema counts characters,
/// so text of fewer characters but more bytes (not ASCII) is refused with a 400 all the same.
pub(crate) fn filter_text() -> Value {
    json!({ "type": "string", "maxLength": MAX_FILTER_LEN })
}

/// Whitespace and control characters as Rust reads them (`char::is_whitespace`,
/// `char::is_control`), which `fleet_core::validate::check_id` refuses in an id; spelled out
/// rather than `\s`, which each regex dialect reads differently.
const NOT_ID_CHARS: &str = r"\x00-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000";

/// The whitespace `str::trim` removes.
const TRIMMED: &str = r"\x09-\x0d\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000";

/// An instance id as `check_id` takes it (at most `max_id_len` bytes, no whitespace or
/// control characters), or empty for no filter.
pub(crate) fn instance_id_or_empty() -> Value {
    json!({
        "type": "string",
        "maxLength": fleet_core::Limits::default().max_id_len,
        "pattern": format!("^[^{NOT_ID_CHARS}]*$"),
    })
}

/// An instance id between whitespace, which is trimmed, of at most [`MAX_FILTER_LEN`] bytes
/// in all; empty or blank for no filter.
pub(crate) fn padded_instance_id() -> Value {
    json!({
        "type": "string",
        "maxLength": MAX_FILTER_LEN,
        "pattern": format!("^[{TRIMMED}]*[^{NOT_ID_CHARS}]*[{TRIMMED}]*$"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `text` fits `schema`.
    fn fits(schema: &Value, text: &str) -> bool {
        jsonschema::validator_for(schema)
            .expect("the schema compiles")
            .is_valid(&json!(text))
    }

    #[test]
    fn the_instance_id_patterns_agree_with_the_rust_checks() {
        let bare = instance_id_or_empty();
        let padded = padded_instance_id();
        let bare = jsonschema::validator_for(&bare).expect("compiles");
        let padded = jsonschema::validator_for(&padded).expect("compiles");
        // Every character of the Basic Multilingual Plane, and a few beyond it.
        for c in ('\0'..='\u{ffff}').chain(['\u{10000}', '\u{1f600}', '\u{10ffff}']) {
            let id_char = !(c.is_whitespace() || c.is_control());
            let text = format!("a{c}b");
            assert_eq!(bare.is_valid(&json!(text)), id_char, "{:?}", c);
            assert_eq!(padded.is_valid(&json!(text)), id_char, "{:?}", c);
            // Around an id, whitespace is trimmed and a control character still refused.
            let around = format!("{c}ab{c}");
            let trimmed = around.trim();
            let kept = !trimmed.chars().any(|c| c.is_whitespace() || c.is_control());
            assert_eq!(padded.is_valid(&json!(around)), kept, "{:?}", c);
        }
        assert!(fits(&instance_id_or_empty(), ""));
        assert!(fits(&padded_instance_id(), "  "));
    }

    #[test]
    fn a_choice_takes_empty_and_its_values_only() {
        let schema = choice(["false", "true", "all"]);
        for good in ["", "false", "true", "all"] {
            assert!(fits(&schema, good), "{good}");
        }
        for bad in [" all", "ALL", "yes"] {
            assert!(!fits(&schema, bad), "{bad}");
        }
    }
}
