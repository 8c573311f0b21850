//! fleetctl as an operator runs it: a real process, real files.

use std::path::Path;
use std::process::{Command, Output};

fn fleetctl(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fleetctl"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("fleetctl runs")
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fleetctl-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

const MANIFEST: &str = r#"{"version":"1.4.0","sha":"abc123","channel":"stable","migrations_required":true,"breaking_changes":false,"released_at":"2026-11-01T10:00:00Z"}"#;

#[test]
fn generate_sign_verify_and_refuse_tampering() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("roundtrip");
    let out = fleetctl(&dir, &["keys", "generate", "--out", "release.key"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = std::fs::metadata(dir.join("release.key"))
        .expect("key file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "private key must be private");
    let public = String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_owned();
    assert_eq!(
        std::fs::read_to_string(dir.join("release.key.pub"))
            .expect("pub")
            .trim(),
        public
    );

    std::fs::write(dir.join("m.json"), MANIFEST).expect("write manifest");
    let signed = fleetctl(&dir, &["release", "sign", "--key", "release.key", "m.json"]);
    assert!(
        signed.status.success(),
        "{}",
        String::from_utf8_lossy(&signed.stderr)
    );
    std::fs::write(dir.join("signed.json"), &signed.stdout).expect("write signed");
    let ok = fleetctl(
        &dir,
        &["release", "verify", "--public-key", &public, "signed.json"],
    );
    assert!(ok.status.success());
    assert!(String::from_utf8_lossy(&ok.stdout).contains("1.4.0"));

    let tampered = String::from_utf8(signed.stdout)
        .expect("utf8")
        .replace("1.4.0", "1.4.1");
    std::fs::write(dir.join("tampered.json"), tampered).expect("write");
    let refused = fleetctl(
        &dir,
        &[
            "release",
            "verify",
            "--public-key",
            &public,
            "tampered.json",
        ],
    );
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("does not verify"));
}

#[test]
fn refuses_to_overwrite_a_key_or_sign_an_invalid_manifest() {
    let dir = scratch("refusals");
    assert!(
        fleetctl(&dir, &["keys", "generate", "--out", "k"])
            .status
            .success()
    );
    let again = fleetctl(&dir, &["keys", "generate", "--out", "k"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));

    std::fs::write(
        dir.join("bad.json"),
        MANIFEST.replace("2026-11-01T10:00:00Z", "last tuesday"),
    )
    .expect("write");
    let bad = fleetctl(&dir, &["release", "sign", "--key", "k", "bad.json"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("released_at"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

#[test]
fn a_control_plane_that_cannot_be_reached_is_named_with_the_cause() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let dir = std::env::temp_dir();
    for args in [
        vec!["rollout", "list"],
        vec!["run", "--target", "shop-1", "--", "true"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_fleetctl"))
            .current_dir(&dir)
            .env("FLEET_URL", &url)
            .env("FLEET_TOKEN", "token")
            .args(&args)
            .output()
            .expect("fleetctl runs");
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("cannot reach {url}/"))
                && stderr.contains("Connection refused"),
            "{args:?}: {stderr}"
        );
    }
}
