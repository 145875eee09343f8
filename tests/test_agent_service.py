"""The agent service's own rules: what an order must look like, and that one order id is placed once."""

from __future__ import annotations

import json
import threading
import time

import pytest

from fksroute.agents.service import AgentOrder, AgentService, NotSent, OrderError, PlacedOrders, order_result, parse_order


def payload(**order) -> str:
    base = {"symbol": "ES 12-26", "side": "buy", "type": "market", "quantity": 1}
    return json.dumps({"order_id": "ord-1", "backend": "ninjatrader", "order": {**base, **order}})


class Recorder:
    """A backend that records what it was asked and can be made slow or failing."""

    name = "ninjatrader"

    def __init__(self, delay: float = 0.0, fail: Exception | None = None) -> None:
        self.placed: list[AgentOrder] = []
        self.delay = delay
        self.fail = fail
        self.started = threading.Event()

    def order_status(self, order_id):
        return None

    def place(self, order):
        self.started.set()
        time.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        self.placed.append(order)
        return order_result(order.order_id, "placed")

    def health(self):
        return {"healthy": True}


def test_a_valid_order_is_read():
    order = parse_order(payload(type="stop_limit", price=5013.5, stop_price=5013, account="Sim101",
                                time_in_force="GTC", strategy="ATM1"), "ninjatrader")
    assert order == AgentOrder("ord-1", "ES 12-26", "buy", "stop_limit", 1.0, price=5013.5, stop_price=5013.0,
                               time_in_force="GTC", account="Sim101", strategy="ATM1")


@pytest.mark.parametrize("text, message", [
    ("not json", "not valid JSON"),
    ("[]", "JSON object"),
    (json.dumps({"order_id": "", "order": {}}), "order_id"),
    (json.dumps({"order_id": "a b", "order": {}}), "order_id"),
    (json.dumps({"order_id": "x" * 65, "order": {}}), "order_id"),
    (json.dumps({"order_id": "ok", "backend": "mt5", "order": {}}), "drives ninjatrader, not mt5"),
    (payload(side="long"), "side"),
    (payload(type="trailing"), "type"),
    (payload(quantity=0), "quantity"),
    (payload(quantity=True), "quantity"),
    (payload(quantity="1"), "quantity"),
    (payload(quantity=None), "needs quantity"),
    (payload(type="limit"), "needs price"),
    (payload(type="stop"), "needs stop_price"),
    (payload(time_in_force="GTD"), "time_in_force"),
    (payload(symbol="ES\n12-26"), "control characters"),
    (payload(symbol=""), "symbol"),
    (payload(account=7), "account"),
    (payload(params=[]), "params"),
])
def test_invalid_orders_are_refused(text, message):
    with pytest.raises(OrderError, match=message):
        parse_order(text, "ninjatrader")


def test_concurrent_retries_of_one_order_place_it_once():
    backend = Recorder(delay=0.2)
    orders = PlacedOrders()
    order = parse_order(payload(), "ninjatrader")
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(orders.place(order, backend))) for _ in range(5)]
    for t in threads:
        t.start()
    backend.started.wait(2)
    assert orders.status("ord-1", backend)["detail"]["in_progress"] is True
    for t in threads:
        t.join(5)
    assert len(backend.placed) == 1
    assert sorted(bool(a.get("duplicate")) for a in answers) == [False, True, True, True, True]
    assert orders.status("ord-1", backend)["status"] == "placed"  # remembered, though the terminal has no record


def test_a_failure_before_sending_may_be_tried_again():
    backend = Recorder(fail=NotSent("incoming is not writable"))
    orders = PlacedOrders()
    order = parse_order(payload(), "ninjatrader")
    assert orders.place(order, backend) == order_result("ord-1", "failed", error="incoming is not writable")
    backend.fail = None
    assert orders.place(order, backend)["status"] == "placed"
    assert len(backend.placed) == 1


def test_an_unexpected_error_leaves_the_outcome_unknown_and_is_not_retried():
    backend = Recorder(fail=RuntimeError("boom"))
    orders = PlacedOrders()
    order = parse_order(payload(), "ninjatrader")
    assert orders.place(order, backend)["status"] == "unknown"
    backend.fail = None
    assert orders.place(order, backend)["status"] == "unknown"
    assert backend.placed == []


def test_only_a_bounded_number_of_answers_is_kept():
    backend = Recorder()
    orders = PlacedOrders(capacity=3)
    for i in range(5):
        orders.place(parse_order(payload().replace("ord-1", f"ord-{i}"), "ninjatrader"), backend)
    assert len(orders) == 3


def test_the_service_answers_json_even_when_the_backend_breaks():
    class Broken(Recorder):
        def health(self):
            raise RuntimeError("secret detail")

    service = AgentService(Broken())
    answer = json.loads(service.exposed_health())
    assert answer == {"status": "unknown", "error": "agent error (RuntimeError)"}
    assert json.loads(service.exposed_order_status(3))["status"] == "unknown"  # not "failed": nothing is known
    assert "order_id" in json.loads(service.exposed_cancel("a b"))["error"]
