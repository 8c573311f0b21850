//! Dashboard pages for releases, rollouts (with live batch progress), plugins and restores.
//! Server-rendered like the rest of the dashboard; a running rollout's page refreshes itself
//! every few seconds, so it stays live without JavaScript.

use std::fmt::Write;

use axum::Form;
use axum::extract::rejection::FormRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use fleet_core::ValidationErrors;
use serde::Deserialize;

use crate::auth::{Role, Viewer, percent_encode};
use crate::dashboard::{LONG_CELL_CHARS, esc, format_time, layout, long_text};
use crate::rollouts::BatchCounts;
use crate::store::rollouts::{RolloutAction, RolloutDetail};
use crate::{Error, Result, Shared};

/// Links to these pages and the fleet's alerts, shown in the dashboard's header.
pub(crate) const NAV: &str = "<a href=\"/alerts\">Alerts</a><a href=\"/releases\">Releases</a><a href=\"/rollouts\">Rollouts</a>\
<a href=\"/plugins\">Plugins</a><a href=\"/restores\">Restores</a><a href=\"/commands\">Commands</a>";

/// Seconds between refreshes of a running rollout's page.
const REFRESH_SECS: u32 = 3;

/// Rows shown per list.
const LIST: i64 = 100;

fn status_class(status: &str) -> &'static str {
    match status {
        "succeeded" | "completed" | "verified" => "ok",
        "failed" | "rolled_back" | "halted" | "cancelled" | "timed_out" => "bad",
        // A skipped restore verification proved nothing: worth a look.
        "in_progress" | "running" | "pending" | "paused" | "scheduled" | "skipped" => "warn",
        _ => "muted",
    }
}

/// A status, coloured by what it means.
pub(crate) fn status(text: &str) -> String {
    format!("<span class={}>{}</span>", status_class(text), esc(text))
}

fn opt(value: Option<&str>) -> String {
    value.map(esc).unwrap_or_else(|| "–".into())
}

pub(crate) async fn releases(
    Viewer(role): Viewer<0>,
    State(state): State<Shared>,
) -> Result<Response> {
    let items = state.store.list_releases(LIST).await?;
    let mut b = String::from(
        "<h1>Releases</h1><table id=releases><thead><tr><th>#</th><th>Version</th><th>Channel</th>\
         <th>SHA</th><th>Signature</th><th>Stored</th></tr></thead><tbody>",
    );
    for r in &items {
        let manifest: serde_json::Value = serde_json::from_str(&r.manifest).unwrap_or_default();
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            r.id,
            esc(&r.version),
            esc(&r.channel),
            opt(manifest["sha"].as_str()),
            esc(&r.scheme),
            format_time(r.created_at)
        );
    }
    if items.is_empty() {
        b.push_str(
            "<tr><td colspan=6 class=muted>No releases yet (fleetctl release create).</td></tr>",
        );
    }
    b.push_str("</tbody></table>");
    Ok(layout("Releases", Some(role), &b).into_response())
}

pub(crate) async fn rollouts(
    Viewer(role): Viewer<0>,
    State(state): State<Shared>,
) -> Result<Response> {
    let items = state.store.list_rollouts(LIST).await?;
    let mut b = String::from(
        "<h1>Rollouts</h1><table id=rollouts><thead><tr><th>#</th><th>What</th><th>Channel</th>\
         <th>Status</th><th>Batch</th><th>Created</th></tr></thead><tbody>",
    );
    for r in &items {
        let what = match r.kind.as_str() {
            "plugin" => format!("plugin {}", opt(r.plugin_action.as_deref())),
            _ => format!("update to {}", opt(r.version.as_deref())),
        };
        let _ = write!(
            b,
            "<tr><td><a href=\"/rollouts/{id}\">{id}</a></td><td>{what}</td><td>{}</td><td>{}</td>\
             <td>{} / {}</td><td>{}</td></tr>",
            esc(&r.channel),
            status(&r.status),
            (r.current_batch + 1).min(r.batch_count),
            r.batch_count,
            format_time(r.created_at),
            id = r.id,
        );
    }
    if items.is_empty() {
        b.push_str("<tr><td colspan=6 class=muted>No rollouts yet.</td></tr>");
    }
    b.push_str("</tbody></table>");
    Ok(layout("Rollouts", Some(role), &b).into_response())
}

