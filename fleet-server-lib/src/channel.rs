//! The live channel: `GET /v1/agents/connect` upgrades to a WebSocket that the agent dials
//! out to. Exactly one task writes to each socket (the writer below); everything else hands
//! it frames through a bounded queue, so a slow agent slows its senders instead of losing
//! frames or interleaving writes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use fleet_core::command::{
    Ack, CAPABILITIES_HEADER, CommandResult, CommandStatus, Frame, JOBS_WAITING, Pipeline,
    TargetStatus, lists_capability,
};
use fleet_core::jwt::{JwtSigner, JwtVerifier};
use fleet_core::manifest::PrivateKey;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::sync::{Notify, mpsc};

use crate::store::Store;
use crate::store::commands::{CommandStore, Dispatch, TargetUpdate};
use crate::{Error, Result, Shared};

/// How often the server pings an agent.
pub const PING_INTERVAL: Duration = Duration::from_secs(30);
/// A socket with nothing received for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Largest frame accepted from an agent.
pub const MAX_FRAME_BYTES: usize = 2 * 1024 * 1024;
/// Frames queued for one socket before senders wait.
const QUEUE: usize = 256;
/// Most frames from one agent handled (and log frames committed) together.
const BATCH_FRAMES: usize = 64;
/// Most bytes of frames handled together.
const BATCH_BYTES: usize = 8 * 1024 * 1024;

/// Settings of the live channel and registration.
#[derive(Clone)]
pub struct LiveSettings {
    /// The Ed25519 key that signs agent tokens and derives issued secrets. Replicas must
    /// share it. `None`: a random key per process (tokens and the secrets issued at
    /// enrollment do not survive a restart); [`stored_jwt_key`] gives one kept in the store.
    pub jwt_key: Option<PrivateKey>,
    /// The `iss` of tokens.
    pub issuer: String,
    /// Lifetime of an agent token.
    pub token_ttl: Duration,
    /// Lifetime of an enrollment token.
    pub enrollment_ttl: Duration,
    /// A target released to its agent with no answer for this long is `timed_out` (the agent
    /// may be offline); the command goes on with its other targets.
    pub delivery_timeout: Duration,
    /// A running target with no news for this long is `timed_out`.
    pub run_timeout: Duration,
    /// Most bytes of output stored per command target, stdout and stderr together. A chunk
    /// past it is acknowledged but not stored (of a chunk that straddles it, the part below
    /// is), and the target is marked truncated: the agent's spool drains, and whoever holds
    /// an agent's secret cannot fill the database. At least 100 MB by default, so outputs
    /// of that size stream whole.
    pub output_max_bytes: u64,
    /// How long the output of an ended target is kept; the periodic sweep deletes it after
    /// that, and keeps the target's record and result. `None` keeps it forever.
    pub output_retention: Option<Duration>,
}

/// Default of [`LiveSettings::output_max_bytes`]: 256 MiB.
pub(crate) const DEFAULT_OUTPUT_MAX_BYTES: u64 = 256 * 1024 * 1024;

impl std::fmt::Debug for LiveSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveSettings")
            .field("jwt_key", &self.jwt_key.as_ref().map(|_| "[redacted]"))
            .field("issuer", &self.issuer)
            .field("token_ttl", &self.token_ttl)
            .field("enrollment_ttl", &self.enrollment_ttl)
            .field("delivery_timeout", &self.delivery_timeout)
            .field("run_timeout", &self.run_timeout)
            .field("output_max_bytes", &self.output_max_bytes)
            .field("output_retention", &self.output_retention)
            .finish()
    }
}

impl Default for LiveSettings {
    fn default() -> Self {
        Self {
            jwt_key: None,
            issuer: "fleet-control-plane".into(),
            token_ttl: Duration::from_secs(3600),
            enrollment_ttl: Duration::from_secs(7 * 86_400),
            delivery_timeout: Duration::from_secs(15 * 60),
            // Longer than the longest RunCommand timeout (7 days).
            run_timeout: Duration::from_secs(7 * 86_400 + 3600),
            output_max_bytes: DEFAULT_OUTPUT_MAX_BYTES,
            output_retention: Some(Duration::from_secs(30 * 86_400)),
        }
    }
}

