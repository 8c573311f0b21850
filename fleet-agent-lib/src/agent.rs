//! The agent: builds heartbeats from checks and collectors, queues them in the outbox,
//! delivers them in order, and serves the local API, until shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet_core::heartbeat::CheckResult;
use fleet_core::{Heartbeat, Limits, Signer};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

use crate::checks::{Check, NotConfigured, check_for_url, run_check};
use crate::collectors::{
    BackupCollector, Collector, DbSizeCollector, EventsCollector, OpsCollector, SloCollector,
    StorageSizeCollector,
};
use crate::config::{AgentConfig, DEFAULT_DOCKER_HOST, DEFAULT_DOCKER_SOCKET};
use crate::containers::Containers;
use crate::metrics::HostMetrics;
use crate::outbox::{Bounds, Outbox};
use crate::regional::RegionalHealth;
use crate::sender::{Backoff, OutageLog, OutageNote, Outcome, Sender};
use crate::{Error, Result};

/// The control-plane path heartbeats go to.
pub const HEARTBEAT_PATH: &str = "/api/heartbeats";

/// The heartbeat's key listing the built-in checks `AGENT_SKIP_CHECKS` leaves out.
pub const CHECKS_SKIPPED: &str = "checks_skipped";

/// Longest a collector may take before its check fails.
const COLLECTOR_TIMEOUT: Duration = Duration::from_secs(5);

/// Configures an [`Agent`]: the built-in checks and collectors follow the configuration; add
/// your own with [`check`](Self::check) and [`collector`](Self::collector).
pub struct AgentBuilder {
    config: AgentConfig,
    checks: Vec<Arc<dyn Check>>,
    collectors: Vec<Arc<dyn Collector>>,
    builtin: bool,
    commands: Option<crate::commands::CommandSettings>,
    handlers: Vec<Arc<dyn crate::commands::CommandHandler>>,
}

impl AgentBuilder {
    /// Runs a command type with `handler` instead of the built-in one.
    pub fn command_handler(
        mut self,
        handler: impl crate::commands::CommandHandler + 'static,
    ) -> Self {
        self.handlers.push(Arc::new(handler));
        self
    }

    /// Turns on remote commands over the live channel (off unless set).
    pub fn commands(mut self, settings: crate::commands::CommandSettings) -> Self {
        self.commands = Some(settings);
        self
    }

    /// Adds a health check, reported in `checks[]` under its name. A check named like a
    /// built-in one (`db`, `redis`, `storage`, `search`) replaces it, and sets the
    /// heartbeat's `db_ok`, `redis_ok` and so on: a service the built-in probe does not speak,
    /// or a node without that service, gets its own check instead of a failing one.
    pub fn check(mut self, check: impl Check + 'static) -> Self {
        self.checks.push(Arc::new(check));
        self
    }

    /// Adds a collector, run at every heartbeat after the built-in ones.
    pub fn collector(mut self, collector: impl Collector + 'static) -> Self {
        self.collectors.push(Arc::new(collector));
        self
    }

    /// Leaves out the built-in checks and collectors (database, Redis, storage, search, ops,
    /// backup, SLO, host, containers): only the ones added here run.
    pub fn without_builtins(mut self) -> Self {
        self.builtin = false;
        self
    }

