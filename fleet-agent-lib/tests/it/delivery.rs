//! Delivery to a real receiver: signatures, order, exactly once, retries, `Retry-After`, 401.

use std::sync::atomic::Ordering;
use std::time::Duration;

use fleet_agent::{Agent, AgentConfig};
use fleet_core::Scheme;
use serde_json::Value;
use tokio::sync::oneshot;

use crate::receiver::{Mode, Receiver, Seen};
use crate::support::*;

/// A running agent and the way to stop it.
struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<fleet_agent::Result<()>>,
}

impl Running {
    async fn start(config: AgentConfig) -> Self {
        let mut agent = Agent::builder(config).without_builtins().build().unwrap();
        agent.bind().await.unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(agent.run(async {
            let _ = stopped.await;
        }));
        Self {
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("the agent stops promptly")
            .unwrap()
            .unwrap();
    }
}

#[tokio::test]
async fn heartbeats_arrive_signed_v1_in_order() {
    let receiver = Receiver::start(INSTANCE, SECRET).await;
    let dir = temp_dir("v1");
    let agent = Running::start(config(&receiver.url(), &dir)).await;
    let seen = receiver.seen.clone();
    assert!(wait_until(10, || seen.accepted.lock().unwrap().len() >= 3).await);
    agent.stop().await;
    assert_in_order_once(&seen);
    let accepted = seen.accepted.lock().unwrap().clone();
    assert!(accepted.iter().all(|(id, _)| id.starts_with("msg_")));
    assert_eq!(seen.bad_signatures.load(Ordering::SeqCst), 0);
    assert_eq!(seen.invalid.load(Ordering::SeqCst), 0);
    let body = &accepted[0].1;
    assert_eq!(body["instance_id"], INSTANCE);
    assert_eq!(body["iam_sso_enabled"], false);
    receiver.stop().await;
}

#[tokio::test]
async fn v0_signatures_for_an_older_control_plane() {
    let receiver = Receiver::start(INSTANCE, SECRET).await;
    let dir = temp_dir("v0");
    let mut c = config(&receiver.url(), &dir);
    c.signature_scheme = Scheme::V0;
    let agent = Running::start(c).await;
    let seen = receiver.seen.clone();
    assert!(wait_until(10, || seen.accepted.lock().unwrap().len() >= 2).await);
    agent.stop().await;
    // v0 carries no message id.
    assert!(
        seen.accepted
            .lock()
            .unwrap()
            .iter()
            .all(|(id, _)| id.is_empty())
    );
    assert_eq!(seen.bad_signatures.load(Ordering::SeqCst), 0);
    receiver.stop().await;
}

/// `(waiting, bytes, dropped ever)` of the outbox at `dir` (the agent must be stopped).
async fn stats(dir: &std::path::Path) -> (u64, u64, u64) {
    let bounds = fleet_agent::outbox::Bounds {
        max_messages: 1000,
        max_bytes: 1 << 30,
        max_age: Duration::from_secs(3600),
    };
    let outbox = fleet_agent::outbox::Outbox::open(&dir.join("state.db"), bounds)
        .await
        .unwrap();
    outbox.stats().await.unwrap()
}

async fn waiting(dir: &std::path::Path) -> u64 {
    stats(dir).await.0
}

/// Message ids are UUIDv7, so accepted order must be id order.
fn assert_in_order_once(seen: &Seen) {
    let ids: Vec<String> = seen
        .accepted
        .lock()
        .unwrap()
        .iter()
        .map(|(id, _)| id.clone())
        .collect();
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(ids, sorted, "accepted out of order or twice");
}

#[tokio::test]
async fn a_flaky_control_plane_loses_nothing_and_duplicates_nothing() {
    // Queue up heartbeats while nobody listens.
    let port = free_port();
    let dir = temp_dir("flaky");
    let agent = Running::start(config(&format!("http://127.0.0.1:{port}"), &dir)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    agent.stop().await;
    let queued = waiting(&dir).await;
    assert!(queued >= 5, "only {queued} queued");
    // A second later, so that what is collected from now on has a later time.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let offline_until = fleet_core::unix_now();

    // Every second request fails in the middle of the flush.
    let seen = Seen::new(INSTANCE, SECRET);
    seen.set_mode(Mode::Flaky);
    let receiver = Receiver::start_with(seen.clone(), port).await;
    let mut c = config(&receiver.url(), &dir);
    c.heartbeat_interval = Duration::from_secs(3600);
    let agent = Running::start(c).await;
    // The queued ones plus the heartbeat made at the restart.
    let expected = queued as usize + 1;
    assert!(wait_until(15, || seen.accepted.lock().unwrap().len() >= expected).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    agent.stop().await;
    assert_eq!(seen.accepted.lock().unwrap().len(), expected);
    assert_in_order_once(&seen);
    assert!(
        seen.attempts.load(Ordering::SeqCst) > expected as u64,
        "some sends failed"
    );
    assert_eq!(waiting(&dir).await, 0);
    // Delivered late, each keeps the time it was collected at: the queued ones before the
    // control plane came back, the one made at the restart after.
    let collected: Vec<i64> = seen
        .bodies()
        .iter()
        .map(|b| b["collected_at"].as_i64().expect("collected_at"))
        .collect();
    assert!(collected.is_sorted(), "{collected:?}");
    let (late, fresh) = collected.split_at(queued as usize);
    assert!(late.iter().all(|&at| at < offline_until), "{collected:?}");
    assert!(fresh.iter().all(|&at| at >= offline_until), "{collected:?}");
    receiver.stop().await;
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let receiver = Receiver::start(INSTANCE, SECRET).await;
    receiver.seen.set_mode(Mode::Fail(503, Some("2".into())));
    let dir = temp_dir("retry-after");
    let mut c = config(&receiver.url(), &dir);
    c.heartbeat_interval = Duration::from_millis(100);
    let agent = Running::start(c).await;
    let seen = receiver.seen.clone();
    assert!(wait_until(5, || seen.attempts.load(Ordering::SeqCst) >= 1).await);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Without Retry-After the 50 ms backoff would have tried many times by now.
    assert_eq!(seen.attempts.load(Ordering::SeqCst), 1);
    seen.set_mode(Mode::Accept);
    assert!(wait_until(10, || seen.accepted.lock().unwrap().len() >= 5).await);
    agent.stop().await;
    receiver.stop().await;
}

#[tokio::test]
async fn a_401_is_logged_once_and_not_hammered() {
    // The receiver knows another secret: every signature fails with 401.
    let seen = Seen::new(INSTANCE, "some-other-secret");
    let receiver = Receiver::start_with(seen.clone(), 0).await;
    let dir = temp_dir("unauthorized");
    let mut c = config(&receiver.url(), &dir);
    c.heartbeat_interval = Duration::from_millis(50);
    c.buffer.backoff_max = Duration::from_secs(30);
    let agent = Running::start(c).await;
    assert!(wait_until(5, || seen.bad_signatures.load(Ordering::SeqCst) >= 1).await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Thirty heartbeats were queued, one attempt was made.
    assert_eq!(seen.attempts.load(Ordering::SeqCst), 1);
    agent.stop().await;
    receiver.stop().await;
}

#[tokio::test]
async fn the_outbox_bound_drops_oldest_and_reports_the_count() {
    let port = free_port();
    let dir = temp_dir("bounded");
    let mut c = config(&format!("http://127.0.0.1:{port}"), &dir);
    c.buffer.max_messages = 3;
    c.heartbeat_interval = Duration::from_millis(100);
    let agent = Running::start(c.clone()).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    agent.stop().await;
    let (waiting, _, dropped) = stats(&dir).await;
    assert_eq!(waiting, 3);
    assert!(dropped >= 1, "nothing was dropped");

    // A larger bound now, so the restart itself drops nothing: every drop so far must be
    // reported, exactly, by the messages that reach the control plane.
    let receiver = Receiver::start_with(Seen::new(INSTANCE, SECRET), port).await;
    c.buffer.max_messages = 100;
    c.heartbeat_interval = Duration::from_secs(3600);
    let agent = Running::start(c).await;
    let seen = receiver.seen.clone();
    assert!(wait_until(10, || seen.accepted.lock().unwrap().len() >= 4).await);
    agent.stop().await;
    let bodies = seen.bodies();
    assert_eq!(bodies.len(), 4);
    let reported: u64 = bodies
        .iter()
        .filter_map(|b| b.get("outbox_dropped").and_then(Value::as_u64))
        .sum();
    assert_eq!(reported, dropped, "bodies: {bodies:?}");
    receiver.stop().await;
}

#[tokio::test]
async fn without_the_buffer_failures_are_dropped_and_counted() {
    let port = free_port();
    let dir = temp_dir("unbuffered");
    let mut c = config(&format!("http://127.0.0.1:{port}"), &dir);
    c.buffer.enabled = false;
    c.buffer.send_retries = 1;
    c.heartbeat_interval = Duration::from_millis(150);
    let agent = Running::start(c.clone()).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    // The control plane comes back; the next heartbeat reports what was lost.
    let receiver = Receiver::start_with(Seen::new(INSTANCE, SECRET), port).await;
    let seen = receiver.seen.clone();
    assert!(wait_until(10, || seen.accepted.lock().unwrap().len() >= 2).await);
    agent.stop().await;
    let first = &seen.bodies()[0];
    assert!(first["outbox_dropped"].as_u64().unwrap() >= 2, "{first}");
    assert!(seen.bodies()[1].get("outbox_dropped").is_none());
    assert!(
        !dir.join("state.db").exists(),
        "no outbox file when buffering is off"
    );
    receiver.stop().await;
}

/// A state path the agent cannot use stops it with an error that names the file, not a bare
/// "No such file or directory" or "file is not a database".
#[tokio::test]
async fn an_unusable_state_path_is_named() {
    let dir = temp_dir("bad-state");
    let not_a_database = dir.join("garbage.db");
    std::fs::write(&not_a_database, "not a database, not even close").unwrap();
    let under_a_file = not_a_database.join("state.db");
    for path in [not_a_database, under_a_file] {
        let mut c = config("http://127.0.0.1:9", &dir);
        c.state_path = path.clone();
        let agent = Agent::builder(c).without_builtins().build().unwrap();
        let err = tokio::time::timeout(Duration::from_secs(10), agent.run(std::future::pending()))
            .await
            .expect("the agent gives up at once")
            .expect_err("an unusable state path is an error");
        let text = err.to_string();
        assert!(
            text.contains(&path.display().to_string()) && text.contains("AGENT_STATE_PATH"),
            "{text}"
        );
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
