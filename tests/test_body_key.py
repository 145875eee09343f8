"""The default dedup key is defined by the standard library's canonical JSON: the fast way of
writing it (orjson) must give the same text for every alert, so that a key never changes between
versions and an alert resent across an upgrade is still known as a duplicate."""

import hashlib
import json

import orjson
from hypothesis import example, given, strategies as st

from fksroute.plan import _EXPONENT, _ONLY_JSON, body_key, canonical


def standard(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()


# What json.loads can give: finite floats of every magnitude, integers past 64 bits, any text.
floats = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(
    [1e16, 1e15, 9999999999999998.0, 1e-4, 1e-5, 0.0001, 0.00012345, -0.0, 2.5e-7, 1e22, 5e-324, 1.7976931348623157e308])
leaves = (st.none() | st.booleans() | floats | st.text()
          | st.integers(min_value=-2 ** 80, max_value=2 ** 80))
alerts = st.dictionaries(st.text(max_size=8), st.recursive(
    leaves, lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20), max_size=8)


@given(alerts)
@example({"symbol": "BTC/USDT", "action": "buy", "quantity": 0.01, "confidence": 0.85, "id": "a-1"})
@example({"q": 1e-05, "r": 1e16, "s": "é", "t": "\x7f", "u": 2 ** 70, "v": "\u2028", "w": "\x00\n\"\\/"})
@example({"z": {"b": [1, {"y": None, "a": True}], "a": -0.0}})
@example({"id": "ema-cross-1e5", "s": "close-long", "t": "e1", "q": 1e-07, "r": -2.5e+16, "u": [1e100, "9e"]})
def test_the_fast_canonical_text_is_the_standard_librarys(alert):
    assert canonical(alert) == standard(alert)
    assert body_key(alert) == hashlib.sha256(standard(alert)).hexdigest()


def test_alert_text_with_an_e_before_a_digit_or_minus_is_written_the_fast_way():
    # Words such as these are common in alerts; each once sent the alert the slow way.
    alert = {"strategy": "ema-cross", "action": "close-long", "id": "fksroute-32-17", "note": "type-2"}
    assert _EXPONENT.search(orjson.dumps(alert, option=_ONLY_JSON)) is None
    assert canonical(alert) == standard(alert)


def test_the_key_ignores_key_order_and_tells_values_apart():
    assert body_key({"a": 1, "b": "x"}) == body_key({"b": "x", "a": 1})
    assert body_key({"a": 1}) != body_key({"a": 1.0}) != body_key({"a": "1"})
