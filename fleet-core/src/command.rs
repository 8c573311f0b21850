//! Remote commands, their results, log chunks, and the frames of the live channel.
//!
//! A command on the wire is `{id, type, payload}` (the InstaDeploy shape); a frame of the
//! WebSocket channel has the same three keys, so a command *is* a frame.
//!
//! The frames ([`Frame`]), by `type`:
//!
//! | `type` | direction | `payload` |
//! |---|---|---|
//! | a command type (`RunCommand`, `HEALTH_CHECK`, …) | control plane → agent | the command's |
//! | `result` | agent → control plane | [`CommandResult`] |
//! | `logs` | agent → control plane | [`LogBatch`] |
//! | `ack` | either way | [`Ack`] `{ids}` |
//! | `cancel` | control plane → agent | `{command_id}` |
//! | `error` | either way | `{message}` |
//! | `jobs_waiting` | control plane → agent, only to agents that announced it | `{pipelines: ["update", "plugin", "restore"]}` |
//!
//! A frame older agents cannot read (so far `jobs_waiting`) needs a capability, which the
//! agent lists in the handshake's [`CAPABILITIES_HEADER`] (`X-Agent-Capabilities:
//! jobs_waiting`, comma-separated; unknown entries are ignored, and a control plane that
//! knows no capabilities ignores the header). The control plane sends it only to agents that
//! listed it: an agent that predates a frame type reads it as a command of an unknown type
//! and answers a `FAILED` result for a command it never had.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::schema;
use crate::validate::{Limits, Path, Validate, ValidationErrors, check_id, check_len, check_text};

/// The seven command types, with their wire names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CommandType {
    /// Run a program.
    RunCommand,
    /// Replace the agent binary.
    UpdateAgent,
    /// Install, remove or upgrade host packages.
    UpdatePackage,
    /// Write and start a compose project.
    #[serde(rename = "DEPLOY_COMPOSE")]
    DeployCompose,
    /// Stop a compose project.
    #[serde(rename = "STOP_COMPOSE")]
    StopCompose,
    /// Report a compose project's containers.
    #[serde(rename = "STATUS")]
    Status,
    /// Report the agent's health.
    #[serde(rename = "HEALTH_CHECK")]
    HealthCheck,
}

impl CommandType {
    /// Every command type.
    pub const ALL: [CommandType; 7] = [
        Self::RunCommand,
        Self::UpdateAgent,
        Self::UpdatePackage,
        Self::DeployCompose,
        Self::StopCompose,
        Self::Status,
        Self::HealthCheck,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RunCommand => "RunCommand",
            Self::UpdateAgent => "UpdateAgent",
            Self::UpdatePackage => "UpdatePackage",
            Self::DeployCompose => "DEPLOY_COMPOSE",
            Self::StopCompose => "STOP_COMPOSE",
            Self::Status => "STATUS",
            Self::HealthCheck => "HEALTH_CHECK",
        }
    }

    /// Parses a wire name.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == text)
    }

    /// Whether the command only reads (ops may send it); the others need admin.
    pub fn is_read_only(self) -> bool {
        matches!(self, Self::Status | Self::HealthCheck)
    }
}

/// `RunCommand`: a program and its arguments, run without a shell unless `shell` is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunCommand {
    /// Program to run (or, with `shell`, the script).
    pub cmd: String,
    /// Arguments, passed as they are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Seconds before the whole process group is killed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_sec: Option<u64>,
    /// Extra environment variables.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub env: std::collections::BTreeMap<String, String>,
    /// Run `cmd` through `/bin/sh -c` (explicit opt-in).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shell: bool,
}

/// `UpdateAgent`: a new agent binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateAgent {
    /// Version being installed: SemVer, with or without a leading `v` ([`agent_version`]).
    /// The agent installs the binary only if it states this version for itself.
    pub version: String,
    /// Where to download it.
    pub url: String,
    /// Lowercase hex SHA-256 of the binary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Base64 Ed25519 signature of the binary's bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// A SemVer version, with or without a leading `v` (`1.4.0`, `v1.4.0-rc.1+build.5`): what
/// `UpdateAgent` names and what an agent binary states for itself with `--version`. Major,
/// minor and patch have at most 18 digits each, as [`AGENT_VERSION_PATTERN`] says.
pub fn agent_version(text: &str) -> Option<semver::Version> {
    const LIMIT: u64 = 1_000_000_000_000_000_000;
    let version = semver::Version::parse(text.strip_prefix('v').unwrap_or(text)).ok()?;
    [version.major, version.minor, version.patch]
        .iter()
        .all(|&n| n < LIMIT)
        .then_some(version)
}

/// [`agent_version`] as a JSON Schema pattern.
const AGENT_VERSION_PATTERN: &str = concat!(
    r"^v?(0|[1-9][0-9]{0,17})\.(0|[1-9][0-9]{0,17})\.(0|[1-9][0-9]{0,17})",
    r"(-(0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)(\.(0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*))*)?",
    r"(\+[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?$"
);

/// What `UpdatePackage` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PackageAction {
    /// Install packages.
    Install,
    /// Remove packages.
    Remove,
    /// Upgrade packages.
    Upgrade,
}

/// `UpdatePackage`: host packages through apt, dnf or apk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdatePackage {
    /// Package names.
    pub packages: Vec<String>,
    /// What to do with them.
    pub action: PackageAction,
}

