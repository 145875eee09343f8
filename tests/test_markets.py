"""Checking and shaping orders against a market: real ccxt exchanges given their markets, no network."""

import asyncio

import pytest

from fksroute.plugins.ccxt import CcxtSettings, build_exchange
from fksroute.plugins.markets import MarketRefusal, linked_client_order_id, plan_order, wants_reference_price

SWAP = "BTC/USDT:USDT"
ORDER = {"symbol": SWAP, "side": "buy", "type": "limit", "quantity": 1.234, "price": 60000.06,
         "stop_loss": 59000, "take_profit": 61000}


def swap_market(symbol=SWAP, **changes):
    """A linear perpetual swap in ccxt's unified market structure, as load_markets would give it."""
    base, rest = symbol.split("/")
    quote, settle = rest.split(":")
    market = {"id": f"{base}-{quote}-SWAP", "symbol": symbol, "base": base, "quote": quote, "settle": settle,
              "baseId": base, "quoteId": quote, "settleId": settle, "type": "swap", "spot": False, "swap": True,
              "contract": True, "linear": True, "active": True, "contractSize": 0.01,
              "precision": {"amount": 0.01, "price": 0.1},
              "limits": {"amount": {"min": 0.01}, "price": {}, "cost": {"min": 5}, "leverage": {}}}
    return {**market, **changes}


@pytest.fixture
def exchange(request):
    """A real ccxt.async_support exchange, built as the plugin builds it, with one swap market set."""
    built = build_exchange(CcxtSettings(exchange=request.param))
    built.set_markets([swap_market(), swap_market("ETH/USDT:USDT", active=False)])
    yield built
    asyncio.run(built.close())


@pytest.mark.parametrize("exchange", ["okx"], indirect=True)
def test_stop_loss_and_take_profit_ride_on_the_entry_where_the_exchange_takes_them(exchange):
    plan = plan_order(exchange, {**ORDER, "reduce_only": True}, "fks-1")
    assert plan.linked == ()
    assert (plan.entry.amount, plan.entry.price, plan.reference_price) == (1.23, 60000.1, 60000.1)
    assert plan.entry.params == {"clientOrderId": "fks-1", "reduceOnly": True,
                                 "stopLoss": {"triggerPrice": 59000.0}, "takeProfit": {"triggerPrice": 61000.0}}


@pytest.mark.parametrize("exchange", ["binanceusdm"], indirect=True)
def test_elsewhere_they_are_reduce_only_orders_on_the_other_side(exchange):
    plan = plan_order(exchange, ORDER, "fks-1")
    assert plan.entry.params == {"clientOrderId": "fks-1"}
    assert [(role, call.side, call.type, call.amount, dict(call.params)) for role, call in plan.linked] == [
        ("stop_loss", "sell", "market", 1.23,
         {"clientOrderId": "fks-1-sl", "stopLossPrice": 59000.0, "reduceOnly": True}),
        ("take_profit", "sell", "market", 1.23,
         {"clientOrderId": "fks-1-tp", "takeProfitPrice": 61000.0, "reduceOnly": True})]
    assert plan.linked[0][1].as_json()["method"] == "create_order"


@pytest.mark.parametrize("exchange", ["okx"], indirect=True)
@pytest.mark.parametrize("order, words", [
    ({"symbol": "ETH/USDT:USDT", "side": "buy", "type": "market", "quantity": 1}, "ETH/USDT:USDT is not active"),
    ({"symbol": SWAP, "side": "buy", "type": "limit", "quantity": 1}, "price is required"),
    ({"symbol": SWAP, "side": "buy", "type": "stop", "quantity": 1, "price": 60000}, "stop_price is required"),
    ({"symbol": SWAP, "side": "buy", "type": "limit", "quantity": 1, "price": 0.01}, "price 0.01 rounds to zero"),
    ({**ORDER, "side": "sell"}, "stop_loss 59000 must be above the entry price 60000.1 for a sell"),
])
def test_a_broken_rule_is_refused_by_name(exchange, order, words):
    with pytest.raises(MarketRefusal, match=words):
        plan_order(exchange, order, "fks-1")


@pytest.mark.parametrize("exchange", ["okx"], indirect=True)
def test_a_last_price_is_wanted_only_for_a_priceless_market_order_with_something_to_check(exchange):
    market = {"symbol": SWAP, "side": "buy", "type": "market", "quantity": 1}
    assert wants_reference_price(exchange.markets, market)  # the swap has a minimum cost
    assert wants_reference_price({SWAP: swap_market(limits={})}, {**market, "stop_loss": 59000})
    assert not wants_reference_price({SWAP: swap_market(limits={})}, market)
    assert not wants_reference_price(exchange.markets, {**market, "price": 60000})
    assert not wants_reference_price(exchange.markets, {**ORDER, "type": "limit"})
    assert not wants_reference_price(exchange.markets, {**market, "symbol": "SOL/USDT:USDT"})


def test_linked_client_order_ids_stay_short_and_distinct():
    cid = "fks" + "0123456789abcdef" * 2
    assert linked_client_order_id(cid[:32], "stop_loss") == cid[:30] + "sl"
    assert linked_client_order_id("fks-1", "take_profit") == "fks-1-tp"
    assert linked_client_order_id(cid[:32], "stop_loss") != linked_client_order_id(cid[:32], "take_profit")
