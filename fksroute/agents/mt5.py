"""MetaTrader 5 backend: places orders through the `MetaTrader5` package, finding them again by their comment."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from types import ModuleType
from typing import Any, Callable, Mapping

from fksroute.agents.service import FAILED, FILLED, PLACED, UNKNOWN, AgentOrder, NotSent, OrderError, order_result

log = logging.getLogger("fksroute.agent.mt5")

# symbol_info().filling_mode is a bitmask of these (SYMBOL_FILLING_FOK, SYMBOL_FILLING_IOC in MQL5).
SYMBOL_FILLING_FOK = 1
SYMBOL_FILLING_IOC = 2
# order_send answers None with (-2, 'Invalid "comment" argument') beyond this length.
COMMENT_MAX = 31
# last_error() codes at or below this are the package's link to the terminal failing (RES_E_INTERNAL_FAIL*).
IPC_FAILURE = -10000
# History is kept in trade-server time, which may run a few hours ahead of UTC: search a generous window.
HISTORY_BACK = 7 * 86400
HISTORY_AHEAD = 2 * 86400
DEFAULT_DEVIATION = 10
DEFAULT_PRICE_RETRIES = 3
DEFAULT_RECONCILE_DELAY = 1.0


def mt5_comment(order_id: str) -> str:
    """The order comment that carries `order_id`: the id itself, or a shortened form with a hash that stays unique."""
    if len(order_id) <= COMMENT_MAX:
        return order_id
    return f"{order_id[:COMMENT_MAX - 9]}~{hashlib.sha256(order_id.encode()).hexdigest()[:8]}"


def _whole(params: Mapping[str, Any], name: str, default: int) -> int:
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise OrderError(f"params.{name} must be a whole number of at least 0")
    return value


class Mt5Backend:
    """Drives one logged-in MetaTrader 5 terminal; every call into the package holds one lock (it is not thread-safe)."""

    name = "mt5"

    def __init__(self, mt5: ModuleType, *, path: str | None = None, login: int | None = None,
                 server: str | None = None, password: Callable[[], str | None] = lambda: None,
                 magic: int = 0, deviation: int = DEFAULT_DEVIATION, price_retries: int = DEFAULT_PRICE_RETRIES,
                 reconcile_delay: float = DEFAULT_RECONCILE_DELAY, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.time) -> None:
        self.mt5 = mt5
        self._path = path
        self._login = login
        self._server = server
        self._password = password  # read when needed, never kept in a string attribute or logged
        self.magic = magic
        self.deviation = deviation
        self.price_retries = price_retries
        self.reconcile_delay = reconcile_delay
        self._sleep = sleep
        self._clock = clock
        self._lock = threading.RLock()
        self._initialized = False

    # -- the terminal link ------------------------------------------------------------------------

    def _error(self) -> tuple[int, str]:
        error = self.mt5.last_error()
        try:
            code, message = error
            return int(code), str(message)
        except (TypeError, ValueError):
            return 0, str(error)

    def connect(self) -> None:
        """initialize() the package unless the terminal already answers; NotSent when it cannot."""
        with self._lock:
            if self._initialized and self.mt5.terminal_info() is not None:
                return
            kwargs: dict[str, Any] = {}
            if self._login is not None:
                kwargs["login"] = int(self._login)
            password = self._password()
            if password:
                kwargs["password"] = password
            if self._server:
                kwargs["server"] = self._server
            ok = self.mt5.initialize(self._path, **kwargs) if self._path else self.mt5.initialize(**kwargs)
            if not ok:
                self._initialized = False
                code, message = self._error()
                raise NotSent(f"MetaTrader 5 initialize failed: {code} {message}")
            self._initialized = True
            log.info("connected to the MetaTrader 5 terminal")

    def _reconnect(self) -> None:
        with self._lock:
            self._initialized = False
            try:
                self.mt5.shutdown()
            except Exception:
                log.debug("shutdown failed", exc_info=True)
            try:
                self.connect()
            except NotSent as exc:
                log.warning("%s", exc)

    def close(self) -> None:
        with self._lock:
            if self._initialized:
                self.mt5.shutdown()
                self._initialized = False

    # -- building requests ------------------------------------------------------------------------

    def filling(self, filling_mode: int, time_in_force: str | None) -> int:
        """type_filling from the symbol's filling_mode bitmask; an explicit IOC or FOK must be allowed by it."""
        mt5 = self.mt5
        if time_in_force == "FOK" or time_in_force == "IOC":
            bit = SYMBOL_FILLING_FOK if time_in_force == "FOK" else SYMBOL_FILLING_IOC
            if not filling_mode & bit:
                raise OrderError(f"this symbol does not allow {time_in_force} filling")
            return mt5.ORDER_FILLING_FOK if time_in_force == "FOK" else mt5.ORDER_FILLING_IOC
        if filling_mode & SYMBOL_FILLING_FOK:
            return mt5.ORDER_FILLING_FOK
        if filling_mode & SYMBOL_FILLING_IOC:
            return mt5.ORDER_FILLING_IOC
        return mt5.ORDER_FILLING_RETURN

    def _market_price(self, symbol: str, side: str) -> float:
        tick = self.mt5.symbol_info_tick(symbol)
        price = None if tick is None else (tick.ask if side == "buy" else tick.bid)
        if not price:
            code, message = self._error()
            raise NotSent(f"no price for {symbol}: {code} {message}")
        return float(price)

    def build_request(self, order: AgentOrder, filling_mode: int) -> dict[str, Any]:
        """The order_send() request for `order`; every number MetaTrader reads as double is a float."""
        mt5 = self.mt5
        buy = order.side == "buy"
        params = order.params
        unknown = set(params) - {"deviation", "magic"}
        if unknown:
            raise OrderError(f"MetaTrader 5 orders take params deviation and magic, not {', '.join(sorted(unknown))}")
        request: dict[str, Any] = {"symbol": order.symbol, "volume": float(order.quantity)}
        if order.type == "market":
            request.update(action=mt5.TRADE_ACTION_DEAL, type=mt5.ORDER_TYPE_BUY if buy else mt5.ORDER_TYPE_SELL,
                           price=self._market_price(order.symbol, order.side))
        elif order.type == "limit":
            request.update(action=mt5.TRADE_ACTION_PENDING,
                           type=mt5.ORDER_TYPE_BUY_LIMIT if buy else mt5.ORDER_TYPE_SELL_LIMIT,
                           price=float(order.price))
        elif order.type == "stop":
            request.update(action=mt5.TRADE_ACTION_PENDING,
                           type=mt5.ORDER_TYPE_BUY_STOP if buy else mt5.ORDER_TYPE_SELL_STOP,
                           price=float(order.stop_price))
        else:
            request.update(action=mt5.TRADE_ACTION_PENDING,
                           type=mt5.ORDER_TYPE_BUY_STOP_LIMIT if buy else mt5.ORDER_TYPE_SELL_STOP_LIMIT,
                           price=float(order.stop_price), stoplimit=float(order.price))
        if order.stop_loss is not None:
            request["sl"] = float(order.stop_loss)
        if order.take_profit is not None:
            request["tp"] = float(order.take_profit)
        pending_day = order.type != "market" and order.time_in_force == "DAY"
        request.update(
            deviation=_whole(params, "deviation", self.deviation), magic=_whole(params, "magic", self.magic),
            comment=mt5_comment(order.order_id),
            type_time=mt5.ORDER_TIME_DAY if pending_day else mt5.ORDER_TIME_GTC,
            type_filling=self.filling(filling_mode, order.time_in_force),
        )
        return request

    # -- placing ----------------------------------------------------------------------------------

    def _prepare(self, symbol: str) -> Any:
        self.connect()
        if not self.mt5.symbol_select(symbol, True):
            code, message = self._error()
            raise OrderError(f"symbol {symbol} is not available in this terminal: {code} {message}")
        info = self.mt5.symbol_info(symbol)
        if info is None:
            code, message = self._error()
            raise OrderError(f"symbol {symbol} is not available in this terminal: {code} {message}")
        return info

    def place(self, order: AgentOrder) -> dict[str, Any]:
        with self._lock:
            try:
                info = self._prepare(order.symbol)
                if order.account:
                    self._check_account(order.account)
                request = self.build_request(order, int(info.filling_mode))
            except OrderError as exc:
                return order_result(order.order_id, FAILED, error=str(exc))
            return self._send(order.order_id, request)

    def _success(self, order_id: str, request: dict[str, Any], result: Any) -> dict[str, Any]:
        detail = {"retcode": result.retcode, "comment": result.comment, "deal": result.deal}
        ticket = str(result.order) if result.order else None
        if request["action"] == self.mt5.TRADE_ACTION_DEAL:
            partial = result.retcode == self.mt5.TRADE_RETCODE_DONE_PARTIAL
            return order_result(order_id, FILLED, filled_quantity=float(result.volume),
                                average_price=float(result.price) or None, venue_order_id=ticket,
                                partial=partial, **detail)
        return order_result(order_id, PLACED, filled_quantity=0.0, venue_order_id=ticket, **detail)

    def _send(self, order_id: str, request: dict[str, Any]) -> dict[str, Any]:
        """order_send with the retcode rules: retry a moved price (bounded), reconcile an unknown outcome before resending."""
        mt5 = self.mt5
        succeeded = (mt5.TRADE_RETCODE_DONE, mt5.TRADE_RETCODE_PLACED, mt5.TRADE_RETCODE_DONE_PARTIAL)
        price_moved = (mt5.TRADE_RETCODE_REQUOTE, mt5.TRADE_RETCODE_PRICE_CHANGED, mt5.TRADE_RETCODE_PRICE_OFF)
        outcome_unknown = (mt5.TRADE_RETCODE_TIMEOUT, mt5.TRADE_RETCODE_CONNECTION)
        price_retries = 0
        resent = False
        while True:
            log.info("order_send %s: %s", order_id, request)
            result = mt5.order_send(request)
            if result is None:
                code, message = self._error()
                if code > IPC_FAILURE:
                    return order_result(order_id, FAILED, error=f"MetaTrader 5 refused the request: {code} {message}")
                log.warning("order %s: lost the terminal (%s %s); reconnecting", order_id, code, message)
                self._reconnect()
                why = f"lost the terminal during order_send: {code} {message}"
            elif result.retcode in succeeded:
                return self._success(order_id, request, result)
            elif result.retcode in price_moved and price_retries < self.price_retries:
                price_retries += 1
                log.info("order %s: %s %s, retrying with a fresh price", order_id, result.retcode, result.comment)
                request = self._refresh_price(request)
                continue
            elif result.retcode in outcome_unknown:
                why = f"{result.retcode} {result.comment}"
            else:
                return order_result(order_id, FAILED, error=f"rejected by MetaTrader 5: {result.retcode} {result.comment}",
                                    retcode=result.retcode)
            # The request may have reached the trade server: look for it before sending it again.
            self._sleep(self.reconcile_delay)
            try:
                found = self._find(order_id)
                if found is None and not resent:
                    request = self._refresh_price(request)
            except NotSent as exc:
                return order_result(order_id, UNKNOWN, error=f"outcome unknown after {why}; {exc}")
            if found is not None:
                return found
            if resent:
                return order_result(order_id, UNKNOWN, error=f"outcome unknown after {why}")
            resent = True
            log.warning("order %s: %s and not found by comment; sending once more", order_id, why)

    def _refresh_price(self, request: dict[str, Any]) -> dict[str, Any]:
        """The same request at the current market price (pending orders keep their own price)."""
        if request["action"] != self.mt5.TRADE_ACTION_DEAL:
            return request
        side = "buy" if request["type"] == self.mt5.ORDER_TYPE_BUY else "sell"
        return {**request, "price": self._market_price(request["symbol"], side)}

    # -- finding orders again ---------------------------------------------------------------------

    def _history_window(self) -> tuple[int, int]:
        now = int(self._clock())
        return now - HISTORY_BACK, now + HISTORY_AHEAD

    def _read(self, what: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        # None means the package could not answer (an empty result is an empty tuple): not the same as "not there".
        found = getattr(self.mt5, what)(*args, **kwargs)
        if found is None:
            code, message = self._error()
            raise NotSent(f"cannot read {what} from the terminal: {code} {message}")
        return tuple(found)

    def _fill_price(self, ticket: int) -> float | None:
        deals = [d for d in self.mt5.history_deals_get(*self._history_window()) or () if d.order == ticket]
        volume = sum(d.volume for d in deals)
        return sum(d.volume * d.price for d in deals) / volume if volume else None

    def _find(self, order_id: str) -> dict[str, Any] | None:
        """The order whose comment carries `order_id`: pending, in history, or as an open position; NotSent if unreadable."""
        mt5 = self.mt5
        comment = mt5_comment(order_id)
        for pending in self._read("orders_get"):
            if pending.comment == comment:
                filled = float(pending.volume_initial - pending.volume_current)
                return order_result(order_id, PLACED, filled_quantity=filled, venue_order_id=str(pending.ticket),
                                    state=pending.state)
        history = [o for o in self._read("history_orders_get", *self._history_window()) if o.comment == comment]
        if history:
            done = max(history, key=lambda o: o.time_setup_msc)
            filled = float(done.volume_initial - done.volume_current)
            average = self._fill_price(done.ticket) if filled else None
            ticket = str(done.ticket)
            if done.state == mt5.ORDER_STATE_FILLED:
                return order_result(order_id, FILLED, filled_quantity=filled, average_price=average,
                                    venue_order_id=ticket, state=done.state)
            if done.state in (mt5.ORDER_STATE_CANCELED, mt5.ORDER_STATE_REJECTED, mt5.ORDER_STATE_EXPIRED):
                return order_result(order_id, FAILED, error=f"order {ticket} ended in state {done.state}",
                                    filled_quantity=filled, average_price=average, venue_order_id=ticket,
                                    state=done.state)
            return order_result(order_id, PLACED, filled_quantity=filled, average_price=average,
                                venue_order_id=ticket, state=done.state)
        for position in self._read("positions_get"):
            if position.comment == comment:
                return order_result(order_id, FILLED, filled_quantity=float(position.volume),
                                    average_price=float(position.price_open), venue_order_id=str(position.ticket))
        return None

    def order_status(self, order_id: str) -> dict[str, Any] | None:
        with self._lock:
            self.connect()
            return self._find(order_id)

    # -- the rest of the service ------------------------------------------------------------------

    def cancel(self, order_id: str) -> dict[str, Any]:
        with self._lock:
            self.connect()
            comment = mt5_comment(order_id)
            pending = [o for o in self._read("orders_get") if o.comment == comment]
            if not pending:
                return {"order_id": order_id, "status": FAILED, "error": "no pending order with this id"}
            result = self.mt5.order_send({"action": self.mt5.TRADE_ACTION_REMOVE, "order": pending[0].ticket})
            if result is None:
                code, message = self._error()
                return {"order_id": order_id, "status": FAILED, "error": f"{code} {message}"}
            if result.retcode != self.mt5.TRADE_RETCODE_DONE:
                return {"order_id": order_id, "status": FAILED, "error": f"{result.retcode} {result.comment}"}
            return {"order_id": order_id, "status": "cancelled", "venue_order_id": str(pending[0].ticket)}

    def _check_account(self, account: str) -> None:
        info = self.mt5.account_info()
        if account and info is not None and str(info.login) != account:
            raise OrderError(f"this terminal is logged in to account {info.login}, not {account}")

    def _close_request(self, position: Any, filling_mode: int) -> dict[str, Any]:
        mt5 = self.mt5
        sell = position.type == mt5.POSITION_TYPE_BUY
        return {
            "action": mt5.TRADE_ACTION_DEAL, "symbol": position.symbol, "volume": float(position.volume),
            "type": mt5.ORDER_TYPE_SELL if sell else mt5.ORDER_TYPE_BUY, "position": position.ticket,
            "price": self._market_price(position.symbol, "sell" if sell else "buy"), "deviation": self.deviation,
            "magic": self.magic, "comment": mt5_comment(f"close-{position.ticket}"),
            "type_time": mt5.ORDER_TIME_GTC, "type_filling": self.filling(filling_mode, None),
        }

    def close_position(self, account: str, symbol: str) -> dict[str, Any]:
        with self._lock:
            try:
                info = self._prepare(symbol)
                self._check_account(account)
            except OrderError as exc:
                return {"account": account, "symbol": symbol, "status": FAILED, "error": str(exc)}
            results = []
            for position in self._read("positions_get", symbol=symbol):
                key = f"close-{position.ticket}"
                try:
                    results.append(self._send(key, self._close_request(position, int(info.filling_mode))))
                except NotSent as exc:
                    results.append(order_result(key, FAILED, error=str(exc)))
            failed = [r for r in results if r["status"] != FILLED]
            status = "flat" if not results else ("closed" if not failed else FAILED)
            return {"account": account, "symbol": symbol, "status": status, "results": results,
                    "error": failed[0]["error"] if failed else None}

    def positions(self, account: str) -> list[dict[str, Any]]:
        mt5 = self.mt5
        with self._lock:
            self.connect()
            self._check_account(account)
            return [{"symbol": p.symbol, "side": "long" if p.type == mt5.POSITION_TYPE_BUY else "short",
                     "quantity": float(p.volume), "average_price": float(p.price_open), "ticket": p.ticket,
                     "profit": float(p.profit), "comment": p.comment}
                    for p in self._read("positions_get")]

    def health(self) -> dict[str, Any]:
        with self._lock:
            try:
                self.connect()
            except NotSent as exc:
                return {"healthy": False, "error": str(exc)}
            terminal = self.mt5.terminal_info()
            account = self.mt5.account_info()
            if terminal is None:
                return {"healthy": False, "error": "the MetaTrader 5 terminal does not answer"}
            state = {"connected": bool(terminal.connected), "trade_allowed": bool(terminal.trade_allowed),
                     "login": getattr(account, "login", None), "server": getattr(account, "server", None)}
            if not terminal.connected:
                return {**state, "healthy": False, "error": "the terminal has no connection to the trade server"}
            if not terminal.trade_allowed:
                return {**state, "healthy": False, "error": "AutoTrading is disabled in the terminal"}
            return {**state, "healthy": True}
