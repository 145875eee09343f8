"""The `ccxt` plugin: orders on crypto exchanges through ccxt.async_support, checked against the market first.

ccxt is imported here only: it is slow to import, and the daemon loads this module only when a
`ccxt` plugin is configured.
"""

from __future__ import annotations

import asyncio
import enum
import re
import socket
import time
from dataclasses import dataclass, field, fields, replace
from decimal import Decimal
from typing import Any, Awaitable, Callable, Mapping, TypeVar

import aiohttp
import ccxt.async_support as ccxt_async

from fksroute.plugins.base import (DRY_RUN, FAILED, FILLED, PLACED, UNKNOWN, OrderRequest, OrderResult,
                                   PluginContext)
from fksroute.symbols import tv_symbol

T = TypeVar("T")

CIRCUIT_OPEN = "circuit_open"
# exchange-specific spellings of a client order id: ccxt would send one of these instead of ours
CLIENT_ID_PARAMS = frozenset({"clientOrderId", "newClientOrderId", "clientOid", "clOrdId", "orderLinkId",
                              "clientAlgoId"})
LINKED_ID_MAX = 32  # the shortest client order id limit among the big exchanges (OKX); Binance allows 36


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
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in settings.items() if k in names}
        breaker = settings.get("circuit_breaker") or {}
        if "failures" in breaker:
            values["circuit_failures"] = breaker["failures"]
        if "cooldown" in breaker:
            values["circuit_cooldown"] = breaker["cooldown"]
        return cls(**values)


