//! Every entry of `tests/vectors/*.json` must hold for the Rust implementation.

use fleet_core::signing::{DEFAULT_TOLERANCE_SECS, verify_v0, verify_v1};
use fleet_core::{
    DecodeError, Heartbeat, Limits, ManifestVerifier, PublicKey, Secret, SecretResolver,
    SignatureHeaders, Verifier,
};
use serde_json::Value;

fn load(name: &str) -> Vec<Value> {
    let path = format!("{}/../tests/vectors/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    serde_json::from_str(&text).expect("vectors are JSON")
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} is a string in {v}"))
}

fn headers_of<'a>(case: &'a Value, timestamp: &'a Option<String>) -> SignatureHeaders<'a> {
    if case["scheme"] == "v0" {
        SignatureHeaders {
            v0_signature: case["signature"].as_str(),
            ..Default::default()
        }
    } else {
        SignatureHeaders {
            webhook_id: case["msg_id"].as_str(),
            webhook_timestamp: timestamp.as_deref(),
            webhook_signature: case["signature"].as_str(),
            ..Default::default()
        }
    }
}

#[test]
fn signing_vectors_hold_with_a_direct_secret() {
    let cases = load("signing.json");
    assert!(cases.len() >= 20, "expected the full vector set");
    for case in &cases {
        let secret = Secret::new(str_of(case, "secret")).expect("secret");
        let body = str_of(case, "body").as_bytes();
        let ts = case["timestamp"].as_i64().map(|t| t.to_string());
        let headers = headers_of(case, &ts);
        let now = case["now"].as_i64().expect("now");
        let got = match str_of(case, "scheme") {
            "v0" => verify_v0(&secret, body, str_of(case, "signature")),
            _ => verify_v1(
                std::slice::from_ref(&secret),
                body,
                &headers,
                now,
                DEFAULT_TOLERANCE_SECS,
            ),
        };
        assert_eq!(got.is_ok(), case["valid"] == true, "{}", case["name"]);
        assert_eq!(
            got.err().map(|e| e.kind()),
            case["error"].as_str(),
            "{}",
            case["name"]
        );
    }
}

#[test]
fn signing_vectors_hold_through_the_verifier_entry_point() {
    // The same vectors through Verifier: instance id located in the body, secret resolved
    // by instance id. Only vectors whose body names an instance apply.
    for case in load("signing.json") {
        let body = str_of(&case, "body").as_bytes();
        let Some(instance) = fleet_core::locate_instance_id(body) else {
            continue;
        };
        let secrets = serde_json::json!({ instance.as_ref(): str_of(&case, "secret") }).to_string();
        let verifier =
            Verifier::new(SecretResolver::from_config(Some(&secrets), None).expect("config"));
        let ts = case["timestamp"].as_i64().map(|t| t.to_string());
        let got = verifier.verify(
            body,
            &headers_of(&case, &ts),
            case["now"].as_i64().expect("now"),
        );
        assert_eq!(
            got.as_ref().err().map(|e| e.kind()),
            case["error"].as_str(),
            "{}",
            case["name"]
        );
        if let Ok(verified) = got {
            assert_eq!(verified.instance_id, instance);
        }
    }
}

#[test]
fn heartbeat_vectors_report_the_expected_paths() {
    for case in load("heartbeats.json") {
        let expected: Vec<&str> = case["error_paths"]
            .as_array()
            .expect("paths")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let got: Vec<String> =
            match Heartbeat::decode(str_of(&case, "body").as_bytes(), &Limits::default()) {
                Ok(_) => vec![],
                Err(DecodeError::Invalid(e)) => e.violations.into_iter().map(|v| v.path).collect(),
                Err(other) => panic!("{}: {other}", case["name"]),
            };
        assert_eq!(got, expected, "{}", case["name"]);
        assert_eq!(
            expected.is_empty(),
            case["valid"] == true,
            "{}",
            case["name"]
        );
    }
}

#[test]
fn manifest_vectors_hold() {
    for case in load("manifests.json") {
        let keys = case["public_keys"]
            .as_array()
            .expect("keys")
            .iter()
            .map(|k| PublicKey::from_base64(k.as_str().expect("key")).expect("valid key"))
            .collect();
        let mut verifier = ManifestVerifier::new(keys);
        if let Some(secret) = case["hmac_secret"].as_str() {
            verifier = verifier.with_hmac_secret(Secret::new(secret).expect("secret"));
        }
        let got = verifier.verify_value(&case["manifest"]);
        assert_eq!(
            got.as_ref().err().map(|e| e.kind()),
            case["error"].as_str(),
            "{}",
            case["name"]
        );
        let mut unsigned = case["manifest"].as_object().cloned().expect("object");
        for field in fleet_core::manifest::SIGNATURE_FIELDS {
            unsigned.remove(field);
        }
        assert_eq!(
            fleet_core::canonical::to_canonical_string(&Value::Object(unsigned)),
            str_of(&case, "canonical")
        );
    }
}

#[test]
fn v0_and_v1_match_openssl() {
    // An implementation we did not write: the openssl command line.
    let check = |key: &str, data: &[u8]| -> Vec<u8> {
        use std::io::Write;
        let mut child = std::process::Command::new("openssl")
            .args(["dgst", "-sha256", "-hmac", key, "-binary"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("openssl is installed");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(data)
            .expect("write");
        child.wait_with_output().expect("openssl runs").stdout
    };
    let cases = load("signing.json");
    let v0 = cases
        .iter()
        .find(|c| c["scheme"] == "v0" && c["valid"] == true)
        .expect("a valid v0 vector");
    let mac = check(str_of(v0, "secret"), str_of(v0, "body").as_bytes());
    assert_eq!(hex::encode(mac), str_of(v0, "signature"));
    let v1 = cases
        .iter()
        .find(|c| {
            c["scheme"] == "v1" && c["valid"] == true && !str_of(c, "secret").starts_with("whsec_")
        })
        .expect("a valid v1 vector");
    let signed = format!(
        "{}.{}.{}",
        str_of(v1, "msg_id"),
        v1["timestamp"],
        str_of(v1, "body")
    );
    let mac = check(str_of(v1, "secret"), signed.as_bytes());
    use base64::Engine;
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac)
    );
    assert_eq!(expected, str_of(v1, "signature"));
}
