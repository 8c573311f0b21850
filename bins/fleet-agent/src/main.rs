//! `fleet-agent`: reads the environment (the ERP instance agent's variables plus the Neon
//! agent's intervals and buffer settings), then runs the agent until SIGTERM or SIGINT.
//!
//! It takes no arguments but `--help` and `--version`. Exit codes: 0 after a clean shutdown,
//! 2 for configuration problems (all named at once) or an argument, 1 for anything else.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use fleet_agent::{Agent, AgentConfig, CommandSettings, Error};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::prelude::*;

/// What `--help` prints: the agent takes no arguments, so this says where its settings come
/// from and which ones it cannot start without.
const HELP: &str = "\
fleet-agent: sends signed heartbeats of this instance to the fleet control plane, keeps what
it could not send in a SQLite outbox, and runs updates, plugin changes, restore checks and
remote commands.

Usage: fleet-agent              configured by environment variables; runs until SIGTERM or SIGINT
       fleet-agent --help | --version

Required:
  INSTANCE_ID          the instance this agent speaks for
  CONTROL_PLANE_URL    the control plane's base URL (http:// or https://)
  AGENT_SECRET         the signing secret; or AGENT_ENROLLMENT_TOKEN (from `fleetctl enroll`)
                       with AGENT_SECRET_FILE, where the secret it is traded for is kept

Often set:
  HEARTBEAT_INTERVAL   seconds between heartbeats (default: HEARTBEAT_INTERVAL_MIN, 5 minutes)
  AGENT_STATE_PATH     the SQLite outbox (default: fleet-agent-state.db)
  DATABASE_URL, REDIS_URL, STORAGE_ENDPOINT, MEILI_HOST
                       the services whose health each heartbeat reports
  AGENT_SKIP_CHECKS    db, redis or both: checks not run where there is no such service
  AGENT_PORT, AGENT_BIND, AGENT_LOCAL_TOKEN
                       the local API (default: 127.0.0.1:4010)
  RUST_LOG, LOG_FORMAT=json
                       logging, to stderr

Every variable, with its default: the \"Environment\" section of fleet-agent-lib/README.md.
Exit status: 0 after SIGTERM or SIGINT, 2 for a configuration problem (all are named at
once), 1 for anything else.
";

/// `--help` and `--version` answer and end the process; any other argument is refused, since
/// a setting passed as an argument would otherwise be silently ignored.
fn answer_arguments() -> Option<ExitCode> {
    let first = std::env::args_os().nth(1)?;
    match first.to_str() {
        Some("-h" | "--help" | "help") => {
            print!("{HELP}");
            Some(ExitCode::SUCCESS)
        }
        Some("-V" | "--version") => {
            println!("fleet-agent {}", env!("CARGO_PKG_VERSION"));
            Some(ExitCode::SUCCESS)
        }
        _ => {
            eprintln!(
                "fleet-agent: unexpected argument {}: the agent is configured by environment \
                 variables (see fleet-agent --help)",
                first.to_string_lossy()
            );
            Some(ExitCode::from(2))
        }
    }
}

