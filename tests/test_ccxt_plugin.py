"""The ccxt plugin with the real ccxt library against the Binance imitation: orders, market checks, dry run."""

import asyncio
import json
import logging
from pathlib import Path

import jsonschema
import pytest
from binance_imitation import BinanceImitation, SpotSymbol, imitation, plugin_settings  # noqa: F401

from fksroute.plugins.base import OrderRequest, PluginContext
from fksroute.plugins.ccxt import CcxtPlugin, CcxtSettings

ALERTS = Path(__file__).parent / "alerts"
ROOT = Path(__file__).parent.parent


def make_plugin(settings, name="binance"):
    return CcxtPlugin(name, settings, PluginContext(ROOT, logging.getLogger(f"test.{name}")))


async def until_healthy(plugin, timeout=5.0):
    for _ in range(int(timeout / 0.02)):
        if (await plugin.health())["healthy"]:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not healthy: {await plugin.health()}")


def run(settings, *orders, cid_prefix="fks-test"):
    """Start a plugin, execute `orders` one after another, close it; return the results."""
    async def scenario():
        plugin = make_plugin(settings)
        await plugin.start()
        try:
            await until_healthy(plugin)
            return [await plugin.execute(request(order, f"{cid_prefix}-{i}")) for i, order in enumerate(orders)]
        finally:
            await plugin.close()
    return asyncio.run(scenario())


def request(order, cid="fks-test-0"):
    return OrderRequest(client_order_id=cid, alert_id="a-" + cid, route="crypto", plugin="binance", order=order)


def seed_order(name):
    """The canonical order the shipped route renders from a seed alert."""
    alert = json.loads((ALERTS / name).read_text())
    order = {"symbol": alert["symbol"], "side": alert["action"], "type": alert.get("order_type", "market"),
             "quantity": alert["quantity"]}
    for key in ("price", "stop_loss", "take_profit"):
        if alert.get(key) is not None:
            order[key] = alert[key]
    return order


def test_seed_buy_market_arrives_as_a_binance_market_order(imitation):
    [result] = run(plugin_settings(imitation), seed_order("seed-buy-market.json"))
    [sent] = imitation.order_requests
    assert {k: sent[k] for k in ("symbol", "side", "type", "quantity", "newClientOrderId")} == {
        "symbol": "BTCUSDT", "side": "BUY", "type": "MARKET", "quantity": "0.01", "newClientOrderId": "fks-test-0"}
    assert "price" not in sent and "timeInForce" not in sent and "quoteOrderQty" not in sent
    [accepted] = imitation.orders
    assert result.status == "filled"
    assert result.order_id == str(accepted["orderId"])
    assert result.filled_quantity == 0.01 and result.average_price == 60000.0
    assert result.detail["request"]["params"]["clientOrderId"] == "fks-test-0"
    json.dumps(result.detail)  # journaled: plain JSON only


def test_seed_sell_limit_places_the_entry_then_its_stop_loss_and_take_profit(imitation):
    [result] = run(plugin_settings(imitation), {**seed_order("seed-sell-limit-sl-tp.json"), "time_in_force": "GTC"})
    entry, stop_loss, take_profit = imitation.order_requests
    assert {k: entry[k] for k in ("symbol", "side", "type", "quantity", "price", "timeInForce",
                                  "newClientOrderId")} == {
        "symbol": "ETHUSDT", "side": "SELL", "type": "LIMIT", "quantity": "0.5", "price": "3500",
        "timeInForce": "GTC", "newClientOrderId": "fks-test-0"}
    # binance has no stop loss attached to an entry: separate orders on the other side
    assert {k: stop_loss[k] for k in ("symbol", "side", "type", "quantity", "stopPrice", "newClientOrderId")} == {
        "symbol": "ETHUSDT", "side": "BUY", "type": "STOP_LOSS", "quantity": "0.5", "stopPrice": "3600",
        "newClientOrderId": "fks-test-0-sl"}
    assert {k: take_profit[k] for k in ("side", "type", "stopPrice", "newClientOrderId")} == {
        "side": "BUY", "type": "TAKE_PROFIT", "stopPrice": "3400", "newClientOrderId": "fks-test-0-tp"}
    ids = {o["clientOrderId"]: str(o["orderId"]) for o in imitation.orders}
    assert result.status == "placed" and result.error is None
    assert result.order_id == ids["fks-test-0"]
    assert result.detail["linked"]["stop_loss"]["order_id"] == ids["fks-test-0-sl"]
    assert result.detail["linked"]["take_profit"]["order_id"] == ids["fks-test-0-tp"]