/// One connected agent.
struct Conn {
    id: u64,
    tx: mpsc::Sender<Message>,
    kick: Arc<Notify>,
    /// It announced [`JOBS_WAITING`] at the handshake: it reads `jobs_waiting` frames (an
    /// older agent would answer one with a `FAILED` result for a command it never had).
    reads_jobs_waiting: bool,
}

/// What the live channel shares: tokens, the sockets of this process, and the route to
/// the other replicas.
pub(crate) struct Live {
    pub signer: JwtSigner,
    pub verifier: JwtVerifier,
    pub settings: LiveSettings,
    /// Secret material for issued secrets (the signing key's seed, never sent anywhere).
    pub master: fleet_core::Secret,
    conns: Mutex<HashMap<String, Conn>>,
    next_id: AtomicU64,
    /// Tells the other replicas (PostgreSQL `NOTIFY`); `None` on a single process.
    pub replicas: Option<crate::replicas::Notifier>,
    /// Woken when logs or results were stored, so local followers look sooner.
    pub activity: Notify,
    /// Commands with targets that ended since the last scheduling pass. Scheduling reads
    /// all of a command's targets, so it runs per command at most every
    /// [`SCHEDULE_EVERY`], not per result (10,000 results would otherwise cost 10,000
    /// passes over 10,000 rows).
    ended: Mutex<std::collections::HashSet<String>>,
    schedule_now: Notify,
}

/// The key that signs agent tokens and derives the secrets issued at enrollment, kept in the
/// store: generated by the first process that asks, then the same for every restart and
/// every replica on that database. For deployments that leave [`LiveSettings::jwt_key`]
/// unset; a configured key always wins.
pub async fn stored_jwt_key(store: &dyn Store) -> Result<PrivateKey> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| Error::Internal(format!("no randomness: {e}")))?;
    let candidate = PrivateKey::from_seed(seed).to_base64();
    let stored = command_store(store)?
        .server_key("jwt_key", &candidate, fleet_core::unix_now())
        .await?;
    PrivateKey::from_base64(&stored)
        .map_err(|_| Error::Internal("the stored jwt_key is not an Ed25519 seed".into()))
}

/// Pause between scheduling passes.
pub const SCHEDULE_EVERY: Duration = Duration::from_millis(50);

