//! `RunCommand`, and the process runner every command type uses: a program with its
//! arguments (no shell unless asked for), in its own process group, output streamed to the
//! journal as it comes, the whole group killed on timeout or cancel.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use fleet_core::command::{CommandResult, CommandStatus, RunCommand, Stream};
use tokio::io::AsyncReadExt;
use tokio::sync::Notify;

use super::Output;

/// Largest chunk gathered from a pipe before it is written to the journal.
pub const CHUNK_BYTES: usize = 192 * 1024;
/// How long a reader waits for more bytes before writing a partial chunk.
const GATHER: Duration = Duration::from_millis(50);
/// How long readers may drain the pipes after the group was killed.
const DRAIN_AFTER_KILL: Duration = Duration::from_secs(5);
/// Bytes of each stream's end kept for the short log.
const TAIL_BYTES: usize = 16 * 1024;

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// Exit code (`None` when killed by a signal).
    pub exit_code: Option<i32>,
    /// Killed because the timeout passed.
    pub timed_out: bool,
    /// Killed because the command was cancelled.
    pub cancelled: bool,
    /// The last bytes of stdout and stderr, for the short log.
    pub tail: String,
}

/// A program to run.
#[derive(Debug, Clone)]
pub struct Program<'a> {
    /// The executable.
    pub program: &'a str,
    /// Its arguments, passed as they are.
    pub args: &'a [String],
    /// Extra environment.
    pub env: &'a BTreeMap<String, String>,
    /// Working directory.
    pub cwd: Option<&'a Path>,
    /// Limit.
    pub timeout: Duration,
}

/// Runs `program`, streaming its output to `output`.
pub async fn spawn(
    program: &Program<'_>,
    output: &Output,
    cancel: &Notify,
) -> std::io::Result<Finished> {
    let mut command = tokio::process::Command::new(program.program);
    command
        .args(program.args)
        .envs(program.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kills everything it started.
        .process_group(0)
        .kill_on_drop(true);
    if let Some(cwd) = program.cwd {
        command.current_dir(cwd);
    }
    let mut child = command.spawn()?;
    let pid = child.id();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let readers = async {
        let (a, b) = tokio::join!(
            pump(stdout, Stream::Stdout, output),
            pump(stderr, Stream::Stderr, output)
        );
        (a, b)
    };
    tokio::pin!(readers);
    let deadline = tokio::time::sleep(program.timeout);
    tokio::pin!(deadline);
    let mut timed_out = false;
    let mut cancelled = false;
    let mut tails = None;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status?,
            t = &mut readers, if tails.is_none() => tails = Some(t),
            _ = &mut deadline, if !timed_out && !cancelled => {
                timed_out = true;
                kill_group(pid);
            }
            _ = cancel.notified(), if !timed_out && !cancelled => {
                cancelled = true;
                kill_group(pid);
            }
        }
    };
    // The leader is gone; children it left behind in the group go too when it was killed.
    if timed_out || cancelled {
        kill_group(pid);
    }
    let (out_tail, err_tail) = match tails {
        Some(t) => t,
        // Output still in the pipes is read to the end, within the same deadline: a
        // process that left a child holding the pipes open is killed at the deadline.
        None if !timed_out && !cancelled => {
            tokio::select! {
                t = &mut readers => t,
                _ = &mut deadline => {
                    timed_out = true;
                    kill_group(pid);
                    tokio::time::timeout(DRAIN_AFTER_KILL, &mut readers)
                        .await
                        .unwrap_or_default()
                }
            }
        }
        None => tokio::time::timeout(DRAIN_AFTER_KILL, &mut readers)
            .await
            .unwrap_or_default(),
    };
    let mut tail = String::from_utf8_lossy(&out_tail).into_owned();
    if !err_tail.is_empty() {
        if !tail.is_empty() && !tail.ends_with('\n') {
            tail.push('\n');
        }
        tail.push_str(&String::from_utf8_lossy(&err_tail));
    }
    Ok(Finished {
        exit_code: status.code(),
        timed_out,
        cancelled,
        tail,
    })
}

/// Kills the whole process group led by `pid` (a child started with `process_group(0)`).
pub(super) fn kill_group(pid: Option<u32>) {
    let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) else {
        return;
    };
    if let Some(pid) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

/// Copies a pipe to the journal in chunks; returns the stream's tail.
async fn pump<R: tokio::io::AsyncRead + Unpin>(
    pipe: Option<R>,
    stream: Stream,
    output: &Output,
) -> Vec<u8> {
    let Some(mut pipe) = pipe else {
        return Vec::new();
    };
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut tail: Vec<u8> = Vec::new();
    let mut filled = 0;
    let mut eof = false;
    while !eof {
        // Gather up to CHUNK_BYTES, but never hold bytes back for more than GATHER.
        let first = pipe.read(&mut buf[filled..]).await;
        match first {
            Ok(0) | Err(_) => eof = true,
            Ok(n) => filled += n,
        }
        while !eof && filled < CHUNK_BYTES {
            match tokio::time::timeout(GATHER, pipe.read(&mut buf[filled..])).await {
                Err(_) => break,
                Ok(Ok(0)) | Ok(Err(_)) => eof = true,
                Ok(Ok(n)) => filled += n,
            }
        }
        if filled > 0 {
            if let Err(err) = output.write(stream, &buf[..filled]).await {
                tracing::error!(error = %err, "cannot journal command output");
            }
            tail.extend_from_slice(&buf[..filled]);
            if tail.len() > TAIL_BYTES {
                tail.drain(..tail.len() - TAIL_BYTES);
            }
            filled = 0;
        }
    }
    tail
}

/// Turns how a process ended into a command result.
pub fn result_of(finished: std::io::Result<Finished>, what: &str) -> CommandResult {
    let mut result = super::completed("", "");
    match finished {
        Err(err) => {
            result.status = CommandStatus::Failed;
            result.error = Some(format!("cannot start {what}: {err}"));
        }
        Ok(f) => {
            result.exit_code = f.exit_code;
            result.logs = f.tail;
            if f.timed_out {
                result.status = CommandStatus::Failed;
                result.error = Some("timed out; the process group was killed".into());
            } else if f.cancelled {
                result.status = CommandStatus::Failed;
                result.error = Some("cancelled; the process group was killed".into());
            } else if f.exit_code != Some(0) {
                result.status = CommandStatus::Failed;
                result.error = Some(match f.exit_code {
                    Some(code) => format!("{what} exited with {code}"),
                    None => format!("{what} was killed by a signal"),
                });
            }
        }
    }
    result
}

/// `RunCommand`: `cmd` with `args` directly, or `/bin/sh -c cmd` when `shell` is set.
pub async fn run(
    run: &RunCommand,
    output: &Output,
    cancel: &Notify,
    default_timeout: Duration,
) -> CommandResult {
    let timeout = run
        .timeout_sec
        .map(Duration::from_secs)
        .unwrap_or(default_timeout);
    let shell_args;
    let (program, args): (&str, &[String]) = if run.shell {
        shell_args = ["-c".to_owned(), run.cmd.clone(), "fleet-run".to_owned()]
            .into_iter()
            .chain(run.args.iter().cloned())
            .collect::<Vec<_>>();
        ("/bin/sh", &shell_args)
    } else {
        (run.cmd.as_str(), &run.args)
    };
    let finished = spawn(
        &Program {
            program,
            args,
            env: &run.env,
            cwd: None,
            timeout,
        },
        output,
        cancel,
    )
    .await;
    result_of(finished, &run.cmd)
}
