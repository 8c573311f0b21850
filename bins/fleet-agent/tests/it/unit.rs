//! The systemd units in `deploy/` pass `systemd-analyze verify` (this machine has no
//! running systemd to start them, so the units are checked statically).

use std::process::Command;

use crate::temp_dir;

/// Verifies `deploy/<name>`, whose `ExecStart` must be `exec_start`.
fn verify_unit(name: &str, exec_start: &str) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let unit = std::fs::read_to_string(root.join("deploy").join(name)).unwrap();
    let line = format!("ExecStart={exec_start}\n");
    assert!(unit.contains(&line), "{name} does not start {exec_start}");
    // Point the copy at the binary just built, so the executable check has something to find.
    let unit = unit.replace(
        &line,
        &format!("ExecStart={}\n", env!("CARGO_BIN_EXE_fleet-agent")),
    );
    let dir = temp_dir("unit");
    let path = dir.join(name);
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian package systemd) is needed to check the unit");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.trim().is_empty(),
        "systemd-analyze verify {name}:\n{text}"
    );
}

#[test]
fn the_hardened_systemd_unit_verifies() {
    verify_unit("fleet-agent.service", "/usr/local/bin/fleet-agent");
}

#[test]
fn the_managed_systemd_unit_verifies() {
    verify_unit(
        "fleet-agent-managed.service",
        "/var/lib/fleet-agent/bin/fleet-agent",
    );
}
