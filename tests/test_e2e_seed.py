"""The five sample alerts against a real `fksroute serve` on the shipped table."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
ALERTS = Path(__file__).parent / "alerts"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from serving import start_daemon

    home = tmp_path_factory.mktemp("seed")
    shutil.copy(ROOT / "routes.yaml", home / "routes.yaml")
    daemon = start_daemon(home / "routes.yaml")
    yield daemon
    daemon.stop()


def post_file(daemon, name, path="/webhook/tradingview"):
    body = (ALERTS / name).read_bytes()
    return daemon.post(path, content=body, headers={"Content-Type": "application/json"})


def test_buy_market(served):
    r = post_file(served, "seed-buy-market.json")
    assert r.status_code == 200
    body = r.json()
    assert body["success"] is True and body["order_id"] and body["error"] is None
    assert body["duplicate"] is False and body["alert_id"]
    result = body["results"][0]
    assert result["route"] == "paper-all" and result["plugin"] == "paper" and result["status"] == "filled"
    assert result["order_id"] == body["order_id"]
    # 5 bps of slippage against the buyer on the simulated price.
    assert result["average_price"] > 0 and result["filled_quantity"] == 0.01


def test_sell_limit_with_sl_tp(served):
    r = post_file(served, "seed-sell-limit-sl-tp.json", "/webhook")
    assert r.status_code == 200
    body = r.json()
    assert body["success"] is True and body["order_id"]
    order = body["results"][0]["order"]
    assert order["stop_loss"] == 3600.0 and order["take_profit"] == 3400.0 and order["price"] == 3500.0
    attached = {a["type"]: a for a in body["results"][0]["detail"]["attached"]}
    assert attached["stop_loss"]["trigger_price"] == 3600.0 and attached["take_profit"]["trigger_price"] == 3400.0
    assert body["results"][0]["average_price"] >= 3500.0  # a sell limit fills at the limit or better


def test_minimal_gets_defaults(served):
    r = post_file(served, "seed-minimal.json")
    assert r.status_code == 200
    body = r.json()
    assert body["success"] is True
    order = body["results"][0]["order"]
    assert order["type"] == "market" and order["confidence"] == 0.7


def test_invalid_action(served):
    r = post_file(served, "seed-invalid-action.json")
    assert r.status_code == 400
    assert r.json()["success"] is False
    assert r.json()["error"] == "Invalid action: invalid_action"


def test_missing_quantity(served):
    r = post_file(served, "seed-missing-quantity.json")
    assert r.status_code == 422
    assert r.json()["success"] is False
    assert "quantity" in r.json()["error"]


def test_plain_text_body_is_a_message(served):
    r = served.post(content=b"BTCUSDT crossed up", headers={"Content-Type": "text/plain"})
    assert r.status_code == 422  # the shipped table has no route for a bare message
    assert "symbol" in r.json()["error"] or "route" in r.json()["error"]


def test_unparsable_json_is_400(served):
    r = served.post(content=b'{"symbol": ', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"].startswith("Unparsable body")


def test_low_confidence_is_skipped(served):
    alert = {"symbol": "BTC/USDT", "action": "buy", "quantity": 0.01, "confidence": 0.1}
    body = served.post(json=alert).json()
    assert body["success"] is True and body["results"][0]["status"] == "skipped"
    assert "min_confidence" in body["results"][0]["reason"]


def test_template_text_in_alert_is_data(served):
    alert = {"symbol": "{{ 7*7 }}", "action": "buy", "quantity": 1}
    body = served.post(json=alert).json()
    assert body["results"][0]["order"]["symbol"] == "{{ 7*7 }}"


def test_body_over_limit_is_413(served):
    r = served.post(content=b"x" * 70000, headers={"Content-Type": "text/plain"})
    assert r.status_code == 413


def test_health_routes_metrics_probes(served):
    health = served.get("/health").json()
    assert health["status"] == "ok"
    assert health["plugins"]["paper"]["healthy"] is True
    assert set(health["config"]) >= {"version", "generation", "loaded_at", "last_reload_ok", "last_error"}
    assert served.get("/-/healthy").status_code == 200
    assert served.get("/-/ready").status_code == 200
    routes = served.get("/routes").json()
    assert routes["version"] == health["config"]["version"]
    assert [r["name"] for r in routes["routes"]] == ["paper-all"]
    metrics = served.get("/metrics").text
    assert 'fksroute_alerts_received_total{outcome="accepted"}' in metrics
    assert 'fksroute_route_matches_total{route="paper-all"}' in metrics
    assert 'fksroute_orders_total{plugin="paper",status="filled"}' in metrics
    assert "fksroute_webhook_latency_seconds_bucket" in metrics


def test_journal_records_every_alert(served):
    alert = {"symbol": "SOL/USDT", "action": "sell", "quantity": 2, "id": "journal-check"}
    reply = served.post(json=alert).json()
    done = subprocess.run([sys.executable, "-m", "fksroute", "journal", "-c", str(served.config), "--format", "json",
                           "--alert", reply["alert_id"]], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    entry = json.loads(done.stdout)[0]
    assert entry["outcome"] == "accepted" and json.loads(entry["body"])["id"] == "journal-check"
    assert entry["orders"][0]["status"] == "filled"
    text = subprocess.run([sys.executable, "-m", "fksroute", "journal", "-c", str(served.config)],
                          capture_output=True, text=True, timeout=30).stdout
    assert reply["alert_id"] in text and "rejected (invalid)" in text
