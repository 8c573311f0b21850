//! The one step runner every pipeline (update, plugin, restore) uses, the signed client the
//! pipelines talk to the control plane with, and shell quoting for substitutions.
//!
//! A step is a configured shell command run with `/bin/sh -c` in the pipeline's working
//! directory, in a process group of its own, with its own timeout. On timeout the whole
//! group is killed (a step that started a child which started a child leaves nothing
//! behind). Its duration and the tail of its output (stdout and stderr, interleaved) are
//! kept for the report.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet_core::command::Pipeline;
use fleet_core::signing::HEADER_V0_SIGNATURE;
use fleet_core::{Scheme, Signer};
use tokio::io::AsyncReadExt;

/// Most bytes of output kept per step.
pub const OUTPUT_TAIL_BYTES: usize = 4096;

/// How long the output readers may lag behind a finished step: a step that started a
/// daemon which kept the pipes open must not hang the pipeline.
const OUTPUT_GRACE: Duration = Duration::from_millis(500);

/// One step to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Step name, for logs and reports.
    pub name: String,
    /// The shell command (`/bin/sh -c`). Anything substituted into it must already be
    /// quoted with [`shell_quote`].
    pub command: String,
    /// Working directory (default: the agent's).
    pub workdir: Option<PathBuf>,
    /// Limit; the process group is killed when it passes.
    pub timeout: Duration,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
}

/// What became of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepOutcome {
    /// Exit status 0 within the timeout.
    pub ok: bool,
    /// The exit code, when the process exited by itself.
    pub exit_code: Option<i32>,
    /// Killed because the timeout passed.
    pub timed_out: bool,
    /// How long it ran.
    pub duration: Duration,
    /// The last [`OUTPUT_TAIL_BYTES`] of its output.
    pub output_tail: String,
    /// Why it failed, for people.
    pub error: Option<String>,
}

impl StepOutcome {
    /// Milliseconds, for reports.
    pub fn duration_ms(&self) -> u64 {
        u64::try_from(self.duration.as_millis()).unwrap_or(u64::MAX)
    }

    /// An outcome for a step that failed without running a command.
    pub fn failed(error: impl Into<String>, duration: Duration) -> Self {
        Self {
            ok: false,
            exit_code: None,
            timed_out: false,
            duration,
            output_tail: String::new(),
            error: Some(error.into()),
        }
    }
}

/// Runs pipeline steps. [`ShellRunner`] is the real one; plug in another to run steps
/// elsewhere (in a container, over SSH).
#[async_trait::async_trait]
pub trait StepRunner: Send + Sync {
    /// Runs `step` to its end or its timeout.
    async fn run(&self, step: &Step) -> StepOutcome;
}

/// Runs steps with `/bin/sh -c` in a process group of their own.
#[derive(Debug, Clone, Copy, Default)]
pub struct ShellRunner;

#[async_trait::async_trait]
impl StepRunner for ShellRunner {
    async fn run(&self, step: &Step) -> StepOutcome {
        run_shell(step).await
    }
}

/// The last `max` bytes of the output, cut at a character boundary.
#[derive(Debug, Default)]
struct Tail {
    bytes: Vec<u8>,
}

impl Tail {
    fn push(&mut self, chunk: &[u8]) {
        self.bytes.extend_from_slice(chunk);
        if self.bytes.len() > 2 * OUTPUT_TAIL_BYTES {
            let cut = self.bytes.len() - OUTPUT_TAIL_BYTES;
            self.bytes.drain(..cut);
        }
    }

    fn text(&self) -> String {
        let start = self.bytes.len().saturating_sub(OUTPUT_TAIL_BYTES);
        printable(String::from_utf8_lossy(&self.bytes[start..]).trim_start_matches('\u{FFFD}'))
    }
}

/// Output as a report may carry it: terminal escape sequences dropped, carriage returns
/// (progress lines) turned into newlines, other control characters removed.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                // CSI `ESC [ ... final` or a two-character escape.
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\r' => {
                if chars.peek() != Some(&'\n') && !out.ends_with('\n') {
                    out.push('\n');
                }
            }
            '\n' | '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

