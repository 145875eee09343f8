"""Hot reload against real `fksroute serve` processes: every trigger, refusals, plugin reuse, and a soak."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
import warnings
from contextlib import closing
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Starlette's notice that its TestClient will move to httpx2
    from starlette.testclient import TestClient

from fksroute import config
from fksroute.app import admin_allowed, create_app
from fksroute.daemon import Daemon as InProcessDaemon
from fksroute.deployment import deploy
from serving import Daemon, free_port, metric
from tables import alert, paper_table, samples

LOCATED = re.compile(r"routes\.yaml:\d+:\d+: ")


def fksroute(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fksroute", *args], capture_output=True, text=True, timeout=60)


def eventually(check: Callable[[], Any], timeout: float = 2.0) -> Any:
    """`check()`'s first truthy value, polling; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"not true after {timeout}s"
        time.sleep(0.01)


def filled_by(d: Daemon, **fields: Any) -> str:
    """Send a fresh alert; the plugin that filled it."""
    reply = d.post(json=alert(**fields))
    assert reply.status_code == 200, reply.text
    [result] = reply.json()["results"]
    assert result["status"] == "filled", result
    return result["plugin"]


def seconds_until_filled_by(d: Daemon, plugin: str, since: float, limit: float = 3.0) -> float:
    """Send alerts until `plugin` fills one; the seconds from `since` (a monotonic time) until then."""
    while filled_by(d) != plugin:
        assert time.monotonic() - since < limit, f"alerts still not filled by {plugin} after {limit}s"
        time.sleep(0.01)
    return time.monotonic() - since


def health(d: Daemon) -> dict[str, Any]:
    return d.get("/health").json()


def metrics(d: Daemon) -> str:
    return d.get("/metrics").text


# --- how users and tools replace routes.yaml -------------------------------------------------

class PlainWrite:
    """Overwrite in place, as `cat > routes.yaml` or a simple editor does."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "routes.yaml"

    def write(self, text: str) -> None:
        self.path.write_text(text)


class RenameIntoPlace(PlainWrite):
    """Write a new file beside it, then rename it over routes.yaml, as vim, emacs and atomic writers do."""

    def write(self, text: str) -> None:
        new = self.path.with_name(".routes.yaml.new")
        new.write_text(text)
        os.replace(new, self.path)


class SymlinkSwap(PlainWrite):
    """routes.yaml -> ..data/routes.yaml, and `..data` -> a versioned directory that is swapped
    atomically for a new one, as Kubernetes does with a mounted ConfigMap."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.directory = directory
        self.versions = 0
        self.path.symlink_to("..data/routes.yaml")

    def write(self, text: str) -> None:
        self.versions += 1
        version = self.directory / f"..v{self.versions}"
        version.mkdir()
        (version / "routes.yaml").write_text(text)
        link = self.directory / "..data_tmp"
        link.symlink_to(version.name)
        os.replace(link, self.directory / "..data")


WRITERS = {"plain": PlainWrite, "rename": RenameIntoPlace, "symlink": SymlinkSwap}


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    # Absolute: a relative journal would follow a symlink swap into the new directory ("restart required").
    return tmp_path / "journal.sqlite"


@pytest.mark.parametrize("how", WRITERS)
def test_a_saved_file_reroutes_within_a_second(how: str, tmp_path: Path, journal: Path, daemon_factory) -> None:
    writer = WRITERS[how](tmp_path)
    writer.write(paper_table(journal, to="a"))
    d = daemon_factory(writer.path)
    assert filled_by(d) == "a"

    written = time.monotonic()
    writer.write(paper_table(journal, to="b"))
    assert seconds_until_filled_by(d, "b", written) < 1.0

    written = time.monotonic()
    writer.write(paper_table(journal, to="a", note="and back"))
    assert seconds_until_filled_by(d, "a", written) < 1.0
    state = health(d)["config"]
    assert state["generation"] == 3 and state["last_reload_ok"] is True
    assert metric(metrics(d), "fksroute_config_reloads_total", trigger="watch", result="success") >= 2