fn bar(c: &BatchCounts) -> String {
    let total = f64::from(c.total.max(1));
    let part = |n: u32, color: &str| {
        if n == 0 {
            String::new()
        } else {
            format!(
                "<span style=\"display:inline-block;height:.8rem;width:{:.1}%;background:{color}\"></span>",
                f64::from(n) * 100.0 / total
            )
        }
    };
    format!(
        "<div style=\"width:14rem;background:#e3e6eb;border-radius:.2rem;overflow:hidden;line-height:0\">{}{}{}{}</div>",
        part(c.succeeded, "#137333"),
        part(c.failed + c.rolled_back, "#b3261e"),
        part(c.in_progress, "#a56300"),
        part(c.pending, "#f2c14e"),
    )
}

fn detail_body(d: &RolloutDetail, role: Role) -> String {
    let r = &d.rollout;
    let mut b = String::new();
    let what = match r.kind.as_str() {
        "plugin" => format!("Plugin rollout ({})", opt(r.plugin_action.as_deref())),
        _ => format!("Rollout of {}", opt(r.version.as_deref())),
    };
    let _ = write!(
        b,
        "<h1>{what} · #{}</h1><p>Channel <b>{}</b> · status <b id=status>{}</b> · batch {} of {} · \
         failure threshold {} · {}</p>",
        r.id,
        esc(&r.channel),
        status(&r.status),
        (r.current_batch + 1).min(r.batch_count),
        r.batch_count,
        esc(&r.failure_threshold),
        if r.auto_advance {
            "auto-advance"
        } else {
            "manual advance"
        }
    );
    if let Some(reason) = &r.halt_reason {
        let _ = write!(b, "<p class=bad id=halt-reason>Halted: {}</p>", esc(reason));
    }
    if let Some(until) = d.observed_until {
        let _ = write!(
            b,
            "<p class=warn id=observing>Watching batch {}'s updated instances against the SLO \
             maxima until {}; the rollout moves on after that unless one breaches them.</p>",
            r.current_batch + 1,
            format_time(until)
        );
    }
    let actions: &[(RolloutAction, Role)] = &[
        (RolloutAction::Advance, Role::Admin),
        (RolloutAction::Pause, Role::Ops),
        (RolloutAction::Resume, Role::Ops),
        (RolloutAction::Cancel, Role::Admin),
    ];
    let mut forms = String::new();
    for (action, needed) in actions {
        if role >= *needed {
            let _ = write!(
                forms,
                "<form method=post action=\"/rollouts/{}/{}\" style=\"display:inline\">\
                 <button>{}</button></form> ",
                r.id,
                action.as_str(),
                action.as_str()
            );
        }
    }
    if matches!(r.status.as_str(), "running" | "paused" | "halted") && !forms.is_empty() {
        let _ = write!(b, "<p>{forms}</p>");
    }
    b.push_str(
        "<section><h2>Batches</h2><table id=batches><thead><tr><th>Batch</th><th>Progress</th>\
         <th>Queued</th><th>Pending</th><th>Running</th><th>Succeeded</th><th>Failed</th>\
         <th>Rolled back</th><th>Cancelled</th></tr></thead><tbody>",
    );
    for c in &d.batches {
        let marker = if c.batch == r.current_batch {
            " ◀"
        } else {
            ""
        };
        let _ = write!(
            b,
            "<tr><td>{}{marker}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            c.batch + 1,
            bar(c),
            c.queued,
            c.pending,
            c.in_progress,
            c.succeeded,
            c.failed,
            c.rolled_back,
            c.cancelled
        );
    }
    b.push_str(
        "</tbody></table></section><section><h2>Jobs</h2><table id=jobs><thead><tr><th>Job</th>\
         <th>Batch</th><th>Instance</th><th>Status</th><th>Step</th><th>Error</th></tr></thead><tbody>",
    );
    for j in &d.jobs {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td><a href=\"/installations/{}\">{}</a></td><td>{}</td><td>{}</td><td>{}</td></tr>",
            j.id,
            j.batch + 1,
            crate::auth::percent_encode(&j.instance_id),
            esc(&j.instance_id),
            status(&j.status),
            opt(j.step.as_deref()),
            opt(j.error.as_deref())
        );
    }
    b.push_str("</tbody></table></section>");
    b
}

