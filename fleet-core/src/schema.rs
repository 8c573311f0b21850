//! JSON Schema fragments for the request bodies of the wire types, so the control plane's
//! OpenAPI document (`/openapi.json`) describes what the decoders really accept.
//!
//! Each body type has a `json_schema()` beside its definition that builds on these helpers.
//! The limits are the defaults of [`Limits`]; enum values come from the types' own serde
//! names, so a renamed variant cannot leave the document behind.

use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::validate::Limits;

/// An identifier as `check_id` accepts it: 1 to `max_id_len` bytes, no whitespace or control
/// characters.
pub fn id() -> Value {
    json!({
        "type": "string",
        "minLength": 1,
        "maxLength": Limits::default().max_id_len,
        "pattern": "^[^\\s\\x00-\\x1f\\x7f]+$"
    })
}

/// A string of at most `max` bytes, for a field whose characters are not checked (a
/// signature, a key id); text that `check_text` checks is [`plain_text`].
pub fn text(max: usize) -> Value {
    json!({ "type": "string", "maxLength": max })
}

/// The characters `check_text` admits, as a regular-expression class: anything but control
/// characters other than newline and tab.
pub const PLAIN_TEXT_CHAR: &str = "[^\\x00-\\x08\\x0b-\\x1f\\x7f-\\x9f]";

/// Text as `check_text` accepts it: at most `max` bytes, no control characters but newline
/// and tab.
pub fn plain_text(max: usize) -> Value {
    json!({
        "type": "string",
        "maxLength": max,
        "pattern": format!("^{PLAIN_TEXT_CHAR}*$")
    })
}

/// A number from 0 to `max`.
pub fn number(max: f64) -> Value {
    json!({ "type": "number", "minimum": 0, "maximum": max })
}

/// A non-negative integer.
pub fn count() -> Value {
    json!({ "type": "integer", "minimum": 0 })
}

/// The same schema, also admitting `null`: what an `Option` field with `#[serde(default)]`
/// accepts (null reads as absent).
pub fn nullable(mut schema: Value) -> Value {
    if let Some(names) = schema.get_mut("enum").and_then(Value::as_array_mut) {
        names.push(Value::Null);
    }
    match schema.get("type").cloned() {
        Some(Value::String(ty)) => schema["type"] = json!([ty, "null"]),
        Some(Value::Array(mut types)) if !types.contains(&json!("null")) => {
            types.push(json!("null"));
            schema["type"] = Value::Array(types);
        }
        _ => {}
    }
    schema
}

/// A string enum with the serde names of `values`.
pub fn one_of<T: Serialize>(values: &[T]) -> Value {
    let names: Vec<Value> = values
        .iter()
        .filter_map(|v| serde_json::to_value(v).ok())
        .collect();
    json!({ "type": "string", "enum": names })
}

/// An object with these properties, of which `required` must be present. Unknown keys are
/// allowed: the decoders skip them (or, for a heartbeat, keep them).
pub fn object(required: &[&str], properties: &[(&str, Value)]) -> Value {
    let props: Map<String, Value> = properties
        .iter()
        .map(|(name, schema)| ((*name).to_owned(), schema.clone()))
        .collect();
    json!({ "type": "object", "required": required, "properties": props })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_values_are_the_serde_names() {
        let schema = one_of(&[crate::update::JobStatus::RolledBack]);
        assert_eq!(schema["enum"], json!(["rolled_back"]));
        let optional = nullable(schema);
        assert_eq!(optional["enum"], json!(["rolled_back", null]));
        assert_eq!(optional["type"], json!(["string", "null"]));
    }
}
