//! Property tests: round trips hold for arbitrary input, nothing panics on garbage, and
//! `Heartbeat::decode`'s fast path answers exactly as its slow path.

use fleet_core::command::Frame;
use fleet_core::{
    Heartbeat, Limits, ManifestVerifier, PrivateKey, Secret, SecretResolver, SignatureHeaders,
    Signer, Verifier,
};
use proptest::prelude::*;
use proptest::sample::Index;

fn headers<'a>(id: &'a str, ts: &'a str, sig: &'a str) -> SignatureHeaders<'a> {
    SignatureHeaders {
        webhook_id: Some(id),
        webhook_timestamp: Some(ts),
        webhook_signature: Some(sig),
        ..Default::default()
    }
}

proptest! {
    #[test]
    fn v1_round_trips(secret in "[ -~]{1,64}", body in proptest::collection::vec(any::<u8>(), 0..2048),
                      id in "[A-Za-z0-9_]{1,40}", ts in 0i64..4_000_000_000) {
        let signer = Signer::new(Secret::new(&secret).unwrap());
        let sig = signer.sign(&id, ts, &body);
        let ts_text = ts.to_string();
        prop_assert!(signer.verify(&body, &headers(&id, &ts_text, &sig), ts).is_ok());
        let mut flipped = body.clone();
        flipped.push(b'x');
        prop_assert!(signer.verify(&flipped, &headers(&id, &ts_text, &sig), ts).is_err());
    }

    #[test]
    fn v0_round_trips(secret in any::<Vec<u8>>().prop_filter("non-empty", |s| !s.is_empty()),
                      body in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let key = Secret::from_bytes(&secret);
        let sig = fleet_core::sign_v0(&key, &body);
        prop_assert!(fleet_core::signing::verify_v0(&key, &body, &sig).is_ok());
        prop_assert!(fleet_core::signing::verify_v0(&Secret::from_bytes(b"other"), &body, &sig).is_err() || secret == b"other");
    }

    #[test]
    fn verifier_round_trips_through_the_body(id in "[a-z0-9-]{1,40}", pad in "[ -~]{0,200}") {
        let body = serde_json::json!({"pad": pad, "instance_id": id, "db_ok": true}).to_string();
        let secrets = serde_json::json!({ id.clone(): "s3cret" }).to_string();
        let verifier = Verifier::new(SecretResolver::from_config(Some(&secrets), None).unwrap());
        let signed = Signer::new(Secret::new("s3cret").unwrap()).headers("m1", 1000, body.as_bytes());
        let ts = signed.timestamp.to_string();
        let verified = verifier.verify(body.as_bytes(), &headers(&signed.id, &ts, &signed.signature), 1000).unwrap();
        prop_assert_eq!(verified.instance_id, id);
    }

    #[test]
    fn nothing_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..4096),
                                         header in "[ -~]{0,200}") {
        let verifier = Verifier::new(SecretResolver::from_config(None, Some("fallback")).unwrap());
        let _ = verifier.verify(&bytes, &headers("id", "1000", &header), 1000);
        let _ = verifier.verify(&bytes, &SignatureHeaders { v0_signature: Some(&header), ..Default::default() }, 1000);
        let _ = verifier.verify(&bytes, &headers(&header, &header, &header), 1000);
        let _ = fleet_core::locate_instance_id(&bytes);
        let _ = Heartbeat::decode(&bytes, &Limits::default());
        let _ = Frame::decode(&bytes);
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(&bytes) {
            let _ = ManifestVerifier::new(vec![PrivateKey::from_seed([1; 32]).public_key()]).verify_value(&value);
        }
    }

    #[test]
    fn nothing_panics_on_json_shaped_garbage(text in r#"[{}\[\]",:a-z0-9 \\.\-]{0,300}"#) {
        let _ = fleet_core::locate_instance_id(text.as_bytes());
        let _ = Heartbeat::decode(text.as_bytes(), &Limits::default());
        let _ = Frame::decode(text.as_bytes());
    }

    #[test]
    fn locate_agrees_with_a_full_parse(id in "[^\"\\\\]{1,30}", other in "[a-z]{1,10}") {
        let body = serde_json::json!({ other: {"instance_id": "nested"}, "instance_id": id }).to_string();
        let located = fleet_core::locate_instance_id(body.as_bytes()).map(|c| c.into_owned());
        let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
        let expected = parsed["instance_id"].as_str().filter(|s| s.len() <= 128).map(str::to_owned);
        prop_assert_eq!(located, expected);
    }
}

