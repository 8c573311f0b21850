//! Which secrets sign an instance's requests.

use std::collections::HashMap;
use std::sync::Arc;

use crate::signing::Secret;
use crate::{Error, Result};

/// Maps an `instance_id` to the secrets that may sign its requests.
///
/// Built from the control plane's configuration: `CONTROL_PLANE_AGENT_SECRETS` (a JSON map
/// from instance id to one secret or to a list of secrets, for rotation) and then
/// `CONTROL_PLANE_AGENT_TOKEN`, a shared fallback used for any instance not in the map.
/// Parse it once at start: lookups are a hash probe. Cloning is cheap.
#[derive(Clone, Default)]
pub struct SecretResolver {
    per_instance: Arc<HashMap<String, Vec<Secret>>>,
    fallback: Option<Arc<[Secret]>>,
}

impl SecretResolver {
    /// An empty resolver: no instance has a secret.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses the configuration values. `secrets_json` is the text of
    /// `CONTROL_PLANE_AGENT_SECRETS`, `fallback_token` that of `CONTROL_PLANE_AGENT_TOKEN`;
    /// empty or absent values mean "not set". Every problem is reported at once, naming the
    /// instance but never the secret.
    pub fn from_config(secrets_json: Option<&str>, fallback_token: Option<&str>) -> Result<Self> {
        let mut problems = Vec::new();
        let mut per_instance = HashMap::new();
        if let Some(text) = secrets_json.map(str::trim).filter(|t| !t.is_empty()) {
            match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text) {
                Err(err) => problems.push(format!(
                    "CONTROL_PLANE_AGENT_SECRETS is not a JSON object (line {}, column {})",
                    err.line(),
                    err.column()
                )),
                Ok(map) => {
                    for (instance, value) in map {
                        match secrets_of(&value) {
                            Ok(secrets) => {
                                per_instance.insert(instance, secrets);
                            }
                            Err(why) => problems
                                .push(format!("CONTROL_PLANE_AGENT_SECRETS[{instance:?}]: {why}")),
                        }
                    }
                }
            }
        }
        let fallback = match fallback_token.filter(|t| !t.is_empty()) {
            None => None,
            Some(token) => match Secret::new(token) {
                Ok(secret) => Some(Arc::from(vec![secret])),
                Err(err) => {
                    problems.push(format!("CONTROL_PLANE_AGENT_TOKEN: {}", err.0));
                    None
                }
            },
        };
        if problems.is_empty() {
            Ok(Self {
                per_instance: Arc::new(per_instance),
                fallback,
            })
        } else {
            Err(Error::Config(problems))
        }
    }

    /// Adds or replaces the secrets of one instance (for example, issued at enrollment).
    pub fn insert(&mut self, instance_id: impl Into<String>, secrets: Vec<Secret>) {
        Arc::make_mut(&mut self.per_instance).insert(instance_id.into(), secrets);
    }

    /// The secrets for `instance_id`: its own, or else the shared fallback.
    pub fn resolve(&self, instance_id: &str) -> Option<&[Secret]> {
        self.per_instance
            .get(instance_id)
            .map(Vec::as_slice)
            .or(self.fallback.as_deref())
    }

    /// Whether `instance_id` has secrets of its own (not only the fallback).
    pub fn has_own_secret(&self, instance_id: &str) -> bool {
        self.per_instance.contains_key(instance_id)
    }

    /// How many instances have secrets of their own.
    pub fn len(&self) -> usize {
        self.per_instance.len()
    }

    /// Whether no instance has a secret of its own and there is no fallback.
    pub fn is_empty(&self) -> bool {
        self.per_instance.is_empty() && self.fallback.is_none()
    }
}

impl std::fmt::Debug for SecretResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretResolver")
            .field("instances", &self.per_instance.len())
            .field("fallback", &self.fallback.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

fn secrets_of(value: &serde_json::Value) -> std::result::Result<Vec<Secret>, String> {
    let texts: Vec<&str> = match value {
        serde_json::Value::String(one) => vec![one.as_str()],
        serde_json::Value::Array(many) if !many.is_empty() => many
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| "list items must be strings".to_owned())
            })
            .collect::<std::result::Result<_, _>>()?,
        serde_json::Value::Array(_) => return Err("the list of secrets is empty".into()),
        _ => return Err("expected a secret string or a list of secret strings".into()),
    };
    texts
        .into_iter()
        .map(|t| Secret::new(t).map_err(|e| e.0.to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_list_and_fallback() {
        let resolver =
            SecretResolver::from_config(Some(r#"{"a":"sa","b":["old","new"]}"#), Some("shared"))
                .expect("valid config");
        assert_eq!(resolver.resolve("a").map(<[Secret]>::len), Some(1));
        assert_eq!(resolver.resolve("b").map(<[Secret]>::len), Some(2));
        assert_eq!(resolver.resolve("zzz").map(<[Secret]>::len), Some(1));
        assert!(resolver.has_own_secret("b") && !resolver.has_own_secret("zzz"));
    }

    #[test]
    fn no_fallback_means_unknown_instances_have_none() {
        let resolver = SecretResolver::from_config(Some(r#"{"a":"sa"}"#), None).expect("valid");
        assert!(resolver.resolve("b").is_none());
    }

    #[test]
    fn reports_every_problem_without_secrets() {
        let err = SecretResolver::from_config(
            Some(r#"{"a":"","b":[],"c":5,"d":"whsec_@@","e":"fine-secret-value"}"#),
            None,
        )
        .expect_err("invalid config");
        let Error::Config(problems) = &err else {
            panic!("wrong error {err:?}")
        };
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(!err.to_string().contains("fine-secret-value"));
        assert!(SecretResolver::from_config(Some("{not json"), None).is_err());
    }
}
