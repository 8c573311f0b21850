//! The OpenAPI entries of releases, rollouts, update and plugin jobs, the plugin marketplace
//! and restore verification (merged into `/openapi.json` by `openapi::spec`).

use fleet_core::plugin::{PluginSpec, plugin_action_schema};
use fleet_core::restore::RestoreStatus;
use fleet_core::schema::{count, id, nullable, one_of};
use fleet_core::update::{JobStatus, RolloutSettings};
use serde_json::{Value, json};

use crate::openapi::Access::{Role, Signed};
use crate::openapi::{
    RouteDoc, array, array_of, boolean, component, every_field, integer, items_of, maybe_integer,
    maybe_string, r, string,
};
use crate::rollouts::{RolloutStatus, job_status};
use crate::store::rollouts::JobKind;

const ROLLOUT_ACTION: &[(u16, &str)] = &[
    (200, "The rollout with per-batch counts and every job"),
    (404, "Unknown rollout"),
    (
        409,
        "Refused in the rollout's state (a batch still runs, halted, completed...)",
    ),
];

/// Every route of this part of the control plane.
pub(crate) const ROUTES: &[RouteDoc] = &[
    r(
        "post",
        "/api/releases",
        Role("admin"),
        "Store a release manifest (the signed manifest, or {manifest}). Ed25519 against CONTROL_PLANE_RELEASE_PUBLIC_KEYS, or the ERP's HMAC with CONTROL_PLANE_RELEASE_SIGNING_SECRET.",
        &[
            (201, "Stored"),
            (409, "That version exists on the channel"),
            (422, "Unsigned, tampered or malformed manifest"),
        ],
    ),
    r(
        "get",
        "/api/releases",
        Role("support"),
        "Releases, newest first.",
        &[(200, "{items}")],
    ),
    r(
        "post",
        "/api/rollouts",
        Role("admin"),
        "Create a rollout: {release_id | version, channel, batch_size (10), strategy BATCH | BLUE_GREEN_CANARY, canary_steps, canary_step_wait_sec, slo_*_max, auto_rollback, failure_threshold (count or \"25%\", per batch; 0 = any failure halts), auto_advance, observe_secs (600)}. The targets (channel members not on the version) are frozen and the first batch starts. With an slo_*_max set, each batch is watched for observe_secs after its last job ends, and only then does the next batch start (auto_advance) or the rollout complete; a breach in that window halts it.",
        &[
            (201, "The rollout"),
            (
                422,
                "Invalid settings, unknown release, or no installation on the channel needs it",
            ),
        ],
    ),
    r(
        "get",
        "/api/rollouts",
        Role("support"),
        "Rollouts, newest first.",
        &[(200, "{items}")],
    ),
    r(
        "get",
        "/api/rollouts/{id}",
        Role("support"),
        "A rollout with per-batch counts and every job's status and last step.",
        &[(200, "The rollout"), (404, "Unknown rollout")],
    ),
    r(
        "post",
        "/api/rollouts/{id}/advance",
        Role("admin"),
        "Start the next batch.",
        ROLLOUT_ACTION,
    ),
    r(
        "post",
        "/api/rollouts/{id}/pause",
        Role("ops"),
        "Stop handing out jobs.",
        ROLLOUT_ACTION,
    ),
    r(
        "post",
        "/api/rollouts/{id}/resume",
        Role("ops"),
        "Continue after a pause or a halt.",
        ROLLOUT_ACTION,
    ),
    r(
        "post",
        "/api/rollouts/{id}/cancel",
        Role("admin"),
        "Stop for good; jobs not handed out are cancelled.",
        ROLLOUT_ACTION,
    ),
    r(
        "post",
        "/api/updates/next",
        Signed,
        "{instance_id, current_version}: the oldest pending update job {job_id, manifest, rollout}, marked in_progress (step accepted).",
        &[
            (200, "A job"),
            (204, "No job"),
            (401, "Bad signature"),
            (422, "Invalid body"),
        ],
    ),
    r(
        "post",
        "/api/updates/report",
        Signed,
        "Report a step (in_progress + step) or the end (succeeded, failed, rolled_back) of the instance's own job, with error, canary_percent, metric_*, duration_ms, output_tail.",
        &[
            (
                200,
                "Recorded (a repeated final report is acknowledged once)",
            ),
            (401, "Bad signature"),
            (404, "Not this instance's job"),
            (409, "Contradicts the job's state"),
            (422, "Unknown status or step"),
        ],
    ),
    r(
        "post",
        "/api/plugins/releases",
        Role("admin"),
        "Publish a plugin release {name, version, compatible[] (control-plane versions: *, 0.1.*, 0.1.0), notes}.",
        &[
            (201, "Published"),
            (409, "Exists"),
            (422, "Invalid name or version"),
        ],
    ),
    r(
        "get",
        "/api/plugins/releases",
        Role("support"),
        "Plugin releases.",
        &[(200, "{items}")],
    ),
    r(
        "post",
        "/api/plugins/requests",
        Signed,
        "An instance asks for a plugin {instance_id, name, version, action, reason}. Asking again for the same plugin, version and action while that request is pending records nothing and answers the pending request (200); once it is approved or rejected, the same request is a new one.",
        &[
            (
                200,
                "The same request was already pending: that request, unchanged",
            ),
            (201, "Recorded"),
            (401, "Bad signature"),
            (422, "Invalid name or version"),
        ],
    ),
    r(
        "get",
        "/api/plugins/requests",
        Role("support"),
        "Plugin requests, newest first: pending, approved (with how its job is doing) or rejected (with the admin's rejection_reason).",
        &[(200, "{items}")],
    ),
    r(
        "post",
        "/api/plugins/requests/{id}/approve",
        Role("admin"),
        "Approve a request and create its job.",
        &[
            (200, "Approved"),
            (404, "Unknown request"),
            (
                409,
                "No approved release of that version, incompatible with this control plane, or already decided",
            ),
        ],
    ),
    r(
        "post",
        "/api/plugins/requests/{id}/reject",
        Role("admin"),
        "Reject a pending request; the body {reason} is optional (at most 500 characters, no control characters but newline and tab) and is shown with the request as rejection_reason. The instance may ask again later: that is a new request.",
        &[
            (200, "Rejected"),
            (404, "Unknown request"),
            (409, "Already approved or rejected"),
            (422, "Invalid reason"),
        ],
    ),
    r(
        "post",
        "/api/plugins/rollouts",
        Role("admin"),
        "A plugin rollout {plugin_release_id, action (install), channel, batch_size (10), failure_threshold, auto_advance, observe_secs, slo_*_max, auto_rollback}; every job carries the action. The update-only settings (release_id, manifestId, version, canary_*) are refused and strategy can only be BATCH. Advance and the rest via /api/rollouts/{id}/...",
        &[
            (201, "The rollout"),
            (409, "The plugin release is not approved"),
            (
                422,
                "Invalid settings, or no installation reports the channel",
            ),
        ],
    ),
    r(
        "post",
        "/api/plugins/rollouts/{id}/advance",
        Role("admin"),
        "Start the next batch of a plugin rollout.",
        ROLLOUT_ACTION,
    ),
    r(
        "post",
        "/api/plugins/next",
        Signed,
        "{instance_id}: the oldest pending plugin job {job_id, plugin{name, version, action}}.",
        &[(200, "A job"), (204, "No job"), (401, "Bad signature")],
    ),
    r(
        "post",
        "/api/plugins/report",
        Signed,
        "Report a plugin job's step or end (status, step, error, duration_ms, output_tail).",
        &[
            (200, "Recorded"),
            (404, "Not this instance's job"),
            (409, "Contradicts the job's state"),
            (422, "Unknown status or step"),
        ],
    ),
    r(
        "post",
        "/api/restores/schedule",
        Role("ops"),
        "{count (5), environment (staging)}: schedule verifications of their latest backup for the installations with the freshest heartbeats, skipping any verified there in the last 7 days or with one open. An installation with no backup to verify is never scheduled: it gets a skipped verification with the reason, once per environment (at most count of them per call). The answer counts the installations passed over by reason and says it in message, so an empty schedule explains itself. A verification no agent took within CONTROL_PLANE_RESTORE_TIMEOUT_SECS, or with no report that long after it was handed out, ends timed_out with a restore_failed alert.",
        &[
            (
                201,
                "{items (the verifications recorded: scheduled, or skipped for lack of a backup), scheduled, not_scheduled, message}",
            ),
            (422, "Invalid count or environment"),
        ],
    ),
    r(
        "get",
        "/api/restores",
        Role("support"),
        "Restore verifications, newest first, of every instance or of one.",
        &[(200, "{items}"), (400, "Bad query")],
    ),
    r(
        "post",
        "/api/restores/next",
        Signed,
        "{instance_id}: the oldest scheduled verification {restore_id, environment, backup_id}.",
        &[(200, "A verification"), (204, "None")],
    ),
    r(
        "post",
        "/api/restores/report",
        Signed,
        "{instance_id, restore_id, status verified | failed | skipped, error, duration_ms, output_tail}; failed raises an error alert that is forwarded, its message with the last lines of output_tail. A report on a verification that timed out or was cancelled is refused (409).",
        &[
            (200, "Recorded"),
            (404, "Not this instance's restore"),
            (
                409,
                "Already ended otherwise: timed out, cancelled, or reported with another status",
            ),
            (422, "Unknown status"),
        ],
    ),
    r(
        "post",
        "/api/restores/status",
        Signed,
        "{instance_id, restore_id}: the current status of the instance's own verification. An agent asks while its verify command runs (every RESTORE_CANCEL_CHECK_SEC) and stops the command once the verification ended here (cancelled, timed_out).",
        &[
            (200, "{restore_id, status}"),
            (404, "Unknown verification, or another instance's"),
        ],
    ),
    r(
        "post",
        "/api/restores/{id}/cancel",
        Role("ops"),
        "Cancel a scheduled or handed-out verification: it ends cancelled (error says by which role), no agent is handed it any more, a report on it is refused (409), and the installation can be scheduled again at once. No alert is raised.",
        &[
            (200, "The verification, cancelled"),
            (404, "Unknown verification"),
            (
                409,
                "Already ended (verified, failed, skipped, timed out or cancelled)",
            ),
        ],
    ),
    r(
        "get",
        "/releases",
        Role("support"),
        "Dashboard: releases (HTML).",
        &[(200, "HTML")],
    ),
    r(
        "get",
        "/rollouts",
        Role("support"),
        "Dashboard: rollouts (HTML).",
        &[(200, "HTML")],
    ),
    r(
        "get",
        "/rollouts/{id}",
        Role("support"),
        "Dashboard: one rollout with live batch progress (HTML, refreshes while running).",
        &[(200, "HTML"), (404, "Unknown rollout")],
    ),
    r(
        "post",
        "/rollouts/{id}/{action}",
        Role("ops"),
        "Dashboard form: advance (admin), pause, resume (ops), cancel (admin).",
        &[
            (303, "Back to the rollout"),
            (403, "Role too low"),
            (409, "Refused in the rollout's state"),
        ],
    ),
    r(
        "get",
        "/plugins",
        Role("support"),
        "Dashboard: plugin releases and requests (HTML).",
        &[(200, "HTML")],
    ),
    r(
        "post",
        "/plugins/requests/{id}/approve",
        Role("admin"),
        "Dashboard form: approve a pending plugin request and create its job, as POST /api/plugins/requests/{id}/approve.",
        &[
            (303, "Back to the plugins"),
            (404, "Unknown request"),
            (
                409,
                "No approved release of that version, incompatible with this control plane, or already decided",
            ),
        ],
    ),
    r(
        "post",
        "/plugins/requests/{id}/reject",
        Role("admin"),
        "Dashboard form: reject a pending plugin request, as POST /api/plugins/requests/{id}/reject; the form field reason is optional.",
        &[
            (303, "Back to the plugins"),
            (404, "Unknown request"),
            (409, "Already approved or rejected"),
            (422, "Not a form, or an invalid reason"),
        ],
    ),
    r(
        "get",
        "/restores",
        Role("support"),
        "Dashboard: restore verifications with why those that did not verify (HTML).",
        &[(200, "HTML")],
    ),
    r(
        "post",
        "/restores/{id}/cancel",
        Role("ops"),
        "Dashboard form: cancel a scheduled or handed-out verification, as POST /api/restores/{id}/cancel.",
        &[
            (303, "Back to the installation"),
            (404, "Unknown verification"),
            (
                409,
                "Already ended (verified, failed, skipped, timed out or cancelled)",
            ),
        ],
    ),
];

