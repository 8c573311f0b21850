//! `UpdatePackage`: install, remove or upgrade host packages with the package manager the
//! host has (apt, dnf or apk, detected on `PATH`). Names are validated
//! ([`is_valid_package_name`]) and passed as separate arguments after `--`, never through a
//! shell; apt-get is told to take them as exact names, not regular expressions, and gets a
//! name ending in `+` or `-` only when a package has that exact name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use fleet_core::command::{CommandResult, PackageAction, UpdatePackage, is_valid_package_name};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::run::{Program, result_of, spawn};
use super::{CommandSettings, Output, failed};

/// A package manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Manager {
    /// Debian, Ubuntu: `apt-get`.
    Apt,
    /// Fedora, RHEL: `dnf`.
    Dnf,
    /// Alpine: `apk`.
    Apk,
}

impl Manager {
    /// The executable's name.
    pub fn program(self) -> &'static str {
        match self {
            Self::Apt => "apt-get",
            Self::Dnf => "dnf",
            Self::Apk => "apk",
        }
    }

    /// The arguments for `action` on `packages` (already validated).
    pub fn args(self, action: PackageAction, packages: &[String]) -> Vec<String> {
        let options: &[&str] = match self {
            // Names are exact (`Pattern-Only`: without it, a name that matches no package is
            // retried as a regular expression, so `remove libc.+` would match every libc
            // package); wait for the dpkg lock rather than fail when another apt runs.
            Self::Apt => &[
                "-o",
                "APT::Cmd::Pattern-Only=true",
                "-o",
                "DPkg::Lock::Timeout=120",
            ],
            Self::Dnf | Self::Apk => &[],
        };
        let verb: &[&str] = match (self, action) {
            // An install or upgrade never removes other packages to make room.
            (Self::Apt, PackageAction::Install) => &["install", "-y", "--no-remove", "--"],
            (Self::Apt, PackageAction::Remove) => &["remove", "-y", "--"],
            (Self::Apt, PackageAction::Upgrade) => {
                &["install", "-y", "--no-remove", "--only-upgrade", "--"]
            }
            (Self::Dnf, PackageAction::Install) => &["install", "-y", "--"],
            (Self::Dnf, PackageAction::Remove) => &["remove", "-y", "--"],
            (Self::Dnf, PackageAction::Upgrade) => &["upgrade", "-y", "--"],
            (Self::Apk, PackageAction::Install) => &["add", "--no-interactive", "--"],
            (Self::Apk, PackageAction::Remove) => &["del", "--no-interactive", "--"],
            (Self::Apk, PackageAction::Upgrade) => &["upgrade", "--no-interactive", "--"],
        };
        options
            .iter()
            .chain(verb)
            .map(|a| (*a).to_owned())
            .chain(packages.iter().cloned())
            .collect()
    }
}

/// The first of apt-get, dnf and apk found in the folders of `path` (a `PATH` value).
pub fn detect(path: &str) -> Option<(Manager, PathBuf)> {
    for manager in [Manager::Apt, Manager::Dnf, Manager::Apk] {
        for dir in path.split(':').filter(|d| !d.is_empty()) {
            let candidate = Path::new(dir).join(manager.program());
            if candidate.is_file() {
                return Some((manager, candidate));
            }
        }
    }
    None
}

/// Runs the package manager.
pub async fn update(
    settings: &CommandSettings,
    update: &UpdatePackage,
    output: &Output,
    cancel: &Notify,
) -> CommandResult {
    if update.packages.is_empty() || !update.packages.iter().all(|p| is_valid_package_name(p)) {
        return failed("", "invalid package names");
    }
    let path = std::env::var("PATH").unwrap_or_default();
    let Some((manager, program)) = detect(&path) else {
        return failed(
            "",
            "no supported package manager (apt-get, dnf, apk) on PATH",
        );
    };
    // One limit for the whole command, the name check included.
    let deadline = Instant::now() + settings.default_timeout;
    if manager == Manager::Apt {
        let check = tokio::time::timeout_at(deadline, apt_exact_names(&program, &update.packages));
        let checked = tokio::select! {
            checked = check => {
                checked.unwrap_or_else(|_| Err("timed out checking the package names".into()))
            }
            () = cancel.notified() => Err("cancelled while checking the package names".into()),
        };
        if let Err(why) = checked {
            return failed("", &why);
        }
    }
    let args = manager.args(update.action, &update.packages);
    let env = BTreeMap::from([("DEBIAN_FRONTEND".to_owned(), "noninteractive".to_owned())]);
    let program = program.display().to_string();
    let finished = spawn(
        &Program {
            program: &program,
            args: &args,
            env: &env,
            cwd: None,
            timeout: deadline.saturating_duration_since(Instant::now()),
        },
        output,
        cancel,
    )
    .await;
    result_of(finished, manager.program())
}

