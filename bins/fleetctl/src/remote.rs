//! The control-plane side of fleetctl: enrollment, remote commands, deploys, any command type.
//!
//! ```sh
//! export FLEET_URL=https://fleet.example.com FLEET_TOKEN=...   # an admin or ops token
//! fleetctl enroll --instance-id shop-042 --agent-url https://dl.example.com/fleet-agent
//! fleetctl run --target shop-042 -- df -h /
//! fleetctl deploy --target shop-042 --project web docker-compose.yml
//! fleetctl send --target shop-042 STATUS '{"project_name": "web"}'
//! fleetctl commands list
//! fleetctl commands show 0193...
//! fleetctl commands cancel 0193...
//! ```

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine;
use clap::Args;
use serde_json::{Value, json};

/// Where the control plane is and who is asking.
#[derive(Args, Debug)]
pub struct Remote {
    /// Control-plane base URL (the same default as the other commands).
    #[arg(long, env = "FLEET_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// An API token (admin for enrollment, RunCommand and deploys; ops for STATUS).
    #[arg(long, env = "FLEET_TOKEN", hide_env_values = true)]
    token: String,
}

/// `fleetctl enroll`.
#[derive(Args, Debug)]
pub struct EnrollArgs {
    #[command(flatten)]
    remote: Remote,
    /// The new instance's id.
    #[arg(long)]
    instance_id: String,
    /// Token lifetime in seconds (default: the control plane's, 7 days).
    #[arg(long)]
    ttl_secs: Option<u64>,
    /// Where the host downloads the agent binary (put into the cloud-init snippet).
    #[arg(long, default_value = "https://example.invalid/fleet-agent")]
    agent_url: String,
}

/// `fleetctl run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    remote: Remote,
    /// Instance ids (repeat or separate with commas).
    #[arg(long = "target", value_delimiter = ',', required = true)]
    targets: Vec<String>,
    /// Kill the process group after this many seconds.
    #[arg(long)]
    timeout: Option<u64>,
    /// Run the command through `/bin/sh -c` (the first word is the script).
    #[arg(long)]
    shell: bool,
    /// Most targets running it at once.
    #[arg(long)]
    max_concurrency: Option<u32>,
    /// Stop starting it on more targets after this many failures (`3` or `10%`).
    #[arg(long)]
    max_errors: Option<String>,
    /// The program and its arguments, after `--`.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// `fleetctl deploy`.
#[derive(Args, Debug)]
pub struct DeployArgs {
    #[command(flatten)]
    remote: Remote,
    /// Instance ids.
    #[arg(long = "target", value_delimiter = ',', required = true)]
    targets: Vec<String>,
    /// Compose project name, `^[a-zA-Z0-9_-]+$`.
    #[arg(long)]
    project: String,
    /// Stop the project instead of deploying it.
    #[arg(long)]
    stop: bool,
    /// Most hosts deploying at once.
    #[arg(long)]
    max_concurrency: Option<u32>,
    /// Stop after this many failures (`3` or `10%`).
    #[arg(long)]
    max_errors: Option<String>,
    /// The compose file (not needed with --stop).
    file: Option<PathBuf>,
}

