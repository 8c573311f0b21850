//! The SQLite backend: the embedded default (`sqlite://fleet.db`).

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Pool, Sqlite};

use super::sqlite_ingest::IngestConnection;
use crate::store::{IncomingHeartbeat, IngestRules, RecordOutcome};
use crate::{Error, Result};

/// A [`Store`](super::Store) in an SQLite file, in WAL mode with `synchronous=FULL`, so an
/// acknowledged heartbeat survives a power cut. Migrations run when it opens.
///
/// `sqlite::memory:` is a database in a temporary file, removed when the last clone of the
/// store is dropped: heartbeats are recorded on a connection of their own, and every
/// connection to `:memory:` would be a database of its own.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: Pool<Sqlite>,
    ingest: Arc<IngestConnection>,
    /// Where the jobs it makes available are announced.
    jobs: super::rollouts::JobAnnouncer,
    _temporary: Option<Arc<TemporaryFile>>,
}

/// How long a connection waits for another one's write lock.
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Page cache per connection, in KiB when negative: 64 MiB (the default is 2 MiB), so the
/// installations a batch updates stay in memory instead of being read back from the OS.
pub(super) const CACHE_SIZE: i64 = -65536;

/// How many pages the write-ahead log may hold before a commit copies them back into the
/// database file: 64 MiB (SQLite's default is 1,000 pages, 4 MiB). Heartbeats keep
/// rewriting the same installation and index pages; the longer the log, the more of those
/// rewrites one checkpoint folds into a single write, and under load a checkpoint every
/// 4 MiB was about a tenth of the CPU each heartbeat cost. The log file keeps its largest
/// size until the database is closed. Beside the store, a background checkpoint copies the
/// log every 100 ms (`sqlite_ingest::spawn_checkpoints`), so the commit that reaches this
/// size has little left to copy.
pub(super) const WAL_AUTOCHECKPOINT_PAGES: i64 = 16_384;

/// Creates the database file readable by its owner only, when it does not exist yet: it
/// holds the key that signs agent tokens and derives every enrolled agent's secret (unless
/// `CONTROL_PLANE_JWT_KEY` is set), and SQLite gives its `-wal` and `-shm` files the same
/// mode. An existing file that others may read is left as it is, with a warning naming it:
/// its mode may be someone's deliberate choice (a backup tool's group).
fn restrict_to_owner(path: &std::path::Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                let mode = std::fs::metadata(path)
                    .map_err(|e| Error::Database(sqlx::Error::Io(e)))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    tracing::warn!(
                        path = %path.display(),
                        mode = format!("{:o}", mode & 0o777),
                        "the database file is readable by other users; it holds the key behind \
                         agent tokens and enrolled agents' secrets: chmod 600 it and its -wal and -shm files"
                    );
                }
            }
            // Opening it will fail the same way, with sqlx's context.
            Err(_) => {}
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// A database file that exists only as long as the store.
#[derive(Debug)]
struct TemporaryFile(PathBuf);

impl Drop for TemporaryFile {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut path = self.0.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
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
        // sqlx names an in-memory database `file:sqlx-in-memory-N` (a shared-cache URI).
        let name = options.get_filename().to_string_lossy().into_owned();
        let in_memory = name.contains(":memory:")
            || name.starts_with("file:sqlx-in-memory-")
            || name.contains("mode=memory");
        let temporary = in_memory.then(|| {
            let name = format!("fleet-memory-{}.db", uuid::Uuid::new_v4().simple());
            Arc::new(TemporaryFile(std::env::temp_dir().join(name)))
        });
        let options = match &temporary {
            Some(file) => SqliteConnectOptions::new().filename(&file.0),
            None => options,
        };
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true)
            .pragma("cache_size", CACHE_SIZE.to_string())
            .pragma("wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES.to_string());
        let path = options.get_filename().to_owned();
        restrict_to_owner(&path)?;
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .min_connections(1)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        let ingest = Arc::new(IngestConnection::open(&path)?);
        Ok(Self {
            pool,
            ingest,
            jobs: Default::default(),
            _temporary: temporary,
        })
    }

    /// The connection pool, for tools that need to query the database directly.
    pub fn pool(&self) -> &Pool<Sqlite> {
        &self.pool
    }

    /// `$1`: installation id, `$2`: oldest `received_at`, `$3`: how many → the installation's
    /// most recent heartbeats (`received_at, figures`), newest first. It follows the links from
    /// the installation to its newest heartbeat and from each heartbeat to the one before (see
    /// `batch::chain_heartbeats`). A link must go to a lower id of the same installation: ids
    /// are taken again after the whole time series was pruned, and such a link ends the walk.
    const RECENT_HEARTBEATS: &str = "WITH RECURSIVE chain(id, depth) AS ( \
        SELECT last_heartbeat_id, 1 FROM installations WHERE id = $1 \
        UNION ALL \
        SELECT h.previous_id, chain.depth + 1 FROM chain JOIN heartbeats h ON h.id = chain.id \
        WHERE h.installation_id = $1 AND h.previous_id < h.id AND h.received_at >= $2 \
        AND chain.depth < $3) \
        SELECT h.received_at, h.figures FROM chain JOIN heartbeats h ON h.id = chain.id \
        WHERE h.installation_id = $1 AND h.received_at >= $2 ORDER BY h.id DESC";

    /// SQLite has one writer at a time.
    fn concurrency(&self) -> usize {
        1
    }

    /// Records a batch on the ingest connection, off the async workers. On a multi-threaded
    /// runtime this worker hands its other tasks over while SQLite runs. A single-threaded
    /// runtime has no worker to hand them to: blocking its thread would stop the task that
    /// holds the write lock from committing, and both would wait out the busy timeout. There
    /// the batch is copied to a blocking thread instead.
    async fn record_batch(
        &self,
        batch: &[IncomingHeartbeat],
        rules: &IngestRules,
    ) -> Result<Vec<RecordOutcome>> {
        use tokio::runtime::{Handle, RuntimeFlavor};
        match Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(RuntimeFlavor::MultiThread) => {
                tokio::task::block_in_place(|| self.ingest.record(batch, rules))
            }
            Ok(_) => {
                let (ingest, batch, rules) = (self.ingest.clone(), batch.to_vec(), rules.clone());
                tokio::task::spawn_blocking(move || ingest.record(&batch, &rules))
                    .await
                    .map_err(|e| Error::Internal(format!("the ingest thread failed: {e}")))?
            }
            Err(_) => self.ingest.record(batch, rules),
        }
    }
}

// IMMEDIATE takes the write lock up front: a deferred transaction that reads and then
// writes fails at once (SQLITE_BUSY, no waiting) if another writer committed in between.
impl_sql_store!(SqliteStore, Sqlite, "BEGIN IMMEDIATE", "");

impl_rollout_store!(
    SqliteStore,
    Sqlite,
    "BEGIN IMMEDIATE",
    "",
    super::rollouts_sql::SQLITE_INSERT_JOBS
);

impl_plugin_store!(SqliteStore, "BEGIN IMMEDIATE", "");
impl_restore_store!(SqliteStore, "BEGIN IMMEDIATE", "");
