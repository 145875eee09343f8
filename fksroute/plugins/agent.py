"""The `ninjatrader` and `mt5` plugins: orders go to a fksroute agent on Windows over rpyc with mutual TLS."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import rpyc
from rpyc.core.stream import SocketStream
from rpyc.utils.factory import connect_stream

from fksroute.plugins.base import (FAILED, FILLED, PLACED, UNKNOWN, OrderRequest, OrderResult, PluginContext,
                                   backoff_delay)

DEFAULT_PORT = 18861
DEFAULT_TIMEOUT = 5.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
STATUSES = (FILLED, PLACED, FAILED, UNKNOWN)
RECONCILE_POLL = 0.2


class AgentError(Exception):
    """The agent could not be asked, or answered with an rpyc error."""


class AgentUnreachable(AgentError):
    """No connection could be made: nothing was sent."""


class ConnectionLost(AgentError):
    """The connection broke during a call: the call may or may not have run on the agent."""


class CallTimeout(AgentError):
    """The agent did not answer within the timeout: the call may still be running there."""


@dataclass(frozen=True)
class AgentAddress:
    """Where an agent listens and the files that prove both sides."""

    host: str
    port: int
    ca: Path
    cert: Path
    key: Path
    server_hostname: str
    timeout: float

    @classmethod
    def from_settings(cls, agent: Mapping[str, Any], base_dir: Path) -> "AgentAddress":
        """Read a plugin's `agent:` mapping; relative file names start at the directory of routes.yaml."""
        def path(name: str) -> Path:
            if not agent.get(name):
                raise ValueError(f"agent.{name} is required")
            p = Path(str(agent[name])).expanduser()
            return p if p.is_absolute() else Path(base_dir) / p

        host = agent.get("host")
        if not host:
            raise ValueError("agent.host is required")
        return cls(host=str(host), port=int(agent.get("port", DEFAULT_PORT)), ca=path("ca"), cert=path("cert"),
                   key=path("key"), server_hostname=str(agent.get("server_hostname") or host),
                   timeout=float(agent.get("timeout", DEFAULT_TIMEOUT)))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class AgentClient:
    """One rpyc connection to one agent, made on demand and re-made after a failure with backoff.

    Blocking: call it from a worker thread. Calls are serialized, since a timed-out call leaves the
    connection in doubt and is dropped rather than shared.
    """

    def __init__(self, address: AgentAddress, logger: logging.Logger,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.address = address
        self._log = logger
        self._clock = clock
        self._lock = threading.Lock()
        self._conn: rpyc.Connection | None = None
        self._sock: ssl.SSLSocket | None = None
        self._failures = 0
        self._next_attempt = 0.0
        self.last_error: str | None = None

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed

    def _tls_context(self) -> ssl.SSLContext:
        a = self.address
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(a.ca))
        context.load_cert_chain(str(a.cert), str(a.key))
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    def _open(self) -> rpyc.Connection:
        # rpyc.ssl_connect always checks the certificate against the host it dials; this is the same
        # connection (SocketStream over a verified TLS socket, keepalive on) with agent.server_hostname honoured.
        a = self.address
        context = self._tls_context()
        raw = socket.create_connection((a.host, a.port), timeout=a.timeout)
        try:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock = context.wrap_socket(raw, server_hostname=a.server_hostname)
        except BaseException:
            raw.close()
            raise
        config = {"allow_pickle": False, "allow_public_attrs": False, "allow_all_attrs": False,
                  "import_custom_exceptions": False, "instantiate_custom_exceptions": False,
                  "sync_request_timeout": a.timeout}
        conn = connect_stream(SocketStream(sock), config=config)
        try:
            conn.root  # with TLS 1.3 a refused client certificate shows only on the first exchange
        except BaseException:
            self._close(conn, sock)
            raise
        self._sock = sock
        return conn

    @staticmethod
    def _close(conn: rpyc.Connection | None, sock: ssl.SSLSocket | None) -> None:
        # Shutting the socket first makes conn.close() fail fast instead of waiting on a dead peer.
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass
        if sock is not None:
            sock.close()

    def _drop(self) -> None:
        conn, sock, self._conn, self._sock = self._conn, self._sock, None, None
        self._close(conn, sock)

    def _failed(self, exc: BaseException) -> str:
        self._failures += 1
        delay = backoff_delay(self._failures, BACKOFF_FIRST, BACKOFF_MAX)
        self._next_attempt = self._clock() + delay
        self.last_error = f"{type(exc).__name__}: {exc}"
        return self.last_error

    def _connection(self, force: bool) -> rpyc.Connection:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        self._drop()
        wait = self._next_attempt - self._clock()
        if not force and wait > 0:
            raise AgentUnreachable(f"{self.last_error} (next attempt in {wait:.1f}s)")
        try:
            self._conn = self._open()
        except Exception as exc:
            error = self._failed(exc)
            self._log.warning("agent %s unreachable: %s", self.address, error)
            raise AgentUnreachable(error) from None
        if self._failures:
            self._log.info("agent %s reconnected", self.address)
        self._failures = 0
        self.last_error = None
        return self._conn

    def call(self, method: str, *args: str, force: bool = True) -> Any:
        """Call exposed method `method` and decode its JSON answer; `force=False` respects the reconnect backoff."""
        with self._lock:
            conn = self._connection(force)
            try:
                answer = getattr(conn.root, method)(*args)
            except TimeoutError:
                # rpyc's AsyncResultTimeout is TimeoutError; the agent may still be working on it.
                self.last_error = f"{method} timed out after {self.address.timeout:g}s"
                self._drop()
                raise CallTimeout(self.last_error) from None
            except (EOFError, OSError) as exc:
                error = self._failed(exc)
                self._drop()
                raise ConnectionLost(error) from None
            except Exception as exc:
                raise AgentError(f"{method}: {type(exc).__name__}: {exc}") from None
        if type(answer) is not str:  # plain text only: anything else would be a proxy into the agent
            raise AgentError(f"{method}: the agent's answer is not text")
        try:
            return json.loads(answer)
        except ValueError:
            raise AgentError(f"{method}: the agent's answer is not JSON") from None

    def close(self) -> None:
        with self._lock:
            self._drop()


