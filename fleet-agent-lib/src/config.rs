//! The agent's configuration: a plain struct, plus [`AgentConfig::from_env`] which reads the
//! ERP instance agent's variables (same names, same defaults) and the Neon agent's interval
//! and buffer settings.
//!
//! This is the only place in the library that looks at the environment, and even here the
//! environment is reached through a lookup function so tests never touch process state.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use fleet_core::{Scheme, Secret};

use crate::{Error, Result};

/// ERP default: heartbeats every 5 minutes.
pub const DEFAULT_HEARTBEAT_INTERVAL_MIN: u64 = 5;
/// Neon default: host metrics every 300 s.
pub const DEFAULT_METRICS_INTERVAL_SECS: u64 = 300;
/// Neon default: container inventory every 900 s.
pub const DEFAULT_CONTAINERS_INTERVAL_SECS: u64 = 900;
/// Neon default: 100 buffered messages.
pub const DEFAULT_BUFFER_MAX_SIZE: u64 = 100;
/// Default byte bound of the outbox.
pub const DEFAULT_BUFFER_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// Default age bound of the outbox: a week.
pub const DEFAULT_BUFFER_MAX_AGE_SECS: u64 = 7 * 24 * 3600;
/// ERP default local API port.
pub const DEFAULT_AGENT_PORT: u16 = 4010;
/// Where the Docker Engine API is when `DOCKER_HOST` is not set.
pub const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";
/// `DOCKER_HOST`'s default.
pub const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";
/// ERP default event statistics URL.
pub const DEFAULT_EVENTS_STATS_URL: &str = "http://api:3001/admin/events/stats";
/// ERP default metrics URL.
pub const DEFAULT_METRICS_URL: &str = "http://api:3001/metrics";

/// Everything the agent needs to run. Build it by hand or with [`AgentConfig::from_env`].
///
/// `Debug` hides the secret, the tokens and any password inside the service URLs.
#[derive(Clone)]
pub struct AgentConfig {
    /// `INSTANCE_ID`: who this agent speaks for.
    pub instance_id: String,
    /// `CONTROL_PLANE_URL`: base URL; heartbeats go to `{url}/api/heartbeats`.
    pub control_plane_url: String,
    /// `AGENT_SECRET`: signs every request.
    pub secret: Secret,
    /// `AGENT_SIGNATURE_SCHEME`: `v1` (Standard Webhooks, default) or `v0` (ERP hex HMAC).
    pub signature_scheme: Scheme,
    /// `HEARTBEAT_INTERVAL` (s) or else `HEARTBEAT_INTERVAL_MIN` (min, default 5).
    pub heartbeat_interval: Duration,
    /// `METRICS_INTERVAL` (s, default 300): how often host metrics are refreshed.
    pub metrics_interval: Duration,
    /// `CONTAINERS_INTERVAL` (s, default 900): how often the container list is refreshed;
    /// zero turns container inventory off.
    pub containers_interval: Duration,
    /// `INSTANCE_DOMAIN`.
    pub domain: Option<String>,
    /// `INSTANCE_CLIENT`.
    pub client: Option<String>,
    /// `INSTANCE_VERSION`.
    pub version: Option<String>,
    /// `RELEASE_CHANNEL`.
    pub release_channel: Option<String>,
    /// `PRIMARY_REGION`, sent as `primary_region` like the ERP agent does.
    pub primary_region: Option<String>,
    /// `IAM_SSO_ENABLED`, `IAM_MFA_ENFORCED`, `IAM_SCIM_ENABLED` (default false each).
    pub iam: IamFlags,
    /// `DATABASE_URL`: checked with `SELECT 1` when it is `postgres://`, else by TCP.
    pub database_url: Option<String>,
    /// `REDIS_URL`: checked with `PING`.
    pub redis_url: Option<String>,
    /// `STORAGE_ENDPOINT`, else `STORAGE_PUBLIC_URL`: checked with an HTTP request.
    pub storage_endpoint: Option<String>,
    /// `MEILI_HOST`: the search service, checked with an HTTP request.
    pub search_url: Option<String>,
    /// `AGENT_OPS_URL`: job failures and secret counts (JSON).
    pub ops_url: Option<String>,
    /// `AGENT_OPS_TOKEN`: Bearer token for the ops endpoint.
    pub ops_token: Option<String>,
    /// `BACKUP_META_PATH`: JSON file describing the last backup.
    pub backup_meta_path: Option<PathBuf>,
    /// `AGENT_EVENTS_STATS_URL` (default `http://api:3001/admin/events/stats`): event
    /// figures (`events_total_1h`, `events_failed_1h`, `events_avg_lag_ms`), read with the
    /// ops token and only when one is set, as the ERP agent does.
    pub events_stats_url: Option<String>,
    /// `STORAGE_DATA_PATH`: a directory whose total size is `storage_size_bytes`.
    pub storage_data_path: Option<PathBuf>,
    /// `REGIONAL_HEALTH_ENDPOINTS`: JSON `[{"region": .., "endpoint": ..}]`, probed into
    /// `regional_health[]` (with `PRIMARY_REGION` marking the primary).
    pub regional_endpoints: Vec<RegionalEndpoint>,
    /// `AGENT_METRICS_URL` (default `http://api:3001/metrics`; `off` for none): Prometheus
    /// text for the SLO figures.
    pub metrics_url: Option<String>,
    /// `AGENT_SYSTEM_ROOT_PATH` (default `/`): the filesystem whose usage is reported.
    pub system_root_path: PathBuf,
    /// `DOCKER_HOST` (default `unix:///var/run/docker.sock`): the Docker Engine API.
    pub docker_host: String,
    /// `AGENT_BIND` (default `127.0.0.1`): address of the local API.
    pub local_bind: IpAddr,
    /// `AGENT_PORT` (default 4010): port of the local API; 0 picks a free one.
    pub local_port: u16,
    /// `AGENT_LOCAL_TOKEN`: required in `x-agent-local-token` when set.
    pub local_token: Option<String>,
    /// `AGENT_STATE_PATH` (default `fleet-agent-state.db`): the SQLite outbox.
    pub state_path: PathBuf,
    /// Outbox and retry settings.
    pub buffer: BufferSettings,
    /// `UPDATE_*`: the update pipeline (run by the pipelines issue; parsed here).
    pub update: UpdateSettings,
    /// `PLUGIN_*`: the plugin pipeline (run by the pipelines issue; parsed here).
    pub plugin: PluginSettings,
    /// `CHECK_TIMEOUT_MS` (default 2000, the ERP agent's TCP timeout): limit per check.
    pub check_timeout: Duration,
}

