//! The live channel, agent side: register for a short-lived token (renewed before it
//! expires), dial `GET /v1/agents/connect` with the InstaDeploy headers, run commands that
//! arrive, and send the journal's frames until each is acknowledged. The handshake also
//! announces `X-Agent-Capabilities: jobs_waiting`, and a `jobs_waiting` frame wakes the
//! pipelines' pollers ([`ChannelConfig::poll_now`]), so a job starts within seconds of its
//! rollout batch instead of at the next poll.
//!
//! One task writes to the socket. Pings go every 30 s and the socket is dropped after 60 s
//! without a pong; reconnects back off from 1 s to 2 min with jitter, and the backoff is
//! reset once a connection stayed up for a minute.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_core::command::{CAPABILITIES_HEADER, Frame, JOBS_WAITING};
use fleet_core::registration::{RegisterRequest, RegisterResponse};
use fleet_core::{Secret, Signer};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::commands::Executor;
use crate::sender::{Backoff, OutageLog, OutageNote};

/// The HTTP client type [`ChannelConfig::http`] takes (re-exported so embedders need no
/// direct reqwest dependency).
pub type HttpClient = reqwest::Client;

/// Frames sent and not yet acknowledged, at most.
const WINDOW: usize = 64;

/// Everything the channel needs.
#[derive(Clone)]
pub struct ChannelConfig {
    /// The instance.
    pub instance_id: String,
    /// `http(s)://` base URL of the control plane.
    pub control_plane_url: String,
    /// The agent's signing secret.
    pub secret: Secret,
    /// `X-Agent-Version`.
    pub version: String,
    /// Runs the commands.
    pub executor: Executor,
    /// HTTP client for registration.
    pub http: reqwest::Client,
    /// Woken when the control plane says jobs are waiting: the same handle the agent's
    /// update, plugin and restore pollers wait on (a default one wakes nobody).
    pub poll_now: crate::pipeline::PollNow,
}

/// Why a connection attempt ended.
#[derive(Debug)]
enum Ended {
    /// The token was refused: register again.
    Unauthorized,
    /// The socket could not be opened.
    CannotConnect(String),
    /// Anything else.
    Failed(String),
    /// Shutdown.
    Stopped,
    /// The token is due for renewal (the session goes on).
    RenewDue,
}

/// A token and when to renew it.
struct Token {
    text: String,
    renew_at: Instant,
}

/// `os-arch` as Go writes it (`linux-amd64`).
pub fn architecture() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    format!("{}-{arch}", std::env::consts::OS)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// Registers with the agent's secret (v1 signature) and returns the token.
pub async fn register(
    http: &reqwest::Client,
    base: &str,
    instance_id: &str,
    secret: &Secret,
    version: &str,
) -> Result<RegisterResponse, String> {
    let body = serde_json::to_vec(&RegisterRequest {
        instance_id: instance_id.to_owned(),
        enrollment_token: None,
        hostname: Some(hostname()),
        agent_version: Some(version.to_owned()),
        architecture: Some(architecture()),
    })
    .map_err(|e| e.to_string())?;
    let signer = Signer::new(secret.clone());
    let msg_id = format!("msg_{}", uuid::Uuid::new_v4().simple());
    let mut request = http
        .post(format!("{}/v1/agents/register", base.trim_end_matches('/')))
        .header("content-type", "application/json")
        .body(body.clone());
    let signed_at = fleet_core::unix_now();
    for (name, value) in signer.headers(&msg_id, signed_at, &body).pairs() {
        request = request.header(name, value);
    }
    let response = request
        .send()
        .await
        .map_err(|e| fleet_core::error_chain(&e))?;
    if let Some(skew) = crate::sender::refused_for_clock(&response, signed_at) {
        return Err(format!(
            "registration answered {}: {}",
            response.status(),
            crate::sender::clock_skew_text(skew)
        ));
    }
    if !response.status().is_success() {
        return Err(format!("registration answered {}", response.status()));
    }
    response
        .json::<RegisterResponse>()
        .await
        .map_err(|e| e.to_string())
}

fn websocket_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    let rest = base
        .strip_prefix("https://")
        .map(|r| format!("wss://{r}"))
        .or_else(|| base.strip_prefix("http://").map(|r| format!("ws://{r}")))
        .unwrap_or_else(|| base.to_owned());
    format!("{rest}/v1/agents/connect")
}