/// `DEPLOY_COMPOSE`: a compose file for a project.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployCompose {
    /// Project name, `^[a-zA-Z0-9_-]+$`.
    pub project_name: String,
    /// The compose file, base64.
    pub compose_file_base64: String,
}

/// `STOP_COMPOSE` and `STATUS`: which project.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectRef {
    /// Project name, `^[a-zA-Z0-9_-]+$`.
    pub project_name: String,
}

/// A command with its typed payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// See [`RunCommand`].
    RunCommand(RunCommand),
    /// See [`UpdateAgent`].
    UpdateAgent(UpdateAgent),
    /// See [`UpdatePackage`].
    UpdatePackage(UpdatePackage),
    /// See [`DeployCompose`].
    DeployCompose(DeployCompose),
    /// Stop a project.
    StopCompose(ProjectRef),
    /// Status of a project.
    Status(ProjectRef),
    /// Health of the agent (payload `{}`).
    HealthCheck,
}

impl Command {
    /// The command's type.
    pub fn command_type(&self) -> CommandType {
        match self {
            Self::RunCommand(_) => CommandType::RunCommand,
            Self::UpdateAgent(_) => CommandType::UpdateAgent,
            Self::UpdatePackage(_) => CommandType::UpdatePackage,
            Self::DeployCompose(_) => CommandType::DeployCompose,
            Self::StopCompose(_) => CommandType::StopCompose,
            Self::Status(_) => CommandType::Status,
            Self::HealthCheck => CommandType::HealthCheck,
        }
    }

    /// Decodes a payload for `kind`; type errors name their path under `payload`.
    pub fn from_parts(kind: CommandType, payload: Value) -> Result<Self, ValidationErrors> {
        fn typed<T: serde::de::DeserializeOwned>(payload: Value) -> Result<T, ValidationErrors> {
            serde_path_to_error::deserialize(payload).map_err(|err| {
                let mut errors = ValidationErrors::default();
                let inner = err.path().to_string();
                let path = if inner == "." {
                    "payload".to_owned()
                } else {
                    format!("payload.{inner}")
                };
                errors.push(path, err.inner().to_string());
                errors
            })
        }
        Ok(match kind {
            CommandType::RunCommand => Self::RunCommand(typed(payload)?),
            CommandType::UpdateAgent => Self::UpdateAgent(typed(payload)?),
            CommandType::UpdatePackage => Self::UpdatePackage(typed(payload)?),
            CommandType::DeployCompose => Self::DeployCompose(typed(payload)?),
            CommandType::StopCompose => Self::StopCompose(typed(payload)?),
            CommandType::Status => Self::Status(typed(payload)?),
            CommandType::HealthCheck => Self::HealthCheck,
        })
    }

    /// The payload as JSON.
    pub fn payload(&self) -> Value {
        let value = match self {
            Self::RunCommand(p) => serde_json::to_value(p),
            Self::UpdateAgent(p) => serde_json::to_value(p),
            Self::UpdatePackage(p) => serde_json::to_value(p),
            Self::DeployCompose(p) => serde_json::to_value(p),
            Self::StopCompose(p) | Self::Status(p) => serde_json::to_value(p),
            Self::HealthCheck => Ok(Value::Object(Default::default())),
        };
        value.unwrap_or(Value::Null)
    }
}

/// Longest command line, argument or environment value of a `RunCommand`, in bytes.
const MAX_RUN_TEXT: usize = 64 * 1024;
/// Most arguments of a `RunCommand`.
const MAX_RUN_ARGS: usize = 1024;
/// Longest `timeout_sec` of a `RunCommand`: a week.
const MAX_RUN_TIMEOUT_SECS: u64 = 7 * 86_400;
/// Most packages of one `UpdatePackage`.
const MAX_PACKAGES: usize = 100;

