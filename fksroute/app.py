"""HTTP endpoints (Starlette). Nothing about matching or execution lives here."""

from __future__ import annotations

import hmac
import ipaddress
import json
import time
from typing import Any, Callable, Mapping

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from fksroute.config import thaw
from fksroute.daemon import Daemon
from fksroute.webhook import Reply, json_safe


_STRICT = json.JSONEncoder(default=str, allow_nan=False).encode  # built once, not per reply


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    try:
        text = _STRICT(body)
    except ValueError:  # an overflowed number somewhere: replies are strict JSON all the same
        text = json.dumps(json_safe(body), default=str)
    return Response(text, status, headers=headers, media_type="application/json")


def _reply(reply: Reply) -> Response:
    return _json(reply.status, reply.body, dict(reply.headers))


async def _read_limited(request: Request, limit: int) -> bytes | None:
    """The body, or None as soon as it is known to exceed `limit` (never read whole)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                return None
        except ValueError:
            return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


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


def create_app(daemon: Daemon, lifespan: Callable[[Starlette], Any] | None = None) -> Starlette:
    """The ASGI app for `daemon`; `lifespan` starts and stops it (see fksroute.server)."""

    async def webhook(request: Request) -> Response:
        started = time.perf_counter()
        handler = daemon.webhook
        headers = {k.lower(): v for k, v in request.headers.items()}
        peer = request.client.host if request.client else None
        source, refused = handler.admit(peer, headers)
        if refused is not None:
            return _reply(refused)
        limit = daemon.deployment.table.security.max_body_bytes
        body = await _read_limited(request, limit)
        if body is None:
            return _reply(handler.too_large(source, limit))
        reply = await handler.handle(body, headers, source, request.path_params.get("token"))
        daemon.metrics.latency.observe(time.perf_counter() - started)
        return _reply(reply)

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

    return Starlette(
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
