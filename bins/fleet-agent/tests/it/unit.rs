//! The systemd unit in `deploy/` passes `systemd-analyze verify` (this machine has no
//! running systemd to start it, so the unit is checked statically).

use std::process::Command;

use crate::temp_dir;

#[test]
fn the_systemd_unit_verifies() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let unit = std::fs::read_to_string(root.join("deploy/fleet-agent.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/fleet-agent\n"));
    // Point the copy at the binary just built, so the executable check has something to find.
    let unit = unit.replace(
        "ExecStart=/usr/local/bin/fleet-agent",
        &format!("ExecStart={}", env!("CARGO_BIN_EXE_fleet-agent")),
    );
    let dir = temp_dir("unit");
    let path = dir.join("fleet-agent.service");
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
        "systemd-analyze verify:\n{text}"
    );
}
