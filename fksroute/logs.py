"""The daemon's log: lines to stderr (journald under systemd), secrets redacted, never making
the event loop wait on stderr, nor on a thread that wants the GIL while the loop is busy.

On the event loop's thread (once `attach`ed), records are kept in a list and formatted there
every WRITE_EVERY, and the text goes straight to stderr where that cannot block: a regular file
or /dev/null, or a socket (journald's stream) taking what it can at once. Anything else (a pipe,
a terminal, the rest of a full socket) and the records of other threads go to a writer thread.
A second thread formatting under load took the GIL from the loop a few hundred times a second
(bench/: writing on the loop answered up to 7% more alerts in paired rounds).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import logging.handlers
import os
import queue
import socket
import stat
import sys
import threading
import time
from typing import Callable, TextIO

# Lines are written at most this often: those logged meanwhile go out in one write.
WRITE_EVERY = 0.01
STOP_WITHIN = 5.0  # at exit, how long the lines still queued may take to be written

FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
_SETTLED = (str, int, float, bool, type(None))
_STOP = object()


class Redactor(logging.Filter):
    """Replaces the table's secret values in every log record, whatever logged them."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: frozenset[str] = frozenset()

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            if secret and secret in text:
                text = text.replace(secret, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            cleaned = self(message)
            if cleaned != message:
                record.msg, record.args = cleaned, None
            if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = self(record.exc_text)
        return True


REDACTOR = Redactor()


class Handoff(logging.handlers.QueueHandler):
    """Hands the record itself to the writer, so that the caller pays only for making it.
    Arguments that could still change (anything but strings, numbers and None) are merged into
    the message now, and a traceback is rendered now, while its frames are as they were."""

    def __init__(self, writer: "Writer") -> None:
        super().__init__(writer.records)
        self.writer = writer

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        args = record.args
        if args and not (isinstance(args, tuple) and all(isinstance(a, _SETTLED) for a in args)):
            record.msg, record.args = record.getMessage(), None
        if record.exc_info:
            record.exc_text = FORMAT.formatException(record.exc_info)
            record.exc_info = None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        self.writer.put(record)


Line = logging.LogRecord | tuple[float, str, str, str]  # a record, or a line said plainly (say)


class _Text(str):
    """Lines formatted already (on the event loop), for the thread to write as they are."""


class _Rest(bytes):
    """What a socket did not take at once of the loop's lines, for the thread to write."""


class Sink:
    """Writes bytes to a descriptor without ever blocking: `write` returns how many it took."""

    def __init__(self, fd: int, sock: socket.socket | None = None) -> None:
        self.fd, self.sock = fd, sock

    def write(self, data: bytes) -> int:
        if self.sock is None:
            return os.write(self.fd, data)  # a regular file, or /dev/null: never waits for a reader
        try:
            return self.sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


def direct_sink(stream: TextIO) -> Sink | None:
    """A way to write to `stream`'s descriptor that cannot block, or None where only a thread may
    write: a pipe or a terminal can stop taking bytes at any time."""
    try:
        fd = stream.fileno()
        mode = os.fstat(fd).st_mode
    except (AttributeError, OSError, ValueError):  # a stream without a descriptor (a test's capture)
        return None
    if stat.S_ISREG(mode) or (stat.S_ISCHR(mode) and not os.isatty(fd)):
        return Sink(fd)
    if stat.S_ISSOCK(mode):  # journald's stream: a copy of the descriptor, sent to without waiting
        try:
            return Sink(fd, socket.socket(fileno=os.dup(fd)))
        except OSError:
            return None
    return None


class Writer:
    """Formats, redacts and writes the log's lines, a batch at a time: on the event loop it is
    attached to, for what is logged there; on its thread for the rest (see the module's text)."""

    def __init__(self, stream: TextIO) -> None:
        self.records: queue.SimpleQueue = queue.SimpleQueue()  # for the thread: records, _Text and _Rest
        self.stream = stream
        self._second: tuple[int, str] = (-1, "")  # the last whole second formatted, and its text
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._batch: list = []  # what the loop's thread logged since the last write
        self._timer: asyncio.TimerHandle | None = None
        self._sink = direct_sink(stream)
        # Texts handed to the thread, and written by it: while it is behind, the loop's lines
        # queue behind them, in order. Each count is changed by one thread only.
        self._handed = 0
        self._written = 0
        self._thread = threading.Thread(target=self._run, name="fksroute-log", daemon=True)
        self._thread.start()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """From now on, what is logged on `loop`'s thread (call this there) is written by `loop`."""
        self._loop, self._loop_thread = loop, threading.get_ident()

    def detach(self) -> None:
        """Write what the loop holds, and hand its thread's lines to the writer thread again."""
        if self._timer is not None:
            self._timer.cancel()
        self._loop = self._loop_thread = self._timer = None
        self.flush()

    def put(self, record: Line) -> None:
        if self._loop_thread is not None and threading.get_ident() == self._loop_thread:
            self._batch.append(record)
            if self._timer is None:
                assert self._loop is not None
                try:
                    self._timer = self._loop.call_later(WRITE_EVERY, self.flush)
                except RuntimeError:  # the loop is closed, and was not detached: the thread writes
                    self.detach()
        else:
            self.records.put(record)

    def flush(self) -> None:
        """On the loop's thread (or once no loop writes): the lines it logged, formatted and written
        (or handed on) now."""
        self._timer = None
        batch, self._batch = self._batch, []
        text = self.format(batch)
        if not text:
            return
        sink = self._sink
        if sink is not None and self._handed == self._written:
            data = text.encode("utf-8", "backslashreplace")
            try:
                taken = sink.write(data)
            except OSError:  # stderr is gone (closed, broken pipe): nowhere left to say so
                return
            if taken == len(data):
                return
            self._hand(_Rest(data[taken:]))
            return
        self._hand(_Text(text))

    def _hand(self, text: _Text | _Rest) -> None:
        self._handed += 1
        self.records.put(text)

    def stop(self) -> None:
        """Write what is queued, then end the thread."""
        self.flush()  # what the loop's thread logged since its last write (no loop runs it now)
        if self._thread.is_alive():
            self.records.put(_STOP)
            self._thread.join(STOP_WITHIN)
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    def _run(self) -> None:
        while True:
            first = self.records.get()
            if first is not _STOP and type(first) not in (_Text, _Rest):
                time.sleep(WRITE_EVERY)  # records of other threads: gather a batch
            batch = [first]
            while True:
                try:
                    batch.append(self.records.get_nowait())
                except queue.Empty:
                    break
            records: list = []
            for item in batch:
                if item is _STOP or type(item) in (_Text, _Rest):
                    self.write(records)
                    records = []
                    if item is _STOP:
                        return
                    self._out(item) if type(item) is _Text else self._out_bytes(item)
                    self._written += 1
                else:
                    records.append(item)
            self.write(records)

    def write(self, records: list) -> None:
        """On the thread: `records` formatted and written."""
        self._out(self.format(records))

    def format(self, records: list) -> str:
        """The lines of `records`, redacted, each ending in a newline ("" for none)."""
        lines = []
        for record in records:
            try:
                if type(record) is tuple:  # a line said plainly (see say): formatted as FORMAT would
                    created, level, name, text = record
                    lines.append(f"{self._asctime(created)} {level} {name}: "
                                 f"{REDACTOR(text) if REDACTOR.secrets else text}")
                elif REDACTOR.filter(record):
                    lines.append(FORMAT.format(record))
            except Exception:  # one bad record (its arguments do not fit its format) loses only itself
                what = (f"{record[1]} {record[2]}: a log line could not be formatted: {record[3]!r}"
                        if type(record) is tuple else f"{record.levelname} {record.name}: a log line could not "
                                                      f"be formatted: {record.msg!r} % {record.args!r}")
                lines.append(REDACTOR(what))
        return "\n".join(lines) + "\n" if lines else ""

    def _out(self, text: str) -> None:
        if not text:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # stderr is gone (closed, broken pipe): nowhere left to say so
            pass

    def _out_bytes(self, data: bytes) -> None:
        try:
            self.stream.flush()
            fd = self.stream.fileno()
            while data:
                data = data[os.write(fd, data):]
        except (OSError, ValueError):
            pass

    def _asctime(self, created: float) -> str:
        """FORMAT's asctime (logging's default: local time, then milliseconds after a comma)."""
        second = int(created)
        if second != self._second[0]:
            self._second = (second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second)))
        return f"{self._second[1]},{int((created - second) * 1000):03d}"


