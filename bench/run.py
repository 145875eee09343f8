"""Benchmark `fksroute serve` on the shipped routes.yaml against a bare Starlette endpoint, with wrk.

Prints requests/s, p50 and p99 at each connection count, the ratio fksroute/bare, the daemon's
resident memory and its time from start to /-/ready. See bench/README.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WEBHOOK = "/webhook/tradingview"
ALERT = {"symbol": "BTC/USDT", "action": "buy", "order_type": "market", "quantity": 0.01, "confidence": 0.85}
# The goals of issue 2, printed beside the figures.
GOAL_RATIO, GOAL_P50_MS, GOAL_RSS_MB, GOAL_READY_S = 0.40, 2.0, 80.0, 1.5


@dataclass(frozen=True)
class Result:
    """One wrk run's figures."""

    target: str
    connections: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int
    duplicates: int
    unsuccessful: int
    loop_us: float     # CPU of the server's main thread (its event loop) per request
    others_us: float   # CPU of its other threads and of its child processes (the journal writer) per request


class Server:
    """A server process on a loopback port, stopped with SIGTERM."""

    def __init__(self, name: str, argv: list[str], port: int, cwd: Path, log: Path) -> None:
        self.name, self.port = name, port
        self._log = open(log, "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.log = log

    def wait_until(self, path: str, timeout: float = 30) -> float:
        """Seconds from process start until GET `path` answers 200."""
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                status, _ = request(self.port, "GET", path)
                if status == 200:
                    return time.monotonic() - self.started
            except OSError:
                pass
            time.sleep(0.005)
        raise SystemExit(f"{self.name} did not answer {path} within {timeout}s:\n{self.log.read_text()}")

    def memory_mb(self) -> tuple[float, float]:
        """Resident memory now and at its peak (VmRSS, VmHWM), in MB."""
        return _memory_mb(self.proc.pid)

    def children(self) -> list[int]:
        """The processes it started (fksroute's journal writer)."""
        pid = self.proc.pid
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]

    def children_mb(self) -> float:
        """Resident memory of the processes it started, in MB."""
        return sum(_memory_mb(child)[0] for child in self.children())

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU used so far (user and system) by the main thread, and by the other threads and the children."""
        pid = self.proc.pid
        main = _cpu_seconds(Path(f"/proc/{pid}/task/{pid}/stat"))
        process = _cpu_seconds(Path(f"/proc/{pid}/stat"))
        return main, max(0.0, process - main) + sum(_cpu_seconds(Path(f"/proc/{c}/stat")) for c in self.children())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def machine_ticks() -> list[int]:
    """The machine's CPU time so far by kind (user, nice, system, idle, iowait, irq, softirq, steal)."""
    return [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]


def _cpu_seconds(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime and stime


def _memory_mb(pid: int) -> tuple[float, float]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    kib = {key: int(value.split()[0]) for key, value in (line.split(":", 1) for line in status)
           if key in ("VmRSS", "VmHWM")}
    return kib["VmRSS"] / 1024, kib["VmHWM"] / 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
    """One plain HTTP request on loopback: (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=payload, headers={"Content-Type": "application/json"})
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def run_wrk(server: Server, connections: int, duration: int, symbols: int = 1) -> Result:
    """Drive one server with wrk (one thread, so wrk keeps to one core) and parse post.lua's line."""
    tag = f"{server.name}-{connections}-{time.time_ns()}"
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(BENCH / "post.lua"),
            f"http://127.0.0.1:{server.port}{WEBHOOK}", "--", tag, str(symbols)]
    before = server.cpu_seconds()
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    after = server.cpu_seconds()
    line = next((l for l in out.splitlines() if l.startswith("WRK_RESULT ")), None)
    if line is None:
        raise SystemExit(f"wrk printed no result:\n{out}")
    figures = json.loads(line.removeprefix("WRK_RESULT "))
    per_request = 1e6 / max(figures["requests"], 1)
    return Result(server.name, connections, figures["requests"] / (figures["duration_us"] / 1e6),
                  figures["p50_us"] / 1000, figures["p99_us"] / 1000,
                  figures["non_2xx"], figures["socket_errors"], figures["duplicates"], figures["unsuccessful"],
                  (after[0] - before[0]) * per_request, (after[1] - before[1]) * per_request)


def check_alert_is_executed(port: int) -> None:
    """Refuse to measure anything but real execution: the bench's alert must be filled by paper."""
    status, body = request(port, "POST", WEBHOOK, {**ALERT, "id": f"preflight-{time.time_ns()}"})
    reply = json.loads(body)
    if status != 200 or not reply.get("success") or reply.get("duplicate"):
        raise SystemExit(f"fksroute did not execute the bench alert: {status} {body.decode()}")


def median_of(runs: list[Result]) -> Result:
    """One line for the rounds of one server and connection count: the median of each figure,
    the sum of each count."""
    first = runs[0]
    return Result(first.target, first.connections,
                  *(statistics.median(getattr(r, f) for r in runs) for f in ("requests_per_s", "p50_ms", "p99_ms")),
                  *(sum(getattr(r, f) for r in runs) for f in ("non_2xx", "socket_errors", "duplicates", "unsuccessful")),
                  *(statistics.median(getattr(r, f) for r in runs) for f in ("loop_us", "others_us")))


