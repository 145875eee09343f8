"""`fksroute serve`: the daemon under uvicorn, with reload triggers, systemd and a graceful stop."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import uvicorn
import watchfiles

from fksroute.app import create_app
from fksroute.daemon import REDACTOR, Daemon
from fksroute.systemd import listen_sockets, watchdog_interval, watchdog_loop

log = logging.getLogger("fksroute.server")
# Files beside routes.yaml that change all the time and never affect routing.
_NOISE_SUFFIXES = (".sqlite", ".sqlite-wal", ".sqlite-shm", ".sqlite-journal", ".log")


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(REDACTOR)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # watchfiles reports every change it sees, the journal's own writes included.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)


def _watched(daemon: Daemon) -> set[Path]:
    table = daemon.deployment.table if daemon.deployment else None
    paths = {daemon.config_path.absolute(), daemon.config_path.resolve()}
    paths.update(Path(p).resolve() for p in (table.files if table else ()))
    return paths


def _relevant(changes: set[tuple[Any, str]], daemon: Daemon) -> bool:
    watched = _watched(daemon)
    for _, changed in changes:
        path = Path(changed)
        if path.name.endswith(_NOISE_SUFFIXES):
            continue
        # `..data`-style symlink swaps replace a directory link, not the file itself.
        if path in watched or path.resolve() in watched or path.name.startswith(".."):
            return True
    return False


async def watch_files(daemon: Daemon, stop: asyncio.Event) -> None:
    """Reload when routes.yaml, or a schema or secret file it references, is saved."""
    directories = {p.parent for p in _watched(daemon)} | {daemon.config_path.absolute().parent}
    async for changes in watchfiles.awatch(*directories, debounce=100, step=25, stop_event=stop,
                                           recursive=False, force_polling=None):
        if _relevant(changes, daemon):
            await daemon.reload("watch")


class _Server(uvicorn.Server):
    """uvicorn, with readiness dropped the moment a stop is asked for."""

    def __init__(self, config: uvicorn.Config, daemon: Daemon) -> None:
        super().__init__(config)
        self.daemon = daemon

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.daemon.begin_stop()
        super().handle_exit(sig, frame)


def serve(config_path: Path, host: str | None = None, port: int | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT; exit code 0 after a clean stop."""
    daemon = Daemon(config_path)
    table = daemon.load()
    stop_watching = asyncio.Event()
    server: _Server | None = None

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        await daemon.start(table)
        loop = asyncio.get_running_loop()
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
    try:
        server.run(sockets=sockets or None)
    except SystemExit:
        raise
    return 0 if server.started or daemon.stopping else 1


async def _ready_when_listening(server: uvicorn.Server | None, daemon: Daemon) -> None:
    """READY=1 only once the table is in force and the port is open."""
    while server is not None and not server.started:
        if server.should_exit:
            return
        await asyncio.sleep(0.01)
    daemon.become_ready()
