//! The control-plane commands: releases, rollouts (with a live `watch`), plugins, restores
//! and the list of remote commands over the HTTP API. Human output by default, `--json` for
//! scripts.

use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

/// Where the control plane is and who is asking.
#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// Control-plane base URL.
    #[arg(
        long,
        env = "FLEET_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// Role token: support to read; ops to pause, resume, schedule and cancel; admin to
    /// create, advance, approve and reject.
    #[arg(long, env = "FLEET_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Print the control plane's JSON answer instead of a summary.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Rollout settings shared by update and plugin rollouts.
#[derive(Args, Debug, Clone)]
pub struct RolloutOptions {
    /// Target channel: its instances not yet on the version, frozen now.
    #[arg(long)]
    pub channel: String,
    /// Instances per batch.
    #[arg(long, default_value_t = 10)]
    pub batch_size: u32,
    /// Failures per batch that halt the rollout: a count (`0` = any failure) or `25%`.
    #[arg(long, default_value = "0")]
    pub failure_threshold: String,
    /// Start each next batch as soon as one ends well.
    #[arg(long)]
    pub auto_advance: bool,
}

/// `fleetctl rollout create` options.
#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Release id (from `release list`).
    #[arg(long, conflicts_with = "version")]
    pub release: Option<i64>,
    /// Or the release's version on the channel.
    #[arg(long)]
    pub version: Option<String>,
    #[command(flatten)]
    pub options: RolloutOptions,
    /// `batch` or `blue-green-canary`.
    #[arg(long, default_value = "batch")]
    pub strategy: String,
    /// Canary percentages, ending at 100 (`5,25,100`).
    #[arg(long, value_delimiter = ',')]
    pub canary_steps: Option<Vec<u8>>,
    /// Seconds to observe each canary step.
    #[arg(long)]
    pub canary_wait: Option<u32>,
    /// p95 latency ceiling (ms) for updated instances.
    #[arg(long)]
    slo_p95_ms_max: Option<f64>,
    /// Error-rate ceiling (0..1).
    #[arg(long)]
    pub slo_error_rate_max: Option<f64>,
    /// Webhook-retry-rate ceiling.
    #[arg(long)]
    pub slo_webhook_retry_rate_max: Option<f64>,
    /// Seconds an updated instance's heartbeats are watched against the SLO ceilings (default
    /// 600); with a ceiling set, each batch is watched this long after its last job ends
    /// before the next batch starts or the rollout completes.
    #[arg(long)]
    pub observe_secs: Option<i64>,
    /// Do not run the rollback command when a step fails.
    #[arg(long)]
    pub no_auto_rollback: bool,
}

/// `fleetctl rollout ...`.
#[derive(Subcommand, Debug)]
pub enum RolloutCommand {
    /// Create a rollout of a release.
    Create(Box<CreateArgs>),
    /// List rollouts.
    List,

    /// Show a rollout with its batches and jobs.
    Show {
        /// Rollout id.
        id: i64,
    },
    /// Start the next batch (refused while a batch runs or when halted).
    Advance {
        /// Rollout id.
        id: i64,
    },
    /// Stop handing out jobs.
    Pause {
        /// Rollout id.
        id: i64,
    },
    /// Continue after a pause or a halt.
    Resume {
        /// Rollout id.
        id: i64,
    },
    /// Stop for good.
    Cancel {
        /// Rollout id.
        id: i64,
    },
    /// Show live per-batch progress until the rollout completes, halts or is cancelled
    /// (exit status 0 only when it completed).
    Watch {
        /// Rollout id.
        id: i64,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 2)]
        interval: u64,
    },
}

