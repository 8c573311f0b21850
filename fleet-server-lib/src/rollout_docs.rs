//! The OpenAPI entries of releases, rollouts, update and plugin jobs, the plugin marketplace
//! and restore verification (merged into `/openapi.json` by `openapi::spec`).

use crate::openapi::Access::{Role, Signed};
use crate::openapi::{RouteDoc, r};

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
        "Create a rollout: {release_id | version, channel, batch_size (10), strategy BATCH | BLUE_GREEN_CANARY, canary_steps, canary_step_wait_sec, slo_*_max, auto_rollback, failure_threshold (count or \"25%\", per batch; 0 = any failure halts), auto_advance, observe_secs}. The targets (channel members not on the version) are frozen and the first batch starts.",
        &[
            (201, "The rollout"),
            (422, "Invalid settings or unknown release"),
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
        "An instance asks for a plugin {instance_id, name, version, action, reason}.",
        &[
            (201, "Recorded"),
            (401, "Bad signature"),
            (422, "Invalid name or version"),
        ],
    ),
    r(
        "get",
        "/api/plugins/requests",
        Role("support"),
        "Plugin requests.",
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
        "/api/plugins/rollouts",
        Role("admin"),
        "A plugin rollout {plugin_release_id, action, channel, batch_size, failure_threshold, auto_advance}; every job carries the action. Advance and the rest via /api/rollouts/{id}/...",
        &[
            (201, "The rollout"),
            (409, "The plugin release is not approved"),
            (422, "Invalid settings"),
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
        "{count (5), environment (staging)}: schedule verifications for the installations with the freshest heartbeats, skipping any verified there in the last 7 days (or with one open).",
        &[(201, "{items}"), (422, "Invalid count or environment")],
    ),
    r(
        "get",
        "/api/restores",
        Role("support"),
        "Restore verifications, newest first.",
        &[(200, "{items}")],
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
        "{instance_id, restore_id, status verified | failed | skipped, error, duration_ms, output_tail}; failed raises an error alert that is forwarded.",
        &[
            (200, "Recorded"),
            (404, "Not this instance's restore"),
            (409, "Already ended otherwise"),
            (422, "Unknown status"),
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
        "get",
        "/restores",
        Role("support"),
        "Dashboard: restore verifications (HTML).",
        &[(200, "HTML")],
    ),
];
