//! Hostile input against every kind of route, over real HTTP: oversized bodies and arrays,
//! deep nesting, invalid UTF-8, malformed signatures on every signed route, replayed and
//! future-dated requests beyond heartbeats, path traversal and shell syntax in names. Each
//! must get a clear 4xx with the JSON error body, never a 500, a hang or a crash.
//! (`ingest.rs` covers the same for `/api/heartbeats` signatures and limits.)

use serde_json::{Value, json};

use crate::support::{self, ADMIN, SECRET, TestServer, code, now};

/// The signed agent routes besides `/api/heartbeats`.
const SIGNED_ROUTES: &[&str] = &[
    "/api/updates/next",
    "/api/updates/report",
    "/api/plugins/next",
    "/api/plugins/report",
    "/api/plugins/requests",
    "/api/restores/next",
    "/api/restores/report",
    "/api/restores/status",
    "/v1/agents/register",
    "/v1/agents/poll",
    "/v1/commands/logs",
];

/// Operator routes that read a JSON body.
const ADMIN_BODY_ROUTES: &[&str] = &[
    "/api/installations",
    "/api/releases",
    "/api/rollouts",
    "/api/plugins/releases",
    "/api/plugins/rollouts",
    "/api/restores/schedule",
    "/v1/enrollments",
    "/v1/commands/submit",
];

async fn server() -> (support::TestStore, TestServer) {
    let t = support::sqlite().await;
    let server = TestServer::start(t.store.clone()).await;
    (t, server)
}

async fn admin_post(server: &TestServer, path: &str, body: Vec<u8>) -> (u16, Value) {
    let response = server
        .client
        .post(server.at(path))
        .bearer_auth(ADMIN)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("send");
    read(response).await
}

/// Status and JSON body; a body that is not JSON fails the test, since every error is JSON.
async fn read(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("{status}: not a JSON error body: {text:.200}"));
    (status, value)
}

async fn signed_post(
    server: &TestServer,
    path: &str,
    msg_id: &str,
    ts: i64,
    body: &[u8],
) -> reqwest::Response {
    server.post_v1(path, SECRET, msg_id, ts, body).await
}

/// JSON nested `depth` levels deep: `[[[...]]]`.
fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test]
async fn oversized_bodies_answer_413_with_the_json_error_on_every_route() {
    let (_t, server) = server().await;
    // Over the 1 MiB body limit, and over the 2 MiB the HTTP layer buffers at most: both
    // answer 413 with the JSON error body (the second used to be axum's plain text).
    for size in [1536 * 1024, 3 * 1024 * 1024] {
        let body = format!(
            r#"{{"instance_id":"acme-001","pad":"{}"}}"#,
            "x".repeat(size)
        );
        for path in ADMIN_BODY_ROUTES {
            let (status, error) = admin_post(&server, path, body.clone().into_bytes()).await;
            assert_eq!(status, 413, "{path} {size}: {error}");
            assert_eq!(code(&error), "payload_too_large", "{path}");
        }
        for path in SIGNED_ROUTES.iter().chain(&["/api/heartbeats"]) {
            if POLL_ROUTES.contains(path) {
                continue;
            }
            let response = signed_post(
                &server,
                path,
                &format!("big-{size}"),
                now(),
                body.as_bytes(),
            )
            .await;
            let (status, error) = read(response).await;
            assert_eq!(status, 413, "{path} {size}: {error}");
        }
    }
}

/// Routes that carry queued frames and log chunks, with their own larger limit.
const POLL_ROUTES: &[&str] = &["/v1/agents/poll", "/v1/commands/logs"];

