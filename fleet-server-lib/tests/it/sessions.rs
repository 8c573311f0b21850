//! Dashboard sessions: the login cookie holds a session id the server can revoke, expire and
//! tie to the role token, never the role token itself. Every test runs on SQLite and on
//! PostgreSQL.

use std::time::Duration;

use fleet_server::Settings;
use fleet_server::store::DashboardSession;
use sha2::Digest;

use crate::support::{self, ADMIN, OPS, SUPPORT, TestServer, TestStore, on_both_backends};

on_both_backends!(
    sessions_are_found_by_hash_until_they_expire_and_go_at_logout_or_when_pruned,
    the_cookie_is_a_fresh_session_id_not_the_role_token_nor_a_bearer_token,
    after_logout_the_old_cookie_no_longer_authenticates,
    an_expired_session_sends_the_browser_to_login_and_the_sweep_deletes_it,
    a_rotated_role_token_ends_that_roles_sessions_across_a_restart,
    a_cookie_holding_a_raw_role_token_is_not_logged_in_and_counts_as_a_failure,
);

/// The key a session id is stored under, as `DashboardSession::id_hash` documents it.
fn id_hash(id: &str) -> String {
    hex::encode(sha2::Sha256::digest(id.as_bytes()))
}

fn session(id: &str, role: &str, expires_at: i64) -> DashboardSession {
    DashboardSession {
        id_hash: id_hash(id),
        role: role.into(),
        token_fingerprint: format!("fingerprint-of-{id}"),
        created_at: 1_000,
        expires_at,
    }
}

async fn sessions_are_found_by_hash_until_they_expire_and_go_at_logout_or_when_pruned(
    t: TestStore,
) {
    let s = &t.store;
    let (live, ending, expired) = (
        session("live", "ops", 2_000),
        session("ending", "admin", 1_500),
        session("expired", "support", 1_200),
    );
    for stored in [&live, &ending, &expired] {
        s.create_session(stored).await.expect("create");
    }
    assert_eq!(
        s.session(&live.id_hash, 1_499).await.expect("read"),
        Some(live.clone())
    );
    assert_eq!(
        s.session(&ending.id_hash, 1_499).await.expect("read"),
        Some(ending.clone())
    );
    // Refused from its expiry on, even before the sweep deleted it.
    assert_eq!(s.session(&ending.id_hash, 1_500).await.expect("read"), None);
    assert_eq!(
        s.session(&expired.id_hash, 1_499).await.expect("read"),
        None
    );
    // Found by the hash only: the id itself is no key.
    assert_eq!(s.session("live", 1_499).await.expect("read"), None);
    assert_eq!(s.session(&id_hash("unknown"), 0).await.expect("read"), None);

    // The sweep deletes what expired by then and nothing else.
    assert_eq!(s.prune_sessions(1_500).await.expect("prune"), 2);
    assert_eq!(s.session(&expired.id_hash, 0).await.expect("read"), None);
    assert_eq!(s.session(&ending.id_hash, 0).await.expect("read"), None);
    assert_eq!(s.prune_sessions(1_500).await.expect("prune"), 0);

    // Logging out deletes the session whatever its expiry; twice is no error.
    s.delete_session(&live.id_hash).await.expect("delete");
    assert_eq!(s.session(&live.id_hash, 0).await.expect("read"), None);
    s.delete_session(&live.id_hash).await.expect("delete again");
}

/// Logs in with `token` and returns the session id the cookie holds.
async fn login(server: &TestServer, token: &str) -> String {
    let response = support::login_form(server.client.post(server.at("/login")), token)
        .send()
        .await
        .expect("login");
    assert_eq!(response.status(), 303, "login with a valid token");
    let cookies: Vec<&str> = response
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    assert_eq!(cookies.len(), 1, "only the session cookie: {cookies:?}");
    let pair = cookies[0].split(';').next().expect("name=value");
    let (name, value) = pair.split_once('=').expect("name=value");
    assert_eq!(name, "cp_token");
    value.to_owned()
}

