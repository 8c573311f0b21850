//! The PostgreSQL backend (`CONTROL_PLANE_DATABASE_URL=postgres://…`).

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Pool, Postgres};

use crate::Result;

const ACQUIRE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a heartbeat writer waits for a row lock: a batch of another writer holds one
/// for milliseconds, and the agents give up after 10 s.
const WRITER_LOCK_TIMEOUT: &str = "2s";

/// How long any other statement waits for a lock: an operator's transaction left open on a
/// row (an installation, a rollout) makes the request that needs it a retryable 503 after
/// this, instead of holding it, and one of the pool's connections, for as long as the
/// transaction stays open. Migrations wait as long as they need.
const API_LOCK_TIMEOUT: &str = "5s";

/// A [`Store`](super::Store) in PostgreSQL. Migrations run when it connects; several
/// control-plane processes may share one database.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: Pool<Postgres>,
    /// The heartbeat writers' own connections (see [`ingest_pool`]).
    pub(super) ingest: Pool<Postgres>,
    writers: usize,
    /// Where the jobs it makes available are announced (to this process's control planes;
    /// they route what concerns another replica's agents through `NOTIFY`).
    jobs: super::rollouts::JobAnnouncer,
    /// The `NOTIFY` channel of the replicas on this store's schema.
    pub(super) notify_channel: String,
}

/// Connections for the heartbeat writers alone, which plan each statement once and never
/// scan a whole table. The batch statements bind whole columns as arrays, so a plan made
/// for one batch's values is no better than the generic one, and planning the batch's write
/// statement (every table a heartbeat touches) costs PostgreSQL more than a millisecond.
/// Every row they read is found by a key; but a plan made while a table is young (a new
/// database, before autovacuum first analyzes it) scans it, and a cached plan keeps doing
/// so as the table grows, so sequential scans are off for them. A row lock held elsewhere
/// (an operator's open transaction on an installation) makes a batch wait at most
/// [`WRITER_LOCK_TIMEOUT`]; its heartbeats then get a retryable 503, instead of every
/// heartbeat of that writer waiting for as long as the lock is held. Opened when the first
/// batch needs one.
fn ingest_pool(options: &PgConnectOptions) -> Pool<Postgres> {
    PgPoolOptions::new()
        .max_connections(PostgresStore::MAX_WRITERS as u32)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_lazy_with(options.clone().options([
            ("plan_cache_mode", "force_generic_plan"),
            ("enable_seqscan", "off"),
            ("lock_timeout", WRITER_LOCK_TIMEOUT),
        ]))
}

impl PostgresStore {
    /// How many heartbeat batches are recorded at the same time unless
    /// [`with_writers`](Self::with_writers) says otherwise.
    pub const DEFAULT_WRITERS: usize = 2;

    /// The most heartbeat batches recorded at the same time.
    pub const MAX_WRITERS: usize = 12;

    /// Connects to `url` and applies pending migrations. Over TCP:
    /// `postgres://user:password@host/db`; over a Unix socket, cheaper when PostgreSQL runs on
    /// the same machine: `postgres://user:password@%2Fvar%2Frun%2Fpostgresql/db` (or
    /// `?host=/var/run/postgresql`).
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(PgConnectOptions::from_str(url)?).await
    }

    /// Like [`connect`](Self::connect), with options built by the caller (for example a
    /// `search_path` to keep the tables in their own schema).
    pub async fn connect_with(options: PgConnectOptions) -> Result<Self> {
        let ingest = ingest_pool(&options);
        let pool = PgPoolOptions::new()
            .max_connections(16)
            // While PostgreSQL is down or restarting, a request waits this long for a
            // connection and then fails (a heartbeat gets a retryable 503) instead of
            // sqlx's default 30 s, longer than the agent's 10 s send timeout. A heartbeat may
            // wait for a writer and then for its own batch: twice this, well below 10 s.
            // With every writer holding its own connection, a healthy pool hands one out at
            // once.
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(
                options
                    .clone()
                    .options([("lock_timeout", API_LOCK_TIMEOUT)]),
            )
            .await;
        let pool = match pool {
            Ok(pool) => pool,
            // The pool retries until its timeout and then says only that it timed out. One
            // direct attempt says why: refused, unknown host, wrong password, no database.
            Err(sqlx::Error::PoolTimedOut) => {
                use sqlx::Connection;
                return Err(match sqlx::PgConnection::connect_with(&options).await {
                    Err(cause) => cause.into(),
                    Ok(_) => sqlx::Error::PoolTimedOut.into(),
                });
            }
            Err(err) => return Err(err.into()),
        };
        {
            // Another replica may be migrating: wait for its lock however long it takes.
            let mut migrating = pool.acquire().await?;
            sqlx::query("SET lock_timeout = 0")
                .execute(&mut *migrating)
                .await?;
            sqlx::migrate!("./migrations/postgres")
                .run(&mut *migrating)
                .await?;
            sqlx::query("RESET lock_timeout")
                .execute(&mut *migrating)
                .await?;
        }
        // The schema the tables were created in: the first of the search path that exists.
        let schema: Option<String> = sqlx::query_scalar("SELECT current_schema()")
            .fetch_one(&pool)
            .await?;
        let notify_channel =
            crate::replicas::channel_for_schema(schema.as_deref().unwrap_or("public"));
        Ok(Self {
            pool,
            ingest,
            writers: Self::DEFAULT_WRITERS,
            jobs: Default::default(),
            notify_channel,
        })
    }

    /// How many heartbeat batches are recorded at the same time (default 2, at most 12). A
    /// batch is usually two round trips; a second writer keeps the database busy while the
    /// first waits for an answer, and more writers make smaller batches, each costing
    /// PostgreSQL a transaction. Batches lock installation rows in instance_id order, so
    /// they wait for each other at worst, never deadlock.
    pub fn with_writers(mut self, writers: usize) -> Self {
        self.writers = writers.clamp(1, Self::MAX_WRITERS);
        self
    }

    fn concurrency(&self) -> usize {
        self.writers
    }

    /// `$1`: installation id, `$2`: oldest `received_at`, `$3`: how many → the installation's
    /// most recent heartbeats (`received_at, figures`), newest first. PostgreSQL keeps the
    /// index by installation: an entry costs it a WAL record, not a page, so dropping it did
    /// not pay (SQLite follows links instead).
    const RECENT_HEARTBEATS: &str = "SELECT received_at, figures FROM heartbeats \
        WHERE installation_id = $1 AND received_at >= $2 ORDER BY id DESC LIMIT $3";

    /// The connection pool, for tools that need to query the database directly.
    pub fn pool(&self) -> &Pool<Postgres> {
        &self.pool
    }
}

impl_sql_store!(PostgresStore, Postgres, "BEGIN", " FOR UPDATE SKIP LOCKED");

impl_rollout_store!(
    PostgresStore,
    Postgres,
    "BEGIN",
    " FOR UPDATE",
    super::rollouts_sql::POSTGRES_INSERT_JOBS
);

impl_plugin_store!(PostgresStore, "BEGIN", " FOR UPDATE");
impl_restore_store!(PostgresStore, "BEGIN", " FOR UPDATE");
