//! `POST /api/heartbeats`: verify, then decode, then hand to the group-commit writer.
//!
//! The order matters. The body is read up to the size limit, the signature is checked over
//! the raw bytes (only `instance_id` is looked at, to pick the secret), and only a verified
//! body is parsed. The response is sent after the heartbeat's transaction has committed, so
//! an acknowledged heartbeat is durable; the writer commits many heartbeats per transaction,
//! so that durability does not cost a disk flush per request.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use fleet_core::{DecodeError, Heartbeat, SignatureHeaders};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;
use crate::store::{IncomingHeartbeat, IngestRules, RecordOutcome, Store};
use crate::{Error, Result, Shared};

/// A heartbeat waiting for the writer, and where to send its outcome.
pub(crate) struct Job {
    incoming: IncomingHeartbeat,
    reply: oneshot::Sender<Result<RecordOutcome>>,
}

pub(crate) async fn receive(State(state): State<Shared>, request: Request) -> Result<Response> {
    // The request is taken whole: a `HeaderMap` extractor would copy the headers.
    let (parts, body) = request.into_parts();
    let result = accept(&state, &parts.headers, body).await;
    match &result {
        Ok(RecordOutcome::Applied { .. }) => state.metrics.accepted(),
        Ok(RecordOutcome::Duplicate) => state.metrics.duplicate(),
        Ok(RecordOutcome::Replay) => state.metrics.rejected("replay"),
        Ok(RecordOutcome::NotEnrolled) => state.metrics.rejected("not_enrolled"),
        Err(Error::TooLarge { .. }) => state.metrics.rejected("too_large"),
        Err(Error::Invalid(_)) => state.metrics.rejected("invalid"),
        Err(_) => {}
    }
    Ok(match result? {
        // Written directly: this answers every heartbeat.
        RecordOutcome::Applied { installation_id } => json_answer(format!(
            r#"{{"ok":true,"installation_id":{installation_id},"duplicate":false}}"#
        )),
        RecordOutcome::Duplicate => json_answer(r#"{"ok":true,"duplicate":true}"#.to_owned()),
        // Same answer as any other signature failure: a replayer learns nothing.
        RecordOutcome::Replay => Error::Unauthorized.into_response(),
        RecordOutcome::NotEnrolled => Error::NotEnrolled.into_response(),
    })
}

fn json_answer(body: String) -> Response {
    ([(CONTENT_TYPE, "application/json")], body).into_response()
}

async fn accept(state: &Shared, headers: &HeaderMap, body: Body) -> Result<RecordOutcome> {
    let limit = state.settings.limits.max_body_bytes;
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(Error::TooLarge { limit });
    }
    // Reading stops at the limit, whatever Content-Length claimed.
    let body = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| Error::TooLarge { limit })?;
    let now = fleet_core::unix_now();
    let lookup =
        SignatureHeaders::from_lookup(|name| headers.get(name).and_then(|v| v.to_str().ok()));
    let verified = match state.verifier.verify(&body, &lookup, now) {
        Ok(verified) => verified,
        Err(err) => match verify_with_issued_secret(state, &body, &lookup, now).await {
            Some(verified) => verified,
            None => {
                state.metrics.rejected(err.kind());
                // The reason is logged for the operator, never returned to the sender.
                tracing::debug!(reason = err.kind(), "heartbeat refused");
                return Err(Error::Unauthorized);
            }
        },
    };
    let heartbeat = Heartbeat::decode(&body, &state.settings.limits).map_err(|err| match err {
        DecodeError::TooLarge { limit, .. } => Error::TooLarge { limit },
        DecodeError::Invalid(errors) => Error::Invalid(errors),
    })?;
    if heartbeat.instance_id != verified.instance_id {
        // locate_instance_id refuses duplicate keys, so the two always agree; refuse anyway
        // rather than act on an id the signature was not checked for.
        state.metrics.rejected("instance_id_mismatch");
        return Err(Error::Unauthorized);
    }
    let incoming = IncomingHeartbeat {
        heartbeat,
        scheme: verified.scheme,
        msg_id: verified.msg_id,
        signed_at: verified.timestamp,
        received_at: now,
        body: body.into(),
    };
    submit(&state.writer, incoming).await
}

