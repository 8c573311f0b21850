//! Configuration from flags and the ERP control plane's environment variables, checked all
//! at once so an operator fixes every problem in one go.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use fleet_core::manifest::{ManifestVerifier, PublicKey};
use fleet_core::{Secret, SecretResolver};
use fleet_server::{
    ControlPlane, ControlPlaneBuilder, IpNet, PostgresStore, ProxyHeader, RoleTokens, Settings,
    SloThresholds, WebhookConfig,
};

/// Every setting is read as text and validated afterwards, so all problems are reported
/// together instead of stopping at the first.
#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "FLEET_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// `sqlite://path/fleet.db` (the default, created if missing) or `postgres://user:pw@host/db`.
    #[arg(
        long,
        env = "CONTROL_PLANE_DATABASE_URL",
        default_value = "sqlite://fleet.db"
    )]
    pub database_url: String,
    /// PostgreSQL: heartbeat batches recorded at the same time (1 to 12). One makes the
    /// largest batches, the least work per heartbeat for the database; more keep it busy
    /// while a batch crosses the network. SQLite has one writer whatever this says.
    #[arg(long, env = "CONTROL_PLANE_DATABASE_WRITERS", default_value = "2")]
    pub database_writers: String,
    /// Token of the support role (read-only).
    #[arg(long, env = "CONTROL_PLANE_SUPPORT_TOKEN", hide_env_values = true)]
    pub support_token: Option<String>,
    /// Token of the ops role (support + acknowledge alerts).
    #[arg(long, env = "CONTROL_PLANE_OPS_TOKEN", hide_env_values = true)]
    pub ops_token: Option<String>,
    /// Token of the admin role (required).
    #[arg(long, env = "CONTROL_PLANE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// JSON map instance_id → secret (or → [secrets] during a rotation).
    #[arg(long, env = "CONTROL_PLANE_AGENT_SECRETS", hide_env_values = true)]
    pub agent_secrets: Option<String>,
    /// Shared secret for instances not in CONTROL_PLANE_AGENT_SECRETS.
    #[arg(long, env = "CONTROL_PLANE_AGENT_TOKEN", hide_env_values = true)]
    pub agent_token: Option<String>,
    /// Where alerts are forwarded (http or https URL).
    #[arg(long, env = "CONTROL_PLANE_ALERT_WEBHOOK_URL")]
    pub alert_webhook_url: Option<String>,
    /// Sent as `Authorization: Bearer` to the alert webhook.
    #[arg(
        long,
        env = "CONTROL_PLANE_ALERT_WEBHOOK_TOKEN",
        hide_env_values = true
    )]
    pub alert_webhook_token: Option<String>,
    /// Signs alert webhooks with Standard Webhooks v1 (`whsec_…` or plain text).
    #[arg(
        long,
        env = "CONTROL_PLANE_ALERT_WEBHOOK_SECRET",
        hide_env_values = true
    )]
    pub alert_webhook_secret: Option<String>,
    /// Highest acceptable p95 latency in ms; 0 turns the check off.
    #[arg(long, env = "SLO_P95_MS_MAX", default_value = "0")]
    pub slo_p95_ms_max: String,
    /// Highest acceptable 5xx share (0..1); 0 turns the check off.
    #[arg(long, env = "SLO_ERROR_RATE_MAX", default_value = "0")]
    pub slo_error_rate_max: String,
    /// Highest acceptable webhook retry rate; 0 turns the check off.
    #[arg(long, env = "SLO_WEBHOOK_RETRY_RATE_MAX", default_value = "0")]
    pub slo_webhook_retry_rate_max: String,
    /// Accept v0 (`x-agent-signature`) heartbeats from older agents.
    #[arg(long, env = "CONTROL_PLANE_ALLOW_V0", default_value = "true")]
    pub allow_v0: String,
    /// Refuse heartbeats from instances not enrolled first (POST /api/installations).
    #[arg(
        long,
        env = "CONTROL_PLANE_REQUIRE_ENROLLMENT",
        default_value = "false"
    )]
    pub require_enrollment: String,
    /// Seconds without a heartbeat before an installation gets an offline alert.
    #[arg(long, env = "CONTROL_PLANE_OFFLINE_AFTER_SECS", default_value = "900")]
    pub offline_after_secs: String,
    /// Days the time series of heartbeat figures, job failures, ended alert deliveries and
    /// resolved alerts are kept; 0 keeps them forever.
    #[arg(
        long,
        env = "CONTROL_PLANE_HEARTBEAT_RETENTION_DAYS",
        default_value = "30"
    )]
    pub heartbeat_retention_days: String,
    /// Comma-separated base64 Ed25519 public keys whose release manifests are accepted.
    #[arg(long, env = "CONTROL_PLANE_RELEASE_PUBLIC_KEYS")]
    pub release_public_keys: Option<String>,
    /// ERP compatibility: accept HMAC-signed release manifests made with this secret.
    #[arg(
        long,
        env = "CONTROL_PLANE_RELEASE_SIGNING_SECRET",
        hide_env_values = true
    )]
    pub release_signing_secret: Option<String>,
    /// Mark login cookies Secure (set this when serving over HTTPS).
    #[arg(long, env = "CONTROL_PLANE_SECURE_COOKIES", default_value = "false")]
    pub secure_cookies: String,
    /// How many hours a dashboard login lasts (1 to 720).
    #[arg(long, env = "CONTROL_PLANE_SESSION_HOURS", default_value = "12")]
    pub session_hours: String,
    /// Failed role-token checks one client address may make per minute before its
    /// credentialed requests get 429 for the rest of the minute; 0 turns the limit off.
    #[arg(
        long,
        env = "CONTROL_PLANE_AUTH_FAILURES_PER_MINUTE",
        default_value = "30"
    )]
    pub auth_failures_per_minute: String,
    /// Comma-separated addresses or networks (CIDR) of reverse proxies whose forwarding
    /// header names the client for that limit.
    #[arg(long, env = "CONTROL_PLANE_TRUSTED_PROXIES")]
    pub trusted_proxies: Option<String>,
    /// The header those proxies write: x-forwarded-for, or forwarded (RFC 7239).
    #[arg(
        long,
        env = "CONTROL_PLANE_PROXY_HEADER",
        default_value = "x-forwarded-for"
    )]
    pub proxy_header: String,
    /// Ed25519 key (base64 of the 32-byte seed, `fleetctl keys generate`) that signs agent
    /// tokens and derives the secrets issued at enrollment. Unset: one is generated on first
    /// start and kept in the database, so restarts and replicas share it (protect the
    /// database file like the key).
    #[arg(long, env = "CONTROL_PLANE_JWT_KEY", hide_env_values = true)]
    pub jwt_key: Option<String>,
    /// Lifetime of agent tokens, in seconds.
    #[arg(
        long,
        env = "CONTROL_PLANE_AGENT_TOKEN_TTL_SECS",
        default_value = "3600"
    )]
    pub agent_token_ttl_secs: String,
    /// A command target with no answer from its agent for this long is timed out.
    #[arg(
        long,
        env = "CONTROL_PLANE_COMMAND_DELIVERY_TIMEOUT_SECS",
        default_value = "900"
    )]
    pub command_delivery_timeout_secs: String,
    /// Most bytes of output stored per command target (stdout and stderr together); past
    /// it, output is acknowledged but not stored and the target is marked truncated.
    #[arg(
        long,
        env = "CONTROL_PLANE_COMMAND_OUTPUT_MAX_BYTES",
        default_value = "268435456"
    )]
    pub command_output_max_bytes: String,
    /// Days the output of ended command targets is kept (their results stay); 0 keeps it
    /// forever.
    #[arg(
        long,
        env = "CONTROL_PLANE_COMMAND_RETENTION_DAYS",
        default_value = "30"
    )]
    pub command_retention_days: String,
    /// A restore verification no agent took this long after it was scheduled, or with no
    /// report this long after it was handed out, is marked timed_out (with an alert).
    #[arg(
        long,
        env = "CONTROL_PLANE_RESTORE_TIMEOUT_SECS",
        default_value = "21600"
    )]
    pub restore_timeout_secs: String,
}

