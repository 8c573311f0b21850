//! Several `fleet-server` processes on one PostgreSQL: a command released on one replica for
//! an agent connected to another is routed with `LISTEN/NOTIFY`.
//!
//! The notification only says "look at the database for this instance": the database stays
//! the single source of truth, so a lost notification delays nothing for long (the agent
//! gets every pending command again when it reconnects).

use std::sync::Weak;

use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use sqlx::postgres::PgListener;

use crate::AppState;

/// The PostgreSQL channel replicas listen on.
pub const CHANNEL: &str = "fleet_commands";

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Note {
    /// Send the pending commands of this instance, if it is connected to you.
    Deliver { instance_id: String },
    /// Tell this instance to stop a target.
    Cancel {
        instance_id: String,
        target_id: String,
    },
}

/// Sends notifications to the other replicas.
#[derive(Debug, Clone)]
pub(crate) struct Notifier {
    pool: PgPool,
}

impl Notifier {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    async fn notify(&self, note: &Note) {
        let payload = serde_json::to_string(note).unwrap_or_default();
        let sent = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(payload)
            .execute(&self.pool)
            .await;
        if let Err(err) = sent {
            tracing::warn!(error = %err, "cannot notify the other replicas");
        }
    }

    pub async fn deliver(&self, instance_id: &str) {
        self.notify(&Note::Deliver {
            instance_id: instance_id.to_owned(),
        })
        .await;
    }

    pub async fn cancel(&self, instance_id: &str, target_id: &str) {
        self.notify(&Note::Cancel {
            instance_id: instance_id.to_owned(),
            target_id: target_id.to_owned(),
        })
        .await;
    }
}

/// Listens for the other replicas' notifications until the control plane is dropped.
pub(crate) fn spawn_listener(state: Weak<AppState>, pool: PgPool) {
    tokio::spawn(async move {
        let mut listener = loop {
            match PgListener::connect_with(&pool).await {
                Ok(mut listener) => match listener.listen(CHANNEL).await {
                    Ok(()) => break listener,
                    Err(err) => tracing::warn!(error = %err, "cannot LISTEN; retrying"),
                },
                Err(err) => tracing::warn!(error = %err, "cannot connect LISTEN; retrying"),
            }
            if state.strong_count() == 0 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        };
        loop {
            let received =
                tokio::time::timeout(std::time::Duration::from_secs(5), listener.recv()).await;
            let Some(state) = state.upgrade() else { return };
            let notification = match received {
                Err(_) => continue,
                Ok(Err(err)) => {
                    // PgListener reconnects by itself on the next recv.
                    tracing::warn!(error = %err, "LISTEN connection lost");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
                Ok(Ok(notification)) => notification,
            };
            let Ok(note) = serde_json::from_str::<Note>(notification.payload()) else {
                continue;
            };
            let Some(commands) = state.store.commands() else {
                continue;
            };
            match note {
                Note::Deliver { instance_id } => {
                    state.live.deliver_pending(commands, &instance_id).await;
                }
                Note::Cancel {
                    instance_id,
                    target_id,
                } => state.live.cancel_local(&instance_id, &target_id).await,
            }
        }
    });
}
