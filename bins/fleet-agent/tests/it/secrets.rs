//! No secret reaches a log: a full flow at `RUST_LOG=trace` with distinctive values for every
//! secret, then every captured line is searched for each of them. Two real `fleet-agent`
//! processes (one with `AGENT_SECRET`, one enrolling with a one-time token) talk to the
//! control plane served in this process, whose logs are captured by a trace-level subscriber. The flow uses every secret for real: heartbeats, the ops
//! endpoint with its token, the local API with its token (and a wrong one), role tokens as
//! Bearer and through `/login` (and the session it starts), an alert forwarded to a webhook
//! with a token and a signing secret, the live channel's JWT, and enrollment.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderMap;
use axum::routing::{get, post};
use fleet_core::manifest::PrivateKey;
use fleet_core::{Secret, SecretResolver};
use fleet_server::{ControlPlane, LiveSettings, RoleTokens, SqliteStore, WebhookConfig};
use serde_json::{Value, json};

use crate::*;

const AGENT_SECRET: &str = "agentsecret-Zq81Lw";
const ADMIN_TOKEN: &str = "admintoken-Hx52Mv";
const OPS_TOKEN: &str = "opstoken-Kd93Pr";
const SUPPORT_TOKEN: &str = "supporttoken-Tn64Qs";
const WEBHOOK_TOKEN: &str = "webhooktoken-Bf27Ye";
const WEBHOOK_SECRET: &str = "webhooksecret-Jc38Ua";
const LOCAL_TOKEN_VALUE: &str = "localtoken-Wg49Io";
const OPS_ENDPOINT_TOKEN: &str = "opsendpointtoken-Vr50Ep";
const WRONG_LOCAL_TOKEN: &str = "wronglocaltoken-Ys61Ak";
const JWT_SEED: [u8; 32] = *b"jwt-signing-seed-Pm72Nl-32bytes!";
const FIRST: &str = "secrets-e2e-1";
const ENROLLED: &str = "secrets-e2e-2";

/// A writer into a shared buffer, for the server's trace subscriber.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the test's ops endpoint and webhook receiver saw.
#[derive(Clone, Default)]
struct Seen {
    ops_auth: Arc<Mutex<Vec<String>>>,
    webhooks: Arc<Mutex<Vec<(String, String)>>>,
}

