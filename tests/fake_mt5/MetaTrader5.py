"""A stand-in for the Windows-only `MetaTrader5` package: the same function names, constants and result types.

It keeps a tiny in-memory terminal (`_terminal`) that tests set up, script and inspect: symbols and ticks,
what `order_send` answers next, every request it received, and whether the link to the terminal is up.
Like the real package, order_send answers None with last_error() for a malformed request (a volume or price
that is not a float, a comment over 31 characters) and 10030 for a filling mode the symbol does not allow.
"""

from __future__ import annotations

import json as _json
import os as _os
import time as _time
from collections import namedtuple as _nt
from dataclasses import dataclass as _dataclass, field as _field
from typing import Any as _Any, Callable as _Callable

__version__ = "5.0.6231"

# Trade request actions
TRADE_ACTION_DEAL = 1
TRADE_ACTION_PENDING = 5
TRADE_ACTION_SLTP = 6
TRADE_ACTION_MODIFY = 7
TRADE_ACTION_REMOVE = 8
TRADE_ACTION_CLOSE_BY = 10

# Order types
ORDER_TYPE_BUY = 0
ORDER_TYPE_SELL = 1
ORDER_TYPE_BUY_LIMIT = 2
ORDER_TYPE_SELL_LIMIT = 3
ORDER_TYPE_BUY_STOP = 4
ORDER_TYPE_SELL_STOP = 5
ORDER_TYPE_BUY_STOP_LIMIT = 6
ORDER_TYPE_SELL_STOP_LIMIT = 7
ORDER_TYPE_CLOSE_BY = 8

# Filling and time
ORDER_FILLING_FOK = 0
ORDER_FILLING_IOC = 1
ORDER_FILLING_RETURN = 2
ORDER_FILLING_BOC = 3
ORDER_TIME_GTC = 0
ORDER_TIME_DAY = 1
ORDER_TIME_SPECIFIED = 2
ORDER_TIME_SPECIFIED_DAY = 3

# Order states
ORDER_STATE_STARTED = 0
ORDER_STATE_PLACED = 1
ORDER_STATE_CANCELED = 2
ORDER_STATE_PARTIAL = 3
ORDER_STATE_FILLED = 4
ORDER_STATE_REJECTED = 5
ORDER_STATE_EXPIRED = 6
ORDER_STATE_REQUEST_ADD = 7
ORDER_STATE_REQUEST_MODIFY = 8
ORDER_STATE_REQUEST_CANCEL = 9

POSITION_TYPE_BUY = 0
POSITION_TYPE_SELL = 1
DEAL_TYPE_BUY = 0
DEAL_TYPE_SELL = 1
DEAL_ENTRY_IN = 0
DEAL_ENTRY_OUT = 1
DEAL_ENTRY_INOUT = 2
DEAL_ENTRY_OUT_BY = 3

# Trade server return codes
TRADE_RETCODE_REQUOTE = 10004
TRADE_RETCODE_REJECT = 10006
TRADE_RETCODE_CANCEL = 10007
TRADE_RETCODE_PLACED = 10008
TRADE_RETCODE_DONE = 10009
TRADE_RETCODE_DONE_PARTIAL = 10010
TRADE_RETCODE_ERROR = 10011
TRADE_RETCODE_TIMEOUT = 10012
TRADE_RETCODE_INVALID = 10013
TRADE_RETCODE_INVALID_VOLUME = 10014
TRADE_RETCODE_INVALID_PRICE = 10015
TRADE_RETCODE_INVALID_STOPS = 10016
TRADE_RETCODE_TRADE_DISABLED = 10017
TRADE_RETCODE_MARKET_CLOSED = 10018
TRADE_RETCODE_NO_MONEY = 10019
TRADE_RETCODE_PRICE_CHANGED = 10020
TRADE_RETCODE_PRICE_OFF = 10021
TRADE_RETCODE_INVALID_EXPIRATION = 10022
TRADE_RETCODE_ORDER_CHANGED = 10023
TRADE_RETCODE_TOO_MANY_REQUESTS = 10024
TRADE_RETCODE_NO_CHANGES = 10025
TRADE_RETCODE_SERVER_DISABLES_AT = 10026
TRADE_RETCODE_CLIENT_DISABLES_AT = 10027
TRADE_RETCODE_LOCKED = 10028
TRADE_RETCODE_FROZEN = 10029
TRADE_RETCODE_INVALID_FILL = 10030
TRADE_RETCODE_CONNECTION = 10031
TRADE_RETCODE_ONLY_REAL = 10032
TRADE_RETCODE_LIMIT_ORDERS = 10033
TRADE_RETCODE_LIMIT_VOLUME = 10034
TRADE_RETCODE_INVALID_ORDER = 10035
TRADE_RETCODE_POSITION_CLOSED = 10036