    /// Builds the agent. Nothing is opened or bound yet.
    pub fn build(self) -> Result<Agent> {
        let config = self.config;
        if config.heartbeat_interval.is_zero() {
            return Err(Error::Config(vec![
                "the heartbeat interval must be above zero".into(),
            ]));
        }
        let http = reqwest::Client::builder()
            .timeout(config.buffer.send_timeout)
            .connect_timeout(config.check_timeout.max(Duration::from_secs(1)))
            .user_agent(concat!("fleet-agent/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let mut checks: Vec<Arc<dyn Check>> = Vec::new();
        let mut collectors: Vec<Arc<dyn Collector>> = Vec::new();
        let mut ops = None;
        if self.builtin {
            let services = [
                ("db", &config.database_url, 5432, "DATABASE_URL"),
                ("redis", &config.redis_url, 6379, "REDIS_URL"),
            ];
            for (name, url, port, variable) in services {
                if config.skips_check(name) {
                    continue;
                }
                checks.push(match url {
                    Some(url) => check_for_url(name, url, port, http.clone()),
                    None => Arc::new(NotConfigured::new(name, variable)),
                });
            }
            if let Some(url) = &config.storage_endpoint {
                checks.push(check_for_url("storage", url, 9000, http.clone()));
            }
            if let Some(url) = &config.search_url {
                checks.push(check_for_url("search", url, 7700, http.clone()));
            }
            if let Some(url) = &config.ops_url {
                let collector = Arc::new(OpsCollector::new(
                    http.clone(),
                    url,
                    config.ops_token.as_deref(),
                ));
                ops = Some(collector.clone());
                collectors.push(collector);
            }
            if let (Some(url), Some(token)) = (&config.events_stats_url, &config.ops_token) {
                collectors.push(Arc::new(EventsCollector::new(http.clone(), url, token)));
            }
            if let Some(path) = &config.backup_meta_path {
                collectors.push(Arc::new(BackupCollector::new(path)));
            }
            if let Some(url) = config
                .database_url
                .as_deref()
                .filter(|u| u.starts_with("postgres://") || u.starts_with("postgresql://"))
            {
                collectors.push(Arc::new(DbSizeCollector::new(url, config.metrics_interval)));
            }
            if let Some(path) = &config.storage_data_path {
                collectors.push(Arc::new(StorageSizeCollector::new(
                    path,
                    config.metrics_interval,
                )));
            }
            if !config.regional_endpoints.is_empty() {
                collectors.push(Arc::new(RegionalHealth::new(
                    http.clone(),
                    config.regional_endpoints.clone(),
                    config.primary_region.clone(),
                )));
            }
            if let Some(url) = &config.metrics_url {
                collectors.push(Arc::new(SloCollector::new(http.clone(), url)));
            }
            collectors.push(Arc::new(HostMetrics::new(
                &config.system_root_path,
                config.metrics_interval,
            )));
            // A host without Docker that never asked for container inventory should not
            // report a failing source forever: the default socket counts only if it exists.
            let default_socket = config.docker_host == DEFAULT_DOCKER_HOST
                && !std::path::Path::new(DEFAULT_DOCKER_SOCKET).exists();
            if default_socket {
                tracing::info!(
                    "no {DEFAULT_DOCKER_SOCKET} and no DOCKER_HOST: container inventory is off"
                );
            } else if !config.containers_interval.is_zero() {
                collectors.push(Arc::new(Containers::new(
                    &config.docker_host,
                    config.containers_interval,
                )?));
            }
        }
        // A name the heartbeat cannot carry would cost every heartbeat that entry of
        // `checks[]` (collectors report there too).
        let bad_names: Vec<String> = self
            .checks
            .iter()
            .map(|c| c.name())
            .chain(self.collectors.iter().map(|c| c.name()))
            .filter_map(crate::checks::name_problem)
            .collect();
        if !bad_names.is_empty() {
            return Err(Error::Config(bad_names));
        }
        checks.retain(|builtin| !self.checks.iter().any(|own| own.name() == builtin.name()));
        checks.extend(self.checks);
        collectors.extend(self.collectors);
        tracing::debug!(
            checks = ?checks.iter().map(|c| c.name()).collect::<Vec<_>>(),
            collectors = ?collectors.iter().map(|c| c.name()).collect::<Vec<_>>(),
            "agent built"
        );
        let sender = Sender::new(
            http.clone(),
            &config.control_plane_url,
            Signer::new(config.secret.clone()),
            config.signature_scheme,
        );
        Ok(Agent {
            shared: Arc::new(Shared {
                config,
                http,
                checks,
                collectors,
                ops,
                sender,
                started: Instant::now(),
                stats: Stats::default(),
                last_checks: Mutex::new(Vec::new()),
                outbox: tokio::sync::OnceCell::new(),
                flush: Notify::new(),
                installed_version: Arc::new(Mutex::new(None)),
                poll_now: crate::pipeline::PollNow::default(),
            }),
            listener: None,
            commands: self.commands,
            handlers: self.handlers,
            restart: Arc::new(watch::channel(false).0),
        })
    }
}

/// Counters served at `/metrics/agent`.
#[derive(Default)]
pub(crate) struct Stats {
    pub(crate) heartbeats: AtomicU64,
    pub(crate) delivered: AtomicU64,
    pub(crate) send_failures: AtomicU64,
    pub(crate) unauthorized: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) dropped_unbuffered: AtomicU64,
    pub(crate) last_heartbeat_at: AtomicI64,
    pub(crate) last_delivery_at: AtomicI64,
    /// Failed attempts since the last delivery, so that an outage is logged once, not per
    /// retry.
    pub(crate) outage: OutageLog,
}

/// What every task of a running agent shares.
pub(crate) struct Shared {
    pub(crate) config: AgentConfig,
    pub(crate) http: reqwest::Client,
    pub(crate) checks: Vec<Arc<dyn Check>>,
    pub(crate) collectors: Vec<Arc<dyn Collector>>,
    pub(crate) ops: Option<Arc<OpsCollector>>,
    pub(crate) sender: Sender,
    pub(crate) started: Instant,
    pub(crate) stats: Stats,
    pub(crate) last_checks: Mutex<Vec<CheckResult>>,
    pub(crate) outbox: tokio::sync::OnceCell<Outbox>,
    pub(crate) flush: Notify,
    /// The version the last successful update installed (reported instead of
    /// `INSTANCE_VERSION` once set).
    pub(crate) installed_version: Arc<Mutex<Option<String>>>,
    /// Wakes the pipelines' pollers; the live channel holds it too.
    pub(crate) poll_now: crate::pipeline::PollNow,
}

/// The fleet agent. Build it with [`Agent::builder`], then [`run`](Agent::run) it.
pub struct Agent {
    shared: Arc<Shared>,
    listener: Option<TcpListener>,
    commands: Option<crate::commands::CommandSettings>,
    handlers: Vec<Arc<dyn crate::commands::CommandHandler>>,
    restart: Arc<watch::Sender<bool>>,
}

impl Agent {
    /// Starts configuring an agent.
    pub fn builder(config: AgentConfig) -> AgentBuilder {
        AgentBuilder {
            config,
            checks: Vec::new(),
            collectors: Vec::new(),
            builtin: true,
            commands: None,
            handlers: Vec::new(),
        }
    }

