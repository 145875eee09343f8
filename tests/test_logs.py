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
    logger.addHandler(Handoff(writer.records))

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
    logger.addHandler(Handoff(writer.records))
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
    root.handlers[:] = [Handoff(writer.records)]
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
