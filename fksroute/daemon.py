"""The running daemon: owns the table reference, the journal, the dispatcher and their lifecycle."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from fksroute import config
from fksroute.dedup import DedupCache
from fksroute.deployment import CLOSE_TIMEOUT, Deployment, PluginStartError, close_plugins, deploy, retired
from fksroute.dispatch import Dispatcher
from fksroute.journal import Journal, JournalError
from fksroute.logs import REDACTOR, stop_logging
from fksroute.metrics import Metrics
from fksroute.routing import RoutingTable
from fksroute.security import RateLimiter
from fksroute.systemd import Notifier
from fksroute.webhook import WebhookHandler

log = logging.getLogger("fksroute.daemon")
DRAIN_TIMEOUT = 10.0
JOURNAL_LOST_EXIT = 75  # EX_TEMPFAIL: the journal's writer died; a restart is the remedy


@dataclass(frozen=True)
class ReloadOutcome:
    ok: bool
    version: str | None
    generation: int
    errors: tuple[str, ...] = ()
    changed: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "version": self.version, "generation": self.generation,
                "changed": self.changed, "errors": list(self.errors)}


@dataclass
class _ReloadQueue:
    """Triggers arriving while a reload waits are merged into it; one reload runs at a time."""

    daemon: "Daemon"
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    waiting: asyncio.Future | None = None
    triggers: set[str] = field(default_factory=set)
    runs: set[asyncio.Task] = field(default_factory=set)

    async def request(self, trigger: str) -> ReloadOutcome:
        if self.waiting is None:
            self.waiting = asyncio.get_running_loop().create_future()
            self.triggers = set()
            run = asyncio.ensure_future(self._run())
            self.runs.add(run)
            run.add_done_callback(self.runs.discard)
        self.triggers.add(trigger)
        return await asyncio.shield(self.waiting)

    async def idle(self) -> None:
        """Wait for the reloads asked for so far (at a stop, before the plugins are closed)."""
        if self.runs:
            await asyncio.wait(list(self.runs))

    async def _run(self) -> None:
        async with self.lock:
            future, triggers = self.waiting, self.triggers
            self.waiting = None
            assert future is not None
            try:
                outcome = await self.daemon._reload(sorted(triggers))
            except Exception as exc:  # never leave a waiter hanging
                log.exception("reload failed")
                outcome = ReloadOutcome(False, self.daemon.version, self.daemon.generation,
                                        (f"reload failed: {type(exc).__name__}",))
            future.set_result(outcome)


class Daemon:
    """Everything `fksroute serve` keeps alive between requests."""

    def __init__(self, config_path: Path, env: Mapping[str, str] | None = None) -> None:
        self.config_path = Path(config_path)
        self.env = env
        self.metrics = Metrics()
        self.notifier = Notifier.from_env()
        self.deployment: Deployment | None = None
        self.journal: Journal | None = None  # type: ignore[assignment]
        self.dispatcher: Dispatcher | None = None  # type: ignore[assignment]
        self.dedup = DedupCache()
        self.rate_limiter: RateLimiter | None = None
        self.webhook = WebhookHandler(self)
        self.ready = False
        self.stopping = False
        self.generation = 0
        self.last_reload_ok = True
        self.last_error: str | None = None
        self._reloads = _ReloadQueue(self)
        self._tasks: set[asyncio.Task] = set()
        self._retiring: set[asyncio.Task] = set()

    @property
    def unknown_orders(self) -> int:
        """Orders whose outcome is unknown (sent before a crash, not found at the venue)."""
        return self.dispatcher.unknown_orders if self.dispatcher is not None else 0

    @property
    def version(self) -> str | None:
        return self.deployment.table.version if self.deployment else None

    def load(self) -> RoutingTable:
        """Load the routes file; raises SystemExit with every located error."""
        table = config.load_file(self.config_path, self.env)
        if isinstance(table, list):
            raise SystemExit("\n".join(str(e) for e in table))
        return table

    async def start(self, table: RoutingTable) -> None:
        """Open the journal, start the plugins, resume unfinished orders, then become ready."""
        self.journal = Journal(table.server.journal, on_lost=self._journal_lost)
        try:
            self.journal.open()
        except JournalError as exc:
            raise SystemExit(str(exc)) from None
        REDACTOR.secrets = table.secrets
        self.dispatcher = Dispatcher(self.journal, self.metrics, redact=REDACTOR)
        self.dispatcher.plugin_for = lambda name: self.deployment.plugins.get(name) if self.deployment else None
        self.generation = 1
        try:
            self.deployment = await deploy(table, None, self.generation)
        except PluginStartError as exc:
            self.journal.close()
            raise SystemExit(str(exc)) from None
        self._apply_security(table)
        if table.security.secret is None and table.security.path_token is None:
            log.warning("no security.secret is set: anyone who can reach the port can send orders")
        await self._load_dedup(table)
        # Counted before recovery, which adds the orders it cannot reconcile.
        self.dispatcher.unknown_orders = await self.journal.count_unknown()
        self.metrics.unknown_orders.set(self.dispatcher.unknown_orders)
        rows = await self.journal.unfinished()
        await self.dispatcher.recover(rows, lambda name: self.deployment.plugins.get(name) if self.deployment else None)
        self._record_reload_metrics(True, "start")
        log.info("routes %s in force: version %s, %d routes, plugins %s", self.config_path, table.version,
                 len(table.routes), ", ".join(f"{n} ({s.type})" for n, s in table.plugins.items()))

    def _journal_lost(self, why: str) -> None:
        """The journal's writer is gone: nothing can be accepted or finished any more. Stop at once,
        as a crash would: systemd restarts fksroute (Restart=on-failure), and recovery and the dedup
        window, both read from the journal, resume what was in flight and know the resends."""
        log.critical("journal: %s; fksroute stops now so that a restart resumes what was in flight", why)
        stop_logging()
        os._exit(JOURNAL_LOST_EXIT)

    def become_ready(self) -> None:
        if self.stopping:
            return
        self.ready = True
        self.notifier.ready(f"serving routes version {self.version}")

    async def _load_dedup(self, table: RoutingTable) -> None:
        """Alerts accepted before a restart still count as seen, for their window."""
        windows = [r.dedup_window.total_seconds() for r in table.routes]
        if table.defaults is not None:
            windows.append(table.defaults.dedup_window.total_seconds())
        window = max(windows or [60.0])
        now = time.time()
        for key, alert_id, received_at, status, _ in await self.journal.dedup_entries(now - window):
            # A resend gets the first delivery's status (202 for an async alert) and its orders as
            # the journal holds them (see WebhookHandler._duplicate).
            self.dedup.add(key, alert_id, received_at + window - now, False, now, status=status or 200)

    def _apply_security(self, table: RoutingTable) -> None:
        s = table.security
        if s.rate_per_minute:
            current = self.rate_limiter
            if current is None or (current.rate, current.burst) != (s.rate_per_minute / 60.0, float(s.rate_burst)):
                self.rate_limiter = RateLimiter(s.rate_per_minute, s.rate_burst)
        else:
            self.rate_limiter = None

    # --- reload ---------------------------------------------------------------------------

    async def reload(self, trigger: str) -> ReloadOutcome:
        """Ask for a reload and wait for its outcome; bursts of triggers share one reload."""
        return await self._reloads.request(trigger)

    async def _reload(self, triggers: list[str]) -> ReloadOutcome:
        trigger = triggers[0] if len(triggers) == 1 else "+".join(triggers)
        if self.stopping:
            return ReloadOutcome(False, self.version, self.generation, ("fksroute is stopping",), changed=False)
        # RELOADING=1 ... READY=1 only around a reload of a daemon that said READY=1 already.
        announce = self.ready
        if announce:
            self.notifier.reloading()
        try:
            outcome = await self._build_and_swap()
        finally:
            if announce and not self.stopping:
                self.notifier.ready(f"serving routes version {self.version}")
        for t in triggers:
            self.metrics.reloads.labels(t, "success" if outcome.ok else "failure").inc()
        self._record_reload_metrics(outcome.ok, trigger)
        if outcome.ok and outcome.changed:
            log.info("reload (%s): version %s in force, generation %d", trigger, outcome.version, outcome.generation)
        elif outcome.ok:
            log.info("reload (%s): unchanged, version %s", trigger, outcome.version)
        else:
            log.error("reload (%s) refused, version %s stays in force:\n%s", trigger, self.version,
                      "\n".join(outcome.errors))
        return outcome

    async def _build_and_swap(self) -> ReloadOutcome:
        old = self.deployment
        assert old is not None
        loaded = await asyncio.to_thread(config.load_file, self.config_path, self.env)
        if isinstance(loaded, list):
            return self._refused(tuple(str(e) for e in loaded))
        if loaded.version == old.table.version:
            self.last_reload_ok, self.last_error = True, None
            return ReloadOutcome(True, loaded.version, self.generation, changed=False)
        changed = _server_changes(old.table, loaded)
        if changed:
            return self._refused((f"{loaded.source}: restart required: server settings changed ({', '.join(changed)})",))
        try:
            new = await deploy(loaded, old, self.generation + 1)
        except PluginStartError as exc:
            return self._refused((f"{loaded.source}: {exc}",))
        # The swap: one reference. Requests in flight keep the deployment they started with.
        self.deployment = new
        self.generation = new.generation
        # Old secrets stay redacted: orders still in flight on retired plugins may log them.
        REDACTOR.secrets = REDACTOR.secrets | loaded.secrets
        self._apply_security(loaded)
        self.last_reload_ok, self.last_error = True, None
        retiring = asyncio.ensure_future(self._retire(old, new))
        self._retiring.add(retiring)
        retiring.add_done_callback(self._retiring.discard)
        return ReloadOutcome(True, loaded.version, self.generation)

    def _refused(self, errors: tuple[str, ...]) -> ReloadOutcome:
        self.last_reload_ok = False
        self.last_error = "\n".join(errors)
        return ReloadOutcome(False, self.version, self.generation, errors)

    async def _retire(self, old: Deployment, new: Deployment) -> None:
        """Close the plugins the new table dropped, once their orders in flight are done."""
        gone = retired(old, new)
        try:
            for plugin in gone:
                try:
                    await self.dispatcher.wait_idle(plugin, timeout=300)
                except asyncio.TimeoutError:
                    log.warning("plugin %s still busy after 300 s; closing it anyway", plugin.name)
        finally:
            await close_plugins(gone)

    def _record_reload_metrics(self, ok: bool, trigger: str) -> None:
        m = self.metrics
        m.reload_ok.set(1 if ok else 0)
        if ok and self.deployment is not None:
            m.reload_time.set(time.time())
            m.config_hash.set(int(self.deployment.table.version[:12], 16))
            m.config_info.clear()
            m.config_info.labels(self.deployment.table.version, str(self.generation)).set(1)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- health and stop ----------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        plugins: dict[str, Any] = {}
        deployment = self.deployment
        if deployment is not None:
            for name, plugin in deployment.plugins.items():
                try:
                    plugins[name] = dict(await asyncio.wait_for(plugin.health(), 2.0))
                except Exception as exc:
                    plugins[name] = {"healthy": False, "error": f"health check failed: {type(exc).__name__}"}
                self.metrics.plugin_up.labels(name).set(1 if plugins[name].get("healthy") else 0)
        journal_ok = self.journal is not None and self.journal.healthy
        degraded = (not all(p.get("healthy") for p in plugins.values()) or not journal_ok
                    or not self.last_reload_ok or self.unknown_orders > 0)
        return {
            "status": "degraded" if degraded else "ok",
            "ready": self.ready,
            "plugins": plugins,
            "journal": {"healthy": journal_ok, "path": str(self.journal.path) if self.journal else None,
                        "error": self.journal.last_error if self.journal else None,
                        "unknown_orders": self.unknown_orders},
            "config": {
                "path": str(self.config_path), "version": self.version, "generation": self.generation,
                "loaded_at": deployment.loaded_at if deployment else None,
                "last_reload_ok": self.last_reload_ok, "last_error": self.last_error,
            },
        }

    def begin_stop(self) -> None:
        """First step of a graceful stop: /-/ready answers 503 and no new alert is taken."""
        if not self.stopping:
            self.stopping = True
            self.ready = False
            self.notifier.stopping()
            log.info("stopping: no new alerts; finishing those in flight")

    async def stop(self) -> None:
        """Finish the orders in flight (bounded), close the plugins, then the journal."""
        self.begin_stop()
        await self._reloads.idle()  # a reload that started may still swap in new plugins: let it
        drained = True
        if self.dispatcher is not None:
            drained = await self.dispatcher.drain(DRAIN_TIMEOUT)
            if not drained:
                log.warning("orders still in flight after %.0f s; they resume at the next start", DRAIN_TIMEOUT)
            await self.dispatcher.close()
        if self._retiring and drained:
            await asyncio.wait(list(self._retiring), timeout=CLOSE_TIMEOUT)  # idle now: they close
        # Cancelling a retirement that still waits closes its plugins at once (see _retire).
        tasks = list(self._tasks | self._retiring)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.deployment is not None:
            await close_plugins(list(self.deployment.plugins.values()))
        if self.journal is not None:
            self.journal.close()  # a moment on the loop: nothing else runs at this point
        log.info("stopped")


def _server_changes(old: RoutingTable, new: RoutingTable) -> list[str]:
    """Names of `server:` fields that differ: those are read at start only."""
    names = ("host", "port", "journal", "tls")
    return [f"server.{n}" for n in names if getattr(old.server, n) != getattr(new.server, n)]
