//! Restore verification: operators schedule it for the installations with the freshest
//! heartbeats and a backup to verify; agents fetch and report; a failed verification, or one
//! with no report within the restore timeout, raises an error alert that is forwarded. While
//! its verify command runs, an agent asks `POST /api/restores/status` now and then, and
//! stops the command once the verification ended here (an operator cancelled it, or it
//! timed out).

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use fleet_core::ValidationErrors;
use fleet_core::plugin::NextJobRequest;
use fleet_core::restore::{RestoreReport, RestoreStatusRequest};
use serde::{Deserialize, Serialize};

use crate::auth::{Authed, Ops, Role, Support};
use crate::rollouts::{parse_body, path_id};
use crate::store::rollouts::{NotScheduled, Restore, RestoreSchedule};
use crate::update_jobs::signed;
use crate::{Error, Result, Shared};

/// The ERP's defaults.
const DEFAULT_COUNT: i64 = 5;
const DEFAULT_ENVIRONMENT: &str = "staging";
const MAX_COUNT: i64 = 1000;
/// Longest environment name, in bytes.
const MAX_ENVIRONMENT_LEN: usize = 64;
/// What an environment name may be: it reaches the agent's `RESTORE_VERIFY_CMD` as
/// `RESTORE_ENVIRONMENT`, where a script may well use it in a path or a command line, and
/// ops, who may schedule restores, may not run commands.
const ENVIRONMENT_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9_-]*$";

/// Whether `name` matches [`ENVIRONMENT_PATTERN`] (and its length limit).
fn is_valid_environment(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= MAX_ENVIRONMENT_LEN
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}
/// The verification list's page size when the query names none.
pub(crate) const LIST_PAGE: i64 = 100;

/// An installation verified in an environment this recently is not scheduled there again.
pub(crate) const RECENT_VERIFICATION_SECS: i64 = 7 * 86_400;
/// The status of a verification with no report within the restore timeout.
pub(crate) const TIMED_OUT: &str = "timed_out";
/// The status of a verification an operator cancelled before it ended.
pub(crate) const CANCELLED: &str = "cancelled";
/// Most verifications one sweep times out, so one sweep never holds the write lock for long.
pub(crate) const TIMEOUTS_PER_SWEEP: i64 = 100;
/// Why an installation with no backup gets a `skipped` verification instead of a job.
pub(crate) const NO_BACKUP: &str = "no backup to verify: the instance has not reported a backup \
    with its id (backup_id and backup_checksum in its heartbeats)";
/// Installations a schedule's message names among those recorded as skipped.
const NAMED_SKIPS: usize = 10;
/// Restore verifications shown with an installation.
pub(crate) const RECENT_RESTORES: i64 = 5;
/// Longest reason taken from a verify command's output, in characters.
const MAX_REASON_CHARS: usize = 300;
/// Longest failure detail (error and reason), in characters: it goes into alerts, which are
/// forwarded to a webhook.
const MAX_DETAIL_CHARS: usize = 600;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Schedule {
    #[serde(default)]
    count: Option<i64>,
    #[serde(default)]
    environment: Option<String>,
}

/// JSON Schema of [`Schedule`] (for `/openapi.json`); unknown keys are refused.
pub(crate) fn schedule_schema() -> serde_json::Value {
    let mut schema = fleet_core::schema::object(
        &[],
        &[
            (
                "count",
                serde_json::json!({ "type": ["integer", "null"], "minimum": 1, "maximum": MAX_COUNT }),
            ),
            (
                "environment",
                serde_json::json!({
                    "type": ["string", "null"],
                    "maxLength": MAX_ENVIRONMENT_LEN,
                    "pattern": ENVIRONMENT_PATTERN,
                }),
            ),
        ],
    );
    schema["additionalProperties"] = serde_json::json!(false);
    schema
}

