"""One alert, from raw bytes to the reply: door, parse, plan, journal, dispatch. No HTTP here."""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import math
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Collection, Mapping, NamedTuple

import orjson

from fksroute import jsontext, security
from fksroute.dispatch import client_order_id, result_entry
from fksroute.journal import DONE, PENDING, JournalConflict, JournalError, new_alert_id
from fksroute.plan import READY, Plan, body_key, plan_alert
from fksroute.plugins.base import SUCCESS_STATUSES, OrderRequest, OrderResult

if TYPE_CHECKING:
    from fksroute.daemon import Daemon

log = logging.getLogger("fksroute.webhook")
ANSWER_WITHIN = 2.5  # TradingView gives up after 3 s; what is not done by then is answered `queued`
MAX_DEPTH = 32
MAX_DIGITS = 308  # an integer longer than this is not a float any more: refused, never half-parsed
UNAUTHORIZED = "Unauthorized: missing or wrong secret"


class Reply(NamedTuple):  # made once per request: a named tuple is built the fastest
    status: int
    body: Mapping[str, Any]
    headers: Mapping[str, str] = MappingProxyType({})


def encode_reply(body: Any) -> bytes:
    """The reply as strict JSON, whatever a plugin or a template computed (a price times 1e308
    overflows): a number JSON cannot carry becomes null."""
    return jsontext.encode(body)


class BadAlert(ValueError):
    pass


def reply_body(alert_id: str | None, results: list[dict[str, Any]], error: str | None = None,
               duplicate: bool = False) -> dict[str, Any]:
    """The contract's reply: success, order_id, error, alert_id, duplicate, results."""
    order_id = None
    for r in results:
        if error is None and r.get("status") not in SUCCESS_STATUSES:
            error = r.get("error") or f"route {r.get('route')}: {r.get('status')}"
        if order_id is None and r.get("order_id"):
            order_id = r["order_id"]
    return {"success": error is None, "order_id": order_id, "error": error, "alert_id": alert_id,
            "duplicate": duplicate, "results": results}