def test_a_default_limit_order_gets_the_exchange_default_time_in_force(imitation):
    [result] = run(plugin_settings(imitation), {"symbol": "ETH/USDT", "side": "buy", "type": "limit",
                                                "quantity": 0.5, "price": 2900})
    assert result.status == "placed"
    assert imitation.order_requests[0]["timeInForce"] == "GTC"


def test_amount_and_price_are_rounded_to_the_market_precision(imitation):
    run(plugin_settings(imitation), {"symbol": "ETH/USDT", "side": "buy", "type": "limit",
                                     "quantity": 0.123456789, "price": 2900.126})
    sent = imitation.order_requests[0]
    assert sent["quantity"] == "0.1234"  # amount_to_precision rounds down (step 0.0001)
    assert sent["price"] == "2900.13"  # price_to_precision rounds to the nearest tick


def test_stop_and_stop_limit_orders_carry_the_trigger_price(imitation):
    stop, stop_limit = run(plugin_settings(imitation),
                           {"symbol": "BTC/USDT", "side": "buy", "type": "stop", "quantity": 0.01, "stop_price": 61000},
                           {"symbol": "BTC/USDT", "side": "sell", "type": "stop_limit", "quantity": 0.01,
                            "price": 58900, "stop_price": 59000, "time_in_force": "IOC"})
    first, second = imitation.order_requests
    assert (first["type"], first["stopPrice"], "price" in first) == ("STOP_LOSS", "61000", False)
    assert (second["type"], second["stopPrice"], second["price"], second["timeInForce"]) == (
        "STOP_LOSS_LIMIT", "59000", "58900", "IOC")
    assert stop.status == stop_limit.status == "placed"


def test_post_only_becomes_a_limit_maker_order(imitation):
    [result] = run(plugin_settings(imitation), {"symbol": "ETH/USDT", "side": "buy", "type": "limit",
                                                "quantity": 0.5, "price": 2900, "post_only": True})
    assert result.status == "placed"
    assert imitation.order_requests[0]["type"] == "LIMIT_MAKER"
    assert "timeInForce" not in imitation.order_requests[0]


def test_params_pass_through_but_cannot_replace_the_client_order_id(imitation):
    run(plugin_settings(imitation), {"symbol": "BTC/USDT", "side": "buy", "type": "market", "quantity": 0.01,
                                     "params": {"selfTradePreventionMode": "EXPIRE_BOTH", "clientOrderId": "mine",
                                                "newClientOrderId": "mine-too"}})
    sent = imitation.order_requests[0]
    assert sent["selfTradePreventionMode"] == "EXPIRE_BOTH"
    assert sent["newClientOrderId"] == "fks-test-0"


