//! `fleet-server demo`: a live dashboard in one command.
//!
//! SQLite in a data folder, an admin token and a release signing key (kept in the folder so
//! they survive restarts), and a few in-process agents that send real signed heartbeats to
//! the server over loopback — the same bytes and headers a deployed agent sends — and take
//! the update jobs a rollout hands them, so a rollout can be tried against the demo too.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use fleet_core::manifest::{ManifestVerifier, PrivateKey};
use fleet_core::{Secret, SecretResolver, Signer};
use fleet_server::{ControlPlane, LiveSettings, RoleTokens, Settings, SloThresholds};
use serde_json::json;

/// Options of the demo.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Folder for the database and the login token.
    #[arg(long, default_value = "fleet-demo")]
    pub data: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "FLEET_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Seconds between two heartbeats of a demo agent.
    #[arg(long, default_value_t = 5)]
    pub interval_secs: u64,
}

/// One demo instance.
struct DemoAgent {
    instance_id: &'static str,
    client: &'static str,
    channel: &'static str,
    /// Signs with the ERP's v0 scheme, to show how the dashboard marks old agents.
    legacy: bool,
    /// Phase of its figures, so the charts differ.
    phase: f64,
}

const AGENTS: [DemoAgent; 3] = [
    DemoAgent {
        instance_id: "demo-shop-1",
        client: "Acme SA",
        channel: "stable",
        legacy: false,
        phase: 0.0,
    },
    DemoAgent {
        instance_id: "demo-shop-2",
        client: "Globex",
        channel: "beta",
        legacy: false,
        phase: 2.0,
    },
    DemoAgent {
        instance_id: "demo-legacy",
        client: "Initech",
        channel: "stable",
        legacy: true,
        phase: 4.0,
    },
];

pub async fn run(args: DemoArgs) -> Result<(), String> {
    // The address first: when it is taken, nothing has been created, no agent sends to
    // whatever holds it, and nothing says the demo is running.
    let listener = crate::listen(args.listen).await?;
    let existed = args.data.exists();
    std::fs::create_dir_all(&args.data)
        .map_err(|e| format!("cannot create {}: {e}", args.data.display()))?;
    // The folder holds the admin token, the release key and the database with the agent
    // token key: its owner's only, when the demo made it.
    #[cfg(unix)]
    if !existed {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&args.data, std::fs::Permissions::from_mode(0o700));
    }
    let token = admin_token(&args.data)?;
    let release_key_path = args.data.join("release.key");
    let release_key = release_key(&release_key_path)?;
    let db = args.data.join("fleet.db");
    let store = fleet_server::SqliteStore::connect(&format!("sqlite://{}", db.display()))
        .await
        .map_err(|e| format!("cannot open {}: {e}", db.display()))?;
    let secrets: Vec<(&str, String)> = AGENTS
        .iter()
        .map(|a| {
            (
                a.instance_id,
                format!("demo-secret-{}", uuid::Uuid::new_v4().simple()),
            )
        })
        .collect();
    let map: serde_json::Map<String, serde_json::Value> = secrets
        .iter()
        .map(|(id, s)| ((*id).to_owned(), json!(s)))
        .collect();
    let resolver =
        SecretResolver::from_config(Some(&serde_json::Value::Object(map).to_string()), None)
            .map_err(|e| e.to_string())?;
    let settings = Settings {
        slo: SloThresholds {
            p95_ms_max: 500.0,
            error_rate_max: 0.05,
            webhook_retry_rate_max: 0.0,
        },
        offline_after: Duration::from_secs(args.interval_secs * 6),
        sweep_interval: Duration::from_secs(args.interval_secs),
        ..Settings::default()
    };
    // As `serve` does without CONTROL_PLANE_JWT_KEY: the key kept in the database, so that
    // agent tokens outlive a restart of the demo.
    let jwt_key = fleet_server::stored_jwt_key(&store)
        .await
        .map_err(|e| format!("cannot read the agent token key from the database: {e}"))?;
    let builder = ControlPlane::builder()
        .store(store)
        .live(LiveSettings {
            jwt_key: Some(jwt_key),
            ..LiveSettings::default()
        })
        .manifest_verifier(ManifestVerifier::new(vec![release_key.public_key()]))
        .secrets(resolver)
        .tokens(RoleTokens {
            admin: Some(token.clone()),
            ..RoleTokens::default()
        })
        .settings(settings);
    let url = format!("http://{}", args.listen);
    for (agent, (_, secret)) in AGENTS.iter().zip(secrets) {
        let secret = Secret::new(&secret).map_err(|e| e.to_string())?;
        tokio::spawn(send_heartbeats(
            url.clone(),
            agent,
            Signer::new(secret),
            args.interval_secs,
        ));
    }
    println!("fleet demo is running.");
    println!("  Dashboard:    {url}/");
    println!(
        "  Login token:  {token}   (admin; kept in {})",
        args.data.join("admin-token").display()
    );
    println!("  Database:     {}", db.display());
    println!(
        "  Agents:       demo-shop-1 and demo-shop-2 (v1 signatures; shop-2 breaches its p95 SLO now and then),"
    );
    println!("                demo-legacy (v0 signature, as the ERP instance agent sends)");
    println!(
        "  Releases:     sign manifests with {} (`fleetctl release sign --key …`); the demo agents install what a rollout hands them",
        release_key_path.display()
    );
    println!("Press Ctrl-C to stop.");
    crate::run_server(listener, builder).await
}

