//! Remote commands on the agent: settings, the executor that runs each command id at most
//! once, and the command types (`run`, `compose`, `packages`, `update_agent`).

pub mod compose;
pub mod packages;
pub mod run;
pub mod update_agent;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_core::command::{
    Command, CommandEnvelope, CommandResult, CommandStatus, CommandType, Frame, Stream,
};
use fleet_core::manifest::PublicKey;
use fleet_core::validate::Validate;
use tokio::sync::Notify;

use crate::logstream::{Begin, Journal};

/// Default compose command (Compose v1, as Debian packages it).
pub const DEFAULT_COMPOSE_COMMAND: &str = "docker-compose";
/// Default folder of compose projects.
pub const DEFAULT_PROJECTS_DIR: &str = "/var/lib/fleet-agent/projects";
/// Default longest run of a `RunCommand` without `timeout_sec`.
pub const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(3600);

/// How the agent runs remote commands.
#[derive(Clone)]
pub struct CommandSettings {
    /// Dial the live channel at all (`AGENT_COMMANDS_ENABLED`).
    pub enabled: bool,
    /// Command types refused by this agent (`AGENT_COMMANDS_DISABLED`, comma-separated).
    pub disabled: HashSet<CommandType>,
    /// Compose projects live in `<projects_dir>/<name>/` (`AGENT_PROJECTS_DIR`).
    pub projects_dir: PathBuf,
    /// The compose program and leading arguments (`AGENT_COMPOSE_COMMAND`, split on spaces:
    /// `docker compose`, `docker-compose`, `podman-compose`).
    pub compose_command: Vec<String>,
    /// Timeout of a `RunCommand` without `timeout_sec`, and of compose and package commands.
    pub default_timeout: Duration,
    /// Keys that may sign agent binaries (`AGENT_UPDATE_PUBLIC_KEYS`, comma-separated base64).
    pub update_keys: Vec<PublicKey>,
    /// The binary `UpdateAgent` replaces (default: the running executable).
    pub agent_binary: Option<PathBuf>,
    /// How long a new binary has for its trial run, and then to reconnect after the
    /// restart, before the previous one is restored (`AGENT_UPDATE_CONFIRM_SECS`).
    pub update_confirm_within: Duration,
    /// Install an `UpdateAgent` binary older than [`agent_version`](Self::agent_version)
    /// (`AGENT_UPDATE_ALLOW_DOWNGRADE`, default false). Only this agent's own configuration
    /// sets it: the binary's signature does not cover a version, so without this a control
    /// plane could send back any binary ever signed, old flaws included.
    pub allow_downgrade: bool,
    /// This agent's own version (SemVer), which an `UpdateAgent` binary must not be older
    /// than. Default: this library's version, which `fleet-agent --version` prints; a
    /// program embedding the agent sets the version its own `--version` prints.
    pub agent_version: String,
    /// Ping interval on the live channel.
    pub ping_interval: Duration,
    /// The channel is dropped after this long without a pong.
    pub pong_timeout: Duration,
    /// First reconnect delay.
    pub backoff_base: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// A connection up this long resets the backoff.
    pub healthy_after: Duration,
    /// WebSocket handshake limit.
    pub handshake_timeout: Duration,
    /// One-time enrollment token (`AGENT_ENROLLMENT_TOKEN`), traded for a secret once.
    pub enrollment_token: Option<String>,
}

impl std::fmt::Debug for CommandSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandSettings")
            .field("enabled", &self.enabled)
            .field("disabled", &self.disabled)
            .field("projects_dir", &self.projects_dir)
            .field("compose_command", &self.compose_command)
            .field("default_timeout", &self.default_timeout)
            .field("update_keys", &self.update_keys.len())
            .field("agent_binary", &self.agent_binary)
            .field("allow_downgrade", &self.allow_downgrade)
            .field("agent_version", &self.agent_version)
            .field(
                "enrollment_token",
                &self.enrollment_token.as_ref().map(|_| "[redacted]"),
            )
            .finish_non_exhaustive()
    }
}