pub(crate) async fn rollout(
    Viewer(role): Viewer<0>,
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response> {
    let detail = match id.parse::<i64>() {
        Ok(id) => state.store.rollout(id).await?,
        Err(_) => None,
    };
    let Some(detail) = detail else {
        let body = format!("<h1>Not found</h1><p>No rollout {}.</p>", esc(&id));
        return Ok((
            StatusCode::NOT_FOUND,
            layout("Not found", Some(role), &body),
        )
            .into_response());
    };
    let mut page = layout(
        &format!("Rollout {}", detail.rollout.id),
        Some(role),
        &detail_body(&detail, role),
    )
    .0;
    if matches!(detail.rollout.status.as_str(), "running" | "paused") {
        // Live progress without JavaScript.
        page = page.replacen(
            "<head>",
            &format!("<head><meta http-equiv=refresh content={REFRESH_SECS}>"),
            1,
        );
    }
    Ok(axum::response::Html(page).into_response())
}

/// `POST /rollouts/:id/:action` from the rollout page's buttons.
pub(crate) async fn act(
    Viewer(role): Viewer<1>,
    State(state): State<Shared>,
    Path((id, action)): Path<(String, String)>,
) -> Result<Response> {
    let (action, needed) = match action.as_str() {
        "advance" => (RolloutAction::Advance, Role::Admin),
        "pause" => (RolloutAction::Pause, Role::Ops),
        "resume" => (RolloutAction::Resume, Role::Ops),
        "cancel" => (RolloutAction::Cancel, Role::Admin),
        _ => return Err(Error::NotFound),
    };
    if role < needed {
        return Ok(crate::dashboard::forbidden_page());
    }
    let id_num = crate::rollouts::path_id(&id)?;
    match state
        .store
        .rollout_action(
            id_num,
            action,
            fleet_core::unix_now(),
            state.webhook_configured,
        )
        .await
    {
        Ok(_) => Ok(Redirect::to(&format!("/rollouts/{id_num}")).into_response()),
        Err(Error::Conflict(reason)) => Ok(refused_page(
            role,
            &reason,
            &format!("/rollouts/{id_num}"),
            "Back to the rollout",
        )),
        Err(other) => Err(other),
    }
}

/// The 409 page of a dashboard form the object's state refuses (a rollout that cannot
/// advance, a request already decided): why, and a link back to `back` (a path).
pub(crate) fn refused_page(role: Role, reason: &str, back: &str, back_label: &str) -> Response {
    let body = format!(
        "<h1>Not now</h1><p class=bad>{}</p><p><a href=\"{}\">{}</a></p>",
        esc(reason),
        esc(back),
        esc(back_label)
    );
    (StatusCode::CONFLICT, layout("Not now", Some(role), &body)).into_response()
}

pub(crate) async fn plugins(
    Viewer(role): Viewer<0>,
    State(state): State<Shared>,
) -> Result<Response> {
    let releases = state.store.list_plugin_releases(LIST).await?;
    let requests = state.store.list_plugin_requests(LIST).await?;
    let mut b = String::from(
        "<h1>Plugins</h1><section><h2>Releases</h2><table id=plugin-releases><thead><tr><th>#</th>\
         <th>Name</th><th>Version</th><th>Compatible with</th><th>Approved</th><th>Published</th></tr></thead><tbody>",
    );
    for r in &releases {
        let compatible: Vec<String> = serde_json::from_str(&r.compatible).unwrap_or_default();
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            r.id,
            esc(&r.name),
            esc(&r.version),
            esc(&compatible.join(", ")),
            if r.approved { "yes" } else { "no" },
            format_time(r.created_at)
        );
    }
    b.push_str(
        "</tbody></table></section><section><h2>Requests</h2><table id=plugin-requests><thead><tr>\
         <th>#</th><th>Instance</th><th>Plugin</th><th>Action</th><th>Reason</th><th>Status</th><th>Job</th></tr></thead><tbody>",
    );
    for r in &requests {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{} {}</td><td>{}</td><td>{}</td><td>{}{}</td><td>{}</td></tr>",
            r.id,
            esc(&r.instance_id),
            esc(&r.name),
            esc(&r.version),
            esc(&r.action),
            r.reason
                .as_deref()
                .map(|reason| long_text(reason, LONG_CELL_CHARS))
                .unwrap_or_else(|| "–".into()),
            request_status(r),
            decision_forms(r, role),
            request_job(r),
        );
    }
    b.push_str("</tbody></table></section>");
    Ok(layout("Plugins", Some(role), &b).into_response())
}

