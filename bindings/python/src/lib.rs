//! `import fleet`: fleet-core's signer, verifier, heartbeat validation and manifest
//! verification for Python. The Python package (`python/fleet/__init__.py`) re-exports
//! these names and carries the type stubs.

use std::borrow::Cow;
use std::collections::HashMap;

mod agent;
mod log_bridge;

use fleet_core::signing::{SignatureHeaders, constant_time_eq};
use fleet_core::{
    DecodeError, Heartbeat, Limits, ManifestVerifier, PublicKey, Secret, SecretResolver,
};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyList, PyMemoryView, PyString};

create_exception!(
    _fleet,
    FleetError,
    PyException,
    "Base class of every fleet error."
);
create_exception!(
    _fleet,
    InvalidSignature,
    FleetError,
    "A signed request was refused; `.kind` says why (e.g. 'signature_mismatch')."
);
create_exception!(
    _fleet,
    ValidationError,
    FleetError,
    "A payload is invalid; `.errors` lists (path, message) pairs, `.paths` the paths."
);
create_exception!(
    _fleet,
    PayloadTooLarge,
    ValidationError,
    "A payload is larger than the limit."
);
create_exception!(
    _fleet,
    ManifestError,
    FleetError,
    "A release manifest was refused; `.kind` says why."
);
create_exception!(
    _fleet,
    ConfigError,
    FleetError,
    "Secrets or keys that cannot be used."
);

fn secret(text: &str) -> PyResult<Secret> {
    Secret::new(text).map_err(|e| ConfigError::new_err(e.to_string()))
}

fn with_kind(py: Python<'_>, err: PyErr, kind: &str) -> PyErr {
    // Attributes on the exception instance let callers branch without parsing text.
    let _ = err.value(py).setattr("kind", kind);
    err
}

fn signature_error(py: Python<'_>, err: fleet_core::SignatureError) -> PyErr {
    with_kind(py, InvalidSignature::new_err(err.to_string()), err.kind())
}

/// v0 signature: lowercase hex HMAC-SHA256 of `body` (the ERP instance agent's scheme).
#[pyfunction]
fn sign_v0(secret_text: &str, body: &[u8]) -> PyResult<String> {
    Ok(fleet_core::sign_v0(&secret(secret_text)?, body))
}

/// Reads headers given as a mapping (a dict, or a web framework's headers object: anything
/// with `items()`) or as (name, value) pairs, such as ASGI's raw headers. Names match
/// case-insensitively; bytes are read as Latin-1, as HTTP defines.
fn header_map(headers: &Bound<'_, PyAny>) -> PyResult<HashMap<String, String>> {
    let not_headers = || {
        PyTypeError::new_err(format!(
            "headers must be a mapping or (name, value) pairs, not {}",
            type_name(headers)
        ))
    };
    // Text is iterable too, but one character at a time: refuse it with the same message.
    if headers.is_instance_of::<PyString>() || headers.is_instance_of::<PyBytes>() {
        return Err(not_headers());
    }
    let pairs = if headers.hasattr("items")? {
        headers.call_method0("items")?
    } else {
        headers.clone()
    };
    let mut out = HashMap::new();
    for item in pairs.try_iter().map_err(|_| not_headers())? {
        let (name, value): (Bound<'_, PyAny>, Bound<'_, PyAny>) =
            item?.extract().map_err(|_| not_headers())?;
        out.insert(
            header_text(&name)?.to_ascii_lowercase(),
            header_text(&value)?,
        );
    }
    Ok(out)
}

fn header_text(value: &Bound<'_, PyAny>) -> PyResult<String> {
    if let Ok(bytes) = value.cast::<PyBytes>() {
        return Ok(bytes.as_bytes().iter().copied().map(char::from).collect());
    }
    value.extract().map_err(|_| {
        PyTypeError::new_err(format!(
            "header names and values must be str or bytes, not {}",
            type_name(value)
        ))
    })
}

fn type_name(value: &Bound<'_, PyAny>) -> String {
    value
        .get_type()
        .name()
        .map_or_else(|_| "?".to_owned(), |name| name.to_string())
}

fn signature_headers(map: &HashMap<String, String>) -> SignatureHeaders<'_> {
    SignatureHeaders::from_lookup(|name| map.get(name).map(String::as_str))
}

fn now_or(now: Option<i64>) -> i64 {
    now.unwrap_or_else(fleet_core::unix_now)
}

/// Signs messages with one secret (v1 Standard Webhooks headers, or v0).
#[pyclass(frozen, module = "fleet")]
struct Signer {
    inner: fleet_core::Signer,
}

#[pymethods]
impl Signer {
    #[new]
    fn new(secret_text: &str) -> PyResult<Self> {
        Ok(Self {
            inner: fleet_core::Signer::new(secret(secret_text)?),
        })
    }

