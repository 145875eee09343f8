"""The NinjaTrader backend against real files in temporary incoming/outgoing folders."""

from __future__ import annotations

import os
import re
import time

import pytest
from hypothesis import given, settings, strategies as st

from fksroute.agents import ninjatrader
from fksroute.agents.ninjatrader import NinjaTraderBackend, format_price, parse_state, place_line
from fksroute.agents.service import AgentOrder, OrderError, PlacedOrders

OIF_NAME = re.compile(r"^oif[^/\\]*\.txt$")


@pytest.fixture
def nt(tmp_path):
    (tmp_path / "incoming").mkdir()
    (tmp_path / "outgoing").mkdir()
    return NinjaTraderBackend(tmp_path / "incoming")


def order(**fields) -> AgentOrder:
    base = {"order_id": "ord-1", "symbol": "ES 12-26", "side": "buy", "type": "market", "quantity": 1.0,
            "account": "Sim101"}
    return AgentOrder(**{**base, **fields})


def written(nt: NinjaTraderBackend) -> list[str]:
    """The command lines in incoming, oldest file first."""
    files = sorted(nt.incoming.iterdir())
    assert all(OIF_NAME.match(f.name) for f in files)
    return [f.read_bytes().decode() for f in files]


@pytest.mark.parametrize("fields, line", [
    ({}, "PLACE;Sim101;ES 12-26;BUY;1;MARKET;;;DAY;;ord-1;;"),
    ({"side": "sell", "quantity": 3.0, "time_in_force": "GTC"}, "PLACE;Sim101;ES 12-26;SELL;3;MARKET;;;GTC;;ord-1;;"),
    ({"type": "limit", "price": 5012.25}, "PLACE;Sim101;ES 12-26;BUY;1;LIMIT;5012.25;;DAY;;ord-1;;"),
    ({"type": "stop", "stop_price": 4990.0, "side": "sell"},
     "PLACE;Sim101;ES 12-26;SELL;1;STOPMARKET;;4990;DAY;;ord-1;;"),
    ({"type": "stop_limit", "price": 5013.5, "stop_price": 5013.0, "time_in_force": "GTC"},
     "PLACE;Sim101;ES 12-26;BUY;1;STOPLIMIT;5013.5;5013;GTC;;ord-1;;"),
    ({"strategy": "ATM 2 targets"}, "PLACE;Sim101;ES 12-26;BUY;1;MARKET;;;DAY;;ord-1;ATM 2 targets;"),
])
def test_place_writes_the_exact_line(nt, fields, line):
    answer = nt.place(order(**fields))
    assert written(nt) == [line + "\r\n"]
    assert answer["status"] == "placed" and answer["order_id"] == "ord-1"


def test_close_position_and_cancel_lines(nt):
    nt.close_position("Sim101", "ES 12-26")
    nt.cancel("ord-1")
    assert written(nt) == ["CLOSEPOSITION;Sim101;ES 12-26;;;;;;;;;;\r\n", "CANCEL;;;;;;;;;;ord-1;;\r\n"]


def test_prices_use_a_point_and_no_exponent():
    assert format_price(5012.0) == "5012"
    assert format_price(1.10005) == "1.10005"
    assert format_price(0.1 + 0.2) == "0.3"
    assert format_price(123456.75) == "123456.75"


@pytest.mark.parametrize("fields, message", [
    ({"stop_loss": 4980.0}, "ATM strategy"),
    ({"take_profit": 5050.0}, "ATM strategy"),
    ({"quantity": 1.5}, "whole number"),
    ({"time_in_force": "IOC"}, "DAY or GTC"),
    ({"account": None}, "account"),
    ({"order_id": "a:b"}, "order id"),
    ({"order_id": "a_b"}, "order id"),
    ({"symbol": "ES 12-26;FLATTENEVERYTHING"}, "';'"),
    ({"strategy": "x;y"}, "';'"),
])
def test_orders_it_cannot_write_are_refused(nt, fields, message):
    with pytest.raises(OrderError, match=message):
        nt.place(order(**fields))
    assert written(nt) == []


@settings(max_examples=200, deadline=None)
@given(symbol=st.text(min_size=1, max_size=20), account=st.text(min_size=1, max_size=12),
       strategy=st.none() | st.text(max_size=12))
def test_a_line_is_always_one_place_command_of_13_fields(symbol, account, strategy):
    try:
        line = place_line(order(symbol=symbol, account=account, strategy=strategy))
    except OrderError:
        return
    fields = line.split(";")
    assert len(fields) == 13 and fields[0] == "PLACE" and fields[1] == account and fields[2] == symbol
    assert "\n" not in line and "\r" not in line


@given(st.text())
def test_any_state_file_content_reads_without_error(text):
    parsed = parse_state(text)
    assert parsed is None or len(parsed) == 3


