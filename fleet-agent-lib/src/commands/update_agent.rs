//! `UpdateAgent`: download a new agent binary, check its SHA-256 and its Ed25519 signature
//! against the pinned keys, prove that it starts and reconnects, then swap it in atomically
//! and restart into it, keeping the previous binary beside it (`<binary>.previous`).
//!
//! The signature covers the binary's bytes, not a version, and the command's `version` is
//! not signed: a control plane (or whoever writes to its queue) could send back any binary
//! ever signed, known flaws included. So the version is taken from the binary itself, which
//! must answer `--version` with `<name> <semver>` ([`VERSION_TIMEOUT`], no shell, empty
//! environment): it must be the command's `version`, and it must not be older than the
//! running agent ([`CommandSettings::agent_version`]) unless this agent's own configuration
//! says `AGENT_UPDATE_ALLOW_DOWNGRADE=true`. The same version again is a re-install, allowed.
//! A refused binary is deleted before it ever runs as an agent, and nothing else changes.
//!
//! Returning to the previous binary works without any supervisor, under systemd
//! (`Restart=always`) as under a test harness or a plain shell:
//!
//! 1. **Trial before the swap.** The running agent starts the downloaded file as a child
//!    with [`TRIAL_ENV`] set to a random nonce: the child reads the same configuration,
//!    registers and opens the live channel, closes it, prints [`trial_proof`] of the nonce
//!    and exits 0 ([`crate::channel::trial`]); exit 0 alone is no proof (`/bin/true` is not
//!    an agent). A binary that crashes, exits non-zero, gives no proof or does not reconnect
//!    within `update_confirm_within` is deleted and the command ends `FAILED` with the reason and the end of the child's
//!    output; the agent never stopped and never left its binary.
//! 2. **Marker across the restart.** After a good trial the previous binary is copied to
//!    `<binary>.previous`, a marker (`<binary>.update-pending`: command id, version,
//!    deadline, starts) is written, and the new file is renamed over the binary; the agent
//!    then execs it (same pid, so systemd sees the same service). The command stays
//!    `IN_PROGRESS`.
//! 3. **Confirmation.** The new process counts its start in the marker before anything else
//!    ([`on_start`]); once its live channel is up it records `COMPLETED` and removes the
//!    marker ([`confirm`]).
//! 4. **Rollback.** A start that finds the deadline passed or more than [`MAX_STARTS`]
//!    starts (the new binary keeps crashing after its trial and systemd keeps restarting
//!    it), or a process whose deadline passes unconfirmed, puts `<binary>.previous` back,
//!    notes the reason in the marker and execs the previous binary, which records `FAILED`
//!    with that reason ([`settle`]).

use std::cmp::Ordering;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine;
use fleet_core::command::{CommandResult, UpdateAgent};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use tokio::io::AsyncReadExt;
use tokio::sync::Notify;

use super::{CommandSettings, Output, completed, failed};
use crate::logstream::Journal;

/// Largest binary downloaded.
pub const MAX_BINARY_BYTES: u64 = 256 * 1024 * 1024;

/// How long a downloaded binary has to answer `--version`.
pub const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes of each stream read from a `--version` answer (one short line is expected).
const VERSION_ANSWER_BYTES: u64 = 4096;

/// Set (to a random nonce) in the environment of a downloaded binary's trial run: the
/// binary only proves it can start and reconnect ([`crate::channel::trial`]), prints
/// [`trial_proof`] of the nonce on stdout and exits 0. A program embedding the agent that
/// handles `UpdateAgent` must honour it in its `main`.
pub const TRIAL_ENV: &str = "FLEET_AGENT_TRIAL";

/// The line a trial run prints once its live channel opened, for the nonce it was given.
pub fn trial_proof(nonce: &str) -> String {
    format!("fleet-agent trial ok {nonce}")
}

/// Starts of a new binary without confirmation after which the previous one comes back.
pub const MAX_STARTS: u32 = 3;

