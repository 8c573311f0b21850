//! `DEPLOY_COMPOSE`, `STOP_COMPOSE` and `STATUS` with the InstaDeploy rules: the project name
//! matches `^[a-zA-Z0-9_-]+$`, the project folder resolves inside the projects folder, and
//! the compose command is configurable. Folders are 0700 and files 0600, not InstaDeploy's
//! 0755/0644: a compose file often holds secrets (`DB_PASSWORD`), and compose runs as the
//! agent's user, the only one that needs to read it. Compose runs
//! as `<compose> -p <name> -f <file> up -d | down | ps` in the project folder. A deploy that
//! fails puts the project's previous compose file back, so the project that still runs can
//! be stopped and listed.

use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use fleet_core::command::{
    CommandResult, CommandStatus, DeployCompose, ProjectRef, is_valid_project_name,
};
use tokio::sync::Notify;

use super::run::{Program, result_of, spawn};
use super::{CommandSettings, Output, completed, failed};

/// The compose file's name inside a project folder.
pub const COMPOSE_FILE: &str = "docker-compose.yml";
/// Largest compose file accepted.
pub const MAX_COMPOSE_BYTES: usize = 1024 * 1024;

/// The folder of project `name`, checked: a valid name, and (when it exists) a real folder
/// directly inside the projects folder, not a symlink leading elsewhere.
pub fn project_dir(projects_dir: &Path, name: &str) -> Result<PathBuf, String> {
    if !is_valid_project_name(name) {
        return Err("invalid project name: it must match ^[a-zA-Z0-9_-]+$".into());
    }
    let dir = projects_dir.join(name);
    if let Ok(meta) = std::fs::symlink_metadata(&dir) {
        if !meta.is_dir() {
            return Err("the project path is not a folder".into());
        }
        let root = projects_dir
            .canonicalize()
            .map_err(|e| format!("projects folder: {e}"))?;
        let resolved = dir
            .canonicalize()
            .map_err(|e| format!("project folder: {e}"))?;
        if resolved.parent() != Some(root.as_path()) {
            return Err("the project folder resolves outside the projects folder".into());
        }
    }
    Ok(dir)
}

fn compose_program<'a>(
    settings: &'a CommandSettings,
    name: &str,
    file: &Path,
    action: &[&str],
) -> Option<(&'a str, Vec<String>)> {
    let (program, lead) = settings.compose_command.split_first()?;
    let mut args: Vec<String> = lead.to_vec();
    args.extend([
        "-p".to_owned(),
        name.to_owned(),
        "-f".to_owned(),
        file.display().to_string(),
    ]);
    args.extend(action.iter().map(|a| (*a).to_owned()));
    Some((program.as_str(), args))
}

async fn compose(
    settings: &CommandSettings,
    name: &str,
    dir: &Path,
    action: &[&str],
    output: &Output,
    cancel: &Notify,
) -> CommandResult {
    let file = dir.join(COMPOSE_FILE);
    let Some((program, args)) = compose_program(settings, name, &file, action) else {
        return failed("", "no compose command configured");
    };
    let env = BTreeMap::new();
    let finished = spawn(
        &Program {
            program,
            args: &args,
            env: &env,
            cwd: Some(dir),
            timeout: settings.default_timeout,
        },
        output,
        cancel,
    )
    .await;
    result_of(finished, program)
}

