"""Templates: sandboxed, native types, alert text is data."""

from datetime import datetime, timezone
from pathlib import Path

import pytest

from hypothesis import given, settings
from hypothesis import strategies as st

from fksroute import config
from fksroute.transform import (DEFAULT_ORDER, OrderTemplate, OrderTemplateError, TransformError, _render,
                                _render_fast, compile_order, compile_template, variables, with_globals)

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
        assert outcome(lambda: template.render_jinja(names)) == slow


def test_the_one_render_is_used_for_plain_orders():
    assert OrderTemplate(compile_order({"a": "{{ alert.x }}", "b": 1})).combined is not None
    assert OrderTemplate(compile_order({"a": "{{ alert.x }}-{{ alert.y }}"})).combined is None
    assert OrderTemplate(compile_order({"a": {"b": "{{ alert.x }}"}})).combined is None


# The fast path: flat orders of alert fields, constants, `default` and `float`, computed without Jinja.

SHIPPED_ORDER = config.load_file(Path(__file__).parent.parent / "routes.yaml", env={}).routes[0].order
FAST_ORDERS = {
    "default": DEFAULT_ORDER,
    "shipped": SHIPPED_ORDER,
    "chains": OrderTemplate(compile_order({
        "symbol": "{{ alert['symbol'] | default(alert.ticker) | d('ES1!') }}",
        "quantity": "{{ alert.quantity | default(alert.contracts) | default(1) | float }}",
        "price": "{{ alert.price | default(alert.quantity | float) }}",  # Jinja computes the default first
        "confidence": "{{ alert.confidence | float | default(0.5) }}",
        "side": "{{ 'buy' | default(alert.side) }}",
        "type": "{{ alert.type | default(none) | default('limit') }}",
        "flag": "{{ alert.action | default(false) }}",
        "account": "{{ alert['account'] | d(alert.side) }}",
        "n": 3, "off": None, "yes": True, "text": "market", "raw": "{% raw %}{{ x }}{% endraw %}",
    })),
    "floats": OrderTemplate(compile_order({
        "q": "{{ alert.quantity | float }}", "c": "{{ alert.contracts | default(2) | float }}",
        "p": "{{ alert.price | default(alert.stop_loss | float) | float }}", "z": "{{ alert.type | default(0) }}",
    })),
}

fast_values = st.one_of(
    st.none(), st.booleans(), st.integers(), st.just(10 ** 400), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5), st.sampled_from(["1", "2.5", " 3 ", "1_0", "-0", "nan", "inf", "1e400", "x", ""]),
    st.lists(st.integers(-3, 3), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(-3, 3), max_size=2))
fast_alerts = st.dictionaries(st.sampled_from([
    "symbol", "ticker", "action", "side", "quantity", "contracts", "price", "order_type", "type", "confidence",
    "stop_price", "stop_loss", "take_profit", "time_in_force", "account", "items"]), fast_values, max_size=10)


def outcome(render):
    """A render's result or TransformError message, with every value's type: 1, 1.0, True and "1"
    differ, and so do 0.0 and -0.0 (repr), while nan equals nan."""
    def shape(value):
        if isinstance(value, dict):
            return dict, {k: shape(v) for k, v in value.items()}
        if isinstance(value, list):
            return list, [shape(v) for v in value]
        return type(value), repr(value)
    try:
        return "ok", shape(render())
    except TransformError as exc:
        return "error", str(exc)


@pytest.mark.parametrize("name", FAST_ORDERS)
@settings(max_examples=400, deadline=None)
@given(alert=fast_alerts)
def test_fast_path_is_jinja(name, alert):
    order = FAST_ORDERS[name]
    assert order.fast is not None
    names = variables(alert, "r", NOW)
    slow = outcome(lambda: order.render_jinja(names))
    fast = _render_fast(order.fast, alert)
    if fast is not None:  # it answers only with what Jinja answers; else Jinja renders (and words the error)
        assert outcome(lambda: fast) == slow
    else:
        assert slow[0] == "error"
    assert outcome(lambda: order.render(names)) == slow


def test_fast_path_answers_plain_alerts():
    alert = {"ticker": "ES1!", "action": "sell", "contracts": "2", "price": None}
    assert _render_fast(DEFAULT_ORDER.fast, alert) == {"symbol": "ES1!", "side": "sell", "type": "market",
                                                       "quantity": 2.0}
    shipped = {"symbol": "BTC", "action": "buy", "order_type": "limit", "quantity": 1, "confidence": 0.7,
               "price": 5.5}
    assert _render_fast(SHIPPED_ORDER.fast, shipped) == {"symbol": "BTC", "side": "buy", "type": "limit",
                                                         "quantity": 1, "price": 5.5, "confidence": 0.7}


