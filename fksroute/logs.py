"""The daemon's log: lines to stderr (journald under systemd), secrets redacted, written by a
thread so that the event loop never waits on stderr, a format or the GIL of a busy writer."""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import sys
import threading
import time
from typing import TextIO

# The writer wakes at most this often: the lines logged meanwhile go out in one write. Waking
# once a line would take the GIL from the event loop thousands of times a second under load.
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
    """Queues the record itself for the writer, so that the caller pays only for making it.
    Arguments that could still change (anything but strings, numbers and None) are merged into
    the message now, and a traceback is rendered now, while its frames are as they were."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        args = record.args
        if args and not (isinstance(args, tuple) and all(isinstance(a, _SETTLED) for a in args)):
            record.msg, record.args = record.getMessage(), None
        if record.exc_info:
            record.exc_text = FORMAT.formatException(record.exc_info)
            record.exc_info = None
        return record


class Writer:
    """The thread that formats, redacts and writes the queued records, a batch at a time."""

    def __init__(self, stream: TextIO) -> None:
        self.records: queue.SimpleQueue = queue.SimpleQueue()
        self.stream = stream
        self._second: tuple[int, str] = (-1, "")  # the last whole second formatted, and its text
        self._thread = threading.Thread(target=self._run, name="fksroute-log", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Write what is queued, then end the thread."""
        if self._thread.is_alive():
            self.records.put(_STOP)
            self._thread.join(STOP_WITHIN)

    def _run(self) -> None:
        while True:
            first = self.records.get()
            if first is not _STOP:
                time.sleep(WRITE_EVERY)
            batch = [first]
            while True:
                try:
                    batch.append(self.records.get_nowait())
                except queue.Empty:
                    break
            self.write([r for r in batch if r is not _STOP])
            if any(r is _STOP for r in batch):
                return

    def write(self, records: list[logging.LogRecord | tuple[float, str, str, str]]) -> None:
        lines = []
        for record in records:
            try:
                if type(record) is tuple:  # a line said plainly (see say): formatted as FORMAT would
                    created, level, name, text = record
                    lines.append(f"{self._asctime(created)} {level} {name}: {REDACTOR(text)}")
                elif REDACTOR.filter(record):
                    lines.append(FORMAT.format(record))
            except Exception:  # one bad record (its arguments do not fit its format) loses only itself
                what = (f"{record[1]} {record[2]}: a log line could not be formatted: {record[3]!r}"
                        if type(record) is tuple else f"{record.levelname} {record.name}: a log line could not "
                                                      f"be formatted: {record.msg!r} % {record.args!r}")
                lines.append(REDACTOR(what))
        if not lines:
            return
        try:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # stderr is gone (closed, broken pipe): nowhere left to say so
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
        _writer.records.put((time.time(), logging.getLevelName(level), logger.name, text))
    else:  # another handler listens too (a test's capture): it gets a real record
        logger.log(level, "%s", text)


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
    root.handlers[:] = [Handoff(_writer.records)]
    root.setLevel(level)
    # The format shows none of these, and each costs time on every line (the Logging HOWTO's
    # "Optimization" section): the caller's file and line, the thread, the process.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
