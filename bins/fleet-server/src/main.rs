//! `fleet-server`: the fleet control plane.
//!
//! `fleet-server serve` reads the ERP control plane's environment variables (and flags) and
//! serves the API and dashboard; `fleet-server demo` starts a self-contained demo with
//! in-process agents.

mod config;
mod demo;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::response::IntoResponse as _;

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

/// How long a client may take to send a request's line and headers, counted from the
/// connection's start or the end of its previous request: hyper's usual value. Any real
/// client sends a few KiB of headers in one round trip, so 30 s only cuts off clients that
/// hold a connection open without finishing a request (slowloris). An idle keep-alive
/// connection is closed after as long; HTTP clients' pools (the agents') open a new one.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a request's body may take to arrive, counted from the end of its headers and
/// whatever pace the bytes come at. The largest bodies are polls and log uploads of up to
/// 8 MiB (`MAX_POLL_BYTES`): 60 s still lets them through at 140 KiB/s, and agents give up on
/// a request after their send timeout (10 s by default) anyway; holding 8 MiB of memory
/// longer is only of use to a client trickling bytes before any signature is checked.
const REQUEST_BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// Serves on `listener` until Ctrl-C or SIGTERM, then lets in-flight requests finish.
///
/// Connections are served with hyper directly, not `axum::serve`, which sets no timer and
/// so bounds neither the headers ([`HEADER_READ_TIMEOUT`]) nor the body
/// ([`REQUEST_BODY_TIMEOUT`]). HTTP/1 only: hyper-util's auto-detection of HTTP/2 waits for
/// the first bytes with no deadline (a connection sending nothing would stay open forever),
/// and no client of the control plane speaks HTTP/2 without TLS, which a proxy ends.
pub(crate) async fn run_server(
    mut listener: tokio::net::TcpListener,
    builder: ControlPlaneBuilder,
) -> Result<(), String> {
    let router = builder.build().map_err(|e| e.to_string())?;
    let address = listener
        .local_addr()
        .map_err(|e| format!("cannot read the listening address: {e}"))?;
    tracing::info!(%address, "fleet-server listening");
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            // axum's accept: refused or reset connections are skipped, and other errors
            // (out of file descriptors) logged and retried after a second.
            (io, peer) = axum::serve::Listener::accept(&mut listener) => {
                connections.spawn(serve_connection(
                    http.clone(),
                    io,
                    peer,
                    router.clone(),
                    stopping.clone(),
                ));
            }
            // Reaps ended connections, so the set holds only open ones.
            Some(_) = connections.join_next() => {}
            () = &mut signal => break,
        }
    }
    drop(listener);
    // Each connection finishes the request it is serving, then closes; upgraded ones
    // (WebSockets) are no longer hyper's and end with the process, as with axum::serve.
    let _ = stopping_tx.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Serves one connection from `peer` until it closes, or until `stopping` turns true and
/// its request in flight (if any) is answered.
async fn serve_connection(
    http: hyper::server::conn::http1::Builder,
    io: tokio::net::TcpStream,
    peer: SocketAddr,
    router: axum::Router,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let service = hyper::service::service_fn(move |request| handle(router.clone(), peer, request));
    let connection = http
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(connection);
    let stop = async move {
        // An error means the server is gone, which it only is once this has returned.
        let _ = stopping.wait_for(|stop| *stop).await;
    };
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = stop => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        // A header timeout, a malformed request or a client gone: the client's doing.
        tracing::debug!(%peer, %error, "connection ended");
    }
}

/// Answers one request with `router`; a body not received within [`REQUEST_BODY_TIMEOUT`]
/// gets 408 whatever the handler made of the failed read.
async fn handle(
    router: axum::Router,
    peer: SocketAddr,
    mut request: axum::http::Request<hyper::body::Incoming>,
) -> Result<axum::response::Response, std::convert::Infallible> {
    use tower::ServiceExt as _;
    // What axum's ConnectInfo extractor reads: the limit on failed role-token checks tells
    // clients apart by it.
    request
        .extensions_mut()
        .insert(axum::extract::ConnectInfo(peer));
    let expired = Arc::new(AtomicBool::new(false));
    let deadline = tokio::time::Instant::now() + REQUEST_BODY_TIMEOUT;
    // Kept for the log line; a Uri's clone shares its bytes.
    let (method, uri) = (request.method().clone(), request.uri().clone());
    let request = request.map(|inner| {
        axum::body::Body::new(DeadlineBody {
            inner,
            deadline,
            sleep: None,
            expired: expired.clone(),
        })
    });
    let Ok(response) = router.oneshot(request).await;
    if !expired.load(Ordering::Relaxed) {
        return Ok(response);
    }
    tracing::warn!(%peer, %method, path = uri.path(), "request body not received in time; answered 408");
    let message = format!(
        "the request body was not received within {} s",
        REQUEST_BODY_TIMEOUT.as_secs()
    );
    // The rest of the body is never read: the connection closes after the answer.
    Ok((
        axum::http::StatusCode::REQUEST_TIMEOUT,
        [(axum::http::header::CONNECTION, "close")],
        axum::Json(serde_json::json!({
            "error": { "code": "request_timeout", "message": message }
        })),
    )
        .into_response())
}

/// A request body that fails at `deadline`, however its bytes trickle in: a timeout
/// between chunks (tower-http's `RequestBodyTimeout`) would let a byte every few seconds
/// hold the connection and its buffer for as long as the sender likes.
struct DeadlineBody {
    inner: hyper::body::Incoming,
    deadline: tokio::time::Instant,
    /// Armed on the first read that has to wait, so a body already received costs no timer.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Set when the deadline passed, for [`handle`] to answer 408.
    expired: Arc<AtomicBool>,
}

impl hyper::body::Body for DeadlineBody {
    type Data = hyper::body::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        ready!(sleep.as_mut().poll(cx));
        this.expired.store(true, Ordering::Relaxed);
        Poll::Ready(Some(Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "request body not received in time",
        )
        .into())))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
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
