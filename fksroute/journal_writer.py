"""The journal's writer: a process of its own that owns the SQLite file and commits in groups.

The daemon sends it writes and reads as frames over a socket and goes on at once; the writer
commits whatever arrived while it was busy as one transaction (WAL, synchronous=FULL), then
answers every operation of the group in one frame. Being a process, it never takes the event
loop's GIL: a thread doing the same work slowed every alert on the loop by half (bench/).

Run as `python -m fksroute.journal_writer PATH BUSY_TIMEOUT FD`; it imports nothing but the
standard library, ignores the stop signals (it stops when the daemon's end of FD closes, after
committing what it was sent) and holds an exclusive lock on PATH, so that one writer at a time
owns a journal, a daemon restarted after a crash waiting for its predecessor's to finish.
"""

from __future__ import annotations

import fcntl
import marshal
import os
import signal
import socket
import sqlite3
import struct
import sys
import time
from functools import lru_cache
from typing import Any, Callable

SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    received_at REAL NOT NULL,
    source TEXT,
    body TEXT,
    outcome TEXT NOT NULL,
    reason TEXT,
    http_status INTEGER,
    dedup_key TEXT,
    duplicate_of TEXT,
    reply TEXT,
    config_version TEXT
);
DROP INDEX IF EXISTS alerts_dedup; -- keyed by a hash: every insert wrote a random page of it
CREATE INDEX IF NOT EXISTS alerts_received ON alerts (received_at);
CREATE TABLE IF NOT EXISTS orders (
    client_order_id TEXT PRIMARY KEY,
    alert_id TEXT NOT NULL REFERENCES alerts (id),
    position INTEGER NOT NULL,
    route TEXT,
    plugin TEXT,
    request TEXT,
    state TEXT NOT NULL,
    status TEXT,
    order_id TEXT,
    error TEXT,
    filled_quantity REAL,
    average_price REAL,
    detail TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS orders_state ON orders (state);
CREATE INDEX IF NOT EXISTS orders_alert ON orders (alert_id);
"""

# Order states: the line between `pending` and `sent` is what makes recovery exactly-once.
PENDING = "pending"  # journaled, never handed to the plugin: safe to execute after a crash
SENT = "sent"        # handed to the plugin, outcome not yet known: reconcile, never resend blindly
DONE = "done"        # final, or `placed` and followed until final
OPEN = "open"        # placed at the venue, not yet filled: followed through the plugin's lookup

# What an operation's answer says: done (with a read's rows), refused by a uniqueness rule
# (the journal is fine), or failed.
OK, CONFLICT, FAILED = 0, 1, 2
LOCK_WAIT = 10.0     # a predecessor's writer still finishing its last group after a crash
_HEADER = struct.Struct(">I")
RECV_SIZE = 1 << 16  # per read: a larger buffer costs more to allocate than the reads it saves
_MOST_ROWS = 128     # per statement: a statement per size up to this is compiled once and cached


# --- frames: a length, then a marshalled value of plain data ----------------------------------

def frame(value: Any) -> bytes:
    """`value` (tuples, lists, strings, numbers, None only) as one frame."""
    payload = marshal.dumps(value)
    return _HEADER.pack(len(payload)) + payload


class Frames:
    """Splits a byte stream into the values of its frames."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        """The values of the frames `data` completes; a frame's start waits for its end."""
        buffer = self._buffer
        buffer += data
        values, start = [], 0
        while len(buffer) - start >= 4:
            (size,) = _HEADER.unpack_from(buffer, start)
            if len(buffer) - start - 4 < size:
                break
            values.append(marshal.loads(buffer[start + 4:start + 4 + size]))
            start += 4 + size
        del buffer[:start]
        return values


# --- the writes -------------------------------------------------------------------------------

_INSERT_ALERTS = ("INSERT INTO alerts (id, received_at, source, body, outcome, reason, http_status, dedup_key,"
                  " duplicate_of, reply, config_version) VALUES {}")
_INSERT_ORDERS = ("INSERT INTO orders (client_order_id, alert_id, position, route, plugin, request, state, status,"
                  " detail, created_at, updated_at) VALUES {}")
_UPDATE_RESULTS = ("UPDATE orders SET state = v.column2, status = v.column3, order_id = v.column4, error = v.column5,"
                   " filled_quantity = v.column6, average_price = v.column7, detail = v.column8,"
                   " updated_at = v.column9 FROM (VALUES {}) AS v WHERE orders.client_order_id = v.column1")
ORDER_SELECT = ("SELECT client_order_id, alert_id, route, plugin, request, state, status, order_id, error,"
                  " filled_quantity, average_price, detail, updated_at FROM orders")


@lru_cache(maxsize=None)
def _rows(template: str, width: int, count: int) -> str:
    """`template` with `count` placeholder rows of `width` values."""
    return template.format(",".join(["(" + ",".join("?" * width) + ")"] * count))


def _many(conn: sqlite3.Connection, template: str, width: int, rows: list[tuple]) -> None:
    """All `rows` in one statement (a few past _MOST_ROWS): one step of SQLite per statement."""
    done = 0
    while done < len(rows):
        count = min(_MOST_ROWS, len(rows) - done)
        conn.execute(_rows(template, width, count), [v for row in rows[done:done + count] for v in row])
        done += count


def _insert_alert(conn: sqlite3.Connection, alert_row: tuple, order_rows: list[tuple]) -> None:
    conn.execute(_rows(_INSERT_ALERTS, 11, 1), alert_row)
    conn.executemany(_rows(_INSERT_ORDERS, 11, 1), order_rows)


def _update_result(conn: sqlite3.Connection, row: tuple) -> None:
    conn.execute(_rows(_UPDATE_RESULTS, 9, 1), row)


def _mark_sent(conn: sqlite3.Connection, row: tuple) -> None:
    conn.execute("UPDATE orders SET state = ?, updated_at = ? WHERE client_order_id = ?", row)


# --- the reads (inside the group's transaction: they see every write sent before them) ----------

def _unfinished(conn: sqlite3.Connection) -> list[tuple]:
    return conn.execute(
        "SELECT o.client_order_id, o.alert_id, o.position, o.route, o.plugin, o.request, o.state, o.status"
        " FROM orders o JOIN alerts a ON a.id = o.alert_id WHERE o.state IN (?, ?, ?)"
        " ORDER BY a.seq, o.position", (PENDING, SENT, OPEN)).fetchall()


def _dedup_entries(conn: sqlite3.Connection, since: float) -> list[tuple]:
    return conn.execute(
        "SELECT dedup_key, id, received_at, http_status, reply FROM alerts WHERE dedup_key IS NOT NULL"
        " AND duplicate_of IS NULL AND outcome = 'accepted' AND received_at >= ? ORDER BY seq", (since,)).fetchall()


def _order_results(conn: sqlite3.Connection, alert_id: str) -> list[tuple]:
    return conn.execute(ORDER_SELECT + " WHERE alert_id = ? ORDER BY position", (alert_id,)).fetchall()


def _count_unknown(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT COUNT(*) FROM orders WHERE status = 'unknown'").fetchone()[0]


def _settings(conn: sqlite3.Connection) -> tuple:
    return (conn.execute("PRAGMA journal_mode").fetchone()[0], conn.execute("PRAGMA synchronous").fetchone()[0])


READS: dict[str, Callable[..., Any]] = {
    "unfinished": _unfinished, "dedup_entries": _dedup_entries, "order_results": _order_results,
    "count_unknown": _count_unknown, "settings": _settings,
}


class _Redo(Exception):
    """The fast path met a bad operation: run the group again, one savepoint per operation."""


def _batched(conn: sqlite3.Connection, ops: list[tuple]) -> list[tuple]:
    """The fast path: a group's alert, order and result writes as multi-row statements, other
    operations in their place. Raises _Redo when a write fails for its own reasons."""
    alerts: list[tuple] = []
    orders: list[tuple] = []
    results: list[tuple] = []
    updated: set[str] = set()

    def write() -> None:
        _many(conn, _INSERT_ALERTS, 11, alerts)
        _many(conn, _INSERT_ORDERS, 11, orders)
        _many(conn, _UPDATE_RESULTS, 9, results)  # after the inserts: an update may be for one of them
        alerts.clear(), orders.clear(), results.clear(), updated.clear()

    outcomes = []
    try:
        for seq, kind, a, b in ops:
            if kind == "alert":
                alerts.append(a)
                orders.extend(b)
                value = None
            elif kind == "result":
                if a[0] in updated:  # the same order twice: the later one must win
                    write()
                updated.add(a[0])
                results.append(a)
                value = None
            else:
                write()
                value = _run(conn, kind, a, b)
            outcomes.append((seq, OK, value))
        write()
    except sqlite3.OperationalError:
        raise  # the disk or the lock: the whole group fails
    except Exception:
        raise _Redo() from None
    return outcomes


def _run(conn: sqlite3.Connection, kind: str, a: Any, b: Any) -> Any:
    """One operation by itself."""
    if kind == "alert":
        return _insert_alert(conn, a, b)
    if kind == "result":
        return _update_result(conn, a)
    if kind == "sent":
        return _mark_sent(conn, a)
    return READS[kind](conn, *a)


def _isolated(conn: sqlite3.Connection, ops: list[tuple]) -> list[tuple]:
    """The slow path: each operation alone inside a savepoint, so that a bad one fails alone."""
    outcomes = []
    for i, (seq, kind, a, b) in enumerate(ops):
        conn.execute(f"SAVEPOINT op{i}")
        try:
            outcomes.append((seq, OK, _run(conn, kind, a, b)))
        except sqlite3.OperationalError:
            raise  # the disk or the lock: the whole group fails
        except Exception as exc:  # a bad value in one write must not take the journal down
            conn.execute(f"ROLLBACK TO op{i}")
            outcomes.append((seq, CONFLICT, f"journal: {exc}") if isinstance(exc, sqlite3.IntegrityError)
                            else (seq, FAILED, f"journal: {type(exc).__name__}: {exc}"))
        conn.execute(f"RELEASE op{i}")
    return outcomes


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass


def commit(conn: sqlite3.Connection, ops: list[tuple]) -> tuple[bool, str | None, list[tuple]]:
    """Run `ops` as one transaction: (committed, why not, each operation's (seq, code, value))."""
    try:
        conn.execute("BEGIN IMMEDIATE")  # waits up to the connection's busy timeout for a lock
        try:
            outcomes = _batched(conn, ops)
        except _Redo:
            _rollback(conn)
            conn.execute("BEGIN IMMEDIATE")
            outcomes = _isolated(conn, ops)
        conn.execute("COMMIT")
    except Exception as exc:
        _rollback(conn)
        failure = f"the journal cannot write: {exc}"
        return False, str(exc), [(op[0], FAILED, failure) for op in ops]
    return True, None, outcomes


# --- the process --------------------------------------------------------------------------------

def open_journal(path: str, busy_timeout: float) -> tuple[sqlite3.Connection, int]:
    """The connection, once this process holds the journal's writer lock (the lock's file descriptor)."""
    lock = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(lock)
                raise OSError(f"another fksroute has been writing it for over {LOCK_WAIT:.0f}s") from None
            time.sleep(0.02)
    conn = sqlite3.connect(path, isolation_level=None, timeout=max(busy_timeout, LOCK_WAIT),
                           cached_statements=4 * _MOST_ROWS)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.executescript(SCHEMA)
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
    return conn, lock


def serve(sock: socket.socket, conn: sqlite3.Connection) -> None:
    """Commit what arrives, a group at a time, until the daemon's end closes; then what is left."""
    frames = Frames()
    closed = False
    while not closed:
        ops: list[tuple] = []
        data = sock.recv(RECV_SIZE)
        while data:
            for value in frames.feed(data):
                ops.extend(value)
            try:
                data = sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)  # what else arrived meanwhile
            except BlockingIOError:
                break
        else:
            closed = True
        if ops:
            reply = frame(commit(conn, ops))
            try:
                sock.sendall(reply)
            except OSError:  # the daemon is gone: what it sent is committed, nobody waits for the answer
                closed = True


def main(argv: list[str]) -> int:
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)  # stopped by the daemon closing its end, never half-way
    path, busy_timeout, fd = argv[0], float(argv[1]), int(argv[2])
    sock = socket.socket(fileno=fd)
    try:
        conn, lock = open_journal(path, busy_timeout)
    except (sqlite3.Error, OSError) as exc:
        sock.sendall(frame(("error", f"cannot open the journal {path}: {exc}")))
        return 1
    sock.sendall(frame(("ready", _settings(conn))))
    try:
        serve(sock, conn)
    except OSError:
        pass
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.Error:
        pass
    conn.close()
    os.close(lock)  # after the connection: closing a descriptor of the file drops its SQLite locks
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
