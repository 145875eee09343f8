"""The door: secrets, addresses, trusted proxies, the rate limit and the body size limit.

Unit tests of fksroute.security, then the same rules against real `fksroute serve` processes.
"""

import ipaddress
import json
import os
import secrets
import socket
import subprocess
import sys

import pytest

from fksroute import config
from fksroute.security import (Credentials, RateLimiter, address_allowed, authenticate, client_address, redact,
                               sign, strip_secret)
from serving import metric, read_ledger, write_routes

ALERT = {"symbol": "BTC/USDT", "action": "buy", "order_type": "market", "quantity": 0.01}
UNAUTHORIZED = "Unauthorized: missing or wrong secret"


def nets(*names):
    return tuple(ipaddress.ip_network(n) for n in names)


# --- client_address ---------------------------------------------------------------------------

PROXIES = nets("127.0.0.1/32", "10.0.0.0/8")


@pytest.mark.parametrize("peer, forwarded, expected", [
    ("203.0.113.9", None, "203.0.113.9"),                              # no header: the peer
    ("203.0.113.9", "198.51.100.1", "203.0.113.9"),                    # untrusted peer: header ignored
    ("127.0.0.1", "198.51.100.1", "198.51.100.1"),                     # trusted proxy: believed
    ("127.0.0.1", "1.1.1.1, 198.51.100.1", "198.51.100.1"),            # the hop the proxy saw, not a forged one
    ("127.0.0.1", "198.51.100.1, 10.1.2.3", "198.51.100.1"),           # through two trusted proxies
    ("127.0.0.1", "198.51.100.1,10.1.2.3 ,10.9.9.9", "198.51.100.1"),
    ("127.0.0.1", "10.1.2.3, 10.9.9.9", "10.1.2.3"),                   # every hop trusted: the first
    ("127.0.0.1", "garbage", "127.0.0.1"),                             # unreadable: stop at the proxy
    ("127.0.0.1", "198.51.100.1, garbage, 10.1.2.3", "10.1.2.3"),      # stop at the last trusted hop
    ("127.0.0.1", "198.51.100.1:4711", "127.0.0.1"),                   # a port is not an address
    ("127.0.0.1", "", "127.0.0.1"),
    ("127.0.0.1", " , ,", "127.0.0.1"),
    ("127.0.0.1", "[2001:db8::1]", "2001:db8::1"),
    ("::ffff:127.0.0.1", "198.51.100.1", "198.51.100.1"),              # IPv4 peer on a dual-stack socket
    ("::ffff:203.0.113.9", None, "203.0.113.9"),
    ("::1", "198.51.100.1", "::1"),                                    # ::1 is not 127.0.0.1
    (None, "198.51.100.1", None),
    ("not-an-address", "198.51.100.1", None),
])
def test_client_address(peer, forwarded, expected):
    assert client_address(peer, forwarded, PROXIES) == expected


def test_client_address_without_trusted_proxies_is_always_the_peer():
    assert client_address("127.0.0.1", "198.51.100.1", ()) == "127.0.0.1"


@pytest.mark.parametrize("address, allowed", [
    ("52.89.214.238", True), ("34.212.75.30", True), ("54.218.53.128", True), ("52.32.178.7", True),
    ("52.89.214.239", False), ("127.0.0.1", False), ("203.0.113.77", True), ("203.0.114.1", False),
    ("2001:db8::5", True), ("2001:db9::5", False), (None, False), ("junk", False),
])
def test_allow_list_with_the_tradingview_preset_and_cidrs(tmp_path, address, allowed):
    table = config.load_file(write_routes(tmp_path, """
        version: 1
        security: {allow_ips: [tradingview, 203.0.113.0/24, "2001:db8::/32"]}
        plugins: {paper: {type: paper}}
        routes: [{name: all, to: paper}]
    """))
    assert address_allowed(address, table.security.allow_ips) is allowed


def test_an_empty_allow_list_admits_everyone():
    assert address_allowed("198.51.100.1", ()) and address_allowed(None, ())


def test_an_unknown_allow_list_entry_is_a_located_error(tmp_path):
    errors = config.load_file(write_routes(tmp_path, """
        version: 1
        security: {allow_ips: [tradingvue]}
        plugins: {paper: {type: paper}}
        routes: [{name: all, to: paper}]
    """))
    assert isinstance(errors, list) and "tradingvue" in str(errors[0]) and errors[0].line == 3


# --- rate limit -------------------------------------------------------------------------------