    /// The `webhook-signature` value for `{msg_id}.{timestamp}.{body}`.
    fn sign(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        self.inner.sign(msg_id, timestamp, body)
    }

    /// The three v1 headers as a dict; `timestamp` defaults to now.
    #[pyo3(signature = (msg_id, body, timestamp=None))]
    fn headers<'py>(
        &self,
        py: Python<'py>,
        msg_id: &str,
        body: &[u8],
        timestamp: Option<i64>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let signed = self.inner.headers(msg_id, now_or(timestamp), body);
        let dict = PyDict::new(py);
        for (name, value) in signed.pairs() {
            dict.set_item(name, value)?;
        }
        Ok(dict)
    }

    /// The v0 `x-agent-signature` value.
    fn sign_v0(&self, body: &[u8]) -> String {
        self.inner.sign_v0(body)
    }

    /// Verifies v1 headers (a mapping or (name, value) pairs) against this secret at unix
    /// time `now` (default: the clock); raises InvalidSignature.
    #[pyo3(signature = (body, headers, now=None))]
    fn verify(
        &self,
        py: Python<'_>,
        body: &[u8],
        headers: &Bound<'_, PyAny>,
        now: Option<i64>,
    ) -> PyResult<()> {
        let map = header_map(headers)?;
        self.inner
            .verify(body, &signature_headers(&map), now_or(now))
            .map_err(|e| signature_error(py, e))
    }

    fn __repr__(&self) -> &'static str {
        "Signer([redacted])"
    }
}

/// Verifies agent requests: finds `instance_id` in the raw body, resolves its secrets, checks
/// the v1 (or v0) signature in constant time. Parse the body only after it returns.
///
/// `secrets`: a dict instance_id → secret or [secrets], or its JSON text (the form of
/// CONTROL_PLANE_AGENT_SECRETS); `fallback`: the shared CONTROL_PLANE_AGENT_TOKEN;
/// `allow_v0`: accept the ERP agent's `x-agent-signature`; `tolerance`: how far a v1
/// `webhook-timestamp` may be from now, in seconds. Raises ConfigError when neither
/// `secrets` nor `fallback` gives a secret.
#[pyclass(frozen, module = "fleet")]
struct Verifier {
    inner: fleet_core::Verifier,
}

#[pymethods]
impl Verifier {
    #[new]
    #[pyo3(signature = (secrets=None, fallback=None, *, allow_v0=true, tolerance=300))]
    fn new(
        secrets: Option<&Bound<'_, PyAny>>,
        fallback: Option<&str>,
        allow_v0: bool,
        tolerance: i64,
    ) -> PyResult<Self> {
        // A negative tolerance is a mistake (fleet-core would take its magnitude).
        if tolerance < 0 {
            return Err(PyValueError::new_err(format!(
                "tolerance must be a number of seconds, at least 0, not {tolerance}"
            )));
        }
        let json = match secrets {
            None => None,
            Some(value) if value.is_instance_of::<PyString>() => Some(value.extract::<String>()?),
            Some(value) => {
                let json = value.py().import("json")?;
                Some(json.call_method1("dumps", (value,))?.extract::<String>()?)
            }
        };
        let resolver = SecretResolver::from_config(json.as_deref(), fallback)
            .map_err(|e| ConfigError::new_err(e.to_string()))?;
        // A verifier without secrets refuses every request; that is always an unset
        // setting, so say so now rather than with InvalidSignature per request.
        if resolver.is_empty() {
            return Err(ConfigError::new_err(
                "no agent secrets: pass `secrets` (CONTROL_PLANE_AGENT_SECRETS) or `fallback` \
                 (CONTROL_PLANE_AGENT_TOKEN)",
            ));
        }
        Ok(Self {
            inner: fleet_core::Verifier::new(resolver)
                .allow_v0(allow_v0)
                .tolerance_secs(tolerance),
        })
    }

    /// Verifies the raw `body` with its `headers` (a mapping or (name, value) pairs) at
    /// unix time `now` (default: the clock); returns the instance id or raises
    /// InvalidSignature.
    #[pyo3(signature = (body, headers, now=None))]
    fn verify(
        &self,
        py: Python<'_>,
        body: &[u8],
        headers: &Bound<'_, PyAny>,
        now: Option<i64>,
    ) -> PyResult<String> {
        let map = header_map(headers)?;
        match self
            .inner
            .verify(body, &signature_headers(&map), now_or(now))
        {
            Ok(verified) => Ok(verified.instance_id.into_owned()),
            Err(err) => Err(signature_error(py, err)),
        }
    }

    fn __repr__(&self) -> String {
        format!("Verifier(instances={})", self.inner.resolver().len())
    }
}

