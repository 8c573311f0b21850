//! First start with a one-time enrollment token: trade it for the instance's own secret
//! (`POST /v1/agents/register` with `enrollment_token`) and store the secret with mode 0600.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use fleet_core::registration::{RegisterRequest, RegisterResponse};

use crate::{Error, Result};

/// Reads the secret stored at `path`, if there is one.
pub fn stored_secret(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            Ok(Some(text.trim_end_matches(['\n', '\r']).to_owned()).filter(|s| !s.is_empty()))
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err.into()),
    }
}

/// Writes `secret` to `path` with mode 0600, atomically.
pub fn store_secret(path: &Path, secret: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(secret.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Trades `token` for the instance's secret and stores it at `path`; returns the secret.
/// The token works once: a second call fails with the control plane's 401.
pub async fn enroll(
    control_plane_url: &str,
    instance_id: &str,
    token: &str,
    path: &Path,
) -> Result<String> {
    let body = RegisterRequest {
        instance_id: instance_id.to_owned(),
        enrollment_token: Some(token.to_owned()),
        hostname: None,
        agent_version: Some(env!("CARGO_PKG_VERSION").to_owned()),
        architecture: Some(crate::channel::architecture()),
    };
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()?;
    let response = http
        .post(format!(
            "{}/v1/agents/register",
            control_plane_url.trim_end_matches('/')
        ))
        .json(&body)
        .send()
        .await?;
    if !response.status().is_success() {
        return Err(Error::Config(vec![format!(
            "enrollment refused by the control plane ({}); the token may be used or expired",
            response.status()
        )]));
    }
    let answer: RegisterResponse = response.json().await?;
    let secret = answer
        .secret
        .ok_or_else(|| Error::Config(vec!["the control plane issued no secret".into()]))?;
    store_secret(path, &secret)?;
    tracing::info!(instance_id, "enrolled; secret stored");
    Ok(secret)
}