/// The marker written next to the binary while an update waits for confirmation.
pub fn marker_path(binary: &Path) -> PathBuf {
    binary.with_extension("update-pending")
}

/// The previous binary kept for a rollback.
pub fn previous_path(binary: &Path) -> PathBuf {
    binary.with_extension("previous")
}

/// The binary `UpdateAgent` replaces: `AGENT_BINARY_PATH`, else the running executable.
pub fn binary_path(settings: &CommandSettings) -> std::io::Result<PathBuf> {
    match &settings.agent_binary {
        Some(path) => Ok(path.clone()),
        None => std::env::current_exe(),
    }
}

/// What the marker file holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    /// The `UpdateAgent` command (target) id that installed the binary.
    #[serde(default)]
    pub command_id: String,
    /// The version installed.
    #[serde(default)]
    pub version: String,
    /// Unix seconds by which the new binary must have reconnected.
    #[serde(default)]
    pub deadline: i64,
    /// Starts of the new binary so far.
    #[serde(default)]
    pub starts: u32,
    /// Set once the previous binary was put back: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back: Option<String>,
}

fn read_marker(binary: &Path) -> Option<Marker> {
    let text = std::fs::read_to_string(marker_path(binary)).ok()?;
    // An unreadable marker still means "an update is pending"; its deadline 0 has passed,
    // so the previous binary comes back.
    Some(serde_json::from_str(&text).unwrap_or_default())
}

