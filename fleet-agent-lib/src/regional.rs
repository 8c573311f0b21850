//! Regional health, as the ERP instance agent reports it: each endpoint of
//! `REGIONAL_HEALTH_ENDPOINTS` is probed with a `GET` and reported in `regional_health[]`
//! with its region, its role (`primary` for `PRIMARY_REGION`), the outcome and the latency.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use fleet_core::Heartbeat;
use serde_json::{Value, json};

use crate::collectors::Collector;
use crate::config::RegionalEndpoint;

/// The ERP agent's limit per regional probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Probes every regional endpoint at each heartbeat, concurrently.
pub struct RegionalHealth {
    client: reqwest::Client,
    endpoints: Vec<RegionalEndpoint>,
    primary: Option<String>,
}

impl RegionalHealth {
    /// Probes `endpoints`; the one whose region is `primary` is the primary.
    pub fn new(
        client: reqwest::Client,
        endpoints: Vec<RegionalEndpoint>,
        primary: Option<String>,
    ) -> Self {
        Self {
            client,
            endpoints,
            primary,
        }
    }

    async fn probe(&self, target: &RegionalEndpoint, checked_at: &str) -> Value {
        let started = Instant::now();
        let outcome = self
            .client
            .get(&target.endpoint)
            .timeout(PROBE_TIMEOUT)
            .send()
            .await;
        let role = if self.primary.as_deref() == Some(target.region.as_str()) {
            "primary"
        } else {
            "secondary"
        };
        let mut sample = json!({
            "region": target.region,
            "role": role,
            "ok": false,
            "checked_at": checked_at,
            "endpoint": target.endpoint,
        });
        match outcome {
            Ok(response) => {
                sample["ok"] = response.status().is_success().into();
                sample["latency_ms"] = (started.elapsed().as_millis() as u64).into();
            }
            Err(err) => {
                sample["error"] = fleet_core::error_chain(&err).into();
            }
        }
        sample
    }
}

#[async_trait]
impl Collector for RegionalHealth {
    fn name(&self) -> &str {
        "regional"
    }

    async fn collect(&self, hb: &mut Heartbeat) -> Result<(), String> {
        let checked_at = crate::clock::now_rfc3339();
        let samples = futures_util::future::join_all(
            self.endpoints.iter().map(|t| self.probe(t, &checked_at)),
        )
        .await;
        let down: Vec<String> = samples
            .iter()
            .filter(|s| s["ok"] != true)
            .filter_map(|s| s["region"].as_str().map(str::to_owned))
            .collect();
        hb.extra
            .insert("regional_health".into(), Value::Array(samples));
        if down.is_empty() {
            Ok(())
        } else {
            Err(format!("unhealthy regions: {}", down.join(", ")))
        }
    }
}
