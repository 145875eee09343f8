"""The agent over real rpyc and mutual TLS on loopback: who may connect, and what a connected peer can reach."""

from __future__ import annotations

import json
import logging
import socket
import ssl
import time

import pytest
import rpyc
from rpyc.core.service import ClassicService

from agent_support import make_certs, running_agent
from fksroute.agents.ninjatrader import NinjaTraderBackend
from fksroute.plugins.agent import AgentAddress, AgentClient, AgentUnreachable

REFUSED = (OSError, EOFError)
pytestmark = pytest.mark.filterwarnings("ignore:setName:DeprecationWarning")  # rpyc's own thread naming


# One CA and one agent for the whole module: each test only connects to it.
@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    incoming = tmp_path_factory.mktemp("nt") / "incoming"
    incoming.mkdir()
    return NinjaTraderBackend(incoming)


@pytest.fixture(scope="module")
def agent(backend, certs):
    with running_agent(backend, certs) as server:
        yield server


def client(certs, port, cert="daemon.pem", key="daemon.key", ca=None, server_hostname=None):
    address = AgentAddress(host="127.0.0.1", port=port, ca=ca or certs["ca.pem"], cert=certs[cert], key=certs[key],
                           server_hostname=server_hostname or "127.0.0.1", timeout=2)
    return AgentClient(address, logging.getLogger("tests"))


def connect(certs, port, **kwargs):
    """A raw rpyc client, as an attacker with network access would write one."""
    return rpyc.ssl_connect("127.0.0.1", port, ca_certs=str(certs["ca.pem"]), cert_reqs=ssl.CERT_REQUIRED,
                            config={"sync_request_timeout": 3}, **kwargs)


def test_the_daemon_certificate_is_accepted(agent, certs):
    answer = client(certs, agent.port).call("health")
    assert answer["healthy"] is True and answer["backend"] == "ninjatrader"


def test_a_silent_peer_does_not_hold_up_the_daemon(agent, certs):
    with socket.create_connection(("127.0.0.1", agent.port)):
        started = time.monotonic()
        assert client(certs, agent.port).call("health")["healthy"] is True
        assert time.monotonic() - started < 2


def test_a_client_without_a_certificate_is_refused(agent, certs):
    with pytest.raises(REFUSED):
        conn = connect(certs, agent.port)
        conn.root.health()


def test_a_client_certificate_from_another_ca_is_refused(agent, certs, tmp_path):
    other = make_certs(tmp_path / "other")
    with pytest.raises(REFUSED):
        conn = connect(certs, agent.port, keyfile=str(other["daemon.key"]), certfile=str(other["daemon.pem"]))
        conn.root.health()


def test_the_agents_own_server_certificate_cannot_be_used_as_a_client(agent, certs):
    # It carries serverAuth only; OpenSSL checks the purpose of a client certificate.
    with pytest.raises(REFUSED):
        conn = connect(certs, agent.port, keyfile=str(certs["agent.key"]), certfile=str(certs["agent.pem"]))
        conn.root.health()


def test_allow_cn_refuses_other_names(backend, certs):
    with running_agent(backend, certs, allowed_cns=("someone-else",)) as server:
        with pytest.raises(AgentUnreachable):
            client(certs, server.port).call("health")
    with running_agent(backend, certs, allowed_cns=("fksroute-daemon",)) as server:
        assert client(certs, server.port).call("health")["healthy"] is True


def test_the_daemon_refuses_an_agent_from_another_ca(backend, certs, tmp_path):
    other = make_certs(tmp_path / "other")
    with running_agent(backend, other) as server:
        with pytest.raises(AgentUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
            client(certs, server.port).call("health")


def test_the_daemon_checks_the_agents_host_name(agent, certs):
    with pytest.raises(AgentUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
        client(certs, agent.port, server_hostname="agent.example").call("health")
    assert client(certs, agent.port, server_hostname="localhost").call("health")["healthy"] is True


@pytest.fixture
def conn(agent, certs):
    c = connect(certs, agent.port, keyfile=str(certs["daemon.key"]), certfile=str(certs["daemon.pem"]))
    yield c
    c.close()


@pytest.mark.parametrize("name", ["execute", "eval", "getmodule", "modules", "namespace", "_conn", "_backend",
                                  "_orders", "__dict__", "_rpyc_getattr", "on_connect", "_answer"])
def test_nothing_but_the_exposed_methods_is_reachable(conn, name):
    with pytest.raises(AttributeError):
        getattr(conn.root, name)


def test_attributes_of_exposed_methods_are_not_reachable(conn):
    method = conn.root.health
    for name in ("__globals__", "__self__", "__func__", "__code__", "__closure__"):
        with pytest.raises(AttributeError):
            getattr(method, name)


def test_classic_mode_is_refused(agent, certs):
    with pytest.raises(AttributeError):
        c = rpyc.ssl_connect("127.0.0.1", agent.port, keyfile=str(certs["daemon.key"]),
                             certfile=str(certs["daemon.pem"]), ca_certs=str(certs["ca.pem"]),
                             cert_reqs=ssl.CERT_REQUIRED, service=ClassicService,
                             config={"sync_request_timeout": 3})
        c.modules.os.system("true")


def test_the_exposed_methods_answer_json_text(conn):
    for answer in (conn.root.health(), conn.root.positions("Sim101"), conn.root.order_status("nope")):
        assert type(answer) is str
        json.loads(answer)
    assert json.loads(conn.root.order_status("nope")) is None


def test_arguments_other_than_text_are_refused(conn, backend):
    answer = json.loads(conn.root.place(42))
    assert answer["status"] == "failed"
    answer = json.loads(conn.root.place(json.dumps({"order_id": "x;y", "order": {}})))
    assert answer["status"] == "failed" and "order_id" in answer["error"]
    assert list(backend.incoming.iterdir()) == []


def test_setting_attributes_is_refused(conn):
    with pytest.raises(AttributeError):
        conn.root._backend = None
    with pytest.raises(AttributeError):
        conn.root.exposed_health = None
