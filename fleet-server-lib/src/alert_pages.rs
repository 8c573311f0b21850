//! The dashboard's view of alerts: `/alerts`, the fleet's alerts with the filters of
//! `GET /api/alerts` as a plain form, each with its installation, its state (and the
//! Acknowledge button for ops and admin) and its webhook delivery, headed by how many
//! deliveries were given up; and the alert table of an installation's page.

use std::fmt::Write;

use axum::extract::{Query, State};
use axum::http::Uri;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::{ALERT_LEVELS, AlertListQuery, MAX_FILTER_LEN, MAX_KIND_LEN};
use crate::auth::{Role, Viewer, percent_encode};
use crate::dashboard::{
    LONG_CELL_CHARS, PAGE_SIZE, ago, esc, format_time, install_link, layout, long_text,
    page_for_error, pages_line, past_the_end,
};
use crate::store::{Alert, AlertDelivery, AlertFilter, AlertState, DeliveryFilter, DeliveryState};
use crate::{Error, Result, Shared};

/// `GET /alerts`.
pub(crate) async fn alerts(
    Viewer(role): Viewer<0>,
    State(state): State<Shared>,
    uri: Uri,
) -> Response {
    // A bad query string is a page that says what is wrong, as on the installation list.
    alerts_page(role, &state, &uri)
        .await
        .unwrap_or_else(|err| page_for_error(Some(role), err))
}

/// The page of deliveries given up, whatever the alerts' state.
fn given_up() -> AlertFilter {
    AlertFilter {
        state: AlertState::All,
        delivery: Some(DeliveryFilter::Is(DeliveryState::GivenUp)),
        limit: PAGE_SIZE,
        ..AlertFilter::default()
    }
}

async fn alerts_page(role: Role, state: &Shared, uri: &Uri) -> Result<Response> {
    let forwarding = state.webhook_configured;
    let filter = AlertListQuery::from_uri(uri)?.filter(PAGE_SIZE, forwarding)?;
    let page = state.store.alert_page(&filter).await?;
    let now = fleet_core::unix_now();
    let kept = list_query(&filter);
    let mut body = format!("<h1>Alerts <span class=muted>({})</span></h1>", page.total);
    if forwarding {
        let count = AlertFilter {
            limit: 0,
            ..given_up()
        };
        body.push_str(&given_up_line(state.store.alert_page(&count).await?.total));
    } else {
        body.push_str(
            "<p class=muted>Alerts are not forwarded: no webhook is configured \
             (CONTROL_PLANE_ALERT_WEBHOOK_URL).</p>",
        );
    }
    body.push_str(&filter_form(&filter, forwarding));
    let href = |offset: i64| format!("/alerts?offset={offset}{kept}");
    let filtered = filter.state != AlertState::Open
        || filter.level.is_some()
        || filter.kind.is_some()
        || filter.instance_id.is_some()
        || filter.delivery.is_some();
    let empty = if page.total > 0 {
        past_the_end(page.total, "alerts", &href(0))
    } else if filtered {
        "No alert matches these filters. <a href=\"/alerts?state=all\">Show all</a>".to_owned()
    } else {
        "No alert is open.".to_owned()
    };
    let table = AlertTable {
        role,
        forwarding,
        now,
        back: &href(filter.offset),
        empty: &empty,
    };
    body.push_str(&table.render(&page.items));
    body.push_str(&pages_line(
        filter.offset,
        filter.limit,
        page.items.len(),
        page.total,
        href,
    ));
    Ok(layout("Alerts", Some(role), &body).into_response())
}

/// The filters of `filter` as a query string's tail (`&state=all&level=error`), without the
/// offset: what the paging links and the Acknowledge forms keep. The defaults are left out.
fn list_query(filter: &AlertFilter) -> String {
    let mut query = String::new();
    if filter.limit != PAGE_SIZE {
        let _ = write!(query, "&limit={}", filter.limit);
    }
    if filter.state != AlertState::Open {
        let _ = write!(query, "&state={}", filter.state.as_str());
    }
    for (name, value) in [
        ("level", filter.level.as_deref()),
        ("kind", filter.kind.as_deref()),
        ("installation", filter.instance_id.as_deref()),
        ("delivery", filter.delivery.map(DeliveryFilter::as_str)),
    ] {
        if let Some(value) = value {
            let _ = write!(query, "&{name}={}", percent_encode(value));
        }
    }
    query
}

