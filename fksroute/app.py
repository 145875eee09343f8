"""HTTP endpoints (Starlette). Nothing about matching or execution lives here."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
from typing import Any, Callable, Mapping

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from fksroute.config import thaw
from fksroute.daemon import Daemon
from fksroute.webhook import Reply, encode_reply, reply_body

log = logging.getLogger("fksroute.app")


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(encode_reply(body), status, headers=headers, media_type="application/json")


def _is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# Headers a reverse proxy adds: a request carrying one came from further away than its peer.
_FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")


def admin_allowed(peer: str | None, headers: Mapping[str, str], admin_token: str | None) -> bool:
    """May this request use an admin endpoint (POST /-/reload, /routes, /metrics)? Yes from this host itself, or with
    `Authorization: Bearer <security.admin_token>`. A request a local reverse proxy forwarded
    arrives from loopback too, so loopback counts only when no forwarding header is present."""
    if _is_loopback(peer) and not any(name in headers for name in _FORWARDING_HEADERS):
        return True
    scheme, _, given = headers.get("authorization", "").partition(" ")
    return (bool(admin_token) and scheme.lower() == "bearer"
            and hmac.compare_digest(given.strip().encode(), admin_token.encode()))


def create_app(daemon: Daemon, lifespan: Callable[[Starlette], Any] | None = None) -> Callable:
    """The ASGI app for `daemon`; `lifespan` starts and stops it (see fksroute.server)."""

    endpoint = _WebhookEndpoint(daemon)
    webhook = _RouteEndpoint(endpoint)

    async def health(request: Request) -> Response:
        return _json(200, await daemon.health())

    async def healthy(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def ready(request: Request) -> Response:
        if daemon.ready:
            return PlainTextResponse("ready\n")
        return PlainTextResponse("stopping\n" if daemon.stopping else "not ready\n", 503)

    def admin(request: Request) -> bool:
        token = daemon.deployment.table.security.admin_token if daemon.deployment else None
        return admin_allowed(request.client.host if request.client else None, request.headers, token)

    async def routes(request: Request) -> Response:
        if not admin(request):  # the table names plugins, accounts and routes: not for the internet
            return _json(403, {"error": "/routes is allowed from loopback or with the admin token"})
        deployment = daemon.deployment
        if deployment is None:
            return _json(503, {"error": "no table in force"})
        table = deployment.table
        return _json(200, {
            "version": table.version, "generation": deployment.generation, "source": table.source,
            "routes": [{"name": r.name, "to": r.to, "continue": r.continue_, "enabled": r.enabled, "ack": r.ack}
                       for r in table.routes],
            "unmatched": table.unmatched,
            "plugins": {n: s.type for n, s in table.plugins.items()},
            "document": thaw(table.document),  # as written: ${env:...} references, not their values
        })

    async def metrics(request: Request) -> Response:
        if not admin(request):
            return _json(403, {"error": "/metrics is allowed from loopback or with the admin token"})
        body, content_type = daemon.metrics.render()
        return Response(body, 200, media_type=content_type)

    async def reload(request: Request) -> Response:
        if not admin(request):
            return _json(403, {"ok": False, "errors": ["reload is allowed from loopback or with the admin token"]})
        if daemon.stopping:
            return _json(503, {"ok": False, "errors": ["fksroute is stopping"]})
        outcome = await daemon.reload("http")
        return _json(200 if outcome.ok else 400, outcome.as_dict())

    app = Starlette(
        routes=[
            Route("/webhook/tradingview", webhook, methods=["POST"]),
            Route("/webhook", webhook, methods=["POST"]),
            Route("/webhook/tradingview/{token}", webhook, methods=["POST"]),
            Route("/webhook/{token}", webhook, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/-/healthy", healthy, methods=["GET"]),
            Route("/-/ready", ready, methods=["GET"]),
            Route("/-/reload", reload, methods=["POST"]),
            Route("/routes", routes, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    return _Front(app, endpoint)


_WEBHOOK_PATHS = {"/webhook", "/webhook/tradingview"}


def webhook_token(path: str) -> tuple[bool, str | None]:
    """Is `path` a webhook path, and which token does it carry? The same paths as the routes
    above: /webhook, /webhook/tradingview, and either followed by one token segment."""
    if path in _WEBHOOK_PATHS:
        return True, None
    head, _, token = path.rpartition("/")
    if head in _WEBHOOK_PATHS and token:
        return True, token
    return False, None


class _Front:
    """Alerts skip Starlette's router and middleware: a POST to a webhook path goes straight to
    the endpoint below, the rest (and a webhook path with another method: 405) to Starlette."""

    def __init__(self, app: Starlette, webhook: "_WebhookEndpoint") -> None:
        self.app = app
        self.webhook = webhook

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            matched, token = webhook_token(scope["path"])
            if matched:
                await self.webhook(scope, receive, send, token)
                return
        await self.app(scope, receive, send)


class _WebhookEndpoint:
    """POST /webhook[/tradingview][/<token>] as a plain ASGI endpoint: the alert path, lean."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    async def __call__(self, scope: dict, receive: Callable, send: Callable, token: str | None) -> None:
        started = time.perf_counter()
        try:
            handler = self.daemon.webhook
            # ASGI gives header names in lower case; a repeated header keeps its last value.
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            client = scope.get("client")
            source, reply = handler.admit(client[0] if client else None, headers)
            if reply is None:
                limit = self.daemon.deployment.table.security.max_body_bytes
                body = await _read_body(headers.get("content-length"), receive, limit)
                reply = (handler.too_large(source, limit) if body is None
                         else await handler.handle(body, headers, source, token))
        except _Disconnected:
            return  # the client went away before its body arrived: nobody to answer
        except Exception:  # a bug must still get an answer, and a traceback in the log
            log.exception("webhook: unexpected error")
            reply = Reply(500, reply_body(None, [], error="Internal error"))
        self.daemon.metrics.latency.observe(time.perf_counter() - started)
        text = encode_reply(reply.body)
        headers = [(b"content-length", str(len(text)).encode()), (b"content-type", b"application/json")]
        if reply.headers:
            headers.extend((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers.items())
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": text})


class _Disconnected(Exception):
    pass


class _RouteEndpoint:
    """The endpoint as a Starlette route (which answers 405 to other methods), should a POST
    ever reach the router rather than the front."""

    def __init__(self, endpoint: _WebhookEndpoint) -> None:
        self.endpoint = endpoint

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        await self.endpoint(scope, receive, send, scope.get("path_params", {}).get("token"))


async def _read_body(declared: str | None, receive: Callable, limit: int) -> bytes | None:
    """The body, or None as soon as it is known to exceed `limit` (never read whole)."""
    if declared is not None:
        try:
            if int(declared) > limit:
                return None
        except ValueError:
            return None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        if not message.get("more_body", False):
            if not chunks:
                return chunk  # the whole body in one message: the usual case
            chunks.append(chunk)
            return b"".join(chunks)
        chunks.append(chunk)
