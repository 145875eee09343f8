"""The daemon-side `ninjatrader` and `mt5` plugins against real agents over mutual TLS on loopback."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from agent_support import (agent_settings, context, free_port, make_certs, running_agent, spawn_agent,
                           wait_for_port)
from fksroute.agents.ninjatrader import NinjaTraderBackend
from fksroute.plugins.agent import Mt5Plugin, NinjaTraderPlugin
from fksroute.plugins.base import OrderRequest

pytestmark = pytest.mark.filterwarnings("ignore:setName:DeprecationWarning")  # rpyc's own thread naming

ES = {"symbol": "ES 12-26", "side": "buy", "type": "market", "quantity": 1}


@pytest.fixture
def certs(tmp_path):
    return make_certs(tmp_path / "certs")


@pytest.fixture
def incoming(tmp_path):
    (tmp_path / "nt" / "incoming").mkdir(parents=True)
    (tmp_path / "nt" / "outgoing").mkdir()
    return tmp_path / "nt" / "incoming"


def request(order_id: str, **order) -> OrderRequest:
    return OrderRequest(order_id, f"alert-{order_id}", "futures", "ninja", {**ES, **order})


def lines(incoming) -> list[str]:
    return sorted(f.read_text().strip() for f in incoming.glob("oif*.txt"))


def ninja(certs, port, tmp_path, **agent) -> NinjaTraderPlugin:
    settings = {**agent_settings("ninjatrader", certs, port, **agent), "account": "Sim101"}
    return NinjaTraderPlugin("ninja", settings, context(tmp_path))


def test_an_order_is_placed_and_followed_until_filled(certs, incoming, tmp_path):
    async def scenario():
        with running_agent(NinjaTraderBackend(incoming), certs) as server:
            plugin = ninja(certs, server.port, tmp_path)
            await plugin.start()
            result = await plugin.execute(request("fks-1"))
            assert (result.status, result.order_id, result.error) == ("placed", "fks-1", None)
            assert lines(incoming) == ["PLACE;Sim101;ES 12-26;BUY;1;MARKET;;;DAY;;fks-1;;"]
            assert (await plugin.lookup(request("fks-1"))).status == "placed"
            assert await plugin.lookup(request("fks-other")) is None
            (incoming.parent / "outgoing" / "fks-1.txt").write_text("FILLED;1;5012.25")
            found = await plugin.lookup(request("fks-1"))
            assert (found.status, found.filled_quantity, found.average_price) == ("filled", 1, 5012.25)
            assert (await plugin.health())["healthy"] is True
            await plugin.close()
    asyncio.run(scenario())


def test_the_same_order_again_is_not_placed_twice(certs, incoming, tmp_path):
    async def scenario():
        with running_agent(NinjaTraderBackend(incoming), certs) as server:
            plugin = ninja(certs, server.port, tmp_path)
            first = await plugin.execute(request("fks-1"))
            again = await plugin.execute(request("fks-1"))
            assert first.status == again.status == "placed" and again.detail["duplicate"] is True
            assert len(lines(incoming)) == 1
            await plugin.close()
    asyncio.run(scenario())


def test_the_order_account_wins_over_the_plugins(certs, incoming, tmp_path):
    async def scenario():
        with running_agent(NinjaTraderBackend(incoming), certs) as server:
            plugin = ninja(certs, server.port, tmp_path)
            await plugin.execute(request("fks-1", account="Live7", type="limit", price=5000.5))
            assert lines(incoming) == ["PLACE;Live7;ES 12-26;BUY;1;LIMIT;5000.5;;DAY;;fks-1;;"]
            refused = await plugin.execute(request("fks-2", stop_loss=4990))
            assert refused.status == "failed" and "ATM strategy" in refused.error
            await plugin.close()
    asyncio.run(scenario())


def test_relative_certificate_paths_start_at_the_routes_directory(certs, incoming, tmp_path):
    async def scenario():
        with running_agent(NinjaTraderBackend(incoming), certs) as server:
            settings = {"type": "ninjatrader", "account": "Sim101",
                        "agent": {"host": "127.0.0.1", "port": server.port, "ca": "certs/ca.pem",
                                  "cert": "certs/daemon.pem", "key": "certs/daemon.key", "timeout": 2}}
            plugin = NinjaTraderPlugin("ninja", settings, context(tmp_path))
            assert plugin.address.ca == tmp_path / "certs" / "ca.pem"
            assert (await plugin.execute(request("fks-1"))).status == "placed"
            await plugin.close()
    asyncio.run(scenario())


def test_an_agent_that_is_down_fails_the_order_without_hanging(certs, tmp_path):
    async def scenario():
        plugin = ninja(certs, free_port(), tmp_path)
        await plugin.start()  # must not raise
        started = time.monotonic()
        result = await plugin.execute(request("fks-1"))
        assert result.status == "failed" and "unreachable" in result.error
        health = await plugin.health()
        assert health["healthy"] is False and health["connected"] is False
        assert "next attempt in" in (await plugin.health())["error"]  # health backs off
        assert time.monotonic() - started < 3
        assert await plugin.lookup(request("fks-1")) is None
        await plugin.close()
    asyncio.run(scenario())


def test_a_plugin_pointed_at_the_wrong_kind_of_agent(certs, incoming, tmp_path):
    async def scenario():
        with running_agent(NinjaTraderBackend(incoming), certs) as server:
            plugin = Mt5Plugin("mt5", agent_settings("mt5", certs, server.port), context(tmp_path))
            health = await plugin.health()
            assert health["healthy"] is False and "drives ninjatrader, not mt5" in health["error"]
            result = await plugin.execute(request("fks-1", symbol="EURUSD"))
            assert result.status == "failed" and "drives ninjatrader, not mt5" in result.error
            assert lines(incoming) == []
            await plugin.close()
    asyncio.run(scenario())


class SlowNinjaTrader(NinjaTraderBackend):
    """Places after a delay, as a terminal that hangs for a while would."""

    def __init__(self, incoming, delay):
        super().__init__(incoming)
        self.delay = delay

    def place(self, order):
        time.sleep(self.delay)
        return super().place(order)


def test_a_call_that_times_out_is_reconciled_never_placed_again(certs, incoming, tmp_path):
    async def scenario():
        with running_agent(SlowNinjaTrader(incoming, delay=0.8), certs) as server:
            plugin = ninja(certs, server.port, tmp_path, timeout=0.6)
            result = await plugin.execute(request("fks-1"))
            assert result.status == "placed"  # asked again while the agent was still placing it
            assert len(lines(incoming)) == 1
            await plugin.close()
    asyncio.run(scenario())


def test_a_call_that_stays_unanswered_is_unknown_until_the_agent_reports(certs, incoming, tmp_path):
    async def scenario():
        with running_agent(SlowNinjaTrader(incoming, delay=1.5), certs) as server:
            plugin = ninja(certs, server.port, tmp_path, timeout=0.4)
            result = await plugin.execute(request("fks-1"))
            assert result.status == "unknown" and "timed out" in result.error
            await asyncio.sleep(1.5)
            assert (await plugin.lookup(request("fks-1"))).status == "placed"
            assert len(lines(incoming)) == 1
            await plugin.close()
    asyncio.run(scenario())


class DroppingNinjaTrader(NinjaTraderBackend):
    """Writes the order file, then cuts every connection before the answer can go back."""

    server = None

    def place(self, order):
        answer = super().place(order)
        for conn in list(self.server.fd_to_conn.values()):
            conn._channel.stream.sock.shutdown(socket.SHUT_RDWR)
        return answer


def test_a_connection_lost_during_place_asks_before_placing_again(certs, incoming, tmp_path):
    async def scenario():
        backend = DroppingNinjaTrader(incoming)
        with running_agent(backend, certs) as server:
            backend.server = server
            plugin = ninja(certs, server.port, tmp_path)
            result = await plugin.execute(request("fks-1"))
            # Answered by order_status on a new connection (a second place would say "duplicate").
            assert result.status == "placed" and "duplicate" not in result.detail
            assert len(lines(incoming)) == 1
            await plugin.close()
    asyncio.run(scenario())


def test_the_plugin_reconnects_to_a_restarted_agent(certs, incoming, tmp_path):
    port = free_port()
    args = ["ninjatrader", "--cert", str(certs["agent.pem"]), "--key", str(certs["agent.key"]),
            "--ca", str(certs["ca.pem"]), "--oif-dir", str(incoming)]
    log_file = tmp_path / "agent.log"
    agent = spawn_agent(args, log_file, port)
    restarted = None

    async def scenario():
        nonlocal restarted
        plugin = ninja(certs, port, tmp_path)
        await plugin.start()
        assert (await plugin.execute(request("fks-1"))).status == "placed"
        agent.kill()
        agent.wait()
        assert (await plugin.health())["healthy"] is False
        restarted = spawn_agent(args, log_file, port)
        deadline = time.monotonic() + 10
        while not (await plugin.health())["healthy"]:  # it comes back by itself, after its backoff
            assert time.monotonic() < deadline, "the plugin did not reconnect"
            await asyncio.sleep(0.1)
        assert (await plugin.execute(request("fks-2"))).status == "placed"
        await plugin.close()

    try:
        asyncio.run(scenario())
    finally:
        for proc in (agent, restarted):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert lines(incoming) == ["PLACE;Sim101;ES 12-26;BUY;1;MARKET;;;DAY;;fks-1;;",
                               "PLACE;Sim101;ES 12-26;BUY;1;MARKET;;;DAY;;fks-2;;"]


def test_an_order_on_a_connection_the_agent_dropped_goes_through(certs, incoming, tmp_path):
    port = free_port()
    args = ["ninjatrader", "--cert", str(certs["agent.pem"]), "--key", str(certs["agent.key"]),
            "--ca", str(certs["ca.pem"]), "--oif-dir", str(incoming)]
    agent = spawn_agent(args, tmp_path / "agent.log", port)

    async def scenario():
        nonlocal agent
        plugin = ninja(certs, port, tmp_path)
        assert (await plugin.health())["healthy"] is True
        agent.kill()
        agent.wait()
        agent = spawn_agent(args, tmp_path / "agent.log", port)
        wait_for_port(port, agent)
        # The plugin still holds the dead connection: the order must notice, reconnect and go through.
        assert (await plugin.execute(request("fks-1"))).status == "placed"
        await plugin.close()

    try:
        asyncio.run(scenario())
    finally:
        agent.kill()
        agent.wait()
    assert len(lines(incoming)) == 1


def test_the_dispatcher_follows_an_unknown_order_until_the_agent_reports_its_fill(certs, incoming, tmp_path):
    from fksroute.dispatch import Dispatcher
    from fksroute.journal import Journal
    from fksroute.metrics import Metrics

    async def scenario():
        journal = Journal(tmp_path / "journal.sqlite")
        journal.open()
        dispatcher = Dispatcher(journal, Metrics(), follow_interval=0.2)
        with running_agent(SlowNinjaTrader(incoming, delay=1.0), certs) as server:
            plugin = ninja(certs, server.port, tmp_path, timeout=0.3)
            order = request("fks-9")
            row = (order.client_order_id, order.route, order.plugin, dict(order.order), "pending", None, None)
            committed = journal.record_alert(order.alert_id, source="test", body="{}", outcome="accepted",
                                             orders=[row])
            result = await dispatcher.submit(order, plugin, committed)
            assert result.status == "unknown" and dispatcher.unknown_orders == 1
            (incoming.parent / "outgoing" / "fks-9.txt").write_text("FILLED;1;5012.25")
            for _ in range(50):
                final = (await journal.order_results(order.alert_id))[0]
                if final["status"] == "filled":
                    break
                await asyncio.sleep(0.1)
            assert (final["status"], final["filled_quantity"], final["average_price"]) == ("filled", 1, 5012.25)
            assert dispatcher.unknown_orders == 0
            assert len(lines(incoming)) == 1  # followed, never placed again
            await dispatcher.close()
            await plugin.close()
        journal.close()

    asyncio.run(scenario())
