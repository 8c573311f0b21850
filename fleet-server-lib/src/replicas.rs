//! Several `fleet-server` processes on one PostgreSQL: a command released on one replica for
//! an agent connected to another is routed with `LISTEN/NOTIFY`, and so is the news that
//! jobs wait for an agent (a `jobs_waiting` frame).
//!
//! The notification only says "look at the database for this instance": the database stays
//! the single source of truth, so a lost notification delays nothing for long (the agent
//! gets every pending command again when it reconnects).

use std::sync::Weak;

use fleet_core::command::Pipeline;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use sqlx::postgres::PgListener;

use crate::AppState;

/// The PostgreSQL channel replicas on the `public` schema listen on. `NOTIFY` reaches every
/// session of the database, whatever its schema, so control planes kept in other schemas of
/// the same database each take a channel of their own ([`channel_for_schema`]).
pub const CHANNEL: &str = "fleet_commands";

/// The longest channel name PostgreSQL keeps whole (`NAMEDATALEN - 1` bytes).
const MAX_CHANNEL_LEN: usize = 63;

/// The channel of the control planes whose tables are in `schema`: [`CHANNEL`] on
/// `public` (as replicas of every version use), `fleet_commands.<schema>` elsewhere, or a
/// digest of a schema name too long for that.
pub fn channel_for_schema(schema: &str) -> String {
    if schema == "public" {
        return CHANNEL.to_owned();
    }
    let named = format!("{CHANNEL}.{schema}");
    if named.len() <= MAX_CHANNEL_LEN {
        return named;
    }
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(schema.as_bytes()));
    format!(
        "{CHANNEL}#{}",
        &digest[..MAX_CHANNEL_LEN - CHANNEL.len() - 1]
    )
}

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
    /// Tell these instances, those connected to you, that jobs wait for `pipeline`. A
    /// replica that predates this note cannot read it and skips it.
    JobsWaiting {
        pipeline: Pipeline,
        instance_ids: Vec<String>,
    },
}

/// Bytes of instance ids per `jobs_waiting` note, well under PostgreSQL's 8,000-byte limit
/// on a notification's payload: a batch of thousands of targets goes out as several notes.
const JOBS_WAITING_NOTE_BYTES: usize = 6000;

/// Splits `instance_ids` into groups of at most [`JOBS_WAITING_NOTE_BYTES`] (as JSON), in
/// order; an id is never split.
fn note_groups(instance_ids: &[String]) -> Vec<&[String]> {
    let mut groups = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, id) in instance_ids.iter().enumerate() {
        // Quoted, escaped and followed by a comma.
        let size = serde_json::to_string(id).map_or(id.len(), |quoted| quoted.len()) + 1;
        if i > start && bytes + size > JOBS_WAITING_NOTE_BYTES {
            groups.push(&instance_ids[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < instance_ids.len() {
        groups.push(&instance_ids[start..]);
    }
    groups
}

/// Sends notifications to the other replicas.
#[derive(Debug, Clone)]
pub(crate) struct Notifier {
    pool: PgPool,
    channel: String,
}

impl Notifier {
    pub fn new((pool, channel): (PgPool, String)) -> Self {
        Self { pool, channel }
    }

    async fn notify(&self, note: &Note) {
        let payload = serde_json::to_string(note).unwrap_or_default();
        let sent = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(&self.channel)
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

    pub async fn jobs_waiting(&self, pipeline: Pipeline, instance_ids: &[String]) {
        for group in note_groups(instance_ids) {
            self.notify(&Note::JobsWaiting {
                pipeline,
                instance_ids: group.to_vec(),
            })
            .await;
        }
    }
}

/// Listens for the other replicas' notifications until the control plane is dropped.
pub(crate) fn spawn_listener(state: Weak<AppState>, (pool, channel): (PgPool, String)) {
    tokio::spawn(async move {
        let mut listener = loop {
            match PgListener::connect_with(&pool).await {
                Ok(mut listener) => match listener.listen(&channel).await {
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
                Note::JobsWaiting {
                    pipeline,
                    instance_ids,
                } => {
                    for instance_id in &instance_ids {
                        state.live.jobs_waiting_here(instance_id, pipeline);
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_schema_takes_a_channel_of_its_own_that_postgresql_keeps_whole() {
        assert_eq!(channel_for_schema("public"), "fleet_commands");
        assert_eq!(channel_for_schema("tenant_a"), "fleet_commands.tenant_a");
        let long_a = format!("{}a", "x".repeat(62));
        let long_b = format!("{}b", "x".repeat(62));
        for schema in [&long_a, &long_b] {
            let channel = channel_for_schema(schema);
            assert!(channel.len() <= MAX_CHANNEL_LEN, "{channel}");
            assert!(channel.starts_with("fleet_commands#"), "{channel}");
        }
        assert_ne!(channel_for_schema(&long_a), channel_for_schema(&long_b));
    }

    #[test]
    fn jobs_waiting_notes_fit_a_notification_and_keep_every_id_once() {
        let ids: Vec<String> = (0..5000).map(|i| format!("instance-{i:05}")).collect();
        let groups = note_groups(&ids);
        assert!(groups.len() > 1, "5,000 ids take several notes");
        for group in &groups {
            let note = Note::JobsWaiting {
                pipeline: Pipeline::Update,
                instance_ids: group.to_vec(),
            };
            let payload = serde_json::to_string(&note).expect("json");
            assert!(payload.len() < 8000, "{} bytes", payload.len());
        }
        assert_eq!(groups.concat(), ids);
        assert!(note_groups(&[]).is_empty());
        let huge = vec!["x".repeat(7000)];
        assert_eq!(
            note_groups(&huge),
            [&huge[..]],
            "an id alone is never split"
        );
    }
}
