//! `UpdatePackage` against this host's real package manager (apt on the Debian machines the
//! tests run on): install a tiny real package, check it with `dpkg -s`, remove it; and the
//! names that must never reach apt as options, patterns, regular expressions or another
//! action (`remove hello+`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_agent::CommandSettings;
use fleet_agent::commands::Executor;
use fleet_agent::logstream::Journal;
use fleet_core::command::{CommandEnvelope, CommandResult, CommandStatus};
use serde_json::json;

use crate::support::temp_dir;

/// A tiny package from Debian main (53 kB, no dependencies beyond libc).
const PACKAGE: &str = "hello";

fn installed(package: &str) -> bool {
    let out = std::process::Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev}", "--", package])
        .output()
        .expect("dpkg-query must exist on this Debian host");
    String::from_utf8_lossy(&out.stdout).starts_with("ii")
}

/// Runs one `UpdatePackage` through the executor and returns its final result.
async fn update_package(
    executor: &Executor,
    journal: &Journal,
    id: &str,
    action: &str,
    packages: &[&str],
) -> CommandResult {
    let envelope: CommandEnvelope = serde_json::from_value(json!({
        "id": id, "type": "UpdatePackage",
        "payload": {"action": action, "packages": packages},
    }))
    .expect("envelope");
    executor.accept(envelope).await.expect("accept");
    // apt may have to download the package and wait for another apt's lock.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let done = crate::commands::results(journal)
            .await
            .into_iter()
            .find(|r| r.job_id == id && r.status != CommandStatus::InProgress);
        if let Some(done) = done {
            return done;
        }
        assert!(Instant::now() < deadline, "{id} did not end within 300 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_package_installs_and_removes_a_real_package_with_apt() {
    let path = std::env::var("PATH").unwrap_or_default();
    let detected = fleet_agent::commands::packages::detect(&path);
    assert!(
        matches!(
            detected,
            Some((fleet_agent::commands::packages::Manager::Apt, _))
        ),
        "this test needs apt-get on PATH (a Debian host), found {detected:?}"
    );
    let dir = temp_dir("packages");
    let journal = Journal::open(&dir.join("state.db")).await.expect("journal");
    let settings = CommandSettings {
        default_timeout: Duration::from_secs(300),
        ..CommandSettings::default()
    };
    let executor = Executor::new(
        journal.clone(),
        settings,
        None,
        Arc::new(tokio::sync::watch::channel(false).0),
    );
    if installed(PACKAGE) {
        // Left by an interrupted run: start from "not installed".
        let result = update_package(&executor, &journal, "pkg-0", "remove", &[PACKAGE]).await;
        assert_eq!(result.status, CommandStatus::Completed, "{result:?}");
    }
    assert!(!installed(PACKAGE));

    let result = update_package(&executor, &journal, "pkg-1", "install", &[PACKAGE]).await;
    assert_eq!(result.status, CommandStatus::Completed, "{result:?}");
    assert_eq!(result.exit_code, Some(0));
    assert!(
        installed(PACKAGE),
        "dpkg does not list {PACKAGE} as installed"
    );
    let hello = std::process::Command::new("hello")
        .output()
        .expect("run the installed program");
    assert_eq!(String::from_utf8_lossy(&hello.stdout), "Hello, world!\n");

    let result = update_package(&executor, &journal, "pkg-2", "remove", &[PACKAGE]).await;
    assert_eq!(result.status, CommandStatus::Completed, "{result:?}");
    assert!(!installed(PACKAGE), "{PACKAGE} is still installed");

    // apt reads `hello+` as "install hello" when no package has that exact name: a removal
    // must not install anything.
    let result = update_package(&executor, &journal, "pkg-plus", "remove", &["hello+"]).await;
    assert_eq!(result.status, CommandStatus::Failed, "{result:?}");
    assert_eq!(result.exit_code, None, "hello+ reached apt-get");
    let error = result.error.unwrap_or_default();
    assert!(error.contains("\"hello+\""), "{error}");
    assert!(!installed(PACKAGE), "removing hello+ installed {PACKAGE}");

    // A name that is no package is not retried by apt as a regular expression ("hell."
    // would match hello, hello-traditional, ...): the command fails and installs nothing.
    let result = update_package(&executor, &journal, "pkg-3", "install", &["hell."]).await;
    assert_eq!(result.status, CommandStatus::Failed, "{result:?}");
    assert!(!installed(PACKAGE) && !installed("hello-traditional"));

    // Options, apt's "remove" suffix, patterns and shell text never reach apt.
    for (i, name) in [
        "-oAPT::Get::Simulate=false",
        "hello-",
        "?installed",
        "hello;reboot",
        "$(reboot)",
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("bad-{i}");
        let result = update_package(&executor, &journal, &id, "install", &[name]).await;
        assert_eq!(result.status, CommandStatus::Failed, "{name}: {result:?}");
        assert_eq!(result.exit_code, None, "{name} reached the package manager");
        let error = result.error.unwrap_or_default();
        assert!(
            error.contains("not a valid package name"),
            "{name}: {error}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