class CircuitBreaker:
    """Opens after `threshold` consecutive failures, then lets one trial through once `cooldown` has passed."""

    def __init__(self, threshold: int, cooldown: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.failures = 0
        self._clock = clock
        self._opened_at: float | None = None
        self._trial = False

    @property
    def state(self) -> str:
        """closed, open (failing fast) or half_open (a trial is due or running)."""
        if self._opened_at is None:
            return "closed"
        if self._trial or self._clock() - self._opened_at >= self.cooldown:
            return "half_open"
        return "open"

    def allow(self) -> bool:
        """Whether a call may go to the venue now; in half_open only the first caller gets through."""
        if self._opened_at is None:
            return True
        if self._trial or self._clock() - self._opened_at < self.cooldown:
            return False
        self._trial = True
        return True

    def succeeded(self) -> None:
        self.failures = 0
        self._opened_at = None
        self._trial = False

    def failed(self) -> None:
        self.failures += 1
        self._trial = False
        if self.failures >= self.threshold:
            self._opened_at = self._clock()

    def released(self) -> None:
        """The call taught nothing about the venue (refused before sending, dry run)."""
        self._trial = False


class MarketRefusal(Exception):
    """The order breaks a market rule; the message names the rule, and nothing was sent."""


@dataclass(frozen=True)
class OrderCall:
    """One `create_order` call, exactly as it is (or in a dry run would be) sent."""

    symbol: str
    type: str
    side: str
    amount: float
    price: float | None
    params: Mapping[str, Any]

    @property
    def client_order_id(self) -> str:
        return self.params["clientOrderId"]

    def as_json(self) -> dict[str, Any]:
        return {"method": "create_order", "symbol": self.symbol, "type": self.type, "side": self.side,
                "amount": self.amount, "price": self.price, "params": _plain(self.params)}


@dataclass(frozen=True)
class OrderPlan:
    """The entry order and the stop-loss/take-profit orders to place once the entry is accepted."""

    entry: OrderCall
    linked: tuple[tuple[str, OrderCall], ...] = ()
    reference_price: float | None = None


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
    config = _plain(settings.ccxt)
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


def plan_order(exchange: Any, order: Mapping[str, Any], client_order_id: str,
               reference_price: float | None = None) -> OrderPlan:
    """Check `order` against its market and round it; raise MarketRefusal naming the broken limit."""
    symbol = order["symbol"]
    market = (exchange.markets or {}).get(symbol)
    if market is None:
        guess = tv_symbol(symbol, exchange.symbols or ())
        hint = f" (did you mean {guess}? the tv_symbol filter converts TradingView tickers)" if (
            guess != symbol and guess in exchange.markets) else ""
        raise MarketRefusal(f"symbol {symbol} is not a market on {exchange.id}{hint}")
    if market.get("active") is False:
        raise MarketRefusal(f"market {symbol} is not active on {exchange.id}")
    kind = order.get("type", "market")
    side = order["side"]
    limits = market.get("limits") or {}
    amount = _amount(exchange, market, order["quantity"])
    _check_range(amount, limits.get("amount"), "amount", symbol, "quantity")
    if kind in ("market", "stop"):
        _check_range(amount, limits.get("market"), "market order amount", symbol, "quantity", "market")
    price = _price(exchange, market, order.get("price"), "price") if kind in ("limit", "stop_limit") else None
    stop = _price(exchange, market, order.get("stop_price"), "stop_price") if kind in ("stop", "stop_limit") else None
    reference = price or stop or order.get("price") or reference_price
    if reference is not None:
        _check_cost(amount, reference, limits.get("cost"), market, symbol)

    params = {k: v for k, v in (order.get("params") or {}).items() if k not in CLIENT_ID_PARAMS}
    params["clientOrderId"] = client_order_id
    if stop is not None:
        params["triggerPrice"] = stop
    if order.get("post_only"):
        if kind not in ("limit", "stop_limit"):
            raise MarketRefusal(f"post_only needs a limit order, not {kind}")
        params["postOnly"] = True
    elif order.get("time_in_force") and kind in ("limit", "stop_limit"):
        # a market order has nothing to keep in force, and Binance rejects timeInForce on one
        params["timeInForce"] = order["time_in_force"]
    if order.get("reduce_only"):
        if not market.get("contract"):
            raise MarketRefusal(f"reduce_only is not available on the {market.get('type')} market {symbol}")
        params["reduceOnly"] = True

    protect = {role: _price(exchange, market, order.get(role), role) for role in ("stop_loss", "take_profit")
               if order.get(role) is not None}
    if reference is not None:
        _check_sides(protect, side, float(reference))
    entry_type = "limit" if kind in ("limit", "stop_limit") else "market"
    linked: list[tuple[str, OrderCall]] = []
    if protect and exchange.has.get("createOrderWithTakeProfitAndStopLoss"):
        if "stop_loss" in protect:
            params["stopLoss"] = {"triggerPrice": protect["stop_loss"]}
        if "take_profit" in protect:
            params["takeProfit"] = {"triggerPrice": protect["take_profit"]}
    else:
        opposite = "sell" if side == "buy" else "buy"
        for role, trigger in protect.items():
            linked_params: dict[str, Any] = {"clientOrderId": linked_client_order_id(client_order_id, role),
                                             _TRIGGER_PARAM[role]: trigger}
            if market.get("contract"):
                linked_params["reduceOnly"] = True
            linked.append((role, OrderCall(symbol, "market", opposite, amount, None, linked_params)))
    entry = OrderCall(symbol, entry_type, side, amount, price, params)
    return OrderPlan(entry, tuple(linked), None if reference is None else float(reference))


_TRIGGER_PARAM = {"stop_loss": "stopLossPrice", "take_profit": "takeProfitPrice"}


def linked_client_order_id(client_order_id: str, role: str) -> str:
    """The client order id of the stop-loss (`sl`) or take-profit (`tp`) order linked to an entry."""
    tag = {"stop_loss": "sl", "take_profit": "tp"}[role]
    suffix = tag if client_order_id.isalnum() else "-" + tag
    return client_order_id[: LINKED_ID_MAX - len(suffix)] + suffix


def _amount(exchange: Any, market: Mapping[str, Any], quantity: float) -> float:
    try:
        return float(exchange.amount_to_precision(market["symbol"], quantity))
    except ccxt_async.BaseError:
        step = (market.get("precision") or {}).get("amount")
        raise MarketRefusal(f"quantity {_show(quantity)} rounds to zero at the amount precision {_show(step)} "
                            f"of {market['symbol']} (precision.amount)") from None


def _price(exchange: Any, market: Mapping[str, Any], value: float | None, name: str) -> float:
    if value is None:
        raise MarketRefusal(f"{name} is required for this order type")
    try:
        rounded = float(exchange.price_to_precision(market["symbol"], value))
    except ccxt_async.BaseError:
        rounded = 0.0
    if rounded <= 0:
        tick = (market.get("precision") or {}).get("price")
        raise MarketRefusal(f"{name} {_show(value)} rounds to zero at the price precision {_show(tick)} of "
                            f"{market['symbol']} (precision.price)")
    _check_range(rounded, (market.get("limits") or {}).get("price"), "price", market["symbol"], name)
    return rounded


def _check_range(value: float, limit: Mapping[str, Any] | None, what: str, symbol: str, name: str,
                 key: str | None = None) -> None:
    low, high = (limit or {}).get("min"), (limit or {}).get("max")
    path = f"limits.{key or what}"
    if low is not None and value < low:
        raise MarketRefusal(f"{name} {_show(value)} is below the minimum {what} {_show(low)} of {symbol} "
                            f"({path}.min)")
    if high is not None and value > high:
        raise MarketRefusal(f"{name} {_show(value)} is above the maximum {what} {_show(high)} of {symbol} "
                            f"({path}.max)")


def _check_cost(amount: float, price: float, limit: Mapping[str, Any] | None, market: Mapping[str, Any],
                symbol: str) -> None:
    cost = Decimal(str(amount)) * Decimal(str(price))
    low, high = (limit or {}).get("min"), (limit or {}).get("max")
    quote = market.get("quote") or ""
    shown = f"order cost {_show(cost)} {quote} (quantity {_show(amount)} at {_show(price)})"
    if low is not None and cost < Decimal(str(low)):
        raise MarketRefusal(f"{shown} is below the minimum cost {_show(low)} {quote} of {symbol} (limits.cost.min)")
    if high is not None and cost > Decimal(str(high)):
        raise MarketRefusal(f"{shown} is above the maximum cost {_show(high)} {quote} of {symbol} (limits.cost.max)")


def _check_sides(protect: Mapping[str, float], side: str, reference: float) -> None:
    """A stop loss on the wrong side of the entry would trigger at once: refuse it."""
    below = {"buy": "stop_loss", "sell": "take_profit"}[side]
    for role, trigger in protect.items():
        wanted_below = role == below
        if (trigger >= reference) if wanted_below else (trigger <= reference):
            where = "below" if wanted_below else "above"
            raise MarketRefusal(f"{role} {_show(trigger)} must be {where} the entry price {_show(reference)} "
                                f"for a {side}")


def _plain(value: Any) -> Any:
    """A deep copy made of dicts, lists and scalars (settings may arrive as read-only mappings)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


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
        if order.get("type", "market") != "market" or order.get("price") is not None:
            return None, None
        market = (self._exchange.markets or {}).get(order["symbol"]) or {}
        cost = (market.get("limits") or {}).get("cost") or {}
        protected = order.get("stop_loss") is not None or order.get("take_profit") is not None
        if not market or (cost.get("min") is None and cost.get("max") is None and not protected):
            return None, None  # nothing to check it against
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
        return replace(result, error="; ".join(e for e in errors if e) or None,
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
            if attempt and not await self._pause(attempt, deadline):
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

    async def _pause(self, attempt: int, deadline: float) -> bool:
        """Back off before attempt `attempt`; False when the order's time is up."""
        delay = min(self.settings.retry_backoff * 2 ** (attempt - 1), self.settings.retry_backoff_max)
        if time.monotonic() + delay >= deadline:
            return False
        await asyncio.sleep(delay)
        return True

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


def _show(value: Any) -> str:
    """A number as a trader writes it: 0.00005, not 5e-05; 60000, not 60000.0."""
    return f"{Decimal(str(value)).normalize():f}"


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _str(value: Any) -> str | None:
    return None if value is None else str(value)
