//! `fleet-server`: the fleet control plane.
//!
//! `fleet-server serve` reads the ERP control plane's environment variables (and flags) and
//! serves the API and dashboard; `fleet-server demo` starts a self-contained demo with
//! in-process agents.

mod config;
mod demo;

use std::io::IsTerminal;
use std::net::SocketAddr;

use clap::{Parser, Subcommand};
use fleet_server::ControlPlaneBuilder;

// glibc's allocator spends a visible share of ingest time consolidating and freeing the
// many short-lived buffers of a request; mimalloc does not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "fleet-server", version, about = "The fleet control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the control plane, configured from the environment (see --help of each flag).
    Serve(Box<config::ServeArgs>),
    /// A one-command demo: SQLite in a data folder, a login token, and agents sending
    /// real signed heartbeats over loopback.
    Demo(demo::DemoArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // An invalid RUST_LOG is said once logging runs, not dropped in silence.
    let parsed = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .map(|v| tracing_subscriber::EnvFilter::try_new(v).map_err(|e| e.to_string()));
    let bad_filter = parsed.as_ref().and_then(|p| p.as_ref().err().cloned());
    tracing_subscriber::fmt()
        .with_env_filter(
            parsed
                .and_then(Result::ok)
                .unwrap_or_else(|| "info,sqlx=warn".into()),
        )
        // Logs on stderr, so that stdout holds only what a command prints for its user (the
        // demo's URL and token); colours only on a terminal, not in a journal or a file.
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if let Some(error) = bad_filter {
        tracing::warn!(%error, "RUST_LOG is not a valid log filter; logging at info,sqlx=warn");
    }
    let result = match Cli::parse().command {
        Command::Serve(args) => serve(*args).await,
        Command::Demo(args) => demo::run(args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("fleet-server: {message}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn serve(args: config::ServeArgs) -> Result<(), String> {
    let config = args.validate().map_err(|problems| {
        format!(
            "invalid configuration ({} problem{}):\n{}",
            problems.len(),
            if problems.len() == 1 { "" } else { "s" },
            problems
                .iter()
                .map(|p| format!("  - {p}"))
                .collect::<Vec<_>>()
                .join("\n")
        )
    })?;
    let store = fleet_server::store::open_with(&config.database_url, config.store)
        .await
        .map_err(|e| {
            format!(
                "cannot open the database {}: {e}",
                fleet_core::redact_url_password(&config.database_url)
            )
        })?;
    let mut live = config.live;
    if live.jwt_key.is_none() {
        // Enrolled agents' secrets derive from this key: it must outlive the process.
        let key = fleet_server::stored_jwt_key(&*store)
            .await
            .map_err(|e| format!("cannot read the agent token key from the database: {e}"))?;
        live.jwt_key = Some(key);
    }
    let builder = config.builder.live(live).shared_store(store);
    run_server(listen(config.listen).await?, builder).await
}

/// Binds `address`; the error says how to choose another.
pub(crate) async fn listen(address: SocketAddr) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(address).await.map_err(|e| {
        format!(
            "cannot listen on {address}: {e} (choose another address with --listen or FLEET_LISTEN)"
        )
    })
}

/// Serves on `listener` until Ctrl-C or SIGTERM, then lets in-flight requests finish.
pub(crate) async fn run_server(
    listener: tokio::net::TcpListener,
    builder: ControlPlaneBuilder,
) -> Result<(), String> {
    let router = builder.build().map_err(|e| e.to_string())?;
    let address = listener
        .local_addr()
        .map_err(|e| format!("cannot read the listening address: {e}"))?;
    tracing::info!(%address, "fleet-server listening");
    // The peer address tells clients apart for the limit on failed role-token checks.
    let service = router.into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, service)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(|e| format!("server error: {e}"))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}
