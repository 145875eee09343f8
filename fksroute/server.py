"""`fksroute serve`: the daemon under uvicorn, with reload triggers, systemd and a graceful stop."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import ssl
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import uvicorn

from fksroute import logs
from fksroute.app import create_app
from fksroute.daemon import Daemon
from fksroute.systemd import listen_sockets, watchdog_interval, watchdog_loop
from fksroute.watcher import watch_files

log = logging.getLogger("fksroute.server")
# After SIGTERM, /-/ready answers 503 this long before the port closes, so that a health checker
# sees the stop coming and an alert arriving meanwhile gets a 503 (which TradingView resends).
STOP_GRACE = 0.5
GC_THRESHOLD = 10000


class _Server(uvicorn.Server):
    """uvicorn, stopped the daemon's way: readiness drops at once, the port closes STOP_GRACE later.

    A stop signal is a request for a clean stop, so after it the process exits 0; uvicorn's
    own handler would re-raise the signal once stopped, and the process would die of it.
    """

    def __init__(self, config: uvicorn.Config, daemon: Daemon) -> None:
        super().__init__(config)
        self.daemon = daemon
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[Any] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        # A signal handler interrupts whatever runs: hand the work to the event loop.
        if self._loop is None:
            self.should_exit = True
        else:
            self._loop.call_soon_threadsafe(self._stop_requested)

    def _stop_requested(self) -> None:
        assert self._loop is not None
        if not self.daemon.stopping:
            self.daemon.begin_stop()
            self._loop.call_later(STOP_GRACE, setattr, self, "should_exit", True)
        elif not self.should_exit:
            self.should_exit = True  # a second signal: no grace
        else:
            self.force_exit = True  # a third: stop waiting for open connections


def serve(config_path: Path, host: str | None = None, port: int | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT; exit code 0 after a clean stop."""
    # Each alert allocates a few hundred objects, nearly all freed by reference counting: collect
    # cycles less often than every 700 allocations (the default), at the price of a little memory.
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
    # Until the lifespan takes SIGHUP for reloads, one must not end the process (its default).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    daemon = Daemon(config_path)
    table = daemon.load()
    stop_watching = asyncio.Event()
    server: _Server | None = None

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        logs.attach_loop(loop)
        try:
            await daemon.start(table)
            loop.add_signal_handler(signal.SIGHUP, lambda: daemon._spawn(daemon.reload("sighup")))
            daemon._spawn(watch_files(daemon, stop_watching))
            interval = watchdog_interval()
            if interval:
                daemon._spawn(watchdog_loop(daemon.notifier, interval))
            daemon._spawn(_ready_when_listening(server, daemon))
            try:
                yield
            finally:
                stop_watching.set()
                await daemon.stop()
        finally:
            logs.detach_loop()

    settings = table.server
    options: dict[str, Any] = {}
    if settings.tls is not None:
        options.update(ssl_certfile=str(settings.tls.cert), ssl_keyfile=str(settings.tls.key))
        if settings.tls.client_ca is not None:
            options.update(ssl_ca_certs=str(settings.tls.client_ca),
                           ssl_cert_reqs=ssl.CERT_REQUIRED if settings.tls.require_client_cert else ssl.CERT_OPTIONAL)
    config = uvicorn.Config(
        create_app(daemon, lifespan), host=host or settings.host, port=port if port is not None else settings.port,
        log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=10,
        server_header=False, proxy_headers=False, **options)
    server = _Server(config, daemon)
    sockets = listen_sockets()
    server.run(sockets=sockets or None)
    return 0 if server.started else 1


async def _ready_when_listening(server: uvicorn.Server | None, daemon: Daemon) -> None:
    """READY=1 only once the table is in force and the port is open."""
    while server is not None and not server.started:
        if server.should_exit or daemon.stopping:
            return
        await asyncio.sleep(0.01)
    # What start-up built (modules, the table, the plugins) lives as long as the process: kept out
    # of the cyclic collector's way, so that its collections scan only what alerts allocate.
    gc.collect()
    gc.freeze()
    daemon.become_ready()