/// `POST /api/restores/schedule` (ops): `{count (5), environment ("staging")}`. Always 201:
/// the answer lists what was recorded and counts, with a sentence, the installations passed
/// over and why, so an empty schedule explains itself.
pub(crate) async fn schedule(_: Ops, State(state): State<Shared>, body: Bytes) -> Result<Response> {
    let request: Schedule = if body.iter().all(u8::is_ascii_whitespace) {
        Schedule::default()
    } else {
        parse_body(&body, &state.settings.limits)?
    };
    let count = request.count.unwrap_or(DEFAULT_COUNT);
    let environment = request
        .environment
        .unwrap_or_else(|| DEFAULT_ENVIRONMENT.to_owned());
    let mut errors = ValidationErrors::default();
    if !(1..=MAX_COUNT).contains(&count) {
        errors.push("count", format!("must be between 1 and {MAX_COUNT}"));
    }
    if !is_valid_environment(&environment) {
        errors.push(
            "environment",
            format!(
                "must be a name such as staging or eu-west_2: letters, digits, - and _, \
                 at most {MAX_ENVIRONMENT_LEN} bytes"
            ),
        );
    }
    if !errors.is_empty() {
        return Err(Error::Invalid(errors));
    }
    let done = state
        .store
        .schedule_restores(count, &environment, fleet_core::unix_now())
        .await?;
    let message = schedule_message(&done, &environment);
    let scheduled = done
        .items
        .iter()
        .filter(|r| r.status == "scheduled")
        .count();
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({
            "items": done.items,
            "scheduled": scheduled,
            "not_scheduled": done.not_scheduled,
            "message": message,
        })),
    )
        .into_response())
}

/// One sentence on what scheduling did in `environment` and why installations were passed
/// over.
fn schedule_message(done: &RestoreSchedule, environment: &str) -> String {
    let plural =
        |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let scheduled = done
        .items
        .iter()
        .filter(|r| r.status == "scheduled")
        .count();
    let skipped: Vec<&str> = done
        .items
        .iter()
        .filter(|r| r.status != "scheduled")
        .map(|r| r.instance_id.as_str())
        .collect();
    let mut text = if scheduled == 0 {
        format!("Nothing scheduled in {environment}.")
    } else {
        format!(
            "Scheduled {} in {environment}.",
            plural(scheduled, "verification", "verifications")
        )
    };
    let NotScheduled {
        never_reported,
        open,
        verified_recently,
        no_backup,
        beyond_count,
        archived,
    } = done.not_scheduled;
    let count = |n: i64| usize::try_from(n).unwrap_or(0);
    let reasons: Vec<String> = [
        (
            no_backup,
            "has no backup to verify",
            "have no backup to verify",
        ),
        (
            open,
            "has a verification open there",
            "have a verification open there",
        ),
        (
            verified_recently,
            "was verified there in the last 7 days",
            "were verified there in the last 7 days",
        ),
        (
            never_reported,
            "has not sent a heartbeat yet",
            "have not sent a heartbeat yet",
        ),
        (
            beyond_count,
            "is due but past the count (schedule again or raise count)",
            "are due but past the count (schedule again or raise count)",
        ),
        (archived, "is archived", "are archived"),
    ]
    .into_iter()
    .filter(|(n, _, _)| *n > 0)
    .map(|(n, one, many)| {
        let n = count(n);
        format!(
            "{} {}",
            plural(n, "installation", "installations"),
            if n == 1 { one } else { many }
        )
    })
    .collect();
    if !reasons.is_empty() {
        text.push_str(&format!(" Not scheduled: {}.", reasons.join(", ")));
    } else if scheduled == 0 {
        text.push_str(" No installation is registered.");
    }
    if !skipped.is_empty() {
        // The count can be 1000: name a few, count the rest.
        let named = skipped.len().min(NAMED_SKIPS);
        let rest = match skipped.len() - named {
            0 => String::new(),
            more => format!(" and {more} more"),
        };
        text.push_str(&format!(
            " Recorded as skipped for lack of a backup: {}{rest}.",
            skipped[..named].join(", ")
        ));
    }
    text
}

