//! Signing, verification and heartbeat decoding, each beside the floor: a raw HMAC-SHA256
//! of the same bytes with a fresh key, measured in the same run.
//!
//! ```sh
//! cargo bench -p fleet-benches --bench signing
//! ```
//!
//! After criterion's own output, prints a table of each operation's mean time and its ratio
//! to the raw HMAC of the same body size.

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{BenchmarkId, Criterion, Throughput};
use fleet_core::signing::{verify_v0, verify_v1};
use fleet_core::{Heartbeat, Limits, Secret, SecretResolver, SignatureHeaders, Signer, Verifier};
use hmac::{KeyInit, Mac};

const SECRET: &str = "agent-secret-acme-0123456789";
const SIZES: [usize; 3] = [256, 1024, 16 * 1024];
const NOW: i64 = 1_767_225_600;

/// A heartbeat-shaped JSON body of exactly `size` bytes, `instance_id` first as the ERP
/// agent writes it.
fn body_of(size: usize) -> Vec<u8> {
    let head = r#"{"instance_id":"acme-001","db_ok":true,"redis_ok":true,"storage_ok":true,"jobs_failed":0,"pad":""#;
    let tail = r#""}"#;
    let pad = size.saturating_sub(head.len() + tail.len());
    format!("{head}{}{tail}", "x".repeat(pad)).into_bytes()
}

fn raw_hmac(key: &[u8], body: &[u8]) -> [u8; 32] {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("any key length");
    mac.update(body);
    mac.finalize().into_bytes().into()
}