@pytest.mark.parametrize("order, words", [
    ({"symbol": "BTC/USDT", "side": "buy", "type": "market", "quantity": 0.00005},
     ["order cost 3 USDT", "minimum cost 5 USDT", "limits.cost.min"]),
    ({"symbol": "ETH/USDT", "side": "buy", "type": "limit", "quantity": 0.001, "price": 3000},
     ["order cost 3 USDT", "minimum cost 5", "limits.cost.min"]),
    ({"symbol": "BTC/USDT", "side": "buy", "type": "limit", "quantity": 200, "price": 60000},
     ["maximum cost 9000000", "limits.cost.max"]),
    ({"symbol": "SOL/USDT", "side": "buy", "type": "market", "quantity": 0.05},
     ["quantity 0.05 is below the minimum amount 0.1", "limits.amount.min"]),
    ({"symbol": "SOL/USDT", "side": "sell", "type": "limit", "quantity": 5000, "price": 150},
     ["quantity 5000 is above the maximum amount 1000", "limits.amount.max"]),
    ({"symbol": "BTC/USDT", "side": "buy", "type": "market", "quantity": 0.000001},
     ["rounds to zero", "precision.amount"]),
    ({"symbol": "BTC/USDT", "side": "buy", "type": "limit", "quantity": 0.01, "price": 2000000},
     ["price 2000000 is above the maximum price 1000000", "limits.price.max"]),
    ({"symbol": "BTCUSDT", "side": "buy", "type": "market", "quantity": 0.01},
     ["BTCUSDT is not a market on binance", "did you mean BTC/USDT"]),
    ({"symbol": "BTC/USDT", "side": "buy", "type": "market", "quantity": 0.01, "stop_loss": 61000},
     ["stop_loss 61000 must be below the entry price 60000"]),
    ({"symbol": "ETH/USDT", "side": "sell", "type": "limit", "quantity": 0.5, "price": 3500, "take_profit": 3600},
     ["take_profit 3600 must be below the entry price 3500 for a sell"]),
    ({"symbol": "BTC/USDT", "side": "sell", "type": "market", "quantity": 0.01, "reduce_only": True},
     ["reduce_only is not available on the spot market BTC/USDT"]),
    ({"symbol": "BTC/USDT", "side": "sell", "type": "market", "quantity": 0.01, "post_only": True},
     ["post_only needs a limit order"]),
])
def test_an_order_breaking_a_market_rule_is_refused_before_sending(order, words):
    symbols = (*BinanceImitation().symbols, SpotSymbol("SOL", "USDT", "150.00", step_size="0.01", min_qty="0.1",
                                                       max_qty="1000"))
    with BinanceImitation(symbols=symbols) as im:
        for dry_run in (False, True):
            [result] = run(plugin_settings(im, dry_run=dry_run), order)
            assert result.status == "failed"
            for word in words:
                assert word in result.error
        assert im.order_requests == []


def test_dry_run_checks_everything_and_sends_nothing(imitation):
    market, limit = run(plugin_settings(imitation, dry_run=True), seed_order("seed-buy-market.json"),
                        seed_order("seed-sell-limit-sl-tp.json"))
    assert imitation.order_requests == []
    assert [m for m, path, _ in imitation.requests if m == "POST"] == []
    assert market.status == limit.status == "dry_run"
    assert market.detail["request"] == {"method": "create_order", "symbol": "BTC/USDT", "type": "market",
                                        "side": "buy", "amount": 0.01, "price": None,
                                        "params": {"clientOrderId": "fks-test-0"}}
    assert limit.detail["request"]["price"] == 3500.0
    assert limit.detail["linked"]["stop_loss"]["request"]["params"] == {"clientOrderId": "fks-test-1-sl",
                                                                        "stopLossPrice": 3600.0}
    assert limit.detail["linked"]["take_profit"]["request"]["side"] == "buy"


def test_an_exchange_error_is_final_and_keeps_its_message(imitation):
    imitation.reject_next(1)
    [result] = run(plugin_settings(imitation), seed_order("seed-buy-market.json"))
    assert result.status == "failed"
    assert "insufficient balance" in result.error
    assert len(imitation.order_requests) == 1  # not retried
    assert imitation.orders == []


def test_a_failed_stop_loss_is_reported_beside_the_accepted_entry(imitation):
    imitation.reject_next(1, msg="Stop price would trigger immediately.", match={"type": "STOP_LOSS"})
    [result] = run(plugin_settings(imitation), seed_order("seed-sell-limit-sl-tp.json"))
    assert result.status == "placed"
    assert result.order_id == str(imitation.orders[0]["orderId"])
    assert "stop_loss order failed" in result.error and "would trigger immediately" in result.error
    assert result.detail["linked"]["stop_loss"]["status"] == "failed"
    assert result.detail["linked"]["take_profit"]["status"] == "open"
    assert [o["type"] for o in imitation.orders] == ["LIMIT", "TAKE_PROFIT"]