/// Writes `bytes` to `path` with mode 0600, atomically (a temporary file renamed over it).
fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("yml.tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    // Exactly, whatever the umask, and before any byte is written: a temporary file left by
    // an earlier agent keeps the mode it was created with.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// `DEPLOY_COMPOSE`: writes `<projects>/<name>/docker-compose.yml` and runs `up -d`.
pub async fn deploy(
    settings: &CommandSettings,
    deploy: &DeployCompose,
    output: &Output,
    cancel: &Notify,
) -> CommandResult {
    // Everything is checked before anything is written.
    let dir = match project_dir(&settings.projects_dir, &deploy.project_name) {
        Ok(dir) => dir,
        Err(why) => return failed("", &why),
    };
    let bytes = match base64::engine::general_purpose::STANDARD.decode(&deploy.compose_file_base64)
    {
        Ok(bytes) if bytes.len() <= MAX_COMPOSE_BYTES && !bytes.is_empty() => bytes,
        Ok(_) => return failed("", "the compose file is empty or larger than 1 MiB"),
        Err(_) => return failed("", "compose_file_base64 is not valid base64"),
    };
    let prepared = (|| -> std::io::Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&settings.projects_dir)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        // Exactly 0700 whatever the umask, and a folder an earlier agent made 0755 is
        // tightened at its next deploy.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        Ok(())
    })();
    if let Err(err) = prepared {
        return failed("", &format!("cannot create the project folder: {err}"));
    }
    // Checked again now that the folder exists (a symlink planted meanwhile is refused).
    if let Err(why) = project_dir(&settings.projects_dir, &deploy.project_name) {
        return failed("", &why);
    }
    let file = dir.join(COMPOSE_FILE);
    // The file of the project that runs now, put back if this deploy fails: a file compose
    // cannot read would otherwise take its place, and STOP_COMPOSE (`down`) and STATUS
    // (`ps`) could no longer reach the containers that still run.
    let previous = match std::fs::read(&file) {
        Ok(previous) => Some(previous),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
        Err(err) => return failed("", &format!("cannot read the current compose file: {err}")),
    };
    if let Err(err) = write_file(&file, &bytes) {
        return failed("", &format!("cannot write the compose file: {err}"));
    }
    let mut result = compose(
        settings,
        &deploy.project_name,
        &dir,
        &["up", "-d"],
        output,
        cancel,
    )
    .await;
    if result.status != CommandStatus::Completed
        && let Some(previous) = previous.filter(|previous| *previous != bytes)
    {
        let note = match write_file(&file, &previous) {
            Ok(()) => "the previous compose file was put back".to_owned(),
            Err(err) => format!("cannot put the previous compose file back: {err}"),
        };
        result.error = Some(match result.error.take() {
            Some(error) => format!("{error}; {note}"),
            None => note,
        });
    }
    result
}

/// `STOP_COMPOSE`: `down` in the project folder.
pub async fn stop(
    settings: &CommandSettings,
    project: &ProjectRef,
    output: &Output,
    cancel: &Notify,
) -> CommandResult {
    let dir = match project_dir(&settings.projects_dir, &project.project_name) {
        Ok(dir) => dir,
        Err(why) => return failed("", &why),
    };
    if !dir.join(COMPOSE_FILE).is_file() {
        return failed("", "the project does not exist");
    }
    compose(
        settings,
        &project.project_name,
        &dir,
        &["down"],
        output,
        cancel,
    )
    .await
}

/// `STATUS`: `ps` in the project folder; `data.containers` lists the container names. An
/// unknown project is not a failure: `data.exists` is false.
pub async fn status(
    settings: &CommandSettings,
    project: &ProjectRef,
    output: &Output,
    cancel: &Notify,
) -> CommandResult {
    let dir = match project_dir(&settings.projects_dir, &project.project_name) {
        Ok(dir) => dir,
        Err(why) => return failed("", &why),
    };
    if !dir.join(COMPOSE_FILE).is_file() {
        let mut result = completed("", "the project does not exist");
        result.data = Some(serde_json::json!({ "exists": false, "containers": [] }));
        return result;
    }
    let mut result = compose(
        settings,
        &project.project_name,
        &dir,
        &["ps"],
        output,
        cancel,
    )
    .await;
    if result.status == CommandStatus::Completed {
        let containers = container_names(&result.logs);
        result.data = Some(serde_json::json!({ "exists": true, "containers": containers }));
    }
    result
}

/// Container names from `ps` output (Compose v1 table after a dashed line, or v2 table
/// after a `NAME` header): the first column of each row.
pub fn container_names(ps: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut in_table = false;
    for line in ps.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        if trimmed.starts_with("---") {
            in_table = true;
            continue;
        }
        let first = trimmed.split_whitespace().next().unwrap_or_default();
        if first == "NAME" || first == "Name" {
            in_table = true;
            continue;
        }
        if in_table {
            names.push(first.to_owned());
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_paths() {
        let root = std::env::temp_dir();
        for bad in ["../etc", "..", "a/b", "", "a b", "x\0"] {
            assert!(project_dir(&root, bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            project_dir(Path::new("/srv/projects"), "web_1-a").ok(),
            Some(PathBuf::from("/srv/projects/web_1-a"))
        );
    }

    #[test]
    fn ps_tables_of_both_compose_versions() {
        let v1 = "    Name          Command       State   Ports\n\
                  -----------------------------------------\n\
                  web_web_1   /bin/busybox httpd   Up\n";
        assert_eq!(container_names(v1), ["web_web_1"]);
        let v2 = "NAME        IMAGE     COMMAND   SERVICE   CREATED   STATUS    PORTS\n\
                  web-web-1   img       \"x\"       web       now       Up\n";
        assert_eq!(container_names(v2), ["web-web-1"]);
    }
}
