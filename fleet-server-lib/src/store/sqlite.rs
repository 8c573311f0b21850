//! The SQLite backend: the embedded default (`sqlite://fleet.db`).

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Pool, Sqlite};

use crate::Result;

/// A [`Store`](super::Store) in an SQLite file, in WAL mode with `synchronous=FULL`, so an
/// acknowledged heartbeat survives a power cut. Migrations run when it opens.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: Pool<Sqlite>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `url` (`sqlite://path/to/fleet.db`) and
    /// applies pending migrations.
    pub async fn connect(url: &str) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(url)?;
        Self::connect_with(options).await
    }

    /// Like [`connect`](Self::connect), with options built by the caller.
    pub async fn connect_with(options: SqliteConnectOptions) -> Result<Self> {
        let in_memory = options
            .get_filename()
            .to_string_lossy()
            .contains(":memory:");
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true)
            // 64 MiB of page cache per connection (the default is 2 MiB): the installations
            // a batch updates stay in memory instead of being read back from the OS.
            .pragma("cache_size", "-65536");
        // Each connection to `:memory:` is its own database: keep exactly one.
        let max = if in_memory { 1 } else { 8 };
        let pool = SqlitePoolOptions::new()
            .max_connections(max)
            .min_connections(1)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(Self { pool })
    }

    /// The connection pool, for tools that need to query the database directly.
    pub fn pool(&self) -> &Pool<Sqlite> {
        &self.pool
    }

    /// SQLite has one writer at a time.
    fn concurrency(&self) -> usize {
        1
    }
}

// IMMEDIATE takes the write lock up front: a deferred transaction that reads and then
// writes fails at once (SQLITE_BUSY, no waiting) if another writer committed in between.
impl_sql_store!(
    SqliteStore,
    Sqlite,
    "BEGIN IMMEDIATE",
    super::batch::SQLITE_BATCH
);

impl_rollout_store!(
    SqliteStore,
    Sqlite,
    "BEGIN IMMEDIATE",
    "",
    super::rollouts_sql::SQLITE_INSERT_JOBS
);