def journaled_reply(alert_id: str, orders: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The reply to an accepted alert, rebuilt from its journaled orders (Journal.order_results)."""
    results = []
    for o in orders:
        detail = o.get("detail") or {}
        result = OrderResult(o["status"], o["order_id"], o["error"], o["filled_quantity"], o["average_price"],
                             detail) if o.get("status") and o["status"] != "skipped" else None
        entry = result_entry(o["route"], o["plugin"], result, status=o.get("status") or "queued", order=o["order"],
                             client_order_id=o["client_order_id"])
        if o.get("status") == "skipped":
            entry["reason"] = detail.get("reason")
        results.append(entry)
    return reply_body(alert_id, results)


def _depth_ok(value: Any) -> bool:
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            return False
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return True


_TOO_LARGE = 10 ** MAX_DIGITS
# orjson reads an integer past 64 bits as a float (inexact): a float this large goes the strict way,
# which reads such an integer exactly. The comparison fails for NaN and the infinities too.
_FLOAT_BOUND = float(2 ** 63)


def _plain(value: dict) -> bool:
    """True when `value` (from orjson.loads) is within every rule the strict parse enforces, and
    certainly read as the standard library reads it: depth, finite floats below 2**63 in magnitude,
    integers of at most MAX_DIGITS digits."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth >= MAX_DEPTH:
            return False
        for child in children:
            kind = type(child)
            if kind is float:
                if not -_FLOAT_BOUND < child < _FLOAT_BOUND:
                    return False
            elif kind is int:
                if not -_TOO_LARGE < child < _TOO_LARGE:
                    return False
            elif kind is dict or kind is list:
                stack.append((child, depth + 1))
    return True


def _no_constants(name: str) -> Any:
    raise BadAlert(f"Unparsable body: {name} is not a number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadAlert(f"Unparsable body: number {text[:40]} is out of range")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise BadAlert(f"Unparsable body: a number with {len(text)} digits is out of range")
    return int(text)


def _decode(body: bytes, content_type: str) -> str:
    """The body's text: its declared charset, else UTF-8; a byte order mark is dropped."""
    if ";" not in content_type:  # no charset declared: UTF-8
        try:  # utf-8-sig is a codec written in Python: only a body with a byte order mark needs it
            return body.decode("utf-8-sig" if body.startswith(codecs.BOM_UTF8) else "utf-8")
        except UnicodeError:
            raise BadAlert("Unparsable body: not utf-8 text") from None
    charset = "utf-8"
    for param in content_type.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"'):
            charset = value.strip().strip('"')
    try:
        codec = codecs.lookup(charset).name
    except LookupError:
        raise BadAlert(f"Unparsable body: unknown charset {charset[:40]!r}") from None
    if codec == "utf-8":
        codec = "utf-8-sig"
    try:
        return body.decode(codec)
    except (UnicodeError, LookupError):  # LookupError: base64, zlib and the like are no text encodings
        raise BadAlert(f"Unparsable body: not {charset[:40]} text") from None


def parse_alert(body: bytes, content_type: str | None) -> dict[str, Any]:
    """JSON text becomes the alert; plain text becomes {"message": TEXT}."""
    text = _decode(body, content_type or "")
    # The common case first: a plain JSON object within every rule. Anything else (not JSON, a
    # constant such as NaN, a number out of range, too deep) takes the strict parse below,
    # which says exactly what is wrong.
    try:
        value = orjson.loads(text)  # refuses NaN, lone surrogates and nesting past 1024: the strict parse words it
    except (ValueError, RecursionError):
        value = None
    if type(value) is dict and _plain(value):
        return value
    return _parse_strict(text, content_type)


def _parse_strict(text: str, content_type: str | None) -> dict[str, Any]:
    if not text.strip():
        raise BadAlert("Unparsable body: empty")
    says_json = (content_type or "").split(";")[0].strip().lower() == "application/json"
    try:
        value = json.loads(text, parse_constant=_no_constants, parse_float=_finite_float, parse_int=_bounded_int)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and BadAlert are ValueErrors
        if not says_json:
            return {"message": text}
        if isinstance(exc, BadAlert):
            raise
        raise BadAlert(f"Unparsable body: invalid JSON: {exc}") from None
    if isinstance(value, dict):
        if not _depth_ok(value):
            raise BadAlert(f"Unparsable body: nested deeper than {MAX_DEPTH} levels")
        return value
    if says_json:
        raise BadAlert("Unparsable body: a JSON alert must be an object")
    return {"message": text}


async def _settled(pending: Collection[asyncio.Future], timeout: float) -> None:
    """Wait until every future of `pending` (none done yet) is done or `timeout` has passed:
    asyncio.wait without its sets. The caller filters, so that nothing waits costs no coroutine."""
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    left = len(pending)

    def one_done(_: asyncio.Future) -> None:
        nonlocal left
        left -= 1
        if left == 0 and not waiter.done():
            waiter.set_result(None)

    for task in pending:
        task.add_done_callback(one_done)
    timer = loop.call_later(timeout, _wake, waiter)
    try:
        await waiter
    finally:
        timer.cancel()
        for task in pending:
            task.remove_done_callback(one_done)


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


class WebhookHandler:
    """Handles alerts for a daemon; HTTP-agnostic so that it can be driven by any front end."""

    def __init__(self, daemon: "Daemon") -> None:
        self.daemon = daemon

    def _journal_rejection(self, source: str | None, body: str | None, reason: str, status: int,
                           reply: Mapping[str, Any], wait: bool) -> asyncio.Future | None:
        """Record a refused request. Without `wait` the record is best effort, so that a flood of
        refused requests (address, rate, size, secret) cannot make the daemon wait on its disk."""
        self.daemon.metrics.alert(f"rejected_{reason}")
        try:
            return self.daemon.journal.record_alert(
                new_alert_id(), source=source, body=body, outcome="rejected", reason=reason,
                http_status=status, reply=reply, config_version=self.daemon.version, wait=wait)
        except JournalError:
            return None

    def _refuse(self, status: int, message: str, reason: str, source: str | None, body: str | None = None,
                headers: Mapping[str, str] | None = None) -> Reply:
        reply = reply_body(None, [], error=message)
        self._journal_rejection(source, body, reason, status, reply, wait=False)
        log.info("refused from %s: %s %s", source, status, message)
        return Reply(status, reply, headers or {})

    def admit(self, peer: str | None, headers: Mapping[str, str]) -> tuple[str | None, Reply | None]:
        """Before the body is read: readiness, address and rate. Returns the client address."""
        daemon = self.daemon
        if not daemon.ready or daemon.deployment is None:
            daemon.metrics.alert("rejected_not_ready")
            return None, Reply(503, reply_body(None, [], error="fksroute is not ready"), {"Retry-After": "5"})
        settings = daemon.deployment.table.security
        source = security.client_address(peer, headers.get("x-forwarded-for"), settings.trusted_proxies)
        if not security.address_allowed(source, settings.allow_ips):
            return source, self._refuse(403, f"Forbidden: address {source} is not allowed", "address", source)
        if daemon.rate_limiter is not None:
            wait = daemon.rate_limiter.take(source or "?")
            if wait > 0:
                return source, self._refuse(429, "Too many requests", "rate", source,
                                            headers={"Retry-After": str(max(1, math.ceil(wait)))})
        return source, None

    def too_large(self, source: str | None, limit: int) -> Reply:
        # The rest of the body is never read: the connection cannot carry another request.
        return self._refuse(413, f"Body larger than {limit} bytes", "too_large", source,
                            headers={"Connection": "close"})

    async def handle(self, body: bytes, headers: Mapping[str, str], source: str | None,
                     path_token: str | None = None) -> Reply:
        """The alert in `body`, from `source`, already admitted."""
        deployment = self.daemon.deployment
        assert deployment is not None
        table = deployment.table
        settings = table.security
        guarded = settings.secret is not None or settings.path_token is not None
        signature = headers.get(security.SIGNATURE_HEADER)
        try:
            alert = parse_alert(body, headers.get("content-type"))
        except BadAlert as exc:
            # Without a parsed body only the signature or the path token can vouch for the sender.
            if guarded and not security.authenticate(body, security.Credentials(signature, None, path_token),
                                                     settings.secret, settings.path_token):
                return self._refuse(401, UNAUTHORIZED, "auth", source)
            return await self._reject(source, None, 400, str(exc), "invalid")
        offered = security.Credentials(signature, alert.get(security.PASSPHRASE), path_token)
        alert = security.strip_secret(alert)
        # The passphrase is gone; a secret pasted anywhere else in the body must not be stored either.
        stored = security.redact(jsontext.text(alert), table.stored_secrets)
        if not security.authenticate(body, offered, settings.secret, settings.path_token):
            return self._refuse(401, UNAUTHORIZED, "auth", source, stored)
        try:
            plan = plan_alert(table, alert, markets=deployment.markets)
        except Exception:  # a bug in planning must not become a 5xx that TradingView retries
            log.exception("planning failed for an alert from %s", source)
            return await self._reject(source, stored, 422, "The alert could not be planned", "invalid")
        for order in plan.orders:
            self.daemon.metrics.route_matched(order.route)
        if plan.rejection is not None:
            r = plan.rejection
            return await self._reject(source, stored, r.status, r.error, r.reason)
        return await self._accept(alert, stored, plan, source, deployment)

    async def _reject(self, source: str | None, stored: str | None, status: int, error: str, reason: str) -> Reply:
        reply = reply_body(None, [], error=error)
        waiter = self._journal_rejection(source, stored, reason, status, reply, wait=True)
        try:
            if waiter is not None:
                await waiter
        except JournalError as exc:
            log.error("journal: %s", exc)
        log.info("rejected alert from %s: %s %s", source, status, error)
        return Reply(status, reply)

    async def _accept(self, alert: Mapping[str, Any], stored: str, plan: Plan, source: str | None,
                      deployment: Any) -> Reply:
        daemon = self.daemon
        key = plan.dedup_key if plan.dedup_key is not None else body_key(alert)
        seen = daemon.dedup.get(key)
        if seen is not None:
            return await self._duplicate(seen, key, stored, source)

        # From here to the lanes below nothing awaits: a second delivery arriving meanwhile
        # finds this one in the dedup cache, and lanes are taken in arrival order.
        alert_id = new_alert_id()
        requests: list[OrderRequest | None] = []
        rows = []
        executes = False
        for position, planned in enumerate(plan.orders):
            coid = planned.order.get("client_order_id") if planned.order else None
            coid = str(coid) if coid else client_order_id(alert_id, planned.route, position)
            if planned.status == READY:
                executes = True
                requests.append(OrderRequest(coid, alert_id, planned.route, planned.plugin or "", planned.order or {}))
                rows.append((coid, planned.route, planned.plugin, planned.order, PENDING, None, None))
            else:
                requests.append(None)
                rows.append((coid, planned.route, planned.plugin, planned.order, DONE, planned.status, planned.reason))
        # The answer's status and outcome are known now: journaled with the alert, never updated.
        status = 202 if executes and plan.ack == "async" else 200
        label = None if executes else next((o.label for o in plan.orders if o.label), None)
        try:
            committed = daemon.journal.record_alert(
                alert_id, source=source, body=stored, outcome="accepted" if executes else "skipped", reason=label,
                http_status=status, dedup_key=key, config_version=deployment.table.version, orders=rows)
        except JournalError as exc:
            return self._journal_down(exc)
        seen = daemon.dedup.add(key, alert_id, plan.dedup_window.total_seconds(), True)
        executions = {pos: daemon.dispatcher.submit(req, deployment.plugins.get(req.plugin), committed)
                      for pos, req in enumerate(requests) if req is not None}
        try:
            await committed
        except JournalError as exc:  # its orders see the same error and send nothing
            daemon.dedup.forget(key, alert_id)
            reply = (self._conflict(exc, source, stored) if isinstance(exc, JournalConflict)
                     else self._journal_down(exc))
            seen.answered(reply.status, reply.body)
            return reply
        # Journaled: whatever happens now, the answer is not a 5xx (TradingView would resend).
        try:
            pending = [e for e in executions.values() if not e.done()] if status != 202 else None
            if pending:
                await _settled(pending, ANSWER_WITHIN)
            body = self._answer(alert_id, plan, rows, executions, source, status, label)
        except asyncio.CancelledError:  # the server is going down: resends still learn it was taken
            seen.answered(202, reply_body(alert_id, []))
            raise
        except Exception:
            log.exception("alert %s: building the answer failed; its orders continue", alert_id)
            body = reply_body(alert_id, [])
        seen.answered(status, body)  # and to the resends that arrived meanwhile
        return Reply(status, body)

    def _answer(self, alert_id: str, plan: Plan, rows: list[tuple], executions: dict[int, asyncio.Future],
                source: str | None, status: int, label: str | None) -> dict[str, Any]:
        """The answer once every order has been executed (or ANSWER_WITHIN has passed): its
        result is answered as the plugin gave it, while its journal write is on its way."""
        daemon = self.daemon
        results = []
        for position, planned in enumerate(plan.orders):
            execution = executions.get(position)
            coid = rows[position][0]
            if execution is None:
                results.append(result_entry(planned.route, planned.plugin, None, status=planned.status,
                                            order=planned.order, client_order_id=coid)
                               | {"reason": planned.reason})
            elif status != 202 and execution.done() and execution.result() is not None:
                results.append(result_entry(planned.route, planned.plugin, execution.result(), order=planned.order,
                                            client_order_id=coid))
            else:
                results.append(result_entry(planned.route, planned.plugin, None, status="queued",
                                            order=planned.order, client_order_id=coid))
        body = reply_body(alert_id, results)
        # Every route skipped it: counted by the first route's reason.
        daemon.metrics.alert("accepted" if executions else f"skipped_{label}" if label else "skipped")
        # Each executed order has its own line (dispatch); this one matters when nothing ran.
        level = logging.DEBUG if executions else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "alert %s from %s: %s routes=%s %s", alert_id, source, status, plan.routes,
                    [r["status"] for r in results])
        return body

    async def _duplicate(self, seen: Any, key: str, stored: str, source: str | None) -> Reply:
        daemon = self.daemon
        if seen.answering:  # the first delivery is still being answered
            try:
                status, first = await asyncio.wait_for(asyncio.shield(seen.wait_reply()), ANSWER_WITHIN)
            except asyncio.TimeoutError:
                status, first = 202, reply_body(seen.alert_id, [], error=None)
        else:  # answered: its orders, as the journal holds them now
            status = seen.status
            try:
                first = journaled_reply(seen.alert_id, await daemon.journal.order_results(seen.alert_id))
            except JournalError as exc:
                log.error("journal: %s", exc)
                first = reply_body(seen.alert_id, [])
        body = dict(first) | {"duplicate": True, "alert_id": seen.alert_id}
        daemon.metrics.alert("duplicate")
        try:
            await daemon.journal.record_alert(new_alert_id(), source=source, body=stored, outcome="duplicate",
                                              reason="duplicate", http_status=status, dedup_key=key,
                                              duplicate_of=seen.alert_id, reply=body,
                                              config_version=daemon.version)
        except JournalError as exc:
            log.error("journal: %s", exc)
        log.info("duplicate of alert %s from %s", seen.alert_id, source)
        return Reply(status, body)

    def _conflict(self, exc: Exception, source: str | None, stored: str) -> Reply:
        """The rendered orders reuse a client order id the journal already holds: refused whole."""
        error = "An order's client_order_id was used before (by an earlier alert or another route of this one)"
        return self._refuse(422, error, "invalid", source, stored)

    def _journal_down(self, exc: Exception) -> Reply:
        log.error("alert refused, the journal cannot write: %s", exc)
        self.daemon.metrics.alert("rejected_journal")
        return Reply(503, reply_body(None, [], error="The journal cannot write; the alert was not accepted"),
                     {"Retry-After": "5"})