/// One entry of `REGIONAL_HEALTH_ENDPOINTS`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct RegionalEndpoint {
    /// Region name (`sa-east-1`).
    pub region: String,
    /// URL probed with `GET`; a 2xx is healthy.
    pub endpoint: String,
}

/// The ERP agent's IAM flags, reported as `iam_*` heartbeat keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IamFlags {
    /// `IAM_SSO_ENABLED`.
    pub sso_enabled: bool,
    /// `IAM_MFA_ENFORCED`.
    pub mfa_enforced: bool,
    /// `IAM_SCIM_ENABLED`.
    pub scim_enabled: bool,
}

/// How unsent messages are kept and retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BufferSettings {
    /// `BUFFER_ENABLED` (default true): keep unsent messages in the outbox. When false a
    /// message that still fails after its retries is dropped (and counted).
    pub enabled: bool,
    /// `BUFFER_MAX_SIZE` (default 100): most messages kept.
    pub max_messages: u64,
    /// `BUFFER_MAX_BYTES` (default 16 MiB): most body bytes kept.
    pub max_bytes: u64,
    /// `BUFFER_MAX_AGE` (s, default 604800): older messages are dropped.
    pub max_age: Duration,
    /// `SEND_RETRIES` (default 3): immediate retries of one send before it waits in the
    /// outbox.
    pub send_retries: u32,
    /// `SEND_BACKOFF_BASE_MS` (default 1000): first retry delay; doubles each time.
    pub backoff_base: Duration,
    /// `SEND_BACKOFF_MAX` (s, default 300): longest wait between attempts.
    pub backoff_max: Duration,
    /// `SEND_TIMEOUT_MS` (default 10000): limit for one HTTP request to the control plane.
    pub send_timeout: Duration,
}

impl Default for BufferSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            max_messages: DEFAULT_BUFFER_MAX_SIZE,
            max_bytes: DEFAULT_BUFFER_MAX_BYTES,
            max_age: Duration::from_secs(DEFAULT_BUFFER_MAX_AGE_SECS),
            send_retries: 3,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            send_timeout: Duration::from_secs(10),
        }
    }
}

