#![doc = include_str!("../README.md")]

mod alert_pages;
pub mod alerts;
mod api;
pub mod auth;
mod channel;
mod command_pages;
mod commands;
mod dashboard;
mod error;
mod ingest;
mod metrics;
mod observe;
mod openapi;
mod plugins;
mod poll;
mod query_docs;
mod registration;
mod releases;
mod replicas;
mod restores;
mod rollout_docs;
mod rollout_pages;
pub mod rollouts;
mod sessions;
pub mod store;
mod sweeper;
mod throttle;
mod update_jobs;
pub mod webhook;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use fleet_core::{Limits, SecretResolver, Verifier};

pub use alerts::SloThresholds;
pub use auth::{Role, RoleTokens};
pub use channel::{LiveSettings, stored_jwt_key};
pub use error::{Error, Result};
pub use ipnet::IpNet;
pub use store::{PostgresStore, SqliteStore, Store};
pub use throttle::ProxyHeader;
pub use webhook::WebhookConfig;

/// How the control plane behaves. `Settings::default()` matches the ERP control plane.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Accept v0 (`x-agent-signature`) heartbeats. On by default so existing agents work.
    pub allow_v0: bool,
    /// With [`allow_v0`](Self::allow_v0), accept v0 on `POST /api/heartbeats` only. A v0
    /// request carries no id and no time, so a captured one can be sent again forever: a
    /// repeated heartbeat only restates a state, but a repeated update, plugin or restore
    /// report is a result. Off by default, as the ERP's agents may sign those routes with v0.
    pub v0_only_for_heartbeats: bool,
    /// Refuse heartbeats from instances not enrolled first (`POST /api/installations`).
    /// Off by default: like the ERP, the first valid heartbeat creates the installation.
    pub require_enrollment: bool,
    /// SLO maxima; 0 turns a check off.
    pub slo: SloThresholds,
    /// An installation with no heartbeat for this long gets an `offline` alert.
    pub offline_after: Duration,
    /// How often offline installations are looked for and old message ids forgotten.
    pub sweep_interval: Duration,
    /// How long v1 message ids are remembered, so a late retry is still recognised. Never
    /// shorter than twice the timestamp tolerance (a replay must meet its first sighting).
    pub message_retention: Duration,
    /// How long the time series of heartbeat figures, job failures, alert deliveries that
    /// ended and resolved alerts are kept; `None` keeps them forever.
    pub heartbeat_retention: Option<Duration>,
    /// Tolerance of v1 timestamps, in seconds.
    pub tolerance_secs: i64,
    /// Body, array and string limits.
    pub limits: Limits,
    /// Most heartbeats committed in one transaction.
    pub batch_max: usize,
    /// Mark login cookies `Secure` (set when the control plane is served over HTTPS).
    pub secure_cookies: bool,
    /// How long a dashboard login lasts: the session `/login` starts is refused this long
    /// after it started, and the periodic sweep deletes it. Whole seconds count.
    pub session_lifetime: Duration,
    /// Failed role-token checks (API credentials or dashboard logins) one client may make
    /// per minute; past it the client's credentialed requests get 429 until the minute is
    /// over. Clients are told apart by peer address, which needs the router served with
    /// `into_make_service_with_connect_info::<SocketAddr>()`; without it all share one
    /// allowance. 0 turns the limit off.
    pub auth_failures_per_minute: u32,
    /// Reverse proxies whose forwarding header names the client for that limit (the
    /// rightmost address in it that is not itself a trusted proxy). Empty: the header is
    /// ignored, since anyone can write it.
    pub trusted_proxies: Vec<IpNet>,
    /// The header the trusted proxies write: `X-Forwarded-For` (the default) or `Forwarded`
    /// (RFC 7239). Only that one is read.
    pub proxy_header: ProxyHeader,
    /// A restore verification no agent took this long after it was scheduled, or with no
    /// report this long after it was handed out, is marked `timed_out` by the periodic sweep
    /// (with a `restore_failed` alert), so the installation can be scheduled again. Keep it
    /// above the agents' verify timeout plus their poll interval.
    pub restore_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            allow_v0: true,
            v0_only_for_heartbeats: false,
            require_enrollment: false,
            slo: SloThresholds::default(),
            offline_after: Duration::from_secs(15 * 60),
            sweep_interval: Duration::from_secs(30),
            message_retention: Duration::from_secs(3600),
            heartbeat_retention: Some(Duration::from_secs(30 * 24 * 3600)),
            tolerance_secs: fleet_core::signing::DEFAULT_TOLERANCE_SECS,
            limits: Limits::default(),
            batch_max: 512,
            secure_cookies: false,
            session_lifetime: Duration::from_secs(DEFAULT_SESSION_HOURS * 3600),
            auth_failures_per_minute: 30,
            trusted_proxies: Vec::new(),
            proxy_header: ProxyHeader::XForwardedFor,
            restore_timeout: Duration::from_secs(DEFAULT_RESTORE_TIMEOUT_SECS),
        }
    }
}

