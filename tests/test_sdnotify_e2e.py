"""A real `fksroute serve` as systemd runs it: sd_notify on a real socket, the watchdog, socket
activation, and a graceful stop on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from serving import Daemon
from tables import alert, paper_table


class NotifySocket:
    """A bound AF_UNIX datagram socket where systemd's notify socket would be; keeps what arrives."""

    def __init__(self, directory: Path) -> None:
        path = directory / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if len(str(path)) < 100:
            self.sock.bind(str(path))
            self.name = str(path)
        else:  # sun_path holds 108 bytes: fall back to an abstract socket
            self.name = f"@fksroute-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + self.name[1:])
        self.watchdog: list[float] = []  # when each WATCHDOG=1 arrived

    def next(self, timeout: float = 20.0) -> str:
        """The next message that is not a watchdog ping."""
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
            message = self.sock.recv(4096).decode()
            if message != "WATCHDOG=1":
                return message
            self.watchdog.append(time.monotonic())

    def rest(self) -> list[str]:
        """Everything still waiting, watchdog pings left out."""
        messages = []
        while True:
            try:
                messages.append(self.next(timeout=0.05))
            except (TimeoutError, socket.timeout):
                return messages


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(tmp_path)
    with closing(listener.sock):
        yield listener


def version_of(d: Daemon) -> str:
    return d.get("/health").json()["config"]["version"]


def test_ready_reloading_ready_stopping_and_the_watchdog(tmp_path: Path, notify: NotifySocket) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(paper_table(tmp_path / "journal.sqlite"))
    d = Daemon(routes, env={"NOTIFY_SOCKET": notify.name, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": ""})
    try:
        ready = notify.next()
        # READY=1 means the port answers: connect at once, before anything else.
        socket.create_connection(("127.0.0.1", d.port), timeout=1).close()
        assert d.get("/-/ready").status_code == 200
        version = version_of(d)
        assert ready == f"READY=1\nSTATUS=serving routes version {version}"

        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        d.proc.send_signal(signal.SIGHUP)
        reloading = notify.next(timeout=5)
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        first, usec = reloading.split("\n")
        assert first == "RELOADING=1" and usec.startswith("MONOTONIC_USEC=")
        assert before <= int(usec.removeprefix("MONOTONIC_USEC=")) <= after
        assert notify.next(timeout=5) == f"READY=1\nSTATUS=serving routes version {version}"

        pings_before = len(notify.watchdog)
        time.sleep(0.5)
        notify.rest()
        assert len(notify.watchdog) - pings_before >= 3  # every 0.1 s: half of WATCHDOG_USEC

        d.proc.send_signal(signal.SIGTERM)
        assert notify.next(timeout=5) == "STOPPING=1"
        assert d.proc.wait(timeout=15) == 0
        assert notify.rest() == []  # nothing after STOPPING=1: no READY=1 from a late reload
    finally:
        d.stop()


def test_no_watchdog_pings_unless_asked(tmp_path: Path, notify: NotifySocket) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(paper_table(tmp_path / "journal.sqlite"))
    # WATCHDOG_USEC meant for another process (WATCHDOG_PID is not ours): no pings.
    d = Daemon(routes, env={"NOTIFY_SOCKET": notify.name, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
    try:
        assert notify.next().startswith("READY=1\n")
        time.sleep(0.4)
        assert notify.rest() == [] and notify.watchdog == []
    finally:
        d.stop()


# The service manager's part: the listening socket at fd 3, LISTEN_PID naming the process that
# then becomes `fksroute serve` (exec keeps the pid), LISTEN_FDS the count.
ACTIVATOR = textwrap.dedent("""
    import os, sys
    fd = int(sys.argv[1])
    os.dup2(fd, 3)
    os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="fksroute.socket")
    os.execv(sys.executable, [sys.executable, "-m", "fksroute", "serve", "-c", sys.argv[2]])
""")


def test_socket_activation_serves_the_passed_socket(tmp_path: Path, notify: NotifySocket) -> None:
    with socket.socket() as taken, socket.socket() as listener:
        # The port routes.yaml names is taken: binding it instead of using fd 3 would fail.
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        routes = tmp_path / "routes.yaml"
        routes.write_text(paper_table(tmp_path / "journal.sqlite", port=taken.getsockname()[1]))
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        log = open(tmp_path / "daemon.log", "wb")
        child = subprocess.Popen([sys.executable, "-c", ACTIVATOR, str(listener.fileno()), str(routes)],
                                 pass_fds=(listener.fileno(),), stdout=log, stderr=subprocess.STDOUT,
                                 env={**_environment(), "NOTIFY_SOCKET": notify.name}, cwd=tmp_path)
    try:
        assert notify.next().startswith("READY=1\n"), (tmp_path / "daemon.log").read_text()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            reply = client.post("/webhook/tradingview", json=alert())
            assert reply.status_code == 200 and reply.json()["results"][0]["status"] == "filled"
            assert client.get("/-/ready").status_code == 200
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=15) == 0
        assert notify.rest() == ["STOPPING=1"]
    finally:
        child.kill()
        child.wait()
        log.close()


def _environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "WATCHDOG_", "NOTIFY_"))}


# --- graceful stop ------------------------------------------------------------------------------