impl Live {
    pub fn new(settings: LiveSettings, replicas: Option<crate::replicas::Notifier>) -> Self {
        let key = settings.jwt_key.clone().unwrap_or_else(|| {
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).unwrap_or_default();
            tracing::warn!(
                "no CONTROL_PLANE_JWT_KEY: agent tokens use a key of this process only \
                 (set one shared key for replicas and restarts)"
            );
            PrivateKey::from_seed(seed)
        });
        let signer = JwtSigner::new(&key, settings.issuer.clone());
        let verifier = JwtVerifier::new(&[signer.public_key()], settings.issuer.clone());
        let master = fleet_core::Secret::from_bytes(key.to_base64().as_bytes());
        Self {
            signer,
            verifier,
            settings,
            master,
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            replicas,
            activity: Notify::new(),
            ended: Mutex::new(Default::default()),
            schedule_now: Notify::new(),
        }
    }

    /// Notes that a target of `command_id` ended; the scheduler looks at it soon.
    pub fn mark_ended(&self, command_id: String) {
        self.ended
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(command_id);
        self.schedule_now.notify_one();
    }

    fn take_ended(&self) -> Vec<String> {
        self.ended
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect()
    }

    /// Whether `instance_id` holds a socket to this process.
    pub(crate) fn is_connected(&self, instance_id: &str) -> bool {
        self.lock().contains_key(instance_id)
    }

    /// How many agents are connected to this process.
    pub fn connected(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Conn>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sender_of(&self, instance_id: &str) -> Option<mpsc::Sender<Message>> {
        self.lock().get(instance_id).map(|c| c.tx.clone())
    }

    /// Sends released targets to their agents: through this process's socket when the agent
    /// is here, else through the other replicas.
    pub async fn deliver(&self, dispatches: Vec<Dispatch>) {
        let mut remote = Vec::new();
        for dispatch in dispatches {
            match self.sender_of(&dispatch.instance_id) {
                Some(tx) => {
                    if let Some(frame) = command_frame(&dispatch) {
                        let _ = tx.send(frame).await;
                    }
                }
                None => remote.push(dispatch.instance_id),
            }
        }
        remote.sort();
        remote.dedup();
        if let Some(replicas) = &self.replicas {
            for instance in remote {
                replicas.deliver(&instance).await;
            }
        }
    }

    /// Sends every released, unfinished target of `instance_id` if it is connected here
    /// (on connect, and when another replica asks).
    pub async fn deliver_pending(&self, store: &dyn CommandStore, instance_id: &str) {
        let Some(tx) = self.sender_of(instance_id) else {
            return;
        };
        match store.pending_for(instance_id).await {
            Ok(pending) => {
                for dispatch in pending {
                    if let Some(frame) = command_frame(&dispatch) {
                        let _ = tx.send(frame).await;
                    }
                }
            }
            Err(err) => tracing::warn!(error = %err, "cannot load pending commands"),
        }
    }

    /// Asks the agent running `target_id` to stop it.
    pub async fn cancel(&self, instance_id: &str, target_id: &str) {
        match self.sender_of(instance_id) {
            Some(tx) => {
                let _ = tx.send(cancel_frame(target_id)).await;
            }
            None => {
                if let Some(replicas) = &self.replicas {
                    replicas.cancel(instance_id, target_id).await;
                }
            }
        }
    }

    /// Sends a cancel frame if the agent is connected here.
    pub async fn cancel_local(&self, instance_id: &str, target_id: &str) {
        if let Some(tx) = self.sender_of(instance_id) {
            let _ = tx.send(cancel_frame(target_id)).await;
        }
    }

    /// Tells the agents of `instance_ids` that jobs wait for their `pipeline`, so they poll
    /// now: through this process's socket when the agent is here, else through the other
    /// replicas. A nudge that cannot be delivered is dropped; the agent's next poll finds
    /// the job.
    pub async fn jobs_waiting(&self, pipeline: Pipeline, instance_ids: &[String]) {
        let elsewhere: Vec<String> = instance_ids
            .iter()
            .filter(|instance_id| !self.jobs_waiting_here(instance_id, pipeline))
            .cloned()
            .collect();
        if let Some(replicas) = &self.replicas
            && !elsewhere.is_empty()
        {
            replicas.jobs_waiting(pipeline, &elsewhere).await;
        }
    }

    /// Sends a `jobs_waiting` frame for `pipeline` if the agent is connected here and
    /// announced it reads them; returns whether it is connected here. The frame is never
    /// waited for: with the socket's queue full the agent has plenty to read already, and
    /// the nudge is dropped.
    pub fn jobs_waiting_here(&self, instance_id: &str, pipeline: Pipeline) -> bool {
        let conns = self.lock();
        let Some(conn) = conns.get(instance_id) else {
            return false;
        };
        if conn.reads_jobs_waiting {
            let sent = conn.tx.try_send(jobs_waiting_frame(vec![pipeline])).is_ok();
            tracing::debug!(
                %instance_id,
                pipeline = pipeline.as_str(),
                sent,
                "told the agent jobs are waiting"
            );
        }
        true
    }
}

fn cancel_frame(target_id: &str) -> Message {
    let frame = Frame::Cancel {
        id: uuid::Uuid::new_v4().to_string(),
        command_id: target_id.to_owned(),
    };
    Message::Text(String::from_utf8_lossy(&frame.encode()).into_owned().into())
}

pub(crate) fn command_frame(dispatch: &Dispatch) -> Option<Message> {
    let raw = serde_json::json!({
        "type": dispatch.command_type,
        "id": dispatch.target_id,
        "payload": serde_json::from_str::<serde_json::Value>(&dispatch.payload).ok()?,
    });
    Some(Message::Text(raw.to_string().into()))
}

/// The `Authorization: Bearer` token, if any.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

fn header_text(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.chars().filter(|c| !c.is_control()).take(128).collect())
        .unwrap_or_default()
}

