"""The paper plugin's simulation: slippage, limits, positions, attached SL/TP, the ledger."""

import asyncio
import json
import logging

import pytest

from fksroute.plugins.base import OrderRequest, PluginContext
from fksroute.plugins.paper import PaperPlugin


def plugin(tmp_path, **settings):
    return PaperPlugin("paper", {"type": "paper", **settings}, PluginContext(tmp_path, logging.getLogger("t")))


def req(coid, **order):
    return OrderRequest(coid, "alert-" + coid, "r", "paper", {"type": "market", **order})


def run(coro):
    return asyncio.run(coro)


def test_a_slipped_price_is_rounded_to_ten_decimals_on_every_fill(tmp_path):
    """100 * 1.0005 is 100.05000000000001 in floats: every fill answers 100.05, the first and
    the ones after it (the rounded price is remembered), for buys and sells alike."""
    p = plugin(tmp_path, slippage_bps=5)
    for i in range(3):
        assert p.execute_now(req(f"b{i}", symbol="X", side="buy", quantity=1)).average_price == 100.05
        assert p.execute_now(req(f"s{i}", symbol="X", side="sell", quantity=1)).average_price == 99.95
    odd = plugin(tmp_path, slippage_bps=7, default_price=0.1)
    assert odd.execute_now(req("o", symbol="Y", side="buy", quantity=1)).average_price == round(0.1 * 1.0007, 10)


def test_market_fills_with_slippage_against_the_trader(tmp_path):
    p = plugin(tmp_path, slippage_bps=10)
    buy = run(p.execute(req("1", symbol="X", side="buy", quantity=2, price=100.0)))
    sell = run(p.execute(req("2", symbol="X", side="sell", quantity=2, price=100.0)))
    assert buy.status == "filled" and buy.average_price == pytest.approx(100.1)
    assert sell.status == "filled" and sell.average_price == pytest.approx(99.9)
    assert buy.filled_quantity == 2 and buy.order_id


def test_market_without_price_uses_simulated_price(tmp_path):
    p = plugin(tmp_path, slippage_bps=0, prices={"BTC/USDT": 50000})
    result = run(p.execute(req("1", symbol="BTC/USDT", side="buy", quantity=1)))
    assert result.average_price == 50000
    other = run(p.execute(req("2", symbol="NEW", side="buy", quantity=1)))
    assert other.average_price == 100  # default_price


def test_limit_fills_only_at_limit_or_better(tmp_path):
    p = plugin(tmp_path, slippage_bps=0, prices={"X": 100})
    resting = run(p.execute(req("1", symbol="X", side="buy", type="limit", quantity=1, price=90)))
    assert resting.status == "placed" and resting.filled_quantity == 0
    better = run(p.execute(req("2", symbol="X", side="buy", type="limit", quantity=1, price=110)))
    assert better.status == "filled" and better.average_price == 100  # better than the limit
    sell = run(p.execute(req("3", symbol="X", side="sell", type="limit", quantity=1, price=120)))
    assert sell.status == "placed"
    # The market falls to 89: the resting buy fills at 89, which its lookup then reports.
    run(p.execute(req("4", symbol="X", side="sell", quantity=1, price=89)))
    later = run(p.lookup(req("1", symbol="X", side="buy", type="limit", quantity=1, price=90)))
    assert later.status == "filled" and later.average_price == 89


def test_stop_entry_triggers(tmp_path):
    p = plugin(tmp_path, slippage_bps=0, prices={"X": 100})
    stop = run(p.execute(req("s", symbol="X", side="buy", type="stop", quantity=1, stop_price=105)))
    assert stop.status == "placed"
    run(p.execute(req("m", symbol="X", side="buy", quantity=1, price=106)))
    assert run(p.lookup(req("s"))).status == "filled"


def test_positions_and_attached_orders(tmp_path):
    p = plugin(tmp_path, slippage_bps=0)
    entry = run(p.execute(req("e", symbol="X", side="buy", quantity=2, price=100, stop_loss=95, take_profit=110)))
    attached = {a["type"]: a for a in entry.detail["attached"]}
    assert attached["stop_loss"]["side"] == "sell" and attached["take_profit"]["trigger_price"] == 110
    health = run(p.health())
    assert health["positions"]["X"] == {"quantity": 2, "average_price": 100}
    # The price reaches the take profit: the position closes and the stop loss is cancelled (OCO).
    run(p.execute(req("tick", symbol="X", side="buy", quantity=1, price=111)))
    assert run(p.health())["positions"]["X"]["quantity"] == 1
    assert all(o.parent is None for o in p.book.resting.values())


def test_same_client_order_id_never_fills_twice(tmp_path):
    p = plugin(tmp_path)
    first = run(p.execute(req("dup", symbol="X", side="buy", quantity=1, price=10)))
    again = run(p.execute(req("dup", symbol="X", side="buy", quantity=1, price=10)))
    assert first == again
    assert p.book.fills == 1


def test_only_the_most_recent_results_are_kept(tmp_path, monkeypatch):
    monkeypatch.setattr("fksroute.plugins.paper.RESULTS_KEPT", 5)
    p = plugin(tmp_path)
    for i in range(12):
        run(p.execute(req(f"c{i}", symbol="X", side="buy", quantity=1, price=10)))
    assert list(p.book.results) == [f"c{i}" for i in range(7, 12)]
    again = run(p.execute(req("c11", symbol="X", side="buy", quantity=1, price=10)))
    assert again == p.book.results["c11"] and p.book.fills == 12  # a recent id is still never filled twice
    assert run(p.lookup(req("c0"))) is None  # the oldest are forgotten


def test_ledger_survives_a_restart(tmp_path):
    p = plugin(tmp_path, ledger="fills.jsonl", slippage_bps=0)
    run(p.execute(req("a", symbol="X", side="buy", quantity=3, price=10)))
    lines = [json.loads(line) for line in (tmp_path / "fills.jsonl").read_text().splitlines()]
    assert [(e["client_order_id"], e["status"]) for e in lines] == [("a", "filled")]
    again = plugin(tmp_path, ledger="fills.jsonl")
    run(again.start())
    assert run(again.lookup(req("a"))).status == "filled"
    assert run(again.health())["positions"]["X"]["quantity"] == 3
    assert run(again.execute(req("a", symbol="X", side="buy", quantity=3, price=10))).status == "filled"
    assert len((tmp_path / "fills.jsonl").read_text().splitlines()) == 1  # one line per client order id
    assert again.book.fills == 1


def test_bad_order_is_a_failed_result(tmp_path):
    p = plugin(tmp_path)
    result = run(p.execute(req("bad", symbol="X", side="buy", quantity="lots")))
    assert result.status == "failed" and "invalid order" in result.error
