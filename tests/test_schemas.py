"""The shipped schemas, their messages, and the fast path agreeing with jsonschema."""

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from fksroute import schemas

SCHEMAS = Path(__file__).parent.parent / "schemas"


def test_every_shipped_schema_is_valid_2020_12():
    names = sorted(p.name for p in SCHEMAS.glob("*.json"))
    assert {"routes.schema.json", "order.schema.json", "tradingview.alert.schema.json"} <= set(names)
    for name in names:
        document = json.loads((SCHEMAS / name).read_text())
        assert document["$schema"] == "https://json-schema.org/draft/2020-12/schema", name
        schemas.builtin_validator(name)


def test_order_errors_name_the_field():
    check = schemas.order_validator("paper")
    assert check.errors({"symbol": "X", "side": "buy", "type": "market", "quantity": 1}) == []
    assert "missing required field quantity" in check.errors({"symbol": "X", "side": "buy", "type": "market"})[0]
    assert check.errors({"symbol": "X", "side": "up", "type": "market", "quantity": 1})[0].startswith("side:")
    limit = check.errors({"symbol": "X", "side": "buy", "type": "limit", "quantity": 1})
    assert "missing required field price" in limit[0]
    nested = check.errors({"symbol": "X", "side": "buy", "type": "market", "quantity": 1, "extra": 1})
    assert "extra" in nested[0]


def test_alert_schema_fills_defaults_and_classifies():
    validator, _ = schemas.load_validator("tradingview.alert.schema.json", SCHEMAS)
    alert = schemas.AlertSchema("tv", validator, schemas.fast_check(validator))
    filled, problem = alert.apply({"symbol": "X", "action": "buy", "quantity": 1})
    assert problem is None and filled["order_type"] == "market" and filled["confidence"] == 0.7
    _, problem = alert.apply({"symbol": "X", "action": "hold", "quantity": 1})
    assert (problem.status, problem.message) == (400, "Invalid action: hold")
    _, problem = alert.apply({"symbol": "X", "action": "buy", "quantity": -1})
    assert (problem.status, problem.message) == (400, "Invalid quantity: -1")
    _, problem = alert.apply({"symbol": "X", "action": "buy"})
    assert problem.status == 422 and "quantity" in problem.message


scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(-10, 10, allow_nan=False),
                    st.sampled_from(["buy", "sell", "market", "limit", "stop", "stop_limit", "GTC", "", "X"]))
orders = st.dictionaries(
    st.sampled_from(["symbol", "side", "type", "quantity", "price", "stop_price", "time_in_force", "post_only",
                     "confidence", "extra"]), scalars, max_size=8)


@settings(max_examples=300, deadline=None)
@given(orders)
def test_fast_path_agrees_with_jsonschema(order):
    validator = schemas.builtin_validator("order.schema.json")
    fast = schemas.builtin_fast_check("order.schema.json")
    assert fast is not None
    assert fast(order) == (not list(validator.iter_errors(order)))


@settings(max_examples=300, deadline=None)
@given(orders)
def test_the_chain_checked_at_once_agrees_with_each_schema_in_turn(order):
    for plugin in ("paper", "ccxt", "ninjatrader", "mt5", "http"):
        chain = schemas.order_validator(plugin)
        assert chain.all_valid is not None, plugin        # compiled whole: one call for a valid order
        each = all(not list(v.iter_errors(order)) for _, v, _ in chain.validators)
        assert chain.all_valid(order) == each, plugin
        assert (chain.errors(order) == []) == each, plugin
