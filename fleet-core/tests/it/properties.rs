//! Property tests: round trips hold for arbitrary input, and nothing panics on garbage.

use fleet_core::command::Frame;
use fleet_core::{
    Heartbeat, Limits, ManifestVerifier, PrivateKey, Secret, SecretResolver, SignatureHeaders,
    Signer, Verifier,
};
use proptest::prelude::*;

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
