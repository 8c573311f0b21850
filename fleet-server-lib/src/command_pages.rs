//! Dashboard pages for remote commands: the recent commands with their targets counted by
//! status, and one command with each target's status, result and output (saying when the
//! control plane cut it at its cap or deleted it after its retention), with a form that
//! cancels it while it runs (for the roles that may). Every role reads them; a payload's
//! secret-bearing values are hidden from `support` (see [`visible_payload`]), while output
//! stays visible to all, as `/v1/commands/:id/logs` is.

use std::fmt::Write;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use fleet_core::command::Stream;
use serde_json::Value;

use crate::auth::{Role, Viewer, percent_encode};
use crate::channel::command_store;
use crate::dashboard::{esc, format_time, layout};
use crate::store::commands::TargetRecord;
use crate::{Error, Result, Shared};

/// Commands listed.
const LIST: i64 = 100;
/// Targets whose output the detail page shows (the rest link to the API).
const LOG_TARGETS: usize = 20;
/// Bytes of each stream shown on the page.
const LOG_BYTES: usize = 64 * 1024;
/// Seconds between refreshes of a running command's page.
const REFRESH_SECS: u32 = 3;

fn status(text: &str) -> String {
    let class = match text {
        "completed" => "ok",
        "failed" | "timed_out" | "halted" | "cancelled" => "bad",
        "running" | "sent" | "queued" => "warn",
        _ => "muted",
    };
    format!("<span class={class}>{}</span>", esc(text))
}

/// What `role` may see of a payload: `support` reads no value that commonly carries a
/// secret (a `RunCommand`'s environment values and arguments, a compose file, a download
/// URL's query string and userinfo, a command line that runs through a shell); ops and
/// admin, who may run commands, see it whole.
pub(crate) fn visible_payload(command_type: &str, payload: &Value, role: Role) -> Value {
    if role >= Role::Ops {
        return payload.clone();
    }
    let mut shown = payload.clone();
    let hidden = |what: &str| Value::String(format!("[hidden from support: {what}]"));
    if let Some(env) = shown.get_mut("env").and_then(Value::as_object_mut) {
        for value in env.values_mut() {
            *value = hidden("value");
        }
    }
    if let Some(compose) = shown.get_mut("compose_file_base64") {
        let len = compose.as_str().map_or(0, str::len);
        *compose = hidden(&format!("{len} base64 characters"));
    }
    // A download URL's query (a presigned signature) and userinfo (a password).
    if let Some(url) = shown.get_mut("url")
        && let Some(text) = url.as_str()
    {
        *url = Value::String(fleet_core::redact_url_secrets(text));
    }
    // A shell command line may carry credentials inline (`curl -u user:pass`); the
    // program alone is shown.
    let shell = shown["shell"].as_bool() == Some(true);
    if command_type == "RunCommand"
        && shell
        && let Some(cmd) = shown.get_mut("cmd")
    {
        let program = cmd
            .as_str()
            .and_then(|c| c.split_whitespace().next())
            .unwrap_or("")
            .to_owned();
        *cmd = Value::String(format!("{program} [rest hidden from support]"));
    }
    // Arguments are hidden whatever they look like: no list of words catches every way of
    // passing a credential (`-pHunter2`, `postgres://user:pw@db`, a bare token).
    if command_type == "RunCommand"
        && let Some(args) = shown.get_mut("args").and_then(Value::as_array_mut)
        && !args.is_empty()
    {
        let what = match args.len() {
            1 => "1 argument".to_owned(),
            n => format!("{n} arguments"),
        };
        *args = vec![hidden(&what)];
    }
    shown
}

/// What `role` may see of a target's error: an agent's error may quote a URL it fetched (an
/// `UpdateAgent` download), whose query and userinfo `support` does not read.
pub(crate) fn visible_error(error: &str, role: Role) -> String {
    if role >= Role::Ops {
        error.to_owned()
    } else {
        fleet_core::redact_url_secrets(error)
    }
}

