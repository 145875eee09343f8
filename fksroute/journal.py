"""The journal: every alert and what became of it, in SQLite, on disk before any answer.

Writes queue up and are committed in groups, so that many concurrent alerts share one fsync
(WAL, synchronous=FULL). A group's statements run on the event loop, which queued them: they
only touch SQLite's page cache and take microseconds. Its COMMIT, where SQLite writes the log
and waits for the disk, runs on the journal's thread without the GIL; the next group gathers
meanwhile. The loop and the thread never use the connection at the same time.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import queue
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from fksroute.plugins.base import OrderResult

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


class JournalError(RuntimeError):
    """The journal cannot write: nothing may be executed or acknowledged."""


class JournalConflict(JournalError):
    """One write broke a uniqueness rule (e.g. a client order id used before); the journal is fine."""


class _Redo(Exception):
    """The fast path of a group commit met a bad op: run the group again, one savepoint per op."""


BEST_EFFORT_BACKLOG = 10000
_TEXT = json.JSONEncoder(default=str).encode  # built once: json.dumps(default=...) builds one per call
BUSY_RETRY = 0.01  # while another process holds the write lock, the thread asks again this often


_PROCESS = secrets.randbits(16)  # told apart from other runs' ids by time and this
_COUNTER = itertools.count()


def new_alert_id() -> str:
    """Time-ordered and unique: milliseconds, this process's random tag, a counter; 24 hex characters."""
    return f"{int(time.time() * 1000):012x}{_PROCESS:04x}{next(_COUNTER) & 0xFFFFFFFF:08x}"


# (client_order_id, route, plugin, request, state, status, reason a route was skipped)
OrderPlan = tuple[str, str | None, str | None, Mapping[str, Any] | None, str, str | None, str | None]


@dataclass(frozen=True)
class OrderRow:
    client_order_id: str
    alert_id: str
    position: int
    route: str | None
    plugin: str | None
    request: Mapping[str, Any] | None
    state: str
    status: str | None


class _Op:
    """One write: `run` does it alone; `batch`, when set, says what it writes, so that a group's
    alerts, orders and results go to SQLite as a few multi-row statements."""

    __slots__ = ("batch", "future", "loop", "run")

    def __init__(self, run: Callable[[sqlite3.Connection], Any], future: asyncio.Future | None,
                 loop: asyncio.AbstractEventLoop | None, batch: tuple | None = None) -> None:
        self.run, self.future, self.loop, self.batch = run, future, loop, batch


Outcomes = list[tuple[bool, Any]]