impl Command {
    /// JSON Schema of the payload of `kind`, as [`Command::from_parts`] and the validation
    /// accept it (for the OpenAPI document).
    pub fn payload_schema(kind: CommandType) -> Value {
        let limits = Limits::default();
        let project =
            || serde_json::json!({ "type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$" });
        match kind {
            CommandType::RunCommand => {
                let mut cmd = schema::plain_text(MAX_RUN_TEXT);
                cmd["minLength"] = 1.into();
                schema::object(
                    &["cmd"],
                    &[
                        ("cmd", cmd),
                        (
                            "args",
                            serde_json::json!({ "type": "array", "maxItems": MAX_RUN_ARGS,
                                "items": schema::plain_text(MAX_RUN_TEXT) }),
                        ),
                        (
                            "timeout_sec",
                            schema::nullable(serde_json::json!({ "type": "integer",
                                "minimum": 1, "maximum": MAX_RUN_TIMEOUT_SECS })),
                        ),
                        (
                            "env",
                            serde_json::json!({ "type": "object",
                                "propertyNames": { "pattern": "^[A-Za-z_][A-Za-z0-9_]*$" },
                                "additionalProperties": schema::plain_text(MAX_RUN_TEXT) }),
                        ),
                        ("shell", serde_json::json!({ "type": "boolean" })),
                    ],
                )
            }
            CommandType::UpdateAgent => {
                let mut url = schema::plain_text(limits.max_text_len);
                url["pattern"] = format!("^https?://{}*$", schema::PLAIN_TEXT_CHAR).into();
                schema::object(
                    &["version", "url"],
                    &[
                        ("version", {
                            let mut version = schema::id();
                            version["pattern"] = AGENT_VERSION_PATTERN.into();
                            version
                        }),
                        ("url", url),
                        (
                            "sha256",
                            schema::nullable(
                                serde_json::json!({ "type": "string", "pattern": "^[0-9a-fA-F]{64}$" }),
                            ),
                        ),
                        (
                            "signature",
                            schema::nullable(serde_json::json!({ "type": "string" })),
                        ),
                    ],
                )
            }
            CommandType::UpdatePackage => {
                let name = serde_json::json!({ "type": "string", "maxLength": 128,
                    "pattern": "^[A-Za-z0-9]([A-Za-z0-9.+_:=-]*[A-Za-z0-9+])?$" });
                schema::object(
                    &["packages", "action"],
                    &[
                        (
                            "packages",
                            serde_json::json!({ "type": "array", "minItems": 1,
                                "maxItems": MAX_PACKAGES, "items": name }),
                        ),
                        (
                            "action",
                            schema::one_of(&[
                                PackageAction::Install,
                                PackageAction::Remove,
                                PackageAction::Upgrade,
                            ]),
                        ),
                    ],
                )
            }
            CommandType::DeployCompose => schema::object(
                &["project_name", "compose_file_base64"],
                &[
                    ("project_name", project()),
                    (
                        "compose_file_base64",
                        serde_json::json!({ "type": "string", "maxLength": limits.max_body_bytes }),
                    ),
                ],
            ),
            CommandType::StopCompose | CommandType::Status => {
                schema::object(&["project_name"], &[("project_name", project())])
            }
            // The payload is not read.
            CommandType::HealthCheck => serde_json::json!({}),
        }
    }
}

/// Whether `name` is a valid compose project name: `^[a-zA-Z0-9_-]+$`, at most 64 bytes.
pub fn is_valid_project_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Whether `name` is a safe package name for apt, dnf or apk: a letter or digit first (so
/// never an option such as `-oAPT::…`, nor an apt pattern `?…`/`~…`), then letters, digits
/// and `. + - _ : =` (`libstdc++6`, `python3.11`, `hello=2.10-3`, `hello:amd64`), no glob
/// characters, no `/` (a file or a release), and a letter, digit or `+` last: apt reads a
/// trailing `-` as "remove" (`install hello-` would remove hello) and a trailing `:` or `=`
/// is an empty architecture or version.
pub fn is_valid_package_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= 128
        && bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'-' | b'_' | b':' | b'=')
        })
        && name
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'+')
}

impl Validate for Command {
    fn validate(&self, limits: &Limits, at: &Path<'_>, errors: &mut ValidationErrors) {
        let payload = at.field("payload");
        let project = |errors: &mut ValidationErrors, name: &str| {
            if !is_valid_project_name(name) {
                errors.push(
                    payload.field("project_name").to_string(),
                    "must match ^[a-zA-Z0-9_-]+$ (at most 64)",
                );
            }
        };
        match self {
            Command::RunCommand(run) => {
                if run.cmd.is_empty() {
                    errors.push(payload.field("cmd").to_string(), "must not be empty");
                }
                check_text(errors, &payload.field("cmd"), &run.cmd, MAX_RUN_TEXT);
                check_len(errors, &payload.field("args"), &run.args, MAX_RUN_ARGS);
                let args = payload.field("args");
                for (i, arg) in run.args.iter().enumerate() {
                    check_text(errors, &args.index(i), arg, MAX_RUN_TEXT);
                }
                if run
                    .timeout_sec
                    .is_some_and(|t| t == 0 || t > MAX_RUN_TIMEOUT_SECS)
                {
                    errors.push(
                        payload.field("timeout_sec").to_string(),
                        "must be between 1 and 604800",
                    );
                }
                let env = payload.field("env");
                for (key, value) in &run.env {
                    let ok_key = !key.is_empty()
                        && !key.starts_with(|c: char| c.is_ascii_digit())
                        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                    if !ok_key {
                        errors.push(
                            env.field(key).to_string(),
                            "names must match ^[A-Za-z_][A-Za-z0-9_]*$",
                        );
                    }
                    check_text(errors, &env.field(key), value, MAX_RUN_TEXT);
                }
            }
            Command::UpdateAgent(update) => {
                let version = payload.field("version");
                let before = errors.paths().len();
                check_id(errors, &version, &update.version, limits.max_id_len);
                if errors.paths().len() == before && agent_version(&update.version).is_none() {
                    errors.push(
                        version.to_string(),
                        "must be a SemVer version such as 1.4.0 (a leading v is allowed)",
                    );
                }
                if !(update.url.starts_with("https://") || update.url.starts_with("http://")) {
                    errors.push(payload.field("url").to_string(), "must be an http(s) URL");
                }
                check_text(
                    errors,
                    &payload.field("url"),
                    &update.url,
                    limits.max_text_len,
                );
                if let Some(sha) = &update.sha256
                    && (sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()))
                {
                    errors.push(payload.field("sha256").to_string(), "must be 64 hex digits");
                }
            }
            Command::UpdatePackage(update) => {
                let list = payload.field("packages");
                if update.packages.is_empty() || update.packages.len() > MAX_PACKAGES {
                    errors.push(list.to_string(), "must name 1 to 100 packages");
                }
                for (i, name) in update.packages.iter().enumerate() {
                    if !is_valid_package_name(name) {
                        errors.push(list.index(i).to_string(), "is not a valid package name");
                    }
                }
            }
            Command::DeployCompose(deploy) => {
                project(errors, &deploy.project_name);
                if deploy.compose_file_base64.len() > limits.max_body_bytes {
                    errors.push(
                        payload.field("compose_file_base64").to_string(),
                        "too large",
                    );
                }
            }
            Command::StopCompose(p) | Command::Status(p) => project(errors, &p.project_name),
            Command::HealthCheck => {}
        }
    }
}