/// How many deliveries were given up, linking to them: a receiver that refused alerts for
/// good shows here, not only in a metric and a log line.
fn given_up_line(count: i64) -> String {
    let href = format!("/alerts?offset=0{}", list_query(&given_up()));
    match count {
        0 => "<p id=given-up class=muted>No webhook delivery given up.</p>".to_owned(),
        1 => format!("<p id=given-up><a class=bad href=\"{href}\">1 delivery given up</a></p>"),
        n => format!("<p id=given-up><a class=bad href=\"{href}\">{n} deliveries given up</a></p>"),
    }
}

/// `<option>`s of `values`, the one named `chosen` selected, after an "any" option when
/// `any` names it.
fn options(values: &[&str], chosen: Option<&str>, any: Option<&str>) -> String {
    let mut html = String::new();
    if let Some(any) = any {
        let _ = write!(html, "<option value=\"\">{}</option>", esc(any));
    }
    for value in values {
        let selected = if chosen == Some(value) {
            " selected"
        } else {
            ""
        };
        let _ = write!(html, "<option{selected}>{}</option>", esc(value));
    }
    html
}

/// The filters as a GET form: it reloads the page with them, no script needed.
fn filter_form(filter: &AlertFilter, forwarding: bool) -> String {
    let states: Vec<&str> = AlertState::ALL.iter().map(|s| s.as_str()).collect();
    let levels: Vec<&str> = ALERT_LEVELS.iter().map(|l| l.as_str()).collect();
    let kinds: String = crate::alerts::kind::ALL
        .iter()
        .map(|kind| format!("<option value=\"{kind}\">"))
        .collect();
    let mut form = format!(
        "<form class=filters method=get action=/alerts>\
         <select name=state title=state>{}</select>\
         <select name=level title=level>{}</select>\
         <input name=kind list=alert-kinds placeholder=type maxlength={MAX_KIND_LEN} value=\"{}\">\
         <datalist id=alert-kinds>{kinds}</datalist>\
         <input name=installation placeholder=instance maxlength={MAX_FILTER_LEN} value=\"{}\">",
        options(&states, Some(filter.state.as_str()), None),
        options(&levels, filter.level.as_deref(), Some("any level")),
        esc(filter.kind.as_deref().unwrap_or("")),
        esc(filter.instance_id.as_deref().unwrap_or("")),
    );
    if forwarding {
        let deliveries: Vec<&str> = DeliveryFilter::ALL.iter().map(|d| d.as_str()).collect();
        let _ = write!(
            form,
            "<select name=delivery title=delivery>{}</select>",
            options(
                &deliveries,
                filter.delivery.map(DeliveryFilter::as_str),
                Some("any delivery")
            )
        );
    }
    // The page size chosen stays when the filters change.
    if filter.limit != PAGE_SIZE {
        let _ = write!(
            form,
            "<input type=hidden name=limit value={}>",
            filter.limit
        );
    }
    form.push_str("<button>Filter</button></form>");
    form
}

/// How the alert list's table is drawn for one viewer.
struct AlertTable<'a> {
    role: Role,
    /// Whether alerts are forwarded, so have a delivery to show.
    forwarding: bool,
    now: i64,
    /// This page's address, where the Acknowledge buttons return to.
    back: &'a str,
    /// What the table says when it has no row (HTML).
    empty: &'a str,
}

impl AlertTable<'_> {
    fn render(&self, alerts: &[Alert]) -> String {
        let mut table = String::from(
            "<table id=alerts><thead><tr><th>Raised</th><th>Installation</th><th>Level</th>\
             <th>Type</th><th>Message</th><th>State</th>",
        );
        if self.forwarding {
            table.push_str("<th>Delivery</th>");
        }
        table.push_str("</tr></thead><tbody>");
        for alert in alerts {
            let _ = write!(
                table,
                "<tr><td>{}</td><td>{}</td>{}<td>{}</td><td>{}</td><td>{}</td>",
                ago(Some(alert.created_at), self.now),
                install_link(&alert.instance_id),
                level_cell(&alert.level),
                esc(&alert.kind),
                long_text(&alert.message, LONG_CELL_CHARS),
                state_cell(alert, self.role, self.now, Some(self.back)),
            );
            if self.forwarding {
                let _ = write!(
                    table,
                    "<td>{}</td>",
                    delivery_cell(alert.delivery.as_ref(), self.now)
                );
            }
            table.push_str("</tr>");
        }
        if alerts.is_empty() {
            let columns = if self.forwarding { 7 } else { 6 };
            let _ = write!(
                table,
                "<tr><td colspan={columns} class=muted>{}</td></tr>",
                self.empty
            );
        }
        table.push_str("</tbody></table>");
        table
    }
}