/// `fleetctl plugin ...`.
#[derive(Subcommand, Debug)]
pub enum PluginCommand {
    /// Publish a plugin release in the marketplace.
    Release {
        /// Plugin name (`billing-export`, `@acme/report`).
        #[arg(long)]
        name: String,
        /// Plugin version.
        #[arg(long)]
        version: String,
        /// Control-plane versions it works with (`*`, `0.1.*`, `0.1.0`); repeatable.
        #[arg(long = "compatible", default_value = "*")]
        compatible: Vec<String>,
        /// Notes for operators.
        #[arg(long)]
        notes: Option<String>,
    },
    /// List plugin releases.
    Releases,
    /// List requests from instances.
    Requests,
    /// Approve an instance's request (refused when no compatible approved release exists).
    Approve {
        /// Request id.
        id: i64,
    },
    /// Reject an instance's pending request; the reason is shown with it.
    Reject {
        /// Request id.
        id: i64,
        /// Why (at most 500 characters).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Roll a plugin action out to a channel, batch by batch.
    Rollout {
        /// Plugin release id.
        #[arg(long)]
        release: i64,
        /// `install`, `update` or `remove`.
        #[arg(long, default_value = "install")]
        action: String,
        #[command(flatten)]
        options: RolloutOptions,
    },
}

/// `fleetctl restore ...`.
#[derive(Subcommand, Debug)]
pub enum RestoreCommand {
    /// Schedule verifications for the installations with the freshest heartbeats.
    Schedule {
        /// How many installations.
        #[arg(long, default_value_t = 5)]
        count: i64,
        /// Where to restore.
        #[arg(long, default_value = "staging")]
        environment: String,
    },
    /// List verifications, newest first.
    List {
        /// Only this instance's.
        #[arg(long)]
        instance: Option<String>,
    },
    /// Cancel a scheduled or handed-out verification (its report is then refused), so the
    /// installation can be scheduled again at once.
    Cancel {
        /// Verification id (from `restore list`).
        id: i64,
    },
}

/// A minimal blocking client for the control-plane API.
pub struct Client {
    http: reqwest::blocking::Client,
    conn: Conn,
}

impl Client {
    /// A client for `conn`.
    pub fn new(conn: Conn) -> Result<Self, String> {
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| format!("http client: {e}"))?;
        Ok(Self { http, conn })
    }

    fn send(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
        let url = format!("{}{path}", self.conn.url.trim_end_matches('/'));
        let mut request = match method {
            "GET" => self.http.get(&url),
            _ => self.http.post(&url),
        };
        if let Some(token) = &self.conn.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .map_err(|e| format!("cannot reach {url}: {}", fleet_core::error_chain(&e)))?;
        let status = response.status();
        let value: Value = response.json().unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(value);
        }
        Err(refusal(status, &value))
    }

    /// `GET path`: the answer, or the refusal as [`refusal`] words it.
    pub(crate) fn get(&self, path: &str) -> Result<Value, String> {
        self.send("GET", path, None)
    }

    /// `POST path` with a JSON `body`: the answer, or the refusal as [`refusal`] words it.
    pub(crate) fn post(&self, path: &str, body: &Value) -> Result<Value, String> {
        self.send("POST", path, Some(body))
    }

    /// Prints `value` as JSON with `--json`, else what `human` makes of it.
    pub(crate) fn print(&self, value: &Value, human: impl FnOnce(&Value) -> String) {
        if self.conn.json {
            println!(
                "{}",
                serde_json::to_string_pretty(value).unwrap_or_default()
            );
        } else {
            println!("{}", human(value));
        }
    }
}

/// The control plane's refusal as one readable text: the status, then its message, or, for
/// invalid fields, one line per field (the message repeats them on one line).
pub(crate) fn refusal(status: reqwest::StatusCode, body: &Value) -> String {
    let fields: Vec<String> = body["error"]["details"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            let path = v["path"]
                .as_str()
                .filter(|p| !p.is_empty())
                .unwrap_or("(body)");
            format!("\n  {path}: {}", v["message"].as_str().unwrap_or(""))
        })
        .collect();
    if fields.is_empty() {
        let message = body["error"]["message"].as_str().unwrap_or("no message");
        format!("HTTP {}: {message}", status.as_u16())
    } else {
        format!(
            "HTTP {}: {} invalid field(s):{}",
            status.as_u16(),
            fields.len(),
            fields.concat()
        )
    }
}