async fn run_shell(step: &Step) -> StepOutcome {
    let started = Instant::now();
    let mut command = tokio::process::Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(&step.command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own process group, so a timeout can kill everything it started.
        .process_group(0);
    if let Some(dir) = &step.workdir {
        command.current_dir(dir);
    }
    command.envs(step.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) => {
            return StepOutcome::failed(
                format!("step {} could not start: {err}", step.name),
                started.elapsed(),
            );
        }
    };
    let tail = Arc::new(Mutex::new(Tail::default()));
    let mut readers = tokio::task::JoinSet::new();
    let stdout = child
        .stdout
        .take()
        .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>);
    let stderr = child
        .stderr
        .take()
        .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>);
    for mut pipe in [stdout, stderr].into_iter().flatten() {
        let tail = tail.clone();
        readers.spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                tail.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(&buf[..n]);
            }
        });
    }
    let pgid = child.id().and_then(|id| i32::try_from(id).ok());
    // If this future is dropped mid-step (the agent stops), the whole group goes with it;
    // a step that ends by itself may leave the daemons it meant to start.
    let mut guard = GroupGuard(pgid);
    let waited = tokio::time::timeout(step.timeout, child.wait()).await;
    let (exit_code, timed_out, wait_error) = match waited {
        Ok(Ok(status)) => (status.code(), false, None),
        Ok(Err(err)) => (None, false, Some(err.to_string())),
        Err(_) => {
            if let Err(err) = kill_group(pgid) {
                tracing::warn!(step = %step.name, error = %err, "cannot kill the step's process group");
            }
            let _ = child.wait().await;
            (None, true, None)
        }
    };
    guard.0 = None;
    let _ = tokio::time::timeout(OUTPUT_GRACE, async {
        while readers.join_next().await.is_some() {}
    })
    .await;
    readers.abort_all();
    let output_tail = tail.lock().unwrap_or_else(|p| p.into_inner()).text();
    let ok = exit_code == Some(0) && !timed_out;
    let error = if ok {
        None
    } else if timed_out {
        Some(format!(
            "step {} timed out after {} s; its process group was killed",
            step.name,
            step.timeout.as_secs()
        ))
    } else if let Some(err) = wait_error {
        Some(format!("step {} could not be waited for: {err}", step.name))
    } else {
        Some(match exit_code {
            Some(code) => format!("step {} exited with status {code}", step.name),
            None => format!("step {} was killed by a signal", step.name),
        })
    };
    StepOutcome {
        ok,
        exit_code,
        timed_out,
        duration: started.elapsed(),
        output_tail,
        error,
    }
}

/// Kills a step's process group with SIGKILL.
fn kill_group(pgid: Option<i32>) -> std::io::Result<()> {
    match pgid.and_then(rustix::process::Pid::from_raw) {
        Some(pid) => rustix::process::kill_process_group(pid, rustix::process::Signal::KILL)
            .map_err(std::io::Error::from),
        None => Ok(()),
    }
}

/// Kills the step's process group when dropped while still armed.
struct GroupGuard(Option<i32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.0.is_some() {
            let _ = kill_group(self.0.take());
        }
    }
}

/// Quotes `text` for a POSIX shell: `'...'` with each `'` written as `'\''`. The result is
/// always one word, whatever `text` holds.
pub fn shell_quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('\'');
    for c in text.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// Replaces each `{{key}}` of `template` with the shell-quoted value, in one pass over the
