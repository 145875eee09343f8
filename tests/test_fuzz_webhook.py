"""Fuzz the webhook of one real `fksroute serve`: bodies, headers, sizes and encodings never give
a 5xx, every answer is the contract's JSON, and the daemon stays up without a traceback."""

import collections
import json
import os
import urllib.parse

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fksroute.security import sign
from serving import start_daemon, write_routes

SECRET = "fuzz-secret-" + os.urandom(6).hex()
LIMIT = 2048
EXPECTED = {200, 202, 400, 401, 413, 422}
REPLY_KEYS = {"success", "order_id", "error", "alert_id", "duplicate", "results"}
SETTINGS = settings(max_examples=250, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    home = tmp_path_factory.mktemp("fuzz")
    daemon = start_daemon(write_routes(home, f"""
        version: 1
        security: {{secret: "${{env:FKS_FUZZ_SECRET}}", max_body_bytes: {LIMIT}}}
        unmatched: drop
        plugins: {{paper: {{type: paper}}}}
        routes:
          - name: crypto
            match: {{symbol: {{regex: "[A-Z0-9]+/USDT"}}, confidence: {{gte: 0.5}}}}
            alert_schema: tradingview.alert.schema.json
            max_age: 1h
            time_field: time
            limits: {{max_quantity: 1000000}}
            to: paper
          - name: strategy
            match: {{strategy.order.action: [buy, sell]}}
            dedup_key: "{{{{ alert.id | default('none') }}}}"
            to: paper
            order:
              symbol: "{{{{ alert.ticker | default('X') }}}}"
              side: "{{{{ alert.strategy.order.action }}}}"
              type: market
              quantity: "{{{{ alert.strategy.order.contracts | float }}}}"
          - {{name: rest, match: {{message: {{regex: "(?s).*cross.*"}}}}, to: paper}}
    """), env={"FKS_FUZZ_SECRET": SECRET})
    yield daemon
    assert daemon.proc.poll() is None, "the daemon died"
    assert daemon.get("/-/healthy").status_code == 200
    logs = daemon.logs()
    daemon.stop()
    assert "Traceback" not in logs and "Exception in ASGI" not in logs, logs[-3000:]


def strict_json(text):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def check(reply, seen):
    seen[reply.status_code] += 1
    assert reply.status_code in EXPECTED, (reply.status_code, reply.text)
    body = strict_json(reply.text)
    assert set(body) >= REPLY_KEYS and isinstance(body["success"], bool)


# --- what goes in ------------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers(min_value=-(10 ** 30), max_value=10 ** 30)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
numbers = (st.floats(allow_nan=True, allow_infinity=True) | st.integers(min_value=-(10 ** 400), max_value=10 ** 400)
           | st.sampled_from([0.01, 1, "0.5", "1e999", "nan", -1, 0, 1.797e308, 5e-324]))
times = st.sampled_from(["2020-01-01T00:00:00Z", "nonsense", "", "9999-12-31T23:59:59Z", "2026-13-45T99:99:99Z",
                         1e300, -1, 10 ** 30]) | st.text(max_size=10) | st.integers()
alerts = st.fixed_dictionaries(
    {"symbol": st.sampled_from(["BTC/USDT", "ETH/USDT", "ES1!", ""]) | st.text(max_size=10),
     "action": st.sampled_from(["buy", "sell", "invalid_action"]) | json_values,
     "quantity": numbers},
    optional={"order_type": st.sampled_from(["market", "limit", "stop", "stop_limit", "iceberg"]),
              "price": numbers, "stop_price": numbers, "stop_loss": numbers, "take_profit": numbers,
              "confidence": numbers, "time": times, "id": st.text(max_size=6), "extra": json_values})
strategy_alerts = st.fixed_dictionaries(
    {"ticker": st.text(max_size=8) | st.just("BTCUSDT"),
     "strategy": st.fixed_dictionaries({"order": st.fixed_dictionaries(
         {"action": st.sampled_from(["buy", "sell"]), "contracts": numbers | json_values})})},
    optional={"id": st.text(max_size=4) | st.integers()})


def deep(depth, opener, closer):
    return opener * depth + closer * depth


texts = st.one_of(
    alerts.map(lambda a: json.dumps(a, allow_nan=True)),
    strategy_alerts.map(lambda a: json.dumps(a, allow_nan=True)),
    json_values.map(lambda v: json.dumps(v, allow_nan=True)),
    st.integers(1, 5000).map(lambda n: deep(n, "[", "]")),
    st.integers(1, 3000).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.integers(300, 5000).map(lambda n: '{"symbol":"BTC/USDT","action":"buy","quantity":' + "9" * n + "}"),
    st.sampled_from(['{"symbol":"BTC/USDT","action":"buy","quantity":NaN}', '{"quantity": Infinity}',
                     '{"quantity": 1e999, "symbol": "BTC/USDT", "action": "buy"}', "NaN", "null", "[]", '""',
                     "BTCUSDT crossed up", "\ufeff{\"symbol\": \"BTC/USDT\"}", "{", "}", "\x00", " ", ""]),
    st.text(max_size=300),
)
encodings = st.sampled_from(["utf-8", "utf-8", "utf-16", "latin-1", "utf-8-sig", "cp1252"])
content_types = st.sampled_from([
    None, "application/json", "text/plain", "application/json; charset=utf-8", "text/plain; charset=UTF-16",
    "text/plain; charset=latin-1", "application/json; charset=bogus-charset", "application/x-www-form-urlencoded",
    "APPLICATION/JSON", "application/json;charset=", "multipart/form-data; boundary=x", "",
    "text/plain; charset=base64", "application/json; charset=rot13", "text/plain; charset=idna",
    'application/json; charset="utf-16-le"', "application/json; charset=zlib",
]) | st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=40)
header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
                      max_size=60)