/// A JSON value as a table cell: a string as is, null as `-`.
/// `path` with the parameters that have a value, percent-encoded, as its query string.
pub(crate) fn with_query(path: &str, params: &[(&str, Option<&str>)]) -> String {
    let query: Vec<String> = params
        .iter()
        .filter_map(|(name, value)| {
            Some(format!(
                "{name}={}",
                fleet_core::percent_encode(value.as_deref()?)
            ))
        })
        .collect();
    if query.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", query.join("&"))
    }
}

/// Rows under `header`, each column as wide as its widest cell and two spaces apart; the
/// first column right-aligned when `numbered` (ids), the last one not padded (free text).
pub(crate) fn aligned_table(header: &[&str], rows: &[Vec<String>], numbered: bool) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let last = header.len().saturating_sub(1);
    let line = |cells: &[&str]| {
        let mut out = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if i > 0 {
                out.push_str("  ");
            }
            match i {
                0 if numbered => out.push_str(&format!("{cell:>width$}")),
                i if i == last => out.push_str(cell),
                _ => out.push_str(&format!("{cell:<width$}")),
            }
        }
        out
    };
    let mut out = line(header);
    for row in rows {
        out.push('\n');
        out.push_str(&line(&row.iter().map(String::as_str).collect::<Vec<_>>()));
    }
    out
}

/// A unix time as `YYYY-MM-DD HH:MM:SS` (UTC), or `-` when there is none.
pub(crate) fn utc(at: &Value) -> String {
    at.as_i64()
        .map_or_else(|| "-".into(), fleet_core::clock::human_utc)
}

pub(crate) fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// A plugin request's job in `plugin requests`: `12 succeeded`, `12 failed at update: why`;
/// for a rejected request, why it was rejected.
fn request_job(r: &Value) -> String {
    if r["job_id"].is_null() {
        return r["rejection_reason"].as_str().unwrap_or("-").to_owned();
    }
    let mut cell = format!("{} {}", text(&r["job_id"]), text(&r["job_status"]));
    if matches!(r["job_status"].as_str(), Some("failed" | "rolled_back"))
        && r["job_step"].is_string()
    {
        cell.push_str(&format!(" at {}", text(&r["job_step"])));
    }
    if r["job_error"].is_string() {
        cell.push_str(&format!(": {}", text(&r["job_error"])));
    }
    cell
}

/// `fleetctl commands ...`.
#[derive(Subcommand, Debug)]
pub enum CommandsCommand {
    /// The most recent commands, newest first, with their targets counted by state.
    List {
        /// How many (1-500).
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// A command's per-target results.
    Show {
        /// The command id (printed by `run` and `deploy`, listed by `commands list`).
        id: String,
    },
    /// Cancel a command: its queued targets are skipped and its running ones stopped.
    Cancel {
        /// The command id.
        id: String,
    },
}

/// `commands list|show|cancel`.
pub fn commands(client: &Client, command: CommandsCommand) -> Result<(), String> {
    match command {
        CommandsCommand::List { limit } => {
            let list = client.get(&format!("/v1/commands?limit={limit}"))?;
            client.print(&list, command_list);
        }
        CommandsCommand::Show { id } => {
            let shown = client.get(&format!("/v1/commands/{}", command_id(&id)?))?;
            client.print(&shown, crate::remote::command_text);
        }
        CommandsCommand::Cancel { id } => {
            let answer = client.post(
                &format!("/v1/commands/{}/cancel", command_id(&id)?),
                &json!({}),
            )?;
            client.print(&answer, |a| {
                format!(
                    "command {id} cancelled ({} target(s) stopped or skipped)",
                    text(&a["cancelled"])
                )
            });
        }
    }
    Ok(())
}

/// A command id as typed, checked before it goes into a URL path.
fn command_id(id: &str) -> Result<&str, String> {
    if !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        Ok(id)
    } else {
        Err(format!(
            "{id:?} is not a command id (letters, digits and dashes, as `run` prints it)"
        ))
    }
}

