//! Writes the shared test vectors in `tests/vectors/`, which every language's tests load.
//!
//! Each case states what it expects (valid or the error kind); the generator checks that
//! fleet-core agrees before writing, so a vector never records a bug by accident.
//!
//! ```sh
//! cargo run -p fleet-examples --example generate_vectors           # rewrite the files
//! cargo run -p fleet-examples --example generate_vectors -- --check # fail on any drift
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use fleet_core::canonical::to_canonical_string;
use fleet_core::manifest::sign_manifest_hmac;
use fleet_core::signing::{DEFAULT_TOLERANCE_SECS, verify_v0, verify_v1};
use fleet_core::{
    Heartbeat, Limits, ManifestVerifier, PrivateKey, Secret, SignatureHeaders, Signer,
};
use serde_json::{Value, json};

const NOW: i64 = 1_767_225_600; // 2026-01-01T00:00:00Z

fn main() -> ExitCode {
    let check = std::env::args().any(|a| a == "--check");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/vectors");
    let files = [
        ("signing.json", signing_vectors()),
        ("heartbeats.json", heartbeat_vectors()),
        ("manifests.json", manifest_vectors()),
    ];
    let mut drift = Vec::new();
    for (name, vectors) in files {
        let text = serde_json::to_string_pretty(&vectors).expect("vectors serialize") + "\n";
        let path = dir.join(name);
        if check {
            if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                drift.push(path);
            }
        } else {
            write(&path, &text);
        }
    }
    if drift.is_empty() {
        if !check {
            println!("wrote {}", dir.display());
        }
        ExitCode::SUCCESS
    } else {
        for path in drift {
            eprintln!(
                "out of date: {} (run: cargo run -p fleet-examples --example generate_vectors)",
                path.display()
            );
        }
        ExitCode::FAILURE
    }
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().expect("has parent")).expect("create vectors dir");
    std::fs::write(path, text).expect("write vectors");
}

fn secret(text: &str) -> Secret {
    Secret::new(text).expect("valid secret")
}

const ERP_BODY: &str = r#"{"instance_id":"acme-001","domain":"acme.com","client":"Acme SA","version":"1.2.3","release_channel":"stable","health":"ok","db_ok":true,"redis_ok":true,"storage_ok":true,"jobs_failed":0,"backup_status":"ok","last_backup_at":"2026-02-11T02:00:00Z","alerts":[{"level":"warning","message":"Low disk"}],"job_failures":[{"queue":"billing","message":"Timeout"}]}"#;

struct SigningCase {
    name: &'static str,
    scheme: &'static str,
    secret: &'static str,
    body: String,
    msg_id: Option<&'static str>,
    timestamp: Option<i64>,
    signature: String,
    error: Option<&'static str>,
    /// The verifier's clock; the timestamp itself unless the case is about time.
    now: i64,
}

