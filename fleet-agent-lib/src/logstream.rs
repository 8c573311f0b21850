//! The agent's durable command journal (in the agent's SQLite state file):
//!
//! - `command_runs`: every command id the agent accepted, with its final result, so a
//!   redelivered command is answered with the recorded result instead of running again;
//! - `command_frames`: frames for the control plane (log chunks and results) in the order
//!   they were produced, kept on disk until the control plane acknowledges them. Output
//!   goes to disk first, so a slow or broken channel never costs memory or loses a chunk.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use fleet_core::command::{BatchChunk, CommandResult, CommandStatus, Frame, LogBatch, Stream};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Pool, Sqlite};
use tokio::sync::Notify;

use crate::Result;

/// The journal's file beside the agent's state file (`state.db` → `state.commands.db`).
///
/// Its own file, not tables in the state file: the outbox's transactions and the journal's
/// would otherwise fail each other with `SQLITE_BUSY_SNAPSHOT` under WAL.
pub fn journal_path(state_path: &Path) -> std::path::PathBuf {
    state_path.with_extension("commands.db")
}

/// What the journal knows of a command id.
#[derive(Debug, Clone, PartialEq)]
pub enum Begin {
    /// Never seen: run it (it is now recorded as running).
    New,
    /// Running now (a redelivery while it runs).
    Running,
    /// Ran already; this was its result.
    Done(CommandResult),
}

/// One frame waiting for its acknowledgement.
#[derive(Debug, Clone)]
pub struct Pending {
    /// Order of production.
    pub seq: i64,
    /// The frame id the control plane acknowledges.
    pub frame_id: String,
    /// The encoded frame.
    pub body: Vec<u8>,
}

/// The journal. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Journal {
    pool: Pool<Sqlite>,
    notify: std::sync::Arc<Notify>,
}

