//! Sending signed messages to the control plane, and deciding what an answer means:
//! delivered, retry (with exponential backoff and jitter, or when `Retry-After` says),
//! unauthorized (logged clearly and retried only slowly), or refused for good.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_core::signing::HEADER_V0_SIGNATURE;
use fleet_core::{Scheme, Signer, error_chain};

/// Longest wait a `Retry-After` header can impose.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// What became of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: the control plane has it.
    Delivered,
    /// Network error, timeout, 408, 425, 429 or 5xx: try again, after `after` if the server
    /// said so.
    Retry {
        /// The server's `Retry-After`, when it sent one.
        after: Option<Duration>,
        /// What went wrong.
        reason: String,
    },
    /// 401 or 403: the secret or instance id is wrong, or this host's clock is too far from
    /// the control plane's for a v1 signature. Retrying quickly cannot help.
    Unauthorized {
        /// The status line.
        reason: String,
        /// How far the control plane's clock (its `Date` header) is ahead of this host's, in
        /// seconds, when a v1 request was refused and that is beyond the signature's
        /// tolerance: the likely cause, whatever the secret.
        clock_skew: Option<i64>,
    },
    /// Any other 4xx: the control plane will never take this message.
    Rejected {
        /// The status and the start of the answer.
        reason: String,
    },
}

/// Maps an HTTP status (and its `Retry-After`) to an [`Outcome`].
pub fn classify(status: u16, retry_after: Option<&str>, now: i64) -> Outcome {
    match status {
        200..=299 => Outcome::Delivered,
        401 | 403 => Outcome::Unauthorized {
            reason: format!("HTTP {status}"),
            clock_skew: None,
        },
        408 | 425 | 429 | 500..=599 => Outcome::Retry {
            after: retry_after.and_then(|v| parse_retry_after(v, now)),
            reason: format!("HTTP {status}"),
        },
        _ => Outcome::Rejected {
            reason: format!("HTTP {status}"),
        },
    }
}

/// How far `server_date` is ahead of `signed_at` (negative: behind), when that is beyond what
/// a v1 signature's timestamp may be off ([`DEFAULT_TOLERANCE_SECS`]). The `Date` header has
/// whole seconds and is written as the answer leaves, so a second either way is no sign.
///
/// [`DEFAULT_TOLERANCE_SECS`]: fleet_core::signing::DEFAULT_TOLERANCE_SECS
pub fn skew_beyond_tolerance(server_date: i64, signed_at: i64) -> Option<i64> {
    let skew = server_date.saturating_sub(signed_at);
    (skew.unsigned_abs() > fleet_core::signing::DEFAULT_TOLERANCE_SECS.unsigned_abs() + 1)
        .then_some(skew)
}

/// What a refusal with clock skew `skew` ([`skew_beyond_tolerance`]) means, for the logs.
pub fn clock_skew_text(skew: i64) -> String {
    let direction = if skew > 0 { "behind" } else { "ahead of" };
    format!(
        "this host's clock is {} s {direction} the control plane's, beyond the {} s a \
         signature's timestamp may be off: set this host's clock (NTP)",
        skew.unsigned_abs(),
        fleet_core::signing::DEFAULT_TOLERANCE_SECS
    )
}

/// The clock skew of a v1 request signed at `signed_at` that `response` refused, when its
/// `Date` shows one beyond the tolerance.
pub fn refused_for_clock(response: &reqwest::Response, signed_at: i64) -> Option<i64> {
    if !matches!(response.status().as_u16(), 401 | 403) {
        return None;
    }
    let date = response.headers().get("date")?.to_str().ok()?;
    skew_beyond_tolerance(crate::clock::parse_http_date(date)?, signed_at)
}