forwarded = st.none() | header_text | st.sampled_from(["127.0.0.1", "::1", "1.2.3.4, 5.6.7.8", "[::1]:80", ",,,"])


@st.composite
def requests(draw):
    """(path, headers, body): a body, how it is signed, its encoding, its size and its headers."""
    kind = draw(st.sampled_from(["text", "text", "text", "bytes"]))
    auth = draw(st.sampled_from(["none", "passphrase", "passphrase", "signature", "signature", "bogus", "token"]))
    if kind == "bytes":
        body = draw(st.binary(max_size=LIMIT + 8))
    else:
        text = draw(texts)
        if auth == "passphrase":
            try:
                value = json.loads(text)
            except (ValueError, RecursionError):
                value = None
            if isinstance(value, dict):
                value["passphrase"] = draw(st.just(SECRET) | json_values)
                text = json.dumps(value, allow_nan=True)
        body = text.encode(draw(encodings), errors="replace")
    size = draw(st.sampled_from(["as is", "as is", LIMIT - 1, LIMIT, LIMIT + 1]))
    if size != "as is" and len(body) < size:
        body += b" " * (size - len(body))       # JSON allows trailing blanks
    headers = {}
    content_type = draw(content_types)
    if content_type is not None:
        headers["Content-Type"] = content_type
    if auth == "signature":
        headers["X-Webhook-Signature"] = sign(body, SECRET)
    elif auth == "bogus":
        headers["X-Webhook-Signature"] = draw(header_text)
    xff = draw(forwarded)
    if xff is not None:
        headers["X-Forwarded-For"] = xff
    path = draw(st.sampled_from(["/webhook/tradingview", "/webhook"]))
    if auth == "token":
        # Any text but a path separator or a dot segment, which would name another endpoint.
        token = draw(st.text(st.characters(exclude_characters="/.", exclude_categories=("Cs",)), min_size=1, max_size=20))
        path += "/" + urllib.parse.quote(token, safe="")
    # h11 refuses to send a value with blanks at its ends: what a real client could send is stripped.
    return path, {k: v.strip(" \t").encode("latin-1") for k, v in headers.items()}, body


def test_fuzzed_requests_never_get_a_5xx(fuzzed):
    seen = collections.Counter()

    @SETTINGS
    @given(requests())
    def one(request):
        path, headers, body = request
        check(fuzzed.post(path, content=body, headers=headers), seen)

    one()
    print(dict(seen))
    assert EXPECTED - {202} <= set(seen), seen          # the fuzz reached every outcome


def test_fuzzed_chunked_bodies_around_the_limit(fuzzed):
    seen = collections.Counter()

    @SETTINGS
    @given(requests(), st.integers(1, 700))
    def one(request, chunk):
        path, headers, body = request
        pieces = [body[i:i + chunk] for i in range(0, len(body), chunk)]
        check(fuzzed.post(path, content=iter(pieces), headers=headers), seen)

    one()
    assert {200, 400, 401, 413} <= set(seen), seen


def test_a_fill_that_overflows_is_still_answered_in_strict_json(fuzzed):
    body = json.dumps({"symbol": "BTC/USDT", "action": "buy", "quantity": 1, "price": 1.797e308,
                       "confidence": 0.9, "time": "2099-01-01T00:00:00Z"}).encode()
    reply = fuzzed.post(content=body, headers={"X-Webhook-Signature": sign(body, SECRET)})
    assert reply.status_code == 200 and strict_json(reply.text)["results"][0]["average_price"] is None


def test_after_the_fuzz_the_daemon_still_takes_a_good_alert(fuzzed):
    body = json.dumps({"symbol": "BTC/USDT", "action": "buy", "quantity": 0.01, "confidence": 0.9,
                       "time": "2099-01-01T00:00:00Z", "id": os.urandom(4).hex()}).encode()
    reply = fuzzed.post(content=body, headers={"X-Webhook-Signature": sign(body, SECRET)})
    assert reply.status_code == 200 and reply.json()["results"][0]["status"] == "filled", reply.text
    with httpx.Client(base_url=fuzzed.url) as client:
        assert client.get("/health").json()["journal"]["healthy"] is True
