"""A small imitation of Binance's spot REST API, served by a real uvicorn on a loopback port.

It checks the API key and the HMAC-SHA256 signature like Binance, keeps the orders it
accepts, records every order request (also the ones it fails on purpose), and can be
scripted to answer 503, to hang after accepting an order, or to answer Binance error bodies.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import socket
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal
from http import HTTPStatus
from typing import Any, Iterator
from urllib.parse import parse_qsl

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

API_KEY = "imitation-api-key"
SECRET = "imitation-secret-0123456789"

ORDER_TYPES = ["LIMIT", "LIMIT_MAKER", "MARKET", "STOP_LOSS", "STOP_LOSS_LIMIT", "TAKE_PROFIT",
               "TAKE_PROFIT_LIMIT"]


@dataclass(frozen=True)
class SpotSymbol:
    """One spot market with Binance's filters."""

    base: str
    quote: str
    last_price: str
    tick_size: str = "0.01"
    min_price: str = "0.01"
    max_price: str = "1000000.00"
    step_size: str = "0.00001"
    min_qty: str = "0.00001"
    max_qty: str = "9000.00000"
    min_notional: str = "5.00"
    max_notional: str = "9000000.00"

    @property
    def id(self) -> str:
        return self.base + self.quote

    def info(self) -> dict[str, Any]:
        return {
            "symbol": self.id, "status": "TRADING", "baseAsset": self.base, "baseAssetPrecision": 8,
            "quoteAsset": self.quote, "quotePrecision": 8, "quoteAssetPrecision": 8,
            "baseCommissionPrecision": 8, "quoteCommissionPrecision": 8, "orderTypes": ORDER_TYPES,
            "icebergAllowed": True, "ocoAllowed": True, "quoteOrderQtyMarketAllowed": True,
            "allowTrailingStop": True, "cancelReplaceAllowed": True, "isSpotTradingAllowed": True,
            "isMarginTradingAllowed": False, "permissions": [], "permissionSets": [["SPOT"]],
            "defaultSelfTradePreventionMode": "EXPIRE_MAKER",
            "allowedSelfTradePreventionModes": ["EXPIRE_TAKER", "EXPIRE_MAKER", "EXPIRE_BOTH"],
            "filters": [
                {"filterType": "PRICE_FILTER", "minPrice": self.min_price, "maxPrice": self.max_price,
                 "tickSize": self.tick_size},
                {"filterType": "LOT_SIZE", "minQty": self.min_qty, "maxQty": self.max_qty,
                 "stepSize": self.step_size},
                {"filterType": "NOTIONAL", "minNotional": self.min_notional, "applyMinToMarket": True,
                 "maxNotional": self.max_notional, "applyMaxToMarket": False, "avgPriceMins": 5},
                {"filterType": "MAX_NUM_ORDERS", "maxNumOrders": 200},
            ],
        }


DEFAULT_SYMBOLS = (
    SpotSymbol("BTC", "USDT", "60000.00"),
    SpotSymbol("ETH", "USDT", "3000.00", step_size="0.0001", min_qty="0.0001"),
    SpotSymbol("ETH", "BTC", "0.05000", tick_size="0.00001", min_price="0.00001", min_notional="0.0001"),
)


@dataclass
class Fault:
    """A scripted misbehaviour for the next `times` requests matching method and path."""

    method: str
    path: str
    times: int
    status: int = 503
    body: dict[str, Any] | None = None
    hang: float = 0.0  # seconds to sleep after accepting, before answering
    match: dict[str, str] = field(default_factory=dict)  # only requests with these parameters


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BinanceError(Exception):
    """A Binance error answer: HTTP status and {"code", "msg"}."""

    def __init__(self, code: int, msg: str, status: int = 400) -> None:
        super().__init__(msg)
        self.code, self.msg, self.status = code, msg, status


