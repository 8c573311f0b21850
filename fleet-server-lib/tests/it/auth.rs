//! Roles: the route × role matrix, login cookies, the ERP's admin header.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::support::{self, ADMIN, OPS, SECRET, SUPPORT, TestServer, body, now};

/// Who calls: nobody, or a Bearer token of a role.
const CALLERS: [(&str, Option<&str>); 4] = [
    ("none", None),
    ("support", Some(SUPPORT)),
    ("ops", Some(OPS)),
    ("admin", Some(ADMIN)),
];

/// (method, route template, request path, expected status for none/support/ops/admin).
/// `{alert}` in the path is replaced by a real alert id.
const MATRIX: &[(&str, &str, &str, [u16; 4])] = &[
    // Agents prove themselves with a signature, never with a role token.
    (
        "POST",
        "/api/heartbeats",
        "/api/heartbeats",
        [401, 401, 401, 401],
    ),
    (
        "GET",
        "/api/installations",
        "/api/installations",
        [401, 200, 200, 200],
    ),
    (
        "POST",
        "/api/installations",
        "/api/installations",
        [401, 403, 403, 201],
    ),
    (
        "GET",
        "/api/installations/{instance_id}",
        "/api/installations/acme-001",
        [401, 200, 200, 200],
    ),
    // An unknown instance: admin passes the role check and gets the 404.
    (
        "POST",
        "/api/installations/{instance_id}/archive",
        "/api/installations/nope/archive",
        [401, 403, 403, 404],
    ),
    ("GET", "/api/alerts", "/api/alerts", [401, 200, 200, 200]),
    (
        "POST",
        "/api/alerts/{id}/ack",
        "/api/alerts/{alert}/ack",
        [401, 403, 200, 200],
    ),
    ("GET", "/healthz", "/healthz", [200, 200, 200, 200]),
    ("GET", "/metrics", "/metrics", [200, 200, 200, 200]),
    (
        "GET",
        "/openapi.json",
        "/openapi.json",
        [200, 200, 200, 200],
    ),
    // Pages send a browser without credentials to /login.
    ("GET", "/", "/", [303, 200, 200, 200]),
    (
        "GET",
        "/installations/{instance_id}",
        "/installations/acme-001",
        [303, 200, 200, 200],
    ),
    (
        "POST",
        "/installations/{instance_id}/archive",
        "/installations/nope/archive",
        [303, 403, 403, 404],
    ),
    ("GET", "/alerts", "/alerts", [303, 200, 200, 200]),
    (
        "POST",
        "/alerts/{id}/ack",
        "/alerts/{alert}/ack",
        [303, 403, 303, 303],
    ),
    ("GET", "/login", "/login", [200, 200, 200, 200]),
    // The form carries the caller's token (empty for "none").
    ("POST", "/login", "/login", [401, 303, 303, 303]),
    ("POST", "/logout", "/logout", [303, 303, 303, 303]),
    // Registration, the live channel and commands (issue 6).
    (
        "GET",
        "/.well-known/jwks.json",
        "/.well-known/jwks.json",
        [200, 200, 200, 200],
    ),
    // Unsigned and without an enrollment token: the empty body is refused first.
    (
        "POST",
        "/v1/agents/register",
        "/v1/agents/register",
        [422, 422, 422, 422],
    ),
    (
        "POST",
        "/v1/enrollments",
        "/v1/enrollments",
        [401, 403, 403, 422],
    ),
    // Role tokens are not agent tokens.
    (
        "GET",
        "/v1/agents/connect",
        "/v1/agents/connect",
        [401, 401, 401, 401],
    ),
    (
        "GET",
        "/v1/agents/connected",
        "/v1/agents/connected",
        [401, 200, 200, 200],
    ),
    (
        "POST",
        "/v1/agents/poll",
        "/v1/agents/poll",
        [401, 401, 401, 401],
    ),
    (
        "POST",
        "/v1/commands/logs",
        "/v1/commands/logs",
        [401, 401, 401, 401],
    ),
    (
        "POST",
        "/v1/commands/submit",
        "/v1/commands/submit",
        [401, 403, 422, 422],
    ),
    ("GET", "/v1/commands", "/v1/commands", [401, 200, 200, 200]),
    (
        "GET",
        "/v1/commands/{id}",
        "/v1/commands/nope",
        [401, 404, 404, 404],
    ),
    (
        "GET",
        "/v1/commands/{id}/logs",
        "/v1/commands/nope/logs",
        [401, 404, 404, 404],
    ),
    (
        "POST",
        "/v1/commands/{id}/cancel",
        "/v1/commands/nope/cancel",
        [401, 403, 404, 404],
    ),
    // The dashboard's command pages: every role reads them.
    ("GET", "/commands", "/commands", [303, 200, 200, 200]),
    (
        "POST",
        "/commands/{id}/cancel",
        "/commands/nope/cancel",
        [303, 403, 404, 404],
    ),
    (
        "GET",
        "/commands/{id}",
        "/commands/nope",
        [303, 404, 404, 404],
    ),
];

