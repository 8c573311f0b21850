//! [`AgentConfig::from_env`]: the ERP instance agent's variables (same names, same
//! defaults), the Neon agent's intervals and buffer settings, and our own.
//!
//! This is the only place in the library that looks at the environment, and even here the
//! environment is reached through a lookup function so tests never touch process state.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use fleet_core::{Scheme, Secret};

use crate::config::*;
use crate::{Error, Result};

impl AgentConfig {
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
        // The secret is taken byte for byte (not trimmed): the control plane holds the same
        // bytes, and a signature over a different key would never match.
        let secret = env.required_raw("AGENT_SECRET").and_then(|text| {
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
        // An unreadable value falls back to the minutes, so it is named once, not again as
        // a zero interval.
        let (interval_name, interval_secs) = match env.get("HEARTBEAT_INTERVAL") {
            Some(_) => (
                "HEARTBEAT_INTERVAL",
                env.fraction("HEARTBEAT_INTERVAL", minutes * 60.0),
            ),
            None => ("HEARTBEAT_INTERVAL_MIN", minutes * 60.0),
        };
        config.heartbeat_interval = Duration::from_secs_f64(interval_secs);
        if config.heartbeat_interval.is_zero() {
            env.problem(format!("{interval_name} must be above zero"));
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
        if let Some(text) = env.get("AGENT_SKIP_CHECKS") {
            for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                if !crate::config::SKIPPABLE_CHECKS.contains(&name) {
                    env.problem(format!(
                        "AGENT_SKIP_CHECKS names {name:?}; the checks that can be skipped are {}",
                        crate::config::SKIPPABLE_CHECKS.join(", ")
                    ));
                } else if !config.skip_checks.iter().any(|n| n == name) {
                    config.skip_checks.push(name.to_owned());
                }
            }
        }
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
        if let Some(secs) = env
            .get("UPDATE_POLL_SEC")
            .map(|_| env.number("UPDATE_POLL_SEC", 600))
        {
            u.poll_interval = Duration::from_secs(secs.max(1));
        }
        for (i, text) in env
            .get("UPDATE_MANIFEST_PUBLIC_KEYS")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .enumerate()
        {
            match fleet_core::manifest::PublicKey::from_base64(text) {
                Ok(key) => u.manifest_public_keys.push(key),
                Err(err) => env.problem(format!(
                    "UPDATE_MANIFEST_PUBLIC_KEYS: key {} is unusable: {err}",
                    i + 1
                )),
            }
        }
        u.green_up_cmd = env.get("UPDATE_GREEN_UP_CMD");
        u.migrate_safe_cmd = env.get("UPDATE_MIGRATE_SAFE_CMD");
        u.proxy_shift_cmd = env.get("UPDATE_PROXY_SHIFT_CMD");
        u.switch_green_cmd = env.get("UPDATE_SWITCH_GREEN_CMD");

        let p = &mut config.plugin;
        p.enabled = env.flag("PLUGIN_UPDATE_ENABLED", true);
        p.poll_interval = Duration::from_secs(env.number("PLUGIN_POLL_MIN", 10) * 60);
        p.step_timeout = Duration::from_secs(env.number("PLUGIN_STEP_TIMEOUT_SEC", 600));
        p.workdir = env.get("PLUGIN_WORKDIR").map(PathBuf::from);
        p.install_cmd = env.get("PLUGIN_INSTALL_CMD");
        p.update_cmd = env.get("PLUGIN_UPDATE_CMD");
        p.remove_cmd = env.get("PLUGIN_REMOVE_CMD");
        p.smoke_cmd = env.get("PLUGIN_SMOKE_CMD");
        p.rollback_cmd = env.get("PLUGIN_ROLLBACK_CMD");
        if let Some(secs) = env
            .get("PLUGIN_POLL_SEC")
            .map(|_| env.number("PLUGIN_POLL_SEC", 600))
        {
            p.poll_interval = Duration::from_secs(secs.max(1));
        }

        let r = &mut config.restore;
        r.enabled = env.flag("RESTORE_VERIFY_ENABLED", true);
        r.poll_interval = Duration::from_secs(env.number("RESTORE_POLL_MIN", 10) * 60);
        if let Some(secs) = env
            .get("RESTORE_POLL_SEC")
            .map(|_| env.number("RESTORE_POLL_SEC", 600))
        {
            r.poll_interval = Duration::from_secs(secs.max(1));
        }
        r.timeout = Duration::from_secs(env.number("RESTORE_VERIFY_TIMEOUT_SEC", 3600));
        r.workdir = env.get("RESTORE_WORKDIR").map(PathBuf::from);
        r.verify_cmd = env.get("RESTORE_VERIFY_CMD");
        let check = env.number(
            "RESTORE_CANCEL_CHECK_SEC",
            DEFAULT_RESTORE_CANCEL_CHECK_SECS,
        );
        if check == 0 {
            env.problem("RESTORE_CANCEL_CHECK_SEC must be at least 1");
        }
        r.cancel_check = Duration::from_secs(check.max(1));

        if env.problems.is_empty() {
            Ok(config)
        } else {
            Err(Error::Config(env.problems))
        }
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

    fn required_raw(&mut self, name: &str) -> Option<String> {
        let value = (self.lookup)(name).filter(|v| !v.is_empty());
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
    fn pipeline_settings_added_beside_the_erp_ones() {
        let key = fleet_core::manifest::PrivateKey::from_seed([3; 32]).public_key();
        let mut pairs = BASE.to_vec();
        let keys = format!("{}, {}", key.to_base64(), key.to_base64());
        pairs.extend([
            ("UPDATE_POLL_MIN", "5"),
            ("UPDATE_POLL_SEC", "2"),
            ("UPDATE_MANIFEST_PUBLIC_KEYS", keys.as_str()),
            ("UPDATE_PROXY_SHIFT_CMD", "shift.sh"),
            ("UPDATE_GREEN_UP_CMD", "green.sh"),
            ("PLUGIN_POLL_SEC", "3"),
            ("RESTORE_VERIFY_CMD", "verify.sh"),
            ("RESTORE_POLL_SEC", "4"),
            ("RESTORE_VERIFY_TIMEOUT_SEC", "60"),
        ]);
        let c = load(&pairs).unwrap();
        assert_eq!(c.update.poll_interval, Duration::from_secs(2));
        assert_eq!(c.update.manifest_public_keys, vec![key, key]);
        assert_eq!(c.update.proxy_shift_cmd.as_deref(), Some("shift.sh"));
        assert_eq!(c.update.green_up_cmd.as_deref(), Some("green.sh"));
        assert_eq!(c.plugin.poll_interval, Duration::from_secs(3));
        assert_eq!(c.restore.verify_cmd.as_deref(), Some("verify.sh"));
        assert_eq!(c.restore.poll_interval, Duration::from_secs(4));
        assert_eq!(c.restore.timeout, Duration::from_secs(60));
        let defaults = load(&BASE).unwrap();
        assert!(defaults.update.manifest_public_keys.is_empty());
        assert_eq!(defaults.restore.poll_interval, Duration::from_secs(600));
        assert_eq!(defaults.restore.cancel_check, Duration::from_secs(15));
        let mut bad = BASE.to_vec();
        bad.push(("UPDATE_MANIFEST_PUBLIC_KEYS", "not-a-key"));
        assert!(problems(&bad)[0].starts_with("UPDATE_MANIFEST_PUBLIC_KEYS: key 1"));
    }

    #[test]
    fn the_restore_cancel_check_is_a_whole_number_of_seconds_from_one() {
        let mut pairs = BASE.to_vec();
        pairs.push(("RESTORE_CANCEL_CHECK_SEC", "1"));
        assert_eq!(
            load(&pairs).unwrap().restore.cancel_check,
            Duration::from_secs(1)
        );
        for (text, problem) in [
            ("0", "RESTORE_CANCEL_CHECK_SEC must be at least 1"),
            (
                "soon",
                "RESTORE_CANCEL_CHECK_SEC must be a whole non-negative number, not \"soon\"",
            ),
            (
                "-5",
                "RESTORE_CANCEL_CHECK_SEC must be a whole non-negative number, not \"-5\"",
            ),
        ] {
            let mut pairs = BASE.to_vec();
            pairs.push(("RESTORE_CANCEL_CHECK_SEC", text));
            assert_eq!(problems(&pairs), [problem], "{text}");
        }
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
    fn a_bad_heartbeat_interval_is_one_problem_that_names_its_variable() {
        let mut pairs = BASE.to_vec();
        pairs.push(("HEARTBEAT_INTERVAL", "soon"));
        assert_eq!(
            problems(&pairs),
            ["HEARTBEAT_INTERVAL must be a non-negative number, not \"soon\""]
        );
        for name in ["HEARTBEAT_INTERVAL", "HEARTBEAT_INTERVAL_MIN"] {
            let mut pairs = BASE.to_vec();
            pairs.push((name, "0"));
            assert_eq!(problems(&pairs), [format!("{name} must be above zero")]);
        }
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
            ("PLUGIN_ROLLBACK_CMD", "prollback.sh"),
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
        assert_eq!(c.plugin.rollback_cmd.as_deref(), Some("prollback.sh"));
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
    fn service_checks_can_be_skipped_by_name_and_an_unknown_name_is_refused() {
        assert!(load(&BASE).unwrap().skip_checks.is_empty());
        let mut pairs = BASE.to_vec();
        pairs.push(("AGENT_SKIP_CHECKS", " redis, db,redis "));
        assert_eq!(load(&pairs).unwrap().skip_checks, ["redis", "db"]);
        let mut pairs = BASE.to_vec();
        pairs.push(("AGENT_SKIP_CHECKS", "db,storage"));
        let got = problems(&pairs).join("\n");
        assert!(
            got.contains("AGENT_SKIP_CHECKS names \"storage\"") && got.contains("db, redis"),
            "{got}"
        );
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