/// Writes the marker atomically (temp file, fsync, rename), so a crash never leaves half
/// of one.
fn write_marker(binary: &Path, marker: &Marker) -> std::io::Result<()> {
    let path = marker_path(binary);
    let tmp = path.with_extension("update-pending.tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(serde_json::to_string(marker).unwrap_or_default().as_bytes())?;
    file.sync_all()?;
    std::fs::rename(tmp, path)
}

/// Checks a downloaded binary: its SHA-256 hex and an Ed25519 signature (base64) by one of
/// `keys` over its bytes.
pub fn verify_binary(
    bytes: &[u8],
    sha256: &str,
    signature: &str,
    keys: &[fleet_core::manifest::PublicKey],
) -> Result<(), String> {
    let digest = hex::encode(sha2::Sha256::digest(bytes));
    if !fleet_core::signing::constant_time_eq(
        digest.as_bytes(),
        sha256.to_ascii_lowercase().as_bytes(),
    ) {
        return Err("sha256 does not match".into());
    }
    let signature: [u8; 64] = base64::engine::general_purpose::STANDARD
        .decode(signature.trim())
        .ok()
        .and_then(|s| s.try_into().ok())
        .ok_or("signature is not base64 of 64 bytes")?;
    let signature = ed25519_dalek::Signature::from_bytes(&signature);
    let ok = keys.iter().any(|key| {
        ed25519_dalek::VerifyingKey::from_bytes(key.as_bytes())
            .is_ok_and(|k| k.verify_strict(bytes, &signature).is_ok())
    });
    if ok {
        Ok(())
    } else {
        Err("signature does not verify with any pinned key".into())
    }
}

/// Downloads, verifies, tries and installs the binary. `IN_PROGRESS` means installed: the
/// agent must restart into it, and the new process reports the end ([`confirm`]).
pub async fn update(
    settings: &CommandSettings,
    id: &str,
    update: &UpdateAgent,
    output: &Output,
    cancel: &Notify,
) -> CommandResult {
    if settings.update_keys.is_empty() {
        return failed(id, "no update keys pinned (AGENT_UPDATE_PUBLIC_KEYS)");
    }
    let (Some(sha256), Some(signature)) = (&update.sha256, &update.signature) else {
        return failed(id, "sha256 and signature are required");
    };
    let binary = match binary_path(settings) {
        Ok(path) => path,
        Err(err) => return failed(id, &format!("cannot find the agent binary: {err}")),
    };
    let download = binary.with_extension("download");
    let bytes = match fetch(&update.url, &download).await {
        Ok(bytes) => bytes,
        Err(why) => {
            let _ = std::fs::remove_file(&download);
            return failed(id, &why);
        }
    };
    if let Err(why) = verify_binary(&bytes, sha256, signature, &settings.update_keys) {
        let _ = std::fs::remove_file(&download);
        return failed(id, &why);
    }
    drop(bytes);
    if let Err(err) = std::fs::set_permissions(&download, std::fs::Permissions::from_mode(0o755)) {
        let _ = std::fs::remove_file(&download);
        return failed(id, &format!("cannot install the binary: {err}"));
    }
    // Before the trial: a binary that may not be installed never runs as an agent.
    let version = match stated_version(&download).await {
        Ok(version) => version,
        Err(why) => {
            let _ = std::fs::remove_file(&download);
            return failed(
                id,
                &format!("cannot tell the new binary's version: {why}; the previous binary stays"),
            );
        }
    };
    if let Err(why) = may_install(
        &version,
        &update.version,
        &settings.agent_version,
        settings.allow_downgrade,
    ) {
        let _ = std::fs::remove_file(&download);
        return failed(id, &why);
    }
    if let Err(why) = trial(&download, settings.update_confirm_within, output, cancel).await {
        let _ = std::fs::remove_file(&download);
        return failed(
            id,
            &format!(
                "the new binary ({version}) did not reconnect: {why}; the previous binary stays"
            ),
        );
    }
    let installed = (|| -> std::io::Result<()> {
        // The previous binary is kept (copied, so the running one stays in place until the
        // rename below swaps the new one in atomically).
        std::fs::copy(&binary, previous_path(&binary))?;
        let deadline = fleet_core::unix_now()
            + i64::try_from(settings.update_confirm_within.as_secs()).unwrap_or(120);
        write_marker(
            &binary,
            &Marker {
                command_id: id.to_owned(),
                version: version.to_string(),
                deadline,
                starts: 0,
                rolled_back: None,
            },
        )?;
        std::fs::rename(&download, &binary)
    })();
    match installed {
        Ok(()) => {
            let mut result = completed(id, &format!("installed {version}; restarting"));
            result.status = fleet_core::command::CommandStatus::InProgress;
            result
        }
        Err(err) => {
            let _ = std::fs::remove_file(&download);
            let _ = std::fs::remove_file(marker_path(&binary));
            failed(id, &format!("cannot install the binary: {err}"))
        }
    }
}

/// Runs `candidate` in trial mode ([`TRIAL_ENV`]) with this process's environment; its
/// output goes to the command's log. `Err` says how it failed.
async fn trial(
    candidate: &Path,
    within: Duration,
    output: &Output,
    cancel: &Notify,
) -> Result<(), String> {
    let program = candidate.to_string_lossy();
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    let env = std::collections::BTreeMap::from([(TRIAL_ENV.to_owned(), nonce.clone())]);
    let finished = super::run::spawn(
        &super::run::Program {
            program: &program,
            args: &[],
            env: &env,
            cwd: None,
            timeout: within,
        },
        output,
        cancel,
    )
    .await
    .map_err(|err| format!("it cannot be started ({err})"))?;
    let proved = finished.tail.contains(&trial_proof(&nonce));
    let said = it_said(&finished.tail);
    match finished {
        f if f.cancelled => Err("the update was cancelled".into()),
        f if f.timed_out => Err(format!(
            "its trial run did not reconnect within {} s{said}",
            within.as_secs()
        )),
        f if f.exit_code == Some(0) && proved => Ok(()),
        f if f.exit_code == Some(0) => Err(format!(
            "its trial run exited 0 without reporting a live channel (not a fleet agent?){said}"
        )),
        f => Err(format!(
            "its trial run exited with {}{said}",
            exit_description(f.exit_code)
        )),
    }
}

/// ` (it said: …)` with the end of a child's output, or nothing when it said nothing.
fn it_said(output: &str) -> String {
    let text = output.trim();
    if text.is_empty() {
        return String::new();
    }
    let start = text.char_indices().rev().nth(400).map_or(0, |(i, _)| i);
    format!(" (it said: {})", &text[start..])
}

/// `status 2`, or `a signal` for a process killed by one.
fn exit_description(code: Option<i32>) -> String {
    code.map_or_else(|| "a signal".to_owned(), |c| format!("status {c}"))
}

/// The version `candidate` states for itself: the last word of the first line it prints
/// for `--version` (`fleet-agent 1.4.0`). It runs without a shell, in its own process group
/// (killed whole after [`VERSION_TIMEOUT`]) and with an empty environment: it is handed no
/// secret, and a binary that does not know `--version` finds no configuration to start an
/// agent with.
async fn stated_version(candidate: &Path) -> Result<semver::Version, String> {
    let mut child = tokio::process::Command::new(candidate)
        .arg("--version")
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|err| format!("it cannot be started ({err})"))?;
    let pid = child.id();
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let answer = async {
        let (printed, said) = tokio::join!(read_answer(stdout), read_answer(stderr));
        child.wait().await.map(|status| (status, printed, said))
    };
    let (status, printed, said) = match tokio::time::timeout(VERSION_TIMEOUT, answer).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(err)) => return Err(format!("waiting for `--version` failed ({err})")),
        Err(_) => {
            // Not reaped yet, so its process group is still its own to kill.
            super::run::kill_group(pid);
            return Err(format!(
                "it did not answer `--version` within {} s",
                VERSION_TIMEOUT.as_secs()
            ));
        }
    };
    if !status.success() {
        return Err(format!(
            "`--version` exited with {}{}",
            exit_description(status.code()),
            it_said(&String::from_utf8_lossy(&said))
        ));
    }
    let printed = String::from_utf8_lossy(&printed);
    let first_line = printed.lines().next().unwrap_or_default().trim();
    first_line
        .split_whitespace()
        .last()
        .and_then(fleet_core::command::agent_version)
        .ok_or_else(|| {
            let shown: String = first_line.chars().take(100).collect();
            format!(
                "`--version` printed {shown:?}, not a name and a version such as \
                 `fleet-agent 1.4.0`"
            )
        })
}

