//! `POST /api/heartbeats`: verify, then decode, then hand to the group-commit writer.
//!
//! The order matters. The body is read up to the size limit, the signature is checked over
//! the raw bytes (only `instance_id` is looked at, to pick the secret), and only a verified
//! body is parsed. The response is sent after the heartbeat's transaction has committed, so
//! an acknowledged heartbeat is durable; the writer commits many heartbeats per transaction,
//! so that durability does not cost a disk flush per request.

use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use fleet_core::{DecodeError, Heartbeat, SignatureHeaders};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;
use crate::store::{IncomingHeartbeat, IngestRules, RecordOutcome, Store};
use crate::{Error, Result, Shared};

/// A heartbeat waiting for the writer, and where to send its outcome.
pub(crate) struct Job {
    /// Boxed: a heartbeat is about a kilobyte, and a job is moved into the queue, out of it
    /// into a batch and into the store's slice; each move would copy it all.
    incoming: Box<IncomingHeartbeat>,
    reply: oneshot::Sender<Result<RecordOutcome>>,
}

pub(crate) async fn receive(State(state): State<Shared>, request: Request) -> Result<Response> {
    // The request is taken whole: a `HeaderMap` extractor would copy the headers.
    let (parts, body) = request.into_parts();
    let result = accept(&state, &parts.headers, body).await;
    match &result {
        Ok(RecordOutcome::Applied { .. }) => state.metrics.accepted(),
        Ok(RecordOutcome::Duplicate) => state.metrics.duplicate(),
        Ok(RecordOutcome::Replay) => state.metrics.rejected("replay"),
        Ok(RecordOutcome::NotEnrolled) => state.metrics.rejected("not_enrolled"),
        Err(Error::TooLarge { .. }) => state.metrics.rejected("too_large"),
        Err(Error::Invalid(_)) => state.metrics.rejected("invalid"),
        Err(_) => {}
    }
    Ok(match result? {
        // Written directly: this answers every heartbeat.
        RecordOutcome::Applied { installation_id } => json_answer(format!(
            r#"{{"ok":true,"installation_id":{installation_id},"duplicate":false}}"#
        )),
        RecordOutcome::Duplicate => json_answer(r#"{"ok":true,"duplicate":true}"#.to_owned()),
        // Same answer as any other signature failure: a replayer learns nothing.
        RecordOutcome::Replay => Error::Unauthorized.into_response(),
        RecordOutcome::NotEnrolled => Error::NotEnrolled.into_response(),
    })
}

fn json_answer(body: String) -> Response {
    ([(CONTENT_TYPE, "application/json")], body).into_response()
}

async fn accept(state: &Shared, headers: &HeaderMap, body: Body) -> Result<RecordOutcome> {
    let limit = state.settings.limits.max_body_bytes;
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(Error::TooLarge { limit });
    }
    // Reading stops at the limit, whatever Content-Length claimed.
    let body = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| Error::TooLarge { limit })?;
    let now = fleet_core::unix_now();
    let lookup =
        SignatureHeaders::from_lookup(|name| headers.get(name).and_then(|v| v.to_str().ok()));
    let verified = crate::registration::verify_agent_request(state, &body, &lookup, now)
        .await?
        .map_err(|err| {
            state.metrics.rejected(err.kind());
            // The reason is logged for the operator, never returned to the sender.
            tracing::debug!(reason = err.kind(), "heartbeat refused");
            Error::Unauthorized
        })?;
    let heartbeat = Heartbeat::decode(&body, &state.settings.limits).map_err(|err| match err {
        DecodeError::TooLarge { limit, .. } => Error::TooLarge { limit },
        DecodeError::Invalid(errors) => Error::Invalid(errors),
    })?;
    if heartbeat.instance_id != verified.instance_id {
        // locate_instance_id refuses duplicate keys, so the two always agree; refuse anyway
        // rather than act on an id the signature was not checked for.
        state.metrics.rejected("instance_id_mismatch");
        return Err(Error::Unauthorized);
    }
    let incoming = Box::new(IncomingHeartbeat {
        heartbeat,
        scheme: verified.scheme,
        msg_id: verified.msg_id,
        signed_at: verified.timestamp,
        received_at: now,
        body: body.into(),
    });
    submit(&state.writers, incoming).await
}

