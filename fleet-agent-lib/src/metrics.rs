//! Host metrics from `/proc` and `statvfs`: CPU, memory, disk, network, load and uptime.
//!
//! Read directly rather than through a system-information crate: a handful of small files,
//! parsed by pure functions, keep the agent small and the parsing testable.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fleet_core::Heartbeat;
use fleet_core::heartbeat::HostInfo;

use crate::collectors::Collector;

/// Cumulative CPU time counters from the `cpu` line of `/proc/stat`, in ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// Ticks spent idle or waiting for I/O.
    pub idle: u64,
    /// All ticks.
    pub total: u64,
}

/// Parses the aggregate `cpu` line of `/proc/stat`.
pub fn parse_proc_stat(text: &str) -> Option<CpuTimes> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    if fields.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is
    // already counted in user, so only the first eight fields add up to the total.
    let total = fields.iter().take(8).sum();
    let idle = fields[3] + fields.get(4).copied().unwrap_or(0);
    Some(CpuTimes { idle, total })
}

/// CPU use between two readings, in percent.
pub fn cpu_usage_pct(before: CpuTimes, after: CpuTimes) -> Option<f64> {
    let total = after.total.checked_sub(before.total)?;
    let idle = after.idle.checked_sub(before.idle)?;
    if total == 0 {
        return None;
    }
    let busy = total.saturating_sub(idle) as f64 / total as f64 * 100.0;
    Some((busy * 100.0).round() / 100.0)
}

/// `(used, total)` bytes from `/proc/meminfo`; used is total minus `MemAvailable`.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kib| kib * 1024)
    };
    let total = field("MemTotal:")?;
    let available = field("MemAvailable:").or_else(|| field("MemFree:"))?;
    Some((total.saturating_sub(available), total))
}

/// `(rx, tx)` bytes summed over every interface but loopback, from `/proc/net/dev`.
pub fn parse_net_dev(text: &str) -> (u64, u64) {
    let mut rx = 0u64;
    let mut tx = 0u64;
    for line in text.lines().skip(2) {
        let Some((iface, counters)) = line.split_once(':') else {
            continue;
        };
        if iface.trim() == "lo" {
            continue;
        }
        let fields: Vec<u64> = counters
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        if fields.len() >= 9 {
            rx = rx.saturating_add(fields[0]);
            tx = tx.saturating_add(fields[8]);
        }
    }
    (rx, tx)
}

/// One reading of the host.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostSnapshot {
    /// CPU use since the previous reading (since boot for the first one).
    pub cpu_usage_pct: Option<f64>,
    /// Memory in use.
    pub memory_used_bytes: Option<u64>,
    /// Memory installed.
    pub memory_total_bytes: Option<u64>,
    /// Disk in use on the configured filesystem.
    pub disk_used_bytes: Option<u64>,
    /// Disk size of the configured filesystem.
    pub disk_total_bytes: Option<u64>,
    /// Bytes received, all interfaces but loopback.
    pub network_rx_bytes: Option<u64>,
    /// Bytes sent, all interfaces but loopback.
    pub network_tx_bytes: Option<u64>,
    /// Host facts.
    pub host: HostInfo,
}

impl HostSnapshot {
    fn apply(&self, hb: &mut Heartbeat) {
        hb.cpu_usage_pct = self.cpu_usage_pct;
        hb.memory_used_bytes = self.memory_used_bytes;
        hb.memory_total_bytes = self.memory_total_bytes;
        hb.disk_used_bytes = self.disk_used_bytes;
        hb.disk_total_bytes = self.disk_total_bytes;
        hb.network_rx_bytes = self.network_rx_bytes;
        hb.network_tx_bytes = self.network_tx_bytes;
        hb.host = Some(self.host.clone());
    }
}

/// Collects host metrics from `/proc`, refreshed at most once per interval (the Neon agent's
/// `METRICS_INTERVAL`); heartbeats in between carry the last reading.
pub struct HostMetrics {
    proc_root: PathBuf,
    disk_path: PathBuf,
    interval: Duration,
    state: Mutex<HostState>,
}

#[derive(Default)]
struct HostState {
    cpu: Option<CpuTimes>,
    last: Option<(Instant, HostSnapshot)>,
}

impl HostMetrics {
    /// Reads `/proc` and the filesystem holding `disk_path`, every `interval`.
    pub fn new(disk_path: impl Into<PathBuf>, interval: Duration) -> Self {
        Self {
            proc_root: PathBuf::from("/proc"),
            disk_path: disk_path.into(),
            interval,
            state: Mutex::new(HostState::default()),
        }
    }

