//! Alert forwarding through a durable outbox.
//!
//! Alerts to forward are written to `webhook_outbox` in the same transaction that opens
//! them, so none is lost to a crash and ingest never waits for the receiver. This task
//! delivers them: `POST` of the JSON body with `Authorization: Bearer <token>` when a token
//! is set and a Standard Webhooks v1 signature when a secret is set (`webhook-id` is stable
//! across attempts and never reused, so receivers can deduplicate). A failure is retried
//! with exponential backoff; after `max_attempts` the delivery is given up and kept for
//! inspection.

use std::sync::Weak;
use std::time::Duration;

use fleet_core::{Secret, Signer};

use crate::AppState;
use crate::store::OutboxItem;

/// Where and how alerts are forwarded (`CONTROL_PLANE_ALERT_WEBHOOK_*`).
#[derive(Clone)]
pub struct WebhookConfig {
    /// The receiver (`CONTROL_PLANE_ALERT_WEBHOOK_URL`).
    pub url: String,
    /// Sent as `Authorization: Bearer` (`CONTROL_PLANE_ALERT_WEBHOOK_TOKEN`).
    pub token: Option<String>,
    /// Signs each delivery with v1 (`CONTROL_PLANE_ALERT_WEBHOOK_SECRET`).
    pub secret: Option<Secret>,
    /// Per-attempt timeout.
    pub timeout: Duration,
    /// Attempts before a delivery is given up.
    pub max_attempts: i64,
    /// How often the outbox is polled for due deliveries.
    pub poll_interval: Duration,
    /// Delay before the first retry; doubles each attempt, up to `max_backoff`.
    pub first_backoff: Duration,
    /// Longest delay between attempts.
    pub max_backoff: Duration,
}

impl WebhookConfig {
    /// Defaults: 10 s timeout, 12 attempts, backoff 5 s doubling up to 1 h, polling every second.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            token: None,
            secret: None,
            timeout: Duration::from_secs(10),
            max_attempts: 12,
            poll_interval: Duration::from_secs(1),
            first_backoff: Duration::from_secs(5),
            max_backoff: Duration::from_secs(3600),
        }
    }
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "[redacted]"))
            .field("secret", &self.secret.as_ref().map(|_| "[redacted]"))
            .field("timeout", &self.timeout)
            .field("max_attempts", &self.max_attempts)
            .finish()
    }
}

/// Seconds to wait after `attempts` failed attempts: `first`, doubling, capped at `max`.
pub fn backoff_secs(attempts: i64, first: Duration, max: Duration) -> i64 {
    let first = first.as_secs().max(1) as i64;
    let max = max.as_secs().max(1) as i64;
    let shift = attempts.saturating_sub(1).clamp(0, 30) as u32;
    first.saturating_mul(1i64 << shift).min(max)
}

pub(crate) fn spawn(state: Weak<AppState>, config: WebhookConfig) {
    tokio::spawn(async move {
        let client = match reqwest::Client::builder().timeout(config.timeout).build() {
            Ok(client) => client,
            Err(err) => {
                tracing::error!(error = %err, "alert webhook disabled: cannot build HTTP client");
                return;
            }
        };
        let signer = config.secret.clone().map(Signer::new);
        // One delivery is claimed at a time, leased for one attempt and its recording with
        // room to spare: another replica takes a row over only when this one died (or lost
        // its database) mid-delivery. Claiming a batch leased every row of it for the whole
        // batch, so a restart during a slow delivery held up to 50 alerts nobody was sending
        // for ten minutes.
        let lease_secs = config.timeout.as_secs() as i64 + 1 + 60;
        loop {
            tokio::time::sleep(config.poll_interval).await;
            // Everything due goes out before the next pause.
            loop {
                let Some(app) = state.upgrade() else { return };
                let now = fleet_core::unix_now();
                let item = match app.store.outbox_claim(now, now + lease_secs, 1).await {
                    Ok(mut due) => match due.pop() {
                        Some(item) => item,
                        None => break,
                    },
                    Err(err) => {
                        tracing::warn!(error = %err, "reading the webhook outbox failed");
                        break;
                    }
                };
                attempt(&app, &client, &config, signer.as_ref(), &item).await;
            }
        }
    });
}

/// Delivers `item` once and records the outcome: delivered, retried later, or given up.
async fn attempt(
    app: &AppState,
    client: &reqwest::Client,
    config: &WebhookConfig,
    signer: Option<&Signer>,
    item: &OutboxItem,
) {
    let result = deliver(client, config, signer, item).await;
    let now = fleet_core::unix_now();
    let attempts = item.attempts + 1;
    let stored = match result {
        Ok(()) => {
            app.metrics.webhook(true, false);
            app.store.outbox_delivered(item.id, now).await
        }
        Err(why) => {
            let give_up = attempts >= config.max_attempts;
            app.metrics.webhook(false, give_up);
            let next = (!give_up)
                .then(|| now + backoff_secs(attempts, config.first_backoff, config.max_backoff));
            tracing::warn!(outbox_id = item.id, attempts, give_up, error = %why, "alert webhook delivery failed");
            app.store
                .outbox_failed(item.id, attempts, next, &why, now)
                .await
        }
    };
    if let Err(err) = stored {
        tracing::warn!(error = %err, "recording a webhook attempt failed");
    }
}

/// The `webhook-id` of every attempt at `item`: its alert and when that alert was raised.
/// A row id alone is not unique over time: SQLite hands out a deleted row's id again once
/// the retention sweep has emptied the table, and a receiver that deduplicates on
/// `webhook-id` (as Standard Webhooks asks) would then drop a new alert as a repeat.
pub(crate) fn webhook_id(item: &OutboxItem) -> String {
    format!("alert_{}_{}", item.alert_id, item.created_at)
}

async fn deliver(
    client: &reqwest::Client,
    config: &WebhookConfig,
    signer: Option<&Signer>,
    item: &OutboxItem,
) -> Result<(), String> {
    let body = item.payload.as_bytes().to_vec();
    let mut request = client
        .post(&config.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json");
    if let Some(token) = &config.token {
        request = request.bearer_auth(token);
    }
    if let Some(signer) = signer {
        // Re-signed at each attempt with a fresh timestamp, keeping the id.
        let headers = signer.headers(&webhook_id(item), fleet_core::unix_now(), &body);
        for (name, value) in headers.pairs() {
            request = request.header(name, value);
        }
    }
    let response = request.body(body).send().await.map_err(|e| {
        // reqwest errors can include the URL but never the headers, so no token leaks.
        format!("request failed: {}", e.without_url())
    })?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(format!("receiver answered {}", response.status()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let (first, max) = (Duration::from_secs(5), Duration::from_secs(60));
        let got: Vec<i64> = (1..=6).map(|a| backoff_secs(a, first, max)).collect();
        assert_eq!(got, [5, 10, 20, 40, 60, 60]);
        assert_eq!(backoff_secs(i64::MAX, first, max), 60);
    }
}
