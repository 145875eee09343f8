"""The MetaTrader 5 backend against a stand-in `MetaTrader5` module (the real one runs on Windows only)."""

from __future__ import annotations

import importlib

import pytest

from agent_support import FAKE_MT5
from fksroute.agents.mt5 import COMMENT_MAX, Mt5Backend, mt5_comment
from fksroute.agents.service import AgentOrder, NotSent, PlacedOrders

ORDER_ID = "fks0123456789abcdef0123456789abc"  # 32 characters, as the dispatcher makes them
COMMENT = mt5_comment(ORDER_ID)


@pytest.fixture
def mt5(monkeypatch):
    monkeypatch.syspath_prepend(str(FAKE_MT5))
    module = importlib.import_module("MetaTrader5")
    terminal = module._reset()
    terminal.password = "s3cret"
    terminal.add_symbol("EURUSD", bid=1.1, ask=1.1002, filling_mode=1)
    return module


@pytest.fixture
def terminal(mt5):
    return mt5._terminal


@pytest.fixture
def backend(mt5):
    return Mt5Backend(mt5, login=5001234, server="Stand-in-Demo", password=lambda: "s3cret", magic=7,
                      deviation=20, reconcile_delay=0, sleep=lambda seconds: None)


def order(**fields) -> AgentOrder:
    base = {"order_id": ORDER_ID, "symbol": "EURUSD", "side": "buy", "type": "market", "quantity": 0.1}
    return AgentOrder(**{**base, **fields})


def test_a_market_order_with_sl_and_tp(backend, terminal, mt5):
    answer = backend.place(order(quantity=1, stop_loss=1.09, take_profit=1.12))
    assert terminal.requests == [{
        "symbol": "EURUSD", "volume": 1.0, "action": mt5.TRADE_ACTION_DEAL, "type": mt5.ORDER_TYPE_BUY,
        "price": 1.1002, "sl": 1.09, "tp": 1.12, "deviation": 20, "magic": 7, "comment": COMMENT,
        "type_time": mt5.ORDER_TIME_GTC, "type_filling": mt5.ORDER_FILLING_FOK,
    }]
    assert all(type(terminal.requests[0][k]) is float for k in ("volume", "price", "sl", "tp"))
    assert answer["status"] == "filled"
    assert (answer["filled_quantity"], answer["average_price"]) == (1.0, 1.1002)
    assert answer["venue_order_id"] == str(terminal.history[0].ticket)
    assert terminal.init_calls == [{"path": None, "login": 5001234, "password": "s3cret", "server": "Stand-in-Demo",
                                    "timeout": None, "portable": False}]


def test_an_order_for_another_account_is_refused(backend, terminal):
    answer = backend.place(order(account="999"))
    assert answer["status"] == "failed" and "logged in to account 5001234, not 999" in answer["error"]
    assert terminal.requests == []
    assert backend.place(order(account="5001234"))["status"] == "filled"


def test_params_set_deviation_and_magic(backend, terminal):
    backend.place(order(params={"deviation": 3, "magic": 42}))
    assert (terminal.requests[0]["deviation"], terminal.requests[0]["magic"]) == (3, 42)
    for params in ({"deviation": "3"}, {"magic": -1}, {"slippage": 3}):
        answer = backend.place(order(order_id="ord-x", params=params))
        assert answer["status"] == "failed" and "params" in answer["error"]
    assert len(terminal.requests) == 1


def test_a_market_sell_takes_the_bid(backend, terminal):
    backend.place(order(side="sell"))
    assert terminal.requests[0]["price"] == 1.1 and terminal.requests[0]["type"] == 1


def test_a_limit_order(backend, terminal, mt5):
    answer = backend.place(order(side="sell", type="limit", price=1.105, stop_loss=1.11, take_profit=1.095,
                                 time_in_force="DAY"))
    assert terminal.requests == [{
        "symbol": "EURUSD", "volume": 0.1, "action": mt5.TRADE_ACTION_PENDING, "type": mt5.ORDER_TYPE_SELL_LIMIT,
        "price": 1.105, "sl": 1.11, "tp": 1.095, "deviation": 20, "magic": 7, "comment": COMMENT,
        "type_time": mt5.ORDER_TIME_DAY, "type_filling": mt5.ORDER_FILLING_FOK,
    }]
    assert answer["status"] == "placed" and answer["filled_quantity"] == 0.0


def test_a_stop_order(backend, terminal, mt5):
    backend.place(order(type="stop", stop_price=1.103, stop_loss=1.098, take_profit=1.11))
    assert terminal.requests == [{
        "symbol": "EURUSD", "volume": 0.1, "action": mt5.TRADE_ACTION_PENDING, "type": mt5.ORDER_TYPE_BUY_STOP,
        "price": 1.103, "sl": 1.098, "tp": 1.11, "deviation": 20, "magic": 7, "comment": COMMENT,
        "type_time": mt5.ORDER_TIME_GTC, "type_filling": mt5.ORDER_FILLING_FOK,
    }]