    /// Turns true when an `UpdateAgent` command installed a new binary: stop the agent
    /// (pass this to [`run`](Self::run)'s shutdown) and start the new binary.
    pub fn restart_signal(&self) -> watch::Receiver<bool> {
        self.restart.subscribe()
    }

    /// The configuration in use.
    pub fn config(&self) -> &AgentConfig {
        &self.shared.config
    }

    /// Binds the local API now and returns its address (useful with `AGENT_PORT=0`);
    /// [`run`](Self::run) binds it otherwise. Refuses a non-loopback address without a token.
    pub async fn bind(&mut self) -> Result<SocketAddr> {
        let c = &self.shared.config;
        let addr = SocketAddr::new(c.local_bind, c.local_port);
        if !addr.ip().is_loopback() && c.local_token.is_none() {
            return Err(Error::Config(vec![format!(
                "refusing to serve the local API on {addr} without AGENT_LOCAL_TOKEN"
            )]));
        }
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })?;
        let local = listener.local_addr()?;
        self.listener = Some(listener);
        Ok(local)
    }

    /// Runs the checks now, as `POST /smoke` does.
    pub async fn run_checks(&self) -> Vec<CheckResult> {
        self.shared.run_checks().await
    }

    /// Builds one heartbeat now, without sending it.
    pub async fn heartbeat(&self) -> Heartbeat {
        self.shared.build_heartbeat().await
    }

    /// Runs every task (heartbeats, outbox delivery, local API) until `shutdown` completes,
    /// then stops them all. Returns early with an error only if a state file (the outbox,
    /// the pipelines' job state, the command journal) cannot be opened
    /// ([`Error::State`]) or the local API cannot bind.
    ///
    /// `shutdown` is first polled once every task has started, so its first poll also tells
    /// an embedder that the agent runs (the Python binding's `start()` returns then).
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let shared = self.shared.clone();
        let c = &shared.config;
        if c.buffer.enabled {
            let outbox = Outbox::open(
                &c.state_path,
                Bounds {
                    max_messages: c.buffer.max_messages,
                    max_bytes: c.buffer.max_bytes,
                    max_age: c.buffer.max_age,
                },
            )
            .await
            .map_err(|err| err.opening_state(&c.state_path))?;
            let _ = shared.outbox.set(outbox);
        }
        let listener = match self.listener.take() {
            Some(l) => l,
            None => {
                self.bind().await?;
                self.listener
                    .take()
                    .ok_or_else(|| Error::Io(std::io::Error::other("local API listener missing")))?
            }
        };
        if c.control_plane_in_clear() {
            tracing::warn!(
                control_plane_url = %fleet_core::redact_url_secrets(&c.control_plane_url),
                "CONTROL_PLANE_URL is plain http:// to another host: enrollment receives the \
                 agent's secret and the live channel sends its bearer token unencrypted, \
                 readable by anyone on the path; use https://"
            );
        }
        tracing::info!(
            instance_id = %c.instance_id,
            local_api = %listener.local_addr()?,
            heartbeat_secs = c.heartbeat_interval.as_secs_f64(),
            signature = c.signature_scheme.as_str(),
            buffered = c.buffer.enabled,
            "fleet agent started"
        );

        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        crate::pipelines::spawn(&shared, &mut tasks, &stop_rx).await?;
        tasks.spawn(heartbeat_loop(shared.clone(), stop_rx.clone()));
        if shared.outbox.get().is_some() {
            tasks.spawn(flush_loop(shared.clone(), stop_rx.clone()));
        }
        if let Some(settings) = self.commands.take().filter(|s| s.enabled) {
            let path = crate::logstream::journal_path(&c.state_path);
            let journal = crate::logstream::Journal::open(&path)
                .await
                .map_err(|err| err.opening_state(&path))?;
            let executor = crate::commands::Executor::new(
                journal,
                settings,
                c.version.clone(),
                self.restart.clone(),
            )
            .with_handlers(std::mem::take(&mut self.handlers));
            tasks.spawn(crate::channel::run(
                crate::channel::ChannelConfig {
                    instance_id: c.instance_id.clone(),
                    control_plane_url: c.control_plane_url.clone(),
                    secret: c.secret.clone(),
                    version: c
                        .version
                        .clone()
                        .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned()),
                    executor,
                    http: shared.http.clone(),
                    poll_now: shared.poll_now.clone(),
                },
                stop_rx.clone(),
            ));
        }
        let mut api_stop = stop_rx.clone();
        let app = crate::local_api::router(shared.clone());
        tasks.spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = api_stop.wait_for(|stop| *stop).await;
            });
            if let Err(err) = serve.await {
                tracing::error!(error = %err, "local API stopped");
            }
        });

        shutdown.await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
        // Every task watches the stop flag; the limit only guards against a stuck handler.
        let drained = tokio::time::timeout(Duration::from_secs(10), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("some tasks did not stop within 10 s; aborting them");
            tasks.abort_all();
        }
        Ok(())
    }
}