def test_a_symlinked_file_is_followed_to_each_new_target(tmp_path: Path, journal: Path, daemon_factory) -> None:
    conf, one, two = (tmp_path / n for n in ("conf", "one", "two"))
    for directory in (conf, one, two):
        directory.mkdir()
    (one / "routes.yaml").write_text(paper_table(journal, to="a"))
    routes = conf / "routes.yaml"
    routes.symlink_to(one / "routes.yaml")
    d = daemon_factory(routes)

    written = time.monotonic()
    (one / "routes.yaml").write_text(paper_table(journal, to="b"))  # edited where it really is
    assert seconds_until_filled_by(d, "b", written) < 1.0

    (two / "routes.yaml").write_text(paper_table(journal, to="a", note="two"))
    written = time.monotonic()
    (conf / ".routes.yaml.link").symlink_to(two / "routes.yaml")
    os.replace(conf / ".routes.yaml.link", routes)  # `ln -sfn`, atomically
    assert seconds_until_filled_by(d, "a", written) < 1.0

    written = time.monotonic()
    (two / "routes.yaml").write_text(paper_table(journal, to="b", note="two"))  # the new target, in place
    assert seconds_until_filled_by(d, "b", written) < 1.0


def test_a_changed_schema_file_reloads(tmp_path: Path, journal: Path, daemon_factory) -> None:
    schema = tmp_path / "strategy.alert.schema.json"
    schema.write_text(json.dumps({"type": "object", "required": ["symbol"]}))
    routes = tmp_path / "routes.yaml"
    routes.write_text(paper_table(journal, extra="defaults: {alert_schema: strategy.alert.schema.json}"))
    d = daemon_factory(routes)
    assert filled_by(d) == "a"
    before = health(d)["config"]["version"]

    written = time.monotonic()
    schema.write_text(json.dumps({"type": "object", "required": ["symbol", "strategy"]}))
    eventually(lambda: d.post(json=alert()).status_code == 422)
    assert time.monotonic() - written < 1.0
    assert "strategy" in d.post(json=alert()).json()["error"]
    assert filled_by(d, strategy="breakout") == "a"
    assert health(d)["config"]["version"] not in (before, None)


def test_an_invalid_file_changes_nothing_and_says_so(tmp_path: Path, journal: Path, daemon_factory) -> None:
    routes = tmp_path / "routes.yaml"
    port = free_port()
    routes.write_text(paper_table(journal, to="a", port=port))
    d = daemon_factory(routes, port=port)
    good = health(d)["config"]["version"]
    assert metric(metrics(d), "fksroute_config_last_reload_successful") == 1

    routes.write_text(paper_table(journal, to="nowhere", port=port))  # a route to an undefined plugin
    state = eventually(lambda: (c := health(d)["config"])["last_reload_ok"] is False and c)
    assert LOCATED.search(state["last_error"]) and "nowhere" in state["last_error"]
    assert state["version"] == good and state["generation"] == 1
    assert health(d)["status"] == "degraded"
    assert filled_by(d) == "a"
    text = metrics(d)
    assert metric(text, "fksroute_config_last_reload_successful") == 0
    assert metric(text, "fksroute_config_reloads_total", trigger="watch", result="failure") >= 1
    assert samples(text, "fksroute_config_info") == [{"version": good, "generation": "1"}]

    refused = fksroute("reload", "-c", str(routes))  # the daemon's address, from the very file that is broken
    assert refused.returncode == 1
    assert LOCATED.search(refused.stderr) and "nowhere" in refused.stderr
    assert metric(metrics(d), "fksroute_config_reloads_total", trigger="http", result="failure") == 1

    routes.write_text(paper_table(journal, to="b", port=port))
    accepted = fksroute("reload", "--url", d.url)
    assert accepted.returncode == 0, accepted.stderr
    state = health(d)["config"]
    assert state["last_reload_ok"] is True and state["last_error"] is None and state["version"] != good
    assert f"version {state['version']}" in accepted.stdout
    assert filled_by(d) == "b"
    text = metrics(d)
    assert metric(text, "fksroute_config_last_reload_successful") == 1
    assert metric(text, "fksroute_config_reloads_total", trigger="http", result="success") == 1


def test_sighup_reloads(tmp_path: Path, journal: Path, daemon_factory) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(paper_table(journal, to="a"))
    d = daemon_factory(routes)
    # Nothing changed: only the signal can have asked for this reload.
    d.proc.send_signal(signal.SIGHUP)
    eventually(lambda: metric(metrics(d), "fksroute_config_reloads_total", trigger="sighup", result="success") == 1)
    assert metric(metrics(d), "fksroute_config_reloads_total", trigger="watch", result="success") == 0
    assert health(d)["config"]["generation"] == 1 and filled_by(d) == "a"

    routes.write_text(paper_table(journal, to="b"))
    signalled = time.monotonic()
    d.proc.send_signal(signal.SIGHUP)
    assert seconds_until_filled_by(d, "b", signalled) < 1.0
    # The watcher may have seen the edit too; the signal's reload is counted either way.
    eventually(lambda: metric(metrics(d), "fksroute_config_reloads_total", trigger="sighup", result="success") == 2)
    assert health(d)["config"]["generation"] == 2


