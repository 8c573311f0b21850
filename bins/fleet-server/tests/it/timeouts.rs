//! How `serve` treats slow and abandoned clients, and what its own way of serving
//! connections must keep: each client's address reaching the handlers, and a SIGTERM that
//! lets the request in flight finish. The timeouts are tested at their real values (30 s
//! for headers, 60 s for a body, `HEADER_READ_TIMEOUT` and `REQUEST_BODY_TIMEOUT` in
//! `main.rs`); the tests run side by side, so the suite takes about a minute longer.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::{BIN, free_addr, temp_dir};

const SECRET: &str = "shared-secret";

/// `serve` on a fresh SQLite database at `addr`, with `env` added, answering /healthz.
async fn serve(addr: &str, env: &[(&str, &str)]) -> (Child, std::path::PathBuf) {
    let dir = temp_dir("timeouts");
    let mut command = Command::new(BIN);
    command
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("FLEET_LISTEN", addr)
        .env(
            "CONTROL_PLANE_DATABASE_URL",
            format!("sqlite://{}", dir.join("cp.db").display()),
        )
        .env("CONTROL_PLANE_ADMIN_TOKEN", "admin-token")
        .env("CONTROL_PLANE_AGENT_TOKEN", SECRET)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let server = command.spawn().expect("start");
    let client = reqwest::Client::new();
    for _ in 0..200 {
        if let Ok(r) = client.get(format!("http://{addr}/healthz")).send().await
            && r.status().is_success()
        {
            return (server, dir);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{addr} never answered /healthz");
}

/// Reads until the server closes the connection (or resets it); returns what it read and
/// when the close came. Gives up after `limit`.
async fn read_until_closed(
    stream: &mut tokio::net::tcp::OwnedReadHalf,
    limit: Duration,
) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    let mut read = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return (read, start.elapsed()),
            Ok(Ok(n)) => read.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "still open after {limit:?}; read {:?}",
                String::from_utf8_lossy(&read)
            ),
        }
    }
}

#[tokio::test]
async fn connections_that_never_finish_their_headers_are_closed_after_30_s() {
    let addr = free_addr();
    let (_server, dir) = serve(&addr, &[]).await;
    // Slowloris: a request line and half a header, then nothing; and a client that sends
    // nothing at all.
    let mut partial = TcpStream::connect(&addr).await.expect("connect");
    partial
        .write_all(b"POST /v1/agents/poll HTTP/1.1\r\nHost: fleet\r\nContent-Le")
        .await
        .expect("write");
    let silent = TcpStream::connect(&addr).await.expect("connect");
    let (mut partial, _keep_partial) = partial.into_split();
    let (mut silent, _keep_silent) = silent.into_split();
    let limit = Duration::from_secs(45);
    let ((partial_read, partial_after), (silent_read, silent_after)) = tokio::join!(
        read_until_closed(&mut partial, limit),
        read_until_closed(&mut silent, limit)
    );
    for (read, after) in [(partial_read, partial_after), (silent_read, silent_after)] {
        assert!(
            after >= Duration::from_secs(25),
            "closed after only {after:?}: {:?}",
            String::from_utf8_lossy(&read)
        );
        assert!(
            !String::from_utf8_lossy(&read).contains("200 OK"),
            "an unfinished request got an answer"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_body_that_trickles_in_is_cut_off_with_408_after_60_s() {
    let addr = free_addr();
    let (_server, dir) = serve(&addr, &[]).await;
    let stream = TcpStream::connect(&addr).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    writer
        .write_all(
            b"POST /v1/agents/poll HTTP/1.1\r\nHost: fleet\r\nContent-Type: application/json\r\n\
              Content-Length: 1048576\r\n\r\n",
        )
        .await
        .expect("write headers");
    // Sixteen bytes a second: a timeout between chunks would never fire.
    let trickle = tokio::spawn(async move {
        while writer.write_all(b"{\"frames\":[    ").await.is_ok() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let (read, after) = read_until_closed(&mut reader, Duration::from_secs(80)).await;
    trickle.abort();
    let answer = String::from_utf8_lossy(&read);
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "after {after:?}: {answer}"
    );
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(
        after >= Duration::from_secs(55),
        "cut off after only {after:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A heartbeat from `instance`: its body and its v0 signature with [`SECRET`].
fn heartbeat(instance: &str) -> (Vec<u8>, String) {
    let body = format!(
        r#"{{"instance_id":"{instance}","db_ok":true,"redis_ok":true,"storage_ok":true,"jobs_failed":0}}"#
    )
    .into_bytes();
    let signature = fleet_core::sign_v0(&fleet_core::Secret::new(SECRET).expect("secret"), &body);
    (body, signature)
}

#[tokio::test]
async fn sigterm_lets_the_request_in_flight_finish_and_refuses_new_ones() {
    let addr = free_addr();
    let (mut server, dir) = serve(&addr, &[]).await;
    let (body, signature) = heartbeat("before-term");
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/api/heartbeats"))
        .header("x-agent-signature", signature)
        .body(body)
        .send()
        .await
        .expect("heartbeat");
    assert_eq!(response.status(), 200);

    // Another is in flight (headers and half its body sent) when SIGTERM comes.
    let (body, signature) = heartbeat("in-flight");
    let head = format!(
        "POST /api/heartbeats HTTP/1.1\r\nHost: fleet\r\nx-agent-signature: {signature}\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    let mut stream = TcpStream::connect(&addr).await.expect("connect");
    stream.write_all(head.as_bytes()).await.expect("write");
    let (first, rest) = body.split_at(body.len() / 2);
    stream.write_all(first).await.expect("write");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = server.id().expect("pid").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    tokio::time::sleep(Duration::from_millis(500)).await;
    // No new connection is taken once the signal is in.
    assert!(
        TcpStream::connect(&addr).await.is_err(),
        "a new connection was accepted after SIGTERM"
    );
    stream.write_all(rest).await.expect("write the rest");
    let (mut reader, _writer) = stream.into_split();
    let (read, _) = read_until_closed(&mut reader, Duration::from_secs(10)).await;
    let answer = String::from_utf8_lossy(&read);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let exit = tokio::time::timeout(Duration::from_secs(10), server.wait())
        .await
        .expect("the server did not exit after its last request")
        .expect("wait");
    assert!(exit.success(), "{exit:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A reqwest client whose connections come from `ip` (a loopback address).
fn client_from(ip: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(std::net::IpAddr::from(ip))
        .build()
        .expect("client")
}

#[tokio::test]
async fn the_limit_on_failed_token_checks_counts_each_client_address_apart() {
    let addr = free_addr();
    let (_server, dir) = serve(&addr, &[("CONTROL_PLANE_AUTH_FAILURES_PER_MINUTE", "2")]).await;
    let url = format!("http://{addr}/api/installations");
    let guesser = client_from([127, 0, 0, 2]);
    let mut held_back = false;
    for _ in 0..10 {
        let status = guesser
            .get(&url)
            .bearer_auth("wrong-token")
            .send()
            .await
            .expect("send")
            .status();
        if status == 429 {
            held_back = true;
            break;
        }
        assert_eq!(status, 401);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(held_back, "the guessing client was never held back");
    // Had the peer address not reached the handlers, every client would share the guesser's
    // allowance.
    let operator = client_from([127, 0, 0, 3]);
    let status = operator
        .get(&url)
        .bearer_auth("admin-token")
        .send()
        .await
        .expect("send")
        .status();
    assert_eq!(status, 200);
    let _ = std::fs::remove_dir_all(dir);
}