class AgentPlugin:
    """An execution plugin backed by a fksroute agent; subclasses name the agent's backend."""

    backend: ClassVar[str]

    def __init__(self, name: str, settings: Mapping[str, Any], context: PluginContext) -> None:
        if "agent" not in settings:
            raise ValueError(f"plugin {name}: `agent` (host, port, ca, cert, key) is required")
        self.name = name
        self.account = settings.get("account")
        self.address = AgentAddress.from_settings(settings["agent"], context.base_dir)
        self._log = context.logger
        self._client = AgentClient(self.address, context.logger)
        self._warm_up: asyncio.Task | None = None

    async def start(self) -> None:
        # Connect in the background: an agent that is down must not hold up the daemon's start.
        self._warm_up = asyncio.create_task(self.health())

    def _payload(self, request: OrderRequest) -> str:
        order = dict(request.order)
        if self.account and not order.get("account"):
            order["account"] = self.account
        return json.dumps({"order_id": request.client_order_id, "backend": self.backend, "order": order})

    def _result(self, answer: Mapping[str, Any], order_id: str) -> OrderResult:
        status = answer.get("status")
        detail = {"agent": str(self.address), "backend": self.backend, **(answer.get("detail") or {})}
        if answer.get("duplicate"):
            detail["duplicate"] = True
        if status not in STATUSES:
            return OrderResult(UNKNOWN, order_id=order_id, error=f"the agent answered status {status!r}", detail=detail)
        return OrderResult(status, order_id=answer.get("venue_order_id") or order_id, error=answer.get("error"),
                           filled_quantity=answer.get("filled_quantity"), average_price=answer.get("average_price"),
                           detail=detail)

    def _reconcile(self, order_id: str, why: str) -> OrderResult:
        """After a call whose outcome is unknown: ask the agent what became of the order; never place it again.

        While the agent says the order is still being placed, it asks again, for at most one more timeout.
        """
        deadline = time.monotonic() + self.address.timeout
        while True:
            try:
                known = self._client.call("order_status", order_id)
            except AgentError as exc:
                known, why = None, f"{why}; order_status failed too ({exc})"
            if known and known.get("status") in (PLACED, FILLED, FAILED):
                return self._result(known, order_id)
            in_progress = bool(known and (known.get("detail") or {}).get("in_progress"))
            if not in_progress or time.monotonic() >= deadline:
                return OrderResult(UNKNOWN, order_id=order_id,
                                   error=f"{why}: outcome unknown until the agent reports it",
                                   detail={"agent": str(self.address), "backend": self.backend})
            time.sleep(RECONCILE_POLL)

    def _place(self, order_id: str, payload: str) -> OrderResult:
        try:
            return self._result(self._client.call("place", payload), order_id)
        except AgentUnreachable as exc:
            return OrderResult(FAILED, order_id=order_id, error=f"agent {self.address} unreachable: {exc}")
        except CallTimeout as exc:
            return self._reconcile(order_id, str(exc))
        except ConnectionLost as exc:
            self._log.warning("order %s: connection to agent %s lost (%s); asking it again", order_id,
                              self.address, exc)
        except AgentError as exc:
            return OrderResult(FAILED, order_id=order_id, error=str(exc))
        # The place may or may not have reached the agent. A fresh connection asks first; placing again is
        # safe only because the agent answers a known order id with its first result.
        try:
            known = self._client.call("order_status", order_id)
            answer = known if known and known.get("status") != UNKNOWN else self._client.call("place", payload)
            return self._result(answer, order_id)
        except CallTimeout as exc:
            return self._reconcile(order_id, str(exc))
        except AgentError as exc:
            return OrderResult(UNKNOWN, order_id=order_id,
                               error=f"connection to agent {self.address} lost: {exc}; outcome unknown")

    async def execute(self, request: OrderRequest) -> OrderResult:
        return await asyncio.to_thread(self._place, request.client_order_id, self._payload(request))

    async def lookup(self, request: OrderRequest) -> OrderResult | None:
        order_id = request.client_order_id
        try:
            answer = await asyncio.to_thread(self._client.call, "order_status", order_id)
        except AgentError as exc:
            self._log.debug("order_status %s: %s", order_id, exc)
            return None
        if not answer or answer.get("status") == UNKNOWN:
            return None
        return self._result(answer, order_id)

    async def health(self) -> dict[str, Any]:
        try:
            answer = await asyncio.to_thread(self._client.call, "health", force=False)
        except AgentError as exc:
            return {"healthy": False, "connected": False, "agent": str(self.address), "error": str(exc)}
        state = {"connected": True, "agent": str(self.address), "agent_health": answer}
        if answer.get("backend") != self.backend:
            return {**state, "healthy": False,
                    "error": f"the agent drives {answer.get('backend')}, not {self.backend}"}
        healthy = bool(answer.get("healthy"))
        return {**state, "healthy": healthy, **({} if healthy else {"error": answer.get("error")})}

    async def cancel(self, order_id: str) -> dict[str, Any]:
        """Ask the agent to cancel an order by its client order id."""
        return await asyncio.to_thread(self._client.call, "cancel", order_id)

    async def close_position(self, symbol: str, account: str | None = None) -> dict[str, Any]:
        """Close the whole position in `symbol` (on the plugin's account unless one is given)."""
        return await asyncio.to_thread(self._client.call, "close_position", account or self.account or "", symbol)

    async def positions(self, account: str | None = None) -> dict[str, Any]:
        """The agent's open positions on the account."""
        return await asyncio.to_thread(self._client.call, "positions", account or self.account or "")

    async def close(self) -> None:
        if self._warm_up is not None:
            await asyncio.gather(self._warm_up, return_exceptions=True)
        await asyncio.to_thread(self._client.close)


class NinjaTraderPlugin(AgentPlugin):
    """Orders to NinjaTrader 8 through a `fksroute agent ninjatrader`."""

    backend = "ninjatrader"


class Mt5Plugin(AgentPlugin):
    """Orders to MetaTrader 5 through a `fksroute agent mt5`."""

    backend = "mt5"
