//! The command API for operators: submit, show per-target results, read or follow output,
//! cancel.
//!
//! RunCommand, UpdateAgent, UpdatePackage and the compose deploys need `admin`; STATUS and
//! HEALTH_CHECK need `ops`.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use fleet_core::command::{Stream, SubmitCommand};
use serde::Deserialize;

use crate::auth::{Authed, Ops, Role, Support};
use crate::channel::command_store;
use crate::registration::decode_body;
use crate::store::commands::{CommandStore, NewCommand, StoredChunk, TargetRecord, is_final};
use crate::{Error, Result, Shared};

/// Chunks read from the database per page when streaming output.
const PAGE: i64 = 64;
/// How often a follower looks for new output when nothing woke it.
const FOLLOW_POLL: Duration = Duration::from_millis(500);

fn require(role: Role, command_type: fleet_core::command::CommandType) -> Result<()> {
    if command_type.is_read_only() || role >= Role::Admin {
        Ok(())
    } else {
        Err(Error::Forbidden)
    }
}

/// `POST /v1/commands/submit`.
pub(crate) async fn submit(
    Authed(role): Ops,
    State(state): State<Shared>,
    body: Bytes,
) -> Result<Response> {
    let submit: SubmitCommand = decode_body(&body, &state.settings.limits)?;
    require(role, submit.command_type)?;
    check_compose_file(&submit)?;
    let commands = command_store(state.store.as_ref())?;
    let max_targets = i64::try_from(state.settings.limits.max_targets).unwrap_or(10_000);
    let mut instances: Vec<String> = if submit.targets.is_empty() {
        let selector = submit
            .selector
            .clone()
            .unwrap_or(fleet_core::command::Selector {
                channel: None,
                all: false,
            });
        let channel = if selector.all {
            None
        } else {
            selector.channel.as_deref()
        };
        commands.select_instances(channel, max_targets).await?
    } else {
        submit.targets.clone()
    };
    let mut seen = std::collections::HashSet::new();
    instances.retain(|i| seen.insert(i.clone()));
    if !submit.targets.is_empty() {
        refuse_unknown_or_archived_targets(&state, commands, &instances).await?;
    }
    if instances.is_empty() {
        let mut errors = fleet_core::ValidationErrors::default();
        errors.push(
            "selector",
            "matches no active instance (archived installations are never selected)",
        );
        return Err(Error::Invalid(errors));
    }
    let now = fleet_core::unix_now();
    let command = NewCommand {
        id: uuid::Uuid::now_v7().to_string(),
        command_type: submit.command_type,
        payload: submit.payload.clone(),
        max_concurrency: submit.max_concurrency,
        max_errors: submit.max_errors.clone(),
        created_by: role.as_str().to_owned(),
        created_at: now,
    };
    let targets: Vec<(String, String)> = instances
        .into_iter()
        .map(|instance| (uuid::Uuid::new_v4().to_string(), instance))
        .collect();
    commands.create_command(&command, &targets).await?;
    let released = commands.schedule(&command.id, now).await?;
    state.live.deliver(released).await;
    tracing::info!(
        command_id = %command.id, command_type = command.command_type.as_str(),
        targets = targets.len(), by = role.as_str(), "command submitted"
    );
    let listed: Vec<_> = targets
        .iter()
        .map(|(target, instance)| serde_json::json!({"target_id": target, "instance_id": instance}))
        .collect();
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "id": command.id, "targets": listed })),
    )
        .into_response())
}

