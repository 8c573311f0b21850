//! Shared test fixtures: stores, a running server, signed requests.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use fleet_core::{Heartbeat, Limits, Secret, SecretResolver, Signer};
use fleet_server::store::{IncomingHeartbeat, Store};
use fleet_server::{ControlPlane, ControlPlaneBuilder, PostgresStore, RoleTokens, SqliteStore};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const SECRET: &str = "s3cret";
pub const SHARED: &str = "shared-fallback-secret";
pub const SUPPORT: &str = "support-token";
pub const OPS: &str = "ops-token";
pub const ADMIN: &str = "admin-token";

/// A temporary folder removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("fleet-server-it-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A store and whatever must live as long as it.
pub struct TestStore {
    pub store: Arc<dyn Store>,
    pub url: String,
    /// The PostgreSQL schema to drop once the test passed.
    pub schema: Option<String>,
    _dir: Option<TempDir>,
}

pub async fn sqlite() -> TestStore {
    let dir = TempDir::new();
    let url = format!("sqlite://{}", dir.0.join("fleet.db").display());
    let store = SqliteStore::connect(&url).await.expect("open sqlite");
    TestStore {
        store: Arc::new(store),
        url,
        schema: None,
        _dir: Some(dir),
    }
}

/// Reopens the same SQLite database (a restart).
pub async fn reopen_sqlite(url: &str) -> Arc<dyn Store> {
    Arc::new(SqliteStore::connect(url).await.expect("reopen sqlite"))
}

pub fn postgres_url() -> String {
    std::env::var("FLEET_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!(
            "FLEET_TEST_POSTGRES_URL is not set: the PostgreSQL store tests need a real server. \
             Run `eval \"$(scripts/services postgres)\"` first (scripts/test does this)."
        )
    })
}

/// The same database as [`postgres_url`], reached over PostgreSQL's Unix socket.
pub fn postgres_socket_url() -> String {
    std::env::var("FLEET_TEST_POSTGRES_SOCKET_URL").unwrap_or_else(|_| {
        panic!(
            "FLEET_TEST_POSTGRES_SOCKET_URL is not set. Run `eval \"$(scripts/services postgres)\"` \
             first (scripts/test does this)."
        )
    })
}

/// A PostgreSQL store in a fresh schema of its own, so tests run in parallel.
pub async fn postgres() -> TestStore {
    postgres_at(postgres_url()).await
}

/// Like [`postgres`], connected through `url`.
pub async fn postgres_at(url: String) -> TestStore {
    let schema = format!("fleet_server_it_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::PgPool::connect(&url)
        .await
        .expect("connect to FLEET_TEST_POSTGRES_URL");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&admin)
        .await
        .expect("create schema");
    admin.close().await;
    let store = PostgresStore::connect_with(schema_options(&url, &schema))
        .await
        .expect("open postgres");
    TestStore {
        store: Arc::new(store),
        url,
        schema: Some(schema),
        _dir: None,
    }
}

/// Connect options for `url` that keep every table in `schema`.
pub fn schema_options(url: &str, schema: &str) -> sqlx::postgres::PgConnectOptions {
    sqlx::postgres::PgConnectOptions::from_str(url)
        .expect("postgres url")
        .options([("search_path", schema)])
}

impl TestStore {
    /// A pool of its own on a PostgreSQL store's schema: another replica, or a session that
    /// holds locks while the store works.
    /// Locks `instance`'s installation row from another connection, as an operator's
    /// transaction left open would; the lock holds until the transaction is dropped or
    /// rolled back. Returns the pool too, to close once done.
    pub async fn lock_installation(
        &self,
        instance: &str,
    ) -> (sqlx::PgPool, sqlx::Transaction<'static, sqlx::Postgres>) {
        let side = self.other_connection().await;
        let mut holder = side.begin().await.expect("begin");
        sqlx::query("SELECT id FROM installations WHERE instance_id = $1 FOR UPDATE")
            .bind(instance)
            .fetch_one(&mut *holder)
            .await
            .expect("lock the installation");
        (side, holder)
    }

    pub async fn other_connection(&self) -> sqlx::PgPool {
        let schema = self.schema.as_deref().expect("a PostgreSQL store");
        sqlx::PgPool::connect_with(schema_options(&self.url, schema))
            .await
            .expect("connect to the store's schema")
    }
}

/// Drops a test's schema (kept when the test failed, for a look at what it left).
pub async fn drop_schema(schema: Option<String>) {
    let Some(schema) = schema else { return };
    let admin = sqlx::PgPool::connect(&postgres_url())
        .await
        .expect("connect");
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(&admin)
        .await
        .expect("drop schema");
}