impl Shared {
    pub(crate) async fn run_checks(&self) -> Vec<CheckResult> {
        let timeout = self.config.check_timeout;
        let results = futures_util::future::join_all(
            self.checks.iter().map(|c| run_check(c.as_ref(), timeout)),
        )
        .await;
        // Checks run alone (`POST /smoke`) refresh their own entries only: the collectors'
        // stay as the last heartbeat left them, so their series never vanish from
        // `/metrics/agent` between heartbeats.
        let mut last = self.last_checks.lock().unwrap_or_else(|p| p.into_inner());
        for result in &results {
            match last.iter_mut().find(|r| r.name == result.name) {
                Some(entry) => *entry = result.clone(),
                None => last.push(result.clone()),
            }
        }
        results
    }

    pub(crate) async fn build_heartbeat(&self) -> Heartbeat {
        let c = &self.config;
        let mut hb = Heartbeat::new(&c.instance_id);
        hb.collected_at = u64::try_from(fleet_core::unix_now()).ok();
        hb.domain = c.domain.clone();
        hb.client = c.client.clone();
        hb.version = self
            .installed_version
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .or_else(|| c.version.clone());
        hb.release_channel = c.release_channel.clone();
        hb.uptime_seconds = Some(self.started.elapsed().as_secs() as f64);
        if let Some(region) = &c.primary_region {
            hb.extra
                .insert("primary_region".into(), region.clone().into());
        }
        hb.extra
            .insert("iam_sso_enabled".into(), c.iam.sso_enabled.into());
        hb.extra
            .insert("iam_mfa_enforced".into(), c.iam.mfa_enforced.into());
        hb.extra
            .insert("iam_scim_enabled".into(), c.iam.scim_enabled.into());

        // Checks run concurrently with the collectors, which share the heartbeat in turn.
        let collect = async {
            let mut results = Vec::new();
            for collector in &self.collectors {
                let started = Instant::now();
                let outcome =
                    match tokio::time::timeout(COLLECTOR_TIMEOUT, collector.collect(&mut hb)).await
                    {
                        Ok(outcome) => outcome,
                        Err(_) => Err(format!(
                            "timed out after {} ms",
                            COLLECTOR_TIMEOUT.as_millis()
                        )),
                    };
                // A collector of the embedder's may quote a URL it requested: its query or
                // userinfo must reach neither the log nor the heartbeat.
                let outcome = outcome.map_err(|reason| fleet_core::redact_url_secrets(&reason));
                if let Err(reason) = &outcome {
                    tracing::debug!(collector = collector.name(), %reason, "collector failed");
                }
                results.push(CheckResult {
                    name: collector.name().to_owned(),
                    ok: outcome.is_ok(),
                    latency_ms: Some(
                        (started.elapsed().as_secs_f64() * 1_000_000.0).round() / 1000.0,
                    ),
                    error: outcome.err(),
                    extra: Default::default(),
                });
            }
            results
        };
        let (checks, collected) = tokio::join!(self.run_checks(), collect);
        // Health follows the services (checks); a collector that cannot read its source is
        // reported in `checks[]` but says nothing about the instance itself.
        let healthy = checks.iter().all(|r| r.ok);
        let ok_of = |name: &str| checks.iter().find(|r| r.name == name).map(|r| r.ok);
        hb.db_ok = ok_of("db").unwrap_or(self.config.skips_check("db"));
        hb.redis_ok = ok_of("redis").unwrap_or(self.config.skips_check("redis"));
        // The wire's `db_ok`/`redis_ok` are required booleans: a skipped service reads as
        // fine there, and this key tells the control plane it was never checked.
        if !self.config.skip_checks.is_empty() {
            hb.extra.insert(
                CHECKS_SKIPPED.into(),
                self.config.skip_checks.clone().into(),
            );
        }
        // As in the ERP agent, storage that is not configured counts as fine.
        hb.storage_ok = ok_of("storage").unwrap_or(true);
        hb.search_ok = ok_of("search");
        hb.checks = checks;
        hb.checks.extend(collected);
        hb.checks.truncate(Limits::default().max_checks);
        // What /metrics/agent reports: checks and collectors of the last heartbeat.
        *self.last_checks.lock().unwrap_or_else(|p| p.into_inner()) = hb.checks.clone();
        hb.health = Some(if healthy {
            "ok".into()
        } else {
            "degraded".into()
        });
        hb
    }
}