/// The human table of `commands list`.
fn command_list(list: &Value) -> String {
    let row = |cells: [&str; 11]| {
        format!(
            "{:<36}  {:<15} {:<9} {:<19}  {:>7} {:>4} {:>6} {:>4} {:>7} {:>6}  {}",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4],
            cells[5],
            cells[6],
            cells[7],
            cells[8],
            cells[9],
            cells[10]
        )
    };
    let mut out = row([
        "ID",
        "TYPE",
        "STATUS",
        "SUBMITTED (UTC)",
        "TARGETS",
        "DONE",
        "FAILED",
        "SENT",
        "RUNNING",
        "QUEUED",
        "FIRST TARGET",
    ]);
    for c in list["items"].as_array().into_iter().flatten() {
        let submitted = utc(&c["created_at"]);
        let cell = |name: &str| text(&c[name]);
        out.push('\n');
        out.push_str(&row([
            &cell("id"),
            &cell("command_type"),
            &cell("status"),
            &submitted,
            &cell("total"),
            &cell("completed"),
            &cell("failed"),
            &cell("sent"),
            &cell("running"),
            &cell("queued"),
            &cell("first_instance"),
        ]));
    }
    out
}

/// `release create FILE`: uploads a signed manifest.
pub fn release_create(client: &Client, manifest: &Value) -> Result<(), String> {
    let release = client.post("/api/releases", manifest)?;
    client.print(&release, |r| {
        format!(
            "release {} {} on {} stored as #{} ({})",
            text(&r["version"]),
            text(&r["manifest"]["sha"]),
            text(&r["channel"]),
            text(&r["id"]),
            text(&r["scheme"])
        )
    });
    Ok(())
}

/// `release list`.
pub fn release_list(client: &Client) -> Result<(), String> {
    let list = client.get("/api/releases")?;
    client.print(&list, |l| {
        let mut out = format!(
            "{:>5}  {:<16} {:<10} {:<12}",
            "ID", "VERSION", "CHANNEL", "SCHEME"
        );
        for r in l["items"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "\n{:>5}  {:<16} {:<10} {:<12}",
                text(&r["id"]),
                text(&r["version"]),
                text(&r["channel"]),
                text(&r["scheme"])
            ));
        }
        out
    });
    Ok(())
}

fn options_json(options: &RolloutOptions) -> Value {
    json!({
        "channel": options.channel,
        "batch_size": options.batch_size,
        "failure_threshold": options.failure_threshold,
        "auto_advance": options.auto_advance,
    })
}

/// One line per batch: a bar and the counts.
pub fn progress(rollout: &Value) -> String {
    let what = match rollout["kind"].as_str() {
        Some("plugin") => format!("plugin {}", text(&rollout["plugin_action"])),
        _ => format!("update to {}", text(&rollout["version"])),
    };
    let mut out = format!(
        "rollout {} ({what} on {}): {}",
        text(&rollout["id"]),
        text(&rollout["channel"]),
        text(&rollout["status"])
    );
    if let Some(reason) = rollout["halt_reason"].as_str() {
        out.push_str(&format!(" — {reason}"));
    }
    let current = rollout["current_batch"].as_i64().unwrap_or(0);
    for b in rollout["batches"].as_array().into_iter().flatten() {
        let n = |k: &str| b[k].as_u64().unwrap_or(0);
        let total = n("total").max(1);
        let ended = n("succeeded") + n("failed") + n("rolled_back") + n("cancelled");
        let width = 20;
        let filled = usize::try_from(ended * width / total).unwrap_or(0);
        let bar = format!("{}{}", "#".repeat(filled), ".".repeat(20 - filled.min(20)));
        let index = b["batch"].as_i64().unwrap_or(0);
        let marker = if index == current { ">" } else { " " };
        let mut counts = Vec::new();
        for key in [
            "queued",
            "pending",
            "in_progress",
            "succeeded",
            "failed",
            "rolled_back",
            "cancelled",
        ] {
            if n(key) > 0 {
                counts.push(format!("{} {key}", n(key)));
            }
        }
        out.push_str(&format!(
            "\n{marker} batch {:>2} [{bar}] {ended}/{} {}",
            index + 1,
            n("total"),
            counts.join(", ")
        ));
    }
    if let Some(until) = rollout["observed_until"].as_i64() {
        out.push_str(&format!(
            "\nwatching batch {}'s updated instances against the SLO maxima until {} UTC",
            current + 1,
            fleet_core::clock::human_utc(until)
        ));
    }
    out
}

