//! Sign a heartbeat the way the agent does, verify it the way the control plane does, and
//! show what a tampered or replayed-late request looks like.
//!
//! ```sh
//! cargo run -p fleet-examples --example sign_and_verify
//! ```

use fleet_core::{
    Heartbeat, Limits, Secret, SecretResolver, SignatureHeaders, Signer, Verifier, unix_now,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut heartbeat = Heartbeat::new("acme-001");
    heartbeat.db_ok = true;
    heartbeat.redis_ok = true;
    heartbeat.storage_ok = true;
    heartbeat.version = Some("1.4.0".into());
    let body = heartbeat.to_vec();

    // Agent side: v1 headers over the exact bytes sent.
    let signer = Signer::new(Secret::new("agent-secret-acme")?);
    let now = unix_now();
    let signed = signer.headers("msg_demo_1", now, &body);
    for (name, value) in signed.pairs() {
        println!("{name}: {value}");
    }

    // Control-plane side: resolve the secret by instance id, verify, then parse.
    let resolver =
        SecretResolver::from_config(Some(r#"{"acme-001": ["agent-secret-acme"]}"#), None)?;
    let verifier = Verifier::new(resolver);
    let ts = signed.timestamp.to_string();
    let headers = SignatureHeaders {
        webhook_id: Some(&signed.id),
        webhook_timestamp: Some(&ts),
        webhook_signature: Some(&signed.signature),
        ..Default::default()
    };
    let verified = verifier.verify(&body, &headers, now)?;
    let parsed = Heartbeat::decode(&body, &Limits::default())?;
    println!(
        "verified {} ({}), version {:?}",
        verified.instance_id,
        verified.scheme.as_str(),
        parsed.version
    );

    let tampered = String::from_utf8(body.clone())?.replace("1.4.0", "6.6.6");
    let refused = verifier
        .verify(tampered.as_bytes(), &headers, now)
        .expect_err("tampered body must fail");
    println!("tampered body refused: {}", refused.kind());

    let late = verifier
        .verify(&body, &headers, now + 600)
        .expect_err("late delivery must fail");
    println!("ten minutes later refused: {}", late.kind());

    let v0 = signer.sign_v0(&body);
    let v0_headers = SignatureHeaders {
        v0_signature: Some(&v0),
        ..Default::default()
    };
    println!(
        "v0 (ERP agent) accepted: {}",
        verifier.verify(&body, &v0_headers, now).is_ok()
    );
    Ok(())
}
