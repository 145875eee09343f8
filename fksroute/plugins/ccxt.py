"""The `ccxt` plugin: orders on crypto exchanges through ccxt.async_support, checked against the market first.

The checks against the market are in `markets`, the circuit breaker in `breaker`; this module talks
to the exchange. ccxt is imported here (and lazily in `markets`): it is slow to import, and the daemon
loads this module only when a `ccxt` plugin is configured.
"""

from __future__ import annotations

import asyncio
import enum
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Mapping, TypeVar

import aiohttp
import ccxt.async_support as ccxt_async

from fksroute.plugins.base import (DRY_RUN, FAILED, FILLED, PLACED, UNKNOWN, OrderRequest, OrderResult,
                                   PluginContext, back_off, settings_from_mapping)
from fksroute.plugins.breaker import CIRCUIT_OPEN, CircuitBreaker
from fksroute.plugins.markets import MarketRefusal, OrderCall, plain, plan_order, wants_reference_price

T = TypeVar("T")


@dataclass(frozen=True)
class CcxtSettings:
    """A `ccxt` plugin's settings (schemas/ccxt.plugin.schema.json), with the schema's defaults."""

    exchange: str
    api_key: str | None = None
    secret: str | None = None
    password: str | None = None
    testnet: bool = False
    dry_run: bool = False
    default_type: str | None = None
    ccxt: Mapping[str, Any] = field(default_factory=dict)
    timeout: float = 10.0
    order_timeout: float = 30.0
    retries: int = 3
    retry_backoff: float = 0.5
    retry_backoff_max: float = 4.0
    markets_retry_max: float = 60.0
    circuit_failures: int = 5
    circuit_cooldown: float = 30.0

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> "CcxtSettings":
        """Build from the routes.yaml mapping (already validated against the plugin schema)."""
        breaker = settings.get("circuit_breaker") or {}
        flat = {**settings, **{f"circuit_{k}": breaker[k] for k in ("failures", "cooldown") if k in breaker}}
        return settings_from_mapping(cls, flat)


class Found(enum.Enum):
    """What a look-up by client order id learned."""

    YES = "yes"
    NO = "no"
    UNKNOWN = "unknown"


class _Final(Exception):
    """How one order ended when no order came back: status, safe message, and whether the venue answered."""

    def __init__(self, status: str, message: str, venue_answered: bool) -> None:
        super().__init__(message)
        self.status, self.message, self.venue_answered = status, message, venue_answered


@dataclass
class _Attempts:
    """What one order cost: create attempts and look-ups (journaled in the result's detail)."""

    sent: int = 0
    lookups: int = 0
    found_by_lookup: bool = False

    def as_json(self) -> dict[str, Any]:
        return {"attempts": self.sent, "lookups": self.lookups, "found_by_lookup": self.found_by_lookup}


def build_exchange(settings: CcxtSettings) -> Any:
    """A ccxt.async_support exchange for `settings`, in sandbox mode when `testnet` (no I/O happens here)."""
    if settings.exchange not in ccxt_async.exchanges:
        raise ValueError(f"ccxt has no exchange named {settings.exchange!r}")
    config = plain(settings.ccxt)
    config.setdefault("timeout", int(settings.timeout * 1000))
    config.setdefault("enableRateLimit", True)
    for key, value in (("apiKey", settings.api_key), ("secret", settings.secret),
                       ("password", settings.password)):
        if value:
            config[key] = value
    if settings.default_type:
        config.setdefault("options", {})["defaultType"] = settings.default_type
    exchange = getattr(ccxt_async, settings.exchange)(config)
    if settings.testnet:
        try:
            exchange.set_sandbox_mode(True)
        except Exception as e:
            raise ValueError(f"{settings.exchange} has no testnet in ccxt ({type(e).__name__}); "
                             "set testnet: false and point ccxt.urls at a test server") from e
    return exchange


def _never_reached(error: BaseException) -> bool:
    """True when the connection was never made, so the request cannot have reached the exchange."""
    return isinstance(error.__cause__, (aiohttp.ClientConnectorError, socket.gaierror))


def _may_have_reached(error: BaseException) -> bool:
    """Whether a failed create may still have placed the order (then look it up before any resend)."""
    if isinstance(error, (ccxt_async.DDoSProtection, ccxt_async.InvalidNonce)):
        return False  # refused before execution: rate limit, or a stale timestamp
    return not _never_reached(error)


