//! `UpdateAgent`: download a new agent binary, check its SHA-256 and its Ed25519 signature
//! against the pinned keys, and swap it in atomically, keeping the previous binary beside
//! it (`<binary>.previous`). A marker file records the swap; the new binary confirms it once
//! its live channel is up, and [`check_pending`] restores the previous binary when the
//! deadline passes without that confirmation.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use fleet_core::command::{CommandResult, UpdateAgent};
use futures_util::StreamExt;
use sha2::Digest;

use super::{CommandSettings, Output, completed, failed};

/// Largest binary downloaded.
pub const MAX_BINARY_BYTES: u64 = 256 * 1024 * 1024;

/// The marker written next to the binary while an update waits for confirmation.
pub fn marker_path(binary: &Path) -> PathBuf {
    binary.with_extension("update-pending")
}

/// The previous binary kept for a rollback.
pub fn previous_path(binary: &Path) -> PathBuf {
    binary.with_extension("previous")
}

fn binary_path(settings: &CommandSettings) -> std::io::Result<PathBuf> {
    match &settings.agent_binary {
        Some(path) => Ok(path.clone()),
        None => std::env::current_exe(),
    }
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

/// Downloads, verifies and installs the binary.
pub async fn update(
    settings: &CommandSettings,
    update: &UpdateAgent,
    _output: &Output,
) -> CommandResult {
    if settings.update_keys.is_empty() {
        return failed("", "no update keys pinned (AGENT_UPDATE_PUBLIC_KEYS)");
    }
    let (Some(sha256), Some(signature)) = (&update.sha256, &update.signature) else {
        return failed("", "sha256 and signature are required");
    };
    let binary = match binary_path(settings) {
        Ok(path) => path,
        Err(err) => return failed("", &format!("cannot find the agent binary: {err}")),
    };
    let download = binary.with_extension("download");
    let bytes = match fetch(&update.url, &download).await {
        Ok(bytes) => bytes,
        Err(why) => {
            let _ = std::fs::remove_file(&download);
            return failed("", &why);
        }
    };
    if let Err(why) = verify_binary(&bytes, sha256, signature, &settings.update_keys) {
        let _ = std::fs::remove_file(&download);
        return failed("", &why);
    }
    drop(bytes);
    let installed = (|| -> std::io::Result<()> {
        std::fs::set_permissions(&download, std::fs::Permissions::from_mode(0o755))?;
        // The previous binary is kept (copied, so the running one stays in place until the
        // rename below swaps the new one in atomically).
        std::fs::copy(&binary, previous_path(&binary))?;
        let deadline = fleet_core::unix_now()
            + i64::try_from(settings.update_confirm_within.as_secs()).unwrap_or(120);
        let marker = serde_json::json!({ "version": update.version, "deadline": deadline });
        std::fs::write(marker_path(&binary), marker.to_string())?;
        std::fs::rename(&download, &binary)
    })();
    match installed {
        Ok(()) => {
            let mut result = completed("", &format!("installed {}; restarting", update.version));
            result.data = Some(serde_json::json!({ "version": update.version }));
            result
        }
        Err(err) => {
            let _ = std::fs::remove_file(&download);
            let _ = std::fs::remove_file(marker_path(&binary));
            failed("", &format!("cannot install the binary: {err}"))
        }
    }
}

async fn fetch(url: &str, to: &Path) -> Result<Vec<u8>, String> {
    let response = reqwest::get(url)
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| format!("download failed: {e}"))?;
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
        let piece = piece.map_err(|e| format!("download failed: {e}"))?;
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

/// What to do about an update waiting for confirmation, at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pending {
    /// No update waiting.
    None,
    /// Waiting; confirm once the channel is up, before the deadline (unix seconds).
    Confirm {
        /// Unix seconds.
        deadline: i64,
    },
    /// The deadline passed: the previous binary was put back; restart into it.
    RolledBack,
}

/// Looks at the marker of `binary` at `now`; rolls back when its deadline passed.
pub fn check_pending(binary: &Path, now: i64) -> Pending {
    let Ok(text) = std::fs::read_to_string(marker_path(binary)) else {
        return Pending::None;
    };
    let deadline = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["deadline"].as_i64())
        .unwrap_or(0);
    if now <= deadline {
        return Pending::Confirm { deadline };
    }
    rollback(binary)
}

/// Puts the previous binary back.
pub fn rollback(binary: &Path) -> Pending {
    let previous = previous_path(binary);
    if std::fs::rename(&previous, binary).is_ok() {
        let _ = std::fs::remove_file(marker_path(binary));
        tracing::warn!("the new agent binary did not confirm in time; previous binary restored");
        Pending::RolledBack
    } else {
        let _ = std::fs::remove_file(marker_path(binary));
        Pending::None
    }
}

/// Confirms the running binary (the channel is up): the marker goes.
pub fn confirm(binary: &Path) {
    if std::fs::remove_file(marker_path(binary)).is_ok() {
        tracing::info!("agent update confirmed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
    fn an_unconfirmed_update_rolls_back_after_its_deadline() {
        let dir = std::env::temp_dir().join(format!("fleet-upd-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let binary = dir.join("fleet-agent");
        std::fs::write(&binary, "new").expect("write");
        std::fs::write(previous_path(&binary), "old").expect("write");
        std::fs::write(marker_path(&binary), r#"{"deadline":100}"#).expect("write");
        assert_eq!(
            check_pending(&binary, 50),
            Pending::Confirm { deadline: 100 }
        );
        assert_eq!(check_pending(&binary, 101), Pending::RolledBack);
        assert_eq!(std::fs::read_to_string(&binary).expect("read"), "old");
        assert_eq!(check_pending(&binary, 200), Pending::None);
        let _ = std::fs::remove_dir_all(dir);
    }
}