#[tokio::test]
async fn every_route_answers_each_role_as_specified() {
    let t = support::sqlite().await;
    let server = TestServer::start(t.store.clone()).await;
    let hb = body(
        "acme-001",
        json!({"slo_p95_ms": 1.0e6, "slo_error_rate": 0.9}),
    );
    let settings_breach = server.send_v1(SECRET, "m1", now(), &hb).await;
    assert_eq!(settings_breach.status(), 200);
    // No SLO maxima are set by default: raise an alert from the payload instead.
    let hb = body(
        "acme-001",
        json!({"alerts": [{"level": "error", "message": "disk"}]}),
    );
    assert_eq!(server.send_v1(SECRET, "m2", now(), &hb).await.status(), 200);
    let (_, alerts) = server.get_json("/api/alerts", SUPPORT).await;
    let alert = alerts["items"][0]["id"].as_i64().expect("an alert");

    let mut failures = Vec::new();
    let mut answered = Vec::new();
    for (method, route, path, expected) in MATRIX.iter().chain(crate::rollout_auth::MATRIX) {
        for ((who, token), want) in CALLERS.iter().zip(expected) {
            let url = server.at(&path.replace("{alert}", &alert.to_string()));
            let mut request = match *method {
                "GET" => server.client.get(url),
                _ => server.client.post(url),
            };
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            request = match *path {
                "/api/installations" if *method == "POST" => {
                    request.json(&json!({"instance_id": format!("new-{who}")}))
                }
                "/login" if *method == "POST" => support::login_form(request, token.unwrap_or("")),
                _ => request,
            };
            let got = request.send().await.expect("send").status().as_u16();
            answered.push((method.to_lowercase(), *route, got));
            if got != *want {
                failures.push(format!("{method} {path} as {who}: got {got}, want {want}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The matrix covers every route the OpenAPI document lists, and nothing else.
    let (_, spec) = server.get_json("/openapi.json", SUPPORT).await;
    let documented: BTreeSet<(String, String)> = spec["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .expect("ops")
                .keys()
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect();
    let tested: BTreeSet<(String, String)> = MATRIX
        .iter()
        .chain(crate::rollout_auth::MATRIX)
        .map(|(m, route, _, _)| ((*m).to_owned(), (*route).to_owned()))
        .collect();
    assert_eq!(documented, tested);

    // Every status a route answered is one the document lists for it (schemathesis found
    // undocumented 401s on agent routes and 404s on dashboard forms).
    let undocumented: Vec<String> = answered
        .iter()
        .filter(|(method, route, status)| {
            spec["paths"][*route][method]["responses"]
                .get(status.to_string())
                .is_none()
        })
        .map(|(method, route, status)| format!("{method} {route}: {status}"))
        .collect();
    assert!(undocumented.is_empty(), "undocumented: {undocumented:?}");
}

#[tokio::test]
async fn login_sets_an_httponly_samesite_cookie_that_authorizes_and_logout_clears_it() {
    let t = support::sqlite().await;
    let server = TestServer::start(t.store.clone()).await;
    let response = support::login_form(server.client.post(server.at("/login")), OPS)
        .send()
        .await
        .expect("login");
    assert_eq!(response.status(), 303);
    assert_eq!(response.headers()["location"], "/");
    let cookies: Vec<String> = response
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().expect("ascii").to_owned())
        .collect();
    assert_eq!(cookies.len(), 1, "the session cookie only: {cookies:?}");
    for c in &cookies {
        assert!(
            c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Path=/"),
            "{c}"
        );
    }
    let jar: Vec<&str> = cookies
        .iter()
        .map(|c| c.split(';').next().expect("pair"))
        .collect();
    let cookie = jar.join("; ");
    let page = server
        .client
        .get(server.at("/"))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("index");
    assert_eq!(page.status(), 200);
    // The ops cookie may acknowledge but not enroll.
    let enroll = server
        .client
        .post(server.at("/api/installations"))
        .header("cookie", &cookie)
        .json(&json!({"instance_id": "x"}))
        .send()
        .await
        .expect("enroll");
    assert_eq!(enroll.status(), 403);
    // A cookie holding a role token, as before sessions, logs nobody in.
    let forged = format!("cp_role=admin; cp_token={OPS}");
    let page = server
        .client
        .get(server.at("/"))
        .header("cookie", forged)
        .send()
        .await
        .expect("index");
    assert_eq!(page.status(), 303);
    // A malformed login form is a failed login, not an error page of another format.
    let odd = server
        .client
        .post(server.at("/login"))
        .json(&json!({"token": OPS}))
        .send()
        .await
        .expect("login");
    assert_eq!(odd.status(), 401);
    let logout = server
        .client
        .post(server.at("/logout"))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("logout");
    let cleared: Vec<&str> = logout
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    assert!(
        cleared.iter().all(|c| c.contains("Max-Age=0")),
        "{cleared:?}"
    );
}

#[tokio::test]
async fn the_erp_admin_header_is_honoured_and_errors_are_json() {
    let t = support::sqlite().await;
    let server = TestServer::start(t.store.clone()).await;
    let response = server
        .client
        .post(server.at("/api/installations"))
        .header("x-cp-admin-token", ADMIN)
        .json(&json!({"instance_id": "erp-1"}))
        .send()
        .await
        .expect("enroll");
    assert_eq!(response.status(), 201);
    let response = server
        .client
        .post(server.at("/api/installations"))
        .header("x-cp-admin-token", OPS)
        .json(&json!({"instance_id": "erp-2"}))
        .send()
        .await
        .expect("enroll");
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.expect("json");
    assert_eq!(
        body,
        json!({"error": {"code": "unauthorized", "message": "unauthorized"}})
    );
}

#[tokio::test]
async fn a_client_that_keeps_guessing_tokens_is_held_back_and_others_are_not() {
    let t = support::sqlite().await;
    let settings = fleet_server::Settings {
        auth_failures_per_minute: 3,
        ..fleet_server::Settings::default()
    };
    let server = TestServer::start_with(t.store.clone(), |b| b.settings(settings)).await;
    let installations = server.at("/api/installations");
    for guess in ["guess-1", "guess-2", "guess-3"] {
        let response = server
            .client
            .get(&installations)
            .bearer_auth(guess)
            .send()
            .await
            .expect("guess");
        assert_eq!(response.status(), 401, "{guess}");
    }
    // Now even the right token is not looked at, or guessing could go on at full speed.
    let held = server
        .client
        .get(&installations)
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("held");
    assert_eq!(held.status(), 429);
    let retry_after: u64 = held.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let answer: Value = held.json().await.expect("json");
    assert_eq!(answer["error"]["code"], "too_many_attempts");
    // The same for the ERP's header, the login form and the login cookie.
    let header = server
        .client
        .get(&installations)
        .header("x-cp-admin-token", ADMIN)
        .send()
        .await
        .expect("header");
    assert_eq!(header.status(), 429);
    let login = support::login_form(server.client.post(server.at("/login")), ADMIN)
        .send()
        .await
        .expect("login");
    assert_eq!(login.status(), 429);
    assert!(login.headers().contains_key("retry-after"));
    let page = login.text().await.expect("page");
    assert!(page.contains("too many failed credential checks"), "{page}");
    let cookie = server
        .client
        .get(server.at("/"))
        .header("cookie", format!("cp_role=admin; cp_token={ADMIN}"))
        .send()
        .await
        .expect("cookie");
    assert_eq!(cookie.status(), 429);
    // A request without credentials is answered as before, and agents, which sign their
    // heartbeats instead, are not affected.
    let anonymous = server
        .client
        .get(&installations)
        .send()
        .await
        .expect("anon");
    assert_eq!(anonymous.status(), 401);
    let heartbeat = server
        .send_v1(
            support::SHARED,
            "msg-held",
            now(),
            &body("acme-held", json!({})),
        )
        .await;
    assert_eq!(heartbeat.status(), 200);
    // Another client address keeps its own allowance.
    let other = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .expect("client");
    let response = other
        .get(&installations)
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("other client");
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_forwarded_client_has_its_own_allowance() {
    let t = support::sqlite().await;
    let settings = fleet_server::Settings {
        auth_failures_per_minute: 2,
        trusted_proxies: vec!["127.0.0.1/32".parse().expect("network")],
        ..fleet_server::Settings::default()
    };
    let server = TestServer::start_with(t.store.clone(), |b| b.settings(settings)).await;
    let installations = server.at("/api/installations");
    let status = |client: reqwest::Client, forwarded: Option<&'static str>, token: &'static str| {
        let url = installations.clone();
        async move {
            let mut request = client.get(url).bearer_auth(token);
            if let Some(forwarded) = forwarded {
                request = request.header("x-forwarded-for", forwarded);
            }
            request.send().await.expect("request").status().as_u16()
        }
    };
    let proxy = server.client.clone();
    // Two clients behind the proxy (127.0.0.1): one guesses, the other is not held back.
    for guess in ["guess-1", "guess-2"] {
        assert_eq!(status(proxy.clone(), Some("203.0.113.5"), guess).await, 401);
    }
    assert_eq!(status(proxy.clone(), Some("203.0.113.5"), ADMIN).await, 429);
    assert_eq!(
        status(proxy.clone(), Some("198.51.100.1, 203.0.113.6"), ADMIN).await,
        200
    );
    assert_eq!(
        status(proxy.clone(), None, ADMIN).await,
        200,
        "the proxy itself"
    );
    // A peer that is not a trusted proxy cannot escape its allowance with the header.
    let direct = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .expect("client");
    assert_eq!(
        status(direct.clone(), Some("192.0.2.1"), "guess-3").await,
        401
    );
    assert_eq!(
        status(direct.clone(), Some("192.0.2.2"), "guess-4").await,
        401
    );
    assert_eq!(status(direct, Some("192.0.2.3"), ADMIN).await, 429);
}

#[tokio::test]
async fn behind_a_proxy_writing_forwarded_only_that_header_names_the_client() {
    let t = support::sqlite().await;
    let settings = fleet_server::Settings {
        auth_failures_per_minute: 1,
        trusted_proxies: vec!["127.0.0.1/32".parse().expect("network")],
        proxy_header: fleet_server::ProxyHeader::Forwarded,
        ..fleet_server::Settings::default()
    };
    let server = TestServer::start_with(t.store.clone(), |b| b.settings(settings)).await;
    let installations = server.at("/api/installations");
    let status = |headers: &'static [(&'static str, &'static str)], token: &'static str| {
        let mut request = server.client.get(&installations).bearer_auth(token);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        async move { request.send().await.expect("request").status().as_u16() }
    };
    let guesser = &[("forwarded", "for=\"[2001:db8::5]:4711\";proto=https")];
    assert_eq!(status(guesser, "guess-1").await, 401);
    assert_eq!(status(guesser, ADMIN).await, 429);
    // The same host's /64, through X-Forwarded-For too: still held back, because that
    // header passes through the proxy unread.
    let disguised = &[
        ("forwarded", "for=\"[2001:db8::6]\""),
        ("x-forwarded-for", "198.51.100.7"),
    ];
    assert_eq!(status(disguised, ADMIN).await, 429);
    // Another client behind the proxy keeps its allowance.
    assert_eq!(status(&[("forwarded", "for=192.0.2.10")], ADMIN).await, 200);
}

#[tokio::test]
async fn replicas_sharing_a_database_hold_a_guesser_back_together() {
    // The shared count is per wall-clock minute: start well inside one.
    let second_of_minute = fleet_core::unix_now().rem_euclid(60);
    if second_of_minute > 45 {
        tokio::time::sleep(std::time::Duration::from_secs(61 - second_of_minute as u64)).await;
    }
    let t = support::sqlite().await;
    let settings = || fleet_server::Settings {
        auth_failures_per_minute: 3,
        ..fleet_server::Settings::default()
    };
    let first = TestServer::start_with(t.store.clone(), |b| b.settings(settings())).await;
    let second = TestServer::start_with(t.store.clone(), |b| b.settings(settings())).await;
    // The guesser never tries the third replica before it is held back everywhere.
    let third = TestServer::start_with(t.store.clone(), |b| b.settings(settings())).await;
    let status = |server: &TestServer, token: &'static str| {
        let request = server
            .client
            .get(server.at("/api/installations"))
            .bearer_auth(token);
        async move { request.send().await.expect("request").status().as_u16() }
    };
    // Three guesses spread over the two replicas: neither counted more than two itself.
    assert_eq!(status(&first, "guess-1").await, 401);
    assert_eq!(status(&second, "guess-2").await, 401);
    assert_eq!(status(&first, "guess-3").await, 401);
    // Each shares its count once a second, and every replica learns who reached the limit,
    // including the one the guesser has not tried yet.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for server in [&first, &second, &third] {
        loop {
            match status(server, ADMIN).await {
                429 => break,
                200 if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                other => panic!("the guesser was not held back: {other}"),
            }
        }
    }
}
