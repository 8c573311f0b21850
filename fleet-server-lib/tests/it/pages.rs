//! The dashboard's pages as an operator walks them: paging through a large fleet, odd query
//! strings, addresses that name nothing, and a login cookie whose token was rotated away.

use fleet_server::Settings;
use serde_json::json;

use crate::support::{self, OPS, SUPPORT, TestServer, TestStore, body, now, on_both_backends};

on_both_backends!(a_large_fleet_pages_by_the_chosen_size_and_no_query_string_breaks_the_list);

/// GETs `path` as `token`: status, content type and body.
async fn page(server: &TestServer, path: &str, token: &str) -> (u16, String, String) {
    let response = server
        .client
        .get(server.at(path))
        .bearer_auth(token)
        .header("accept", "text/html")
        .send()
        .await
        .expect("get");
    let status = response.status().as_u16();
    let kind = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (status, kind, response.text().await.expect("text"))
}

async fn a_large_fleet_pages_by_the_chosen_size_and_no_query_string_breaks_the_list(t: TestStore) {
    let server = TestServer::start(t.store.clone()).await;
    for i in 0..25 {
        let hb = body(
            &format!("shop-{i:02}"),
            json!({"release_channel": "stable", "health": "ok"}),
        );
        let sent = server.send_v1(support::SHARED, "m", now(), &hb).await;
        assert_eq!(sent.status(), 200);
    }

    // The page size chosen stays in the links, so "next" moves by it.
    let (status, _, html) = page(&server, "/?limit=10&offset=10", SUPPORT).await;
    assert_eq!(status, 200);
    assert!(html.contains("11–20 of 25"), "{html}");
    assert!(
        html.contains("href=\"/?offset=0&limit=10\">← previous")
            && html.contains("href=\"/?offset=20&limit=10\">next →"),
        "{html}"
    );
    // An offset near the largest integer once overflowed while computing "next" (a panic
    // that dropped the connection in a debug build).
    let (status, _, html) = page(&server, "/?offset=9223372036854775807", SUPPORT).await;
    assert_eq!(status, 200);
    assert!(
        html.contains("past the last of the 25") && html.contains("href=\"/?offset=0\""),
        "an empty page past the end says so and leads back: {html}"
    );
    // A bad query is a page naming the problem, not a JSON body in the browser.
    for (bad, why) in [
        ("offset=-1", "offset must not be negative"),
        ("limit=0", "limit must be between 1 and 500"),
        ("limit=99999999999999999999", "limit"),
        ("offset=abc", "offset"),
    ] {
        let (status, kind, html) = page(&server, &format!("/?{bad}"), SUPPORT).await;
        assert_eq!(status, 400, "{bad}");
        assert!(kind.starts_with("text/html"), "{bad}: {kind}");
        assert!(
            html.contains(why) && html.contains("Back to the installations"),
            "{bad}: {html}"
        );
    }
    // A filter nothing matches: escaped in its field, and the empty list says why.
    let (status, _, html) = page(&server, "/?health=%22%3E%3Cscript%3Ex", SUPPORT).await;
    assert_eq!(status, 200);
    assert!(
        html.contains("value=\"&quot;&gt;&lt;script&gt;x\"") && !html.contains("<script>x"),
        "{html}"
    );
    assert!(
        html.contains("No installation matches these filters"),
        "{html}"
    );

    // Addresses that name nothing: a page for the browser, JSON for API clients.
    let (status, kind, html) = page(&server, "/installations/shop-00/nothing", SUPPORT).await;
    assert_eq!(status, 404);
    assert!(kind.starts_with("text/html"), "{kind}");
    assert!(html.contains("Nothing is at this address"), "{html}");
    let (status, error) = server.get_json("/nothing", SUPPORT).await;
    assert_eq!((status, support::code(&error)), (404, "not_found"));
    let ack = server
        .client
        .post(server.at("/alerts/987654/ack"))
        .bearer_auth(OPS)
        .send()
        .await
        .expect("ack");
    assert_eq!(ack.status(), 404);
    // A form answers an unknown id with the documented JSON error, as the other forms do.
    let error: serde_json::Value = ack.json().await.expect("json");
    assert_eq!(support::code(&error), "not_found", "{error}");

    // All fall silent, then one reports again: a health filter matches the Health column,
    // which shows the others as offline, not as the "ok" of their last heartbeat.
    t.store
        .mark_offline(now() + 10, now(), false)
        .await
        .expect("offline");
    let hb = body(
        "shop-00",
        json!({"release_channel": "stable", "health": "ok"}),
    );
    let sent = server.send_v1(support::SHARED, "m2", now(), &hb).await;
    assert_eq!(sent.status(), 200);
    for (health, total) in [("ok", 1), ("offline", 24)] {
        let (status, listed) = server
            .get_documented(&format!("/api/installations?health={health}"), SUPPORT)
            .await;
        assert_eq!(
            (status, listed["total"].as_i64()),
            (200, Some(total)),
            "{health}"
        );
    }
    let (_, _, html) = page(&server, "/?health=ok", SUPPORT).await;
    assert!(
        html.contains("1–1 of 1") && !html.contains(">offline<"),
        "{html}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_rotated_token_ends_the_session_with_a_reason_and_never_locks_the_user_out() {
    let t = support::sqlite().await;
    let server = TestServer::start_with(t.store.clone(), |b| {
        b.settings(Settings {
            auth_failures_per_minute: 4,
            ..Settings::default()
        })
    })
    .await;
    // The browser still holds the cookie of a token that was rotated away.
    let stale = "cp_role=ops; cp_token=the-token-before-rotation";
    let to_login = server
        .client
        .get(server.at("/"))
        .header("cookie", stale)
        .send()
        .await
        .expect("index");
    assert_eq!(to_login.status(), 303);
    let login = server
        .client
        .get(server.at("/login"))
        .header("cookie", stale)
        .send()
        .await
        .expect("login page");
    assert_eq!(login.status(), 200);
    let cleared: Vec<String> = login
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_owned))
        .collect();
    assert!(
        cleared.len() == 2 && cleared.iter().all(|c| c.contains("Max-Age=0")),
        "the login page drops the stale cookie: {cleared:?}"
    );
    assert!(
        login
            .text()
            .await
            .expect("text")
            .contains("Your session has ended")
    );
    // Without the cookie, looking around costs nothing, and the new token logs in.
    for _ in 0..5 {
        let page = server
            .client
            .get(server.at("/"))
            .send()
            .await
            .expect("index");
        assert_eq!(page.status(), 303);
    }
    let login = support::login_form(server.client.post(server.at("/login")), OPS)
        .send()
        .await
        .expect("login");
    assert_eq!(
        login.status(),
        303,
        "not held back by the stale cookie's failures"
    );
    server.stop().await;
}
