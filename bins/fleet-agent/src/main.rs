//! `fleet-agent`: reads the environment (the ERP instance agent's variables plus the Neon
//! agent's intervals and buffer settings), then runs the agent until SIGTERM or SIGINT.
//!
//! Exit codes: 0 after a clean shutdown, 2 for configuration problems (all named at once),
//! 1 for anything else.

use std::process::ExitCode;

use fleet_agent::{Agent, AgentConfig, Error};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }

    let config = match AgentConfig::from_env() {
        Ok(config) => config,
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
    let outcome = runtime.block_on(async {
        let agent = Agent::builder(config).build()?;
        agent.run(shutdown_signal()).await
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => report(&err),
    }
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
