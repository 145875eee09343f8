"""Checking and shaping an order against a loaded ccxt market, before anything is sent.

`plan_order` rounds the amount and prices to the market's precision, checks them against its
limits and the stop-loss/take-profit sides, and returns the `create_order` calls to make; a
broken rule raises `MarketRefusal`. ccxt itself is imported lazily: only the ccxt plugin calls this.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable, Mapping

from fksroute.symbols import tv_symbol

# exchange-specific spellings of a client order id: ccxt would send one of these instead of ours
CLIENT_ID_PARAMS = frozenset({"clientOrderId", "newClientOrderId", "clientOid", "clOrdId", "orderLinkId",
                              "clientAlgoId"})
LINKED_ID_MAX = 32  # the shortest client order id limit among the big exchanges (OKX); Binance allows 36
_TRIGGER_PARAM = {"stop_loss": "stopLossPrice", "take_profit": "takeProfitPrice"}


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
                "amount": self.amount, "price": self.price, "params": plain(self.params)}


@dataclass(frozen=True)
class OrderPlan:
    """The entry order and the stop-loss/take-profit orders to place once the entry is accepted."""

    entry: OrderCall
    linked: tuple[tuple[str, OrderCall], ...] = ()
    reference_price: float | None = None


def plan_order(exchange: Any, order: Mapping[str, Any], client_order_id: str,
               reference_price: float | None = None) -> OrderPlan:
    """Check `order` against its market on `exchange` (markets loaded) and round it; raise MarketRefusal
    naming the broken limit. `reference_price` (a last price) stands in for a market order's price."""
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


def wants_reference_price(markets: Mapping[str, Any], order: Mapping[str, Any]) -> bool:
    """Whether `order` is a market order without a price whose cost limits or stop-loss/take-profit sides
    need a last price to be checked against."""
    if order.get("type", "market") != "market" or order.get("price") is not None:
        return False
    market = markets.get(order["symbol"]) or {}
    cost = (market.get("limits") or {}).get("cost") or {}
    protected = order.get("stop_loss") is not None or order.get("take_profit") is not None
    return bool(market) and (cost.get("min") is not None or cost.get("max") is not None or protected)


def linked_client_order_id(client_order_id: str, role: str) -> str:
    """The client order id of the stop-loss (`sl`) or take-profit (`tp`) order linked to an entry."""
    tag = {"stop_loss": "sl", "take_profit": "tp"}[role]
    suffix = tag if client_order_id.isalnum() else "-" + tag
    return client_order_id[: LINKED_ID_MAX - len(suffix)] + suffix


def plain(value: Any) -> Any:
    """A deep copy made of dicts, lists and scalars (settings may arrive as read-only mappings)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _amount(exchange: Any, market: Mapping[str, Any], quantity: float) -> float:
    amount = _rounded(exchange.amount_to_precision, market["symbol"], quantity)
    if amount is None:
        step = (market.get("precision") or {}).get("amount")
        raise MarketRefusal(f"quantity {_show(quantity)} rounds to zero at the amount precision {_show(step)} "
                            f"of {market['symbol']} (precision.amount)")
    return amount


def _price(exchange: Any, market: Mapping[str, Any], value: float | None, name: str) -> float:
    if value is None:
        raise MarketRefusal(f"{name} is required for this order type")
    rounded = _rounded(exchange.price_to_precision, market["symbol"], value)
    if rounded is None or rounded <= 0:
        tick = (market.get("precision") or {}).get("price")
        raise MarketRefusal(f"{name} {_show(value)} rounds to zero at the price precision {_show(tick)} of "
                            f"{market['symbol']} (precision.price)")
    _check_range(rounded, (market.get("limits") or {}).get("price"), "price", market["symbol"], name)
    return rounded


def _rounded(to_precision: Callable[[str, Any], str], symbol: str, value: float) -> float | None:
    """`value` rounded by ccxt's amount_to_precision or price_to_precision; None when ccxt refuses it."""
    from ccxt.base.errors import BaseError  # loaded already, by the exchange that rounds

    try:
        return float(to_precision(symbol, value))
    except BaseError:
        return None


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


def _show(value: Any) -> str:
    """A number as a trader writes it: 0.00005, not 5e-05; 60000, not 60000.0."""
    return f"{Decimal(str(value)).normalize():f}"