fn signing_vectors() -> Value {
    let agent = "agent-secret-acme";
    let whsec = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let v0 = |s: &str, body: &str| fleet_core::sign_v0(&secret(s), body.as_bytes());
    let v1 = |s: &str, id: &str, ts: i64, body: &str| {
        Signer::new(secret(s)).sign(id, ts, body.as_bytes())
    };
    let unicode = r#"{"instance_id":"filial-são-paulo","client":"Café Ñandú 🚀","db_ok":true,"redis_ok":true,"storage_ok":true,"jobs_failed":2}"#;
    let good_v0 = v0(agent, ERP_BODY);
    let good_v1 = v1(agent, "msg_2a7Jd1", NOW, ERP_BODY);
    let case = |name, scheme, secret, body: &str, msg_id, timestamp, signature: String, error| {
        SigningCase {
            name,
            scheme,
            secret,
            body: body.to_owned(),
            msg_id,
            timestamp,
            signature,
            error,
            now: timestamp.unwrap_or(NOW),
        }
    };
    let cases = vec![
        case(
            "v0 ERP payload",
            "v0",
            agent,
            ERP_BODY,
            None,
            None,
            good_v0.clone(),
            None,
        ),
        case(
            "v0 non-ASCII body",
            "v0",
            agent,
            unicode,
            None,
            None,
            v0(agent, unicode),
            None,
        ),
        case(
            "v0 empty object",
            "v0",
            "k",
            "{}",
            None,
            None,
            v0("k", "{}"),
            None,
        ),
        case(
            "v0 uppercase hex is the same signature",
            "v0",
            agent,
            ERP_BODY,
            None,
            None,
            good_v0.to_uppercase(),
            None,
        ),
        case(
            "v0 tampered body",
            "v0",
            agent,
            &ERP_BODY.replace("\"jobs_failed\":0", "\"jobs_failed\":9"),
            None,
            None,
            good_v0.clone(),
            Some("signature_mismatch"),
        ),
        case(
            "v0 wrong secret",
            "v0",
            agent,
            ERP_BODY,
            None,
            None,
            v0("another-secret", ERP_BODY),
            Some("signature_mismatch"),
        ),
        case(
            "v0 wrong length",
            "v0",
            agent,
            ERP_BODY,
            None,
            None,
            good_v0[..62].to_owned(),
            Some("malformed_header"),
        ),
        case(
            "v0 empty signature",
            "v0",
            agent,
            ERP_BODY,
            None,
            None,
            String::new(),
            Some("malformed_header"),
        ),
        case(
            "v0 not hexadecimal",
            "v0",
            agent,
            ERP_BODY,
            None,
            None,
            format!("zz{}", &good_v0[2..]),
            Some("malformed_header"),
        ),
        case(
            "v1 ERP payload",
            "v1",
            agent,
            ERP_BODY,
            Some("msg_2a7Jd1"),
            Some(NOW),
            good_v1.clone(),
            None,
        ),
        case(
            "v1 whsec secret (Standard Webhooks example)",
            "v1",
            whsec,
            r#"{"test": 2432232314}"#,
            Some("msg_p5jXN8AQM9LWM0D4loKWxJek"),
            Some(1_614_265_330),
            v1(
                whsec,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                r#"{"test": 2432232314}"#,
            ),
            None,
        ),
        case(
            "v1 non-ASCII body",
            "v1",
            agent,
            unicode,
            Some("msg_u1"),
            Some(NOW - 10),
            v1(agent, "msg_u1", NOW - 10, unicode),
            None,
        ),
        case(
            "v1 tampered body",
            "v1",
            agent,
            &ERP_BODY.replace("acme.com", "evil.com"),
            Some("msg_2a7Jd1"),
            Some(NOW),
            good_v1.clone(),
            Some("signature_mismatch"),
        ),
        case(
            "v1 wrong secret",
            "v1",
            agent,
            ERP_BODY,
            Some("msg_2a7Jd1"),
            Some(NOW),
            v1("another-secret", "msg_2a7Jd1", NOW, ERP_BODY),
            Some("signature_mismatch"),
        ),
        case(
            "v1 signature for another message id",
            "v1",
            agent,
            ERP_BODY,
            Some("msg_other"),
            Some(NOW),
            good_v1.clone(),
            Some("signature_mismatch"),
        ),
        case(
            "v1 expired timestamp",
            "v1",
            agent,
            ERP_BODY,
            Some("msg_old"),
            Some(NOW - DEFAULT_TOLERANCE_SECS - 1),
            v1(agent, "msg_old", NOW - DEFAULT_TOLERANCE_SECS - 1, ERP_BODY),
            Some("timestamp_out_of_tolerance"),
        ),
        case(
            "v1 future timestamp",
            "v1",
            agent,
            ERP_BODY,
            Some("msg_future"),
            Some(NOW + DEFAULT_TOLERANCE_SECS + 1),
            v1(
                agent,
                "msg_future",
                NOW + DEFAULT_TOLERANCE_SECS + 1,
                ERP_BODY,
            ),
            Some("timestamp_out_of_tolerance"),
        ),
        case(
            "v1 timestamp exactly at the tolerance",
            "v1",
            agent,
            ERP_BODY,
            Some("msg_edge"),
            Some(NOW - DEFAULT_TOLERANCE_SECS),
            v1(agent, "msg_edge", NOW - DEFAULT_TOLERANCE_SECS, ERP_BODY),
            None,
        ),
        case(
            "v1 one bad and one good signature",
            "v1",
            agent,
            ERP_BODY,
            Some("msg_2a7Jd1"),
            Some(NOW),
            format!(
                "{} {}",
                v1("rotated-out-secret", "msg_2a7Jd1", NOW, ERP_BODY),
                good_v1
            ),
            None,
        ),
        case(
            "v1 only unknown versions",
            "v1",
            agent,
            ERP_BODY,
            Some("msg_2a7Jd1"),
            Some(NOW),
            format!("v2,{} v1a,{}", &good_v1[3..], &good_v1[3..]),
            Some("signature_mismatch"),
        ),
        case(
            "v1 entry that is not base64",
            "v1",
            agent,
            ERP_BODY,
            Some("msg_2a7Jd1"),
            Some(NOW),
            "v1,not*base64!".to_owned(),
            Some("signature_mismatch"),
        ),
        case(
            "v1 missing message id",
            "v1",
            agent,
            ERP_BODY,
            None,
            Some(NOW),
            good_v1.clone(),
            Some("missing_header"),
        ),
        case(
            "v1 missing timestamp",
            "v1",
            agent,
            ERP_BODY,
            Some("msg_2a7Jd1"),
            None,
            good_v1,
            Some("missing_header"),
        ),
    ];
    let time_cases = [
        "v1 expired timestamp",
        "v1 future timestamp",
        "v1 timestamp exactly at the tolerance",
        "v1 non-ASCII body",
    ];
    Value::Array(
        cases
            .into_iter()
            .map(|mut case| {
                if time_cases.contains(&case.name) {
                    case.now = NOW;
                }
                signing_case_json(case)
            })
            .collect(),
    )
}

