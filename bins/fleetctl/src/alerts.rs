//! `fleetctl alerts`: the fleet's alerts from `GET /api/alerts`, one aligned line each, and
//! `fleetctl alerts ack ID` (`POST /api/alerts/{id}/ack`).

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::api::{Client, aligned_table, text, utc, with_query};

/// Characters of an alert's message shown on its line; the whole of it is in `--json`.
const MESSAGE_CHARS: usize = 72;

/// `fleetctl alerts` filters, as `GET /api/alerts` takes them; only those given are sent, so
/// the control plane's defaults apply. The fixed sets are checked here, so a typo is named
/// with the values it could be before anything is sent.
#[derive(Args, Debug, Default)]
pub struct AlertFilters {
    /// Which alerts: open (not resolved, acknowledged or not; the default), acknowledged,
    /// resolved, all.
    #[arg(long, value_parser = ["open", "acknowledged", "resolved", "all"])]
    pub state: Option<String>,
    /// Only this level.
    #[arg(long, value_parser = ["info", "warning", "error", "critical"])]
    pub level: Option<String>,
    /// Only this type: offline, payload, secrets, slo_p95_ms, restore_failed, ...
    #[arg(long)]
    pub kind: Option<String>,
    /// Only this instance's.
    #[arg(long)]
    pub instance: Option<String>,
    /// Only alerts whose webhook delivery is in this state (none: no delivery); needs a
    /// webhook configured on the control plane.
    #[arg(long, value_parser = ["pending", "delivered", "given_up", "none"])]
    pub delivery: Option<String>,
    /// How many, newest first (1-500; 100 when not given).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=500))]
    pub limit: Option<u32>,
}

impl AlertFilters {
    /// Whether any filter was given.
    fn any(&self) -> bool {
        // Taken apart, so a filter added later cannot be left out here.
        let Self {
            state,
            level,
            kind,
            instance,
            delivery,
            limit,
        } = self;
        [state, level, kind, instance, delivery]
            .iter()
            .any(|f| f.is_some())
            || limit.is_some()
    }
}

/// `fleetctl alerts ...`: without a subcommand, the list.
#[derive(Subcommand, Debug)]
pub enum AlertsCommand {
    /// Acknowledge an alert (ops): it stays open until its cause is gone.
    Ack {
        /// Alert id (the first column of `fleetctl alerts`).
        id: i64,
    },
}

/// `alerts [filters]` or `alerts ack ID`.
pub fn alerts(
    client: &Client,
    filters: AlertFilters,
    command: Option<AlertsCommand>,
) -> Result<(), String> {
    match command {
        None => {
            let list = client.get(&list_path(&filters))?;
            client.print(&list, alert_table);
        }
        // Refused rather than ignored: whoever typed them meant something by them.
        Some(AlertsCommand::Ack { .. }) if filters.any() => {
            return Err(
                "--state, --level, --kind, --instance, --delivery and --limit filter the list; \
                 `alerts ack ID` takes none of them"
                    .into(),
            );
        }
        Some(AlertsCommand::Ack { id }) => {
            let alert = client.post(&format!("/api/alerts/{id}/ack"), &json!({}))?;
            client.print(&alert, |a| {
                format!(
                    "alert {} ({} on {}) acknowledged by {}",
                    text(&a["id"]),
                    text(&a["kind"]),
                    text(&a["instance_id"]),
                    text(&a["acknowledged_by"])
                )
            });
        }
    }
    Ok(())
}

/// `GET /api/alerts` with the filters given (`--instance` is the API's `installation`).
fn list_path(filters: &AlertFilters) -> String {
    let limit = filters.limit.map(|n| n.to_string());
    with_query(
        "/api/alerts",
        &[
            ("state", filters.state.as_deref()),
            ("level", filters.level.as_deref()),
            ("kind", filters.kind.as_deref()),
            ("installation", filters.instance.as_deref()),
            ("delivery", filters.delivery.as_deref()),
            ("limit", limit.as_deref()),
        ],
    )
}

