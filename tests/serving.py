"""Start a real `fksroute serve` process on a loopback port, for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """One running `fksroute serve`; its output goes to `log_path`."""

    def __init__(self, config: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = (),
                 port: int | None = None) -> None:
        self.config = Path(config)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.config.parent / f"daemon-{self.port}.log"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fksroute", "serve", "-c", str(self.config),
             "--host", "127.0.0.1", "--port", str(self.port), *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=self.config.parent,
        )
        self.client = httpx.Client(base_url=self.url, timeout=10)

    def wait_ready(self, timeout: float = 20) -> "Daemon":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fksroute exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if self.client.get("/-/ready").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"fksroute not ready after {timeout}s:\n{self.logs()}")

    def post(self, path: str = "/webhook/tradingview", **kwargs) -> httpx.Response:
        return self.client.post(path, **kwargs)

    def get(self, path: str, **kwargs) -> httpx.Response:
        return self.client.get(path, **kwargs)

    def logs(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        # Our idle keep-alive connection first: a TLS server waits for it to say goodbye.
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def start_daemon(config: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = (),
                 port: int | None = None) -> Daemon:
    """Start `python -m fksroute serve -c CONFIG` on 127.0.0.1 and wait until /-/ready answers 200."""
    return Daemon(config, env, args, port).wait_ready()


def write_routes(directory: Path, text: str, name: str = "routes.yaml") -> Path:
    """Write a routes file (dedented) into `directory` and return its path."""
    path = Path(directory) / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def read_ledger(path: Path) -> list[dict]:
    """The fills a paper plugin's `ledger:` file holds, in the order they happened."""
    if not Path(path).exists():
        return []
    entries = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            pass  # a line torn by a crash is no fill
    return entries


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text output; 0 when it is absent."""
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample == wanted:
            return float(value)
    return 0.0