/// Default of [`Settings::restore_timeout`]: 6 hours, well above what an agent with its
/// defaults needs (a poll every 10 minutes, a verify command of at most an hour).
pub const DEFAULT_RESTORE_TIMEOUT_SECS: u64 = 6 * 3600;

/// Default of [`Settings::session_lifetime`], in hours: a working day, after which the
/// dashboard asks for the token again.
pub const DEFAULT_SESSION_HOURS: u64 = 12;

/// What every handler shares.
pub(crate) struct AppState {
    pub store: Arc<dyn Store>,
    pub verifier: Verifier,
    pub settings: Settings,
    pub tokens: RoleTokens,
    pub writers: ingest::Writers,
    pub metrics: Arc<metrics::Metrics>,
    pub webhook_configured: bool,
    /// Verifies release manifests (pinned Ed25519 keys, optional ERP HMAC secret).
    pub manifests: fleet_core::manifest::ManifestVerifier,
    pub(crate) live: Arc<channel::Live>,
    /// Failed role-token checks per client.
    pub(crate) auth_throttle: throttle::AuthThrottle,
}

pub(crate) type Shared = Arc<AppState>;

/// The control plane. Start with [`ControlPlane::builder`].
///
/// ```no_run
/// # async fn run() -> fleet_server::Result<()> {
/// use fleet_server::{ControlPlane, RoleTokens, SqliteStore};
/// let store = SqliteStore::connect("sqlite://fleet.db").await?;
/// let secrets = fleet_core::SecretResolver::from_config(Some(r#"{"acme-001":"s3cret"}"#), None)
///     .expect("valid secrets");
/// let router = ControlPlane::builder()
///     .store(store)
///     .secrets(secrets)
///     .tokens(RoleTokens { admin: Some("admin-token".into()), ..Default::default() })
///     .build()?;
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await.expect("bind");
/// // With the peer address, the limit on failed role-token checks applies per client.
/// let service = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
/// axum::serve(listener, service).await.expect("serve");
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct ControlPlane;

impl ControlPlane {
    /// A builder with default [`Settings`], no secrets, no role tokens and no store.
    pub fn builder() -> ControlPlaneBuilder {
        ControlPlaneBuilder::default()
    }
}

/// Configures and builds the control plane's [`Router`].
#[derive(Default)]
pub struct ControlPlaneBuilder {
    store: Option<Arc<dyn Store>>,
    secrets: SecretResolver,
    tokens: RoleTokens,
    settings: Settings,
    webhook: Option<WebhookConfig>,
    manifests: fleet_core::manifest::ManifestVerifier,
    live: LiveSettings,
}

impl std::fmt::Debug for ControlPlaneBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlaneBuilder")
            .field("store", &self.store.as_ref().map(|_| "..."))
            .field("secrets", &self.secrets)
            .field("tokens", &self.tokens)
            .field("settings", &self.settings)
            .field("webhook", &self.webhook)
            .field("manifests", &self.manifests)
            .field("live", &self.live)
            .finish()
    }
}

impl ControlPlaneBuilder {
    /// The database (required).
    pub fn store(mut self, store: impl Store) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// The database, already shared.
    pub fn shared_store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// Which secrets sign which instance's heartbeats.
    pub fn secrets(mut self, secrets: SecretResolver) -> Self {
        self.secrets = secrets;
        self
    }

    /// The role tokens (support, ops, admin).
    pub fn tokens(mut self, tokens: RoleTokens) -> Self {
        self.tokens = tokens;
        self
    }

    /// Behaviour settings.
    pub fn settings(mut self, settings: Settings) -> Self {
        self.settings = settings;
        self
    }

    /// Where alerts are forwarded.
    pub fn webhook(mut self, webhook: WebhookConfig) -> Self {
        self.webhook = Some(webhook);
        self
    }

