//! Manifest verification on arbitrary JSON: what the control plane does with every uploaded
//! release and the agent with every update job. Nothing unsigned may verify.
#![no_main]

use fleet_core::manifest::sign_manifest_hmac;
use fleet_core::{ManifestVerifier, PrivateKey, Secret};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let key = PrivateKey::from_seed([9; 32]);
    let secret = Secret::new("fuzz-release-secret").expect("secret");
    let verifier = ManifestVerifier::new(vec![key.public_key()]).with_hmac_secret(secret.clone());
    // Arbitrary input carries no valid signature (the key and secret are not in the corpus).
    assert!(verifier.verify_value(&value).is_err() || value.get("signature").is_some());
    // Signing it ourselves must make it verify whenever it is a well-formed manifest.
    if let Ok(signed) = key.sign_value(&value) {
        let _ = verifier.verify_value(&signed);
    }
    let _ = sign_manifest_hmac(&secret, &value);
});
