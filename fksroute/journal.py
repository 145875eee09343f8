"""The journal: every alert and what became of it, in SQLite, on disk before any answer.

The file belongs to the journal's writer, a process of its own (fksroute.journal_writer),
which commits in groups so that many concurrent alerts share one fsync (WAL,
synchronous=FULL). This side queues each write with a future, sends what one turn of the
event loop queued as one frame, and resolves the futures when the writer answers for the
group that held them. Nothing here waits for the disk, and nothing takes the GIL from the loop.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from fksroute import jsontext
from fksroute.journal_writer import (CONFLICT, DONE, OK, OPEN, ORDER_SELECT, PENDING, RECV_SIZE, SCHEMA, SENT, Frames,
                                     frame)
from fksroute.plugins.base import OrderResult

__all__ = ["DONE", "OPEN", "PENDING", "SCHEMA", "SENT", "Journal", "JournalConflict", "JournalError",
           "OrderRow", "new_alert_id", "read_recent"]

log = logging.getLogger("fksroute.journal")


class JournalError(RuntimeError):
    """The journal cannot write: nothing may be executed or acknowledged."""


class JournalConflict(JournalError):
    """One write broke a uniqueness rule (e.g. a client order id used before); the journal is fine."""


BEST_EFFORT_BACKLOG = 10000
READY_WITHIN = 30.0  # the writer's start, a predecessor's writer finishing included (LOCK_WAIT)
STOP_WITHIN = 30.0   # at close, for the writer to commit what it was sent and checkpoint


_PROCESS = f"{secrets.randbits(16):04x}"  # told apart from other runs' ids by time and this
_COUNTER = itertools.count()


def new_alert_id() -> str:
    """Time-ordered and unique: milliseconds, this process's random tag, a counter; 24 hex characters."""
    return "%012x%s%08x" % (int(time.time() * 1000), _PROCESS, next(_COUNTER) & 0xFFFFFFFF)


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