// Heartbeat decoding: `decode`'s fast path against its slow path, which is the old `decode`.

/// What a field holds, to pick values for it that are plainly valid, or odd.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Id,
    Text,
    Flag,
    Count,
    Number,
    Time,
    Level,
    List(&'static Shape),
    Object(&'static Shape),
}

/// The fields of an object `decode` reads field by field, its required ones first.
#[derive(Debug)]
struct Shape {
    fields: &'static [(&'static str, Kind)],
    required: usize,
}

const HEARTBEAT: Shape = Shape {
    required: 5,
    fields: &[
        ("instance_id", Kind::Id),
        ("db_ok", Kind::Flag),
        ("redis_ok", Kind::Flag),
        ("storage_ok", Kind::Flag),
        ("jobs_failed", Kind::Count),
        ("domain", Kind::Text),
        ("client", Kind::Text),
        ("version", Kind::Text),
        ("release_channel", Kind::Text),
        ("health", Kind::Text),
        ("uptime_seconds", Kind::Number),
        ("search_ok", Kind::Flag),
        ("secrets_expired", Kind::Count),
        ("secrets_unverified", Kind::Count),
        ("slo_p95_ms", Kind::Number),
        ("slo_error_rate", Kind::Number),
        ("slo_webhook_retry_rate", Kind::Number),
        ("slo_updated_at", Kind::Time),
        ("last_backup_at", Kind::Time),
        ("backup_id", Kind::Text),
        ("backup_size_bytes", Kind::Count),
        ("backup_checksum", Kind::Text),
        ("backup_bucket", Kind::Text),
        ("backup_path", Kind::Text),
        ("backup_status", Kind::Text),
        ("cpu_usage_pct", Kind::Number),
        ("memory_used_bytes", Kind::Count),
        ("memory_total_bytes", Kind::Count),
        ("disk_used_bytes", Kind::Count),
        ("disk_total_bytes", Kind::Count),
        ("network_rx_bytes", Kind::Count),
        ("network_tx_bytes", Kind::Count),
        ("db_size_bytes", Kind::Count),
        ("storage_size_bytes", Kind::Count),
        ("jobs_processed_1h", Kind::Count),
        ("jobs_pending", Kind::Count),
        ("outbox_dropped", Kind::Count),
        ("alerts", Kind::List(&ALERT)),
        ("job_failures", Kind::List(&JOB_FAILURE)),
        ("checks", Kind::List(&CHECK)),
        ("containers", Kind::List(&CONTAINER)),
        ("host", Kind::Object(&HOST)),
    ],
};

const ALERT: Shape = Shape {
    required: 1,
    fields: &[("message", Kind::Text), ("level", Kind::Level)],
};

const JOB_FAILURE: Shape = Shape {
    required: 1,
    fields: &[("message", Kind::Text), ("queue", Kind::Text)],
};

const CHECK: Shape = Shape {
    required: 2,
    fields: &[
        ("name", Kind::Id),
        ("ok", Kind::Flag),
        ("latency_ms", Kind::Number),
        ("error", Kind::Text),
    ],
};

const CONTAINER: Shape = Shape {
    required: 1,
    fields: &[
        ("id", Kind::Id),
        ("name", Kind::Text),
        ("image", Kind::Text),
        ("state", Kind::Text),
        ("status", Kind::Text),
    ],
};

const HOST: Shape = Shape {
    required: 0,
    fields: &[
        ("hostname", Kind::Text),
        ("os", Kind::Text),
        ("arch", Kind::Text),
        ("cpu_count", Kind::Count),
        ("load_1m", Kind::Number),
        ("uptime_seconds", Kind::Count),
    ],
};

