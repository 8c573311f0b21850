//! Health checks that speak each service's own protocol: PostgreSQL `SELECT 1`, Redis `PING`,
//! an HTTP request for storage and search, and a TCP connect for anything else.
//!
//! The ERP instance agent only opened TCP connections, which says a port is open but not that
//! the service answers; these checks ask the service itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fleet_core::heartbeat::CheckResult;
use serde_json::{Map, Value};
use sqlx::Connection;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A health check. Implement it to add your own; the result lands in the heartbeat's
/// `checks[]` under [`name`](Check::name).
#[async_trait]
pub trait Check: Send + Sync {
    /// The name in `checks[]` (`db`, `redis`, `storage`, `search`, or your own).
    fn name(&self) -> &str;

    /// Probes once. `Err` carries the reason shown to operators; it must not contain secrets.
    async fn probe(&self) -> Result<(), String>;

    /// What the probe speaks (`postgres`, `redis`, `http`, `tcp`, ...), shown beside the
    /// result.
    fn protocol(&self) -> &str {
        "custom"
    }
}

/// Why `name` cannot name a check in the heartbeat (`checks[].name` is an identifier: 1 to
/// `max_id_len` bytes, no whitespace or control characters), or `None` when it can.
pub fn name_problem(name: &str) -> Option<String> {
    let limits = fleet_core::Limits::default();
    let mut errors = fleet_core::ValidationErrors::default();
    let root = fleet_core::validate::Path::Root;
    fleet_core::validate::check_id(&mut errors, &root, name, limits.max_id_len);
    errors.violations.first().map(|v| {
        format!(
            "check name {name:?} {} (a check name has 1 to {} bytes and no whitespace, like \
             `job_queue`)",
            v.message, limits.max_id_len
        )
    })
}

/// A check's reason as the heartbeat can carry it: control characters other than newlines
/// and tabs (a terminal's colour codes in an exception's text) left out, and cut to the
/// protocol's longest message at a character boundary, marked with `…`.
pub fn reportable_reason(reason: &str) -> String {
    let max = fleet_core::Limits::default().max_message_len;
    let mut out = String::with_capacity(reason.len().min(max));
    for c in reason
        .chars()
        .filter(|&c| !c.is_control() || c == '\n' || c == '\t')
    {
        if out.len() + c.len_utf8() > max - '…'.len_utf8() {
            out.push('…');
            break;
        }
        out.push(c);
    }
    out
}

