//! The live channel's reconnect timing against a real WebSocket server that accepts each
//! connection and drops it: short-lived connections make the agent wait longer and longer
//! (exponential backoff with jitter), and a connection that stayed up for the healthy period
//! brings the next delay back to the base. The periods are scaled down (base 250 ms, cap
//! 8 s, healthy after 1.5 s; the agent's defaults are 1 s, 2 min and one minute) and every
//! assertion keeps seconds of margin for a loaded machine.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::routing::{get, post};
use fleet_agent::CommandSettings;
use fleet_agent::channel::{ChannelConfig, HttpClient};
use fleet_agent::commands::Executor;
use fleet_agent::logstream::Journal;
use fleet_core::Secret;

use crate::support::{INSTANCE, SECRET, temp_dir};

/// Connections held open this long (by attempt number, from 1); others are dropped at once.
const HELD: (usize, Duration) = (6, Duration::from_secs(2));

#[derive(Default)]
struct Seen {
    /// When each connection was accepted, and when the server dropped it.
    sessions: Vec<(Instant, Option<Instant>)>,
}

async fn connect(
    State(seen): State<Arc<Mutex<Seen>>>,
    ws: WebSocketUpgrade,
) -> axum::response::Response {
    let attempt = {
        let mut seen = seen.lock().unwrap();
        seen.sessions.push((Instant::now(), None));
        seen.sessions.len()
    };
    ws.on_upgrade(move |mut socket| async move {
        if attempt == HELD.0 {
            tokio::time::sleep(HELD.1).await;
        }
        seen.lock().unwrap().sessions[attempt - 1].1 = Some(Instant::now());
        let _ = socket.send(Message::Close(None)).await;
    })
}

async fn register() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({
        "instance_id": INSTANCE, "token": "test-token",
        "expires_at": fleet_core::unix_now() + 3600,
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_delays_grow_for_short_connections_and_reset_after_a_healthy_one() {
    let seen: Arc<Mutex<Seen>> = Default::default();
    let app = axum::Router::new()
        .route("/v1/agents/register", post(register))
        .route("/v1/agents/connect", get(connect))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });

    let dir = temp_dir("reconnect");
    let journal = Journal::open(&dir.join("state.db")).await.expect("journal");
    let settings = CommandSettings {
        backoff_base: Duration::from_millis(250),
        backoff_max: Duration::from_secs(8),
        healthy_after: Duration::from_millis(1500),
        agent_binary: Some(dir.join("fleet-agent")),
        ..CommandSettings::default()
    };
    let executor = Executor::new(
        journal,
        settings,
        None,
        Arc::new(tokio::sync::watch::channel(false).0),
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let channel = tokio::spawn(fleet_agent::channel::run(
        ChannelConfig {
            instance_id: INSTANCE.into(),
            control_plane_url: url,
            secret: Secret::new(SECRET).expect("secret"),
            version: "test".into(),
            executor,
            http: HttpClient::new(),
            poll_now: Default::default(),
        },
        stopped,
    ));

    // Six drops at once, the sixth connection held past the healthy period, then one more.
    let deadline = Instant::now() + Duration::from_secs(90);
    while seen.lock().unwrap().sessions.len() < HELD.0 + 1 {
        assert!(Instant::now() < deadline, "the agent stopped reconnecting");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send_replace(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), channel).await;

    let sessions = seen.lock().unwrap().sessions.clone();
    // The delay before connection k+1: from the drop of k to the accept of k+1.
    let gaps: Vec<Duration> = sessions
        .windows(2)
        .map(|w| w[1].0 - w[0].1.expect("dropped"))
        .collect();
    // After short connections each delay is at least half of base × 2^k (the jitter never
    // goes below half): 125 ms, 250 ms, 500 ms, 1 s, 2 s.
    for (k, gap) in gaps.iter().take(HELD.0 - 1).enumerate() {
        let floor = Duration::from_millis(125) * 2u32.pow(k as u32);
        assert!(
            *gap >= floor,
            "delay {k} is {gap:?}, below {floor:?}: {gaps:?}"
        );
    }
    // Without a reset the next one would be at least 4 s (ceiling 8 s); after the healthy
    // connection it is drawn again below the 250 ms base.
    let after_healthy = gaps[HELD.0 - 1];
    assert!(
        after_healthy < Duration::from_secs(2),
        "the delay after a healthy connection is {after_healthy:?}: {gaps:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A control plane that cannot be reached is logged with the cause, not only with reqwest's
/// "error sending request".
#[tokio::test]
async fn a_failed_registration_names_the_cause() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let base = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let err = fleet_agent::channel::register(
        &HttpClient::new(),
        &base,
        INSTANCE,
        &Secret::new(SECRET).expect("secret"),
        "1.0.0",
    )
    .await
    .expect_err("nothing listens there");
    assert!(err.contains("Connection refused"), "{err}");
}