/// The body of the success answer (200, or 201 for what is created) of the routes above,
/// for the routes that have one: the jobs an agent is handed, the acknowledgement of its
/// reports, and the records operators read and change.
pub(crate) fn success_schema(method: &str, path: &str) -> Option<Value> {
    let acknowledged = || {
        every_field(&[
            ("ok", json!({ "const": true })),
            ("status", rollout_job_status()),
        ])
    };
    Some(match (method, path) {
        ("post", "/api/releases") => component("Release"),
        ("get", "/api/releases") => items_of("Release"),
        ("get", "/api/rollouts") => items_of("Rollout"),
        ("post", "/api/rollouts")
        | ("get", "/api/rollouts/{id}")
        | ("post", "/api/rollouts/{id}/advance")
        | ("post", "/api/rollouts/{id}/pause")
        | ("post", "/api/rollouts/{id}/resume")
        | ("post", "/api/rollouts/{id}/cancel")
        | ("post", "/api/plugins/rollouts")
        | ("post", "/api/plugins/rollouts/{id}/advance") => component("RolloutDetail"),
        ("post", "/api/updates/next") => fleet_core::update::UpdateJob::json_schema(),
        ("post", "/api/updates/report") | ("post", "/api/plugins/report") => acknowledged(),
        ("post", "/api/plugins/releases") => component("PluginRelease"),
        ("get", "/api/plugins/releases") => items_of("PluginRelease"),
        ("post", "/api/plugins/requests")
        | ("post", "/api/plugins/requests/{id}/approve")
        | ("post", "/api/plugins/requests/{id}/reject") => component("PluginRequest"),
        ("get", "/api/plugins/requests") => items_of("PluginRequest"),
        ("post", "/api/plugins/next") => fleet_core::plugin::PluginJob::json_schema(),
        ("post", "/api/restores/schedule") => every_field(&[
            ("items", array_of("Restore")),
            ("scheduled", count()),
            (
                "not_scheduled",
                every_field(&[
                    ("never_reported", count()),
                    ("open", count()),
                    ("verified_recently", count()),
                    ("no_backup", count()),
                    ("beyond_count", count()),
                    ("archived", count()),
                ]),
            ),
            ("message", string()),
        ]),
        ("get", "/api/restores") => items_of("Restore"),
        ("post", "/api/restores/next") => fleet_core::restore::RestoreJob::json_schema(),
        ("post", "/api/restores/status") => {
            every_field(&[("restore_id", id()), ("status", restore_status())])
        }
        ("post", "/api/restores/report") | ("post", "/api/restores/{id}/cancel") => {
            component("Restore")
        }
        _ => return None,
    })
}

