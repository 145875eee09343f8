"""A TradingView alert through a real `fksroute serve` to a real NinjaTrader agent, and the fill back to the journal."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from agent_support import free_port, make_certs, spawn_agent

ROUTES = """\
version: 1
server:
  journal: journal.sqlite
plugins:
  ninja:
    type: ninjatrader
    account: Sim101
    agent: {{host: 127.0.0.1, port: {port}, ca: certs/ca.pem, cert: certs/daemon.pem, key: certs/daemon.key,
             timeout: 2}}
routes:
  - name: futures
    match:
      symbol: {{regex: '(ES|NQ) [0-9]{{2}}-[0-9]{{2}}'}}
    to: ninja
    order:
      symbol: "{{{{ alert.symbol }}}}"
      side: "{{{{ alert.action }}}}"
      type: "{{{{ alert.order_type | default('market') }}}}"
      quantity: "{{{{ alert.quantity }}}}"
"""


class AgentProcess:
    """`fksroute agent ninjatrader` as its own process, on a fixed port so that it can be killed and started again."""

    def __init__(self, tmp_path):
        certs = make_certs(tmp_path / "certs")
        self.incoming = tmp_path / "NinjaTrader 8" / "incoming"
        self.incoming.mkdir(parents=True)
        (self.incoming.parent / "outgoing").mkdir()
        self.port = free_port()
        self.log = tmp_path / "agent.log"
        self.args = ["ninjatrader", "--cert", str(certs["agent.pem"]), "--key", str(certs["agent.key"]),
                     "--ca", str(certs["ca.pem"]), "--oif-dir", str(self.incoming)]
        self.proc = spawn_agent(self.args, self.log, self.port)

    def kill_and_restart(self):
        self.proc.kill()
        self.proc.wait()
        self.proc = spawn_agent(self.args, self.log, self.port)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def agent(tmp_path):
    process = AgentProcess(tmp_path)
    yield process
    process.stop()


@pytest.fixture
def daemon(tmp_path, agent, daemon_factory):
    config = tmp_path / "routes.yaml"
    config.write_text(ROUTES.format(port=agent.port))
    return daemon_factory(config)


def journal(config) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "fksroute", "journal", "-c", str(config), "--format", "json"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_an_es_alert_becomes_a_place_line_and_its_fill_reaches_the_journal(agent, daemon):
    reply = daemon.post(json={"symbol": "ES 12-26", "action": "buy", "quantity": 1})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["success"] is True and body["results"][0]["status"] == "placed", body
    order_id = body["order_id"]

    [oif] = agent.incoming.glob("oif*.txt")
    assert oif.read_bytes() == f"PLACE;Sim101;ES 12-26;BUY;1;MARKET;;;DAY;;{order_id};;\r\n".encode()

    oif.unlink()  # NinjaTrader takes the file, fills the order and says so in outgoing
    (agent.incoming.parent / "outgoing" / f"{order_id}.txt").write_text("FILLED;1;5012.25")
    deadline = time.monotonic() + 15
    while True:
        [order] = journal(daemon.config)[0]["orders"]
        if order["status"] == "filled" or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert (order["status"], order["filled_quantity"], order["average_price"]) == ("filled", 1, 5012.25)
    assert order["client_order_id"] == order_id


def test_after_the_agent_is_killed_and_started_again_the_next_alert_goes_through(agent, daemon):
    first = daemon.post(json={"symbol": "ES 12-26", "action": "buy", "quantity": 1}).json()
    assert first["results"][0]["status"] == "placed", first
    agent.kill_and_restart()
    second = daemon.post(json={"symbol": "NQ 12-26", "action": "sell", "quantity": 2}).json()
    assert second["success"] is True and second["results"][0]["status"] == "placed", second
    assert sorted(f.read_text().strip() for f in agent.incoming.glob("oif*.txt")) == [
        f"PLACE;Sim101;ES 12-26;BUY;1;MARKET;;;DAY;;{first['order_id']};;",
        f"PLACE;Sim101;NQ 12-26;SELL;2;MARKET;;;DAY;;{second['order_id']};;",
    ]