/// `fleetctl send`.
#[derive(Args, Debug)]
pub struct SendArgs {
    #[command(flatten)]
    remote: Remote,
    /// Instance ids (repeat or separate with commas).
    #[arg(long = "target", value_delimiter = ',', required = true)]
    targets: Vec<String>,
    /// Most targets running it at once.
    #[arg(long)]
    max_concurrency: Option<u32>,
    /// Stop after this many failures (`3` or `10%`).
    #[arg(long)]
    max_errors: Option<String>,
    /// The command type: `RunCommand`, `UpdateAgent`, `UpdatePackage`, `DEPLOY_COMPOSE`,
    /// `STOP_COMPOSE`, `STATUS` or `HEALTH_CHECK`.
    command_type: String,
    /// The payload as JSON, or `@FILE` to read it from a file (default `{}`).
    payload: Option<String>,
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

impl Remote {
    fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url.trim_end_matches('/'))
    }

    async fn post(
        &self,
        client: &reqwest::Client,
        path: &str,
        body: &Value,
    ) -> Result<Value, String> {
        self.send(path, client.post(self.at(path)).json(body)).await
    }

    async fn get(&self, client: &reqwest::Client, path: &str) -> Result<Value, String> {
        self.send(path, client.get(self.at(path))).await
    }

    /// A GET that outlasts a short outage of the control plane (a restart, a replica
    /// failing over behind the load balancer) while a submitted command goes on: a request
    /// that got no answer, or a 502, 503 or 504, is tried again for up to [`PATIENCE`].
    async fn get_patiently(&self, client: &reqwest::Client, path: &str) -> Result<Value, String> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let sent = client
                .get(self.at(path))
                .bearer_auth(&self.token)
                .send()
                .await;
            let transient = sent
                .as_ref()
                .map_or(true, |r| matches!(r.status().as_u16(), 502..=504));
            if !transient || Instant::now() >= deadline {
                return match sent {
                    Ok(response) => answer(path, response).await,
                    Err(err) => Err(self.unreachable(path, &err)),
                };
            }
            tokio::time::sleep(RETRY_AFTER).await;
        }
    }

    async fn send(&self, path: &str, request: reqwest::RequestBuilder) -> Result<Value, String> {
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| self.unreachable(path, &e))?;
        answer(path, response).await
    }

    /// Why a request to `path` got no answer, with reqwest's causes ("connection refused").
    fn unreachable(&self, path: &str, err: &reqwest::Error) -> String {
        format!(
            "cannot reach {}: {}",
            self.at(path),
            fleet_core::error_chain(err)
        )
    }
}

async fn answer(path: &str, response: reqwest::Response) -> Result<Value, String> {
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if status.is_success() {
        Ok(body)
    } else {
        Err(format!("{path}: {}", crate::api::refusal(status, &body)))
    }
}