/// The alerts of an installation's page (open ones first, as the store lists them).
pub(crate) fn installation_alerts(
    alerts: &[Alert],
    role: Role,
    forwarding: bool,
    now: i64,
) -> String {
    let mut b = String::from(
        "<section><h2>Alerts</h2><table id=alerts><thead><tr><th>Raised</th><th>Level</th>\
         <th>Type</th><th>Message</th><th>State</th>",
    );
    if forwarding {
        b.push_str("<th>Delivery</th>");
    }
    b.push_str("</tr></thead><tbody>");
    for a in alerts {
        let _ = write!(
            b,
            "<tr><td>{}</td>{}<td>{}</td><td>{}</td><td>{}</td>",
            ago(Some(a.created_at), now),
            level_cell(&a.level),
            esc(&a.kind),
            esc(&a.message),
            state_cell(a, role, now, None),
        );
        if forwarding {
            let _ = write!(b, "<td>{}</td>", delivery_cell(a.delivery.as_ref(), now));
        }
        b.push_str("</tr>");
    }
    if alerts.is_empty() {
        let columns = if forwarding { 6 } else { 5 };
        let _ = write!(
            b,
            "<tr><td colspan={columns} class=muted>No alerts.</td></tr>"
        );
    }
    b.push_str(
        "</tbody></table><p class=muted><a href=\"/alerts\">All open alerts</a></p></section>",
    );
    b
}

fn level_cell(level: &str) -> String {
    let class = if matches!(level, "error" | "critical") {
        "bad"
    } else {
        "warn"
    };
    format!("<td class={class}>{}</td>", esc(level))
}

/// Open, acknowledged or resolved; an open alert nobody acknowledged gets the Acknowledge
/// button for the roles that may press it, which returns to `back` (else to the
/// installation's page).
fn state_cell(alert: &Alert, role: Role, now: i64, back: Option<&str>) -> String {
    match (alert.resolved_at, &alert.acknowledged_by) {
        (Some(at), _) => format!("resolved {}", ago(Some(at), now)),
        (None, Some(by)) => format!(
            "open, acknowledged by {} {}",
            esc(by),
            ago(alert.acknowledged_at, now)
        ),
        (None, None) if role >= Role::Ops => {
            let back = back
                .map(|back| format!("?back={}", percent_encode(back)))
                .unwrap_or_default();
            format!(
                "open <form method=post action=\"/alerts/{}/ack{back}\" style=display:inline>\
                 <button>Acknowledge</button></form>",
                alert.id
            )
        }
        (None, None) => "open".into(),
    }
}

/// Where an alert's webhook delivery stands, with the error that made it give up.
fn delivery_cell(delivery: Option<&AlertDelivery>, now: i64) -> String {
    let Some(d) = delivery else {
        return "<span class=muted title=\"not forwarded (an instance's alert below error, or \
                raised while no webhook was configured), or its record was pruned after the \
                retention\">none</span>"
            .into();
    };
    let attempts = match d.attempts {
        1 => "1 attempt".to_owned(),
        n => format!("{n} attempts"),
    };
    let error = d
        .last_error
        .as_deref()
        .map(|e| format!(": {}", long_text(e, LONG_CELL_CHARS)))
        .unwrap_or_default();
    let next_try = d
        .next_attempt_at
        .map(format_time)
        .unwrap_or_else(|| "soon".into());
    match d.state {
        DeliveryState::Pending if d.attempts == 0 => {
            format!("<span class=warn>pending</span>, first try {next_try}")
        }
        DeliveryState::Pending => {
            format!("<span class=warn>pending</span> after {attempts}, next try {next_try}{error}")
        }
        DeliveryState::Delivered => {
            format!(
                "<span class=ok>delivered</span> {}",
                ago(d.delivered_at, now)
            )
        }
        DeliveryState::GivenUp => format!(
            "<span class=bad>given up</span> after {attempts} {}{error}",
            ago(d.given_up_at, now)
        ),
    }
}

/// Where the alert list's Acknowledge form returns to: its `back` parameter, which must be
/// an address of the alert list, so the form can send a browser nowhere else (and the
/// address is a valid `Location`). `None` when the form names none.
pub(crate) fn back_address(uri: &Uri) -> Result<Option<String>> {
    #[derive(Deserialize)]
    struct Back {
        back: Option<String>,
    }
    let back = Query::<Back>::try_from_uri(uri)
        .map_err(|e| Error::BadRequest(e.body_text()))?
        .0
        .back;
    match back {
        Some(address) if !is_alert_list_address(&address) => Err(Error::BadRequest(
            "back must be an address of the alert list (/alerts?…)".into(),
        )),
        back => Ok(back),
    }
}