/// Refuses a submission naming instances the control plane has never heard of (a typo, a
/// host never set up) or has archived (a customer who left): each would hold a
/// `max_concurrency` slot until the delivery timeout. Known: an installation or an enrollment
/// in the database, a secret of its own in `CONTROL_PLANE_AGENT_SECRETS`, or a socket to this
/// process (an agent signing with the shared token registers and connects without a row of
/// its own). A connected instance is never refused: it is alive, and its next heartbeat makes
/// it active again anyway.
async fn refuse_unknown_or_archived_targets(
    state: &Shared,
    commands: &dyn crate::store::commands::CommandStore,
    instances: &[String],
) -> Result<()> {
    let resolver = state.verifier.resolver();
    let unconnected: Vec<String> = instances
        .iter()
        .filter(|i| !state.live.is_connected(i))
        .cloned()
        .collect();
    if unconnected.is_empty() {
        return Ok(());
    }
    let found = commands.known_instances(&unconnected).await?;
    let unknown: Vec<&str> = unconnected
        .iter()
        .filter(|i| !found.known.contains(*i) && !resolver.has_own_secret(i))
        .map(String::as_str)
        .collect();
    let archived: Vec<&str> = unconnected
        .iter()
        .filter(|i| found.archived.contains(*i))
        .map(String::as_str)
        .collect();
    let mut errors = fleet_core::ValidationErrors::default();
    if !unknown.is_empty() {
        errors.push(
            "targets",
            format!(
                "unknown instance: {} (no heartbeat, enrollment or configured secret, and not \
                 connected); nothing was submitted",
                named_few(&unknown)
            ),
        );
    }
    if !archived.is_empty() {
        errors.push(
            "targets",
            format!(
                "archived instance: {} (its next heartbeat, or enrolling it again, makes it \
                 active); nothing was submitted",
                named_few(&archived)
            ),
        );
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Error::Invalid(errors))
    }
}

/// The first ten of `ids`, and how many more there are.
fn named_few(ids: &[&str]) -> String {
    const NAMED: usize = 10;
    let mut named = ids[..ids.len().min(NAMED)].join(", ");
    if ids.len() > NAMED {
        named.push_str(&format!(" and {} more", ids.len() - NAMED));
    }
    named
}

/// A DEPLOY_COMPOSE whose file is not base64, or is empty, is refused here: every agent
/// would refuse it (after the operator waited for each to take it), and the payload's
/// validation in fleet-core only bounds the text's length.
fn check_compose_file(submit: &SubmitCommand) -> Result<()> {
    use base64::Engine;
    if submit.command_type != fleet_core::command::CommandType::DeployCompose {
        return Ok(());
    }
    let text = submit.payload["compose_file_base64"]
        .as_str()
        .unwrap_or_default();
    let problem = match base64::engine::general_purpose::STANDARD.decode(text) {
        Ok(bytes) if bytes.is_empty() => "the compose file is empty",
        Ok(_) => return Ok(()),
        Err(_) => "is not valid base64",
    };
    let mut errors = fleet_core::ValidationErrors::default();
    errors.push("payload.compose_file_base64", problem);
    Err(Error::Invalid(errors))
}

#[derive(Debug, Deserialize)]
struct ListCommandsQuery {
    limit: Option<i64>,
}

/// Commands listed when the query names no `limit`.
const LIST_DEFAULT: i64 = 50;

/// `GET /v1/commands?limit=`: the most recent commands, newest first, each with its targets
/// counted by state.
pub(crate) async fn list(
    _: Support,
    State(state): State<Shared>,
    uri: axum::http::Uri,
) -> Result<Response> {
    let query = Query::<ListCommandsQuery>::try_from_uri(&uri)
        .map_err(|e| Error::BadRequest(e.body_text()))?
        .0;
    let limit = query.limit.unwrap_or(LIST_DEFAULT);
    if !(1..=crate::api::MAX_PAGE).contains(&limit) {
        return Err(Error::BadRequest(format!(
            "limit must be between 1 and {}",
            crate::api::MAX_PAGE
        )));
    }
    let items = command_store(state.store.as_ref())?
        .list_commands(limit)
        .await?;
    Ok(Json(serde_json::json!({ "items": items })).into_response())
}