/// A plugin request's status as the Status cell shows it: `rejected: why` when the admin
/// said why.
fn request_status(r: &crate::store::rollouts::PluginRequestRecord) -> String {
    match &r.rejection_reason {
        Some(why) => format!("{}: {}", status(&r.status), long_text(why, LONG_CELL_CHARS)),
        None => status(&r.status),
    }
}

/// The Approve and Reject forms shown after a pending request's status, for admins only (the
/// role `POST /api/plugins/requests/{id}/approve` and `…/reject` need); empty otherwise.
fn decision_forms(r: &crate::store::rollouts::PluginRequestRecord, role: Role) -> String {
    if r.status != "pending" || role < Role::Admin {
        return String::new();
    }
    format!(
        " <form method=post action=\"/plugins/requests/{id}/approve\" class=approve style=\"display:inline\">\
         <button>Approve</button></form>\
         <form method=post action=\"/plugins/requests/{id}/reject\" class=reject style=\"display:inline\">\
         <input name=reason maxlength={max} placeholder=\"Reason (optional)\" aria-label=\"Reason\"> \
         <button>Reject</button></form>",
        id = r.id,
        max = crate::plugins::MAX_REJECTION_REASON_CHARS
    )
}

/// `POST /plugins/requests/{id}/approve` (admin): the Plugins page's Approve form. Approves
/// as `POST /api/plugins/requests/{id}/approve` does (the request's job is created and its
/// agent told), then back to the Plugins page; a request that cannot be approved (decided
/// already, no approved or compatible release) gets the 409 page saying why, an unknown id
/// the JSON 404.
pub(crate) async fn approve_request(
    Viewer(role): Viewer<2>,
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response> {
    match crate::plugins::approve_by_id(&state, &id).await {
        Ok(_) => Ok(Redirect::to("/plugins").into_response()),
        Err(Error::Conflict(why)) => {
            Ok(refused_page(role, &why, "/plugins", "Back to the plugins"))
        }
        Err(other) => Err(other),
    }
}

/// The Reject form's fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RejectForm {
    /// Why, shown with the request; blank says nothing.
    #[serde(default)]
    reason: String,
}