async fn submit(writers: &Writers, incoming: Box<IncomingHeartbeat>) -> Result<RecordOutcome> {
    let (reply, outcome) = oneshot::channel();
    writers
        .queue_for(&incoming.heartbeat.instance_id)
        .send(Job { incoming, reply })
        .await
        .map_err(|_| Error::Unavailable)?;
    outcome.await.map_err(|_| Error::Unavailable)?
}

/// The queues of the heartbeat writers, one per writer.
///
/// Every heartbeat of one installation goes to the same writer, which records its batches
/// one after the other, so an installation's heartbeats are committed in the order they
/// arrived. From one shared queue, a heartbeat held in a slow batch could commit after a
/// newer one taken by another writer and leave the older body as the installation's latest
/// state; and two writers would read and write the same installation's alerts at once.
pub(crate) struct Writers {
    queues: Vec<mpsc::Sender<Job>>,
    route: RandomState,
}

impl Writers {
    /// The queue of the writer that records `instance_id`'s heartbeats.
    fn queue_for(&self, instance_id: &str) -> &mpsc::Sender<Job> {
        let index = match self.queues.len() {
            1 => 0,
            n => (self.route.hash_one(instance_id) % n as u64) as usize,
        };
        &self.queues[index]
    }

    /// Heartbeats waiting in each writer's queue, not yet taken into a batch. One queue that
    /// stays full while the others are empty is a writer held up (a lock it waits for), and
    /// with it the installations it records.
    pub(crate) fn queued(&self) -> Vec<usize> {
        self.queues
            .iter()
            .map(|queue| queue.max_capacity() - queue.capacity())
            .collect()
    }
}

/// Starts the writers: each takes every heartbeat waiting in its queue (up to `batch_max`),
/// records them in one transaction and answers each. There are [`Store::write_concurrency`]
/// of them. They stop when the last sender is dropped, after finishing what was queued.
pub(crate) fn spawn_writers(
    store: Arc<dyn Store>,
    rules: IngestRules,
    batch_max: usize,
    metrics: Arc<Metrics>,
) -> Writers {
    let count = store.write_concurrency();
    spawn_writers_with(count, batch_max, move |writer, jobs| {
        let (store, rules, metrics) = (store.clone(), rules.clone(), metrics.clone());
        async move { write_batch(&*store, &rules, &metrics, writer, jobs).await }
    })
}

/// [`spawn_writers`] with what a writer does with each batch given as `write`, which gets
/// the writer's number (the `writer` label of the queue gauge) and the batch.
fn spawn_writers_with<W, F>(count: usize, batch_max: usize, write: W) -> Writers
where
    W: Fn(usize, Vec<Job>) -> F + Clone + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let queues = (0..count.max(1))
        .map(|writer| {
            let (tx, mut rx) = mpsc::channel::<Job>(batch_max * 8);
            let write = write.clone();
            tokio::spawn(async move {
                let mut jobs = Vec::with_capacity(batch_max);
                while rx.recv_many(&mut jobs, batch_max).await > 0 {
                    write(writer, std::mem::take(&mut jobs)).await;
                }
            });
            tx
        })
        .collect();
    Writers {
        queues,
        route: RandomState::new(),
    }
}

async fn write_batch(
    store: &dyn Store,
    rules: &IngestRules,
    metrics: &Metrics,
    writer: usize,
    jobs: Vec<Job>,
) {
    let (batch, replies): (Vec<_>, Vec<_>) =
        jobs.into_iter().map(|j| (*j.incoming, j.reply)).unzip();
    metrics.batch(batch.len());
    let attempts = Attempts::for_batch(batch.len());
    let record = |part| store.record_heartbeats(part, rules);
    let outcomes = watched(
        SLOW_BATCH,
        writer,
        batch.len(),
        record_halving(&batch, &record, &attempts),
    )
    .await;
    if let Some(refusal) = attempts.first_refusal.get() {
        // One line for the whole batch: the halving itself can go nine levels deep.
        let refused = outcomes.iter().filter(|o| o.is_err()).count();
        tracing::warn!(
            error = %refusal,
            size = batch.len(),
            transactions = attempts.used(),
            refused,
            "the database refused a batch; it was recorded again in halves"
        );
    }
    for (reply, outcome) in replies.into_iter().zip(outcomes) {
        let _ = reply.send(outcome);
    }
}

