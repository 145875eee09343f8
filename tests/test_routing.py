"""Matchers and the table's match(alert)."""

import pytest

from fksroute.config import load
from fksroute.routing import MatcherError, compile_block, lookup

ALERT = {"symbol": "BTC/USDT", "action": "buy", "contracts": "0.01", "confidence": 0.8,
         "strategy": {"order": {"action": "sell", "contracts": "3"}}, "flag": True, "tags": ["a", "b"]}


@pytest.mark.parametrize("block, expected", [
    ({}, True),
    ({"symbol": "BTC/USDT"}, True),
    ({"symbol": "ETH/USDT"}, False),
    ({"symbol": ["ETH/USDT", "BTC/USDT"]}, True),
    ({"symbol": {"eq": "BTC/USDT"}}, True),
    ({"symbol": {"ne": "BTC/USDT"}}, False),
    ({"symbol": {"in": ["X", "BTC/USDT"]}}, True),
    ({"symbol": {"not_in": ["X", "BTC/USDT"]}}, False),
    ({"symbol": {"regex": "[A-Z]+/USDT"}}, True),
    ({"symbol": {"regex": "BTC"}}, False),  # the whole value, not a part of it
    ({"contracts": {"gt": 0.001}}, True),  # "0.01" compares as a number
    ({"contracts": {"gte": "0.01"}}, True),
    ({"contracts": {"lt": 0.01}}, False),
    ({"contracts": {"lte": 0.01}}, True),
    ({"contracts": {"gt": 0.001, "lt": 1}}, True),
    ({"contracts": 0.01}, True),
    ({"symbol": {"gt": 1}}, False),  # not a number: no numeric comparison holds
    ({"strategy.order.action": "sell"}, True),
    ({"strategy.order.contracts": {"gte": 3}}, True),
    ({"strategy.order.missing": {"exists": False}}, True),
    ({"strategy.order.action": {"exists": True}}, True),
    ({"nothing": {"exists": True}}, False),
    ({"nothing": "x"}, False),
    ({"nothing": {"ne": "x"}}, True),
    ({"symbol": {"not": {"regex": "ETH.*"}}}, True),
    ({"not": {"symbol": "BTC/USDT"}}, False),
    ({"any": [{"symbol": "ETH/USDT"}, {"action": "buy"}]}, True),
    ({"any": [{"symbol": "ETH/USDT"}, {"action": "sell"}]}, False),
    ({"all": [{"symbol": "BTC/USDT"}, {"action": "buy"}]}, True),
    ({"all": [{"symbol": "BTC/USDT"}, {"action": "sell"}]}, False),
    ({"flag": True}, True),
    ({"flag": "true"}, True),
    ({"tags.1": "b"}, True),
    ({"confidence": {"gte": 0.6}, "action": "buy"}, True),
    ({"confidence": {"gte": 0.9}, "action": "buy"}, False),
])
def test_matchers(block, expected):
    assert compile_block(block)(ALERT) is expected


@pytest.mark.parametrize("block, fragment", [
    ({"symbol": {"regex": "("}}, "invalid regex"),
    ({"x": {"gt": "abc"}}, "gt needs a number"),
    ({"x": {"between": 1}}, "unknown matcher"),
    ({"any": []}, "non-empty list"),
    ({"x": {}}, "empty matcher"),
])
def test_bad_matchers(block, fragment):
    with pytest.raises(MatcherError, match=fragment):
        compile_block(block)


def test_lookup_missing_is_not_none():
    assert lookup({"a": None}, "a") is None
    assert lookup({"a": None}, "b") is not None


TABLE = """\
version: 1
plugins:
  a: {type: paper}
  b: {type: paper}
routes:
  - name: first
    match: {symbol: {regex: 'BTC.*'}}
    to: a
    continue: true
  - name: second
    match: {contracts: {gt: 1}}
    to: b
  - name: third
    to: a
"""


def table(tmp_path, text=TABLE):
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    loaded = load(text, path=path, env={})
    assert not isinstance(loaded, list), loaded
    return loaded


def test_first_match_wins_and_continue(tmp_path):
    t = table(tmp_path)
    assert [r.name for r in t.match({"symbol": "BTCUSDT", "contracts": "5"})] == ["first", "second"]
    assert [r.name for r in t.match({"symbol": "BTCUSDT", "contracts": "0.5"})] == ["first", "third"]
    assert [r.name for r in t.match({"symbol": "ETHUSDT", "contracts": "5"})] == ["second"]
    assert [r.name for r in t.match({"symbol": "ETHUSDT"})] == ["third"]


def test_nothing_matches(tmp_path):
    t = table(tmp_path, TABLE.replace("  - name: third\n    to: a\n", ""))
    assert t.match({"symbol": "ETHUSDT"}) == []