@pytest.mark.parametrize("order, alert, expected", [
    ({"x": "{{ alert.quantity * 2 }}"}, {"quantity": 2}, {"x": 4}),
    ({"x": "{{ now }}", "y": "{{ alert.a }}"}, {"a": 1}, {"x": NOW, "y": 1}),
    ({"x": "{{ route }}"}, {}, {"x": "r"}),
    ({"x": "x{{ alert.a }}"}, {"a": 1}, {"x": "x1"}),
    ({"x": "{{ alert.a }}x"}, {"a": 1}, {"x": "1x"}),
    ({"x": "{{ alert.a }}{{ alert.a }}"}, {"a": 1}, {"x": "11"}),
    ({"x": {"y": "{{ alert.a }}"}}, {"a": 1}, {"x": {"y": 1}}),
    ({"x": ["{{ alert.a }}"]}, {"a": 1}, {"x": [1]}),
    ({"x": "{{ alert.a | upper }}"}, {"a": "b"}, {"x": "B"}),
    ({"x": "{{ alert.a | default(1, true) }}"}, {"a": 0}, {"x": 1}),
    ({"x": "{{ alert.a | default() }}"}, {}, {"x": ""}),
    ({"x": "{{ alert.a | float(1) }}"}, {"a": "b"}, {"x": 1}),
    ({"x": "{{ alert.a | default(-1) }}"}, {}, {"x": -1}),
    ({"x": "{{ alert.a is defined }}"}, {}, {"x": False}),
    ({"x": "{{ alert[0] | default(1) }}"}, {}, {"x": 1}),
    ({"x": "{{ alert | length }}"}, {"a": 1}, {"x": 1}),
    ({"x": "{{ 'buy' }}", "y": "{{ alert.a }}"}, {"a": 1}, {"x": "buy", "y": 1}),  # Jinja folds constants
    ({"x": "{{ alert.a | default('3' | float) }}"}, {}, {"x": 3.0}),
])
def test_other_forms_render_as_before(order, alert, expected):
    template = OrderTemplate(compile_order(order))
    assert template.fast is None
    assert template.render(variables(alert, "r", NOW)) == expected


@pytest.mark.parametrize("source", ["{{ alert.items }}", "{{ alert['keys'] }}", "{{ alert.get | default(1) }}",
                                    "{{ alert.copy }}"])
def test_a_dicts_own_attributes_are_not_fields(source):
    template = OrderTemplate(compile_order({"x": source}))
    assert template.fast is None
    assert callable(template.render(variables({}, "r", NOW))["x"])  # Jinja's getattr: the bound method


def test_a_subscript_prefers_the_field():
    assert OrderTemplate(compile_order({"x": "{{ alert['keys'] }}"})).render(variables({"keys": 2}, "r", NOW)) \
        == {"x": 2}


def test_constants_jinja_fails_on_stay_with_jinja():
    for source in ("{{ alert.a | default(1e400) }}", "{{ alert.a | default('inf' | float) }}"):
        template = OrderTemplate(compile_order({"x": source}))
        assert template.fast is None
        with pytest.raises(TransformError, match="NameError: name 'inf' is not defined"):
            template.render(variables({"a": 1}, "r", NOW))


def test_an_alert_that_is_not_a_dict_goes_to_jinja():
    class Alert(dict):
        pass

    names = variables(Alert(ticker="ES1!", action="buy", contracts=1), "r", NOW)
    assert _render_fast(DEFAULT_ORDER.fast, names["alert"]) is None
    assert DEFAULT_ORDER.render(names) == {"symbol": "ES1!", "side": "buy", "type": "market", "quantity": 1.0}


@pytest.mark.parametrize("order, alert, message", [
    ({"quantity": "{{ alert.quantity }}"}, {}, "order.quantity: missing field quantity"),
    ({"quantity": "{{ alert.quantity | float }}"}, {}, "order.quantity: missing field quantity"),
    ({"q": "{{ alert.a | default(alert.b) | float }}"}, {}, "order.q: missing field b"),
    ({"p": "{{ alert.a | default(alert.b | float) }}"}, {"a": 1}, "order.p: missing field b"),
    ({"q": "{{ alert.q | float }}"}, {"q": 10 ** 400}, "order.q: OverflowError: int too large to convert to float"),
])
def test_fast_orders_fail_with_jinjas_message(order, alert, message):
    template = OrderTemplate(compile_order(order))
    assert template.fast is not None
    with pytest.raises(TransformError) as info:
        template.render(variables(alert, "r", NOW))
    assert str(info.value) == message


def test_default_order_missing_quantity_is_named():
    with pytest.raises(TransformError) as info:
        DEFAULT_ORDER.render(variables({"ticker": "ES1!", "action": "buy"}, "r", NOW))
    assert str(info.value) == "order.quantity: missing field contracts"


def _filtered(operand, name, argument=None):
    return f"{operand} | {name}" + ("" if argument is None else f"({argument})")


constants = st.sampled_from(["none", "true", "false", "0", "2", "1.5", "'x'", "''", "'2.5'", "'inf'", "1e400"])
fields = st.sampled_from(["symbol", "quantity", "price", "items"]).flatmap(
    lambda name: st.sampled_from([f"alert.{name}", f"alert['{name}']"]))
expressions = st.recursive(fields | constants, lambda inner: st.one_of(
    st.builds(_filtered, inner, st.sampled_from(["default", "d"]), inner),
    st.builds(_filtered, inner, st.just("float"))), max_leaves=5)


@settings(max_examples=500, deadline=None)
@given(st.lists(expressions, min_size=1, max_size=3), fast_alerts)
def test_random_simple_expressions_are_jinja(sources, alert):
    order = OrderTemplate(compile_order({f"k{i}": "{{ " + s + " }}" for i, s in enumerate(sources)}))
    names = variables(alert, "r", NOW)
    slow = outcome(lambda: order.render_jinja(names))
    fast = _render_fast(order.fast, alert) if order.fast is not None else None
    if fast is not None:
        assert outcome(lambda: fast) == slow
    assert outcome(lambda: order.render(names)) == slow


def test_a_constant_leaf_renders_as_jinja_renders_it_whatever_the_other_leaves():
    # Jinja folds `{{ 1 }}` into the text "1" at compile time; the one-template path must not
    # turn it into a character of a list's text, nor into a number.
    alone = OrderTemplate(compile_order({"a": "{{ 1 }}"}))
    mixed = OrderTemplate(compile_order({"a": "{{ 1 }}", "b": "{{ alert.x * 2 }}"}))
    names = variables({"x": 3}, "r", datetime.now(timezone.utc))
    assert alone.render(names) == {"a": "1"}
    assert mixed.render(names) == {"a": "1", "b": 6}
    assert alone.combined is None and mixed.combined is None
