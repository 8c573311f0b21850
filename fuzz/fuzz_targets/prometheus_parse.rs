//! Prometheus text parsing on arbitrary input: what the agent reads from the application's
//! `/metrics` endpoint (`PROMETHEUS_METRICS_URL`) before it reports SLO figures. The parser
//! must never panic, and every figure it reports must be one a heartbeat can carry: finite
//! and non-negative, and the error rate (a share of requests) within 0..=1.
#![no_main]

use fleet_core::prometheus::{parse_line, parse_slo};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for line in text.lines() {
        let _ = parse_line(line);
    }
    let slo = parse_slo(text);
    if let Some(p95) = slo.p95_ms {
        assert!(p95.is_finite() && p95 >= 0.0, "p95_ms {p95}");
    }
    if let Some(rate) = slo.error_rate {
        assert!((0.0..=1.0).contains(&rate), "error_rate {rate}");
    }
    if let Some(rate) = slo.webhook_retry_rate {
        assert!(rate.is_finite() && rate >= 0.0, "webhook_retry_rate {rate}");
    }
});