/// The demo's admin token: read from the data folder, or created there (mode 0600).
fn admin_token(data: &std::path::Path) -> Result<String, String> {
    let path = data.join("admin-token");
    if let Ok(text) = std::fs::read_to_string(&path)
        && !text.trim().is_empty()
    {
        return Ok(text.trim().to_owned());
    }
    let token = format!("demo-{}", uuid::Uuid::new_v4().simple());
    write_private(&path, &token)?;
    Ok(token)
}

/// The demo's release signing key, read from `path` or created there as `fleetctl keys
/// generate` writes one (its public half in `<path>.pub`). The demo's control plane trusts
/// it, so the README's release and rollout commands work against the demo.
fn release_key(path: &Path) -> Result<PrivateKey, String> {
    if let Ok(text) = std::fs::read_to_string(path) {
        return PrivateKey::from_base64(text.trim())
            .map_err(|e| format!("{}: {e}", path.display()));
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| format!("no randomness from the OS: {e}"))?;
    let key = PrivateKey::from_seed(seed);
    write_private(path, &key.to_base64())?;
    let public = PathBuf::from(format!("{}.pub", path.display()));
    std::fs::write(&public, format!("{}\n", key.public_key().to_base64()))
        .map_err(|e| format!("cannot write {}: {e}", public.display()))?;
    Ok(key)
}

/// Writes `text` to `path`, readable by its owner only.
fn write_private(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    Ok(())
}

/// Heartbeats between two backups of a demo instance.
const TICKS_PER_BACKUP: u64 = 20;

/// A heartbeat whose figures move smoothly with `tick`. `backup_at` (unix seconds) is when
/// the instance's current backup was taken, a new one every [`TICKS_PER_BACKUP`] heartbeats.
/// `version` is what the instance runs: its first version until a rollout updates it.
fn heartbeat(agent: &DemoAgent, tick: u64, backup_at: i64, version: &str) -> Vec<u8> {
    let t = tick as f64 * 0.35 + agent.phase;
    let total: u64 = 8 * 1024 * 1024 * 1024;
    let memory = (total as f64 * (0.55 + 0.15 * (t * 0.7).sin())) as u64;
    let p95 = if agent.instance_id == "demo-shop-2" {
        380.0 + 220.0 * t.sin()
    } else {
        120.0 + 30.0 * t.sin()
    };
    let mut job_failures = Vec::new();
    if agent.instance_id == "demo-shop-2" && tick % 9 == 4 {
        job_failures.push(json!({"queue": "billing", "message": "Timeout after 30 s"}));
    }
    let mut alerts = Vec::new();
    if agent.legacy && (tick / 6) % 2 == 1 {
        alerts.push(json!({"level": "warning", "message": "Low disk on /var"}));
    }
    let mut hb = json!({
        "instance_id": agent.instance_id,
        "domain": format!("{}.example.com", agent.instance_id),
        "client": agent.client,
        "version": version,
        "release_channel": agent.channel,
        "health": "ok",
        "db_ok": true, "redis_ok": true, "storage_ok": true, "search_ok": true,
        "jobs_failed": job_failures.len(),
        "uptime_seconds": 3600 + tick * 5,
        "cpu_usage_pct": ((35.0 + 25.0 * t.sin()) * 10.0).round() / 10.0,
        "memory_used_bytes": memory,
        "memory_total_bytes": total,
        "slo_p95_ms": p95.round(),
        "slo_error_rate": 0.002,
        "backup_status": "ok",
        "backup_checksum": format!("sha256-{}-{}", agent.instance_id, tick / TICKS_PER_BACKUP),
        "backup_id": format!("backup-{}", tick / TICKS_PER_BACKUP),
        "last_backup_at": fleet_core::clock::rfc3339(backup_at),
        "backup_size_bytes": 1_200_000_000 + (tick / TICKS_PER_BACKUP) * 3_500_000,
        "checks": [
            {"name": "db", "ok": true, "latency_ms": 2.0 + (t * 3.0).sin().abs() * 4.0},
            {"name": "redis", "ok": true, "latency_ms": 0.4},
            {"name": "storage", "ok": true, "latency_ms": 11.0}
        ],
        "alerts": alerts,
        "job_failures": job_failures,
    });
    // As fleet-agent says when it collected a heartbeat; the ERP's agent does not.
    if !agent.legacy {
        hb["collected_at"] = fleet_core::unix_now().into();
    }
    serde_json::to_vec(&hb).unwrap_or_default()
}