def test_a_stop_limit_order(backend, terminal, mt5):
    backend.place(order(side="sell", type="stop_limit", stop_price=1.095, price=1.0945))
    request = terminal.requests[0]
    assert (request["type"], request["price"], request["stoplimit"]) == (mt5.ORDER_TYPE_SELL_STOP_LIMIT, 1.095, 1.0945)


@pytest.mark.parametrize("bitmask, tif, filling", [
    (1, None, 0), (2, None, 1), (3, None, 0), (0, None, 2), (3, "IOC", 1), (2, "IOC", 1), (1, "FOK", 0),
])
def test_the_filling_mode_comes_from_the_bitmask(backend, terminal, bitmask, tif, filling):
    terminal.add_symbol("EURUSD", bid=1.1, ask=1.1002, filling_mode=bitmask)
    answer = backend.place(order(time_in_force=tif))
    assert terminal.requests[0]["type_filling"] == filling
    assert answer["status"] == "filled"


@pytest.mark.parametrize("bitmask, tif", [(1, "IOC"), (2, "FOK")])
def test_a_filling_the_symbol_does_not_allow_is_not_sent(backend, terminal, bitmask, tif):
    terminal.add_symbol("EURUSD", bid=1.1, ask=1.1002, filling_mode=bitmask)
    answer = backend.place(order(time_in_force=tif))
    assert answer["status"] == "failed" and tif in answer["error"]
    assert terminal.requests == []


def test_retcode_10009_done(backend, terminal, mt5):
    terminal.script = [mt5.Reply(mt5.TRADE_RETCODE_DONE, "Request executed", execute=True)]
    assert backend.place(order())["status"] == "filled"


def test_retcode_10004_requote_is_retried_with_a_fresh_price(backend, terminal, mt5):
    terminal.script = [mt5.Reply(mt5.TRADE_RETCODE_REQUOTE, "Requote")]
    terminal.on_send = lambda request: terminal.symbols["EURUSD"].update(ask=1.1010)
    answer = backend.place(order())
    assert [r["price"] for r in terminal.requests] == [1.1002, 1.1010]
    assert answer["status"] == "filled" and answer["average_price"] == 1.1010


def test_requotes_are_retried_a_bounded_number_of_times(backend, terminal, mt5):
    terminal.script = [mt5.Reply(mt5.TRADE_RETCODE_REQUOTE, "Requote")] * 10
    answer = backend.place(order())
    assert len(terminal.requests) == 1 + backend.price_retries
    assert answer["status"] == "failed" and "10004 Requote" in answer["error"]


def test_retcode_10030_is_final_with_metatraders_comment(backend, terminal):
    terminal.add_symbol("EURUSD", bid=1.1, ask=1.1002, filling_mode=2)
    backend.filling = lambda mode, tif: 0  # a hard-coded FOK, which this symbol refuses
    answer = backend.place(order())
    assert answer["status"] == "failed"
    assert answer["error"] == "rejected by MetaTrader 5: 10030 Unsupported filling mode"
    assert len(terminal.requests) == 1


def test_retcode_10031_is_looked_up_by_comment_before_sending_again(backend, terminal, mt5):
    looked = []
    real = mt5.history_orders_get
    terminal.script = [mt5.Reply(mt5.TRADE_RETCODE_CONNECTION, "No connection")]
    terminal.on_send = lambda request: looked.append(("send", len(terminal.requests)))
    backend.mt5 = _spy(mt5, "history_orders_get", lambda *a: looked.append(("lookup",)) or real(*a))
    answer = backend.place(order())
    assert [step[0] for step in looked] == ["send", "lookup", "send"]
    assert len(terminal.requests) == 2 and answer["status"] == "filled"


def test_an_order_executed_despite_10012_is_found_and_not_sent_again(backend, terminal, mt5):
    terminal.script = [mt5.Reply(mt5.TRADE_RETCODE_TIMEOUT, "Request timed out", execute=True)]
    answer = backend.place(order())
    assert len(terminal.requests) == 1
    assert answer["status"] == "filled" and answer["average_price"] == 1.1002


def test_an_unknown_outcome_twice_stays_unknown(backend, terminal, mt5):
    terminal.script = [mt5.Reply(mt5.TRADE_RETCODE_TIMEOUT, "Request timed out")] * 2
    answer = backend.place(order())
    assert len(terminal.requests) == 2
    assert answer["status"] == "unknown" and "10012" in answer["error"]