/// A command with its id: `{id, type, payload}` on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawFrame", into = "RawFrame")]
pub struct CommandEnvelope {
    /// Command id, unique per target; the agent runs an id at most once.
    pub id: String,
    /// What to do.
    pub command: Command,
}

impl CommandEnvelope {
    /// JSON Schema of a command as the control plane hands it to an agent (`{type, id,
    /// payload}`, in the answer of `POST /v1/agents/poll`): the payload's shape follows the
    /// type.
    pub fn json_schema() -> Value {
        let mut frame = schema::object(
            &["type", "id", "payload"],
            &[
                ("type", schema::one_of(&CommandType::ALL)),
                ("id", schema::id()),
                ("payload", serde_json::json!({ "type": "object" })),
            ],
        );
        frame["allOf"] = payload_by_type("type");
        frame
    }
}

/// The rules that tie `payload` to the command type named by the key `type_key`: each type's
/// [`Command::payload_schema`], and a payload required for every type but `HEALTH_CHECK`.
fn payload_by_type(type_key: &str) -> Value {
    let by_type: Vec<Value> = CommandType::ALL
        .iter()
        .map(|&kind| {
            let mut then = serde_json::json!({
                "properties": { "payload": Command::payload_schema(kind) }
            });
            if kind != CommandType::HealthCheck {
                then["required"] = serde_json::json!(["payload"]);
            }
            serde_json::json!({
                "if": { "required": [type_key],
                        "properties": { type_key: { "const": kind.as_str() } } },
                "then": then
            })
        })
        .collect();
    Value::Array(by_type)
}

/// Status of a command as the agent reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CommandStatus {
    /// Accepted, waiting its turn on the agent.
    Queued,
    /// Running.
    InProgress,
    /// Finished well.
    Completed,
    /// Finished badly (or refused).
    Failed,
}

impl CommandStatus {
    /// Whether the command has ended.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed)
    }
}

/// Per-target status of a submitted command, as the control plane tracks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetStatus {
    /// Waiting to be sent.
    Queued,
    /// Sent, no answer yet.
    Sent,
    /// The agent said `IN_PROGRESS`.
    Running,
    /// `COMPLETED`.
    Completed,
    /// `FAILED`.
    Failed,
    /// No answer within the deadline.
    TimedOut,
    /// Not sent: the command was cancelled or stopped by `max_errors`.
    Skipped,
    /// Cancelled while running.
    Cancelled,
}

/// The agent's answer to a command (the InstaDeploy response shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandResult {
    /// The command id (`unknown` when the command could not be read).
    pub job_id: String,
    /// Where it stands.
    pub status: CommandStatus,
    /// A short log; full output goes as log chunks.
    #[serde(default)]
    pub logs: String,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Structured result (container list, health figures, exit code, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    /// Exit code of the process, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

/// Which output stream a chunk belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl Stream {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        }
    }
}

/// How a chunk's `data` is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChunkEncoding {
    /// The bytes are UTF-8 text.
    #[default]
    Utf8,
    /// The bytes are not UTF-8; `data` is their base64.
    Base64,
}

/// Largest chunk of output, in bytes before encoding.
pub const MAX_CHUNK_BYTES: usize = 256 * 1024;

/// A piece of a command's output. Stored once per `(command_id, stream, offset)`; `offset`
/// counts bytes of that stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogChunk {
    /// The command.
    pub command_id: String,
    /// stdout or stderr.
    pub stream: Stream,
    /// Byte offset of `data` in the stream.
    pub offset: u64,
    /// The bytes, as text or base64.
    pub data: String,
    /// How `data` is written.
    #[serde(default, skip_serializing_if = "is_utf8")]
    pub encoding: ChunkEncoding,
}

fn is_utf8(encoding: &ChunkEncoding) -> bool {
    *encoding == ChunkEncoding::Utf8
}

impl LogChunk {
    /// A chunk of raw output bytes: text when they are UTF-8, base64 otherwise.
    pub fn from_bytes(
        command_id: impl Into<String>,
        stream: Stream,
        offset: u64,
        bytes: &[u8],
    ) -> Self {
        use base64::Engine;
        let (data, encoding) = match std::str::from_utf8(bytes) {
            Ok(text) => (text.to_owned(), ChunkEncoding::Utf8),
            Err(_) => (
                base64::engine::general_purpose::STANDARD.encode(bytes),
                ChunkEncoding::Base64,
            ),
        };
        Self {
            command_id: command_id.into(),
            stream,
            offset,
            data,
            encoding,
        }
    }

    /// The raw output bytes.
    pub fn bytes(&self) -> Option<Vec<u8>> {
        chunk_bytes(&self.data, self.encoding)
    }
}

/// Standard base64 as the decoder takes it: padded to 4 characters, and the bits past the
/// last byte zero.
const BASE64_PATTERN: &str =
    "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)?$";

