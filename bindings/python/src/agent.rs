//! `fleet.Agent`: the real agent (fleet-agent-lib) inside a Python process, on a background
//! thread with its own tokio runtime, with checks written as Python callables.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use fleet_agent::{Agent as RustAgent, AgentConfig, Check, CommandSettings};
use fleet_core::command::CommandType;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use tokio::sync::oneshot;

use crate::ConfigError;

/// A check whose probe calls a Python function: `None`/`True` passes, `False` fails, an
/// exception fails with its message. Clones share the call in flight, so every agent built
/// from one registration knows about it.
#[derive(Clone)]
struct PythonCheck {
    name: String,
    probe: Arc<Py<PyAny>>,
    // Set while a call runs. Python code cannot be interrupted, so a call that outlives the
    // check timeout keeps its thread; the next probes report it rather than start another.
    busy: Arc<AtomicBool>,
}

#[async_trait::async_trait]
impl Check for PythonCheck {
    fn name(&self) -> &str {
        &self.name
    }

    async fn probe(&self) -> Result<(), String> {
        if self.busy.swap(true, Ordering::AcqRel) {
            return Err("the previous call has not returned yet".to_owned());
        }
        let (done, outcome) = oneshot::channel();
        let probe = Arc::clone(&self.probe);
        let busy = Arc::clone(&self.busy);
        // A thread of its own rather than the runtime's blocking pool: the callable may block
        // (a query, a socket), and a runtime waits for its blocking tasks when it shuts down,
        // so one call that never returns would hang stop() for good.
        let spawned = std::thread::Builder::new()
            .name("fleet-check".into())
            .spawn(move || {
                let result = Python::try_attach(|py| call_probe(py, &probe))
                    .unwrap_or_else(|| Err("the Python interpreter is shutting down".to_owned()));
                busy.store(false, Ordering::Release);
                let _ = done.send(result);
            });
        if let Err(err) = spawned {
            self.busy.store(false, Ordering::Release);
            return Err(format!("cannot start a thread for the check: {err}"));
        }
        outcome
            .await
            .unwrap_or_else(|_| Err("check panicked".to_owned()))
    }

    fn protocol(&self) -> &str {
        "python"
    }
}

fn call_probe(py: Python<'_>, probe: &Py<PyAny>) -> Result<(), String> {
    match probe.call0(py) {
        Ok(value) if value.is_none(py) => Ok(()),
        Ok(value) => match value.extract::<bool>(py) {
            Ok(true) => Ok(()),
            Ok(false) => Err("check returned False".to_owned()),
            Err(_) => Err(format!(
                "check must return None, True or False, not {}",
                crate::type_name(value.bind(py))
            )),
        },
        Err(err) => Err(err.value(py).to_string()),
    }
}

struct Running {
    stop: oneshot::Sender<()>,
    thread: JoinHandle<Result<(), String>>,
}

/// The fleet agent, embedded. Configure it with keyword arguments named after the agent's
/// environment variables in lower case (`instance_id=`, `control_plane_url=`, `secret=` for
/// `AGENT_SECRET`, `heartbeat_interval=` ...); with `use_env=True` (the default) anything not
/// given is read from `os.environ`. Add checks, then run it with `with agent:` (or
/// start()/stop()).
///
/// The agent logs through the standard `logging` module, to logger `fleet` and its children
/// named after the Rust module (`fleet.agent.agent`, `fleet.agent.sender`, `fleet.sqlx.query`
/// ...), each message followed by its fields as `key=value`, as the fleet-agent binary logs
/// them. Nothing shows unless you configure logging, except WARNING and above, which Python's
/// last-resort handler prints to stderr: a refused AGENT_SECRET is logged at ERROR, naming the
/// HTTP 401, without the secret. INFO and above are forwarded; DEBUG only when logger `fleet`
/// is enabled for DEBUG when the agent starts (configure logging first).
///
/// With `agent_commands_enabled=True` (`AGENT_COMMANDS_ENABLED`) the agent also holds the live
/// channel: it hears the control plane's nudges for update, plugin and restore jobs at once,
/// and runs remote commands (`RunCommand`, compose deploys, package updates, health checks;
/// `agent_commands_disabled=` refuses some, `agent_projects_dir=` places compose projects).
/// `UpdateAgent` is always refused here: the host program owns its executable.
#[pyclass(module = "fleet")]
pub struct Agent {
    settings: HashMap<String, String>,
    checks: Vec<PythonCheck>,
    running: Mutex<Option<Running>>,
}

