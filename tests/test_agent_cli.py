"""`fksroute agent` and `fksroute certs` from the command line, with the agent as its own process."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from agent_support import (agent_command, agent_settings, context, free_port, make_certs, spawn_agent,
                           with_fake_mt5)
from fksroute.agents.main import main, parse_listen, password_source, run_agent
from fksroute.cli import build_parser
from fksroute.plugins.agent import Mt5Plugin
from fksroute.plugins.base import OrderRequest

README = Path(__file__).parent.parent / "README.md"


def test_certs_makes_every_file_and_keeps_existing_ones(tmp_path, capsys):
    assert main(["certs", str(tmp_path / "c"), "--host", "10.0.0.5", "--host", "agent.lan"]) == 0
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert names == ["agent.key", "agent.pem", "ca.key", "ca.pem", "daemon.key", "daemon.pem"]
    assert "agent.key" in capsys.readouterr().out
    agent = x509.load_pem_x509_certificate((tmp_path / "c" / "agent.pem").read_bytes())
    san = agent.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert san.get_values_for_type(x509.DNSName) == ["agent.lan"]
    assert (tmp_path / "c" / "daemon.key").stat().st_mode & 0o077 == 0
    before = (tmp_path / "c" / "ca.pem").read_bytes()
    assert main(["certs", str(tmp_path / "c")]) == 1
    assert (tmp_path / "c" / "ca.pem").read_bytes() == before
    assert main(["certs", str(tmp_path / "c"), "--force"]) == 0
    assert (tmp_path / "c" / "ca.pem").read_bytes() != before


def test_the_default_certificate_names_localhost_and_127_0_0_1(tmp_path):
    certs = make_certs(tmp_path)
    agent = x509.load_pem_x509_certificate(certs["agent.pem"].read_bytes())
    san = agent.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_the_daemons_command_line_has_the_agent_commands():
    args = build_parser().parse_args(["agent", "ninjatrader", "--cert", "a.pem", "--key", "a.key", "--ca", "ca.pem",
                                      "--oif-dir", "C:/NT/incoming"])
    assert args.func is run_agent and args.listen == ("127.0.0.1", 18861) and args.outgoing_dir is None
    args = build_parser().parse_args(["agent", "mt5", "--cert", "a", "--key", "b", "--ca", "c", "--listen",
                                      "0.0.0.0:9000", "--login", "123", "--password-env", "MT5_PW",
                                      "--allow-cn", "fksroute-daemon"])
    assert (args.listen, args.login, args.password_env, args.allow_cn) == (("0.0.0.0", 9000), 123, "MT5_PW",
                                                                          ["fksroute-daemon"])
    assert build_parser().parse_args(["certs", "out"]).func.__name__ == "run_certs"


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:18861", ("127.0.0.1", 18861)), (":9000", ("0.0.0.0", 9000)), ("[::1]:9000", ("::1", 9000)),
])
def test_listen_addresses(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["18861", "host:", "host:0", "host:70000", "host:port"])
def test_bad_listen_addresses(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_listen(text)


def test_the_password_comes_from_the_environment_or_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MT5_PW", "s3cret")
    assert password_source("MT5_PW", None)() == "s3cret"
    (tmp_path / "pw").write_text("from-file\r\n")
    assert password_source(None, tmp_path / "pw")() == "from-file"
    assert password_source(None, None)() is None
    with pytest.raises(ValueError, match="NOT_SET is not set"):
        password_source("NOT_SET", None)
    with pytest.raises(ValueError, match="not both"):
        password_source("MT5_PW", tmp_path / "pw")
    with pytest.raises(ValueError, match="readable"):
        password_source(None, tmp_path / "missing")


def test_the_mt5_agent_runs_with_the_metatrader5_package(tmp_path):
    certs = make_certs(tmp_path / "certs")
    port = free_port()
    setup = {"symbols": {"EURUSD": {"bid": 1.1, "ask": 1.1002, "filling_mode": 2}}, "password": "s3cret"}
    env = with_fake_mt5({"FAKE_MT5_SETUP": json.dumps(setup), "MT5_PASSWORD": "s3cret"})
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "wb") as err:
        agent = spawn_agent(["mt5", "--cert", str(certs["agent.pem"]), "--key", str(certs["agent.key"]),
                             "--ca", str(certs["ca.pem"]), "--login", "5001234", "--password-env", "MT5_PASSWORD"],
                            tmp_path / "agent.log", port, env=env, stderr=err)

    async def scenario():
        plugin = Mt5Plugin("mt5", agent_settings("mt5", certs, port), context(tmp_path))
        assert (await plugin.health())["healthy"] is True
        order = {"symbol": "EURUSD", "side": "sell", "type": "market", "quantity": 0.5, "stop_loss": 1.12}
        result = await plugin.execute(OrderRequest("fks-9", "a", "forex", "mt5", order))
        assert (result.status, result.filled_quantity, result.average_price) == ("filled", 0.5, 1.1)
        await plugin.close()

    try:
        asyncio.run(scenario())
    finally:
        agent.terminate()
        agent.wait(10)
    log = (tmp_path / "agent.log").read_text()
    assert f"agent mt5 listening on 127.0.0.1:{port}" in log and "place fks-9" in log
    assert "place fks-9" in stderr.read_text()  # the console gets the same lines
    assert "s3cret" not in log


def test_the_mt5_agent_says_what_is_missing_without_the_package(tmp_path):
    certs = make_certs(tmp_path / "certs")
    done = subprocess.run(agent_command(["mt5", "--cert", str(certs["agent.pem"]), "--key", str(certs["agent.key"]),
                                         "--ca", str(certs["ca.pem"])], tmp_path / "agent.log", free_port()),
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "pip install fksroute[mt5]" in done.stderr


def test_the_agent_refuses_to_start_with_unreadable_certificates(tmp_path):
    certs = make_certs(tmp_path / "certs")
    done = subprocess.run(agent_command(["ninjatrader", "--cert", str(certs["daemon.pem"]), "--key",
                                         str(certs["agent.key"]), "--ca", str(certs["ca.pem"]), "--oif-dir",
                                         str(tmp_path)], tmp_path / "agent.log", free_port()),
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "cannot load the agent's TLS files" in done.stderr


def test_metatrader5_is_imported_only_when_the_mt5_agent_starts():
    code = ("import sys, fksroute.cli, fksroute.agents.main, fksroute.agents.mt5, fksroute.plugins.agent; "
            "fksroute.cli.build_parser(); print('MetaTrader5' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=with_fake_mt5(),
                          timeout=30)
    assert done.stdout.strip() == "False", done.stderr


@pytest.mark.parametrize("alert, plugin, order", [
    ({"symbol": "ES1!", "action": "buy", "quantity": 1}, "ninja",
     {"symbol": "ES 12-26", "side": "buy", "type": "market", "quantity": 1, "strategy": "ATM 1R 2R"}),
    ({"symbol": "FX:EURUSD", "action": "sell", "quantity": 0.1, "stop_loss": 1.12}, "mt5",
     {"symbol": "EURUSD", "side": "sell", "type": "market", "quantity": 0.1, "stop_loss": 1.12}),
])
def test_the_routes_example_in_the_readme_routes_futures_and_forex(tmp_path, alert, plugin, order):
    example = re.search(r"### 5\. routes\.yaml: futures to NinjaTrader.*?```yaml\n(.*?)```", README.read_text(),
                        re.S).group(1)
    (tmp_path / "routes.yaml").write_text(example)
    done = subprocess.run([sys.executable, "-m", "fksroute", "route", "-c", str(tmp_path / "routes.yaml"),
                           json.dumps(alert)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    [routed] = json.loads(done.stdout)["orders"]
    assert (routed["plugin"], routed["order"]) == (plugin, order)