/// The raw output bytes of a chunk's `data` written with `encoding`.
fn chunk_bytes(data: &str, encoding: ChunkEncoding) -> Option<Vec<u8>> {
    use base64::Engine;
    match encoding {
        ChunkEncoding::Utf8 => Some(data.as_bytes().to_vec()),
        ChunkEncoding::Base64 => base64::engine::general_purpose::STANDARD.decode(data).ok(),
    }
}

impl Validate for LogChunk {
    fn validate(&self, limits: &Limits, at: &Path<'_>, errors: &mut ValidationErrors) {
        check_id(
            errors,
            &at.field("command_id"),
            &self.command_id,
            limits.max_id_len,
        );
        match self.bytes() {
            None => errors.push(at.field("data").to_string(), "is not valid base64"),
            Some(bytes) if bytes.len() > MAX_CHUNK_BYTES => {
                errors.push(
                    at.field("data").to_string(),
                    format!("more than {MAX_CHUNK_BYTES} bytes"),
                );
            }
            Some(_) => {}
        }
    }
}

/// Body of `POST /v1/commands/logs`: several chunks of one command (agent-svc shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogBatch {
    /// The command.
    pub command_id: String,
    /// The chunks.
    pub chunks: Vec<BatchChunk>,
}

/// A chunk inside a [`LogBatch`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchChunk {
    /// Byte offset in the stream.
    pub offset: u64,
    /// stdout or stderr.
    pub stream: Stream,
    /// The bytes, as text or base64.
    pub data: String,
    /// How `data` is written.
    #[serde(default, skip_serializing_if = "is_utf8")]
    pub encoding: ChunkEncoding,
}

impl LogBatch {
    /// The batch as individual chunks.
    pub fn into_chunks(self) -> Vec<LogChunk> {
        let id = self.command_id;
        self.chunks
            .into_iter()
            .map(|c| LogChunk {
                command_id: id.clone(),
                stream: c.stream,
                offset: c.offset,
                data: c.data,
                encoding: c.encoding,
            })
            .collect()
    }
}

impl Validate for LogBatch {
    fn validate(&self, limits: &Limits, at: &Path<'_>, errors: &mut ValidationErrors) {
        check_id(
            errors,
            &at.field("command_id"),
            &self.command_id,
            limits.max_id_len,
        );
        check_len(errors, &at.field("chunks"), &self.chunks, 1024);
        let list = at.field("chunks");
        for (i, chunk) in self.chunks.iter().enumerate() {
            let item = list.index(i);
            if chunk_bytes(&chunk.data, chunk.encoding).is_none_or(|b| b.len() > MAX_CHUNK_BYTES) {
                errors.push(
                    item.field("data").to_string(),
                    "is not valid base64 or is too large",
                );
            }
        }
    }
}

impl LogBatch {
    /// JSON Schema of `POST /v1/commands/logs` (this batch plus the signing `instance_id`).
    pub fn json_schema() -> Value {
        let mut chunk = schema::object(
            &["offset", "stream", "data"],
            &[
                ("offset", schema::count()),
                ("stream", schema::one_of(&[Stream::Stdout, Stream::Stderr])),
                (
                    "data",
                    serde_json::json!({
                        "type": "string",
                        "description": format!("At most {MAX_CHUNK_BYTES} bytes of output once decoded.")
                    }),
                ),
                (
                    "encoding",
                    schema::one_of(&[ChunkEncoding::Utf8, ChunkEncoding::Base64]),
                ),
            ],
        );
        // Text is counted in characters here, bytes by the decoder: the byte limit is at
        // least as strict. Base64 text of the largest chunk is 4 characters per 3 bytes.
        let base64_len = MAX_CHUNK_BYTES.div_ceil(3) * 4;
        chunk["if"] = serde_json::json!({
            "required": ["encoding"],
            "properties": { "encoding": { "const": ChunkEncoding::Base64 } }
        });
        chunk["then"] = serde_json::json!({
            "properties": { "data": { "maxLength": base64_len, "pattern": BASE64_PATTERN } }
        });
        chunk["else"] = serde_json::json!({
            "properties": { "data": { "maxLength": MAX_CHUNK_BYTES } }
        });
        schema::object(
            &["instance_id", "command_id", "chunks"],
            &[
                ("instance_id", schema::id()),
                ("command_id", schema::id()),
                (
                    "chunks",
                    serde_json::json!({ "type": "array", "maxItems": 1024, "items": chunk }),
                ),
            ],
        )
    }
}

/// Acknowledgement of frames the agent sent, so it can forget them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Ids of the acknowledged frames.
    pub ids: Vec<String>,
}

/// The agent's job pipelines, each of which polls the control plane for its own jobs
/// (`POST /api/updates/next`, `/api/plugins/next`, `/api/restores/next`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pipeline {
    /// Update jobs of release rollouts.
    Update,
    /// Plugin jobs: of plugin rollouts, and of approved plugin requests.
    Plugin,
    /// Restore verifications.
    Restore,
}

impl Pipeline {
    /// Every pipeline.
    pub const ALL: [Pipeline; 3] = [Self::Update, Self::Plugin, Self::Restore];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Update => "update",
            Self::Plugin => "plugin",
            Self::Restore => "restore",
        }
    }

    /// Parses a wire name.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == text)
    }
}