/// Runs the channel until `stop` turns true.
pub async fn run(config: ChannelConfig, mut stop: watch::Receiver<bool>) {
    let settings = config.executor.settings().clone();
    let mut reconnect = Reconnect::new(
        settings.backoff_base,
        settings.backoff_max,
        settings.healthy_after,
    );
    let mut token: Option<Token> = None;
    if let Err(err) = config.executor.recover().await {
        tracing::error!(error = %err, "cannot recover the command journal");
    }
    // Consecutive attempts that could not open the socket; from POLL_AFTER on, the agent
    // polls over plain HTTPS while it waits to try the socket again.
    let mut cannot_connect = 0u32;
    // Registration fails for as long as the control plane is down or refuses the secret:
    // warned once and then every few minutes, as the heartbeats' outage is, not per retry.
    let registration = OutageLog::default();
    loop {
        if *stop.borrow() {
            return;
        }
        let now = Instant::now();
        if token.as_ref().is_none_or(|t| now >= t.renew_at) {
            match register(
                &config.http,
                &config.control_plane_url,
                &config.instance_id,
                &config.secret,
                &config.version,
            )
            .await
            {
                Ok(answer) => {
                    token = Some(token_of(answer));
                    registration.delivered();
                }
                Err(err) => {
                    // No polling then: a control plane that cannot register agents (down,
                    // or an older one without the endpoint) would not answer polls either.
                    match registration.failed(fleet_core::unix_now()) {
                        OutageNote::Started => {
                            tracing::warn!(reason = %err, "registration failed; will retry");
                        }
                        OutageNote::Continues { failed_attempts } => tracing::warn!(
                            reason = %err,
                            failed_attempts,
                            "registration still failing; will retry"
                        ),
                        _ => tracing::debug!(reason = %err, "registration failed"),
                    }
                    token = None;
                    cannot_connect = 0;
                }
            }
        }
        if token.is_some() {
            let started = Instant::now();
            let ended = session(&config, &mut token, &mut stop).await;
            if !matches!(ended, Ended::CannotConnect(_)) {
                reconnect.session_ended(started.elapsed());
            }
            match ended {
                Ended::Stopped => return,
                Ended::Unauthorized => token = None,
                Ended::CannotConnect(reason) => {
                    cannot_connect += 1;
                    tracing::info!(%reason, "cannot open the live channel");
                }
                Ended::Failed(reason) => {
                    cannot_connect = 0;
                    tracing::info!(%reason, "live channel down");
                }
                Ended::RenewDue => {}
            }
        }
        let delay = reconnect.next_delay();
        if cannot_connect >= POLL_AFTER {
            if poll_until(&config, Instant::now() + delay, &mut stop).await {
                return;
            }
        } else {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
            }
        }
    }
}

/// When to dial again: exponential backoff with jitter (each delay is drawn between half
/// and all of `base × 2^attempt`, capped at `max`), back to `base` once a connection stayed
/// up for `healthy_after`, so one blip after a long healthy run is retried at once while a
/// control plane that accepts and drops sockets is not hammered.
#[derive(Debug)]
pub struct Reconnect {
    backoff: Backoff,
    healthy_after: Duration,
}

impl Reconnect {
    /// The agent uses 1 s, 2 min and one minute ([`CommandSettings`](crate::CommandSettings)).
    pub fn new(base: Duration, max: Duration, healthy_after: Duration) -> Self {
        Self {
            backoff: Backoff::new(base, max),
            healthy_after,
        }
    }

    /// A connection ended after being up for `up_for`; a healthy one resets the backoff.
    pub fn session_ended(&mut self, up_for: Duration) {
        if up_for >= self.healthy_after {
            self.backoff.reset();
        }
    }

    /// The next delay; `unit` is the jitter, a number in [0, 1).
    pub fn next_delay_with(&mut self, unit: f64) -> Duration {
        self.backoff.next_delay_with(unit)
    }

    /// The next delay, with a random jitter.
    pub fn next_delay(&mut self) -> Duration {
        self.backoff.next_delay()
    }
}

/// Failed socket attempts before the agent falls back to polling.
pub const POLL_AFTER: u32 = 2;
/// How often the agent polls while the socket is unavailable.
pub const POLL_INTERVAL: Duration = Duration::from_secs(5);
/// Frames sent per poll, at most.
const POLL_FRAMES: i64 = 24;
/// Bytes of frames sent per poll, at most (beyond its first frame), well under the control
/// plane's 8 MiB poll limit: output that JSON escapes (quotes, control characters) can make
/// a frame several times the size of its chunk, and 24 of those would be a poll refused
/// with 413 at every try, its output never delivered.
const POLL_BYTES: usize = 4 * 1024 * 1024;

