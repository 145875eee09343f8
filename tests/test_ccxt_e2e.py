"""End to end: seed alerts posted to a real `fksroute serve` reach the Binance imitation through ccxt."""

import json
import time
from pathlib import Path

import pytest
from binance_imitation import imitation  # noqa: F401

ALERTS = Path(__file__).parent / "alerts"

ROUTES = """\
version: 1
server:
  journal: journal.sqlite
defaults:
  alert_schema: tradingview.alert.schema.json
  min_confidence: 0.6
unmatched: reject
symbols:
  XBTUSDT: BTC/USDT
plugins:
  binance:
    type: ccxt
    exchange: binance
    api_key: "${{env:TEST_BINANCE_KEY}}"
    secret: "${{env:TEST_BINANCE_SECRET}}"
    timeout: 1
    order_timeout: 10
    retry_backoff: 0.05
    ccxt: {ccxt}
  binance-dry:
    type: ccxt
    exchange: binance
    dry_run: true
    ccxt: {ccxt}
routes:
  - name: dry
    match: {{symbol: ETH/BTC}}
    to: binance-dry
    order: &order
      symbol: "{{{{ alert.symbol | tv_symbol }}}}"
      side: "{{{{ alert.action }}}}"
      type: "{{{{ alert.order_type }}}}"
      quantity: "{{{{ alert.quantity }}}}"
      price: "{{{{ alert.price | default(none) }}}}"
      stop_loss: "{{{{ alert.stop_loss | default(none) }}}}"
      take_profit: "{{{{ alert.take_profit | default(none) }}}}"
  - name: crypto
    match:
      symbol: {{regex: '(BINANCE:)?[A-Z0-9]+(/)?USDT'}}
    to: binance
    order: *order
"""


@pytest.fixture
def daemon(imitation, daemon_factory, tmp_path):  # noqa: F811
    config = tmp_path / "routes.yaml"
    ccxt = json.dumps({**imitation.ccxt_config(), "enableRateLimit": False})
    config.write_text(ROUTES.format(ccxt=ccxt))
    running = daemon_factory(config, env={"TEST_BINANCE_KEY": imitation.api_key,
                                          "TEST_BINANCE_SECRET": imitation.secret})
    deadline = time.monotonic() + 10
    while not running.get("/health").json()["plugins"]["binance"]["healthy"]:
        assert time.monotonic() < deadline, running.get("/health").json()
        time.sleep(0.05)
    return running


def post_alert(daemon, name):
    return daemon.post(content=(ALERTS / name).read_bytes(), headers={"Content-Type": "application/json"})


def test_seed_buy_market_is_filled_at_the_exchange(daemon, imitation):
    reply = post_alert(daemon, "seed-buy-market.json")
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert len(imitation.order_requests) == 1, f"{body}\n{imitation.requests}\n{daemon.logs()}"
    [sent] = imitation.order_requests
    [accepted] = imitation.orders
    assert {k: sent[k] for k in ("symbol", "side", "type", "quantity")} == {
        "symbol": "BTCUSDT", "side": "BUY", "type": "MARKET", "quantity": "0.01"}
    assert sent["newClientOrderId"] == body["results"][0]["client_order_id"]
    assert body["success"] is True and body["error"] is None
    assert body["order_id"] == str(accepted["orderId"])
    assert body["results"][0]["status"] == "filled"


def test_seed_sell_limit_is_placed_with_its_stop_loss_and_take_profit(daemon, imitation):
    reply = post_alert(daemon, "seed-sell-limit-sl-tp.json")
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert len(imitation.order_requests) == 3, f"{body}\n{imitation.requests}\n{daemon.logs()}"
    entry, stop_loss, take_profit = imitation.order_requests
    assert {k: entry[k] for k in ("symbol", "side", "type", "quantity", "price", "timeInForce")} == {
        "symbol": "ETHUSDT", "side": "SELL", "type": "LIMIT", "quantity": "0.5", "price": "3500", "timeInForce": "GTC"}
    assert (stop_loss["type"], stop_loss["side"], stop_loss["stopPrice"]) == ("STOP_LOSS", "BUY", "3600")
    assert (take_profit["type"], take_profit["side"], take_profit["stopPrice"]) == ("TAKE_PROFIT", "BUY", "3400")
    assert body["success"] is True
    assert body["order_id"] == str(imitation.orders[0]["orderId"])
    assert body["results"][0]["status"] == "placed"


def test_a_tradingview_ticker_is_turned_into_the_exchange_symbol(daemon, imitation):
    alert = {"symbol": "BINANCE:BTCUSDT", "action": "sell", "quantity": 0.002, "confidence": 0.9}
    reply = daemon.post(json=alert)
    assert reply.status_code == 200, reply.text
    assert reply.json()["results"][0]["status"] == "filled"
    assert imitation.order_requests[0]["symbol"] == "BTCUSDT"


def test_the_same_alert_again_is_a_duplicate_and_not_sent_twice(daemon, imitation):
    first = post_alert(daemon, "seed-buy-market.json").json()
    again = post_alert(daemon, "seed-buy-market.json").json()
    assert again["duplicate"] is True
    assert len(imitation.order_requests) == 1
    assert again["order_id"] in (None, first["order_id"])


def test_an_order_below_the_minimum_cost_is_answered_failed_and_never_sent(daemon, imitation):
    reply = daemon.post(json={"symbol": "BTC/USDT", "action": "buy", "quantity": 0.00005, "confidence": 0.9})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["success"] is False
    assert "minimum cost" in body["error"] and "limits.cost.min" in body["error"]
    assert imitation.order_requests == []


def test_a_dry_run_route_answers_the_request_it_would_send(daemon, imitation):
    reply = daemon.post(json={"symbol": "ETH/BTC", "action": "buy", "order_type": "limit", "quantity": 1,
                              "price": 0.05, "confidence": 0.9})
    assert reply.status_code == 200, reply.text
    result = reply.json()["results"][0]
    assert result["status"] == "dry_run"
    assert result["detail"]["request"]["symbol"] == "ETH/BTC"
    assert imitation.order_requests == []


@pytest.mark.parametrize("name, status", [("seed-invalid-action.json", 400), ("seed-missing-quantity.json", 422)])
def test_bad_seed_alerts_send_nothing(daemon, imitation, name, status):
    assert post_alert(daemon, name).status_code == status
    assert imitation.order_requests == []


def test_health_shows_the_exchange_plugin(daemon):
    plugins = daemon.get("/health").json()["plugins"]
    assert plugins["binance"]["healthy"] is True and plugins["binance"]["markets"] == 3
    assert plugins["binance"]["circuit"] == "closed"
    assert plugins["binance-dry"]["dry_run"] is True
    assert "imitation" not in json.dumps(plugins)  # neither key nor secret shows