/// How long a batch may take before the log says that its writer is held up. Half the
/// agent's send timeout: the line comes before the agents start to give up and retry.
const SLOW_BATCH: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs `batch_work`, a writer's batch of `size` heartbeats, and says in the log when it
/// takes longer than `slow` ([`SLOW_BATCH`]) and when it ends then. A writer waits for its
/// batch before it takes the next, so every installation routed to it waits too: typically
/// a row lock held by another session (an open transaction in psql, a long migration), which
/// the database gives no sign of.
async fn watched<F: Future>(
    slow: std::time::Duration,
    writer: usize,
    size: usize,
    batch_work: F,
) -> F::Output {
    let started = std::time::Instant::now();
    let mut batch_work = std::pin::pin!(batch_work);
    tokio::select! {
        done = &mut batch_work => return done,
        () = tokio::time::sleep(slow) => {}
    }
    tracing::warn!(
        writer,
        size,
        "a heartbeat batch has waited {slow:?} for the database; the installations of this \
         writer wait behind it (a lock held by another session?)"
    );
    let done = batch_work.await;
    let took = std::time::Duration::from_millis(started.elapsed().as_millis() as u64);
    tracing::info!(
        writer,
        size,
        "the slow heartbeat batch is done after {took:?}"
    );
    done
}

