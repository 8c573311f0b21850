//! `POST /v1/agents/poll`: the live channel's fallback for agents that cannot open a
//! WebSocket (a proxy that drops upgrades, say). One signed request carries the agent's
//! queued frames (results and log chunks, exactly as on the socket) and the ids of the
//! commands it is running, and answers with the ids it stored, the commands waiting for the
//! agent and the running ones to stop (`cancel`: cancelled or timed out meanwhile).
//!
//! The body is v1-signed with the agent's secret, verified over the raw bytes before it is
//! parsed, and its message id is remembered, so a captured poll cannot be replayed.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::ws::Message;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use fleet_core::SignatureHeaders;
use fleet_core::command::Frame;
use fleet_core::signing::Scheme;
use serde::Deserialize;

use crate::channel::{command_frame, command_store, handle};
use crate::registration::agent_secrets;
use crate::{Error, Result, Shared};

/// Largest poll body.
pub const MAX_POLL_BYTES: usize = 8 * 1024 * 1024;
/// Most frames in one poll.
pub const MAX_POLL_FRAMES: usize = 256;

#[derive(Deserialize)]
struct PollBody {
    instance_id: String,
    #[serde(default)]
    frames: Vec<serde_json::Value>,
    /// Ids of the commands the agent is running; the answer's `cancel` lists those that
    /// were cancelled (or timed out) meanwhile.
    #[serde(default)]
    running: Vec<String>,
}

/// Every problem of a poll body: the counts and, like any id, the instance id (which the
/// signature check only located) and the running command ids.
fn poll_problems(poll: &PollBody, max_id_len: usize) -> fleet_core::ValidationErrors {
    use fleet_core::validate::{Path, check_id};
    let mut errors = fleet_core::ValidationErrors::default();
    let root = Path::Root;
    check_id(
        &mut errors,
        &root.field("instance_id"),
        &poll.instance_id,
        max_id_len,
    );
    for (field, count) in [
        ("frames", poll.frames.len()),
        ("running", poll.running.len()),
    ] {
        if count > MAX_POLL_FRAMES {
            errors.push(field, format!("at most {MAX_POLL_FRAMES}"));
        }
    }
    let running = root.field("running");
    for (i, id) in poll.running.iter().take(MAX_POLL_FRAMES).enumerate() {
        check_id(&mut errors, &running.index(i), id, max_id_len);
    }
    errors
}

/// JSON Schema of [`PollBody`] (for `/openapi.json`).
pub(crate) fn poll_schema() -> serde_json::Value {
    fleet_core::schema::object(
        &["instance_id"],
        &[
            ("instance_id", fleet_core::schema::id()),
            (
                "frames",
                serde_json::json!({ "type": "array", "maxItems": MAX_POLL_FRAMES }),
            ),
            (
                "running",
                serde_json::json!({
                    "type": "array", "maxItems": MAX_POLL_FRAMES, "items": fleet_core::schema::id(),
                }),
            ),
        ],
    )
}