/// Reads `Retry-After`: a number of seconds or an HTTP date; capped at [`MAX_RETRY_AFTER`].
pub fn parse_retry_after(value: &str, now: i64) -> Option<Duration> {
    let value = value.trim();
    let secs = match value.parse::<u64>() {
        Ok(secs) => secs,
        Err(_) => {
            let at = crate::clock::parse_http_date(value)?;
            u64::try_from(at.saturating_sub(now)).unwrap_or(0)
        }
    };
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

/// Exponential backoff with jitter: `base · 2^attempt`, capped at `max`, then scaled by a
/// random factor in [0.5, 1) so that agents cut off together do not return together.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// Starts at `base`, never waits longer than `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            attempt: 0,
        }
    }

    /// The next wait; `unit` is a random number in [0, 1).
    pub fn next_delay_with(&mut self, unit: f64) -> Duration {
        let factor = 2u32.saturating_pow(self.attempt.min(30));
        let ceiling = self.base.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
    }

    /// The next wait, with a random jitter.
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_with(rand::random::<f64>())
    }

    /// Attempts since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Back to `base` after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The longest wait.
    pub fn max(&self) -> Duration {
        self.max
    }
}

/// How often a warning repeats while the control plane stays unreachable.
pub const UNREACHABLE_WARNING_EVERY_SECS: i64 = 600;

/// What to log about one attempt, so that an outage is told once, reminded every
/// [`UNREACHABLE_WARNING_EVERY_SECS`], and its end is told too, instead of one warning per
/// retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutageNote {
    /// The first failure after a delivery: warn.
    Started,
    /// Still failing, and the last warning is old: warn again with the count.
    Continues {
        /// Failed attempts since the last delivery.
        failed_attempts: u64,
    },
    /// Still failing, warned recently: log quietly.
    Quiet,
    /// Delivered after failures: say it is over.
    Ended {
        /// Failed attempts before this delivery.
        failed_attempts: u64,
    },
    /// Delivered, nothing was failing.
    Normal,
}

/// The state behind [`OutageNote`], shared by every task that sends.
#[derive(Debug, Default)]
pub struct OutageLog {
    state: Mutex<Outage>,
}

#[derive(Debug, Default)]
struct Outage {
    failed_attempts: u64,
    warned_at: i64,
}

impl OutageLog {
    /// One more failed attempt at `now` (unix seconds).
    pub fn failed(&self, now: i64) -> OutageNote {
        let mut outage = self.state.lock().unwrap_or_else(|e| e.into_inner());
        outage.failed_attempts += 1;
        if outage.failed_attempts == 1 {
            outage.warned_at = now;
            OutageNote::Started
        } else if now.saturating_sub(outage.warned_at) >= UNREACHABLE_WARNING_EVERY_SECS {
            outage.warned_at = now;
            OutageNote::Continues {
                failed_attempts: outage.failed_attempts,
            }
        } else {
            OutageNote::Quiet
        }
    }

    /// A delivery: ends the outage, if there was one.
    pub fn delivered(&self) -> OutageNote {
        let mut outage = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match std::mem::take(&mut *outage).failed_attempts {
            0 => OutageNote::Normal,
            failed_attempts => OutageNote::Ended { failed_attempts },
        }
    }
}

/// The `webhook-timestamp` for an attempt of a message at `now`, given the timestamp its
/// previous attempt was signed with: `now`, or `None` when that attempt was signed in this
/// very second (wait for the next one).
///
/// The control plane takes a message id arriving again with the same timestamp for a replay
/// and refuses it (401). A retry follows an attempt whose answer was lost (a reset
/// connection, a control plane killed after its commit), and that attempt may have been
/// applied: a retry signed in the same second would be refused as a replay, and the agent
/// would back off as if its secret were wrong. With a newer timestamp it is acknowledged as
/// a duplicate.
pub fn attempt_timestamp(previous: Option<i64>, now: i64) -> Option<i64> {
    // Only equality collides: after a clock step back, waiting for the clock to pass the
    // previous attempt could take as long as the step.
    (previous != Some(now)).then_some(now)
}

