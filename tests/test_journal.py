"""The journal: SQLite (WAL, synchronous=FULL) written by a process of its own in group commits;
an alert is on disk before it is answered, and when the disk refuses, the alert is refused (503)."""

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fksroute import journal as journal_module
from fksroute.journal import DONE, OPEN, PENDING, SENT, Journal, JournalConflict, JournalError, read_recent
from fksroute.plugins.base import OrderResult
from serving import metric, read_ledger, write_routes

ALERT = {"symbol": "BTC/USDT", "action": "buy", "order_type": "market", "quantity": 0.01}


@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path / "journal.sqlite", busy_timeout=0.3)
    j.open()
    yield j
    j.close()


def record(journal, alert_id, orders=(), **kwargs):
    """record_alert with defaults; each order is (client_order_id, state)."""
    rows = [(coid, "r", "paper", {"symbol": "X", "side": "buy"}, state, None, None) for coid, state in orders]
    return journal.record_alert(alert_id, source="127.0.0.1", body="{}", outcome=kwargs.pop("outcome", "accepted"),
                                orders=rows, **kwargs)


def written(make):
    """Run `make()` (a journal write) in an event loop and wait for its commit."""
    async def main():
        return await make()

    return asyncio.run(main())


def test_the_file_is_wal_with_synchronous_full(journal, tmp_path):
    assert journal.settings == ("wal", 2)     # the writer's own connection; 2 = FULL: every commit is fsynced
    other = sqlite3.connect(tmp_path / "journal.sqlite")
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"   # the file's mode, for every reader
    other.close()
    assert journal.writer_pid != os.getpid()                               # a process of its own


def test_concurrent_alerts_share_commits(journal, tmp_path):
    async def concurrent():
        before = journal.commits
        await asyncio.gather(*(record(journal, f"c{i}", [(f"o{i}", PENDING)]) for i in range(50)))
        return journal.commits - before

    async def one_by_one():
        before = journal.commits
        for i in range(5):
            await record(journal, f"s{i}", [(f"p{i}", PENDING)])
        return journal.commits - before

    assert asyncio.run(concurrent()) <= 5          # 50 alerts, a handful of fsyncs
    assert asyncio.run(one_by_one()) == 5          # the counter counts: one commit each when nothing overlaps
    assert journal.writes == 55
    journal.close()
    assert len(read_recent(tmp_path / "journal.sqlite", limit=100)) == 55