def test_a_none_result_is_reported_with_last_error(backend, terminal, mt5):
    answer = backend.place(order(order_id="x" * 40, quantity=0.1))
    assert answer["status"] == "filled"  # a long id becomes a comment of 31 characters
    terminal.script = [mt5.NoReply(mt5.RES_E_INVALID_PARAMS, 'Invalid "volume" argument')]
    answer = backend.place(order(order_id="ord-2"))
    assert answer["status"] == "failed"
    assert answer["error"] == 'MetaTrader 5 refused the request: -2 Invalid "volume" argument'


def test_a_lost_terminal_during_order_send_is_reinitialized_and_reconciled(backend, terminal, mt5):
    terminal.script = [mt5.NoReply(mt5.RES_E_INTERNAL_FAIL_RECEIVE, "IPC recv failed", execute=True)]
    answer = backend.place(order())
    assert len(terminal.init_calls) == 2
    assert len(terminal.requests) == 1 and answer["status"] == "filled"


def test_a_lost_terminal_is_reinitialized_before_the_next_order(backend, terminal):
    backend.place(order(order_id="ord-1"))
    terminal.initialized = False  # the terminal was restarted
    assert backend.place(order(order_id="ord-2"))["status"] == "filled"
    assert len(terminal.init_calls) == 2


def test_a_terminal_that_cannot_be_reached_sends_nothing(backend, terminal):
    terminal.link_up = False
    with pytest.raises(NotSent, match="initialize failed"):
        backend.place(order())
    assert terminal.requests == []


def test_the_password_never_shows_in_errors(mt5, terminal):
    wrong = Mt5Backend(mt5, login=5001234, password=lambda: "hunter2-wrong")
    with pytest.raises(NotSent) as caught:
        wrong.place(order())
    assert "Authorization failed" in str(caught.value) and "hunter2" not in str(caught.value)
    assert "hunter2" not in repr(wrong.__dict__)
    assert wrong.health() == {"healthy": False, "error": "MetaTrader 5 initialize failed: -6 Terminal: "
                                                         "Authorization failed"}


def test_comments_carry_the_order_id_within_31_characters():
    assert mt5_comment("ord-1") == "ord-1"
    long_ids = [f"fks{n:029x}" for n in range(100)]
    comments = {mt5_comment(i) for i in long_ids}
    assert len(comments) == 100 and all(len(c) == COMMENT_MAX for c in comments)
    assert mt5_comment(long_ids[0]) == mt5_comment(long_ids[0])


def test_order_status_finds_orders_by_comment(backend, terminal, mt5):
    backend.place(order(order_id="mkt"))
    backend.place(order(order_id="lim", type="limit", price=1.09))
    fresh = Mt5Backend(mt5, password=lambda: "s3cret")  # as after an agent restart
    assert fresh.order_status("mkt")["status"] == "filled"
    assert fresh.order_status("mkt")["average_price"] == pytest.approx(1.1002)
    assert fresh.order_status("lim")["status"] == "placed"
    assert fresh.order_status("nope") is None
    assert fresh.cancel("lim")["status"] == "cancelled"
    assert fresh.order_status("lim")["status"] == "failed"


def test_a_retried_place_is_sent_once(backend, terminal):
    orders = PlacedOrders()
    first = orders.place(order(), backend)
    again = orders.place(order(), backend)
    after_restart = PlacedOrders().place(order(), backend)
    assert first["status"] == again["status"] == after_restart["status"] == "filled"
    assert len(terminal.requests) == 1


def test_positions_and_close_position(backend, terminal, mt5):
    backend.place(order(quantity=0.3))
    [position] = backend.positions("5001234")
    assert (position["symbol"], position["side"], position["quantity"]) == ("EURUSD", "long", 0.3)
    answer = backend.close_position("5001234", "EURUSD")
    assert answer["status"] == "closed"
    close = terminal.requests[-1]
    assert (close["type"], close["volume"], close["position"], close["price"]) == \
           (mt5.ORDER_TYPE_SELL, 0.3, position["ticket"], 1.1)
    assert backend.positions("5001234") == []
    assert backend.close_position("5001234", "EURUSD")["status"] == "flat"
    assert backend.close_position("999", "EURUSD")["status"] == "failed"


def test_health(backend, terminal):
    assert backend.health()["healthy"] is True
    terminal.trade_allowed = False
    assert "AutoTrading" in backend.health()["error"]
    terminal.server_connected = False
    assert backend.health()["healthy"] is False


def _spy(module, name, replacement):
    """A view of `module` with one function replaced."""
    class Spy:
        def __getattr__(self, attr):
            return replacement if attr == name else getattr(module, attr)
    return Spy()