class Journal:
    """Owns the SQLite file. All methods but open/close are called from the event loop."""

    def __init__(self, path: Path, busy_timeout: float = 1.0) -> None:
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self._lock = threading.Lock()  # guards the fields below and the connection outside a commit
        self._pending: list[_Op] = []  # queued, not yet in a group
        self._committing = False       # a group is with the thread: the connection is its own
        self._closed = True
        self._flush_on: asyncio.AbstractEventLoop | None = None  # a flush is scheduled on this loop
        self._groups: queue.SimpleQueue[list[_Op] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self.healthy = True
        self.last_error: str | None = None
        self.commits = 0  # transactions committed: with group commit, far fewer than writes
        self.writes = 0   # operations committed
        self.dropped = 0  # best-effort records (refused requests) dropped because the writer was behind

    # --- lifecycle ------------------------------------------------------------------------

    def open(self) -> None:
        """Open (creating if needed) the file; raises JournalError when it cannot."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # No busy wait inside SQLite: the event loop must never block on another process's
            # lock. When the file is locked, the thread waits for it instead (see _begin).
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=0,
                                   cached_statements=4 * _MOST_ROWS)  # every size of the three batched writes
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise JournalError(f"cannot open the journal {self.path}: {exc}") from None
        self._conn = conn
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="fksroute-journal", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Write what is queued, then close the file cleanly (checkpointing the WAL). Safe from
        any thread, and on the event loop itself once nothing awaits the journal any more."""
        with self._lock:
            if self._closed:
                return
            self._closed = True  # from here on, writes are refused and no flush starts
        if self._thread is not None:
            self._groups.put(None)  # after the group in flight, if any
            self._thread.join()
            self._thread = None
        conn = self._conn
        assert conn is not None
        with self._lock:
            left, self._pending = self._pending, []
        if left:
            self._write(left)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass
        conn.close()
        self._conn = None

    # --- group commit -----------------------------------------------------------------------

    def _flush(self) -> None:
        """On the event loop: hand the queued writes to the thread as one group, unless a group is
        committing (the thread takes what queued meanwhile when it is done)."""
        with self._lock:
            self._flush_on = None
            if self._committing or self._closed or not self._pending:
                return
            group, self._pending = self._pending, []
            self._committing = True
            self._groups.put(group)

    def _run(self) -> None:
        """The journal's thread: writes and commits each group, then takes, as the next group,
        whatever queued meanwhile, without waiting for the event loop."""
        while (group := self._groups.get()) is not None:
            while group:
                self._write(group)
                with self._lock:
                    group, self._pending = (self._pending, []) if not self._closed else ([], self._pending)
                    self._committing = bool(group)

    def _write(self, group: list[_Op]) -> None:
        conn = self._conn
        assert conn is not None
        try:
            self._begin(conn)
            outcomes = self._apply(conn, group)
            conn.execute("COMMIT")
        except Exception as exc:
            _rollback(conn)
            self._failed(group, exc)
        else:
            with self._lock:
                self.commits += 1
                self.writes += sum(1 for ok, _ in outcomes if ok)
                self.healthy, self.last_error = True, None
            self._settle(group, outcomes)

    def _begin(self, conn: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE, waiting up to busy_timeout for another process's write lock."""
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(BUSY_RETRY)

    def _apply(self, conn: sqlite3.Connection, group: list[_Op]) -> Outcomes:
        """Run the group's ops inside the open transaction. The fast path has no savepoints: the
        first op that fails for its own reasons undoes the group, which then runs again with one
        savepoint per op, so that the bad op fails alone."""
        try:
            return _batched(conn, group)
        except _Redo:
            _rollback(conn)
            self._begin(conn)
            return _isolated(conn, group)

    def _failed(self, group: list[_Op], exc: BaseException) -> None:
        self.healthy, self.last_error = False, str(exc)
        failure = JournalError(f"the journal cannot write: {exc}")
        self._settle(group, [(False, failure)] * len(group))

    def _settle(self, group: list[_Op], outcomes: Outcomes) -> None:
        """Tell every waiter of the group, on its own loop, at once."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, bool, Any]]] = {}
        for op, (ok, value) in zip(group, outcomes):
            if op.future is not None and op.loop is not None:
                by_loop.setdefault(op.loop, []).append((op.future, ok, value))
        for loop, settled in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle_all, settled)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

    def _schedule_flush(self) -> None:
        """Called with the lock held."""
        if not self._pending or self._committing:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop here (a script): the thread takes it now
            group, self._pending = self._pending, []
            self._committing = True
            self._groups.put(group)
            return
        if self._flush_on is not loop or loop.is_closed():
            self._flush_on = loop
            loop.call_soon(self._flush)

    def _submit(self, run: Callable[[sqlite3.Connection], Any], wait: bool = True,
                batch: tuple | None = None) -> asyncio.Future | None:
        """Queue a write; the returned future resolves once it is committed (fsynced).

        Without `wait` the write is best effort: dropped when the writer is far behind, so that a
        flood of refused requests cannot grow the queue without bound."""
        with self._lock:
            if self._closed:
                raise JournalError("the journal is closed")
            if not wait:
                try:
                    loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
                except RuntimeError:
                    loop = None
                if len(self._pending) >= BEST_EFFORT_BACKLOG:
                    self.dropped += 1
                    return None
                self._pending.append(_Op(run, None, loop, batch))
                self._schedule_flush()
                return None
            loop = asyncio.get_running_loop()
            future = loop.create_future()
            self._pending.append(_Op(run, future, loop, batch))
            self._schedule_flush()
            return future

    def run(self, run: Callable[[sqlite3.Connection], Any]) -> asyncio.Future:
        future = self._submit(run)
        assert future is not None
        return future

    # --- writes ---------------------------------------------------------------------------

    def record_alert(self, alert_id: str, *, source: str | None, body: str | None, outcome: str,
                     reason: str | None = None, http_status: int | None = None, dedup_key: str | None = None,
                     duplicate_of: str | None = None, config_version: str | None = None,
                     orders: Iterable[OrderPlan] = (),
                     reply: Mapping[str, Any] | None = None, wait: bool = True) -> asyncio.Future | None:
        """The alert and its planned orders, in one transaction.

        Each order is (client_order_id, route, plugin, request, state, status, skip reason).
        """
        now = time.time()
        alert_row = (alert_id, now, source, body, outcome, reason, http_status, dedup_key, duplicate_of,
                     _TEXT(reply) if reply is not None else None, config_version)
        order_rows = [(coid, alert_id, i, route, plugin, _TEXT(request) if request is not None else None,
                       state, status, _TEXT({"reason": reason}) if reason else None, now, now)
                      for i, (coid, route, plugin, request, state, status, reason) in enumerate(orders)]

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(_rows(_INSERT_ALERTS, 11, 1), alert_row)
            conn.executemany(_rows(_INSERT_ORDERS, 11, 1), order_rows)

        return self._submit(run, wait, ("alert", alert_row, order_rows))

    def mark_sent(self, client_order_id: str) -> asyncio.Future:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE orders SET state = ?, updated_at = ? WHERE client_order_id = ?",
                         (SENT, time.time(), client_order_id))

        return self.run(run)

    def record_result(self, client_order_id: str, result: OrderResult) -> asyncio.Future:
        row = (client_order_id, OPEN if result.status == "placed" else DONE, result.status, result.order_id,
               result.error, result.filled_quantity, result.average_price, _TEXT(dict(result.detail)), time.time())

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(_rows(_UPDATE_RESULTS, 9, 1), row)

        future = self._submit(run, True, ("result", row))
        assert future is not None
        return future

    # --- reads (run on the writer thread, so they see every committed write) -------------------

    def unfinished(self) -> asyncio.Future:
        """Orders journaled but not final, in arrival order: pending, sent and open."""
        def run(conn: sqlite3.Connection) -> list[OrderRow]:
            rows = conn.execute(
                "SELECT o.client_order_id, o.alert_id, o.position, o.route, o.plugin, o.request, o.state, o.status"
                " FROM orders o JOIN alerts a ON a.id = o.alert_id WHERE o.state IN (?, ?, ?)"
                " ORDER BY a.seq, o.position", (PENDING, SENT, OPEN)).fetchall()
            return [OrderRow(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]) if r[5] else None, r[6], r[7])
                    for r in rows]

        return self.run(run)

    def dedup_entries(self, since: float) -> asyncio.Future:
        """(dedup_key, alert id, received_at, HTTP status, reply) of accepted alerts since `since`."""
        def run(conn: sqlite3.Connection) -> list[tuple[str, str, float, int | None, dict | None]]:
            rows = conn.execute(
                "SELECT dedup_key, id, received_at, http_status, reply FROM alerts WHERE dedup_key IS NOT NULL"
                " AND duplicate_of IS NULL AND outcome = 'accepted' AND received_at >= ? ORDER BY seq",
                (since,)).fetchall()
            return [(r[0], r[1], r[2], r[3], json.loads(r[4]) if r[4] else None) for r in rows]

        return self.run(run)

    def order_results(self, alert_id: str) -> asyncio.Future:
        def run(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            return [_order_dict(r) for r in conn.execute(_ORDER_SELECT + " WHERE alert_id = ? ORDER BY position",
                                                         (alert_id,))]

        return self.run(run)

    def count_unknown(self) -> asyncio.Future:
        def run(conn: sqlite3.Connection) -> int:
            return conn.execute("SELECT COUNT(*) FROM orders WHERE status = 'unknown'").fetchone()[0]

        return self.run(run)


_ORDER_SELECT = ("SELECT client_order_id, alert_id, route, plugin, request, state, status, order_id, error,"
                 " filled_quantity, average_price, detail, updated_at FROM orders")


def _order_dict(row: tuple) -> dict[str, Any]:
    keys = ("client_order_id", "alert_id", "route", "plugin", "order", "state", "status", "order_id", "error",
            "filled_quantity", "average_price", "detail", "updated_at")
    out = dict(zip(keys, row))
    for key in ("order", "detail"):
        out[key] = json.loads(out[key]) if out[key] else None
    return out


_INSERT_ALERTS = ("INSERT INTO alerts (id, received_at, source, body, outcome, reason, http_status, dedup_key,"
                  " duplicate_of, reply, config_version) VALUES {}")
_INSERT_ORDERS = ("INSERT INTO orders (client_order_id, alert_id, position, route, plugin, request, state, status,"
                  " detail, created_at, updated_at) VALUES {}")
_UPDATE_RESULTS = ("UPDATE orders SET state = v.column2, status = v.column3, order_id = v.column4, error = v.column5,"
                   " filled_quantity = v.column6, average_price = v.column7, detail = v.column8,"
                   " updated_at = v.column9 FROM (VALUES {}) AS v WHERE orders.client_order_id = v.column1")
_MOST_ROWS = 128  # per statement: a statement per size up to this is compiled once and cached


@lru_cache(maxsize=None)
def _rows(template: str, width: int, count: int) -> str:
    """`template` with `count` placeholder rows of `width` values."""
    return template.format(",".join(["(" + ",".join("?" * width) + ")"] * count))


def _many(conn: sqlite3.Connection, template: str, width: int, rows: list[tuple]) -> None:
    """All `rows` in one statement (a few past _MOST_ROWS): one step of SQLite, and one wait for
    the GIL after it, per statement rather than per row."""
    done = 0
    while done < len(rows):
        count = min(_MOST_ROWS, len(rows) - done)
        conn.execute(_rows(template, width, count), [v for row in rows[done:done + count] for v in row])
        done += count


def _batched(conn: sqlite3.Connection, group: list[_Op]) -> Outcomes:
    """The fast path: a group's alert, order and result writes as multi-row statements, other
    ops in their place. Raises _Redo when a write fails for its own reasons."""
    alerts: list[tuple] = []
    orders: list[tuple] = []
    results: list[tuple] = []
    updated: set[str] = set()

    def write() -> None:
        _many(conn, _INSERT_ALERTS, 11, alerts)
        _many(conn, _INSERT_ORDERS, 11, orders)
        _many(conn, _UPDATE_RESULTS, 9, results)  # after the inserts: an update may be for one of them
        alerts.clear(), orders.clear(), results.clear(), updated.clear()

    outcomes: Outcomes = []
    try:
        for op in group:
            batch = op.batch
            if batch is None:
                write()
                outcomes.append((True, op.run(conn)))
                continue
            if batch[0] == "alert":
                alerts.append(batch[1])
                orders.extend(batch[2])
            else:
                if batch[1][0] in updated:  # the same order twice: the later one must win
                    write()
                updated.add(batch[1][0])
                results.append(batch[1])
            outcomes.append((True, None))
        write()
    except sqlite3.OperationalError:
        raise  # the disk or the lock: the whole group fails
    except Exception:
        raise _Redo() from None
    return outcomes


def _isolated(conn: sqlite3.Connection, group: list[_Op]) -> Outcomes:
    """The slow path: each op alone inside a savepoint, so that a bad one fails alone."""
    outcomes: Outcomes = []
    for i, op in enumerate(group):
        conn.execute(f"SAVEPOINT op{i}")
        try:
            outcomes.append((True, op.run(conn)))
        except sqlite3.OperationalError:
            raise  # the disk or the lock: the whole group fails
        except Exception as exc:  # a bad value in one write must not take the journal down
            conn.execute(f"ROLLBACK TO op{i}")
            failure = (JournalConflict(f"journal: {exc}") if isinstance(exc, sqlite3.IntegrityError)
                       else JournalError(f"journal: {type(exc).__name__}: {exc}"))
            outcomes.append((False, failure))
        conn.execute(f"RELEASE op{i}")
    return outcomes


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass


def _settle_all(settled: list[tuple[asyncio.Future, bool, Any]]) -> None:
    for future, ok, value in settled:
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


def read_recent(path: Path, limit: int = 20, alert_id: str | None = None) -> list[dict[str, Any]]:
    """Recent alerts with their orders, newest first, read-only (for `fksroute journal`)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        where, args = ("WHERE id = ?", (alert_id,)) if alert_id else ("", ())
        alerts = conn.execute(
            "SELECT id, received_at, source, body, outcome, reason, http_status, dedup_key, duplicate_of, reply,"
            f" config_version FROM alerts {where} ORDER BY seq DESC LIMIT ?", (*args, limit)).fetchall()
        out = []
        for row in alerts:
            entry = dict(zip(("id", "received_at", "source", "body", "outcome", "reason", "http_status",
                              "dedup_key", "duplicate_of", "reply", "config_version"), row))
            entry["reply"] = json.loads(entry["reply"]) if entry["reply"] else None
            entry["orders"] = [_order_dict(r) for r in conn.execute(
                _ORDER_SELECT + " WHERE alert_id = ? ORDER BY position", (row[0],))]
            out.append(entry)
        return out
    finally:
        conn.close()
