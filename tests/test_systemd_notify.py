"""sd_notify, watchdog and socket activation against real sockets, as systemd would provide them."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fksroute.systemd import Notifier, listen_sockets, watchdog_interval, watchdog_loop

ROOT = Path(__file__).parent.parent
ALERTS = Path(__file__).parent / "alerts"


class NotifySocket:
    """A bound AF_UNIX datagram socket standing where systemd's notify socket would be."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.name = name  # the value for $NOTIFY_SOCKET

    def receive(self, timeout: float = 2.0) -> str:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode()

    def drain(self) -> list[str]:
        """Every datagram already waiting, without blocking."""
        self.sock.setblocking(False)
        messages = []
        while True:
            try:
                messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return messages


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        yield NotifySocket(sock, str(path))


@pytest.fixture
def abstract_socket() -> Iterator[NotifySocket]:
    name = f"fksroute-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        yield NotifySocket(sock, "@" + name)


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest) -> NotifySocket:
    return request.getfixturevalue(f"{request.param}_socket")


def test_ready_with_status(notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.name)
    notifier = Notifier.from_env()
    assert notifier.enabled
    assert notifier.ready("table 3f2a9c in force")
    assert notify_socket.receive() == "READY=1\nSTATUS=table 3f2a9c in force"
    assert notifier.ready()
    assert notify_socket.receive() == "READY=1"


def test_stopping_status_and_watchdog(notify_socket: NotifySocket) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": notify_socket.name})
    notifier.stopping()
    notifier.status("draining 2 alerts")
    notifier.watchdog()
    assert [notify_socket.receive() for _ in range(3)] == [
        "STOPPING=1", "STATUS=draining 2 alerts", "WATCHDOG=1"]


def test_reloading_carries_the_monotonic_time(notify_socket: NotifySocket) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": notify_socket.name})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = notify_socket.receive().split("\n")
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after


def test_the_reload_sequence_in_order(notify_socket: NotifySocket) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": notify_socket.name})
    notifier.ready("v1")
    notifier.reloading()
    notifier.ready("v2")
    notifier.stopping()
    firsts = [notify_socket.receive().split("\n")[0] for _ in range(4)]
    assert firsts == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]


def test_a_newline_in_a_status_cannot_forge_a_field(notify_socket: NotifySocket) -> None:
    Notifier.from_env({"NOTIFY_SOCKET": notify_socket.name}).status("bad\nREADY=1")
    assert notify_socket.receive() == "STATUS=bad READY=1"


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert not notifier.ready("x") and not notifier.watchdog() and not notifier.stopping()


def test_an_unreachable_socket_is_reported_not_raised(tmp_path: Path) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.enabled
    assert notifier.ready() is False


@pytest.mark.parametrize(("env", "expected"), [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
    ({}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
])
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env) == expected


def test_watchdog_interval_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 10.0


def test_watchdog_loop_pings_only_while_the_event_loop_runs(notify_socket: NotifySocket) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": notify_socket.name})

    async def scenario() -> tuple[list[str], list[str]]:
        task = asyncio.create_task(watchdog_loop(notifier, 0.01))
        await asyncio.sleep(0.1)
        running = notify_socket.drain()
        time.sleep(0.2)  # a blocked event loop, as a synchronous call on it would cause
        blocked = notify_socket.drain()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return running, blocked

    running, blocked = asyncio.run(scenario())
    assert len(running) >= 3 and set(running) == {"WATCHDOG=1"}
    assert blocked == []


def test_listen_sockets_ignores_variables_meant_for_another_process() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "web"}
    assert listen_sockets(env) == []
    assert env == {}


def test_listen_sockets_without_activation() -> None:
    assert listen_sockets({}) == []


# The child imitates the service manager: it moves the inherited socket to fd 3, sets
# LISTEN_PID to its own pid and execs Python with the daemon side's arguments, keeping that pid.
ACTIVATOR = textwrap.dedent("""
    import os, sys
    fd = int(sys.argv[1])
    os.dup2(fd, 3)
    os.close(fd)
    os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="fksroute.socket")
    os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
""")

DAEMON_SIDE = textwrap.dedent("""
    import os
    from fksroute.systemd import listen_sockets
    [sock] = listen_sockets()
    left = sorted(k for k in os.environ if k.startswith("LISTEN_"))
    print(sock.family.name, sock.type.name, os.get_inheritable(sock.fileno()), left, flush=True)
    conn, _ = sock.accept()
    conn.sendall(b"served by " + str(os.getpid()).encode())
    conn.close()
""")


def activate(python_args: list[str], **popen: Any) -> tuple[subprocess.Popen, int]:
    """Start `python *python_args` as systemd would, handing it a listening loopback socket; (child, port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        child = subprocess.Popen([sys.executable, "-c", ACTIVATOR, str(listener.fileno()), *python_args],
                                 pass_fds=(listener.fileno(),), **popen)
        # Closing our copy leaves the child the only holder of the socket.
        return child, listener.getsockname()[1]


def test_listen_sockets_takes_an_inherited_socket() -> None:
    child, port = activate(["-c", DAEMON_SIDE], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().split() == ["AF_INET", "SOCK_STREAM", "False", "[]"]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            assert conn.recv(100) == f"served by {child.pid}".encode()
        assert child.wait(timeout=5) == 0
    finally:
        child.kill()
        child.wait()


UVICORN_SIDE = textwrap.dedent("""
    import uvicorn
    from fksroute.systemd import listen_sockets

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    config = uvicorn.Config(app, lifespan="off", log_level="warning")
    uvicorn.Server(config).run(sockets=listen_sockets())
""")


def test_uvicorn_serves_the_activated_socket() -> None:
    child, port = activate(["-c", UVICORN_SIDE])
    try:
        # The socket already listens, so the request waits in the backlog while uvicorn starts.
        reply = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
        assert (reply.status_code, reply.text) == (200, "ok")
        child.send_signal(signal.SIGTERM)
        # uvicorn re-raises the captured SIGTERM after its graceful shutdown; systemd counts that as clean.
        assert child.wait(timeout=10) in (0, -signal.SIGTERM)
    finally:
        child.kill()
        child.wait()


def test_fksroute_serves_the_socket_systemd_passes(tmp_path: Path) -> None:
    shutil.copy(ROOT / "routes.yaml", tmp_path / "routes.yaml")
    with open(tmp_path / "daemon.log", "wb") as out:
        child, port = activate(["-m", "fksroute", "serve", "-c", str(tmp_path / "routes.yaml")],
                               cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    log = tmp_path / "daemon.log"
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=20) as client:
            # The passed socket is served instead of routes.yaml's server.port; the first request
            # waits in its backlog while the daemon starts, and /-/ready says 503 until it is up.
            deadline = time.monotonic() + 20
            while client.get("/-/ready").status_code != 200:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            reply = client.post("/webhook/tradingview", content=(ALERTS / "seed-buy-market.json").read_bytes())
            assert reply.status_code == 200 and reply.json()["success"] is True, reply.text
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=15) in (0, -signal.SIGTERM), log.read_text()
    finally:
        child.kill()
        child.wait()