def report(results: list[Result], ready_s: float, rss_idle: float, rss: tuple[float, float],
           writer_mb: float, steal: float) -> None:
    keys = list(dict.fromkeys((r.target, r.connections) for r in results))
    runs = {key: [r for r in results if (r.target, r.connections) == key] for key in keys}
    rounds = len(runs[keys[0]])
    print(f"{'target':<10}{'conns':>6}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'non-2xx':>9}{'sock err':>9}{'dup':>6}{'failed':>8}{'loop us':>9}{'other us':>9}")
    for key in keys:
        r = median_of(runs[key])
        print(f"{r.target:<10}{r.connections:>6}{r.requests_per_s:>10.0f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}"
              f"{r.non_2xx:>9}{r.socket_errors:>9}{r.duplicates:>6}{r.unsuccessful:>8}"
              f"{r.loop_us:>9.0f}{r.others_us:>9.0f}")
    print((f"medians of {rounds} rounds (counts summed); " if rounds > 1 else "")
          + "loop us: CPU of the event loop's thread per request; other us: its other threads and processes "
          "(fksroute: the journal writer)")
    for conns in sorted({c for _, c in keys}):
        # Each round's ratio is taken from the two servers measured one after the other in it.
        ratios = [d.requests_per_s / b.requests_per_s for d, b in zip(runs["fksroute", conns], runs["bare", conns])]
        spread = f" (rounds {min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
        print(f"ratio fksroute/bare at {conns} connection(s): {statistics.median(ratios):.2f}{spread}"
              + (f"  (goal >= {GOAL_RATIO:.2f} at 32)" if conns == 32 else ""))
    if ("fksroute", 1) in runs:
        print(f"fksroute p50 at 1 connection: {median_of(runs['fksroute', 1]).p50_ms:.2f} ms  (goal < {GOAL_P50_MS} ms)")
    print(f"fksroute resident memory: {rss_idle:.1f} MB when ready, {rss[0]:.1f} MB after the runs, "
          f"peak {rss[1]:.1f} MB  (goal < {GOAL_RSS_MB:.0f} MB); its journal writer process {writer_mb:.1f} MB")
    print(f"fksroute ready (/-/ready 200) {ready_s:.2f} s after start  (goal < {GOAL_READY_S} s)")
    print(f"CPU time the machine's host took for itself during the runs (steal): {steal:.1f}%"
          + ("  -- over 5%: the figures, and the ratio, are not to be trusted" if steal > 5 else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    parser.add_argument("--connections", default="1,32", help="comma-separated connection counts (default 1,32)")
    parser.add_argument("--symbols", type=int, default=1,
                        help="spread alerts over this many symbols (default 1: the seed alert's BTC/USDT); "
                             "alerts for one symbol execute in order, one at a time")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measure both servers this many times, alternating, and report medians (default 3): "
                             "a shared machine's speed drifts from one minute to the next")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (journal, logs)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install -y wrk", file=sys.stderr)
        return 2
    connections = [int(c) for c in args.connections.split(",")]
    rounds = max(1, args.rounds)

    workdir = Path(tempfile.mkdtemp(prefix="fksroute-bench-"))
    # A copy of the shipped table, so its relative journal path lands in the temporary directory.
    # The log goes one level up, into a file: the event loop writes it (see fksroute/logs.py).
    config = workdir / "etc" / "routes.yaml"
    config.parent.mkdir()
    shutil.copy(ROOT / "routes.yaml", config)
    daemon_port, bare_port = free_port(), free_port()
    daemon = Server("fksroute", [sys.executable, "-m", "fksroute", "serve", "-c", str(config),
                                 "--host", "127.0.0.1", "--port", str(daemon_port)],
                    daemon_port, workdir, workdir / "fksroute.log")
    bare = None
    try:
        ready_s = daemon.wait_until("/-/ready")
        rss_idle = daemon.memory_mb()[0]
        bare = Server("bare", [sys.executable, str(BENCH / "bare_app.py"), "--port", str(bare_port)],
                      bare_port, workdir, workdir / "bare.log")
        bare.wait_until("/-/ready")
        check_alert_is_executed(daemon_port)
        print(f"wrk: {args.duration}s per run, {rounds} round(s), connections {connections}, "
              f"{args.symbols} symbol(s); "
              f"work dir {workdir}", flush=True)
        results = []
        ticks = machine_ticks()
        for _ in range(rounds):
            for conns in connections:
                for server in (bare, daemon):
                    results.append(run_wrk(server, conns, args.duration, args.symbols))
        rss, writer_mb = daemon.memory_mb(), daemon.children_mb()
        spent = [after - before for before, after in zip(ticks, machine_ticks())]
        steal = 100 * spent[7] / max(sum(spent), 1)
    finally:
        daemon.stop()
        if bare is not None:
            bare.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report(results, ready_s, rss_idle, rss, writer_mb, steal)
    return 0


if __name__ == "__main__":
    sys.exit(main())
