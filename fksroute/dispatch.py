"""Execution: ordered lanes per (plugin, account, symbol), journaled before and after each send."""

from __future__ import annotations

import asyncio
import logging
import zlib
from typing import Any, Awaitable, Callable, Mapping

from fksroute.journal import OPEN, PENDING, SENT, Journal, JournalError, OrderRow
from fksroute.logs import say
from fksroute.metrics import Metrics
from fksroute.plugins.base import FAILED, PLACED, UNKNOWN, OrderRequest, OrderResult, Plugin

log = logging.getLogger("fksroute.dispatch")

Lane = tuple[str, str, str]
LOOKUP_TIMEOUT = 10.0
FOLLOW_FOR = 24 * 3600.0  # how long a placed order is followed for its fill
FOLLOW_MAX_INTERVAL = 30.0


def client_order_id(alert_id: str, route: str, position: int) -> str:
    """Derived from the alert and route: the same on every retry and after a restart.

    32 letters and digits (what every venue takes): `fks`, the alert's id, the order's position
    and two hex digits of a checksum of the three (CRC-32: stable everywhere, and cheap). Alert
    ids are time-ordered, so new orders go at the end of the journal's index instead of onto a
    random page of it, one page write per order."""
    check = zlib.crc32(f"{alert_id}:{route}:{position}".encode()) & 0xFF
    return f"fks{alert_id}{position:03x}{check:02x}"


def lane_of(request: OrderRequest) -> Lane:
    order = request.order
    return request.plugin, str(order.get("account") or ""), str(order.get("symbol") or "")


