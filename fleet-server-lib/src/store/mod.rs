//! Persistence: the [`Store`] trait and its two real backends, SQLite and PostgreSQL.
//!
//! Both backends share one SQL implementation (`sql.rs`): the statements use `$n`
//! placeholders and types (`BIGINT`, `TEXT`) that mean the same thing to both engines, so
//! behaviour cannot drift between them. Connecting and migrating differ, and so does the
//! hot path of recording heartbeats: PostgreSQL takes a batch as JSON array parameters (one
//! round trip per statement), SQLite runs prepared statements row by row on a connection of
//! its own (no round trips to save); both fold the batch with the same functions
//! (`batch.rs`).

use async_trait::async_trait;
use fleet_core::Heartbeat;
use fleet_core::signing::Scheme;
use serde::Serialize;

use crate::Result;
use crate::alerts::SloThresholds;

// `batch` and `sql` first: their macros must be defined before the backends expand them.
#[macro_use]
mod batch;
#[macro_use]
mod sql;
pub mod rollouts;
#[macro_use]
mod rollouts_sql;
#[macro_use]
mod plugins_sql;
#[macro_use]
mod restores_sql;
pub mod commands;
mod postgres;
mod postgres_ingest;
mod sqlite;
mod sqlite_ingest;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// A verified, decoded heartbeat on its way to the database.
#[derive(Debug, Clone)]
pub struct IncomingHeartbeat {
    /// The decoded payload.
    pub heartbeat: Heartbeat,
    /// The signature scheme it came with.
    pub scheme: Scheme,
    /// The v1 message id (`None` for v0).
    pub msg_id: Option<String>,
    /// The v1 signing timestamp (`None` for v0).
    pub signed_at: Option<i64>,
    /// When the control plane received it (unix seconds).
    pub received_at: i64,
    /// The body exactly as received: kept as the installation's latest state, so what the
    /// detail view shows is what the agent sent (and it need not be serialized again).
    pub body: Vec<u8>,
}

/// What recording one heartbeat did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordOutcome {
    /// Stored and evaluated.
    Applied {
        /// The installation's row id.
        installation_id: i64,
    },
    /// A retried delivery of a message already applied (same id, new timestamp): acknowledge,
    /// change nothing.
    Duplicate,
    /// The very same signed message again (same id and timestamp): refuse.
    Replay,
    /// The instance is unknown and the control plane requires prior enrollment.
    NotEnrolled,
}

/// The rules the store applies while recording heartbeats.
#[derive(Debug, Clone, Default)]
pub struct IngestRules {
    /// SLO maxima; a maximum of 0 (or less) turns that check off.
    pub slo: SloThresholds,
    /// Refuse heartbeats from instances that were not enrolled first.
    pub require_enrollment: bool,
    /// Queue forwarded alerts in the webhook outbox (only when a webhook is configured).
    pub forward_alerts: bool,
    /// A heartbeat collected longer than this before it arrived (delivered late from an
    /// agent's outbox, after an outage) opens and resolves no alert; it only ends `offline`.
    /// What it reports is history: its figures are stored, and a newer heartbeat reports
    /// the conditions that still hold, so the webhook is not paged for ones long over.
    /// `None`: every heartbeat is evaluated. The control plane uses its offline threshold.
    pub late_after: Option<std::time::Duration>,
}

/// Filters for [`Store::list_installations`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstallationFilter {
    /// Exact release channel.
    pub channel: Option<String>,
    /// Exact reported health of installations that are not offline, or `offline` for
    /// installations with an open offline alert.
    pub health: Option<String>,
    /// Case-insensitive substring of instance id, domain or client.
    pub text: Option<String>,
    /// Archived installations: hidden (the default), only them, or both.
    pub archived: ArchivedFilter,
    /// Page size.
    pub limit: i64,
    /// Rows to skip.
    pub offset: i64,
}

/// Which installations a list shows by whether they are archived
/// ([`Store::archive_installation`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ArchivedFilter {
    /// Only those not archived: the default.
    #[default]
    Hidden,
    /// Only archived ones.
    Only,
    /// Archived or not.
    All,
}

impl ArchivedFilter {
    /// Every filter, in the order a list offers them.
    pub const ALL: [Self; 3] = [Self::Hidden, Self::Only, Self::All];

    /// The wire name, the value of the list's `archived` parameter (`false`, `true`, `all`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hidden => "false",
            Self::Only => "true",
            Self::All => "all",
        }
    }
}

/// One page of results and the total across all pages.
#[derive(Debug, Clone, Serialize)]
pub struct Page<T> {
    /// This page's rows.
    pub items: Vec<T>,
    /// Rows matching the filter in all pages.
    pub total: i64,
}

