//! RFC 8785 JSON Canonicalization Scheme (JCS): the exact bytes a manifest signature covers.
//!
//! Keys are sorted by their UTF-16 code units, numbers are written as ECMAScript writes
//! them, strings escape only what JSON requires, and there is no whitespace.

use serde_json::Value;

/// The canonical form of `value`.
pub fn to_canonical_string(value: &Value) -> String {
    let mut out = String::with_capacity(128);
    write_value(&mut out, value);
    out
}

/// The canonical form of `value`, as bytes.
pub fn to_canonical_vec(value: &Value) -> Vec<u8> {
    to_canonical_string(value).into_bytes()
}

fn write_value(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|(a, _), (b, _)| a.encode_utf16().cmp(b.encode_utf16()));
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(out, key);
                out.push(':');
                write_value(out, item);
            }
            out.push('}');
        }
    }
}

fn write_number(out: &mut String, n: &serde_json::Number) {
    // JCS numbers are IEEE-754 doubles printed the ECMAScript way (ryu-js does exactly that).
    let float = n.as_f64().unwrap_or(f64::NAN);
    if float.is_finite() {
        let mut buf = ryu_js::Buffer::new();
        out.push_str(buf.format_finite(float));
    } else {
        out.push_str("null");
    }
}

fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sorts_keys_by_utf16_and_drops_whitespace() {
        // From RFC 8785 section 3.2.3: "\u20ac" sorts before "\ud83d\ude00" in UTF-16.
        let value: Value = serde_json::from_str(
            r#"{"\u20ac": "Euro Sign", "\r": "Carriage Return", "\ud83d\ude00": "Emoji", "1": "One", "\u0080": "Control", "\u00f6": "Latin"}"#,
        )
        .expect("json");
        assert_eq!(
            to_canonical_string(&value),
            "{\"\\r\":\"Carriage Return\",\"1\":\"One\",\"\u{80}\":\"Control\",\"ö\":\"Latin\",\"€\":\"Euro Sign\",\"😀\":\"Emoji\"}"
        );
    }

    #[test]
    fn numbers_are_written_as_ecmascript_does() {
        let value = json!([
            0.0, -0.0, 1.0, 100, 1e21, 1e-7, 0.000001, 123.456, 4.5e15, -1.5
        ]);
        assert_eq!(
            to_canonical_string(&value),
            "[0,0,1,100,1e+21,1e-7,0.000001,123.456,4500000000000000,-1.5]"
        );
    }

    #[test]
    fn escapes_only_what_json_requires() {
        let value = json!({"s": "a\"b\\c/\u{1}\u{1f}\u{7f}é\n"});
        assert_eq!(
            to_canonical_string(&value),
            "{\"s\":\"a\\\"b\\\\c/\\u0001\\u001f\u{7f}é\\n\"}"
        );
    }
}
