"""How the WAL checkpoint interval changes what a heartbeat costs SQLite's writer.

    python3 benches/sqlite/checkpoint_interval.py [--batches 3000] [--pages 1000,16384]

Replays the control plane's write pattern on a fresh database file for each setting, side by
side in one run: 10,000 installations with a ~1 KB latest state, and batches of 86 heartbeats
(the batch size the ingest benchmark measures), each committed with synchronous=FULL in WAL
mode. Per heartbeat: a message id into a WITHOUT ROWID table keyed by a random UUID, an update
of a random installation (its latest state and a link to its newest time-series row), and a
time-series row linked to the installation's row before it (migration 0006; the figures of
2026-11-22 in BENCHMARKS.md were taken when the time series had an index by installation
instead). Prints the
process CPU time (user + system) and the wall time per heartbeat for each
`wal_autocheckpoint` value, alternating them so both see the same machine load.

It runs Python's own SQLite library, not the server's; the statements are the shape of the
server's, not the same text. What it measures is SQLite's checkpoint work for this pattern.
"""

import argparse
import os
import random
import resource
import sqlite3
import tempfile
import time
import uuid

INSTALLATIONS = 10_000
BATCH = 86
STATE = "x" * 1100
FIGURES = '{"cpu":0.5,"mem":0.25,"disk":0.1}'

SCHEMA = """
CREATE TABLE installations (id INTEGER PRIMARY KEY, instance_id TEXT UNIQUE,
    last_seen_at INTEGER, state TEXT, last_heartbeat_id INTEGER);
CREATE TABLE heartbeats (id INTEGER PRIMARY KEY, installation_id INTEGER,
    received_at INTEGER, msg_id TEXT, figures TEXT, previous_id INTEGER);
CREATE TABLE seen_messages (msg_id TEXT, instance_id TEXT, signed_at INTEGER,
    seen_at INTEGER, PRIMARY KEY (msg_id, instance_id)) WITHOUT ROWID;
CREATE INDEX seen_messages_seen_at ON seen_messages (seen_at);
"""


def measure(path: str, pages: int, batches: int) -> str:
    db = sqlite3.connect(path, isolation_level=None)
    for pragma in ("journal_mode=WAL", "synchronous=FULL", "cache_size=-65536",
                   f"wal_autocheckpoint={pages}"):
        db.execute(f"PRAGMA {pragma}")
    db.executescript(SCHEMA)
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO installations (instance_id, last_seen_at, state) VALUES (?, 0, ?)",
        ((f"inst-{i:05}", STATE) for i in range(INSTALLATIONS)),
    )
    db.execute("COMMIT")
    rng = random.Random(7)
    newest: dict[int, int] = {}
    before, started, now = resource.getrusage(resource.RUSAGE_SELF), time.monotonic(), 0
    for _ in range(batches):
        db.execute("BEGIN IMMEDIATE")
        for _ in range(BATCH):
            row, now, msg = rng.randrange(INSTALLATIONS) + 1, now + 1, str(uuid.uuid4())
            db.execute("INSERT INTO seen_messages VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                       (msg, f"inst-{row - 1:05}", now, now))
            previous = newest.get(row)
            db.execute("INSERT INTO heartbeats (installation_id, received_at, msg_id, figures, "
                       "previous_id) VALUES (?, ?, ?, ?, ?)", (row, now, msg, FIGURES, previous))
            newest[row] = db.execute("SELECT last_insert_rowid()").fetchone()[0]
            db.execute("UPDATE installations SET last_seen_at = ?, state = ?, "
                       "last_heartbeat_id = ? WHERE id = ?", (now, STATE, newest[row], row))
        db.execute("COMMIT")
    after, wall = resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - started
    wal_mib = os.path.getsize(path + "-wal") / 2**20
    db.close()
    n = batches * BATCH
    user = (after.ru_utime - before.ru_utime) / n * 1e6
    system = (after.ru_stime - before.ru_stime) / n * 1e6
    return (f"| {pages} | {user + system:.1f} | {user:.1f} | {system:.1f} | "
            f"{wall / n * 1e6:.1f} | {wal_mib:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=3000)
    parser.add_argument("--pages", default="1000,16384",
                        help="wal_autocheckpoint values to compare, comma-separated")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    settings = [int(p) for p in args.pages.split(",")]
    print(f"SQLite {sqlite3.sqlite_version}, {args.batches} batches of {BATCH} heartbeats, "
          f"{INSTALLATIONS} installations")
    print("| wal_autocheckpoint (pages) | CPU µs/heartbeat | user | system | wall µs/heartbeat "
          "| WAL file MiB |")
    print("|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="fleet-checkpoint-") as folder:
        for round_ in range(args.rounds):
            for pages in settings:
                path = os.path.join(folder, f"round-{round_}-{pages}.db")
                print(measure(path, pages, args.batches), flush=True)


if __name__ == "__main__":
    main()