# last_error() codes
RES_S_OK = 1
RES_E_FAIL = -1
RES_E_INVALID_PARAMS = -2
RES_E_NO_MEMORY = -3
RES_E_NOT_FOUND = -4
RES_E_INVALID_VERSION = -5
RES_E_AUTH_FAILED = -6
RES_E_UNSUPPORTED = -7
RES_E_AUTO_TRADING_DISABLED = -8
RES_E_INTERNAL_FAIL = -10000
RES_E_INTERNAL_FAIL_SEND = -10001
RES_E_INTERNAL_FAIL_RECEIVE = -10002
RES_E_INTERNAL_FAIL_INIT = -10003
RES_E_INTERNAL_FAIL_CONNECT = -10004
RES_E_INTERNAL_FAIL_TIMEOUT = -10005

# Result types: named tuples with the real field order.
TradeRequest = _nt("TradeRequest", "action magic order symbol volume price stoplimit sl tp deviation type "
                                   "type_filling type_time expiration comment position position_by")
OrderSendResult = _nt("OrderSendResult", "retcode deal order volume price bid ask comment request_id "
                                         "retcode_external request")
Tick = _nt("Tick", "time bid ask last volume time_msc flags volume_real")
SymbolInfo = _nt("SymbolInfo", "custom select visible digits spread trade_mode trade_exemode filling_mode "
                               "order_mode point trade_tick_size volume_min volume_max volume_step bid ask name path")
TradeOrder = _nt("TradeOrder", "ticket time_setup time_setup_msc time_done time_done_msc time_expiration type "
                               "type_time type_filling state magic position_id position_by_id reason volume_initial "
                               "volume_current price_open sl tp price_current price_stoplimit symbol comment external_id")
TradeDeal = _nt("TradeDeal", "ticket order time time_msc type entry magic position_id reason volume price commission "
                             "swap profit fee symbol comment external_id")
TradePosition = _nt("TradePosition", "ticket time time_msc time_update time_update_msc type magic identifier reason "
                                     "volume price_open sl tp price_current swap profit symbol comment external_id")
TerminalInfo = _nt("TerminalInfo", "connected trade_allowed build name company path")
AccountInfo = _nt("AccountInfo", "login trade_mode leverage balance equity currency server company name")

_REQUEST_KEYS = set(TradeRequest._fields) | {"type"}
_FLOAT_KEYS = ("volume", "price", "stoplimit", "sl", "tp")
_INT_KEYS = ("action", "magic", "order", "deviation", "type", "type_filling", "type_time", "position", "position_by")


@_dataclass
class Reply:
    """What the next order_send answers: `retcode`, after executing the request on the server when `execute`."""

    retcode: int
    comment: str = ""
    execute: bool = False


@_dataclass
class NoReply:
    """order_send answers None and last_error() gives (code, message); `execute` says if the server got it anyway."""

    code: int
    message: str
    execute: bool = False