/// Up to [`VERSION_ANSWER_BYTES`] of a `--version` answer's stream.
async fn read_answer(pipe: Option<impl tokio::io::AsyncRead + Unpin>) -> Vec<u8> {
    let mut bytes = Vec::new();
    if let Some(pipe) = pipe {
        let _ = pipe
            .take(VERSION_ANSWER_BYTES)
            .read_to_end(&mut bytes)
            .await;
    }
    bytes
}

/// Whether a binary that states `version` may replace this agent (`running`) for a command
/// that asked for `asked`; `Err` says why not.
fn may_install(
    version: &semver::Version,
    asked: &str,
    running: &str,
    allow_downgrade: bool,
) -> Result<(), String> {
    if fleet_core::command::agent_version(asked).as_ref() != Some(version) {
        return Err(format!(
            "the downloaded binary is version {version}, not the {asked} the command asked \
             for; the previous binary stays"
        ));
    }
    // Precedence ignores build metadata: 1.4.0+b over 1.4.0+a is a re-install.
    match fleet_core::command::agent_version(running) {
        Some(running) if version.cmp_precedence(&running) == Ordering::Less => {
            if !allow_downgrade {
                return Err(format!(
                    "refusing to downgrade from {running} to {version} (set \
                     AGENT_UPDATE_ALLOW_DOWNGRADE=true to allow)"
                ));
            }
            tracing::warn!(
                from = %running,
                to = %version,
                "installing an older agent binary, as AGENT_UPDATE_ALLOW_DOWNGRADE allows"
            );
        }
        Some(_) => {}
        None if allow_downgrade => {}
        None => {
            return Err(format!(
                "this agent's own version {running:?} is not a SemVer version, so a downgrade \
                 cannot be ruled out; the previous binary stays"
            ));
        }
    }
    Ok(())
}