/// The status of the dashboard's index for a browser sending `cookie`.
async fn index_with_cookie(server: &TestServer, cookie: &str) -> u16 {
    server
        .client
        .get(server.at("/"))
        .header("cookie", cookie)
        .send()
        .await
        .expect("index")
        .status()
        .as_u16()
}

/// The status of an API route for a client sending `request`'s credentials.
async fn api_status(request: reqwest::RequestBuilder) -> u16 {
    request.send().await.expect("api").status().as_u16()
}

async fn the_cookie_is_a_fresh_session_id_not_the_role_token_nor_a_bearer_token(t: TestStore) {
    let server = TestServer::start(t.store.clone()).await;
    let id = login(&server, OPS).await;
    assert!(!id.contains(OPS), "the cookie is not the role token");
    // At least 128 random bits, as hex.
    assert!(
        id.len() >= 32 && id.chars().all(|c| c.is_ascii_hexdigit()),
        "{id}"
    );
    assert_ne!(login(&server, OPS).await, id, "each login is a new session");
    // The store holds the id's hash with the role, never the id.
    let stored = t
        .store
        .session(&id_hash(&id), 0)
        .await
        .expect("read")
        .expect("stored under the id's hash");
    assert_eq!(stored.role, "ops");
    assert!(stored.expires_at > stored.created_at);
    assert!(!stored.token_fingerprint.contains(OPS));
    assert_eq!(t.store.session(&id, 0).await.expect("read"), None);

    // The session logs the browser in, on pages and on the API.
    let cookie = format!("cp_token={id}");
    assert_eq!(index_with_cookie(&server, &cookie).await, 200);
    let installations = server.at("/api/installations");
    let with_cookie = server.client.get(&installations).header("cookie", &cookie);
    assert_eq!(api_status(with_cookie).await, 200);
    // The session id is no Bearer token, on the API or on a page.
    let as_bearer = server.client.get(&installations).bearer_auth(&id);
    assert_eq!(api_status(as_bearer).await, 401);
    let page_as_bearer = server.client.get(server.at("/")).bearer_auth(&id);
    assert_eq!(api_status(page_as_bearer).await, 303);
    // A cookie claiming another role changes nothing: the role is the server's.
    let claimed = format!("cp_role=admin; cp_token={id}");
    let enroll = server
        .client
        .post(&installations)
        .header("cookie", claimed)
        .json(&serde_json::json!({"instance_id": "x"}))
        .send()
        .await
        .expect("enroll");
    assert_eq!(enroll.status(), 403, "still ops");
    // API clients are unaffected: Bearer and the ERP's admin header work as before.
    let bearer = server.client.get(&installations).bearer_auth(SUPPORT);
    assert_eq!(api_status(bearer).await, 200);
    let erp = server
        .client
        .get(&installations)
        .header("x-cp-admin-token", ADMIN);
    assert_eq!(api_status(erp).await, 200);
    server.stop().await;
}

async fn after_logout_the_old_cookie_no_longer_authenticates(t: TestStore) {
    let server = TestServer::start(t.store.clone()).await;
    let id = login(&server, OPS).await;
    let other_browser = login(&server, OPS).await;
    let cookie = format!("cp_token={id}");
    assert_eq!(index_with_cookie(&server, &cookie).await, 200);
    let logout = server
        .client
        .post(server.at("/logout"))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("logout");
    assert_eq!(logout.status(), 303);
    assert_eq!(logout.headers()["location"], "/login");
    let cleared: Vec<&str> = logout
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    assert!(
        cleared.iter().any(|c| c.starts_with("cp_token=;")),
        "{cleared:?}"
    );
    assert!(
        cleared.iter().all(|c| c.contains("Max-Age=0")),
        "{cleared:?}"
    );

    // A copy of the cookie kept from before the logout is refused everywhere.
    assert_eq!(index_with_cookie(&server, &cookie).await, 303);
    let api = server
        .client
        .get(server.at("/api/installations"))
        .header("cookie", &cookie);
    assert_eq!(api_status(api).await, 401);
    assert_eq!(t.store.session(&id_hash(&id), 0).await.expect("read"), None);
    // Only that session ended: another browser of the same role stays logged in.
    let other = format!("cp_token={other_browser}");
    assert_eq!(index_with_cookie(&server, &other).await, 200);
    server.stop().await;
}

