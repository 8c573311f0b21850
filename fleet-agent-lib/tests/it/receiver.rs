//! A real HTTP control-plane stand-in for tests: axum on 127.0.0.1 that verifies v1 (and v0)
//! signatures with `fleet_core::Verifier`, acknowledges a repeated message id without
//! recording it twice (as the control plane does), and can answer with a chosen status.
//! Shared by the library's and the binary's integration tests.

#![allow(dead_code)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use fleet_core::{SecretResolver, SignatureHeaders, Verifier};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// How the receiver answers.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Verify, record, 200.
    Accept,
    /// Answer this status (and `Retry-After` when given) without recording.
    Fail(u16, Option<String>),
    /// Answer 503 to every second request, accept the others.
    Flaky,
    /// Answer 401, as a control plane whose clock is this many seconds ahead would answer
    /// every v1 signature, with that clock in `Date`.
    ClockAhead(i64),
}

/// What the receiver saw; survives a restart when passed back to [`Receiver::start_with`].
pub struct Seen {
    verifier: Verifier,
    ids: Mutex<HashSet<String>>,
    /// Accepted messages in arrival order: `(webhook-id or "", body)`.
    pub accepted: Mutex<Vec<(String, Value)>>,
    /// Every request, including refused and duplicate ones.
    pub attempts: AtomicU64,
    /// Requests whose id had already been accepted.
    pub duplicates: AtomicU64,
    /// Requests whose signature did not verify.
    pub bad_signatures: AtomicU64,
    /// Verified requests whose body the protocol refuses.
    pub invalid: AtomicU64,
    /// The current answer.
    pub mode: Mutex<Mode>,
}

impl Seen {
    /// Expects `instance_id` signed with `secret`.
    pub fn new(instance_id: &str, secret: &str) -> Arc<Self> {
        let map = serde_json::json!({ instance_id: secret }).to_string();
        let resolver = SecretResolver::from_config(Some(&map), None).expect("secret map");
        Arc::new(Self {
            verifier: Verifier::new(resolver),
            ids: Mutex::new(HashSet::new()),
            accepted: Mutex::new(Vec::new()),
            attempts: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            bad_signatures: AtomicU64::new(0),
            invalid: AtomicU64::new(0),
            mode: Mutex::new(Mode::Accept),
        })
    }

    /// Accepted bodies so far.
    pub fn bodies(&self) -> Vec<Value> {
        self.accepted
            .lock()
            .unwrap()
            .iter()
            .map(|(_, b)| b.clone())
            .collect()
    }

    /// Sets the answer.
    pub fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }
}

/// A running receiver.
pub struct Receiver {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it saw.
    pub seen: Arc<Seen>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Starts on a free port.
    pub async fn start(instance_id: &str, secret: &str) -> Self {
        Self::start_with(Seen::new(instance_id, secret), 0).await
    }

    /// Starts on `port` (0: any) with existing state.
    pub async fn start_with(seen: Arc<Seen>, port: u16) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().unwrap();
        let app = Router::new()
            .route("/api/heartbeats", post(receive))
            .route("/v1/agents/register", post(register))
            .with_state(seen.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .expect("receiver");
        });
        Self {
            addr,
            seen,
            stop: Some(stop),
            task,
        }
    }

    /// `http://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops listening (the port is free afterwards) and returns the state.
    pub async fn stop(mut self) -> Arc<Seen> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
        self.seen.clone()
    }
}

/// The live channel's registration: refused like a heartbeat in [`Mode::ClockAhead`], and
/// not served otherwise (this stand-in has no live channel).
async fn register(State(seen): State<Arc<Seen>>) -> Response {
    match seen.mode.lock().unwrap().clone() {
        Mode::ClockAhead(secs) => clock_ahead(secs),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// A 401 with a `Date` `secs` ahead of this host's clock.
fn clock_ahead(secs: i64) -> Response {
    let mut response = StatusCode::UNAUTHORIZED.into_response();
    let date = fleet_core::clock::http_date(fleet_core::unix_now() + secs);
    response.headers_mut().insert("date", date.parse().unwrap());
    response
}

async fn receive(State(seen): State<Arc<Seen>>, headers: HeaderMap, body: Bytes) -> Response {
    let attempt = seen.attempts.fetch_add(1, Ordering::SeqCst);
    let mode = seen.mode.lock().unwrap().clone();
    if matches!(mode, Mode::Flaky) && attempt % 2 == 1 {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    if let Mode::ClockAhead(secs) = mode {
        return clock_ahead(secs);
    }
    if let Mode::Fail(status, retry_after) = mode {
        let mut response = StatusCode::from_u16(status).unwrap().into_response();
        if let Some(value) = retry_after {
            response
                .headers_mut()
                .insert("retry-after", value.parse().unwrap());
        }
        return response;
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let sig = SignatureHeaders::from_lookup(header);
    let verified = match seen.verifier.verify(&body, &sig, fleet_core::unix_now()) {
        Ok(v) => v,
        Err(_) => {
            seen.bad_signatures.fetch_add(1, Ordering::SeqCst);
            return (StatusCode::UNAUTHORIZED, "invalid signature").into_response();
        }
    };
    let id = verified.msg_id.clone().unwrap_or_default();
    if !id.is_empty() && !seen.ids.lock().unwrap().insert(id.clone()) {
        seen.duplicates.fetch_add(1, Ordering::SeqCst);
        return StatusCode::OK.into_response();
    }
    if fleet_core::Heartbeat::decode(&body, &fleet_core::Limits::default()).is_err() {
        seen.invalid.fetch_add(1, Ordering::SeqCst);
        return StatusCode::UNPROCESSABLE_ENTITY.into_response();
    }
    let value: Value = serde_json::from_slice(&body).expect("a valid heartbeat is JSON");
    seen.accepted.lock().unwrap().push((id, value));
    StatusCode::OK.into_response()
}