@_dataclass
class Terminal:
    """The state behind the module's functions; tests set it up and read it."""

    symbols: dict[str, dict[str, _Any]] = _field(default_factory=dict)
    script: list[_Any] = _field(default_factory=list)
    requests: list[dict[str, _Any]] = _field(default_factory=list)
    init_calls: list[dict[str, _Any]] = _field(default_factory=list)
    orders: list[TradeOrder] = _field(default_factory=list)
    history: list[TradeOrder] = _field(default_factory=list)
    deals: list[TradeDeal] = _field(default_factory=list)
    positions: list[TradePosition] = _field(default_factory=list)
    initialized: bool = False
    link_up: bool = True
    server_connected: bool = True
    trade_allowed: bool = True
    login: int = 5001234
    password: str = ""
    last_error: tuple[int, str] = (RES_S_OK, "Success")
    next_ticket: int = 1000
    on_send: _Callable[[dict[str, _Any]], None] | None = None

    def add_symbol(self, name: str, bid: float, ask: float, filling_mode: int = 1, visible: bool = True) -> None:
        self.symbols[name] = {"bid": bid, "ask": ask, "filling_mode": filling_mode, "visible": visible}

    def ticket(self) -> int:
        self.next_ticket += 1
        return self.next_ticket


def _from_environment() -> Terminal:
    """A terminal set up from $FAKE_MT5_SETUP ({"symbols": {NAME: {bid, ask, filling_mode}}, "password": ...}),
    for tests that run the agent as its own process."""
    terminal = Terminal()
    setup = _json.loads(_os.environ.get("FAKE_MT5_SETUP") or "{}")
    for name, symbol in setup.get("symbols", {}).items():
        terminal.add_symbol(name, **symbol)
    terminal.password = setup.get("password", "")
    return terminal


_terminal = _from_environment()


def _reset() -> Terminal:
    """A fresh terminal (tests call this first)."""
    global _terminal
    _terminal = Terminal()
    return _terminal


def _fail(code: int, message: str) -> None:
    _terminal.last_error = (code, message)
    return None


def _ok() -> None:
    _terminal.last_error = (RES_S_OK, "Success")


def _linked() -> bool:
    if not _terminal.initialized or not _terminal.link_up:
        _fail(RES_E_INTERNAL_FAIL_CONNECT, "No IPC connection")
        return False
    return True


def initialize(path: str | None = None, *, login: int | None = None, password: str | None = None,
               server: str | None = None, timeout: int | None = None, portable: bool = False) -> bool:
    _terminal.init_calls.append({"path": path, "login": login, "password": password, "server": server,
                                 "timeout": timeout, "portable": portable})
    if not _terminal.link_up:
        _fail(RES_E_INTERNAL_FAIL_INIT, "IPC initialize failed, MetaTrader 5 x64 not found")
        return False
    if _terminal.password and password != _terminal.password:
        _fail(RES_E_AUTH_FAILED, "Terminal: Authorization failed")
        return False
    _terminal.initialized = True
    _ok()
    return True


def login(login: int, password: str | None = None, server: str | None = None, timeout: int | None = None) -> bool:
    return initialize(login=login, password=password, server=server, timeout=timeout)


def shutdown() -> None:
    _terminal.initialized = False


def version() -> tuple[int, int, str] | None:
    return (500, 4000, "01 Jan 2026") if _linked() else None


def last_error() -> tuple[int, str]:
    return _terminal.last_error


def terminal_info() -> TerminalInfo | None:
    if not _linked():
        return None
    _ok()
    return TerminalInfo(_terminal.server_connected, _terminal.trade_allowed, 4000, "MetaTrader 5", "Stand-in",
                        r"C:\Program Files\MetaTrader 5")


def account_info() -> AccountInfo | None:
    if not _linked():
        return None
    return AccountInfo(_terminal.login, 0, 100, 10000.0, 10000.0, "USD", "Stand-in-Demo", "Stand-in", "Test")


def symbol_select(symbol: str, enable: bool = True) -> bool:
    if not _linked():
        return False
    if symbol not in _terminal.symbols:
        _fail(RES_E_NOT_FOUND, "Terminal: Not found")
        return False
    _terminal.symbols[symbol]["visible"] = enable
    return True


