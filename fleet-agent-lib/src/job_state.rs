//! Crash-safe pipeline state in the agent's SQLite file (`AGENT_STATE_PATH`): each job and
//! the step it is in are written *before* the step runs, and the final status before it is
//! reported. After a crash the agent finds the job still `running`, rolls it back and
//! reports it once; a job id already on disk is never run again.
//!
//! The file is created only when a first job arrives (or when the outbox created it): an
//! agent that buffers nothing and never gets a job writes nothing to disk.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{Connection, SqliteConnection};
use tokio::sync::Mutex;

use crate::Result;

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct JobRecord {
    /// `update`, `plugin` or `restore`.
    pub kind: String,
    /// The control plane's job id.
    pub job_id: String,
    /// The job as received (JSON).
    pub payload: String,
    /// `running` or `finished`.
    pub state: String,
    /// The step in progress, or the last one.
    pub step: Option<String>,
    /// The final status, once finished.
    pub final_status: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
    /// Whether the final report reached the control plane.
    pub reported: bool,
    /// The final report's body, kept until it is delivered.
    pub report: Option<String>,
}

/// The pipeline state store.
#[derive(Debug)]
pub struct JobState {
    path: PathBuf,
    conn: tokio::sync::OnceCell<Mutex<SqliteConnection>>,
}

impl JobState {
    /// The state kept in the SQLite file at `path`: opened now if the file exists, else
    /// created with the first job.
    pub async fn open(path: &Path) -> Result<Self> {
        let state = Self {
            path: path.to_owned(),
            conn: tokio::sync::OnceCell::new(),
        };
        if path.exists() {
            state.connection(true).await?;
        }
        Ok(state)
    }

