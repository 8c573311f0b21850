//! Finds the top-level `instance_id` of a JSON body without building the document.
//!
//! The verifier needs the instance id to choose a secret before it may trust the body, so
//! this reads only the top-level keys and skips every value but the one it wants. It
//! refuses a body with two `instance_id` keys: otherwise the signature could be checked
//! with one instance's secret while a later parse acted on the other.

use std::borrow::Cow;

/// Deepest nesting the scanner walks through before giving up.
pub const MAX_DEPTH: usize = 128;
/// Longest `instance_id` accepted, in bytes.
pub const MAX_INSTANCE_ID_LEN: usize = 128;

/// Returns the top-level `instance_id` string of a JSON object, or `None` when the body is
/// not an object, has no such string, has it twice, or is malformed on the way there.
pub fn locate_instance_id(body: &[u8]) -> Option<Cow<'_, str>> {
    let mut scan = Scanner {
        bytes: body,
        pos: 0,
    };
    scan.skip_ws();
    scan.expect(b'{')?;
    let mut found: Option<Cow<'_, str>> = None;
    scan.skip_ws();
    if scan.peek() == Some(b'}') {
        return None;
    }
    loop {
        scan.skip_ws();
        let key = scan.string()?;
        scan.skip_ws();
        scan.expect(b':')?;
        scan.skip_ws();
        if key == "instance_id" {
            if found.is_some() {
                return None;
            }
            found = Some(scan.string()?);
        } else {
            scan.skip_value()?;
        }
        scan.skip_ws();
        match scan.next()? {
            b',' => continue,
            b'}' => break,
            _ => return None,
        }
    }
    found.filter(|id| !id.is_empty() && id.len() <= MAX_INSTANCE_ID_LEN)
}

struct Scanner<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let byte = self.peek()?;
        self.pos += 1;
        Some(byte)
    }

    fn expect(&mut self, want: u8) -> Option<()> {
        (self.next()? == want).then_some(())
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    /// Reads a string, borrowing it when it has no escapes.
    fn string(&mut self) -> Option<Cow<'a, str>> {
        self.expect(b'"')?;
        let start = self.pos;
        let escaped = self.string_end()?;
        let raw = &self.bytes[start..self.pos - 1];
        if raw.iter().any(|b| *b < 0x20) {
            return None;
        }
        if escaped {
            unescape(raw).map(Cow::Owned)
        } else {
            std::str::from_utf8(raw).ok().map(Cow::Borrowed)
        }
    }

    /// Moves past the closing quote of a string whose opening quote was consumed; returns
    /// whether the string had escapes. memchr keeps long values (padding, messages) cheap.
    fn string_end(&mut self) -> Option<bool> {
        let mut escaped = false;
        loop {
            let rest = self.bytes.get(self.pos..)?;
            let found = memchr::memchr2(b'"', b'\\', rest)?;
            self.pos += found + 1;
            if rest[found] == b'"' {
                return Some(escaped);
            }
            escaped = true;
            // Skip the escaped byte, whatever it is.
            self.next()?;
        }
    }

    /// Skips one value of any type, tracking nesting without recursion.
    fn skip_value(&mut self) -> Option<()> {
        let mut depth = 0usize;
        loop {
            self.skip_ws();
            match self.peek()? {
                b'{' | b'[' => {
                    depth += 1;
                    if depth > MAX_DEPTH {
                        return None;
                    }
                    self.pos += 1;
                    continue;
                }
                b'}' | b']' if depth > 0 => {
                    depth -= 1;
                    self.pos += 1;
                }
                b'"' => {
                    self.skip_string()?;
                }
                b',' | b':' if depth > 0 => {
                    self.pos += 1;
                    continue;
                }
                b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => {
                    while matches!(
                        self.peek(),
                        Some(b'-' | b'+' | b'.' | b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z')
                    ) {
                        self.pos += 1;
                    }
                }
                _ => return None,
            }
            if depth == 0 {
                return Some(());
            }
        }
    }

    fn skip_string(&mut self) -> Option<()> {
        self.expect(b'"')?;
        self.string_end().map(drop)
    }
}

fn unescape(raw: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(raw).ok()?;
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next()? {
            '"' => out.push('"'),
            '\\' => out.push('\\'),
            '/' => out.push('/'),
            'b' => out.push('\u{8}'),
            'f' => out.push('\u{c}'),
            'n' => out.push('\n'),
            'r' => out.push('\r'),
            't' => out.push('\t'),
            'u' => {
                let high = hex4(&mut chars)?;
                let code = if (0xD800..0xDC00).contains(&high) {
                    if chars.next()? != '\\' || chars.next()? != 'u' {
                        return None;
                    }
                    let low = hex4(&mut chars)?;
                    if !(0xDC00..0xE000).contains(&low) {
                        return None;
                    }
                    0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00)
                } else {
                    high
                };
                out.push(char::from_u32(code)?);
            }
            _ => return None,
        }
    }
    Some(out)
}

fn hex4(chars: &mut std::str::Chars<'_>) -> Option<u32> {
    let mut value = 0;
    for _ in 0..4 {
        value = value * 16 + chars.next()?.to_digit(16)?;
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(body: &str) -> Option<String> {
        locate_instance_id(body.as_bytes()).map(Cow::into_owned)
    }

    #[test]
    fn finds_the_id_after_nested_values() {
        let body = r#"{"alerts":[{"level":"info","message":"a \"quoted\" } brace"}],"host":{"x":[1,2,{"y":null}]},"n":-1.5e3,"instance_id":"acme-001","db_ok":true}"#;
        assert_eq!(id(body).as_deref(), Some("acme-001"));
    }

    #[test]
    fn borrows_when_no_escape() {
        assert!(matches!(
            locate_instance_id(br#"{"instance_id":"a"}"#),
            Some(Cow::Borrowed("a"))
        ));
    }

    #[test]
    fn decodes_escapes() {
        assert_eq!(
            id(r#"{"instance_id":"a\u00e9\n\ud83d\ude00"}"#).as_deref(),
            Some("aé\n😀")
        );
    }

    #[test]
    fn ignores_nested_instance_id() {
        assert_eq!(
            id(r#"{"host":{"instance_id":"evil"},"instance_id":"good"}"#).as_deref(),
            Some("good")
        );
        assert_eq!(id(r#"{"host":{"instance_id":"evil"}}"#), None);
    }

    #[test]
    fn refuses_duplicates_and_garbage() {
        assert_eq!(id(r#"{"instance_id":"a","instance_id":"b"}"#), None);
        assert_eq!(id(r#"{"instance_id":7}"#), None);
        assert_eq!(id(r#"{"instance_id":""}"#), None);
        assert_eq!(id(r#"["instance_id","a"]"#), None);
        assert_eq!(id(r#"{"instance_id":"a""#), None);
        assert_eq!(id(r#"{"instance_id":"\ud800"}"#), None);
        assert_eq!(id(""), None);
        assert_eq!(id("{}"), None);
    }

    #[test]
    fn refuses_excessive_nesting() {
        let deep = format!(
            r#"{{"x":{}{},"instance_id":"a"}}"#,
            "[".repeat(MAX_DEPTH + 1),
            "]".repeat(MAX_DEPTH + 1)
        );
        assert_eq!(id(&deep), None);
        let ok = format!(
            r#"{{"x":{}{},"instance_id":"a"}}"#,
            "[".repeat(10),
            "]".repeat(10)
        );
        assert_eq!(id(&ok).as_deref(), Some("a"));
    }
}