/// `GET /v1/agents/connect`: checks the agent's token before upgrading.
pub(crate) async fn connect(
    State(state): State<Shared>,
    headers: HeaderMap,
    ws: std::result::Result<
        WebSocketUpgrade,
        axum::extract::ws::rejection::WebSocketUpgradeRejection,
    >,
) -> Result<Response> {
    // The token is checked before anything else, upgrade headers included.
    let token = bearer(&headers).ok_or(Error::Unauthorized)?;
    let claims = state
        .live
        .verifier
        .verify(token, fleet_core::unix_now())
        .map_err(|err| {
            tracing::debug!(reason = %err, "live channel refused");
            Error::Unauthorized
        })?;
    if state.store.commands().is_none() {
        return Err(Error::Unavailable);
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return Ok(rejection.into_response()),
    };
    let version = header_text(&headers, "x-agent-version");
    let reads_jobs_waiting = lists_capability(
        headers
            .get_all(CAPABILITIES_HEADER)
            .iter()
            .filter_map(|value| value.to_str().ok()),
        JOBS_WAITING,
    );
    let arch = header_text(&headers, "x-agent-architecture");
    let hostname = header_text(&headers, "x-agent-hostname");
    if headers.contains_key("x-agent-trial") {
        // A downloaded agent binary proving it can reconnect before it is installed: the
        // handshake is the proof. It must not replace the running agent's socket nor
        // receive its commands, so it is closed at once.
        tracing::info!(instance_id = %claims.sub, %version, "trial connection of a new agent binary");
        return Ok(ws.on_upgrade(|mut socket| async move {
            let _ = socket.send(Message::Close(None)).await;
        }));
    }
    tracing::info!(instance_id = %claims.sub, %version, %arch, %hostname, "agent connected");
    // Small buffers: most sockets are idle, and tungstenite's defaults (128 KiB each way)
    // would cost over 100 KiB per connected agent.
    Ok(ws
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_message_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| session(state, claims.sub, reads_jobs_waiting, socket)))
}

async fn session(state: Shared, instance_id: String, reads_jobs_waiting: bool, socket: WebSocket) {
    // `connect` checked this before the upgrade.
    let Some(commands) = state.store.commands() else {
        return;
    };
    let (sink, mut stream) = socket.split();
    let (tx, rx) = mpsc::channel::<Message>(QUEUE);
    let writer = tokio::spawn(writer(sink, rx));
    let kick = Arc::new(Notify::new());
    let conn_id = state.live.next_id.fetch_add(1, Ordering::Relaxed);
    let previous = state.live.lock().insert(
        instance_id.clone(),
        Conn {
            id: conn_id,
            tx: tx.clone(),
            kick: kick.clone(),
            reads_jobs_waiting,
        },
    );
    // A reconnecting agent replaces its old socket; the old session ends.
    if let Some(old) = previous {
        old.kick.notify_one();
    }
    state.live.deliver_pending(commands, &instance_id).await;
    if reads_jobs_waiting {
        // Registered above first, so a job made available from here on is announced to this
        // socket; this covers the ones announced while it was down.
        tell_of_waiting_jobs(state.store.as_ref(), &instance_id, &tx).await;
    }
    let mut owners = HashMap::new();
    'session: loop {
        let next = tokio::select! {
            next = tokio::time::timeout(IDLE_TIMEOUT, stream.next()) => next,
            _ = kick.notified() => break,
        };
        let first = match next {
            Err(_) => {
                tracing::info!(%instance_id, "agent silent too long; closing");
                break;
            }
            Ok(None) | Ok(Some(Err(_))) => break,
            Ok(Some(Ok(message))) => message,
        };
        // Take whatever else has arrived already, to store it in one go.
        let mut frames = Vec::new();
        let mut closing = false;
        let mut message = Some(first);
        let mut bytes_taken = 0usize;
        while let Some(current) = message.take() {
            let frame = match current {
                Message::Text(text) => Some(text.as_str().as_bytes().to_vec()),
                Message::Binary(bytes) => Some(bytes.to_vec()),
                Message::Close(_) => {
                    closing = true;
                    None
                }
                Message::Ping(_) | Message::Pong(_) => None,
            };
            if let Some(frame) = frame {
                bytes_taken += frame.len();
                frames.push(frame);
            }
            if closing || frames.len() >= BATCH_FRAMES || bytes_taken >= BATCH_BYTES {
                break;
            }
            match stream.next().now_or_never() {
                Some(Some(Ok(next))) => message = Some(next),
                Some(None) | Some(Some(Err(_))) => closing = true,
                None => {}
            }
        }
        for reply in handle_batch(&state, commands, &instance_id, frames, &mut owners).await {
            if tx.send(reply).await.is_err() {
                break 'session;
            }
        }
        if closing {
            break;
        }
        // Targets are per command; a long session must not keep every answer forever.
        if owners.len() > 1024 {
            owners.clear();
        }
    }
    {
        let mut conns = state.live.lock();
        if conns.get(&instance_id).is_some_and(|c| c.id == conn_id) {
            conns.remove(&instance_id);
        }
    }
    drop(tx);
    let _ = writer.await;
    tracing::info!(%instance_id, "agent disconnected");
}