_writer: Writer | None = None


def say(logger: logging.Logger, level: int, text: str) -> None:
    """Log `text` as it is, for the lines written once per order: no LogRecord is made, and the
    writer timestamps, redacts and formats it like any record. Without the writer (a test, a
    script) it goes the standard way."""
    if not logger.isEnabledFor(level):
        return
    root = logging.root.handlers
    if _writer is not None and len(root) == 1 and isinstance(root[0], Handoff) and not logger.handlers:
        _writer.put((time.time(), logging.getLevelName(level), logger.name, text))
    else:  # another handler listens too (a test's capture): it gets a real record
        logger.log(level, "%s", text)


def attach_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Let the daemon's event loop (call this on it) write what is logged on its thread."""
    if _writer is not None:
        _writer.attach(loop)


def detach_loop() -> None:
    """Before the daemon's event loop ends: what it holds is written, and the thread writes again."""
    if _writer is not None:
        _writer.detach()


def stop_logging() -> None:
    """Write what is queued now (before the process ends without its exit handlers)."""
    if _writer is not None:
        _writer.stop()


def setup_logging(level: str = "INFO") -> None:
    """Route every logger's records through the writer thread, at `level`."""
    global _writer
    if _writer is not None:
        _writer.stop()
    _writer = Writer(sys.stderr)
    atexit.register(_writer.stop)  # what is queued is written before the process ends
    root = logging.getLogger()
    root.handlers[:] = [Handoff(_writer)]
    root.setLevel(level)
    # The format shows none of these, and each costs time on every line (the Logging HOWTO's
    # "Optimization" section): the caller's file and line, the thread, the process.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
