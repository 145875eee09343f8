"""Every accepted alert executes exactly once: dedup of resends, stable client order ids, ordered
lanes, `ack: async`, and recovery after a crash (SIGKILL) from the journal."""

import asyncio
import collections
import json
import logging
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fksroute.dispatch import Dispatcher, client_order_id
from fksroute.journal import PENDING, Journal, new_alert_id, read_recent
from fksroute.metrics import Metrics
from fksroute.plugins.base import OrderRequest, PluginContext
from fksroute.plugins.http import HttpPlugin
from fksroute.plugins.paper import PaperPlugin
from fksroute.webhook import journaled_reply
from serving import metric, read_ledger, start_daemon, write_routes

ALERT = {"symbol": "BTC/USDT", "action": "buy", "order_type": "market", "quantity": 0.01}


def wait_for(condition, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def by(entries, key):
    return collections.Counter(e[key] for e in entries)


# --- dedup ------------------------------------------------------------------------------------

DEDUP = """
    version: 1
    plugins:
      paper: {type: paper, ledger: fills.jsonl}
    routes:
      - name: keyed
        match: {kind: keyed}
        dedup_key: "{{ alert.id }}"
        to: paper
      - name: short
        match: {kind: short}
        dedup_window: 500ms
        to: paper
      - name: custom-id
        match: {kind: custom}
        to: paper
        order:
          symbol: "{{ alert.symbol }}"
          side: "{{ alert.action }}"
          type: market
          quantity: "{{ alert.quantity }}"
          client_order_id: "{{ alert.coid }}"
      - {name: switched-off, match: {kind: switched}, enabled: false, to: paper}
      - name: all
        to: paper
"""


@pytest.fixture(scope="module")
def deduping(tmp_path_factory):
    home = tmp_path_factory.mktemp("dedup")
    daemon = start_daemon(write_routes(home, DEDUP))
    daemon.ledger = home / "fills.jsonl"
    yield daemon
    daemon.stop()


def fills_of(daemon, alert_id):
    return [f for f in read_ledger(daemon.ledger) if f["alert_id"] == alert_id]


def assert_one_execution_and_three_duplicates(daemon, replies):
    assert [r.status_code for r in replies] == [200] * 4
    bodies = [r.json() for r in replies]
    firsts = [b for b in bodies if not b["duplicate"]]
    assert len(firsts) == 1
    first = firsts[0]
    assert first["success"] and first["results"][0]["status"] == "filled"
    for body in bodies:
        if body is not first:
            # The first delivery's answer, results and all, marked as a duplicate.
            assert body == {**first, "duplicate": True}
    assert len(fills_of(daemon, first["alert_id"])) == 1
    assert [f["client_order_id"] for f in fills_of(daemon, first["alert_id"])] == \
        [first["results"][0]["client_order_id"]]
    return first


def test_the_same_alert_four_times_executes_once(deduping):
    alert = {**ALERT, "symbol": "SEQ/USDT"}
    before = metric(deduping.get("/metrics").text, "fksroute_alerts_received_total", outcome="duplicate")
    replies = [deduping.post(json=alert) for _ in range(4)]
    assert_one_execution_and_three_duplicates(deduping, replies)
    metrics = deduping.get("/metrics").text
    assert metric(metrics, "fksroute_alerts_received_total", outcome="duplicate") == before + 3
    # The passphrase-free body is what counts: another key order is the same alert.
    reordered = deduping.post(content=json.dumps(dict(reversed(list(alert.items())))),
                              headers={"Content-Type": "application/json"})
    assert reordered.json()["duplicate"] is True


def test_the_same_alert_four_times_at_once_executes_once(deduping):
    alert = {**ALERT, "symbol": "PAR/USDT"}
    for _ in range(3):                                   # a few rounds, each with a fresh alert
        alert = {**alert, "quantity": alert["quantity"] + 0.01}
        barrier = threading.Barrier(4)

        def post(_):
            barrier.wait()
            return deduping.post(json=alert)

        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(post, range(4)))
        first = assert_one_execution_and_three_duplicates(deduping, replies)
        journaled = read_recent(deduping.ledger.parent / "journal.sqlite", limit=20)
        duplicates = [e for e in journaled if e["duplicate_of"] == first["alert_id"]]
        assert len(duplicates) == 3 and all(e["outcome"] == "duplicate" for e in duplicates)