fn signing(c: &mut Criterion) {
    let secret = Secret::new(SECRET).expect("secret");
    let signer = Signer::new(secret.clone());
    let resolver =
        SecretResolver::from_config(Some(&format!(r#"{{"acme-001":"{SECRET}"}}"#)), None)
            .expect("config");
    let verifier = Verifier::new(resolver);
    for size in SIZES {
        let body = body_of(size);
        let mut group = c.benchmark_group(format!("signing_{size}"));
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function("raw_hmac", |b| {
            b.iter(|| raw_hmac(black_box(SECRET.as_bytes()), black_box(&body)))
        });
        group.bench_function("v0_sign", |b| {
            b.iter(|| fleet_core::sign_v0(&secret, black_box(&body)))
        });
        let v0 = fleet_core::sign_v0(&secret, &body);
        group.bench_function("v0_verify", |b| {
            b.iter(|| verify_v0(&secret, black_box(&body), black_box(&v0)))
        });
        group.bench_function("v1_sign", |b| {
            b.iter(|| signer.sign(black_box("msg_2a7Jd1"), NOW, black_box(&body)))
        });
        let sig = signer.sign("msg_2a7Jd1", NOW, &body);
        let headers = SignatureHeaders {
            webhook_id: Some("msg_2a7Jd1"),
            webhook_timestamp: Some("1767225600"),
            webhook_signature: Some(&sig),
            ..Default::default()
        };
        group.bench_function("v1_verify", |b| {
            b.iter(|| {
                verify_v1(
                    std::slice::from_ref(&secret),
                    black_box(&body),
                    black_box(&headers),
                    NOW,
                    300,
                )
            })
        });
        // The server's entry point: locate instance_id, resolve its secret, verify.
        group.bench_function("v1_verify_with_lookup", |b| {
            b.iter(|| {
                verifier
                    .verify(black_box(&body), black_box(&headers), NOW)
                    .expect("valid")
            })
        });
        group.finish();
    }
}

/// The heartbeat the ERP agent sends most often (the fields `src/bin/ingest_load.rs` sends):
/// three checks and one unknown key.
const ERP_HEARTBEAT: &str = r#"{"instance_id": "bench-00001", "domain": "bench-00001.example.com", "client": "Bench SA", "version": "2.0.1", "release_channel": "stable", "health": "ok", "db_ok": true, "redis_ok": true, "storage_ok": true, "search_ok": true, "jobs_failed": 0, "uptime_seconds": 3601, "cpu_usage_pct": 1.0, "memory_used_bytes": 4000000001, "memory_total_bytes": 8000000000, "disk_used_bytes": 50000000000, "disk_total_bytes": 100000000000, "slo_p95_ms": 120.0, "slo_error_rate": 0.001, "jobs_processed_1h": 420, "jobs_pending": 3, "last_backup_at": "2026-11-22T02:00:00Z", "backup_checksum": "sha256-abc", "backup_status": "ok", "checks": [{"name": "db", "ok": true, "latency_ms": 2.1}, {"name": "redis", "ok": true, "latency_ms": 0.3}, {"name": "storage", "ok": true, "latency_ms": 8.0}], "primary_region": "eu-west-1"}"#;

/// `Heartbeat::decode` (`parse_validate`) beside its slow path alone (`parse_validate_slow`,
/// the `Value`-tree decoding every body took before the fast path), for the full vector and
/// the ERP agent's usual heartbeat.
fn heartbeat(c: &mut Criterion) -> Vec<String> {
    let body = std::fs::read_to_string(vectors_dir().join("heartbeats.json")).expect("vectors");
    let vectors: serde_json::Value = serde_json::from_str(&body).expect("json");
    let full = vectors
        .as_array()
        .and_then(|v| {
            v.iter()
                .find(|c| c["name"] == "full agent payload with extensions")
        })
        .and_then(|c| c["body"].as_str())
        .expect("full payload vector")
        .as_bytes()
        .to_vec();
    let limits = Limits::default();
    let bodies = [
        (format!("heartbeat_{}", full.len()), full),
        (
            format!("heartbeat_erp_{}", ERP_HEARTBEAT.len()),
            ERP_HEARTBEAT.as_bytes().to_vec(),
        ),
    ];
    let mut names = Vec::new();
    for (name, body) in bodies {
        // Else `parse_validate` would time the slow path twice over.
        assert!(
            Heartbeat::decode_fast(&body, &limits).is_some(),
            "{name} takes the fast path"
        );
        let mut group = c.benchmark_group(&name);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function("raw_hmac", |b| {
            b.iter(|| raw_hmac(black_box(SECRET.as_bytes()), black_box(&body)))
        });
        group.bench_with_input(
            BenchmarkId::from_parameter("parse_validate"),
            &body,
            |b, body| b.iter(|| Heartbeat::decode(black_box(body), &limits).expect("valid")),
        );
        group.bench_with_input(
            BenchmarkId::from_parameter("parse_validate_slow"),
            &body,
            |b, body| b.iter(|| Heartbeat::decode_slow(black_box(body), &limits).expect("valid")),
        );
        group.finish();
        names.push(name);
    }
    names
}

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/vectors")
}

fn criterion_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("criterion")
}

fn mean_ns(group: &str, id: &str) -> Option<f64> {
    let path = criterion_dir()
        .join(group)
        .join(id)
        .join("new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    value["mean"]["point_estimate"].as_f64()
}

fn print_ratios(groups: &[String]) {
    println!(
        "\n{:<22} {:<24} {:>12} {:>10}",
        "group", "operation", "mean", "vs raw"
    );
    for group in groups {
        let Some(floor) = mean_ns(group, "raw_hmac") else {
            continue;
        };
        let dir = criterion_dir().join(group);
        let mut ids: Vec<String> = std::fs::read_dir(&dir)
            .map(|it| {
                it.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        for id in ids.iter().filter(|id| id.as_str() != "report") {
            if let Some(mean) = mean_ns(group, id) {
                println!(
                    "{group:<22} {id:<24} {:>9.0} ns {:>9.2}x",
                    mean,
                    mean / floor
                );
            }
        }
    }
}

fn main() {
    let mut c = Criterion::default()
        .output_directory(&criterion_dir())
        .configure_from_args();
    signing(&mut c);
    let heartbeat_groups = heartbeat(&mut c);
    c.final_summary();
    let mut groups: Vec<String> = SIZES.iter().map(|s| format!("signing_{s}")).collect();
    groups.extend(heartbeat_groups);
    print_ratios(&groups);
}
