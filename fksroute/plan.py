"""From an alert to the orders it would send: routing, guards, transform and schema checks.

Pure: no I/O, nothing executed. The daemon, `fksroute route` and `fksroute test` all call
`plan_alert`, so they cannot disagree.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any, Callable, Collection, Mapping, NamedTuple
from zoneinfo import ZoneInfo

import orjson

from fksroute.routing import Route, RoutingTable, as_number, lookup
from fksroute.transform import DEFAULT_ORDER, TransformError, variables

_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str).encode
# orjson writes a float in exponent notation (`1e16`, `1e-7`) and a fixed one below 1e-4 where the
# standard library writes `1e+16`, `1e-07` and `1e-05`; an `e` after a digit, or `0.0000`, sends
# the alert the standard library's way (inside a string too: only slower, and rare, where an `e`
# before a digit or a minus sign was common: `ema-cross`, `close-long`, `fksroute-32-7`).
# An `e` after a digit, written `e` first: the search then jumps from `e` to `e` (three times faster).
_EXPONENT = re.compile(rb"e(?<=[0-9]e)")
_ONLY_JSON = orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS \
    | orjson.OPT_PASSTHROUGH_SUBCLASS  # anything but plain JSON data goes the standard library's way
READY = "ready"
SKIPPED = "skipped"


# The values made once per alert are named tuples: as immutable as a frozen dataclass, and
# built in a third of its time (a frozen dataclass sets each field through object.__setattr__).
class PlannedOrder(NamedTuple):
    """One route's verdict on the alert: an order ready to send, or a reason to skip it."""

    route: str
    plugin: str | None
    status: str
    order: Mapping[str, Any] | None = None
    reason: str | None = None
    label: str | None = None  # why it was skipped, as a fixed metric label: disabled, schedule, stale, confidence

    def as_dict(self) -> dict[str, Any]:
        return {"route": self.route, "plugin": self.plugin, "status": self.status,
                "order": dict(self.order) if self.order is not None else None, "reason": self.reason}


class Rejection(NamedTuple):
    """The alert is refused whole: nothing of it is executed."""

    status: int
    error: str
    reason: str  # a fixed metric label: invalid, unmatched, schema, template, limits


class Plan(NamedTuple):
    orders: tuple[PlannedOrder, ...] = ()
    rejection: Rejection | None = None
    dedup_key: str | None = None  # from a route's `dedup_key`; None means the body's hash
    dedup_window: timedelta = timedelta(seconds=60)
    ack: str = "sync"
    alert: Mapping[str, Any] = MappingProxyType({})  # after the alert schema's defaults

    @property
    def routes(self) -> list[str]:
        return [o.route for o in self.orders]


def parse_time(value: Any) -> datetime | None:
    """An alert time: ISO 8601 (TradingView's `{{timenow}}`) or epoch seconds/milliseconds."""
    number = as_number(value)
    if number is not None:
        seconds = number / 1000 if number > 1e11 else number
        try:
            return datetime.fromtimestamp(seconds, timezone.utc)
        except (OverflowError, OSError, ValueError):  # inf, nan, or beyond the calendar
            return None
    if isinstance(value, str) and value.strip():
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
    return None


def _skip_reason(route: Route, alert: Mapping[str, Any], now: datetime | None) -> tuple[str, str] | None:
    """(label, reason) when `route` must not execute `alert` now (given when it has a schedule or a max_age)."""
    if not route.enabled:
        return "disabled", "route disabled (enabled: false)"
    if route.schedule is not None:
        assert now is not None
        local = now.astimezone(ZoneInfo(route.schedule.timezone))
        minute = local.hour * 60 + local.minute
        start, end = route.schedule.start_minute, route.schedule.end_minute
        inside = start <= minute < end if start < end else (minute >= start or minute < end)
        if local.weekday() not in route.schedule.days or not inside:
            return "schedule", f"outside schedule ({route.schedule.timezone} {local:%a %H:%M})"
    if route.max_age is not None:
        assert now is not None
        raw = lookup(alert, route.time_field)
        sent = parse_time(raw) if raw is not None else None
        if sent is None:
            return "stale", f"stale: no readable time in field {route.time_field!r} (max_age is set)"
        age = now - sent
        if age > route.max_age:
            return "stale", f"stale: {age.total_seconds():.1f}s old, max_age {route.max_age.total_seconds():g}s"
    if route.min_confidence is not None:
        confidence = as_number(alert.get("confidence"))
        if confidence is not None and confidence < route.min_confidence:
            return "confidence", f"confidence {confidence:g} below min_confidence {route.min_confidence:g}"
    return None


