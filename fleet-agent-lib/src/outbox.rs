//! The durable outbox: every message is written to SQLite before it is sent and deleted only
//! after the control plane accepted it, so neither a failed send in the middle of a flush
//! nor a SIGKILL loses anything.
//!
//! It is bounded by count, bytes and age. When a bound is passed the oldest messages go
//! first; how many went is stored and put into the next heartbeat as `outbox_dropped`
//! (a dropped heartbeat that itself carried such a count hands it on, so no drop goes
//! unreported). The message being sent is never dropped: it may already have been
//! delivered, and a delivered message counted as dropped would report a loss that did not
//! happen; the oldest of the others goes instead.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{Connection, Row, SqliteConnection};
use tokio::sync::Mutex;

use crate::Result;

/// Makes the SQLite file at `path` readable and writable by the agent's user only (0600)
/// before SQLite opens it: it holds queued heartbeats, job reports and command output.
///
/// A missing file is created empty with mode 0600, whatever the umask; SQLite gives the
/// `-wal` and `-shm` files it creates beside it the same mode. An existing file (or `-wal`,
/// `-shm`) that others may read or write, as every agent before this rule left it under
/// umask 022, is tightened to its owner's bits and the change logged at WARN naming it; one
/// that cannot be tightened (another owner) is logged at WARN and opened as it is.
pub(crate) fn private_state_file(path: &Path) -> std::io::Result<()> {
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => return Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(err) => return Err(err),
    }
    for file in [
        path.to_owned(),
        sidecar(path, "-wal"),
        sidecar(path, "-shm"),
    ] {
        let Ok(meta) = std::fs::metadata(&file) else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 == 0 {
            continue;
        }
        let tightened = mode & 0o700;
        match std::fs::set_permissions(&file, std::fs::Permissions::from_mode(tightened)) {
            Ok(()) => tracing::warn!(
                file = %file.display(),
                "the agent's state file was open to other users (mode {mode:o}); now {tightened:o}"
            ),
            Err(error) => tracing::warn!(
                file = %file.display(),
                %error,
                "the agent's state file is open to other users (mode {mode:o}) and cannot be \
                 tightened; chmod 600 it"
            ),
        }
    }
    Ok(())
}

/// `path` with `suffix` appended to its file name, as SQLite names its `-wal` and `-shm`.
fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The bounds of the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Most messages kept.
    pub max_messages: u64,
    /// Most body bytes kept.
    pub max_bytes: u64,
    /// Oldest message kept.
    pub max_age: Duration,
}

/// Size and age of a stored message, enough to decide what to drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowMeta {
    /// Body length.
    pub bytes: u64,
    /// Unix seconds when it was queued.
    pub created_at: i64,
    /// Being sent right now: never dropped (it may already be delivered).
    pub sending: bool,
}

/// Which rows (indices into `rows`, oldest first) must go to respect `bounds` at `now`:
/// everything past the age bound, then the oldest until count and bytes fit; never the row
/// being sent.
pub fn plan_drops(rows: &[RowMeta], bounds: &Bounds, now: i64) -> Vec<usize> {
    let max_age = i64::try_from(bounds.max_age.as_secs()).unwrap_or(i64::MAX);
    let mut drop = Vec::new();
    let mut count = rows.len() as u64;
    let mut bytes: u64 = rows.iter().map(|r| r.bytes).sum();
    for (i, row) in rows.iter().enumerate() {
        if row.sending {
            continue;
        }
        let expired = now.saturating_sub(row.created_at) > max_age;
        if expired || count > bounds.max_messages || bytes > bounds.max_bytes {
            drop.push(i);
            count -= 1;
            bytes -= row.bytes;
        }
    }
    drop
}

/// A message waiting to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Position in the queue; delivery follows it.
    pub seq: i64,
    /// The `webhook-id`, the same on every attempt.
    pub msg_id: String,
    /// The control-plane path (`/api/heartbeats`).
    pub path: String,
    /// The exact bytes to send.
    pub body: Vec<u8>,
    /// Unix seconds when it was queued.
    pub created_at: i64,
}

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pushed {
    /// The new message's position.
    pub seq: i64,
    /// How many older messages this push dropped to stay in bounds.
    pub dropped: u64,
}