fn variable_name(key: &str) -> String {
    match key {
        "secret" => "AGENT_SECRET".to_owned(),
        other => other.to_ascii_uppercase(),
    }
}

fn setting_text(value: &Bound<'_, PyAny>) -> PyResult<String> {
    if let Ok(flag) = value.extract::<bool>() {
        return Ok(flag.to_string());
    }
    Ok(value.str()?.to_string())
}

/// The variables the agent's configuration reads: with nothing set (so every fallback is
/// asked too) and with `settings` (so anything read only because another is set counts).
fn variables_read(settings: &HashMap<String, String>) -> HashSet<String> {
    let read = RefCell::new(HashSet::new());
    for values in [&HashMap::new(), settings] {
        let lookup = |name: &str| {
            read.borrow_mut().insert(name.to_owned());
            values.get(name).cloned()
        };
        let _ = AgentConfig::from_lookup(lookup);
        let _ = CommandSettings::from_lookup(lookup);
    }
    read.into_inner()
}

/// A keyword the agent would silently ignore (a typo, or a variable it does not have) is a
/// TypeError, as an unknown keyword argument is in Python.
fn unknown_setting(py: Python<'_>, key: &str, known: &HashSet<String>) -> PyErr {
    let mut names: Vec<String> = known.iter().map(|v| v.to_ascii_lowercase()).collect();
    names.push("secret".to_owned());
    let hint = py
        .import("difflib")
        .and_then(|difflib| difflib.call_method1("get_close_matches", (key, names, 1)))
        .and_then(|close| close.extract::<Vec<String>>())
        .ok()
        .and_then(|close| close.into_iter().next())
        .map(|name| format!("; did you mean {name:?}?"))
        .unwrap_or_default();
    PyTypeError::new_err(format!(
        "Agent() got an unknown setting {key:?}: the agent reads no variable {}{hint}",
        variable_name(key)
    ))
}

#[pymethods]
impl Agent {
    #[new]
    #[pyo3(signature = (*, use_env=true, **settings))]
    fn new(py: Python<'_>, use_env: bool, settings: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let mut all = HashMap::new();
        if use_env {
            let environ = py.import("os")?.getattr("environ")?;
            for item in environ.call_method0("items")?.try_iter()? {
                let (k, v): (String, String) = item?.extract()?;
                all.insert(k, v);
            }
        }
        let mut given = Vec::new();
        for (key, value) in settings.into_iter().flatten() {
            let key: String = key.extract()?;
            if value.is_none() {
                all.remove(&variable_name(&key));
            } else {
                all.insert(variable_name(&key), setting_text(&value)?);
            }
            given.push(key);
        }
        let known = variables_read(&all);
        if let Some(key) = given.iter().find(|k| !known.contains(&variable_name(k))) {
            return Err(unknown_setting(py, key, &known));
        }
        // Validate now, so a bad setting fails at construction, naming every problem.
        config_from(&all)?;
        commands_from(&all)?;
        Ok(Self {
            settings: all,
            checks: Vec::new(),
            running: Mutex::new(None),
        })
    }

