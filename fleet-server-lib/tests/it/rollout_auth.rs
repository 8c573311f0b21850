//! The route × role rows of releases, rollouts, jobs, marketplace, restores and their pages
//! (checked by `auth::every_route_answers_each_role_as_specified`).

/// (method, route template, request path, expected status for none/support/ops/admin).
pub const MATRIX: &[(&str, &str, &str, [u16; 4])] = &[
    // Admin writes without a body: the role passes, then the body is refused (422).
    (
        "POST",
        "/api/releases",
        "/api/releases",
        [401, 403, 403, 422],
    ),
    (
        "GET",
        "/api/releases",
        "/api/releases",
        [401, 200, 200, 200],
    ),
    (
        "POST",
        "/api/rollouts",
        "/api/rollouts",
        [401, 403, 403, 422],
    ),
    (
        "GET",
        "/api/rollouts",
        "/api/rollouts",
        [401, 200, 200, 200],
    ),
    (
        "GET",
        "/api/rollouts/{id}",
        "/api/rollouts/999999",
        [401, 404, 404, 404],
    ),
    (
        "POST",
        "/api/rollouts/{id}/advance",
        "/api/rollouts/999999/advance",
        [401, 403, 403, 404],
    ),
    (
        "POST",
        "/api/rollouts/{id}/pause",
        "/api/rollouts/999999/pause",
        [401, 403, 404, 404],
    ),
    (
        "POST",
        "/api/rollouts/{id}/resume",
        "/api/rollouts/999999/resume",
        [401, 403, 404, 404],
    ),
    (
        "POST",
        "/api/rollouts/{id}/cancel",
        "/api/rollouts/999999/cancel",
        [401, 403, 403, 404],
    ),
    // Agent endpoints take a signature, never a role token.
    (
        "POST",
        "/api/updates/next",
        "/api/updates/next",
        [401, 401, 401, 401],
    ),
    (
        "POST",
        "/api/updates/report",
        "/api/updates/report",
        [401, 401, 401, 401],
    ),
    (
        "POST",
        "/api/plugins/next",
        "/api/plugins/next",
        [401, 401, 401, 401],
    ),
    (
        "POST",
        "/api/plugins/report",
        "/api/plugins/report",
        [401, 401, 401, 401],
    ),
    (
        "POST",
        "/api/plugins/requests",
        "/api/plugins/requests",
        [401, 401, 401, 401],
    ),
    (
        "POST",
        "/api/restores/next",
        "/api/restores/next",
        [401, 401, 401, 401],
    ),
    (
        "POST",
        "/api/restores/report",
        "/api/restores/report",
        [401, 401, 401, 401],
    ),
    (
        "POST",
        "/api/restores/status",
        "/api/restores/status",
        [401, 401, 401, 401],
    ),
    (
        "POST",
        "/api/plugins/releases",
        "/api/plugins/releases",
        [401, 403, 403, 422],
    ),
    (
        "GET",
        "/api/plugins/releases",
        "/api/plugins/releases",
        [401, 200, 200, 200],
    ),
    (
        "GET",
        "/api/plugins/requests",
        "/api/plugins/requests",
        [401, 200, 200, 200],
    ),
    (
        "POST",
        "/api/plugins/requests/{id}/approve",
        "/api/plugins/requests/999999/approve",
        [401, 403, 403, 404],
    ),
    (
        "POST",
        "/api/plugins/requests/{id}/reject",
        "/api/plugins/requests/999999/reject",
        [401, 403, 403, 404],
    ),
    (
        "POST",
        "/api/plugins/rollouts",
        "/api/plugins/rollouts",
        [401, 403, 403, 422],
    ),
    (
        "POST",
        "/api/plugins/rollouts/{id}/advance",
        "/api/plugins/rollouts/999999/advance",
        [401, 403, 403, 404],
    ),
    // An empty body schedules with the defaults (count 5, staging).
    (
        "POST",
        "/api/restores/schedule",
        "/api/restores/schedule",
        [401, 403, 201, 201],
    ),
    (
        "POST",
        "/api/restores/{id}/cancel",
        "/api/restores/999999/cancel",
        [401, 403, 404, 404],
    ),
    (
        "GET",
        "/api/restores",
        "/api/restores",
        [401, 200, 200, 200],
    ),
    ("GET", "/releases", "/releases", [303, 200, 200, 200]),
    ("GET", "/rollouts", "/rollouts", [303, 200, 200, 200]),
    (
        "GET",
        "/rollouts/{id}",
        "/rollouts/999999",
        [303, 404, 404, 404],
    ),
    (
        "POST",
        "/rollouts/{id}/{action}",
        "/rollouts/999999/pause",
        [303, 403, 404, 404],
    ),
    ("GET", "/plugins", "/plugins", [303, 200, 200, 200]),
    (
        "POST",
        "/plugins/requests/{id}/approve",
        "/plugins/requests/999999/approve",
        [303, 403, 403, 404],
    ),
    // Posted without a form, the admin's reject is refused as not a form (422).
    (
        "POST",
        "/plugins/requests/{id}/reject",
        "/plugins/requests/999999/reject",
        [303, 403, 403, 422],
    ),
    ("GET", "/restores", "/restores", [303, 200, 200, 200]),
    (
        "POST",
        "/restores/{id}/cancel",
        "/restores/999999/cancel",
        [303, 403, 404, 404],
    ),
];