/// The SQLite outbox at `AGENT_STATE_PATH`.
pub struct Outbox {
    // One connection: SQLite serialises writers anyway, and one worker thread is all an idle
    // agent should hold.
    conn: Mutex<SqliteConnection>,
    bounds: Bounds,
    /// The `seq` handed out by the last [`peek`](Outbox::peek) and not yet acknowledged
    /// (0: none).
    sending: AtomicI64,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    msg_id TEXT NOT NULL UNIQUE,
    path TEXT NOT NULL,
    body BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    carried_dropped INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO counters (name, value) VALUES ('dropped_unreported', 0), ('dropped_total', 0);
";

impl Outbox {
    /// Opens (creating if needed) the outbox at `path`.
    pub async fn open(path: &Path, bounds: Bounds) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir).await?;
        }
        private_state_file(path)?;
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a message the agent believes stored survives a power cut, not only a
            // killed process.
            .synchronous(SqliteSynchronous::Full)
            // A small page cache: the outbox is tiny and RSS matters more than speed here.
            .pragma("cache_size", "-256");
        let mut conn = SqliteConnection::connect_with(&options).await?;
        sqlx::raw_sql(SCHEMA).execute(&mut conn).await?;
        Ok(Self {
            conn: Mutex::new(conn),
            bounds,
            sending: AtomicI64::new(0),
        })
    }

    /// Queues a message. `make_body` receives the number of drops not yet reported and
    /// returns the exact bytes (a heartbeat puts the number in `outbox_dropped`); that number
    /// counts as reported once the message is stored.
    pub async fn push(
        &self,
        msg_id: &str,
        path: &str,
        now: i64,
        make_body: impl FnOnce(u64) -> Vec<u8>,
    ) -> Result<Pushed> {
        let mut conn = self.conn.lock().await;
        let mut tx = conn.begin().await?;
        let unreported: i64 =
            sqlx::query_scalar("SELECT value FROM counters WHERE name = 'dropped_unreported'")
                .fetch_one(&mut *tx)
                .await?;
        let body = make_body(unreported as u64);
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO outbox (msg_id, path, body, created_at, carried_dropped)
             VALUES (?, ?, ?, ?, ?) RETURNING seq",
        )
        .bind(msg_id)
        .bind(path)
        .bind(&body)
        .bind(now)
        .bind(unreported)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query("UPDATE counters SET value = 0 WHERE name = 'dropped_unreported'")
            .execute(&mut *tx)
            .await?;
        let sending = self.sending.load(Ordering::SeqCst);
        let dropped = enforce_bounds(&mut tx, &self.bounds, now, sending).await?;
        tx.commit().await?;
        Ok(Pushed { seq, dropped })
    }

    /// The oldest waiting message, after dropping what has grown too old. It counts as
    /// being sent (never dropped by a bound) until it is acknowledged or
    /// [released](Outbox::release), or the next peek.
    pub async fn peek(&self, now: i64) -> Result<Option<Message>> {
        let mut conn = self.conn.lock().await;
        // The previous attempt is over: its message may be dropped again if too old.
        self.sending.store(0, Ordering::SeqCst);
        let mut tx = conn.begin().await?;
        enforce_bounds(&mut tx, &self.bounds, now, 0).await?;
        let row = sqlx::query(
            "SELECT seq, msg_id, path, body, created_at FROM outbox ORDER BY seq LIMIT 1",
        )
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        if let Some(r) = &row {
            self.sending.store(r.get(0), Ordering::SeqCst);
        }
        Ok(row.map(|r| Message {
            seq: r.get(0),
            msg_id: r.get(1),
            path: r.get(2),
            body: r.get(3),
            created_at: r.get(4),
        }))
    }

    /// Removes a delivered message.
    pub async fn ack(&self, seq: i64) -> Result<()> {
        let mut conn = self.conn.lock().await;
        let _ = self
            .sending
            .compare_exchange(seq, 0, Ordering::SeqCst, Ordering::SeqCst);
        sqlx::query("DELETE FROM outbox WHERE seq = ?")
            .bind(seq)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    /// The send of `seq` ended without delivery (the control plane did not answer 2xx): it
    /// is no longer on the wire, and a bound may drop it again.
    pub fn release(&self, seq: i64) {
        let _ = self
            .sending
            .compare_exchange(seq, 0, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Removes a message the control plane refused for good (it would block the queue
    /// forever), without counting it as a bound drop. The drops it was to report are handed
    /// on to the next heartbeat: the control plane never recorded them.
    pub async fn discard(&self, seq: i64) -> Result<()> {
        let mut conn = self.conn.lock().await;
        self.release(seq);
        let mut tx = conn.begin().await?;
        let carried: Option<i64> =
            sqlx::query_scalar("DELETE FROM outbox WHERE seq = ? RETURNING carried_dropped")
                .bind(seq)
                .fetch_optional(&mut *tx)
                .await?;
        sqlx::query("UPDATE counters SET value = value + ? WHERE name = 'dropped_unreported'")
            .bind(carried.unwrap_or(0))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Adds drops that happened outside the outbox (buffering turned off) so the next
    /// heartbeat reports them.
    pub async fn note_dropped(&self, n: u64) -> Result<()> {
        let mut conn = self.conn.lock().await;
        add_dropped(&mut conn, n as i64).await
    }

    /// The ids of the waiting messages, oldest first.
    pub async fn waiting_ids(&self) -> Result<Vec<String>> {
        let mut conn = self.conn.lock().await;
        Ok(sqlx::query_scalar("SELECT msg_id FROM outbox ORDER BY seq")
            .fetch_all(&mut *conn)
            .await?)
    }

    /// `(waiting messages, waiting bytes, drops ever)`.
    pub async fn stats(&self) -> Result<(u64, u64, u64)> {
        let mut conn = self.conn.lock().await;
        let (count, bytes): (i64, i64) =
            sqlx::query_as("SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM outbox")
                .fetch_one(&mut *conn)
                .await?;
        let total: i64 =
            sqlx::query_scalar("SELECT value FROM counters WHERE name = 'dropped_total'")
                .fetch_one(&mut *conn)
                .await?;
        Ok((count as u64, bytes as u64, total as u64))
    }
}

async fn add_dropped(conn: &mut SqliteConnection, n: i64) -> Result<()> {
    sqlx::query(
        "UPDATE counters SET value = value + ? WHERE name IN ('dropped_unreported', 'dropped_total')",
    )
    .bind(n)
    .execute(conn)
    .await?;
    Ok(())
}

/// Drops what `bounds` allow no more, never the message `sending` (its `seq`; 0 for none).
async fn enforce_bounds(
    conn: &mut SqliteConnection,
    bounds: &Bounds,
    now: i64,
    sending: i64,
) -> Result<u64> {
    // The usual case, within bounds, costs one aggregate instead of reading every row.
    let (count, bytes, oldest): (i64, i64, Option<i64>) = sqlx::query_as(
        "SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0), MIN(created_at) FROM outbox",
    )
    .fetch_one(&mut *conn)
    .await?;
    let max_age = i64::try_from(bounds.max_age.as_secs()).unwrap_or(i64::MAX);
    if count as u64 <= bounds.max_messages
        && bytes as u64 <= bounds.max_bytes
        && oldest.is_none_or(|t| now.saturating_sub(t) <= max_age)
    {
        return Ok(0);
    }
    let rows: Vec<(i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT seq, LENGTH(body), created_at, carried_dropped FROM outbox ORDER BY seq",
    )
    .fetch_all(&mut *conn)
    .await?;
    let metas: Vec<RowMeta> = rows
        .iter()
        .map(|&(seq, bytes, created_at, _)| RowMeta {
            bytes: bytes as u64,
            created_at,
            sending: seq == sending,
        })
        .collect();
    let plan = plan_drops(&metas, bounds, now);
    if plan.is_empty() {
        return Ok(0);
    }
    let mut to_report = 0i64;
    for &i in &plan {
        let (seq, _, _, carried) = rows[i];
        sqlx::query("DELETE FROM outbox WHERE seq = ?")
            .bind(seq)
            .execute(&mut *conn)
            .await?;
        to_report += 1 + carried;
    }
    sqlx::query("UPDATE counters SET value = value + ? WHERE name = 'dropped_unreported'")
        .bind(to_report)
        .execute(&mut *conn)
        .await?;
    sqlx::query("UPDATE counters SET value = value + ? WHERE name = 'dropped_total'")
        .bind(plan.len() as i64)
        .execute(&mut *conn)
        .await?;
    tracing::warn!(
        dropped = plan.len(),
        "outbox full or messages too old: dropped the oldest; the next heartbeat reports it"
    );
    Ok(plan.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(max_messages: u64, max_bytes: u64, max_age: u64) -> Bounds {
        Bounds {
            max_messages,
            max_bytes,
            max_age: Duration::from_secs(max_age),
        }
    }

    fn rows(spec: &[(u64, i64)]) -> Vec<RowMeta> {
        spec.iter()
            .map(|&(bytes, created_at)| RowMeta {
                bytes,
                created_at,
                sending: false,
            })
            .collect()
    }

    #[test]
    fn oldest_go_first_by_count_bytes_and_age() {
        let r = rows(&[(10, 0), (10, 1), (10, 2), (10, 3)]);
        assert_eq!(
            plan_drops(&r, &bounds(4, 1000, 100), 3),
            Vec::<usize>::new()
        );
        assert_eq!(plan_drops(&r, &bounds(2, 1000, 100), 3), [0, 1]);
        assert_eq!(plan_drops(&r, &bounds(10, 25, 100), 3), [0, 1]);
        assert_eq!(plan_drops(&r, &bounds(10, 1000, 1), 3), [0, 1]);
        // A single message larger than the byte bound cannot be kept either.
        assert_eq!(plan_drops(&rows(&[(50, 0)]), &bounds(10, 25, 100), 0), [0]);
        // The row being sent is kept; the next oldest goes instead.
        let mut r = rows(&[(10, 0), (10, 1), (10, 2)]);
        r[0].sending = true;
        assert_eq!(plan_drops(&r, &bounds(2, 1000, 100), 3), [1]);
    }

    #[tokio::test]
    async fn the_message_being_sent_is_never_counted_as_dropped() {
        let dir = temp_dir("sending");
        let outbox = open(&dir, bounds(2, 1 << 20, 3600)).await;
        for id in ["m0", "m1"] {
            outbox.push(id, "/p", 100, |_| Vec::new()).await.unwrap();
        }
        let sending = outbox.peek(100).await.unwrap().unwrap();
        assert_eq!(sending.msg_id, "m0");
        // A push while m0 is on the wire drops m1, not m0 (which may be delivered).
        let pushed = outbox.push("m2", "/p", 100, |_| Vec::new()).await.unwrap();
        assert_eq!(pushed.dropped, 1);
        assert_eq!(outbox.waiting_ids().await.unwrap(), ["m0", "m2"]);
        outbox.ack(sending.seq).await.unwrap();
        // Acknowledged: the bound applies to every waiting message again.
        outbox.push("m3", "/p", 100, |_| Vec::new()).await.unwrap();
        outbox.push("m4", "/p", 100, |_| Vec::new()).await.unwrap();
        assert_eq!(outbox.waiting_ids().await.unwrap(), ["m3", "m4"]);
        assert_eq!(outbox.stats().await.unwrap().2, 2);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_refused_heartbeat_hands_on_the_drops_it_was_to_report() {
        let dir = temp_dir("discard");
        let outbox = open(&dir, bounds(1, 1 << 20, 3600)).await;
        outbox.push("m0", "/p", 100, |_| Vec::new()).await.unwrap();
        let pushed = outbox.push("m1", "/p", 100, |_| Vec::new()).await.unwrap();
        assert_eq!(pushed.dropped, 1);
        // m2 carries m0's drop; the control plane refuses m2 for good.
        let carried = std::cell::Cell::new(0);
        outbox
            .push("m2", "/p", 100, |n| {
                carried.set(n);
                Vec::new()
            })
            .await
            .unwrap();
        assert_eq!(carried.get(), 1);
        let refused = outbox.peek(100).await.unwrap().unwrap();
        assert_eq!(refused.msg_id, "m2");
        outbox.discard(refused.seq).await.unwrap();
        // m1's drop (by m2's push) and m0's (carried by m2) go into the next heartbeat.
        outbox
            .push("m3", "/p", 100, |n| {
                carried.set(n);
                Vec::new()
            })
            .await
            .unwrap();
        assert_eq!(carried.get(), 2);
        assert_eq!(outbox.stats().await.unwrap().2, 2, "two bound drops in all");
        let _ = std::fs::remove_dir_all(dir);
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn the_state_file_and_its_wal_are_private() {
        let dir = temp_dir("modes");
        let outbox = open(&dir, bounds(10, 1 << 20, 3600)).await;
        outbox
            .push("m0", "/p", 100, |_| b"x".to_vec())
            .await
            .unwrap();
        for name in ["state.db", "state.db-wal", "state.db-shm"] {
            assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
        }
        drop(outbox);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_state_file_open_to_others_is_tightened() {
        let dir = temp_dir("loose");
        let path = dir.join("state.db");
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o664)).unwrap();
        let outbox = open(&dir, bounds(10, 1 << 20, 3600)).await;
        outbox
            .push("m0", "/p", 100, |_| b"x".to_vec())
            .await
            .unwrap();
        for name in ["state.db", "state.db-wal", "state.db-shm"] {
            assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
        }
        drop(outbox);
        let _ = std::fs::remove_dir_all(dir);
    }

    async fn open(dir: &Path, b: Bounds) -> Outbox {
        Outbox::open(&dir.join("state.db"), b).await.unwrap()
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "fleet-agent-outbox-{name}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn too_old_messages_are_dropped_before_sending_and_reported() {
        let dir = temp_dir("age");
        let outbox = open(&dir, bounds(100, 1 << 20, 60)).await;
        outbox
            .push("old", "/p", 1000, |_| b"a".to_vec())
            .await
            .unwrap();
        outbox
            .push("new", "/p", 1050, |_| b"b".to_vec())
            .await
            .unwrap();
        // At 1070 "old" is 70 s old: past the 60 s bound.
        assert_eq!(outbox.peek(1070).await.unwrap().unwrap().msg_id, "new");
        let mut reported = 0;
        outbox
            .push("next", "/p", 1070, |d| {
                reported = d;
                Vec::new()
            })
            .await
            .unwrap();
        assert_eq!(reported, 1);
        assert_eq!(outbox.waiting_ids().await.unwrap(), ["new", "next"]);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn in_order_and_drops_are_reported_once() {
        let dir = temp_dir("order");
        let outbox = open(&dir, bounds(2, 1 << 20, 3600)).await;
        let mut reported = Vec::new();
        for i in 0..4 {
            let p = outbox
                .push(&format!("m{i}"), "/api/heartbeats", 100, |d| {
                    reported.push(d);
                    format!("body{i}").into_bytes()
                })
                .await
                .unwrap();
            assert_eq!(p.dropped, u64::from(i >= 2));
        }
        // m0 dropped at push 2, m1 dropped at push 3 (it carried nothing): reported 0,0,0,1.
        assert_eq!(reported, [0, 0, 0, 1]);
        let first = outbox.peek(100).await.unwrap().unwrap();
        assert_eq!(first.msg_id, "m2");
        outbox.ack(first.seq).await.unwrap();
        let next = outbox.peek(100).await.unwrap().unwrap();
        assert_eq!(next.msg_id, "m3");
        // Its send fails: off the wire, m3 may be dropped by a bound again.
        outbox.release(next.seq);
        // m3 carried one drop; if m3 itself is dropped, that count is handed on.
        let mut next = 0;
        for i in 4..6 {
            outbox
                .push(&format!("m{i}"), "/p", 100, |d| {
                    next = d;
                    Vec::new()
                })
                .await
                .unwrap();
        }
        // Push m4: no drop (m3, m4). Push m5 drops m3 (1 + its carried 1), reported at m6.
        outbox
            .push("m6", "/p", 100, |d| {
                next = d;
                Vec::new()
            })
            .await
            .unwrap();
        assert_eq!(next, 2);
        assert_eq!(outbox.stats().await.unwrap().2, 4);
        drop(outbox);
        // Survives a reopen in order.
        let outbox = open(&dir, bounds(2, 1 << 20, 3600)).await;
        assert_eq!(outbox.peek(100).await.unwrap().unwrap().msg_id, "m5");
        let _ = std::fs::remove_dir_all(dir);
    }
}
