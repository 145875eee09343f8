"""The `paper` plugin: simulated fills, positions and attached stop-loss / take-profit orders."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Mapping

from fksroute.plugins.base import FAILED, FILLED, PLACED, OrderRequest, OrderResult, PluginContext

# Results kept by client order id (a second delivery of one is answered, never filled again):
# the most recent ones only, so that a daemon running for months does not keep every order.
# The journal already refuses a client order id it holds; this is the plugin's own guard, for
# the orders a crash can leave executed but not journaled (at most a commit group or two, the
# last lines of the ledger). About 600 bytes each: 10,000 held 6 MB of a busy daemon's memory.
RESULTS_KEPT = 2_000


@lru_cache(maxsize=1024)
def _slipped(reference: float, factor: float) -> float:
    """The market price moved by the slippage, to 10 decimals (100 * 1.0005 is 100.05000000000001
    in floats). Remembered: round() costs as much as the rest of a fill, and alerts without a price
    fill at the same simulated price again and again."""
    return round(reference * factor, 10)


@dataclass
class _Position:
    quantity: float = 0.0  # signed: long > 0, short < 0
    average_price: float = 0.0

    def apply(self, side: str, quantity: float, price: float) -> None:
        signed = quantity if side == "buy" else -quantity
        new = self.quantity + signed
        if self.quantity == 0 or (self.quantity > 0) == (signed > 0):
            total = abs(self.quantity) + quantity
            self.average_price = (abs(self.quantity) * self.average_price + quantity * price) / total
        elif new != 0 and (new > 0) != (self.quantity > 0):
            self.average_price = price  # flipped through flat: the rest opened at this price
        self.quantity = round(new, 12)
        if self.quantity == 0:
            self.average_price = 0.0


@dataclass
class _Resting:
    """An order waiting for the market: a limit or stop entry, or an attached SL/TP."""

    order_id: str
    symbol: str
    side: str
    quantity: float
    kind: str  # limit | stop | stop_limit | stop_loss | take_profit
    limit: float | None = None
    trigger: float | None = None
    parent: str | None = None
    client_order_id: str | None = None


@dataclass
class _Book:
    prices: dict[str, float] = field(default_factory=dict)
    positions: dict[str, _Position] = field(default_factory=dict)
    resting: dict[str, _Resting] = field(default_factory=dict)
    results: OrderedDict[str, OrderResult] = field(default_factory=OrderedDict)  # by client order id
    fills: int = 0

    def remember(self, client_order_id: str, result: OrderResult) -> None:
        results = self.results
        if client_order_id in results:  # a resting order filled later: now the most recent
            results.move_to_end(client_order_id)
        results[client_order_id] = result
        if len(results) > RESULTS_KEPT:
            results.popitem(last=False)


class PaperPlugin:
    """Fills orders against a simulated market: no money moves.

    Market orders fill at the reference price (the order's `price`, else the symbol's
    simulated price) moved `slippage_bps` against the trader; limit orders fill only at
    the limit or better, else rest until the price reaches them. With `ledger:` every fill
    is appended to a JSON-lines file, which also restores the book after a restart.
    """

    def __init__(self, name: str, settings: Mapping[str, Any], context: PluginContext) -> None:
        self.name = name
        self.slippage = float(settings.get("slippage_bps", 5)) / 10000
        self.default_price = float(settings.get("default_price", 100))
        self.ledger = context.base_dir / settings["ledger"] if settings.get("ledger") else None
        self.log = context.logger
        self.book = _Book(prices=dict(settings.get("prices", {})))
        # execute() never fills a client order id twice, and after a restart the book knows every
        # fill the ledger holds: an order it does not know was never filled, so resending is safe.
        # Without a ledger the book lives in memory and a restart wipes it: there is no venue to ask,
        # and an order a crash interrupted is simply simulated again.
        self.resend_safe = True

    async def start(self) -> None:
        if self.ledger is not None and self.ledger.exists():
            with open(self.ledger, "rb+") as handle:
                size = handle.seek(0, os.SEEK_END)
                if size:
                    handle.seek(size - 1)
                    if handle.read(1) != b"\n":
                        handle.write(b"\n")  # a line torn by a crash stays alone: the next fill starts clean
            for line in self.ledger.read_text(encoding="utf-8").splitlines():
                try:
                    self._replay(json.loads(line))
                except (ValueError, KeyError, TypeError):
                    self.log.warning("paper ledger %s: skipped an unreadable line", self.ledger)

    async def execute(self, request: OrderRequest) -> OrderResult:
        return self.execute_now(request)

    def execute_now(self, request: OrderRequest) -> OrderResult:
        """`execute` without the coroutine: nothing here waits, so the dispatcher runs it in line.
        One order's look-up, fill and record cannot interleave with another's."""
        known = self.book.results.get(request.client_order_id)
        if known is not None:
            return known  # the same client order id again: never a second fill
        try:
            result = self._execute(request)
        except (TypeError, ValueError, KeyError) as exc:
            result = OrderResult(FAILED, error=f"paper: invalid order: {exc}")
        self.book.remember(request.client_order_id, result)
        if self.ledger is not None:
            self._record(request, result)
        return result

    async def lookup(self, request: OrderRequest) -> OrderResult | None:
        return self.book.results.get(request.client_order_id)

    async def health(self) -> dict[str, Any]:
        return {"healthy": True, "fills": self.book.fills,
                "positions": {s: {"quantity": p.quantity, "average_price": p.average_price}
                              for s, p in self.book.positions.items() if p.quantity}}

    async def close(self) -> None:
        return None

    # --- the simulation -----------------------------------------------------------------

    def _market(self, symbol: str, hint: float | None) -> float:
        if hint:
            self._move(symbol, hint)
        return self.book.prices.setdefault(symbol, self.default_price)

    def _execute(self, request: OrderRequest) -> OrderResult:
        order = request.order
        symbol, side, kind = str(order["symbol"]), str(order["side"]), str(order.get("type", "market"))
        quantity = float(order["quantity"])
        order_id = f"paper-{request.client_order_id}"
        if kind == "market":
            reference = self._market(symbol, order.get("price"))
            return self._fill(request, order_id, symbol, side, quantity,
                              _slipped(reference, 1 + self.slippage if side == "buy" else 1 - self.slippage))
        limit = float(order["price"]) if order.get("price") is not None else None
        trigger = float(order["stop_price"]) if order.get("stop_price") is not None else None
        if symbol not in self.book.prices:
            self.book.prices[symbol] = limit or trigger or self.default_price
        market = self.book.prices[symbol]
        resting = _Resting(order_id, symbol, side, quantity, kind, limit, trigger, client_order_id=request.client_order_id)
        price = self._triggered_price(resting, market)
        if price is not None:
            return self._fill(request, order_id, symbol, side, quantity, round(price, 10))
        self.book.resting[order_id] = resting
        return OrderResult(PLACED, order_id, filled_quantity=0.0,
                           detail={"simulated": True, "market_price": market, "resting": kind})

    def _triggered_price(self, order: _Resting, market: float) -> float | None:
        """The fill price if `order` executes at `market` now, else None."""
        buy = order.side == "buy"
        if order.kind in ("stop", "stop_limit", "stop_loss", "take_profit") and order.trigger is not None:
            # A buy stop (or a short's stop loss) fires on the way up; a long's take profit too.
            rising = (not buy) if order.kind == "take_profit" else buy
            hit = market >= order.trigger if rising else market <= order.trigger
            if not hit:
                return None
            if order.kind in ("stop", "stop_loss", "take_profit"):
                return market
        if order.limit is None:
            return None
        if buy and market <= order.limit:
            return market
        if not buy and market >= order.limit:
            return market
        return None

    def _fill(self, request: OrderRequest, order_id: str, symbol: str, side: str,
              quantity: float, price: float) -> OrderResult:
        """Fill at `price`, which the caller rounded to 10 decimals."""
        book = self.book
        position = book.positions.get(symbol)
        if position is None:
            position = book.positions[symbol] = _Position()
        position.apply(side, quantity, price)
        book.fills += 1
        detail: dict[str, Any] = {"simulated": True, "position": position.quantity}
        order = request.order
        if "stop_loss" in order or "take_profit" in order:
            attached = self._attach(request, order_id, symbol, side, quantity)
            if attached:
                detail["attached"] = attached
        return OrderResult(FILLED, order_id, None, quantity, price, detail)

    def _attach(self, request: OrderRequest, parent: str, symbol: str, side: str, quantity: float) -> list[dict]:
        """Stop loss and take profit become resting exit orders, one cancelling the other."""
        exit_side = "sell" if side == "buy" else "buy"
        attached = []
        for kind in ("stop_loss", "take_profit"):
            level = request.order.get(kind)
            if level is None:
                continue
            order_id = f"{parent}-{'sl' if kind == 'stop_loss' else 'tp'}"
            self.book.resting[order_id] = _Resting(order_id, symbol, exit_side, quantity, kind,
                                                   trigger=float(level), parent=parent)
            attached.append({"order_id": order_id, "type": kind, "trigger_price": float(level), "side": exit_side})
        return attached

    def _move(self, symbol: str, price: float) -> None:
        """A new market price: resting orders it reaches fill, and their OCO siblings go."""
        self.book.prices[symbol] = float(price)
        for order in list(self.book.resting.values()):
            if order.symbol != symbol or order.order_id not in self.book.resting:
                continue
            fill = self._triggered_price(order, float(price))
            if fill is None:
                continue
            del self.book.resting[order.order_id]
            self.book.positions.setdefault(symbol, _Position()).apply(order.side, order.quantity, fill)
            self.book.fills += 1
            if order.parent:
                for sibling in [o for o in self.book.resting.values() if o.parent == order.parent]:
                    del self.book.resting[sibling.order_id]
            if order.client_order_id:
                self.book.remember(order.client_order_id, OrderResult(
                    FILLED, order.order_id, filled_quantity=order.quantity, average_price=fill,
                    detail={"simulated": True, "filled_later": True}))

    # --- the ledger -----------------------------------------------------------------------

    def _record(self, request: OrderRequest, result: OrderResult) -> None:
        if self.ledger is None:
            return
        line = json.dumps({"client_order_id": request.client_order_id, "alert_id": request.alert_id,
                           "route": request.route, "order": dict(request.order), "status": result.status,
                           "order_id": result.order_id, "error": result.error,
                           "filled_quantity": result.filled_quantity, "average_price": result.average_price},
                          separators=(",", ":"), default=str)
        with open(self.ledger, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def _replay(self, entry: dict[str, Any]) -> None:
        result = OrderResult(entry["status"], entry.get("order_id"), entry.get("error"),
                             entry.get("filled_quantity"), entry.get("average_price"))
        self.book.remember(entry["client_order_id"], result)
        order = entry["order"]
        if result.status == FILLED and result.filled_quantity:
            self.book.positions.setdefault(order["symbol"], _Position()).apply(
                order["side"], float(result.filled_quantity), float(result.average_price))
            self.book.prices[order["symbol"]] = float(result.average_price)
            self.book.fills += 1