/// Sends one `jobs_waiting` frame naming the pipelines in which the agent that just
/// connected has jobs waiting, if it has any. Announcements made while its socket was down
/// reached nobody, and an agent does not poll when it reconnects, so without this those
/// jobs would wait for its next regular poll. A store that cannot answer only leaves them
/// to that poll.
async fn tell_of_waiting_jobs(store: &dyn Store, instance_id: &str, tx: &mpsc::Sender<Message>) {
    match store.waiting_pipelines(instance_id).await {
        Ok(pipelines) if pipelines.is_empty() => {}
        Ok(pipelines) => {
            tracing::debug!(%instance_id, ?pipelines, "told the connected agent jobs are waiting");
            let _ = tx.send(jobs_waiting_frame(pipelines)).await;
        }
        Err(err) => tracing::warn!(
            %instance_id,
            error = %err,
            "cannot look for jobs waiting for a connected agent; its poll will find them"
        ),
    }
}

fn jobs_waiting_frame(pipelines: Vec<Pipeline>) -> Message {
    text(&Frame::JobsWaiting {
        id: uuid::Uuid::new_v4().to_string(),
        pipelines,
    })
}

/// The one task that writes to a socket: frames from the queue, and a ping every 30 s.
async fn writer(
    mut sink: futures_util::stream::SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Message>,
) {
    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.tick().await;
    loop {
        let message = tokio::select! {
            message = rx.recv() => match message {
                Some(message) => message,
                None => break,
            },
            _ = ping.tick() => Message::Ping(Default::default()),
        };
        if sink.send(message).await.is_err() {
            break;
        }
    }
    let _ = sink.close().await;
}

fn text(frame: &Frame) -> Message {
    Message::Text(String::from_utf8_lossy(&frame.encode()).into_owned().into())
}

fn ack(id: String) -> Message {
    text(&Frame::Ack {
        id: id.clone(),
        ack: Ack { ids: vec![id] },
    })
}

/// Handles one frame from an agent; the answer (ack or error) goes back on the socket.
pub(crate) async fn handle(
    state: &Shared,
    commands: &dyn CommandStore,
    instance_id: &str,
    bytes: &[u8],
) -> Option<Message> {
    let frame = match Frame::decode(bytes) {
        Ok(frame) => frame,
        Err((id, message)) => return Some(text(&Frame::Error { id, message })),
    };
    let now = fleet_core::unix_now();
    match frame {
        Frame::Result { id, result } => {
            match record_result(state, commands, instance_id, &result, now).await {
                Ok(()) => Some(ack(id)),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot record a command result");
                    None
                }
            }
        }
        Frame::Logs { id, batch } => {
            let mut owners = HashMap::new();
            let mut rows = Vec::new();
            if let Err(reply) =
                log_rows(commands, instance_id, &id, batch, &mut owners, &mut rows).await
            {
                return reply;
            }
            match commands
                .store_chunks(&rows, state.live.settings.output_max_bytes)
                .await
            {
                Ok(_) => {
                    state.live.activity.notify_waiters();
                    Some(ack(id))
                }
                Err(err) => {
                    // No ack: the agent keeps the chunks and sends them again.
                    tracing::warn!(error = %err, "cannot store log chunks");
                    None
                }
            }
        }
        Frame::Ack { .. } | Frame::Error { .. } => None,
        Frame::Command(envelope) => Some(text(&Frame::Error {
            id: envelope.id,
            message: "agents do not send commands".into(),
        })),
        Frame::Cancel { id, .. } => Some(text(&Frame::Error {
            id,
            message: "agents do not send cancels".into(),
        })),
        Frame::JobsWaiting { id, .. } => Some(text(&Frame::Error {
            id,
            message: "agents do not send jobs_waiting".into(),
        })),
    }
}