impl Default for CommandSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            disabled: HashSet::new(),
            projects_dir: PathBuf::from(DEFAULT_PROJECTS_DIR),
            compose_command: vec![DEFAULT_COMPOSE_COMMAND.to_owned()],
            default_timeout: DEFAULT_RUN_TIMEOUT,
            update_keys: Vec::new(),
            agent_binary: None,
            update_confirm_within: Duration::from_secs(120),
            allow_downgrade: false,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            ping_interval: Duration::from_secs(30),
            pong_timeout: Duration::from_secs(60),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(120),
            healthy_after: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
            enrollment_token: None,
        }
    }
}

impl CommandSettings {
    /// Reads the `AGENT_COMMANDS_*` variables through `lookup`; every problem is named.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> crate::Result<Self> {
        let mut s = Self::default();
        let mut problems = Vec::new();
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        if let Some(v) = get("AGENT_COMMANDS_ENABLED") {
            match parse_flag(&v) {
                Some(enabled) => s.enabled = enabled,
                None => problems.push("AGENT_COMMANDS_ENABLED must be true or false".to_owned()),
            }
        }
        if let Some(v) = get("AGENT_COMMANDS_DISABLED") {
            for name in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                match CommandType::parse(name) {
                    Some(kind) => {
                        s.disabled.insert(kind);
                    }
                    None => problems.push(format!(
                        "AGENT_COMMANDS_DISABLED: unknown command type {name:?}"
                    )),
                }
            }
        }
        if let Some(v) = get("AGENT_PROJECTS_DIR") {
            s.projects_dir = PathBuf::from(v);
        }
        if let Some(v) = get("AGENT_COMPOSE_COMMAND") {
            s.compose_command = v.split_whitespace().map(str::to_owned).collect();
        }
        if let Some(v) = get("AGENT_COMMANDS_TIMEOUT_SECS") {
            match v.trim().parse::<u64>() {
                Ok(secs) if secs > 0 => s.default_timeout = Duration::from_secs(secs),
                _ => problems.push("AGENT_COMMANDS_TIMEOUT_SECS must be a positive integer".into()),
            }
        }
        if let Some(v) = get("AGENT_UPDATE_PUBLIC_KEYS") {
            for (i, key) in v
                .split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .enumerate()
            {
                match PublicKey::from_base64(key) {
                    Ok(key) => s.update_keys.push(key),
                    Err(err) => problems.push(format!("AGENT_UPDATE_PUBLIC_KEYS[{i}]: {err}")),
                }
            }
        }
        if let Some(v) = get("AGENT_UPDATE_CONFIRM_SECS") {
            match v.trim().parse::<u64>() {
                Ok(secs) if (1..=86_400).contains(&secs) => {
                    s.update_confirm_within = Duration::from_secs(secs);
                }
                _ => problems.push("AGENT_UPDATE_CONFIRM_SECS must be between 1 and 86400".into()),
            }
        }
        if let Some(v) = get("AGENT_UPDATE_ALLOW_DOWNGRADE") {
            match parse_flag(&v) {
                Some(allow) => s.allow_downgrade = allow,
                None => {
                    problems.push("AGENT_UPDATE_ALLOW_DOWNGRADE must be true or false".to_owned())
                }
            }
        }
        if let Some(v) = get("AGENT_BINARY_PATH") {
            s.agent_binary = Some(PathBuf::from(v));
        }
        s.enrollment_token = get("AGENT_ENROLLMENT_TOKEN");
        if problems.is_empty() {
            Ok(s)
        } else {
            Err(crate::Error::Config(problems))
        }
    }
}

/// `true`/`1`/`yes`/`on` or `false`/`0`/`no`/`off`, in any case; `None` for anything else.
fn parse_flag(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// Runs one command type in place of the built-in handler, e.g. a `HEALTH_CHECK` that asks
/// the application. Register it with
/// [`AgentBuilder::command_handler`](crate::AgentBuilder::command_handler).
///
/// The executor still records the id (exactly once), answers `IN_PROGRESS` first, journals
/// what the handler writes to `output`, and sends the returned result (its `job_id` is
/// filled in).
#[async_trait::async_trait]
pub trait CommandHandler: Send + Sync {
    /// The type this handler runs.
    fn command_type(&self) -> CommandType;

    /// Runs `command`; `cancel` is notified when the control plane cancels it.
    async fn run(&self, command: &Command, output: &Output, cancel: &Notify) -> CommandResult;
}

/// Writes a command's output to the journal with running offsets.
pub struct Output {
    journal: Journal,
    command_id: String,
    offsets: Mutex<[u64; 2]>,
}

impl Output {
    fn new(journal: Journal, command_id: &str) -> Self {
        Self {
            journal,
            command_id: command_id.to_owned(),
            offsets: Mutex::new([0, 0]),
        }
    }

    /// Appends bytes to a stream (stored on disk before this returns).
    pub async fn write(&self, stream: Stream, bytes: &[u8]) -> crate::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let slot = usize::from(stream == Stream::Stderr);
        let offset = {
            let mut offsets = self.offsets.lock().unwrap_or_else(|p| p.into_inner());
            let offset = offsets[slot];
            offsets[slot] += bytes.len() as u64;
            offset
        };
        self.journal
            .chunk(&self.command_id, stream, offset, bytes)
            .await
    }
}