def test_sigterm_stops_gracefully(tmp_path: Path) -> None:
    journal = tmp_path / "journal.sqlite"
    routes = tmp_path / "routes.yaml"
    # Sells are answered 202 once journaled and executed afterwards: the stop must finish them.
    routes.write_text(paper_table(journal).replace(
        "routes:\n", "routes:\n  - name: sells\n    match: {action: sell}\n    to: b\n    ack: async\n"))
    d = Daemon(routes).wait_ready()
    burst = 40
    replies: list[httpx.Response | Exception] = []
    start = threading.Barrier(burst + 1)

    def send(i: int) -> None:
        with httpx.Client(base_url=d.url, timeout=15) as client:
            client.get("/-/healthy")  # connect first, so the burst itself is all that is left
            start.wait()
            try:
                replies.append(client.post("/webhook/tradingview", json=alert(action="buy" if i % 2 else "sell")))
            except httpx.HTTPError as exc:
                replies.append(exc)

    readiness: list[int | str] = []

    def watch_readiness() -> None:
        while d.proc.poll() is None:
            try:
                readiness.append(httpx.get(f"{d.url}/-/ready", timeout=2).status_code)
            except httpx.TransportError:
                readiness.append("closed")
            time.sleep(0.005)

    senders = [threading.Thread(target=send, args=(i,)) for i in range(burst)]
    for thread in senders:
        thread.start()
    start.wait()
    time.sleep(0.01)
    d.proc.send_signal(signal.SIGTERM)
    watcher = threading.Thread(target=watch_readiness)
    watcher.start()
    for thread in senders:
        thread.join(20)
    assert d.proc.wait(timeout=20) == 0, d.logs()
    watcher.join(5)
    d.stop()

    # Readiness went 503 while the port was still open, and never back to 200.
    assert 503 in readiness and "closed" in readiness
    assert readiness.index(503) < readiness.index("closed")
    assert 200 not in readiness[readiness.index(503):]

    errors = [r for r in replies if isinstance(r, Exception)]
    assert errors == [], "every request sent before SIGTERM is answered"
    accepted = {r.json()["alert_id"]: r.status_code for r in replies if r.status_code in (200, 202)}
    refused = [r for r in replies if r.status_code not in (200, 202)]
    assert accepted, "no alert of the burst was in flight at the stop: the test proved nothing"
    assert all(r.status_code == 503 and r.json()["error"] == "fksroute is not ready" for r in refused)

    # The journal was closed cleanly: its WAL checkpointed and removed, every accepted alert in it, finished.
    wal = journal.with_name(journal.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    with closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows = dict(db.execute("SELECT id, outcome FROM alerts"))
        orders = db.execute("SELECT alert_id, state, status FROM orders").fetchall()
    assert {alert_id: rows.get(alert_id) for alert_id in accepted} == {alert_id: "accepted" for alert_id in accepted}
    assert sorted(a for a, _, _ in orders) == sorted(accepted)
    assert {(state, status) for _, state, status in orders} == {("done", "filled")}
    assert "stopped" in d.log_path.read_text()


class SlowVenue:
    """An order receiver behind the `http` plugin that takes `delays[symbol]` seconds per order."""

    def __init__(self, delays: dict[str, float]) -> None:
        self.received: list[str] = []
        self.answered: list[str] = []
        venue = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                order = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                venue.received.append(order["symbol"])
                time.sleep(delays[order["symbol"]])
                reply = json.dumps({"status": "filled", "order_id": f"venue-{order['client_order_id']}"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)
                venue.answered.append(order["symbol"])

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/orders"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_sigterm_waits_for_orders_in_flight_at_a_slow_venue(tmp_path: Path) -> None:
    # The queued orders outlast the open request: only the drain at the stop can finish them.
    venue = SlowVenue({"NOW/USDT": 0.3, **{f"Q{i}/USDT": 2.0 for i in range(3)}})
    journal = tmp_path / "journal.sqlite"
    routes = tmp_path / "routes.yaml"
    routes.write_text(textwrap.dedent(f"""\
        version: 1
        server: {{journal: {journal}}}
        plugins:
          venue: {{type: http, url: "{venue.url}", timeout: 5}}
        routes:
          - {{name: later, match: {{action: sell}}, to: venue, ack: async}}
          - {{name: now, to: venue}}
    """))
    d = Daemon(routes).wait_ready()
    try:
        queued = [d.post(json=alert(symbol=f"Q{i}/USDT", action="sell")) for i in range(3)]
        assert [r.status_code for r in queued] == [202] * 3
        answer: list[httpx.Response] = []
        waiting = threading.Thread(target=lambda: answer.append(d.post(json=alert(symbol="NOW/USDT"))))
        waiting.start()
        deadline = time.monotonic() + 5
        while len(venue.received) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(venue.received) == 4 and venue.answered == []  # all four at the venue, none answered

        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=20) == 0, d.log_path.read_text()
        waiting.join(5)
    finally:
        d.stop()
        venue.close()

    # The alert whose request was open got its answer; the queued ones were finished, not dropped.
    [reply] = answer
    assert reply.status_code == 200 and reply.json()["results"][0]["status"] == "filled"
    assert sorted(venue.answered) == sorted(venue.received)
    with closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as db:
        orders = db.execute("SELECT state, status, order_id FROM orders").fetchall()
    assert len(orders) == 4
    assert all(state == "done" and status == "filled" and order_id.startswith("venue-")
               for state, status, order_id in orders)