/// `rollout ...`.
pub fn rollout(client: &Client, command: RolloutCommand) -> Result<(), String> {
    let show = |value: &Value| client.print(value, progress);
    match command {
        RolloutCommand::Create(args) => {
            let CreateArgs {
                release,
                version,
                options,
                strategy,
                canary_steps,
                canary_wait,
                slo_p95_ms_max,
                slo_error_rate_max,
                slo_webhook_retry_rate_max,
                observe_secs,
                no_auto_rollback,
            } = *args;
            let strategy = match strategy.to_ascii_lowercase().replace('_', "-").as_str() {
                "batch" => "BATCH",
                "blue-green-canary" => "BLUE_GREEN_CANARY",
                other => {
                    return Err(format!(
                        "--strategy {other:?}: use batch or blue-green-canary"
                    ));
                }
            };
            let mut body = options_json(&options);
            body["strategy"] = strategy.into();
            body["auto_rollback"] = (!no_auto_rollback).into();
            let optional = [
                ("release_id", release.map(Value::from)),
                ("version", version.map(Value::from)),
                ("canary_steps", canary_steps.map(Value::from)),
                ("canary_step_wait_sec", canary_wait.map(Value::from)),
                ("slo_p95_ms_max", slo_p95_ms_max.map(Value::from)),
                ("slo_error_rate_max", slo_error_rate_max.map(Value::from)),
                (
                    "slo_webhook_retry_rate_max",
                    slo_webhook_retry_rate_max.map(Value::from),
                ),
                ("observe_secs", observe_secs.map(Value::from)),
            ];
            for (key, value) in optional {
                if let Some(value) = value {
                    body[key] = value;
                }
            }
            show(&client.post("/api/rollouts", &body)?);
        }
        RolloutCommand::List => {
            let list = client.get("/api/rollouts")?;
            client.print(&list, |l| {
                let mut out = format!(
                    "{:>5}  {:<8} {:<10} {:<10} {:>7}",
                    "ID", "KIND", "CHANNEL", "STATUS", "BATCH"
                );
                for r in l["items"].as_array().into_iter().flatten() {
                    out.push_str(&format!(
                        "\n{:>5}  {:<8} {:<10} {:<10} {:>3}/{:<3}",
                        text(&r["id"]),
                        text(&r["kind"]),
                        text(&r["channel"]),
                        text(&r["status"]),
                        r["current_batch"].as_i64().unwrap_or(0) + 1,
                        text(&r["batch_count"])
                    ));
                }
                out
            });
        }
        RolloutCommand::Show { id } => show(&client.get(&format!("/api/rollouts/{id}"))?),
        RolloutCommand::Advance { id } => {
            show(&client.post(&format!("/api/rollouts/{id}/advance"), &json!({}))?)
        }
        RolloutCommand::Pause { id } => {
            show(&client.post(&format!("/api/rollouts/{id}/pause"), &json!({}))?)
        }
        RolloutCommand::Resume { id } => {
            show(&client.post(&format!("/api/rollouts/{id}/resume"), &json!({}))?)
        }
        RolloutCommand::Cancel { id } => {
            show(&client.post(&format!("/api/rollouts/{id}/cancel"), &json!({}))?)
        }
        RolloutCommand::Watch { id, interval } => {
            let mut last = String::new();
            loop {
                let rollout = client.get(&format!("/api/rollouts/{id}"))?;
                let view = if client.conn.json {
                    serde_json::to_string(&rollout).unwrap_or_default()
                } else {
                    progress(&rollout)
                };
                if view != last {
                    println!("{view}");
                    if !client.conn.json {
                        println!();
                    }
                    last = view;
                }
                match rollout["status"].as_str() {
                    Some("completed") => return Ok(()),
                    Some(status @ ("halted" | "cancelled")) => {
                        return Err(format!("rollout {id} is {status}"));
                    }
                    _ => std::thread::sleep(Duration::from_secs(interval.max(1))),
                }
            }
        }
    }
    Ok(())
}

