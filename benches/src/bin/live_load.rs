//! The live channel at scale, against a running `fleet-server` (a separate process):
//!
//! 1. `--agents` simulated agents register (v1-signed, shared secret) and hold a WebSocket
//!    each, from several 127.0.0.x source addresses; the server's RSS is read before and
//!    after (`/proc/<--server-pid>/status`).
//! 2. One `HEALTH_CHECK` to all of them; the time until the last result is stored.
//! 3. One real agent (fleet-agent-lib) runs a command printing `--log-mb` MB; the time from
//!    submit to the command's end gives the log throughput into the database.
//!
//! ```sh
//! CONTROL_PLANE_AGENT_TOKEN=bench-secret CONTROL_PLANE_ADMIN_TOKEN=bench-admin \
//!   target/release/fleet-server serve &
//! cargo run --release -p fleet-benches --bin live_load -- --server-pid $! --agents 10000
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fleet_core::{Secret, Signer};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

struct Options {
    url: String,
    agents: usize,
    sources: u8,
    secret: String,
    admin: String,
    server_pid: Option<u32>,
    log_mb: u64,
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        url: "http://127.0.0.1:8080".into(),
        agents: 10_000,
        sources: 4,
        secret: "bench-secret".into(),
        admin: "bench-admin".into(),
        server_pid: None,
        log_mb: 100,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let number = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("{flag}: not a number"))
        };
        match flag.as_str() {
            "--url" => o.url = value,
            "--agents" => o.agents = number(&value)? as usize,
            "--sources" => o.sources = number(&value)?.clamp(1, 250) as u8,
            "--secret" => o.secret = value,
            "--admin" => o.admin = value,
            "--server-pid" => o.server_pid = Some(number(&value)? as u32),
            "--log-mb" => o.log_mb = number(&value)?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(o)
}

fn rss_kib(pid: Option<u32>) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

