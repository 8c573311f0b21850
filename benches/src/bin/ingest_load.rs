//! Heartbeat ingest under load, beside a bare axum route measured by the same generator.
//!
//! ```sh
//! cargo run --release -p fleet-benches --bin ingest_load -- --db sqlite
//! eval "$(scripts/services postgres)"; cargo run --release -p fleet-benches --bin ingest_load -- --db postgres
//! ```
//!
//! One process, two Tokio runtimes: the server (the real control plane router, a bare
//! `POST /bare` returning 200, and `POST /checked`, which verifies and decodes the heartbeat
//! as ingest does and then answers without storing it) and the generator. The generator
//! keeps `--connections` keep-alive connections busy (one HTTP client each), sending
//! v1-signed heartbeats from `--instances` distinct instance ids, each with its own secret.
//! It drives the three routes in alternating slices (`--rounds`, so that all see the same
//! background load), `--secs` in total each, with identical work per request (build, sign,
//! send). `/checked` splits the gap between the bare route and ingest into what reading a
//! signed heartbeat costs and what storing it durably costs. `--batch-max` caps the
//! heartbeats per transaction (the server's default otherwise). PostgreSQL is reached over
//! its Unix socket (`FLEET_TEST_POSTGRES_SOCKET_URL`), as a control plane on the database's
//! machine would; `--pg-over tcp` uses `FLEET_TEST_POSTGRES_URL` instead. `--pin` keeps
//! the generator's threads on the last CPU and everything else of the process, with a local
//! PostgreSQL server's processes, on the others, as if the generator ran on a machine of its
//! own. PostgreSQL gets all the CPUs back at the end, on an error and on Ctrl-C; after a run
//! killed outright, the next `--pin` run gives them back, and a run without it warns that
//! PostgreSQL is confined. Pinning it needs root or its user.
//!
//! It reports requests/s, p50 and p99, and three CPU clocks per request: this process
//! (server and generator), the whole machine (`/proc/stat`: also the database server, the
//! kernel's writeback, anything else running) and, of that, the local PostgreSQL server's
//! processes. With every core busy the ratio of throughputs is the inverse ratio of the
//! machine's CPU per request, so these say where the ratio goes. Each round prints its own
//! ratio as it ends, and the run the spread and median of those: on a shared machine the
//! bare route's speed moves from one slice to the next. Then the ratio, how many
//! heartbeats each transaction of the writer carried (from `/metrics`), and a check that
//! every acknowledged heartbeat is in the database.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use fleet_benches::{
    Created, heartbeat, instance_id, machine_busy, postgres_cpu, postgres_schema, process_cpu,
    sqlite_store, threads_cpu,
};
use fleet_core::{Heartbeat, Limits, Secret, SecretResolver, SignatureHeaders, Signer, Verifier};
use fleet_server::store::Store;
use fleet_server::{ControlPlane, Settings};

/// The name of the generator runtime's threads, whose CPU is measured apart.
const GENERATOR_THREADS: &str = "generator";

// The same allocator as the `fleet-server` binary, for both the bare route and ingest.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Options {
    db: String,
    instances: usize,
    connections: usize,
    secs: u64,
    server_threads: usize,
    client_threads: usize,
    pg_writers: usize,
    /// `socket` or `tcp`.
    pg_over: String,
    batch_max: usize,
    rounds: usize,
    /// Generator on the last CPU, the server (and a local PostgreSQL) on the others.
    pin: bool,
}