/// `GET /commands`: the most recent commands.
pub(crate) async fn commands(
    Viewer(role): Viewer<0>,
    State(state): State<Shared>,
) -> Result<Response> {
    let items = command_store(state.store.as_ref())?
        .list_commands(LIST)
        .await?;
    let mut b = String::from(
        "<h1>Commands</h1><table id=commands><thead><tr><th>Command</th><th>Type</th>\
         <th>Targets</th><th>Status</th><th>Results</th><th>Submitted by</th><th>Submitted</th>\
         </tr></thead><tbody>",
    );
    for c in &items {
        let targets = match (&c.first_instance, c.total) {
            (None, _) => "–".to_owned(),
            (Some(first), 1) => esc(first),
            (Some(first), n) => format!("{} and {} more", esc(first), n - 1),
        };
        let _ = write!(
            b,
            "<tr data-id=\"{id}\"><td><a href=\"/commands/{link}\">{short}</a></td><td>{}</td>\
             <td>{targets}</td><td>{}</td><td>{} completed · {} failed · {} sent · {} running · {} queued \
             <span class=muted>of {}</span></td><td>{}</td><td>{}</td></tr>",
            esc(&c.command_type),
            status(&c.status),
            c.completed,
            c.failed,
            c.sent,
            c.running,
            c.queued,
            c.total,
            esc(&c.created_by),
            format_time(c.created_at),
            id = esc(&c.id),
            link = percent_encode(&c.id),
            short = esc(c.id.get(..8).unwrap_or(&c.id)),
        );
    }
    if items.is_empty() {
        b.push_str(
            "<tr><td colspan=7 class=muted>No commands yet (fleetctl run, fleetctl deploy).</td></tr>",
        );
    }
    b.push_str("</tbody></table>");
    Ok(layout("Commands", Some(role), &b).into_response())
}