/// The pattern of [`is_alert_list_address`], for `/openapi.json`.
const BACK_PATTERN: &str = "^/alerts(\\?[A-Za-z0-9._~%&=+-]*)?$";

fn is_alert_list_address(text: &str) -> bool {
    match text.strip_prefix("/alerts") {
        Some("") => true,
        Some(rest) => rest.strip_prefix('?').is_some_and(|query| {
            query
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._~%&=+-".contains(&b))
        }),
        None => false,
    }
}

/// The query parameters of `method path` that `/openapi.json` documents for the alert
/// routes (none for the others): [`AlertListQuery`]'s, and the Acknowledge form's `back`.
pub(crate) fn query_parameters(method: &str, path: &str) -> Vec<Value> {
    use crate::query_docs::{choice, limit, offset, optional, padded_instance_id};
    let default_limit = match path {
        "/api/alerts" => crate::api::ALERT_PAGE,
        _ => PAGE_SIZE,
    };
    match (method, path) {
        ("get", "/api/alerts") | ("get", "/alerts") => vec![
            optional(
                "state",
                "open (not resolved; the default, as is empty), acknowledged (open and \
                 acknowledged), resolved, or all",
                choice(AlertState::ALL.iter().map(|s| s.as_str())),
            ),
            optional(
                "open",
                "The older form of state, refused beside it: true is state=open, false is \
                 state=all",
                json!({ "type": "boolean" }),
            ),
            optional(
                "level",
                "Only alerts of this level; empty is no filter",
                choice(ALERT_LEVELS.iter().map(|l| l.as_str())),
            ),
            optional(
                "kind",
                "Only alerts of this type (offline, slo_p95_ms, payload, ...); empty is no \
                 filter",
                json!({ "type": "string", "maxLength": MAX_KIND_LEN, "pattern": "^[a-z0-9_]*$" }),
            ),
            optional(
                "installation",
                "Only this instance's alerts: its instance id, trimmed (at most 256 bytes); \
                 empty or blank is no filter",
                padded_instance_id(),
            ),
            optional(
                "delivery",
                "Only alerts whose webhook delivery is pending, delivered, given_up, or none \
                 (not forwarded); empty is no filter. Refused (400) unless a webhook is \
                 configured (CONTROL_PLANE_ALERT_WEBHOOK_URL)",
                choice(DeliveryFilter::ALL.iter().map(|d| d.as_str())),
            ),
            limit(default_limit),
            offset(),
        ],
        ("post", "/alerts/{id}/ack") => vec![optional(
            "back",
            "An address of the alert list to return to instead of the installation's page",
            json!({ "type": "string", "pattern": BACK_PATTERN }),
        )],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_addresses_of_the_alert_list_are_returned_to() {
        for good in [
            "/alerts",
            "/alerts?",
            "/alerts?offset=50&state=all&installation=shop%2001",
        ] {
            assert!(is_alert_list_address(good), "{good}");
        }
        for bad in [
            "",
            "/",
            "//evil.example/alerts",
            "/alerts/1",
            "/alertsx",
            "/alerts?x=\r\nSet-Cookie:a",
            "/alerts?a=<b>",
            "https://evil.example/alerts",
        ] {
            assert!(!is_alert_list_address(bad), "{bad}");
        }
    }

    #[test]
    fn deliveries_read_as_what_happened() {
        let given_up = AlertDelivery::new(
            3,
            100,
            None,
            Some(90),
            Some("request failed for https://user:pw@hook.example/x?token=abc".into()),
        );
        assert_eq!(given_up.state, DeliveryState::GivenUp);
        let cell = delivery_cell(Some(&given_up), 100);
        assert!(
            cell.contains("given up") && cell.contains("after 3 attempts"),
            "{cell}"
        );
        assert!(
            !cell.contains("pw@") && !cell.contains("token=abc"),
            "{cell}"
        );
        let delivered = AlertDelivery::new(2, 100, Some(95), None, Some("old failure".into()));
        assert_eq!(
            (delivered.state, delivered.last_error.as_deref()),
            (DeliveryState::Delivered, None)
        );
        let pending = AlertDelivery::new(1, 200, None, None, Some("receiver answered 500".into()));
        let cell = delivery_cell(Some(&pending), 100);
        assert!(
            cell.contains("pending")
                && cell.contains(&format_time(200))
                && cell.contains("receiver answered 500"),
            "{cell}"
        );
        assert!(delivery_cell(None, 100).contains("none"));
    }
}