/// Records `batch` with `record`, one outcome per heartbeat, in order. When the database
/// refuses a batch, one bad heartbeat must not sink its neighbours: each half is recorded
/// again on its own, down to single heartbeats, so a bad one costs about 2·log₂(n)
/// transactions and a batch refused for a passing reason (a deadlock) costs two. At most
/// `attempts.budget` transactions are tried in all: a database that refuses everything (a
/// full disk) is not asked once per heartbeat. A database that cannot be reached, or a row
/// lock held elsewhere past the writers' `lock_timeout`, is not asked again: each retry
/// would wait as long again, and the answers would come after the agents gave up. Those
/// heartbeats get a 503 and come back from the agents' spools.
fn record_halving<'a: 'r, 'r, R>(
    batch: &'a [IncomingHeartbeat],
    record: &'r R,
    attempts: &'r Attempts,
) -> Pin<Box<dyn Future<Output = Vec<Result<RecordOutcome>>> + Send + 'r>>
where
    R: Fn(&'a [IncomingHeartbeat]) -> RecordFuture<'a> + Sync,
{
    Box::pin(async move {
        let unavailable_all = || batch.iter().map(|_| Err(Error::Unavailable)).collect();
        if !attempts.take_one() {
            return unavailable_all();
        }
        match record(batch).await {
            Ok(outcomes) if outcomes.len() == batch.len() => outcomes.into_iter().map(Ok).collect(),
            Ok(_) => {
                let _logged = unavailable(Error::Internal(
                    "the store answered a different number of outcomes".into(),
                ));
                unavailable_all()
            }
            Err(err) if batch.len() > 1 && !err.retry_would_wait() => {
                let _first = attempts.first_refusal.set(err.to_string());
                let (first, second) = batch.split_at(batch.len() / 2);
                let mut outcomes = record_halving(first, record, attempts).await;
                outcomes.extend(record_halving(second, record, attempts).await);
                outcomes
            }
            Err(err) => {
                let _logged = unavailable(err);
                unavailable_all()
            }
        }
    })
}

/// Transactions a batch of `size` may take in all: enough to find two bad heartbeats by
/// halving, far fewer than one per heartbeat.
fn attempt_budget(size: usize) -> usize {
    4 * (usize::BITS - size.max(1).leading_zeros()) as usize + 1
}

/// The transactions one batch may still take, and why the database first refused it.
struct Attempts {
    budget: usize,
    left: AtomicUsize,
    first_refusal: OnceLock<String>,
}

impl Attempts {
    fn for_batch(size: usize) -> Self {
        let budget = attempt_budget(size);
        Self {
            budget,
            left: AtomicUsize::new(budget),
            first_refusal: OnceLock::new(),
        }
    }

    /// Counts one more transaction; false once the budget is spent.
    fn take_one(&self) -> bool {
        self.left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    fn used(&self) -> usize {
        self.budget - self.left.load(Ordering::SeqCst)
    }
}

/// What [`Store::record_heartbeats`] returns, boxed by `async_trait`.
type RecordFuture<'a> = Pin<Box<dyn Future<Output = Result<Vec<RecordOutcome>>> + Send + 'a>>;

/// Logs a storage failure and turns it into a retryable 503 for the agent.
fn unavailable(err: Error) -> Error {
    tracing::error!(error = %err, "recording heartbeats failed");
    Error::Unavailable
}

#[cfg(test)]
mod tests {
    use fleet_core::{Limits, Scheme};

    use super::*;

    /// `inst-000`, `inst-001`, …
    fn numbered(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("inst-{i:03}")).collect()
    }

    fn heartbeats<S: AsRef<str>>(ids: &[S]) -> Vec<IncomingHeartbeat> {
        ids.iter()
            .map(|id| {
                let id = id.as_ref();
                let body = format!(
                    r#"{{"instance_id":"{id}","db_ok":true,"redis_ok":true,"storage_ok":true,"jobs_failed":0}}"#
                )
                .into_bytes();
                IncomingHeartbeat {
                    heartbeat: Heartbeat::decode(&body, &Limits::default()).expect("valid"),
                    scheme: Scheme::V0,
                    msg_id: None,
                    signed_at: None,
                    received_at: 1000,
                    body,
                }
            })
            .collect()
    }

    /// A database that refuses every batch holding one of `bad`, and the first `flaky`
    /// batches whatever they hold, counting the transactions it was asked for.
    fn database<'c>(
        bad: &'static [&'static str],
        flaky: usize,
        calls: &'c AtomicUsize,
    ) -> impl for<'a> Fn(&'a [IncomingHeartbeat]) -> RecordFuture<'a> + Sync + 'c {
        move |part: &[IncomingHeartbeat]| {
            let call = calls.fetch_add(1, Ordering::SeqCst);
            let refused = call < flaky
                || part
                    .iter()
                    .any(|inc| bad.contains(&inc.heartbeat.instance_id.as_str()));
            let outcomes = part
                .iter()
                .map(|_| RecordOutcome::Applied { installation_id: 1 })
                .collect();
            Box::pin(async move {
                if refused {
                    Err(Error::Internal("refused".into()))
                } else {
                    Ok(outcomes)
                }
            })
        }
    }

    async fn halving<'a, R>(
        batch: &'a [IncomingHeartbeat],
        record: &'a R,
    ) -> Vec<Result<RecordOutcome>>
    where
        R: Fn(&'a [IncomingHeartbeat]) -> RecordFuture<'a> + Sync,
    {
        record_halving(batch, record, &Attempts::for_batch(batch.len())).await
    }

    fn applied(outcomes: &[Result<RecordOutcome>]) -> Vec<bool> {
        outcomes
            .iter()
            .map(|o| matches!(o, Ok(RecordOutcome::Applied { .. })))
            .collect()
    }

    /// What the log says while the guard of [`captured_log`] lives, as text.
    #[derive(Clone, Default)]
    struct CapturedLog(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for CapturedLog {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("log").extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl CapturedLog {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().expect("log")).into_owned()
        }
    }

    fn captured_log() -> (CapturedLog, tracing::subscriber::DefaultGuard) {
        let log = CapturedLog::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        (log, tracing::subscriber::set_default(subscriber))
    }

    #[tokio::test]
    async fn a_batch_held_up_is_logged_once_with_its_writer_and_again_when_it_ends() {
        let (log, _guard) = captured_log();
        let slow = std::time::Duration::from_millis(100);
        assert_eq!(watched(slow, 0, 3, async { "quick" }).await, "quick");
        assert_eq!(log.text(), "", "a batch on time says nothing");
        let held_up = watched(slow, 1, 40, async {
            tokio::time::sleep(std::time::Duration::from_millis(450)).await;
            "held up"
        });
        assert_eq!(held_up.await, "held up");
        let text = log.text();
        assert_eq!(text.matches("WARN").count(), 1, "{text}");
        assert!(
            text.contains("has waited 100ms for the database")
                && text.contains("writer=1")
                && text.contains("size=40"),
            "{text}"
        );
        assert!(
            text.contains("the slow heartbeat batch is done after"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn an_installations_heartbeats_are_committed_in_the_order_they_arrived() {
        // Two writers; the first batch either of them takes is slow to commit, as a batch
        // waiting on a lock would be. Heartbeats are numbered by arrival in `received_at`.
        let committed = Arc::new(std::sync::Mutex::new(Vec::<(String, i64)>::new()));
        let first = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let log = committed.clone();
        let writers = spawn_writers_with(2, 4, move |_, jobs: Vec<Job>| {
            let (log, first) = (log.clone(), first.clone());
            async move {
                if first.swap(false, Ordering::SeqCst) {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                for job in jobs {
                    let inc = &job.incoming;
                    let entry = (inc.heartbeat.instance_id.clone(), inc.received_at);
                    log.lock().unwrap().push(entry);
                    let _ = job
                        .reply
                        .send(Ok(RecordOutcome::Applied { installation_id: 1 }));
                }
            }
        });
        let ids = numbered(8);
        let mut answers = Vec::new();
        for seq in 0..64 {
            let mut incoming = heartbeats(&[&ids[seq % ids.len()]]).remove(0);
            incoming.received_at = seq as i64;
            let (reply, answer) = oneshot::channel();
            let queue = writers.queue_for(&incoming.heartbeat.instance_id);
            let job = Job {
                incoming: Box::new(incoming),
                reply,
            };
            queue.send(job).await.expect("writer running");
            answers.push(answer);
        }
        for answer in answers {
            assert!(matches!(
                answer.await,
                Ok(Ok(RecordOutcome::Applied { .. }))
            ));
        }
        let committed = committed.lock().unwrap().clone();
        assert_eq!(committed.len(), 64);
        for id in &ids {
            let order: Vec<i64> = committed
                .iter()
                .filter(|(of, _)| of == id)
                .map(|(_, seq)| *seq)
                .collect();
            assert!(order.is_sorted(), "{id} committed out of order: {order:?}");
            assert_eq!(order.len(), 8);
        }
        // The installations are spread over both writers, not all sent to one.
        let first_queue = writers.queue_for(&ids[0]);
        assert!(
            ids.iter()
                .chain(&numbered(64))
                .any(|id| !writers.queue_for(id).same_channel(first_queue))
        );
    }

    #[tokio::test]
    async fn the_heartbeats_waiting_for_each_writer_are_counted() {
        // Writers that never finish their first batch, as if held on a lock.
        let writers = spawn_writers_with(2, 1, |_, jobs: Vec<Job>| async move {
            std::future::pending::<()>().await;
            drop(jobs);
        });
        assert_eq!(writers.queued(), [0, 0]);
        let ids = numbered(64);
        let mut sent = [0usize; 2];
        let mut answers = Vec::new();
        for id in &ids {
            let queue = writers.queue_for(id);
            let index = usize::from(!queue.same_channel(&writers.queues[0]));
            if sent[index] == 4 {
                continue;
            }
            sent[index] += 1;
            let (reply, answer) = oneshot::channel();
            let incoming = Box::new(heartbeats(&[id]).remove(0));
            queue.send(Job { incoming, reply }).await.expect("room");
            answers.push(answer);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        // Each writer holds one heartbeat in its stuck batch; the rest wait in its queue.
        assert_eq!(writers.queued(), [3, 3]);
    }

    #[tokio::test]
    async fn one_refused_heartbeat_does_not_sink_its_neighbours() {
        let ids = numbered(64);
        let batch = heartbeats(&ids);
        let calls = AtomicUsize::new(0);
        let outcomes = halving(&batch, &database(&["inst-037"], 0, &calls)).await;
        let expected: Vec<bool> = ids.iter().map(|id| id != "inst-037").collect();
        assert_eq!(applied(&outcomes), expected);
        assert!(matches!(outcomes[37], Err(Error::Unavailable)));
        // The whole batch, then two halves at each of six levels: 13 transactions, not 65.
        assert_eq!(calls.load(Ordering::SeqCst), 13);
    }

    #[tokio::test]
    async fn a_halved_batch_keeps_its_first_refusal_and_transaction_count_for_one_warning() {
        let ids = numbered(64);
        let batch = heartbeats(&ids);
        let calls = AtomicUsize::new(0);
        let attempts = Attempts::for_batch(batch.len());
        record_halving(&batch, &database(&["inst-005"], 0, &calls), &attempts).await;
        assert_eq!(attempts.used(), calls.load(Ordering::SeqCst));
        assert_eq!(attempts.used(), 13);
        let refusal = attempts.first_refusal.get().map(String::as_str);
        assert!(
            refusal.is_some_and(|r| r.contains("refused")),
            "{refusal:?}"
        );

        let untouched = Attempts::for_batch(batch.len());
        record_halving(&batch, &database(&[], 0, &calls), &untouched).await;
        assert_eq!(untouched.used(), 1);
        assert!(untouched.first_refusal.get().is_none());
    }

    #[tokio::test]
    async fn a_batch_refused_once_is_recorded_in_two_halves() {
        let batch = heartbeats(&["a", "b", "c", "d", "e"]);
        let calls = AtomicUsize::new(0);
        let outcomes = halving(&batch, &database(&[], 1, &calls)).await;
        assert_eq!(applied(&outcomes), [true; 5]);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_single_refused_heartbeat_is_answered_unavailable() {
        let batch = heartbeats(&["bad"]);
        let calls = AtomicUsize::new(0);
        let outcomes = halving(&batch, &database(&["bad"], 0, &calls)).await;
        assert!(matches!(outcomes.as_slice(), [Err(Error::Unavailable)]));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_unreachable_database_is_not_asked_again() {
        let batch = heartbeats(&["a", "b", "c", "d"]);
        let calls = AtomicUsize::new(0);
        let down = |_: &[IncomingHeartbeat]| -> RecordFuture<'_> {
            calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Err(Error::Database(sqlx::Error::PoolTimedOut)) })
        };
        let outcomes = halving(&batch, &down).await;
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, Err(Error::Unavailable)))
        );
        assert_eq!(outcomes.len(), 4);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_database_refusing_everything_is_not_asked_once_per_heartbeat() {
        let ids = numbered(512);
        let batch = heartbeats(&ids);
        let calls = AtomicUsize::new(0);
        let outcomes = halving(&batch, &database(&[], usize::MAX, &calls)).await;
        assert_eq!(outcomes.len(), 512);
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, Err(Error::Unavailable)))
        );
        assert_eq!(calls.load(Ordering::SeqCst), attempt_budget(512));
        assert_eq!(attempt_budget(512), 41);
    }

    #[tokio::test]
    async fn two_refused_heartbeats_are_found_within_the_budget() {
        let ids = numbered(512);
        let batch = heartbeats(&ids);
        let calls = AtomicUsize::new(0);
        let outcomes = halving(&batch, &database(&["inst-003", "inst-400"], 0, &calls)).await;
        let expected: Vec<bool> = ids
            .iter()
            .map(|id| id != "inst-003" && id != "inst-400")
            .collect();
        assert_eq!(applied(&outcomes), expected);
        assert!(calls.load(Ordering::SeqCst) <= attempt_budget(512));
    }
}