/// Date-times `is_rfc3339` accepts.
const GOOD_TIMES: &[&str] = &[
    "2026-11-22T02:00:00Z",
    "2026-02-11T02:00:00.000Z",
    "2026-02-11T02:00:00+01:00",
    "2026-02-11t02:00:00z",
    "2026-02-11 02:00:00.123456789-05:30",
    "2026-02-29T23:59:60Z",
    "2026-02-11T02:00:00.1234567890123456789Z",
];

/// Texts that are not RFC 3339 date-times, or only just are.
const ODD_TIMES: &[&str] = &[
    "",
    "yesterday",
    "2026-02-11",
    "2026-13-11T02:00:00Z",
    "2026-02-11T24:00:00Z",
    "2026-02-11T02:00:00",
    "2026-02-11T02:00:00.Z",
    "2026-02-11T02:00:00+1:00",
    "2026-02-11T02:00:00.12345678901234567890Z",
];

/// Number texts around every integer and range rule, in the spellings serde_json sees apart.
const EDGE_NUMBERS: &[&str] = &[
    "0",
    "1",
    "-0",
    "-0.0",
    "0.0",
    "3.0",
    "1.5",
    "-1",
    "-1.5",
    "1e3",
    "1E2",
    "1e-3",
    "2.5e2",
    "0.1e1",
    "100",
    "100.0",
    "100.000001",
    "101",
    "0.001",
    "1.0000000001",
    "1e6",
    "1000001",
    "1e9",
    "1000000000.5",
    "1e12",
    "1000000000001",
    "1e18",
    "1.1e18",
    "9e15",
    "8999999999999999",
    "8999999999999999.0",
    "9000000000000000",
    "9007199254740993",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775808",
    "-9223372036854775809",
    "1e308",
    "5e-324",
    "123456789012345678901234567890",
];

/// Texts that are not JSON values, or numbers serde_json refuses.
const JUNK: &[&str] = &[
    "1e400",
    "-1e400",
    "01",
    "1.",
    "-",
    ".5",
    "+1",
    "NaN",
    "Infinity",
    "1e",
    "0x10",
    "tru",
    "nul",
    "\"\\x\"",
    "\"\\ud800\"",
    "'a'",
];

/// Characters around the text and identifier rules: controls, whitespace, quotes.
const SPECIALS: &[char] = &[
    '\u{0}', '\u{1}', '\u{1f}', '\n', '\t', '\r', ' ', '\u{7f}', '\u{85}', '\u{a0}', '\u{2028}',
    '\u{3000}', '\u{feff}', '"', '\\',
];

/// A generated JSON text, and whether some object `decode` reads field by field repeats a key
/// in it (the one case where the fast path may decline a valid body).
#[derive(Debug, Clone)]
struct Json {
    text: String,
    repeats: bool,
}

impl Json {
    fn leaf(text: String) -> Self {
        Self {
            text,
            repeats: false,
        }
    }
}

/// `text` as a JSON string, either as serde_json writes it or with every character as a
/// `\u` escape (which the parser cannot lend out as it stands in the body).
fn quoted(text: &str, escape: bool) -> String {
    if !escape {
        return serde_json::to_string(text).expect("a string serializes");
    }
    let units: String = text.encode_utf16().map(|u| format!("\\u{u:04x}")).collect();
    format!("\"{units}\"")
}

fn leaves(texts: &'static [&'static str]) -> BoxedStrategy<String> {
    prop::sample::select(texts).prop_map(str::to_owned).boxed()
}

fn quoted_leaves(texts: &'static [&'static str]) -> BoxedStrategy<String> {
    (prop::sample::select(texts), any::<bool>())
        .prop_map(|(text, escape)| quoted(text, escape))
        .boxed()
}

/// Valid JSON numbers of every size and spelling.
fn numbers() -> BoxedStrategy<String> {
    prop_oneof![
        3 => leaves(EDGE_NUMBERS),
        1 => any::<u64>().prop_map(|n| n.to_string()),
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| format!("{f:e}")),
        1 => (-1.0e3f64..1.0e3).prop_map(|f| f.to_string()),
    ]
    .boxed()
}