    /// Adds a check named `name` (1 to 128 bytes, no whitespace: `job_queue`; anything else
    /// raises ValueError) whose probe is `probe()`, a plain function: returning
    /// None or True passes, False or raising fails with the reason. It runs at every
    /// heartbeat on a thread of its own, limited to CHECK_TIMEOUT_MS (2 s by default); while
    /// a call has not returned, the check fails without calling again. Add checks before
    /// the agent starts. Usable as a decorator when `probe` is omitted.
    #[pyo3(signature = (name, probe=None))]
    fn add_check(
        slf: Bound<'_, Self>,
        name: String,
        probe: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        match probe {
            Some(probe) => {
                slf.borrow_mut().add(name, &probe)?;
                Ok(probe.unbind())
            }
            None => {
                // A bad name fails where the decorator is written, not where it is applied.
                slf.borrow().check_name(&name)?;
                let agent: Py<Agent> = slf.unbind();
                let register = pyo3::types::PyCFunction::new_closure(
                    py,
                    None,
                    None,
                    move |args: &Bound<'_, PyTuple>, _| {
                        let probe = args.get_item(0)?;
                        agent
                            .bind(args.py())
                            .borrow_mut()
                            .add(name.clone(), &probe)?;
                        Ok::<_, PyErr>(probe.unbind())
                    },
                )?;
                Ok(register.into_any().unbind())
            }
        }
    }

    /// Starts the agent on a background thread and returns once it runs. Raises if it is
    /// already running or cannot start (the outbox cannot be opened, the local API cannot
    /// bind).
    fn start(&self, py: Python<'_>) -> PyResult<()> {
        let mut running = self
            .running
            .lock()
            .map_err(|_| PyRuntimeError::new_err("agent state poisoned"))?;
        if running.is_some() {
            return Err(PyRuntimeError::new_err("the agent is already running"));
        }
        crate::log_bridge::install(py);
        let agent = self.build()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let thread = std::thread::Builder::new()
            .name("fleet-agent".into())
            .spawn(move || {
                let ready = ready_tx.clone();
                let outcome = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())
                    .and_then(|runtime| {
                        runtime
                            .block_on(agent.run(async move {
                                // `run` awaits its shutdown future only once the outbox is
                                // open, the local API bound and every task started.
                                let _ = ready.send(Ok(()));
                                let _ = stopped.await;
                            }))
                            .map_err(|e| e.to_string())
                    });
                if let Err(message) = &outcome {
                    // Raised by start(), unless it has already returned.
                    let _ = ready_tx.send(Err(message.clone()));
                }
                outcome
            })
            .map_err(|e| PyRuntimeError::new_err(format!("cannot start the agent thread: {e}")))?;
        match py.detach(move || ready_rx.recv()) {
            Ok(Ok(())) => {
                *running = Some(Running { stop, thread });
                Ok(())
            }
            Ok(Err(message)) => Err(PyRuntimeError::new_err(message)),
            Err(_) => Err(PyRuntimeError::new_err(
                "the agent thread ended before it was ready",
            )),
        }
    }

    /// Stops the agent and waits for every task to finish (a heartbeat not yet delivered
    /// stays in the outbox for the next start). Does nothing when not running.
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        let taken = self
            .running
            .lock()
            .map_err(|_| PyRuntimeError::new_err("agent state poisoned"))?
            .take();
        let Some(Running { stop, thread }) = taken else {
            return Ok(());
        };
        let _ = stop.send(());
        match py.detach(|| thread.join()) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(PyRuntimeError::new_err(message)),
            Err(_) => Err(PyRuntimeError::new_err("the agent thread panicked")),
        }
    }

    /// Whether the agent is running.
    #[getter]
    fn running(&self) -> bool {
        self.running.lock().map(|r| r.is_some()).unwrap_or(false)
    }

    /// Runs the checks and builds one heartbeat now, without sending it; returns it as a dict.
    fn heartbeat<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        crate::log_bridge::install(py);
        let agent = self.build()?;
        let body = py.detach(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            Ok::<_, std::io::Error>(runtime.block_on(agent.heartbeat()).to_vec())
        })?;
        py.import("json")?
            .call_method1("loads", (String::from_utf8_lossy(&body).into_owned(),))
    }

    /// Starts the agent (see start()).
    fn __enter__(slf: Bound<'_, Self>) -> PyResult<Bound<'_, Self>> {
        slf.borrow().start(slf.py())?;
        Ok(slf)
    }

    /// Stops the agent (see stop()).
    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, PyTuple>) -> PyResult<bool> {
        self.stop(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!(
            "Agent(instance_id={:?}, running={})",
            self.settings
                .get("INSTANCE_ID")
                .map(String::as_str)
                .unwrap_or(""),
            self.running()
        )
    }
}

