"""The daemon's log writer: every line written in order, formatted and redacted off the caller's thread."""

import io
import logging

import pytest

from fksroute.logs import REDACTOR, Handoff, Writer


@pytest.fixture
def logged():
    """A logger whose records go through a real Writer thread into a string; read after stop()."""
    stream = io.StringIO()
    writer = Writer(stream)
    logger = logging.Logger("under-test")  # outside the logger tree: pytest's capture never sees it
    logger.addHandler(Handoff(writer))

    def lines():
        writer.stop()
        return stream.getvalue().splitlines()

    yield logger, lines
    writer.stop()


@pytest.fixture
def secret():
    before = REDACTOR.secrets
    REDACTOR.secrets = frozenset({"s3cret-key-for-tests"})
    yield "s3cret-key-for-tests"
    REDACTOR.secrets = before


def test_every_line_is_written_in_order_with_its_level_and_logger(logged):
    logger, lines = logged
    for i in range(500):
        logger.info("line %d of %s", i, "many")
    written = lines()
    assert len(written) == 500
    assert written[0].endswith(f"INFO {logger.name}: line 0 of many")
    assert [w.rsplit(": ", 1)[1] for w in written] == [f"line {i} of many" for i in range(500)]


def test_an_argument_that_changes_later_is_written_as_it_was(logged):
    logger, lines = logged
    routes = ["a"]
    logger.info("routes %s", routes)
    routes.append("b")
    assert lines()[0].endswith("routes ['a']")


def test_secrets_are_redacted_in_messages_and_tracebacks(logged, secret):
    logger, lines = logged
    logger.warning("key %s in the message", secret)
    try:
        raise ValueError(f"the exchange refused {secret}")
    except ValueError:
        logger.exception("order failed")
    text = "\n".join(lines())
    assert secret not in text
    assert "key *** in the message" in text
    assert "Traceback" in text and "ValueError: the exchange refused ***" in text


def test_a_record_that_cannot_be_formatted_loses_only_itself(logged, secret):
    logger, lines = logged
    logger.info("before")
    logger.info("a number %d", "not a number " + secret)
    logger.info("after")
    written = lines()
    assert written[0].endswith("before") and written[2].endswith("after")
    assert "a log line could not be formatted" in written[1] and "a number %d" in written[1]
    assert secret not in written[1]


def test_a_line_said_plainly_that_cannot_be_formatted_loses_only_itself(secret):
    import time as clock

    stream = io.StringIO()
    writer = Writer(stream)
    try:
        writer.write([(clock.time(), "INFO", "fksroute.said", "before"),
                      ("not a time", "INFO", "fksroute.said", f"with {secret}"),
                      (clock.time(), "INFO", "fksroute.said", "after")])
    finally:
        writer.stop()
    written = stream.getvalue().splitlines()
    assert written[0].endswith("before") and written[2].endswith("after")
    assert "fksroute.said: a log line could not be formatted" in written[1] and secret not in written[1]