/// apt's action suffixes: `apt-get remove NAME+` installs NAME and `apt-get install NAME-`
/// removes it, unless a package is called `NAME+` or `NAME-` exactly (as `g++` is). dnf and
/// apk give a trailing character no meaning.
const APT_ACTION_SUFFIXES: [char; 2] = ['+', '-'];

/// Checks that every name in `packages` ending in an action suffix is a package of that
/// exact name, so apt-get takes it whole and performs the action asked for. apt-cache
/// resolves a name as apt-get does before it tries the suffix (candidate version, no
/// regular expression with `Pattern-Only`); `apt_get` is the apt-get found on `PATH`, and
/// apt-cache is taken beside it.
async fn apt_exact_names(apt_get: &Path, packages: &[String]) -> Result<(), String> {
    let apt_cache = apt_get.with_file_name("apt-cache");
    for name in packages.iter().filter(|n| n.ends_with(APT_ACTION_SUFFIXES)) {
        let shown = tokio::process::Command::new(&apt_cache)
            .args([
                "-o",
                "APT::Cmd::Pattern-Only=true",
                "show",
                "--no-all-versions",
                "--",
            ])
            .arg(name)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|err| format!("cannot start {}: {err}", apt_cache.display()))?;
        // A virtual package exits 0 with no record: refused too, as apt-get might strip the
        // suffix rather than pick a provider.
        if !(shown.status.success() && shown.stdout.starts_with(b"Package: ")) {
            let (base, action) = match name.split_at(name.len() - 1) {
                (base, "+") => (base, "install"),
                (base, _) => (base, "remove"),
            };
            return Err(format!(
                "no package is called \"{name}\": apt would take it to mean \"{action} {base}\""
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_keep_names_apart_from_options() {
        let names = vec!["curl".to_owned(), "libssl3".to_owned()];
        assert_eq!(
            Manager::Apt.args(PackageAction::Upgrade, &names)[4..],
            [
                "install",
                "-y",
                "--no-remove",
                "--only-upgrade",
                "--",
                "curl",
                "libssl3"
            ]
        );
        assert_eq!(
            Manager::Apt.args(PackageAction::Remove, &names)[..2],
            ["-o", "APT::Cmd::Pattern-Only=true"]
        );
        assert_eq!(
            Manager::Apk.args(PackageAction::Remove, &names),
            ["del", "--no-interactive", "--", "curl", "libssl3"]
        );
        assert_eq!(
            Manager::Dnf.args(PackageAction::Install, &names)[..3],
            ["install", "-y", "--"]
        );
    }

    /// Runs apt for real, as tests/it/packages.rs does: this test needs a Debian host.
    #[tokio::test]
    async fn apt_gets_a_trailing_plus_only_when_a_package_has_that_exact_name() {
        let apt_get = match detect(&std::env::var("PATH").unwrap_or_default()) {
            Some((Manager::Apt, apt_get)) => apt_get,
            other => panic!("this test needs apt-get on PATH (a Debian host), found {other:?}"),
        };
        let names = |names: &[&str]| names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
        apt_exact_names(&apt_get, &names(&["hello", "g++"]))
            .await
            .expect("g++ is a package of its own");
        // Passed whole, `g++` is what `remove` removes: nothing is installed.
        let simulated = std::process::Command::new(&apt_get)
            .arg("-s")
            .args(Manager::Apt.args(PackageAction::Remove, &names(&["g++"])))
            .output()
            .expect("apt-get -s");
        let stdout = String::from_utf8_lossy(&simulated.stdout);
        assert!(simulated.status.success(), "{stdout}");
        assert!(!stdout.lines().any(|l| l.starts_with("Inst ")), "{stdout}");

        // No package is called `curl+`: apt-get would install curl, even in `remove`.
        assert_eq!(
            apt_exact_names(&apt_get, &names(&["hello", "curl+"])).await,
            Err(r#"no package is called "curl+": apt would take it to mean "install curl""#.into())
        );
        assert_eq!(
            apt_exact_names(&apt_get, &names(&["hello-"])).await,
            Err(
                r#"no package is called "hello-": apt would take it to mean "remove hello""#.into()
            )
        );
    }

    #[test]
    fn detects_the_manager_on_path() {
        // Whatever this host has, detection answers from PATH alone and never panics.
        let _ = detect(&std::env::var("PATH").unwrap_or_default());
        assert_eq!(detect(""), None);
    }
}
