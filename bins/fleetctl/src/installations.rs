//! `fleetctl installations`: the registry from `GET /api/installations`, one aligned line
//! each, `fleetctl installations show ID` (`GET /api/installations/{id}`): its latest
//! state, checks, open alerts, backups and job failures, and `fleetctl installations archive
//! ID` (`POST /api/installations/{id}/archive`).

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::api::{Client, aligned_table, text, utc, with_query};

/// Backups and job failures `installations show` lists, newest first; all are in `--json`.
const RECENT_ROWS: usize = 5;

/// `fleetctl installations` filters, as `GET /api/installations` takes them; only those
/// given are sent.
#[derive(Args, Debug, Default)]
pub struct InstallationFilters {
    /// Only this release channel.
    #[arg(long)]
    pub channel: Option<String>,
    /// Only this health, as the instances report it (ok, degraded, ...).
    #[arg(long)]
    pub health: Option<String>,
    /// Only those whose instance id, domain or client contains this text.
    #[arg(long)]
    pub search: Option<String>,
    /// Archived installations: false (hidden; the default), true (only them) or all.
    #[arg(long, value_parser = ["false", "true", "all"])]
    pub archived: Option<String>,
    /// How many, by instance id (1-500; 50 when not given).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=500))]
    pub limit: Option<u32>,
}

impl InstallationFilters {
    /// Whether any filter was given.
    fn any(&self) -> bool {
        let Self {
            channel,
            health,
            search,
            archived,
            limit,
        } = self;
        [channel, health, search, archived]
            .iter()
            .any(|f| f.is_some())
            || limit.is_some()
    }
}

/// `fleetctl installations ...`: without a subcommand, the list.
#[derive(Subcommand, Debug)]
pub enum InstallationsCommand {
    /// One installation: state, checks, open alerts, recent backups and job failures.
    Show {
        /// Instance id (the first column of `fleetctl installations`).
        id: String,
    },
    /// Archive an installation whose customer left (admin): hidden from the list, skipped by
    /// the offline check, rollouts and restore scheduling; its next heartbeat brings it back.
    Archive {
        /// Instance id.
        id: String,
    },
}

/// `installations [filters]` or `installations show ID`.
pub fn installations(
    client: &Client,
    filters: InstallationFilters,
    command: Option<InstallationsCommand>,
) -> Result<(), String> {
    match command {
        None => {
            let list = client.get(&list_path(&filters))?;
            client.print(&list, installation_table);
        }
        // Refused rather than ignored: whoever typed them meant something by them.
        Some(command) if filters.any() => {
            let name = match command {
                InstallationsCommand::Show { .. } => "show",
                InstallationsCommand::Archive { .. } => "archive",
            };
            return Err(format!(
                "--channel, --health, --search, --archived and --limit filter the list; \
                 `installations {name} ID` takes none of them"
            ));
        }
        Some(InstallationsCommand::Archive { id }) => {
            let path = format!(
                "/api/installations/{}/archive",
                fleet_core::percent_encode(&id)
            );
            let archived = client.post(&path, &json!({}))?;
            client.print(&archived, |a| {
                format!(
                    "installation {} archived at {} UTC; its next heartbeat brings it back",
                    text(&a["instance_id"]),
                    utc(&a["archived_at"])
                )
            });
        }
        Some(InstallationsCommand::Show { id }) => {
            let path = format!("/api/installations/{}", fleet_core::percent_encode(&id));
            let detail = client.get(&path)?;
            client.print(&detail, installation_text);
        }
    }
    Ok(())
}

/// `GET /api/installations` with the filters given (`--search` is the API's `q`).
fn list_path(filters: &InstallationFilters) -> String {
    let limit = filters.limit.map(|n| n.to_string());
    with_query(
        "/api/installations",
        &[
            ("channel", filters.channel.as_deref()),
            ("health", filters.health.as_deref()),
            ("q", filters.search.as_deref()),
            ("archived", filters.archived.as_deref()),
            ("limit", limit.as_deref()),
        ],
    )
}

/// `ok`, `degraded, offline` when an `offline` alert is open, `ok, archived` once archived.
fn health_cell(i: &Value) -> String {
    let mut health = text(&i["health"]);
    if i["offline"].as_bool() == Some(true) {
        health.push_str(", offline");
    }
    if !i["archived_at"].is_null() {
        health.push_str(", archived");
    }
    health
}

/// The human table of `installations`; a last line says when more match than were listed.
fn installation_table(list: &Value) -> String {
    let header = [
        "INSTANCE",
        "HEALTH",
        "VERSION",
        "CHANNEL",
        "LAST SEEN (UTC)",
        "ALERTS",
        "CLIENT",
    ];
    let items = list["items"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|i| {
            vec![
                text(&i["instance_id"]),
                health_cell(i),
                text(&i["version"]),
                text(&i["release_channel"]),
                utc(&i["last_seen_at"]),
                text(&i["open_alerts"]),
                text(&i["client"]),
            ]
        })
        .collect();
    let mut out = aligned_table(&header, &rows, false);
    if items.is_empty() {
        out.push_str("\n(no installations match)");
    }
    let total = list["total"].as_u64().unwrap_or(0);
    if total > items.len() as u64 {
        out.push_str(&format!(
            "\n{} of {total} matching installations shown (--limit for more)",
            items.len()
        ));
    }
    out
}