/// `GET /v1/commands/{id}`.
pub(crate) async fn show(
    crate::auth::Authed(role): Support,
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response> {
    let commands = command_store(state.store.as_ref())?;
    let record = commands.command(&id).await?.ok_or(Error::NotFound)?;
    let mut value = serde_json::to_value(&record).map_err(|e| Error::Internal(e.to_string()))?;
    // Support reads results and output, not the secrets a payload may carry.
    value["payload"] =
        crate::command_pages::visible_payload(&record.command_type, &record.payload, role);
    // `data` is stored as text; show it as JSON.
    if let Some(targets) = value.get_mut("targets").and_then(|t| t.as_array_mut()) {
        for (target, stored) in targets.iter_mut().zip(&record.targets) {
            if let Some(error) = &stored.error {
                target["error"] = crate::command_pages::visible_error(error, role).into();
            }
            target["data"] = stored
                .data
                .as_deref()
                .and_then(|d| serde_json::from_str(d).ok())
                .unwrap_or(serde_json::Value::Null);
        }
    }
    Ok(Json(value).into_response())
}

#[derive(Debug, Deserialize)]
pub(crate) struct LogQuery {
    /// Instance id (needed when the command has several targets).
    target: Option<String>,
    /// `stdout` (default) or `stderr`; with `follow`, both when absent.
    stream: Option<Stream>,
    /// Server-sent events until the target ends.
    #[serde(default)]
    follow: bool,
}

/// What the control plane says of output it cut at `max_bytes`.
pub(crate) fn truncation_text(max_bytes: i64) -> String {
    format!(
        "output truncated at {} by the control plane (CONTROL_PLANE_COMMAND_OUTPUT_MAX_BYTES)",
        fleet_core::byte_size(max_bytes)
    )
}

/// What the control plane says of output its retention sweep deleted.
pub(crate) fn deletion_text(output_bytes: i64, deleted_at: i64) -> String {
    format!(
        "the output of this target ({}) was deleted at {} by the control plane's retention \
         (CONTROL_PLANE_COMMAND_RETENTION_DAYS); its status, exit code and result are kept",
        fleet_core::byte_size(output_bytes),
        fleet_core::clock::rfc3339(deleted_at)
    )
}

/// When the retention sweep deleted this target's output, if it did and there was some.
pub(crate) fn output_deleted(target: &TargetRecord) -> Option<i64> {
    target.output_deleted_at.filter(|_| target.output_bytes > 0)
}

/// [`output_deleted`] of a target's [`TargetOutput`](crate::store::commands::TargetOutput).
fn deleted_at(output: &crate::store::commands::TargetOutput) -> Option<i64> {
    output.output_deleted_at.filter(|_| output.output_bytes > 0)
}

/// The lines that end a target's whole output: the cut at the cap, and the retention's
/// deletion when the sweep deleted the output while it was being read (what came before is
/// then only part of it). Empty when the output was read whole and not cut.
fn closing_lines(output: &crate::store::commands::TargetOutput) -> String {
    let mut lines = String::new();
    if let Some(cut) = output.output_truncated_at_bytes {
        lines.push_str(&format!("\n[{}]\n", truncation_text(cut)));
    }
    if let Some(at) = deleted_at(output) {
        lines.push_str(&format!("\n[{}]\n", deletion_text(output.output_bytes, at)));
    }
    lines
}

/// `GET /v1/commands/{id}/logs?target=&stream=&follow=`: the whole output as bytes, or a
/// live stream of server-sent events. Output the control plane cut at its cap ends with a
/// line that says so; output its retention deleted is a 410 that says when, and output it
/// deleted while being read ends with a line (or an `end` event) that says so.
pub(crate) async fn logs(
    _: Support,
    State(state): State<Shared>,
    Path(id): Path<String>,
    Query(query): Query<LogQuery>,
    headers: axum::http::HeaderMap,
) -> Result<Response> {
    let commands = command_store(state.store.as_ref())?;
    let record = commands.command(&id).await?.ok_or(Error::NotFound)?;
    let target = match &query.target {
        Some(instance) => record
            .targets
            .iter()
            .find(|t| &t.instance_id == instance || &t.target_id == instance),
        None if record.targets.len() == 1 => record.targets.first(),
        None => {
            return Err(Error::BadRequest(
                "the command has several targets: name one with ?target=".into(),
            ));
        }
    }
    .ok_or(Error::NotFound)?;
    // Deleted output answers so, instead of an empty output as if nothing had been printed.
    if let Some(deleted_at) = output_deleted(target) {
        return Err(Error::Gone(deletion_text(target.output_bytes, deleted_at)));
    }
    let target = target.target_id.clone();
    if query.follow {
        let resume = match headers.get("last-event-id") {
            None => [0, 0],
            Some(value) => value
                .to_str()
                .ok()
                .and_then(parse_event_id)
                .ok_or_else(|| {
                    Error::BadRequest(
                        "Last-Event-ID must be the id of an output event: \
                         <stdout offset>,<stderr offset>"
                            .into(),
                    )
                })?,
        };
        return Ok(follow(state, target, query.stream, resume).into_response());
    }
    let stream = query.stream.unwrap_or(Stream::Stdout);
    /// Where the whole output's stream of pages stands.
    enum Page {
        /// The next page starts at this offset.
        From(i64),
        /// Every stored chunk was sent: the truncation line, if the output was cut, is next.
        Note,
        /// Nothing more.
        Done,
    }
    // Page by page: a 100 MB output never sits in memory whole.
    let body = futures_util::stream::unfold(
        (state, target, Page::From(0)),
        move |(state, target, mut page)| async move {
            let commands = state.store.commands()?;
            loop {
                let from = match page {
                    Page::From(from) => from,
                    Page::Note => {
                        // Read at the end, so a cut or a deletion made while the output
                        // was read is told.
                        return match commands.target_output(&target).await {
                            Ok(output) => {
                                // Output left whole ends with its last byte.
                                let lines = closing_lines(&output?);
                                (!lines.is_empty())
                                    .then(|| (Ok(Bytes::from(lines)), (state, target, Page::Done)))
                            }
                            Err(err) => Some((
                                Err(std::io::Error::other(err.to_string())),
                                (state, target, Page::Done),
                            )),
                        };
                    }
                    Page::Done => return None,
                };
                let chunks = match commands
                    .read_chunks(&target, Some(stream), from, PAGE)
                    .await
                {
                    Ok(chunks) if chunks.is_empty() => {
                        page = Page::Note;
                        continue;
                    }
                    Ok(chunks) => chunks,
                    Err(err) => {
                        return Some((
                            Err(std::io::Error::other(err.to_string())),
                            (state, target, Page::Done),
                        ));
                    }
                };
                let next = if chunks.len() < PAGE as usize {
                    Page::Note
                } else {
                    Page::From(
                        chunks
                            .last()
                            .map(|c| c.pos.saturating_add(c.data.len() as i64))
                            .unwrap_or(from),
                    )
                };
                let mut bytes = Vec::new();
                for chunk in chunks {
                    bytes.extend_from_slice(&chunk.data);
                }
                return Some((
                    Ok::<_, std::io::Error>(Bytes::from(bytes)),
                    (state, target, next),
                ));
            }
        },
    );
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(body),
    )
        .into_response())
}