/// Signs `body` as `agent` does (the ERP's v0 for the legacy agent, v1 for the others) and
/// posts it to `url`.
async fn post_signed(
    client: &reqwest::Client,
    url: &str,
    agent: &DemoAgent,
    signer: &Signer,
    body: Vec<u8>,
) -> Result<reqwest::Response, String> {
    let mut request = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json");
    if agent.legacy {
        request = request.header("x-agent-signature", signer.sign_v0(&body));
    } else {
        let msg_id = format!("msg_{}", uuid::Uuid::now_v7().simple());
        for (name, value) in signer
            .headers(&msg_id, fleet_core::unix_now(), &body)
            .pairs()
        {
            request = request.header(name, value);
        }
    }
    request
        .body(body)
        .send()
        .await
        .map_err(|e| fleet_core::error_chain(&e))
}

/// Asks for an update job as an agent does; when a rollout hands one, "installs" it at once
/// and reports success. Returns the version the instance runs afterwards.
async fn take_update(
    client: &reqwest::Client,
    url: &str,
    agent: &DemoAgent,
    signer: &Signer,
    version: &str,
) -> Result<Option<String>, String> {
    let ask = json!({ "instance_id": agent.instance_id, "current_version": version });
    let answer = post_signed(
        client,
        &format!("{url}/api/updates/next"),
        agent,
        signer,
        ask.to_string().into_bytes(),
    )
    .await?;
    if answer.status() == reqwest::StatusCode::NO_CONTENT {
        return Ok(None);
    }
    if !answer.status().is_success() {
        return Err(format!("update poll answered {}", answer.status()));
    }
    let job: serde_json::Value = answer.json().await.map_err(|e| e.to_string())?;
    let (Some(job_id), Some(new_version)) =
        (job["job_id"].as_str(), job["manifest"]["version"].as_str())
    else {
        return Err(format!("an update job without a job id or version: {job}"));
    };
    let report = json!({
        "instance_id": agent.instance_id, "job_id": job_id, "status": "succeeded",
        "step": "done", "duration_ms": 800,
    });
    let answer = post_signed(
        client,
        &format!("{url}/api/updates/report"),
        agent,
        signer,
        report.to_string().into_bytes(),
    )
    .await?;
    if !answer.status().is_success() {
        return Err(format!("the update report answered {}", answer.status()));
    }
    tracing::info!(
        agent = agent.instance_id,
        version = new_version,
        "demo agent updated"
    );
    Ok(Some(new_version.to_owned()))
}

async fn send_heartbeats(url: String, agent: &'static DemoAgent, signer: Signer, interval: u64) {
    let client = reqwest::Client::new();
    let endpoint = format!("{url}/api/heartbeats");
    // Give the server a moment to bind.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = fleet_core::unix_now();
    let mut version = if agent.legacy { "1.8.2" } else { "2.0.1" }.to_owned();
    for tick in 0.. {
        let backup_tick = tick - tick % TICKS_PER_BACKUP;
        let body = heartbeat(
            agent,
            tick,
            started + (backup_tick * interval) as i64,
            &version,
        );
        match post_signed(&client, &endpoint, agent, &signer, body).await {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => {
                tracing::warn!(agent = agent.instance_id, status = %r.status(), "demo heartbeat refused")
            }
            Err(e) => {
                tracing::warn!(agent = agent.instance_id, error = %e, "demo heartbeat failed")
            }
        }
        match take_update(&client, &url, agent, &signer, &version).await {
            Ok(Some(updated)) => version = updated,
            Ok(None) => {}
            Err(e) => tracing::warn!(agent = agent.instance_id, error = %e, "demo update failed"),
        }
        tokio::time::sleep(Duration::from_secs(interval)).await;
    }
}