def test_a_stream_that_is_gone_does_not_stop_the_writer():
    class Gone(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    writer = Writer(Gone())
    logger = logging.Logger("under-test")
    logger.addHandler(Handoff(writer))
    logger.error("nobody reads this")
    writer.stop()
    assert not writer._thread.is_alive()


def test_a_line_said_plainly_is_written_as_a_record_would_be(secret):
    import time as clock
    from fksroute import logs

    stream = io.StringIO()
    writer = Writer(stream)
    root = logging.getLogger()
    saved_handlers, saved_writer, saved_level = root.handlers[:], logs._writer, root.level
    root.handlers[:] = [Handoff(writer)]
    root.setLevel(logging.INFO)
    logs._writer = writer
    try:
        logger = logging.getLogger("fksroute.said")
        logs.say(logger, logging.INFO, f"order filled with {secret}")
        logs.say(logger, logging.DEBUG, "below the level: not written")
        logger.info("a record %s", "after it")
    finally:
        writer.stop()
        root.handlers[:], logs._writer = saved_handlers, saved_writer
        root.setLevel(saved_level)
    said, recorded = stream.getvalue().splitlines()
    assert said.endswith("INFO fksroute.said: order filled with ***") and secret not in said
    assert recorded.endswith("INFO fksroute.said: a record after it")
    # The same timestamp format as the records': "YYYY-MM-DD HH:MM:SS,mmm".
    stamp = said.split(" INFO ")[0]
    assert len(stamp) == len(recorded.split(" INFO ")[0]) == 23 and stamp[19] == ","
    assert abs(clock.mktime(clock.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S")) - clock.time()) < 5


def test_a_line_said_while_another_handler_listens_reaches_it_as_a_record(caplog):
    from fksroute import logs

    with caplog.at_level(logging.INFO):
        logs.say(logging.getLogger("fksroute.said"), logging.INFO, "seen by the capture")
    assert "seen by the capture" in caplog.text


# --- on the event loop ---------------------------------------------------------------------------

def said(i: int, secret: str = "") -> tuple:
    import time as clock

    return (clock.time(), "INFO", "fksroute.said", f"line {i} {secret}".rstrip())


def numbers(text: str) -> list[int]:
    return [int(line.split("line ")[1].split()[0]) for line in text.splitlines()]


def test_lines_logged_on_an_attached_loop_are_written_by_the_loop_to_a_file(tmp_path, secret):
    import asyncio

    path = tmp_path / "stderr"
    with open(path, "w") as stream:
        writer = Writer(stream)
        logger = logging.Logger("under-test")
        logger.addHandler(Handoff(writer))

        async def run():
            writer.attach(asyncio.get_running_loop())
            for i in range(300):
                if i % 3:
                    writer.put(said(i, secret))
                else:
                    logger.info("line %d %s", i, secret)
                if i % 50 == 0:
                    await asyncio.sleep(0.02)  # the loop's timer writes what was logged so far
            writer.detach()

        asyncio.run(run())
        writer.stop()
    text = path.read_text()
    assert numbers(text) == list(range(300))
    assert secret not in text and text.count("***") == 300
    assert writer._handed == 0, "the thread wrote some of the loop's lines"


def test_what_a_full_socket_does_not_take_the_thread_writes_in_order(secret):
    import asyncio
    import socket
    import threading

    daemon_end, journald = socket.socketpair()
    daemon_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    stream = daemon_end.makefile("w")
    writer = Writer(stream)
    received = bytearray()

    def read():
        while chunk := journald.recv(65536):
            received.extend(chunk)

    reader = threading.Thread(target=read)

    async def run():
        writer.attach(asyncio.get_running_loop())
        for i in range(3000):
            writer.put(said(i, secret))
            if i == 1000:  # far more than the socket holds while nobody reads: the rest went to the thread
                await asyncio.sleep(0.02)
                assert writer._handed > 0
                reader.start()  # journald reads again, while the thread still has lines to write
            if i % 100 == 0:
                await asyncio.sleep(0.005)
        writer.detach()

    asyncio.run(run())  # never blocked by the full socket
    writer.stop()
    stream.close()
    daemon_end.close()
    reader.join(5)
    text = received.decode()
    assert numbers(text) == list(range(3000))
    assert secret not in text


def test_a_pipe_is_written_by_the_thread_only(tmp_path):
    import asyncio
    import os

    from fksroute.logs import direct_sink

    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    assert direct_sink(stream) is None  # a pipe (or a terminal) may stop taking bytes at any time
    with open(tmp_path / "file", "w") as file, open(os.devnull, "w") as null:
        assert direct_sink(file) is not None and direct_sink(null) is not None
    assert direct_sink(io.StringIO()) is None
    writer = Writer(stream)

    async def run():
        writer.attach(asyncio.get_running_loop())
        for i in range(100):
            writer.put(said(i))
        await asyncio.sleep(0.05)
        writer.detach()

    asyncio.run(run())
    writer.stop()
    stream.close()
    with os.fdopen(read_end) as reader:
        assert numbers(reader.read()) == list(range(100))


def test_lines_of_other_threads_and_after_the_loop_closed_are_still_written(tmp_path):
    import asyncio
    import threading

    path = tmp_path / "stderr"
    with open(path, "w") as stream:
        writer = Writer(stream)

        async def run():
            writer.attach(asyncio.get_running_loop())
            writer.put(said(0))
            worker = threading.Thread(target=writer.put, args=(said(1),))  # not the loop's thread
            worker.start()
            worker.join()
            await asyncio.sleep(0.05)

        asyncio.run(run())  # ends without detach: the loop is closed
        writer.put(said(2))  # on the loop's thread, whose loop is gone: written all the same
        writer.stop()
    assert sorted(numbers(path.read_text())) == [0, 1, 2]


def test_while_the_thread_is_behind_the_loop_queues_its_lines_behind_it():
    import asyncio
    import os
    import threading

    read_end, write_end = os.pipe()  # holds 64 KB: the thread blocks on what is past it
    stream = os.fdopen(write_end, "w")
    writer = Writer(stream)

    class Socketlike:  # full at first, then taking everything: as a socket that journald drains
        def __init__(self):
            self.full, self.taken = True, []

        def write(self, data):
            if self.full:
                return 0
            self.taken.append(data)
            return len(data)

        def close(self):
            pass

    sink = writer._sink = Socketlike()

    async def run():
        writer.attach(asyncio.get_running_loop())
        for i in range(3000):  # about 90 KB: the thread writes the pipe full and waits
            writer.put(said(i))
        writer.flush()
        sink.full = False
        await asyncio.sleep(0.05)
        writer.put(said(3000))
        writer.flush()
        assert sink.taken == [], "a line went out ahead of the lines the thread still holds"
        writer.detach()

    asyncio.run(run())
    received = []
    reader = threading.Thread(target=lambda: received.append(os.read(read_end, 1 << 20) + b"".join(
        iter(lambda: os.read(read_end, 1 << 20), b""))))
    reader.start()
    writer.stop()
    stream.close()
    reader.join(5)
    os.close(read_end)
    assert numbers(received[0].decode()) == list(range(3001))