/// A rollout job's stored status: the wire statuses and the control plane's own `queued`
/// and `cancelled`.
fn rollout_job_status() -> Value {
    use JobStatus as J;
    let mut status = one_of(&[
        J::Pending,
        J::InProgress,
        J::Succeeded,
        J::Failed,
        J::RolledBack,
    ]);
    if let Some(names) = status["enum"].as_array_mut() {
        names.extend([json!(job_status::QUEUED), json!(job_status::CANCELLED)]);
    }
    status
}

/// The records [`success_schema`] refers to, by name: the store's types as they serialize.
/// Every field is always present; those that may have no value are `null` then.
pub(crate) fn answer_schemas() -> Vec<(&'static str, Value)> {
    let kind = || one_of(&[JobKind::Update, JobKind::Plugin]);
    let rollout_fields = [
        ("id", integer()),
        ("kind", kind()),
        ("release_id", maybe_integer()),
        ("version", maybe_string()),
        ("plugin_release_id", maybe_integer()),
        ("plugin_action", nullable(plugin_action_schema())),
        ("channel", string()),
        ("settings", RolloutSettings::json_schema()),
        ("failure_threshold", string()),
        ("auto_advance", boolean()),
        ("observe_secs", count()),
        (
            "status",
            one_of(&[
                RolloutStatus::Running,
                RolloutStatus::Paused,
                RolloutStatus::Halted,
                RolloutStatus::Cancelled,
                RolloutStatus::Completed,
            ]),
        ),
        ("current_batch", count()),
        ("batch_count", count()),
        ("halt_reason", maybe_string()),
        ("created_at", integer()),
        ("updated_at", integer()),
    ];
    // `RolloutDetail` flattens the rollout beside its batches and jobs.
    let mut detail_fields = rollout_fields.to_vec();
    detail_fields.extend([
        ("observed_until", maybe_integer()),
        (
            "batches",
            array(every_field(&[
                ("batch", count()),
                ("total", count()),
                ("queued", count()),
                ("pending", count()),
                ("in_progress", count()),
                ("succeeded", count()),
                ("failed", count()),
                ("rolled_back", count()),
                ("cancelled", count()),
            ])),
        ),
        ("jobs", array_of("RolloutJob")),
    ]);
    let job = every_field(&[
        ("id", integer()),
        ("rollout_id", maybe_integer()),
        ("kind", kind()),
        ("batch", count()),
        ("instance_id", string()),
        ("status", rollout_job_status()),
        ("step", maybe_string()),
        ("error", maybe_string()),
        (
            "canary_percent",
            nullable(json!({ "type": "integer", "minimum": 0, "maximum": 100 })),
        ),
        (
            "metrics",
            json!({ "type": ["object", "null"], "additionalProperties": { "type": "number" } }),
        ),
        ("duration_ms", nullable(count())),
        ("output_tail", maybe_string()),
        // Plugin jobs: the plugin and the action; update jobs: null.
        ("payload", nullable(PluginSpec::json_schema())),
        ("created_at", integer()),
        ("updated_at", integer()),
        ("started_at", maybe_integer()),
        ("finished_at", maybe_integer()),
    ]);
    let release = every_field(&[
        ("id", integer()),
        ("version", id()),
        ("channel", id()),
        (
            "scheme",
            one_of(&[
                fleet_core::manifest::ManifestScheme::Ed25519,
                fleet_core::manifest::ManifestScheme::HmacSha256,
            ]),
        ),
        (
            "manifest",
            fleet_core::manifest::SignedManifest::json_schema(),
        ),
        ("created_at", integer()),
    ]);
    let plugin_release = every_field(&[
        ("id", integer()),
        ("name", string()),
        ("version", string()),
        ("compatible", array(string())),
        ("approved", boolean()),
        ("notes", maybe_string()),
        ("created_at", integer()),
    ]);
    let plugin_request = every_field(&[
        ("id", integer()),
        ("instance_id", string()),
        ("name", string()),
        ("version", string()),
        ("action", plugin_action_schema()),
        ("reason", maybe_string()),
        (
            "status",
            json!({ "type": "string", "enum": ["pending", "approved", "rejected"] }),
        ),
        ("job_id", maybe_integer()),
        ("created_at", integer()),
        ("decided_at", maybe_integer()),
        ("rejection_reason", maybe_string()),
        (
            "job_status",
            fleet_core::schema::nullable(rollout_job_status()),
        ),
        ("job_step", maybe_string()),
        ("job_error", maybe_string()),
    ]);
    let restore = every_field(&[
        ("id", integer()),
        ("installation_id", integer()),
        ("instance_id", string()),
        ("environment", string()),
        ("backup_id", maybe_string()),
        ("status", restore_status()),
        ("error", maybe_string()),
        ("duration_ms", nullable(count())),
        ("output_tail", maybe_string()),
        ("created_at", integer()),
        ("started_at", maybe_integer()),
        ("finished_at", maybe_integer()),
    ]);
    vec![
        ("Release", release),
        ("Rollout", every_field(&rollout_fields)),
        ("RolloutDetail", every_field(&detail_fields)),
        ("RolloutJob", job),
        ("PluginRelease", plugin_release),
        ("PluginRequest", plugin_request),
        ("Restore", restore),
        (
            "RestoreSummary",
            every_field(&[
                ("id", integer()),
                ("environment", string()),
                ("backup_id", maybe_string()),
                ("status", restore_status()),
                // Why it did not verify: the error and the output's last lines, bounded.
                ("reason", maybe_string()),
                ("created_at", integer()),
                ("finished_at", maybe_integer()),
            ]),
        ),
    ]
}

