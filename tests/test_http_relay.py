"""The http relay plugin against a real receiver on a loopback port that checks the signature."""

import asyncio
import hashlib
import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvicorn
from binance_imitation import free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fksroute.plugins.base import OrderRequest, PluginContext
from fksroute.plugins.http import HttpPlugin, HttpSettings

SECRET = "relay-shared-secret"
ROOT = Path(__file__).parent.parent
ORDER = {"symbol": "BTC/USDT", "side": "buy", "type": "limit", "quantity": 0.01, "price": 60000.5}


@dataclass
class Receiver:
    """A service that accepts relayed orders, checking X-Webhook-Signature with the shared secret."""

    secret: str = SECRET
    port: int = field(default_factory=free_port)
    bodies: list[bytes] = field(default_factory=list)
    verified: list[bool] = field(default_factory=list)
    answers: list[tuple[int, object]] = field(default_factory=list)  # scripted, then the default answer
    hang: float = 0.0  # seconds to wait before the next answer

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/orders"

    async def orders(self, request: Request) -> Response:
        body = await request.body()
        expected = hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
        ok = hmac.compare_digest(request.headers.get("X-Webhook-Signature", ""), expected)
        self.bodies.append(body)
        self.verified.append(ok)
        if self.hang:
            hang, self.hang = self.hang, 0.0
            await asyncio.sleep(hang)
        if not ok:
            return JSONResponse({"success": False, "order_id": None, "error": "bad signature"}, 401)
        if self.answers:
            status, answer = self.answers.pop(0)
            return JSONResponse(answer, status) if isinstance(answer, dict) else Response(str(answer), status)
        order = json.loads(body)
        return JSONResponse({"success": True, "order_id": f"R-{order['client_order_id']}", "error": None})

    def __enter__(self) -> "Receiver":
        app = Starlette(routes=[Route("/orders", self.orders, methods=["POST"])])
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                     lifespan="off", timeout_graceful_shutdown=1))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        while not self._server.started:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(10)


@pytest.fixture
def receiver():
    with Receiver() as running:
        yield running


def relay(url, **overrides):
    settings = {"type": "http", "url": url, "secret": SECRET, "timeout": 0.5, "retries": 2, "retry_backoff": 0.05,
                **overrides}
    return HttpPlugin("relay", settings, PluginContext(ROOT, logging.getLogger("test.relay")))


def request(cid="fks-relay-1", order=ORDER):
    return OrderRequest(client_order_id=cid, alert_id="a-1", route="relay", plugin="relay", order=order)


def execute(plugin, *requests):
    async def scenario():
        await plugin.start()
        try:
            return [await plugin.execute(r) for r in requests], await plugin.health()
        finally:
            await plugin.close()
    return asyncio.run(scenario())


def test_the_signature_is_verified_by_a_receiver_with_the_same_secret(receiver):
    [result], _ = execute(relay(receiver.url), request())
    assert receiver.verified == [True]
    sent = json.loads(receiver.bodies[0])
    assert sent["client_order_id"] == "fks-relay-1"
    assert {k: sent[k] for k in ORDER} == ORDER
    assert (sent["action"], sent["order_type"]) == ("buy", "limit")  # what TradingView-style receivers read
    assert result.status == "placed" and result.order_id == "R-fks-relay-1" and result.error is None


def test_a_wrong_secret_is_refused_by_the_receiver_and_not_retried(receiver):
    [result], _ = execute(relay(receiver.url, secret="not-the-shared-secret"), request())
    assert receiver.verified == [False]
    assert result.status == "failed"
    assert "401" in result.error and "bad signature" in result.error
    assert "not-the-shared-secret" not in json.dumps(result._asdict())


def test_5xx_is_retried_with_the_very_same_body(receiver):
    receiver.answers = [(503, "busy"), (500, {"error": "boom"})]
    [result], health = execute(relay(receiver.url), request())
    assert len(receiver.bodies) == 3 and len(set(receiver.bodies)) == 1
    assert all(receiver.verified)
    assert result.status == "placed" and result.order_id == "R-fks-relay-1"
    assert result.detail["attempts"] == 3
    assert health["healthy"] is True