/// The handshake header of `GET /v1/agents/connect` in which an agent lists what it
/// understands beyond the base protocol, comma-separated (`X-Agent-Capabilities`).
pub const CAPABILITIES_HEADER: &str = "x-agent-capabilities";

/// The capability of an agent that reads [`Frame::JobsWaiting`]: it is sent only to
/// agents that list it in [`CAPABILITIES_HEADER`].
pub const JOBS_WAITING: &str = "jobs_waiting";

/// Whether the values of a [`CAPABILITIES_HEADER`] (one per header line) list
/// `capability`. Entries are trimmed and compared without regard to case; unknown ones are
/// ignored.
pub fn lists_capability<'a>(values: impl IntoIterator<Item = &'a str>, capability: &str) -> bool {
    values
        .into_iter()
        .flat_map(|value| value.split(','))
        .any(|entry| entry.trim().eq_ignore_ascii_case(capability))
}

/// A frame of the live channel: `{type, id, payload}`.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// Control plane → agent: run this (the type is the command type).
    Command(CommandEnvelope),
    /// Agent → control plane: a command's status or result.
    Result {
        /// Frame id, acknowledged by the control plane.
        id: String,
        /// The result.
        result: CommandResult,
    },
    /// Agent → control plane: output.
    Logs {
        /// Frame id, acknowledged by the control plane.
        id: String,
        /// The chunks.
        batch: LogBatch,
    },
    /// Either way: these frame ids arrived and were stored.
    Ack {
        /// Frame id.
        id: String,
        /// What is acknowledged.
        ack: Ack,
    },
    /// Control plane → agent: stop a running command (kills its process group).
    Cancel {
        /// Frame id.
        id: String,
        /// The command to stop.
        command_id: String,
    },
    /// Either way: a frame was refused.
    Error {
        /// Id of the refused frame (`unknown` when unreadable).
        id: String,
        /// Why.
        message: String,
    },
    /// Control plane → agent, only to agents that announced [`JOBS_WAITING`]: jobs became
    /// available to these pipelines, so poll now rather than at the end of the interval. It
    /// carries no job; the poll stays the source of truth, and the only way a job is handed
    /// out. Pipeline names this agent does not know are left out when it is read.
    JobsWaiting {
        /// Frame id (not acknowledged).
        id: String,
        /// Which pipelines should poll.
        pipelines: Vec<Pipeline>,
    },
}

/// The three keys every frame has; used to read a frame before its payload is typed.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RawFrame {
    #[serde(rename = "type")]
    kind: String,
    id: String,
    #[serde(default)]
    payload: Value,
}

impl TryFrom<RawFrame> for CommandEnvelope {
    type Error = String;
    fn try_from(raw: RawFrame) -> Result<Self, String> {
        let kind = CommandType::parse(&raw.kind)
            .ok_or_else(|| format!("unknown command type {:?}", raw.kind))?;
        let command = Command::from_parts(kind, raw.payload).map_err(|e| e.to_string())?;
        Ok(Self {
            id: raw.id,
            command,
        })
    }
}

impl From<CommandEnvelope> for RawFrame {
    fn from(envelope: CommandEnvelope) -> Self {
        RawFrame {
            kind: envelope.command.command_type().as_str().to_owned(),
            payload: envelope.command.payload(),
            id: envelope.id,
        }
    }
}

impl Frame {
    /// Reads a frame. An unreadable frame yields an error that names the frame id when it
    /// could be read, else `unknown` (as the InstaDeploy agent answers).
    pub fn decode(bytes: &[u8]) -> Result<Self, (String, String)> {
        let raw: RawFrame = serde_json::from_slice(bytes)
            .map_err(|e| ("unknown".to_owned(), format!("invalid frame: {e}")))?;
        let id = raw.id.clone();
        let fail = |message: String| (id.clone(), message);
        match raw.kind.as_str() {
            "result" => Ok(Frame::Result {
                id: raw.id,
                result: serde_json::from_value(raw.payload).map_err(|e| fail(e.to_string()))?,
            }),
            "logs" => Ok(Frame::Logs {
                id: raw.id,
                batch: serde_json::from_value(raw.payload).map_err(|e| fail(e.to_string()))?,
            }),
            "ack" => Ok(Frame::Ack {
                id: raw.id,
                ack: serde_json::from_value(raw.payload).map_err(|e| fail(e.to_string()))?,
            }),
            "cancel" => Ok(Frame::Cancel {
                id: raw.id,
                command_id: raw
                    .payload
                    .get("command_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| fail("cancel needs payload.command_id".into()))?
                    .to_owned(),
            }),
            "error" => Ok(Frame::Error {
                id: raw.id,
                message: raw
                    .payload
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
            }),
            "jobs_waiting" => {
                // Read leniently: a pipeline added by a newer control plane is not a reason
                // to refuse the frame, and a nudge has nothing worth refusing for.
                let mut pipelines = Vec::new();
                let names = raw.payload.get("pipelines").and_then(Value::as_array);
                for name in names.into_iter().flatten().filter_map(Value::as_str) {
                    if let Some(pipeline) = Pipeline::parse(name)
                        && !pipelines.contains(&pipeline)
                    {
                        pipelines.push(pipeline);
                    }
                }
                Ok(Frame::JobsWaiting {
                    id: raw.id,
                    pipelines,
                })
            }
            _ => CommandEnvelope::try_from(raw)
                .map(Frame::Command)
                .map_err(fail),
        }
    }

    /// Writes a frame.
    pub fn encode(&self) -> Vec<u8> {
        let raw = match self.clone() {
            Frame::Command(envelope) => RawFrame::from(envelope),
            Frame::Result { id, result } => RawFrame {
                kind: "result".into(),
                id,
                payload: to_value(&result),
            },
            Frame::Logs { id, batch } => RawFrame {
                kind: "logs".into(),
                id,
                payload: to_value(&batch),
            },
            Frame::Ack { id, ack } => RawFrame {
                kind: "ack".into(),
                id,
                payload: to_value(&ack),
            },
            Frame::Cancel { id, command_id } => RawFrame {
                kind: "cancel".into(),
                id,
                payload: serde_json::json!({ "command_id": command_id }),
            },
            Frame::Error { id, message } => RawFrame {
                kind: "error".into(),
                id,
                payload: serde_json::json!({ "message": message }),
            },
            Frame::JobsWaiting { id, pipelines } => RawFrame {
                kind: "jobs_waiting".into(),
                id,
                payload: serde_json::json!({ "pipelines": pipelines }),
            },
        };
        serde_json::to_vec(&raw).unwrap_or_default()
    }
}

fn to_value<T: Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// Body of `POST /v1/commands/submit`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmitCommand {
    /// The command type.
    pub command_type: CommandType,
    /// Explicit instance ids.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
    /// Or a selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    /// The payload for the type.
    #[serde(default)]
    pub payload: Value,
    /// Most targets running at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    /// Stop sending to more targets once this many failed: `"3"` or `"10%"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_errors: Option<String>,
}