/// A restore verification's stored status: the wire statuses and the control plane's own
/// `timed_out` and `cancelled`.
fn restore_status() -> Value {
    use RestoreStatus as R;
    let mut status = one_of(&[
        R::Scheduled,
        R::InProgress,
        R::Verified,
        R::Failed,
        R::Skipped,
    ]);
    if let Some(names) = status["enum"].as_array_mut() {
        names.extend([
            json!(crate::restores::TIMED_OUT),
            json!(crate::restores::CANCELLED),
        ]);
    }
    status
}

/// Body of `POST /api/plugins/rollouts`: the update rollouts' body (`create_rollout_schema`)
/// as `plugins::create_rollout` takes it. The plugin release is required; the keys that name
/// an update release or set canary steps are refused unless null, and `strategy` can only be
/// `BATCH`.
pub(crate) fn plugin_rollout_schema() -> Value {
    let mut schema = crate::rollouts::create_rollout_schema();
    for key in [
        "release_id",
        "manifestId",
        "version",
        "canary_steps",
        "canarySteps",
        "canary_step_wait_sec",
        "canaryStepWaitSec",
    ] {
        if let Some(property) = schema["properties"].get_mut(key) {
            *property = json!({ "type": "null" });
        }
    }
    schema["properties"]["strategy"] = json!({ "const": "BATCH" });
    schema["properties"]["plugin_release_id"] = json!({ "type": "integer", "minimum": 0 });
    schema["required"] = json!(["channel", "plugin_release_id"]);
    schema
}