def symbol_info(symbol: str) -> SymbolInfo | None:
    if not _linked():
        return None
    s = _terminal.symbols.get(symbol)
    if s is None:
        return _fail(RES_E_NOT_FOUND, "Terminal: Not found")
    return SymbolInfo(False, s["visible"], s["visible"], 5, 10, 4, 2, s["filling_mode"], 127, 1e-05, 1e-05,
                      0.01, 100.0, 0.01, s["bid"], s["ask"], symbol, f"Forex\\{symbol}")


def symbol_info_tick(symbol: str) -> Tick | None:
    if not _linked():
        return None
    s = _terminal.symbols.get(symbol)
    if s is None or not s["visible"]:
        return _fail(RES_E_NOT_FOUND, "Terminal: Not found")
    now = _time.time()
    return Tick(int(now), s["bid"], s["ask"], 0.0, 0, int(now * 1000), 6, 0.0)


def _check_request(request: dict[str, _Any]) -> str | None:
    for key, value in request.items():
        if key not in _REQUEST_KEYS:
            return f'Invalid "{key}" argument'
        if key in _FLOAT_KEYS and type(value) is not float:
            return f'Invalid "{key}" argument'
        if key in _INT_KEYS and type(value) is not int:
            return f'Invalid "{key}" argument'
    if len(request.get("comment", "")) > 31:
        return 'Invalid "comment" argument'
    return None


def _filling_allowed(request: dict[str, _Any]) -> bool:
    mode = _terminal.symbols[request["symbol"]]["filling_mode"]
    filling = request.get("type_filling", ORDER_FILLING_FOK)
    if filling == ORDER_FILLING_FOK:
        return bool(mode & 1)
    if filling == ORDER_FILLING_IOC:
        return bool(mode & 2)
    return request.get("action") == TRADE_ACTION_PENDING or mode == 0


def _execute(request: dict[str, _Any]) -> OrderSendResult:
    """Carry the request out on the imaginary trade server and answer as the real one does."""
    now = _time.time()
    ticket = _terminal.ticket()
    action = request["action"]
    req = TradeRequest(*(request.get(f, 0.0 if f in _FLOAT_KEYS else ("" if f in ("symbol", "comment") else 0))
                         for f in TradeRequest._fields))
    if action == TRADE_ACTION_REMOVE:
        found = [o for o in _terminal.orders if o.ticket == request["order"]]
        if not found:
            return OrderSendResult(TRADE_RETCODE_INVALID_ORDER, 0, 0, 0.0, 0.0, 0.0, 0.0, "Invalid order", 1, 0, req)
        _terminal.orders.remove(found[0])
        _terminal.history.append(found[0]._replace(state=ORDER_STATE_CANCELED, time_done=int(now)))
        return OrderSendResult(TRADE_RETCODE_DONE, 0, found[0].ticket, 0.0, 0.0, 0.0, 0.0, "Request executed",
                               1, 0, req)
    if action == TRADE_ACTION_PENDING:
        order = TradeOrder(ticket, int(now), int(now * 1000), 0, 0, 0, request["type"], request.get("type_time", 0),
                           request.get("type_filling", 0), ORDER_STATE_PLACED, request.get("magic", 0), 0, 0, 3,
                           request["volume"], request["volume"], request["price"], request.get("sl", 0.0),
                           request.get("tp", 0.0), request["price"], request.get("stoplimit", 0.0), request["symbol"],
                           request.get("comment", ""), "")
        _terminal.orders.append(order)
        return OrderSendResult(TRADE_RETCODE_DONE, 0, ticket, request["volume"], 0.0, 0.0, 0.0, "Request executed",
                               1, 0, req)
    s = _terminal.symbols[request["symbol"]]
    price = s["ask"] if request["type"] == ORDER_TYPE_BUY else s["bid"]
    deal = _terminal.ticket()
    _terminal.history.append(TradeOrder(ticket, int(now), int(now * 1000), int(now), int(now * 1000), 0,
                                        request["type"], 0, request.get("type_filling", 0), ORDER_STATE_FILLED,
                                        request.get("magic", 0), ticket, 0, 3, request["volume"], 0.0, price,
                                        request.get("sl", 0.0), request.get("tp", 0.0), price, 0.0,
                                        request["symbol"], request.get("comment", ""), ""))
    _terminal.deals.append(TradeDeal(deal, ticket, int(now), int(now * 1000), request["type"], DEAL_ENTRY_IN,
                                     request.get("magic", 0), ticket, 3, request["volume"], price, 0.0, 0.0, 0.0,
                                     0.0, request["symbol"], request.get("comment", ""), ""))
    if request.get("position"):
        _terminal.positions = [p for p in _terminal.positions if p.ticket != request["position"]]
    else:
        _terminal.positions.append(TradePosition(ticket, int(now), int(now * 1000), int(now), int(now * 1000),
                                                 POSITION_TYPE_BUY if request["type"] == ORDER_TYPE_BUY
                                                 else POSITION_TYPE_SELL, request.get("magic", 0), ticket, 3,
                                                 request["volume"], price, request.get("sl", 0.0),
                                                 request.get("tp", 0.0), price, 0.0, 0.0, request["symbol"],
                                                 request.get("comment", ""), ""))
    return OrderSendResult(TRADE_RETCODE_DONE, deal, ticket, request["volume"], price, s["bid"], s["ask"],
                           "Request executed", 1, 0, req)