def test_a_route_may_name_its_dedup_key(deduping):
    first = deduping.post(json={**ALERT, "kind": "keyed", "id": "k-1", "time": "2026-01-01T00:00:00Z"})
    # Another body, the same id: TradingView's {{timenow}} differs on a resend, the id does not.
    again = deduping.post(json={**ALERT, "kind": "keyed", "id": "k-1", "time": "2026-01-01T00:00:05Z"})
    other = deduping.post(json={**ALERT, "kind": "keyed", "id": "k-2", "time": "2026-01-01T00:00:05Z"})
    assert first.json()["duplicate"] is False and again.json()["duplicate"] is True
    assert again.json()["alert_id"] == first.json()["alert_id"]
    assert other.json()["duplicate"] is False
    assert len(fills_of(deduping, first.json()["alert_id"])) == 1
    assert len(fills_of(deduping, other.json()["alert_id"])) == 1


def test_the_dedup_window_expires(deduping):
    alert = {**ALERT, "kind": "short"}
    first = deduping.post(json=alert).json()
    assert deduping.post(json=alert).json()["duplicate"] is True
    time.sleep(0.6)
    later = deduping.post(json=alert).json()
    assert later["duplicate"] is False and later["alert_id"] != first["alert_id"]
    # A new alert, a new client order id: both executed, once each.
    assert later["results"][0]["client_order_id"] != first["results"][0]["client_order_id"]
    assert len(fills_of(deduping, first["alert_id"])) == len(fills_of(deduping, later["alert_id"])) == 1


def test_client_order_ids_are_derived_from_the_alert_and_route():
    one = client_order_id("01a2000000000000000000aa", "crypto", 0)
    assert one == client_order_id("01a2000000000000000000aa", "crypto", 0)      # stable
    others = {client_order_id("01a2000000000000000000ab", "crypto", 0),
              client_order_id("01a2000000000000000000aa", "crypto2", 0),
              client_order_id("01a2000000000000000000aa", "crypto", 1)}
    assert one not in others and len(others) == 3
    assert one.startswith("fks") and len(one) == 32 and one.isalnum()    # what venues accept
    # In the order of the alerts (their ids are time-ordered): the journal's index grows at its end.
    ids = [new_alert_id() for _ in range(50)]
    coids = [client_order_id(i, "crypto", 0) for i in ids]
    assert sorted(reversed(coids)) == coids


def test_a_client_order_id_from_the_template_is_used_and_never_twice(deduping):
    first = deduping.post(json={**ALERT, "kind": "custom", "coid": "mine-1"})
    assert first.status_code == 200 and first.json()["results"][0]["client_order_id"] == "mine-1"
    # Another alert (not a resend: its body differs) that renders the same client order id.
    clash = deduping.post(json={**ALERT, "kind": "custom", "coid": "mine-1", "quantity": 0.02})
    assert clash.status_code == 422 and "client_order_id was used before" in clash.json()["error"]
    assert [f["client_order_id"] for f in read_ledger(deduping.ledger)].count("mine-1") == 1
    assert deduping.get("/health").json()["journal"]["healthy"] is True


def test_the_answer_rebuilt_from_the_journal_is_the_answer_given(deduping):
    """After a crash before its answer was journaled, a resend is answered from the orders."""
    for alert in ({**ALERT, "symbol": "REB/USDT"}, {**ALERT, "kind": "custom", "coid": "rebuilt-1"},
                  {**ALERT, "kind": "switched"}):
        given = deduping.post(json=alert).json()
        # A paper order's result is answered as soon as it fills; its journal write follows.
        entry = wait_for(lambda: (e := read_recent(deduping.ledger.parent / "journal.sqlite",
                                                   alert_id=given["alert_id"])[0])
                         and all(o["state"] == "done" for o in e["orders"]) and e, what="the results journaled")
        assert journaled_reply(given["alert_id"], entry["orders"]) == given


def test_dedup_and_client_order_ids_survive_a_crash(tmp_path):
    routes = write_routes(tmp_path, DEDUP)
    daemon = start_daemon(routes)
    try:
        first = daemon.post(json=ALERT).json()
        daemon.stop(signal.SIGKILL)
        daemon = start_daemon(routes)
        again = daemon.post(json=ALERT).json()
    finally:
        daemon.stop()
    assert again["duplicate"] is True and again["alert_id"] == first["alert_id"]
    assert again["results"][0]["client_order_id"] == first["results"][0]["client_order_id"]
    assert [f["alert_id"] for f in read_ledger(tmp_path / "fills.jsonl")] == [first["alert_id"]]


