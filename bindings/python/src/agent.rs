//! `fleet.Agent`: the real agent (fleet-agent-lib) inside a Python process, on a background
//! thread with its own tokio runtime, with checks written as Python callables.

use std::collections::HashMap;
use std::sync::Mutex;
use std::thread::JoinHandle;

use fleet_agent::{Agent as RustAgent, AgentConfig, Check};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use tokio::sync::oneshot;

use crate::ConfigError;

/// A check whose probe calls a Python function: `None`/`True` passes, `False` fails, an
/// exception fails with its message.
struct PythonCheck {
    name: String,
    probe: Py<PyAny>,
}

#[async_trait::async_trait]
impl Check for PythonCheck {
    fn name(&self) -> &str {
        &self.name
    }

    async fn probe(&self) -> Result<(), String> {
        let probe = Python::attach(|py| self.probe.clone_ref(py));
        // The callable may block (a query, a socket): keep it off the runtime's thread.
        tokio::task::spawn_blocking(move || {
            Python::attach(|py| match probe.call0(py) {
                Ok(value) if value.is_none(py) => Ok(()),
                Ok(value) => match value.extract::<bool>(py) {
                    Ok(true) => Ok(()),
                    Ok(false) => Err("check returned False".to_owned()),
                    Err(_) => Err("check must return None, True or False".to_owned()),
                },
                Err(err) => Err(err.value(py).to_string()),
            })
        })
        .await
        .unwrap_or_else(|_| Err("check panicked".to_owned()))
    }

    fn protocol(&self) -> &str {
        "python"
    }
}

struct Running {
    stop: oneshot::Sender<()>,
    thread: JoinHandle<Result<(), String>>,
}

/// The fleet agent, embedded. Configure it with keyword arguments named after the agent's
/// environment variables in lower case (`instance_id=`, `control_plane_url=`, `secret=` for
/// `AGENT_SECRET`, `heartbeat_interval=` ...); with `use_env=True` (the default) anything not
/// given is read from `os.environ`.
#[pyclass(module = "fleet")]
pub struct Agent {
    settings: HashMap<String, String>,
    checks: Vec<(String, Py<PyAny>)>,
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
        for (key, value) in settings.into_iter().flatten() {
            let key: String = key.extract()?;
            if value.is_none() {
                all.remove(&variable_name(&key));
            } else {
                all.insert(variable_name(&key), setting_text(&value)?);
            }
        }
        // Validate now, so a bad setting fails at construction, naming every problem.
        config_from(&all)?;
        Ok(Self {
            settings: all,
            checks: Vec::new(),
            running: Mutex::new(None),
        })
    }

    /// Adds a check named `name` whose probe is `probe()`; usable as a decorator when
    /// `probe` is omitted.
    #[pyo3(signature = (name, probe=None))]
    fn add_check(
        slf: Bound<'_, Self>,
        name: String,
        probe: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        match probe {
            Some(probe) => {
                slf.borrow_mut().checks.push((name, probe.clone_ref(py)));
                Ok(probe)
            }
            None => {
                let agent: Py<Agent> = slf.unbind();
                let register = pyo3::types::PyCFunction::new_closure(
                    py,
                    None,
                    None,
                    move |args: &Bound<'_, PyTuple>, _| {
                        let probe: Py<PyAny> = args.get_item(0)?.unbind();
                        agent
                            .bind(args.py())
                            .borrow_mut()
                            .checks
                            .push((name.clone(), probe.clone_ref(args.py())));
                        Ok::<_, PyErr>(probe)
                    },
                )?;
                Ok(register.into_any().unbind())
            }
        }
    }

    /// Starts the agent on a background thread. Raises if it is already running or cannot
    /// start (the outbox cannot be opened, the local API cannot bind).
    fn start(&self, py: Python<'_>) -> PyResult<()> {
        let mut running = self
            .running
            .lock()
            .map_err(|_| PyRuntimeError::new_err("agent state poisoned"))?;
        if running.is_some() {
            return Err(PyRuntimeError::new_err("the agent is already running"));
        }
        let agent = self.build(py)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let thread = std::thread::Builder::new()
            .name("fleet-agent".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                runtime.block_on(async move {
                    let mut agent = agent;
                    if let Err(err) = agent.bind().await {
                        let _ = ready_tx.send(Err(err.to_string()));
                        return Err(err.to_string());
                    }
                    let _ = ready_tx.send(Ok(()));
                    agent
                        .run(async move {
                            let _ = stopped.await;
                        })
                        .await
                        .map_err(|e| e.to_string())
                })
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

    /// Stops the agent and waits for every task to finish. Does nothing when not running.
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
        let agent = self.build(py)?;
        let body = py.detach(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            Ok::<_, std::io::Error>(runtime.block_on(agent.heartbeat()).to_vec())
        })?;
        py.import("json")?
            .call_method1("loads", (String::from_utf8_lossy(&body).into_owned(),))
    }

    fn __enter__(slf: Bound<'_, Self>) -> PyResult<Bound<'_, Self>> {
        slf.borrow().start(slf.py())?;
        Ok(slf)
    }

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
    fn build(&self, py: Python<'_>) -> PyResult<RustAgent> {
        let mut builder = RustAgent::builder(config_from(&self.settings)?);
        for (name, probe) in &self.checks {
            builder = builder.check(PythonCheck {
                name: name.clone(),
                probe: probe.clone_ref(py),
            });
        }
        builder
            .build()
            .map_err(|e| ConfigError::new_err(e.to_string()))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // A forgotten agent must not keep running (or keep its thread) after the object dies.
        if let Ok(mut running) = self.running.lock()
            && let Some(Running { stop, thread }) = running.take()
        {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}

fn config_from(settings: &HashMap<String, String>) -> PyResult<AgentConfig> {
    AgentConfig::from_lookup(|name| settings.get(name).cloned())
        .map_err(|e| ConfigError::new_err(e.to_string()))
}