impl Journal {
    /// Opens (creating) the journal tables in the SQLite file at `path`. The file (with its
    /// `-wal` and `-shm`) is created 0600, or tightened to it when found looser: it keeps
    /// command output.
    pub async fn open(path: &Path) -> Result<Self> {
        crate::outbox::private_state_file(path)?;
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS command_runs (id TEXT PRIMARY KEY, status TEXT NOT NULL, \
             result TEXT, started_at INTEGER NOT NULL, finished_at INTEGER)",
        )
        .execute(&pool)
        .await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS command_frames (seq INTEGER PRIMARY KEY AUTOINCREMENT, \
             frame_id TEXT NOT NULL UNIQUE, body BLOB NOT NULL)",
        )
        .execute(&pool)
        .await?;
        Ok(Self {
            pool,
            notify: Default::default(),
        })
    }

    /// Records `id` as running unless it was seen before.
    pub async fn begin(&self, id: &str) -> Result<Begin> {
        let inserted = sqlx::query(
            "INSERT INTO command_runs (id, status, started_at) VALUES ($1, 'running', $2) \
             ON CONFLICT DO NOTHING",
        )
        .bind(id)
        .bind(fleet_core::unix_now())
        .execute(&self.pool)
        .await?
        .rows_affected();
        if inserted == 1 {
            return Ok(Begin::New);
        }
        let row: Option<(String, Option<String>)> =
            sqlx::query_as("SELECT status, result FROM command_runs WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(match row {
            Some((_, Some(result))) => match serde_json::from_str(&result) {
                Ok(result) => Begin::Done(result),
                Err(_) => Begin::Running,
            },
            _ => Begin::Running,
        })
    }

    /// Records the final result and queues it for the control plane, in one transaction.
    pub async fn finish(&self, result: &CommandResult) -> Result<()> {
        let text = serde_json::to_string(result).unwrap_or_default();
        let frame = Frame::Result {
            id: uuid::Uuid::new_v4().to_string(),
            result: result.clone(),
        };
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE command_runs SET status = 'done', result = $2, finished_at = $3 WHERE id = $1",
        )
        .bind(&result.job_id)
        .bind(text)
        .bind(fleet_core::unix_now())
        .execute(&mut *tx)
        .await?;
        insert_frame(&mut tx, &frame).await?;
        tx.commit().await?;
        self.notify.notify_waiters();
        Ok(())
    }

    /// Ids recorded as running: the agent stopped while they ran.
    pub async fn interrupted(&self) -> Result<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT id FROM command_runs WHERE status = 'running'")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Queues a frame (a status, or an answer to a redelivery).
    pub async fn enqueue(&self, frame: &Frame) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        insert_frame(&mut tx, frame).await?;
        tx.commit().await?;
        self.notify.notify_waiters();
        Ok(())
    }

    /// Queues a status frame for `id`.
    pub async fn status(&self, id: &str, status: CommandStatus) -> Result<()> {
        self.enqueue(&Frame::Result {
            id: uuid::Uuid::new_v4().to_string(),
            result: CommandResult {
                job_id: id.to_owned(),
                status,
                logs: String::new(),
                error: None,
                data: None,
                exit_code: None,
            },
        })
        .await
    }

    /// Queues one chunk of output.
    pub async fn chunk(
        &self,
        command_id: &str,
        stream: Stream,
        offset: u64,
        bytes: &[u8],
    ) -> Result<()> {
        let chunk = fleet_core::command::LogChunk::from_bytes(command_id, stream, offset, bytes);
        self.enqueue(&Frame::Logs {
            id: uuid::Uuid::new_v4().to_string(),
            batch: LogBatch {
                command_id: command_id.to_owned(),
                chunks: vec![BatchChunk {
                    offset: chunk.offset,
                    stream: chunk.stream,
                    data: chunk.data,
                    encoding: chunk.encoding,
                }],
            },
        })
        .await
    }

    /// Frames after `after`, oldest first.
    pub async fn pending(&self, after: i64, limit: i64) -> Result<Vec<Pending>> {
        let rows: Vec<(i64, String, Vec<u8>)> = sqlx::query_as(
            "SELECT seq, frame_id, body FROM command_frames WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(seq, frame_id, body)| Pending {
                seq,
                frame_id,
                body,
            })
            .collect())
    }

    /// Forgets acknowledged frames.
    pub async fn ack(&self, frame_ids: &[String]) -> Result<()> {
        for id in frame_ids {
            sqlx::query("DELETE FROM command_frames WHERE frame_id = $1")
                .bind(id)
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    /// How many frames wait for an acknowledgement.
    pub async fn backlog(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM command_frames")
            .fetch_one(&self.pool)
            .await?)
    }

    /// Completes when a frame is queued after this call began.
    pub async fn queued(&self) {
        self.notify.notified().await;
    }

    /// A future that completes at the next enqueue; create it before checking `pending`.
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }
}

async fn insert_frame(tx: &mut sqlx::Transaction<'_, Sqlite>, frame: &Frame) -> Result<()> {
    let id = match frame {
        Frame::Result { id, .. } | Frame::Logs { id, .. } => id.clone(),
        _ => uuid::Uuid::new_v4().to_string(),
    };
    sqlx::query("INSERT INTO command_frames (frame_id, body) VALUES ($1, $2)")
        .bind(id)
        .bind(frame.encode())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    }

    #[tokio::test]
    async fn the_journal_and_its_wal_are_private() {
        let dir = std::env::temp_dir().join(format!(
            "fleet-agent-journal-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        // One left readable by others, as agents before this rule did under umask 022.
        let loose = dir.join("loose.commands.db");
        std::fs::write(&loose, b"").expect("write");
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        for path in [dir.join("state.commands.db"), loose] {
            let journal = Journal::open(&path).await.expect("open");
            assert_eq!(journal.begin("c1").await.expect("begin"), Begin::New);
            for suffix in ["", "-wal", "-shm"] {
                let mut file = path.as_os_str().to_owned();
                file.push(suffix);
                assert_eq!(mode(Path::new(&file)), 0o600, "{}", file.display());
            }
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