/// `plugin ...`.
pub fn plugin(client: &Client, command: PluginCommand) -> Result<(), String> {
    match command {
        PluginCommand::Release {
            name,
            version,
            compatible,
            notes,
        } => {
            let release = client.post(
                "/api/plugins/releases",
                &json!({"name": name, "version": version, "compatible": compatible, "notes": notes}),
            )?;
            client.print(&release, |r| {
                format!(
                    "plugin {} {} published as #{} (compatible: {})",
                    text(&r["name"]),
                    text(&r["version"]),
                    text(&r["id"]),
                    r["compatible"]
                )
            });
        }
        PluginCommand::Releases => {
            let list = client.get("/api/plugins/releases")?;
            client.print(&list, |l| {
                let mut out = format!(
                    "{:>5}  {:<28} {:<12} {}",
                    "ID", "NAME", "VERSION", "COMPATIBLE"
                );
                for r in l["items"].as_array().into_iter().flatten() {
                    out.push_str(&format!(
                        "\n{:>5}  {:<28} {:<12} {}",
                        text(&r["id"]),
                        text(&r["name"]),
                        text(&r["version"]),
                        r["compatible"]
                    ));
                }
                out
            });
        }
        PluginCommand::Requests => {
            let list = client.get("/api/plugins/requests")?;
            client.print(&list, |l| {
                let mut out = format!(
                    "{:>5}  {:<16} {:<28} {:<12} {:<8} {:<9} {}",
                    "ID", "INSTANCE", "NAME", "VERSION", "ACTION", "STATUS", "JOB"
                );
                for r in l["items"].as_array().into_iter().flatten() {
                    out.push_str(&format!(
                        "\n{:>5}  {:<16} {:<28} {:<12} {:<8} {:<9} {}",
                        text(&r["id"]),
                        text(&r["instance_id"]),
                        text(&r["name"]),
                        text(&r["version"]),
                        text(&r["action"]),
                        text(&r["status"]),
                        request_job(r)
                    ));
                }
                out
            });
        }
        PluginCommand::Approve { id } => {
            let record = client.post(&format!("/api/plugins/requests/{id}/approve"), &json!({}))?;
            client.print(&record, |r| {
                format!(
                    "request {} approved: job {} will {} {} {} on {}",
                    text(&r["id"]),
                    text(&r["job_id"]),
                    text(&r["action"]),
                    text(&r["name"]),
                    text(&r["version"]),
                    text(&r["instance_id"])
                )
            });
        }
        PluginCommand::Reject { id, reason } => {
            let record = client.post(
                &format!("/api/plugins/requests/{id}/reject"),
                &json!({"reason": reason}),
            )?;
            client.print(&record, |r| {
                let mut line = format!(
                    "request {} rejected: {} will not {} {} {}",
                    text(&r["id"]),
                    text(&r["instance_id"]),
                    text(&r["action"]),
                    text(&r["name"]),
                    text(&r["version"])
                );
                if let Some(reason) = r["rejection_reason"].as_str() {
                    line.push_str(&format!(" ({reason})"));
                }
                line
            });
        }
        PluginCommand::Rollout {
            release,
            action,
            options,
        } => {
            let mut body = options_json(&options);
            body["plugin_release_id"] = release.into();
            body["action"] = action.into();
            let rollout = client.post("/api/plugins/rollouts", &body)?;
            client.print(&rollout, progress);
        }
    }
    Ok(())
}