def test_credentials_are_checked_by_the_exchange_and_never_shown(imitation):
    wrong_secret = "a-wrong-secret-nobody-may-see"
    [result] = run(plugin_settings(imitation, secret=wrong_secret), seed_order("seed-buy-market.json"))
    assert result.status == "failed"
    assert "Signature for this request is not valid" in result.error
    assert wrong_secret not in json.dumps(result._asdict())
    assert imitation.api_key not in json.dumps(result._asdict())
    assert imitation.orders == []


def test_lookup_finds_an_order_by_its_client_order_id(imitation):
    async def scenario():
        plugin = make_plugin(plugin_settings(imitation))
        await plugin.start()
        try:
            await until_healthy(plugin)
            order = seed_order("seed-sell-limit-sl-tp.json")
            placed = await plugin.execute(request(order, "fks-look"))
            return placed, await plugin.lookup(request(order, "fks-look")), await plugin.lookup(request(order, "fks-none"))
        finally:
            await plugin.close()

    placed, found, missing = asyncio.run(scenario())
    assert found.status == "placed" and found.order_id == placed.order_id
    assert missing is None


def test_testnet_switches_to_the_sandbox_urls_before_loading_markets(imitation):
    config = imitation.ccxt_config()
    # the live URLs lead nowhere; only the test URLs reach the imitation
    dead = "http://127.0.0.1:9/api/v3"
    config["urls"] = {"api": {"public": dead, "private": dead, "v1": dead}, "test": config["urls"]["api"]}
    [result] = run(plugin_settings(imitation, testnet=True, ccxt=config), seed_order("seed-buy-market.json"))
    assert result.status == "filled"
    assert imitation.requests[0][1] == "/api/v3/exchangeInfo"


def test_an_exchange_without_a_testnet_is_a_configuration_error():
    with pytest.raises(ValueError, match="no testnet"):
        make_plugin({"type": "ccxt", "exchange": "kraken", "testnet": True})
    with pytest.raises(ValueError, match="no exchange named"):
        make_plugin({"type": "ccxt", "exchange": "nosuchexchange"})


def test_market_symbols_are_the_loaded_ones(imitation):
    async def scenario():
        plugin = make_plugin(plugin_settings(imitation))
        before = plugin.market_symbols()
        await plugin.start()
        try:
            await until_healthy(plugin)
            return before, plugin.market_symbols()
        finally:
            await plugin.close()

    before, after = asyncio.run(scenario())
    assert before == []
    assert sorted(after) == ["BTC/USDT", "ETH/BTC", "ETH/USDT"]


def test_settings_defaults_are_the_schema_defaults():
    schema = json.loads((ROOT / "schemas" / "ccxt.plugin.schema.json").read_text())
    settings = CcxtSettings.from_mapping({"type": "ccxt", "exchange": "binance"})
    props = schema["properties"]
    for name in ("testnet", "dry_run", "timeout", "order_timeout", "retries", "retry_backoff",
                 "retry_backoff_max", "markets_retry_max"):
        assert getattr(settings, name) == props[name]["default"], name
    breaker = props["circuit_breaker"]["properties"]
    assert (settings.circuit_failures, settings.circuit_cooldown) == (breaker["failures"]["default"],
                                                                      breaker["cooldown"]["default"])


@pytest.mark.parametrize("order, ok", [
    ({"symbol": "BTC/USDT", "side": "buy", "type": "market", "quantity": 1}, True),
    ({"symbol": "BTC/USDT:USDT", "side": "buy", "type": "limit", "quantity": 1, "price": 1, "post_only": True}, True),
    ({"symbol": "BTCUSDT", "side": "buy", "type": "market", "quantity": 1}, False),
    ({"symbol": "BTC/USDT", "side": "buy", "type": "market", "quantity": 1, "post_only": True}, False),
    ({"symbol": "BTC/USDT", "side": "buy", "type": "limit", "quantity": 1, "price": 1, "time_in_force": "DAY"}, False),
    ({"symbol": "BTC/USDT", "side": "buy", "type": "market", "quantity": 1, "params": {"newClientOrderId": "x"}},
     False),
])
def test_the_ccxt_order_schema(order, ok):
    schema = json.loads((ROOT / "schemas" / "ccxt.order.schema.json").read_text())
    assert jsonschema.Draft202012Validator(schema).is_valid(order) is ok