pub fn resolver() -> SecretResolver {
    SecretResolver::from_config(
        Some(&json!({ "acme-001": SECRET }).to_string()),
        Some(SHARED),
    )
    .expect("valid secrets")
}

pub fn tokens() -> RoleTokens {
    RoleTokens {
        support: Some(SUPPORT.into()),
        ops: Some(OPS.into()),
        admin: Some(ADMIN.into()),
    }
}

/// A heartbeat body for `instance` with `extra` fields merged in.
pub fn body(instance: &str, extra: Value) -> Vec<u8> {
    let mut hb = json!({
        "instance_id": instance, "db_ok": true, "redis_ok": true, "storage_ok": true, "jobs_failed": 0
    });
    if let (Value::Object(map), Value::Object(more)) = (&mut hb, extra) {
        map.extend(more);
    }
    serde_json::to_vec(&hb).expect("json")
}

/// A decoded heartbeat, as the ingest path hands it to the store.
pub fn incoming(
    instance: &str,
    extra: Value,
    msg: Option<(&str, i64)>,
    at: i64,
) -> IncomingHeartbeat {
    let body = body(instance, extra);
    IncomingHeartbeat {
        heartbeat: Heartbeat::decode(&body, &Limits::default()).expect("valid"),
        scheme: if msg.is_some() {
            fleet_core::Scheme::V1
        } else {
            fleet_core::Scheme::V0
        },
        msg_id: msg.map(|(id, _)| id.to_owned()),
        signed_at: msg.map(|(_, ts)| ts),
        received_at: at,
        body,
    }
}

pub fn signer(secret: &str) -> Signer {
    Signer::new(Secret::new(secret).expect("secret"))
}

/// A running control plane.
pub struct TestServer {
    pub url: String,
    pub store: Arc<dyn Store>,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    pub async fn start(store: Arc<dyn Store>) -> Self {
        Self::start_with(store, |b| b).await
    }

    pub async fn start_with(
        store: Arc<dyn Store>,
        configure: impl FnOnce(ControlPlaneBuilder) -> ControlPlaneBuilder,
    ) -> Self {
        let builder = ControlPlane::builder()
            .shared_store(store.clone())
            .secrets(resolver())
            .tokens(tokens());
        let router = configure(builder).build().expect("build control plane");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            // As `fleet-server` serves it: the peer address tells clients apart.
            let service = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
            axum::serve(listener, service)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .expect("serve");
        });
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client");
        Self {
            url,
            store,
            client,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops serving and waits until the router (and so the background tasks) are gone.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// Sends a heartbeat `body` signed with v1 (`msg_id`, `timestamp`) under `secret`.
    pub async fn send_v1(
        &self,
        secret: &str,
        msg_id: &str,
        timestamp: i64,
        body: &[u8],
    ) -> reqwest::Response {
        self.post_v1("/api/heartbeats", secret, msg_id, timestamp, body)
            .await
    }

    /// POSTs `body` to `path` as an agent does: signed with v1 (`msg_id`, `timestamp`) under
    /// `secret`.
    pub async fn post_v1(
        &self,
        path: &str,
        secret: &str,
        msg_id: &str,
        timestamp: i64,
        body: &[u8],
    ) -> reqwest::Response {
        let signed = signer(secret).headers(msg_id, timestamp, body);
        let mut request = self.client.post(self.at(path)).body(body.to_vec());
        for (name, value) in signed.pairs() {
            request = request.header(name, value);
        }
        request.send().await.expect("send")
    }

    /// Makes `instance` an installation the control plane knows (a heartbeat signed with the
    /// shared token), as an agent that reported once and went away would be.
    pub async fn seen(&self, instance: &str) {
        let msg_id = format!("seen-{instance}");
        let answer = self
            .send_v1(SHARED, &msg_id, now(), &body(instance, json!({})))
            .await;
        assert_eq!(answer.status().as_u16(), 200, "heartbeat of {instance}");
    }

    /// The text of `GET /metrics`.
    pub async fn metrics(&self) -> String {
        self.client
            .get(self.at("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// Sends `body` signed with v0 under `secret`.
    pub async fn send_v0(&self, secret: &str, body: &[u8]) -> reqwest::Response {
        self.client
            .post(self.at("/api/heartbeats"))
            .header("x-agent-signature", signer(secret).sign_v0(body))
            .body(body.to_vec())
            .send()
            .await
            .expect("send")
    }

    pub async fn get_json(&self, path: &str, token: &str) -> (u16, Value) {
        let response = self
            .client
            .get(self.at(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("get");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Like [`get_json`](Self::get_json), and checks the answer against the schema
    /// /openapi.json gives for it (which it must give when the answer is a success).
    pub async fn get_documented(&self, path: &str, token: &str) -> (u16, Value) {
        let (status, answer) = self.get_json(path, token).await;
        if matches!(status, 200 | 201) {
            let (_, spec) = self.get_json("/openapi.json", SUPPORT).await;
            assert_documented_answer(&spec, "get", path, &answer);
        }
        (status, answer)
    }
}

pub fn now() -> i64 {
    fleet_core::unix_now()
}

/// The error code of an error response body.
pub fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

/// Runs each named async test fn `fn(TestStore)` against SQLite and against PostgreSQL.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test]
            async fn $name() {
                super::$name($crate::support::sqlite().await).await;
            })*
        }
        mod postgres {
            $(#[tokio::test]
            async fn $name() {
                let store = $crate::support::postgres().await;
                let schema = store.schema.clone();
                super::$name(store).await;
                $crate::support::drop_schema(schema).await;
            })*
        }
    };
}
pub(crate) use on_both_backends;

/// Adds an `application/x-www-form-urlencoded` body `token=<token>` (as the login form posts).
pub fn login_form(request: reqwest::RequestBuilder, token: &str) -> reqwest::RequestBuilder {
    request
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form_body(&[("token", token)]))
}

/// `fields` as a browser encodes a form: `name=value&…`, every byte but the unreserved ones
/// percent-encoded.
pub fn form_body(fields: &[(&str, &str)]) -> String {
    let encode = |text: &str| {
        let mut encoded = String::new();
        for b in text.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                encoded.push(b as char);
            } else {
                encoded.push_str(&format!("%{b:02X}"));
            }
        }
        encoded
    };
    fields
        .iter()
        .map(|(name, value)| format!("{}={}", encode(name), encode(value)))
        .collect::<Vec<_>>()
        .join("&")
}