def test_a_locked_file_fails_the_write_and_the_journal_recovers(journal, tmp_path):
    other = sqlite3.connect(tmp_path / "journal.sqlite", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")

    async def main():
        started = time.monotonic()
        with pytest.raises(JournalError, match="cannot write: database is locked"):
            await record(journal, "a1", [("o1", PENDING)])
        return time.monotonic() - started

    assert 0.25 <= asyncio.run(main()) < 5         # it waited for the busy timeout, then gave up
    assert not journal.healthy and "locked" in journal.last_error
    other.execute("ROLLBACK")
    other.close()
    written(lambda: record(journal, "a1", [("o1", PENDING)]))
    assert journal.healthy and journal.last_error is None


def test_one_bad_write_fails_alone_and_the_writer_lives_on(journal):
    async def main():
        results = await asyncio.gather(record(journal, "same", [("o1", PENDING)]),
                                       record(journal, "same", [("o2", PENDING)]),     # the id again
                                       record(journal, "other", [("o1", PENDING)]),    # the order id again
                                       journal.order_results(["not", "an", "id"]),     # a value SQLite refuses
                                       record(journal, "fine", [("o3", PENDING)]),
                                       return_exceptions=True)
        return results, await journal.order_results("fine")

    results, fine = asyncio.run(main())
    assert results[0] is None and results[4] is None
    assert isinstance(results[1], JournalConflict) and isinstance(results[2], JournalConflict)
    assert isinstance(results[3], JournalError) and not isinstance(results[3], JournalConflict)
    assert "journal:" in str(results[3])
    assert [o["client_order_id"] for o in fine] == ["o3"]
    assert journal.healthy


def test_refused_requests_are_recorded_best_effort_when_the_writer_is_behind(journal, tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "BEST_EFFORT_BACKLOG", 3)
    other = sqlite3.connect(tmp_path / "journal.sqlite", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN EXCLUSIVE")     # the writer waits for it (within its busy timeout): it is behind
    threading.Timer(0.15, lambda: (other.execute("ROLLBACK"), other.close())).start()

    async def main():
        slow = record(journal, "first", [("o1", PENDING)])
        await asyncio.sleep(0.05)        # sent: the writer is waiting for the lock
        for i in range(10):
            assert record(journal, f"r{i}", outcome="rejected", reason="rate", wait=False) is None
        await slow

    asyncio.run(main())
    assert journal.dropped >= 7
    journal.close()
    assert len(read_recent(tmp_path / "journal.sqlite", limit=100)) == 11 - journal.dropped


def test_close_writes_what_is_queued_and_a_closed_journal_refuses(tmp_path):
    j = Journal(tmp_path / "journal.sqlite")
    j.open()
    for i in range(20):
        record(j, f"q{i}", outcome="rejected", wait=False)
    j.close()
    assert len(read_recent(tmp_path / "journal.sqlite", limit=100)) == 20
    with pytest.raises(JournalError, match="closed"):
        record(j, "late", wait=False)


def test_an_unwritable_place_is_refused_at_open(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(JournalError, match="cannot open the journal"):
        Journal(tmp_path / "file" / "journal.sqlite").open()


def test_serve_stops_with_a_message_when_the_journal_cannot_open(tmp_path):
    (tmp_path / "blocker").write_text("")
    routes = write_routes(tmp_path, """
        version: 1
        server: {journal: blocker/journal.sqlite}
        plugins: {paper: {type: paper}}
        routes: [{name: all, to: paper}]
    """)
    served = subprocess.run([sys.executable, "-m", "fksroute", "serve", "-c", str(routes), "--port", "0"],
                            capture_output=True, text=True, timeout=30)
    assert served.returncode != 0
    assert f"cannot open the journal {tmp_path / 'blocker' / 'journal.sqlite'}" in served.stderr


def test_order_states_from_pending_to_done(journal):
    async def states():
        return {r.client_order_id: r.state for r in await journal.unfinished()}

    async def main():
        await record(journal, "a1", [("o1", PENDING), ("o2", DONE)])
        seen = [await states()]
        await journal.mark_sent("o1")
        seen.append(await states())
        await journal.record_result("o1", OrderResult("placed", "v-1"))
        seen.append(await states())
        await journal.record_result("o1", OrderResult("filled", "v-1", filled_quantity=1.0, average_price=10.0,
                                                      detail={"at": object()}))   # detail need not be JSON
        seen.append(await states())
        return seen, await journal.order_results("a1")

    seen, orders = asyncio.run(main())
    assert seen == [{"o1": PENDING}, {"o1": SENT}, {"o1": OPEN}, {}]
    assert orders[0]["status"] == "filled" and orders[0]["filled_quantity"] == 1.0 and orders[0]["state"] == DONE


def test_dedup_entries_are_accepted_alerts_of_the_window(journal):
    async def main():
        await record(journal, "old", dedup_key="k0")
        since = time.time()
        await record(journal, "a1", dedup_key="k1")
        await record(journal, "d1", dedup_key="k1", outcome="duplicate", duplicate_of="a1")
        await record(journal, "r1", dedup_key="k2", outcome="rejected")
        await record(journal, "a2")
        return await journal.dedup_entries(since)

    assert [(key, alert_id) for key, alert_id, _, _, _ in asyncio.run(main())] == [("k1", "a1")]


def test_the_window_is_read_by_time_and_no_index_is_keyed_by_a_hash(tmp_path):
    path = tmp_path / "journal.sqlite"
    older = sqlite3.connect(path)  # a journal from before: its dedup index was keyed by the body's hash
    older.executescript(journal_module.SCHEMA.split("DROP INDEX")[0]
                        + "CREATE INDEX alerts_dedup ON alerts (dedup_key, received_at);")
    older.close()
    j = Journal(path)
    j.open()
    try:
        reader = sqlite3.connect(path)
        indexes = {r[0] for r in reader.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")}
        plan = " ".join(r[3] for r in reader.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM alerts WHERE received_at >= 0"))
        reader.close()
    finally:
        j.close()
    assert indexes == {"alerts_received", "orders_state", "orders_alert"}
    assert "alerts_received" in plan


# --- end to end: a journal that cannot write --------------------------------------------------

@pytest.mark.parametrize("ack", ["sync", "async"])
def test_a_journal_that_cannot_write_answers_503_and_executes_nothing(tmp_path, daemon_factory, ack):
    daemon = daemon_factory(write_routes(tmp_path, f"""
        version: 1
        defaults: {{ack: {ack}}}
        plugins: {{paper: {{type: paper, ledger: fills.jsonl}}}}
        routes: [{{name: all, to: paper}}]
    """))
    other = sqlite3.connect(tmp_path / "journal.sqlite", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")      # held past the daemon's busy timeout
    try:
        refused = daemon.post(json=ALERT)
        health = daemon.get("/health").json()
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
    assert refused.json()["success"] is False and "journal cannot write" in refused.json()["error"]
    assert health["status"] == "degraded" and health["journal"]["healthy"] is False
    assert "locked" in health["journal"]["error"]
    time.sleep(0.3)
    assert read_ledger(tmp_path / "fills.jsonl") == []

    # TradingView resends after a 5xx: the resend is a new alert, not a duplicate of the refused one.
    again = daemon.post(json=ALERT)
    assert again.status_code == (200 if ack == "sync" else 202) and again.json()["duplicate"] is False
    # Answered only once on disk: the journal holds it already.
    listed = read_recent(tmp_path / "journal.sqlite", alert_id=again.json()["alert_id"])
    assert listed[0]["outcome"] == "accepted" and listed[0]["orders"][0]["client_order_id"]
    deadline = time.monotonic() + 5
    while len(read_ledger(tmp_path / "fills.jsonl")) < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    fills = read_ledger(tmp_path / "fills.jsonl")
    assert [f["alert_id"] for f in fills] == [again.json()["alert_id"]]
    assert daemon.get("/health").json()["journal"]["healthy"] is True
    assert metric(daemon.get("/metrics").text, "fksroute_alerts_received_total", outcome="rejected_journal") == 1
    accepted = [e for e in read_recent(tmp_path / "journal.sqlite", limit=50) if e["outcome"] == "accepted"]
    assert len(accepted) == 1


# --- the writer process -----------------------------------------------------------------------

def writer_of(daemon) -> int:
    """The pid of the journal writer that `daemon` (a `fksroute serve`) started."""
    pid = daemon.proc.pid
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        if b"fksroute.journal_writer" in Path(f"/proc/{child}/cmdline").read_bytes():
            return int(child)
    raise AssertionError("no journal writer among the daemon's children")


PAPER_WITH_LEDGER = """
    version: 1
    plugins: {paper: {type: paper, ledger: fills.jsonl}}
    routes: [{name: all, to: paper}]
"""


def test_a_stop_signal_to_every_process_of_the_service_loses_nothing(tmp_path, daemon_factory):
    """systemd's default KillMode signals the whole control group: the writer must outlive its daemon's drain."""
    daemon = daemon_factory(write_routes(tmp_path, PAPER_WITH_LEDGER))
    answered = [daemon.post(json={**ALERT, "id": i}).json()["alert_id"] for i in range(5)]
    writer = writer_of(daemon)
    os.kill(writer, signal.SIGTERM)                  # ignored: it stops when the daemon's end closes
    assert daemon.stop() == 0
    deadline = time.monotonic() + 10
    while Path(f"/proc/{writer}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not Path(f"/proc/{writer}").exists()
    listed = {e["id"]: e for e in read_recent(tmp_path / "journal.sqlite", limit=50)}
    assert all(listed[a]["orders"][0]["status"] == "filled" for a in answered)
    assert not (tmp_path / "journal.sqlite-wal").exists() or (tmp_path / "journal.sqlite-wal").stat().st_size == 0


def test_a_daemon_whose_journal_writer_dies_stops_and_a_restart_resumes(tmp_path, daemon_factory):
    routes = write_routes(tmp_path, PAPER_WITH_LEDGER)
    daemon = daemon_factory(routes)
    first = daemon.post(json=ALERT).json()
    assert first["success"] is True
    os.kill(writer_of(daemon), signal.SIGKILL)
    assert daemon.proc.wait(10) == 75                 # EX_TEMPFAIL: systemd's Restart=on-failure starts it again
    assert "journal's writer stopped" in daemon.logs() and "a restart resumes what was in flight" in daemon.logs()
    again = daemon_factory(routes)
    resend = again.post(json=ALERT).json()            # TradingView's resend, after the restart
    assert resend["duplicate"] is True and resend["alert_id"] == first["alert_id"]
    assert [f["alert_id"] for f in read_ledger(tmp_path / "fills.jsonl")] == [first["alert_id"]]


def test_a_second_writer_on_one_journal_waits_for_the_first(tmp_path):
    first = Journal(tmp_path / "journal.sqlite")
    first.open()
    second = Journal(tmp_path / "journal.sqlite")
    opened = threading.Event()

    def open_second():
        second.open()
        opened.set()

    threading.Thread(target=open_second, daemon=True).start()
    assert not opened.wait(0.5)                       # the first writer holds the journal
    written(lambda: record(first, "a1", [("o1", PENDING)]))
    first.close()
    assert opened.wait(5)                             # and hands it over once it has finished
    assert [r.client_order_id for r in asyncio.run(second_unfinished(second))] == ["o1"]
    second.close()


async def second_unfinished(journal):
    return await journal.unfinished()


def test_a_value_the_writer_cannot_be_sent_fails_alone(journal):
    from decimal import Decimal

    async def main():
        await record(journal, "a1", [("o1", PENDING), ("o2", PENDING)])
        return await asyncio.gather(
            journal.record_result("o1", OrderResult("filled", "v1", filled_quantity=Decimal("1.5"))),
            journal.record_result("o2", OrderResult("filled", "v2", filled_quantity=1.5)),
            return_exceptions=True), await journal.order_results("a1")

    (bad, good), orders = asyncio.run(main())
    assert isinstance(bad, JournalError) and "cannot be stored" in str(bad)
    assert good is None
    assert [(o["client_order_id"], o["state"]) for o in orders] == [("o1", PENDING), ("o2", DONE)]
    assert journal.healthy


def test_a_result_written_without_a_future_tells_only_its_failure(journal):
    from decimal import Decimal

    async def main():
        failures = []
        await record(journal, "a1", [("o1", PENDING), ("o2", PENDING)])
        bad = journal.record_result("o1", OrderResult("filled", "v1", filled_quantity=Decimal("1.5")),
                                    on_failure=failures.append)
        good = journal.record_result("o2", OrderResult("filled", "v2", filled_quantity=1.5),
                                     on_failure=failures.append)
        orders = await journal.order_results("a1")  # answered after both writes' group
        return bad, good, failures, orders

    bad, good, failures, orders = asyncio.run(main())
    assert bad is None and good is None
    assert len(failures) == 1 and isinstance(failures[0], JournalError) and "cannot be stored" in str(failures[0])
    assert [(o["client_order_id"], o["state"]) for o in orders] == [("o1", PENDING), ("o2", DONE)]


def test_async_alerts_answered_just_before_a_stop_are_executed_before_it_ends(tmp_path, daemon_factory):
    daemon = daemon_factory(write_routes(tmp_path, """
        version: 1
        defaults: {ack: async}
        plugins: {paper: {type: paper, ledger: fills.jsonl}}
        routes: [{name: all, to: paper}]
    """))
    answered = [daemon.post(json={**ALERT, "id": i}) for i in range(30)]
    assert {r.status_code for r in answered} == {202}
    assert daemon.stop() == 0
    fills = read_ledger(tmp_path / "fills.jsonl")
    assert sorted(f["alert_id"] for f in fills) == sorted(r.json()["alert_id"] for r in answered)
    listed = read_recent(tmp_path / "journal.sqlite", limit=50)
    assert all(o["state"] == DONE and o["status"] == "filled" for e in listed for o in e["orders"])


def test_a_read_whose_rows_cannot_be_read_fails_alone(journal, tmp_path):
    async def main():
        await record(journal, "a1", [("o1", PENDING)])
        other = sqlite3.connect(tmp_path / "journal.sqlite", isolation_level=None)
        other.execute("UPDATE orders SET request = 'not json' WHERE client_order_id = 'o1'")  # damaged by hand
        other.close()
        return await asyncio.gather(journal.unfinished(), record(journal, "a2", [("o2", PENDING)]),
                                    return_exceptions=True)

    broken, fine = asyncio.run(main())
    assert isinstance(broken, JournalError) and "unreadable answer" in str(broken)
    assert fine is None and journal.healthy
