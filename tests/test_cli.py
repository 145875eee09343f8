"""The CLI through its real entry point: check, route, test, journal."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
ALERTS = Path(__file__).parent / "alerts"


def fks(*args, stdin=None, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "fksroute", *args], capture_output=True, text=True,
                          input=stdin, cwd=cwd, timeout=60)


def test_check_shipped_table():
    done = fks("check", "-c", "routes.yaml")
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout


def test_check_defaults_to_env_then_cwd(tmp_path):
    (tmp_path / "routes.yaml").write_text((ROOT / "routes.yaml").read_text())
    assert fks("check", cwd=tmp_path).returncode == 0


def test_check_reports_every_mistake_with_its_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("""\
version: 1
plugins:
  paper: {type: paper}
routes:
  - name: a
    to: missing
  - name: b
    to: paper
    match: {symbol: {regex: '[x'}}
    colour: red
""")
    done = fks("check", "-c", str(bad))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert [line.split(":")[1] for line in lines] == ["6", "9", "10"]
    assert all(line.startswith(str(bad)) for line in lines)
    as_json = fks("check", "-c", str(bad), "--format", "json")
    assert as_json.returncode == 1
    report = json.loads(as_json.stdout)
    assert report["ok"] is False
    assert [e["line"] for e in report["errors"]] == [6, 9, 10]


def test_check_json_ok():
    report = json.loads(fks("check", "-c", "routes.yaml", "--format", "json").stdout)
    assert report["ok"] is True and report["routes"] == ["paper-all"]


def test_route_on_the_shipped_table():
    done = fks("route", "-c", "routes.yaml", f"@{ALERTS / 'seed-sell-limit-sl-tp.json'}")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["routes"] == ["paper-all"]
    order = out["orders"][0]["order"]
    assert order == {"symbol": "ETH/USDT", "side": "sell", "type": "limit", "quantity": 0.5, "price": 3500.0,
                     "stop_loss": 3600.0, "take_profit": 3400.0, "confidence": 0.75}


def test_route_from_stdin_and_rejections():
    done = fks("route", "-c", "routes.yaml", "-", stdin=(ALERTS / "seed-invalid-action.json").read_text())
    assert done.returncode == 1
    out = json.loads(done.stdout)
    assert out["status"] == 400 and out["error"] == "Invalid action: invalid_action"
    done = fks("route", "-c", "routes.yaml", '{"symbol": "BTC/USDT", "action": "buy"}')
    assert json.loads(done.stdout)["status"] == 422


def test_route_by_regex_number_and_continue():
    table = "examples/routes.advanced.yaml"
    out = json.loads(fks("route", "-c", table, '{"symbol": "SOL/USDT", "action": "buy", "quantity": "3"}').stdout)
    assert out["routes"] == ["audit-everything", "large-crypto"]
    out = json.loads(fks("route", "-c", table, '{"symbol": "SOL/USDT", "action": "buy", "quantity": 0.5}').stdout)
    assert out["routes"] == ["audit-everything", "crypto"]
    assert out["orders"][1]["order"]["quantity"] == 0.5


def test_route_plain_text_alert():
    out = json.loads(fks("route", "-c", "examples/routes.advanced.yaml", "BTC is up").stdout)
    assert out["alert"] == {"message": "BTC is up"}


def test_test_command_passes_on_examples():
    done = fks("test", "examples/routes.cases.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 passed, 0 failed" in done.stdout
    done = fks("test", "-c", "examples/routes.advanced.yaml", "examples/routes.advanced.cases.yaml")
    assert done.returncode == 0, done.stdout
    assert done.stdout.count("PASS") == 5


def test_test_command_fails_with_reasons(tmp_path):
    cases = tmp_path / "cases.yaml"
    cases.write_text("""\
cases:
  - name: wrong route
    alert: {symbol: BTC/USDT, action: buy, quantity: 1}
    expect: {routes: [nope]}
  - name: wrong field
    alert: {symbol: BTC/USDT, action: buy, quantity: 1}
    expect: {orders: [{side: sell}]}
  - name: right
    alert: {symbol: BTC/USDT, action: buy, quantity: 1}
    expect: {routes: [paper-all]}
""")
    done = fks("test", "-c", "routes.yaml", str(cases))
    assert done.returncode == 1
    assert "FAIL wrong route" in done.stdout and "routes: expected ['nope'], got ['paper-all']" in done.stdout
    assert "orders[0].side: expected 'sell', got 'buy'" in done.stdout
    assert "PASS right" in done.stdout
    assert "1 passed, 2 failed" in done.stdout


def test_test_command_bad_cases_file(tmp_path):
    cases = tmp_path / "cases.yaml"
    cases.write_text("just text")
    assert fks("test", "-c", "routes.yaml", str(cases)).returncode == 1
    assert fks("test", "-c", "routes.yaml", str(tmp_path / "absent.yaml")).returncode == 1


def test_journal_without_a_journal(tmp_path):
    (tmp_path / "routes.yaml").write_text((ROOT / "routes.yaml").read_text())
    done = fks("journal", cwd=tmp_path)
    assert done.returncode == 1 and "no journal" in done.stderr


def test_python_dash_m_and_console_script_agree():
    script = Path(sys.executable).parent / "fksroute"
    done = subprocess.run([str(script), "check", "-c", "routes.yaml"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and "OK" in done.stdout