/// Signs and posts messages to the control plane.
#[derive(Clone)]
pub struct Sender {
    client: reqwest::Client,
    base_url: String,
    signer: Signer,
    scheme: Scheme,
    /// When each message was last signed, for attempts of the current second (older entries
    /// are pruned at each attempt).
    signed_at: Arc<Mutex<HashMap<String, i64>>>,
}

impl Sender {
    /// Posts to `base_url` with `client`, signing with `signer` in `scheme`.
    pub fn new(client: reqwest::Client, base_url: &str, signer: Signer, scheme: Scheme) -> Self {
        Self {
            client,
            base_url: base_url.trim_end_matches('/').to_owned(),
            signer,
            scheme,
            signed_at: Arc::default(),
        }
    }

    /// The timestamp to sign this attempt of `msg_id` with: never the one of an earlier
    /// attempt that may have reached the control plane (see [`attempt_timestamp`]), waiting
    /// for the next second when needed.
    async fn timestamp_for(&self, msg_id: &str) -> i64 {
        loop {
            let now = fleet_core::unix_now();
            {
                let mut signed = self.signed_at.lock().unwrap_or_else(|p| p.into_inner());
                // Only an attempt signed in this very second can collide with one signed now.
                signed.retain(|_, at| *at == now);
                if let Some(timestamp) = attempt_timestamp(signed.get(msg_id).copied(), now) {
                    signed.insert(msg_id.to_owned(), timestamp);
                    return timestamp;
                }
            }
            let into_second = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or_default();
            let rest =
                Duration::from_nanos(u64::from(1_000_000_000 - into_second.min(999_999_999)));
            tokio::time::sleep(rest + Duration::from_millis(5)).await;
        }
    }