/// Checks a log frame (the agent may only write output of its own commands; `owners`
/// caches that per target) and appends its chunks to `rows`. `Err` carries the answer for a
/// refused frame (`None`: nothing to say, e.g. a database error; the agent sends it again).
async fn log_rows(
    commands: &dyn CommandStore,
    instance_id: &str,
    id: &str,
    batch: fleet_core::command::LogBatch,
    owners: &mut HashMap<String, bool>,
    rows: &mut Vec<(String, fleet_core::command::Stream, u64, Vec<u8>)>,
) -> std::result::Result<(), Option<Message>> {
    let owned = match owners.get(&batch.command_id) {
        Some(owned) => *owned,
        None => match commands.target_owner(&batch.command_id).await {
            Ok(owner) => {
                let owned = owner.is_some_and(|(owner, _)| owner == instance_id);
                owners.insert(batch.command_id.clone(), owned);
                owned
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot look up a command");
                return Err(None);
            }
        },
    };
    let refuse = |message: &str| {
        Err(Some(text(&Frame::Error {
            id: id.to_owned(),
            message: message.to_owned(),
        })))
    };
    if !owned {
        return refuse("unknown command");
    }
    let target = batch.command_id.clone();
    let start = rows.len();
    for chunk in batch.into_chunks() {
        match chunk.bytes() {
            Some(bytes) if bytes.len() <= fleet_core::command::MAX_CHUNK_BYTES => {
                rows.push((target.clone(), chunk.stream, chunk.offset, bytes));
            }
            _ => {
                rows.truncate(start);
                return refuse("chunk is not valid base64 or too large");
            }
        }
    }
    Ok(())
}

/// Handles frames that arrived together: consecutive log frames are stored in ONE
/// transaction and acknowledged in one ack (a commit per frame would cap throughput at
/// the database's commit rate); any other frame is handled on its own, after the logs
/// before it are stored, so a result never overtakes its output.
async fn handle_batch(
    state: &Shared,
    commands: &dyn CommandStore,
    instance_id: &str,
    frames: Vec<Vec<u8>>,
    owners: &mut HashMap<String, bool>,
) -> Vec<Message> {
    let mut replies = Vec::new();
    let mut rows = Vec::new();
    let mut ids = Vec::new();
    for bytes in frames {
        match Frame::decode(&bytes) {
            Ok(Frame::Logs { id, batch }) => {
                match log_rows(commands, instance_id, &id, batch, owners, &mut rows).await {
                    Ok(()) => ids.push(id),
                    Err(reply) => replies.extend(reply),
                }
            }
            _ => {
                flush_logs(state, commands, &mut rows, &mut ids, &mut replies).await;
                replies.extend(handle(state, commands, instance_id, &bytes).await);
            }
        }
    }
    flush_logs(state, commands, &mut rows, &mut ids, &mut replies).await;
    replies
}

async fn flush_logs(
    state: &Shared,
    commands: &dyn CommandStore,
    rows: &mut Vec<(String, fleet_core::command::Stream, u64, Vec<u8>)>,
    ids: &mut Vec<String>,
    replies: &mut Vec<Message>,
) {
    if ids.is_empty() {
        return;
    }
    match commands
        .store_chunks(rows.as_slice(), state.live.settings.output_max_bytes)
        .await
    {
        Ok(_) => {
            state.live.activity.notify_waiters();
            let ids = std::mem::take(ids);
            replies.push(text(&Frame::Ack {
                id: ids[0].clone(),
                ack: Ack { ids },
            }));
        }
        Err(err) => {
            // No ack: the agent keeps the chunks and sends them again.
            tracing::warn!(error = %err, "cannot store log chunks");
            ids.clear();
        }
    }
    rows.clear();
}