/// Strings whose byte length is at or beside a limit, some with a special character.
fn edge_strings() -> BoxedStrategy<String> {
    let lengths = prop::sample::select(
        &[
            0usize, 1, 11, 12, 13, 15, 16, 17, 23, 24, 25, 39, 40, 41, 63, 64, 65, 127, 128, 129,
            252, 253, 254, 255, 256, 257, 1024, 1025,
        ][..],
    );
    let fill = prop::sample::select(&['a', 'é', '€', '😀'][..]);
    let special = prop::option::of((prop::sample::select(SPECIALS), any::<Index>()));
    (lengths, fill, special, any::<bool>())
        .prop_map(|(len, fill, special, escape)| {
            let mut text: String = std::iter::repeat_n(fill, len / fill.len_utf8()).collect();
            text.extend(std::iter::repeat_n('a', len % fill.len_utf8()));
            if let Some((c, at)) = special {
                let at = text
                    .char_indices()
                    .map(|(i, _)| i)
                    .chain([text.len()])
                    .collect::<Vec<_>>()[at.index(text.chars().count() + 1)];
                text.insert(at, c);
            }
            quoted(&text, escape)
        })
        .boxed()
}

/// Any JSON value, for unknown keys; `odd` adds deep nesting and huge numbers.
fn any_json(odd: bool) -> BoxedStrategy<String> {
    let number = if odd {
        numbers()
    } else {
        prop_oneof![
            (0u32..1000).prop_map(|n| n.to_string()),
            leaves(&["-1", "0.5", "-0", "1e3"])
        ]
        .boxed()
    };
    let leaf = prop_oneof![
        leaves(&["null", "true", "false"]),
        number,
        ("[a-z é]{0,5}", any::<bool>()).prop_map(|(s, escape)| quoted(&s, escape)),
    ];
    let tree = leaf.prop_recursive(3, 12, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3)
                .prop_map(|items| format!("[{}]", items.join(","))),
            // Nested unknown objects may repeat keys: both paths parse them as `Value`s.
            prop::collection::vec(("[a-c]{0,2}", inner), 0..3).prop_map(|entries| {
                let entries: Vec<String> = entries
                    .iter()
                    .map(|(k, v)| format!("{}:{v}", quoted(k, false)))
                    .collect();
                format!("{{{}}}", entries.join(","))
            }),
        ]
    });
    if !odd {
        return tree.boxed();
    }
    // Around serde_json's recursion limit of 128.
    let deep = prop::sample::select(&[125usize, 126, 127, 128, 129][..])
        .prop_map(|depth| format!("{}{}", "[".repeat(depth), "]".repeat(depth)));
    prop_oneof![30 => tree, 1 => deep].boxed()
}

/// Keys no shape knows.
fn unknown_key() -> BoxedStrategy<String> {
    prop_oneof![
        "x_[a-z0-9_]{0,6}",
        leaves(&[
            "events_total_1h",
            "primary_region",
            "iam_users",
            "",
            "é",
            "$ref",
            "_"
        ]),
    ]
    .boxed()
}

/// A value `decode` accepts for a field of `kind`, under the default and the small limits.
fn valid(kind: Kind) -> BoxedStrategy<Json> {
    let text = match kind {
        Kind::Id => ("[a-z0-9][a-z0-9._-]{0,11}", any::<bool>())
            .prop_map(|(s, escape)| quoted(&s, escape))
            .boxed(),
        Kind::Text => ("[a-zA-Z0-9 ._/é-]{0,6}", any::<bool>())
            .prop_map(|(s, escape)| quoted(&s, escape))
            .boxed(),
        Kind::Flag => leaves(&["true", "false"]),
        Kind::Count => prop_oneof![
            any::<u64>().prop_map(|n| n.to_string()),
            (0u32..1000).prop_map(|n| format!("{n}.0")),
            leaves(&["0", "-0", "1e3", "8999999999999999.0"]),
        ]
        .boxed(),
        Kind::Number => prop_oneof![
            (0.0f64..=1.0).prop_map(|f| f.to_string()),
            (0.0f64..=1.0).prop_map(|f| format!("{f:e}")),
            leaves(&["0", "1", "-0", "-0.0", "0.5", "1e-3", "1.0"]),
        ]
        .boxed(),
        Kind::Time => quoted_leaves(GOOD_TIMES),
        Kind::Level => quoted_leaves(&["info", "warning", "warn", "error", "critical"]),
        Kind::List(shape) => return list(shape, false),
        Kind::Object(shape) => return object(shape, false),
    };
    text.prop_map(Json::leaf).boxed()
}

