#![doc = include_str!("../README.md")]

pub mod agent;
pub mod channel;
pub mod checks;
/// Wall-clock text (RFC 3339, HTTP dates); the module lives in fleet-core.
pub use fleet_core::clock;
pub mod collectors;
pub mod commands;
pub mod config;
pub mod containers;
pub mod enroll;
pub mod env;
pub mod job_state;
mod jobs;
pub mod local_api;
pub mod logstream;
pub mod metrics;
pub mod outbox;
pub mod pipeline;
mod pipelines;
pub mod plugins;
/// The Prometheus text parser, kept sans-I/O in fleet-core so it can be fuzzed alone.
pub use fleet_core::prometheus;
pub mod regional;
pub mod restores;
pub mod sender;
pub mod updates;

pub use agent::{Agent, AgentBuilder};
/// Re-exported so implementations of [`Check`] and [`Collector`] need no extra dependency.
pub use async_trait::async_trait;
pub use checks::{Check, HttpCheck, PostgresCheck, RedisCheck, TcpCheck};
pub use collectors::Collector;
pub use commands::{CommandHandler, CommandSettings};
pub use config::{AgentConfig, PluginSettings, RegionalEndpoint, RestoreSettings, UpdateSettings};
pub use pipeline::{ShellRunner, Step, StepOutcome, StepRunner};

/// Everything that can go wrong in the agent library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Configuration values that cannot be used; each entry names one problem.
    #[error("invalid configuration: {}", .0.join("; "))]
    Config(Vec<String>),
    /// The outbox database could not be opened or written.
    #[error("outbox storage: {0}")]
    Store(#[from] sqlx::Error),
    /// A file of the agent's state ([`AgentConfig::state_path`], or the command journal
    /// beside it) could not be opened: named, so that a wrong or unwritable
    /// `AGENT_STATE_PATH` is found at once.
    #[error("cannot open the agent's state file {} (AGENT_STATE_PATH): {source}", path.display())]
    State {
        /// The file.
        path: std::path::PathBuf,
        /// Why it could not be opened.
        source: Box<Error>,
    },
    /// The local API could not bind its address.
    #[error("cannot bind local API on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// Why the bind failed.
        source: std::io::Error,
    },
    /// An HTTP client could not be built.
    #[error("http client: {0}")]
    Http(#[from] reqwest::Error),
    /// Any other I/O failure.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Error {
    /// This error, as met while opening the state file at `path`.
    pub(crate) fn opening_state(self, path: &std::path::Path) -> Self {
        Self::State {
            path: path.to_owned(),
            source: Box::new(self),
        }
    }
}

/// `Result` with the agent's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