async fn an_expired_session_sends_the_browser_to_login_and_the_sweep_deletes_it(t: TestStore) {
    let server = TestServer::start_with(t.store.clone(), |b| {
        b.settings(Settings {
            session_lifetime: Duration::from_secs(3),
            sweep_interval: Duration::from_millis(100),
            ..Settings::default()
        })
    })
    .await;
    let id = login(&server, SUPPORT).await;
    let cookie = format!("cp_token={id}");
    // Valid for at least two seconds (whole seconds count): time enough for one page.
    assert_eq!(index_with_cookie(&server, &cookie).await, 200);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(index_with_cookie(&server, &cookie).await, 303);
    let login_page = server
        .client
        .get(server.at("/login"))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("login page");
    assert_eq!(login_page.status(), 200);
    let text = login_page.text().await.expect("text");
    assert!(text.contains("Your session has ended"), "{text}");
    // The sweep (every 100 ms here) has deleted the row by now.
    assert_eq!(t.store.session(&id_hash(&id), 0).await.expect("read"), None);
    server.stop().await;
}

async fn a_rotated_role_token_ends_that_roles_sessions_across_a_restart(t: TestStore) {
    let server = TestServer::start(t.store.clone()).await;
    let ops = format!("cp_token={}", login(&server, OPS).await);
    let admin = format!("cp_token={}", login(&server, ADMIN).await);
    server.stop().await;

    // The ops token is rotated; the control plane restarts on the same database.
    const ROTATED: &str = "ops-token-after-rotation";
    let server = TestServer::start_with(t.store.clone(), |b| {
        b.tokens(fleet_server::RoleTokens {
            ops: Some(ROTATED.into()),
            ..support::tokens()
        })
    })
    .await;
    assert_eq!(
        index_with_cookie(&server, &ops).await,
        303,
        "ops logged out"
    );
    let login_page = server
        .client
        .get(server.at("/login"))
        .header("cookie", &ops)
        .send()
        .await
        .expect("login page");
    let text = login_page.text().await.expect("text");
    assert!(text.contains("Your session has ended"), "{text}");
    // Sessions outlive a restart: the admin token did not change.
    assert_eq!(index_with_cookie(&server, &admin).await, 200);
    // The new token logs in; the old one no longer does.
    let fresh = format!("cp_token={}", login(&server, ROTATED).await);
    assert_eq!(index_with_cookie(&server, &fresh).await, 200);
    let old = support::login_form(server.client.post(server.at("/login")), OPS)
        .send()
        .await
        .expect("login");
    assert_eq!(old.status(), 401);
    server.stop().await;
}

async fn a_cookie_holding_a_raw_role_token_is_not_logged_in_and_counts_as_a_failure(t: TestStore) {
    let server = TestServer::start_with(t.store.clone(), |b| {
        b.settings(Settings {
            auth_failures_per_minute: 3,
            ..Settings::default()
        })
    })
    .await;
    // The cookies this control plane set before sessions: the role token itself.
    let before_upgrade = format!("cp_role=admin; cp_token={ADMIN}");
    assert_eq!(index_with_cookie(&server, &before_upgrade).await, 303);
    let api = server
        .client
        .get(server.at("/api/installations"))
        .header("cookie", &before_upgrade);
    assert_eq!(api_status(api).await, 401);
    // The login page says the session ended and drops both cookies.
    let login_page = server
        .client
        .get(server.at("/login"))
        .header("cookie", &before_upgrade)
        .send()
        .await
        .expect("login page");
    let cleared: Vec<String> = login_page
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_owned))
        .collect();
    assert!(
        ["cp_role=;", "cp_token=;"]
            .iter()
            .all(|name| cleared.iter().any(|c| c.starts_with(name))),
        "{cleared:?}"
    );
    let text = login_page.text().await.expect("text");
    assert!(text.contains("Your session has ended"), "{text}");
    // Those were three failed checks: the client is held back, even with a right token.
    let held = server
        .client
        .get(server.at("/api/installations"))
        .bearer_auth(ADMIN);
    assert_eq!(api_status(held).await, 429);
    server.stop().await;
}