    /// One attempt: `POST {base}{path}` with `body`, signed now (v1 keeps `msg_id` and takes
    /// a fresh timestamp, so a message that waited in the outbox is still within the
    /// receiver's tolerance).
    pub async fn send(&self, msg_id: &str, path: &str, body: &[u8]) -> Outcome {
        let now = match self.scheme {
            Scheme::V1 => self.timestamp_for(msg_id).await,
            // v0 signs the body alone: no id, no timestamp, nothing to collide.
            Scheme::V0 => fleet_core::unix_now(),
        };
        let mut request = self
            .client
            .post(format!("{}{path}", self.base_url))
            .header("content-type", "application/json")
            .body(body.to_vec());
        match self.scheme {
            Scheme::V1 => {
                for (name, value) in self.signer.headers(msg_id, now, body).pairs() {
                    request = request.header(name, value);
                }
            }
            Scheme::V0 => {
                request = request.header(HEADER_V0_SIGNATURE, self.signer.sign_v0(body));
            }
        }
        match request.send().await {
            Err(err) => {
                if err.is_connect() {
                    // It never reached the control plane, so it cannot have been applied:
                    // the next attempt may be signed in this same second.
                    self.signed_at
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(msg_id);
                }
                Outcome::Retry {
                    after: None,
                    reason: error_chain(&err),
                }
            }
            Ok(response) => {
                let status = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let mut outcome = classify(status, retry_after.as_deref(), now);
                if let Outcome::Unauthorized { clock_skew, .. } = &mut outcome
                    && self.scheme == Scheme::V1
                {
                    *clock_skew = refused_for_clock(&response, now);
                }
                if let Outcome::Rejected { reason } | Outcome::Unauthorized { reason, .. } =
                    &mut outcome
                {
                    // The start of the answer says why (a field path, "signature mismatch").
                    let text = response.text().await.unwrap_or_default();
                    let text: String = text.chars().take(300).collect();
                    if !text.is_empty() {
                        reason.push_str(": ");
                        reason.push_str(&text);
                    }
                }
                outcome
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_clock_beyond_the_signature_tolerance_is_named() {
        assert_eq!(skew_beyond_tolerance(1_000 + 600, 1_000), Some(600));
        assert_eq!(skew_beyond_tolerance(1_000 - 400, 1_000), Some(-400));
        assert_eq!(
            skew_beyond_tolerance(1_000 + 301, 1_000),
            None,
            "a second of slack"
        );
        assert_eq!(skew_beyond_tolerance(1_000 + 302, 1_000), Some(302));
        assert_eq!(skew_beyond_tolerance(1_000, 1_000), None);
    }

    #[test]
    fn an_outage_is_told_once_reminded_every_ten_minutes_and_its_end_told() {
        let log = OutageLog::default();
        assert_eq!(log.delivered(), OutageNote::Normal);
        assert_eq!(log.failed(1_000), OutageNote::Started);
        assert_eq!(log.failed(1_001), OutageNote::Quiet);
        assert_eq!(log.failed(1_599), OutageNote::Quiet);
        assert_eq!(
            log.failed(1_600),
            OutageNote::Continues { failed_attempts: 4 }
        );
        assert_eq!(log.failed(1_900), OutageNote::Quiet);
        assert_eq!(log.delivered(), OutageNote::Ended { failed_attempts: 5 });
        assert_eq!(log.delivered(), OutageNote::Normal);
        // The next outage starts afresh.
        assert_eq!(log.failed(5_000), OutageNote::Started);
        assert_eq!(log.failed(5_001), OutageNote::Quiet);
    }

    #[test]
    fn statuses_map_to_outcomes() {
        assert_eq!(classify(200, None, 0), Outcome::Delivered);
        assert_eq!(classify(204, None, 0), Outcome::Delivered);
        assert!(matches!(
            classify(401, None, 0),
            Outcome::Unauthorized { .. }
        ));
        assert!(matches!(classify(422, None, 0), Outcome::Rejected { .. }));
        assert!(matches!(classify(413, None, 0), Outcome::Rejected { .. }));
        assert_eq!(
            classify(503, Some("7"), 0),
            Outcome::Retry {
                after: Some(Duration::from_secs(7)),
                reason: "HTTP 503".into()
            }
        );
        assert!(matches!(
            classify(429, Some("soon"), 0),
            Outcome::Retry { after: None, .. }
        ));
    }

    #[test]
    fn retry_after_seconds_dates_and_caps() {
        let now = 784_111_777 - 30;
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now + 60),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("120", 0), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after("99999999", 0), Some(MAX_RETRY_AFTER));
    }

    #[test]
    fn a_retry_is_never_signed_in_the_second_of_the_previous_attempt() {
        assert_eq!(attempt_timestamp(None, 100), Some(100));
        assert_eq!(attempt_timestamp(Some(99), 100), Some(100));
        assert_eq!(attempt_timestamp(Some(100), 100), None);
        // A clock that stepped back: no collision, no wait.
        assert_eq!(attempt_timestamp(Some(101), 100), Some(100));
    }

    #[tokio::test]
    async fn a_quick_retry_waits_for_the_next_second() {
        let sender = Sender::new(
            reqwest::Client::new(),
            "http://127.0.0.1:9",
            Signer::new(fleet_core::Secret::new("s3cret").expect("secret")),
            Scheme::V1,
        );
        let first = sender.timestamp_for("msg_a").await;
        let other = sender.timestamp_for("msg_b").await;
        let again = sender.timestamp_for("msg_a").await;
        assert!(again > first, "{first} then {again}");
        assert!(other >= first);
    }

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        assert_eq!(b.next_delay_with(0.0), Duration::from_millis(500));
        assert_eq!(
            b.next_delay_with(0.999_999),
            Duration::from_secs(2).mul_f64(0.999_999_5)
        );
        assert_eq!(b.next_delay_with(0.0), Duration::from_secs(2));
        for _ in 0..50 {
            assert!(b.next_delay() <= Duration::from_secs(10));
        }
        assert!(b.next_delay_with(0.0) >= Duration::from_secs(5));
        b.reset();
        assert_eq!(b.next_delay_with(0.0), Duration::from_millis(500));
    }
}
