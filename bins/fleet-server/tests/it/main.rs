//! The `fleet-server` binary, run as a real process: configuration, `serve`, the demo, and
//! the live channel across restarts and replicas. One test binary, so it is linked once.

mod cli;
mod live;
mod timeouts;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_fleet-server");

/// A free 127.0.0.1 port, as `host:port`.
pub fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").to_string()
}

/// A new, empty directory under the system's temporary directory.
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "fleet-server-{name}-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