/// The ERP agent's `UPDATE_*` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateSettings {
    /// `UPDATE_ENABLED` (default true).
    pub enabled: bool,
    /// `UPDATE_POLL_MIN` (default 10).
    pub poll_interval: Duration,
    /// `UPDATE_STEP_TIMEOUT_SEC` (default 900).
    pub step_timeout: Duration,
    /// `UPDATE_WORKDIR` (default: the current directory).
    pub workdir: Option<PathBuf>,
    /// `UPDATE_BACKUP_CMD`.
    pub backup_cmd: Option<String>,
    /// `UPDATE_PULL_CMD`.
    pub pull_cmd: Option<String>,
    /// `UPDATE_MIGRATE_CMD`.
    pub migrate_cmd: Option<String>,
    /// `UPDATE_SMOKE_CMD`.
    pub smoke_cmd: Option<String>,
    /// `UPDATE_SWITCH_CMD`.
    pub switch_cmd: Option<String>,
    /// `UPDATE_HEALTHCHECK_URL`.
    pub healthcheck_url: Option<String>,
    /// `UPDATE_ROLLBACK_CMD`.
    pub rollback_cmd: Option<String>,
}

/// The ERP agent's `PLUGIN_*` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginSettings {
    /// `PLUGIN_UPDATE_ENABLED` (default true).
    pub enabled: bool,
    /// `PLUGIN_POLL_MIN` (default 10).
    pub poll_interval: Duration,
    /// `PLUGIN_STEP_TIMEOUT_SEC` (default 600).
    pub step_timeout: Duration,
    /// `PLUGIN_WORKDIR` (default: the current directory).
    pub workdir: Option<PathBuf>,
    /// `PLUGIN_INSTALL_CMD`.
    pub install_cmd: Option<String>,
    /// `PLUGIN_UPDATE_CMD`.
    pub update_cmd: Option<String>,
    /// `PLUGIN_REMOVE_CMD`.
    pub remove_cmd: Option<String>,
    /// `PLUGIN_SMOKE_CMD`.
    pub smoke_cmd: Option<String>,
}

impl AgentConfig {
    /// A configuration with the three required values and every default.
    pub fn new(
        instance_id: impl Into<String>,
        control_plane_url: impl Into<String>,
        secret: Secret,
    ) -> Self {
        Self {
            instance_id: instance_id.into(),
            control_plane_url: control_plane_url.into(),
            secret,
            signature_scheme: Scheme::V1,
            heartbeat_interval: Duration::from_secs(DEFAULT_HEARTBEAT_INTERVAL_MIN * 60),
            metrics_interval: Duration::from_secs(DEFAULT_METRICS_INTERVAL_SECS),
            containers_interval: Duration::from_secs(DEFAULT_CONTAINERS_INTERVAL_SECS),
            domain: None,
            client: None,
            version: None,
            release_channel: None,
            primary_region: None,
            iam: IamFlags::default(),
            database_url: None,
            redis_url: None,
            storage_endpoint: None,
            search_url: None,
            ops_url: None,
            ops_token: None,
            backup_meta_path: None,
            events_stats_url: Some(DEFAULT_EVENTS_STATS_URL.to_owned()),
            storage_data_path: None,
            regional_endpoints: Vec::new(),
            metrics_url: Some(DEFAULT_METRICS_URL.to_owned()),
            system_root_path: PathBuf::from("/"),
            docker_host: DEFAULT_DOCKER_HOST.to_owned(),
            local_bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            local_port: DEFAULT_AGENT_PORT,
            local_token: None,
            state_path: PathBuf::from("fleet-agent-state.db"),
            buffer: BufferSettings::default(),
            update: UpdateSettings {
                enabled: true,
                poll_interval: Duration::from_secs(600),
                step_timeout: Duration::from_secs(900),
                workdir: None,
                backup_cmd: None,
                pull_cmd: None,
                migrate_cmd: None,
                smoke_cmd: None,
                switch_cmd: None,
                healthcheck_url: None,
                rollback_cmd: None,
            },
            plugin: PluginSettings {
                enabled: true,
                poll_interval: Duration::from_secs(600),
                step_timeout: Duration::from_secs(600),
                workdir: None,
                install_cmd: None,
                update_cmd: None,
                remove_cmd: None,
                smoke_cmd: None,
            },
            check_timeout: Duration::from_secs(2),
        }
    }