async fn record_result(
    state: &Shared,
    commands: &dyn CommandStore,
    instance_id: &str,
    result: &CommandResult,
    now: i64,
) -> Result<()> {
    let status = match result.status {
        CommandStatus::Queued => return Ok(()),
        CommandStatus::InProgress => TargetStatus::Running,
        CommandStatus::Completed => TargetStatus::Completed,
        CommandStatus::Failed => TargetStatus::Failed,
    };
    let cap = |s: &str| -> String { s.chars().take(64 * 1024).collect() };
    let logs = cap(&result.logs);
    let error = result.error.as_deref().map(cap);
    let update = TargetUpdate {
        status,
        exit_code: result.exit_code,
        error: error.as_deref(),
        logs: (!logs.is_empty()).then_some(logs.as_str()),
        data: result
            .data
            .as_ref()
            .map(|d| d.to_string())
            .filter(|d| d.len() <= 1024 * 1024),
    };
    let changed = commands
        .record_target(&result.job_id, instance_id, &update, now)
        .await?;
    state.live.activity.notify_waiters();
    if let Some(command_id) = changed
        && status != TargetStatus::Running
    {
        state.live.mark_ended(command_id);
    }
    Ok(())
}

/// Keeps `store` reachable as a command store or answers 503.
pub(crate) fn command_store(store: &dyn Store) -> Result<&dyn CommandStore> {
    store.commands().ok_or(Error::Unavailable)
}

/// `GET /v1/agents/connected` (support): how many agents hold a socket to this process.
pub(crate) async fn connected(_: crate::auth::Support, State(state): State<Shared>) -> Response {
    axum::Json(serde_json::json!({ "connected": state.live.connected() })).into_response()
}

/// Schedules commands whose targets ended: releases more targets, halts, completes.
pub(crate) fn spawn_scheduler(state: std::sync::Weak<crate::AppState>) {
    tokio::spawn(async move {
        loop {
            let Some(strong) = state.upgrade() else {
                return;
            };
            let ids = strong.live.take_ended();
            if ids.is_empty() {
                let live = strong.live.clone();
                drop(strong);
                // Wake on news (notify_one keeps a permit), but check now and then that the
                // control plane still exists.
                let _ = tokio::time::timeout(Duration::from_secs(5), live.schedule_now.notified())
                    .await;
                continue;
            }
            if let Some(commands) = strong.store.commands() {
                let now = fleet_core::unix_now();
                for id in ids {
                    match commands.schedule(&id, now).await {
                        Ok(released) => strong.live.deliver(released).await,
                        Err(err) => {
                            tracing::warn!(error = %err, "cannot schedule a command");
                            strong.live.mark_ended(id);
                        }
                    }
                }
            }
            drop(strong);
            tokio::time::sleep(SCHEDULE_EVERY).await;
        }
    });
}

/// Tells connected agents about the jobs the store makes available (`announced`, see
/// [`RolloutStore::jobs_available`](crate::store::rollouts::RolloutStore::jobs_available));
/// runs until the control plane is dropped.
pub(crate) fn spawn_jobs_waiting(
    state: std::sync::Weak<crate::AppState>,
    mut announced: tokio::sync::broadcast::Receiver<Arc<crate::store::rollouts::JobsAvailable>>,
) {
    use tokio::sync::broadcast::error::RecvError;
    tokio::spawn(async move {
        loop {
            // Woken now and then to check that the control plane still exists.
            let received = tokio::time::timeout(Duration::from_secs(5), announced.recv()).await;
            let Some(state) = state.upgrade() else { return };
            match received {
                Err(_) => {}
                Ok(Ok(jobs)) => {
                    state
                        .live
                        .jobs_waiting(jobs.pipeline, &jobs.instance_ids)
                        .await;
                }
                Ok(Err(RecvError::Lagged(missed))) => tracing::debug!(
                    missed,
                    "job announcements dropped; the agents' polls find those jobs"
                ),
                Ok(Err(RecvError::Closed)) => return,
            }
        }
    });
}

/// Times out targets that never answered, then lets their commands go on; runs until the
/// control plane is dropped.
pub(crate) fn spawn_timeouts(state: std::sync::Weak<crate::AppState>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            let Some(state) = state.upgrade() else { return };
            let Some(commands) = state.store.commands() else {
                return;
            };
            let now = fleet_core::unix_now();
            let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            let settings = &state.live.settings;
            let expired = commands
                .time_out_targets(
                    now.saturating_sub(secs(settings.delivery_timeout)),
                    now.saturating_sub(secs(settings.run_timeout)),
                    now,
                )
                .await;
            match expired {
                Ok(ids) => {
                    for id in ids {
                        state.live.mark_ended(id);
                    }
                }
                Err(err) => tracing::warn!(error = %err, "cannot time out command targets"),
            }
        }
    });
}