    /// The connection; `None` when the file does not exist and `create` is false.
    async fn connection(
        &self,
        create: bool,
    ) -> Result<Option<tokio::sync::MutexGuard<'_, SqliteConnection>>> {
        if self.conn.get().is_none() && !create && !self.path.exists() {
            return Ok(None);
        }
        let conn = self
            .conn
            .get_or_try_init(|| async { Self::connect(&self.path).await.map(Mutex::new) })
            .await?;
        Ok(Some(conn.lock().await))
    }

    async fn connect(path: &Path) -> Result<SqliteConnection> {
        crate::outbox::private_state_file(path)?;
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10));
        let mut conn = SqliteConnection::connect_with(&options).await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS pipeline_jobs (kind TEXT NOT NULL, job_id TEXT NOT NULL, \
             payload TEXT NOT NULL, state TEXT NOT NULL, step TEXT, final_status TEXT, error TEXT, \
             reported BOOLEAN NOT NULL DEFAULT FALSE, report TEXT, updated_at INTEGER NOT NULL, \
             PRIMARY KEY (kind, job_id))",
        )
        .execute(&mut conn)
        .await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS pipeline_values (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        )
        .execute(&mut conn)
        .await?;
        Ok(conn)
    }

    async fn writer(&self) -> Result<tokio::sync::MutexGuard<'_, SqliteConnection>> {
        self.connection(true)
            .await?
            .ok_or_else(|| crate::Error::Io(std::io::Error::other("pipeline state unavailable")))
    }

    /// The job, if this agent has ever started it.
    pub async fn get(&self, kind: &str, job_id: &str) -> Result<Option<JobRecord>> {
        let Some(mut conn) = self.connection(false).await? else {
            return Ok(None);
        };
        Ok(sqlx::query_as::<_, JobRecord>(
            "SELECT kind, job_id, payload, state, step, final_status, error, reported, report \
             FROM pipeline_jobs WHERE kind = $1 AND job_id = $2",
        )
        .bind(kind)
        .bind(job_id)
        .fetch_optional(&mut *conn)
        .await?)
    }

    /// Records a job as started.
    pub async fn begin(&self, kind: &str, job_id: &str, payload: &str) -> Result<()> {
        let mut conn = self.writer().await?;
        sqlx::query(
            "INSERT INTO pipeline_jobs (kind, job_id, payload, state, updated_at) \
             VALUES ($1, $2, $3, 'running', $4)",
        )
        .bind(kind)
        .bind(job_id)
        .bind(payload)
        .bind(fleet_core::unix_now())
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Records the step about to run.
    pub async fn step(&self, kind: &str, job_id: &str, step: &str) -> Result<()> {
        let mut conn = self.writer().await?;
        sqlx::query(
            "UPDATE pipeline_jobs SET step = $1, updated_at = $2 WHERE kind = $3 AND job_id = $4",
        )
        .bind(step)
        .bind(fleet_core::unix_now())
        .bind(kind)
        .bind(job_id)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Records the final status and the report to deliver (inserting the job if it never
    /// began, e.g. refused before its first step).
    pub async fn finish(
        &self,
        kind: &str,
        job_id: &str,
        payload: &str,
        status: &str,
        error: Option<&str>,
        report: &serde_json::Value,
    ) -> Result<()> {
        let mut conn = self.writer().await?;
        sqlx::query(
            "INSERT INTO pipeline_jobs (kind, job_id, payload, state, final_status, error, report, updated_at) \
             VALUES ($1, $2, $3, 'finished', $4, $5, $6, $7) ON CONFLICT (kind, job_id) DO UPDATE SET \
             state = 'finished', final_status = excluded.final_status, error = excluded.error, \
             report = excluded.report, updated_at = excluded.updated_at",
        )
        .bind(kind)
        .bind(job_id)
        .bind(payload)
        .bind(status)
        .bind(error)
        .bind(report.to_string())
        .bind(fleet_core::unix_now())
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Records that the final report was delivered.
    pub async fn reported(&self, kind: &str, job_id: &str) -> Result<()> {
        let mut conn = self.writer().await?;
        sqlx::query("UPDATE pipeline_jobs SET reported = TRUE WHERE kind = $1 AND job_id = $2")
            .bind(kind)
            .bind(job_id)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    /// Jobs of `kind` that were running when the agent stopped.
    pub async fn interrupted(&self, kind: &str) -> Result<Vec<JobRecord>> {
        let Some(mut conn) = self.connection(false).await? else {
            return Ok(Vec::new());
        };
        Ok(sqlx::query_as::<_, JobRecord>(
            "SELECT kind, job_id, payload, state, step, final_status, error, reported, report \
             FROM pipeline_jobs WHERE kind = $1 AND state = 'running' ORDER BY updated_at",
        )
        .bind(kind)
        .fetch_all(&mut *conn)
        .await?)
    }

    /// Finished jobs of `kind` whose final report has not been delivered yet.
    pub async fn unreported(&self, kind: &str) -> Result<Vec<JobRecord>> {
        let Some(mut conn) = self.connection(false).await? else {
            return Ok(Vec::new());
        };
        Ok(sqlx::query_as::<_, JobRecord>(
            "SELECT kind, job_id, payload, state, step, final_status, error, reported, report \
             FROM pipeline_jobs WHERE kind = $1 AND state = 'finished' AND reported = FALSE \
             ORDER BY updated_at",
        )
        .bind(kind)
        .fetch_all(&mut *conn)
        .await?)
    }

    /// A stored value (`installed_version`).
    pub async fn value(&self, key: &str) -> Result<Option<String>> {
        let Some(mut conn) = self.connection(false).await? else {
            return Ok(None);
        };
        Ok(
            sqlx::query_scalar("SELECT value FROM pipeline_values WHERE key = $1")
                .bind(key)
                .fetch_optional(&mut *conn)
                .await?,
        )
    }

    /// Stores a value.
    pub async fn set_value(&self, key: &str, value: &str) -> Result<()> {
        let mut conn = self.writer().await?;
        sqlx::query(
            "INSERT INTO pipeline_values (key, value) VALUES ($1, $2) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_running_job_survives_reopening_and_finishes_once() {
        let dir = std::env::temp_dir().join(format!("fleet-jobstate-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("state.db");
        {
            let state = JobState::open(&path).await.expect("open");
            assert!(state.interrupted("update").await.expect("list").is_empty());
            assert!(!path.exists(), "nothing written before the first job");
            state.begin("update", "7", "{}").await.expect("begin");
            state.step("update", "7", "migrate").await.expect("step");
        }
        let state = JobState::open(&path).await.expect("reopen");
        let interrupted = state.interrupted("update").await.expect("list");
        assert_eq!(interrupted.len(), 1);
        assert_eq!(interrupted[0].step.as_deref(), Some("migrate"));
        let report = serde_json::json!({"status": "rolled_back"});
        state
            .finish("update", "7", "{}", "rolled_back", Some("stopped"), &report)
            .await
            .expect("finish");
        assert!(state.interrupted("update").await.expect("list").is_empty());
        assert_eq!(state.unreported("update").await.expect("list").len(), 1);
        state.reported("update", "7").await.expect("reported");
        assert!(state.unreported("update").await.expect("list").is_empty());
        let job = state.get("update", "7").await.expect("get").expect("some");
        assert_eq!(job.final_status.as_deref(), Some("rolled_back"));
        state
            .set_value("installed_version", "2.0.0")
            .await
            .expect("set");
        assert_eq!(
            state
                .value("installed_version")
                .await
                .expect("get")
                .as_deref(),
            Some("2.0.0")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