fn main() -> ExitCode {
    if let Some(code) = answer_arguments() {
        return code;
    }
    // An invalid RUST_LOG is said once logging runs, not dropped in silence.
    let parsed = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .map(|v| EnvFilter::try_new(v).map_err(|e| e.to_string()));
    let bad_filter = parsed.as_ref().and_then(|p| p.as_ref().err().cloned());
    let filter = parsed
        .and_then(Result::ok)
        .unwrap_or_else(|| EnvFilter::new("info"));
    // tungstenite logs the whole handshake request at trace, with the live channel's
    // `Authorization: Bearer <JWT>`: a second filter holds it at debug at most, whatever
    // RUST_LOG says, without raising it above what RUST_LOG asks.
    let no_handshake_trace = Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_target("tungstenite", LevelFilter::DEBUG);
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let logs = tracing_subscriber::registry()
        .with(filter)
        .with(no_handshake_trace);
    if json {
        logs.with(lines.json()).init();
    } else {
        logs.with(lines).init();
    }
    if let Some(error) = bad_filter {
        tracing::warn!(%error, "RUST_LOG is not a valid log filter; logging at info");
    }

    let commands = match CommandSettings::from_lookup(|name| std::env::var(name).ok()) {
        Ok(commands) => commands,
        Err(Error::Config(mut problems)) => {
            // The agent's own settings are read too, so that every problem is named at once.
            let token = env_value("AGENT_ENROLLMENT_TOKEN");
            if let Err(Error::Config(more)) = read_config(token.as_deref()) {
                problems.extend(more);
            }
            return report(&Error::Config(problems));
        }
        Err(err) => return report(&err),
    };
    // One thread: the agent waits on timers and sockets almost all the time, and a single
    // thread keeps its memory and wake-ups low.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("fleet-agent: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    use fleet_agent::commands::update_agent::{self, Start};
    let binary = update_agent::binary_path(&commands).ok();
    if let Some(nonce) = std::env::var(update_agent::TRIAL_ENV)
        .ok()
        .filter(|n| !n.is_empty())
    {
        return runtime.block_on(trial(&commands, &nonce));
    }
    // Before anything that could crash: a new binary counts its starts, and the previous
    // one comes back when it keeps failing or missed its deadline.
    let confirm_by = match &binary {
        Some(binary) => match update_agent::on_start(binary, fleet_core_now()) {
            Start::RolledBack => return restart(binary),
            Start::Run { confirm_by } => confirm_by,
        },
        None => None,
    };
    let outcome = runtime.block_on(async {
        let config = load_config(commands.enrollment_token.as_deref()).await?;
        let agent = Agent::builder(config).commands(commands).build()?;
        let mut restart = agent.restart_signal();
        let (why_tx, why_rx) = std::sync::mpsc::channel();
        let deadline_binary = binary.clone();
        agent
            .run(async move {
                tokio::select! {
                    _ = shutdown_signal() => {}
                    _ = restart.wait_for(|r| *r) => {
                        tracing::info!("restarting into the new binary");
                        let _ = why_tx.send(true);
                    }
                    _ = confirm_deadline(confirm_by) => {
                        if let Some(binary) = &deadline_binary
                            && update_agent::rollback_unconfirmed(binary) == Start::RolledBack
                        {
                            tracing::warn!("update not confirmed in time; back to the previous binary");
                            let _ = why_tx.send(true);
                        }
                    }
                }
            })
            .await?;
        Ok(why_rx.try_recv().unwrap_or(false))
    });
    match (outcome, &binary) {
        (Ok(true), Some(binary)) => restart(binary),
        (Ok(_), _) => ExitCode::SUCCESS,
        (Err(err), _) => report(&err),
    }
}

/// The trial run of a downloaded binary: registers and opens the live channel, prints the
/// proof for `nonce` and exits 0 (anything else makes the running agent keep its binary).
async fn trial(commands: &CommandSettings, nonce: &str) -> ExitCode {
    let config = match load_config(commands.enrollment_token.as_deref()).await {
        Ok(config) => config,
        Err(err) => return report(&err),
    };
    let http = match fleet_agent::channel::HttpClient::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
    {
        Ok(http) => http,
        Err(err) => {
            eprintln!("fleet-agent: trial: {err}");
            return ExitCode::FAILURE;
        }
    };
    let version = config
        .version
        .clone()
        .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned());
    match fleet_agent::channel::trial(
        &http,
        &config.control_plane_url,
        &config.instance_id,
        &config.secret,
        &version,
        commands.update_confirm_within,
    )
    .await
    {
        Ok(()) => {
            println!(
                "{}",
                fleet_agent::commands::update_agent::trial_proof(nonce)
            );
            eprintln!("fleet-agent: trial: the live channel opened");
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("fleet-agent: trial: {why}");
            ExitCode::FAILURE
        }
    }
}

fn fleet_core_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// Completes when an installed update's confirmation deadline passes (never otherwise).
async fn confirm_deadline(confirm_by: Option<i64>) {
    let Some(deadline) = confirm_by else {
        return std::future::pending().await;
    };
    let wait = u64::try_from(deadline - fleet_core_now()).unwrap_or(0);
    tokio::time::sleep(std::time::Duration::from_secs(wait + 1)).await;
}