/// Where an alert stands: resolved, acknowledged, or open.
fn alert_state(alert: &Value) -> &'static str {
    if !alert["resolved_at"].is_null() {
        "resolved"
    } else if !alert["acknowledged_at"].is_null() {
        "acknowledged"
    } else {
        "open"
    }
}

/// `message` on one line (every run of whitespace or control characters one space), cut to
/// [`MESSAGE_CHARS`] with `…` marking the cut.
fn short_message(message: &str) -> String {
    let words: Vec<&str> = message
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .collect();
    let line = words.join(" ");
    if line.chars().count() <= MESSAGE_CHARS {
        return line;
    }
    let mut cut: String = line.chars().take(MESSAGE_CHARS - 1).collect();
    cut.push('…');
    cut
}

/// The human table of `alerts`: each column as wide as its widest cell, the message last;
/// a last line says when more alerts match than were listed.
fn alert_table(list: &Value) -> String {
    let header = [
        "ID",
        "RAISED (UTC)",
        "LEVEL",
        "KIND",
        "INSTANCE",
        "STATE",
        "DELIVERY",
        "MESSAGE",
    ];
    let items = list["items"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|a| {
            vec![
                text(&a["id"]),
                utc(&a["created_at"]),
                text(&a["level"]),
                text(&a["kind"]),
                text(&a["instance_id"]),
                alert_state(a).to_owned(),
                // No delivery: not forwarded, or no webhook configured.
                a["delivery"]["state"].as_str().unwrap_or("-").to_owned(),
                short_message(a["message"].as_str().unwrap_or("")),
            ]
        })
        .collect();
    let mut out = aligned_table(&header, &rows, true);
    if items.is_empty() {
        out.push_str("\n(no alerts match)");
    }
    let total = list["total"].as_u64().unwrap_or(0);
    if total > items.len() as u64 {
        out.push_str(&format!(
            "\n{} of {total} matching alerts shown, newest first (--limit for more)",
            items.len()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_aligns_columns_and_shortens_messages() {
        let list = json!({"total": 3, "items": [
            {"id": 12, "created_at": 1_796_644_800, "level": "critical", "kind": "payload",
             "instance_id": "edge-7", "resolved_at": null, "acknowledged_at": null,
             "delivery": {"state": "given_up"}, "message": format!("Disk\nfull {}", "x".repeat(100))},
            {"id": 3, "created_at": 1_796_644_000, "level": "warning", "kind": "secrets",
             "instance_id": "a", "resolved_at": null, "acknowledged_at": 1_796_644_100,
             "delivery": null, "message": "2 secrets expired"},
        ]});
        let table = alert_table(&list);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "ID  RAISED (UTC)         LEVEL     KIND     INSTANCE  STATE         DELIVERY  MESSAGE"
        );
        assert!(
            lines[1].starts_with(
                "12  2026-12-07 12:00:00  critical  payload  edge-7    open          given_up  Disk full xxx"
            ),
            "{table}"
        );
        assert!(lines[1].ends_with("x…"), "{table}");
        assert_eq!(
            lines[1].split("  ").last().map(|m| m.chars().count()),
            Some(MESSAGE_CHARS)
        );
        assert_eq!(
            lines[2],
            " 3  2026-12-07 11:46:40  warning   secrets  a         acknowledged  -         2 secrets expired"
        );
        assert_eq!(
            lines[3],
            "2 of 3 matching alerts shown, newest first (--limit for more)"
        );
    }

    #[test]
    fn filters_go_into_the_query_encoded() {
        let filters = AlertFilters {
            state: Some("all".into()),
            level: Some("error".into()),
            kind: None,
            instance: Some("edge 7/ä".into()),
            delivery: Some("given_up".into()),
            limit: Some(20),
        };
        assert!(filters.any());
        assert_eq!(
            list_path(&filters),
            "/api/alerts?state=all&level=error&installation=edge%207%2F%C3%A4&delivery=given_up&limit=20"
        );
        let none = AlertFilters::default();
        assert!(!none.any());
        assert_eq!(list_path(&none), "/api/alerts");
    }
}