/// Downloads `url` into `to`. An error never quotes the URL: the command's error reaches
/// every role on the control plane, and a download URL's query or userinfo may hold a token.
async fn fetch(url: &str, to: &Path) -> Result<Vec<u8>, String> {
    let download_failed =
        |e: reqwest::Error| format!("download failed: {}", crate::collectors::http_error(e));
    let response = reqwest::get(url)
        .await
        .and_then(|r| r.error_for_status())
        .map_err(download_failed)?;
    if response
        .content_length()
        .is_some_and(|l| l > MAX_BINARY_BYTES)
    {
        return Err("the binary is too large".into());
    }
    let mut file = std::fs::File::create(to).map_err(|e| format!("cannot write: {e}"))?;
    let mut bytes = Vec::new();
    let mut body = response.bytes_stream();
    while let Some(piece) = body.next().await {
        let piece = piece.map_err(download_failed)?;
        if bytes.len() as u64 + piece.len() as u64 > MAX_BINARY_BYTES {
            return Err("the binary is too large".into());
        }
        file.write_all(&piece)
            .map_err(|e| format!("cannot write: {e}"))?;
        bytes.extend_from_slice(&piece);
    }
    file.sync_all().map_err(|e| format!("cannot write: {e}"))?;
    Ok(bytes)
}

/// What a starting process does about an installed update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// Run. `confirm_by`: an update waits for this process to reconnect by then (unix
    /// seconds); past it, call [`rollback_unconfirmed`].
    Run {
        /// Unix seconds, when an update is waiting for confirmation.
        confirm_by: Option<i64>,
    },
    /// The previous binary was put back: exec it instead of running.
    RolledBack,
}

/// Call first at start, before anything that could crash: counts this start of a new
/// binary, and puts the previous binary back when the deadline passed or the new binary
/// started more than [`MAX_STARTS`] times without confirming.
pub fn on_start(binary: &Path, now: i64) -> Start {
    let Some(mut marker) = read_marker(binary) else {
        return Start::Run { confirm_by: None };
    };
    if marker.rolled_back.is_some() {
        // This is the previous binary, back; it reports the failure once connected.
        return Start::Run { confirm_by: None };
    }
    marker.starts += 1;
    if now > marker.deadline {
        let why = format!(
            "the new binary ({}) did not reconnect before its deadline",
            marker.version
        );
        return rollback(binary, marker, why);
    }
    if marker.starts > MAX_STARTS {
        let why = format!(
            "the new binary ({}) started {} times without reconnecting",
            marker.version,
            marker.starts - 1
        );
        return rollback(binary, marker, why);
    }
    if let Err(err) = write_marker(binary, &marker) {
        tracing::warn!(error = %err, "cannot count this start in the update marker");
    }
    Start::Run {
        confirm_by: Some(marker.deadline),
    }
}

/// The deadline of a running, unconfirmed binary passed: puts the previous binary back
/// (exec it when this returns [`Start::RolledBack`]). Does nothing once confirmed.
pub fn rollback_unconfirmed(binary: &Path) -> Start {
    match read_marker(binary) {
        Some(marker) if marker.rolled_back.is_none() => {
            let why = format!(
                "the new binary ({}) did not reconnect before its deadline",
                marker.version
            );
            rollback(binary, marker, why)
        }
        _ => Start::Run { confirm_by: None },
    }
}

fn rollback(binary: &Path, mut marker: Marker, why: String) -> Start {
    let restored = std::fs::rename(previous_path(binary), binary);
    tracing::warn!(reason = %why, restored = restored.is_ok(), "agent update rolled back");
    let outcome = match restored {
        Ok(()) => {
            marker.rolled_back = Some(format!("{why}; the previous binary was restored"));
            Start::RolledBack
        }
        Err(err) => {
            marker.rolled_back = Some(format!("{why}; no previous binary to restore ({err})"));
            Start::Run { confirm_by: None }
        }
    };
    if let Err(err) = write_marker(binary, &marker) {
        tracing::warn!(error = %err, "cannot record the rollback in the update marker");
    }
    outcome
}