def test_post_reload_answers_the_version_or_the_errors(tmp_path: Path, journal: Path, daemon_factory) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(paper_table(journal, to="a"))
    d = daemon_factory(routes)

    routes.write_text(paper_table(journal, to="b"))
    expected = config.load_file(routes)
    assert not isinstance(expected, list)
    reply = d.post("/-/reload")
    assert reply.status_code == 200
    assert reply.json()["ok"] is True and reply.json()["version"] == expected.version
    assert health(d)["config"]["version"] == expected.version
    assert filled_by(d) == "b"

    routes.write_text(paper_table(journal, to="b") + "plugins: {}\n")  # a duplicate key
    reply = d.post("/-/reload")
    assert reply.status_code == 400
    body = reply.json()
    assert body["ok"] is False and body["version"] == expected.version
    assert any(LOCATED.search(e) and "duplicate key 'plugins'" in e for e in body["errors"])
    assert filled_by(d) == "b"


def test_a_server_change_needs_a_restart(tmp_path: Path, journal: Path, daemon_factory) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(paper_table(journal, to="a"))
    d = daemon_factory(routes)
    routes.write_text(paper_table(journal, to="b", port=4801))
    reply = d.post("/-/reload")
    assert reply.status_code == 400
    [error] = reply.json()["errors"]
    assert "restart required" in error and "server.port" in error
    assert health(d)["config"]["last_error"] == error
    assert filled_by(d) == "a"


def test_unchanged_plugins_are_kept_and_changed_ones_restarted(tmp_path: Path, journal: Path,
                                                              daemon_factory) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(paper_table(journal, to="a"))
    d = daemon_factory(routes)
    for _ in range(3):
        assert filled_by(d) == "a"
    text = metrics(d)
    first = health(d)["config"]["version"]
    assert metric(text, "fksroute_config_info", version=first, generation="1") == 1
    assert metric(text, "fksroute_config_hash") == int(first[:12], 16)
    # The journal and the daemon's log beside routes.yaml changed all along: no reload came of it.
    time.sleep(0.3)
    assert health(d)["config"]["generation"] == 1
    assert metric(metrics(d), "fksroute_config_reloads_total", trigger="watch", result="success") == 0

    # Only the route changes: the paper plugin `a` is the same instance, its fills and position kept.
    routes.write_text(paper_table(journal, to="b"))
    assert d.post("/-/reload").json()["generation"] == 2
    plugins = health(d)["plugins"]
    assert plugins["a"]["fills"] == 3 and plugins["a"]["positions"]["BTC/USDT"]["quantity"] == pytest.approx(0.03)
    assert filled_by(d) == "b"

    # `a`'s settings change: a new instance, starting flat; `b` is untouched.
    routes.write_text(paper_table(journal, to="b", slippage_a=7))
    assert d.post("/-/reload").json()["generation"] == 3
    plugins = health(d)["plugins"]
    assert plugins["a"]["fills"] == 0 and plugins["a"]["positions"] == {}
    assert plugins["b"]["fills"] == 1

    third = health(d)["config"]["version"]
    text = metrics(d)
    assert samples(text, "fksroute_config_info") == [{"version": third, "generation": "3"}]
    assert metric(text, "fksroute_config_hash") == int(third[:12], 16) != int(first[:12], 16)


# --- who may reload ---------------------------------------------------------------------------