def test_the_file_is_written_elsewhere_then_moved_in(nt, monkeypatch):
    moves = []
    real_replace = os.replace

    def replace(src, dst):
        moves.append((src, dst, open(src, "rb").read()))
        assert not any(nt.incoming.iterdir())  # nothing appears in incoming before the move
        real_replace(src, dst)

    monkeypatch.setattr(ninjatrader.os, "replace", replace)
    nt.place(order())
    [(src, dst, content)] = moves
    assert src.parent != nt.incoming and src.parent.parent == nt.incoming.parent  # same volume
    assert dst.parent == nt.incoming and OIF_NAME.match(dst.name)
    assert content == b"PLACE;Sim101;ES 12-26;BUY;1;MARKET;;;DAY;;ord-1;;\r\n"
    assert not src.exists()


def test_every_file_gets_a_new_name(nt):
    for i in range(50):
        nt.place(order(order_id=f"ord-{i}"))
    names = {f.name for f in nt.incoming.iterdir()}
    assert len(names) == 50


def test_an_unwritable_incoming_is_not_sent(tmp_path):
    from fksroute.agents.service import NotSent

    nt = NinjaTraderBackend(tmp_path / "missing" / "incoming")
    with pytest.raises(NotSent, match="cannot write"):
        nt.place(order())


def test_outgoing_defaults_to_the_sibling_of_incoming(tmp_path):
    assert NinjaTraderBackend(tmp_path / "incoming").outgoing == tmp_path / "outgoing"
    assert NinjaTraderBackend(tmp_path / "incoming", tmp_path / "elsewhere").outgoing == tmp_path / "elsewhere"


@pytest.mark.parametrize("name", ["ord-1.txt", "Sim101_ord-1.txt"])
@pytest.mark.parametrize("content, status, filled, average, error", [
    ("FILLED;1;5012.25", "filled", 1, 5012.25, None),
    ("PARTFILLED;1;5012.5\r\n", "placed", 1, 5012.5, None),
    ("WORKING;0;0", "placed", 0, None, None),
    ("REJECTED;0;0", "failed", 0, None, "rejected by NinjaTrader"),
    ("CANCELLED;0;0", "failed", 0, None, "cancelled"),
])
def test_state_files_in_both_naming_forms(tmp_path, nt, name, content, status, filled, average, error):
    nt.place(order())
    (nt.outgoing / name).write_text(content)
    # A fresh backend, as after an agent restart: the account prefix is found without being remembered.
    for backend in (nt, NinjaTraderBackend(nt.incoming)):
        state = backend.order_status("ord-1")
        assert (state["status"], state["filled_quantity"], state["average_price"], state["error"]) == \
               (status, filled, average, error)
        assert state["detail"]["state_file"] == name


def test_an_order_not_yet_read_by_ninjatrader_is_placed(nt):
    nt.place(order())
    assert NinjaTraderBackend(nt.incoming).order_status("ord-1")["detail"]["state"] == "SUBMITTED"
    for f in nt.incoming.iterdir():
        f.unlink()  # NinjaTrader consumed it and has not written a state yet
    assert NinjaTraderBackend(nt.incoming).order_status("ord-1") is None
    assert nt.order_status("other") is None


def test_a_state_file_being_written_reads_as_placed(nt):
    (nt.outgoing / "ord-1.txt").write_text("FILL")
    assert nt.order_status("ord-1")["status"] == "placed"


def test_the_newest_state_file_wins(nt):
    old = nt.outgoing / "ord-1.txt"
    old.write_text("WORKING;0;0")
    os.utime(old, (time.time() - 60, time.time() - 60))
    (nt.outgoing / "Sim101_ord-1.txt").write_text("FILLED;2;5000")
    assert nt.order_status("ord-1")["status"] == "filled"


def test_positions_of_one_account(nt):
    (nt.outgoing / "ES 12-26 Globex_Sim101_Position.txt").write_text("LONG;2;5010.5")
    (nt.outgoing / "NQ 12-26 Globex_Sim101_Position.txt").write_text("FLAT;0;0")
    (nt.outgoing / "ES 12-26 Globex_Sim102_Position.txt").write_text("SHORT;1;5000")
    (nt.outgoing / "ord-1.txt").write_text("FILLED;2;5010.5")
    assert nt.positions("Sim101") == [
        {"symbol": "ES 12-26", "exchange": "Globex", "side": "long", "quantity": 2, "average_price": 5010.5},
        {"symbol": "NQ 12-26", "exchange": "Globex", "side": "flat", "quantity": 0, "average_price": None},
    ]
    assert nt.positions("Sim102")[0]["side"] == "short"


def test_health_reports_files_ninjatrader_does_not_read(nt):
    assert nt.health()["healthy"] is True
    nt.place(order())
    assert nt.health()["healthy"] is True
    for f in nt.incoming.iterdir():
        os.utime(f, (time.time() - 120, time.time() - 120))
    state = nt.health()
    assert state["healthy"] is False and "AT Interface" in state["error"]
    assert NinjaTraderBackend(nt.incoming.parent / "nope").health()["healthy"] is False


def test_a_retried_place_writes_one_file(nt):
    orders = PlacedOrders()
    first = orders.place(order(), nt)
    again = orders.place(order(), nt)
    after_restart = PlacedOrders().place(order(), nt)  # a new agent process: NinjaTrader's files tell
    assert first["status"] == again["status"] == after_restart["status"] == "placed"
    assert again["duplicate"] and after_restart["duplicate"]
    assert len(written(nt)) == 1