def test_an_async_alert_resent_after_a_restart_is_answered_like_the_first(tmp_path):
    routes = write_routes(tmp_path, """
        version: 1
        defaults: {ack: async}
        plugins: {paper: {type: paper, ledger: fills.jsonl}}
        routes: [{name: all, to: paper}]
    """)
    daemon = start_daemon(routes)
    try:
        first = daemon.post(json=ALERT)
        daemon.stop(signal.SIGKILL)
        daemon = start_daemon(routes)
        again = daemon.post(json=ALERT)
    finally:
        daemon.stop()
    assert first.status_code == again.status_code == 202
    assert again.json()["duplicate"] is True and again.json()["alert_id"] == first.json()["alert_id"]


# --- ordered lanes and ack: async -------------------------------------------------------------

class Venue:
    """A slow order receiver behind the `http` plugin: records arrival order and overlap."""

    def __init__(self):
        self.lock = threading.Lock()
        self.orders = collections.defaultdict(list)      # symbol -> quantities in arrival order
        self.busy = collections.Counter()
        self.most_per_symbol = self.most_at_once = 0
        venue = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                order = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                symbol = order["symbol"]
                with venue.lock:
                    venue.orders[symbol].append(order["quantity"])
                    venue.busy[symbol] += 1
                    venue.most_per_symbol = max(venue.most_per_symbol, venue.busy[symbol])
                    venue.most_at_once = max(venue.most_at_once, sum(venue.busy.values()))
                time.sleep(random.uniform(0.002, 0.02))
                with venue.lock:
                    venue.busy[symbol] -= 1
                reply = json.dumps({"status": "filled", "order_id": order["client_order_id"]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/orders"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_async_alerts_of_one_symbol_execute_in_arrival_order_and_symbols_run_side_by_side(tmp_path):
    venue = Venue()
    daemon = start_daemon(write_routes(tmp_path, f"""
        version: 1
        defaults: {{ack: async}}
        plugins:
          paper: {{type: paper, ledger: fills.jsonl}}
          relay: {{type: http, url: "{venue.url}", timeout: 5}}
        routes:
          - {{name: venue, match: {{symbol: {{regex: "H.*"}}}}, to: relay}}
          - {{name: paper, to: paper}}
    """))
    pairs, paper_symbols, relay_symbols, sends = 12, [f"P{i}" for i in range(4)], [f"H{i}" for i in range(4)], 20

    def close_then_open(symbol):
        """Close (sell), then open (buy), back to back, `pairs` times; quantity numbers them."""
        answers = []
        for n in range(1, pairs + 1):
            for action in ("sell", "buy"):
                r = daemon.post(json={**ALERT, "symbol": symbol, "action": action, "quantity": n})
                answers.append(r)
        return answers

    def stream(symbol):
        return [daemon.post(json={**ALERT, "symbol": symbol, "quantity": n}) for n in range(1, sends + 1)]

    try:
        with ThreadPoolExecutor(len(paper_symbols) + len(relay_symbols)) as pool:
            answers = [a for batch in pool.map(close_then_open, paper_symbols) for a in batch]
            answers += [a for batch in pool.map(stream, relay_symbols) for a in batch]
        assert {r.status_code for r in answers} == {202}
        assert {r.json()["results"][0]["status"] for r in answers} == {"queued"}
        expected = len(paper_symbols) * pairs * 2
        fills = wait_for(lambda: len(read_ledger(tmp_path / "fills.jsonl")) >= expected and
                         read_ledger(tmp_path / "fills.jsonl"), what="the paper fills")
        for symbol in paper_symbols:
            executed = [(f["order"]["side"], f["order"]["quantity"]) for f in fills if f["order"]["symbol"] == symbol]
            assert executed == [(side, n) for n in range(1, pairs + 1) for side in ("sell", "buy")], symbol
        wait_for(lambda: sum(map(len, venue.orders.values())) >= len(relay_symbols) * sends, what="the relay")
        for symbol in relay_symbols:
            assert venue.orders[symbol] == list(range(1, sends + 1)), symbol
        assert venue.most_per_symbol == 1            # one symbol: strictly one order after another
        assert venue.most_at_once > 1                # different symbols: side by side
        time.sleep(0.2)
        assert len(read_ledger(tmp_path / "fills.jsonl")) == expected      # and nothing more
    finally:
        daemon.stop()
        venue.close()


# --- the must-show: SIGKILL in the middle of 1,000 alerts ------------------------------------------

POSTER = '''
import sys, threading, httpx
url, out, count, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
lock = threading.Lock()
answered = open(out, "a")

def worker(first):
    with httpx.Client(timeout=5) as client:
        for i in range(first, count, threads):
            alert = {"id": f"t{i}", "symbol": f"S{i % 3}/USDT", "action": "buy", "quantity": 1}
            try:
                reply = client.post(url, json=alert)
            except httpx.HTTPError:
                continue
            if reply.status_code == 202:
                with lock:
                    answered.write(f"t{i} {reply.json()['alert_id']}\\n")
                    answered.flush()

workers = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
for w in workers:
    w.start()
for w in workers:
    w.join()
'''

CRASHING = """
    version: 1
    defaults: {ack: async}
    plugins:
      paper: {type: paper, ledger: fills.jsonl}
    routes:
      - name: all
        to: paper
        order:
          symbol: "{{ alert.symbol }}"
          side: "{{ alert.action }}"
          type: market
          quantity: "{{ alert.quantity }}"
          comment: "{{ alert.id }}"
"""


def unfinished_orders(journal_path):
    with sqlite3.connect(f"file:{journal_path}?mode=ro", uri=True) as conn:
        return conn.execute("SELECT COUNT(*) FROM orders WHERE state IN ('pending', 'sent', 'open')").fetchone()[0]


def test_a_sigkill_mid_stream_loses_and_repeats_nothing_that_was_answered_202(tmp_path):
    routes = write_routes(tmp_path, CRASHING)
    (tmp_path / "poster.py").write_text(POSTER)
    answered_file = tmp_path / "answered.txt"
    answered_file.touch()
    daemon = start_daemon(routes)
    poster = subprocess.Popen([sys.executable, str(tmp_path / "poster.py"), f"{daemon.url}/webhook/tradingview",
                               str(answered_file), "1000", "4"])
    try:
        wait_for(lambda: len(answered_file.read_text().splitlines()) >= 300, timeout=30, what="300 answers")
        daemon.proc.kill()                                    # SIGKILL: no drain, no checkpoint
        assert poster.wait(60) == 0
    finally:
        if poster.poll() is None:
            poster.kill()
        daemon.stop()
    answered = dict(line.split() for line in answered_file.read_text().splitlines())
    assert 300 <= len(answered) < 1000                       # killed in the middle of the stream
    left_over = unfinished_orders(tmp_path / "journal.sqlite")

    daemon = start_daemon(routes)
    try:
        def recovered():
            fills = read_ledger(tmp_path / "fills.jsonl")
            executed = {f["order"]["comment"] for f in fills}
            return fills if all(tag in executed for tag in answered) else None

        fills = wait_for(recovered, timeout=20, what="every answered alert in the ledger")
        wait_for(lambda: unfinished_orders(tmp_path / "journal.sqlite") == 0, what="nothing left unfinished")
        health = daemon.get("/health").json()
    finally:
        daemon.stop()
    fills = read_ledger(tmp_path / "fills.jsonl")
    tags, alert_ids, client_ids = by(fills, "client_order_id"), by(fills, "alert_id"), by(fills, "client_order_id")
    comments = collections.Counter(f["order"]["comment"] for f in fills)
    for tag, alert_id in answered.items():                   # answered 202: executed exactly once
        assert comments[tag] == 1 and alert_ids[alert_id] == 1, tag
    assert max(comments.values()) == 1 and max(alert_ids.values()) == 1 and max(client_ids.values()) == 1
    assert set(comments) <= {f"t{i}" for i in range(1000)} and len(tags) == len(fills)
    assert health["journal"]["unknown_orders"] == 0 and health["status"] == "ok"
    print(f"answered 202: {len(answered)}, executed: {len(fills)}, unfinished at the kill: {left_over}")


# --- recovery, unit level -----------------------------------------------------------------------

def test_recovery_runs_pending_once_reconciles_sent_and_marks_the_rest_unknown(tmp_path):
    venue = Venue()
    context = PluginContext(tmp_path, logging.getLogger("test"))
    order = {"symbol": "X", "side": "buy", "type": "market", "quantity": 1}

    def plugins():
        return {"paper": PaperPlugin("paper", {"type": "paper", "ledger": "fills.jsonl"}, context),
                "memory": PaperPlugin("memory", {"type": "paper"}, context),      # no ledger: its book is gone
                "relay": HttpPlugin("relay", {"type": "http", "url": venue.url}, context)}

    async def life(before_crash):
        journal = Journal(tmp_path / "journal.sqlite")
        journal.open()
        running = plugins()
        for plugin in running.values():
            await plugin.start()
        dispatcher = Dispatcher(journal, Metrics())
        await before_crash(journal, running)
        rows = await journal.unfinished()
        await dispatcher.recover(rows, running.get)
        await dispatcher.drain(10)
        results = {o["client_order_id"]: o for a in read_recent(tmp_path / "journal.sqlite", 50) for o in a["orders"]}
        journal.close()
        return rows, results, dispatcher.unknown_orders

    async def crashed(journal, running):
        cases = [("pending", "paper", PENDING), ("sent-found", "paper", "sent"), ("sent-lost", "paper", "sent"),
                 ("sent-memory", "memory", "sent"), ("sent-relay", "relay", "sent"), ("sent-gone", "removed", "sent")]
        for n, (coid, plugin, state) in enumerate(cases):
            await journal.record_alert(f"a{n}", source="t", body="{}", outcome="accepted",
                                       orders=[(coid, "r", plugin, order, PENDING, None, None)])
            if state == "sent":
                await journal.mark_sent(coid)
        # Filled at the paper venue just before the crash, so the journal never heard the result.
        await running["paper"].execute(OrderRequest("sent-found", "a1", "r", "paper", order))

    async def nothing(journal, running):
        pass

    # Every plugin starts afresh, as after a restart: the paper ledger is its memory.
    rows, results, unknown = asyncio.run(life(crashed))
    assert [(r.client_order_id, r.state) for r in rows] == [
        ("pending", "pending"), ("sent-found", "sent"), ("sent-lost", "sent"), ("sent-memory", "sent"),
        ("sent-relay", "sent"), ("sent-gone", "sent")]
    assert {coid: o["status"] for coid, o in results.items()} == {
        "pending": "filled",          # never sent: executed now
        "sent-found": "filled",       # found through lookup: its result, not a second fill
        "sent-lost": "filled",        # not found at a venue that cannot fill an id twice: sent now
        "sent-memory": "filled",      # paper without a ledger: nothing outlived the crash, simulated again
        "sent-relay": "unknown",      # a relay cannot be asked
        "sent-gone": "unknown"}       # its plugin is no longer configured
    assert unknown == 2 and all(results[c]["state"] == "done" for c in results)
    assert "check the venue" in results["sent-relay"]["error"]
    assert by(read_ledger(tmp_path / "fills.jsonl"), "client_order_id") == {
        "pending": 1, "sent-found": 1, "sent-lost": 1}
    assert venue.orders == {}                                 # nothing was resent to the relay
    # A second restart finds nothing left to do and executes nothing again.
    rows, _, _ = asyncio.run(life(nothing))
    assert rows == [] and len(read_ledger(tmp_path / "fills.jsonl")) == 3
    venue.close()


def test_an_unknown_outcome_is_shown_by_health_and_the_journal_command(tmp_path):
    routes = write_routes(tmp_path, """
        version: 1
        plugins:
          paper: {type: paper, ledger: fills.jsonl}
          relay: {type: http, url: "http://127.0.0.1:9/orders"}
        routes: [{name: all, to: paper}]
    """)
    order = {"symbol": "X", "side": "buy", "type": "market", "quantity": 1}

    async def before_the_crash():
        journal = Journal(tmp_path / "journal.sqlite")
        journal.open()
        await journal.record_alert("a-relay", source="t", body="{}", outcome="accepted",
                                   orders=[("c-relay", "all", "relay", order, PENDING, None, None)])
        await journal.mark_sent("c-relay")
        await journal.record_alert("a-paper", source="t", body="{}", outcome="accepted",
                                   orders=[("c-paper", "all", "paper", order, PENDING, None, None)])
        journal.close()

    asyncio.run(before_the_crash())
    for start in range(2):                                    # and again after another restart
        daemon = start_daemon(routes)
        try:
            wait_for(lambda: unfinished_orders(tmp_path / "journal.sqlite") == 0, what="recovery")
            health = wait_for(lambda: (h := daemon.get("/health").json())["journal"]["unknown_orders"] and h,
                              what="the unknown order in /health")
            metrics = daemon.get("/metrics").text
        finally:
            daemon.stop()
        assert health["status"] == "degraded" and health["journal"]["unknown_orders"] == 1
        assert metric(metrics, "fksroute_orders_unknown") == 1
        assert by(read_ledger(tmp_path / "fills.jsonl"), "client_order_id") == {"c-paper": 1}
    listing = subprocess.run([sys.executable, "-m", "fksroute", "journal", "-c", str(routes)],
                             capture_output=True, text=True, timeout=30)
    assert listing.returncode == 0
    line = next(l for l in listing.stdout.splitlines() if "c-relay" in l)
    assert "all -> relay: unknown" in line and "check the venue" in line
    assert "all -> paper: filled" in listing.stdout
