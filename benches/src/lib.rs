//! Benchmarks live in `benches/`; run them with `cargo bench -p fleet-benches`. This library
//! holds what the load harnesses in `src/bin` share: the heartbeat they send and the CPU
//! clocks they read.

use std::time::Duration;

/// The instance id of the `i`-th instance of a load run.
pub fn instance_id(i: usize) -> String {
    format!("bench-{i:05}")
}

/// An ERP-shaped heartbeat of about 700 bytes from `instance`, its figures moving with `n`.
pub fn heartbeat(instance: &str, n: u64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "instance_id": instance, "domain": format!("{instance}.example.com"), "client": "Bench SA",
        "version": "2.0.1", "release_channel": "stable", "health": "ok",
        "db_ok": true, "redis_ok": true, "storage_ok": true, "search_ok": true, "jobs_failed": 0,
        "uptime_seconds": 3600 + n, "cpu_usage_pct": (n % 100) as f64, "memory_used_bytes": 4_000_000_000u64 + n,
        "memory_total_bytes": 8_000_000_000u64, "disk_used_bytes": 50_000_000_000u64, "disk_total_bytes": 100_000_000_000u64,
        "slo_p95_ms": 120.0, "slo_error_rate": 0.001, "jobs_processed_1h": 420, "jobs_pending": 3,
        "last_backup_at": "2026-11-22T02:00:00Z", "backup_checksum": "sha256-abc", "backup_status": "ok",
        "checks": [{"name": "db", "ok": true, "latency_ms": 2.1}, {"name": "redis", "ok": true, "latency_ms": 0.3},
                   {"name": "storage", "ok": true, "latency_ms": 8.0}],
        "primary_region": "eu-west-1"
    }))
    .unwrap_or_default()
}

/// User and system ticks (1/100 s) of a `/proc/<pid>/stat` line: fields 14 and 15, counted
/// after the parenthesised command name, which may itself contain spaces.
fn stat_ticks(stat: &str) -> Duration {
    let after = stat.rsplit_once(") ").map(|(_, rest)| rest).unwrap_or("");
    let ticks: u64 = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}

/// CPU time (user + system) this process has used so far. CPU per request is steadier than
/// requests/s when other work shares the machine.
pub fn process_cpu() -> Duration {
    stat_ticks(&std::fs::read_to_string("/proc/self/stat").unwrap_or_default())
}

/// CPU time used so far by this process's threads whose name starts with `prefix` (a Tokio
/// runtime names its threads): splits the process clock between a load generator and the
/// server it drives in the same process. Threads that have ended are not counted.
pub fn threads_cpu(prefix: &str) -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    tasks
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|comm| comm.starts_with(prefix))
        })
        .filter_map(|task| std::fs::read_to_string(task.path().join("stat")).ok())
        .map(|stat| stat_ticks(&stat))
        .sum()
}

/// CPU time all cores have spent busy since boot (everything but idle and iowait), from the
/// first line of `/proc/stat`. Per request, it counts what the process clock cannot see: the
/// database server's processes, the kernel's writeback threads, anything else running.
pub fn machine_busy() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal; guest time is already in user.
    let busy: u64 = ticks.iter().take(8).sum::<u64>()
        - ticks.get(3).copied().unwrap_or(0)
        - ticks.get(4).copied().unwrap_or(0);
    Duration::from_millis(busy * 10)
}

/// CPU time used so far by the processes named `postgres` on this machine (the server, its
/// backends and background workers), or `None` when there are none, as with a remote server.
pub fn postgres_cpu() -> Option<Duration> {
    let mut total = None;
    for pid in postgres_pids() {
        let path = format!("/proc/{}/stat", pid.as_raw_nonzero());
        if let Ok(stat) = std::fs::read_to_string(path) {
            *total.get_or_insert(Duration::ZERO) += stat_ticks(&stat);
        }
    }
    total
}

/// The set of the CPUs numbered in `cpus`.
fn cpu_set(cpus: &[usize]) -> rustix::thread::CpuSet {
    let mut set = rustix::thread::CpuSet::new();
    for &cpu in cpus {
        set.set(cpu);
    }
    set
}

/// Keeps the calling thread (and the threads it starts from now on) on `cpus`.
pub fn pin_current_thread(cpus: &[usize]) -> Result<(), String> {
    rustix::thread::sched_setaffinity(None, &cpu_set(cpus))
        .map_err(|err| format!("cannot pin a thread to CPUs {cpus:?}: {err}"))
}

/// The local PostgreSQL server's processes, pinned to some CPUs until this is dropped, when
/// each is given the CPUs this process could use before any pinning. Backends started
/// meanwhile are forked by the postmaster, so they inherit its pinning, and are given the CPUs
/// back on drop like the rest. What they had before is not restored, so that the pinning a
/// killed run left behind is undone by the next pinned run rather than carried on.
pub struct PinnedPostgres {
    give_back: rustix::thread::CpuSet,
}