/// Runs `check` with a time limit and turns the outcome into a [`CheckResult`].
pub async fn run_check(check: &dyn Check, timeout: Duration) -> CheckResult {
    let started = Instant::now();
    let outcome = match tokio::time::timeout(timeout, check.probe()).await {
        // A check of the embedder's may quote a URL it requested (reqwest's message does):
        // its query or userinfo must not reach the heartbeat.
        Ok(outcome) => {
            outcome.map_err(|reason| reportable_reason(&fleet_core::redact_url_secrets(&reason)))
        }
        Err(_) => Err(format!("timed out after {} ms", timeout.as_millis())),
    };
    let latency_ms = (started.elapsed().as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0;
    let mut extra = Map::new();
    extra.insert("protocol".into(), Value::from(check.protocol()));
    CheckResult {
        name: check.name().to_owned(),
        ok: outcome.is_ok(),
        latency_ms: Some(latency_ms),
        error: outcome.err(),
        extra,
    }
}

/// Picks the check that speaks `url`'s protocol: PostgreSQL for `postgres://`, Redis for
/// `redis://`, HTTP for `http(s)://`, and a TCP connect (to `default_port` when the URL has
/// none) for everything else.
pub fn check_for_url(
    name: &str,
    url: &str,
    default_port: u16,
    http: reqwest::Client,
) -> Arc<dyn Check> {
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    match scheme.as_deref() {
        Some("postgres" | "postgresql") => Arc::new(PostgresCheck::new(name, url)),
        Some("redis") => Arc::new(RedisCheck::new(name, url)),
        Some("http" | "https") => Arc::new(HttpCheck::new(name, url, http)),
        _ => Arc::new(TcpCheck::new(name, url, default_port)),
    }
}

/// PostgreSQL: connects (with the URL's credentials and TLS settings) and runs `SELECT 1`.
pub struct PostgresCheck {
    name: String,
    url: String,
}

impl PostgresCheck {
    /// A check of the database at `url` (`postgres://user:pass@host:port/db`).
    pub fn new(name: &str, url: &str) -> Self {
        Self {
            name: name.to_owned(),
            url: url.to_owned(),
        }
    }
}

#[async_trait]
impl Check for PostgresCheck {
    fn name(&self) -> &str {
        &self.name
    }

    fn protocol(&self) -> &str {
        "postgres"
    }

    async fn probe(&self) -> Result<(), String> {
        // A fresh connection each time: a pooled one could hide a server that stopped
        // accepting connections, and an idle agent should hold nothing open.
        let mut conn = sqlx::PgConnection::connect(&self.url)
            .await
            .map_err(|e| redact(&e.to_string(), &self.url))?;
        let one: i32 = sqlx::query_scalar("SELECT 1")
            .fetch_one(&mut conn)
            .await
            .map_err(|e| redact(&e.to_string(), &self.url))?;
        let _ = conn.close().await;
        if one == 1 {
            Ok(())
        } else {
            Err(format!("SELECT 1 returned {one}"))
        }
    }
}

/// Redis: `AUTH` when the URL carries credentials, then `PING`, expecting `PONG`.
pub struct RedisCheck {
    name: String,
    target: Target,
    user: Option<String>,
    password: Option<String>,
}

impl RedisCheck {
    /// A check of the server at `url` (`redis://[user:password@]host[:port][/db]`).
    pub fn new(name: &str, url: &str) -> Self {
        let target = Target::parse(url, 6379);
        Self {
            name: name.to_owned(),
            user: target.user.clone().filter(|u| !u.is_empty()),
            password: target.password.clone(),
            target,
        }
    }
}

#[async_trait]
impl Check for RedisCheck {
    fn name(&self) -> &str {
        &self.name
    }

    fn protocol(&self) -> &str {
        "redis"
    }

    async fn probe(&self) -> Result<(), String> {
        let stream = TcpStream::connect(self.target.addr())
            .await
            .map_err(|e| format!("connect {}: {e}", self.target.addr()))?;
        let mut stream = BufReader::new(stream);
        if let Some(password) = &self.password {
            let mut args = vec!["AUTH"];
            if let Some(user) = &self.user {
                args.push(user);
            }
            args.push(password);
            let reply = redis_command(&mut stream, &args).await?;
            if !reply.starts_with('+') {
                // The reply names the problem (WRONGPASS, ...) but never echoes the password.
                return Err(format!("AUTH refused: {}", reply.trim_start_matches('-')));
            }
        }
        let reply = redis_command(&mut stream, &["PING"]).await?;
        if reply == "+PONG" {
            Ok(())
        } else {
            Err(format!(
                "PING answered {:?}",
                reply.trim_start_matches(['-', '+'])
            ))
        }
    }
}

/// Sends one RESP command and reads a one-line reply.
async fn redis_command(stream: &mut BufReader<TcpStream>, args: &[&str]) -> Result<String, String> {
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream
        .get_mut()
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut line = String::new();
    let read = stream
        .read_line(&mut line)
        .await
        .map_err(|e| format!("read: {e}"))?;
    if read == 0 {
        return Err("connection closed without a reply".into());
    }
    Ok(line.trim_end().to_owned())
}

/// HTTP(S): a `GET` whose answer is anything but a 5xx. Object stores answer an anonymous
/// request with 403, which still proves the service is up.
pub struct HttpCheck {
    name: String,
    url: String,
    client: reqwest::Client,
}

impl HttpCheck {
    /// A check that sends `GET url` with `client`.
    pub fn new(name: &str, url: &str, client: reqwest::Client) -> Self {
        Self {
            name: name.to_owned(),
            url: url.to_owned(),
            client,
        }
    }
}

#[async_trait]
impl Check for HttpCheck {
    fn name(&self) -> &str {
        &self.name
    }

    fn protocol(&self) -> &str {
        "http"
    }

    async fn probe(&self) -> Result<(), String> {
        let response = self
            .client
            .get(&self.url)
            .send()
            .await
            .map_err(|e| redact(&crate::collectors::http_error(e), &self.url))?;
        let status = response.status();
        if status.is_server_error() {
            Err(format!("HTTP {status}"))
        } else {
            Ok(())
        }
    }
}

/// TCP: the connection opens, as the ERP instance agent checked everything.
pub struct TcpCheck {
    name: String,
    target: Target,
}

impl TcpCheck {
    /// A check that connects to the host and port of `url` (or `host:port`), using
    /// `default_port` when none is given.
    pub fn new(name: &str, url: &str, default_port: u16) -> Self {
        Self {
            name: name.to_owned(),
            target: Target::parse(url, default_port),
        }
    }
}

#[async_trait]
impl Check for TcpCheck {
    fn name(&self) -> &str {
        &self.name
    }

    fn protocol(&self) -> &str {
        "tcp"
    }

    async fn probe(&self) -> Result<(), String> {
        if self.target.host.is_empty() {
            return Err("no host in the configured URL".into());
        }
        TcpStream::connect(self.target.addr())
            .await
            .map(drop)
            .map_err(|e| format!("connect {}: {e}", self.target.addr()))
    }
}

/// A check for a service that is not configured: fails with the variable to set.
pub struct NotConfigured {
    name: String,
    variable: String,
}

impl NotConfigured {
    /// A check named `name` that reports `variable` as unset.
    pub fn new(name: &str, variable: &str) -> Self {
        Self {
            name: name.to_owned(),
            variable: variable.to_owned(),
        }
    }
}

#[async_trait]
impl Check for NotConfigured {
    fn name(&self) -> &str {
        &self.name
    }

    fn protocol(&self) -> &str {
        "none"
    }

    async fn probe(&self) -> Result<(), String> {
        Err(format!("{} is not set", self.variable))
    }
}

/// Host, port and credentials taken from a URL without a URL crate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) user: Option<String>,
    pub(crate) password: Option<String>,
}

