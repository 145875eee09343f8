"""The `http` relay plugin: POSTs each order as JSON to another service, signed with HMAC-SHA256."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import urlsplit

import httpx

from fksroute.signing import SIGNATURE_HEADER, sign
from fksroute.plugins.base import (DRY_RUN, FAILED, FILLED, PLACED, UNKNOWN, OrderRequest, OrderResult,
                                   PluginContext, back_off, settings_from_mapping)

RETRY_STATUSES = frozenset({429}) | frozenset(range(500, 600))
REPLY_STATUSES = frozenset({FILLED, PLACED, DRY_RUN})


@dataclass(frozen=True)
class HttpSettings:
    """An `http` plugin's settings (schemas/http.plugin.schema.json), with the schema's defaults."""

    url: str
    secret: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout: float = 2.0
    retries: int = 2
    retry_backoff: float = 0.5
    retry_backoff_max: float = 4.0
    order_timeout: float = 15.0

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> "HttpSettings":
        return settings_from_mapping(cls, settings)


def order_body(request: OrderRequest) -> bytes:
    """The JSON sent for one order: the order, its client order id, and the alert-style `action` and
    `order_type` that TradingView-to-exchange services (fksroute's own webhook too) read."""
    order = dict(request.order)
    payload = {**order, "action": order.get("side"), "order_type": order.get("type"),
               "client_order_id": request.client_order_id}
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


class HttpPlugin:
    """Relays orders to `url`; resends the same body on 5xx, 429 and connection errors."""

    def __init__(self, name: str, settings: Mapping[str, Any], context: PluginContext) -> None:
        self.name = name
        self.settings = HttpSettings.from_mapping(settings)
        self._log = context.logger
        parts = urlsplit(self.settings.url)
        self._where = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"  # no credentials or query
        self._client: httpx.AsyncClient | None = None
        self._failures = 0
        self._last_error: str | None = None

    async def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=self.settings.timeout, headers=dict(self.settings.headers))
        if not self.settings.secret:
            self._log.warning("plugin %s: no secret: orders to %s go unsigned", self.name, self._where)

    async def execute(self, request: OrderRequest) -> OrderResult:
        """POST the order, retrying with the very same body; the reply's `order_id` is kept."""
        if self._client is None:
            await self.start()
        assert self._client is not None
        body = order_body(request)
        headers = {"Content-Type": "application/json"}
        if self.settings.secret:
            headers[SIGNATURE_HEADER] = sign(body, self.settings.secret)
        deadline = time.monotonic() + self.settings.order_timeout
        maybe_delivered = False
        error = ""
        attempt = 0
        for attempt in range(1, self.settings.retries + 2):
            if attempt > 1 and not await back_off(attempt - 1, self.settings.retry_backoff,
                                                  self.settings.retry_backoff_max, deadline):
                attempt -= 1
                break
            try:
                reply = await asyncio.wait_for(self._client.post(self.settings.url, content=body, headers=headers),
                                               max(deadline - time.monotonic(), 0.001))
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                error = f"cannot connect to {self._where}: {type(e).__name__}"
            except (httpx.TransportError, asyncio.TimeoutError) as e:
                # the request may have been read and acted on: the receiver dedups by client_order_id
                maybe_delivered = True
                error = f"no answer from {self._where}: {type(e).__name__}"
            else:
                if reply.status_code not in RETRY_STATUSES:
                    return self._settle(self._result(reply, attempt))
                maybe_delivered = False
                error = f"{self._where} answered {reply.status_code}: {_reply_error(reply)}"
            self._log.warning("plugin %s: order %s attempt %d: %s", self.name, request.client_order_id,
                              attempt, error)
        status = UNKNOWN if maybe_delivered else FAILED
        self._failures += 1
        self._last_error = f"{error} (after {attempt} attempts)"
        return OrderResult(status, error=self._last_error, detail={"attempts": attempt, "url": self._where})

    async def lookup(self, request: OrderRequest) -> OrderResult | None:
        """A relay cannot be asked about an order afterwards."""
        return None

    async def health(self) -> dict[str, Any]:
        return {"healthy": self._failures == 0, "url": self._where, "consecutive_failures": self._failures,
                "last_error": self._last_error}

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def _settle(self, result: OrderResult) -> OrderResult:
        """Any answer but 5xx/429 means the relay is reachable."""
        self._failures = 0
        return result

    def _result(self, reply: httpx.Response, attempts: int) -> OrderResult:
        data = _json(reply)
        detail = {"attempts": attempts, "url": self._where, "http_status": reply.status_code, "reply": data}
        order_id = data.get("order_id")
        order_id = None if order_id is None else str(order_id)
        if not reply.is_success or data.get("success") is False:
            return OrderResult(FAILED, order_id, f"{self._where} answered {reply.status_code}: {_reply_error(reply)}",
                               detail=detail)
        return OrderResult(_reply_status(data), order_id, None, _number(data.get("filled_quantity")),
                           _number(data.get("average_price")), detail)


def _json(reply: httpx.Response) -> dict[str, Any]:
    try:
        data = reply.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _reply_error(reply: httpx.Response) -> str:
    data = _json(reply)
    text = data.get("error") or data.get("msg") or reply.text or reply.reason_phrase
    return str(text)[:200]


def _reply_status(data: Mapping[str, Any]) -> str:
    """The reply's own status (top level, or its first result as fksroute answers), else `placed`."""
    results = data.get("results")
    first = results[0] if isinstance(results, list) and results and isinstance(results[0], dict) else {}
    for status in (data.get("status"), first.get("status")):
        if status in REPLY_STATUSES:
            return str(status)
    return PLACED


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
