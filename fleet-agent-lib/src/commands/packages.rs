//! `UpdatePackage`: install, remove or upgrade host packages with the package manager the
//! host has (apt, dnf or apk, detected on `PATH`). Names are validated
//! ([`is_valid_package_name`]) and passed as separate arguments after `--`, never through a
//! shell; apt-get is told to take them as exact names, not regular expressions.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fleet_core::command::{CommandResult, PackageAction, UpdatePackage, is_valid_package_name};
use tokio::sync::Notify;

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
    let args = manager.args(update.action, &update.packages);
    let env = BTreeMap::from([("DEBIAN_FRONTEND".to_owned(), "noninteractive".to_owned())]);
    let program = program.display().to_string();
    let finished = spawn(
        &Program {
            program: &program,
            args: &args,
            env: &env,
            cwd: None,
            timeout: settings.default_timeout,
        },
        output,
        cancel,
    )
    .await;
    result_of(finished, manager.program())
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

    #[test]
    fn detects_the_manager_on_path() {
        // Whatever this host has, detection answers from PATH alone and never panics.
        let _ = detect(&std::env::var("PATH").unwrap_or_default());
        assert_eq!(detect(""), None);
    }
}