    /// Which release manifests `POST /api/releases` accepts: pinned Ed25519 public keys
    /// (`CONTROL_PLANE_RELEASE_PUBLIC_KEYS`) and, for ERP compatibility, an HMAC secret
    /// (`CONTROL_PLANE_RELEASE_SIGNING_SECRET`). Without either, every release is refused.
    pub fn manifest_verifier(mut self, verifier: fleet_core::manifest::ManifestVerifier) -> Self {
        self.manifests = verifier;
        self
    }

    /// Agent tokens, enrollment and the live channel.
    pub fn live(mut self, live: LiveSettings) -> Self {
        self.live = live;
        self
    }

    /// Builds the router and starts the background tasks (heartbeat writer, offline sweeper,
    /// webhook delivery). Call it inside a Tokio runtime. The tasks stop by themselves once
    /// the router and all its clones are dropped; heartbeats already accepted are committed
    /// first.
    pub fn build(self) -> Result<Router> {
        let Some(store) = self.store else {
            return Err(Error::Config(vec!["a store is required".into()]));
        };
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::Config(vec![
                "ControlPlaneBuilder::build must be called inside a Tokio runtime".into(),
            ]));
        }
        let mut settings = self.settings;
        let min_retention = Duration::from_secs(2 * settings.tolerance_secs.unsigned_abs());
        settings.message_retention = settings.message_retention.max(min_retention);
        settings.batch_max = settings.batch_max.max(1);
        let verifier = Verifier::new(self.secrets)
            .allow_v0(settings.allow_v0)
            .tolerance_secs(settings.tolerance_secs);
        let metrics = Arc::new(metrics::Metrics::default());
        let rules = store::IngestRules {
            slo: settings.slo,
            require_enrollment: settings.require_enrollment,
            forward_alerts: self.webhook.is_some(),
            late_after: Some(settings.offline_after),
        };
        let writers =
            ingest::spawn_writers(store.clone(), rules, settings.batch_max, metrics.clone());
        let replica_channel = store.commands().and_then(|c| c.replica_channel());
        let live = Arc::new(channel::Live::new(
            self.live,
            replica_channel.clone().map(replicas::Notifier::new),
        ));
        let auth_throttle = throttle::AuthThrottle::new(settings.auth_failures_per_minute);
        // Subscribed before the router exists, so no job made available through it is missed.
        let jobs_available = store.jobs_available();
        let state = Arc::new(AppState {
            live,
            auth_throttle,
            store,
            verifier,
            settings,
            tokens: self.tokens,
            writers,
            metrics,
            webhook_configured: self.webhook.is_some(),
            manifests: self.manifests,
        });
        sweeper::spawn(Arc::downgrade(&state));
        throttle::spawn_sharing(Arc::downgrade(&state));
        rollouts::spawn_watcher(Arc::downgrade(&state));
        channel::spawn_timeouts(Arc::downgrade(&state));
        channel::spawn_scheduler(Arc::downgrade(&state));
        if let Some(announced) = jobs_available {
            channel::spawn_jobs_waiting(Arc::downgrade(&state), announced);
        }
        if let Some(replica_channel) = replica_channel {
            replicas::spawn_listener(Arc::downgrade(&state), replica_channel);
        }
        if let Some(webhook) = self.webhook {
            webhook::spawn(Arc::downgrade(&state), webhook);
        }
        Ok(routes(state))
    }
}

