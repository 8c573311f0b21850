//! SLO figures from Prometheus text exposition, as the ERP instance agent reads them, made
//! sturdier: label values may contain commas and escapes, a sample may carry a timestamp, p95
//! comes from a summary quantile or, failing that, from histogram buckets, and durations in
//! seconds are converted to milliseconds.
//!
//! Pure text in, figures out (no I/O), so it lives in fleet-core where the fuzzer reaches it
//! (`fuzz/fuzz_targets/prometheus_parse.rs`); the agent re-exports it as `fleet_agent::prometheus`.

use std::collections::BTreeMap;

/// What the heartbeat reports from the application's metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SloFigures {
    /// p95 request duration in milliseconds (`slo_p95_ms`).
    pub p95_ms: Option<f64>,
    /// Share of `http_requests_total` with a 5xx status (`slo_error_rate`).
    pub error_rate: Option<f64>,
    /// `webhook_retries_total / webhooks_total` (`slo_webhook_retry_rate`).
    pub webhook_retry_rate: Option<f64>,
    /// `jobs_processed_total` or `bullmq_jobs_processed_total`, when above zero.
    pub jobs_processed: Option<u64>,
    /// `jobs_pending` or `bullmq_jobs_waiting`, when above zero.
    pub jobs_pending: Option<u64>,
}

/// One sample line: metric name, labels and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    /// Metric name.
    pub name: &'a str,
    /// Label pairs, values unescaped.
    pub labels: Vec<(&'a str, String)>,
    /// The value (`NaN`, `+Inf` allowed).
    pub value: f64,
}

impl Sample<'_> {
    /// The value of label `key`.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses one exposition line; comments, blank and malformed lines give `None`.
pub fn parse_line(line: &str) -> Option<Sample<'_>> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        let (parsed, remaining) = parse_labels(after_brace)?;
        labels = parsed;
        rest = remaining;
    }
    let value_text = rest.split_whitespace().next()?;
    let value = match value_text {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        other => other.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// Parses `key="value",...}` and returns the pairs and the text after `}`.
fn parse_labels(mut text: &str) -> Option<(Vec<(&str, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        text = text.trim_start_matches([' ', ',']);
        if let Some(after) = text.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = text.find('=')?;
        let key = text[..eq].trim();
        text = text[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = text.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        };
        labels.push((key, value));
        text = &text[end + 1..];
    }
}

/// Reads the SLO figures from a whole exposition text.
pub fn parse_slo(text: &str) -> SloFigures {
    let mut p95_summary_ms: Option<f64> = None;
    // Histogram buckets summed across series (routes, methods) per upper bound.
    let mut buckets: BTreeMap<OrderedBound, f64> = BTreeMap::new();
    let mut requests = 0.0;
    let mut errors = 0.0;
    let mut webhooks = 0.0;
    let mut retries = 0.0;
    let mut processed = 0.0;
    let mut pending = 0.0;

    // Every figure read here is a duration, a counter or a gauge of things: none can be
    // negative, NaN or infinite, and one that is would poison a sum or a ratio.
    for sample in text
        .lines()
        .filter_map(parse_line)
        .filter(|s| s.value.is_finite() && s.value >= 0.0)
    {
        let v = sample.value;
        match sample.name {
            "http_request_duration_ms" | "http_request_duration_seconds"
                if sample.label("quantile").and_then(|q| q.parse::<f64>().ok()) == Some(0.95) =>
            {
                let ms = to_ms(sample.name, v);
                // The worst series is the one an SLO cares about.
                p95_summary_ms = Some(p95_summary_ms.map_or(ms, |m| m.max(ms)));
            }
            "http_request_duration_ms_bucket" | "http_request_duration_seconds_bucket" => {
                let bound = sample.label("le").and_then(|le| match le {
                    "+Inf" | "Inf" => Some(f64::INFINITY),
                    other => other.parse::<f64>().ok(),
                });
                if let Some(bound) = bound.filter(|b| !b.is_nan()) {
                    *buckets
                        .entry(OrderedBound(to_ms(sample.name, bound)))
                        .or_default() += v;
                }
            }
            "http_requests_total" => {
                requests += v;
                let status = sample.label("status").or_else(|| sample.label("code"));
                if status.is_some_and(|s| s.starts_with('5')) {
                    errors += v;
                }
            }
            "webhooks_total" => webhooks += v,
            "webhook_retries_total" => retries += v,
            "jobs_processed_total" | "bullmq_jobs_processed_total" => processed += v,
            "jobs_pending" | "bullmq_jobs_waiting" => pending += v,
            _ => {}
        }
    }

    let bounds: Vec<(f64, f64)> = buckets.into_iter().map(|(b, c)| (b.0, c)).collect();
    // Sums of huge counters can still overflow to infinity; a ratio of those is no figure.
    let finite = |x: f64| Some(x).filter(|x| x.is_finite());
    SloFigures {
        p95_ms: p95_summary_ms
            .or_else(|| histogram_quantile(0.95, &bounds))
            .and_then(finite),
        error_rate: (requests > 0.0).then(|| errors / requests).and_then(finite),
        webhook_retry_rate: (webhooks > 0.0)
            .then(|| retries / webhooks)
            .and_then(finite),
        jobs_processed: (processed > 0.0).then_some(processed as u64),
        jobs_pending: (pending > 0.0).then_some(pending as u64),
    }
}

fn to_ms(name: &str, value: f64) -> f64 {
    if name.starts_with("http_request_duration_seconds") {
        value * 1000.0
    } else {
        value
    }
}

/// The `q` quantile of cumulative buckets `(upper bound, count)` sorted by bound, by linear
/// interpolation inside the bucket, as PromQL's `histogram_quantile` does.
pub fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let &(last_bound, total) = buckets.last()?;
    if last_bound != f64::INFINITY || total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev_bound = 0.0;
    let mut prev_count = 0.0;
    for (i, &(bound, count)) in buckets.iter().enumerate() {
        if count >= rank {
            if bound == f64::INFINITY {
                // Above the highest finite bucket: its bound is the best we know.
                return (i > 0).then_some(prev_bound);
            }
            if count == prev_count {
                return Some(bound);
            }
            return Some(
                prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count),
            );
        }
        prev_bound = bound;
        prev_count = count;
    }
    None
}

