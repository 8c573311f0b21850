//! Container inventory from the Docker Engine API (Docker or podman's compatible service),
//! over the unix socket named by `DOCKER_HOST` or over TCP.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fleet_core::heartbeat::Container;
use fleet_core::{Heartbeat, error_chain};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::collectors::Collector;
use crate::{Error, Result};

/// Lists containers through the Docker Engine API, at most once per interval (the Neon
/// agent's `CONTAINERS_INTERVAL`); heartbeats in between carry the last list.
pub struct Containers {
    client: reqwest::Client,
    list_url: String,
    interval: Duration,
    max: usize,
    last: Mutex<Option<(Instant, Vec<Container>)>>,
}

/// The fields of `GET /containers/json` the heartbeat uses.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct EngineContainer {
    id: String,
    #[serde(default)]
    names: Vec<String>,
    image: Option<String>,
    state: Option<String>,
    status: Option<String>,
    created: Option<i64>,
    #[serde(default)]
    labels: Option<Map<String, Value>>,
}

impl Containers {
    /// A collector for `docker_host`: `unix:///path/to/socket`, `tcp://host:port` or
    /// `http://host:port`.
    pub fn new(docker_host: &str, interval: Duration) -> Result<Self> {
        // The request timeout covers a daemon that accepts the connection but hangs.
        let builder = reqwest::Client::builder().timeout(Duration::from_secs(10));
        let (client, base) = if let Some(path) = docker_host.strip_prefix("unix://") {
            // The host part of the URL is ignored when the connection is a unix socket.
            (
                builder.unix_socket(path).build()?,
                "http://docker".to_owned(),
            )
        } else if let Some(addr) = docker_host.strip_prefix("tcp://") {
            (builder.build()?, format!("http://{addr}"))
        } else if docker_host.starts_with("http://") {
            (
                builder.build()?,
                docker_host.trim_end_matches('/').to_owned(),
            )
        } else {
            return Err(Error::Config(vec![format!(
                "DOCKER_HOST must be unix://, tcp:// or http://, not {docker_host:?}"
            )]));
        };
        Ok(Self {
            client,
            // Unversioned, so the engine answers with its own current API version: recent
            // Docker releases refuse old pinned versions.
            list_url: format!("{base}/containers/json?all=true"),
            interval,
            max: fleet_core::Limits::default().max_containers,
            last: Mutex::new(None),
        })
    }

    /// Asks the engine for every container now.
    pub async fn list(&self) -> Result<Vec<Container>, String> {
        let response = self
            .client
            .get(&self.list_url)
            .send()
            .await
            .map_err(|e| format!("container engine unreachable: {}", error_chain(&e)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("container engine answered HTTP {status}"));
        }
        let listed: Vec<EngineContainer> = response
            .json()
            .await
            .map_err(|e| format!("container list is not the expected JSON: {e}"))?;
        Ok(listed
            .into_iter()
            .take(self.max)
            .map(|c| {
                let mut extra = Map::new();
                if let Some(created) = c.created {
                    extra.insert("created".into(), Value::from(created));
                }
                if let Some(project) = c
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("com.docker.compose.project"))
                {
                    extra.insert("compose_project".into(), project.clone());
                }
                Container {
                    id: c.id,
                    name: c
                        .names
                        .first()
                        .map(|n| n.trim_start_matches('/').to_owned()),
                    image: c.image,
                    state: c.state,
                    status: c.status,
                    extra,
                }
            })
            .collect())
    }
}

#[async_trait]
impl Collector for Containers {
    fn name(&self) -> &str {
        "containers"
    }

    async fn collect(&self, hb: &mut Heartbeat) -> Result<(), String> {
        let cached = {
            let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            match &*last {
                Some((at, list)) if at.elapsed() < self.interval => Some(list.clone()),
                _ => None,
            }
        };
        let list = match cached {
            Some(list) => list,
            None => {
                // A failure is not cached: the next heartbeat asks again.
                let list = self.list().await?;
                *self.last.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((Instant::now(), list.clone()));
                list
            }
        };
        hb.containers = list;
        Ok(())
    }
}
