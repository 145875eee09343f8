"""The HTTP front: alerts reach the endpoint on every webhook path (with or without a token),
other methods get 405, unknown paths 404, and a client that leaves mid-body breaks nothing."""

import socket

import pytest

from fksroute.app import webhook_token
from serving import start_daemon, write_routes

ALERT = {"symbol": "BTC/USDT", "action": "buy", "quantity": 0.01}


@pytest.mark.parametrize("path, expected", [
    ("/webhook", (True, None)),
    ("/webhook/tradingview", (True, None)),
    ("/webhook/tradingview/s3cret", (True, "s3cret")),
    ("/webhook/s3cret", (True, "s3cret")),
    ("/webhook/", (False, None)),
    ("/webhook/tradingview/", (False, None)),
    ("/webhook/tradingview/a/b", (False, None)),
    ("/webhooks", (False, None)),
    ("/health", (False, None)),
])
def test_webhook_paths_are_the_routes_paths(path, expected):
    assert webhook_token(path) == expected


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    home = tmp_path_factory.mktemp("front")
    running = start_daemon(write_routes(home, """
        version: 1
        plugins: {paper: {type: paper}}
        routes: [{name: all, to: paper}]
    """))
    yield running
    running.stop()


def test_every_webhook_path_takes_alerts(daemon):
    for i, path in enumerate(["/webhook", "/webhook/tradingview", "/webhook/tradingview/t", "/webhook/t"]):
        r = daemon.post(path, json={**ALERT, "id": f"path-{i}"})
        assert r.status_code == 200 and r.json()["success"] is True, (path, r.text)
        assert r.headers["content-type"] == "application/json"
        assert int(r.headers["content-length"]) == len(r.content)


def test_other_methods_and_paths_are_refused_by_the_router(daemon):
    assert daemon.get("/webhook/tradingview").status_code == 405
    assert daemon.client.put("/webhook", json=ALERT).status_code == 405
    assert daemon.post("/webhook/tradingview/a/b", json=ALERT).status_code == 404


def test_a_client_that_leaves_mid_body_breaks_nothing(daemon):
    with socket.create_connection(("127.0.0.1", daemon.port)) as s:
        s.sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 500\r\n\r\n{\"symbol\": ")
    r = daemon.post(json={**ALERT, "id": "after-the-leaver"})
    assert r.status_code == 200 and r.json()["success"] is True
    assert "Traceback" not in daemon.logs()


def test_headers_of_a_refusal_reach_the_client(daemon):
    r = daemon.post(content=b"x" * 70000, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.headers["connection"] == "close"


def test_a_bug_in_the_alert_path_is_answered_500_with_the_contract_reply(caplog):
    import asyncio
    import json
    from types import SimpleNamespace

    from fksroute.app import _WebhookEndpoint
    from fksroute.metrics import Metrics

    class Broken:
        def admit(self, peer, headers):
            raise RuntimeError("a bug")

    endpoint = _WebhookEndpoint(SimpleNamespace(webhook=Broken(), metrics=Metrics()))
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/webhook", "headers": [], "client": ("127.0.0.1", 1)}
    asyncio.run(endpoint(scope, receive, send, None))
    assert sent[0]["status"] == 500
    assert json.loads(sent[1]["body"]) == {"success": False, "order_id": None, "error": "Internal error",
                                           "alert_id": None, "duplicate": False, "results": []}
    assert "webhook: unexpected error" in caplog.text and "RuntimeError: a bug" in caplog.text