/// Query of `GET /api/restores`.
#[derive(Debug, Deserialize)]
pub(crate) struct RestoreQuery {
    /// Only this instance's verifications.
    instance: Option<String>,
    /// Page size, 1 to [`MAX_PAGE`](crate::api::MAX_PAGE) ([`LIST_PAGE`]).
    limit: Option<i64>,
}

/// `GET /api/restores`: newest first; `instance` keeps one instance's.
pub(crate) async fn list(
    _: Support,
    State(state): State<Shared>,
    Query(query): Query<RestoreQuery>,
) -> Result<Response> {
    let limit = query.limit.unwrap_or(LIST_PAGE);
    if !(1..=crate::api::MAX_PAGE).contains(&limit) {
        return Err(Error::BadRequest(format!(
            "limit must be between 1 and {}",
            crate::api::MAX_PAGE
        )));
    }
    // Empty means no filter, as in the installation list's filters.
    let instance = query.instance.as_deref().filter(|i| !i.is_empty());
    if let Some(instance) = instance {
        let mut errors = ValidationErrors::default();
        fleet_core::validate::check_id(
            &mut errors,
            &fleet_core::validate::Path::Root.field("instance"),
            instance,
            state.settings.limits.max_id_len,
        );
        if let Some(problem) = errors.violations.first() {
            return Err(Error::BadRequest(format!("instance {}", problem.message)));
        }
    }
    let items = state.store.list_restores(instance, limit).await?;
    Ok(Json(serde_json::json!({ "items": items })).into_response())
}

/// A restore verification as an installation shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct RestoreSummary {
    /// Row id (the agent's `restore_id`).
    pub id: i64,
    /// Where it was restored.
    pub environment: String,
    /// The backup verified.
    pub backup_id: Option<String>,
    /// As in [`Restore::status`].
    pub status: String,
    /// Why it did not verify ([`failure_detail`]); `None` when it did or is still open.
    pub reason: Option<String>,
    /// When it was scheduled.
    pub created_at: i64,
    /// When it ended.
    pub finished_at: Option<i64>,
}

impl From<&Restore> for RestoreSummary {
    fn from(r: &Restore) -> Self {
        Self {
            id: r.id,
            environment: r.environment.clone(),
            backup_id: r.backup_id.clone(),
            status: r.status.clone(),
            reason: failure_detail(r),
            created_at: r.created_at,
            finished_at: r.finished_at,
        }
    }
}

/// The instance's [`RECENT_RESTORES`] newest verifications.
pub(crate) async fn recent(state: &Shared, instance_id: &str) -> Result<Vec<RestoreSummary>> {
    let rows = state
        .store
        .list_restores(Some(instance_id), RECENT_RESTORES)
        .await?;
    Ok(rows.iter().map(RestoreSummary::from).collect())
}

/// What went wrong with a verification that did not verify: its error and the last
/// meaningful lines of its output, at most [`MAX_DETAIL_CHARS`]. The error alone is often
/// just the exit status; the cause (`checksum mismatch …`) is what the command printed.
/// `None` for a verified or open one, or when nothing was said.
pub(crate) fn failure_detail(restore: &Restore) -> Option<String> {
    if matches!(
        restore.status.as_str(),
        "verified" | "scheduled" | "in_progress"
    ) {
        return None;
    }
    let error = restore
        .error
        .as_deref()
        .map(str::trim)
        .filter(|e| !e.is_empty());
    let reason = restore.output_tail.as_deref().and_then(tail_reason);
    let detail = match (error, reason) {
        (Some(error), Some(reason)) if !error.contains(&reason) => format!("{error} — {reason}"),
        (Some(error), _) => error.to_owned(),
        (None, Some(reason)) => reason,
        (None, None) => return None,
    };
    Some(clip(&detail, MAX_DETAIL_CHARS))
}