/// What `--help` prints; an unknown flag is refused with it.
const USAGE: &str = "\
usage: ingest_load [flags]    (PostgreSQL: eval \"$(scripts/services postgres)\" first)
  --db sqlite|postgres     the store (default sqlite)
  --connections N          keep-alive connections of the generator (default 256)
  --instances N            distinct signing instances (default 10000)
  --secs N                 seconds per route, over all rounds (default 20)
  --rounds N               alternating slices of the three routes (default 5)
  --server-threads N       the server runtime's workers (default 2)
  --client-threads N       the generator runtime's workers (default 2)
  --pg-writers N           PostgreSQL writers (default: the server's default)
  --pg-over socket|tcp     how PostgreSQL is reached (default socket)
  --batch-max N            heartbeats per transaction at most (default: the server's)
  --pin                    the generator on the last CPU, the rest on the others";

fn options() -> Result<Options, String> {
    let mut o = Options {
        db: "sqlite".into(),
        instances: 10_000,
        connections: 256,
        secs: 20,
        server_threads: 2,
        client_threads: 2,
        pg_writers: fleet_server::PostgresStore::DEFAULT_WRITERS,
        pg_over: "socket".into(),
        batch_max: Settings::default().batch_max,
        rounds: 5,
        pin: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        let number = |v: String| {
            v.parse::<usize>()
                .map_err(|_| format!("{flag}: not a number"))
        };
        match flag.as_str() {
            "--db" => o.db = value()?,
            "--instances" => o.instances = number(value()?)?,
            "--connections" => o.connections = number(value()?)?,
            "--secs" => o.secs = number(value()?)? as u64,
            "--server-threads" => o.server_threads = number(value()?)?,
            "--client-threads" => o.client_threads = number(value()?)?,
            "--pg-writers" => o.pg_writers = number(value()?)?,
            "--pg-over" => o.pg_over = value()?,
            "--batch-max" => o.batch_max = number(value()?)?.max(1),
            "--rounds" => o.rounds = number(value()?)?,
            "--pin" => o.pin = true,
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    Ok(o)
}

/// `POST /checked`: the signature check and the decoding ingest does before it stores a
/// heartbeat, and nothing else.
async fn checked(
    State(verifier): State<Arc<Verifier>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let lookup =
        SignatureHeaders::from_lookup(|name| headers.get(name).and_then(|v| v.to_str().ok()));
    let verified = verifier
        .verify(&body, &lookup, fleet_core::unix_now())
        .is_ok();
    if verified && Heartbeat::decode(&body, &Limits::default()).is_ok() {
        StatusCode::OK
    } else {
        StatusCode::UNAUTHORIZED
    }
}

fn secret_text(i: usize) -> String {
    format!("bench-secret-{i:05}-0123456789abcdef")
}

#[derive(Default)]
struct Phase {
    ok: u64,
    errors: u64,
    latencies_us: Vec<u32>,
    elapsed: Duration,
    /// CPU time of the whole process (server and generator) while this route was driven.
    cpu: Duration,
    /// Of `cpu`, the generator's threads.
    generator: Duration,
    /// CPU time the whole machine was busy (every process and the kernel), from `/proc/stat`.
    machine: Duration,
    /// CPU time of the local PostgreSQL server's processes, when there are any.
    database: Option<Duration>,
}

/// A snapshot of the CPU clocks a slice is measured with.
struct Clocks {
    process: Duration,
    generator: Duration,
    machine: Duration,
    database: Option<Duration>,
}

impl Clocks {
    fn now() -> Self {
        Self {
            process: process_cpu(),
            generator: threads_cpu(GENERATOR_THREADS),
            machine: machine_busy(),
            database: postgres_cpu(),
        }
    }

    /// What each clock advanced since `self`, written into `phase`.
    fn charge(&self, phase: &mut Phase) {
        let later = Self::now();
        phase.cpu = later.process.saturating_sub(self.process);
        phase.generator = later.generator.saturating_sub(self.generator);
        phase.machine = later.machine.saturating_sub(self.machine);
        phase.database = later
            .database
            .zip(self.database)
            .map(|(after, before)| after.saturating_sub(before));
    }
}

impl Phase {
    fn merge(&mut self, other: Phase) {
        self.ok += other.ok;
        self.errors += other.errors;
        self.latencies_us.extend(other.latencies_us);
        self.elapsed += other.elapsed;
        self.cpu += other.cpu;
        self.generator += other.generator;
        self.machine += other.machine;
        self.database = match (self.database, other.database) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
    }

    fn per_request_us(&self, clock: Duration) -> f64 {
        clock.as_secs_f64() * 1e6 / self.ok.max(1) as f64
    }

    fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let i = ((self.latencies_us.len() - 1) as f64 * p).round() as usize;
        self.latencies_us[i] as f64 / 1000.0
    }
}

/// Drives `path` with every connection for `secs`.
async fn drive(
    base: &str,
    path: &str,
    o: &Options,
    clients: &[reqwest::Client],
    signers: Arc<Vec<Signer>>,
    secs: u64,
) -> Phase {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let clocks = Clocks::now();
    let mut tasks = Vec::new();
    for (c, client) in clients.iter().enumerate() {
        let url = format!("{base}{path}");
        let signers = signers.clone();
        let (instances, connections) = (o.instances, o.connections);
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut errors, mut lat) = (0u64, 0u64, Vec::with_capacity(32_768));
            let mut k = 0usize;
            while Instant::now() < deadline {
                let i = (c + k * connections) % instances;
                k += 1;
                let id = instance_id(i);
                let body = heartbeat(&id, k as u64);
                let msg = format!("msg_{}", uuid::Uuid::now_v7().simple());
                let signed = signers[i].headers(&msg, fleet_core::unix_now(), &body);
                let mut request = client.post(&url).header("content-type", "application/json");
                for (name, value) in signed.pairs() {
                    request = request.header(name, value);
                }
                let t0 = Instant::now();
                match request.body(body).send().await {
                    Ok(r) if r.status() == reqwest::StatusCode::OK => {
                        let _ = r.bytes().await;
                        ok += 1;
                        lat.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    }
                    _ => errors += 1,
                }
            }
            (ok, errors, lat)
        }));
    }
    let mut phase = Phase::default();
    for task in tasks {
        let (ok, errors, lat) = task.await.expect("generator task");
        phase.ok += ok;
        phase.errors += errors;
        phase.latencies_us.extend(lat);
    }
    phase.elapsed = started.elapsed();
    clocks.charge(&mut phase);
    phase
}