async fn register(client: &reqwest::Client, url: &str, id: &str, secret: &Secret) -> String {
    let body = serde_json::to_vec(&json!({ "instance_id": id })).expect("json");
    let msg_id = format!("msg_{}", uuid::Uuid::new_v4().simple());
    let mut request = client
        .post(format!("{url}/v1/agents/register"))
        .header("content-type", "application/json")
        .body(body.clone());
    for (name, value) in Signer::new(secret.clone())
        .headers(&msg_id, fleet_core::unix_now(), &body)
        .pairs()
    {
        request = request.header(name, value);
    }
    for attempt in 0..5 {
        match request.try_clone().expect("clone").send().await {
            Ok(r) if r.status().is_success() => {
                let answer: Value = r.json().await.expect("json");
                return answer["token"].as_str().expect("token").to_owned();
            }
            Ok(r) if attempt == 4 => panic!("register {id}: {}", r.status()),
            Err(e) if attempt == 4 => panic!("register {id}: {e}"),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    unreachable!("five attempts")
}

/// One simulated agent: answers every command COMPLETED, until the socket closes.
async fn simulate(url: String, source: std::net::IpAddr, token: String, answered: Arc<AtomicU64>) {
    let addr = url
        .trim_start_matches("http://")
        .parse::<std::net::SocketAddr>()
        .expect("--url must be http://IP:PORT");
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind((source, 0).into()).expect("bind source");
    let stream = socket.connect(addr).await.expect("connect");
    let mut request = format!("ws://{addr}/v1/agents/connect")
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    request
        .headers_mut()
        .insert("x-agent-version", "sim".parse().expect("header"));
    let (ws, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .expect("handshake");
    let (mut sink, mut stream) = ws.split();
    while let Some(Ok(message)) = stream.next().await {
        let Message::Text(text) = message else {
            continue;
        };
        let frame: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
        if frame["type"] == "HEALTH_CHECK" {
            let reply = json!({"type": "result", "id": uuid::Uuid::new_v4().to_string(),
                "payload": {"job_id": frame["id"], "status": "COMPLETED", "logs": "ok"}});
            if sink
                .send(Message::Text(reply.to_string().into()))
                .await
                .is_err()
            {
                break;
            }
            answered.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn connected(client: &reqwest::Client, o: &Options) -> u64 {
    let body: Value = client
        .get(format!("{}/v1/agents/connected", o.url))
        .bearer_auth(&o.admin)
        .send()
        .await
        .expect("connected")
        .json()
        .await
        .expect("json");
    body["connected"].as_u64().unwrap_or(0)
}

async fn wait_command(client: &reqwest::Client, o: &Options, id: &str) -> Value {
    loop {
        let body: Value = client
            .get(format!("{}/v1/commands/{id}", o.url))
            .bearer_auth(&o.admin)
            .send()
            .await
            .expect("show")
            .json()
            .await
            .expect("json");
        if body["status"] != "running" {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn submit(client: &reqwest::Client, o: &Options, body: Value) -> String {
    let answer: Value = client
        .post(format!("{}/v1/commands/submit", o.url))
        .bearer_auth(&o.admin)
        .json(&body)
        .send()
        .await
        .expect("submit")
        .json()
        .await
        .expect("json");
    answer["id"]
        .as_str()
        .unwrap_or_else(|| panic!("submit refused: {answer}"))
        .to_owned()
}

async fn run(o: Options) {
    let client = reqwest::Client::new();
    let secret = Secret::new(&o.secret).expect("secret");
    let rss_before = rss_kib(o.server_pid);
    let ids: Vec<String> = (0..o.agents).map(|i| format!("sim-{i:05}")).collect();

    let started = Instant::now();
    let tokens: Vec<String> = futures_util::stream::iter(ids.iter())
        .map(|id| register(&client, &o.url, id, &secret))
        .buffered(64)
        .collect()
        .await;
    println!(
        "registered {} agents in {:.1} s",
        ids.len(),
        started.elapsed().as_secs_f64()
    );

    let answered = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(ids.len());
    for (i, token) in tokens.into_iter().enumerate() {
        let source = std::net::IpAddr::V4(std::net::Ipv4Addr::new(
            127,
            0,
            0,
            2 + (i as u8 % o.sources),
        ));
        tasks.push(tokio::spawn(simulate(
            o.url.clone(),
            source,
            token,
            answered.clone(),
        )));
        if i % 200 == 199 {
            // Paced so the accept queue never overflows.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    loop {
        let n = connected(&client, &o).await;
        if n as usize >= ids.len() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "only {n} connected"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "{} sockets open in {:.1} s from {} source addresses",
        ids.len(),
        started.elapsed().as_secs_f64(),
        o.sources
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss_kib(o.server_pid);
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        println!(
            "server RSS {} MiB -> {} MiB: {:.1} KiB per connection",
            before / 1024,
            after / 1024,
            (after.saturating_sub(before)) as f64 / ids.len() as f64
        );
    }

    let started = Instant::now();
    let id = submit(
        &client,
        &o,
        json!({"command_type": "HEALTH_CHECK", "targets": ids, "payload": {}}),
    )
    .await;
    let submitted = started.elapsed();
    let done = wait_command(&client, &o, &id).await;
    let completed = done["targets"]
        .as_array()
        .map(|t| t.iter().filter(|t| t["status"] == "completed").count())
        .unwrap_or(0);
    println!(
        "HEALTH_CHECK to {}: submit answered in {:.2} s, last result stored after {:.2} s \
         ({completed} completed, command {})",
        ids.len(),
        submitted.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        done["status"]
    );
    if let Some(after) = rss_kib(o.server_pid) {
        println!("server RSS after the command: {} MiB", after / 1024);
    }
    for task in tasks {
        task.abort();
    }

    // Log throughput from one real agent to the database.
    let dir = std::env::temp_dir().join(format!("live-load-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("dir");
    let mut config = fleet_agent::AgentConfig::new("bench-logger", &o.url, secret.clone());
    config.local_port = 0;
    config.state_path = dir.join("agent.db");
    config.heartbeat_interval = Duration::from_secs(3600);
    let agent = fleet_agent::Agent::builder(config)
        .without_builtins()
        .commands(fleet_agent::CommandSettings::default())
        .build()
        .expect("agent");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent_task = tokio::spawn(async move {
        let _ = agent
            .run(async {
                let _ = stopped.await;
            })
            .await;
    });
    while connected(&client, &o).await < 1 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let bytes = o.log_mb * 1_000_000;
    let started = Instant::now();
    let id = submit(
        &client,
        &o,
        json!({"command_type": "RunCommand", "targets": ["bench-logger"],
               "payload": {"cmd": format!("head -c {bytes} /dev/zero | tr '\\0' x"), "shell": true}}),
    )
    .await;
    let done = wait_command(&client, &o, &id).await;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "log streaming: {} MB from one agent stored in {:.1} s = {:.1} MB/s ({})",
        o.log_mb,
        secs,
        o.log_mb as f64 / secs,
        done["status"]
    );
    let _ = stop.send(());
    let _ = agent_task.await;
    let _ = std::fs::remove_dir_all(dir);
}

fn main() {
    let o = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("live_load: {e}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(o));
}
