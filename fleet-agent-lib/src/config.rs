//! The agent's configuration: a plain struct with the ERP and Neon agents' defaults.
//! [`AgentConfig::from_env`] (in [`crate::env`]) fills it from the environment.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use fleet_core::{Scheme, Secret};

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
/// How often a running restore verification asks whether it was cancelled, in seconds.
pub const DEFAULT_RESTORE_CANCEL_CHECK_SECS: u64 = 15;
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

/// The built-in checks `AGENT_SKIP_CHECKS` may name: the services every ERP instance has.
pub const SKIPPABLE_CHECKS: [&str; 2] = ["db", "redis"];

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
    /// `AGENT_SKIP_CHECKS`: built-in service checks not run at all, among
    /// [`SKIPPABLE_CHECKS`] (default none). Without `DATABASE_URL` or `REDIS_URL` the `db` or
    /// `redis` check fails and the instance reports `degraded`, as the ERP agent does; an edge
    /// node without that service skips its check instead, and its `db_ok` or `redis_ok` is
    /// then reported true, as `storage_ok` is for storage that is not configured.
    pub skip_checks: Vec<String>,
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
    /// `AGENT_STATE_PATH` (default `fleet-agent-state.db`): the SQLite file of the outbox and
    /// the pipelines' job state; the command journal is kept beside it (`state.db` →
    /// `state.commands.db`).
    pub state_path: PathBuf,
    /// Outbox and retry settings.
    pub buffer: BufferSettings,
    /// `UPDATE_*`: the update pipeline.
    pub update: UpdateSettings,
    /// `PLUGIN_*`: the plugin pipeline.
    pub plugin: PluginSettings,
    /// `RESTORE_*`: the restore verification runner.
    pub restore: RestoreSettings,
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
    /// `SEND_RETRIES` (default 3): retries of one heartbeat when buffering is off, before it
    /// is dropped. With the outbox a message is retried until it is delivered or a bound
    /// drops it.
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
    /// `UPDATE_MANIFEST_PUBLIC_KEYS`: comma-separated base64 Ed25519 keys; a job whose
    /// manifest does not verify against one of them is refused. None pinned: every job is.
    pub manifest_public_keys: Vec<fleet_core::manifest::PublicKey>,
    /// `UPDATE_GREEN_UP_CMD` (BLUE_GREEN_CANARY): start the new version beside the old.
    pub green_up_cmd: Option<String>,
    /// `UPDATE_MIGRATE_SAFE_CMD` (BLUE_GREEN_CANARY): migrations both versions tolerate.
    pub migrate_safe_cmd: Option<String>,
    /// `UPDATE_PROXY_SHIFT_CMD` (BLUE_GREEN_CANARY): run once per canary step with
    /// `UPDATE_CANARY_PERCENT` set.
    pub proxy_shift_cmd: Option<String>,
    /// `UPDATE_SWITCH_GREEN_CMD` (BLUE_GREEN_CANARY): make the new version the only one.
    pub switch_green_cmd: Option<String>,
}

/// Restore verification settings (`RESTORE_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreSettings {
    /// `RESTORE_VERIFY_ENABLED` (default true; nothing runs without a verify command).
    pub enabled: bool,
    /// `RESTORE_POLL_SEC`, else `RESTORE_POLL_MIN` (default 10 min).
    pub poll_interval: Duration,
    /// `RESTORE_VERIFY_TIMEOUT_SEC` (default 3600).
    pub timeout: Duration,
    /// `RESTORE_WORKDIR` (default: the current directory).
    pub workdir: Option<PathBuf>,
    /// `RESTORE_VERIFY_CMD`: restores the backup and checks it; exit 0 means verified.
    /// Runs with `RESTORE_ID`, `RESTORE_ENVIRONMENT` and `RESTORE_BACKUP_ID` set.
    pub verify_cmd: Option<String>,
    /// `RESTORE_CANCEL_CHECK_SEC` (default 15, at least 1): how often the runner asks the
    /// control plane whether the verification it runs still stands; once it ended there
    /// (an operator cancelled it, it timed out) the verify command is stopped.
    pub cancel_check: Duration,
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
    /// `PLUGIN_ROLLBACK_CMD`: run when the action's command or the smoke step fails (unset:
    /// no rollback).
    pub rollback_cmd: Option<String>,
}

impl AgentConfig {
    /// Whether `AGENT_SKIP_CHECKS` leaves out the built-in check `name`.
    pub fn skips_check(&self, name: &str) -> bool {
        self.skip_checks.iter().any(|skipped| skipped == name)
    }

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
            skip_checks: Vec::new(),
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
                manifest_public_keys: Vec::new(),
                green_up_cmd: None,
                migrate_safe_cmd: None,
                proxy_shift_cmd: None,
                switch_green_cmd: None,
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
                rollback_cmd: None,
            },
            restore: RestoreSettings {
                enabled: true,
                poll_interval: Duration::from_secs(600),
                timeout: Duration::from_secs(3600),
                workdir: None,
                verify_cmd: None,
                cancel_check: Duration::from_secs(DEFAULT_RESTORE_CANCEL_CHECK_SECS),
            },
            check_timeout: Duration::from_secs(2),
        }
    }

    /// `{control_plane_url}/api/heartbeats`.
    pub fn heartbeat_url(&self) -> String {
        format!(
            "{}/api/heartbeats",
            self.control_plane_url.trim_end_matches('/')
        )
    }

    /// Whether [`control_plane_url`](Self::control_plane_url) is plain `http://` to a host
    /// other than this machine (`localhost`, a loopback address): then enrollment receives
    /// the agent's secret and the live channel sends its bearer token unencrypted across the
    /// network. Still allowed (ERP setups on private networks use it); the agent warns at
    /// start.
    pub fn control_plane_in_clear(&self) -> bool {
        let url = self.control_plane_url.trim();
        let is_http = url
            .get(..7)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("http://"));
        if !is_http {
            return false;
        }
        let host = crate::checks::Target::parse(url, 80).host;
        let loopback = host.eq_ignore_ascii_case("localhost")
            || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
        !loopback
    }
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let url = |u: &Option<String>| u.as_deref().map(fleet_core::redact_url_password);
        let token = |t: &Option<String>| t.as_ref().map(|_| "[redacted]");
        f.debug_struct("AgentConfig")
            .field("instance_id", &self.instance_id)
            .field(
                "control_plane_url",
                &fleet_core::redact_url_password(&self.control_plane_url),
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
            .field("skip_checks", &self.skip_checks)
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
            .field("restore", &self.restore)
            .field("check_timeout", &self.check_timeout)
            .finish()
    }
}

/// Kept where embedders found it; the function lives in fleet-core.
pub use fleet_core::redact_url_password;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_is_in_clear_unless_it_stays_on_this_machine() {
        let in_clear = |url: &str| {
            AgentConfig::new("i", url, Secret::from_bytes(b"s")).control_plane_in_clear()
        };
        for url in [
            "http://cp.example.com",
            "http://10.0.0.5:8080/",
            "HTTP://cp.internal",
            "http://user:pw@cp.example.com",
            "http://localhost.example.com",
            "http://[2001:db8::1]:8080",
        ] {
            assert!(in_clear(url), "{url}");
        }
        for url in [
            "https://cp.example.com",
            "http://127.0.0.1:8080",
            "http://127.0.0.2",
            "http://localhost:3000/",
            "http://[::1]:8080",
        ] {
            assert!(!in_clear(url), "{url}");
        }
    }
}