async fn open_store(o: &Options) -> Result<(Arc<dyn Store>, Created), String> {
    match o.db.as_str() {
        "sqlite" => {
            let (store, created) = sqlite_store("fleet-bench").await?;
            Ok((Arc::new(store), created))
        }
        "postgres" => {
            let (options, schema) = postgres_schema(&postgres_url(o)?, "bench").await?;
            let store = fleet_server::PostgresStore::connect_with(options)
                .await
                .map_err(|e| e.to_string())?
                .with_writers(o.pg_writers);
            Ok((Arc::new(store), Created::PostgresSchema(schema)))
        }
        other => Err(format!("--db must be sqlite or postgres, not {other}")),
    }
}

/// The database URL for `--pg-over`.
fn postgres_url(o: &Options) -> Result<String, String> {
    let variable = match o.pg_over.as_str() {
        "socket" => "FLEET_TEST_POSTGRES_SOCKET_URL",
        "tcp" => "FLEET_TEST_POSTGRES_URL",
        other => return Err(format!("--pg-over must be socket or tcp, not {other}")),
    };
    std::env::var(variable)
        .map_err(|_| format!("{variable} is not set (eval \"$(scripts/services postgres)\")"))
}

/// The CPUs of the generator and of the server with `--pin`: the last of `cpus`, and the
/// others.
fn pinned_cpus(cpus: &[usize]) -> Result<(Vec<usize>, Vec<usize>), String> {
    match cpus.split_last() {
        Some((&last, others)) if !others.is_empty() => Ok((vec![last], others.to_vec())),
        _ => Err("--pin needs at least 2 CPUs".into()),
    }
}

fn main() -> std::process::ExitCode {
    fleet_benches::exit_code("ingest_load", main_with_options())
}