class Dispatcher:
    """Runs orders: one after another within a lane, lanes side by side."""

    def __init__(self, journal: Journal, metrics: Metrics, redact: Callable[[str], str] = lambda s: s,
                 follow_interval: float = 1.0) -> None:
        self.journal = journal
        self.metrics = metrics
        self.redact = redact
        self.follow_interval = follow_interval
        self._tails: dict[Lane, asyncio.Future] = {}  # a lane's last order: done once it has executed
        self.plugin_for: Callable[[str], Plugin | None] | None = None  # the plugin by name in the table in force
        self._busy: dict[int, int] = {}  # id(plugin) -> orders in flight
        self._idle: dict[int, asyncio.Event] = {}
        self._background: set[asyncio.Task] = set()
        self._running: set[asyncio.Task] = set()
        self.unknown_orders = 0  # orders whose outcome nobody knows: the user must look at the venue

    def submit(self, request: OrderRequest, plugin: Plugin | None, committed: asyncio.Future) -> asyncio.Future:
        """Queue `request` behind its lane's last order. Call in arrival order, without awaiting between.

        The returned future resolves to the order's result once it is journaled, or to None when
        the order was never executed (its alert could not be journaled). For a plugin that can
        take an order again after a crash (`resend_safe`), it resolves as soon as the plugin
        answers: its journal write follows, and recovery repeats the order exactly if a crash
        comes first, so that the answer need not wait for that commit."""
        execute_now = getattr(plugin, "execute_now", None)
        if execute_now is not None and getattr(plugin, "resend_safe", False):
            return self._in_line(request, plugin, execute_now, committed)
        return self._enqueue(request, plugin, committed, reconcile=False)

    def _in_line(self, request: OrderRequest, plugin: Plugin, execute_now: Callable[[OrderRequest], OrderResult],
                 committed: asyncio.Future) -> asyncio.Future:
        """An order of a plugin without I/O: run by callbacks once its alert is committed and its
        lane's previous order has executed, in the same turn of the loop, with no task of its own."""
        lane = lane_of(request)
        previous = self._tails.get(lane)
        executed: asyncio.Future = committed.get_loop().create_future()  # get_running_loop costs a getpid
        self._tails[lane] = executed
        self._hold(plugin)

        def run(_: asyncio.Future | None = None) -> None:
            if committed.cancelled() or committed.exception() is not None:
                result = None  # the alert was never accepted: nothing is sent (its sender answers 503)
            else:
                result = self._execute_now(request, execute_now)
            if self._tails.get(lane) is executed:
                del self._tails[lane]
            self._release(plugin)
            executed.set_result(result)
            if result is not None:
                self._finished(request, plugin, result)

        def ready(_: asyncio.Future) -> None:
            if previous is None or previous.done() or committed.cancelled() or committed.exception() is not None:
                run()
            else:
                previous.add_done_callback(run)

        committed.add_done_callback(ready)
        return executed

    def _execute_now(self, request: OrderRequest, execute_now: Callable[[OrderRequest], OrderResult]) -> OrderResult:
        try:
            return execute_now(request)
        except Exception as exc:  # a plugin bug must not lose the order's record
            log.exception("plugin %s raised on order %s", request.plugin, request.client_order_id)
            return OrderResult(FAILED, error=self.redact(f"{request.plugin}: {type(exc).__name__}: {exc}"))

    def _finished(self, request: OrderRequest, plugin: Plugin, result: OrderResult) -> None:
        """After an order in line: its result to the journal (retried in a task only if that
        fails), its count and its log line."""
        try:
            self.journal.record_result(request.client_order_id, result,
                                       on_failure=lambda _: self._retry_result(request, result))
        except JournalError:
            self._retry_result(request, result)
        self._report(request, plugin, result)

    def _retry_result(self, request: OrderRequest, result: OrderResult) -> None:
        task = asyncio.ensure_future(self._retry_journal(
            lambda: self.journal.record_result(request.client_order_id, result)))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    def _report(self, request: OrderRequest, plugin: Plugin | None, result: OrderResult) -> None:
        self._count(request, result)
        order = request.order
        say(log, logging.INFO, f"alert {request.alert_id} order {request.client_order_id} route={request.route} "
                               f"plugin={request.plugin} {order.get('side')} {order.get('quantity')} "
                               f"{order.get('symbol')}: {result.status}"
                               + (f" ({result.error})" if result.error else ""))
        if result.status in (PLACED, UNKNOWN) and plugin is not None:
            self.follow(request, plugin, result.status)

    def _enqueue(self, request: OrderRequest, plugin: Plugin | None, committed: Awaitable[Any],
                 reconcile: bool) -> asyncio.Future:
        lane = lane_of(request)
        previous = self._tails.get(lane)
        # The lane is held until this order has been executed, not until its result is on disk:
        # the next order's journal write then shares a commit with this one's result.
        loop = asyncio.get_running_loop()
        executed: asyncio.Future = loop.create_future()  # resolves to the plugin's result
        answered = executed if getattr(plugin, "resend_safe", False) else loop.create_future()
        self._tails[lane] = executed
        self._hold(plugin)
        task = asyncio.ensure_future(self._run(request, plugin, previous, committed, reconcile, executed))
        self._running.add(task)

        def done(t: asyncio.Task) -> None:
            self._running.discard(t)
            if not executed.done():
                executed.set_result(None)
            if not answered.done():
                answered.set_result(None if t.cancelled() or t.exception() is not None else t.result())
            if self._tails.get(lane) is executed:
                del self._tails[lane]
            self._release(plugin)

        task.add_done_callback(done)
        return answered

    async def _run(self, request: OrderRequest, plugin: Plugin | None, previous: asyncio.Future | None,
                   committed: Awaitable[Any], reconcile: bool, executed: asyncio.Future) -> OrderResult | None:
        if previous is not None and not previous.done():
            # Resolved once the previous order has executed, whatever its outcome (its failure is
            # its own: order is all we keep); cancelled only when the daemon is going down.
            await previous
        try:
            await committed
        except JournalError:
            return None  # the alert was never accepted: nothing is sent (its sender answers 503)
        if reconcile:
            result = await self._reconcile(request, plugin)
        elif plugin is None:
            result = OrderResult(FAILED, error=f"plugin {request.plugin!r} is not configured")
        else:
            if not getattr(plugin, "resend_safe", False):
                # A plugin that could execute an id twice needs to know, after a crash, that it was sent.
                await self._retry_journal(lambda: self.journal.mark_sent(request.client_order_id))
            result = await self._execute(request, plugin)
        if not executed.done():
            executed.set_result(result)
        await self._retry_journal(lambda: self.journal.record_result(request.client_order_id, result))
        self._report(request, plugin, result)
        return result

    async def _execute(self, request: OrderRequest, plugin: Plugin) -> OrderResult:
        try:
            return await plugin.execute(request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a plugin bug must not lose the order's record
            log.exception("plugin %s raised on order %s", request.plugin, request.client_order_id)
            return OrderResult(FAILED, error=self.redact(f"{request.plugin}: {type(exc).__name__}: {exc}"))

    async def _reconcile(self, request: OrderRequest, plugin: Plugin | None) -> OrderResult:
        """An order sent before a crash: ask the venue by client order id; never send blindly again.

        Only a plugin that declares `resend_safe` (it refuses a client order id it has seen, even
        across restarts) gets the order again when its look-up finds nothing."""
        if plugin is None:
            return OrderResult(UNKNOWN, error=f"outcome unknown: sent before a restart, and plugin "
                                              f"{request.plugin!r} is no longer configured to ask")
        found, failure = await self._ask(plugin, request)
        if failure is not None:
            log.warning("lookup of %s failed: %s", request.client_order_id, failure)
            return OrderResult(UNKNOWN, error="outcome unknown: sent before a restart and the venue could not be "
                                              "asked; check the venue before resending")
        if found is not None:
            log.info("order %s sent before the restart: found at the venue (%s)", request.client_order_id,
                     found.status)
            return found
        if getattr(plugin, "resend_safe", False):
            log.info("order %s sent before the restart never reached %s: sending it now", request.client_order_id,
                     request.plugin)
            return await self._execute(request, plugin)
        return OrderResult(UNKNOWN, error="outcome unknown: sent before a restart and not found at the venue; "
                                          "check the venue before resending")

    async def _ask(self, plugin: Plugin, request: OrderRequest) -> tuple[OrderResult | None, str | None]:
        """The venue's answer about `request` (None: it does not know it), or why it could not be asked."""
        try:
            return await asyncio.wait_for(plugin.lookup(request), LOOKUP_TIMEOUT), None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return None, self.redact(f"{type(exc).__name__}: {exc}")

    def _count(self, request: OrderRequest, result: OrderResult) -> None:
        self.metrics.order(request.plugin, result.status)
        if result.status == UNKNOWN:
            self.unknown_orders += 1
            self.metrics.unknown_orders.set(self.unknown_orders)

    async def _retry_journal(self, write: Callable[[], Awaitable[Any]]) -> None:
        """A journal write after acceptance must land: the order is ours to finish."""
        delay = 0.05
        while True:
            try:
                await write()
                return
            except JournalError as exc:
                log.error("journal write failed, retrying in %.1fs: %s", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    # --- placed (or unknown) orders: follow until final ----------------------------------------------------

    def follow(self, request: OrderRequest, plugin: Plugin, status: str = PLACED) -> None:
        task = asyncio.ensure_future(self._follow(request, plugin, status))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _follow(self, request: OrderRequest, plugin: Plugin, status: str) -> None:
        """Ask the venue about a placed (or unknown) order until it is final; a reload may have
        replaced the plugin instance meanwhile, so the one in force is asked."""
        loop = asyncio.get_running_loop()
        until = loop.time() + FOLLOW_FOR
        interval = self.follow_interval
        while loop.time() < until:
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, FOLLOW_MAX_INTERVAL)
            current = (self.plugin_for(request.plugin) if self.plugin_for else None) or plugin
            found, failure = await self._ask(current, request)
            if failure is not None:
                log.debug("follow-up of %s: %s", request.client_order_id, failure)
                continue
            if found is not None and found.status not in (PLACED, UNKNOWN):
                await self._retry_journal(lambda: self.journal.record_result(request.client_order_id, found))
                if status == UNKNOWN:
                    self.unknown_orders -= 1
                    self.metrics.unknown_orders.set(self.unknown_orders)
                self._count(request, found)
                log.info("order %s is now %s", request.client_order_id, found.status)
                return

    # --- after a restart ----------------------------------------------------------------------

    async def recover(self, rows: list[OrderRow], plugin_for: Callable[[str], Plugin | None]) -> int:
        """Resume what the journal left unfinished, in arrival order: pending orders run once,
        sent ones are reconciled, open ones are followed again. Returns how many were resumed."""
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        done.set_result(None)
        for row in rows:
            request = OrderRequest(row.client_order_id, row.alert_id, row.route or "", row.plugin or "",
                                   row.request or {})
            plugin = plugin_for(row.plugin or "")
            if row.state == PENDING:
                self._enqueue(request, plugin, done, reconcile=False)
            elif row.state == SENT:
                self._enqueue(request, plugin, done, reconcile=True)
            elif row.state == OPEN and plugin is not None:
                self.follow(request, plugin)
        if rows:
            log.info("recovered %d unfinished orders from the journal", len(rows))
        return len(rows)

    # --- plugin lifetimes ---------------------------------------------------------------------

    def _hold(self, plugin: Plugin | None) -> None:
        if plugin is not None:
            self._busy[id(plugin)] = self._busy.get(id(plugin), 0) + 1

    def _release(self, plugin: Plugin | None) -> None:
        if plugin is None:
            return
        key = id(plugin)
        self._busy[key] -= 1
        if self._busy[key] == 0:
            del self._busy[key]
            event = self._idle.pop(key, None)
            if event is not None:
                event.set()

    async def wait_idle(self, plugin: Plugin, timeout: float | None = None) -> None:
        """Wait until no order of `plugin` is in flight (before closing a removed plugin)."""
        if id(plugin) not in self._busy:
            return
        event = self._idle.setdefault(id(plugin), asyncio.Event())
        await asyncio.wait_for(event.wait(), timeout)

    async def drain(self, timeout: float) -> bool:
        """Let in-flight orders finish (bounded); True when all did."""
        pending: list[asyncio.Future] = [t for t in self._running if not t.done()]
        pending += [f for f in self._tails.values() if not f.done()]  # orders in line, awaiting their commit
        if pending:
            _, still = await asyncio.wait(pending, timeout=timeout)
            if still:
                return False
        return True

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    def in_flight(self) -> int:
        return sum(self._busy.values())


def result_entry(route: str, plugin: str | None, result: OrderResult | None, status: str | None = None,
                 order: Mapping[str, Any] | None = None, error: str | None = None,
                 client_order_id: str | None = None) -> dict[str, Any]:
    """One element of a webhook reply's `results`."""
    entry: dict[str, Any] = {
        "route": route, "plugin": plugin,
        "status": status or (result.status if result else None),
        "order_id": result.order_id if result else None,
        "error": error if error is not None else (result.error if result else None),
    }
    if client_order_id:
        entry["client_order_id"] = client_order_id
    if result is not None and result.filled_quantity is not None:
        entry["filled_quantity"] = result.filled_quantity
    if result is not None and result.average_price is not None:
        entry["average_price"] = result.average_price
    # The entry is encoded at once and kept nowhere: plain dicts go in as they are.
    if order is not None:
        entry["order"] = order if type(order) is dict else dict(order)
    if result is not None and result.detail:
        entry["detail"] = result.detail if type(result.detail) is dict else dict(result.detail)
    return entry