/// Runs commands: each id at most once, several at a time, output to the journal.
#[derive(Clone)]
pub struct Executor {
    journal: Journal,
    settings: Arc<CommandSettings>,
    running: Arc<Mutex<HashMap<String, Arc<Notify>>>>,
    /// Set by `UpdateAgent` when the agent should restart into a new binary.
    pub restart: Arc<tokio::sync::watch::Sender<bool>>,
    started: std::time::Instant,
    version: Option<String>,
    handlers: Arc<HashMap<CommandType, Arc<dyn CommandHandler>>>,
}

impl Executor {
    /// Uses `handlers` in place of the built-in ones for their types.
    pub fn with_handlers(mut self, handlers: Vec<Arc<dyn CommandHandler>>) -> Self {
        self.handlers = Arc::new(
            handlers
                .into_iter()
                .map(|h| (h.command_type(), h))
                .collect(),
        );
        self
    }

    /// An executor over `journal`.
    pub fn new(
        journal: Journal,
        settings: CommandSettings,
        version: Option<String>,
        restart: Arc<tokio::sync::watch::Sender<bool>>,
    ) -> Self {
        Self {
            journal,
            settings: Arc::new(settings),
            running: Default::default(),
            restart,
            started: std::time::Instant::now(),
            version,
            handlers: Arc::new(HashMap::new()),
        }
    }

    /// The journal.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// The settings.
    pub fn settings(&self) -> &CommandSettings {
        &self.settings
    }

    /// Answers commands that were running when the agent stopped: they are not run again
    /// (they may have had effects), and they are reported as failed.
    /// An `UpdateAgent` rolled back before this start ends `FAILED` with its reason; the one
    /// waiting for this binary to reconnect is left running (the channel confirms it).
    pub async fn recover(&self) -> crate::Result<()> {
        let binary = update_agent::binary_path(&self.settings).ok();
        if let Some(binary) = &binary {
            update_agent::settle(binary, &self.journal).await?;
        }
        let awaiting = binary.as_deref().and_then(update_agent::awaiting);
        for id in self.journal.interrupted().await? {
            if awaiting.as_ref() == Some(&id) {
                continue;
            }
            self.journal
                .finish(&failed(&id, "the agent stopped while the command ran"))
                .await?;
        }
        Ok(())
    }

    /// Accepts a command from the control plane.
    pub async fn accept(&self, envelope: CommandEnvelope) -> crate::Result<()> {
        let id = envelope.id.clone();
        if id.is_empty() || id.len() > 128 {
            return Ok(());
        }
        match self.journal.begin(&id).await? {
            Begin::Running => return Ok(()),
            Begin::Done(result) => {
                // A redelivery: the recorded answer again, never a second run.
                return self
                    .journal
                    .enqueue(&Frame::Result {
                        id: uuid::Uuid::new_v4().to_string(),
                        result,
                    })
                    .await;
            }
            Begin::New => {}
        }
        let kind = envelope.command.command_type();
        if self.settings.disabled.contains(&kind) {
            return self
                .journal
                .finish(&failed(
                    &id,
                    &format!("{} is disabled on this agent", kind.as_str()),
                ))
                .await;
        }
        let mut errors = fleet_core::ValidationErrors::default();
        envelope.command.validate(
            &fleet_core::Limits::default(),
            &fleet_core::validate::Path::Root,
            &mut errors,
        );
        if !errors.is_empty() {
            return self.journal.finish(&failed(&id, &errors.to_string())).await;
        }
        self.journal.status(&id, CommandStatus::InProgress).await?;
        let cancel = Arc::new(Notify::new());
        self.lock().insert(id.clone(), cancel.clone());
        let this = self.clone();
        tokio::spawn(async move {
            let output = Output::new(this.journal.clone(), &id);
            let mut result = this.execute(&id, &envelope.command, &output, &cancel).await;
            result.job_id = id.clone();
            this.lock().remove(&id);
            if envelope.command.command_type() == CommandType::UpdateAgent
                && result.status == CommandStatus::InProgress
            {
                // Installed: the command stays running until the new binary reconnects and
                // records COMPLETED, or the previous one comes back and records FAILED.
                this.restart.send_replace(true);
                return;
            }
            if let Err(err) = this.journal.finish(&result).await {
                tracing::error!(error = %err, command_id = %id, "cannot record a command result");
            }
        });
        Ok(())
    }