/// `restore ...`.
pub fn restore(client: &Client, command: RestoreCommand) -> Result<(), String> {
    let table = |l: &Value| {
        let mut out = format!(
            "{:>5}  {:<20} {:<10} {:<12} {}",
            "ID", "INSTANCE", "ENV", "STATUS", "DETAIL"
        );
        for r in l["items"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "\n{:>5}  {:<20} {:<10} {:<12} {}",
                text(&r["id"]),
                text(&r["instance_id"]),
                text(&r["environment"]),
                text(&r["status"]),
                r["error"].as_str().unwrap_or("")
            ));
        }
        out
    };
    match command {
        RestoreCommand::Schedule { count, environment } => {
            let done = client.post(
                "/api/restores/schedule",
                &json!({"count": count, "environment": environment}),
            )?;
            client.print(&done, |d| schedule_summary(d, table(d)));
        }
        RestoreCommand::List { instance } => {
            let path = match instance {
                Some(instance) => format!(
                    "/api/restores?instance={}",
                    fleet_core::percent_encode(&instance)
                ),
                None => "/api/restores".to_owned(),
            };
            client.print(&client.get(&path)?, table);
        }
        RestoreCommand::Cancel { id } => {
            let restore = client.post(&format!("/api/restores/{id}/cancel"), &json!({}))?;
            client.print(&restore, |r| {
                format!(
                    "restore verification {} of {} in {} cancelled; it can be scheduled again",
                    text(&r["id"]),
                    text(&r["instance_id"]),
                    text(&r["environment"])
                )
            });
        }
    }
    Ok(())
}

/// What scheduling did: the control plane's sentence (why installations were passed over,
/// so an empty schedule is explained), then the verifications recorded, if any.
fn schedule_summary(done: &Value, table: String) -> String {
    let message = done["message"].as_str().unwrap_or("scheduled");
    if done["items"]
        .as_array()
        .is_some_and(|items| !items.is_empty())
    {
        format!("{message}\n{table}")
    } else {
        message.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_restore_schedule_prints_why() {
        let empty = json!({"items": [], "scheduled": 0,
            "message": "Nothing scheduled in staging. Not scheduled: 2 installations have no backup to verify."});
        assert_eq!(
            schedule_summary(&empty, "ID  INSTANCE".into()),
            "Nothing scheduled in staging. Not scheduled: 2 installations have no backup to verify."
        );
        let one = json!({"items": [{"id": 1}], "message": "Scheduled 1 verification in staging."});
        assert_eq!(
            schedule_summary(&one, "ID  INSTANCE".into()),
            "Scheduled 1 verification in staging.\nID  INSTANCE"
        );
        assert_eq!(fleet_core::percent_encode("edge 7/ä"), "edge%207%2F%C3%A4");
    }

    #[test]
    fn progress_says_until_when_a_batch_is_watched() {
        let mut rollout = json!({"id": 3, "kind": "update", "version": "2.1.0",
            "channel": "stable", "status": "running", "current_batch": 0,
            "observed_until": null,
            "batches": [{"batch": 0, "total": 1, "succeeded": 1}, {"batch": 1, "total": 1, "queued": 1}]});
        let text = progress(&rollout);
        assert!(
            text.starts_with("rollout 3 (update to 2.1.0 on stable): running"),
            "{text}"
        );
        assert!(!text.contains("watching"), "{text}");
        rollout["observed_until"] = json!(1_796_644_800);
        let text = progress(&rollout);
        assert!(
            text.ends_with(
                "watching batch 1's updated instances against the SLO maxima until 2026-12-07 12:00:00 UTC"
            ),
            "{text}"
        );
    }
}