fn routes(state: Shared) -> Router {
    Router::new()
        .route("/api/heartbeats", post(ingest::receive))
        .route(
            "/api/installations",
            get(api::list_installations).post(api::enroll),
        )
        .route("/api/installations/{instance_id}", get(api::installation))
        .route(
            "/api/installations/{instance_id}/archive",
            post(api::archive),
        )
        .route("/api/alerts", get(api::list_alerts))
        .route("/api/alerts/{id}/ack", post(api::acknowledge))
        .route("/api/releases", get(releases::list).post(releases::create))
        .route("/api/rollouts", get(rollouts::list).post(rollouts::create))
        .route("/api/rollouts/{id}", get(rollouts::show))
        .route("/api/rollouts/{id}/advance", post(rollouts::advance))
        .route("/api/rollouts/{id}/pause", post(rollouts::pause))
        .route("/api/rollouts/{id}/resume", post(rollouts::resume))
        .route("/api/rollouts/{id}/cancel", post(rollouts::cancel))
        .route("/api/updates/next", post(update_jobs::next))
        .route("/api/updates/report", post(update_jobs::report))
        .route(
            "/api/plugins/releases",
            get(plugins::list_releases).post(plugins::create_release),
        )
        .route(
            "/api/plugins/requests",
            get(plugins::list_requests).post(plugins::create_request),
        )
        .route("/api/plugins/requests/{id}/approve", post(plugins::approve))
        .route("/api/plugins/requests/{id}/reject", post(plugins::reject))
        .route("/api/plugins/rollouts", post(plugins::create_rollout))
        .route(
            "/api/plugins/rollouts/{id}/advance",
            post(rollouts::advance_plugin),
        )
        .route("/api/plugins/next", post(plugins::next))
        .route("/api/plugins/report", post(plugins::report))
        .route("/api/restores", get(restores::list))
        .route("/api/restores/schedule", post(restores::schedule))
        .route("/api/restores/next", post(restores::next))
        .route("/api/restores/report", post(restores::report))
        .route("/api/restores/status", post(restores::status))
        .route("/api/restores/{id}/cancel", post(restores::cancel))
        .route("/healthz", get(api::healthz))
        .route("/.well-known/jwks.json", get(registration::jwks))
        .route("/v1/agents/register", post(registration::register))
        .route("/v1/enrollments", post(registration::create_enrollment))
        .route("/v1/agents/connect", get(channel::connect))
        .route("/v1/agents/connected", get(channel::connected))
        // A poll carries queued frames and log chunks up to MAX_POLL_BYTES; without its own
        // limit the HTTP layer refused anything over axum's default of 2 MiB.
        .route(
            "/v1/agents/poll",
            post(poll::poll).layer(DefaultBodyLimit::max(poll::MAX_POLL_BYTES)),
        )
        .route("/v1/commands/submit", post(commands::submit))
        .route("/v1/commands", get(commands::list))
        .route("/v1/commands/{id}", get(commands::show))
        .route("/v1/commands/{id}/logs", get(commands::logs))
        .route("/v1/commands/{id}/cancel", post(commands::cancel))
        .route(
            "/v1/commands/logs",
            post(poll::logs).layer(DefaultBodyLimit::max(poll::MAX_POLL_BYTES)),
        )
        .route("/metrics", get(metrics::render))
        .route("/openapi.json", get(openapi::document))
        .route("/", get(dashboard::index))
        .route("/installations/{instance_id}", get(dashboard::installation))
        .route(
            "/installations/{instance_id}/archive",
            post(dashboard::archive),
        )
        .route("/alerts", get(alert_pages::alerts))
        .route("/alerts/{id}/ack", post(dashboard::acknowledge))
        .route("/releases", get(rollout_pages::releases))
        .route("/rollouts", get(rollout_pages::rollouts))
        .route("/rollouts/{id}", get(rollout_pages::rollout))
        .route("/rollouts/{id}/{action}", post(rollout_pages::act))
        .route("/plugins", get(rollout_pages::plugins))
        .route(
            "/plugins/requests/{id}/approve",
            post(rollout_pages::approve_request),
        )
        .route(
            "/plugins/requests/{id}/reject",
            post(rollout_pages::reject_request),
        )
        .route("/restores", get(rollout_pages::restores))
        .route("/restores/{id}/cancel", post(rollout_pages::cancel_restore))
        .route("/commands", get(command_pages::commands))
        .route("/commands/{id}", get(command_pages::command))
        .route("/commands/{id}/cancel", post(command_pages::cancel))
        .route("/login", get(dashboard::login_page).post(dashboard::login))
        .route("/logout", post(dashboard::logout))
        .fallback(api::not_found)
        .layer(axum::middleware::map_response(security_headers))
        .layer(observe::ObserveLayer::new(state.metrics.clone()))
        .with_state(state)
}

/// What a page may load and run: nothing but its own inline styles (the dashboard has no
/// script), forms posted to this origin only, never framed.
const DASHBOARD_POLICY: &str = "default-src 'none'; style-src 'unsafe-inline'; \
    img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Headers on every answer: no guessing of a content type, no framing (clickjacking), no
/// Referer to other sites; and on HTML, [`DASHBOARD_POLICY`], so that markup slipping past
/// the escaping still runs nothing.
async fn security_headers(mut response: axum::response::Response) -> axum::response::Response {
    use axum::http::header::{self, HeaderValue};
    let html = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html"));
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if html {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(DASHBOARD_POLICY),
        );
    }
    response
}