def test_rate_limiter_gives_the_burst_then_refills_at_the_rate():
    limiter = RateLimiter(per_minute=60, burst=3)
    assert [limiter.take("a", now=100.0) for _ in range(3)] == [0, 0, 0]
    assert limiter.take("a", now=100.0) == pytest.approx(1.0)     # one token a second
    assert limiter.take("b", now=100.0) == 0                      # every source has its own bucket
    assert limiter.take("a", now=100.5) == pytest.approx(0.5)
    assert limiter.take("a", now=101.0) == 0
    assert limiter.take("a", now=1000.0) == 0 and limiter.take("a", now=1000.0) == 0
    assert limiter.take("a", now=1000.0) == 0 and limiter.take("a", now=1000.0) > 0  # never above the burst


def test_rate_limiter_forgets_the_longest_idle_source_first():
    limiter = RateLimiter(per_minute=60, burst=1, max_sources=2)
    limiter.take("a", now=0.0)
    limiter.take("b", now=0.0)
    limiter.take("c", now=0.0)                # "a" is forgotten, and starts again with a full bucket
    assert limiter.take("a", now=0.0) == 0
    assert limiter.take("c", now=0.0) > 0


# --- secrets ----------------------------------------------------------------------------------

BODY = b'{"symbol":"X","action":"buy","quantity":1}'


@pytest.mark.parametrize("offered, ok", [
    (Credentials(passphrase="s3cret"), True),
    (Credentials(passphrase="s3cret "), False),
    (Credentials(passphrase="S3CRET"), False),
    (Credentials(passphrase=None), False),
    (Credentials(passphrase=12345), False),
    (Credentials(passphrase=["s3cret"]), False),
    (Credentials(signature=sign(BODY, "s3cret")), True),
    (Credentials(signature=sign(BODY, "s3cret").upper()), True),
    (Credentials(signature=" " + sign(BODY, "s3cret") + " "), True),
    (Credentials(signature=sign(BODY + b" ", "s3cret")), False),
    (Credentials(signature=sign(BODY, "other")), False),
    (Credentials(signature="not hex at all \u00e9"), False),
    (Credentials(signature=""), False),
    # A signature, once offered, is the proof: a right passphrase does not rescue a wrong one.
    (Credentials(signature=sign(BODY, "other"), passphrase="s3cret"), False),
    (Credentials(path_token="t0ken"), True),
    (Credentials(path_token="t0ken2"), False),
    (Credentials(path_token="t0ke"), False),
])
def test_authenticate(offered, ok):
    assert authenticate(BODY, offered, "s3cret", "t0ken") is ok


def test_without_a_secret_everyone_is_let_in_and_a_path_token_alone_is_enforced():
    assert authenticate(BODY, Credentials(), None, None)
    assert not authenticate(BODY, Credentials(passphrase="x"), None, "t0ken")
    assert authenticate(BODY, Credentials(path_token="t0ken"), None, "t0ken")


def test_strip_and_redact():
    assert strip_secret({"passphrase": "p", "a": 1}) == {"a": 1}
    assert redact('{"note":"my s3cret here"}', (None, "", "s3cret")) == '{"note":"my *** here"}'


# --- end to end: secrets ------------------------------------------------------------------------

SECURED = """
    version: 1
    security:
      secret: ${env:FKS_TEST_SECRET}
      path_token: ${env:FKS_TEST_TOKEN}
    plugins:
      paper: {type: paper, ledger: fills.jsonl}
    routes:
      - name: all
        to: paper
"""