/// A heartbeat the configured secrets do not verify may come from an enrolled agent, which
/// signs with the secret issued to it at enrollment (derived from the server key and a nonce
/// kept in the store). Looked up only after the configured secrets failed, so fleets
/// configured with `CONTROL_PLANE_AGENT_SECRETS` pay nothing for it.
async fn verify_with_issued_secret<'b>(
    state: &Shared,
    body: &'b [u8],
    lookup: &SignatureHeaders<'_>,
    now: i64,
) -> Option<fleet_core::Verified<'b>> {
    let instance = fleet_core::locate_instance_id(body)?;
    let commands = state.store.commands()?;
    let issued = match crate::registration::issued_secret_of(state, commands, &instance).await {
        Ok(issued) => issued?,
        Err(err) => {
            tracing::warn!(error = %err, "reading an issued secret failed");
            return None;
        }
    };
    let secrets = [issued];
    state
        .verifier
        .verify_with(body, lookup, now, |_| Some(secrets.as_slice()))
        .ok()
}

async fn submit(writer: &mpsc::Sender<Job>, incoming: IncomingHeartbeat) -> Result<RecordOutcome> {
    let (reply, outcome) = oneshot::channel();
    writer
        .send(Job { incoming, reply })
        .await
        .map_err(|_| Error::Unavailable)?;
    outcome.await.map_err(|_| Error::Unavailable)?
}

/// Starts the writers: each takes every heartbeat waiting (up to `batch_max`), records them
/// in one transaction and answers each. There are [`Store::write_concurrency`] of them. They
/// stop when the last sender is dropped, after finishing what was queued.
pub(crate) fn spawn_writer(
    store: Arc<dyn Store>,
    rules: IngestRules,
    batch_max: usize,
    metrics: Arc<Metrics>,
) -> mpsc::Sender<Job> {
    let (tx, rx) = mpsc::channel::<Job>(batch_max * 8);
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    for _ in 0..store.write_concurrency().max(1) {
        let (store, rules, metrics, rx) =
            (store.clone(), rules.clone(), metrics.clone(), rx.clone());
        tokio::spawn(async move {
            let mut jobs = Vec::with_capacity(batch_max);
            loop {
                // One writer at a time collects a batch; the others are busy or wait here.
                let taken = rx.lock().await.recv_many(&mut jobs, batch_max).await;
                if taken == 0 {
                    return;
                }
                write_batch(&*store, &rules, &metrics, std::mem::take(&mut jobs)).await;
            }
        });
    }
    tx
}

async fn write_batch(store: &dyn Store, rules: &IngestRules, metrics: &Metrics, jobs: Vec<Job>) {
    let (batch, replies): (Vec<_>, Vec<_>) =
        jobs.into_iter().map(|j| (j.incoming, j.reply)).unzip();
    metrics.batch(batch.len());
    match store.record_heartbeats(&batch, rules).await {
        Ok(outcomes) => {
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(Ok(outcome));
            }
        }
        Err(err) if batch.len() > 1 && !err.is_unreachable() => {
            // One bad heartbeat must not sink its neighbours: retry them one by one. Not
            // when the database is unreachable: each retry would wait the pool's acquire
            // timeout again, and the last answers would come long after the agents gave up.
            tracing::warn!(error = %err, size = batch.len(), "batch failed, retrying singly");
            for (incoming, reply) in batch.into_iter().zip(replies) {
                let result = store
                    .record_heartbeats(std::slice::from_ref(&incoming), rules)
                    .await
                    .and_then(|mut o| o.pop().ok_or(Error::Internal("no outcome".into())));
                let _ = reply.send(result.map_err(unavailable));
            }
        }
        Err(err) => {
            let _logged = unavailable(err);
            for reply in replies {
                let _ = reply.send(Err(Error::Unavailable));
            }
        }
    }
}

/// Logs a storage failure and turns it into a retryable 503 for the agent.
fn unavailable(err: Error) -> Error {
    tracing::error!(error = %err, "recording heartbeats failed");
    Error::Unavailable
}
