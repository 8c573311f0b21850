//! The dashboard: server-rendered HTML, readable without JavaScript, no build step.

use std::fmt::Write;

use axum::Form;
use axum::extract::rejection::FormRejection;
use axum::extract::{Path, State};
use axum::http::header::SET_COOKIE;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;
use serde_json::Value;

use crate::api::{ListQuery, alert_id};
use crate::auth::{
    Role, Viewer, clear_login_cookies, has_login_cookie, login_cookie, percent_encode, session_id,
};
use crate::restores::RestoreSummary;
use crate::store::{ArchivedFilter, HeartbeatPoint, InstallationDetail, InstallationSummary};
use crate::throttle::Client;
use crate::{Error, Result, Shared};

/// Rows of a paged list when its query names no limit.
pub(crate) const PAGE_SIZE: i64 = 50;

/// Characters of a long text cell shown before it is opened ([`long_text`]).
pub(crate) const LONG_CELL_CHARS: usize = 200;

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}\
header{background:#1d2330;color:#fff;padding:.6rem 1.2rem;display:flex;gap:1rem;align-items:center}\
header a{color:#fff;text-decoration:none;font-weight:600}header form{margin-left:auto}\
main{padding:1rem 1.2rem;max-width:75rem}table{border-collapse:collapse;width:100%;background:#fff}\
th,td{text-align:left;padding:.35rem .6rem;border-bottom:1px solid #e3e6eb;font-size:.92rem;overflow-wrap:anywhere}\
th{background:#eef0f4}.ok{color:#137333}.bad{color:#b3261e;font-weight:600}.warn{color:#a56300}\
.muted{color:#6b7280}section{margin:1.2rem 0}h1{font-size:1.4rem}h2{font-size:1.1rem}\
.filters{display:flex;gap:.5rem;margin:.8rem 0}.tag{font-size:.75rem;border:1px solid #b3261e;color:#b3261e;padding:0 .3rem;border-radius:.3rem}\
pre{background:#fff;padding:.6rem;overflow:auto;font-size:.8rem}";

/// Escapes text for HTML element content and attribute values.
pub(crate) fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn opt(value: &Option<String>) -> String {
    value.as_deref().map(esc).unwrap_or_else(|| "–".into())
}

/// Text for a table cell, escaped: up to `max` characters as they are; longer text shows its
/// start and opens to the whole, so a long value (a 5,000-character reason) cannot stretch
/// its table past the screen.
pub(crate) fn long_text(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return esc(text);
    }
    format!(
        "<details><summary>{}</summary>{}</details>",
        esc(&crate::restores::clip(text, max)),
        esc(text)
    )
}

/// `2026-11-22 07:50:57 UTC` from unix seconds (proleptic Gregorian, no time-zone data).
pub(crate) fn format_time(secs: i64) -> String {
    format!("{} UTC", fleet_core::clock::human_utc(secs))
}

/// How long ago `secs` was, with the time itself on hover; "never" for none.
pub(crate) fn ago(secs: Option<i64>, now: i64) -> String {
    let Some(at) = secs else {
        return "never".into();
    };
    let d = (now - at).max(0);
    let rel = match d {
        0..60 => format!("{d} s ago"),
        60..3600 => format!("{} min ago", d / 60),
        3600..86_400 => format!("{} h ago", d / 3600),
        _ => format!("{} d ago", d / 86_400),
    };
    format!("<span title=\"{}\">{rel}</span>", format_time(at))
}

pub(crate) fn layout(title: &str, role: Option<Role>, body: &str) -> Html<String> {
    let session = match role {
        Some(role) => format!(
            "<span class=muted>{}</span><form method=post action=/logout><button>Log out</button></form>",
            role.as_str()
        ),
        None => String::new(),
    };
    let nav = if role.is_some() {
        crate::rollout_pages::NAV
    } else {
        ""
    };
    Html(format!(
        "<!doctype html><html lang=en><head><meta charset=utf-8>\
         <meta name=viewport content=\"width=device-width,initial-scale=1\">\
         <title>{} · fleet</title><style>{STYLE}</style></head><body>\
         <header><a href=\"/\">fleet</a>{nav}{session}</header><main>{body}</main></body></html>",
        esc(title)
    ))
}

fn health_cell(s: &InstallationSummary) -> String {
    if s.offline {
        return "<span class=bad>offline</span>".into();
    }
    match s.health.as_deref() {
        Some(h @ ("ok" | "healthy")) => format!("<span class=ok>{}</span>", esc(h)),
        Some(h) => format!("<span class=warn>{}</span>", esc(h)),
        None => "<span class=muted>unknown</span>".into(),
    }
}

/// A link to an installation's page.
pub(crate) fn install_link(instance_id: &str) -> String {
    format!(
        "<a href=\"/installations/{}\">{}</a>",
        percent_encode(instance_id),
        esc(instance_id)
    )
}

pub(crate) async fn index(
    Viewer(role): Viewer<0>,
    State(state): State<Shared>,
    uri: Uri,
) -> Response {
    // A bad query string (`?offset=-1`, `?limit=abc`) is a page that says what is wrong,
    // with the header to get back, not a JSON body in the browser.
    index_page(role, &state, &uri)
        .await
        .unwrap_or_else(|err| page_for_error(Some(role), err))
}

async fn index_page(role: Role, state: &Shared, uri: &Uri) -> Result<Response> {
    let query = ListQuery::from_uri(uri)?;
    let filter = query.filter(PAGE_SIZE)?;
    let page = state.store.list_installations(&filter).await?;
    let now = fleet_core::unix_now();
    let mut body = String::new();
    let field = |v: &Option<String>| esc(v.as_deref().unwrap_or(""));
    let _ = write!(
        body,
        "<h1>Installations <span class=muted>({})</span></h1>\
         <form class=filters method=get action=/>\
         <input name=q placeholder=\"instance, domain, client\" value=\"{}\">\
         <input name=channel placeholder=channel value=\"{}\">\
         <input name=health placeholder=\"health or offline\" value=\"{}\">\
         <select name=archived aria-label=Archived>{}</select>\
         <button>Filter</button></form>",
        page.total,
        field(&query.q),
        field(&query.channel),
        field(&query.health),
        archived_options(filter.archived),
    );
    body.push_str(
        "<table id=installations><thead><tr><th>Instance</th><th>Client</th><th>Health</th>\
         <th>Version</th><th>Channel</th><th>Last seen</th><th>Open alerts</th></tr></thead><tbody>",
    );
    for s in &page.items {
        let v0 = if s.scheme.as_deref() == Some("v0") {
            " <span class=tag title=\"still signs with the v0 scheme\">v0</span>"
        } else {
            ""
        };
        let archived = if s.archived_at.is_some() {
            " <span class=tag title=\"archived: hidden from the list by default\">archived</span>"
        } else {
            ""
        };
        let alerts = if s.open_alerts > 0 {
            format!("<span class=bad>{}</span>", s.open_alerts)
        } else {
            "0".into()
        };
        let _ = write!(
            body,
            "<tr><td>{}{v0}{archived}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{alerts}</td></tr>",
            install_link(&s.instance_id),
            opt(&s.client),
            health_cell(s),
            opt(&s.version),
            opt(&s.release_channel),
            ago(s.last_seen_at, now),
        );
    }
    let filtered = filter.channel.is_some()
        || filter.health.is_some()
        || filter.text.is_some()
        || filter.archived != ArchivedFilter::default();
    let mut kept = String::new();
    // The page size the viewer chose stays, or "next" would move by another one.
    if filter.limit != PAGE_SIZE {
        let _ = write!(kept, "&limit={}", filter.limit);
    }
    if filter.archived != ArchivedFilter::default() {
        let _ = write!(kept, "&archived={}", filter.archived.as_str());
    }
    for (k, v) in [
        ("q", &filter.text),
        ("channel", &filter.channel),
        ("health", &filter.health),
    ] {
        if let Some(v) = v {
            let _ = write!(kept, "&{k}={}", percent_encode(v));
        }
    }
    let href = |offset: i64| format!("/?offset={offset}{kept}");
    if page.items.is_empty() {
        let why = if page.total > 0 {
            past_the_end(page.total, "installations", &href(0))
        } else if filtered {
            "No installation matches these filters. <a href=\"/\">Show all</a>".to_owned()
        } else {
            "No active installation: none has sent a heartbeat or been enrolled yet, or every \
             one is archived. <a href=\"/?archived=true\">Show the archived ones</a>"
                .to_owned()
        };
        let _ = write!(body, "<tr><td colspan=7 class=muted>{why}</td></tr>");
    }
    body.push_str("</tbody></table>");
    body.push_str(&pages_line(
        filter.offset,
        filter.limit,
        page.items.len(),
        page.total,
        href,
    ));
    Ok(layout("Installations", Some(role), &body).into_response())
}

/// The options of the list's Archived select, `current` selected.
fn archived_options(current: ArchivedFilter) -> String {
    ArchivedFilter::ALL
        .iter()
        .map(|&a| {
            let label = match a {
                ArchivedFilter::Hidden => "Active",
                ArchivedFilter::Only => "Archived",
                ArchivedFilter::All => "Active and archived",
            };
            let selected = if a == current { " selected" } else { "" };
            format!("<option value={}{selected}>{label}</option>", a.as_str())
        })
        .collect()
}

/// What an empty page past the last says (an old link, a hand-typed offset), leading back
/// to `first` (the first page's address).
pub(crate) fn past_the_end(total: i64, what: &str, first: &str) -> String {
    format!(
        "This page is past the last of the {total} matching {what}. <a href=\"{first}\">First page</a>"
    )
}

/// The line under a page of `limit` rows from `offset` that shows `shown` of `total`: which
/// rows, and links to the previous and next pages (`href` gives a page's address from its
/// offset). Empty for an empty page.
pub(crate) fn pages_line(
    offset: i64,
    limit: i64,
    shown: usize,
    total: i64,
    href: impl Fn(i64) -> String,
) -> String {
    if shown == 0 {
        return String::new();
    }
    // Offsets come from the query string: saturating, so a huge one cannot overflow.
    let mut line = format!(
        "<p id=pages><span class=muted>{}–{} of {total}</span>",
        offset.saturating_add(1),
        offset.saturating_add(shown as i64),
    );
    if offset > 0 {
        let previous = offset.saturating_sub(limit).max(0);
        let _ = write!(line, " <a href=\"{}\">← previous</a>", href(previous));
    }
    let end = offset.saturating_add(limit);
    if end < total {
        let _ = write!(line, " <a href=\"{}\">next →</a>", href(end));
    }
    line.push_str("</p>");
    line
}

pub(crate) async fn installation(
    Viewer(role): Viewer<0>,
    State(state): State<Shared>,
    Path(instance_id): Path<String>,
) -> Response {
    let detail = match state.store.installation(&instance_id).await {
        Ok(Some(detail)) => detail,
        Ok(None) => {
            return missing(
                Some(role),
                &format!("No installation {}.", esc(&instance_id)),
            );
        }
        Err(err) => return page_for_error(Some(role), err),
    };
    let restores = match crate::restores::recent(&state, &detail.summary.instance_id).await {
        Ok(restores) => restores,
        Err(err) => return page_for_error(Some(role), err),
    };
    let now = fleet_core::unix_now();
    let forwarding = state.webhook_configured;
    let body = detail_body(&detail, &restores, role, forwarding, now);
    layout(&detail.summary.instance_id, Some(role), &body).into_response()
}

/// The installation's newest restore verifications, with why those that did not verify, and
/// a Cancel form on those still open for the roles that may cancel them (ops and admin).
fn restores_section(restores: &[RestoreSummary], role: Role, now: i64) -> String {
    let mut b = String::from(
        "<section><h2>Restore verifications</h2><table id=restores><thead><tr><th>Scheduled</th>\
         <th>Environment</th><th>Backup</th><th>Status</th><th>Finished</th><th>Reason</th>\
         </tr></thead><tbody>",
    );
    for r in restores {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}{}</td><td>{}</td><td>{}</td></tr>",
            ago(Some(r.created_at), now),
            esc(&r.environment),
            opt(&r.backup_id),
            crate::rollout_pages::status(&r.status),
            restore_cancel_form(r, role),
            r.finished_at
                .map(|at| ago(Some(at), now))
                .unwrap_or_else(|| "–".into()),
            r.reason
                .as_deref()
                .map(|reason| long_text(reason, LONG_CELL_CHARS))
                .unwrap_or_else(|| "–".into()),
        );
    }
    if restores.is_empty() {
        b.push_str("<tr><td colspan=6 class=muted>None yet.</td></tr>");
    }
    b.push_str("</tbody></table><p class=muted><a href=\"/restores\">All restore verifications</a></p></section>");
    b
}

/// The Cancel form of a verification no agent has reported on yet (`scheduled`, or
/// `in_progress` once handed out), for ops and admin; empty otherwise.
fn restore_cancel_form(r: &RestoreSummary, role: Role) -> String {
    if role < Role::Ops || !matches!(r.status.as_str(), "scheduled" | "in_progress") {
        return String::new();
    }
    format!(
        " <form method=post action=\"/restores/{}/cancel\" class=cancel-restore style=\"display:inline\">\
         <button>Cancel</button></form>",
        r.id
    )
}

/// An archived installation's notice (since when, and that a heartbeat brings it back), or
/// for admins the Archive form of an active one; empty otherwise.
fn archive_section(s: &InstallationSummary, role: Role, now: i64) -> String {
    if let Some(at) = s.archived_at {
        return format!(
            "<p id=archived class=warn>Archived since {} ({}): hidden from the installation \
             list, skipped by the offline check, rollouts and restore scheduling. Its next \
             heartbeat makes it active again.</p>",
            format_time(at),
            ago(Some(at), now)
        );
    }
    if role < Role::Admin {
        return String::new();
    }
    format!(
        "<form method=post action=\"/installations/{}/archive\" class=archive>\
         <button>Archive</button> <span class=muted>For a customer who left: hides it from the \
         list, resolves its open alerts, cancels its rollout jobs not handed out yet and its \
         scheduled restore verifications. Nothing is deleted; a heartbeat brings it back.</span>\
         </form>",
        percent_encode(&s.instance_id)
    )
}

/// `POST /installations/{instance_id}/archive` (admin): the installation page's Archive
/// form. Archives as `POST /api/installations/{instance_id}/archive` does, then back to the
/// installation's page; one archived already gets the 409 page, an unknown instance the
/// JSON 404.
pub(crate) async fn archive(
    Viewer(role): Viewer<2>,
    State(state): State<Shared>,
    Path(instance_id): Path<String>,
) -> Result<Response> {
    let back = format!("/installations/{}", percent_encode(&instance_id));
    match crate::api::archive_by_id(&state, &instance_id).await {
        Ok(_) => Ok(Redirect::to(&back).into_response()),
        Err(Error::Conflict(why)) => Ok(crate::rollout_pages::refused_page(
            role,
            &why,
            &back,
            "Back to the installation",
        )),
        Err(other) => Err(other),
    }
}

fn detail_body(
    d: &InstallationDetail,
    restores: &[RestoreSummary],
    role: Role,
    forwarding: bool,
    now: i64,
) -> String {
    let s = &d.summary;
    let mut b = String::new();
    let _ = write!(
        b,
        "<h1 id=instance>{}</h1><table><tbody>\
         <tr><th>Health</th><td>{}</td><th>Version</th><td>{}</td></tr>\
         <tr><th>Domain</th><td>{}</td><th>Channel</th><td>{}</td></tr>\
         <tr><th>Client</th><td>{}</td><th>Signature</th><td>{}</td></tr>\
         <tr><th>Last seen</th><td>{}</td><th>First seen</th><td>{}</td></tr></tbody></table>",
        esc(&s.instance_id),
        health_cell(s),
        opt(&s.version),
        opt(&s.domain),
        opt(&s.release_channel),
        opt(&s.client),
        match s.scheme.as_deref() {
            Some("v0") => "<span class=tag>v0 (legacy: no replay protection)</span>".to_owned(),
            other => esc(other.unwrap_or("–")),
        },
        ago(s.last_seen_at, now),
        ago(s.first_seen_at, now),
    );
    b.push_str(&archive_section(s, role, now));
    b.push_str(&checks_section(&d.state));
    b.push_str("<section><h2>Recent figures</h2>");
    b.push_str(&chart(&d.recent));
    b.push_str("</section>");
    b.push_str(&crate::alert_pages::installation_alerts(
        &d.alerts, role, forwarding, now,
    ));
    b.push_str("<section><h2>Job failures</h2><table><thead><tr><th>When</th><th>Queue</th><th>Message</th></tr></thead><tbody>");
    for f in &d.job_failures {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            ago(Some(f.created_at), now),
            opt(&f.queue),
            esc(&f.message)
        );
    }
    if d.job_failures.is_empty() {
        b.push_str("<tr><td colspan=3 class=muted>None.</td></tr>");
    }
    b.push_str("</tbody></table></section><section><h2>Backups</h2><table><thead><tr><th>Backup at</th><th>Id</th><th>Size</th><th>Status</th><th>Checksum</th></tr></thead><tbody>");
    for k in &d.backups {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            opt(&k.backup_at),
            opt(&k.backup_id),
            k.size_bytes
                .map(|v| format!(
                    "<span title=\"{v} bytes\">{}</span>",
                    fleet_core::byte_size(v)
                ))
                .unwrap_or_else(|| "–".into()),
            opt(&k.status),
            esc(&k.checksum)
        );
    }
    if d.backups.is_empty() {
        b.push_str("<tr><td colspan=5 class=muted>None recorded.</td></tr>");
    }
    b.push_str("</tbody></table></section>");
    b.push_str(&restores_section(restores, role, now));
    let raw = serde_json::to_string_pretty(&d.state).unwrap_or_default();
    let _ = write!(
        b,
        "<details><summary>Latest heartbeat</summary><pre>{}</pre></details>",
        esc(&raw)
    );
    b
}

fn checks_section(state: &Value) -> String {
    let mut rows = String::new();
    let checks = state.get("checks").and_then(Value::as_array);
    let detailed = |name: &str| {
        checks
            .into_iter()
            .flatten()
            .any(|c| c.get("name").and_then(Value::as_str) == Some(name))
    };
    // Built-in checks the agent was told to leave out (`AGENT_SKIP_CHECKS`): their flag
    // reads as fine, but nothing was checked.
    let skipped = |name: &str| {
        state
            .get("checks_skipped")
            .and_then(Value::as_array)
            .is_some_and(|names| names.iter().any(|n| n.as_str() == Some(name)))
    };
    // The ERP's flags, unless a detailed check of the same name says more.
    for name in ["db", "redis", "storage", "search"] {
        if skipped(name) && !detailed(name) {
            let _ = write!(
                rows,
                "<tr><td>{name}</td><td class=muted>skipped</td><td></td>\
                 <td>not checked on this node (AGENT_SKIP_CHECKS)</td></tr>"
            );
        } else if let Some(ok) = state.get(format!("{name}_ok")).and_then(Value::as_bool)
            && !detailed(name)
        {
            let _ = write!(
                rows,
                "<tr><td>{name}</td>{}<td></td><td></td></tr>",
                ok_cell(ok)
            );
        }
    }
    for check in checks.into_iter().flatten() {
        let name = check.get("name").and_then(Value::as_str).unwrap_or("?");
        let ok = check.get("ok").and_then(Value::as_bool).unwrap_or(false);
        let latency = check
            .get("latency_ms")
            .and_then(Value::as_f64)
            .map(|v| format!("{v:.0} ms"))
            .unwrap_or_default();
        let error = check.get("error").and_then(Value::as_str).unwrap_or("");
        let _ = write!(
            rows,
            "<tr><td>{}</td>{}<td>{latency}</td><td>{}</td></tr>",
            esc(name),
            ok_cell(ok),
            esc(error)
        );
    }
    format!(
        "<section><h2>Checks</h2><table id=checks><thead><tr><th>Check</th><th>Result</th><th>Latency</th><th>Error</th></tr></thead><tbody>{rows}</tbody></table></section>"
    )
}

fn ok_cell(ok: bool) -> &'static str {
    if ok {
        "<td class=ok>ok</td>"
    } else {
        "<td class=bad>failing</td>"
    }
}

/// A small SVG line chart of CPU and memory use (percent) over the recent heartbeats.
fn chart(points: &[HeartbeatPoint]) -> String {
    let series = |f: &dyn Fn(&HeartbeatPoint) -> Option<f64>| -> Vec<(usize, f64)> {
        points
            .iter()
            .enumerate()
            .filter_map(|(i, p)| f(p).map(|v| (i, v.clamp(0.0, 100.0))))
            .collect()
    };
    let num = |p: &HeartbeatPoint, k: &str| p.figures.get(k).and_then(Value::as_f64);
    let cpu = series(&|p| num(p, "cpu_usage_pct"));
    let mem = series(&|p| {
        let total = num(p, "memory_total_bytes").filter(|t| *t > 0.0)?;
        Some(num(p, "memory_used_bytes")? * 100.0 / total)
    });
    if cpu.is_empty() && mem.is_empty() {
        return "<p class=muted>No CPU or memory figures reported yet.</p>".into();
    }
    let (w, h) = (600.0, 120.0);
    let step = w / (points.len().max(2) - 1) as f64;
    let line = |data: &[(usize, f64)], color: &str| {
        let pts: Vec<String> = data
            .iter()
            .map(|(i, v)| format!("{:.1},{:.1}", *i as f64 * step, h - v * h / 100.0))
            .collect();
        format!(
            "<polyline fill=none stroke=\"{color}\" stroke-width=2 points=\"{}\"/>",
            pts.join(" ")
        )
    };
    let last = |data: &[(usize, f64)]| {
        data.last()
            .map(|(_, v)| format!("{v:.0}%"))
            .unwrap_or_else(|| "–".into())
    };
    // The scale: both series are percentages, so the lines at 0, 50 and 100% say what a
    // height means.
    let scale: String = [100.0, 50.0, 0.0]
        .iter()
        .map(|pct: &f64| {
            let y = h - pct * h / 100.0;
            let label_y = y.clamp(10.0, h - 2.0);
            format!(
                "<line x1=0 x2={w} y1={y:.1} y2={y:.1} stroke=\"#eef0f3\"/>\
                 <text x=4 y={label_y:.1} font-size=10 fill=\"#6b7280\">{pct:.0}%</text>"
            )
        })
        .collect();
    format!(
        "<svg id=chart role=img aria-label=\"CPU and memory use, 0 to 100%\" viewBox=\"0 0 {w} {h}\" width=600 height=120 style=\"background:#fff;border:1px solid #e3e6eb\">{scale}{}{}</svg>\
         <p class=muted><span style=color:#2563eb>■</span> CPU {} · <span style=color:#d97706>■</span> memory {} · last {} heartbeats</p>",
        line(&cpu, "#2563eb"),
        line(&mem, "#d97706"),
        last(&cpu),
        last(&mem),
        points.len()
    )
}

pub(crate) async fn acknowledge(
    Viewer(role): Viewer<1>,
    State(state): State<Shared>,
    Path(id): Path<String>,
    uri: Uri,
) -> Response {
    // Checked first: a form with a bad address acknowledges nothing.
    let back = match crate::alert_pages::back_address(&uri) {
        Ok(back) => back,
        Err(err) => return err.into_response(),
    };
    let acknowledged = match alert_id(&id) {
        Ok(id) => {
            state
                .store
                .acknowledge_alert(id, role.as_str(), fleet_core::unix_now())
                .await
        }
        Err(err) => Err(err),
    };
    match acknowledged {
        Ok(Some(alert)) => {
            Redirect::to(&back.unwrap_or_else(|| {
                format!("/installations/{}", percent_encode(&alert.instance_id))
            }))
            .into_response()
        }
        // A form, like the other dashboard forms: an unknown id is the JSON error that
        // /openapi.json documents for it (pages, not forms, answer one with a page).
        Ok(None) | Err(Error::NotFound) => Error::NotFound.into_response(),
        Err(err) => page_for_error(Some(role), err),
    }
}

fn login_form(message: &str) -> String {
    format!(
        "<h1>Log in</h1>{message}<form method=post action=/login>\
         <label>Role token <input type=password name=token id=token autocomplete=current-password required></label> \
         <button id=login>Log in</button></form>\
         <p class=muted>Use the support, ops or admin token of this control plane.</p>"
    )
}

pub(crate) async fn login_page(State(state): State<Shared>, parts: Parts) -> Response {
    // The page shows who is logged in, so it checks the cookie under the same limit as
    // every other route: otherwise it would answer unlimited guesses.
    match crate::auth::caller_of(&state, &parts).await {
        Ok(None) if has_login_cookie(&parts.headers) => {
            // The cookie no longer proves a role (the session expired or was logged out, its
            // role's token was rotated, or it holds a role token from before sessions): say
            // why the session ended, and drop the cookie. Kept, the browser would send it
            // with every page it opens, each a failed check, until the limit on them kept
            // its user from logging in again.
            let message = "<p class=warn>Your session has ended: it expired, was logged \
                           out, or its role's token changed. Log in again.</p>";
            let mut page = layout("Log in", None, &login_form(message)).into_response();
            clear_login_cookies(&mut page, state.settings.secure_cookies);
            page
        }
        Ok(role) => layout("Log in", role, &login_form("")).into_response(),
        Err(err) => error_page(err),
    }
}

#[derive(Deserialize)]
pub(crate) struct LoginForm {
    token: String,
}

pub(crate) async fn login(
    State(state): State<Shared>,
    Client(client): Client,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Response {
    // A malformed form is just a failed login, answered with the same page.
    let token = form.map(|f| f.0.token).unwrap_or_default();
    let token = token.trim();
    let checked = crate::auth::attempt(&state, client, async { Ok(state.tokens.role_of(token)) });
    let role = match checked.await {
        Ok(role) => role,
        Err(err) => return error_page(err),
    };
    match role {
        Some(role) => {
            // The session this browser had, if any, is replaced: end it rather than leave
            // it valid until it expires.
            if let Some(previous) = session_id(&headers)
                && let Err(err) = crate::sessions::end(&state, &previous).await
            {
                return error_page(err);
            }
            let now = fleet_core::unix_now();
            let id = match crate::sessions::start(&state, role, token, now).await {
                Ok(id) => id,
                Err(err) => return error_page(err),
            };
            let mut response = Redirect::to("/").into_response();
            if let Ok(value) = login_cookie(&id, state.settings.secure_cookies).parse() {
                response.headers_mut().append(SET_COOKIE, value);
            }
            response
        }
        None => {
            let body = login_form("<p class=bad>That token is not valid.</p>");
            (StatusCode::UNAUTHORIZED, layout("Log in", None, &body)).into_response()
        }
    }
}

/// Ends the browser's session on the server, so its id no longer logs anyone in even where
/// it was copied, and drops the cookie. Needs no valid session: logging out twice is fine.
pub(crate) async fn logout(State(state): State<Shared>, headers: HeaderMap) -> Response {
    let ended = match session_id(&headers) {
        Some(id) => crate::sessions::end(&state, &id).await,
        None => Ok(()),
    };
    // The cookie goes either way; a session that could not be ended is said, since it
    // stays valid until it expires.
    let mut response = match ended {
        Ok(()) => Redirect::to("/login").into_response(),
        Err(err) => error_page(err),
    };
    clear_login_cookies(&mut response, state.settings.secure_cookies);
    response
}

/// An error as a dashboard page: its status, its message, and `Retry-After` when it has one.
pub(crate) fn error_page(err: Error) -> Response {
    page_for_error(None, err)
}

/// [`error_page`] for a logged-in viewer (the header keeps its links and Log out). A server
/// error is logged with its detail and shown only as "internal error", as in the JSON
/// answer: a page must not show SQL either.
pub(crate) fn page_for_error(role: Option<Role>, err: Error) -> Response {
    let status = err.status();
    let message = err.client_message();
    let title = status.canonical_reason().unwrap_or("Error");
    let back = if role.is_some() {
        "<p><a href=\"/\">Back to the installations</a></p>"
    } else {
        ""
    };
    let body = format!("<h1>{title}</h1><p>{}</p>{back}", esc(&message));
    let mut page = (status, layout(title, role, &body)).into_response();
    err.add_headers(&mut page);
    page
}

/// The dashboard's page for a path that names nothing.
pub(crate) fn not_found_page() -> Response {
    missing(None, "Nothing is at this address.")
}

/// A 404 page saying what was not found (`what` is HTML, escaped by the caller).
fn missing(role: Option<Role>, what: &str) -> Response {
    let body = format!(
        "<h1>Not found</h1><p>{what}</p><p><a href=\"/\">Back to the installations</a></p>"
    );
    (StatusCode::NOT_FOUND, layout("Not found", role, &body)).into_response()
}

/// The page a logged-in viewer sees for a route above their role.
pub(crate) fn forbidden_page() -> Response {
    let body = "<h1>Forbidden</h1><p>Your role cannot do this.</p>";
    (StatusCode::FORBIDDEN, layout("Forbidden", None, body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skipped_built_in_check_reads_as_skipped_not_ok() {
        let state = serde_json::json!({"db_ok": true, "redis_ok": false, "storage_ok": true,
            "checks_skipped": ["db"], "checks": [{"name": "storage", "ok": false, "error": "full"}]});
        let html = checks_section(&state);
        assert!(
            html.contains("<tr><td>db</td><td class=muted>skipped</td><td></td><td>not checked on this node (AGENT_SKIP_CHECKS)</td></tr>"),
            "{html}"
        );
        assert!(html.contains("<tr><td>redis</td><td class=bad>"), "{html}");
        // A detailed check of the name says more than either.
        assert_eq!(html.matches("<td>storage</td>").count(), 1, "{html}");
    }

    #[test]
    fn times_and_escaping() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_time(1_614_265_330), "2021-02-25 15:02:10 UTC");
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    fn point(cpu: f64, used: u64, total: u64) -> HeartbeatPoint {
        let figures = serde_json::json!({
            "cpu_usage_pct": cpu,
            "memory_used_bytes": used,
            "memory_total_bytes": total,
        });
        HeartbeatPoint {
            received_at: 0,
            collected_at: 0,
            figures: figures.as_object().expect("object").clone(),
        }
    }

    #[test]
    fn the_chart_draws_percentages_against_a_labelled_scale() {
        let svg = chart(&[point(0.0, 50, 100), point(100.0, 25, 100)]);
        // 120 px high: 0% at the bottom, 100% at the top; 600 px wide over two points.
        assert!(svg.contains("points=\"0.0,120.0 600.0,0.0\""), "{svg}");
        assert!(svg.contains("points=\"0.0,60.0 600.0,90.0\""), "{svg}");
        for label in [">100%</text>", ">50%</text>", ">0%</text>"] {
            assert!(svg.contains(label), "{label} in {svg}");
        }
        assert!(
            svg.contains("CPU 100%") && svg.contains("memory 25%"),
            "{svg}"
        );
        // Nothing to draw: a sentence instead of an empty frame.
        let empty = HeartbeatPoint {
            received_at: 0,
            collected_at: 0,
            figures: serde_json::Map::new(),
        };
        assert!(chart(&[empty]).contains("No CPU or memory figures"));
    }
}