    /// Ids of the commands running now (a poll asks the control plane which to cancel).
    pub fn running_ids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Stops a running command (its process group is killed).
    pub fn cancel(&self, id: &str) {
        if let Some(cancel) = self.lock().get(id) {
            cancel.notify_one();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Notify>>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn execute(
        &self,
        id: &str,
        command: &Command,
        output: &Output,
        cancel: &Notify,
    ) -> CommandResult {
        let s = &self.settings;
        if let Some(handler) = self.handlers.get(&command.command_type()) {
            return handler.run(command, output, cancel).await;
        }
        match command {
            Command::RunCommand(run) => run::run(run, output, cancel, s.default_timeout).await,
            Command::DeployCompose(deploy) => compose::deploy(s, deploy, output, cancel).await,
            Command::StopCompose(project) => compose::stop(s, project, output, cancel).await,
            Command::Status(project) => compose::status(s, project, output, cancel).await,
            Command::HealthCheck => self.health(id),
            Command::UpdatePackage(update) => packages::update(s, update, output, cancel).await,
            Command::UpdateAgent(update) => {
                update_agent::update(s, id, update, output, cancel).await
            }
        }
    }

    fn health(&self, id: &str) -> CommandResult {
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default();
        let mut result = completed(id, "healthy");
        result.data = Some(serde_json::json!({
            "hostname": hostname,
            "agent_version": self.version.clone().unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned()),
            "uptime_secs": self.started.elapsed().as_secs(),
            // The others: this health check is running too, and an idle agent says 0.
            "running_commands": self.lock().keys().filter(|running| *running != id).count(),
        }));
        result
    }
}

/// A `COMPLETED` result.
pub fn completed(id: &str, logs: &str) -> CommandResult {
    CommandResult {
        job_id: id.to_owned(),
        status: CommandStatus::Completed,
        logs: logs.to_owned(),
        error: None,
        data: None,
        exit_code: None,
    }
}

/// A `FAILED` result.
pub fn failed(id: &str, error: &str) -> CommandResult {
    CommandResult {
        job_id: id.to_owned(),
        status: CommandStatus::Failed,
        logs: String::new(),
        error: Some(error.to_owned()),
        data: None,
        exit_code: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(vars: &[(&str, &str)]) -> crate::Result<CommandSettings> {
        CommandSettings::from_lookup(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        })
    }

    #[test]
    fn downgrades_are_refused_unless_the_agent_allows_them() {
        assert!(!settings(&[]).expect("valid").allow_downgrade);
        for (value, allowed) in [("true", true), ("ON", true), ("0", false), ("no", false)] {
            let read = settings(&[("AGENT_UPDATE_ALLOW_DOWNGRADE", value)]).expect("valid");
            assert_eq!(read.allow_downgrade, allowed, "{value}");
        }
    }

    #[test]
    fn an_unreadable_allow_downgrade_is_named_with_the_other_problems() {
        let Err(crate::Error::Config(problems)) = settings(&[
            ("AGENT_UPDATE_ALLOW_DOWNGRADE", "maybe"),
            ("AGENT_UPDATE_CONFIRM_SECS", "0"),
        ]) else {
            panic!("AGENT_UPDATE_ALLOW_DOWNGRADE=maybe was accepted");
        };
        assert_eq!(
            problems,
            [
                "AGENT_UPDATE_CONFIRM_SECS must be between 1 and 86400",
                "AGENT_UPDATE_ALLOW_DOWNGRADE must be true or false",
            ]
        );
    }
}