/// A validated configuration.
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub database_url: String,
    /// How the store is opened (the PostgreSQL writers).
    pub store: fleet_server::store::OpenOptions,
    pub builder: ControlPlaneBuilder,
    /// Live-channel settings, applied once the database is open: without
    /// `CONTROL_PLANE_JWT_KEY` the key is the one stored in the database.
    pub live: fleet_server::LiveSettings,
}

/// `CONTROL_PLANE_ALLOW_V0` as (accept v0, on heartbeats only): a boolean, or `heartbeats` to
/// keep v0 to `POST /api/heartbeats` (a v0 report elsewhere could be replayed forever).
fn v0_setting(text: &str, problems: &mut Vec<String>) -> (bool, bool) {
    match text.trim().to_ascii_lowercase().as_str() {
        "heartbeats" => (true, true),
        "1" | "true" | "yes" | "on" => (true, false),
        "0" | "false" | "no" | "off" => (false, false),
        _ => {
            problems.push(format!(
                "CONTROL_PLANE_ALLOW_V0: {text:?} is not true, false or heartbeats"
            ));
            (false, false)
        }
    }
}

/// `CONTROL_PLANE_HEARTBEAT_RETENTION_DAYS` or `CONTROL_PLANE_COMMAND_RETENTION_DAYS` as a
/// retention: 0 keeps forever.
fn retention(days: f64) -> Option<Duration> {
    (days > 0.0).then(|| Duration::from_secs_f64(days * 86_400.0))
}