/// An installation as the list shows it.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct InstallationSummary {
    /// Row id.
    pub id: i64,
    /// The instance's id, as its agent reports it.
    pub instance_id: String,
    /// Public domain.
    pub domain: Option<String>,
    /// Customer name.
    pub client: Option<String>,
    /// Running version.
    pub version: Option<String>,
    /// Release channel.
    pub release_channel: Option<String>,
    /// Health as the instance reported it.
    pub health: Option<String>,
    /// Signature scheme of the latest heartbeat (`v0` marks agents still on the old scheme).
    pub scheme: Option<String>,
    /// When it was enrolled by an operator, if it was.
    pub enrolled_at: Option<i64>,
    /// First heartbeat (unix seconds).
    pub first_seen_at: Option<i64>,
    /// Latest heartbeat (unix seconds).
    pub last_seen_at: Option<i64>,
    /// Alerts not yet resolved.
    pub open_alerts: i64,
    /// Whether an `offline` alert is open.
    pub offline: bool,
    /// When an operator archived it (unix seconds); `None` while it is active. Its next
    /// heartbeat clears it.
    pub archived_at: Option<i64>,
}

/// An alert.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    /// Row id.
    pub id: i64,
    /// The installation's row id.
    pub installation_id: i64,
    /// The instance's id.
    pub instance_id: String,
    /// `info`, `warning`, `error` or `critical`.
    pub level: String,
    /// `payload`, `slo_p95_ms`, `slo_error_rate`, `slo_webhook_retry_rate`, `secrets`, `offline`.
    pub kind: String,
    /// What happened.
    pub message: String,
    /// When it was raised.
    pub created_at: i64,
    /// When the condition ended.
    pub resolved_at: Option<i64>,
    /// When an operator acknowledged it.
    pub acknowledged_at: Option<i64>,
    /// Which role acknowledged it.
    pub acknowledged_by: Option<String>,
    /// Its webhook delivery; `None` when it has none: not forwarded (an instance's alert
    /// below `error`, or raised while no webhook was configured), or its delivery ended
    /// longer ago than the retention and was pruned.
    pub delivery: Option<AlertDelivery>,
}

// By hand: the delivery is a set of columns of the outbox row joined to the alert, all
// null when there is none.
impl<'r, R: sqlx::Row> sqlx::FromRow<'r, R> for Alert
where
    &'r str: sqlx::ColumnIndex<R>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    fn from_row(row: &'r R) -> std::result::Result<Self, sqlx::Error> {
        let delivery = match row.try_get::<Option<i64>, _>("delivery_id")? {
            None => None,
            Some(_) => Some(AlertDelivery::new(
                row.try_get("delivery_attempts")?,
                row.try_get("delivery_next_attempt_at")?,
                row.try_get("delivery_delivered_at")?,
                row.try_get("delivery_given_up_at")?,
                row.try_get("delivery_last_error")?,
            )),
        };
        Ok(Self {
            id: row.try_get("id")?,
            installation_id: row.try_get("installation_id")?,
            instance_id: row.try_get("instance_id")?,
            level: row.try_get("level")?,
            kind: row.try_get("kind")?,
            message: row.try_get("message")?,
            created_at: row.try_get("created_at")?,
            resolved_at: row.try_get("resolved_at")?,
            acknowledged_at: row.try_get("acknowledged_at")?,
            acknowledged_by: row.try_get("acknowledged_by")?,
            delivery,
        })
    }
}

/// Where an alert's webhook delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Not delivered yet: waiting for its first attempt or its next retry.
    Pending,
    /// The receiver accepted it.
    Delivered,
    /// Every attempt failed; it will not be tried again.
    GivenUp,
}

impl DeliveryState {
    /// Every state, in the order a delivery goes through them.
    pub const ALL: [Self; 3] = [Self::Pending, Self::Delivered, Self::GivenUp];

    /// The wire name (`pending`, `delivered`, `given_up`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::GivenUp => "given_up",
        }
    }
}

/// An alert's delivery to the alert webhook (its row in the outbox).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AlertDelivery {
    /// Where it stands.
    pub state: DeliveryState,
    /// Attempts made so far.
    pub attempts: i64,
    /// When it is tried next (pending only).
    pub next_attempt_at: Option<i64>,
    /// When the receiver accepted it (delivered only).
    pub delivered_at: Option<i64>,
    /// When it was given up (given up only).
    pub given_up_at: Option<i64>,
    /// Why the latest attempt failed (pending after a failure, or given up), with the
    /// userinfo and query of any URL in it redacted: it is shown to every role.
    pub last_error: Option<String>,
}