/// The last two non-blank lines of an output tail, joined, at most [`MAX_REASON_CHARS`]:
/// the last line alone when the two do not fit.
fn tail_reason(tail: &str) -> Option<String> {
    let mut lines = tail.lines().map(str::trim).filter(|l| !l.is_empty()).rev();
    let last = clip(lines.next()?, MAX_REASON_CHARS);
    Some(match lines.next() {
        Some(before) if before.chars().count() + last.chars().count() + 3 <= MAX_REASON_CHARS => {
            format!("{before} / {last}")
        }
        _ => last,
    })
}

/// `text` cut to at most `max` characters, an ellipsis marking a cut.
pub(crate) fn clip(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Why a verification still `status` after `timeout_secs` timed out.
pub(crate) fn timeout_reason(status: &str, timeout_secs: i64) -> String {
    let within = duration_text(timeout_secs);
    if status == "scheduled" {
        format!(
            "no agent took it within {within}: is the instance's agent running with \
             RESTORE_VERIFY_CMD set and RESTORE_VERIFY_ENABLED not false?"
        )
    } else {
        format!("no report within {within} of being handed out")
    }
}

/// A whole number of seconds as people say it: `6 h`, `90 min`, `45 s`.
fn duration_text(secs: i64) -> String {
    match secs {
        s if s >= 3600 && s % 3600 == 0 => format!("{} h", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

/// `POST /api/restores/{id}/cancel` (ops): a scheduled or handed-out verification ends
/// `cancelled`, so no agent is handed it, its report is refused and the installation can be
/// scheduled again; 409 when it already ended.
pub(crate) async fn cancel(
    Authed(role): Ops,
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response> {
    let restore = cancel_as(&state, role, &id).await?;
    Ok(Json(restore).into_response())
}

/// Cancels verification `id` (its path text) for `role`, which the verification's error
/// names; shared by the API and the dashboard's Cancel form.
pub(crate) async fn cancel_as(state: &Shared, role: Role, id: &str) -> Result<Restore> {
    state
        .store
        .cancel_restore(
            path_id(id)?,
            &format!("cancelled by {}", role.as_str()),
            fleet_core::unix_now(),
        )
        .await
}

/// `POST /api/restores/next` (agent): `{restore_id, environment, backup_id?}` or 204.
pub(crate) async fn next(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let request = signed::<NextJobRequest>(&state, &headers, body).await?;
    match state
        .store
        .next_restore(&request.instance_id, fleet_core::unix_now())
        .await?
    {
        None => Ok(StatusCode::NO_CONTENT.into_response()),
        Some(restore) => Ok(Json(fleet_core::restore::RestoreJob {
            restore_id: restore.id.to_string(),
            environment: restore.environment,
            backup_id: restore.backup_id,
        })
        .into_response()),
    }
}

/// `POST /api/restores/status` (agent): `{restore_id, status}` of the instance's own
/// verification, so its agent stops a verify command whose verification ended here
/// (`cancelled`, `timed_out`). 404 when the id is unknown or another instance's: the answer
/// never tells one from the other.
pub(crate) async fn status(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let request = signed::<RestoreStatusRequest>(&state, &headers, body).await?;
    let id: i64 = request.restore_id.parse().map_err(|_| Error::NotFound)?;
    let restore = state
        .store
        .instance_restore(&request.instance_id, id)
        .await?
        .ok_or(Error::NotFound)?;
    Ok(Json(serde_json::json!({
        "restore_id": restore.id.to_string(),
        "status": restore.status,
    }))
    .into_response())
}

/// `POST /api/restores/report` (agent): `verified`, `failed` or `skipped`.
pub(crate) async fn report(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let request = signed::<RestoreReport>(&state, &headers, body).await?;
    let restore = state
        .store
        .report_restore(&request, fleet_core::unix_now(), state.webhook_configured)
        .await?;
    Ok(Json(restore).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restore(status: &str, error: Option<&str>, tail: Option<&str>) -> Restore {
        Restore {
            id: 1,
            installation_id: 1,
            instance_id: "r1".into(),
            environment: "staging".into(),
            backup_id: Some("b-1".into()),
            status: status.into(),
            error: error.map(str::to_owned),
            duration_ms: None,
            output_tail: tail.map(str::to_owned),
            created_at: 0,
            started_at: None,
            finished_at: None,
        }
    }

    #[test]
    fn the_reason_is_the_error_and_the_last_lines_of_output() {
        let exit = Some("step restore-verify exited with status 4");
        let failed = restore(
            "failed",
            exit,
            Some("a\n\n  b  \n\t\nchecksum mismatch\n\n"),
        );
        assert_eq!(
            failure_detail(&failed).as_deref(),
            Some("step restore-verify exited with status 4 — b / checksum mismatch")
        );
        // The error alone, the output alone, and an error that already says it.
        assert_eq!(
            failure_detail(&restore("failed", exit, Some(" \n"))).as_deref(),
            exit
        );
        assert_eq!(
            failure_detail(&restore("skipped", None, Some("no verify command"))).as_deref(),
            Some("no verify command")
        );
        assert_eq!(
            failure_detail(&restore(
                "failed",
                Some("boom: disk full"),
                Some("disk full")
            )),
            Some("boom: disk full".into())
        );
        for quiet in ["verified", "scheduled", "in_progress"] {
            assert_eq!(failure_detail(&restore(quiet, exit, Some("x"))), None);
        }
        assert_eq!(failure_detail(&restore("failed", None, None)), None);
    }

    #[test]
    fn long_reasons_are_bounded() {
        let long = "7".repeat(5000);
        // The last line is kept alone (cut) when the one before does not fit beside it.
        let reason = tail_reason(&format!("before\n{long}")).expect("reason");
        assert_eq!(reason.chars().count(), MAX_REASON_CHARS);
        assert!(reason.starts_with("777") && reason.ends_with('…'));
        let detail = failure_detail(&restore("failed", Some(&long), Some(&long))).expect("detail");
        assert_eq!(detail.chars().count(), MAX_DETAIL_CHARS);
        assert_eq!(clip("ä€", 2), "ä€");
        assert_eq!(clip("ä€x", 2), "ä…");
    }

    #[test]
    fn timeouts_say_what_was_waited_for() {
        assert_eq!(duration_text(21_600), "6 h");
        assert_eq!(duration_text(5400), "90 min");
        assert_eq!(duration_text(61), "61 s");
        assert!(timeout_reason("scheduled", 3600).starts_with("no agent took it within 1 h"));
        assert_eq!(
            timeout_reason("in_progress", 120),
            "no report within 2 min of being handed out"
        );
    }

    #[test]
    fn the_schedule_message_names_each_reason_once() {
        let done = RestoreSchedule {
            items: vec![
                restore("scheduled", None, None),
                Restore {
                    instance_id: "r2".into(),
                    ..restore("skipped", Some(NO_BACKUP), None)
                },
            ],
            not_scheduled: NotScheduled {
                no_backup: 1,
                beyond_count: 3,
                archived: 2,
                ..NotScheduled::default()
            },
        };
        assert_eq!(
            schedule_message(&done, "qa"),
            "Scheduled 1 verification in qa. Not scheduled: 1 installation has no backup to \
             verify, 3 installations are due but past the count (schedule again or raise \
             count), 2 installations are archived. Recorded as skipped for lack of a backup: r2."
        );
        let every_one_archived = RestoreSchedule {
            items: vec![],
            not_scheduled: NotScheduled {
                archived: 1,
                ..NotScheduled::default()
            },
        };
        assert_eq!(
            schedule_message(&every_one_archived, "qa"),
            "Nothing scheduled in qa. Not scheduled: 1 installation is archived."
        );
    }
}