fn validation_error(py: Python<'_>, err: DecodeError) -> PyResult<PyErr> {
    let (exc, violations) = match err {
        DecodeError::TooLarge { .. } => (PayloadTooLarge::new_err(err.to_string()), Vec::new()),
        DecodeError::Invalid(ref errors) => (
            ValidationError::new_err(err.to_string()),
            errors.violations.clone(),
        ),
    };
    let pairs = PyList::empty(py);
    let paths = PyList::empty(py);
    for v in &violations {
        pairs.append((v.path.as_str(), v.message.as_str()))?;
        paths.append(v.path.as_str())?;
    }
    exc.value(py).setattr("errors", pairs)?;
    exc.value(py).setattr("paths", paths)?;
    Ok(exc)
}

/// Validates a raw heartbeat body (bytes or str) and returns it as a dict (unknown keys
/// kept). Raises ValidationError listing every problem with its field path.
#[pyfunction]
fn validate_heartbeat<'py>(
    py: Python<'py>,
    body: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let bytes: Cow<'_, [u8]> = if let Ok(bytes) = body.cast::<PyBytes>() {
        Cow::Borrowed(bytes.as_bytes())
    } else if body.is_instance_of::<PyString>() {
        Cow::Owned(body.extract::<String>()?.into_bytes())
    } else if body.is_instance_of::<PyByteArray>() || body.is_instance_of::<PyMemoryView>() {
        let copied = py.get_type::<PyBytes>().call1((body,))?;
        Cow::Owned(copied.cast::<PyBytes>()?.as_bytes().to_vec())
    } else {
        // A parsed body (a dict from a framework's `request.json`) cannot be validated: the
        // limits and the error paths are about the raw text.
        return Err(PyTypeError::new_err(format!(
            "validate_heartbeat takes the raw body as bytes or str, not {}",
            type_name(body)
        )));
    };
    match Heartbeat::decode(&bytes, &Limits::default()) {
        Ok(heartbeat) => {
            let json = py.import("json")?;
            let text = String::from_utf8(heartbeat.to_vec()).unwrap_or_default();
            json.call_method1("loads", (text,))
        }
        Err(err) => Err(validation_error(py, err)?),
    }
}

/// Verifies a release manifest (dict, str or bytes) against base64 Ed25519 public keys, and
/// in compatibility mode the ERP's HMAC secret. Returns the manifest as a dict.
#[pyfunction]
#[pyo3(signature = (manifest, public_keys, hmac_secret=None))]
fn verify_manifest<'py>(
    py: Python<'py>,
    manifest: &Bound<'py, PyAny>,
    public_keys: Vec<String>,
    hmac_secret: Option<&str>,
) -> PyResult<Bound<'py, PyAny>> {
    let json = py.import("json")?;
    let text: String = if manifest.is_instance_of::<PyString>() {
        manifest.extract()?
    } else if let Ok(bytes) = manifest.extract::<Vec<u8>>() {
        String::from_utf8(bytes).map_err(|_| {
            with_kind(
                py,
                ManifestError::new_err("manifest is not UTF-8"),
                "malformed",
            )
        })?
    } else {
        json.call_method1("dumps", (manifest,))?.extract()?
    };
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        with_kind(
            py,
            ManifestError::new_err(format!("manifest is not JSON: {e}")),
            "malformed",
        )
    })?;
    let keys = public_keys
        .iter()
        .map(|k| {
            PublicKey::from_base64(k).map_err(|e| ConfigError::new_err(format!("public key: {e}")))
        })
        .collect::<PyResult<Vec<_>>>()?;
    let mut verifier = ManifestVerifier::new(keys);
    if let Some(text) = hmac_secret {
        verifier = verifier.with_hmac_secret(secret(text)?);
    }
    match verifier.verify_value(&value) {
        Ok(_) => json.call_method1("loads", (text,)),
        Err(err) => Err(with_kind(
            py,
            ManifestError::new_err(err.to_string()),
            err.kind(),
        )),
    }
}

/// Compares two byte strings in constant time.
#[pyfunction]
fn compare_digest(a: &[u8], b: &[u8]) -> bool {
    constant_time_eq(a, b)
}

#[pymodule]
fn _fleet(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_function(wrap_pyfunction!(sign_v0, m)?)?;
    m.add_function(wrap_pyfunction!(validate_heartbeat, m)?)?;
    m.add_function(wrap_pyfunction!(verify_manifest, m)?)?;
    m.add_function(wrap_pyfunction!(compare_digest, m)?)?;
    m.add_class::<Signer>()?;
    m.add_class::<Verifier>()?;
    m.add_class::<agent::Agent>()?;
    m.add("FleetError", py.get_type::<FleetError>())?;
    m.add("InvalidSignature", py.get_type::<InvalidSignature>())?;
    m.add("ValidationError", py.get_type::<ValidationError>())?;
    m.add("PayloadTooLarge", py.get_type::<PayloadTooLarge>())?;
    m.add("ManifestError", py.get_type::<ManifestError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add(
        "TOLERANCE_SECONDS",
        fleet_core::signing::DEFAULT_TOLERANCE_SECS,
    )?;
    Ok(())
}