impl Target {
    pub(crate) fn parse(url: &str, default_port: u16) -> Self {
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            None => (None, None),
            Some(info) => match info.split_once(':') {
                Some((u, p)) => (Some(percent_decode(u)), Some(percent_decode(p))),
                None => (Some(percent_decode(info)), None),
            },
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6.split_once(']').unwrap_or((v6, ""));
            (
                h.to_owned(),
                after.strip_prefix(':').and_then(|p| p.parse().ok()),
            )
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), p.parse().ok()),
                None => (hostport.to_owned(), None),
            }
        };
        Self {
            host,
            port: port.unwrap_or(default_port),
            user,
            password,
        }
    }

    pub(crate) fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes the password of `url` from an error text, in case a library echoes it, and the
/// userinfo, query and fragment of any URL the text quotes.
pub(crate) fn redact(text: &str, url: &str) -> String {
    let text = match Target::parse(url, 0).password.filter(|p| !p.is_empty()) {
        Some(password) => text.replace(&password, "[redacted]"),
        None => text.to_owned(),
    };
    fleet_core::redact_url_secrets(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Says(&'static str, String);

    #[async_trait]
    impl Check for Says {
        fn name(&self) -> &str {
            self.0
        }
        async fn probe(&self) -> Result<(), String> {
            Err(self.1.clone())
        }
    }

    #[test]
    fn a_check_name_is_an_identifier() {
        assert_eq!(name_problem("job_queue"), None);
        for bad in ["", "job queue", "tab\there", &"x".repeat(300)] {
            let problem = name_problem(bad).expect(bad);
            assert!(
                problem.starts_with(&format!("check name {bad:?} "))
                    && problem.contains("`job_queue`"),
                "{problem}"
            );
        }
    }

    #[tokio::test]
    async fn a_reason_fits_the_heartbeat_whatever_the_check_says() {
        let max = fleet_core::Limits::default().max_message_len;
        let coloured = Says("c", "\u{1b}[31mdisk full\u{1b}[0m\r\nline two\ttab".into());
        let result = run_check(&coloured, Duration::from_secs(1)).await;
        assert_eq!(
            result.error.as_deref(),
            Some("[31mdisk full[0m\nline two\ttab")
        );
        let long = Says("l", "é".repeat(max));
        let reason = run_check(&long, Duration::from_secs(1))
            .await
            .error
            .expect("failed");
        assert!(
            reason.len() <= max && reason.ends_with('…'),
            "{}",
            reason.len()
        );
        let mut errors = fleet_core::ValidationErrors::default();
        fleet_core::validate::check_text(
            &mut errors,
            &fleet_core::validate::Path::Root,
            &reason,
            max,
        );
        assert!(errors.is_empty(), "{errors:?}");
    }

    #[test]
    fn targets_come_from_urls_and_host_ports() {
        let t = Target::parse("redis://user:p%40ss@cache:6380/2", 6379);
        assert_eq!(t.host, "cache");
        assert_eq!(t.port, 6380);
        assert_eq!(t.user.as_deref(), Some("user"));
        assert_eq!(t.password.as_deref(), Some("p@ss"));
        let t = Target::parse("redis://:secret@127.0.0.1", 6379);
        assert_eq!(
            (t.addr().as_str(), t.user.as_deref()),
            ("127.0.0.1:6379", Some(""))
        );
        assert_eq!(Target::parse("minio:9000", 1).addr(), "minio:9000");
        assert_eq!(Target::parse("search", 7700).addr(), "search:7700");
        assert_eq!(Target::parse("http://[::1]:81/x", 80).addr(), "[::1]:81");
        assert_eq!(Target::parse("mysql://db/app", 3306).addr(), "db:3306");
    }

    #[test]
    fn the_protocol_follows_the_scheme() {
        let http = reqwest::Client::new();
        let p = |url: &str| {
            check_for_url("x", url, 1, http.clone())
                .protocol()
                .to_owned()
        };
        assert_eq!(p("postgres://u:p@h/db"), "postgres");
        assert_eq!(p("postgresql://h/db"), "postgres");
        assert_eq!(p("redis://h"), "redis");
        assert_eq!(p("https://s3.example"), "http");
        assert_eq!(p("rediss://h"), "tcp");
        assert_eq!(p("mysql://h/db"), "tcp");
        assert_eq!(p("minio:9000"), "tcp");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("auth failed for hunter2", "postgres://u:hunter2@h/db"),
            "auth failed for [redacted]"
        );
        assert_eq!(
            redact(
                "error for url (https://s3.example/b?X-Amz-Signature=abc)",
                "https://s3.example/b?X-Amz-Signature=abc"
            ),
            "error for url (https://s3.example/b?[redacted])"
        );
    }

    #[tokio::test]
    async fn a_failed_http_check_names_the_failure_not_the_query() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://u:USERINFOPASS@127.0.0.1:{port}/b/k?X-Amz-Signature=SIGQUERY");
        let check = HttpCheck::new("storage", &url, reqwest::Client::new());
        let r = run_check(&check, Duration::from_secs(5)).await;
        let error = r.error.unwrap();
        assert!(error.contains("error sending request"), "{error}");
        assert!(
            !error.contains("SIGQUERY") && !error.contains("USERINFOPASS"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_check_quoting_a_url_loses_its_query() {
        struct Quoting;
        #[async_trait]
        impl Check for Quoting {
            fn name(&self) -> &str {
                "own"
            }
            async fn probe(&self) -> Result<(), String> {
                Err("GET https://api.example/v1?key=OWNKEY failed".into())
            }
        }
        let r = run_check(&Quoting, Duration::from_secs(1)).await;
        assert_eq!(
            r.error.as_deref(),
            Some("GET https://api.example/v1?[redacted] failed")
        );
    }

    #[tokio::test]
    async fn a_slow_check_times_out_with_a_reason() {
        struct Slow;
        #[async_trait]
        impl Check for Slow {
            fn name(&self) -> &str {
                "slow"
            }
            async fn probe(&self) -> Result<(), String> {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok(())
            }
        }
        let r = run_check(&Slow, Duration::from_millis(20)).await;
        assert!(!r.ok);
        assert_eq!(r.error.as_deref(), Some("timed out after 20 ms"));
    }
}