    /// Reads the process environment. See the crate README for every variable.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads variables through `lookup`; every missing or invalid one is named in one
    /// [`Error::Config`]. Empty values count as unset, as in the ERP agent's `?? ""` checks.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let mut env = Env {
            lookup: &lookup,
            problems: Vec::new(),
        };
        let instance_id = env.required("INSTANCE_ID");
        let control_plane_url = env.required("CONTROL_PLANE_URL");
        if let Some(url) = &control_plane_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            env.problem("CONTROL_PLANE_URL must start with http:// or https://");
        }
        let secret = env.required("AGENT_SECRET").and_then(|text| {
            Secret::new(&text)
                .map_err(|err| env.problem(format!("AGENT_SECRET: {}", err.0)))
                .ok()
        });

        let mut config = Self::new(
            instance_id.clone().unwrap_or_default(),
            control_plane_url
                .clone()
                .unwrap_or_default()
                .trim_end_matches('/'),
            // A placeholder only reached when there are problems, so never returned.
            secret.clone().unwrap_or_else(|| Secret::from_bytes(b"-")),
        );

        config.signature_scheme = match env.get("AGENT_SIGNATURE_SCHEME").as_deref() {
            None | Some("v1") => Scheme::V1,
            Some("v0") => Scheme::V0,
            Some(other) => {
                env.problem(format!(
                    "AGENT_SIGNATURE_SCHEME must be v1 or v0, not {other:?}"
                ));
                Scheme::V1
            }
        };
        // Neon's seconds take precedence over the ERP's minutes when both are set.
        // Both accept fractions, as the ERP agent's `Number(...)` does ("0.5" minutes).
        let minutes = env.fraction(
            "HEARTBEAT_INTERVAL_MIN",
            DEFAULT_HEARTBEAT_INTERVAL_MIN as f64,
        );
        config.heartbeat_interval = match env.get("HEARTBEAT_INTERVAL") {
            Some(_) => Duration::from_secs_f64(env.fraction("HEARTBEAT_INTERVAL", 0.0)),
            None => Duration::from_secs_f64(minutes * 60.0),
        };
        if config.heartbeat_interval.is_zero() {
            env.problem("the heartbeat interval must be above zero");
        }
        config.metrics_interval =
            Duration::from_secs(env.number("METRICS_INTERVAL", DEFAULT_METRICS_INTERVAL_SECS));
        config.containers_interval = Duration::from_secs(
            env.number("CONTAINERS_INTERVAL", DEFAULT_CONTAINERS_INTERVAL_SECS),
        );

        config.domain = env.get("INSTANCE_DOMAIN");
        config.client = env.get("INSTANCE_CLIENT");
        config.version = env.get("INSTANCE_VERSION");
        config.release_channel = env.get("RELEASE_CHANNEL");
        config.primary_region = env.get("PRIMARY_REGION");
        config.iam = IamFlags {
            sso_enabled: env.flag("IAM_SSO_ENABLED", false),
            mfa_enforced: env.flag("IAM_MFA_ENFORCED", false),
            scim_enabled: env.flag("IAM_SCIM_ENABLED", false),
        };
        config.database_url = env.get("DATABASE_URL");
        config.redis_url = env.get("REDIS_URL");
        config.storage_endpoint = env
            .get("STORAGE_ENDPOINT")
            .or_else(|| env.get("STORAGE_PUBLIC_URL"));
        config.search_url = env.get("MEILI_HOST");
        config.ops_url = env.get("AGENT_OPS_URL");
        config.ops_token = env.get("AGENT_OPS_TOKEN");
        config.backup_meta_path = env.get("BACKUP_META_PATH").map(PathBuf::from);
        match env.get("AGENT_EVENTS_STATS_URL") {
            Some(url) if url.eq_ignore_ascii_case("off") => config.events_stats_url = None,
            Some(url) => config.events_stats_url = Some(url),
            None => {}
        }
        config.storage_data_path = env.get("STORAGE_DATA_PATH").map(PathBuf::from);
        if let Some(text) = env.get("REGIONAL_HEALTH_ENDPOINTS") {
            // The ERP agent ignores a malformed list silently; saying so is kinder.
            match serde_json::from_str::<Vec<RegionalEndpoint>>(&text) {
                Ok(list) => {
                    config.regional_endpoints = list
                        .into_iter()
                        .filter(|e| !e.region.trim().is_empty() && !e.endpoint.trim().is_empty())
                        .collect();
                }
                Err(err) => env.problem(format!(
                    "REGIONAL_HEALTH_ENDPOINTS must be a JSON list of {{\"region\", \"endpoint\"}}: {err}"
                )),
            }
        }
        // `off` turns the SLO figures off; an empty value keeps the ERP default.
        match env.get("AGENT_METRICS_URL") {
            Some(url) if url.eq_ignore_ascii_case("off") => config.metrics_url = None,
            Some(url) => config.metrics_url = Some(url),
            None => {}
        }
        if let Some(path) = env.get("AGENT_SYSTEM_ROOT_PATH") {
            config.system_root_path = PathBuf::from(path);
        }
        if let Some(host) = env.get("DOCKER_HOST") {
            if !(host.starts_with("unix://")
                || host.starts_with("tcp://")
                || host.starts_with("http://"))
            {
                env.problem(format!(
                    "DOCKER_HOST must be unix://, tcp:// or http://, not {host:?}"
                ));
            }
            config.docker_host = host;
        }

        if let Some(bind) = env.get("AGENT_BIND") {
            match bind.parse::<IpAddr>() {
                Ok(ip) => config.local_bind = ip,
                Err(_) => env.problem(format!("AGENT_BIND is not an IP address: {bind:?}")),
            }
        }
        let port = env.number("AGENT_PORT", u64::from(DEFAULT_AGENT_PORT));
        config.local_port = u16::try_from(port).unwrap_or_else(|_| {
            env.problem("AGENT_PORT must be at most 65535");
            DEFAULT_AGENT_PORT
        });
        config.local_token = env.get("AGENT_LOCAL_TOKEN");
        if !config.local_bind.is_loopback() && config.local_token.is_none() {
            env.problem(format!(
                "AGENT_BIND {} is not a loopback address, so AGENT_LOCAL_TOKEN must be set",
                config.local_bind
            ));
        }
        if let Some(path) = env.get("AGENT_STATE_PATH") {
            config.state_path = PathBuf::from(path);
        }
        config.check_timeout = Duration::from_millis(env.number("CHECK_TIMEOUT_MS", 2000));

        let b = &mut config.buffer;
        b.enabled = env.flag("BUFFER_ENABLED", true);
        b.max_messages = env.number("BUFFER_MAX_SIZE", DEFAULT_BUFFER_MAX_SIZE);
        b.max_bytes = env.number("BUFFER_MAX_BYTES", DEFAULT_BUFFER_MAX_BYTES);
        b.max_age = Duration::from_secs(env.number("BUFFER_MAX_AGE", DEFAULT_BUFFER_MAX_AGE_SECS));
        b.send_retries = u32::try_from(env.number("SEND_RETRIES", 3)).unwrap_or(u32::MAX);
        b.backoff_base = Duration::from_millis(env.number("SEND_BACKOFF_BASE_MS", 1000));
        b.backoff_max = Duration::from_secs(env.number("SEND_BACKOFF_MAX", 300));
        b.send_timeout = Duration::from_millis(env.number("SEND_TIMEOUT_MS", 10_000));
        if b.max_messages == 0 {
            env.problem("BUFFER_MAX_SIZE must be above zero");
        }

        let u = &mut config.update;
        u.enabled = env.flag("UPDATE_ENABLED", true);
        u.poll_interval = Duration::from_secs(env.number("UPDATE_POLL_MIN", 10) * 60);
        u.step_timeout = Duration::from_secs(env.number("UPDATE_STEP_TIMEOUT_SEC", 900));
        u.workdir = env.get("UPDATE_WORKDIR").map(PathBuf::from);
        u.backup_cmd = env.get("UPDATE_BACKUP_CMD");
        u.pull_cmd = env.get("UPDATE_PULL_CMD");
        u.migrate_cmd = env.get("UPDATE_MIGRATE_CMD");
        u.smoke_cmd = env.get("UPDATE_SMOKE_CMD");
        u.switch_cmd = env.get("UPDATE_SWITCH_CMD");
        u.healthcheck_url = env.get("UPDATE_HEALTHCHECK_URL");
        u.rollback_cmd = env.get("UPDATE_ROLLBACK_CMD");

        let p = &mut config.plugin;
        p.enabled = env.flag("PLUGIN_UPDATE_ENABLED", true);
        p.poll_interval = Duration::from_secs(env.number("PLUGIN_POLL_MIN", 10) * 60);
        p.step_timeout = Duration::from_secs(env.number("PLUGIN_STEP_TIMEOUT_SEC", 600));
        p.workdir = env.get("PLUGIN_WORKDIR").map(PathBuf::from);
        p.install_cmd = env.get("PLUGIN_INSTALL_CMD");
        p.update_cmd = env.get("PLUGIN_UPDATE_CMD");
        p.remove_cmd = env.get("PLUGIN_REMOVE_CMD");
        p.smoke_cmd = env.get("PLUGIN_SMOKE_CMD");

        if env.problems.is_empty() {
            Ok(config)
        } else {
            Err(Error::Config(env.problems))
        }
    }

    /// `{control_plane_url}/api/heartbeats`.
    pub fn heartbeat_url(&self) -> String {
        format!(
            "{}/api/heartbeats",
            self.control_plane_url.trim_end_matches('/')
        )
    }
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let url = |u: &Option<String>| u.as_deref().map(redact_url_password);
        let token = |t: &Option<String>| t.as_ref().map(|_| "[redacted]");
        f.debug_struct("AgentConfig")
            .field("instance_id", &self.instance_id)
            .field(
                "control_plane_url",
                &redact_url_password(&self.control_plane_url),
            )
            .field("secret", &self.secret)
            .field("signature_scheme", &self.signature_scheme)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("metrics_interval", &self.metrics_interval)
            .field("containers_interval", &self.containers_interval)
            .field("domain", &self.domain)
            .field("client", &self.client)
            .field("version", &self.version)
            .field("release_channel", &self.release_channel)
            .field("primary_region", &self.primary_region)
            .field("iam", &self.iam)
            .field("database_url", &url(&self.database_url))
            .field("redis_url", &url(&self.redis_url))
            .field("storage_endpoint", &url(&self.storage_endpoint))
            .field("search_url", &url(&self.search_url))
            .field("ops_url", &url(&self.ops_url))
            .field("ops_token", &token(&self.ops_token))
            .field("backup_meta_path", &self.backup_meta_path)
            .field("events_stats_url", &url(&self.events_stats_url))
            .field("storage_data_path", &self.storage_data_path)
            .field("regional_endpoints", &self.regional_endpoints)
            .field("metrics_url", &url(&self.metrics_url))
            .field("system_root_path", &self.system_root_path)
            .field("docker_host", &self.docker_host)
            .field("local_bind", &self.local_bind)
            .field("local_port", &self.local_port)
            .field("local_token", &token(&self.local_token))
            .field("state_path", &self.state_path)
            .field("buffer", &self.buffer)
            .field("update", &self.update)
            .field("plugin", &self.plugin)
            .field("check_timeout", &self.check_timeout)
            .finish()
    }
}