/// `POST /plugins/requests/{id}/reject` (admin): the Plugins page's Reject form. Rejects as
/// `POST /api/plugins/requests/{id}/reject` does, then back to the Plugins page; a request
/// already decided gets the 409 page. Like the dashboard's other forms it relies on the
/// session cookie being `SameSite=Strict`, and answers an unknown id or an invalid reason
/// with the JSON error the API gives.
pub(crate) async fn reject_request(
    Viewer(role): Viewer<2>,
    State(state): State<Shared>,
    Path(id): Path<String>,
    form: std::result::Result<Form<RejectForm>, FormRejection>,
) -> Result<Response> {
    let id = crate::rollouts::path_id(&id)?;
    let form = form.map_err(|rejection| {
        let mut errors = ValidationErrors::default();
        errors.push(String::new(), rejection.body_text());
        Error::Invalid(errors)
    })?;
    let reason = crate::plugins::rejection_reason(Some(&form.reason))?;
    match state
        .store
        .reject_plugin_request(id, reason, fleet_core::unix_now())
        .await
    {
        Ok(_) => Ok(Redirect::to("/plugins").into_response()),
        Err(Error::Conflict(why)) => {
            Ok(refused_page(role, &why, "/plugins", "Back to the plugins"))
        }
        Err(other) => Err(other),
    }
}

/// `POST /restores/{id}/cancel` (ops): the Cancel form of an installation's restore
/// verifications. Cancels as `POST /api/restores/{id}/cancel` does, then back to the
/// installation's page; a verification that already ended gets the 409 page, an unknown
/// id the JSON 404.
pub(crate) async fn cancel_restore(
    Viewer(role): Viewer<1>,
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response> {
    match crate::restores::cancel_as(&state, role, &id).await {
        Ok(restore) => Ok(Redirect::to(&format!(
            "/installations/{}",
            percent_encode(&restore.instance_id)
        ))
        .into_response()),
        Err(Error::Conflict(why)) => Ok(refused_page(
            role,
            &why,
            "/restores",
            "Back to the restore verifications",
        )),
        Err(other) => Err(other),
    }
}

/// A plugin request's job as the Job cell shows it: `#12 succeeded`, `#12 failed at update:
/// why`.
fn request_job(r: &crate::store::rollouts::PluginRequestRecord) -> String {
    let Some(id) = r.job_id else {
        return "–".into();
    };
    let mut cell = format!("#{id}");
    if let Some(job) = &r.job_status {
        let _ = write!(cell, " {}", status(job));
        if matches!(job.as_str(), "failed" | "rolled_back")
            && let Some(step) = &r.job_step
        {
            let _ = write!(cell, " at {}", esc(step));
        }
    }
    if let Some(error) = &r.job_error {
        let _ = write!(cell, ": {}", long_text(error, LONG_CELL_CHARS));
    }
    cell
}

pub(crate) async fn restores(
    Viewer(role): Viewer<0>,
    State(state): State<Shared>,
) -> Result<Response> {
    let items = state.store.list_restores(None, LIST).await?;
    let mut b = String::from(
        "<h1>Restore verification</h1><table id=restores><thead><tr><th>#</th><th>Instance</th>\
         <th>Environment</th><th>Backup</th><th>Status</th><th>Detail</th><th>Scheduled</th>\
         <th>Finished</th></tr></thead><tbody>",
    );
    for r in &items {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            r.id,
            esc(&r.instance_id),
            esc(&r.environment),
            opt(r.backup_id.as_deref()),
            status(&r.status),
            crate::restores::failure_detail(r)
                .map(|detail| long_text(&detail, LONG_CELL_CHARS))
                .unwrap_or_else(|| "–".into()),
            format_time(r.created_at),
            r.finished_at.map(format_time).unwrap_or_else(|| "–".into())
        );
    }
    if items.is_empty() {
        b.push_str("<tr><td colspan=8 class=muted>None yet (fleetctl restore schedule).</td></tr>");
    }
    b.push_str("</tbody></table>");
    Ok(layout("Restores", Some(role), &b).into_response())
}
