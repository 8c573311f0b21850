//! The dashboard in a real headless Chromium, driven through chromedriver (W3C WebDriver).

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{self, OPS, SECRET, TempDir, TestServer, body, now};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A chromedriver process and one browser session, both ended on drop.
struct Browser {
    driver: tokio::process::Child,
    base: String,
    session: String,
    http: reqwest::Client,
    _profile: TempDir,
}

impl Browser {
    async fn start() -> Self {
        let chromium = std::env::var("FLEET_TEST_CHROMIUM").unwrap_or_else(|_| {
            panic!(
                "FLEET_TEST_CHROMIUM is not set: the dashboard test needs a real Chromium and \
                 chromedriver. Run `eval \"$(scripts/services chromium)\"` first (scripts/test does this)."
            )
        });
        let chromedriver =
            std::env::var("FLEET_TEST_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let driver = tokio::process::Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {chromedriver}: {e}"));
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let mut ready = false;
        for _ in 0..100 {
            if let Ok(r) = http.get(format!("{base}/status")).send().await
                && let Ok(status) = r.json::<Value>().await
                && status["value"]["ready"] == true
            {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ready, "chromedriver did not become ready");
        let profile = TempDir::new();
        let args = [
            "--headless".to_owned(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--no-first-run".into(),
            format!("--user-data-dir={}", profile.0.display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args}
        }}});
        let created: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .expect("new session")
            .json()
            .await
            .expect("json");
        let session = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_owned();
        let browser = Self {
            driver,
            base,
            session,
            http,
            _profile: profile,
        };
        // A click on a submit button returns before the next page has loaded: let element
        // lookups wait for it.
        browser
            .call(
                reqwest::Method::POST,
                "/timeouts",
                json!({"implicit": 5000}),
            )
            .await;
        browser
    }

    /// Waits (up to 5 s) until the text of `css` contains `needle`, and returns it.
    async fn wait_text(&self, css: &str, needle: &str) -> String {
        let mut text = String::new();
        for _ in 0..50 {
            // A click that submits a form returns before the next page is there: an element
            // found on the old page can go stale before its text is read.
            text = self.try_text(css).await.unwrap_or_default();
            if text.contains(needle) {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{css} never contained {needle:?}; last text: {text}");
    }

    /// One WebDriver command; `Err` carries the driver's error answer.
    async fn try_call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> Result<Value, Value> {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut request = self.http.request(method.clone(), url);
        if method == reqwest::Method::POST {
            request = request.json(&body);
        }
        let response: Value = request
            .send()
            .await
            .expect("webdriver call")
            .json()
            .await
            .expect("json");
        if response["value"]["error"].is_null() {
            Ok(response["value"].clone())
        } else {
            Err(response)
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        self.try_call(method, path, body)
            .await
            .unwrap_or_else(|err| panic!("webdriver {path}: {err}"))
    }

    /// The text of `css`, or `None` while the page is changing under us.
    async fn try_text(&self, css: &str) -> Option<String> {
        let found = self
            .try_call(
                reqwest::Method::POST,
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await
            .ok()?;
        let id = found[ELEMENT].as_str()?.to_owned();
        let text = self
            .try_call(
                reqwest::Method::GET,
                &format!("/element/{id}/text"),
                Value::Null,
            )
            .await
            .ok()?;
        text.as_str().map(str::to_owned)
    }

    async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", json!({"url": url}))
            .await;
    }

    async fn url(&self) -> String {
        self.call(reqwest::Method::GET, "/url", Value::Null)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    async fn find(&self, css: &str) -> String {
        let found = self
            .call(
                reqwest::Method::POST,
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await;
        found[ELEMENT].as_str().expect("element id").to_owned()
    }

    async fn text(&self, css: &str) -> String {
        let id = self.find(css).await;
        let text = self
            .call(
                reqwest::Method::GET,
                &format!("/element/{id}/text"),
                Value::Null,
            )
            .await;
        text.as_str().unwrap_or_default().to_owned()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{id}/value"),
            json!({"text": text}),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let id = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{id}/click"),
            json!({}),
        )
        .await;
    }

    async fn quit(mut self) {
        let _ = self
            .http
            .delete(format!("{}/session/{}", self.base, self.session))
            .send()
            .await;
        let _ = self.driver.kill().await;
    }
}

#[tokio::test]
async fn a_browser_logs_in_sees_the_fleet_and_opens_an_installation() {
    let t = support::sqlite().await;
    let server = TestServer::start(t.store.clone()).await;
    for (i, cpu) in [15.0, 40.0, 25.0].into_iter().enumerate() {
        let hb = body(
            "acme-001",
            json!({"client": "Acme SA", "version": "1.2.3", "health": "ok",
            "cpu_usage_pct": cpu, "checks": [{"name": "db", "ok": true, "latency_ms": 2}],
            "alerts": [{"level": "error", "message": "Queue <stuck>"}]}),
        );
        assert_eq!(
            server
                .send_v1(SECRET, &format!("m{i}"), now(), &hb)
                .await
                .status(),
            200
        );
    }
    let hb = body("beta-002", json!({"client": "Beta", "health": "degraded"}));
    assert_eq!(server.send_v0(support::SHARED, &hb).await.status(), 200);

    let browser = Browser::start().await;
    browser.goto(&server.at("/")).await;
    assert!(
        browser.url().await.ends_with("/login"),
        "sent to the login page first"
    );
    browser.type_into("#token", OPS).await;
    browser.click("#login").await;
    let list = browser.wait_text("#installations", "beta-002").await;
    assert!(
        list.contains("acme-001") && list.contains("Acme SA") && list.contains("1.2.3"),
        "{list}"
    );
    assert!(
        list.contains("beta-002") && list.contains("degraded") && list.contains("v0"),
        "{list}"
    );
    // The fleet's alerts are one click away in the header, each linking to its installation.
    browser.click("header a[href='/alerts']").await;
    let alerts = browser.wait_text("#alerts", "Queue <stuck>").await;
    assert!(alerts.contains("acme-001"), "{alerts}");
    browser
        .click("#alerts a[href='/installations/acme-001']")
        .await;
    assert_eq!(browser.wait_text("#instance", "acme-001").await, "acme-001");
    let alerts = browser.text("#alerts").await;
    assert!(
        alerts.contains("Queue <stuck>"),
        "escaped text shows as typed: {alerts}"
    );
    assert!(browser.text("#checks").await.contains("db"));
    browser.find("#chart polyline").await;
    // ops may acknowledge from the page, without JavaScript: a plain form post.
    browser.click("#alerts button").await;
    browser.wait_text("#alerts", "acknowledged by ops").await;
    browser.quit().await;
}

#[tokio::test]
async fn a_browser_follows_a_command_to_its_targets_and_output_without_seeing_its_secrets() {
    use crate::commands::{INSTANCE, TestAgent, submit, wait_connected, wait_done};
    let t = support::sqlite().await;
    let server = TestServer::start(t.store.clone()).await;
    let agent = TestAgent::start(&server.url, INSTANCE, SECRET, None).await;
    wait_connected(&server.client, &server.url, 1).await;
    let (status, submitted) = submit(
        &server.client,
        &server.url,
        support::ADMIN,
        json!({"command_type": "RunCommand", "targets": [INSTANCE],
               "payload": {"cmd": "sh",
                           "args": ["-c", "echo \"<hello> from $GREETING_SOURCE\"; echo oops >&2; exit 3"],
                           "env": {"GREETING_SOURCE": "the agent", "API_TOKEN": "s3cr3t-value"}}}),
    )
    .await;
    assert_eq!(status, 201, "{submitted}");
    let id = submitted["id"].as_str().expect("id").to_owned();
    let done = wait_done(&server.client, &server.url, &id, Duration::from_secs(60)).await;
    assert_eq!(done["targets"][0]["status"], "failed", "{done}");

    let browser = Browser::start().await;
    browser.goto(&server.at("/login")).await;
    browser.type_into("#token", support::SUPPORT).await;
    browser.click("#login").await;
    browser.wait_text("header", "support").await;
    browser.click("a[href='/commands']").await;
    let list = browser.wait_text("#commands", "RunCommand").await;
    assert!(
        list.contains(INSTANCE)
            && list.contains("0 completed · 1 failed · 0 sent · 0 running · 0 queued")
            && list.contains("admin"),
        "{list}"
    );
    browser.click(&format!("a[href='/commands/{id}']")).await;
    let targets = browser.wait_text("#targets", INSTANCE).await;
    assert!(
        targets.contains("failed") && targets.contains('3'),
        "{targets}"
    );
    assert_eq!(browser.text("#submitted-by").await, "admin");
    // Output is shown as typed (escaped, not markup), stdout and stderr apart.
    assert_eq!(
        browser.text("#log-0-stdout").await,
        "<hello> from the agent"
    );
    assert_eq!(browser.text("#log-0-stderr").await, "oops");
    // Support sees which variables were set, not their values.
    let payload = browser.text("#payload").await;
    assert!(
        payload.contains("API_TOKEN") && payload.contains("hidden from support"),
        "{payload}"
    );
    let source = browser
        .call(reqwest::Method::GET, "/source", Value::Null)
        .await;
    assert!(
        !source.as_str().unwrap_or_default().contains("s3cr3t-value"),
        "the secret reached a support page"
    );
    browser.quit().await;

    // The JSON API agrees: hidden from support, whole for ops (who may run commands).
    let (_, shown) = server
        .get_json(&format!("/v1/commands/{id}"), support::SUPPORT)
        .await;
    assert!(!shown.to_string().contains("s3cr3t-value"), "{shown}");
    let (_, shown) = server.get_json(&format!("/v1/commands/{id}"), OPS).await;
    assert_eq!(shown["payload"]["env"]["API_TOKEN"], "s3cr3t-value");
    agent.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn support_pages_through_a_large_fleet_and_a_rotated_token_ends_the_session_plainly() {
    let t = support::sqlite().await;
    let server = TestServer::start(t.store.clone()).await;
    for i in 0..25 {
        let alerts = if i == 0 {
            json!([{"level": "error", "message": "Disk \"full\" <now>"}])
        } else {
            json!([])
        };
        let hb = body(&format!("shop-{i:02}"), json!({"alerts": alerts}));
        let sent = server.send_v1(support::SHARED, "m", now(), &hb).await;
        assert_eq!(sent.status(), 200);
    }

    let browser = Browser::start().await;
    browser.goto(&server.at("/login")).await;
    browser.type_into("#token", support::SUPPORT).await;
    browser.click("#login").await;
    browser.wait_text("header", "support").await;
    // A page size of 10 stays while paging by the links.
    browser.goto(&server.at("/?limit=10")).await;
    browser.wait_text("#pages", "1–10 of 25").await;
    browser.click("#pages a").await;
    browser.wait_text("#pages", "11–20 of 25").await;
    browser.click("#pages a:last-child").await;
    browser.wait_text("#pages", "21–25 of 25").await;
    // Support sees the alert as typed and open, with no Acknowledge button.
    browser.goto(&server.at("/installations/shop-00")).await;
    let alerts = browser.wait_text("#alerts", "open").await;
    assert!(alerts.contains("Disk \"full\" <now>"), "{alerts}");
    let button = browser
        .try_call(
            reqwest::Method::POST,
            "/element",
            json!({"using": "css selector", "value": "#alerts button"}),
        )
        .await;
    assert!(button.is_err(), "support cannot acknowledge");
    // A bad query string is a page of the dashboard, not raw JSON.
    browser.goto(&server.at("/?offset=-1")).await;
    browser
        .wait_text("main", "offset must not be negative")
        .await;

    // The token behind the cookie is rotated away: the next page says why the session
    // ended instead of silently showing the login form again.
    browser
        .call(
            reqwest::Method::POST,
            "/cookie",
            json!({"cookie": {"name": "cp_token", "value": "rotated-away", "path": "/"}}),
        )
        .await;
    browser.goto(&server.at("/")).await;
    browser.wait_text("main", "Your session has ended").await;
    browser.type_into("#token", OPS).await;
    browser.click("#login").await;
    browser.wait_text("header", "ops").await;
    browser.quit().await;
    server.stop().await;
}