/// Polls until `until` (or stop; then returns true).
async fn poll_until(
    config: &ChannelConfig,
    until: Instant,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    loop {
        let more = match poll_once(config).await {
            Ok(more) => more,
            Err(reason) => {
                tracing::debug!(%reason, "poll failed");
                false
            }
        };
        let now = Instant::now();
        if now >= until {
            return false;
        }
        let wait = if more {
            Duration::ZERO
        } else {
            POLL_INTERVAL.min(until - now)
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return true,
        }
    }
}

/// One `POST /v1/agents/poll`: sends queued frames and the ids of the running commands,
/// forgets the stored frames, stops the commands cancelled meanwhile, accepts the commands
/// waiting. Returns whether frames are still queued.
pub async fn poll_once(config: &ChannelConfig) -> Result<bool, String> {
    let journal = config.executor.journal();
    let queued = journal
        .pending(0, POLL_FRAMES)
        .await
        .map_err(|e| e.to_string())?;
    let fetched = queued.len();
    let mut bytes = 0;
    let frames: Vec<_> = queued
        .into_iter()
        .enumerate()
        .take_while(|(i, frame)| {
            bytes += frame.body.len();
            *i == 0 || bytes <= POLL_BYTES
        })
        .map(|(_, frame)| frame)
        .collect();
    let more = frames.len() < fetched || fetched == POLL_FRAMES as usize;
    let values: Vec<serde_json::Value> = frames
        .iter()
        .filter_map(|f| serde_json::from_slice(&f.body).ok())
        .collect();
    // The commands running here: the answer names those cancelled meanwhile, since a
    // polling agent has no socket to receive the cancel frame on.
    let answer = post_poll(config, values).await?;
    let mut done: Vec<String> = answer["acked"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    done.extend(
        answer["refused"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["id"].as_str().map(str::to_owned)),
    );
    journal.ack(&done).await.map_err(|e| e.to_string())?;
    stop_cancelled(config, &answer);
    for command in answer["commands"].as_array().into_iter().flatten() {
        let bytes = serde_json::to_vec(command).unwrap_or_default();
        if let Ok(Frame::Command(envelope)) = Frame::decode(&bytes) {
            config
                .executor
                .accept(envelope)
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(more)
}

/// Sends one signed `POST /v1/agents/poll` with `frames` and the ids of the commands
/// running here; returns the answer.
async fn post_poll(
    config: &ChannelConfig,
    frames: Vec<serde_json::Value>,
) -> Result<serde_json::Value, String> {
    let running = config.executor.running_ids();
    let body = serde_json::to_vec(&serde_json::json!({
        "instance_id": config.instance_id, "frames": frames, "running": running,
    }))
    .map_err(|e| e.to_string())?;
    let signer = Signer::new(config.secret.clone());
    let msg_id = format!("msg_{}", uuid::Uuid::new_v4().simple());
    let mut request = config
        .http
        .post(format!(
            "{}/v1/agents/poll",
            config.control_plane_url.trim_end_matches('/')
        ))
        .header("content-type", "application/json")
        .body(body.clone());
    for (name, value) in signer
        .headers(&msg_id, fleet_core::unix_now(), &body)
        .pairs()
    {
        request = request.header(name, value);
    }
    let response = request
        .send()
        .await
        .map_err(|e| fleet_core::error_chain(&e))?;
    if !response.status().is_success() {
        return Err(format!("poll answered {}", response.status()));
    }
    response.json().await.map_err(|e| e.to_string())
}

/// Stops the running commands a poll answer names in `cancel`.
fn stop_cancelled(config: &ChannelConfig, answer: &serde_json::Value) {
    for id in answer["cancel"].as_array().into_iter().flatten() {
        if let Some(id) = id.as_str() {
            tracing::info!(command_id = %id, "cancelled by the control plane (poll)");
            config.executor.cancel(id);
        }
    }
}

/// On a new socket: stops the running commands that were cancelled (or timed out) while
/// the agent had none. Their cancel frame went nowhere, and the control plane does not send
/// it again, so without this they would run on to their own end, up to days. An empty poll
/// asks: its answer names them, and carries nothing else to act on (the commands waiting
/// come over the socket).
async fn reconcile_cancels(config: ChannelConfig) {
    if config.executor.running_ids().is_empty() {
        return;
    }
    match post_poll(&config, Vec::new()).await {
        Ok(answer) => stop_cancelled(&config, &answer),
        Err(reason) => {
            tracing::warn!(%reason, "cannot ask which running commands were cancelled");
        }
    }
}

fn token_of(answer: RegisterResponse) -> Token {
    let ttl = (answer.expires_at - fleet_core::unix_now()).max(0) as u64;
    // Renew when a fifth of the lifetime is left (at least 30 s before expiry).
    let renew_in = Duration::from_secs(ttl.saturating_sub((ttl / 5).max(30)));
    Token {
        text: answer.token,
        renew_at: Instant::now() + renew_in,
    }
}

/// The handshake request with the InstaDeploy headers and the capabilities of this agent
/// ([`CAPABILITIES_HEADER`]: a control plane that knows none ignores it); `trial` adds
/// `X-Agent-Trial: 1`.
fn connect_request(
    base: &str,
    token: &str,
    version: &str,
    trial: bool,
) -> Result<tokio_tungstenite::tungstenite::handshake::client::Request, String> {
    let mut request = websocket_url(base)
        .into_client_request()
        .map_err(|e| e.to_string())?;
    let headers = request.headers_mut();
    let mut put = |name: &'static str, value: String| {
        if let Ok(value) = value.parse() {
            headers.insert(name, value);
        }
    };
    put("authorization", format!("Bearer {token}"));
    put("x-agent-version", version.to_owned());
    put("x-agent-architecture", architecture());
    put("x-agent-hostname", hostname());
    put(CAPABILITIES_HEADER, JOBS_WAITING.to_owned());
    if trial {
        put("x-agent-trial", "1".to_owned());
    }
    Ok(request)
}

/// The trial run of a downloaded agent binary (see
/// [`update_agent`](crate::commands::update_agent)): registers and opens the live channel
/// within `timeout`, then closes it. The handshake carries `X-Agent-Trial: 1`, so the
/// control plane closes it at once and keeps the running agent's socket and commands.
pub async fn trial(
    http: &reqwest::Client,
    base: &str,
    instance_id: &str,
    secret: &Secret,
    version: &str,
    timeout: Duration,
) -> Result<(), String> {
    let attempt = async {
        let answer = register(http, base, instance_id, secret, version).await?;
        let request = connect_request(base, &answer.token, version, true)?;
        let (mut socket, _) = tokio_tungstenite::connect_async(request)
            .await
            .map_err(|e| format!("cannot open the live channel: {e}"))?;
        let _ = socket.close(None).await;
        Ok(())
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| format!("no live channel within {} s", timeout.as_secs()))?
}

async fn session(
    config: &ChannelConfig,
    token_slot: &mut Option<Token>,
    stop: &mut watch::Receiver<bool>,
) -> Ended {
    let settings = config.executor.settings();
    let Some(current) = token_slot.as_ref() else {
        return Ended::Unauthorized;
    };
    let renew_at = current.renew_at;
    let request = match connect_request(
        &config.control_plane_url,
        &current.text,
        &config.version,
        false,
    ) {
        Ok(request) => request,
        Err(err) => return Ended::Failed(err),
    };
    let connected = tokio::time::timeout(
        settings.handshake_timeout,
        tokio_tungstenite::connect_async(request),
    )
    .await;
    let socket = match connected {
        Err(_) => return Ended::CannotConnect("handshake timed out".into()),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response)))
            if response.status() == 401 =>
        {
            return Ended::Unauthorized;
        }
        Ok(Err(err)) => return Ended::CannotConnect(fleet_core::error_chain(&err)),
        Ok(Ok((socket, _))) => socket,
    };
    tracing::info!("live channel connected");
    tokio::spawn(reconcile_cancels(config.clone()));
    if let Ok(binary) = crate::commands::update_agent::binary_path(settings)
        && let Err(err) =
            crate::commands::update_agent::confirm(&binary, config.executor.journal()).await
    {
        tracing::error!(error = %err, "cannot record the confirmed agent update");
    }
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::channel::<Message>(WINDOW * 2);
    // The one writer of this socket.
    let writer = tokio::spawn(async move {
        while let Some(message) = rx.recv().await {
            if sink.send(message).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let journal = config.executor.journal().clone();
    let mut ping = tokio::time::interval(settings.ping_interval);
    ping.tick().await;
    let mut last_pong = Instant::now();
    let mut sent_upto = 0i64;
    let mut in_flight: HashSet<String> = HashSet::new();
    let renew = tokio::time::sleep_until(renew_at.into());
    tokio::pin!(renew);
    let mut pending_end: Option<Ended> = None;
    let ended = loop {
        if let Some(Ended::RenewDue) = pending_end.take() {
            match register(
                &config.http,
                &config.control_plane_url,
                &config.instance_id,
                &config.secret,
                &config.version,
            )
            .await
            {
                Ok(answer) => {
                    let fresh = token_of(answer);
                    renew.as_mut().reset(fresh.renew_at.into());
                    *token_slot = Some(fresh);
                }
                Err(err) => {
                    tracing::warn!(reason = %err, "token renewal failed; retrying in 30 s");
                    renew
                        .as_mut()
                        .reset((Instant::now() + Duration::from_secs(30)).into());
                }
            }
        }
        // Send what the journal holds, within the window.
        if in_flight.len() < WINDOW {
            let notified = journal.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match journal
                .pending(sent_upto, (WINDOW - in_flight.len()) as i64)
                .await
            {
                Ok(frames) if !frames.is_empty() => {
                    for frame in frames {
                        sent_upto = frame.seq;
                        in_flight.insert(frame.frame_id);
                        let text = String::from_utf8_lossy(&frame.body).into_owned();
                        if tx.send(Message::Text(text.into())).await.is_err() {
                            break;
                        }
                    }
                    continue;
                }
                Ok(_) => {}
                Err(err) => tracing::error!(error = %err, "cannot read the journal"),
            }
            let event = tokio::select! {
                _ = notified => continue,
                event = wait(&mut stream, &mut ping, stop, &mut renew) => event,
            };
            match apply(config, event, &tx, &mut in_flight, &mut last_pong).await {
                Some(Ended::RenewDue) => pending_end = Some(Ended::RenewDue),
                Some(ended) => break ended,
                None => {}
            }
        } else {
            let event = wait(&mut stream, &mut ping, stop, &mut renew).await;
            match apply(config, event, &tx, &mut in_flight, &mut last_pong).await {
                Some(Ended::RenewDue) => pending_end = Some(Ended::RenewDue),
                Some(ended) => break ended,
                None => {}
            }
        }
    };
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    ended
}

type Incoming = futures_util::stream::SplitStream<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
>;

/// What woke the session.
enum Event {
    Stop,
    Renew,
    Ping,
    Message(Option<Result<Message, tokio_tungstenite::tungstenite::Error>>),
}

/// Waits for the next event. Only cancel-safe waits happen here, so the session may race it
/// against the journal's notification; the event is handled after, never half-way.
async fn wait(
    stream: &mut Incoming,
    ping: &mut tokio::time::Interval,
    stop: &mut watch::Receiver<bool>,
    renew: &mut std::pin::Pin<&mut tokio::time::Sleep>,
) -> Event {
    tokio::select! {
        _ = async { let _ = stop.wait_for(|s| *s).await; } => Event::Stop,
        // The token is only checked at the handshake; a fresh one is fetched before it
        // expires, so a reconnect always has a valid one.
        _ = renew.as_mut() => Event::Renew,
        _ = ping.tick() => Event::Ping,
        message = stream.next() => Event::Message(message),
    }
}

/// Handles one event; `Some` ends the session (or asks for a renewal).
async fn apply(
    config: &ChannelConfig,
    event: Event,
    tx: &mpsc::Sender<Message>,
    in_flight: &mut HashSet<String>,
    last_pong: &mut Instant,
) -> Option<Ended> {
    let settings = config.executor.settings();
    match event {
        Event::Stop => {
            let _ = tx.send(Message::Close(None)).await;
            Some(Ended::Stopped)
        }
        Event::Renew => Some(Ended::RenewDue),
        Event::Ping => {
            if last_pong.elapsed() > settings.pong_timeout {
                return Some(Ended::Failed("no pong for too long".into()));
            }
            let _ = tx.send(Message::Ping(Default::default())).await;
            None
        }
        Event::Message(message) => {
            let message = match message {
                None => return Some(Ended::Failed("closed by the control plane".into())),
                Some(Err(err)) => return Some(Ended::Failed(err.to_string())),
                Some(Ok(message)) => message,
            };
            *last_pong = Instant::now();
            let bytes = match message {
                Message::Text(text) => text.as_bytes().to_vec(),
                Message::Binary(bytes) => bytes.to_vec(),
                Message::Close(_) => {
                    return Some(Ended::Failed("closed by the control plane".into()));
                }
                _ => return None,
            };
            handle(config, &bytes, tx, in_flight).await;
            None
        }
    }
}

async fn handle(
    config: &ChannelConfig,
    bytes: &[u8],
    tx: &mpsc::Sender<Message>,
    in_flight: &mut HashSet<String>,
) {
    let executor = &config.executor;
    match Frame::decode(bytes) {
        Ok(Frame::Command(envelope)) => {
            if let Err(err) = executor.accept(envelope).await {
                tracing::error!(error = %err, "cannot journal a command");
            }
        }
        Ok(Frame::Cancel { command_id, .. }) => executor.cancel(&command_id),
        Ok(Frame::Ack { ack, .. }) => {
            for id in &ack.ids {
                in_flight.remove(id);
            }
            if let Err(err) = executor.journal().ack(&ack.ids).await {
                tracing::error!(error = %err, "cannot forget acknowledged frames");
            }
        }
        Ok(Frame::Error { id, message }) => {
            tracing::warn!(frame = %id, %message, "the control plane refused a frame");
            // A refused frame will never be accepted: forget it rather than resend forever.
            if in_flight.remove(&id) {
                let _ = executor.journal().ack(std::slice::from_ref(&id)).await;
            }
        }
        Ok(Frame::JobsWaiting { pipelines, .. }) => {
            tracing::debug!(
                ?pipelines,
                "the control plane says jobs are waiting; polling now"
            );
            for pipeline in pipelines {
                config.poll_now.wake(pipeline);
            }
        }
        Ok(Frame::Result { .. } | Frame::Logs { .. }) => {}
        Err((id, message)) => {
            // The InstaDeploy answer to an unreadable command: FAILED with its id.
            if id != "unknown" && !id.is_empty() {
                let result = crate::commands::failed(&id, &message);
                let _ = executor
                    .journal()
                    .enqueue(&Frame::Result {
                        id: uuid::Uuid::new_v4().to_string(),
                        result,
                    })
                    .await;
            } else {
                let frame = Frame::Error { id, message };
                let text = String::from_utf8_lossy(&frame.encode()).into_owned();
                let _ = tx.send(Message::Text(text.into())).await;
            }
        }
    }
}

/// Shared handle so the agent can hold the channel's config.
pub type SharedChannel = Arc<ChannelConfig>;

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    /// The next delay with the largest jitter (the ceiling), in whole seconds.
    fn ceiling(r: &mut Reconnect) -> u64 {
        r.next_delay_with(0.999_999_999).as_secs_f64().round() as u64
    }

    #[test]
    fn short_lived_connections_back_off_from_one_second_to_two_minutes_with_jitter() {
        let mut r = Reconnect::new(SECOND, 120 * SECOND, 60 * SECOND);
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            r.session_ended(Duration::from_secs(59));
            ceilings.push(ceiling(&mut r));
        }
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 32, 64, 120, 120, 120]);
        // The smallest jitter gives half of the ceiling; random ones stay in between.
        let mut r = Reconnect::new(SECOND, 120 * SECOND, 60 * SECOND);
        assert_eq!(r.next_delay_with(0.0), SECOND / 2);
        for attempt in 1..200u32 {
            let top = SECOND * 2u32.pow(attempt.min(7)).min(120);
            let delay = r.next_delay();
            assert!(delay >= top / 2 && delay <= top, "{attempt}: {delay:?}");
        }
    }

    #[test]
    fn a_connection_up_for_the_healthy_period_resets_the_delay_to_one_second() {
        let mut r = Reconnect::new(SECOND, 120 * SECOND, 60 * SECOND);
        for _ in 0..6 {
            r.next_delay_with(0.0);
        }
        assert_eq!(ceiling(&mut r), 64);
        r.session_ended(Duration::from_millis(59_999));
        assert_eq!(ceiling(&mut r), 120, "one ms short of healthy: no reset");
        r.session_ended(60 * SECOND);
        assert_eq!(ceiling(&mut r), 1);
        assert_eq!(ceiling(&mut r), 2);
        // The healthy period is a setting; tests shorten it.
        let mut r = Reconnect::new(SECOND, 120 * SECOND, Duration::from_millis(1500));
        ceiling(&mut r);
        ceiling(&mut r);
        r.session_ended(Duration::from_millis(1500));
        assert_eq!(ceiling(&mut r), 1);
    }
}