/// What a dashboard form's post got back.
#[derive(Debug)]
pub struct FormAnswer {
    pub status: u16,
    /// Where a 303 sends the browser.
    pub location: String,
    pub content_type: String,
    pub body: String,
}

/// Posts a dashboard form with `fields` to `path` as the holder of `token`.
pub async fn post_form(
    server: &TestServer,
    path: &str,
    token: &str,
    fields: &[(&str, &str)],
) -> FormAnswer {
    let response = server
        .client
        .post(server.at(path))
        .bearer_auth(token)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form_body(fields))
        .send()
        .await
        .expect("post form");
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (location, content_type) = (header("location"), header("content-type"));
    FormAnswer {
        status: response.status().as_u16(),
        location,
        content_type,
        body: response.text().await.expect("text"),
    }
}

/// The schema `spec` gives for the success answer (200, or 201 for a route that creates
/// something) of `method path`, if it gives one.
pub fn answer_schema<'a>(spec: &'a Value, method: &str, path: &str) -> Option<&'a Value> {
    let responses = &spec["paths"][path][method]["responses"];
    ["200", "201"]
        .into_iter()
        .map(|status| &responses[status]["content"]["application/json"]["schema"])
        .find(|schema| schema.is_object())
}

/// The path of `spec` that the requested `path` is an instance of (`{name}` standing for
/// any one segment), for `method`.
pub fn documented_path(spec: &Value, method: &str, path: &str) -> Option<String> {
    let path = path.split('?').next().unwrap_or(path);
    let paths = spec["paths"].as_object()?;
    if paths.get(path).is_some_and(|p| !p[method].is_null()) {
        return Some(path.to_owned());
    }
    let segments: Vec<&str> = path.split('/').collect();
    paths
        .iter()
        .filter(|(_, operations)| !operations[method].is_null())
        .map(|(template, _)| template)
        .find(|template| {
            let parts: Vec<&str> = template.split('/').collect();
            parts.len() == segments.len()
                && parts
                    .iter()
                    .zip(&segments)
                    .all(|(part, segment)| part == segment || part.starts_with('{'))
        })
        .cloned()
}

/// Checks `answer` against the schema `spec` gives for the success answer of the requested
/// `method path` ([`assert_answer_conforms`]), which it must give.
pub fn assert_documented_answer(spec: &Value, method: &str, path: &str, answer: &Value) {
    let template = documented_path(spec, method, path)
        .unwrap_or_else(|| panic!("{method} {path} is not in /openapi.json"));
    assert_answer_conforms(spec, method, &template, answer);
}