/// Serializes a heartbeat, making sure the control plane will accept it: any optional field
/// that fails the protocol's validation is left out (and logged) rather than losing the
/// whole heartbeat to a 422, and so is an element of a list (one check, one container), not
/// the whole list.
pub fn heartbeat_body(hb: &Heartbeat) -> Vec<u8> {
    let body = hb.to_vec();
    let limits = Limits::default();
    let Err(fleet_core::DecodeError::Invalid(errors)) = Heartbeat::decode(&body, &limits) else {
        return body;
    };
    let Ok(Value::Object(mut map)) = serde_json::from_slice::<Value>(&body) else {
        return body;
    };
    let mut elements: std::collections::BTreeMap<&str, Vec<usize>> = Default::default();
    for violation in &errors.violations {
        let key = violation.path.split(['.', '[']).next().unwrap_or_default();
        tracing::warn!(path = %violation.path, message = %violation.message,
            "leaving an invalid field out of the heartbeat");
        let index = violation.path[key.len()..]
            .strip_prefix('[')
            .and_then(|rest| rest.split_once(']'))
            .and_then(|(index, _)| index.parse::<usize>().ok());
        match index {
            Some(index) if map.get(key).is_some_and(Value::is_array) => {
                elements.entry(key).or_default().push(index);
            }
            _ if !matches!(
                key,
                "instance_id" | "db_ok" | "redis_ok" | "storage_ok" | "jobs_failed" | ""
            ) =>
            {
                map.remove(key);
            }
            _ => {}
        }
    }
    for (key, mut indexes) in elements {
        if let Some(Value::Array(items)) = map.get_mut(key) {
            indexes.sort_unstable();
            indexes.dedup();
            let len = items.len();
            for index in indexes.into_iter().rev().filter(|&i| i < len) {
                items.remove(index);
            }
        }
    }
    serde_json::to_vec(&map).unwrap_or(body)
}