class Journal:
    """The daemon's side of the journal. Its methods are called from one event loop at a time
    (open and close from anywhere that loop is not running, or from the loop itself)."""

    def __init__(self, path: Path, busy_timeout: float = 1.0,
                 on_lost: Callable[[str], None] | None = None) -> None:
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self.on_lost = on_lost  # called once if the writer process ends while the journal is open
        self._sock: socket.socket | None = None
        self._process: subprocess.Popen | None = None
        self._frames = Frames()
        self._seq = itertools.count()
        self._waiting: dict[int, tuple[asyncio.Future, Callable[[Any], Any] | None]] = {}
        self._queued: list[tuple] = []  # operations not yet sent
        self._unanswered = 0            # operations sent, their group not yet answered
        self._out = bytearray()         # sent, not yet taken by the socket
        self._loop: asyncio.AbstractEventLoop | None = None     # the loop reading the writer's answers
        self._loop_thread: int | None = None                      # and the thread it runs in
        self._flush_on: asyncio.AbstractEventLoop | None = None  # a flush is scheduled on this loop
        self._writing = False
        self._closed = True
        self._lost: str | None = None
        self.settings: tuple[str, int] | None = None  # the writer's (journal_mode, synchronous)
        self.healthy = True
        self.last_error: str | None = None
        self.commits = 0  # transactions committed: with group commit, far fewer than writes
        self.writes = 0   # operations committed
        self.dropped = 0  # best-effort records (refused requests) dropped because the writer was behind

    @property
    def writer_pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # --- lifecycle ------------------------------------------------------------------------

    def open(self) -> None:
        """Start the writer on the file (creating it if needed); raises JournalError when it cannot."""
        failure = f"cannot open the journal {self.path}"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JournalError(f"{failure}: {exc}") from None
        ours, theirs = socket.socketpair()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "fksroute.journal_writer", str(self.path.absolute()), str(self.busy_timeout),
                 str(theirs.fileno())], pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        except OSError as exc:
            ours.close()
            raise JournalError(f"{failure}: the writer cannot start: {exc}") from None
        finally:
            theirs.close()
        ours.settimeout(READY_WITHIN)
        try:
            first = self._read_one(ours)
        except OSError as exc:
            first = ("error", f"{failure}: the writer did not start ({type(exc).__name__})")
        if first is None or first[0] != "ready":
            ours.close()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            raise JournalError(first[1] if first else f"{failure}: the writer exited ({process.returncode})")
        ours.setblocking(False)
        self._sock, self._process, self.settings = ours, process, tuple(first[1])
        self._closed, self._lost = False, None

    def _read_one(self, sock: socket.socket) -> Any:
        """One frame, waiting for it (before the loop reads the socket); None at the end."""
        while True:
            data = sock.recv(RECV_SIZE)
            if not data:
                return None
            for value in self._frames.feed(data):
                return value

    def close(self) -> None:
        """Send what is queued, let the writer commit it and checkpoint, and wait for it to end.
        Call it on the loop reading the journal, or where no loop reads it any more."""
        if self._closed:
            return
        self._closed = True  # from here on, writes are refused and no flush starts
        self._forget_loop()
        sock, process = self._sock, self._process
        assert sock is not None and process is not None
        if self._lost is None:
            try:
                sock.setblocking(True)
                sock.settimeout(STOP_WITHIN)
                sock.sendall(bytes(self._out) + self._encode(self._take_queued()))
                self._out.clear()
                sock.shutdown(socket.SHUT_WR)
                while (data := sock.recv(RECV_SIZE)):
                    for value in self._frames.feed(data):
                        self._answered(value)
            except OSError:
                pass
        sock.close()
        try:
            process.wait(STOP_WITHIN)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self._fail_waiting(JournalError("the journal is closed"))
        self._sock = None

    # --- sending ----------------------------------------------------------------------------

    def _submit(self, kind: str, a: Any, b: Any = None, wait: bool = True,
                convert: Callable[[Any], Any] | None = None,
                on_failure: Callable[[JournalError], Any] | None = None) -> asyncio.Future | None:
        """Queue an operation; the returned future resolves once its group is committed (fsynced).

        Without `wait` the write is best effort: dropped when the writer is far behind, so that a
        flood of refused requests cannot grow the queue without bound. With `on_failure` there is
        no future: the write is kept like any other, and only its failure is told, to that callable."""
        if self._closed:
            raise JournalError("the journal is closed")
        if self._lost is not None:
            raise JournalError(self._lost)
        if not wait and len(self._queued) + self._unanswered >= BEST_EFFORT_BACKLOG:
            self.dropped += 1
            return None
        op = (next(self._seq), kind, a, b)
        loop = self._loop  # the loop reading the answers, when this is its thread: asking costs a getpid
        if loop is None or self._loop_thread != threading.get_ident() or not loop.is_running():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no event loop here (a script): sent now, nobody waits for the answer
                if wait:
                    raise
                self._send_now([op])
                return None
        future = None
        if on_failure is not None:
            self._waiting[op[0]] = (None, on_failure)
        elif wait:
            future = loop.create_future()
            self._waiting[op[0]] = (future, convert)
        self._queued.append(op)
        if self._flush_on is not loop:
            self._flush_on = loop
            loop.call_soon(self._flush)
        return future

    def _take_queued(self) -> list[tuple]:
        ops, self._queued = self._queued, []
        return ops

    def _encode(self, ops: list[tuple]) -> bytes:
        """`ops` as one frame; an operation holding a value that cannot be stored fails alone."""
        if not ops:
            return b""
        try:
            data = frame(ops)
        except ValueError:
            storable = []
            for op in ops:
                try:
                    frame(op)
                    storable.append(op)
                except ValueError as exc:
                    self._settle(op[0], JournalError(f"journal: a value cannot be stored: {exc}"))
            ops = storable
            data = frame(ops) if ops else b""
        self._unanswered += len(ops)
        return data

    def _send_now(self, ops: list[tuple]) -> None:
        assert self._sock is not None
        self._sock.setblocking(True)
        try:
            self._sock.sendall(bytes(self._out) + self._encode(ops))
            self._out.clear()
        except OSError as exc:
            self._ended(f"the journal's writer cannot be reached: {exc}")
        finally:
            self._sock.setblocking(False)

    def _flush(self) -> None:
        """On the event loop: what queued goes to the writer as one frame, unless the writer is busy
        with a group (its answer sends what queued meanwhile: one frame, and one wake-up, a group)."""
        loop, self._flush_on = self._flush_on, None
        if self._closed or self._lost is not None or not self._queued:
            return
        assert loop is not None
        self._listen(loop)
        self._send_queued()

    def _send_queued(self) -> None:
        """What queued goes out as one frame, once the writer has answered every group before it."""
        if self._unanswered == 0 and self._queued and not self._closed and self._lost is None:
            self._out += self._encode(self._take_queued())
            self._pump()

    def _pump(self) -> None:
        """Hand the socket what it takes now; the rest when it can take more."""
        sock, loop = self._sock, self._loop
        assert sock is not None and loop is not None
        while self._out:
            try:
                sent = sock.send(self._out)
            except BlockingIOError:
                if not self._writing:
                    loop.add_writer(sock.fileno(), self._pump)
                    self._writing = True
                return
            except OSError as exc:
                self._ended(f"the journal's writer cannot be reached: {exc}")
                return
            del self._out[:sent]
        if self._writing:
            loop.remove_writer(sock.fileno())
            self._writing = False

    # --- answers ----------------------------------------------------------------------------

    def _listen(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the writer's answers on `loop` (tests run one loop after another)."""
        if self._loop is loop:
            return
        self._forget_loop()
        assert self._sock is not None
        loop.add_reader(self._sock.fileno(), self._readable)
        self._loop, self._loop_thread = loop, threading.get_ident()

    def _forget_loop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed() and self._sock is not None:
            loop.remove_reader(self._sock.fileno())
            if self._writing:
                loop.remove_writer(self._sock.fileno())
        self._writing = False

    def _readable(self) -> None:
        assert self._sock is not None
        try:
            data = self._sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._ended("the journal's writer stopped")
            return
        for value in self._frames.feed(data):
            self._answered(value)
        self._send_queued()

    def _answered(self, group: tuple) -> None:
        committed, error, outcomes = group
        if committed:
            self.commits += 1
            self.healthy, self.last_error = True, None
        else:
            self.healthy, self.last_error = False, error
        self._unanswered -= len(outcomes)
        for seq, code, value in outcomes:
            if code == OK:
                self.writes += 1
                self._settle(seq, value, ok=True)
            else:
                self._settle(seq, (JournalConflict if code == CONFLICT else JournalError)(value))

    def _settle(self, seq: int, value: Any, ok: bool = False) -> None:
        waiter = self._waiting.pop(seq, None)
        if waiter is None:
            return
        future, convert = waiter
        if future is None:  # written with on_failure: only a failure is told
            if not ok:
                convert(value)
            return
        if future.done():
            return
        if ok and convert is not None:
            try:
                value = convert(value)
            except Exception as exc:  # rows this side cannot read: that read fails, the others go on
                value, ok = JournalError(f"journal: unreadable answer: {type(exc).__name__}: {exc}"), False
        try:
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        except RuntimeError:  # its loop is closed: nobody waits any more
            pass

    def _fail_waiting(self, error: JournalError) -> None:
        for seq in list(self._waiting):
            self._settle(seq, error)

    def _ended(self, why: str) -> None:
        """The writer is gone while the journal is open: nothing more can be journaled."""
        if self._lost is not None or self._closed:
            return
        code = self._process.poll() if self._process is not None else None
        self._lost = f"{why} (exit code {code})" if code is not None else why
        self.healthy, self.last_error = False, self._lost
        self._forget_loop()
        self._queued.clear()
        self._fail_waiting(JournalError(self._lost))
        log.error("journal: %s; writes since its last answer may or may not be on disk", self._lost)
        if self.on_lost is not None:
            self.on_lost(self._lost)

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
                     jsontext.text(reply) if reply is not None else None, config_version)
        order_rows = [(coid, alert_id, i, route, plugin, jsontext.text(request) if request is not None else None,
                       state, status, jsontext.text({"reason": reason}) if reason else None, now, now)
                      for i, (coid, route, plugin, request, state, status, reason) in enumerate(orders)]
        return self._submit("alert", alert_row, order_rows, wait)

    def mark_sent(self, client_order_id: str) -> asyncio.Future:
        future = self._submit("sent", (SENT, time.time(), client_order_id))
        assert future is not None
        return future

    def record_result(self, client_order_id: str, result: OrderResult,
                      on_failure: Callable[[JournalError], Any] | None = None) -> asyncio.Future | None:
        """The order's result; with `on_failure`, no future: that callable hears of a failure only."""
        row = (client_order_id, OPEN if result.status == "placed" else DONE, result.status, result.order_id,
               result.error, result.filled_quantity, result.average_price, jsontext.text(dict(result.detail)), time.time())
        future = self._submit("result", row, on_failure=on_failure)
        assert future is not None or on_failure is not None
        return future

    # --- reads (by the writer, in line with the writes: they see every write sent before them) -----

    def _read(self, name: str, args: tuple = (), convert: Callable[[Any], Any] | None = None) -> asyncio.Future:
        future = self._submit(name, args, None, True, convert)
        assert future is not None
        return future

    def unfinished(self) -> asyncio.Future:
        """Orders journaled but not final, in arrival order: pending, sent and open."""
        return self._read("unfinished", (), lambda rows: [
            OrderRow(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]) if r[5] else None, r[6], r[7]) for r in rows])

    def dedup_entries(self, since: float) -> asyncio.Future:
        """(dedup_key, alert id, received_at, HTTP status, reply) of accepted alerts since `since`."""
        return self._read("dedup_entries", (since,), lambda rows: [
            (r[0], r[1], r[2], r[3], json.loads(r[4]) if r[4] else None) for r in rows])

    def order_results(self, alert_id: str) -> asyncio.Future:
        return self._read("order_results", (alert_id,), lambda rows: [_order_dict(r) for r in rows])

    def count_unknown(self) -> asyncio.Future:
        return self._read("count_unknown")


def _order_dict(row: tuple) -> dict[str, Any]:
    keys = ("client_order_id", "alert_id", "route", "plugin", "order", "state", "status", "order_id", "error",
            "filled_quantity", "average_price", "detail", "updated_at")
    out = dict(zip(keys, row))
    for key in ("order", "detail"):
        out[key] = json.loads(out[key]) if out[key] else None
    return out


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
                ORDER_SELECT + " WHERE alert_id = ? ORDER BY position", (row[0],))]
            out.append(entry)
        return out
    finally:
        conn.close()