    /// Takes a reading now, whatever the interval.
    pub fn read(&self) -> Result<HostSnapshot, String> {
        let read = |name: &str| {
            std::fs::read_to_string(self.proc_root.join(name))
                .map_err(|e| format!("read /proc/{name}: {e}"))
        };
        let stat = parse_proc_stat(&read("stat")?).ok_or("no cpu line in /proc/stat")?;
        let (mem_used, mem_total) =
            parse_meminfo(&read("meminfo")?).ok_or("no MemTotal in /proc/meminfo")?;
        let (rx, tx) = parse_net_dev(&read("net/dev").unwrap_or_default());
        let disk = rustix::fs::statvfs(&self.disk_path)
            .map_err(|e| format!("statvfs {}: {e}", self.disk_path.display()))?;
        let disk_total = disk.f_blocks.saturating_mul(disk.f_frsize);
        let disk_free = disk.f_bfree.saturating_mul(disk.f_frsize);

        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let since = state.cpu.unwrap_or_default();
        state.cpu = Some(stat);
        drop(state);

        let first_field = |text: String| {
            text.split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
        };
        Ok(HostSnapshot {
            cpu_usage_pct: cpu_usage_pct(since, stat),
            memory_used_bytes: Some(mem_used),
            memory_total_bytes: Some(mem_total),
            disk_used_bytes: Some(disk_total.saturating_sub(disk_free)),
            disk_total_bytes: Some(disk_total),
            network_rx_bytes: Some(rx),
            network_tx_bytes: Some(tx),
            host: HostInfo {
                hostname: read("sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_owned()),
                os: Some(std::env::consts::OS.to_owned()),
                arch: Some(std::env::consts::ARCH.to_owned()),
                cpu_count: std::thread::available_parallelism()
                    .ok()
                    .map(|n| n.get() as u64),
                load_1m: read("loadavg").ok().and_then(first_field),
                uptime_seconds: read("uptime").ok().and_then(first_field).map(|s| s as u64),
                extra: Default::default(),
            },
        })
    }
}

#[async_trait]
impl Collector for HostMetrics {
    fn name(&self) -> &str {
        "host"
    }

    async fn collect(&self, hb: &mut Heartbeat) -> Result<(), String> {
        let fresh = {
            let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            match &state.last {
                Some((at, snap)) if at.elapsed() < self.interval => Some(snap.clone()),
                _ => None,
            }
        };
        let snapshot = match fresh {
            Some(snap) => snap,
            None => {
                let snap = self.read()?;
                let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                state.last = Some((Instant::now(), snap.clone()));
                snap
            }
        };
        snapshot.apply(hb);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_from_proc_stat() {
        let a = parse_proc_stat("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3 4\n").unwrap();
        assert_eq!(
            a,
            CpuTimes {
                idle: 800,
                total: 1000
            }
        );
        // Guest time (the ninth field) is already inside user time, so it is not added.
        let b = parse_proc_stat("cpu  300 0 100 1400 200 0 0 0 50 0\n").unwrap();
        // 1000 more ticks, 800 of them idle.
        assert_eq!(cpu_usage_pct(a, b), Some(20.0));
        assert_eq!(cpu_usage_pct(b, a), None);
        assert_eq!(parse_proc_stat("intr 1 2"), None);
    }

    #[test]
    fn memory_uses_mem_available() {
        let text = "MemTotal:       16000 kB\nMemFree:         1000 kB\nMemAvailable:    4000 kB\n";
        assert_eq!(parse_meminfo(text), Some((12000 * 1024, 16000 * 1024)));
        assert_eq!(
            parse_meminfo("MemTotal: 10 kB\nMemFree: 4 kB\n"),
            Some((6144, 10240))
        );
        assert_eq!(parse_meminfo(""), None);
    }

    #[test]
    fn network_skips_loopback() {
        let text = "Inter-|   Receive |  Transmit\n face |bytes packets errs drop fifo frame compressed multicast|bytes\n    lo: 999 1 0 0 0 0 0 0 999 1 0 0 0 0 0 0\n  eth0: 100 1 0 0 0 0 0 0 50 1 0 0 0 0 0 0\n  eth1:20 1 0 0 0 0 0 0 5 1 0 0 0 0 0 0\n";
        assert_eq!(parse_net_dev(text), (120, 55));
    }

    #[tokio::test]
    async fn reads_this_host_and_caches_for_the_interval() {
        let host = HostMetrics::new("/", Duration::from_secs(3600));
        let mut hb = Heartbeat::new("x");
        host.collect(&mut hb).await.unwrap();
        assert!(hb.memory_total_bytes.unwrap() > 0);
        assert!(hb.disk_total_bytes.unwrap() > 0);
        assert!(hb.host.as_ref().unwrap().cpu_count.unwrap() >= 1);
        let first = hb.clone();
        let mut again = Heartbeat::new("x");
        host.collect(&mut again).await.unwrap();
        assert_eq!(again.memory_used_bytes, first.memory_used_bytes);
    }
}