impl AlertDelivery {
    /// The delivery an outbox row describes.
    pub fn new(
        attempts: i64,
        next_attempt_at: i64,
        delivered_at: Option<i64>,
        given_up_at: Option<i64>,
        last_error: Option<String>,
    ) -> Self {
        let state = match (delivered_at, given_up_at) {
            (Some(_), _) => DeliveryState::Delivered,
            (None, Some(_)) => DeliveryState::GivenUp,
            (None, None) => DeliveryState::Pending,
        };
        Self {
            state,
            attempts,
            next_attempt_at: (state == DeliveryState::Pending).then_some(next_attempt_at),
            delivered_at,
            given_up_at: given_up_at.filter(|_| state == DeliveryState::GivenUp),
            // A failure before the attempt that got through is history, not news.
            last_error: last_error
                .filter(|_| state != DeliveryState::Delivered)
                .map(|text| fleet_core::redact_url_secrets(&text)),
        }
    }
}

/// Which alerts [`Store::alert_page`] lists, by where they are in their life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AlertState {
    /// Not resolved, acknowledged or not.
    #[default]
    Open,
    /// Not resolved, and acknowledged by an operator.
    Acknowledged,
    /// Resolved.
    Resolved,
    /// All of them.
    All,
}

impl AlertState {
    /// Every state a list can ask for.
    pub const ALL: [Self; 4] = [Self::Open, Self::Acknowledged, Self::Resolved, Self::All];

    /// The wire name (`open`, `acknowledged`, `resolved`, `all`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Acknowledged => "acknowledged",
            Self::Resolved => "resolved",
            Self::All => "all",
        }
    }
}

/// An alert list's filter on the alerts' webhook deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryFilter {
    /// Alerts whose delivery is in this state.
    Is(DeliveryState),
    /// Alerts with no delivery (see [`Alert::delivery`]).
    NoRecord,
}

impl DeliveryFilter {
    /// Every filter, as a list offers them.
    pub const ALL: [Self; 4] = [
        Self::Is(DeliveryState::Pending),
        Self::Is(DeliveryState::Delivered),
        Self::Is(DeliveryState::GivenUp),
        Self::NoRecord,
    ];

    /// The wire name: a [`DeliveryState`]'s, or `none`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Is(state) => state.as_str(),
            Self::NoRecord => "none",
        }
    }
}

/// Filters for [`Store::alert_page`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertFilter {
    /// Open (the default), acknowledged, resolved or all.
    pub state: AlertState,
    /// Exact level (`info`, `warning`, `error`, `critical`).
    pub level: Option<String>,
    /// Exact kind ([`crate::alerts::kind`]).
    pub kind: Option<String>,
    /// Exact instance id of the installation.
    pub instance_id: Option<String>,
    /// Where the webhook delivery stands.
    pub delivery: Option<DeliveryFilter>,
    /// Page size; 0 counts the matching alerts without listing any.
    pub limit: i64,
    /// Rows to skip.
    pub offset: i64,
}

impl Default for AlertFilter {
    /// The first 100 open alerts.
    fn default() -> Self {
        Self {
            state: AlertState::Open,
            level: None,
            kind: None,
            instance_id: None,
            delivery: None,
            limit: 100,
            offset: 0,
        }
    }
}

/// A failed background job reported by an instance.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct JobFailureRecord {
    /// Row id.
    pub id: i64,
    /// The queue it ran on.
    pub queue: Option<String>,
    /// The failure message.
    pub message: String,
    /// When it was recorded.
    pub created_at: i64,
}

/// A backup, recorded when an instance reports a new checksum.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct BackupRecord {
    /// Row id.
    pub id: i64,
    /// The instance's backup id.
    pub backup_id: Option<String>,
    /// The checksum that identifies it.
    pub checksum: String,
    /// Size in bytes.
    pub size_bytes: Option<i64>,
    /// Object-store bucket.
    pub bucket: Option<String>,
    /// Path in the bucket.
    pub path: Option<String>,
    /// `backup_status` when it was reported.
    pub status: Option<String>,
    /// `last_backup_at` as reported.
    pub backup_at: Option<String>,
    /// When the control plane recorded it.
    pub recorded_at: i64,
}

/// One point of an installation's time series.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeartbeatPoint {
    /// When it was received.
    pub received_at: i64,
    /// When the agent collected it: earlier than `received_at` for a heartbeat delivered
    /// late from the agent's outbox, the same for an agent that does not say.
    pub collected_at: i64,
    /// The numeric figures of that heartbeat (`cpu_usage_pct`, `memory_used_bytes`, ...).
    pub figures: serde_json::Map<String, serde_json::Value>,
}