/// Smallest and largest `CONTROL_PLANE_COMMAND_OUTPUT_MAX_BYTES`: below 1 MiB the cap cuts
/// ordinary output short (and a value meant in MiB, such as `256`, is caught); past 1 TiB
/// it bounds nothing a database could hold.
const COMMAND_OUTPUT_MAX_BYTES: std::ops::RangeInclusive<u64> = 1 << 20..=1 << 40;

/// Shortest and longest `CONTROL_PLANE_RESTORE_TIMEOUT_SECS`: below a minute every
/// verification would time out before an agent's first poll; a week is already far longer
/// than any restore.
const RESTORE_TIMEOUT_SECS: std::ops::RangeInclusive<u64> = 60..=7 * 86_400;

/// `CONTROL_PLANE_RESTORE_TIMEOUT_SECS`: whole seconds within [`RESTORE_TIMEOUT_SECS`]; empty
/// means the default.
fn restore_timeout(text: &str, problems: &mut Vec<String>) -> Duration {
    let default = fleet_server::DEFAULT_RESTORE_TIMEOUT_SECS;
    let text = text.trim();
    match text.parse::<u64>() {
        Ok(secs) if RESTORE_TIMEOUT_SECS.contains(&secs) => Duration::from_secs(secs),
        _ if text.is_empty() => Duration::from_secs(default),
        _ => {
            problems.push(format!(
                "CONTROL_PLANE_RESTORE_TIMEOUT_SECS: {text:?} is not a whole number of seconds \
                 from {} to {}",
                RESTORE_TIMEOUT_SECS.start(),
                RESTORE_TIMEOUT_SECS.end()
            ));
            Duration::from_secs(default)
        }
    }
}

/// Shortest and longest `CONTROL_PLANE_SESSION_HOURS`: under an hour the dashboard would
/// keep asking for the token; past 30 days a stolen cookie stays useful for too long.
const SESSION_HOURS: std::ops::RangeInclusive<u64> = 1..=720;

/// `CONTROL_PLANE_SESSION_HOURS`: whole hours within [`SESSION_HOURS`]; empty means the
/// default.
fn session_lifetime(text: &str, problems: &mut Vec<String>) -> Duration {
    let default = fleet_server::DEFAULT_SESSION_HOURS;
    let text = text.trim();
    let hours = match text.parse::<u64>() {
        Ok(hours) if SESSION_HOURS.contains(&hours) => hours,
        _ if text.is_empty() => default,
        _ => {
            problems.push(format!(
                "CONTROL_PLANE_SESSION_HOURS: {text:?} is not a whole number of hours from {} \
                 to {}",
                SESSION_HOURS.start(),
                SESSION_HOURS.end()
            ));
            default
        }
    };
    Duration::from_secs(hours * 3600)
}

/// `CONTROL_PLANE_TRUSTED_PROXIES`: addresses (one host each) or networks, comma-separated;
/// each entry that is neither is a problem of its own.
fn trusted_proxies(text: Option<&str>, problems: &mut Vec<String>) -> Vec<IpNet> {
    let mut networks = Vec::new();
    for entry in text.unwrap_or("").split(',').map(str::trim) {
        if entry.is_empty() {
            continue;
        }
        match entry.parse::<IpNet>() {
            Ok(network) => networks.push(network),
            Err(_) => match entry.parse::<std::net::IpAddr>() {
                Ok(addr) => networks.push(IpNet::from(addr)),
                Err(_) => problems.push(format!(
                    "CONTROL_PLANE_TRUSTED_PROXIES: {entry:?} is not an address or a network \
                     such as 10.0.0.0/8"
                )),
            },
        }
    }
    networks
}

/// `CONTROL_PLANE_PROXY_HEADER`: the header's name, in any case.
fn proxy_header(text: &str, problems: &mut Vec<String>) -> ProxyHeader {
    match text.trim().to_ascii_lowercase().as_str() {
        "x-forwarded-for" => ProxyHeader::XForwardedFor,
        "forwarded" => ProxyHeader::Forwarded,
        _ => {
            problems.push(format!(
                "CONTROL_PLANE_PROXY_HEADER: {text:?} is neither x-forwarded-for nor forwarded"
            ));
            ProxyHeader::XForwardedFor
        }
    }
}

