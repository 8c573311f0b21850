//! Heartbeat verification and parsing on arbitrary bytes: the path every request from the
//! internet takes. The first bytes choose the header values, the rest is the body.
#![no_main]

use fleet_core::{Heartbeat, Limits, Secret, SecretResolver, SignatureHeaders, Signer, Verifier};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let (head, body) = data.split_at(split);
    let header = String::from_utf8_lossy(head);
    let resolver = SecretResolver::from_config(Some(r#"{"acme-001":["a","b"]}"#), Some("fallback"))
        .expect("static config is valid");
    let verifier = Verifier::new(resolver);
    for headers in [
        SignatureHeaders {
            v0_signature: Some(&header),
            ..Default::default()
        },
        SignatureHeaders {
            webhook_id: Some("msg_1"),
            webhook_timestamp: Some("1000"),
            webhook_signature: Some(&header),
            ..Default::default()
        },
        SignatureHeaders {
            webhook_id: Some(&header),
            webhook_timestamp: Some(&header),
            webhook_signature: Some(&header),
            ..Default::default()
        },
    ] {
        let _ = verifier.verify(body, &headers, 1000);
    }
    // A correctly signed body must verify, and then decoding must not panic either.
    let signed = Signer::new(Secret::new("fallback").expect("secret")).headers("msg_1", 1000, body);
    let ts = signed.timestamp.to_string();
    let headers = SignatureHeaders {
        webhook_id: Some(&signed.id),
        webhook_timestamp: Some(&ts),
        webhook_signature: Some(&signed.signature),
        ..Default::default()
    };
    if let Some(id) = fleet_core::locate_instance_id(body) {
        if id != "acme-001" {
            assert!(verifier.verify(body, &headers, 1000).is_ok());
        }
    }
    let _ = Heartbeat::decode(body, &Limits::default());
});