/// Everything the detail view shows about one installation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstallationDetail {
    /// The list row.
    #[serde(flatten)]
    pub summary: InstallationSummary,
    /// The latest heartbeat as received (checks, containers, host and unknown keys included).
    pub state: serde_json::Value,
    /// Alerts, newest first (open and recent closed ones).
    pub alerts: Vec<Alert>,
    /// Job failures, newest first.
    pub job_failures: Vec<JobFailureRecord>,
    /// Backups, newest first.
    pub backups: Vec<BackupRecord>,
    /// Recent heartbeats, oldest first.
    pub recent: Vec<HeartbeatPoint>,
}

/// A webhook delivery waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct OutboxItem {
    /// Row id.
    pub id: i64,
    /// The alert it announces.
    pub alert_id: i64,
    /// When it was queued (the alert's creation time).
    pub created_at: i64,
    /// The JSON body to send.
    pub payload: String,
    /// Attempts made so far.
    pub attempts: i64,
}

/// A dashboard session as stored: never its id, only the id's SHA-256, so a copy of the
/// database logs nobody in.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct DashboardSession {
    /// Hex SHA-256 of the session id the browser holds; the key it is found by.
    pub id_hash: String,
    /// The role it was created for: `support`, `ops` or `admin`.
    pub role: String,
    /// Ties it to the role token it was created with: once that token changes, the session
    /// no longer proves the role.
    pub token_fingerprint: String,
    /// When it was created (unix seconds).
    pub created_at: i64,
    /// From when it is refused (unix seconds).
    pub expires_at: i64,
}