/// The id of an `UpdateAgent` command waiting for this process to confirm it (not to be
/// reported as interrupted).
pub fn awaiting(binary: &Path) -> Option<String> {
    read_marker(binary)
        .filter(|m| m.rolled_back.is_none() && !m.command_id.is_empty())
        .map(|m| m.command_id)
}

/// At start, once the journal is open: a rolled-back update ends `FAILED` with its reason.
pub async fn settle(binary: &Path, journal: &Journal) -> crate::Result<()> {
    let Some(marker) = read_marker(binary) else {
        return Ok(());
    };
    let Some(why) = &marker.rolled_back else {
        return Ok(());
    };
    if !marker.command_id.is_empty() {
        journal.finish(&failed(&marker.command_id, why)).await?;
    }
    let _ = std::fs::remove_file(marker_path(binary));
    Ok(())
}

/// The live channel is up: an update waiting for this binary ends `COMPLETED` and its
/// marker goes.
pub async fn confirm(binary: &Path, journal: &Journal) -> crate::Result<()> {
    let Some(marker) = read_marker(binary) else {
        return Ok(());
    };
    if marker.rolled_back.is_some() {
        return Ok(());
    }
    if !marker.command_id.is_empty() {
        let mut result = completed(
            &marker.command_id,
            &format!("updated to {}; the new binary reconnected", marker.version),
        );
        result.data = Some(serde_json::json!({ "version": marker.version }));
        journal.finish(&result).await?;
    }
    let _ = std::fs::remove_file(marker_path(binary));
    tracing::info!(version = %marker.version, "agent update confirmed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_core::command::{CommandStatus, Frame};
    use fleet_core::manifest::PrivateKey;

    #[test]
    fn binaries_need_the_digest_and_a_pinned_signature() {
        let key = PrivateKey::from_seed([3; 32]);
        let seed: [u8; 32] = base64::engine::general_purpose::STANDARD
            .decode(key.to_base64())
            .expect("b64")
            .try_into()
            .expect("32");
        let signing = ed25519_dalek::SigningKey::from_bytes(&seed);
        let bytes = b"\x7fELF new agent";
        let sha = hex::encode(sha2::Sha256::digest(bytes));
        use ed25519_dalek::Signer;
        let sig = base64::engine::general_purpose::STANDARD.encode(signing.sign(bytes).to_bytes());
        let keys = [key.public_key()];
        assert_eq!(verify_binary(bytes, &sha, &sig, &keys), Ok(()));
        assert!(verify_binary(b"other", &sha, &sig, &keys).is_err());
        let other = [PrivateKey::from_seed([4; 32]).public_key()];
        assert!(verify_binary(bytes, &sha, &sig, &other).is_err());
    }

    #[test]
    fn the_binary_must_be_the_asked_version_and_not_older_unless_allowed() {
        let v = |text: &str| fleet_core::command::agent_version(text).expect("a version");
        assert_eq!(may_install(&v("1.5.0"), "1.5.0", "1.4.0", false), Ok(()));
        // The same version again is a re-install; build metadata does not order versions.
        assert_eq!(may_install(&v("1.4.0"), "v1.4.0", "1.4.0", false), Ok(()));
        assert_eq!(
            may_install(&v("1.4.0+b"), "1.4.0+b", "1.4.0+a", false),
            Ok(())
        );
        assert_eq!(
            may_install(&v("1.2.0"), "1.2.0", "1.4.0", false),
            Err("refusing to downgrade from 1.4.0 to 1.2.0 (set \
                 AGENT_UPDATE_ALLOW_DOWNGRADE=true to allow)"
                .to_owned())
        );
        // A pre-release comes before its release.
        assert!(may_install(&v("1.4.0-rc.1"), "1.4.0-rc.1", "1.4.0", false).is_err());
        assert_eq!(may_install(&v("1.2.0"), "1.2.0", "1.4.0", true), Ok(()));
        // The operator asked for one version and the binary is another: never installed.
        for allow in [false, true] {
            let error = may_install(&v("1.2.0"), "1.5.0", "1.0.0", allow).expect_err("refused");
            assert!(
                error.contains("is version 1.2.0, not the 1.5.0 the command asked for"),
                "{error}"
            );
        }
        assert!(may_install(&v("1.2.0"), "latest", "1.0.0", true).is_err());
        // Without a version of its own to compare with, only an allowed downgrade goes on.
        assert!(may_install(&v("1.2.0"), "1.2.0", "dev", false).is_err());
        assert_eq!(may_install(&v("1.2.0"), "1.2.0", "dev", true), Ok(()));
    }

    fn installed(deadline: i64) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("fleet-upd-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let binary = dir.join("fleet-agent");
        std::fs::write(&binary, "new").expect("write");
        std::fs::write(previous_path(&binary), "old").expect("write");
        let marker = Marker {
            command_id: "cmd-1".into(),
            version: "2.0.0".into(),
            deadline,
            ..Marker::default()
        };
        write_marker(&binary, &marker).expect("marker");
        (dir, binary)
    }

    /// The last result frame the journal queued.
    async fn last_result(journal: &Journal) -> fleet_core::command::CommandResult {
        let frames = journal.pending(0, 100).await.expect("pending");
        frames
            .iter()
            .rev()
            .find_map(|f| match Frame::decode(&f.body) {
                Ok(Frame::Result { result, .. }) => Some(result),
                _ => None,
            })
            .expect("a result frame")
    }

    #[tokio::test]
    async fn an_unconfirmed_update_rolls_back_after_its_deadline_and_reports_why() {
        let (dir, binary) = installed(100);
        assert_eq!(
            on_start(&binary, 50),
            Start::Run {
                confirm_by: Some(100)
            }
        );
        assert_eq!(awaiting(&binary).as_deref(), Some("cmd-1"));
        assert_eq!(on_start(&binary, 101), Start::RolledBack);
        assert_eq!(std::fs::read_to_string(&binary).expect("read"), "old");
        assert_eq!(awaiting(&binary), None);
        // The previous binary starts normally and reports the failure once.
        assert_eq!(on_start(&binary, 102), Start::Run { confirm_by: None });
        let journal = Journal::open(&dir.join("j.db")).await.expect("journal");
        settle(&binary, &journal).await.expect("settle");
        let result = last_result(&journal).await;
        assert_eq!(result.job_id, "cmd-1");
        assert_eq!(result.status, CommandStatus::Failed);
        let error = result.error.unwrap_or_default();
        assert!(
            error.contains("did not reconnect") && error.contains("restored"),
            "{error}"
        );
        assert!(!marker_path(&binary).exists());
        assert_eq!(on_start(&binary, 103), Start::Run { confirm_by: None });
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_binary_that_keeps_crashing_is_replaced_after_max_starts() {
        let (dir, binary) = installed(i64::MAX);
        for _ in 0..MAX_STARTS {
            assert!(matches!(
                on_start(&binary, 1),
                Start::Run {
                    confirm_by: Some(_)
                }
            ));
        }
        assert_eq!(on_start(&binary, 1), Start::RolledBack);
        assert_eq!(std::fs::read_to_string(&binary).expect("read"), "old");
        let marker = read_marker(&binary).expect("marker");
        assert!(
            marker
                .rolled_back
                .is_some_and(|why| why.contains(&format!("started {MAX_STARTS} times"))),
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_confirmed_update_completes_and_never_rolls_back() {
        let (dir, binary) = installed(100);
        let journal = Journal::open(&dir.join("j.db")).await.expect("journal");
        confirm(&binary, &journal).await.expect("confirm");
        let result = last_result(&journal).await;
        assert_eq!(
            (result.job_id.as_str(), result.status),
            ("cmd-1", CommandStatus::Completed)
        );
        assert_eq!(
            rollback_unconfirmed(&binary),
            Start::Run { confirm_by: None }
        );
        assert_eq!(on_start(&binary, 1000), Start::Run { confirm_by: None });
        assert_eq!(std::fs::read_to_string(&binary).expect("read"), "new");
        let _ = std::fs::remove_dir_all(dir);
    }
}