/// A value for a field of `kind`: mostly valid, sometimes one of every odd kind.
fn mutated(kind: Kind) -> BoxedStrategy<Json> {
    let odd = prop_oneof![
        numbers(),
        edge_strings(),
        leaves(JUNK),
        leaves(&[
            "null",
            "true",
            "false",
            "\"\"",
            "[]",
            "{}",
            "[1]",
            "{\"a\":1}",
            "\"3\"",
            "[null]"
        ]),
        quoted_leaves(ODD_TIMES),
        quoted_leaves(&["panic", "INFO", "Warning", ""]),
    ]
    .prop_map(Json::leaf);
    match kind {
        Kind::List(shape) => {
            prop_oneof![10 => valid(kind), 3 => list(shape, true), 1 => odd].boxed()
        }
        Kind::Object(shape) => {
            prop_oneof![10 => valid(kind), 3 => object(shape, true), 1 => odd].boxed()
        }
        _ => prop_oneof![24 => valid(kind), 1 => odd].boxed(),
    }
}

/// A JSON array of objects of `shape` (`odd`: also too many, and items that are not objects).
fn list(shape: &'static Shape, odd: bool) -> BoxedStrategy<Json> {
    let item = if odd {
        prop_oneof![
            6 => object(shape, true),
            1 => leaves(&["null", "1", "\"x\"", "[]", "[{}]"]).prop_map(Json::leaf),
        ]
        .boxed()
    } else {
        object(shape, false)
    };
    prop::collection::vec(item, 0..=if odd { 4 } else { 2 })
        .prop_map(|items| Json {
            text: format!(
                "[{}]",
                items
                    .iter()
                    .map(|i| i.text.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            repeats: items.iter().any(|i| i.repeats),
        })
        .boxed()
}

/// `Some` of `strategy` with probability `p`, which may be 0 or 1.
fn sometimes<S>(p: f64, strategy: S) -> BoxedStrategy<Option<S::Value>>
where
    S: Strategy + 'static,
    S::Value: Clone,
{
    match p {
        0.0 => Just(None).boxed(),
        1.0 => strategy.prop_map(Some).boxed(),
        p => prop::option::weighted(p, strategy).boxed(),
    }
}

/// A JSON object of `shape` with some unknown keys, in any order, with known keys sometimes
/// `\u`-escaped. Valid unless `odd`, which also leaves out required fields, repeats keys and
/// adds more unknown keys than the small limits allow.
fn object(shape: &'static Shape, odd: bool) -> BoxedStrategy<Json> {
    let known: Vec<_> = shape
        .fields
        .iter()
        .enumerate()
        .map(|(i, &(name, kind))| {
            let required = i < shape.required;
            let (present, value) = match (odd, required) {
                (true, true) => (0.98, mutated(kind)),
                (true, false) => (
                    0.5,
                    prop_oneof![4 => mutated(kind), 1 => Just(Json::leaf("null".into()))].boxed(),
                ),
                (false, true) => (1.0, valid(kind)),
                (false, false) => (
                    0.5,
                    prop_oneof![4 => valid(kind), 1 => Just(Json::leaf("null".into()))].boxed(),
                ),
            };
            sometimes(present, (Just(name.to_owned()), value))
        })
        .collect();
    let unknown = prop::collection::btree_map(
        unknown_key(),
        any_json(odd).prop_map(Json::leaf),
        0..=if odd { 4 } else { 2 },
    );
    // A key written again, with another value or the same one.
    let repeat = sometimes(
        if odd { 0.15 } else { 0.0 },
        (
            any::<Index>(),
            prop::option::of(prop_oneof![
                numbers(),
                edge_strings(),
                leaves(&["null", "true", "[]"])
            ]),
        ),
    );
    (known, unknown, repeat)
        .prop_flat_map(|(known, unknown, repeat)| {
            let mut entries: Vec<(String, Json)> =
                known.into_iter().flatten().chain(unknown).collect();
            let mut repeats = false;
            if let Some((at, value)) = repeat
                && !entries.is_empty()
            {
                let (key, first) = entries[at.index(entries.len())].clone();
                entries.push((key, value.map(Json::leaf).unwrap_or(first)));
                repeats = true;
            }
            let escapes = prop::collection::vec(prop::bool::weighted(0.1), entries.len());
            (Just(entries).prop_shuffle(), escapes, Just(repeats))
        })
        .prop_map(|(entries, escapes, repeats)| Json {
            text: format!(
                "{{{}}}",
                entries
                    .iter()
                    .zip(escapes)
                    .map(|((key, value), escape)| format!(
                        "{}: {}",
                        quoted(key, escape),
                        value.text
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            repeats: repeats || entries.iter().any(|(_, value)| value.repeats),
        })
        .boxed()
}

/// Bodies around the heartbeat: mostly objects of its shape, sometimes cut short, followed by
/// more text, broken by a byte that is not UTF-8, or another JSON value altogether.
fn heartbeat_bodies() -> impl Strategy<Value = (Vec<u8>, bool)> {
    let hb = object(&HEARTBEAT, true);
    prop_oneof![
        12 => hb.clone().prop_map(|j| (j.text.into_bytes(), j.repeats)),
        1 => hb.clone().prop_map(|j| (format!(" \n\t{}\r\n", j.text).into_bytes(), j.repeats)),
        1 => (hb.clone(), any::<Index>()).prop_map(|(j, at)| {
            let mut body = j.text.into_bytes();
            body.truncate(at.index(body.len() + 1));
            (body, j.repeats)
        }),
        1 => (hb.clone(), leaves(&["x", "}", ",", "{}", "null", "\u{0}"])).prop_map(|(j, tail)| {
            (format!("{}{tail}", j.text).into_bytes(), j.repeats)
        }),
        1 => (hb, any::<Index>()).prop_map(|(j, at)| {
            let mut body = j.text.into_bytes();
            body.insert(at.index(body.len() + 1), 0xff);
            (body, j.repeats)
        }),
        1 => any_json(true).prop_map(|text| (text.into_bytes(), false)),
    ]
}

/// Limits small enough for generated bodies to cross them.
fn small_limits() -> Limits {
    Limits {
        max_id_len: 12,
        max_text_len: 24,
        max_message_len: 40,
        max_alerts: 2,
        max_job_failures: 2,
        max_checks: 3,
        max_containers: 2,
        max_extra_keys: 3,
        ..Limits::default()
    }
}

/// The default or the small limits; unless `roomy`, now and then a body limit that generated
/// bodies cross.
fn heartbeat_limits(roomy: bool) -> BoxedStrategy<Limits> {
    let limits = prop_oneof![Just(Limits::default()), Just(small_limits())];
    if roomy {
        return limits.boxed();
    }
    let body = prop_oneof![18 => Just(None), 1 => Just(Some(40)), 1 => Just(Some(400))];
    (limits, body)
        .prop_map(|(limits, body)| Limits {
            max_body_bytes: body.unwrap_or(limits.max_body_bytes),
            ..limits
        })
        .boxed()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// `decode` returns exactly what the slow path (the old `decode`) returns, and the fast path
    /// never accepts what the slow path refuses nor builds another heartbeat.
    #[test]
    fn heartbeat_decode_matches_the_slow_path((body, repeats) in heartbeat_bodies(),
                                              limits in heartbeat_limits(false)) {
        let slow = Heartbeat::decode_slow(&body, &limits);
        prop_assert_eq!(Heartbeat::decode(&body, &limits), slow.clone());
        match (Heartbeat::decode_fast(&body, &limits), slow) {
            (Some(fast), Ok(slow)) => {
                // Also byte for byte, which tells -0.0 from 0.0.
                prop_assert_eq!(fast.to_vec(), slow.to_vec());
                prop_assert_eq!(fast, slow);
            }
            (Some(fast), Err(slow)) => prop_assert!(false, "fast path accepted {fast:?}, slow path said {slow:?}"),
            // Only a repeated key whose earlier value is invalid may send a valid body slow.
            (None, Ok(_)) => prop_assert!(repeats, "the fast path declined a valid body"),
            (None, Err(_)) => {}
        }
    }

    /// Valid heartbeats of every shape take the fast path, so it is not silently always
    /// falling back.
    #[test]
    fn valid_heartbeats_take_the_fast_path(hb in object(&HEARTBEAT, false),
                                           limits in heartbeat_limits(true)) {
        let body = hb.text.as_bytes();
        let slow = Heartbeat::decode_slow(body, &limits);
        prop_assert!(slow.is_ok(), "the generator made an invalid heartbeat: {:?}", slow);
        let fast = Heartbeat::decode_fast(body, &limits);
        prop_assert_eq!(fast.as_ref().map(Heartbeat::to_vec), slow.as_ref().ok().map(Heartbeat::to_vec));
        prop_assert_eq!(fast.as_ref(), slow.as_ref().ok());
    }
}

#[test]
fn the_erp_heartbeat_takes_the_fast_path() {
    let body = br#"{"instance_id": "bench-00001", "domain": "bench-00001.example.com", "client": "Bench SA", "version": "2.0.1", "release_channel": "stable", "health": "ok", "db_ok": true, "redis_ok": true, "storage_ok": true, "search_ok": true, "jobs_failed": 0, "uptime_seconds": 3601, "cpu_usage_pct": 1.0, "memory_used_bytes": 4000000001, "memory_total_bytes": 8000000000, "disk_used_bytes": 50000000000, "disk_total_bytes": 100000000000, "slo_p95_ms": 120.0, "slo_error_rate": 0.001, "jobs_processed_1h": 420, "jobs_pending": 3, "last_backup_at": "2026-11-22T02:00:00Z", "backup_checksum": "sha256-abc", "backup_status": "ok", "checks": [{"name": "db", "ok": true, "latency_ms": 2.1}, {"name": "redis", "ok": true, "latency_ms": 0.3}, {"name": "storage", "ok": true, "latency_ms": 8.0}], "primary_region": "eu-west-1"}"#;
    let limits = Limits::default();
    let fast = Heartbeat::decode_fast(body, &limits).expect("the fast path accepts it");
    assert_eq!(Ok(fast), Heartbeat::decode_slow(body, &limits));
}

/// The valid value `edited` gives a field of `kind`.
fn plain(kind: Kind) -> String {
    match kind {
        Kind::Id => "\"a1\"".into(),
        Kind::Text => "\"Acme SA\"".into(),
        Kind::Flag => "true".into(),
        Kind::Count => "1".into(),
        Kind::Number => "0.5".into(),
        Kind::Time => "\"2026-11-22T02:00:00Z\"".into(),
        Kind::Level => "\"warn\"".into(),
        Kind::List(shape) => format!("[{}]", edited(shape, &[], &|_| {})),
        Kind::Object(shape) => edited(shape, &[], &|_| {}),
    }
}

/// A valid object of `shape` with every field, except that `edit` changes the entries of the
/// object at `path` (indexes of list or object fields, level by level; empty: this one).
fn edited(shape: &'static Shape, path: &[usize], edit: &dyn Fn(&mut Vec<String>)) -> String {
    let mut entries: Vec<String> = shape
        .fields
        .iter()
        .enumerate()
        .map(|(i, &(name, kind))| {
            let value = match (path, kind) {
                ([at, rest @ ..], Kind::List(inner)) if *at == i => {
                    format!("[{}]", edited(inner, rest, edit))
                }
                ([at, rest @ ..], Kind::Object(inner)) if *at == i => edited(inner, rest, edit),
                _ => plain(kind),
            };
            format!("{}: {value}", quoted(name, false))
        })
        .collect();
    if path.is_empty() {
        edit(&mut entries);
    }
    format!("{{{}}}", entries.join(", "))
}

/// Values at every edge: every number spelling, every type, strings at and beside every
/// length limit, special characters, date-times and alert levels.
fn edge_values() -> Vec<String> {
    let mut values: Vec<String> = EDGE_NUMBERS.iter().map(|n| n.to_string()).collect();
    values.extend(
        [
            "null", "true", "false", "\"\"", "[]", "{}", "[1]", "[null]", "[{}]", "\"3\"",
        ]
        .map(str::to_owned),
    );
    let texts = GOOD_TIMES.iter().chain(ODD_TIMES);
    let texts = texts.chain(&[
        "info", "warning", "warn", "error", "critical", "panic", "INFO",
    ]);
    values.extend(texts.map(|text| quoted(text, false)));
    for len in [
        1, 11, 12, 13, 15, 16, 17, 23, 24, 25, 39, 40, 41, 63, 64, 65, 127, 128, 129, 252, 253,
        254, 255, 256, 257, 1023, 1024, 1025, 8191, 8192, 8193,
    ] {
        values.push(quoted(&"a".repeat(len), false));
        // Two bytes a character: the limits count bytes.
        values.push(quoted(
            &format!("{}{}", "é".repeat(len / 2), "a".repeat(len % 2)),
            true,
        ));
    }
    values.extend(SPECIALS.iter().map(|c| quoted(&format!("a{c}b"), false)));
    values
}

/// Every field of every object `decode` reads, at every edge, under the default and the small
/// limits: also without each field, with unknown keys around `max_extra_keys` and with lists
/// around their length limits. `decode` agrees with the slow path, and the fast path accepts
/// exactly the bodies the slow path accepts.
#[test]
fn every_field_at_every_edge_decodes_as_the_slow_path() {
    let limit_sets = [Limits::default(), small_limits()];
    let mut bodies = Vec::new();
    let mut objects = vec![(&HEARTBEAT, vec![])];
    for (i, &(_, kind)) in HEARTBEAT.fields.iter().enumerate() {
        if let Kind::List(shape) | Kind::Object(shape) = kind {
            objects.push((shape, vec![i]));
        }
    }
    let values = edge_values();
    for (shape, path) in &objects {
        for (i, &(name, kind)) in shape.fields.iter().enumerate() {
            bodies.push(edited(&HEARTBEAT, path, &|entries| {
                entries.remove(i);
            }));
            for value in &values {
                bodies.push(edited(&HEARTBEAT, path, &|entries| {
                    entries[i] = format!("{}: {value}", quoted(name, false));
                }));
            }
            if let Kind::List(inner) = kind {
                for len in [0, 2, 3, 4, 64, 65, 100, 101, 200, 201, 500, 501] {
                    let items = vec![plain(Kind::Object(inner)); len].join(",");
                    bodies.push(edited(&HEARTBEAT, path, &|entries| {
                        entries[i] = format!("{}: [{items}]", quoted(name, false));
                    }));
                }
            }
        }
        for count in [3, 4, 128, 129] {
            bodies.push(edited(&HEARTBEAT, path, &|entries| {
                entries.extend((0..count).map(|k| format!("\"x_{k}\": {k}")));
            }));
        }
    }
    let mut accepted = 0;
    for body in &bodies {
        for limits in &limit_sets {
            let slow = Heartbeat::decode_slow(body.as_bytes(), limits);
            let fast = Heartbeat::decode_fast(body.as_bytes(), limits);
            assert_eq!(Heartbeat::decode(body.as_bytes(), limits), slow, "{body}");
            assert_eq!(
                fast.as_ref().map(Heartbeat::to_vec),
                slow.as_ref().ok().map(Heartbeat::to_vec),
                "{body}"
            );
            assert_eq!(fast.as_ref(), slow.as_ref().ok(), "{body}");
            accepted += usize::from(fast.is_some());
        }
    }
    // Most edge values have the wrong type for most fields, but the valid ones (about one
    // decode in four) take the fast path.
    let decodes = bodies.len() * limit_sets.len();
    assert!(accepted * 6 > decodes, "{accepted} of {decodes}");
}