/// Control-plane persistence. Implemented by [`SqliteStore`] and [`PostgresStore`]; plug in
/// another database by implementing it and passing it to
/// [`ControlPlaneBuilder::store`](crate::ControlPlaneBuilder::store).
#[async_trait]
pub trait Store:
    rollouts::RolloutStore + rollouts::PluginStore + rollouts::RestoreStore + Send + Sync + 'static
{
    /// Records a batch of heartbeats in ONE transaction (group commit) and returns one
    /// outcome per heartbeat, in order. When this returns `Ok`, everything is durable.
    async fn record_heartbeats(
        &self,
        batch: &[IncomingHeartbeat],
        rules: &IngestRules,
    ) -> Result<Vec<RecordOutcome>>;

    /// Registers an instance ahead of its first heartbeat; returns the installation's row id.
    async fn enroll(&self, instance_id: &str, now: i64) -> Result<i64>;

    /// Lists installations.
    async fn list_installations(
        &self,
        filter: &InstallationFilter,
    ) -> Result<Page<InstallationSummary>>;

    /// Everything about one installation, by instance id.
    async fn installation(&self, instance_id: &str) -> Result<Option<InstallationDetail>>;

    /// One page of the alerts across the fleet that match `filter`, newest first, with
    /// their deliveries, and how many match in all.
    async fn alert_page(&self, filter: &AlertFilter) -> Result<Page<Alert>>;

    /// The newest `limit` alerts across the fleet; only unresolved ones when `open_only`.
    async fn list_alerts(&self, open_only: bool, limit: i64) -> Result<Vec<Alert>> {
        let state = if open_only {
            AlertState::Open
        } else {
            AlertState::All
        };
        let filter = AlertFilter {
            state,
            limit,
            ..AlertFilter::default()
        };
        Ok(self.alert_page(&filter).await?.items)
    }

    /// Marks an alert acknowledged (the first acknowledgement wins); `None` if it does not exist.
    async fn acknowledge_alert(&self, alert_id: i64, by: &str, now: i64) -> Result<Option<Alert>>;

    /// Archives an installation whose customer left, by instance id: it is hidden from the
    /// list by default, the offline sweep, new rollouts and restore scheduling skip it, its
    /// open alerts are resolved, its rollout jobs not handed out yet and its scheduled
    /// restore verifications are cancelled. Nothing is deleted, and its next heartbeat
    /// makes it active again. `None` for an unknown instance;
    /// [`Error::Conflict`](crate::Error::Conflict) when it is archived already.
    async fn archive_installation(
        &self,
        instance_id: &str,
        now: i64,
    ) -> Result<Option<InstallationSummary>>;

    /// Opens an `offline` alert for every installation last seen before `cutoff` that has
    /// none open and is not archived; returns how many were opened.
    async fn mark_offline(&self, cutoff: i64, now: i64, forward: bool) -> Result<u64>;

    /// Claims up to `limit` outbox deliveries due at `now`, oldest first: each claimed row is
    /// not due again before `lease_until`, so replicas sharing the database never deliver the
    /// same alert at the same time, and a delivery cut short by a crash is retried once the
    /// lease ends.
    async fn outbox_claim(&self, now: i64, lease_until: i64, limit: i64)
    -> Result<Vec<OutboxItem>>;

    /// Records a successful delivery.
    async fn outbox_delivered(&self, id: i64, now: i64) -> Result<()>;

    /// Records a failed attempt: `next_attempt_at` schedules a retry, `None` gives up.
    async fn outbox_failed(
        &self,
        id: i64,
        attempts: i64,
        next_attempt_at: Option<i64>,
        error: &str,
        now: i64,
    ) -> Result<()>;

    /// Forgets v1 message ids first seen before `before`, and the counts of failed role-token
    /// checks of minutes that started before it; returns how many message ids.
    async fn prune_messages(&self, before: i64) -> Result<u64>;

    /// Adds failed role-token checks (client, how many) to the counts of the minute starting
    /// at `minute` (unix seconds, a multiple of 60), in one transaction.
    async fn count_auth_failures(&self, minute: i64, failures: &[(String, u64)]) -> Result<()>;

    /// The clients whose failed role-token checks in the minute starting at `minute` reached
    /// `limit`, as every replica sharing the database counted them; at most `max` of them.
    async fn clients_over_auth_limit(
        &self,
        minute: i64,
        limit: u64,
        max: usize,
    ) -> Result<Vec<String>>;

    /// Deletes time-series rows received before `before` (unix seconds), oldest first, and
    /// returns how many went. Each call removes at most a bounded number, so one sweep never
    /// holds the write lock for long; the next sweep continues.
    async fn prune_heartbeats(&self, before: i64) -> Result<u64>;

    /// Deletes, with the same bound per call, job failures reported before `before`, alert
    /// deliveries that ended (delivered or given up) before it, and alerts resolved before
    /// it; returns how many rows went. Open alerts stay, and so do deliveries still pending
    /// and the alerts they are for, however old.
    async fn prune_records(&self, before: i64) -> Result<u64>;

    /// How many heartbeats are stored (all installations).
    async fn heartbeat_count(&self) -> Result<i64>;

    /// When the newest heartbeat of any installation arrived (`None` with none): read as a
    /// control plane starts, it says how long the fleet went unheard before.
    async fn last_heard(&self) -> Result<Option<i64>>;

    /// Checks the database answers.
    async fn ping(&self) -> Result<()>;

    /// Stores a new dashboard session.
    async fn create_session(&self, session: &DashboardSession) -> Result<()>;

    /// The session whose id hashes to `id_hash`, unless it expired at `now` or before.
    async fn session(&self, id_hash: &str, now: i64) -> Result<Option<DashboardSession>>;

    /// Deletes the session whose id hashes to `id_hash` (logging out); nothing if there is none.
    async fn delete_session(&self, id_hash: &str) -> Result<()>;

    /// Deletes the sessions expired at `now`; returns how many went.
    async fn prune_sessions(&self, now: i64) -> Result<u64>;

    /// How many heartbeat batches may be recorded at the same time. SQLite has one writer
    /// at a time, so 1; a server database overlaps the round trips of several batches.
    fn write_concurrency(&self) -> usize {
        1
    }

    /// Command persistence (remote commands, logs, enrollment), when the backend has it.
    fn commands(&self) -> Option<&dyn commands::CommandStore> {
        None
    }
}

/// Opens the store a URL names: `sqlite://…` (or `sqlite::memory:`) or `postgres://…`
/// (`postgresql://…`), running migrations.
pub async fn open(url: &str) -> Result<std::sync::Arc<dyn Store>> {
    open_with(url, OpenOptions::default()).await
}

/// What [`open_with`] sets beyond the URL.
#[derive(Debug, Clone, Copy)]
pub struct OpenOptions {
    /// On PostgreSQL, how many heartbeat batches are recorded at the same time
    /// ([`PostgresStore::with_writers`]). SQLite has one writer whatever this says.
    pub postgres_writers: usize,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            postgres_writers: PostgresStore::DEFAULT_WRITERS,
        }
    }
}

/// [`open`], with `options`.
pub async fn open_with(url: &str, options: OpenOptions) -> Result<std::sync::Arc<dyn Store>> {
    if url.starts_with("sqlite:") {
        Ok(std::sync::Arc::new(SqliteStore::connect(url).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(std::sync::Arc::new(
            PostgresStore::connect(url)
                .await?
                .with_writers(options.postgres_writers),
        ))
    } else {
        Err(crate::Error::Config(vec![
            "the database URL must start with sqlite: or postgres://".into(),
        ]))
    }
}