/// Which instances a command goes to, when not listed by id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selector {
    /// Instances on this release channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// Every instance.
    #[serde(default)]
    pub all: bool,
}

/// An error threshold: a count, or a percentage of the targets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Threshold {
    /// At most this many.
    Count(u32),
    /// At most this share of the total, in percent.
    Percent(f64),
}

impl Threshold {
    /// Parses `"3"` or `"10%"`.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        match text.strip_suffix('%') {
            Some(p) => p
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|p| (0.0..=100.0).contains(p))
                .map(Self::Percent),
            None => text.parse().ok().map(Self::Count),
        }
    }

    /// Whether `failed` out of `total` passes the threshold.
    pub fn exceeded(self, failed: u32, total: u32) -> bool {
        match self {
            Self::Count(max) => failed > max,
            Self::Percent(pct) => total > 0 && f64::from(failed) * 100.0 > pct * f64::from(total),
        }
    }
}

impl Validate for SubmitCommand {
    fn validate(&self, limits: &Limits, at: &Path<'_>, errors: &mut ValidationErrors) {
        let targets = at.field("targets");
        check_len(errors, &targets, &self.targets, limits.max_targets);
        for (i, target) in self.targets.iter().enumerate() {
            check_id(errors, &targets.index(i), target, limits.max_id_len);
        }
        if self.targets.is_empty()
            && self
                .selector
                .as_ref()
                .is_none_or(|s| !s.all && s.channel.is_none())
        {
            errors.push(
                targets.to_string(),
                "name targets or a selector (channel or all)",
            );
        }
        if let Some(channel) = self.selector.as_ref().and_then(|s| s.channel.as_deref()) {
            check_text(
                errors,
                &at.field("selector").field("channel"),
                channel,
                limits.max_id_len,
            );
        }
        if self.max_concurrency == Some(0) {
            errors.push(
                at.field("max_concurrency").to_string(),
                "must be at least 1",
            );
        }
        if self
            .max_errors
            .as_deref()
            .is_some_and(|t| Threshold::parse(t).is_none())
        {
            errors.push(
                at.field("max_errors").to_string(),
                "must be a count such as 3 or a percentage such as 10%",
            );
        }
        match Command::from_parts(self.command_type, self.payload.clone()) {
            Ok(command) => command.validate(limits, at, errors),
            Err(problems) => errors.violations.extend(problems.violations),
        }
    }
}