def test_secrets_are_enforced_and_never_stored_logged_or_answered(tmp_path, daemon_factory):
    secret, token = "pw-" + secrets.token_hex(12), "tk-" + secrets.token_hex(12)
    daemon = daemon_factory(write_routes(tmp_path, SECURED), env={"FKS_TEST_SECRET": secret, "FKS_TEST_TOKEN": token})
    replies = []

    def post(path="/webhook/tradingview", **kwargs):
        r = daemon.post(path, **kwargs)
        replies.append(r)
        return r

    def alert(n, **extra):
        return {**ALERT, "id": f"a{n}", **extra}

    refused = [
        post(json=alert(1)),                                                  # no passphrase
        post(json=alert(2, passphrase="wrong")),
        post(json=alert(3, passphrase=secret[:-1])),
        post(json=alert(4, passphrase={"nested": secret})),                  # not a string
        post(content=json.dumps(alert(5)), headers={"X-Webhook-Signature": sign(b"other", secret)}),
        post(content=json.dumps(alert(6)), headers={"X-Webhook-Signature": sign(json.dumps(alert(6)).encode(), "x")}),
        post(content=b"{not json", headers={"Content-Type": "application/json"}),   # unparsable: still 401
        post("/webhook/tradingview/wrong-token", json=alert(7)),
        post(content=f"plain text that pastes {secret} in a message", headers={"Content-Type": "text/plain"}),
    ]
    for r in refused:
        assert r.status_code == 401, r.text
        assert r.json() == {"success": False, "order_id": None, "error": UNAUTHORIZED, "alert_id": None,
                            "duplicate": False, "results": []}

    body = json.dumps(alert(20)).encode()
    accepted = [
        post(json=alert(10, passphrase=secret)),
        post("/webhook", json=alert(11, passphrase=secret)),
        post(content=body, headers={"X-Webhook-Signature": sign(body, secret), "Content-Type": "application/json"}),
        post(f"/webhook/tradingview/{token}", json=alert(12)),
        post(f"/webhook/tradingview/{token}", content=b"ES1! crossed", headers={"Content-Type": "text/plain"}),
    ]
    for r in accepted[:4]:
        assert r.status_code == 200 and r.json()["success"] is True and r.json()["results"][0]["status"] == "filled"
    # Authenticated, but a text message is no order: refused by the order schema, not by the door.
    assert accepted[4].status_code == 422

    # `fksroute send` signs (--hmac) or adds the passphrase (--secret), as documented.
    for n, flags in ((30, ["--hmac"]), (31, [])):
        sent = subprocess.run([sys.executable, "-m", "fksroute", "send", f"{daemon.url}/webhook/tradingview",
                               json.dumps(alert(n)), "--secret", secret, *flags],
                              capture_output=True, text=True, timeout=30)
        assert sent.returncode == 0 and sent.stdout.startswith("HTTP 200"), sent.stdout + sent.stderr
        assert secret not in sent.stdout + sent.stderr
    sent = subprocess.run([sys.executable, "-m", "fksroute", "send", f"{daemon.url}/webhook/tradingview",
                           json.dumps(alert(32)), "--secret", "wrong", "--hmac"], capture_output=True, text=True,
                          timeout=30)
    assert sent.returncode == 1 and sent.stdout.startswith("HTTP 401")

    assert len(read_ledger(tmp_path / "fills.jsonl")) == 6    # 4 accepted above and 2 sent by the CLI
    metrics = daemon.get("/metrics").text
    assert metric(metrics, "fksroute_alerts_received_total", outcome="rejected_auth") == len(refused) + 1

    listing = subprocess.run([sys.executable, "-m", "fksroute", "journal", "-c", str(tmp_path / "routes.yaml"),
                              "--limit", "100"], capture_output=True, text=True, timeout=30,
                             env={**os.environ, "FKS_TEST_SECRET": secret, "FKS_TEST_TOKEN": token})
    assert listing.returncode == 0 and listing.stdout.count("rejected (auth) HTTP 401") == len(refused) + 1

    # Nowhere: not in the journal (the file and its write-ahead log), the log, a reply, the CLI.
    journal = (tmp_path / "journal.sqlite").read_bytes() + (tmp_path / "journal.sqlite-wal").read_bytes()
    assert b'"id":"a10"' in journal and b'"id":"a1"' in journal       # it is the journal that holds them
    assert b"passphrase" not in journal                                  # removed, not merely masked
    for where, text in (("journal", journal), ("log", daemon.logs().encode()),
                        ("replies", b"".join(r.content for r in replies)), ("listing", listing.stdout.encode())):
        assert secret.encode() not in text, where
        assert token.encode() not in text, where
    daemon.stop()
    journal = b"".join(p.read_bytes() for p in tmp_path.glob("journal.sqlite*"))
    assert b'"id":"a10"' in journal and secret.encode() not in journal and token.encode() not in journal


# --- end to end: addresses and rate ------------------------------------------------------------

def test_the_tradingview_preset_refuses_loopback_and_believes_only_a_trusted_proxy(tmp_path, daemon_factory):
    daemon = daemon_factory(write_routes(tmp_path, """
        version: 1
        security:
          allow_ips: [tradingview]
          trusted_proxies: [127.0.0.1/32]
        plugins: {paper: {type: paper}}
        routes: [{name: all, to: paper}]
    """))
    r = daemon.post(json=ALERT)
    assert r.status_code == 403 and r.json()["error"] == "Forbidden: address 127.0.0.1 is not allowed"
    assert daemon.post(json=ALERT, headers={"X-Forwarded-For": "52.89.214.238"}).status_code == 200
    # What the proxy saw is the last hop; a client cannot forge its way in from the left.
    assert daemon.post(json={**ALERT, "id": "2"},
                       headers={"X-Forwarded-For": "9.9.9.9, 34.212.75.30"}).status_code == 200
    for forwarded in ("52.89.214.238, 198.51.100.1", "198.51.100.1", "garbage", ""):
        assert daemon.post(json=ALERT, headers={"X-Forwarded-For": forwarded}).status_code == 403, forwarded
    metrics = daemon.get("/metrics").text
    assert metric(metrics, "fksroute_alerts_received_total", outcome="rejected_address") == 5