/// `GET /commands/{id}`: one command, its targets and their output.
pub(crate) async fn command(
    Viewer(role): Viewer<0>,
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response> {
    let store = command_store(state.store.as_ref())?;
    let Some(c) = store.command(&id).await? else {
        let body = format!("<h1>Not found</h1><p>No command {}.</p>", esc(&id));
        return Ok((
            StatusCode::NOT_FOUND,
            layout("Not found", Some(role), &body),
        )
            .into_response());
    };
    let mut b = String::new();
    let limit = |v: Option<String>| v.map_or_else(|| "none".to_owned(), |v| esc(&v));
    let _ = write!(
        b,
        "<h1>{} · <span class=muted>{}</span></h1><p>Status <b id=status>{}</b> · submitted by \
         <b id=submitted-by>{}</b> at {} · finished {} · max concurrency {} · max errors {}</p>",
        esc(&c.command_type),
        esc(&c.id),
        status(&c.status),
        esc(&c.created_by),
        format_time(c.created_at),
        c.finished_at.map_or_else(|| "–".to_owned(), format_time),
        limit(c.max_concurrency.map(|n| n.to_string())),
        limit(c.max_errors.clone()),
    );
    if c.status == "running" && crate::commands::may_operate(role, &c.command_type) {
        let _ = write!(
            b,
            "<form method=post action=\"/commands/{}/cancel\" id=cancel><button>Cancel</button> \
             <span class=muted>queued targets are skipped, running ones stopped</span></form>",
            percent_encode(&c.id)
        );
    }
    let payload = visible_payload(&c.command_type, &c.payload, role);
    let _ = write!(
        b,
        "<h2>Payload</h2><pre id=payload>{}</pre>",
        esc(&serde_json::to_string_pretty(&payload).unwrap_or_default())
    );
    b.push_str(
        "<h2>Targets</h2><table id=targets><thead><tr><th>Instance</th><th>Status</th>\
         <th>Exit code</th><th>Error</th><th>Output</th><th>Updated</th></tr></thead><tbody>",
    );
    for t in &c.targets {
        let _ = write!(
            b,
            "<tr data-instance=\"{}\"><td><a href=\"/installations/{}\">{}</a></td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&t.instance_id),
            percent_encode(&t.instance_id),
            esc(&t.instance_id),
            status(&t.status),
            t.exit_code
                .map_or_else(|| "–".to_owned(), |c| c.to_string()),
            t.error
                .as_deref()
                .map_or_else(|| "–".to_owned(), |e| esc(&visible_error(e, role))),
            output_cell(t),
            format_time(t.updated_at),
        );
    }
    b.push_str("</tbody></table><h2>Output</h2>");
    for (n, t) in c.targets.iter().enumerate() {
        if n == LOG_TARGETS {
            let _ = write!(
                b,
                "<p class=muted>Output of the other {} targets: <code>GET /v1/commands/{}/logs?target=…</code></p>",
                c.targets.len() - LOG_TARGETS,
                esc(&c.id)
            );
            break;
        }
        let _ = write!(b, "<section><h3>{}</h3>", esc(&t.instance_id));
        // Deleted output has no streams left to show, only the note of when it went.
        let streams: &[Stream] = match crate::commands::output_deleted(t) {
            Some(deleted_at) => {
                let _ = write!(
                    b,
                    "<p class=muted id=\"output-deleted-{n}\">{}.</p>",
                    esc(&crate::commands::deletion_text(t.output_bytes, deleted_at))
                );
                &[]
            }
            None => &[Stream::Stdout, Stream::Stderr],
        };
        for &stream in streams {
            let name = match stream {
                Stream::Stdout => "stdout",
                Stream::Stderr => "stderr",
            };
            let (text, more) = head(store, &t.target_id, stream).await?;
            let full = format!(
                "/v1/commands/{}/logs?target={}&amp;stream={name}",
                percent_encode(&c.id),
                percent_encode(&t.target_id)
            );
            let _ = write!(
                b,
                "<p>{name} · <a href=\"{full}\">whole</a>{}</p><pre id=\"log-{n}-{name}\">{}</pre>",
                if more {
                    format!(
                        " <span class=muted>(first {} KiB shown)</span>",
                        LOG_BYTES / 1024
                    )
                } else {
                    String::new()
                },
                esc(&text)
            );
        }
        if let Some(cut) = t.output_truncated_at_bytes {
            let _ = write!(
                b,
                "<p class=warn id=\"output-truncated-{n}\">{}: what the command printed past \
                 it was not stored.</p>",
                esc(&crate::commands::truncation_text(cut))
            );
        }
        if let Some(logs) = t.logs.as_deref().filter(|l| !l.is_empty()) {
            let _ = write!(b, "<p>agent's summary</p><pre>{}</pre>", esc(logs));
        }
        b.push_str("</section>");
    }
    let mut page = layout(&format!("Command {}", c.id), Some(role), &b).0;
    if c.status == "running" {
        // Live progress without JavaScript, as on a running rollout's page.
        page = page.replacen(
            "<head>",
            &format!("<head><meta http-equiv=refresh content={REFRESH_SECS}>"),
            1,
        );
    }
    Ok(axum::response::Html(page).into_response())
}

/// A target's output in the targets table: its size, and whether the control plane cut it
/// at the cap or deleted it after the retention.
fn output_cell(target: &TargetRecord) -> String {
    let size = fleet_core::byte_size(target.output_bytes);
    if crate::commands::output_deleted(target).is_some() {
        format!("<span class=muted>{size}, deleted</span>")
    } else if let Some(cut) = target.output_truncated_at_bytes {
        format!(
            "{size} <span class=warn>(truncated at {})</span>",
            fleet_core::byte_size(cut)
        )
    } else {
        size
    }
}

/// The first [`LOG_BYTES`] of a target's stream as text, and whether there is more.
async fn head(
    store: &dyn crate::store::commands::CommandStore,
    target: &str,
    stream: Stream,
) -> Result<(String, bool)> {
    let mut bytes = Vec::new();
    let mut from = 0i64;
    loop {
        let chunks = store.read_chunks(target, Some(stream), from, 8).await?;
        if chunks.is_empty() {
            return Ok((String::from_utf8_lossy(&bytes).into_owned(), false));
        }
        for chunk in chunks {
            from = chunk.pos.saturating_add(chunk.data.len() as i64);
            let room = LOG_BYTES - bytes.len();
            if chunk.data.len() >= room {
                bytes.extend_from_slice(&chunk.data[..room]);
                return Ok((String::from_utf8_lossy(&bytes).into_owned(), true));
            }
            bytes.extend_from_slice(&chunk.data);
        }
    }
}

/// `POST /commands/{id}/cancel`: the dashboard's cancel form; back to the command's page.
pub(crate) async fn cancel(
    Viewer(role): Viewer<1>,
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response> {
    match crate::commands::cancel_as(&state, role, &id).await {
        Ok(_) => Ok(Redirect::to(&format!("/commands/{}", percent_encode(&id))).into_response()),
        Err(Error::Forbidden) => Ok(crate::dashboard::forbidden_page()),
        // An unknown id is a JSON 404, as for the dashboard's other forms.
        Err(other) => Err(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn support_sees_no_secret_bearing_payload_values_ops_sees_all() {
        let run = json!({"cmd": "curl -u user:pa55 https://x", "shell": true,
                         "env": {"API_TOKEN": "t0ken"}, "args": []});
        let shown = visible_payload("RunCommand", &run, Role::Support).to_string();
        assert!(
            !shown.contains("t0ken") && !shown.contains("pa55"),
            "{shown}"
        );
        assert!(
            shown.contains("API_TOKEN") && shown.contains("curl"),
            "{shown}"
        );
        for args in [
            json!(["--password=pa55", "-e", "select 1"]),
            json!(["-ppa55", "-e", "select 1"]),
            json!(["postgres://app:pa55@db/app"]),
        ] {
            let run = json!({"cmd": "mysql", "args": args});
            let shown = visible_payload("RunCommand", &run, Role::Support).to_string();
            assert!(!shown.contains("pa55"), "{shown}");
            assert!(
                shown.contains("mysql") && shown.contains("argument"),
                "{shown}"
            );
        }
        let plain = json!({"cmd": "uname", "args": ["-a"]});
        assert_eq!(
            visible_payload("RunCommand", &plain, Role::Support),
            json!({"cmd": "uname", "args": ["[hidden from support: 1 argument]"]})
        );
        let bare = json!({"cmd": "uptime", "args": []});
        assert_eq!(visible_payload("RunCommand", &bare, Role::Support), bare);
        let update =
            json!({"version": "2", "url": "https://dl:pw@dl/agent?sig=abc", "sha256": "00"});
        let shown = visible_payload("UpdateAgent", &update, Role::Support).to_string();
        assert!(
            !shown.contains("sig=abc") && !shown.contains("pw@") && shown.contains("dl/agent"),
            "{shown}"
        );
        let error =
            "download failed: error sending request for url (http://u:pw@dl/agent?token=t0k)";
        let shown = visible_error(error, Role::Support);
        assert!(
            !shown.contains("t0k") && !shown.contains("pw@") && shown.contains("download failed"),
            "{shown}"
        );
        assert_eq!(visible_error(error, Role::Ops), error);
        let deploy = json!({"project_name": "web", "compose_file_base64": "c2VjcmV0"});
        let shown = visible_payload("DEPLOY_COMPOSE", &deploy, Role::Support).to_string();
        assert!(
            !shown.contains("c2VjcmV0") && shown.contains("web"),
            "{shown}"
        );
        for role in [Role::Ops, Role::Admin] {
            assert_eq!(visible_payload("RunCommand", &run, role), run);
        }
    }
}