@dataclass
class BinanceImitation:
    """The imitation exchange. `start()` serves it; `base_url` and `ccxt_config()` point ccxt at it."""

    symbols: tuple[SpotSymbol, ...] = DEFAULT_SYMBOLS
    api_key: str = API_KEY
    secret: str = SECRET
    port: int = field(default_factory=free_port)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    order_requests: list[dict[str, str]] = field(default_factory=list)
    orders: list[dict[str, Any]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._by_id = {s.id: s for s in self.symbols}
        self._ids = itertools.count(1001)
        self._lock = threading.Lock()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ccxt_config(self) -> dict[str, Any]:
        """The exchange constructor settings that send ccxt's binance here (REFERENCE.md)."""
        api = {"public": self.base_url + "/api/v3", "private": self.base_url + "/api/v3",
               "v1": self.base_url + "/api/v1"}
        return {"urls": {"api": api},
                "options": {"fetchMarkets": {"types": ["spot"]}, "fetchCurrencies": False,
                            "fetchMargins": False}}

    # scripting ---------------------------------------------------------------------------

    def fail_next(self, times: int, status: int = 503, method: str = "POST", path: str = "/api/v3/order",
                  body: dict[str, Any] | None = None, match: dict[str, str] | None = None) -> None:
        """Answer the next `times` matching requests with `status` (and `body`) instead of serving them."""
        self.faults.append(Fault(method, path, times, status, body, match=match or {}))

    def reject_next(self, times: int, code: int = -2010, msg: str = "Account has insufficient balance for "
                    "requested action.", method: str = "POST", path: str = "/api/v3/order",
                    match: dict[str, str] | None = None) -> None:
        """Answer the next matching requests with a Binance error body and HTTP 400."""
        self.fail_next(times, 400, method, path, {"code": code, "msg": msg}, match)

    def hang_next(self, times: int, seconds: float, method: str = "POST", path: str = "/api/v3/order") -> None:
        """Serve the next matching requests (an order is accepted and kept), then wait before answering."""
        self.faults.append(Fault(method, path, times, hang=seconds))

    def order_requests_for(self, client_order_id: str) -> list[dict[str, str]]:
        return [r for r in self.order_requests if r.get("newClientOrderId") == client_order_id]

    # serving -----------------------------------------------------------------------------

    def start(self) -> "BinanceImitation":
        config = uvicorn.Config(self.app(), host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="off", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="binance-imitation", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the Binance imitation did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            assert self._thread is not None
            self._thread.join(10)
            self._server = None

    def __enter__(self) -> "BinanceImitation":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def app(self) -> Starlette:
        routes = [
            Route("/api/v3/ping", self._ping),
            Route("/api/v3/time", self._time),
            Route("/api/v3/exchangeInfo", self._exchange_info),
            Route("/api/v3/ticker/24hr", self._ticker),
            Route("/api/v3/order", self._order, methods=["GET", "POST"]),
            Route("/api/v3/openOrders", self._open_orders),
            Route("/api/v3/allOrders", self._all_orders),
        ]
        return Starlette(routes=routes)

    # the endpoints -----------------------------------------------------------------------

    async def _ping(self, request: Request) -> Response:
        return await self._serve(request, lambda params: {})

    async def _time(self, request: Request) -> Response:
        return await self._serve(request, lambda params: {"serverTime": _now_ms()})

    async def _exchange_info(self, request: Request) -> Response:
        def answer(params: dict[str, str]) -> dict[str, Any]:
            return {"timezone": "UTC", "serverTime": _now_ms(), "rateLimits": [], "exchangeFilters": [],
                    "symbols": [s.info() for s in self.symbols]}
        return await self._serve(request, answer)

    async def _ticker(self, request: Request) -> Response:
        def answer(params: dict[str, str]) -> dict[str, Any]:
            s = self._symbol(params)
            now = _now_ms()
            return {"symbol": s.id, "lastPrice": s.last_price, "bidPrice": s.last_price, "askPrice": s.last_price,
                    "openPrice": s.last_price, "highPrice": s.last_price, "lowPrice": s.last_price,
                    "volume": "1000", "quoteVolume": "1000", "openTime": now - 86_400_000, "closeTime": now,
                    "priceChange": "0", "priceChangePercent": "0", "count": 1}
        return await self._serve(request, answer)

    async def _order(self, request: Request) -> Response:
        if request.method == "POST":
            return await self._serve(request, self._new_order, signed=True, records_order=True)
        return await self._serve(request, self._query_order, signed=True)

    async def _open_orders(self, request: Request) -> Response:
        def answer(params: dict[str, str]) -> list[dict[str, Any]]:
            return [o for o in self._orders_of(params) if o["status"] in ("NEW", "PARTIALLY_FILLED")]
        return await self._serve(request, answer, signed=True)

    async def _all_orders(self, request: Request) -> Response:
        return await self._serve(request, self._orders_of, signed=True)

    # the machinery -----------------------------------------------------------------------

    async def _serve(self, request: Request, handler: Any, signed: bool = False,
                     records_order: bool = False) -> Response:
        raw = (await request.body()).decode() if request.method == "POST" else request.url.query
        params = dict(parse_qsl(raw, keep_blank_values=True))
        with self._lock:
            self.requests.append((request.method, request.url.path, params))
            if records_order:
                self.order_requests.append(params)
            fault = self._take_fault(request.method, request.url.path, params)
        if fault is not None and not fault.hang:
            if fault.body is None:
                return PlainTextResponse(HTTPStatus(fault.status).phrase, fault.status)
            return JSONResponse(fault.body, fault.status)
        try:
            if signed:
                self._check_signature(request, raw)
            with self._lock:
                answer = handler(params)
        except BinanceError as e:
            return JSONResponse({"code": e.code, "msg": e.msg}, e.status)
        if fault is not None:
            await asyncio.sleep(fault.hang)
        return JSONResponse(answer)

    def _take_fault(self, method: str, path: str, params: dict[str, str]) -> Fault | None:
        for fault in self.faults:
            if (fault.method == method and fault.path == path and fault.times > 0
                    and fault.match.items() <= params.items()):
                fault.times -= 1
                return fault
        return None

    def _check_signature(self, request: Request, raw: str) -> None:
        if request.headers.get("X-MBX-APIKEY") != self.api_key:
            raise BinanceError(-2015, "Invalid API-key, IP, or permissions for action.", 401)
        payload, sep, signature = raw.rpartition("&signature=")
        expected = hmac.new(self.secret.encode(), payload.encode(), hashlib.sha256).hexdigest()
        if not sep or not hmac.compare_digest(signature, expected):
            raise BinanceError(-1022, "Signature for this request is not valid.")
        if "timestamp" not in dict(parse_qsl(payload)):
            raise BinanceError(-1102, "Mandatory parameter 'timestamp' was not sent, was empty/null, or malformed.")

    def _symbol(self, params: dict[str, str]) -> SpotSymbol:
        symbol = self._by_id.get(params.get("symbol", ""))
        if symbol is None:
            raise BinanceError(-1121, "Invalid symbol.")
        return symbol

    def _orders_of(self, params: dict[str, str]) -> list[dict[str, Any]]:
        symbol = self._symbol(params)
        return [o for o in self.orders if o["symbol"] == symbol.id]

    def _query_order(self, params: dict[str, str]) -> dict[str, Any]:
        symbol = self._symbol(params)
        for o in self.orders:
            if o["symbol"] == symbol.id and (o["clientOrderId"] == params.get("origClientOrderId")
                                             or str(o["orderId"]) == params.get("orderId")):
                return o
        raise BinanceError(-2013, "Order does not exist.")

    def _new_order(self, params: dict[str, str]) -> dict[str, Any]:
        symbol = self._symbol(params)
        kind = params.get("type", "")
        if kind not in ORDER_TYPES:
            raise BinanceError(-1116, "Invalid orderType.")
        if params.get("side") not in ("BUY", "SELL"):
            raise BinanceError(-1117, "Invalid side.")
        client_id = params.get("newClientOrderId") or f"imitation-{next(self._ids)}"
        if any(o["clientOrderId"] == client_id and o["status"] == "NEW" for o in self.orders):
            raise BinanceError(-2010, "Duplicate order sent.")
        if "timeInForce" in params and kind in ("MARKET", "STOP_LOSS", "TAKE_PROFIT", "LIMIT_MAKER"):
            raise BinanceError(-1106, "Parameter 'timeInForce' sent when not required.")
        quantity = Decimal(params.get("quantity", "0"))
        _check_step("LOT_SIZE", quantity, symbol.min_qty, symbol.max_qty, symbol.step_size)
        last = Decimal(symbol.last_price)
        price = Decimal(params["price"]) if "price" in params else None
        if price is not None:
            _check_step("PRICE_FILTER", price, symbol.min_price, symbol.max_price, symbol.tick_size)
        if not Decimal(symbol.min_notional) <= quantity * (price or last):
            raise BinanceError(-1013, "Filter failure: NOTIONAL")
        fills = kind == "MARKET" or (kind == "LIMIT" and price is not None and (
            price >= last if params["side"] == "BUY" else price <= last))
        fill_price = last if kind == "MARKET" else price
        now = _now_ms()
        order = {
            "symbol": symbol.id, "orderId": next(self._ids), "orderListId": -1, "clientOrderId": client_id,
            "transactTime": now, "time": now, "updateTime": now, "workingTime": now,
            "price": str(price or Decimal(0)), "origQty": str(quantity),
            "executedQty": str(quantity if fills else Decimal(0)),
            "cummulativeQuoteQty": str(quantity * fill_price if fills else Decimal(0)),
            "status": "FILLED" if fills else "NEW", "timeInForce": params.get("timeInForce", "GTC"),
            "type": kind, "side": params["side"], "stopPrice": params.get("stopPrice", "0.00000000"),
            "isWorking": kind in ("LIMIT", "LIMIT_MAKER", "MARKET"), "origQuoteOrderQty": "0.00000000",
            "selfTradePreventionMode": "EXPIRE_MAKER",
        }
        self.orders.append(order)
        fill = [{"price": str(fill_price), "qty": str(quantity), "commission": "0", "commissionAsset": symbol.base,
                 "tradeId": order["orderId"]}] if fills else []
        return {**order, "fills": fill}


def _check_step(name: str, value: Decimal, low: str, high: str, step: str) -> None:
    if not Decimal(low) <= value <= Decimal(high) or value % Decimal(step) != 0:
        raise BinanceError(-1013, f"Filter failure: {name}")


def _now_ms() -> int:
    return int(time.time() * 1000)


def plugin_settings(imitation: BinanceImitation, **overrides: Any) -> dict[str, Any]:
    """Settings of a `ccxt` plugin pointed at `imitation`, with timeouts short enough for tests."""
    settings: dict[str, Any] = {
        "type": "ccxt", "exchange": "binance", "api_key": imitation.api_key, "secret": imitation.secret,
        # no client-side throttling or exit pause: the imitation has no rate limits to respect
        "ccxt": {**imitation.ccxt_config(), "enableRateLimit": False, "timeout_on_exit": 0}, "timeout": 0.5, "order_timeout": 5, "retries": 3,
        "retry_backoff": 0.05, "retry_backoff_max": 0.2, "markets_retry_max": 0.2,
    }
    return {**settings, **overrides}


@pytest.fixture
def imitation() -> Iterator[BinanceImitation]:
    """A running Binance imitation, stopped after the test."""
    with BinanceImitation() as running:
        yield running