def _limit_problem(route: Route, order: Mapping[str, Any], alert: Mapping[str, Any]) -> str | None:
    if route.limits is None:
        return None
    quantity = as_number(order.get("quantity"))
    if route.limits.max_quantity is not None and quantity is not None and quantity > route.limits.max_quantity:
        return f"quantity {quantity:g} exceeds max_quantity {route.limits.max_quantity:g} of route {route.name}"
    if route.limits.max_notional is not None:
        price = next((p for p in (as_number(order.get(k)) for k in ("price", "stop_price")) if p), None)
        price = price or as_number(alert.get("price"))
        if price is None or quantity is None:
            return f"route {route.name} has max_notional but the order has no price to check it against"
        if quantity * price > route.limits.max_notional:
            return (f"notional {quantity * price:g} exceeds max_notional "
                    f"{route.limits.max_notional:g} of route {route.name}")
    return None


def canonical(alert: Mapping[str, Any]) -> bytes:
    """The alert as the standard library's canonical JSON (sorted keys, compact, ASCII), which
    defines the dedup key: the same in every version, so that a resend across an upgrade is known.
    orjson writes the same text several times faster wherever no number or character it writes
    differently appears; the standard library writes the rest."""
    try:
        text = orjson.dumps(alert, option=_ONLY_JSON)
    except (orjson.JSONEncodeError, TypeError):  # an integer past 64 bits, a key that is no string
        text = None
    if text is not None and text.isascii() and b"\x7f" not in text and b"0.0000" not in text \
            and _EXPONENT.search(text) is None:  # the standard library escapes DEL and all past ASCII
        return text
    return _CANONICAL(alert).encode()


def body_key(alert: Mapping[str, Any]) -> str:
    """The default dedup key: a hash of the alert without its secret."""
    return hashlib.sha256(canonical(alert)).hexdigest()


def _jinja_names(table: RoutingTable, route: Route, filled: Mapping[str, Any], now: datetime,
                 markets: Callable[[str], Collection[str]]) -> dict[str, Any]:
    """What Jinja sees: made only when a template needs Jinja."""
    return variables(filled, route.name, now, markets(route.to), table.symbols)


def plan_alert(table: RoutingTable, alert: Mapping[str, Any], now: datetime | None = None,
               markets: Callable[[str], Collection[str]] = lambda plugin: ()) -> Plan:
    """Match, guard, render and validate; `markets(plugin)` gives a venue's symbols for `tv_symbol`.
    The clock is read (once) only if something needs it: a schedule, a max_age, or Jinja."""
    routes = table.match(alert)
    if not routes:
        if table.unmatched == "reject" or table.defaults is None:
            return Plan(rejection=Rejection(422, "No route matches this alert", "unmatched"), alert=alert)
        if table.unmatched == "drop":
            return Plan((PlannedOrder("unmatched", None, SKIPPED, reason="no route matched (unmatched: drop)",
                                      label="unmatched"),),
                        alert=alert)
        routes = [table.defaults]

    planned: list[PlannedOrder] = []
    first = routes[0]
    dedup_key: str | None = None
    filled: Mapping[str, Any] = alert
    for route in routes:
        filled = alert
        if route.alert_schema is not None:
            filled, problem = route.alert_schema.apply(alert)
            if problem is not None:
                return Plan(rejection=Rejection(problem.status, problem.message, "invalid"), alert=alert)
        if route is first and route.dedup_key is not None:
            now = now or datetime.now(timezone.utc)
            try:
                dedup_key = str(route.dedup_key.render(_jinja_names(table, route, filled, now, markets)))
            except TransformError as exc:
                return Plan(rejection=Rejection(422, f"dedup_key of route {route.name}: {exc}", "template"), alert=alert)
        if not table.enabled:
            planned.append(PlannedOrder(route.name, route.to, SKIPPED, reason="fksroute disabled (enabled: false)",
                                        label="disabled"))
            continue
        if now is None and (route.schedule is not None or route.max_age is not None):
            now = datetime.now(timezone.utc)
        skip = _skip_reason(route, filled, now)
        if skip is not None:
            planned.append(PlannedOrder(route.name, route.to, SKIPPED, reason=skip[1], label=skip[0]))
            continue
        template = route.order or DEFAULT_ORDER
        try:
            order = template.render_fast(filled)
            if order is None:
                now = now or datetime.now(timezone.utc)
                order = template.render_jinja(_jinja_names(table, route, filled, now, markets))
        except TransformError as exc:
            return Plan(rejection=Rejection(422, f"route {route.name}: {exc}", "template"), alert=alert)
        errors = route.schema.errors(order)
        if errors:
            return Plan(rejection=Rejection(422, f"route {route.name}: invalid order: {errors[0]}", "schema"), alert=alert)
        problem = _limit_problem(route, order, filled) if route.limits is not None else None
        if problem is not None:
            return Plan(rejection=Rejection(422, problem, "limits"), alert=alert)
        planned.append(PlannedOrder(route.name, route.to, READY, order=order))
    return Plan(tuple(planned), None, dedup_key, first.dedup_window, first.ack, filled)
