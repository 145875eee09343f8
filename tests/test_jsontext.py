"""JSON text on the hot path: orjson where it can, the standard library where it refuses, the same
strict JSON either way."""

import json
import math
from decimal import Decimal

from hypothesis import given, strategies as st

from fksroute import jsontext

plain = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True, allow_infinity=True) | st.text()
    | st.integers(min_value=-2 ** 80, max_value=2 ** 80),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)


def finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


@given(plain)
def test_any_plain_value_becomes_strict_json_that_reads_back_as_it_was(value):
    text = jsontext.text(value)
    assert json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c))) == finite(value)
    assert jsontext.encode(value).decode() == text


def test_what_orjson_refuses_takes_the_standard_library():
    big = 2 ** 70
    assert json.loads(jsontext.text({"q": big})) == {"q": big}              # past 64 bits: exact, not a float
    assert json.loads(jsontext.text({1: "a"})) == {"1": "a"}                # a key that is not a string
    lone = "\ud800"                                                          # a lone surrogate, as json.loads allows
    assert jsontext.encode({"m": lone}) == b'{"m":"\\ud800"}'                # ASCII: no UTF-8 text can carry it
    assert json.loads(jsontext.text({"big": big, "nan": float("nan")})) == {"big": big, "nan": None}


def test_anything_else_is_its_text_and_nothing_is_lost():
    assert json.loads(jsontext.text({"price": Decimal("1.25"), "at": object})) == {"price": "1.25",
                                                                                 "at": str(object)}
    assert json.loads(jsontext.text({"x": float("inf"), "y": [float("-inf"), 1.5]})) == {"x": None, "y": [None, 1.5]}