impl Agent {
    fn build(&self) -> PyResult<RustAgent> {
        let mut builder = RustAgent::builder(config_from(&self.settings)?);
        if let Some(commands) = commands_from(&self.settings)? {
            builder = builder.commands(commands);
        }
        for check in &self.checks {
            builder = builder.check(check.clone());
        }
        builder
            .build()
            .map_err(|e| ConfigError::new_err(e.to_string()))
    }

    /// Refuses a name the heartbeat could not tell apart, and any check once running: the
    /// running agent keeps the checks it started with, so a later one would never run.
    fn check_name(&self, name: &str) -> PyResult<()> {
        if self.running() {
            return Err(PyRuntimeError::new_err(
                "add checks before the agent starts (before `with agent:` or start())",
            ));
        }
        if let Some(problem) = fleet_agent::checks::name_problem(name) {
            return Err(PyValueError::new_err(problem));
        }
        if self.checks.iter().any(|c| c.name == name) {
            return Err(PyValueError::new_err(format!(
                "a check named {name:?} is already added"
            )));
        }
        Ok(())
    }

    fn add(&mut self, name: String, probe: &Bound<'_, PyAny>) -> PyResult<()> {
        self.check_name(&name)?;
        if !probe.is_callable() {
            return Err(PyTypeError::new_err(format!(
                "a check's probe must be callable, not {}",
                crate::type_name(probe)
            )));
        }
        let inspect = probe.py().import("inspect")?;
        if inspect
            .call_method1("iscoroutinefunction", (probe,))?
            .is_truthy()?
        {
            // Its coroutine would need the service's event loop, which the check's thread
            // does not have; a plain function that does the work is what runs.
            return Err(PyTypeError::new_err(
                "a check's probe must be a plain function, not `async def`",
            ));
        }
        self.checks.push(PythonCheck {
            name,
            probe: Arc::new(probe.clone().unbind()),
            busy: Arc::new(AtomicBool::new(false)),
        });
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // A forgotten agent must not keep running (or keep its thread) after the object dies.
        if let Ok(mut running) = self.running.lock()
            && let Some(Running { stop, thread }) = running.take()
        {
            let _ = stop.send(());
            // Drop runs holding the GIL: let other Python threads run while the agent drains,
            // unless the interpreter is shutting down and cannot be entered.
            let mut thread = Some(thread);
            let _ = Python::try_attach(|py| py.detach(|| thread.take().map(JoinHandle::join)));
            if let Some(thread) = thread {
                let _ = thread.join();
            }
        }
    }
}

fn config_from(settings: &HashMap<String, String>) -> PyResult<AgentConfig> {
    AgentConfig::from_lookup(|name| settings.get(name).cloned())
        .map_err(|e| ConfigError::new_err(e.to_string()))
}

/// The live channel's settings when `AGENT_COMMANDS_ENABLED` is set to true, `None` when it is
/// not: a library inside a service dials out and runs remote commands only when asked to,
/// as the Rust library does. `UpdateAgent` is always refused: it replaces the running
/// executable (here the Python interpreter) and restarts the process, which the host
/// program owns.
fn commands_from(settings: &HashMap<String, String>) -> PyResult<Option<CommandSettings>> {
    let mut commands = CommandSettings::from_lookup(|name| settings.get(name).cloned())
        .map_err(|e| ConfigError::new_err(e.to_string()))?;
    let asked = settings
        .get("AGENT_COMMANDS_ENABLED")
        .is_some_and(|v| !v.trim().is_empty());
    if !asked || !commands.enabled {
        return Ok(None);
    }
    commands.disabled.insert(CommandType::UpdateAgent);
    Ok(Some(commands))
}