/// `POST /v1/agents/poll`.
pub(crate) async fn poll(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response> {
    if body.len() > MAX_POLL_BYTES {
        return Err(Error::TooLarge {
            limit: MAX_POLL_BYTES,
        });
    }
    let commands = command_store(state.store.as_ref())?;
    let instance = verify_agent(&state, commands, &headers, &body).await?;
    fleet_core::validate::require_object(&body).map_err(Error::Invalid)?;
    let parsed: PollBody = serde_json::from_slice(&body).map_err(|e| {
        let mut errors = fleet_core::ValidationErrors::default();
        errors.push("", e.to_string());
        Error::Invalid(errors)
    })?;
    if parsed.instance_id != instance {
        return Err(Error::Unauthorized);
    }
    let errors = poll_problems(&parsed, state.settings.limits.max_id_len);
    if !errors.is_empty() {
        return Err(Error::Invalid(errors));
    }
    let mut acked = Vec::new();
    let mut refused = Vec::new();
    for frame in &parsed.frames {
        let bytes = serde_json::to_vec(frame).unwrap_or_default();
        let Some(reply) = handle(&state, commands, &instance, &bytes).await else {
            // Not stored (a database error): the agent sends it again.
            continue;
        };
        if let Message::Text(text) = reply {
            match Frame::decode(text.as_str().as_bytes()) {
                Ok(Frame::Ack { ack, .. }) => acked.extend(ack.ids),
                Ok(Frame::Error { id, message }) => {
                    refused.push(serde_json::json!({ "id": id, "message": message }));
                }
                _ => {}
            }
        }
    }
    // What a socket would have carried as cancel frames: the agent's running commands
    // whose target ended on this side (only its own targets).
    let mut cancel = Vec::new();
    for id in &parsed.running {
        let owned = commands
            .target_owner(id)
            .await?
            .is_some_and(|(owner, _)| owner == instance);
        if owned
            && matches!(
                commands.target_status(id).await?.as_deref(),
                Some("cancelled" | "timed_out")
            )
        {
            cancel.push(id.clone());
        }
    }
    let pending: Vec<serde_json::Value> = commands
        .pending_for(&instance)
        .await?
        .iter()
        .filter_map(command_frame)
        .filter_map(|m| match m {
            Message::Text(text) => serde_json::from_str(text.as_str()).ok(),
            _ => None,
        })
        .collect();
    Ok(Json(serde_json::json!({
        "acked": acked, "refused": refused, "commands": pending, "cancel": cancel,
    }))
    .into_response())
}

/// Checks a v1-signed agent request over its raw bytes (configured or issued secrets) and
/// remembers its message id; returns the instance id. Every failure is the same 401.
async fn verify_agent(
    state: &Shared,
    commands: &dyn crate::store::commands::CommandStore,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<String> {
    let now = fleet_core::unix_now();
    let lookup =
        SignatureHeaders::from_lookup(|name| headers.get(name).and_then(|v| v.to_str().ok()));
    if lookup.scheme() != Some(Scheme::V1) {
        return Err(Error::Unauthorized);
    }
    let instance = fleet_core::locate_instance_id(body)
        .ok_or(Error::Unauthorized)?
        .into_owned();
    let secrets = agent_secrets(state, commands, &instance).await?;
    let verified = state
        .verifier
        .verify_with(body, &lookup, now, |_| Some(secrets.as_slice()))
        .map_err(|_| Error::Unauthorized)?;
    let msg_id = verified.msg_id.clone().unwrap_or_default();
    if !commands
        .remember_message(&instance, &msg_id, verified.timestamp.unwrap_or(now), now)
        .await?
    {
        return Err(Error::Unauthorized);
    }
    Ok(instance)
}

/// `POST /v1/commands/logs` (the agent-svc shape): `{instance_id, command_id, chunks:
/// [{offset, stream, data, encoding?}]}`, v1-signed. Stored once per `(command_id, stream,
/// offset)`; a duplicate is acknowledged again.
pub(crate) async fn logs(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response> {
    if body.len() > MAX_POLL_BYTES {
        return Err(Error::TooLarge {
            limit: MAX_POLL_BYTES,
        });
    }
    let commands = command_store(state.store.as_ref())?;
    let instance = verify_agent(&state, commands, &headers, &body).await?;
    let batch: fleet_core::command::LogBatch =
        crate::registration::decode_body(&body, &state.settings.limits)?;
    let frame = Frame::Logs {
        id: batch.command_id.clone(),
        batch,
    };
    match handle(&state, commands, &instance, &frame.encode()).await {
        Some(Message::Text(text)) => match Frame::decode(text.as_str().as_bytes()) {
            Ok(Frame::Ack { .. }) => Ok(Json(serde_json::json!({ "ok": true })).into_response()),
            Ok(Frame::Error { message, .. }) => {
                let mut errors = fleet_core::ValidationErrors::default();
                errors.push("command_id", message);
                Err(Error::Invalid(errors))
            }
            _ => Err(Error::Unavailable),
        },
        _ => Err(Error::Unavailable),
    }
}