fn set(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

impl ServeArgs {
    /// Checks every setting; on failure returns one line per problem, naming the variable
    /// and never printing a secret.
    pub fn validate(&self) -> Result<ServeConfig, Vec<String>> {
        let mut problems = Vec::new();
        let listen = self
            .listen
            .parse::<SocketAddr>()
            .map_err(|_| {
                problems.push(format!(
                    "FLEET_LISTEN: {:?} is not an address such as 127.0.0.1:8080",
                    self.listen
                ))
            })
            .ok();
        let db = self.database_url.trim();
        if !(db.starts_with("sqlite:")
            || db.starts_with("postgres://")
            || db.starts_with("postgresql://"))
        {
            problems
                .push("CONTROL_PLANE_DATABASE_URL: must start with sqlite: or postgres://".into());
        }
        let postgres_writers = self
            .database_writers
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=PostgresStore::MAX_WRITERS).contains(n))
            .unwrap_or_else(|| {
                problems.push(format!(
                    "CONTROL_PLANE_DATABASE_WRITERS: {:?} is not a whole number from 1 to {}",
                    self.database_writers,
                    PostgresStore::MAX_WRITERS
                ));
                PostgresStore::DEFAULT_WRITERS
            });
        let tokens = RoleTokens {
            support: set(&self.support_token).map(str::to_owned),
            ops: set(&self.ops_token).map(str::to_owned),
            admin: set(&self.admin_token).map(str::to_owned),
        };
        if tokens.admin.is_none() {
            problems
                .push("CONTROL_PLANE_ADMIN_TOKEN: missing (the admin role needs a token)".into());
        }
        problems.extend(shared_role_tokens(&tokens));
        for (name, token) in named_role_tokens(&tokens) {
            // Accepted, as the ERP control plane accepts it, but said: the failed-check limit
            // slows guessing down, it does not make a short token safe.
            if token
                .as_ref()
                .is_some_and(|t| t.chars().count() < MIN_ROLE_TOKEN_CHARS)
            {
                tracing::warn!(
                    "{name} is shorter than {MIN_ROLE_TOKEN_CHARS} characters: use a long random \
                     token (for example `openssl rand -hex 32`)"
                );
            }
        }
        let secrets = match SecretResolver::from_config(
            set(&self.agent_secrets),
            set(&self.agent_token),
        ) {
            Ok(resolver) => {
                if resolver.is_empty() {
                    // Not an error: a fleet can consist of enrolled agents only, each
                    // signing with the secret issued to it (`fleetctl enroll`).
                    tracing::info!(
                        "neither CONTROL_PLANE_AGENT_SECRETS nor CONTROL_PLANE_AGENT_TOKEN is set: \
                         only enrolled agents can be verified"
                    );
                }
                Some(resolver)
            }
            Err(fleet_core::Error::Config(list)) => {
                problems.extend(list);
                None
            }
            Err(other) => {
                problems.push(other.to_string());
                None
            }
        };
        let mut number = |name: &str, text: &str, max: f64| -> f64 {
            match text.trim().parse::<f64>() {
                Ok(v) if v.is_finite() && (0.0..=max).contains(&v) => v,
                _ => {
                    problems.push(format!(
                        "{name}: {text:?} is not a number between 0 and {max}"
                    ));
                    0.0
                }
            }
        };
        let slo = SloThresholds {
            p95_ms_max: number("SLO_P95_MS_MAX", &self.slo_p95_ms_max, 1.0e9),
            error_rate_max: number("SLO_ERROR_RATE_MAX", &self.slo_error_rate_max, 1.0),
            webhook_retry_rate_max: number(
                "SLO_WEBHOOK_RETRY_RATE_MAX",
                &self.slo_webhook_retry_rate_max,
                1.0e6,
            ),
        };
        let offline_after = number(
            "CONTROL_PLANE_OFFLINE_AFTER_SECS",
            &self.offline_after_secs,
            1.0e8,
        );
        let retention_days = number(
            "CONTROL_PLANE_HEARTBEAT_RETENTION_DAYS",
            &self.heartbeat_retention_days,
            36_500.0,
        );
        let auth_failures_per_minute = number(
            "CONTROL_PLANE_AUTH_FAILURES_PER_MINUTE",
            &self.auth_failures_per_minute,
            1.0e6,
        );
        if offline_after < 1.0 {
            problems.push("CONTROL_PLANE_OFFLINE_AFTER_SECS: must be at least 1".into());
        }
        if auth_failures_per_minute.fract() != 0.0 {
            problems.push("CONTROL_PLANE_AUTH_FAILURES_PER_MINUTE: must be a whole number".into());
        }
        let heartbeat_retention = retention(retention_days);
        let restore_timeout = restore_timeout(&self.restore_timeout_secs, &mut problems);
        let session_lifetime = session_lifetime(&self.session_hours, &mut problems);
        let trusted_proxies = trusted_proxies(set(&self.trusted_proxies), &mut problems);
        let proxy_header = proxy_header(&self.proxy_header, &mut problems);
        let (allow_v0, v0_only_for_heartbeats) = v0_setting(&self.allow_v0, &mut problems);
        let mut flag = |name: &str, text: &str| -> bool {
            match text.trim().to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => true,
                "0" | "false" | "no" | "off" => false,
                _ => {
                    problems.push(format!("{name}: {text:?} is not true or false"));
                    false
                }
            }
        };
        let require_enrollment = flag("CONTROL_PLANE_REQUIRE_ENROLLMENT", &self.require_enrollment);
        let secure_cookies = flag("CONTROL_PLANE_SECURE_COOKIES", &self.secure_cookies);
        let webhook = self.webhook(&mut problems);
        let manifests = self.manifests(&mut problems);
        let live = self.live(&mut problems);
        if !problems.is_empty() {
            return Err(problems);
        }
        let (Some(listen), Some(secrets)) = (listen, secrets) else {
            return Err(vec!["internal: validated values missing".into()]);
        };
        let settings = Settings {
            allow_v0,
            v0_only_for_heartbeats,
            require_enrollment,
            slo,
            offline_after: Duration::from_secs(offline_after as u64),
            heartbeat_retention,
            secure_cookies,
            session_lifetime,
            auth_failures_per_minute: auth_failures_per_minute as u32,
            trusted_proxies,
            proxy_header,
            restore_timeout,
            ..Settings::default()
        };
        let mut builder = ControlPlane::builder()
            .secrets(secrets)
            .tokens(tokens)
            .settings(settings)
            .manifest_verifier(manifests);
        if let Some(webhook) = webhook {
            builder = builder.webhook(webhook);
        }
        Ok(ServeConfig {
            listen,
            database_url: db.to_owned(),
            store: fleet_server::store::OpenOptions { postgres_writers },
            builder,
            live,
        })
    }

    fn manifests(&self, problems: &mut Vec<String>) -> ManifestVerifier {
        let mut keys = Vec::new();
        for (i, text) in set(&self.release_public_keys)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .enumerate()
        {
            match PublicKey::from_base64(text) {
                Ok(key) => keys.push(key),
                Err(err) => problems.push(format!(
                    "CONTROL_PLANE_RELEASE_PUBLIC_KEYS: key {} is unusable: {err}",
                    i + 1
                )),
            }
        }
        let mut verifier = ManifestVerifier::new(keys);
        if let Some(text) = set(&self.release_signing_secret) {
            match Secret::new(text) {
                Ok(secret) => verifier = verifier.with_hmac_secret(secret),
                Err(err) => {
                    problems.push(format!("CONTROL_PLANE_RELEASE_SIGNING_SECRET: {}", err.0))
                }
            }
        }
        verifier
    }

    fn live(&self, problems: &mut Vec<String>) -> fleet_server::LiveSettings {
        let mut live = fleet_server::LiveSettings::default();
        if let Some(key) = set(&self.jwt_key) {
            match fleet_core::PrivateKey::from_base64(key) {
                Ok(key) => live.jwt_key = Some(key),
                Err(_) => problems
                    .push("CONTROL_PLANE_JWT_KEY: not base64 of a 32-byte Ed25519 seed".into()),
            }
        }
        // Empty means the default (as the ERP variables behave).
        let text = |v: &str, default: &'static str| -> String {
            if v.trim().is_empty() {
                default.to_owned()
            } else {
                v.trim().to_owned()
            }
        };
        match text(&self.agent_token_ttl_secs, "3600").parse::<u64>() {
            Ok(secs) if (60..=86_400).contains(&secs) => {
                live.token_ttl = Duration::from_secs(secs);
            }
            _ => problems
                .push("CONTROL_PLANE_AGENT_TOKEN_TTL_SECS: must be between 60 and 86400".into()),
        }
        match text(&self.command_delivery_timeout_secs, "900").parse::<u64>() {
            Ok(secs) if secs >= 1 => live.delivery_timeout = Duration::from_secs(secs),
            _ => problems.push(
                "CONTROL_PLANE_COMMAND_DELIVERY_TIMEOUT_SECS: must be a positive integer".into(),
            ),
        }
        let max_bytes = text(&self.command_output_max_bytes, "268435456");
        match max_bytes.parse::<u64>() {
            Ok(bytes) if COMMAND_OUTPUT_MAX_BYTES.contains(&bytes) => {
                live.output_max_bytes = bytes;
            }
            _ => problems.push(format!(
                "CONTROL_PLANE_COMMAND_OUTPUT_MAX_BYTES: {max_bytes:?} is not a whole number of \
                 bytes from {} (1 MiB) to {} (1 TiB)",
                COMMAND_OUTPUT_MAX_BYTES.start(),
                COMMAND_OUTPUT_MAX_BYTES.end()
            )),
        }
        let days = text(&self.command_retention_days, "30");
        match days.parse::<f64>() {
            Ok(n) if n.is_finite() && (0.0..=36_500.0).contains(&n) => {
                live.output_retention = retention(n);
            }
            _ => problems.push(format!(
                "CONTROL_PLANE_COMMAND_RETENTION_DAYS: {days:?} is not a number of days between \
                 0 and 36500"
            )),
        }
        live
    }

    fn webhook(&self, problems: &mut Vec<String>) -> Option<WebhookConfig> {
        let secret = set(&self.alert_webhook_secret).and_then(|text| match Secret::new(text) {
            Ok(secret) => Some(secret),
            Err(err) => {
                problems.push(format!("CONTROL_PLANE_ALERT_WEBHOOK_SECRET: {}", err.0));
                None
            }
        });
        let Some(url) = set(&self.alert_webhook_url) else {
            if set(&self.alert_webhook_token).is_some() || secret.is_some() {
                problems.push(
                    "CONTROL_PLANE_ALERT_WEBHOOK_URL: missing, but a webhook token or secret is set".into(),
                );
            }
            return None;
        };
        match reqwest::Url::parse(url) {
            Ok(parsed) if matches!(parsed.scheme(), "http" | "https") => {}
            _ => {
                problems.push("CONTROL_PLANE_ALERT_WEBHOOK_URL: not an http(s) URL".into());
                return None;
            }
        }
        Some(WebhookConfig {
            token: set(&self.alert_webhook_token).map(str::to_owned),
            secret,
            ..WebhookConfig::new(url)
        })
    }
}

