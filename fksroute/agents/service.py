"""The agent's rpyc service (plain-data methods taking and returning JSON text) and the mutual-TLS server that hosts it."""

from __future__ import annotations

import json
import logging
import math
import re
import socket
import ssl
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol

import rpyc
from rpyc.utils.authenticators import AuthenticationError, SSLAuthenticator
from rpyc.utils.server import ThreadPoolServer

from fksroute import __version__

log = logging.getLogger("fksroute.agent")

PLACED = "placed"
FILLED = "filled"
FAILED = "failed"
UNKNOWN = "unknown"

# rpyc's defaults are already close; every knob that widens what a peer may reach is pinned off here.
PROTOCOL_CONFIG: dict[str, Any] = {
    "allow_pickle": False,
    "allow_public_attrs": False,
    "allow_all_attrs": False,
    "allow_setattr": False,
    "allow_delattr": False,
    "include_local_traceback": False,
    "include_local_version": False,
    "import_custom_exceptions": False,
    "instantiate_custom_exceptions": False,
    "instantiate_oldstyle_exceptions": False,
}

ORDER_ID = re.compile(r"^[A-Za-z0-9._:/-]{1,64}$")
ORDER_TYPES = ("market", "limit", "stop", "stop_limit")
TIMES_IN_FORCE = ("GTC", "IOC", "FOK", "DAY")
MAX_TEXT = 65536
HANDSHAKE_TIMEOUT = 5.0  # the TLS handshake runs on the accepting thread: a silent peer must not hold it long
IO_TIMEOUT = 60.0  # a peer that stops reading loses its connection instead of a worker thread


class OrderError(ValueError):
    """An order the agent will not send; the message says why and is safe to show."""


class NotSent(Exception):
    """A failure before anything reached the venue: the same order id may be tried again."""


@dataclass(frozen=True)
class AgentOrder:
    """One order as the agent receives it: the canonical order fields and the id to send to the venue."""

    order_id: str
    symbol: str
    side: str
    type: str
    quantity: float
    price: float | None = None
    stop_price: float | None = None
    stop_loss: float | None = None
    take_profit: float | None = None
    time_in_force: str | None = None
    account: str | None = None
    strategy: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)


class Backend(Protocol):
    """A trading terminal the agent drives; every method returns plain JSON data."""

    name: str

    def health(self) -> dict[str, Any]: ...

    def place(self, order: AgentOrder) -> dict[str, Any]: ...

    def cancel(self, order_id: str) -> dict[str, Any]: ...

    def close_position(self, account: str, symbol: str) -> dict[str, Any]: ...

    def positions(self, account: str) -> list[dict[str, Any]]: ...

    def order_status(self, order_id: str) -> dict[str, Any] | None: ...

    def close(self) -> None: ...


def order_result(order_id: str | None, status: str, *, error: str | None = None,
                 filled_quantity: float | None = None, average_price: float | None = None,
                 venue_order_id: str | None = None, **detail: Any) -> dict[str, Any]:
    """The one shape every order answer has on the wire."""
    return {"order_id": order_id, "status": status, "error": error, "filled_quantity": filled_quantity,
            "average_price": average_price, "venue_order_id": venue_order_id, "detail": detail}


