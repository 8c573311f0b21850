//! The agent's `tracing` events, handed to Python's `logging`: logger `fleet`, a child per
//! target (`fleet_agent::sender` logs to `fleet.agent.sender`). Silent unless the program
//! configures logging, except for Python's last-resort handler, which prints WARNING and above
//! (a refused secret) to stderr.
//!
//! The subscriber is this extension module's global default: the `tracing` crate compiled into
//! it is its own, so nothing outside the module sees it, and nothing in it logs elsewhere.
//!
//! Only `tracing` events: records of the `log` crate (tungstenite, rustls) are not bridged.
//!
//! Cost: TRACE is never forwarded (a dependency may trace a credential; the fleet-agent
//! binary keeps tungstenite's handshake, with the live channel's token, out for that reason).
//! DEBUG is forwarded only while logger `fleet` is enabled for DEBUG, as read when an agent
//! starts or builds a heartbeat and whenever an event is forwarded; the check is an atomic
//! load, so the many DEBUG events of a quiet logger never wait for the GIL. INFO and above
//! (rare: a start, a stop, an outage, a refusal) take the GIL and ask the logger whether it
//! wants them before anything is formatted.

use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyCFunction, PyDict, PyTuple};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::{DefaultFields, Writer};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;

/// Python's `logging.DEBUG`.
const PY_DEBUG: u8 = 10;

static SUBSCRIBER: Once = Once::new();
/// Whether logger `fleet` wanted DEBUG records when last asked.
static DEBUG: AtomicBool = AtomicBool::new(false);
/// Set by an `atexit` hook: the interpreter is finalizing (or about to), so events are dropped
/// instead of waiting for a GIL that may never come back. `Python::try_attach` checks this
/// itself only when built for Python 3.13 and later; this module is built for the stable ABI.
static EXITING: AtomicBool = AtomicBool::new(false);
/// `logging.getLogger`, found (and the `atexit` hook registered) once.
static GET_LOGGER: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// Installs the bridge (once; later calls only look at the level of logger `fleet` again).
/// Called before any agent code runs: by `Agent.start()` and `Agent.heartbeat()`.
pub(crate) fn install(py: Python<'_>) {
    // Pure Rust inside the `Once`: another thread waiting on it cannot hold the GIL we need.
    SUBSCRIBER.call_once(|| {
        // Fails only if a default is already set, which nothing else in this module does.
        let _ = tracing::subscriber::set_global_default(
            tracing_subscriber::registry().with(PythonLogging),
        );
    });
    let debug = get_logger(py)
        .and_then(|get| get.call1(py, ("fleet",)))
        .and_then(|logger| logger.call_method1(py, "isEnabledFor", (PY_DEBUG,)))
        .and_then(|enabled| enabled.is_truthy(py));
    DEBUG.store(debug.unwrap_or(false), Ordering::Relaxed);
}

fn get_logger(py: Python<'_>) -> PyResult<&Py<PyAny>> {
    GET_LOGGER.get_or_try_init(py, || {
        // Registered after `logging` is imported, so it runs before `logging.shutdown` (atexit
        // runs its hooks last registered first): no record reaches a handler being closed.
        let get_logger = py.import("logging")?.getattr("getLogger")?.unbind();
        let exiting = PyCFunction::new_closure(
            py,
            Some(c"_fleet_log_bridge_exit"),
            None,
            |_: &Bound<'_, PyTuple>, _: Option<&Bound<'_, PyDict>>| {
                EXITING.store(true, Ordering::Release);
            },
        )?;
        py.import("atexit")?.call_method1("register", (exiting,))?;
        Ok(get_logger)
    })
}

/// The Python logger of a `tracing` target: `fleet_agent::sender` → `fleet.agent.sender`, a
/// dependency's `sqlx::query` → `fleet.sqlx.query`.
fn logger_name(target: &str) -> String {
    let dotted = target.replace("::", ".");
    match dotted.strip_prefix("fleet_") {
        Some(rest) => format!("fleet.{rest}"),
        None => format!("fleet.{dotted}"),
    }
}

fn python_level(level: &Level) -> Option<u8> {
    match *level {
        Level::ERROR => Some(40),
        Level::WARN => Some(30),
        Level::INFO => Some(20),
        Level::DEBUG => Some(PY_DEBUG),
        Level::TRACE => None,
    }
}

struct PythonLogging;

impl<S: Subscriber> Layer<S> for PythonLogging {
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        match *metadata.level() {
            Level::TRACE => Interest::never(),
            // Asked at each event: the answer changes with logger `fleet`'s level.
            Level::DEBUG => Interest::sometimes(),
            _ => Interest::always(),
        }
    }

    fn enabled(&self, metadata: &Metadata<'_>, _: Context<'_, S>) -> bool {
        match *metadata.level() {
            Level::TRACE => false,
            Level::DEBUG => DEBUG.load(Ordering::Relaxed),
            _ => true,
        }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::DEBUG)
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        forward(event);
    }
}

fn forward(event: &Event<'_>) {
    let Some(level) = python_level(event.metadata().level()) else {
        return;
    };
    if EXITING.load(Ordering::Acquire) {
        return;
    }
    // Re-entrant: an event emitted by a thread that holds the GIL goes straight through.
    let _ = Python::try_attach(|py| {
        // The hook runs holding the GIL: holding it now, we know it has not run yet.
        if EXITING.load(Ordering::Acquire) {
            return;
        }
        if let Err(err) = log(py, level, event) {
            // A filter or handler that raised: reported as Python reports an error it has
            // nowhere to raise, not lost.
            err.write_unraisable(py, None);
        }
    });
}

fn log(py: Python<'_>, level: u8, event: &Event<'_>) -> PyResult<()> {
    let metadata = event.metadata();
    let get_logger = get_logger(py)?;
    let logger = get_logger.call1(py, (logger_name(metadata.target()),))?;
    let logger = logger.bind(py);
    if level > PY_DEBUG {
        // Keep the DEBUG switch current for free while we hold the GIL.
        let debug = get_logger
            .call1(py, ("fleet",))?
            .call_method1(py, "isEnabledFor", (PY_DEBUG,))?
            .is_truthy(py)?;
        DEBUG.store(debug, Ordering::Relaxed);
    }
    if !logger.call_method1("isEnabledFor", (level,))?.is_truthy()? {
        return Ok(());
    }
    // The message and its fields, `key=value`, as the fleet-agent binary's log line has them.
    let mut message = String::new();
    let _ = DefaultFields::new().format_fields(Writer::new(&mut message), event);
    // The record names the Rust source line, not the (absent) Python caller, and the agent's
    // thread by its name rather than as a "Dummy" Python thread.
    let record = logger.call_method1(
        "makeRecord",
        (
            logger.getattr("name")?,
            level,
            metadata.file().unwrap_or("(unknown file)"),
            metadata.line().unwrap_or(0),
            message,
            PyTuple::empty(py),
            py.None(),
        ),
    )?;
    if let Some(name) = std::thread::current().name() {
        record.setattr("threadName", name)?;
    }
    logger.call_method1("handle", (record,))?;
    Ok(())
}