def test_5xx_until_the_end_fails_and_marks_the_relay_unhealthy_until_it_answers(receiver):
    receiver.answers = [(502, "down")] * 3
    (failed, recovered), _ = execute(relay(receiver.url), request("fks-a"), request("fks-b"))
    assert failed.status == "failed"
    assert "502" in failed.error and "after 3 attempts" in failed.error
    assert recovered.status == "placed"

    receiver.answers = [(502, "down")] * 3
    _, health = execute(relay(receiver.url), request("fks-c"))
    assert health["healthy"] is False and health["consecutive_failures"] == 1


def test_a_hanging_receiver_gets_the_same_body_again_after_the_timeout(receiver):
    receiver.hang = 1.0
    [result], _ = execute(relay(receiver.url, timeout=0.3), request())
    assert len(receiver.bodies) == 2 and receiver.bodies[0] == receiver.bodies[1]
    assert result.status == "placed"


def test_no_answer_at_all_leaves_the_outcome_unknown(receiver):
    receiver.hang = 2.0
    started = time.monotonic()
    [result], _ = execute(relay(receiver.url, timeout=0.3, retries=0), request())
    assert time.monotonic() - started < 1.5
    assert result.status == "unknown"


def test_an_unreachable_relay_fails_without_doubt():
    url = f"http://127.0.0.1:{free_port()}/orders?token=do-not-show"
    [result], health = execute(relay(url, retries=1), request())
    assert result.status == "failed"
    assert "cannot connect" in result.error
    assert "do-not-show" not in result.error and "do-not-show" not in json.dumps(health)
    assert health["healthy"] is False


@pytest.mark.parametrize("answer, status, filled, average", [
    ({"success": True, "order_id": 7, "status": "filled", "filled_quantity": 0.01, "average_price": 60001.0},
     "filled", 0.01, 60001.0),
    ({"success": True, "order_id": "x", "results": [{"status": "dry_run"}]}, "dry_run", None, None),
    ({"success": True, "order_id": "x", "status": "queued"}, "placed", None, None),
    ({"success": False, "order_id": None, "error": "Invalid action: hold"}, "failed", None, None),
])
def test_the_reply_decides_the_result(receiver, answer, status, filled, average):
    receiver.answers = [(200, answer)]
    [result], _ = execute(relay(receiver.url), request())
    assert (result.status, result.filled_quantity, result.average_price) == (status, filled, average)
    if status == "failed":
        assert "Invalid action: hold" in result.error
    else:
        assert result.order_id == str(answer["order_id"])


def test_relaying_to_another_fksroute_is_accepted_by_its_signature_check(daemon_factory, tmp_path):
    config = tmp_path / "routes.yaml"
    config.write_text("""\
version: 1
server: {journal: journal.sqlite}
security: {secret: "${env:TEST_RELAY_SECRET}"}
defaults: {alert_schema: tradingview.alert.schema.json}
plugins:
  paper: {type: paper, default_price: 100}
routes:
  - name: all
    to: paper
    order:
      symbol: "{{ alert.symbol }}"
      side: "{{ alert.action }}"
      type: "{{ alert.order_type }}"
      quantity: "{{ alert.quantity }}"
      price: "{{ alert.price | default(none) }}"
""")
    upstream = daemon_factory(config, env={"TEST_RELAY_SECRET": SECRET})
    url = upstream.url + "/webhook"
    [signed], _ = execute(relay(url), request("fks-up-1"))
    [unsigned], _ = execute(relay(url, secret="wrong"), request("fks-up-2"))
    assert signed.status in ("filled", "placed") and signed.order_id
    assert unsigned.status == "failed" and "401" in unsigned.error


def test_settings_defaults_are_the_schema_defaults():
    schema = json.loads((ROOT / "schemas" / "http.plugin.schema.json").read_text())
    settings = HttpSettings.from_mapping({"type": "http", "url": "http://127.0.0.1:1/"})
    for name in ("timeout", "retries", "retry_backoff", "retry_backoff_max", "order_timeout"):
        assert getattr(settings, name) == schema["properties"][name]["default"], name