/// An `f64` bucket bound that sorts (NaN bounds are dropped before they get here).
#[derive(Debug, Clone, Copy, PartialEq)]
struct OrderedBound(f64);

impl Eq for OrderedBound {}

impl PartialOrd for OrderedBound {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for OrderedBound {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erp_summary_and_counters() {
        let text = r#"
# HELP http_request_duration_ms request latency
# TYPE http_request_duration_ms summary
http_request_duration_ms{quantile="0.5"} 12
http_request_duration_ms{quantile="0.95"} 250.5
http_requests_total{method="GET",status="200"} 90
http_requests_total{method="POST",status="503"} 6
http_requests_total{method="GET",status="500"} 4
webhooks_total 40
webhook_retries_total 10
bullmq_jobs_processed_total{queue="a"} 7
jobs_pending 3
"#;
        let slo = parse_slo(text);
        assert_eq!(slo.p95_ms, Some(250.5));
        assert_eq!(slo.error_rate, Some(0.1));
        assert_eq!(slo.webhook_retry_rate, Some(0.25));
        assert_eq!(slo.jobs_processed, Some(7));
        assert_eq!(slo.jobs_pending, Some(3));
    }

    #[test]
    fn p95_from_histogram_buckets_across_series() {
        // 100 requests: 50 under 10 ms, 40 more under 100 ms, 10 more under 1000 ms.
        let text = r#"
http_request_duration_seconds_bucket{route="/a",le="0.01"} 30
http_request_duration_seconds_bucket{route="/a",le="0.1"} 50
http_request_duration_seconds_bucket{route="/a",le="1"} 55
http_request_duration_seconds_bucket{route="/a",le="+Inf"} 55
http_request_duration_seconds_bucket{route="/b",le="0.01"} 20
http_request_duration_seconds_bucket{route="/b",le="0.1"} 40
http_request_duration_seconds_bucket{route="/b",le="1"} 45
http_request_duration_seconds_bucket{route="/b",le="+Inf"} 45
"#;
        let p95 = parse_slo(text).p95_ms.unwrap();
        // rank 95 falls halfway through the 100..1000 ms bucket (90 -> 100).
        assert!((p95 - 550.0).abs() < 1e-6, "{p95}");
    }

    #[test]
    fn quantile_edge_cases() {
        assert_eq!(histogram_quantile(0.95, &[]), None);
        assert_eq!(histogram_quantile(0.95, &[(f64::INFINITY, 0.0)]), None);
        assert_eq!(
            histogram_quantile(0.95, &[(5.0, 1.0), (f64::INFINITY, 10.0)]),
            Some(5.0)
        );
        assert_eq!(
            histogram_quantile(0.5, &[(4.0, 10.0), (f64::INFINITY, 10.0)]),
            Some(2.0)
        );
    }

    #[test]
    fn labels_with_commas_escapes_and_timestamps() {
        let s = parse_line(
            r#"http_requests_total{path="/a,b",msg="say \"hi\"",status="502"} 3 1700000000000"#,
        )
        .unwrap();
        assert_eq!(s.label("path"), Some("/a,b"));
        assert_eq!(s.label("msg"), Some("say \"hi\""));
        assert_eq!(s.label("status"), Some("502"));
        assert_eq!(s.value, 3.0);
        assert!(parse_line("# comment").is_none());
        assert!(parse_line("broken{le=\"1\" 3").is_none());
        assert!(parse_line("x NaN").unwrap().value.is_nan());
    }

    #[test]
    fn nothing_known_gives_nothing() {
        assert_eq!(
            parse_slo("up 1\nhttp_request_duration_ms{quantile=\"0.95\"} NaN\n"),
            SloFigures::default()
        );
    }

    #[test]
    fn hostile_values_never_give_a_figure_a_heartbeat_refuses() {
        // A NaN bucket bound (`-nan` sorts first), negative counters and sums that overflow
        // to infinity: the figures stay finite, non-negative and the error rate a share.
        let text = "\
http_request_duration_ms_bucket{le=\"-nan\"} 5
http_request_duration_ms_bucket{le=\"+Inf\"} 5
http_requests_total{status=\"500\"} 10
http_requests_total{status=\"200\"} -5
webhooks_total 1e308
webhooks_total 1e308
webhook_retries_total 1e308
webhook_retries_total 1e308
";
        let slo = parse_slo(text);
        assert!(
            slo.p95_ms.is_none_or(|p| p.is_finite() && p >= 0.0),
            "{slo:?}"
        );
        assert!(
            slo.error_rate.is_none_or(|r| (0.0..=1.0).contains(&r)),
            "{slo:?}"
        );
        assert!(
            slo.webhook_retry_rate
                .is_none_or(|r| r.is_finite() && r >= 0.0),
            "{slo:?}"
        );
    }
}