impl PinnedPostgres {
    /// Pins every process named `postgres` to `cpus`, to be given `give_back` on drop. Needs
    /// the right to change another user's processes (root, or the `postgres` user).
    pub fn pin(cpus: &[usize], give_back: &[usize]) -> Result<Self, String> {
        let set = cpu_set(cpus);
        let pinned = Self {
            give_back: cpu_set(give_back),
        };
        for pid in postgres_pids() {
            rustix::thread::sched_setaffinity(Some(pid), &set).map_err(|err| {
                format!(
                    "cannot pin PostgreSQL process {pid:?} to CPUs {cpus:?}: {err} \
                     (run as root or as the postgres user)"
                )
            })?;
        }
        Ok(pinned)
    }
}

impl Drop for PinnedPostgres {
    fn drop(&mut self) {
        for pid in postgres_pids() {
            // A backend that ended since is gone; nothing to give back.
            let _ = rustix::thread::sched_setaffinity(Some(pid), &self.give_back);
        }
    }
}

/// The CPUs the calling thread may run on.
pub fn current_cpus() -> Vec<usize> {
    let Ok(set) = rustix::thread::sched_getaffinity(None) else {
        return Vec::new();
    };
    (0..rustix::thread::CpuSet::MAX_CPU)
        .filter(|&cpu| set.is_set(cpu))
        .collect()
}

/// A warning when some local PostgreSQL process may not run on every CPU in `cpus`, as a
/// run killed while it had PostgreSQL pinned leaves it: the figures of the next run would
/// measure a PostgreSQL with fewer CPUs than the machine has. `None` when all may.
pub fn postgres_confinement(cpus: &[usize]) -> Option<String> {
    let confined: Vec<i32> = postgres_pids()
        .into_iter()
        .filter(|&pid| {
            rustix::thread::sched_getaffinity(Some(pid))
                .is_ok_and(|set| cpus.iter().any(|&cpu| !set.is_set(cpu)))
        })
        .map(|pid| pid.as_raw_nonzero().get())
        .collect();
    (!confined.is_empty()).then(|| {
        format!(
            "warning: {} PostgreSQL processes may not use all of CPUs {cpus:?} (left by a \
             killed --pin run?); a run with --pin gives them back, or `taskset -a -p -c {} PID` \
             for each of {confined:?}",
            confined.len(),
            cpus.iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(","),
        )
    })
}

/// The processes on this machine named `postgres`.
fn postgres_pids() -> Vec<rustix::process::Pid> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| {
            std::fs::read_to_string(entry.path().join("comm"))
                .is_ok_and(|comm| comm.trim_end() == "postgres")
        })
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(rustix::process::Pid::from_raw)
        .collect()
}

/// Creates a schema of its own for a run (`{prefix}_{uuid}`) in the database at `url`, and
/// returns the connect options that keep the store's tables in it, with its name.
pub async fn postgres_schema(
    url: &str,
    prefix: &str,
) -> Result<(sqlx::postgres::PgConnectOptions, String), String> {
    use std::str::FromStr;
    let schema = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::PgPool::connect(url)
        .await
        .map_err(|e| e.to_string())?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&admin)
        .await
        .map_err(|e| e.to_string())?;
    let options = sqlx::postgres::PgConnectOptions::from_str(url)
        .map_err(|e| e.to_string())?
        .options([("search_path", schema.as_str())]);
    Ok((options, schema))
}

/// What a run created for its store: named in the run's report, removed afterwards.
pub enum Created {
    /// A temporary folder holding the SQLite database.
    SqliteDir(std::path::PathBuf),
    /// A PostgreSQL schema of the run's own.
    PostgresSchema(String),
}

impl std::fmt::Display for Created {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::SqliteDir(dir) => write!(f, "{}", dir.join("fleet.db").display()),
            Self::PostgresSchema(schema) => write!(f, "postgres schema {schema}"),
        }
    }
}

impl Created {
    /// Removes it (a schema through the database at `postgres_url`); what cannot be removed
    /// is left for a look.
    pub async fn remove(&self, postgres_url: Option<&str>) {
        match self {
            Self::SqliteDir(dir) => {
                let _ = std::fs::remove_dir_all(dir);
            }
            Self::PostgresSchema(schema) => {
                let Some(url) = postgres_url else { return };
                if let Ok(admin) = sqlx::PgPool::connect(url).await {
                    let drop = format!("DROP SCHEMA {schema} CASCADE");
                    let _ = sqlx::query(sqlx::AssertSqlSafe(drop)).execute(&admin).await;
                }
            }
        }
    }
}

/// A SQLite store in a temporary folder of its own (`{prefix}-{uuid}`).
pub async fn sqlite_store(prefix: &str) -> Result<(fleet_server::SqliteStore, Created), String> {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let url = format!("sqlite://{}", dir.join("fleet.db").display());
    let store = fleet_server::SqliteStore::connect(&url)
        .await
        .map_err(|e| e.to_string())?;
    Ok((store, Created::SqliteDir(dir)))
}

/// A bench binary's exit status: success, or its error printed after its name.
pub fn exit_code(program: &str, outcome: Result<(), String>) -> std::process::ExitCode {
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{program}: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}
