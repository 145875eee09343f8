"""Templates: sandboxed, native types, alert text is data."""

from datetime import datetime, timezone

import pytest

from hypothesis import given, settings
from hypothesis import strategies as st

from fksroute.transform import (DEFAULT_ORDER, OrderTemplate, OrderTemplateError, TransformError, _render,
                                compile_order, compile_template, variables, with_globals)

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=timezone.utc)


def render(order, alert):
    return OrderTemplate(compile_order(order)).render(variables(alert, "r", NOW))


def test_native_types():
    out = render({"quantity": "{{ alert.contracts | float }}", "n": "{{ alert.n }}", "flag": "{{ alert.f }}",
                  "text": "{{ alert.symbol }}-x", "const": "market", "number": 3},
                 {"contracts": "0.01", "n": 7, "f": True, "symbol": "BTC"})
    assert out == {"quantity": 0.01, "n": 7, "flag": True, "text": "BTC-x", "const": "market", "number": 3}
    assert isinstance(out["quantity"], float)


def test_alert_text_is_data():
    out = render({"symbol": "{{ alert.symbol }}", "list": "{{ alert.l }}"}, {"symbol": "{{ 7*7 }}", "l": "[1, 2]"})
    assert out == {"symbol": "{{ 7*7 }}", "list": "[1, 2]"}


def test_none_leaves_are_dropped():
    out = render({"price": "{{ alert.price | default(none) }}", "sl": "{{ alert.sl }}", "q": 1},
                 {"sl": None})
    assert out == {"q": 1}


def test_missing_field_is_named():
    with pytest.raises(TransformError, match=r"order.quantity: missing field contracts"):
        render({"quantity": "{{ alert.contracts }}"}, {})


@pytest.mark.parametrize("source", [
    "{{ alert.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ alert.symbol.__class__.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{{ alert.update({'x': 1}) }}",
])
def test_sandbox_blocks_internals(source):
    with pytest.raises(TransformError):
        render({"x": source}, {"symbol": "BTC"})


def test_nested_and_lists():
    out = render({"params": {"a": "{{ alert.x }}", "l": ["{{ alert.x }}", "k"]}}, {"x": 2})
    assert out == {"params": {"a": 2, "l": [2, "k"]}}


def test_route_and_now_are_visible():
    out = render({"r": "{{ route }}", "y": "{{ now.year }}"}, {})
    assert out == {"r": "r", "y": 2026}


def test_compile_error_has_path():
    with pytest.raises(OrderTemplateError) as info:
        compile_order({"a": {"b": "{% if %}"}})
    assert info.value.path == ("a", "b")


def test_default_order_maps_tradingview_names():
    out = DEFAULT_ORDER.render(variables({"ticker": "ES1!", "action": "sell", "contracts": "2"}, "r", NOW))
    assert out == {"symbol": "ES1!", "side": "sell", "type": "market", "quantity": 2.0}


def test_single_template():
    assert compile_template("{{ alert.id }}").render({"alert": {"id": "x1"}}) == "x1"


alert_values = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(-5, 5, allow_nan=False),
                         st.text(max_size=5), st.lists(st.integers(), max_size=2))
alerts = st.dictionaries(st.sampled_from(["symbol", "ticker", "action", "side", "order_type", "type", "quantity",
                                          "contracts", "price", "stop_loss", "account", "confidence"]),
                         alert_values, max_size=8)


@settings(max_examples=300, deadline=None)
@given(alerts)
def test_one_render_per_order_agrees_with_leaf_by_leaf(alert):
    order = OrderTemplate(compile_order({
        "symbol": "{{ alert.symbol }}", "side": "{{ alert.action | default('buy') }}", "type": "market",
        "quantity": "{{ alert.quantity | default(alert.contracts) | float }}", "n": 3,
        "price": "{{ alert.price | default(none) }}", "text": "{{ alert.symbol }}-x"}))
    for template in (order, DEFAULT_ORDER):
        names = variables(alert, "r", NOW)

        def outcome(render):
            try:
                return "ok", render()
            except TransformError as exc:
                return "error", str(exc)

        slow = outcome(lambda: _render(template.tree, with_globals(names), ()))
        assert outcome(lambda: template.render(names)) == slow


def test_the_one_render_is_used_for_plain_orders():
    assert OrderTemplate(compile_order({"a": "{{ alert.x }}", "b": 1})).combined is not None
    assert OrderTemplate(compile_order({"a": "{{ alert.x }}-{{ alert.y }}"})).combined is None
    assert OrderTemplate(compile_order({"a": {"b": "{{ alert.x }}"}})).combined is None