/// `scheme://user:[redacted]@host/...` for a URL with a password; other text unchanged.
pub fn redact_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split_once(':').map_or("", |(u, _)| u);
            format!("{scheme}://{user}:[redacted]@{host}{tail}")
        }
        _ => url.to_owned(),
    }
}

/// Reads variables and collects every problem instead of stopping at the first.
struct Env<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
    problems: Vec<String>,
}

impl Env<'_> {
    fn get(&self, name: &str) -> Option<String> {
        (self.lookup)(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    fn problem(&mut self, text: impl Into<String>) {
        self.problems.push(text.into());
    }

    fn required(&mut self, name: &str) -> Option<String> {
        let value = self.get(name);
        if value.is_none() {
            self.problem(format!("{name} is required"));
        }
        value
    }

    fn number(&mut self, name: &str, default: u64) -> u64 {
        match self.get(name) {
            None => default,
            Some(text) => text.parse().unwrap_or_else(|_| {
                self.problem(format!(
                    "{name} must be a whole non-negative number, not {text:?}"
                ));
                default
            }),
        }
    }

    /// A non-negative number that may have a fraction, at most a year.
    fn fraction(&mut self, name: &str, default: f64) -> f64 {
        match self.get(name) {
            None => default,
            Some(text) => match text.parse::<f64>() {
                Ok(v) if v.is_finite() && (0.0..=31_536_000.0).contains(&v) => v,
                _ => {
                    self.problem(format!(
                        "{name} must be a non-negative number, not {text:?}"
                    ));
                    default
                }
            },
        }
    }

    fn flag(&mut self, name: &str, default: bool) -> bool {
        match self.get(name).map(|v| v.to_ascii_lowercase()).as_deref() {
            None => default,
            Some("true" | "1" | "yes" | "on") => true,
            Some("false" | "0" | "no" | "off") => false,
            Some(other) => {
                self.problem(format!("{name} must be true or false, not {other:?}"));
                default
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn load(pairs: &[(&str, &str)]) -> Result<AgentConfig> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        AgentConfig::from_lookup(|name| map.get(name).cloned())
    }

    const BASE: [(&str, &str); 3] = [
        ("INSTANCE_ID", "acme-001"),
        ("CONTROL_PLANE_URL", "https://cp.example/"),
        ("AGENT_SECRET", "s3cret"),
    ];

    fn problems(pairs: &[(&str, &str)]) -> Vec<String> {
        match load(pairs) {
            Err(Error::Config(p)) => p,
            other => panic!("expected config error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_match_the_erp_and_neon_agents() {
        let c = load(&BASE).unwrap();
        assert_eq!(c.heartbeat_interval, Duration::from_secs(300));
        assert_eq!(c.metrics_interval, Duration::from_secs(300));
        assert_eq!(c.containers_interval, Duration::from_secs(900));
        assert_eq!(c.local_port, 4010);
        assert!(c.local_bind.is_loopback());
        assert_eq!(c.metrics_url.as_deref(), Some("http://api:3001/metrics"));
        assert_eq!(c.signature_scheme, Scheme::V1);
        assert_eq!(c.buffer.max_messages, 100);
        assert!(c.buffer.enabled);
        assert_eq!(c.update.poll_interval, Duration::from_secs(600));
        assert_eq!(c.update.step_timeout, Duration::from_secs(900));
        assert_eq!(c.plugin.step_timeout, Duration::from_secs(600));
        assert_eq!(c.heartbeat_url(), "https://cp.example/api/heartbeats");
    }

    #[test]
    fn heartbeat_interval_seconds_beat_minutes() {
        let mut pairs = BASE.to_vec();
        pairs.push(("HEARTBEAT_INTERVAL_MIN", "2"));
        assert_eq!(
            load(&pairs).unwrap().heartbeat_interval,
            Duration::from_secs(120)
        );
        pairs.push(("HEARTBEAT_INTERVAL", "7"));
        assert_eq!(
            load(&pairs).unwrap().heartbeat_interval,
            Duration::from_secs(7)
        );
        let mut pairs = BASE.to_vec();
        pairs.push(("HEARTBEAT_INTERVAL_MIN", "0.5"));
        assert_eq!(
            load(&pairs).unwrap().heartbeat_interval,
            Duration::from_secs(30)
        );
    }

    #[test]
    fn update_and_plugin_settings_are_read() {
        let mut pairs = BASE.to_vec();
        pairs.extend([
            ("UPDATE_ENABLED", "false"),
            ("UPDATE_POLL_MIN", "3"),
            ("UPDATE_STEP_TIMEOUT_SEC", "60"),
            ("UPDATE_WORKDIR", "/srv/app"),
            ("UPDATE_BACKUP_CMD", "backup.sh"),
            ("UPDATE_PULL_CMD", "pull.sh"),
            ("UPDATE_MIGRATE_CMD", "migrate.sh"),
            ("UPDATE_SMOKE_CMD", "smoke.sh"),
            ("UPDATE_SWITCH_CMD", "switch.sh"),
            ("UPDATE_HEALTHCHECK_URL", "http://127.0.0.1:3001/health"),
            ("UPDATE_ROLLBACK_CMD", "rollback.sh"),
            ("PLUGIN_UPDATE_ENABLED", "0"),
            ("PLUGIN_POLL_MIN", "1"),
            ("PLUGIN_STEP_TIMEOUT_SEC", "30"),
            ("PLUGIN_INSTALL_CMD", "install.sh"),
            ("PLUGIN_UPDATE_CMD", "update.sh"),
            ("PLUGIN_REMOVE_CMD", "remove.sh"),
            ("PLUGIN_SMOKE_CMD", "psmoke.sh"),
        ]);
        let c = load(&pairs).unwrap();
        assert!(!c.update.enabled && !c.plugin.enabled);
        assert_eq!(c.update.poll_interval, Duration::from_secs(180));
        assert_eq!(c.update.step_timeout, Duration::from_secs(60));
        assert_eq!(
            c.update.workdir.as_deref(),
            Some(std::path::Path::new("/srv/app"))
        );
        assert_eq!(c.update.rollback_cmd.as_deref(), Some("rollback.sh"));
        assert_eq!(
            c.update.healthcheck_url.as_deref(),
            Some("http://127.0.0.1:3001/health")
        );
        assert_eq!(c.plugin.poll_interval, Duration::from_secs(60));
        assert_eq!(c.plugin.smoke_cmd.as_deref(), Some("psmoke.sh"));
        assert_eq!(c.plugin.remove_cmd.as_deref(), Some("remove.sh"));
    }

    #[test]
    fn erp_extras_are_read() {
        let mut pairs = BASE.to_vec();
        pairs.push((
            "REGIONAL_HEALTH_ENDPOINTS",
            r#"[{"region":"sa-east-1","endpoint":"http://a/health"},{"region":"","endpoint":"x"}]"#,
        ));
        pairs.push(("STORAGE_DATA_PATH", "/srv/storage"));
        pairs.push(("AGENT_EVENTS_STATS_URL", "off"));
        let c = load(&pairs).unwrap();
        assert_eq!(c.regional_endpoints.len(), 1);
        assert_eq!(c.regional_endpoints[0].region, "sa-east-1");
        assert_eq!(
            c.storage_data_path.as_deref(),
            Some(std::path::Path::new("/srv/storage"))
        );
        assert_eq!(c.events_stats_url, None);
        assert_eq!(
            load(&BASE).unwrap().events_stats_url.as_deref(),
            Some("http://api:3001/admin/events/stats")
        );
        let mut bad = BASE.to_vec();
        bad.push(("REGIONAL_HEALTH_ENDPOINTS", "sa-east-1=http://a"));
        assert!(problems(&bad)[0].starts_with("REGIONAL_HEALTH_ENDPOINTS"));
    }

    #[test]
    fn metrics_url_can_be_turned_off() {
        let mut pairs = BASE.to_vec();
        pairs.push(("AGENT_METRICS_URL", "off"));
        assert_eq!(load(&pairs).unwrap().metrics_url, None);
    }

    #[test]
    fn storage_endpoint_falls_back_to_public_url() {
        let mut pairs = BASE.to_vec();
        pairs.push(("STORAGE_PUBLIC_URL", "http://public:9000"));
        assert_eq!(
            load(&pairs).unwrap().storage_endpoint.as_deref(),
            Some("http://public:9000")
        );
        pairs.push(("STORAGE_ENDPOINT", "http://minio:9000"));
        assert_eq!(
            load(&pairs).unwrap().storage_endpoint.as_deref(),
            Some("http://minio:9000")
        );
    }

    #[test]
    fn every_problem_is_named_at_once() {
        let got = problems(&[
            ("HEARTBEAT_INTERVAL_MIN", "five"),
            ("AGENT_PORT", "70000"),
            ("BUFFER_ENABLED", "maybe"),
            ("AGENT_SIGNATURE_SCHEME", "v2"),
        ]);
        let joined = got.join("\n");
        for needle in [
            "INSTANCE_ID is required",
            "CONTROL_PLANE_URL is required",
            "AGENT_SECRET is required",
            "HEARTBEAT_INTERVAL_MIN",
            "AGENT_PORT",
            "BUFFER_ENABLED",
            "AGENT_SIGNATURE_SCHEME",
        ] {
            assert!(joined.contains(needle), "{needle} missing from {joined}");
        }
    }

    #[test]
    fn non_loopback_bind_needs_a_token() {
        let mut pairs = BASE.to_vec();
        pairs.push(("AGENT_BIND", "0.0.0.0"));
        assert!(problems(&pairs)[0].contains("AGENT_LOCAL_TOKEN"));
        pairs.push(("AGENT_LOCAL_TOKEN", "t"));
        assert!(load(&pairs).is_ok());
    }

    #[test]
    fn errors_never_print_the_secret() {
        let mut pairs = BASE.to_vec();
        pairs.push(("AGENT_SECRET", "whsec_%%%"));
        pairs.push(("AGENT_SECRET", "whsec_%%%"));
        let map: HashMap<&str, &str> = pairs.iter().copied().collect();
        let err = AgentConfig::from_lookup(|n| map.get(n).map(|v| v.to_string()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("AGENT_SECRET"));
        assert!(!err.contains("%%%"));
        let mut pairs = BASE.to_vec();
        pairs.push(("DATABASE_URL", "postgres://app:pg-pass@db:5432/app"));
        pairs.push(("AGENT_OPS_TOKEN", "ops-tok"));
        pairs.push(("AGENT_LOCAL_TOKEN", "local-tok"));
        let debug = format!("{:?}", load(&pairs).unwrap());
        for secret in ["s3cret", "pg-pass", "ops-tok", "local-tok"] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }
        assert!(debug.contains("postgres://app:[redacted]@db:5432/app"));
    }
}
