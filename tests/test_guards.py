"""Guards a trader expects: max_age (stale alerts), enabled: false, schedule, limits and
min_confidence; each outcome journaled, counted by reason in /metrics and shown by `fksroute journal`."""

import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from fksroute import config
from fksroute.plan import parse_time, plan_alert
from serving import metric, read_ledger, start_daemon, write_routes

ALERT = {"symbol": "BTC/USDT", "action": "buy", "order_type": "market", "quantity": 0.5}
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def timenow(seconds_ago=0.0):
    """TradingView's {{timenow}}: UTC, yyyy-MM-ddTHH:mm:ssZ."""
    return (datetime.now(timezone.utc) - timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def guarded_routes():
    new_york = datetime.now(ZoneInfo("America/New_York"))
    hour = new_york.hour
    around_now = f"{(hour - 1) % 24:02d}:00-{(hour + 2) % 24:02d}:00"
    not_now = f"{(hour + 3) % 24:02d}:00-{(hour + 5) % 24:02d}:00"
    today = datetime.now(timezone.utc).weekday()
    other_days = [d for i, d in enumerate(DAYS) if i not in (today, (today + 1) % 7)]
    return f"""
        version: 1
        plugins:
          paper: {{type: paper, ledger: fills.jsonl}}
        routes:
          - {{name: fresh-only, match: {{kind: timed}}, max_age: 30s, time_field: fired, to: paper}}
          - {{name: switched-off, match: {{kind: switched}}, enabled: false, to: paper}}
          - name: trading-hours
            match: {{kind: open}}
            schedule: {{timezone: America/New_York, hours: "{around_now}"}}
            to: paper
          - name: after-hours
            match: {{kind: closed}}
            schedule: {{timezone: America/New_York, days: [{", ".join(DAYS)}], hours: "{not_now}"}}
            to: paper
          - name: other-days
            match: {{kind: weekday}}
            schedule: {{days: [{", ".join(other_days)}]}}
            to: paper
          - {{name: sized, match: {{kind: sized}}, limits: {{max_quantity: 1, max_notional: 1000}}, to: paper}}
          - {{name: confident, match: {{kind: confident}}, min_confidence: 0.6, to: paper}}
    """


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    home = tmp_path_factory.mktemp("guards")
    daemon = start_daemon(write_routes(home, guarded_routes()))
    daemon.home = home
    yield daemon
    daemon.stop()


def send(daemon, kind, **fields):
    return daemon.post(json={**ALERT, "kind": kind, **fields})


def skipped(reply, reason):
    body = reply.json()
    assert reply.status_code == 200 and body["success"] is True, reply.text
    assert [r["status"] for r in body["results"]] == ["skipped"]
    assert reason in body["results"][0]["reason"], body["results"][0]["reason"]
    return body


def filled(reply):
    assert reply.status_code == 200 and reply.json()["results"][0]["status"] == "filled", reply.text
    return reply.json()


def test_guards_end_to_end(guarded):
    d = guarded
    # max_age against TradingView's {{timenow}}, epoch milliseconds, and a missing time.
    filled(send(d, "timed", fired=timenow()))
    filled(send(d, "timed", fired=int(time.time() * 1000)))
    skipped(send(d, "timed", fired=timenow(120)), "stale: 12")
    skipped(send(d, "timed", fired="yesterday-ish"), "stale: no readable time in field 'fired'")
    skipped(send(d, "timed"), "stale: no readable time")
    # The kill switch of one route.
    skipped(send(d, "switched"), "route disabled (enabled: false)")
    # Trading windows.
    filled(send(d, "open"))
    skipped(send(d, "closed"), "outside schedule (America/New_York")
    skipped(send(d, "weekday"), "outside schedule (UTC")
    # Limits refuse the alert whole.
    filled(send(d, "sized", order_type="limit", price=100.0))
    for fields, error in (({"quantity": 2}, "quantity 2 exceeds max_quantity 1 of route sized"),
                          ({"order_type": "limit", "price": 3000.0}, "notional 1500 exceeds max_notional 1000"),
                          ({}, "route sized has max_notional but the order has no price")):
        r = send(d, "sized", **fields)
        assert r.status_code == 422 and r.json()["success"] is False and error in r.json()["error"], r.text
    schema = send(d, "sized", order_type="limit")                    # a limit order needs a price
    assert schema.status_code == 422 and "invalid order" in schema.json()["error"] and "price" in schema.text
    skipped(send(d, "confident", confidence=0.5), "confidence 0.5 below min_confidence 0.6")
    filled(send(d, "confident", confidence=0.9))

    assert len(read_ledger(d.home / "fills.jsonl")) == 5            # only what was filled above
    metrics = d.get("/metrics").text
    counts = {outcome: metric(metrics, "fksroute_alerts_received_total", outcome=outcome)
              for outcome in ("accepted", "skipped_stale", "skipped_disabled", "skipped_schedule",
                              "skipped_confidence", "rejected_limits", "rejected_schema")}
    assert counts == {"accepted": 5, "skipped_stale": 3, "skipped_disabled": 1, "skipped_schedule": 2,
                      "skipped_confidence": 1, "rejected_limits": 3, "rejected_schema": 1}

    listing = subprocess.run([sys.executable, "-m", "fksroute", "journal", "-c", str(d.home / "routes.yaml"),
                              "--limit", "100"], capture_output=True, text=True, timeout=30)
    assert listing.returncode == 0, listing.stderr
    out = listing.stdout
    assert out.count(": skipped (stale) HTTP 200") == 3 and out.count(": skipped (schedule) HTTP 200") == 2
    assert out.count(": skipped (disabled) HTTP 200") == 1 and out.count(": skipped (confidence) HTTP 200") == 1
    assert out.count(": rejected (limits) HTTP 422") == 3 and out.count(": accepted HTTP 200") == 5
    assert out.count(": rejected (schema) HTTP 422") == 1
    assert "error: quantity 2 exceeds max_quantity 1 of route sized" in out
    assert "fresh-only -> paper: skipped" in out and "(stale: 12" in out
    assert "switched-off -> paper: skipped" in out and "(route disabled (enabled: false))" in out


def test_the_top_level_kill_switch_is_hot_reloaded(tmp_path):
    text = """
        version: 1
        enabled: true
        plugins: {paper: {type: paper, ledger: fills.jsonl}}
        routes: [{name: all, to: paper}]
    """
    routes = write_routes(tmp_path, text)
    daemon = start_daemon(routes)
    try:
        filled(daemon.post(json=ALERT))
        write_routes(tmp_path, text.replace("enabled: true", "enabled: false"))
        reload = daemon.post("/-/reload")
        assert reload.status_code == 200 and reload.json()["ok"] is True, reload.text
        off = skipped(daemon.post(json={**ALERT, "quantity": 0.6}), "fksroute disabled (enabled: false)")
        assert off["results"][0]["route"] == "all"
        metrics = daemon.get("/metrics").text
    finally:
        daemon.stop()
    assert len(read_ledger(tmp_path / "fills.jsonl")) == 1
    assert metric(metrics, "fksroute_alerts_received_total", outcome="skipped_disabled") == 1


# --- the planner, for the edges that HTTP does not reach easily -------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("2026-03-01T12:00:00Z", datetime(2026, 3, 1, 12, tzinfo=timezone.utc)),
    ("2026-03-01T13:00:00+01:00", datetime(2026, 3, 1, 12, tzinfo=timezone.utc)),
    ("2026-03-01T12:00:00", datetime(2026, 3, 1, 12, tzinfo=timezone.utc)),
    (1772366400, datetime(2026, 3, 1, 12, tzinfo=timezone.utc)),
    (1772366400000, datetime(2026, 3, 1, 12, tzinfo=timezone.utc)),
    ("1772366400", datetime(2026, 3, 1, 12, tzinfo=timezone.utc)),
    (1e300, None), (float("inf"), None), ("nan", None), ("", None), ("soon", None), (None, None), (True, None),
])
def test_parse_time(value, expected):
    assert parse_time(value) == expected


def test_a_window_across_midnight_and_its_days(tmp_path):
    table = config.load_file(write_routes(tmp_path, """
        version: 1
        plugins: {paper: {type: paper}}
        routes:
          - name: night
            schedule: {timezone: UTC, days: [fri], hours: "22:00-02:00"}
            to: paper
    """))
    alert = {"symbol": "X", "action": "buy", "quantity": 1}

    def status(when):
        return plan_alert(table, alert, now=when).orders[0].status

    friday = datetime(2026, 3, 6, tzinfo=timezone.utc)            # a Friday
    assert status(friday.replace(hour=23)) == "ready"
    assert status(friday.replace(hour=1, minute=59)) == "ready"
    assert status(friday.replace(hour=2)) == "skipped"             # the end is not inside
    assert status(friday.replace(hour=12)) == "skipped"
    assert status(friday.replace(hour=23) + timedelta(days=1)) == "skipped"    # Saturday
