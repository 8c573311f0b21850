//! The `fleet-server` binary: configuration errors, `serve`, and the one-command demo.

use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::{BIN, free_addr, temp_dir};

/// A command with none of the caller's CONTROL_PLANE_* settings.
fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

async fn wait_ok(client: &reqwest::Client, url: &str, token: Option<&str>) -> serde_json::Value {
    for _ in 0..100 {
        let mut request = client.get(url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Ok(r) = request.send().await
            && r.status().is_success()
            && let Ok(body) = r.json::<serde_json::Value>().await
        {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{url} never answered 200");
}

/// A demo running in a fresh data folder on a free address, its agents beating every
/// second, with its admin token.
struct Demo {
    dir: std::path::PathBuf,
    addr: String,
    demo: Child,
    client: reqwest::Client,
    base: String,
    token: String,
}

async fn start_demo() -> Demo {
    let dir = temp_dir("cli");
    let addr = free_addr();
    let demo = command(&[
        "demo",
        "--data",
        dir.to_str().expect("utf8"),
        "--listen",
        &addr,
        "--interval-secs",
        "1",
    ])
    .spawn()
    .expect("start");
    let client = reqwest::Client::new();
    let base = format!("http://{addr}");
    wait_ok(&client, &format!("{base}/healthz"), None).await;
    let token = std::fs::read_to_string(dir.join("admin-token")).expect("token file");
    Demo {
        dir,
        addr,
        demo,
        client,
        base,
        token: token.trim().to_owned(),
    }
}

/// The demo's installations as (instance id, version), once `ready` holds of them (or after
/// 10 s, to let the caller's assertion say what was there).
async fn demo_versions(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    ready: impl Fn(&[(String, String)]) -> bool,
) -> Vec<(String, String)> {
    let mut listed = Vec::new();
    for _ in 0..50 {
        let list = wait_ok(client, &format!("{base}/api/installations"), Some(token)).await;
        listed = list["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|i| {
                let text = |name: &str| i[name].as_str().unwrap_or_default().to_owned();
                (text("instance_id"), text("version"))
            })
            .collect();
        if ready(&listed) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    listed
}

#[tokio::test]
async fn every_configuration_problem_is_named_at_once() {
    let output = command(&["serve"])
        .env(
            "CONTROL_PLANE_AGENT_SECRETS",
            r#"{"acme":"","ok":"top-secret-value"}"#,
        )
        .env("SLO_ERROR_RATE_MAX", "5")
        .env("FLEET_LISTEN", "not-an-address")
        .output()
        .await
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for name in [
        "FLEET_LISTEN",
        "CONTROL_PLANE_ADMIN_TOKEN",
        "CONTROL_PLANE_AGENT_SECRETS[\"acme\"]",
        "SLO_ERROR_RATE_MAX",
    ] {
        assert!(stderr.contains(name), "{name} named in:\n{stderr}");
    }
    assert!(stderr.contains("4 problems"), "{stderr}");
    assert!(!stderr.contains("top-secret-value"), "no secret printed");

    // A RUST_LOG that is not a filter is named, not dropped in silence.
    let output = command(&["serve"])
        .env("RUST_LOG", "info,fleet_server=loud")
        .output()
        .await
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("RUST_LOG is not a valid log filter"),
        "{stderr}"
    );
}

#[tokio::test]
async fn serve_uses_the_erp_environment() {
    let dir = temp_dir("cli");
    let addr = free_addr();
    let _server: Child = command(&["serve"])
        .env("FLEET_LISTEN", &addr)
        .env(
            "CONTROL_PLANE_DATABASE_URL",
            format!("sqlite://{}", dir.join("cp.db").display()),
        )
        .env("CONTROL_PLANE_ADMIN_TOKEN", "admin-token")
        .env("CONTROL_PLANE_AGENT_TOKEN", "shared-secret")
        .spawn()
        .expect("start");
    let client = reqwest::Client::new();
    let base = format!("http://{addr}");
    wait_ok(&client, &format!("{base}/healthz"), None).await;
    let body = br#"{"instance_id":"erp-1","db_ok":true,"redis_ok":true,"storage_ok":true,"jobs_failed":0}"#;
    let signature = fleet_core::sign_v0(
        &fleet_core::Secret::new("shared-secret").expect("secret"),
        body,
    );
    let response = client
        .post(format!("{base}/api/heartbeats"))
        .header("x-agent-signature", signature)
        .body(body.to_vec())
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    let list = wait_ok(
        &client,
        &format!("{base}/api/installations"),
        Some("admin-token"),
    )
    .await;
    assert_eq!(list["items"][0]["instance_id"], "erp-1");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn demo_prints_a_login_and_its_agents_fill_the_dashboard() {
    let Demo {
        dir,
        addr,
        mut demo,
        client,
        base,
        token,
    } = start_demo().await;
    let listed = demo_versions(&client, &base, &token, |listed| listed.len() == 3).await;
    let names: Vec<&str> = listed.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["demo-legacy", "demo-shop-1", "demo-shop-2"]);
    let page = client
        .get(format!("{base}/"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("page");
    assert!(page.text().await.expect("html").contains("demo-shop-1"));
    demo.kill().await.expect("stop");
    let output = demo.wait_with_output().await.expect("output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(&format!("http://{addr}/")) && stdout.contains(&token),
        "{stdout}"
    );
    // Logs go to stderr, without colour codes when it is not a terminal; stdout holds only
    // what the demo prints for its user.
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("fleet-server listening"), "{stderr}");
    assert!(!stderr.contains('\x1b'), "{stderr}");
    assert!(!stdout.contains("listening"), "{stdout}");
    // The demo keeps its agent token key in its database, so nothing warns about a key that
    // a restart would lose.
    assert!(!stderr.contains("WARN"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

/// The demo trusts the release key it keeps in its data folder, and its agents take the
/// update jobs of a rollout: a rollout to the stable channel completes by itself and the
/// stable instances report the new version, while the beta one keeps its own.
#[tokio::test]
async fn a_rollout_signed_with_the_demo_key_reaches_the_demo_agents() {
    let Demo {
        dir,
        mut demo,
        client,
        base,
        token,
        ..
    } = start_demo().await;
    let token = token.as_str();
    // A rollout's targets are the channel's instances when it is created.
    demo_versions(&client, &base, token, |listed| listed.len() == 3).await;
    let key_text = std::fs::read_to_string(dir.join("release.key")).expect("release key");
    let key = fleet_core::manifest::PrivateKey::from_base64(key_text.trim()).expect("key");
    let public = std::fs::read_to_string(dir.join("release.key.pub")).expect("public key");
    assert_eq!(public.trim(), key.public_key().to_base64());
    use std::os::unix::fs::PermissionsExt;
    // The key, and the database that holds the key behind agent tokens and issued secrets,
    // are their owner's only.
    for file in ["release.key", "fleet.db", "fleet.db-wal"] {
        let mode = std::fs::metadata(dir.join(file))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }

    let manifest = serde_json::json!({"version": "9.9.0", "sha": "abc123", "channel": "stable",
        "migrations_required": false, "breaking_changes": false,
        "released_at": "2026-12-07T10:00:00Z"});
    let post = |path: &str, body: serde_json::Value| {
        client
            .post(format!("{base}{path}"))
            .bearer_auth(token)
            .json(&body)
            .send()
    };
    let stranger = fleet_core::manifest::PrivateKey::from_seed([7; 32]);
    let refused = post(
        "/api/releases",
        stranger.sign_value(&manifest).expect("sign"),
    )
    .await
    .expect("post");
    assert_eq!(refused.status().as_u16(), 422, "another key is refused");
    let release: serde_json::Value =
        post("/api/releases", key.sign_value(&manifest).expect("sign"))
            .await
            .expect("post")
            .json()
            .await
            .expect("json");
    let rollout: serde_json::Value = post(
        "/api/rollouts",
        serde_json::json!({"release_id": release["id"], "channel": "stable", "batch_size": 1,
                           "auto_advance": true}),
    )
    .await
    .expect("post")
    .json()
    .await
    .expect("json");
    let path = format!("{base}/api/rollouts/{}", rollout["id"]);
    let mut shown = serde_json::Value::Null;
    for _ in 0..60 {
        shown = wait_ok(&client, &path, Some(token)).await;
        if shown["status"] == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(shown["status"], "completed", "{shown}");
    let updated = |listed: &[(String, String)]| {
        listed
            .iter()
            .filter(|(_, version)| version == "9.9.0")
            .count()
            == 2
    };
    let versions = demo_versions(&client, &base, token, updated).await;
    let expected: Vec<(String, String)> = [
        ("demo-legacy", "9.9.0"),
        ("demo-shop-1", "9.9.0"),
        ("demo-shop-2", "2.0.1"),
    ]
    .iter()
    .map(|(i, v)| (i.to_string(), v.to_string()))
    .collect();
    assert_eq!(versions, expected);
    demo.kill().await.expect("stop");
    let output = demo.wait_with_output().await.expect("output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("release.key"),
        "the demo names its key: {stdout}"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("WARN"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_demo_whose_address_is_taken_says_so_and_leaves_nothing_behind() {
    let dir = temp_dir("cli");
    let data = dir.join("demo-data");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let output = command(&[
        "demo",
        "--data",
        data.to_str().expect("utf8"),
        "--listen",
        &addr,
    ])
    .output()
    .await
    .expect("run");
    assert!(!output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")) && stderr.contains("--listen"),
        "{stderr}"
    );
    assert!(!stdout.contains("running"), "{stdout}");
    assert!(!data.exists(), "the demo created {}", data.display());
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_database_that_cannot_be_opened_is_named_without_its_password() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let stderr = serve_failing_on(&format!(
        "postgres://fleet:never-shown-pw@127.0.0.1:{port}/fleet"
    ))
    .await;
    assert!(
        stderr.contains(&format!(
            "cannot open the database postgres://fleet:[redacted]@127.0.0.1:{port}/fleet"
        )) && stderr.contains("Connection refused"),
        "{stderr}"
    );
    assert!(!stderr.contains("never-shown-pw"), "{stderr}");
    // A PostgreSQL that answers but refuses the password: its reason and SQLSTATE, without
    // the line of PostgreSQL's source that sqlx would append.
    let url = std::env::var("FLEET_TEST_POSTGRES_URL").expect(
        "FLEET_TEST_POSTGRES_URL is not set: run `eval \"$(scripts/services postgres)\"` first, \
         or run scripts/test",
    );
    let mut wrong = reqwest::Url::parse(&url).expect("FLEET_TEST_POSTGRES_URL");
    wrong
        .set_password(Some("never-shown-pw"))
        .expect("a URL with a password");
    let stderr = serve_failing_on(wrong.as_str()).await;
    assert!(
        stderr.contains("password authentication failed")
            && stderr.contains("(SQLSTATE 28P01)")
            && !stderr.contains("at line"),
        "{stderr}"
    );
    assert!(!stderr.contains("never-shown-pw"), "{stderr}");
    // SQLite: the path it could not open.
    let stderr = serve_failing_on("sqlite:///proc/no-such/fleet.db").await;
    assert!(
        stderr.contains("sqlite:///proc/no-such/fleet.db"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_database_migrated_by_a_newer_version_is_refused_and_left_as_it_is() {
    let dir = temp_dir("newer-db");
    let url = format!("sqlite://{}", dir.join("fleet.db").display());
    let store = fleet_server::SqliteStore::connect(&url)
        .await
        .expect("create the database");
    drop(store);
    // What a newer fleet-server leaves behind: a migration this one does not have.
    let future = 9_999_i64;
    let db = sqlx::SqlitePool::connect(&url).await.expect("open");
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (?, 'from a newer version', 1, x'00', 1)",
    )
    .bind(future)
    .execute(&db)
    .await
    .expect("record the migration");
    let stderr = serve_failing_on(&url).await;
    assert!(
        stderr.contains(&format!("the database has migration {future}"))
            && stderr.contains("a newer fleet-server has migrated it"),
        "{stderr}"
    );
    let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
        .fetch_one(&db)
        .await
        .expect("count");
    let latest: i64 = sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations")
        .fetch_one(&db)
        .await
        .expect("latest");
    assert_eq!(latest, future, "the newer migration is still recorded");
    assert!(applied > 1, "the applied migrations are kept");
}

#[tokio::test]
async fn a_role_that_may_not_create_tables_is_told_what_it_needs() {
    let url = std::env::var("FLEET_TEST_POSTGRES_URL").expect(
        "FLEET_TEST_POSTGRES_URL is not set: run `eval \"$(scripts/services postgres)\"` first, \
         or run scripts/test",
    );
    let admin = sqlx::PgPool::connect(&url).await.expect("connect");
    let role = format!("fleet_reader_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {role} LOGIN PASSWORD 'reader-pw'"
    )))
    .execute(&admin)
    .await
    .expect("create a role without CREATE on the schema");
    let mut as_reader = reqwest::Url::parse(&url).expect("FLEET_TEST_POSTGRES_URL");
    as_reader.set_username(&role).expect("user");
    as_reader.set_password(Some("reader-pw")).expect("password");
    let stderr = serve_failing_on(as_reader.as_str()).await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE {role}")))
        .execute(&admin)
        .await
        .expect("drop the role");
    assert!(
        stderr.contains("permission denied for schema public (SQLSTATE 42501)")
            && stderr.contains("its database role needs CREATE on the schema"),
        "{stderr}"
    );
}

/// Runs `serve` on `database_url`, asserts that it fails, and returns what it printed on
/// stderr.
async fn serve_failing_on(database_url: &str) -> String {
    let output = command(&["serve", "--listen", &free_addr()])
        .env("CONTROL_PLANE_DATABASE_URL", database_url)
        .env("CONTROL_PLANE_ADMIN_TOKEN", "admin-token")
        .output()
        .await
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !output.status.success(),
        "serve started on {database_url}: {stderr}"
    );
    stderr
}

/// `serve` on `db` with an admin token and no agent secret at all: enrolled agents only.
fn serve_enrolled_only(addr: &str, db: &std::path::Path) -> Child {
    command(&["serve"])
        .env("FLEET_LISTEN", addr)
        .env(
            "CONTROL_PLANE_DATABASE_URL",
            format!("sqlite://{}", db.display()),
        )
        .env("CONTROL_PLANE_ADMIN_TOKEN", "admin-token")
        .spawn()
        .expect("start")
}

async fn signed_heartbeat(client: &reqwest::Client, base: &str, secret: &str) -> u16 {
    let body = br#"{"instance_id":"enrolled-1","db_ok":true,"redis_ok":true,"storage_ok":true,"jobs_failed":0}"#;
    let signer = fleet_core::Signer::new(fleet_core::Secret::new(secret).expect("secret"));
    let msg_id = format!("msg_{}", uuid::Uuid::new_v4().simple());
    let mut request = client.post(format!("{base}/api/heartbeats"));
    for (name, value) in signer
        .headers(&msg_id, fleet_core::unix_now(), body)
        .pairs()
    {
        request = request.header(name, value);
    }
    let response = request.body(body.to_vec()).send().await.expect("send");
    response.status().as_u16()
}

#[tokio::test]
async fn enrolled_agents_are_accepted_without_shared_secrets_and_across_restarts() {
    let dir = temp_dir("cli");
    let db = dir.join("cp.db");
    let client = reqwest::Client::new();
    let addr = free_addr();
    let base = format!("http://{addr}");
    let mut server = serve_enrolled_only(&addr, &db);
    wait_ok(&client, &format!("{base}/healthz"), None).await;
    let jwks = wait_ok(&client, &format!("{base}/.well-known/jwks.json"), None).await;

    let enrollment: serde_json::Value = client
        .post(format!("{base}/v1/enrollments"))
        .bearer_auth("admin-token")
        .json(&serde_json::json!({"instance_id": "enrolled-1"}))
        .send()
        .await
        .expect("enroll")
        .json()
        .await
        .expect("json");
    let token = enrollment["enrollment_token"].as_str().expect("token");
    let registered: serde_json::Value = client
        .post(format!("{base}/v1/agents/register"))
        .json(&serde_json::json!({"instance_id": "enrolled-1", "enrollment_token": token}))
        .send()
        .await
        .expect("register")
        .json()
        .await
        .expect("json");
    let secret = registered["secret"]
        .as_str()
        .expect("issued secret")
        .to_owned();

    assert_eq!(signed_heartbeat(&client, &base, &secret).await, 200);
    assert_eq!(
        signed_heartbeat(&client, &base, "not-the-issued-secret").await,
        401
    );

    // A restart keeps the key the issued secrets derive from (and the agents' tokens).
    server.kill().await.expect("kill");
    let addr = free_addr();
    let base = format!("http://{addr}");
    let _server = serve_enrolled_only(&addr, &db);
    wait_ok(&client, &format!("{base}/healthz"), None).await;
    assert_eq!(signed_heartbeat(&client, &base, &secret).await, 200);
    let again = wait_ok(&client, &format!("{base}/.well-known/jwks.json"), None).await;
    assert_eq!(jwks, again, "the token key survives a restart");
    let _ = std::fs::remove_dir_all(dir);
}