def test_forwarded_for_from_an_untrusted_peer_is_ignored(tmp_path, daemon_factory):
    daemon = daemon_factory(write_routes(tmp_path, """
        version: 1
        security: {allow_ips: [203.0.113.0/24, "::1/128"]}
        plugins: {paper: {type: paper, ledger: fills.jsonl}}
        routes: [{name: all, to: paper}]
    """))
    r = daemon.post(json=ALERT, headers={"X-Forwarded-For": "203.0.113.5"})
    assert r.status_code == 403 and "127.0.0.1" in r.json()["error"]
    assert read_ledger(tmp_path / "fills.jsonl") == []


def test_rate_limit_answers_429_with_retry_after_per_source(tmp_path, daemon_factory):
    daemon = daemon_factory(write_routes(tmp_path, """
        version: 1
        security:
          allow_ips: [127.0.0.0/8, 203.0.113.0/24]
          trusted_proxies: [127.0.0.1/32]
          rate_limit: {per_minute: 6, burst: 3}
        plugins: {paper: {type: paper}}
        routes: [{name: all, to: paper}]
    """))
    first = {"X-Forwarded-For": "203.0.113.1"}
    codes = [daemon.post(json={**ALERT, "id": str(i)}, headers=first).status_code for i in range(3)]
    assert codes == [200, 200, 200]
    limited = daemon.post(json={**ALERT, "id": "4"}, headers=first)
    assert limited.status_code == 429 and limited.json()["error"] == "Too many requests"
    assert 1 <= int(limited.headers["Retry-After"]) <= 10     # a token every 10 s
    assert daemon.post(json={**ALERT, "id": "5"}, headers={"X-Forwarded-For": "203.0.113.2"}).status_code == 200
    assert daemon.post(json={**ALERT, "id": "6"}).status_code == 200        # 127.0.0.1 itself
    metrics = daemon.get("/metrics").text
    assert metric(metrics, "fksroute_alerts_received_total", outcome="rejected_rate") == 1
    assert metric(metrics, "fksroute_alerts_received_total", outcome="accepted") == 5


# --- end to end: body size -------------------------------------------------------------------

LIMIT = 1024


@pytest.fixture(scope="module")
def small_door(tmp_path_factory):
    from serving import start_daemon

    home = tmp_path_factory.mktemp("door")
    daemon = start_daemon(write_routes(home, f"""
        version: 1
        security: {{max_body_bytes: {LIMIT}}}
        unmatched: drop
        plugins: {{paper: {{type: paper}}}}
        routes: [{{name: all, to: paper, match: {{symbol: X}}}}]
    """))
    yield daemon
    daemon.stop()


def padded(size):
    """A JSON alert of exactly `size` bytes."""
    head = b'{"symbol":"Y","pad":"'
    return head + b"x" * (size - len(head) - 2) + b'"}'


def test_a_body_at_the_limit_is_read_and_one_byte_more_is_413(small_door):
    assert small_door.post(content=padded(LIMIT), headers={"Content-Type": "application/json"}).status_code == 200
    r = small_door.post(content=padded(LIMIT + 1), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == f"Body larger than {LIMIT} bytes"


def test_a_chunked_body_over_the_limit_is_413(small_door):
    def chunks():
        for _ in range(50):
            yield b"x" * 100

    r = small_door.post(content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert small_door.post(content=iter([padded(LIMIT)]), headers={"Content-Type": "application/json"}).status_code == 200


def raw_request(port, head, body=b""):
    """Send a request that is never finished and return the status line of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(head + body)
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = s.recv(4096)
            if not data:
                break
            answer += data
    return answer.split(b"\r\n", 1)[0], answer


@pytest.mark.parametrize("framing, body", [
    (b"Content-Length: 100000000", b"x" * 10),                            # declared too large: nothing read
    (b"Transfer-Encoding: chunked", b"%x\r\n" % (LIMIT + 1) + b"x" * (LIMIT + 1) + b"\r\n"),  # never terminated
])
def test_a_large_body_is_refused_before_it_is_read_whole(small_door, framing, body):
    head = b"POST /webhook/tradingview HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n" + framing + b"\r\n\r\n"
    status, answer = raw_request(small_door.port, head, body)
    assert status == b"HTTP/1.1 413 Request Entity Too Large"
    assert b"connection: close" in answer.lower()
    assert small_door.get("/-/healthy").status_code == 200
    assert metric(small_door.get("/metrics").text, "fksroute_alerts_received_total", outcome="rejected_too_large") >= 1