fn header(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

async fn receiver(seen: Seen) -> String {
    let ops = seen.clone();
    let hooks = seen.clone();
    let app = axum::Router::new()
        .route(
            "/ops",
            get(move |headers: HeaderMap| async move {
                ops.ops_auth
                    .lock()
                    .unwrap()
                    .push(header(&headers, "authorization"));
                axum::Json(json!({"jobFailures": [], "secrets": {"expired": 0, "unverified": 0}}))
            }),
        )
        .route(
            "/webhook",
            post(move |headers: HeaderMap| async move {
                hooks.webhooks.lock().unwrap().push((
                    header(&headers, "authorization"),
                    header(&headers, "webhook-signature"),
                ));
                "ok"
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind receiver");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve receiver") });
    url
}

async fn wait_for(what: &str, secs: u64, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "current_thread")]
async fn no_secret_reaches_any_log_of_a_full_flow_at_trace_level() {
    // A process-wide subscriber: a thread-local one missed events when other tests ran at the
    // same time. Other tests' lines land here too, but they use other values than these.
    // tungstenite is held at debug as the agent binary holds it, for any agent run in-process.
    let server_log = Captured::default();
    let writer = server_log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "trace,tungstenite=debug",
        ))
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber)
        .expect("no other test of this binary sets a global subscriber");

    let dir = temp_dir("secrets");
    let seen = Seen::default();
    let receiver_url = receiver(seen.clone()).await;
    let store = SqliteStore::connect(&format!("sqlite://{}", dir.join("cp.db").display()))
        .await
        .expect("store");
    let mut webhook = WebhookConfig::new(format!("{receiver_url}/webhook"));
    webhook.token = Some(WEBHOOK_TOKEN.into());
    webhook.secret = Some(Secret::new(WEBHOOK_SECRET).expect("webhook secret"));
    let live = LiveSettings {
        jwt_key: Some(PrivateKey::from_seed(JWT_SEED)),
        ..LiveSettings::default()
    };
    let router = ControlPlane::builder()
        .store(store)
        .secrets(
            SecretResolver::from_config(Some(&json!({ FIRST: AGENT_SECRET }).to_string()), None)
                .expect("secrets"),
        )
        .tokens(RoleTokens {
            admin: Some(ADMIN_TOKEN.into()),
            ops: Some(OPS_TOKEN.into()),
            support: Some(SUPPORT_TOKEN.into()),
        })
        .webhook(webhook)
        .live(live)
        .build()
        .expect("control plane");
    let url = serve(router).await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");

    // The first agent: its own secret, the ops endpoint with a token, a local API token.
    let local_port = free_port();
    let common = |instance: &str| -> Vec<(String, String)> {
        [
            ("INSTANCE_ID", instance.to_owned()),
            ("CONTROL_PLANE_URL", url.clone()),
            ("HEARTBEAT_INTERVAL", "1".to_owned()),
            ("AGENT_METRICS_URL", "off".to_owned()),
            ("AGENT_EVENTS_STATS_URL", "off".to_owned()),
            ("CONTAINERS_INTERVAL", "0".to_owned()),
            ("RUST_LOG", "trace".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    };
    let mut first_env = common(FIRST);
    first_env.extend(
        [
            ("AGENT_SECRET", AGENT_SECRET.to_owned()),
            ("AGENT_LOCAL_TOKEN", LOCAL_TOKEN_VALUE.to_owned()),
            ("AGENT_PORT", local_port.to_string()),
            ("AGENT_OPS_URL", format!("{receiver_url}/ops")),
            ("AGENT_OPS_TOKEN", OPS_ENDPOINT_TOKEN.to_owned()),
            (
                "AGENT_STATE_PATH",
                dir.join("first.db").display().to_string(),
            ),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );
    let first_dir = dir.join("first-logs");
    std::fs::create_dir_all(&first_dir).expect("dir");
    let mut first = Guard(spawn_agent(&first_env, &first_dir));

    wait_for("the first heartbeat", 60, async || {
        client
            .get(format!("{url}/api/installations/{FIRST}"))
            .bearer_auth(SUPPORT_TOKEN)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(
        seen.ops_auth
            .lock()
            .unwrap()
            .contains(&format!("Bearer {OPS_ENDPOINT_TOKEN}")),
        "the agent read its ops endpoint with the token"
    );
    for (token, expected) in [(LOCAL_TOKEN_VALUE, 200), (WRONG_LOCAL_TOKEN, 401)] {
        let status = client
            .get(format!("http://127.0.0.1:{local_port}/health"))
            .header("x-agent-local-token", token)
            .send()
            .await
            .expect("local api")
            .status();
        assert_eq!(status, expected, "local API with {token}");
    }
    let done = health_check(&client, &url, ADMIN_TOKEN, FIRST).await;
    assert_eq!(done["targets"][0]["status"], "completed", "{done}");

    // An alert forwarded to the webhook with its token and signature.
    let body = serde_json::to_vec(&json!({
        "instance_id": FIRST, "db_ok": true, "redis_ok": true, "storage_ok": true,
        "jobs_failed": 0, "alerts": [{"level": "critical", "message": "disk on fire"}]
    }))
    .expect("json");
    let signed = fleet_core::Signer::new(Secret::new(AGENT_SECRET).expect("secret")).headers(
        "alert-1",
        fleet_core::unix_now(),
        &body,
    );
    let mut request = client.post(format!("{url}/api/heartbeats")).body(body);
    for (name, value) in signed.pairs() {
        request = request.header(name, value);
    }
    assert_eq!(request.send().await.expect("heartbeat").status(), 200);
    wait_for("the webhook", 30, async || {
        !seen.webhooks.lock().unwrap().is_empty()
    })
    .await;
    let (auth, signature) = seen.webhooks.lock().unwrap()[0].clone();
    assert_eq!(auth, format!("Bearer {WEBHOOK_TOKEN}"));
    assert!(signature.starts_with("v1,"), "signed: {signature}");

    // Role tokens through /login as well as Bearer.
    let login = client
        .post(format!("{url}/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={OPS_TOKEN}"))
        .send()
        .await
        .expect("login");
    assert_eq!(login.status(), 303);
    // The session id the login cookie holds is a secret of its own: used, then logged out.
    let session_id = login.headers()["set-cookie"]
        .to_str()
        .expect("ascii")
        .split(';')
        .next()
        .and_then(|pair| pair.strip_prefix("cp_token="))
        .expect("the session cookie")
        .to_owned();
    let session_cookie = format!("cp_token={session_id}");
    for (path, status) in [("/", 200), ("/logout", 303), ("/", 303)] {
        let request = match path {
            "/logout" => client.post(format!("{url}{path}")),
            _ => client.get(format!("{url}{path}")),
        };
        let response = request
            .header("cookie", &session_cookie)
            .send()
            .await
            .expect("session");
        assert_eq!(response.status(), status, "{path}");
    }
    let wrong = client
        .post(format!("{url}/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("token=not-a-token")
        .send()
        .await
        .expect("login");
    assert_eq!(wrong.status(), 401);

    // The second agent enrolls with a one-time token and receives its secret.
    let created: Value = client
        .post(format!("{url}/v1/enrollments"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"instance_id": ENROLLED}))
        .send()
        .await
        .expect("enrollment")
        .json()
        .await
        .expect("json");
    let enrollment_token = created["enrollment_token"]
        .as_str()
        .expect("token")
        .to_owned();
    let secret_file = dir.join("enrolled-secret");
    let mut second_env = common(ENROLLED);
    second_env.extend(
        [
            ("AGENT_ENROLLMENT_TOKEN", enrollment_token.clone()),
            ("AGENT_SECRET_FILE", secret_file.display().to_string()),
            ("AGENT_PORT", free_port().to_string()),
            (
                "AGENT_STATE_PATH",
                dir.join("second.db").display().to_string(),
            ),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );
    let second_dir = dir.join("second-logs");
    std::fs::create_dir_all(&second_dir).expect("dir");
    let mut second = Guard(spawn_agent(&second_env, &second_dir));
    let done = health_check(&client, &url, ADMIN_TOKEN, ENROLLED).await;
    assert_eq!(done["targets"][0]["status"], "completed", "{done}");
    let issued_secret = std::fs::read_to_string(&secret_file).expect("issued secret stored");
    let issued_secret = issued_secret.trim().to_owned();
    assert!(issued_secret.len() >= 16, "an issued secret");

    sigterm_and_wait(&mut first).await;
    sigterm_and_wait(&mut second).await;

    let mut logs = vec![(
        "control plane".to_owned(),
        String::from_utf8_lossy(&server_log.0.lock().unwrap()).into_owned(),
    )];
    for logs_dir in [&first_dir, &second_dir] {
        for (path, text) in crate::agent_logs(logs_dir) {
            // Written to a file, not a terminal: no colour codes around the fields.
            assert!(
                !text.contains('\x1b'),
                "{} has colour codes",
                path.display()
            );
            logs.push((path.display().to_string(), text));
        }
    }
    // The capture works: every log has trace-level detail of the flow.
    for (name, text) in &logs {
        assert!(
            text.contains("TRACE") || text.contains("\"level\":\"TRACE\""),
            "{name} has trace lines ({} bytes)",
            text.len()
        );
    }
    let seed_b64 = PrivateKey::from_seed(JWT_SEED).to_base64();
    let secrets: Vec<(&str, &str)> = vec![
        ("AGENT_SECRET", AGENT_SECRET),
        ("CONTROL_PLANE_ADMIN_TOKEN", ADMIN_TOKEN),
        ("CONTROL_PLANE_OPS_TOKEN", OPS_TOKEN),
        ("CONTROL_PLANE_SUPPORT_TOKEN", SUPPORT_TOKEN),
        ("CONTROL_PLANE_ALERT_WEBHOOK_TOKEN", WEBHOOK_TOKEN),
        ("CONTROL_PLANE_ALERT_WEBHOOK_SECRET", WEBHOOK_SECRET),
        ("AGENT_LOCAL_TOKEN", LOCAL_TOKEN_VALUE),
        ("a wrong local token", WRONG_LOCAL_TOKEN),
        ("AGENT_OPS_TOKEN", OPS_ENDPOINT_TOKEN),
        ("CONTROL_PLANE_JWT_KEY", &seed_b64),
        ("the JWT seed", "jwt-signing-seed-Pm72Nl"),
        ("AGENT_ENROLLMENT_TOKEN", &enrollment_token),
        ("a dashboard session id", &session_id),
        ("the issued agent secret", &issued_secret),
        // Any JWT: its base64url header always starts so.
        ("a JWT", "eyJ"),
    ];
    let mut leaks = Vec::new();
    for (name, text) in &logs {
        for (what, secret) in &secrets {
            if let Some(at) = text.find(secret) {
                let line = text[..at].rfind('\n').map_or(0, |n| n + 1);
                let end = text[at..].find('\n').map_or(text.len(), |n| at + n);
                leaks.push(format!("{what} in {name}: {}", &text[line..end]));
            }
        }
    }
    assert!(leaks.is_empty(), "secrets in logs:\n{}", leaks.join("\n"));
    let _ = std::fs::remove_dir_all(dir);
}

/// A URL's query or userinfo never leaves the agent in an error: the ops, metrics, events,
/// storage and search endpoints all carry secrets in their URLs and all refuse connections,
/// and neither the heartbeat's `checks[]` (readable by the support role), nor the local
/// `/diagnostic`, `/metrics` and `/smoke`, nor the agent's own log at `RUST_LOG=trace` holds
/// any of those secrets, while each error still says what went wrong.
#[tokio::test(flavor = "current_thread")]
async fn url_query_secrets_reach_no_heartbeat_local_answer_or_log() {
    let dir = temp_dir("url-secrets");
    let receiver = crate::receiver::Receiver::start(INSTANCE, SECRET).await;
    let closed = free_port();
    let local_port = free_port();
    let base = format!("http://127.0.0.1:{closed}");
    let secrets = [
        "OPSQUERYKEY-Rt51",
        "OPSUSERINFO-Gh62",
        "METRICSQUERYKEY-Lp73",
        "EVENTSQUERYKEY-Cv84",
        "STORAGEQUERYSIG-Nb95",
        "STORAGEUSERINFO-Qw06",
        "SEARCHQUERYKEY-Zx17",
    ];
    let env: Vec<(String, String)> = [
        ("INSTANCE_ID", INSTANCE.to_owned()),
        ("CONTROL_PLANE_URL", receiver.url()),
        ("AGENT_SECRET", SECRET.to_owned()),
        ("HEARTBEAT_INTERVAL", "1".to_owned()),
        ("AGENT_PORT", local_port.to_string()),
        (
            "AGENT_STATE_PATH",
            dir.join("state.db").display().to_string(),
        ),
        (
            "AGENT_OPS_URL",
            format!("http://ops:{}@127.0.0.1:{closed}/ops?api_key={}", secrets[1], secrets[0]),
        ),
        ("AGENT_OPS_TOKEN", "ops-endpoint-token".to_owned()),
        ("AGENT_METRICS_URL", format!("{base}/metrics?token={}", secrets[2])),
        ("AGENT_EVENTS_STATS_URL", format!("{base}/events?key={}", secrets[3])),
        (
            "STORAGE_ENDPOINT",
            format!(
                "http://s3:{}@127.0.0.1:{closed}/bucket/backup.tar?X-Amz-Credential=AK%2F1&X-Amz-Signature={}",
                secrets[5], secrets[4]
            ),
        ),
        ("MEILI_HOST", format!("{base}/?apiKey={}#{}", secrets[6], secrets[6])),
        ("CONTAINERS_INTERVAL", "0".to_owned()),
        ("AGENT_COMMANDS_ENABLED", "false".to_owned()),
        ("RUST_LOG", "trace".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let logs_dir = dir.join("logs");
    std::fs::create_dir_all(&logs_dir).expect("dir");
    let mut agent = Guard(spawn_agent(&env, &logs_dir));

    let seen = receiver.seen.clone();
    assert!(
        wait_until(30, || !seen.accepted.lock().unwrap().is_empty()).await,
        "no heartbeat arrived; see {}",
        logs_dir.display()
    );
    let heartbeat = seen.bodies()[0].clone();
    for name in ["ops", "slo", "events", "storage", "search"] {
        let check = heartbeat["checks"]
            .as_array()
            .expect("checks")
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name} check in {heartbeat}"));
        assert_eq!(check["ok"], false, "{check}");
        // Still useful: what failed, just not where the secret was.
        let error = check["error"].as_str().unwrap_or_default();
        assert!(error.contains("error sending request"), "{check}");
    }

    let client = reqwest::Client::new();
    let local = |path: &str| format!("http://127.0.0.1:{local_port}{path}");
    let mut answers = vec![("heartbeat".to_owned(), heartbeat.to_string())];
    for path in ["/diagnostic", "/metrics"] {
        let response = client.get(local(path)).send().await.expect("local api");
        assert_eq!(response.status(), 502, "{path}");
        let text = response.text().await.expect("body");
        assert!(text.contains("error sending request"), "{path}: {text}");
        answers.push((path.to_owned(), text));
    }
    let smoke = client.post(local("/smoke")).send().await.expect("smoke");
    answers.push(("/smoke".to_owned(), smoke.text().await.expect("body")));

    sigterm_and_wait(&mut agent).await;
    receiver.stop().await;
    for (path, text) in crate::agent_logs(&logs_dir) {
        assert!(text.contains("TRACE"), "{} has trace lines", path.display());
        answers.push((path.display().to_string(), text));
    }
    let mut leaks = Vec::new();
    for (name, text) in &answers {
        for secret in secrets {
            if let Some(at) = text.find(secret) {
                let line = text[..at].rfind('\n').map_or(0, |n| n + 1);
                let end = text[at..].find('\n').map_or(text.len(), |n| at + n);
                leaks.push(format!("{secret} in {name}: {}", &text[line..end]));
            }
        }
    }
    assert!(leaks.is_empty(), "URL secrets shown:\n{}", leaks.join("\n"));
    let _ = std::fs::remove_dir_all(dir);
}