/// The systemd unit and cloud-init document printed by `fleetctl enroll`.
pub fn install_snippet(url: &str, instance_id: &str, token: &str, agent_url: &str) -> String {
    let env = format!(
        "INSTANCE_ID={instance_id}\nCONTROL_PLANE_URL={url}\nAGENT_ENROLLMENT_TOKEN={token}\n\
         AGENT_SECRET_FILE=/var/lib/fleet-agent/secret\nAGENT_STATE_PATH=/var/lib/fleet-agent/state.db\n\
         AGENT_BINARY_PATH=/var/lib/fleet-agent/bin/fleet-agent\n\
         AGENT_PROJECTS_DIR=/var/lib/fleet-agent/projects\n"
    );
    // The unit shipped in deploy/, so the snippet and the documented unit cannot drift.
    let unit = include_str!("../../../deploy/fleet-agent-managed.service");
    let indent = |text: &str| {
        text.lines()
            .map(|l| format!("      {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    format!(
        "# --- /etc/fleet-agent/env (mode 0600) ---\n{env}\n\
         # --- /etc/systemd/system/fleet-agent.service ---\n{unit}\n\
         # --- cloud-init (user data) ---\n#cloud-config\nwrite_files:\n\
         \x20 - path: /etc/fleet-agent/env\n    permissions: '0600'\n    content: |\n{}\n\
         \x20 - path: /etc/systemd/system/fleet-agent.service\n    permissions: '0644'\n    content: |\n{}\n\
         runcmd:\n\
         \x20 - [mkdir, -p, -m, '0700', /var/lib/fleet-agent/bin]\n\
         \x20 - [curl, -fsSL, -o, /var/lib/fleet-agent/bin/fleet-agent, '{agent_url}']\n\
         \x20 - [chmod, '0755', /var/lib/fleet-agent/bin/fleet-agent]\n\
         \x20 - [systemctl, daemon-reload]\n\
         \x20 - [systemctl, enable, --now, fleet-agent]\n",
        indent(&env),
        indent(unit)
    )
}

/// `fleetctl enroll`: a one-time token and the snippet that installs the agent with it.
pub fn enroll(args: EnrollArgs) -> Result<(), String> {
    runtime()?.block_on(async {
        let client = reqwest::Client::new();
        let mut body = json!({ "instance_id": args.instance_id });
        if let Some(ttl) = args.ttl_secs {
            body["ttl_secs"] = ttl.into();
        }
        let answer = args.remote.post(&client, "/v1/enrollments", &body).await?;
        let token = answer["enrollment_token"]
            .as_str()
            .ok_or("the control plane returned no token")?;
        let until = answer["expires_at"].as_i64().map_or_else(
            || "its expiry".into(),
            |t| format!("{} UTC", fleet_core::clock::human_utc(t)),
        );
        eprintln!(
            "enrollment token for {} (works once, until {until}); keep it like a password",
            args.instance_id
        );
        print!(
            "{}",
            install_snippet(&args.remote.url, &args.instance_id, token, &args.agent_url)
        );
        Ok(())
    })
}

/// `fleetctl run`: submits a RunCommand and streams each target's output as it comes.
/// The exit status is 0 only when every target completed.
pub fn run(args: RunArgs) -> Result<(), String> {
    let (cmd, rest) = args
        .command
        .split_first()
        .ok_or("name a command after --")?;
    let mut payload = json!({ "cmd": cmd, "args": rest });
    if let Some(timeout) = args.timeout {
        payload["timeout_sec"] = timeout.into();
    }
    if args.shell {
        payload["shell"] = true.into();
    }
    let mut body =
        json!({"command_type": "RunCommand", "targets": args.targets, "payload": payload});
    if let Some(max) = args.max_concurrency {
        body["max_concurrency"] = max.into();
    }
    if let Some(max) = &args.max_errors {
        body["max_errors"] = max.clone().into();
    }
    runtime()?.block_on(async {
        let client = reqwest::Client::new();
        let submitted = args
            .remote
            .post(&client, "/v1/commands/submit", &body)
            .await?;
        let id = submitted["id"].as_str().ok_or("no command id")?.to_owned();
        eprintln!("command {id}");
        let several = args.targets.len() > 1;
        // Every target is followed at once; with several, each line is prefixed.
        let followed = futures_util::future::try_join_all(
            args.targets
                .iter()
                .map(|target| follow(&args.remote, &client, &id, target, several)),
        );
        let watched = async {
            let mut pickup = PickupWatch::default();
            // Until every target's agent took the command; the output streams tell the rest.
            loop {
                if let Ok(shown) = args
                    .remote
                    .get(&client, &format!("/v1/commands/{id}"))
                    .await
                {
                    pickup.observe(&id, &shown);
                    if all_taken(&shown) {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            std::future::pending::<std::convert::Infallible>().await
        };
        tokio::select! {
            followed = followed => followed?,
            never = watched => match never {},
        };
        summary(&args.remote, &client, &id).await
    })
}

/// How long `run` and `deploy` keep trying to reach a control plane that stopped answering
/// while their command goes on.
const PATIENCE: Duration = Duration::from_secs(300);
/// Pause between those tries.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// How one output stream of a target ended.
enum Followed {
    /// The `end` event came: the target ended and every byte of its output was shown.
    Ended,
    /// The connection was lost first (why); the output goes on from where it stopped.
    Lost(String),
}

/// Prints one target's output live from the server-sent events, until the target ends.
/// A lost stream is opened again (for up to [`PATIENCE`] without success) from where it
/// stopped, so a control plane that restarts meanwhile costs no output and shows none twice.
async fn follow(
    remote: &Remote,
    client: &reqwest::Client,
    id: &str,
    target: &str,
    prefix: bool,
) -> Result<(), String> {
    let path = format!("/v1/commands/{id}/logs");
    let mut url = reqwest::Url::parse(&remote.at(&path)).map_err(|e| format!("FLEET_URL: {e}"))?;
    url.query_pairs_mut()
        .append_pair("follow", "true")
        .append_pair("target", target);
    let mut shown = Shown::default();
    let mut lost_since: Option<Instant> = None;
    loop {
        let followed = follow_once(remote, client, &url, &path, target, prefix, &mut shown).await?;
        if std::mem::take(&mut shown.opened) {
            // It was up again: the patience starts over at this loss.
            lost_since = None;
        }
        let Followed::Lost(reason) = followed else {
            return Ok(());
        };
        let since = *lost_since.get_or_insert_with(|| {
            eprintln!("{target}: lost the output stream ({reason}); reconnecting");
            Instant::now()
        });
        if since.elapsed() >= PATIENCE {
            return Err(format!("{path}: {reason}"));
        }
        tokio::time::sleep(RETRY_AFTER).await;
    }
}

/// What a follow has shown of a target so far.
#[derive(Default)]
struct Shown {
    /// The last event id (where each stream goes on), sent back as `Last-Event-ID`.
    event_id: Option<String>,
    /// Bytes of stdout and stderr shown: a control plane that does not resume at
    /// `Last-Event-ID` sends the output from the start again, and what was shown is skipped.
    bytes: [u64; 2],
    /// Whether stdout and stderr stopped in the middle of a line (with several targets, its
    /// label is shown).
    mid_line: [bool; 2],
    /// Whether the control plane answered the last attempt with the stream.
    opened: bool,
}

/// Opens the event stream once and prints it; `Err` when the control plane refuses it.
async fn follow_once(
    remote: &Remote,
    client: &reqwest::Client,
    url: &reqwest::Url,
    path: &str,
    target: &str,
    prefix: bool,
    shown: &mut Shown,
) -> Result<Followed, String> {
    use futures_util::StreamExt;
    let mut request = client.get(url.clone()).bearer_auth(&remote.token);
    if let Some(id) = &shown.event_id {
        request = request.header("last-event-id", id);
    }
    let response = match request.send().await {
        Ok(response) => response,
        Err(err) => return Ok(Followed::Lost(fleet_core::error_chain(&err))),
    };
    let status = response.status();
    if matches!(status.as_u16(), 502..=504) {
        return Ok(Followed::Lost(status.to_string()));
    }
    if !status.is_success() {
        return Err(format!("{path}: {status}"));
    }
    shown.opened = true;
    let mut body = response.bytes_stream();
    let mut pending = Vec::new();
    // The fields of the event being read; it is complete at the blank line after them.
    let (mut event, mut event_id, mut data) = (String::new(), None, String::new());
    while let Some(piece) = body.next().await {
        match piece {
            Ok(piece) => pending.extend_from_slice(&piece),
            Err(err) => return Ok(Followed::Lost(fleet_core::error_chain(&err))),
        }
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line).trim_end().to_owned();
            if let Some(name) = line.strip_prefix("event: ") {
                event = name.to_owned();
            } else if let Some(id) = line.strip_prefix("id: ") {
                event_id = Some(id.to_owned());
            } else if let Some(text) = line.strip_prefix("data: ") {
                data = text.to_owned();
            } else if line.is_empty() {
                let value: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
                match event.as_str() {
                    "end" => {
                        let label = if prefix {
                            format!("[{target}] ")
                        } else {
                            String::new()
                        };
                        for (i, note) in output_notes(&value).iter().enumerate() {
                            let open_line = i == 0 && shown.mid_line.iter().any(|open| *open);
                            eprintln!("{}{label}{note}", if open_line { "\n" } else { "" });
                        }
                        return Ok(Followed::Ended);
                    }
                    "stdout" => show(shown, 0, &value, target, prefix),
                    "stderr" => show(shown, 1, &value, target, prefix),
                    _ => {}
                }
                if let Some(id) = event_id.take() {
                    shown.event_id = Some(id);
                }
                event.clear();
                data.clear();
            }
        }
    }
    Ok(Followed::Lost("the stream ended before the command".into()))
}

/// Prints the part of an output event (`slot` 0 for stdout, 1 for stderr) not shown yet.
fn show(shown: &mut Shown, slot: usize, value: &Value, target: &str, prefix: bool) {
    let bytes = match value["encoding"].as_str() {
        Some("base64") => base64::engine::general_purpose::STANDARD
            .decode(value["data"].as_str().unwrap_or_default())
            .unwrap_or_default(),
        _ => value["data"]
            .as_str()
            .unwrap_or_default()
            .as_bytes()
            .to_vec(),
    };
    let offset = value["offset"].as_u64().unwrap_or_default();
    let skip = shown.bytes[slot].saturating_sub(offset);
    let Some(fresh) = usize::try_from(skip)
        .ok()
        .and_then(|skip| bytes.get(skip..))
    else {
        return;
    };
    if fresh.is_empty() {
        return;
    }
    shown.bytes[slot] = offset + bytes.len() as u64;
    let text = if prefix {
        labelled(fresh, &format!("[{target}] "), &mut shown.mid_line[slot])
    } else {
        shown.mid_line[slot] = !fresh.ends_with(b"\n");
        fresh.to_vec()
    };
    if slot == 0 {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(&text);
        let _ = out.flush();
    } else {
        let _ = std::io::stderr().lock().write_all(&text);
    }
}

/// `bytes` with `label` before each line that starts in them. Output arrives in pieces cut
/// anywhere (a piece holds many lines, or part of one), and with several targets every
/// line must say whose it is. `mid_line` carries over whether the last piece ended a line.
fn labelled(bytes: &[u8], label: &str, mid_line: &mut bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + label.len());
    for line in bytes.split_inclusive(|b| *b == b'\n') {
        if !*mid_line {
            out.extend_from_slice(label.as_bytes());
        }
        out.extend_from_slice(line);
        *mid_line = !line.ends_with(b"\n");
    }
    out
}

async fn summary(remote: &Remote, client: &reqwest::Client, id: &str) -> Result<(), String> {
    // The follow ends when the target ended; the command row may lag by a moment.
    let path = format!("/v1/commands/{id}");
    let mut shown = remote.get_patiently(client, &path).await?;
    for _ in 0..50 {
        if shown["status"] != "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        shown = remote.get_patiently(client, &path).await?;
    }
    let mut failed = 0;
    for target in shown["targets"].as_array().into_iter().flatten() {
        if target["status"] != "completed" {
            failed += 1;
            eprintln!(
                "{}: {} (exit {}) {}",
                target["instance_id"].as_str().unwrap_or("?"),
                target["status"].as_str().unwrap_or("?"),
                target["exit_code"],
                target["error"].as_str().unwrap_or_default()
            );
        }
    }
    if failed == 0 {
        Ok(())
    } else {
        Err(format!("{failed} target(s) did not complete"))
    }
}

/// `fleetctl deploy`: DEPLOY_COMPOSE (or STOP_COMPOSE), waits and prints the results.
pub fn deploy(args: DeployArgs) -> Result<(), String> {
    let (kind, payload) = if args.stop {
        ("STOP_COMPOSE", json!({ "project_name": args.project }))
    } else {
        let file = args.file.as_ref().ok_or("name the compose file")?;
        let bytes = std::fs::read(file).map_err(|e| format!("read {}: {e}", file.display()))?;
        (
            "DEPLOY_COMPOSE",
            json!({
                "project_name": args.project,
                "compose_file_base64": base64::engine::general_purpose::STANDARD.encode(bytes),
            }),
        )
    };
    let body = submission(
        kind,
        &args.targets,
        payload,
        args.max_concurrency,
        args.max_errors.as_deref(),
    );
    let shown = submit_and_wait(&args.remote, &body)?;
    println!("{}", command_text(&shown));
    targets_outcome(&shown)
}

/// `fleetctl send TYPE [PAYLOAD]`: any command type, checked here as the control plane
/// would check it (nothing is sent when it would be refused), then followed until every
/// target ended. Prints each target's result data (what `STATUS` and `HEALTH_CHECK` found).
pub fn send(args: SendArgs) -> Result<(), String> {
    let payload: Value = match args.payload.as_deref() {
        None => json!({}),
        Some(text) => {
            let text = match text.strip_prefix('@') {
                Some(file) => {
                    std::fs::read_to_string(file).map_err(|e| format!("read {file}: {e}"))?
                }
                None => text.to_owned(),
            };
            serde_json::from_str(&text).map_err(|e| format!("the payload is not JSON: {e}"))?
        }
    };
    let body = submission(
        &args.command_type,
        &args.targets,
        payload,
        args.max_concurrency,
        args.max_errors.as_deref(),
    );
    let bytes = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
    fleet_core::validate::decode::<fleet_core::command::SubmitCommand>(
        &bytes,
        &fleet_core::Limits::default(),
    )
    .map_err(|err| format!("not sent: {err}"))?;
    let shown = submit_and_wait(&args.remote, &body)?;
    println!("{}", command_text(&shown));
    for target in shown["targets"].as_array().into_iter().flatten() {
        if !target["data"].is_null() {
            println!(
                "{}: {}",
                target["instance_id"].as_str().unwrap_or("?"),
                target["data"]
            );
        }
    }
    targets_outcome(&shown)
}

/// The body of `POST /v1/commands/submit`.
fn submission(
    kind: &str,
    targets: &[String],
    payload: Value,
    max_concurrency: Option<u32>,
    max_errors: Option<&str>,
) -> Value {
    let mut body = json!({"command_type": kind, "targets": targets, "payload": payload});
    if let Some(max) = max_concurrency {
        body["max_concurrency"] = max.into();
    }
    if let Some(max) = max_errors {
        body["max_errors"] = max.into();
    }
    body
}

/// Submits a command (`POST /v1/commands/submit`) and polls it until it is no longer
/// running; returns what `GET /v1/commands/{id}` said last.
fn submit_and_wait(remote: &Remote, body: &Value) -> Result<Value, String> {
    runtime()?.block_on(async {
        let client = reqwest::Client::new();
        let submitted = remote.post(&client, "/v1/commands/submit", body).await?;
        let id = submitted["id"].as_str().ok_or("no command id")?.to_owned();
        eprintln!("command {id}");
        let mut pickup = PickupWatch::default();
        loop {
            let shown = remote
                .get_patiently(&client, &format!("/v1/commands/{id}"))
                .await?;
            pickup.observe(&id, &shown);
            if shown["status"] != "running" {
                return Ok(shown);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}

/// Whether every target of a finished command completed. For each one that did not, the
/// end of its output goes to stderr: "docker-compose exited with 1" alone does not say what
/// to fix.
fn targets_outcome(shown: &Value) -> Result<(), String> {
    let targets = shown["targets"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let failed: Vec<&Value> = targets
        .iter()
        .filter(|t| t["status"] != "completed")
        .collect();
    for target in &failed {
        let logs = target["logs"].as_str().unwrap_or_default().trim_end();
        if !logs.is_empty() {
            eprintln!(
                "--- {} ({}) ---\n{logs}",
                target["instance_id"].as_str().unwrap_or("?"),
                target["status"].as_str().unwrap_or("?")
            );
        }
    }
    if failed.is_empty() && !targets.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} of {} target(s) did not complete",
            failed.len(),
            targets.len()
        ))
    }
}

/// A command and its targets, as `deploy` and `commands show` print them.
pub(crate) fn command_text(shown: &Value) -> String {
    let mut out = format!(
        "{} {} {} (by {})",
        shown["id"].as_str().unwrap_or("?"),
        shown["command_type"].as_str().unwrap_or("?"),
        shown["status"].as_str().unwrap_or("?"),
        shown["created_by"].as_str().unwrap_or("?")
    );
    for target in shown["targets"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "\n  {:<32} {:<10} exit={:<5} {}",
            target["instance_id"].as_str().unwrap_or("?"),
            target["status"].as_str().unwrap_or("?"),
            target["exit_code"],
            target["error"].as_str().unwrap_or_default()
        ));
        for note in output_notes(target) {
            out.push_str(&format!("\n    {note}"));
        }
    }
    out
}

/// The line for output the control plane cut at its cap (`max_bytes`).
fn truncation_notice(max_bytes: i64) -> String {
    format!(
        "output truncated at {} by the control plane",
        fleet_core::byte_size(max_bytes)
    )
}

/// What a target's record (or the `end` event of its followed output) says of output the
/// control plane did not keep whole: cut at its cap, or deleted after its retention. Empty
/// when the output is all there.
fn output_notes(target: &Value) -> Vec<String> {
    let mut notes = Vec::new();
    if let Some(cut) = target["output_truncated_at_bytes"].as_i64() {
        notes.push(truncation_notice(cut));
    }
    let bytes = target["output_bytes"].as_i64().unwrap_or_default();
    if let Some(deleted_at) = target["output_deleted_at"].as_i64()
        && bytes > 0
    {
        notes.push(format!(
            "output ({}) deleted by the control plane's retention at {}",
            fleet_core::byte_size(bytes),
            fleet_core::clock::rfc3339(deleted_at)
        ));
    }
    notes
}

/// How long a target may stay `sent` (handed to its agent's channel, not yet taken) before
/// `run` and `deploy` say they are waiting for that agent. A connected agent takes a command
/// within milliseconds; one that is offline or never existed would otherwise leave the
/// operator looking at a silent terminal until the delivery timeout.
const PICKUP_NOTICE_AFTER: Duration = Duration::from_secs(3);

/// Notices, once per target, a command that waits for an agent which has not taken it.
#[derive(Default)]
struct PickupWatch {
    /// When each target was first seen `sent`, by this process's clock (the server's may
    /// differ from it).
    sent_since: HashMap<String, Instant>,
    told: HashSet<String>,
}

impl PickupWatch {
    fn observe(&mut self, id: &str, shown: &Value) {
        let now = Instant::now();
        for target in shown["targets"].as_array().into_iter().flatten() {
            let Some(instance) = target["instance_id"].as_str() else {
                continue;
            };
            if target["status"] != "sent" {
                self.sent_since.remove(instance);
                continue;
            }
            let since = *self.sent_since.entry(instance.to_owned()).or_insert(now);
            if now.duration_since(since) >= PICKUP_NOTICE_AFTER
                && self.told.insert(instance.to_owned())
            {
                eprintln!("{}", pickup_notice(id, instance));
            }
        }
    }
}

/// Whether every target of a shown command has left `queued` and `sent`: its agent took it,
/// or it ended without one (cancelled, skipped, timed out).
fn all_taken(shown: &Value) -> bool {
    shown["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|t| !matches!(t["status"].as_str(), Some("queued" | "sent")))
}

fn pickup_notice(id: &str, instance: &str) -> String {
    format!(
        "waiting for {instance}: its agent has not taken the command yet (the control plane \
         hands it over when the agent connects or polls, and times it out if it never does). \
         Ctrl-C stops watching and leaves the command queued; `fleetctl commands cancel {id}` \
         withdraws it."
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(status: &str) -> Value {
        json!({"targets": [{"instance_id": "shop-1", "status": status}]})
    }

    #[test]
    fn a_target_not_taken_is_noticed_once_after_the_delay() {
        let mut watch = PickupWatch::default();
        watch.observe("c1", &shown("sent"));
        assert!(watch.told.is_empty(), "not before the delay");
        // As if first seen `sent` longer ago than the delay.
        let earlier = Instant::now() - PICKUP_NOTICE_AFTER;
        watch.sent_since.insert("shop-1".into(), earlier);
        watch.observe("c1", &shown("sent"));
        assert!(watch.told.contains("shop-1"));
        watch.observe("c1", &shown("sent"));
        assert_eq!(watch.told.len(), 1);
    }

    #[test]
    fn a_refusal_lists_each_invalid_field_once() {
        let invalid = json!({"error": {"code": "invalid", "message": "2 invalid field(s): a: x; b: y",
            "details": [{"path": "a", "message": "x"}, {"path": "", "message": "y"}]}});
        assert_eq!(
            crate::api::refusal(reqwest::StatusCode::UNPROCESSABLE_ENTITY, &invalid),
            "HTTP 422: 2 invalid field(s):\n  a: x\n  (body): y"
        );
        let plain = json!({"error": {"code": "not_found", "message": "not found"}});
        assert_eq!(
            crate::api::refusal(reqwest::StatusCode::NOT_FOUND, &plain),
            "HTTP 404: not found"
        );
        assert_eq!(
            crate::api::refusal(reqwest::StatusCode::BAD_GATEWAY, &Value::Null),
            "HTTP 502: no message"
        );
    }

    #[test]
    fn a_target_taken_in_time_is_not_noticed() {
        let mut watch = PickupWatch::default();
        watch
            .sent_since
            .insert("shop-1".into(), Instant::now() - PICKUP_NOTICE_AFTER);
        watch.observe("c1", &shown("running"));
        assert!(watch.told.is_empty());
        assert!(watch.sent_since.is_empty());
        let text = pickup_notice("c1", "shop-1");
        assert!(text.contains("shop-1") && text.contains("fleetctl commands cancel c1"));
        assert!(all_taken(&shown("running")) && all_taken(&shown("cancelled")));
        assert!(!all_taken(&shown("sent")) && !all_taken(&shown("queued")));
    }

    #[test]
    fn every_line_of_several_targets_says_whose_it_is() {
        let mut mid_line = false;
        let mut out = labelled(b"a\nb\npart", "[x] ", &mut mid_line);
        assert!(mid_line);
        out.extend(labelled(b"ial\n", "[x] ", &mut mid_line));
        out.extend(labelled(b"c\n", "[x] ", &mut mid_line));
        assert_eq!(
            String::from_utf8_lossy(&out),
            "[x] a\n[x] b\n[x] partial\n[x] c\n"
        );
        assert!(!mid_line);
    }

    #[test]
    fn output_the_control_plane_did_not_keep_whole_is_said() {
        let shown = json!({"id": "c1", "command_type": "RunCommand", "status": "completed",
            "created_by": "admin", "targets": [
                {"instance_id": "shop-1", "status": "completed", "exit_code": 0,
                 "output_bytes": 268_435_456, "output_truncated_at_bytes": 268_435_456,
                 "output_deleted_at": null},
                {"instance_id": "shop-2", "status": "failed", "exit_code": 1,
                 "output_bytes": 1536, "output_truncated_at_bytes": null,
                 "output_deleted_at": 0},
                {"instance_id": "shop-3", "status": "completed", "exit_code": 0,
                 "output_bytes": 0, "output_truncated_at_bytes": null,
                 "output_deleted_at": 0}]});
        let text = command_text(&shown);
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        assert_eq!(
            lines[2], "output truncated at 256 MiB by the control plane",
            "{text}"
        );
        assert_eq!(
            lines[4],
            "output (1.5 KiB) deleted by the control plane's retention at 1970-01-01T00:00:00Z",
            "{text}"
        );
        // Nothing was printed, so nothing was deleted: no note.
        assert_eq!(lines.len(), 6, "{text}");
    }

    #[test]
    fn the_snippet_carries_the_token_and_the_managed_unit() {
        let text = install_snippet("https://cp", "shop-1", "tok123", "https://dl/agent");
        assert!(text.contains("AGENT_ENROLLMENT_TOKEN=tok123"));
        assert!(text.contains("#cloud-config"));
        assert!(text.contains("ExecStart=/var/lib/fleet-agent/bin/fleet-agent\n"));
        assert!(text.contains("Restart=always"));
        assert!(text.contains("permissions: '0600'"));
    }
}