def _text(value: Any, name: str, limit: int = 256) -> str:
    # A peer could pass a netref instead of a string; nothing but real str is accepted.
    if type(value) is not str or not value or len(value) > limit:
        raise OrderError(f"{name} must be a non-empty string of at most {limit} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise OrderError(f"{name} must not contain control characters")
    return value


def _order_id(value: Any) -> str:
    if type(value) is not str or not ORDER_ID.match(value):
        raise OrderError("order_id must be 1-64 characters of A-Z a-z 0-9 . _ : / -")
    return value


def _number(order: Mapping[str, Any], name: str, required: bool = False) -> float | None:
    value = order.get(name)
    if value is None:
        if required:
            raise OrderError(f"order needs {name}")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise OrderError(f"{name} must be a positive number")
    return float(value)


def _optional_text(order: Mapping[str, Any], name: str) -> str | None:
    value = order.get(name)
    return None if value is None else _text(value, name)


def parse_order(text: str, backend: str) -> AgentOrder:
    """Read and check the JSON text of `place`: {"order_id", "backend", "order": {canonical order}}."""
    try:
        payload = json.loads(text)
    except ValueError:
        raise OrderError("the order is not valid JSON") from None
    if not isinstance(payload, dict):
        raise OrderError("the order must be a JSON object")
    order_id = _order_id(payload.get("order_id"))
    if payload.get("backend") not in (None, backend):
        raise OrderError(f"this agent drives {backend}, not {payload.get('backend')}")
    order = payload.get("order")
    if not isinstance(order, dict):
        raise OrderError("order must be a JSON object")
    side = order.get("side")
    if side not in ("buy", "sell"):
        raise OrderError("side must be buy or sell")
    kind = order.get("type", "market")
    if kind not in ORDER_TYPES:
        raise OrderError(f"type must be one of {', '.join(ORDER_TYPES)}")
    tif = order.get("time_in_force")
    if tif is not None and tif not in TIMES_IN_FORCE:
        raise OrderError(f"time_in_force must be one of {', '.join(TIMES_IN_FORCE)}")
    params = {} if order.get("params") is None else order["params"]
    if not isinstance(params, dict):
        raise OrderError("params must be a JSON object")
    parsed = AgentOrder(
        order_id=order_id, symbol=_text(order.get("symbol"), "symbol"), side=side, type=kind,
        quantity=_number(order, "quantity", required=True), price=_number(order, "price"),
        stop_price=_number(order, "stop_price"), stop_loss=_number(order, "stop_loss"),
        take_profit=_number(order, "take_profit"), time_in_force=tif,
        account=_optional_text(order, "account"), strategy=_optional_text(order, "strategy"), params=params,
    )
    if kind in ("limit", "stop_limit") and parsed.price is None:
        raise OrderError(f"a {kind} order needs price")
    if kind in ("stop", "stop_limit") and parsed.stop_price is None:
        raise OrderError(f"a {kind} order needs stop_price")
    return parsed


class PlacedOrders:
    """The answers to orders already placed, by order id: what makes a retried `place` harmless."""

    def __init__(self, capacity: int = 10000) -> None:
        self._capacity = capacity
        self._results: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._in_flight: set[str] = set()
        self._changed = threading.Condition()

    def __len__(self) -> int:
        return len(self._results)

    def place(self, order: AgentOrder, backend: Backend) -> dict[str, Any]:
        """Place `order` once; the same id again (even while the first is running) answers the first result."""
        order_id = order.order_id
        with self._changed:
            while order_id in self._in_flight:
                self._changed.wait()
            known = self._results.get(order_id)
            if known is not None:
                return {**known, "duplicate": True}
            self._in_flight.add(order_id)
        result: dict[str, Any] | None = None
        remember = True
        try:
            result = self._place_once(order, backend)
        except NotSent as exc:
            result, remember = order_result(order_id, FAILED, error=str(exc)), False
        except OrderError as exc:
            result = order_result(order_id, FAILED, error=str(exc))
        except Exception as exc:
            log.exception("order %s: %s backend failed", order_id, backend.name)
            result = order_result(order_id, UNKNOWN, error=f"agent error ({type(exc).__name__}); outcome unknown")
        finally:
            with self._changed:
                self._in_flight.discard(order_id)
                if remember and result is not None:
                    self._results[order_id] = result
                    while len(self._results) > self._capacity:
                        self._results.popitem(last=False)
                self._changed.notify_all()
        return result

    @staticmethod
    def _place_once(order: AgentOrder, backend: Backend) -> dict[str, Any]:
        # Asking the terminal first covers an agent restarted since it placed this id.
        try:
            existing = backend.order_status(order.order_id)
        except OrderError:
            raise
        except Exception as exc:
            raise NotSent(f"cannot check the terminal for an earlier order with this id: {exc}") from None
        if existing is not None:
            return {**existing, "duplicate": True}
        return backend.place(order)

    def status(self, order_id: str, backend: Backend) -> dict[str, Any] | None:
        """What the terminal says about `order_id`, else what this agent answered when it placed it."""
        with self._changed:
            if order_id in self._in_flight:
                return order_result(order_id, UNKNOWN, error="still being placed", in_progress=True)
            known = self._results.get(order_id)
        found = backend.order_status(order_id)
        return found if found is not None else known


def common_names(cert: Mapping[str, Any] | None) -> set[str]:
    """The commonName values of a certificate as `SSLSocket.getpeercert()` returns it."""
    names = set()
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                names.add(value)
    return names


def _peer(conn: rpyc.Connection) -> str:
    config = getattr(conn, "_config", {})
    endpoints = config.get("endpoints") or (None, None)
    names = ",".join(sorted(common_names(config.get("credentials")))) or "?"
    return f"{endpoints[1]} CN={names}"


class AgentService(rpyc.Service):
    """Only the exposed_* methods below are reachable; each takes and returns JSON text (or plain str)."""

    ALIASES = ("FKSROUTE-AGENT",)

    def __init__(self, backend: Backend, remember: int = 10000) -> None:
        self._backend = backend
        self._orders = PlacedOrders(remember)

    def on_connect(self, conn: rpyc.Connection) -> None:
        log.info("daemon connected: %s", _peer(conn))

    def on_disconnect(self, conn: rpyc.Connection) -> None:
        log.info("daemon disconnected: %s", _peer(conn))

    def _answer(self, what: str, call: Callable[[], Any], failed: str = FAILED) -> str:
        # `failed` is the status of an answer that could not be had: for order_status that is "unknown", not "failed".
        try:
            return json.dumps(call())
        except (OrderError, NotSent) as exc:
            return json.dumps({"status": failed, "error": str(exc)})
        except Exception as exc:
            log.exception("%s failed", what)
            return json.dumps({"status": UNKNOWN, "error": f"agent error ({type(exc).__name__})"})

    def exposed_health(self) -> str:
        """{"healthy": bool, "backend": NAME, "version": ..., ...}."""
        def health() -> dict[str, Any]:
            state = self._backend.health()
            return {**state, "backend": self._backend.name, "version": __version__, "orders_remembered": len(self._orders)}
        return self._answer("health", health)

    def exposed_place(self, order_json: str) -> str:
        """Place one order ({"order_id", "backend", "order"}); the same order id is only ever placed once."""
        def place() -> dict[str, Any]:
            try:
                order = parse_order(_text(order_json, "order_json", MAX_TEXT), self._backend.name)
            except OrderError as exc:
                log.warning("order refused: %s", exc)
                return order_result(None, FAILED, error=str(exc))
            log.info("place %s: %s %s %s %s", order.order_id, order.side, order.quantity, order.symbol, order.type)
            result = self._orders.place(order, self._backend)
            log.info("order %s: %s%s", order.order_id, result["status"],
                     f" ({result['error']})" if result.get("error") else "")
            return result
        return self._answer("place", place)

    def exposed_cancel(self, order_id: str) -> str:
        """Ask the terminal to cancel the order with this id."""
        def cancel() -> dict[str, Any]:
            _order_id(order_id)
            log.info("cancel %s", order_id)
            return self._backend.cancel(order_id)
        return self._answer("cancel", cancel)

    def exposed_close_position(self, account: str, symbol: str) -> str:
        """Close the whole position in `symbol` on `account`."""
        def close_position() -> dict[str, Any]:
            _text(account, "account")
            _text(symbol, "symbol")
            log.info("close position %s on %s", symbol, account)
            return self._backend.close_position(account, symbol)
        return self._answer("close_position", close_position)

    def exposed_positions(self, account: str) -> str:
        """{"account": ..., "positions": [{"symbol", "side", "quantity", "average_price", ...}]}."""
        def positions() -> dict[str, Any]:
            _text(account, "account")
            return {"account": account, "positions": self._backend.positions(account)}
        return self._answer("positions", positions)

    def exposed_order_status(self, order_id: str) -> str:
        """The order's current state, or JSON null when this agent and its terminal know nothing of it."""
        def order_status() -> dict[str, Any] | None:
            return self._orders.status(_order_id(order_id), self._backend)
        return self._answer("order_status", order_status, failed=UNKNOWN)


class ClientCertAuthenticator(SSLAuthenticator):
    """TLS that requires a client certificate signed by `ca_certs` and, when given, one of `allowed_cns`."""

    def __init__(self, keyfile: str | Path, certfile: str | Path, ca_certs: str | Path,
                 allowed_cns: Iterable[str] = (), handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        super().__init__(keyfile, certfile, ca_certs=ca_certs, cert_reqs=ssl.CERT_REQUIRED)
        self.allowed_cns = frozenset(allowed_cns)
        self.handshake_timeout = handshake_timeout

    def __call__(self, sock: socket.socket) -> tuple[ssl.SSLSocket, dict[str, Any]]:
        try:
            peer = sock.getpeername()
        except OSError:
            peer = "?"
        sock.settimeout(self.handshake_timeout)
        try:
            tls, cert = super().__call__(sock)
        except AuthenticationError as exc:
            log.warning("refused %s: %s", peer, exc)
            raise
        except OSError as exc:
            log.warning("refused %s: %s", peer, exc)
            raise AuthenticationError(str(exc)) from None
        names = common_names(cert)
        if self.allowed_cns and not names & self.allowed_cns:
            log.warning("refused %s: certificate CN=%s is not in --allow-cn", peer, ",".join(sorted(names)) or "?")
            tls.close()
            raise AuthenticationError("client certificate not allowed")
        tls.settimeout(IO_TIMEOUT)
        return tls, cert


class AgentServer(ThreadPoolServer):
    """rpyc's ThreadPoolServer, with two changes for an agent that one daemon calls a few times a second.

    Its poller notices a connection that is waiting again only on its next 0.1 s tick, which adds up to
    0.1 s to every round trip; here the poller is woken at once. And the TLS handshake runs on a thread of
    its own rather than on the accepting thread, so that a silent peer cannot hold up everyone else.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self.poll_object.register(self._wake_reader.fileno(), "r")

    def _accept_method(self, sock: socket.socket) -> None:
        threading.Thread(target=super()._accept_method, args=(sock,), name="AgentHandshake", daemon=True).start()

    def _add_inactive_connection(self, fd: int) -> None:
        super()._add_inactive_connection(fd)
        try:
            self._wake_writer.send(b"\0")
        except OSError:
            pass  # the buffer is full: the poller has wake-ups pending anyway

    def _handle_poll_result(self, connlist: list[tuple[int, str]]) -> None:
        wake = self._wake_reader.fileno()
        if any(fd == wake for fd, _ in connlist):
            try:
                while self._wake_reader.recv(4096):
                    pass
            except OSError:
                pass
        super()._handle_poll_result([(fd, events) for fd, events in connlist if fd != wake])

    def close(self) -> None:
        super().close()
        self._wake_reader.close()
        self._wake_writer.close()


def check_tls_files(cert: str | Path, key: str | Path, ca: str | Path) -> None:
    """Fail at start, with a clear message, when the agent's certificate, key or CA cannot be loaded."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(str(cert), str(key))
        context.load_verify_locations(str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load the agent's TLS files (--cert {cert}, --key {key}, --ca {ca}): {exc}") from None


def build_server(service: AgentService, *, host: str, port: int, cert: str | Path, key: str | Path,
                 ca: str | Path, allowed_cns: Iterable[str] = (), threads: int = 8) -> AgentServer:
    """A thread-pool rpyc server for `service` on host:port that accepts only clients with a certificate from `ca`."""
    check_tls_files(cert, key, ca)
    return AgentServer(
        service, hostname=host, port=port, ipv6=":" in host, auto_register=False,
        authenticator=ClientCertAuthenticator(key, cert, ca, allowed_cns),
        protocol_config=dict(PROTOCOL_CONFIG), nbThreads=threads,
        logger=logging.getLogger("fksroute.agent.rpyc"),
    )