fn signing_case_json(case: SigningCase) -> Value {
    let key = secret(case.secret);
    let body = case.body.as_bytes();
    let got = match case.scheme {
        "v0" => verify_v0(&key, body, &case.signature),
        _ => {
            let ts = case.timestamp.map(|t| t.to_string());
            let headers = SignatureHeaders {
                webhook_id: case.msg_id,
                webhook_timestamp: ts.as_deref(),
                webhook_signature: Some(&case.signature),
                ..Default::default()
            };
            verify_v1(
                std::slice::from_ref(&key),
                body,
                &headers,
                case.now,
                DEFAULT_TOLERANCE_SECS,
            )
        }
    };
    let got_kind = got.as_ref().err().map(|e| e.kind());
    assert_eq!(
        got_kind, case.error,
        "vector {:?}: fleet-core disagrees with the stated expectation",
        case.name
    );
    json!({
        "name": case.name,
        "scheme": case.scheme,
        "secret": case.secret,
        "body": case.body,
        "msg_id": case.msg_id,
        "timestamp": case.timestamp,
        "now": case.now,
        "signature": case.signature,
        "valid": case.error.is_none(),
        "error": case.error,
    })
}

fn heartbeat_vectors() -> Value {
    let base = r#""db_ok":true,"redis_ok":true,"storage_ok":true,"jobs_failed":0"#;
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        ("ERP example payload", ERP_BODY.to_owned(), vec![]),
        ("required fields only", format!(r#"{{"instance_id":"i-1",{base}}}"#), vec![]),
        (
            "optional fields as null",
            format!(r#"{{"instance_id":"i-1",{base},"last_backup_at":null,"slo_p95_ms":null,"alerts":null,"version":null}}"#),
            vec![],
        ),
        (
            "unknown keys are kept",
            format!(
                r#"{{"instance_id":"i-1",{base},"primary_region":"sa-east-1","regional_health":[{{"region":"x","ok":true}}],"feature_usage":{{"pos":3}},"iam_users":4,"events_total_1h":10}}"#
            ),
            vec![],
        ),
        (
            "full agent payload with extensions",
            format!(
                r#"{{"instance_id":"edge-7",{base},"uptime_seconds":3600.5,"search_ok":true,"secrets_expired":1,"secrets_unverified":0,"slo_p95_ms":180.2,"slo_error_rate":0.01,"slo_webhook_retry_rate":0.2,"slo_updated_at":"2026-11-01T10:00:00.000Z","backup_id":"b-1","backup_size_bytes":1048576,"backup_checksum":"sha256:ab","cpu_usage_pct":12.5,"memory_used_bytes":1,"memory_total_bytes":2,"disk_used_bytes":3,"disk_total_bytes":4,"network_rx_bytes":5,"network_tx_bytes":6,"checks":[{{"name":"db","ok":true,"latency_ms":1.2}},{{"name":"redis","ok":false,"error":"connection refused"}}],"containers":[{{"id":"abc","name":"web","image":"localhost/web:1","state":"running"}}],"host":{{"hostname":"edge-7","os":"linux","arch":"x86_64","cpu_count":2}}}}"#
            ),
            vec![],
        ),
        ("not an object", "[1,2]".to_owned(), vec![""]),
        ("not JSON", "{\"instance_id\":".to_owned(), vec![""]),
        ("empty object", "{}".to_owned(), vec!["instance_id", "db_ok", "redis_ok", "storage_ok", "jobs_failed"]),
        (
            "wrong types",
            r#"{"instance_id":42,"db_ok":"yes","redis_ok":1,"storage_ok":true,"jobs_failed":"0"}"#.to_owned(),
            vec!["instance_id", "db_ok", "redis_ok", "jobs_failed"],
        ),
        (
            "bad nested items",
            format!(
                r#"{{"instance_id":"i-1",{base},"alerts":[{{"level":"info","message":"ok"}},{{"level":"loud","message":"x"}},"text"],"job_failures":[{{"queue":"q","message":"m"}},{{"queue":"q"}},{{"message":"m"}}]}}"#
            ),
            vec!["alerts[1].level", "alerts[2]", "job_failures[1].message"],
        ),
        (
            "out of range numbers",
            format!(r#"{{"instance_id":"i-1",{base},"cpu_usage_pct":130,"slo_error_rate":1.5,"secrets_expired":-2}}"#),
            vec!["secrets_expired", "slo_error_rate", "cpu_usage_pct"],
        ),
        (
            "bad timestamp and whitespace in id",
            r#"{"instance_id":"acme 001","db_ok":true,"redis_ok":true,"storage_ok":true,"jobs_failed":0,"last_backup_at":"yesterday"}"#.to_owned(),
            vec!["instance_id", "last_backup_at"],
        ),
        (
            "too many alerts",
            format!(r#"{{"instance_id":"i-1",{base},"alerts":[{}]}}"#, vec![r#"{"message":"m"}"#; 101].join(",")),
            vec!["alerts"],
        ),
        (
            "string longer than its limit",
            format!(r#"{{"instance_id":"{}",{base}}}"#, "i".repeat(129)),
            vec!["instance_id"],
        ),
    ];
    let limits = Limits::default();
    Value::Array(
        cases
            .into_iter()
            .map(|(name, body, paths)| {
                let got: Vec<String> = match Heartbeat::decode(body.as_bytes(), &limits) {
                    Ok(_) => Vec::new(),
                    Err(fleet_core::DecodeError::Invalid(e)) => e.violations.into_iter().map(|v| v.path).collect(),
                    Err(other) => panic!("vector {name:?}: unexpected {other}"),
                };
                assert_eq!(got, paths, "vector {name:?}: fleet-core disagrees with the stated error paths");
                json!({ "name": name, "body": body, "valid": paths.is_empty(), "error_paths": paths })
            })
            .collect(),
    )
}

fn manifest_vectors() -> Value {
    let key = PrivateKey::from_seed([42; 32]);
    let other = PrivateKey::from_seed([43; 32]);
    let hmac_secret = "release-signing-secret";
    let manifest = json!({
        "version": "1.4.0",
        "sha": "9f2c1e7",
        "channel": "stable",
        "migrations_required": true,
        "breaking_changes": false,
        "released_at": "2026-11-01T10:00:00Z",
        "artifacts": [{"url": "https://releases.example.com/erp-1.4.0.tar.gz", "sha256": "a".repeat(64)}]
    });
    let signed = key.sign_value(&manifest).expect("sign");
    let mut tampered = signed.clone();
    tampered["version"] = json!("1.4.1");
    let by_other = other.sign_value(&manifest).expect("sign");
    let mut bad_encoding = signed.clone();
    bad_encoding["signature"] = json!("c2hvcnQ=");
    let mut extra = manifest.clone();
    extra["notes"] = json!("Ünïcödé release notes ✓");
    let signed_extra = key.sign_value(&extra).expect("sign");
    let mut legacy = manifest.clone();
    legacy.as_object_mut().expect("object").remove("artifacts");
    legacy["signature"] = json!(sign_manifest_hmac(&secret(hmac_secret), &legacy).expect("sign"));
    let mut legacy_tampered = legacy.clone();
    legacy_tampered["channel"] = json!("beta");
    let mut unsigned = manifest.clone();
    unsigned["signature_scheme"] = json!("ed25519");

    let keys = vec![key.public_key().to_base64()];
    let cases = vec![
        ("ed25519 signed", signed, keys.clone(), None, None),
        (
            "ed25519 with unknown fields signed too",
            signed_extra,
            keys.clone(),
            None,
            None,
        ),
        (
            "ed25519 tampered version",
            tampered,
            keys.clone(),
            None,
            Some("signature_mismatch"),
        ),
        (
            "ed25519 signed by an unpinned key",
            by_other,
            keys.clone(),
            None,
            Some("signature_mismatch"),
        ),
        (
            "ed25519 signature of the wrong length",
            bad_encoding,
            keys.clone(),
            None,
            Some("bad_encoding"),
        ),
        (
            "no signature at all",
            unsigned,
            keys.clone(),
            None,
            Some("malformed"),
        ),
        (
            "ERP HMAC compatibility mode",
            legacy.clone(),
            keys.clone(),
            Some(hmac_secret),
            None,
        ),
        (
            "ERP HMAC tampered channel",
            legacy_tampered,
            keys.clone(),
            Some(hmac_secret),
            Some("signature_mismatch"),
        ),
        (
            "ERP HMAC without the secret configured",
            legacy,
            keys,
            None,
            Some("scheme_not_accepted"),
        ),
    ];
    Value::Array(
        cases
            .into_iter()
            .map(|(name, manifest, public_keys, hmac, error)| {
                let mut verifier = ManifestVerifier::new(
                    public_keys
                        .iter()
                        .map(|k| fleet_core::PublicKey::from_base64(k).expect("key"))
                        .collect(),
                );
                if let Some(h) = hmac {
                    verifier = verifier.with_hmac_secret(secret(h));
                }
                let got = verifier.verify_value(&manifest).err().map(|e| e.kind());
                assert_eq!(
                    got, error,
                    "vector {name:?}: fleet-core disagrees with the stated result"
                );
                let mut unsigned = manifest.as_object().cloned().unwrap_or_default();
                for field in fleet_core::manifest::SIGNATURE_FIELDS {
                    unsigned.remove(field);
                }
                json!({
                    "name": name,
                    "manifest": manifest,
                    "canonical": to_canonical_string(&Value::Object(unsigned)),
                    "public_keys": public_keys,
                    "hmac_secret": hmac,
                    "valid": error.is_none(),
                    "error": error,
                })
            })
            .collect(),
    )
}
