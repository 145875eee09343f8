"""Helpers for the agent tests: certificates in a temp dir, a real agent on a loopback port, its plugin."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from fksroute.agents.service import AgentService, Backend, build_server
from fksroute.certs import write_certificates
from fksroute.plugins.base import PluginContext

FAKE_MT5 = Path(__file__).parent / "fake_mt5"


def make_certs(directory: Path, hosts: tuple[str, ...] = ()) -> dict[str, Path]:
    """ca/agent/daemon certificates, as `fksroute certs DIR` makes them."""
    return write_certificates(directory, hosts)


@contextlib.contextmanager
def running_agent(backend: Backend, certs: dict[str, Path], allowed_cns: tuple[str, ...] = (),
                  port: int = 0) -> Iterator[Any]:
    """A real agent server (rpyc ThreadPoolServer over mutual TLS) on 127.0.0.1, in a thread."""
    service = AgentService(backend)
    server = build_server(service, host="127.0.0.1", port=port, cert=certs["agent.pem"], key=certs["agent.key"],
                          ca=certs["ca.pem"], allowed_cns=allowed_cns, threads=4)
    thread = threading.Thread(target=server.start, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not server.active and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield server
    finally:
        server.close()
        thread.join(5)


def agent_settings(type_name: str, certs: dict[str, Path], port: int, **agent: Any) -> dict[str, Any]:
    """A plugin's routes.yaml mapping pointing at an agent on 127.0.0.1:`port`."""
    return {"type": type_name, "agent": {"host": "127.0.0.1", "port": port, "ca": str(certs["ca.pem"]),
                                         "cert": str(certs["daemon.pem"]), "key": str(certs["daemon.key"]),
                                         "timeout": 2, **agent}}


def context(base_dir: Path) -> PluginContext:
    return PluginContext(base_dir=base_dir, logger=logging.getLogger("tests.agent"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"agent exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def agent_command(args: list[str], log_file: Path, port: int) -> list[str]:
    """`fksroute agent ARGS` (the agent commands alone, so it runs without the daemon's CLI)."""
    return [sys.executable, "-m", "fksroute.agents.main", "agent", *args, "--listen", f"127.0.0.1:{port}",
            "--log-file", str(log_file)]


def with_fake_mt5(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment with the stand-in MetaTrader5 importable."""
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FAKE_MT5), env.get("PYTHONPATH")]))
    return env


def spawn_agent(args: list[str], log_file: Path, port: int, env: dict[str, str] | None = None,
                stderr: Any = subprocess.DEVNULL) -> subprocess.Popen:
    """The agent as its own process, once it listens."""
    proc = subprocess.Popen(agent_command(args, log_file, port), stdout=subprocess.DEVNULL, stderr=stderr,
                            env=env)
    wait_for_port(port, proc)
    return proc