class CcxtPlugin:
    """A crypto exchange through ccxt: market checks, retries with one client order id, circuit breaker."""

    def __init__(self, name: str, settings: Mapping[str, Any], context: PluginContext) -> None:
        self.name = name
        self.settings = CcxtSettings.from_mapping(settings)
        self._log = context.logger
        self._exchange = build_exchange(self.settings)
        self._breaker = CircuitBreaker(self.settings.circuit_failures, self.settings.circuit_cooldown)
        self._markets_task: asyncio.Task[None] | None = None
        self._markets_loaded = False
        self._last_error: str | None = None
        self._secrets = [s for s in (self.settings.api_key, self.settings.secret, self.settings.password)
                         if s and len(s) >= 4]

    # the Plugin interface ----------------------------------------------------------------

    async def start(self) -> None:
        """Load the markets in the background, retrying with backoff until they come."""
        if not self.settings.dry_run and not self.settings.api_key:
            self._log.warning("plugin %s: no api_key for %s: orders will be refused by the exchange",
                              self.name, self.settings.exchange)
        self._markets_task = asyncio.create_task(self._keep_loading_markets(), name=f"{self.name}-markets")

    async def execute(self, request: OrderRequest) -> OrderResult:
        """Check, round and send one order (with its stop loss and take profit); never raises for venue errors."""
        if not self._breaker.allow():
            return OrderResult(FAILED, error=CIRCUIT_OPEN, detail={"circuit": self._breaker.state,
                                                                    "exchange": self.settings.exchange})
        answered: bool | None = None
        deadline = time.monotonic() + self.settings.order_timeout
        try:
            result, answered = await asyncio.wait_for(self._execute(request, deadline),
                                                      self.settings.order_timeout + 1)
        except asyncio.TimeoutError:
            answered = False
            result = OrderResult(UNKNOWN, error=f"no outcome within {self.settings.order_timeout}s",
                                 detail={"client_order_id": request.client_order_id})
        except Exception as e:  # a bug here must not take the daemon down: report it as this order's failure
            self._log.exception("plugin %s: order %s failed unexpectedly", self.name, request.client_order_id)
            result = OrderResult(FAILED, error=self._safe(f"internal error: {type(e).__name__}: {e}"))
        finally:
            if answered is None:
                self._breaker.released()
            elif answered:
                self._breaker.succeeded()
            else:
                self._breaker.failed()
        if answered is False:
            self._last_error = result.error
        return result

    async def lookup(self, request: OrderRequest) -> OrderResult | None:
        """The order sent under request.client_order_id, or None when the exchange has none or cannot tell."""
        deadline = time.monotonic() + self.settings.order_timeout
        try:
            await self._ensure_markets(deadline)
        except Exception:
            return None
        symbol = request.order.get("symbol")
        if symbol not in (self._exchange.markets or {}):
            return None
        _, order = await self._find(symbol, request.client_order_id, deadline)
        if order is None:
            return None
        return self._result(order, {"client_order_id": request.client_order_id, "looked_up": True})

    async def health(self) -> dict[str, Any]:
        markets = self._exchange.markets or {}
        return {"healthy": self._markets_loaded and self._breaker.state == "closed",
                "exchange": self.settings.exchange, "markets_loaded": self._markets_loaded,
                "markets": len(markets), "circuit": self._breaker.state,
                "consecutive_failures": self._breaker.failures, "last_error": self._last_error,
                "testnet": self.settings.testnet, "dry_run": self.settings.dry_run}

    async def close(self) -> None:
        if self._markets_task is not None:
            self._markets_task.cancel()
            await asyncio.gather(self._markets_task, return_exceptions=True)
        await self._exchange.close()

    def market_symbols(self) -> list[str]:
        """The exchange's ccxt symbols once the markets are loaded, else empty."""
        return list(self._exchange.symbols or ()) if self._markets_loaded else []

    # markets ------------------------------------------------------------------------------

    async def _keep_loading_markets(self) -> None:
        delay = self.settings.retry_backoff
        while not self._markets_loaded:
            try:
                await self._ensure_markets(time.monotonic() + self.settings.order_timeout)
                return
            except Exception as e:
                self._last_error = self._safe(f"markets not loaded: {self._describe(e)}")
                self._log.warning("plugin %s: %s; retrying in %.1fs", self.name, self._last_error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.settings.markets_retry_max)

    async def _ensure_markets(self, deadline: float) -> None:
        if self._markets_loaded:
            return
        # ccxt shares one load among concurrent callers; the shield keeps one caller's time-out
        # from cancelling the load that the others (and the background loader) wait on
        await self._bounded(asyncio.shield(self._exchange.load_markets()), deadline)
        if not self._markets_loaded:
            self._markets_loaded = True
            self._last_error = None
            self._log.info("plugin %s: %d markets loaded from %s", self.name,
                           len(self._exchange.markets), self.settings.exchange)

    async def _reference_price(self, order: Mapping[str, Any], deadline: float) -> tuple[float | None, str | None]:
        """A last price to check the cost and the stop sides of a market order that carries no price."""
        if not wants_reference_price(self._exchange.markets or {}, order):
            return None, None
        if not self._exchange.has.get("fetchTicker"):
            return None, "the exchange has no ticker"
        try:
            ticker = await self._bounded(self._exchange.fetch_ticker(order["symbol"]), deadline)
        except Exception as e:
            return None, self._safe(self._describe(e))
        price = ticker.get("last") or ticker.get("close")
        return (float(price), None) if price else (None, "the ticker has no last price")

    # orders -------------------------------------------------------------------------------

    async def _execute(self, request: OrderRequest, deadline: float) -> tuple[OrderResult, bool | None]:
        """The order's result, and whether the venue answered (True), failed (False) or was not asked (None)."""
        cid = request.client_order_id
        try:
            await self._ensure_markets(deadline)
        except Exception as e:
            error = self._safe(f"markets of {self.settings.exchange} not loaded: {self._describe(e)}")
            return OrderResult(FAILED, error=error, detail={"client_order_id": cid}), False
        reference, reference_error = await self._reference_price(request.order, deadline)
        try:
            plan = plan_order(self._exchange, request.order, cid, reference)
        except MarketRefusal as e:
            return OrderResult(FAILED, error=str(e), detail={"client_order_id": cid, "sent": False}), None
        detail: dict[str, Any] = {"exchange": self.settings.exchange, "client_order_id": cid,
                                  "request": plan.entry.as_json(), "reference_price": plan.reference_price}
        if reference_error:
            detail["reference_price_error"] = reference_error
        if plan.linked:
            detail["linked"] = {role: {"client_order_id": call.client_order_id, "request": call.as_json()}
                                for role, call in plan.linked}
        if self.settings.dry_run:
            return OrderResult(DRY_RUN, detail=detail), None

        attempts = _Attempts()
        try:
            order = await self._place(plan.entry, deadline, attempts)
        except _Final as final:
            detail.update(attempts.as_json())
            return OrderResult(final.status, error=final.message, detail=detail), final.venue_answered
        detail.update(attempts.as_json())
        result = self._result(order, detail)
        if result.status == FAILED or not plan.linked:
            return result, True
        errors = [await self._place_linked(role, call, deadline, detail["linked"][role])
                  for role, call in plan.linked]
        return result._replace(error="; ".join(e for e in errors if e) or None,
                               detail={**result.detail, "linked": detail["linked"]}), True

    async def _place_linked(self, role: str, call: OrderCall, deadline: float, record: dict[str, Any]) -> str | None:
        """Place a stop-loss or take-profit order after its entry; return an error line when it failed."""
        attempts = _Attempts()
        try:
            order = await self._place(call, deadline, attempts)
        except _Final as final:
            record.update(status=final.status, error=final.message, **attempts.as_json())
            return f"{role} order {final.status}: {final.message}"
        record.update(order_id=_str(order.get("id")), status=order.get("status"), **attempts.as_json())
        return None

    async def _place(self, call: OrderCall, deadline: float, attempts: _Attempts) -> dict[str, Any]:
        """Create one order, resending network failures with the same client order id.

        When a failed attempt may have reached the exchange, the order is looked up by its
        client order id before anything is sent again. Raises _Final when no order comes back.
        """
        maybe_sent = doubted = False
        last_error = ""
        for attempt in range(self.settings.retries + 1):
            if attempt and not await back_off(attempt, self.settings.retry_backoff,
                                              self.settings.retry_backoff_max, deadline):
                break
            if maybe_sent:
                state, found = await self._look_up(call, deadline, attempts)
                if found is not None:
                    return found
                if maybe_sent := state is Found.UNKNOWN:
                    continue
                doubted = True
            try:
                attempts.sent += 1
                return await self._bounded(self._exchange.create_order(
                    call.symbol, call.type, call.side, call.amount, call.price, dict(call.params)), deadline)
            except ccxt_async.ExchangeError as e:
                if doubted:
                    # a resend refused (say, as a duplicate) may mean the first attempt landed after all
                    state, found = await self._look_up(call, deadline, attempts)
                    if found is not None:
                        return found
                raise _Final(FAILED, self._safe(str(e)), venue_answered=True) from e
            except (ccxt_async.OperationFailed, asyncio.TimeoutError) as e:
                # OperationFailed holds the NetworkError family and Binance's "internal error" answers
                maybe_sent = _may_have_reached(e)
                last_error = self._describe(e)
                self._log.warning("plugin %s: order %s attempt %d: %s", self.name, call.client_order_id,
                                  attempts.sent, self._safe(last_error))
        if maybe_sent and time.monotonic() < deadline:
            state, found = await self._look_up(call, deadline, attempts)
            if found is not None:
                return found
            maybe_sent = state is Found.UNKNOWN
        tries = f"after {attempts.sent} attempt{'s' * (attempts.sent != 1)}"
        if maybe_sent:
            raise _Final(UNKNOWN, self._safe(f"outcome unknown {tries}, not resent: {last_error}"), False)
        raise _Final(FAILED, self._safe(f"not placed {tries}: {last_error or 'out of time'}"), False)

    async def _look_up(self, call: OrderCall, deadline: float,
                       attempts: _Attempts) -> tuple[Found, dict[str, Any] | None]:
        """Look the order up before a resend, counting the look-up."""
        attempts.lookups += 1
        state, order = await self._find(call.symbol, call.client_order_id, deadline)
        if state is Found.YES:
            attempts.found_by_lookup = True
            self._log.info("plugin %s: order %s found by look-up, not resent", self.name, call.client_order_id)
        return state, order

    async def _find(self, symbol: str, client_order_id: str, deadline: float) -> tuple[Found, dict[str, Any] | None]:
        """Find an order by client order id with whatever the exchange has: fetch_order, then order lists.

        A fetch_order "not found" is confirmed by the lists where the exchange has them, since
        not every exchange reads a client order id there.
        """
        has = self._exchange.has
        said_missing = False
        if has.get("fetchOrder"):
            try:
                order = await self._bounded(
                    self._exchange.fetch_order(None, symbol, {"clientOrderId": client_order_id}), deadline)
                if order and order.get("clientOrderId") in (client_order_id, None) and order.get("id"):
                    return Found.YES, order
            except ccxt_async.OrderNotFound:
                said_missing = True
            except ccxt_async.ExchangeError:
                pass  # this exchange cannot fetch by client order id: try the lists
            except (ccxt_async.OperationFailed, asyncio.TimeoutError):
                return Found.UNKNOWN, None
        if has.get("fetchOrders"):
            listings = [self._exchange.fetch_orders]
        else:
            listings = [f for name, f in (("fetchOpenOrders", self._exchange.fetch_open_orders),
                                          ("fetchClosedOrders", self._exchange.fetch_closed_orders)) if has.get(name)]
        if not listings:
            return (Found.NO if said_missing else Found.UNKNOWN), None
        for listing in listings:
            try:
                orders = await self._bounded(listing(symbol), deadline)
            except Exception:
                return Found.UNKNOWN, None
            for order in orders:
                if order.get("clientOrderId") == client_order_id:
                    return Found.YES, order
        return Found.NO, None

    def _result(self, order: Mapping[str, Any], detail: dict[str, Any]) -> OrderResult:
        """An OrderResult from a ccxt order structure."""
        status = order.get("status")
        filled = _float(order.get("filled"))
        detail = {**detail, "exchange_status": status, "order": {
            "id": _str(order.get("id")), "client_order_id": order.get("clientOrderId"),
            "symbol": order.get("symbol"), "type": order.get("type"), "side": order.get("side"),
            "amount": _float(order.get("amount")), "price": _float(order.get("price")),
            "trigger_price": _float(order.get("triggerPrice")), "filled": filled,
            "average": _float(order.get("average")), "status": status}}
        if status == "closed" or (status in ("canceled", "expired", "rejected") and filled):
            kind = FILLED
        elif status in (None, "open"):
            kind = PLACED
        else:
            return OrderResult(FAILED, _str(order.get("id")), f"order {status} by {self.settings.exchange}",
                               filled, _float(order.get("average")), detail)
        return OrderResult(kind, _str(order.get("id")), None, filled, _float(order.get("average")), detail)

    # time and words -----------------------------------------------------------------------

    async def _bounded(self, awaitable: Awaitable[T], deadline: float) -> T:
        """Await within what is left of the order's time (each request is also bounded by ccxt's timeout)."""
        return await asyncio.wait_for(awaitable, max(deadline - time.monotonic(), 0.001))

    def _describe(self, error: BaseException) -> str:
        if isinstance(error, asyncio.TimeoutError):
            return f"no answer within the order's {self.settings.order_timeout}s"
        return f"{type(error).__name__}: {error}"

    def _safe(self, text: str) -> str:
        """`text` without credentials or query strings (some exchanges sign in the URL), and not too long."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return _QUERY.sub(r"\1", text)[:500]


_QUERY = re.compile(r"(https?://[^\s?]+)\?\S*")


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _str(value: Any) -> str | None:
    return None if value is None else str(value)
