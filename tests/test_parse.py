"""Parsing an alert's body: the quick path for plain JSON objects agrees with the strict parse
on every input, and the strict parse's rules (finite numbers, bounded integers, depth) hold."""

import json

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fksroute.webhook import MAX_DEPTH, BadAlert, _parse_strict, parse_alert

CONTENT_TYPES = [None, "application/json", "text/plain", "application/json; charset=utf-8"]


def outcome(parse, body, content_type):
    try:
        return "ok", parse(body, content_type)
    except BadAlert as exc:
        return "refused", str(exc)


def strict(body: bytes, content_type: str | None):
    return _parse_strict(body.decode("utf-8-sig"), content_type)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=12)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(value=json_values, content_type=st.sampled_from(CONTENT_TYPES))
@example(value={"q": 2 ** 64, "r": -2 ** 63 - 1, "s": 2 ** 63 - 1, "t": 2 ** 70}, content_type=None)
@example(value={"q": 1e19, "r": -9.3e18, "s": 9.2e18, "t": 5e-324}, content_type=None)
@example(value={"a": "\ud800", "b": "\udfff x"}, content_type="application/json")
def test_the_quick_path_agrees_with_the_strict_parse(value, content_type):
    body = json.dumps(value).encode()  # NaN and Infinity come out as JavaScript constants
    # By repr: 2**64 == 2.0**64 in Python, and an integer must stay an exact integer.
    assert repr(outcome(parse_alert, body, content_type)) == repr(outcome(strict, body, content_type))


@pytest.mark.parametrize("text, refused", [
    ('{"q": NaN}', "NaN is not a number"),
    ('{"q": -Infinity}', "-Infinity is not a number"),
    ('{"q": 1e400}', "out of range"),
    ('{"q": ' + "9" * 309 + "}", "309 digits is out of range"),
    ('{"q": ' + "9" * 5000 + "}", "5000 digits is out of range"),
    ("[" * 40 + "]" * 40, "a JSON alert must be an object"),
    ('{"a":' * (MAX_DEPTH + 1) + "1" + "}" * (MAX_DEPTH + 1), f"nested deeper than {MAX_DEPTH} levels"),
])
def test_the_strict_rules_still_hold(text, refused):
    with pytest.raises(BadAlert, match=refused):
        parse_alert(text.encode(), "application/json")


def test_the_deepest_allowed_alert_and_the_largest_integer_pass():
    deepest = '{"a":' * MAX_DEPTH + "1" + "}" * MAX_DEPTH
    assert parse_alert(deepest.encode(), "application/json")["a"]
    assert parse_alert(('{"q": ' + "9" * 308 + "}").encode(), None)["q"] == 10 ** 308 - 1


def test_plain_text_and_a_byte_order_mark():
    assert parse_alert(b"BTCUSDT crossing 100", "text/plain") == {"message": "BTCUSDT crossing 100"}
    assert parse_alert(b'\xef\xbb\xbf{"a": 1}', None) == {"a": 1}
    with pytest.raises(BadAlert, match="not utf-8 text"):
        parse_alert(b'{"a": "\xff"}', "application/json")