#[tokio::test]
async fn polls_take_bodies_up_to_their_own_limit_and_no_more() {
    let (_t, server) = server().await;
    // 3 MiB: over axum's default 2 MiB, under MAX_POLL_BYTES (8 MiB). The HTTP layer used
    // to refuse it with a plain-text 413 although the route allows it.
    let pad = "x".repeat(3 * 1024 * 1024);
    let body = format!(r#"{{"instance_id":"acme-001","frames":[],"pad":"{pad}"}}"#);
    let (status, answer) = read(
        signed_post(
            &server,
            "/v1/agents/poll",
            "poll-3m",
            now(),
            body.as_bytes(),
        )
        .await,
    )
    .await;
    assert_eq!(status, 200, "{answer:.300}");
    let pad = "x".repeat(9 * 1024 * 1024);
    for path in POLL_ROUTES {
        let body = format!(r#"{{"instance_id":"acme-001","pad":"{pad}"}}"#);
        let (status, error) =
            read(signed_post(&server, path, "poll-9m", now(), body.as_bytes()).await).await;
        assert_eq!(status, 413, "{path}: {error}");
        assert_eq!(code(&error), "payload_too_large");
    }
}

#[tokio::test]
async fn oversized_arrays_answer_422_with_the_path() {
    let (_t, server) = server().await;
    let targets: Vec<String> = (0..10_001).map(|i| format!("i-{i}")).collect();
    let (status, error) = admin_post(
        &server,
        "/v1/commands/submit",
        serde_json::to_vec(&json!({"command_type": "STATUS", "targets": targets})).unwrap(),
    )
    .await;
    assert_eq!(status, 422, "{error}");
    assert_eq!(error["error"]["details"][0]["path"], "targets");
    let compatible = vec!["*"; 51];
    let (status, error) = admin_post(
        &server,
        "/api/plugins/releases",
        serde_json::to_vec(&json!({"name": "p", "version": "1.0.0", "compatible": compatible}))
            .unwrap(),
    )
    .await;
    assert_eq!(status, 422, "{error}");
    let frames = vec![json!({}); 300];
    let body = serde_json::to_vec(&json!({"instance_id": "acme-001", "frames": frames})).unwrap();
    let (status, error) =
        read(signed_post(&server, "/v1/agents/poll", "many", now(), &body).await).await;
    assert_eq!(status, 422, "{error}");
}

#[tokio::test]
async fn deeply_nested_json_is_a_422_not_a_stack_overflow() {
    let (_t, server) = server().await;
    let deep = nested(100_000);
    for path in ADMIN_BODY_ROUTES {
        let body = format!(r#"{{"instance_id":{deep}}}"#);
        let (status, error) = admin_post(&server, path, body.into_bytes()).await;
        assert_eq!(status, 422, "{path}: {error}");
        assert_eq!(code(&error), "invalid");
    }
    // Signed heartbeats: the nesting before and after `instance_id`, which is located in the
    // raw bytes before anything parses them.
    for (i, body) in [
        format!(r#"{{"pad":{deep},"instance_id":"acme-001","db_ok":true,"redis_ok":true,"storage_ok":true,"jobs_failed":0}}"#),
        format!(r#"{{"instance_id":"acme-001","db_ok":true,"redis_ok":true,"storage_ok":true,"jobs_failed":0,"pad":{deep}}}"#),
    ]
    .into_iter()
    .enumerate()
    {
        let response = server
            .send_v1(SECRET, &format!("deep-{i}"), now(), body.as_bytes())
            .await;
        let (status, error) = read(response).await;
        assert!(status == 422 || status == 401, "{i}: {status} {error}");
    }
    let (status, _) = server.get_json("/healthz", ADMIN).await;
    assert_eq!(status, 200, "the server is still up");
}

#[tokio::test]
async fn invalid_utf8_in_bodies_paths_and_queries_is_a_4xx_json_error() {
    let (_t, server) = server().await;
    for path in ADMIN_BODY_ROUTES {
        let (status, error) =
            admin_post(&server, path, b"{\"instance_id\":\"\xff\xfe\"}".to_vec()).await;
        assert_eq!(status, 422, "{path}: {error}");
    }
    // A query decodes lossily (U+FFFD), so it is only a search that finds nothing.
    let (status, page) = server.get_json("/api/installations?q=%FF%FE", ADMIN).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["total"], 0);
    // A percent-encoded byte sequence that is not UTF-8 in a path parameter: axum's
    // rejection, answered with the JSON error body like every other error.
    for path in ["/api/installations/%FF%FE", "/v1/commands/%FF/logs"] {
        let response = server
            .client
            .get(server.at(path))
            .bearer_auth(ADMIN)
            .send()
            .await
            .expect("send");
        let (status, error) = read(response).await;
        assert!((400..500).contains(&status), "{path}: {status} {error}");
        assert!(error["error"]["code"].is_string(), "{path}: {error}");
    }
    // Bytes that are not UTF-8 in a token header: refused like any wrong token.
    let response = server
        .client
        .get(server.at("/api/installations"))
        .header(
            "authorization",
            reqwest::header::HeaderValue::from_bytes(b"Bearer \xff\xfe").expect("header"),
        )
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn json_arrays_are_not_read_as_objects() {
    // serde fills a struct from an array of its fields in order: `[null, null]` scheduled
    // restores with the defaults before bodies had to be objects (found by schemathesis).
    let (_t, server) = server().await;
    for path in ADMIN_BODY_ROUTES {
        let (status, error) = admin_post(&server, path, b"[null, null]".to_vec()).await;
        assert_eq!(status, 422, "{path}: {error}");
        assert_eq!(
            error["error"]["details"][0]["message"], "must be a JSON object",
            "{path}"
        );
    }
    let (status, _) = server.get_json("/api/restores", ADMIN).await;
    assert_eq!(status, 200);
    let (_, restores) = server.get_json("/api/restores", ADMIN).await;
    assert_eq!(restores["items"], json!([]), "nothing scheduled");
}

#[tokio::test]
async fn malformed_signatures_on_every_signed_route_are_a_plain_401() {
    let (_t, server) = server().await;
    let body = br#"{"instance_id":"acme-001"}"#;
    let ts = now().to_string();
    let good = support::signer(SECRET).headers("m", now(), body);
    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        (
            "v1 not base64",
            vec![
                ("webhook-id", "m".into()),
                ("webhook-timestamp", ts.clone()),
                ("webhook-signature", "v1,!!!not*base64!!!".into()),
            ],
        ),
        (
            "v1 too short",
            vec![
                ("webhook-id", "m".into()),
                ("webhook-timestamp", ts.clone()),
                ("webhook-signature", "v1,AAAA".into()),
            ],
        ),
        (
            "v1 far too long",
            vec![
                ("webhook-id", "m".into()),
                ("webhook-timestamp", ts.clone()),
                ("webhook-signature", format!("v1,{}", "A".repeat(8000))),
            ],
        ),
        (
            "v1 unknown version only",
            vec![
                ("webhook-id", "m".into()),
                ("webhook-timestamp", ts.clone()),
                ("webhook-signature", good.signature.replace("v1,", "v9,")),
            ],
        ),
        ("v0 odd length", vec![("x-agent-signature", "abc".into())]),
        ("v0 not hex", vec![("x-agent-signature", "zz".repeat(32))]),
        (
            "v0 too long",
            vec![("x-agent-signature", "ab".repeat(4000))],
        ),
        ("nothing", vec![]),
    ];
    for path in SIGNED_ROUTES {
        for (what, headers) in &cases {
            let mut request = server.client.post(server.at(path)).body(body.to_vec());
            for (name, value) in headers {
                request = request.header(*name, value);
            }
            let (status, error) = read(request.send().await.expect("send")).await;
            assert_eq!(status, 401, "{path} {what}: {error}");
            assert_eq!(error["error"]["message"], "unauthorized", "{path} {what}");
        }
    }
}

#[tokio::test]
async fn replayed_and_out_of_window_requests_are_refused_on_job_routes() {
    let (_t, server) = server().await;
    let body = br#"{"instance_id":"acme-001"}"#;
    for path in [
        "/api/plugins/next",
        "/api/updates/next",
        "/api/restores/next",
    ] {
        let id = format!("once-{path}");
        // One timestamp for both: the same id signed in a later second is a retry, not a
        // replay, and two calls to `now()` may straddle a second.
        let signed_at = now();
        let first = signed_post(&server, path, &id, signed_at, body).await;
        assert_eq!(first.status(), 204, "{path}: no job yet");
        let replay = signed_post(&server, path, &id, signed_at, body).await;
        assert_eq!(replay.status(), 401, "{path}: replayed message id");
        for (what, ts) in [("future", now() + 600), ("past", now() - 600)] {
            let response = signed_post(&server, path, &format!("{what}-{path}"), ts, body).await;
            assert_eq!(response.status(), 401, "{path}: {what}-dated");
        }
    }
}

#[tokio::test]
async fn traversal_and_shell_syntax_in_names_are_refused_before_anything_runs() {
    let (_t, server) = server().await;
    for (i, name) in [
        "../../etc/passwd",
        "a/../../b",
        "..",
        "x; rm -rf /",
        "$(id)",
        "`id`",
        "a|b",
        "@scope/../x",
    ]
    .into_iter()
    .enumerate()
    {
        let release = json!({"name": name, "version": "1.0.0"});
        let (status, error) = admin_post(
            &server,
            "/api/plugins/releases",
            serde_json::to_vec(&release).unwrap(),
        )
        .await;
        assert_eq!(status, 422, "plugin release {name:?}: {error}");
        let request = json!({"instance_id": "acme-001", "name": name, "version": "1.0.0"});
        let response = signed_post(
            &server,
            "/api/plugins/requests",
            &format!("req-{i}"),
            now(),
            &serde_json::to_vec(&request).unwrap(),
        )
        .await;
        assert_eq!(response.status(), 422, "plugin request {name:?}");
    }
    for version in ["1.0.0/../../x", "1.0;reboot", "$(id)"] {
        let release = json!({"name": "billing", "version": version});
        let (status, _) = admin_post(
            &server,
            "/api/plugins/releases",
            serde_json::to_vec(&release).unwrap(),
        )
        .await;
        assert_eq!(status, 422, "plugin version {version:?}");
    }
    let compose = "c2VydmljZXM6IHt9Cg=="; // "services: {}"
    for project in [
        "../etc",
        "..",
        "a/b",
        "/abs",
        "web; rm -rf /",
        "$(id)",
        "a b",
    ] {
        for (kind, payload) in [
            (
                "DEPLOY_COMPOSE",
                json!({"project_name": project, "compose_file_base64": compose}),
            ),
            ("STOP_COMPOSE", json!({"project_name": project})),
        ] {
            let submit = json!({"command_type": kind, "targets": ["acme-001"], "payload": payload});
            let (status, error) = admin_post(
                &server,
                "/v1/commands/submit",
                serde_json::to_vec(&submit).unwrap(),
            )
            .await;
            assert_eq!(status, 422, "{kind} {project:?}: {error}");
        }
    }
    for package in ["nginx; rm -rf /", "$(id)", "-oAPT::x=y", "a b", "../x"] {
        let submit = json!({"command_type": "UpdatePackage", "targets": ["acme-001"],
            "payload": {"packages": [package], "action": "install"}});
        let (status, error) = admin_post(
            &server,
            "/v1/commands/submit",
            serde_json::to_vec(&submit).unwrap(),
        )
        .await;
        assert_eq!(status, 422, "package {package:?}: {error}");
    }
}

/// Every answer says not to guess its type, not to be framed and not to send a Referer; a
/// page also says it runs no script, so markup that slipped past the escaping does nothing.
#[tokio::test]
async fn answers_carry_the_security_headers_and_pages_a_policy_without_script() {
    let (_store, server) = server().await;
    for (path, html) in [
        ("/login", true),
        ("/healthz", false),
        ("/api/installations", false),
    ] {
        let response = server
            .client
            .get(server.at(path))
            .bearer_auth(ADMIN)
            .send()
            .await
            .expect("get");
        let headers = response.headers();
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        assert_eq!(header("x-content-type-options"), "nosniff", "{path}");
        assert_eq!(header("x-frame-options"), "DENY", "{path}");
        assert_eq!(header("referrer-policy"), "no-referrer", "{path}");
        let policy = header("content-security-policy");
        if html {
            assert!(
                policy.contains("default-src 'none'")
                    && !policy.contains("script-src")
                    && policy.contains("frame-ancestors 'none'")
                    && policy.contains("form-action 'self'"),
                "{path}: {policy}"
            );
        } else {
            assert!(policy.is_empty(), "{path}: {policy}");
        }
    }
    server.stop().await;
}