fn new_message_id() -> String {
    format!("msg_{}", uuid::Uuid::now_v7().simple())
}

async fn heartbeat_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(shared.config.heartbeat_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let hb = tokio::select! {
            hb = shared.build_heartbeat() => hb,
            _ = stop.wait_for(|s| *s) => return,
        };
        shared.stats.heartbeats.fetch_add(1, Ordering::Relaxed);
        shared
            .stats
            .last_heartbeat_at
            .store(fleet_core::unix_now(), Ordering::Relaxed);
        let msg_id = new_message_id();
        match shared.outbox.get() {
            Some(outbox) => {
                let pushed = outbox
                    .push(&msg_id, HEARTBEAT_PATH, fleet_core::unix_now(), |dropped| {
                        let mut hb = hb;
                        hb.outbox_dropped = (dropped > 0).then_some(dropped);
                        heartbeat_body(&hb)
                    })
                    .await;
                match pushed {
                    Ok(_) => shared.flush.notify_one(),
                    // The disk is full or unwritable: say so loudly; the next tick retries.
                    Err(err) => tracing::error!(error = %err, "cannot queue the heartbeat"),
                }
            }
            None => send_unbuffered(&shared, &msg_id, hb, &mut stop).await,
        }
    }
}

/// Without an outbox: a few retries now, then the heartbeat is dropped and counted.
async fn send_unbuffered(
    shared: &Shared,
    msg_id: &str,
    mut hb: Heartbeat,
    stop: &mut watch::Receiver<bool>,
) {
    let dropped = shared.stats.dropped_unbuffered.load(Ordering::Relaxed);
    hb.outbox_dropped = (dropped > 0).then_some(dropped);
    let body = heartbeat_body(&hb);
    let b = &shared.config.buffer;
    let mut backoff = Backoff::new(b.backoff_base, b.backoff_max);
    for attempt in 0..=b.send_retries {
        let outcome = shared.sender.send(msg_id, HEARTBEAT_PATH, &body).await;
        record(shared, &outcome);
        let wait = match outcome {
            Outcome::Delivered => {
                // Those drops are reported now.
                shared
                    .stats
                    .dropped_unbuffered
                    .fetch_sub(dropped, Ordering::Relaxed);
                return;
            }
            Outcome::Retry { after, .. } if attempt < b.send_retries => {
                after.unwrap_or_else(|| backoff.next_delay())
            }
            _ => break,
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    shared
        .stats
        .dropped_unbuffered
        .fetch_add(1, Ordering::Relaxed);
    tracing::warn!(
        msg_id,
        "heartbeat dropped after its retries (BUFFER_ENABLED=false)"
    );
}

/// Logs and counts an outcome.
fn record(shared: &Shared, outcome: &Outcome) {
    let stats = &shared.stats;
    match outcome {
        Outcome::Delivered => {
            stats.delivered.fetch_add(1, Ordering::Relaxed);
            stats
                .last_delivery_at
                .store(fleet_core::unix_now(), Ordering::Relaxed);
            if let OutageNote::Ended { failed_attempts } = stats.outage.delivered() {
                tracing::info!(failed_attempts, "control plane reachable again");
            }
        }
        Outcome::Retry { reason, .. } => {
            stats.send_failures.fetch_add(1, Ordering::Relaxed);
            match stats.outage.failed(fleet_core::unix_now()) {
                OutageNote::Started => {
                    tracing::warn!(%reason, "control plane unreachable; will retry");
                }
                OutageNote::Continues { failed_attempts } => tracing::warn!(
                    %reason,
                    failed_attempts,
                    "control plane still unreachable; will retry"
                ),
                _ => tracing::debug!(%reason, "control plane unreachable; will retry"),
            }
        }
        Outcome::Unauthorized { reason, clock_skew } => {
            stats.unauthorized.fetch_add(1, Ordering::Relaxed);
            let instance_id = &shared.config.instance_id;
            match clock_skew {
                Some(skew) => tracing::error!(
                    %reason, %instance_id, clock_skew_secs = skew,
                    "the control plane refused this agent's signature, and {}",
                    crate::sender::clock_skew_text(*skew)
                ),
                None => tracing::error!(
                    %reason, %instance_id,
                    "the control plane refused this agent's signature: check AGENT_SECRET and \
                     INSTANCE_ID (and AGENT_SIGNATURE_SCHEME for an older control plane)"
                ),
            }
        }
        Outcome::Rejected { reason } => {
            stats.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%reason, "the control plane refused a message for good; dropping it");
        }
    }
}

/// Delivers the outbox oldest first, one message at a time, so order holds; a message leaves
/// the outbox only after a 2xx.
async fn flush_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let Some(outbox) = shared.outbox.get() else {
        return;
    };
    let b = &shared.config.buffer;
    let mut backoff = Backoff::new(b.backoff_base, b.backoff_max);
    let mut not_before = tokio::time::Instant::now();
    let mut unauthorized = false;
    loop {
        if *stop.borrow() {
            return;
        }
        if tokio::time::Instant::now() < not_before {
            tokio::select! {
                _ = tokio::time::sleep_until(not_before) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            continue;
        }
        let message = match outbox.peek(fleet_core::unix_now()).await {
            Ok(Some(message)) => message,
            Ok(None) => {
                tokio::select! {
                    _ = shared.flush.notified() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                continue;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot read the outbox");
                not_before = tokio::time::Instant::now() + Duration::from_secs(5);
                continue;
            }
        };
        // Stopping mid-send is safe: the message stays and goes again with the same id,
        // which the control plane acknowledges without applying twice.
        let outcome = tokio::select! {
            outcome = shared.sender.send(&message.msg_id, &message.path, &message.body) => outcome,
            _ = stop.wait_for(|s| *s) => return,
        };
        let delay = match &outcome {
            Outcome::Delivered => {
                if let Err(err) = outbox.ack(message.seq).await {
                    tracing::error!(error = %err, "cannot remove a delivered message");
                }
                if unauthorized {
                    tracing::info!("the control plane accepts this agent again");
                }
                unauthorized = false;
                backoff.reset();
                record(&shared, &outcome);
                None
            }
            Outcome::Retry { after, .. } => {
                outbox.release(message.seq);
                record(&shared, &outcome);
                Some(after.unwrap_or_else(|| backoff.next_delay()))
            }
            Outcome::Unauthorized { .. } => {
                outbox.release(message.seq);
                // Logged once per episode, then retried only at the slowest pace: a wrong
                // secret does not fix itself, and hammering looks like an attack.
                if unauthorized {
                    shared.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
                } else {
                    record(&shared, &outcome);
                }
                unauthorized = true;
                Some(backoff.max())
            }
            Outcome::Rejected { .. } => {
                record(&shared, &outcome);
                if let Err(err) = outbox.discard(message.seq).await {
                    tracing::error!(error = %err, "cannot remove a refused message");
                }
                None
            }
        };
        if let Some(delay) = delay {
            not_before = tokio::time::Instant::now() + delay;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invalid_optional_field_is_left_out_not_the_heartbeat() {
        let mut hb = Heartbeat::new("acme-001");
        hb.cpu_usage_pct = Some(250.0);
        hb.version = Some("9".repeat(500));
        hb.memory_total_bytes = Some(42);
        let body = heartbeat_body(&hb);
        let decoded = Heartbeat::decode(&body, &Limits::default()).expect("valid after cleanup");
        assert_eq!(decoded.cpu_usage_pct, None);
        assert_eq!(decoded.version, None);
        assert_eq!(decoded.memory_total_bytes, Some(42));
        // A valid heartbeat goes out byte for byte as serialized.
        let good = Heartbeat::new("acme-001");
        assert_eq!(heartbeat_body(&good), good.to_vec());
    }

    #[test]
    fn a_check_name_the_heartbeat_cannot_carry_is_refused_at_build() {
        let config = AgentConfig::new(
            "acme-001",
            "http://127.0.0.1:9",
            fleet_core::Secret::new("s3cret").expect("secret"),
        );
        let built = Agent::builder(config)
            .without_builtins()
            .check(Passes("job queue"))
            .check(Passes("fine"))
            .check(Passes(""))
            .build();
        let Err(Error::Config(problems)) = built else {
            panic!("built with bad check names");
        };
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with("check name \"job queue\" "),
            "{problems:?}"
        );
    }

    #[test]
    fn an_invalid_list_element_is_left_out_not_the_list() {
        let check = |name: &str, error: Option<String>| CheckResult {
            name: name.into(),
            ok: error.is_none(),
            latency_ms: Some(1.0),
            error,
            extra: Default::default(),
        };
        let mut hb = Heartbeat::new("acme-001");
        hb.checks = vec![
            check("db", None),
            check("job queue", None),
            check("smtp", Some("x".repeat(10_000))),
            check("redis", Some("refused".into())),
        ];
        let decoded = Heartbeat::decode(&heartbeat_body(&hb), &Limits::default())
            .expect("valid after cleanup");
        let names: Vec<&str> = decoded.checks.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["db", "redis"]);
    }

    struct Passes(&'static str);

    #[async_trait::async_trait]
    impl Check for Passes {
        fn name(&self) -> &str {
            self.0
        }
        async fn probe(&self) -> std::result::Result<(), String> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_check_named_like_a_builtin_replaces_it() {
        let dir = std::env::temp_dir().join(format!("fleet-agent-own-db-{}", new_message_id()));
        let mut config = AgentConfig::new(
            "acme-001",
            "http://127.0.0.1:9",
            fleet_core::Secret::new("s3cret").expect("secret"),
        );
        config.state_path = dir.join("state.db");
        config.metrics_url = None;
        config.containers_interval = Duration::ZERO;
        // Without DATABASE_URL the built-in `db` check fails; the embedder's own one decides.
        let agent = Agent::builder(config)
            .check(Passes("db"))
            .build()
            .expect("agent");
        let hb = agent.heartbeat().await;
        let db: Vec<_> = hb.checks.iter().filter(|c| c.name == "db").collect();
        assert_eq!(db.len(), 1, "{:?}", hb.checks);
        assert!(db[0].ok, "{:?}", hb.checks);
        assert!(hb.db_ok);
        // Redis is still the built-in check, failing without REDIS_URL.
        assert!(!hb.redis_ok);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn skipped_service_checks_are_not_run_and_leave_the_instance_healthy() {
        let dir = std::env::temp_dir().join(format!("fleet-agent-skip-{}", new_message_id()));
        let mut config = AgentConfig::new(
            "edge-7",
            "http://127.0.0.1:9",
            fleet_core::Secret::new("s3cret").expect("secret"),
        );
        config.state_path = dir.join("state.db");
        config.metrics_url = None;
        config.events_stats_url = None;
        config.containers_interval = Duration::ZERO;
        let unconfigured = Agent::builder(config.clone())
            .build()
            .expect("agent")
            .heartbeat()
            .await;
        assert_eq!(unconfigured.health.as_deref(), Some("degraded"));
        assert!(!unconfigured.db_ok && !unconfigured.redis_ok);

        config.skip_checks = vec!["db".into(), "redis".into()];
        let hb = Agent::builder(config)
            .build()
            .expect("agent")
            .heartbeat()
            .await;
        let names: Vec<_> = hb.checks.iter().map(|c| c.name.as_str()).collect();
        assert!(
            !names.contains(&"db") && !names.contains(&"redis"),
            "{names:?}"
        );
        assert!(hb.db_ok && hb.redis_ok);
        assert_eq!(hb.extra[CHECKS_SKIPPED], serde_json::json!(["db", "redis"]));
        assert_eq!(hb.health.as_deref(), Some("ok"), "{:?}", hb.checks);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn message_ids_sort_in_creation_order() {
        let ids: Vec<String> = (0..200).map(|_| new_message_id()).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted);
        assert!(ids[0].len() <= fleet_core::signing::MAX_MSG_ID_LEN);
    }
}