/// Role tokens shorter than this are accepted with a warning.
const MIN_ROLE_TOKEN_CHARS: usize = 16;

/// Each role's token with the variable that sets it, lowest role first.
fn named_role_tokens(tokens: &RoleTokens) -> [(&'static str, &Option<String>); 3] {
    [
        ("CONTROL_PLANE_SUPPORT_TOKEN", &tokens.support),
        ("CONTROL_PLANE_OPS_TOKEN", &tokens.ops),
        ("CONTROL_PLANE_ADMIN_TOKEN", &tokens.admin),
    ]
}

/// Each pair of roles configured with one token. A request with it proves the higher role,
/// so whoever was handed the lower role's token would hold the higher role too.
fn shared_role_tokens(tokens: &RoleTokens) -> Vec<String> {
    let named = named_role_tokens(tokens);
    let mut problems = Vec::new();
    for (i, (lower, lower_token)) in named.iter().enumerate() {
        for (higher, higher_token) in &named[i + 1..] {
            if let (Some(a), Some(b)) = (lower_token, higher_token)
                && fleet_core::signing::constant_time_eq(a.as_bytes(), b.as_bytes())
            {
                problems.push(format!(
                    "{lower}: the same as {higher}, so it would grant the higher role; \
                     give each role a token of its own"
                ));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ServeArgs {
        ServeArgs {
            listen: "127.0.0.1:8080".into(),
            database_url: "sqlite://fleet.db".into(),
            database_writers: "2".into(),
            admin_token: Some("adm".into()),
            agent_token: Some("shared".into()),
            slo_p95_ms_max: "0".into(),
            slo_error_rate_max: "0".into(),
            slo_webhook_retry_rate_max: "0".into(),
            allow_v0: "true".into(),
            require_enrollment: "false".into(),
            offline_after_secs: "900".into(),
            heartbeat_retention_days: "30".into(),
            secure_cookies: "false".into(),
            auth_failures_per_minute: "30".into(),
            trusted_proxies: None,
            proxy_header: "x-forwarded-for".into(),
            ..ServeArgs::default()
        }
    }

    #[test]
    fn defaults_with_the_required_values_are_valid() {
        assert!(args().validate().is_ok());
    }

    #[test]
    fn v0_can_be_allowed_everywhere_on_heartbeats_only_or_nowhere() {
        let mut problems = Vec::new();
        for (text, mode) in [
            ("true", (true, false)),
            ("heartbeats", (true, true)),
            (" Heartbeats ", (true, true)),
            ("off", (false, false)),
        ] {
            assert_eq!(v0_setting(text, &mut problems), mode, "{text}");
        }
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(v0_setting("maybe", &mut problems), (false, false));
        assert_eq!(
            problems,
            ["CONTROL_PLANE_ALLOW_V0: \"maybe\" is not true, false or heartbeats"]
        );
    }

    #[test]
    fn every_problem_is_named_at_once_without_secrets() {
        let bad = ServeArgs {
            listen: "nowhere".into(),
            database_url: "mysql://x".into(),
            admin_token: None,
            agent_secrets: Some(r#"{"a":"","b":"fine-secret-value"}"#.into()),
            slo_p95_ms_max: "fast".into(),
            allow_v0: "maybe".into(),
            alert_webhook_url: Some("ftp://hooks".into()),
            ..args()
        };
        let problems = bad.validate().err().expect("invalid");
        let names: Vec<&str> = problems
            .iter()
            .map(|p| p.split([':', '[']).next().unwrap_or(""))
            .collect();
        assert_eq!(
            names,
            [
                "FLEET_LISTEN",
                "CONTROL_PLANE_DATABASE_URL",
                "CONTROL_PLANE_ADMIN_TOKEN",
                "CONTROL_PLANE_AGENT_SECRETS",
                "SLO_P95_MS_MAX",
                "CONTROL_PLANE_ALLOW_V0",
                "CONTROL_PLANE_ALERT_WEBHOOK_URL",
            ],
            "{problems:#?}"
        );
        assert!(!problems.join("\n").contains("fine-secret-value"));
    }

    #[test]
    fn roles_sharing_a_token_are_refused_without_showing_it() {
        let problems = ServeArgs {
            support_token: Some("one-token-for-two-roles".into()),
            ops_token: Some("ops-token-of-its-own".into()),
            admin_token: Some("one-token-for-two-roles".into()),
            ..args()
        }
        .validate()
        .err()
        .expect("invalid");
        assert_eq!(
            problems,
            [
                "CONTROL_PLANE_SUPPORT_TOKEN: the same as CONTROL_PLANE_ADMIN_TOKEN, so it would \
              grant the higher role; give each role a token of its own"
            ]
        );
        let distinct = ServeArgs {
            support_token: Some("support-token".into()),
            ops_token: Some("ops-token".into()),
            ..args()
        };
        assert!(distinct.validate().is_ok());
    }

    #[test]
    fn the_auth_failure_limit_is_a_whole_number() {
        for bad in ["2.5", "-1", "many"] {
            let problems = ServeArgs {
                auth_failures_per_minute: bad.into(),
                ..args()
            }
            .validate()
            .err()
            .expect("invalid");
            assert!(
                problems[0].starts_with("CONTROL_PLANE_AUTH_FAILURES_PER_MINUTE"),
                "{bad}: {problems:?}"
            );
        }
        assert!(
            ServeArgs {
                auth_failures_per_minute: "0".into(),
                ..args()
            }
            .validate()
            .is_ok()
        );
    }

    #[test]
    fn the_database_writers_are_a_whole_number_from_1_to_12() {
        for bad in ["0", "13", "1.5", "two", ""] {
            let problems = ServeArgs {
                database_writers: bad.into(),
                ..args()
            }
            .validate()
            .err()
            .expect("invalid");
            assert_eq!(
                problems,
                [format!(
                    "CONTROL_PLANE_DATABASE_WRITERS: {bad:?} is not a whole number from 1 to 12"
                )]
            );
        }
        for (text, writers) in [("1", 1), (" 12 ", 12), ("2", 2)] {
            let config = ServeArgs {
                database_writers: text.into(),
                ..args()
            }
            .validate()
            .expect("valid");
            assert_eq!(config.store.postgres_writers, writers, "{text:?}");
        }
    }

    #[test]
    fn trusted_proxies_are_addresses_or_networks() {
        let mut problems = Vec::new();
        let networks = trusted_proxies(Some(" 10.0.0.0/8, 127.0.0.1 ,::1,"), &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        let expected: Vec<IpNet> = ["10.0.0.0/8", "127.0.0.1/32", "::1/128"]
            .iter()
            .map(|n| n.parse().expect("net"))
            .collect();
        assert_eq!(networks, expected);
        let networks = trusted_proxies(Some("10.0.0.0/33, proxy.local"), &mut problems);
        assert!(networks.is_empty());
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems
                .iter()
                .all(|p| p.starts_with("CONTROL_PLANE_TRUSTED_PROXIES"))
        );
    }

    #[test]
    fn the_proxy_header_is_one_of_two_names() {
        let mut problems = Vec::new();
        assert_eq!(
            proxy_header(" Forwarded ", &mut problems),
            ProxyHeader::Forwarded
        );
        assert_eq!(
            proxy_header("X-Forwarded-For", &mut problems),
            ProxyHeader::XForwardedFor
        );
        assert!(problems.is_empty(), "{problems:?}");
        proxy_header("x-real-ip", &mut problems);
        assert_eq!(
            problems,
            ["CONTROL_PLANE_PROXY_HEADER: \"x-real-ip\" is neither x-forwarded-for nor forwarded"]
        );
    }

    #[test]
    fn heartbeat_retention_is_in_days_and_zero_keeps_forever() {
        assert_eq!(retention(7.0), Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(retention(0.5), Some(Duration::from_secs(43_200)));
        assert_eq!(retention(0.0), None);
        assert!(
            ServeArgs {
                heartbeat_retention_days: "0".into(),
                ..args()
            }
            .validate()
            .is_ok()
        );
        let problems = ServeArgs {
            heartbeat_retention_days: "-1".into(),
            ..args()
        }
        .validate()
        .err()
        .expect("invalid");
        assert!(problems[0].starts_with("CONTROL_PLANE_HEARTBEAT_RETENTION_DAYS"));
    }

    #[test]
    fn the_restore_timeout_is_whole_seconds_from_a_minute_to_a_week() {
        let timeout = |text: &str| {
            ServeArgs {
                restore_timeout_secs: text.into(),
                ..args()
            }
            .validate()
            .map(|config| format!("{:?}", config.builder))
        };
        for (text, secs) in [("", 21_600), ("60", 60), (" 604800 ", 604_800)] {
            let builder = timeout(text).unwrap_or_else(|p| panic!("{text:?}: {p:?}"));
            assert!(
                builder.contains(&format!("restore_timeout: {secs}s")),
                "{text:?}: {builder}"
            );
        }
        for bad in ["59", "604801", "1.5", "-1", "soon"] {
            let problems = timeout(bad).expect_err("invalid");
            assert_eq!(
                problems,
                [format!(
                    "CONTROL_PLANE_RESTORE_TIMEOUT_SECS: {bad:?} is not a whole number of \
                     seconds from 60 to 604800"
                )]
            );
        }
    }

    #[test]
    fn the_session_lifetime_is_whole_hours_from_one_to_720_and_reported_with_the_rest() {
        let lifetime = |text: &str| {
            ServeArgs {
                session_hours: text.into(),
                ..args()
            }
            .validate()
            .map(|config| format!("{:?}", config.builder))
        };
        for (text, secs) in [("", 43_200), ("1", 3_600), (" 720 ", 2_592_000)] {
            let builder = lifetime(text).unwrap_or_else(|p| panic!("{text:?}: {p:?}"));
            assert!(
                builder.contains(&format!("session_lifetime: {secs}s")),
                "{text:?}: {builder}"
            );
        }
        for bad in ["0", "721", "1.5", "-1", "a day"] {
            let problems = lifetime(bad).expect_err("invalid");
            assert_eq!(
                problems,
                [format!(
                    "CONTROL_PLANE_SESSION_HOURS: {bad:?} is not a whole number of hours from 1 \
                     to 720"
                )]
            );
        }
        // Beside another bad setting, both are reported at once.
        let problems = ServeArgs {
            session_hours: "forever".into(),
            secure_cookies: "maybe".into(),
            ..args()
        }
        .validate()
        .err()
        .expect("invalid");
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("CONTROL_PLANE_SESSION_HOURS")),
            "{problems:?}"
        );
    }

    #[test]
    fn command_output_cap_and_retention_are_checked_with_the_rest() {
        let live = |max_bytes: &str, days: &str| {
            ServeArgs {
                command_output_max_bytes: max_bytes.into(),
                command_retention_days: days.into(),
                ..args()
            }
            .validate()
            .map(|config| format!("{:?}", config.live))
        };
        for (max_bytes, days, expected_bytes, expected_retention) in [
            ("", "", 268_435_456_u64, "Some(2592000s)"),
            ("1048576", "0", 1_048_576, "None"),
            (" 1099511627776 ", "0.5", 1_099_511_627_776, "Some(43200s)"),
        ] {
            let shown = live(max_bytes, days).unwrap_or_else(|p| panic!("{max_bytes:?}: {p:?}"));
            assert!(
                shown.contains(&format!("output_max_bytes: {expected_bytes},"))
                    && shown.contains(&format!("output_retention: {expected_retention}")),
                "{max_bytes:?} {days:?}: {shown}"
            );
        }
        for (max_bytes, days) in [
            ("256", "-1"),
            ("1099511627777", "36501"),
            ("lots", "a month"),
        ] {
            let problems = live(max_bytes, days).expect_err("invalid");
            assert_eq!(
                problems,
                [
                    format!(
                        "CONTROL_PLANE_COMMAND_OUTPUT_MAX_BYTES: {max_bytes:?} is not a whole \
                         number of bytes from 1048576 (1 MiB) to 1099511627776 (1 TiB)"
                    ),
                    format!(
                        "CONTROL_PLANE_COMMAND_RETENTION_DAYS: {days:?} is not a number of days \
                         between 0 and 36500"
                    ),
                ]
            );
        }
    }

    #[test]
    fn release_keys_are_checked() {
        let key = fleet_core::manifest::PrivateKey::from_seed([4; 32]).public_key();
        let ok = ServeArgs {
            release_public_keys: Some(format!(" {} ,", key.to_base64())),
            release_signing_secret: Some("erp-release-secret".into()),
            ..args()
        };
        assert!(ok.validate().is_ok());
        let problems = ServeArgs {
            release_public_keys: Some("AAAA".into()),
            ..args()
        }
        .validate()
        .err()
        .expect("invalid");
        assert!(problems[0].starts_with("CONTROL_PLANE_RELEASE_PUBLIC_KEYS: key 1"));
    }

    #[test]
    fn no_agent_secret_at_all_means_enrolled_agents_only() {
        let config = ServeArgs {
            agent_token: None,
            ..args()
        }
        .validate();
        assert!(config.is_ok(), "{:?}", config.err());
    }
}
