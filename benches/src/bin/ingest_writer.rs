//! The durable write of heartbeat batches alone: what recording a heartbeat costs the
//! database and the store, without HTTP, signing or a load generator.
//!
//! ```sh
//! cargo run --release -p fleet-benches --bin ingest_writer -- --db sqlite
//! eval "$(scripts/services postgres)"; cargo run --release -p fleet-benches --bin ingest_writer -- --db postgres
//! ```
//!
//! It creates `--instances` installations, then records `--batches` batches of `--batch`
//! heartbeats (random instances, each with a fresh v1 message id, the ingest benchmark's
//! ERP-shaped body) through `Store::record_heartbeats`, one batch at a time, in `--rounds`
//! rounds. Heartbeats are decoded before the clock starts. Per round it prints the
//! heartbeats per second and the CPU per heartbeat of this process and, on PostgreSQL, of
//! the local server's processes. No load generator shares the machine, so these figures say
//! what the write path itself costs.

use std::time::Instant;

use fleet_benches::{
    Created, heartbeat, instance_id, postgres_cpu, postgres_schema, process_cpu, sqlite_store,
};
use fleet_core::{Heartbeat, Limits, Scheme};
use fleet_server::SloThresholds;
use fleet_server::store::{IncomingHeartbeat, IngestRules, RecordOutcome, Store};

struct Options {
    db: String,
    instances: usize,
    batch: usize,
    batches: usize,
    rounds: usize,
}

/// What `--help` prints; an unknown flag is refused with it.
const USAGE: &str = "\
usage: ingest_writer [flags]    (PostgreSQL: eval \"$(scripts/services postgres)\" first)
  --db sqlite|postgres     the store (default sqlite)
  --batch N                heartbeats per batch (default 87)
  --batches N              batches per round (default 1000)
  --rounds N               rounds (default 3)
  --instances N            distinct instances (default 10000)";

fn options() -> Result<Options, String> {
    let mut o = Options {
        db: "sqlite".into(),
        instances: 10_000,
        batch: 87,
        batches: 1_000,
        rounds: 3,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        let number = |v: String| {
            v.parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or(format!("{flag}: not a positive number"))
        };
        match flag.as_str() {
            "--db" => o.db = value()?,
            "--instances" => o.instances = number(value()?)?,
            "--batch" => o.batch = number(value()?)?,
            "--batches" => o.batches = number(value()?)?,
            "--rounds" => o.rounds = number(value()?)?,
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    Ok(o)
}

/// A heartbeat of instance `i` as the writer gets it: verified and decoded.
fn incoming(i: usize, n: u64, now: i64) -> IncomingHeartbeat {
    let id = instance_id(i);
    let body = heartbeat(&id, n);
    IncomingHeartbeat {
        heartbeat: Heartbeat::decode(&body, &Limits::default()).expect("the bench body decodes"),
        scheme: Scheme::V1,
        msg_id: Some(format!("msg_{}", uuid::Uuid::now_v7().simple())),
        signed_at: Some(now),
        received_at: now,
        body,
    }
}

/// A small deterministic generator, so that every run writes the same instances in the same
/// order.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

/// The database URL when `--db postgres`.
fn postgres_url() -> Result<String, String> {
    std::env::var("FLEET_TEST_POSTGRES_SOCKET_URL").map_err(|_| {
        "FLEET_TEST_POSTGRES_SOCKET_URL is not set (eval \"$(scripts/services postgres)\")".into()
    })
}

async fn open(o: &Options) -> Result<(Box<dyn Store>, Created), String> {
    match o.db.as_str() {
        "sqlite" => {
            let (store, created) = sqlite_store("fleet-writer").await?;
            Ok((Box::new(store), created))
        }
        "postgres" => {
            let (options, schema) = postgres_schema(&postgres_url()?, "bench_writer").await?;
            let store = fleet_server::PostgresStore::connect_with(options)
                .await
                .map_err(|e| e.to_string())?;
            Ok((Box::new(store), Created::PostgresSchema(schema)))
        }
        other => Err(format!("--db must be sqlite or postgres, not {other}")),
    }
}

fn main() -> std::process::ExitCode {
    fleet_benches::exit_code("ingest_writer", main_with_options())
}

fn main_with_options() -> Result<(), String> {
    let o = options()?;
    if o.db == "postgres"
        && let Some(warning) = fleet_benches::postgres_confinement(&fleet_benches::current_cpus())
    {
        eprintln!("{warning}");
    }
    // The store hands SQLite's blocking work to `block_in_place`, which needs a worker pool.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(run(&o))
}

async fn run(o: &Options) -> Result<(), String> {
    let (store, created) = open(o).await?;
    let rules = IngestRules {
        slo: SloThresholds {
            p95_ms_max: 500.0,
            error_rate_max: 0.05,
            webhook_retry_rate_max: 10.0,
        },
        require_enrollment: false,
        forward_alerts: false,
        late_after: Some(std::time::Duration::from_secs(900)),
    };
    let now = fleet_core::unix_now();
    // Every installation exists before the clock starts, as in a running fleet.
    let all: Vec<usize> = (0..o.instances).collect();
    for chunk in all.chunks(512) {
        let batch: Vec<_> = chunk.iter().map(|&i| incoming(i, 0, now)).collect();
        store
            .record_heartbeats(&batch, &rules)
            .await
            .map_err(|e| e.to_string())?;
    }
    println!(
        "ingest_writer: db={}, {} installations, {} batches of {} heartbeats per round, {} rounds",
        o.db, o.instances, o.batches, o.batch, o.rounds
    );
    println!("| round | heartbeats/s | CPU µs/heartbeat: this process | PostgreSQL |");
    println!("|---:|---:|---:|---:|");
    let mut pick = Lcg(7);
    let mut written = o.instances as i64;
    for round in 1..=o.rounds {
        let batches: Vec<Vec<IncomingHeartbeat>> = (0..o.batches)
            .map(|b| {
                (0..o.batch)
                    .map(|_| incoming(pick.below(o.instances), (round * o.batches + b) as u64, now))
                    .collect()
            })
            .collect();
        let (cpu, database, started) = (process_cpu(), postgres_cpu(), Instant::now());
        for batch in &batches {
            let outcomes = store
                .record_heartbeats(batch, &rules)
                .await
                .map_err(|e| e.to_string())?;
            if let Some(other) = outcomes
                .iter()
                .find(|o| !matches!(o, RecordOutcome::Applied { .. }))
            {
                return Err(format!("a heartbeat was not applied: {other:?}"));
            }
        }
        let elapsed = started.elapsed();
        let heartbeats = (o.batches * o.batch) as f64;
        let per = |d: std::time::Duration| d.as_secs_f64() * 1e6 / heartbeats;
        let database = postgres_cpu()
            .zip(database)
            .filter(|_| o.db == "postgres")
            .map(|(after, before)| format!("{:.1}", per(after.saturating_sub(before))))
            .unwrap_or_else(|| "-".into());
        println!(
            "| {round} | {:.0} | {:.1} | {database} |",
            heartbeats / elapsed.as_secs_f64(),
            per(process_cpu().saturating_sub(cpu)),
        );
        drop(batches);
        written += (o.batches * o.batch) as i64;
    }
    let stored = store.heartbeat_count().await.map_err(|e| e.to_string())?;
    println!("count check: {written} recorded, {stored} in the database");
    created.remove(postgres_url().ok().as_deref()).await;
    if stored != written {
        return Err("recorded heartbeats missing from the database".into());
    }
    Ok(())
}