/// One installation, as `installations show` prints it.
fn installation_text(d: &Value) -> String {
    let mut out = text(&d["instance_id"]);
    let names: Vec<String> = [&d["domain"], &d["client"]]
        .into_iter()
        .filter(|v| !v.is_null())
        .map(text)
        .collect();
    if !names.is_empty() {
        out.push_str(&format!(" ({})", names.join(", ")));
    }
    out.push_str(&format!(
        "\n  health {}, version {}, channel {}, signature {}",
        health_cell(d),
        text(&d["version"]),
        text(&d["release_channel"]),
        text(&d["scheme"])
    ));
    out.push_str(&format!(
        "\n  first seen {}, last seen {} (UTC)",
        utc(&d["first_seen_at"]),
        utc(&d["last_seen_at"])
    ));
    if !d["archived_at"].is_null() {
        out.push_str(&format!(
            "\n  archived at {} (UTC); its next heartbeat brings it back",
            utc(&d["archived_at"])
        ));
    }
    let listed = |key: &str| d["state"][key].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let (checks, skipped) = (listed("checks"), listed("checks_skipped"));
    if !checks.is_empty() || !skipped.is_empty() {
        out.push_str("\n  checks:");
        for check in checks {
            let outcome = if check["ok"].as_bool() == Some(true) {
                "ok".to_owned()
            } else {
                format!("FAILED: {}", check["error"].as_str().unwrap_or("no detail"))
            };
            out.push_str(&format!("\n    {} {outcome}", text(&check["name"])));
        }
        // Built-in checks the agent leaves out (AGENT_SKIP_CHECKS): not failing, not ok.
        for name in skipped {
            out.push_str(&format!(
                "\n    {} skipped (not checked on this node)",
                text(name)
            ));
        }
    }
    let open: Vec<&Value> = d["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["resolved_at"].is_null())
        .collect();
    out.push_str(&format!("\n  open alerts: {}", open.len()));
    for alert in open {
        out.push_str(&format!(
            "\n    {} {} {}: {}",
            text(&alert["id"]),
            text(&alert["level"]),
            text(&alert["kind"]),
            text(&alert["message"])
        ));
    }
    let recent = |key: &str, title: &str, line: &dyn Fn(&Value) -> String| {
        let rows = d[key].as_array().map(Vec::as_slice).unwrap_or(&[]);
        let mut part = format!("\n  {title}: {}", rows.len());
        for row in rows.iter().take(RECENT_ROWS) {
            part.push_str(&format!("\n    {}", line(row)));
        }
        part
    };
    out.push_str(&recent("backups", "backups", &|b| {
        format!(
            "{} {} {}",
            utc(&b["recorded_at"]),
            text(&b["status"]),
            text(&b["backup_id"])
        )
    }));
    out.push_str(&recent("job_failures", "job failures", &|f| {
        format!(
            "{} {}: {}",
            utc(&f["created_at"]),
            text(&f["queue"]),
            text(&f["message"])
        )
    }));
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn filters_go_into_the_query_encoded() {
        assert_eq!(
            list_path(&InstallationFilters::default()),
            "/api/installations"
        );
        let filters = InstallationFilters {
            channel: Some("stable".into()),
            search: Some("acme & co".into()),
            archived: Some("all".into()),
            limit: Some(10),
            ..Default::default()
        };
        assert_eq!(
            list_path(&filters),
            "/api/installations?channel=stable&q=acme%20%26%20co&archived=all&limit=10"
        );
    }

    #[test]
    fn the_table_aligns_columns_and_marks_offline_instances() {
        let list = json!({"total": 4, "items": [
            {"instance_id": "acme-001", "health": "ok", "offline": false, "version": "1.2.3",
             "release_channel": "stable", "last_seen_at": 1_796_644_800, "open_alerts": 0,
             "client": "Acme SA"},
            {"instance_id": "b", "health": "degraded", "offline": true, "version": null,
             "release_channel": "beta", "last_seen_at": null, "open_alerts": 2,
             "client": null},
            {"instance_id": "c", "health": "ok", "offline": false, "version": "1.2.3",
             "release_channel": "stable", "last_seen_at": 1_796_644_800, "open_alerts": 0,
             "client": null, "archived_at": 1_796_644_900},
        ]});
        let table = installation_table(&list);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines,
            [
                "INSTANCE  HEALTH             VERSION  CHANNEL  LAST SEEN (UTC)      ALERTS  CLIENT",
                "acme-001  ok                 1.2.3    stable   2026-12-07 12:00:00  0       Acme SA",
                "b         degraded, offline  -        beta     -                    2       -",
                "c         ok, archived       1.2.3    stable   2026-12-07 12:00:00  0       -",
                "3 of 4 matching installations shown (--limit for more)",
            ]
        );
    }
}