/// When `status` is a success and `spec` gives a schema for the answer of the requested
/// `method path`, checks `answer` against it ([`assert_answer_conforms`]).
pub fn check_documented_answer(
    spec: &Value,
    method: &str,
    path: &str,
    status: u16,
    answer: &Value,
) {
    if !matches!(status, 200 | 201) {
        return;
    }
    if let Some(template) = documented_path(spec, method, path)
        && answer_schema(spec, method, &template).is_some()
    {
        assert_answer_conforms(spec, method, &template, answer);
    }
}

/// Checks `answer` against the schema `spec` gives for the success answer of `method path`
/// (`path` as the document names it), resolving its references to the document's
/// components. The document leaves its objects open, so clients accept fields added later;
/// here they are closed, so that a field the server sends and the document does not name
/// fails the test.
pub fn assert_answer_conforms(spec: &Value, method: &str, path: &str, answer: &Value) {
    // The branches of a conditional (`if`, `then`, `else`) describe part of the object beside
    // them, so they stay open; the schemas inside them are closed.
    fn closed(schema: &mut Value, whole: bool) {
        if let Some(object) = schema.as_object_mut() {
            if whole && object.contains_key("properties") {
                object
                    .entry("additionalProperties")
                    .or_insert(Value::Bool(false));
            }
            for (key, value) in object.iter_mut() {
                closed(value, !matches!(key.as_str(), "if" | "then" | "else"));
            }
        } else if let Some(items) = schema.as_array_mut() {
            items.iter_mut().for_each(|item| closed(item, whole));
        }
    }
    let mut schema = answer_schema(spec, method, path)
        .unwrap_or_else(|| panic!("{method} {path}: no schema for its answer"))
        .clone();
    schema["components"] = spec["components"].clone();
    closed(&mut schema, true);
    let validator = jsonschema::validator_for(&schema).expect("the schema compiles");
    let problems: Vec<String> = validator
        .iter_errors(answer)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        problems.is_empty(),
        "{method} {path}: {problems:#?}\n{answer:#}"
    );
}

/// A folder with the `backend`'s migrations older than `first_new` (a file name prefix such
/// as `"0011"`): the schema of a control plane from before that migration.
fn migrations_before(backend: &str, first_new: &str) -> TempDir {
    let dir = TempDir::new();
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(backend);
    for entry in std::fs::read_dir(&source).expect("migrations") {
        let name = entry.expect("entry").file_name();
        if name.to_string_lossy().as_ref() < first_new {
            std::fs::copy(source.join(&name), dir.0.join(&name)).expect("copy");
        }
    }
    dir
}

/// A SQLite store upgraded from the schema before migration `first_new`, holding what
/// `stored_before` inserted then; the folder must outlive the store.
pub async fn sqlite_upgraded(first_new: &str, stored_before: &str) -> (Arc<dyn Store>, TempDir) {
    let old = migrations_before("sqlite", first_new);
    let dir = TempDir::new();
    let url = format!("sqlite://{}?mode=rwc", dir.0.join("fleet.db").display());
    let pool = sqlx::SqlitePool::connect(&url).await.expect("connect");
    sqlx::migrate::Migrator::new(old.0.as_path())
        .await
        .expect("old migrations")
        .run(&pool)
        .await
        .expect("old schema");
    sqlx::raw_sql(sqlx::AssertSqlSafe(stored_before))
        .execute(&pool)
        .await
        .expect("rows stored before the upgrade");
    pool.close().await;
    let store = fleet_server::store::open(&url).await.expect("upgrade");
    (store, dir)
}

/// Like [`sqlite_upgraded`], on PostgreSQL in a fresh schema; returns the store and the
/// schema to drop.
pub async fn postgres_upgraded(first_new: &str, stored_before: &str) -> (PostgresStore, String) {
    let old = migrations_before("postgres", first_new);
    let url = postgres_url();
    let schema = format!("fleet_server_it_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::PgPool::connect(&url).await.expect("connect");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&admin)
        .await
        .expect("create schema");
    admin.close().await;
    let options = schema_options(&url, &schema);
    let pool = sqlx::PgPool::connect_with(options.clone())
        .await
        .expect("connect to the schema");
    sqlx::migrate::Migrator::new(old.0.as_path())
        .await
        .expect("old migrations")
        .run(&pool)
        .await
        .expect("old schema");
    sqlx::raw_sql(sqlx::AssertSqlSafe(stored_before))
        .execute(&pool)
        .await
        .expect("rows stored before the upgrade");
    pool.close().await;
    let store = PostgresStore::connect_with(options).await.expect("upgrade");
    (store, schema)
}