def _outward_address() -> str | None:
    """This host's address on a non-loopback interface, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent, only a route is chosen
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_reload_from_another_address_needs_the_admin_token(tmp_path: Path, journal: Path, daemon_factory) -> None:
    address = _outward_address()
    if address is None:
        pytest.skip("this host has no non-loopback address to send from (the TestClient test still runs)")
    routes = tmp_path / "routes.yaml"
    routes.write_text(paper_table(journal, extra="security: {admin_token: s3cret-admin}"))
    d = daemon_factory(routes)
    # The daemon listens on loopback; this client's connections come from the host's outward address.
    with httpx.Client(base_url=d.url, transport=httpx.HTTPTransport(local_address=address), timeout=10) as outside:
        assert outside.get("/health").status_code == 200  # the address really reaches the daemon
        assert outside.post("/-/reload").status_code == 403
        assert outside.post("/-/reload", headers={"Authorization": "Bearer wrong"}).status_code == 403
        assert outside.post("/-/reload", headers={"Authorization": "s3cret-admin"}).status_code == 403
        assert outside.post("/-/reload", headers={"Authorization": "Bearer s3cret-admin"}).status_code == 200
    assert d.post("/-/reload").status_code == 200
    # Forwarded by a proxy on this host: loopback no longer vouches for the sender.
    assert d.post("/-/reload", headers={"X-Forwarded-For": "203.0.113.9"}).status_code == 403
    assert d.post("/-/reload", headers={"X-Forwarded-For": "203.0.113.9",
                                        "Authorization": "Bearer s3cret-admin"}).status_code == 200
    assert metric(metrics(d), "fksroute_config_reloads_total", trigger="http", result="success") == 3


def test_admin_authorisation_through_starlette(tmp_path: Path, journal: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(paper_table(journal, extra="security: {admin_token: s3cret-admin}"))
    daemon = InProcessDaemon(routes, env={})
    table = daemon.load()
    daemon.deployment = asyncio.run(deploy(table, None, 1))
    daemon.generation = 1
    with TestClient(create_app(daemon)) as client:  # its requests come from the host "testclient"
        assert client.post("/-/reload").status_code == 403
        assert client.post("/-/reload", headers={"Authorization": "Bearer nope"}).status_code == 403
        reply = client.post("/-/reload", headers={"Authorization": "bearer s3cret-admin"})
        assert reply.status_code == 200 and reply.json()["version"] == table.version
        # The table and the metrics are admin pages too; health and the probes are for anyone.
        for path in ("/routes", "/metrics"):
            assert client.get(path).status_code == 403
            assert client.get(path, headers={"Authorization": "Bearer s3cret-admin"}).status_code == 200
        assert client.get("/-/healthy").status_code == 200

    assert admin_allowed("127.0.0.1", {}, None) and admin_allowed("::1", {}, None)
    assert not admin_allowed("127.0.0.1", {"x-forwarded-for": "198.51.100.4"}, None)
    assert not admin_allowed("127.0.0.1", {"forwarded": "for=198.51.100.4"}, "t")
    assert admin_allowed("198.51.100.4", {"authorization": "Bearer t"}, "t")
    assert not admin_allowed("198.51.100.4", {"authorization": "Bearer t"}, None)
    assert not admin_allowed("198.51.100.4", {"authorization": "Bearer "}, "")
    assert not admin_allowed(None, {}, None)


# --- the soak ---------------------------------------------------------------------------------

# A second process sends distinct alerts from a few threads, one after another in each, until it
# is told to stop or its time is up; every request and its outcome go to a JSON file.
SENDER = textwrap.dedent("""
    import json, sys, threading, time, httpx
    url, out, stop, threads, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
    deadline = time.monotonic() + limit
    records = []

    def send(worker):
        with httpx.Client(base_url=url, timeout=10) as client:
            n = 0
            while time.monotonic() < deadline:
                try:
                    open(stop).close()
                    return
                except FileNotFoundError:
                    pass
                n += 1
                tag = f"{worker}-{n}"
                alert = {"symbol": "BTC/USDT", "action": "buy", "quantity": 0.01, "tag": tag}
                try:
                    reply = client.post("/webhook/tradingview", json=alert)
                    body = reply.json()
                    records.append({"tag": tag, "status": reply.status_code, "success": body.get("success"),
                                    "alert_id": body.get("alert_id"),
                                    "plugins": [r["plugin"] for r in body.get("results", [])]})
                except Exception as exc:
                    records.append({"tag": tag, "status": None, "error": repr(exc)})

    workers = [threading.Thread(target=send, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    with open(out, "w") as f:
        json.dump(records, f)
""")

def test_fifty_reloads_under_a_stream_of_alerts_lose_nothing(tmp_path: Path, journal: Path,
                                                            daemon_factory) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(paper_table(journal, to="a"))
    d = daemon_factory(routes)
    out, stop = tmp_path / "sent.json", tmp_path / "stop-sending"
    sender = subprocess.Popen([sys.executable, "-c", SENDER, d.url, str(out), str(stop), "3", "40"])
    try:
        eventually(lambda: metric(metrics(d), "fksroute_alerts_received_total", outcome="accepted") >= 20,
                   timeout=10)
        broken = ["version: 1\nplugins: [unclosed\n",              # YAML syntax
                  paper_table(journal) + "plugins: {}\n",          # a duplicate key
                  paper_table(journal, to="nowhere")]              # an undefined plugin
        valid = invalid = 0
        for i in range(50):
            if i % 3 == 2:
                text = broken[i % len(broken)]
                invalid += 1
            else:
                text = paper_table(journal, to="ab"[i % 2], note=f"reload {i}")
                valid += 1
            (PlainWrite if i % 2 else RenameIntoPlace)(tmp_path).write(text)
            if i in (0, 5, 24, 35):  # the command, valid and invalid (each run starts a Python)
                code = fksroute("reload", "--url", d.url).returncode
                assert code == (1 if i % 3 == 2 else 0), f"reload {i}"
            else:
                reply = d.post("/-/reload")
                assert reply.status_code == (400 if i % 3 == 2 else 200), f"reload {i}: {reply.text}"
            time.sleep(0.02)
        routes.write_text(paper_table(journal, to="a", note="the end"))
        assert d.post("/-/reload").status_code == 200
        stop.touch()
        assert sender.wait(timeout=30) == 0
    finally:
        stop.touch()
        sender.wait(timeout=30)

    records = json.loads(out.read_text())
    assert len(records) >= 200, f"only {len(records)} alerts were sent during the reloads"
    failed = [r for r in records if r["status"] != 200 or r.get("success") is not True]
    assert failed == []
    assert {p for r in records for p in r["plugins"]} == {"a", "b"}  # routing did switch under load
    text = metrics(d)
    assert metric(text, "fksroute_config_reloads_total", trigger="http", result="success") == valid + 1
    assert metric(text, "fksroute_config_reloads_total", trigger="http", result="failure") == invalid

    listed = fksroute("journal", "-c", str(routes), "--format", "json", "--limit", str(len(records) + 100))
    assert listed.returncode == 0, listed.stderr
    entries = {e["id"]: e for e in json.loads(listed.stdout)}
    for record in records:
        entry = entries.get(record["alert_id"])
        assert entry is not None, f"alert {record['tag']} answered 200 but is not in the journal"
        assert entry["outcome"] == "accepted" and json.loads(entry["body"])["tag"] == record["tag"]
        assert [o["status"] for o in entry["orders"]] == ["filled"]
    with closing(sqlite3.connect(journal)) as db:
        assert db.execute("SELECT COUNT(*) FROM alerts WHERE outcome = 'accepted'").fetchone()[0] == len(records)


def test_a_removed_plugin_is_closed_only_after_its_order_in_flight(tmp_path: Path, journal: Path,
                                                                    daemon_factory) -> None:
    """An order still on its way through a plugin that a reload removes finishes on that plugin."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received: list[dict] = []

    class SlowVenue(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            time.sleep(1.5)  # the reload lands while this order is in flight
            body = json.dumps({"order_id": "venue-1", "status": "filled"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    venue = ThreadingHTTPServer(("127.0.0.1", 0), SlowVenue)
    threading.Thread(target=venue.serve_forever, daemon=True).start()
    relay = f"{{type: http, url: 'http://127.0.0.1:{venue.server_port}/order', timeout: 5, retries: 0}}"
    routes = tmp_path / "routes.yaml"
    routes.write_text(paper_table(journal, to="slow", extra="defaults: {ack: async}").replace(
        "  b: {type: paper}\n", f"  b: {{type: paper}}\n  slow: {relay}\n"))
    try:
        d = daemon_factory(routes)
        sent = d.post(json=alert())
        assert sent.status_code == 202
        eventually(lambda: received)  # the order is at the venue, its answer 1.5 s away
        routes.write_text(paper_table(journal, to="a", extra="defaults: {ack: async}"))
        reload = d.post("/-/reload")
        assert reload.status_code == 200 and "slow" not in health(d)["plugins"]
        alert_id = sent.json()["alert_id"]

        def finished() -> Any:
            with closing(sqlite3.connect(journal)) as conn:
                return conn.execute("SELECT status, order_id, error FROM orders WHERE alert_id = ?"
                                    " AND status IS NOT NULL", (alert_id,)).fetchone()

        assert eventually(finished, timeout=5) == ("filled", "venue-1", None)
        assert len(received) == 1
    finally:
        venue.shutdown()