def order_send(request: dict[str, _Any]) -> OrderSendResult | None:
    _terminal.requests.append(dict(request))
    if _terminal.on_send is not None:
        _terminal.on_send(dict(request))
    if not _linked():
        return None
    problem = _check_request(request)
    if problem:
        return _fail(RES_E_INVALID_PARAMS, problem)
    step = _terminal.script.pop(0) if _terminal.script else None
    if isinstance(step, NoReply):
        if step.execute:
            _execute(request)
        return _fail(step.code, step.message)
    if request.get("symbol") and request["symbol"] in _terminal.symbols and not _filling_allowed(request):
        step = Reply(TRADE_RETCODE_INVALID_FILL, "Unsupported filling mode")
    if isinstance(step, Reply):
        if step.execute:
            _execute(request)
        req = TradeRequest(*(request.get(f, 0) for f in TradeRequest._fields))
        _ok()
        return OrderSendResult(step.retcode, 0, 0, 0.0, 0.0, 0.0, 0.0, step.comment, 1, 0, req)
    _ok()
    return _execute(request)


def order_check(request: dict[str, _Any]) -> _Any:
    if not _linked():
        return None
    problem = _check_request(request)
    return _fail(RES_E_INVALID_PARAMS, problem) if problem else True


def orders_get(symbol: str | None = None, group: str | None = None, ticket: int | None = None) -> tuple | None:
    if not _linked():
        return None
    return tuple(o for o in _terminal.orders if (symbol is None or o.symbol == symbol)
                 and (ticket is None or o.ticket == ticket))


def orders_total() -> int | None:
    return len(_terminal.orders) if _linked() else None


def positions_get(symbol: str | None = None, group: str | None = None, ticket: int | None = None) -> tuple | None:
    if not _linked():
        return None
    return tuple(p for p in _terminal.positions if (symbol is None or p.symbol == symbol)
                 and (ticket is None or p.ticket == ticket))


def positions_total() -> int | None:
    return len(_terminal.positions) if _linked() else None


def history_orders_get(date_from: _Any = None, date_to: _Any = None, group: str | None = None,
                       ticket: int | None = None, position: int | None = None) -> tuple | None:
    if not _linked():
        return None
    return tuple(o for o in _terminal.history if (ticket is None or o.ticket == ticket)
                 and (position is None or o.position_id == position))


def history_deals_get(date_from: _Any = None, date_to: _Any = None, group: str | None = None,
                      ticket: int | None = None, position: int | None = None) -> tuple | None:
    if not _linked():
        return None
    return tuple(d for d in _terminal.deals if (ticket is None or d.order == ticket)
                 and (position is None or d.position_id == position))
