//! The same SIGKILL scenario against the real control plane (`fleet_server`) instead of the
//! test receiver: its SQLite store records each message id once, so what it stored is the
//! proof.

use std::path::Path;
use std::time::Duration;

use fleet_core::SecretResolver;
use fleet_server::{ControlPlane, SqliteStore};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection};
use tokio::sync::oneshot;

use crate::*;

/// The control plane served on 127.0.0.1 over a SQLite file.
struct ControlPlaneServer {
    port: u16,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl ControlPlaneServer {
    async fn start(db: &Path, port: u16) -> Self {
        let store = SqliteStore::connect(&format!("sqlite://{}", db.display()))
            .await
            .expect("control-plane store");
        let secrets = serde_json::json!({ INSTANCE: SECRET }).to_string();
        let router = ControlPlane::builder()
            .store(store)
            .secrets(SecretResolver::from_config(Some(&secrets), None).unwrap())
            .build()
            .expect("control plane");
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind control plane");
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .expect("control plane serve");
        });
        Self { port, stop, task }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Message ids of the stored heartbeats, in the order they were stored.
async fn stored_ids(db: &Path) -> Vec<String> {
    let mut conn = SqliteConnectOptions::new()
        .filename(db)
        .read_only(true)
        .connect()
        .await
        .expect("open the control plane's database");
    let ids: Vec<Option<String>> = sqlx::query_scalar("SELECT msg_id FROM heartbeats ORDER BY id")
        .fetch_all(&mut conn)
        .await
        .expect("read heartbeats");
    let _ = conn.close().await;
    ids.into_iter().flatten().collect()
}

async fn wait_for_stored(db: &Path, n: usize, secs: u64) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let ids = stored_ids(db).await;
        if ids.len() >= n || tokio::time::Instant::now() > deadline {
            return ids;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_against_the_real_control_plane_loses_and_duplicates_nothing() {
    const N: f64 = 5.0;
    let dir = temp_dir("cp-kill9");
    let db = dir.join("control-plane.db");
    let cp = ControlPlaneServer::start(&db, 0).await;
    let port = cp.port;
    let local_port = free_port();
    let env = agent_env(&cp.url(), &dir, local_port);
    let mut agent = Guard(spawn_agent(&env, &dir));

    let first = wait_for_stored(&db, 1, 30).await;
    assert!(
        !first.is_empty(),
        "no heartbeat stored; see {}",
        dir.display()
    );

    cp.stop().await;
    let queued = wait_for_queued(local_port, N).await;
    assert!(queued >= N, "only {queued} queued");
    agent.0.kill().unwrap(); // SIGKILL
    agent.0.wait().unwrap();
    let stranded = waiting_ids(&dir).await;
    assert!(stranded.len() >= N as usize, "{stranded:?}");
    let before = stored_ids(&db).await.len();

    let cp = ControlPlaneServer::start(&db, port).await;
    let mut agent = Guard(spawn_agent(&env, &dir));
    let ids = wait_for_stored(&db, before + stranded.len(), 60).await;
    assert!(
        ids.len() >= before + stranded.len(),
        "stranded heartbeats missing; see {}",
        dir.display()
    );
    assert_eq!(
        &ids[before..before + stranded.len()],
        &stranded[..],
        "in order"
    );
    let unique: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "each exactly once");

    sigterm_and_wait(&mut agent).await;
    cp.stop().await;
}