fn main_with_options() -> Result<(), String> {
    let o = options()?;
    // Read before any pinning, which narrows what the process may use.
    let all_cpus = fleet_benches::current_cpus();
    let cpus = all_cpus.len().max(1);
    let pinning = o.pin.then(|| pinned_cpus(&all_cpus)).transpose()?;
    // With --pin, the main thread takes the server's CPUs first, so the threads it starts (the
    // store's own, such as SQLite's checkpoint) have them too; a local PostgreSQL as well.
    let _pinned_postgres = match &pinning {
        Some((_, server)) => {
            fleet_benches::pin_current_thread(server)?;
            (o.db == "postgres")
                .then(|| fleet_benches::PinnedPostgres::pin(server, &all_cpus))
                .transpose()?
        }
        None => {
            if o.db == "postgres"
                && let Some(warning) = fleet_benches::postgres_confinement(&all_cpus)
            {
                eprintln!("{warning}");
            }
            None
        }
    };
    let pin_to = |cpus: Option<Vec<usize>>| {
        move || {
            if let Some(cpus) = &cpus
                && let Err(err) = fleet_benches::pin_current_thread(cpus)
            {
                eprintln!("{err}");
            }
        }
    };
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.server_threads)
        .thread_name("server")
        .on_thread_start(pin_to(pinning.as_ref().map(|(_, server)| server.clone())))
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.client_threads)
        .thread_name(GENERATOR_THREADS)
        .on_thread_start(pin_to(
            pinning.as_ref().map(|(generator, _)| generator.clone()),
        ))
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;

    let mut map = serde_json::Map::new();
    for i in 0..o.instances {
        map.insert(instance_id(i), serde_json::Value::String(secret_text(i)));
    }
    let resolver =
        SecretResolver::from_config(Some(&serde_json::Value::Object(map).to_string()), None)
            .map_err(|e| e.to_string())?;
    let signers: Arc<Vec<Signer>> = Arc::new(
        (0..o.instances)
            .map(|i| Signer::new(Secret::new(&secret_text(i)).expect("secret")))
            .collect(),
    );

    let checker = Arc::new(Verifier::new(resolver.clone()));
    let (store, created) = server_rt.block_on(open_store(&o))?;
    let where_ = match &created {
        Created::PostgresSchema(_) => format!("{created} over {}", o.pg_over),
        Created::SqliteDir(_) => created.to_string(),
    };
    let base = server_rt.block_on(async {
        let router = ControlPlane::builder()
            .shared_store(store.clone())
            .secrets(resolver)
            .settings(Settings {
                batch_max: o.batch_max,
                ..Settings::default()
            })
            .build()
            .map_err(|e| e.to_string())?;
        let app = axum::Router::new()
            .route(
                "/bare",
                axum::routing::post(|| async { axum::http::StatusCode::OK }),
            )
            .route("/checked", axum::routing::post(checked).with_state(checker))
            .merge(router);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok::<_, String>(format!("http://{addr}"))
    })?;

    let placement = match &pinning {
        Some((generator, server)) => format!(
            "; pinned: generator on CPU {generator:?}, server{} on {server:?}",
            if o.db == "postgres" {
                " and PostgreSQL"
            } else {
                ""
            }
        ),
        None => String::new(),
    };
    println!(
        "ingest_load: db={} ({where_}), {} instances, {} keep-alive connections, {} s per route in {} rounds, \
         server {} threads + generator {} threads on {cpus} CPUs{placement}",
        o.db, o.instances, o.connections, o.secs, o.rounds, o.server_threads, o.client_threads,
    );
    let run = async {
        // One client per connection, built once (building one loads the TLS roots), each
        // keeping its own keep-alive connection for the whole run.
        let clients: Vec<reqwest::Client> = (0..o.connections)
            .map(|_| reqwest::Client::builder().pool_max_idle_per_host(1).build())
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        // Warm up connections and code paths on the bare route.
        drive(&base, "/bare", &o, &clients, signers.clone(), 2).await;
        // The routes alternate, so all see the same background load on a shared machine;
        // each round runs each route for secs / rounds.
        let slice = (o.secs / o.rounds.max(1) as u64).max(1);
        let (mut bare, mut checked, mut ingest) =
            (Phase::default(), Phase::default(), Phase::default());
        let mut round_ratios = Vec::with_capacity(o.rounds.max(1));
        for round in 1..=o.rounds.max(1) {
            let b = drive(&base, "/bare", &o, &clients, signers.clone(), slice).await;
            let c = drive(&base, "/checked", &o, &clients, signers.clone(), slice).await;
            let i = drive(
                &base,
                "/api/heartbeats",
                &o,
                &clients,
                signers.clone(),
                slice,
            )
            .await;
            // Each round's own ratio: how far the machine's noise moves it within one run.
            let ratio = 100.0 * i.rate() / b.rate();
            println!(
                "round {round}: bare {:.0}/s, checked {:.0}/s, ingest {:.0}/s, ingest / bare = {ratio:.0}%",
                b.rate(),
                c.rate(),
                i.rate(),
            );
            round_ratios.push(ratio);
            bare.merge(b);
            checked.merge(c);
            ingest.merge(i);
        }
        for phase in [&mut bare, &mut checked, &mut ingest] {
            phase.latencies_us.sort_unstable();
        }
        let metrics = clients[0]
            .get(format!("{base}/metrics"))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .text()
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((bare, checked, ingest, metrics, round_ratios))
    };
    // Interrupted, the run ends through main's return, so a pinned PostgreSQL gets its CPUs
    // back.
    let (bare, checked, ingest, metrics, mut round_ratios) = client_rt.block_on(async {
        tokio::select! {
            outcome = run => outcome,
            _ = tokio::signal::ctrl_c() => Err("interrupted".to_owned()),
        }
    })?;
    let stored = server_rt
        .block_on(store.heartbeat_count())
        .map_err(|e| e.to_string())?;

    let cores = cpus as f64;
    println!(
        "| route | accepted/s | p50 ms | p99 ms | errors | CPU µs/request: this process | \
         of it the generator | whole machine | of it PostgreSQL | machine busy |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (name, p) in [
        ("bare axum 200 (`POST /bare`)", &bare),
        ("verify + decode, not stored (`POST /checked`)", &checked),
        ("`POST /api/heartbeats` (durable)", &ingest),
    ] {
        let database = p
            .database
            .map(|d| format!("{:.0}", p.per_request_us(d)))
            .unwrap_or_else(|| "-".into());
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} | {} | {:.0} | {:.0} | {:.0} | {database} | {:.0}% |",
            p.rate(),
            p.percentile(0.50),
            p.percentile(0.99),
            p.errors,
            p.per_request_us(p.cpu),
            p.per_request_us(p.generator),
            p.per_request_us(p.machine),
            100.0 * p.machine.as_secs_f64() / (p.elapsed.as_secs_f64() * cores),
        );
    }
    // With every core busy, throughput is cores / CPU per request, so the ratio is the
    // inverse ratio of the machine's CPU per request: this is the budget 50% allows.
    // Pinned, the generator's CPU bounds the bare route and the machine is not saturated.
    if pinning.is_none() {
        println!(
            "machine CPU per request: ingest {:.0} µs, bare {:.0} µs; 50% of the bare route \
             allows ingest {:.0} µs on a saturated machine",
            ingest.per_request_us(ingest.machine),
            bare.per_request_us(bare.machine),
            2.0 * bare.per_request_us(bare.machine)
        );
    }
    println!(
        "checked / bare = {:.0}%, ingest / bare = {:.0}%",
        100.0 * checked.rate() / bare.rate(),
        100.0 * ingest.rate() / bare.rate()
    );
    round_ratios.sort_by(f64::total_cmp);
    println!(
        "ingest / bare by round: {:.0}% to {:.0}%, median {:.0}%",
        round_ratios[0],
        round_ratios[round_ratios.len() - 1],
        round_ratios[round_ratios.len() / 2]
    );
    let counter = |name: &str| {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let (batches, batched) = (
        counter("fleet_ingest_batches_total "),
        counter("fleet_ingest_batched_heartbeats_total "),
    );
    println!(
        "writer: {batches:.0} transactions, {:.1} heartbeats each on average",
        batched / batches.max(1.0)
    );
    println!(
        "count check: {} heartbeats acknowledged, {} in the database: {}",
        ingest.ok,
        stored,
        if stored == ingest.ok as i64 {
            "OK"
        } else {
            "MISMATCH"
        }
    );
    if stored != ingest.ok as i64 {
        return Err(format!(
            "acknowledged heartbeats missing from the database ({where_}, kept)"
        ));
    }
    server_rt.block_on(created.remove(postgres_url(&o).ok().as_deref()));
    Ok(())
}