/// The id of an output event: where each stream goes on after it, `<stdout>,<stderr>`.
/// A client that lost the stream sends it back as `Last-Event-ID` (as `EventSource` does by
/// itself) and gets the output from there, not all of it again.
fn event_id(next: [i64; 2]) -> String {
    format!("{},{}", next[0], next[1])
}

fn parse_event_id(text: &str) -> Option<[i64; 2]> {
    let (stdout, stderr) = text.trim().split_once(',')?;
    let offset = |t: &str| t.parse::<i64>().ok().filter(|o| *o >= 0);
    Some([offset(stdout)?, offset(stderr)?])
}

/// Follows one target's output from the offsets `resume` as server-sent events:
/// `stdout`/`stderr` events carrying `{offset, data, encoding}` (their id is where each
/// stream goes on, see [`event_id`]), then one `end` event with the target's final status
/// and output size, and, when the control plane cut its output at the cap,
/// `output_truncated_at_bytes`, or deleted it while it was being followed,
/// `output_deleted_at`.
fn follow(
    state: Shared,
    target: String,
    only: Option<Stream>,
    resume: [i64; 2],
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    struct Cursor {
        state: Shared,
        target: String,
        next: [i64; 2],
        pending: std::collections::VecDeque<Event>,
        finished: bool,
        ended: bool,
    }
    let cursor = Cursor {
        state,
        target,
        next: resume,
        pending: Default::default(),
        finished: false,
        ended: false,
    };
    let stream = futures_util::stream::unfold(cursor, move |mut c| async move {
        loop {
            if let Some(event) = c.pending.pop_front() {
                return Some((Ok(event), c));
            }
            if c.ended {
                return None;
            }
            let commands = c.state.store.commands()?;
            // Whether the target ended is read BEFORE the output: output stored before the
            // end is then certainly seen by the read that follows.
            let ended = target_ended(commands, &c.target).await;
            let mut got = 0;
            for (i, stream) in [Stream::Stdout, Stream::Stderr].into_iter().enumerate() {
                if only.is_some_and(|o| o != stream) {
                    continue;
                }
                let chunks = commands
                    .read_chunks(&c.target, Some(stream), c.next[i], PAGE)
                    .await
                    .unwrap_or_default();
                got += chunks.len();
                for chunk in chunks {
                    c.next[i] = chunk.pos.saturating_add(chunk.data.len() as i64);
                    c.pending
                        .push_back(chunk_event(&chunk).id(event_id(c.next)));
                }
            }
            if got > 0 {
                continue;
            }
            if let Some(output) = ended {
                c.finished = true;
                c.ended = true;
                // Read again: the retention may have deleted the output since `ended` was
                // read, and then the chunks above were not there to be read.
                let output = target_ended(commands, &c.target).await.unwrap_or(output);
                let end = serde_json::json!({
                    "status": output.status,
                    "output_bytes": output.output_bytes,
                    "output_truncated_at_bytes": output.output_truncated_at_bytes,
                    "output_deleted_at": deleted_at(&output),
                });
                c.pending
                    .push_back(Event::default().event("end").data(end.to_string()));
                continue;
            }
            let _ = tokio::time::timeout(FOLLOW_POLL, c.state.live.activity.notified()).await;
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// The target's status and output, if it ended.
async fn target_ended(
    commands: &dyn CommandStore,
    target: &str,
) -> Option<crate::store::commands::TargetOutput> {
    commands
        .target_output(target)
        .await
        .ok()
        .flatten()
        .filter(|output| is_final(&output.status))
}

fn chunk_event(chunk: &StoredChunk) -> Event {
    use base64::Engine;
    let (data, encoding) = match std::str::from_utf8(&chunk.data) {
        Ok(text) => (text.to_owned(), "utf8"),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(&chunk.data),
            "base64",
        ),
    };
    Event::default().event(chunk.stream.clone()).data(
        serde_json::json!({ "offset": chunk.pos, "data": data, "encoding": encoding }).to_string(),
    )
}

/// `POST /v1/commands/{id}/cancel`.
pub(crate) async fn cancel(
    Authed(role): Ops,
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response> {
    let cancelled = cancel_as(&state, role, &id).await?;
    Ok(Json(serde_json::json!({ "id": id, "cancelled": cancelled })).into_response())
}

/// Cancels command `id` for `role` (ops for the read-only types, admin for the others):
/// queued targets are skipped and running ones told to stop. Returns how many were running.
pub(crate) async fn cancel_as(state: &Shared, role: Role, id: &str) -> Result<usize> {
    let commands = command_store(state.store.as_ref())?;
    let record = commands.command(id).await?.ok_or(Error::NotFound)?;
    let kind = fleet_core::command::CommandType::parse(&record.command_type)
        .ok_or_else(|| Error::Internal("stored command type unknown".into()))?;
    require(role, kind)?;
    let running = commands
        .cancel_command(id, fleet_core::unix_now())
        .await?
        .ok_or(Error::NotFound)?;
    for dispatch in &running {
        state
            .live
            .cancel(&dispatch.instance_id, &dispatch.target_id)
            .await;
    }
    state.live.activity.notify_waiters();
    tracing::info!(command_id = %id, by = role.as_str(), "command cancelled");
    Ok(running.len())
}

/// Whether `role` may cancel (or submit) a command of the stored type `command_type`: ops
/// for the read-only types, admin for the others.
pub(crate) fn may_operate(role: Role, command_type: &str) -> bool {
    role >= Role::Ops
        && fleet_core::command::CommandType::parse(command_type)
            .is_some_and(|kind| require(role, kind).is_ok())
}

use crate::openapi::Access::{Public, Role as Least, Signed};
use crate::openapi::RouteDoc;

const fn doc(
    method: &'static str,
    path: &'static str,
    access: crate::openapi::Access,
    summary: &'static str,
    responses: &'static [(u16, &'static str)],
) -> RouteDoc {
    RouteDoc {
        method,
        path,
        access,
        summary,
        responses,
    }
}

/// The routes of registration, the live channel and the command API, for `/openapi.json`.
pub(crate) const ROUTES: &[RouteDoc] = &[
    doc(
        "get",
        "/commands",
        Least("support"),
        "Dashboard: the 100 most recent commands with their targets counted by status (HTML).",
        &[(200, "HTML")],
    ),
    doc(
        "get",
        "/commands/{id}",
        Least("support"),
        "Dashboard: one command, each target's status, result and output (HTML, refreshes while running; payload secrets hidden from support).",
        &[(200, "HTML"), (404, "Unknown command")],
    ),
    doc(
        "post",
        "/commands/{id}/cancel",
        Least("ops"),
        "Dashboard form: cancel a running command (admin for the types that change a host).",
        &[
            (303, "Back to the command"),
            (403, "Role too low"),
            (404, "Unknown command"),
        ],
    ),
    doc(
        "get",
        "/.well-known/jwks.json",
        Public,
        "The Ed25519 key (JWKS, OKP) that verifies agent tokens.",
        &[(200, "The key set")],
    ),
    doc(
        "post",
        "/v1/agents/register",
        Signed,
        "Trade a v1 signature (or a one-time enrollment_token, unsigned) for a short-lived EdDSA JWT; with a token the answer also carries the instance's issued secret, once.",
        &[
            (200, "{instance_id, token, expires_at, secret?}"),
            (401, "Signature, replay or token refused"),
            (422, "Invalid body"),
        ],
    ),
    doc(
        "post",
        "/v1/enrollments",
        Least("admin"),
        "Create a one-time enrollment token for an instance.",
        &[
            (201, "{instance_id, enrollment_token, expires_at}"),
            (422, "Invalid body"),
        ],
    ),
    doc(
        "get",
        "/v1/agents/connect",
        Public,
        "WebSocket upgrade for agents (Authorization: Bearer <JWT from /v1/agents/register>; X-Agent-Version, X-Agent-Architecture, X-Agent-Hostname; X-Agent-Capabilities, a comma-separated list of the frames the agent reads beyond the base ones, unknown entries ignored). Frames are JSON {type, id, payload}: commands, cancel, ack and error to the agent, and jobs_waiting ({pipelines: [update|plugin|restore]}: poll those now) only to agents that listed jobs_waiting; result, logs, ack and error from it.",
        &[(101, "Switching protocols"), (401, "No or bad token")],
    ),
    doc(
        "get",
        "/v1/agents/connected",
        Least("support"),
        "How many agents hold a live channel to this process.",
        &[(200, "{connected}")],
    ),
    doc(
        "post",
        "/v1/agents/poll",
        Signed,
        "Fallback when the WebSocket cannot be opened: send queued frames and the ids of running commands (`running`), receive acknowledgements, waiting commands and the running ones to stop (`cancel`). v1 signature only.",
        &[
            (200, "{acked, refused, commands, cancel}"),
            (401, "Signature refused"),
        ],
    ),
    doc(
        "post",
        "/v1/commands/logs",
        Signed,
        "Output chunks over HTTP (agent-svc shape): {instance_id, command_id, chunks: [{offset, stream, data, encoding?}]}, v1-signed; stored once per (command_id, stream, offset). A target stores at most CONTROL_PLANE_COMMAND_OUTPUT_MAX_BYTES of output (stdout and stderr together): a chunk past it is acknowledged but not stored (the part below the cap is), and the target is marked truncated.",
        &[
            (200, "Stored (or already stored)"),
            (401, "Signature refused"),
            (422, "Invalid body or not this instance's command"),
        ],
    ),
    doc(
        "post",
        "/v1/commands/submit",
        Least("ops"),
        "Submit a command to targets or a selector, with max_concurrency and max_errors. RunCommand, UpdateAgent, UpdatePackage, DEPLOY_COMPOSE and STOP_COMPOSE need admin.",
        &[
            (201, "{id, targets: [{target_id, instance_id}]}"),
            (403, "Role too low for the command type"),
            (
                422,
                "Invalid command, no target, or a target the control plane never heard of (no installation, enrollment, own secret or connection)",
            ),
        ],
    ),
    doc(
        "get",
        "/v1/commands",
        Least("support"),
        "The most recent commands, newest first, each with its targets counted by state.",
        &[(200, "items"), (400, "A bad limit")],
    ),
    doc(
        "get",
        "/v1/commands/{id}",
        Least("support"),
        "A command and its per-target status, exit code, error, short log and data, with its output's size (output_bytes, both streams), the cap it was cut at (output_truncated_at_bytes, null when nothing was left out) and when the retention sweep deleted it (output_deleted_at, null while kept).",
        &[(200, "The command"), (404, "Unknown command")],
    ),
    doc(
        "get",
        "/v1/commands/{id}/logs",
        Least("support"),
        "Output of one target: whole as bytes, or followed live as server-sent events. Each output event's id is `<stdout offset>,<stderr offset>` after it; sent back as Last-Event-ID, the stream goes on from there. Output the control plane cut at CONTROL_PLANE_COMMAND_OUTPUT_MAX_BYTES ends with the line `[output truncated at <size> by the control plane (CONTROL_PLANE_COMMAND_OUTPUT_MAX_BYTES)]` (whole), or has `output_truncated_at_bytes` in its `end` event (followed; null when nothing was left out). Output the retention deleted is a 410; output it deleted while it was being read ends with the line `[the output of this target (<size>) was deleted at <time> …]` (whole), or has `output_deleted_at` in its `end` event (followed; null while kept).",
        &[
            (200, "Bytes or text/event-stream"),
            (
                410,
                "The output was deleted by the retention sweep (CONTROL_PLANE_COMMAND_RETENTION_DAYS); the message says when, and the target's result is still in GET /v1/commands/{id}",
            ),
            (
                400,
                "The command has several targets and ?target= names none, a bad query, or a bad Last-Event-ID",
            ),
            (404, "Unknown command or target"),
        ],
    ),
    doc(
        "post",
        "/v1/commands/{id}/cancel",
        Least("ops"),
        "Cancel: queued targets are skipped, running ones killed (admin for non-read-only types).",
        &[(200, "{id, cancelled}"), (404, "Unknown command")],
    ),
];

/// The query parameters of the command routes that read one, for `/openapi.json`
/// (`query_docs::query_parameters`).
pub(crate) fn query_parameters(method: &str, path: &str) -> Vec<serde_json::Value> {
    use crate::query_docs::{limit, one_of, optional};
    use serde_json::json;
    match (method, path) {
        ("get", "/v1/commands") => vec![limit(LIST_DEFAULT)],
        ("get", "/v1/commands/{id}/logs") => vec![
            optional(
                "target",
                "The target whose output to read, by its instance id or target id: needed \
                 when the command has several targets (400 without it); one the command does \
                 not have is a 404",
                json!({ "type": "string" }),
            ),
            optional(
                "stream",
                "stdout (the default) or stderr; followed, both streams when not given",
                one_of([Stream::Stdout, Stream::Stderr].map(Stream::as_str)),
            ),
            optional(
                "follow",
                "true: server-sent events until the target ends (text/event-stream); false, \
                 the default: the output so far as bytes",
                json!({ "type": "boolean", "default": false }),
            ),
        ],
        _ => Vec::new(),
    }
}