/// Reads the configuration; on first start with `AGENT_ENROLLMENT_TOKEN`, trades the token
/// for the instance's secret (stored 0600 at `AGENT_SECRET_FILE`) once the rest of the
/// configuration is known to be good, so that a token is never spent by an agent that cannot
/// start.
async fn load_config(enrollment_token: Option<&str>) -> Result<AgentConfig, Error> {
    let (config, enroll_into) = read_config(enrollment_token)?;
    let (Some(path), Some(token)) = (enroll_into, enrollment_token) else {
        return Ok(config);
    };
    if config.control_plane_in_clear() {
        tracing::warn!(
            "enrolling over plain http:// with another host: the secret issued to this agent \
             crosses the network unencrypted; use https://"
        );
    }
    let secret =
        fleet_agent::enroll::enroll(&config.control_plane_url, &config.instance_id, token, &path)
            .await?;
    config_with_secret(Some(secret))
}

/// The configuration, every problem named at once, and the file to keep the secret in when
/// `enrollment_token` is still to be traded for it (the configuration's secret is then a
/// stand-in that is never used).
///
/// The secret is `AGENT_SECRET`, else the one kept at `AGENT_SECRET_FILE`.
fn read_config(enrollment_token: Option<&str>) -> Result<(AgentConfig, Option<PathBuf>), Error> {
    let secret_file = env_value("AGENT_SECRET_FILE").map(PathBuf::from);
    let mut secret = env_value("AGENT_SECRET");
    let mut problems = Vec::new();
    let mut enroll_into = None;
    match (&secret, &secret_file, enrollment_token) {
        (Some(_), _, _) => {}
        (None, Some(path), token) => match fleet_agent::enroll::stored_secret(path) {
            Ok(Some(stored)) => secret = Some(stored),
            Ok(None) if token.is_some() => enroll_into = Some(path.clone()),
            Ok(None) => problems.push(format!(
                "AGENT_SECRET_FILE {} holds no secret yet: set AGENT_ENROLLMENT_TOKEN to \
                 enroll, or AGENT_SECRET",
                path.display()
            )),
            Err(err) => problems.push(format!("AGENT_SECRET_FILE {}: {err}", path.display())),
        },
        (None, None, Some(_)) => problems.push(
            "AGENT_ENROLLMENT_TOKEN needs AGENT_SECRET_FILE, where the secret it is traded for \
             is kept"
                .to_owned(),
        ),
        (None, None, None) => {}
    }
    let stand_in = enroll_into
        .as_ref()
        .map(|_| "enrollment pending".to_owned());
    match config_with_secret(secret.or(stand_in)) {
        Ok(config) if problems.is_empty() => Ok((config, enroll_into)),
        Ok(_) => Err(Error::Config(problems)),
        Err(Error::Config(mut first)) => {
            first.extend(problems);
            Err(Error::Config(first))
        }
        Err(err) => Err(err),
    }
}

/// The configuration from the environment, with `secret` as `AGENT_SECRET`.
fn config_with_secret(secret: Option<String>) -> Result<AgentConfig, Error> {
    AgentConfig::from_lookup(|name| {
        if name == "AGENT_SECRET" {
            secret.clone()
        } else {
            std::env::var(name).ok()
        }
    })
}

/// A variable's value, taken as it is (a secret's bytes matter); empty counts as unset.
fn env_value(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Replaces this process with the (new or restored) binary at `binary`, same arguments.
/// The path is the one read at start: once the file is replaced, `/proc/self/exe` names the
/// deleted old one.
fn restart(binary: &std::path::Path) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(binary)
        .args(std::env::args_os().skip(1))
        .exec();
    eprintln!("fleet-agent: cannot restart: {err}");
    ExitCode::FAILURE
}

fn report(err: &Error) -> ExitCode {
    match err {
        Error::Config(problems) => {
            eprintln!("fleet-agent: invalid configuration:");
            for problem in problems {
                eprintln!("  - {problem}");
            }
            ExitCode::from(2)
        }
        other => {
            eprintln!("fleet-agent: {other}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on SIGTERM (systemd, container engines) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
            }
        }
        Err(err) => {
            tracing::warn!(error = %err, "cannot listen for SIGTERM; only SIGINT stops the agent");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