/// template: a value is never scanned again, so one that holds `{{other}}` keeps it as text
/// instead of getting another value spliced inside its quotes. A `{{…}}` naming no key is
/// kept as it is.
pub fn substitute(template: &str, values: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let inside = &rest[open + 2..];
        let found = inside.find("}}").and_then(|close| {
            let key = &inside[..close];
            let (_, value) = values.iter().find(|(k, _)| *k == key)?;
            Some((close, value))
        });
        match found {
            Some((close, value)) => {
                out.push_str(&shell_quote(value));
                rest = &inside[close + 2..];
            }
            // Only the first `{` is kept as text: a placeholder may start at the next one
            // (`{{{name}}}`).
            None => {
                out.push('{');
                rest = &rest[open + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// An answer from the control plane to a pipeline request.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The JSON body, when there was one.
    pub body: Option<serde_json::Value>,
}

/// Signs and posts pipeline requests (`/api/updates/next`, reports, ...) and returns the
/// answer, body included.
#[derive(Clone)]
pub struct ControlPlaneClient {
    http: reqwest::Client,
    base_url: String,
    signer: Signer,
    scheme: Scheme,
}

impl ControlPlaneClient {
    /// Posts to `base_url` with `http`, signing with `signer` in `scheme`.
    pub fn new(http: reqwest::Client, base_url: &str, signer: Signer, scheme: Scheme) -> Self {
        Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            signer,
            scheme,
        }
    }

    /// One signed `POST {base}{path}` of `body`; `Err` for a network failure.
    pub async fn post(&self, path: &str, body: &serde_json::Value) -> Result<Answer, String> {
        let bytes = serde_json::to_vec(body).map_err(|e| e.to_string())?;
        let mut request = self
            .http
            .post(format!("{}{path}", self.base_url))
            .header("content-type", "application/json")
            .body(bytes.clone());
        match self.scheme {
            Scheme::V1 => {
                let msg_id = format!("msg_{}", uuid::Uuid::now_v7().simple());
                for (name, value) in self
                    .signer
                    .headers(&msg_id, fleet_core::unix_now(), &bytes)
                    .pairs()
                {
                    request = request.header(name, value);
                }
            }
            Scheme::V0 => {
                request = request.header(HEADER_V0_SIGNATURE, self.signer.sign_v0(&bytes));
            }
        }
        let response = request
            .send()
            .await
            .map_err(|e| fleet_core::error_chain(&e))?;
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        Ok(Answer {
            status,
            body: serde_json::from_str(&text).ok(),
        })
    }

    /// Posts a report, retrying network errors and 5xx a few times. `true` once the control
    /// plane has it, or has said for good that it will never take it (4xx other than
    /// 401/403/408/425/429); `false` leaves it for the next poll.
    pub async fn report(&self, path: &str, body: &serde_json::Value) -> bool {
        let mut delay = Duration::from_millis(250);
        for attempt in 0..4 {
            match self.post(path, body).await {
                Ok(answer) if answer.status < 300 => return true,
                // Refused for good (invalid, not this instance's job, contradicts the job's
                // state). A 401/403 is a configuration problem that may be fixed: keep it.
                Ok(answer)
                    if (400..500).contains(&answer.status)
                        && !matches!(answer.status, 401 | 403 | 408 | 425 | 429) =>
                {
                    tracing::warn!(
                        path,
                        status = answer.status,
                        answer = ?answer.body,
                        "the control plane refused a report"
                    );
                    return true;
                }
                Ok(answer) => {
                    tracing::warn!(path, status = answer.status, attempt, "report not taken")
                }
                Err(err) => tracing::warn!(path, %err, attempt, "report not sent"),
            }
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
        false
    }
}

/// Wakes the pipelines' pollers before their interval is over. The live channel wakes them
/// when the control plane says jobs are waiting ([`Frame::JobsWaiting`]); the agent hands
/// the same handle to its pollers and its channel, so an embedder gets it with the agent.
///
/// [`Frame::JobsWaiting`]: fleet_core::command::Frame::JobsWaiting
#[derive(Debug, Clone, Default)]
pub struct PollNow {
    update: Arc<tokio::sync::Notify>,
    plugin: Arc<tokio::sync::Notify>,
    restore: Arc<tokio::sync::Notify>,
}

impl PollNow {
    /// Makes `pipeline`'s poller poll now: at once when it waits for its interval, else as
    /// soon as the poll under way ends (that poll may have asked before the job existed).
    /// Wakes that come while it polls make one more poll, not one each.
    pub fn wake(&self, pipeline: Pipeline) {
        self.of(pipeline).notify_one();
    }

    /// What `pipeline`'s poller waits on.
    pub(crate) fn of(&self, pipeline: Pipeline) -> &tokio::sync::Notify {
        match pipeline {
            Pipeline::Update => &self.update,
            Pipeline::Plugin => &self.plugin,
            Pipeline::Restore => &self.restore,
        }
    }
}

/// The least time between the starts of two polls when the second is woken by the control
/// plane: one that sends `jobs_waiting` without pause (a fault, or a flood of batches) makes
/// the agent ask about once a second, not as fast as it can.
pub const MIN_WOKEN_POLL_GAP: Duration = Duration::from_secs(1);

/// Calls `poll` every `interval` (at once again after it did some work, or when `wake` is
/// notified, though not sooner than [`MIN_WOKEN_POLL_GAP`] after the poll before started)
/// until `stop`. One poll runs at a time.
pub async fn poll_loop<F, Fut>(
    name: &'static str,
    interval: Duration,
    wake: &tokio::sync::Notify,
    mut stop: tokio::sync::watch::Receiver<bool>,
    mut poll: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = crate::Result<bool>>,
{
    let interval = interval.max(Duration::from_secs(1));
    loop {
        let started = Instant::now();
        let wait = tokio::select! {
            ran = poll() => match ran {
                Ok(true) => Duration::ZERO,
                Ok(false) => interval,
                Err(err) => {
                    tracing::error!(pipeline = name, error = %err, "pipeline state is unusable");
                    interval
                }
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        let woken = tokio::select! {
            _ = tokio::time::sleep(wait) => false,
            // A wake that came during the poll left its permit: it is taken here at once.
            _ = wake.notified() => true,
            _ = stop.wait_for(|s| *s) => return,
        };
        if woken {
            tracing::debug!(pipeline = name, "woken to poll now");
            let early = MIN_WOKEN_POLL_GAP.saturating_sub(started.elapsed());
            tokio::select! {
                _ = tokio::time::sleep(early) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits until `count` holds `expected`, for at most 5 s.
    async fn reaches(count: &std::sync::atomic::AtomicUsize, expected: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while count.load(std::sync::atomic::Ordering::SeqCst) != expected {
            assert!(Instant::now() < deadline, "polls never reached {expected}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_wake_polls_now_and_wakes_during_a_poll_make_one_more_poll() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let polls = Arc::new(AtomicUsize::new(0));
        let busy = Arc::new(tokio::sync::Semaphore::new(0));
        let now = PollNow::default();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn({
            let (polls, busy, now) = (polls.clone(), busy.clone(), now.clone());
            async move {
                let wake = now.of(Pipeline::Plugin);
                poll_loop("test", Duration::from_secs(600), wake, stopped, || {
                    let (polls, busy) = (polls.clone(), busy.clone());
                    async move {
                        polls.fetch_add(1, Ordering::SeqCst);
                        // Each poll holds until the test lets it end.
                        busy.acquire().await.expect("open").forget();
                        Ok(false)
                    }
                })
                .await
            }
        });
        // The first poll is under way: a burst of wakes, another pipeline's among them.
        reaches(&polls, 1).await;
        for _ in 0..5 {
            now.wake(Pipeline::Plugin);
        }
        now.wake(Pipeline::Update);
        busy.add_permits(1);
        // One more poll for the whole burst, then the 10-minute wait.
        reaches(&polls, 2).await;
        busy.add_permits(1);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(polls.load(Ordering::SeqCst), 2);
        // Waiting out the interval, it polls at once when woken.
        now.wake(Pipeline::Plugin);
        reaches(&polls, 3).await;
        busy.add_permits(1);
        stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stops")
            .expect("joins");
    }

    #[tokio::test]
    async fn wakes_without_pause_make_about_one_poll_a_second() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let polls = Arc::new(AtomicUsize::new(0));
        let now = PollNow::default();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn({
            let (polls, now) = (polls.clone(), now.clone());
            async move {
                let wake = now.of(Pipeline::Update);
                poll_loop("test", Duration::from_secs(600), wake, stopped, || {
                    polls.fetch_add(1, Ordering::SeqCst);
                    async { Ok(false) }
                })
                .await
            }
        });
        let flood_until = Instant::now() + Duration::from_millis(2500);
        while Instant::now() < flood_until {
            now.wake(Pipeline::Update);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let made = polls.load(Ordering::SeqCst);
        // The first poll, then one a second while the wakes go on.
        assert!((2..=4).contains(&made), "{made} polls in 2.5 s of wakes");
        stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stops even while holding a woken poll back")
            .expect("joins");
    }

    fn step(command: &str, timeout_ms: u64) -> Step {
        Step {
            name: "test".into(),
            command: command.into(),
            workdir: None,
            timeout: Duration::from_millis(timeout_ms),
            env: vec![("STEP_VALUE".into(), "from env".into())],
        }
    }

    #[tokio::test]
    async fn a_step_reports_status_output_and_env() {
        let ok = ShellRunner
            .run(&step("echo out; echo err >&2; echo \"$STEP_VALUE\"", 5000))
            .await;
        assert!(ok.ok, "{ok:?}");
        assert!(ok.output_tail.contains("out") && ok.output_tail.contains("err"));
        assert!(ok.output_tail.contains("from env"));
        let bad = ShellRunner.run(&step("echo nope; exit 3", 5000)).await;
        assert_eq!((bad.ok, bad.exit_code), (false, Some(3)));
        assert!(bad.error.as_deref().is_some_and(|e| e.contains("status 3")));
    }

    #[tokio::test]
    async fn a_timeout_kills_the_whole_process_group() {
        let dir = std::env::temp_dir().join(format!("fleet-step-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let marker = dir.join("grandchild-alive");
        // The grandchild would write the marker after 2 s unless it is killed with the group.
        let command = format!(
            "(sleep 2; touch {}) & sleep 30",
            shell_quote(&marker.display().to_string())
        );
        let started = Instant::now();
        let out = ShellRunner.run(&step(&command, 300)).await;
        assert!(out.timed_out && !out.ok, "{out:?}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "did not wait for the pipes"
        );
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(!marker.exists(), "the grandchild survived the timeout");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_step_abandoned_midway_takes_its_process_group_along() {
        let dir = std::env::temp_dir().join(format!("fleet-step-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let marker = dir.join("survivor");
        let command = format!(
            "(sleep 1; touch {}) & sleep 30",
            shell_quote(&marker.display().to_string())
        );
        let long = step(&command, 60_000);
        let run = ShellRunner.run(&long);
        assert!(
            tokio::time::timeout(Duration::from_millis(300), run)
                .await
                .is_err()
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!marker.exists(), "the abandoned step's child survived");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_background_daemon_does_not_hang_the_step() {
        let started = Instant::now();
        let out = ShellRunner
            .run(&step("sleep 5 & echo started", 10_000))
            .await;
        assert!(out.ok, "{out:?}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn output_is_made_printable() {
        assert_eq!(
            printable(
                "Creating web ... \r\n\u{1b}[1A\u{1b}[2KCreating web ... \u{1b}[32mdone\u{1b}[0m\r\n\u{7}x\ry"
            ),
            "Creating web ... \nCreating web ... done\nx\ny"
        );
    }

    #[test]
    fn quoting_keeps_hostile_text_one_word() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(
            substitute(
                "install {{name}}@{{version}}",
                &[("name", "x; rm -rf /"), ("version", "1")]
            ),
            "install 'x; rm -rf /'@'1'"
        );
    }

    #[test]
    fn a_substituted_value_is_never_scanned_again() {
        let values = [("name", "{{version}}"), ("version", "1.0; id")];
        assert_eq!(
            substitute("install {{name}} {{version}}", &values),
            "install '{{version}}' '1.0; id'"
        );
        // Unknown and malformed placeholders stay as they are; braces around a known one too.
        assert_eq!(
            substitute("{{other}} {{{name}}} {{name {{", &values),
            "{{other}} {'{{version}}'} {{name {{"
        );
    }

    #[tokio::test]
    async fn quoted_substitutions_reach_the_command_verbatim() {
        let command = substitute(
            "printf '%s' {{name}}",
            &[("name", "$(echo pwned); `id` 'q'")],
        );
        let out = ShellRunner.run(&step(&command, 5000)).await;
        assert_eq!(out.output_tail, "$(echo pwned); `id` 'q'");
    }
}