impl SubmitCommand {
    /// JSON Schema of this body (for the OpenAPI document): the payload's shape follows
    /// the command type, and the targets are listed or selected.
    pub fn json_schema() -> Value {
        let limits = Limits::default();
        let mut body = schema::object(
            &["command_type"],
            &[
                ("command_type", schema::one_of(&CommandType::ALL)),
                (
                    "targets",
                    serde_json::json!({ "type": "array", "maxItems": limits.max_targets, "items": schema::id() }),
                ),
                (
                    "selector",
                    schema::object(
                        &[],
                        &[
                            (
                                "channel",
                                schema::nullable(schema::plain_text(limits.max_id_len)),
                            ),
                            ("all", serde_json::json!({ "type": "boolean" })),
                        ],
                    ),
                ),
                ("payload", serde_json::json!({ "type": "object" })),
                (
                    "max_concurrency",
                    schema::nullable(
                        serde_json::json!({ "type": "integer", "minimum": 1, "maximum": u32::MAX }),
                    ),
                ),
                (
                    "max_errors",
                    schema::nullable(
                        serde_json::json!({ "type": "string", "pattern": "^\\s*[0-9]+(\\.[0-9]+)?\\s*%?\\s*$" }),
                    ),
                ),
            ],
        );
        body["allOf"] = payload_by_type("command_type");
        body["anyOf"] = serde_json::json!([
            { "required": ["targets"], "properties": { "targets": { "minItems": 1 } } },
            { "required": ["selector"], "properties": { "selector": { "anyOf": [
                { "required": ["channel"], "properties": { "channel": { "type": "string" } } },
                { "required": ["all"], "properties": { "all": { "const": true } } }
            ] } } }
        ]);
        body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names_are_names_never_options_patterns_or_paths() {
        for good in [
            "hello",
            "g++",
            "libstdc++6",
            "python3.11",
            "hello=2.10-3",
            "hello:amd64",
            "R",
        ] {
            assert!(is_valid_package_name(good), "{good}");
        }
        for bad in [
            "",
            "-oAPT::Get::Simulate=false",
            "--purge",
            "-y",
            "hello-",
            "hello:",
            "hello=",
            "?installed",
            "~nhello",
            "hello*",
            "hel?o",
            "hello[1]",
            "./hello.deb",
            "hello/bookworm",
            "hello world",
            "hello;reboot",
            "$(reboot)",
            "`reboot`",
            "hello\nreboot",
            "héllo",
        ] {
            assert!(!is_valid_package_name(bad), "{bad:?}");
        }
        assert!(!is_valid_package_name(&"a".repeat(129)));
    }
    use serde_json::json;

    #[test]
    fn command_envelope_has_the_instadeploy_shape() {
        let wire = json!({"id":"c1","type":"DEPLOY_COMPOSE","payload":{"project_name":"web","compose_file_base64":"eA=="}});
        let envelope: CommandEnvelope = serde_json::from_value(wire.clone()).expect("decodes");
        assert_eq!(envelope.command.command_type(), CommandType::DeployCompose);
        assert_eq!(serde_json::to_value(&envelope).expect("encodes"), wire);
        let health: CommandEnvelope =
            serde_json::from_value(json!({"id":"h","type":"HEALTH_CHECK","payload":{}}))
                .expect("decodes");
        assert_eq!(health.command, Command::HealthCheck);
    }

    #[test]
    fn frames_round_trip_and_unknown_types_fail_with_the_id() {
        let frame = Frame::Result {
            id: "f1".into(),
            result: CommandResult {
                job_id: "c1".into(),
                status: CommandStatus::Completed,
                logs: String::new(),
                error: None,
                data: None,
                exit_code: Some(0),
            },
        };
        assert_eq!(Frame::decode(&frame.encode()), Ok(frame));
        let err =
            Frame::decode(br#"{"type":"REBOOT","id":"x9","payload":{}}"#).expect_err("unknown");
        assert_eq!(err.0, "x9");
        assert_eq!(Frame::decode(b"not json").expect_err("bad").0, "unknown");
    }

    #[test]
    fn jobs_waiting_round_trips_and_reads_unknown_pipelines_as_absent() {
        let frame = Frame::JobsWaiting {
            id: "n1".into(),
            pipelines: vec![Pipeline::Update, Pipeline::Restore],
        };
        let wire: Value = serde_json::from_slice(&frame.encode()).expect("json");
        assert_eq!(
            wire,
            json!({"type": "jobs_waiting", "id": "n1", "payload": {"pipelines": ["update", "restore"]}})
        );
        assert_eq!(Frame::decode(&frame.encode()), Ok(frame));
        let newer = br#"{"type":"jobs_waiting","id":"n2","payload":{"pipelines":["plugin","backup","plugin",7]}}"#;
        assert_eq!(
            Frame::decode(newer),
            Ok(Frame::JobsWaiting {
                id: "n2".into(),
                pipelines: vec![Pipeline::Plugin],
            })
        );
        assert_eq!(
            Frame::decode(br#"{"type":"jobs_waiting","id":"n3"}"#),
            Ok(Frame::JobsWaiting {
                id: "n3".into(),
                pipelines: Vec::new(),
            })
        );
    }

    #[test]
    fn capabilities_are_a_comma_separated_list_over_header_lines() {
        assert!(lists_capability(["jobs_waiting"], JOBS_WAITING));
        assert!(lists_capability(
            ["future-thing, JOBS_WAITING ,x"],
            JOBS_WAITING
        ));
        assert!(lists_capability(["a", "b,jobs_waiting"], JOBS_WAITING));
        assert!(!lists_capability(["jobs_waiting_v2", ""], JOBS_WAITING));
        assert!(!lists_capability([], JOBS_WAITING));
    }

    #[test]
    fn payload_errors_name_their_path() {
        let err = Command::from_parts(CommandType::RunCommand, json!({"cmd": 5})).expect_err("bad");
        assert_eq!(err.paths(), ["payload.cmd"]);
    }

    #[test]
    fn thresholds() {
        assert_eq!(Threshold::parse("3"), Some(Threshold::Count(3)));
        assert_eq!(Threshold::parse("10%"), Some(Threshold::Percent(10.0)));
        assert_eq!(Threshold::parse("x"), None);
        assert!(Threshold::Count(1).exceeded(2, 10));
        assert!(!Threshold::Percent(20.0).exceeded(2, 10));
        assert!(Threshold::Percent(20.0).exceeded(3, 10));
    }

    #[test]
    fn binary_chunks_survive() {
        let chunk = LogChunk::from_bytes("c", Stream::Stdout, 0, &[0xff, 0x00, 0x41]);
        assert_eq!(chunk.encoding, ChunkEncoding::Base64);
        assert_eq!(chunk.bytes(), Some(vec![0xff, 0x00, 0x41]));
    }
}
