"""Matchers on alert fields and the routing table's `match(alert)`; nothing here knows HTTP."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:
    from fksroute.schemas import AlertSchema, OrderValidator
    from fksroute.transform import OrderTemplate, Template

Matcher = Callable[[Mapping[str, Any]], bool]

OPERATORS = ("eq", "ne", "in", "not_in", "regex", "gt", "gte", "lt", "lte", "exists", "not")
BLOCK_KEYS = ("any", "all", "not")
_MISSING = object()


class MatcherError(ValueError):
    """A match block that cannot be compiled; `path` locates it inside the block."""

    def __init__(self, path: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.path = path


def lookup(alert: Mapping[str, Any], dotted: str) -> Any:
    """The value at a dotted path (`strategy.order.action`), or a private missing marker."""
    value: Any = alert
    for part in dotted.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def as_number(value: Any) -> float | None:
    """A number, or a string TradingView sent for one ("0.01"); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def equals(value: Any, expected: Any) -> bool:
    """Equality that lets "1.5" equal 1.5 and "true" equal true, since alerts often send text."""
    if value is _MISSING:
        return False
    if isinstance(value, bool) or isinstance(expected, bool):
        return _text(value) == _text(expected)
    if value == expected:
        return True
    a, b = as_number(value), as_number(expected)
    return a is not None and b is not None and a == b


def _compare(op: str, bound: Any, path: tuple) -> Matcher:
    limit = as_number(bound)
    if limit is None:
        raise MatcherError(path, f"{op} needs a number, got {bound!r}")
    test = {
        "gt": lambda v: v > limit,
        "gte": lambda v: v >= limit,
        "lt": lambda v: v < limit,
        "lte": lambda v: v <= limit,
    }[op]

    def match(value: Any) -> bool:
        number = as_number(value) if value is not _MISSING else None
        return number is not None and test(number)

    return match


def _compile_value_matcher(spec: Any, path: tuple) -> Callable[[Any], bool]:
    """A matcher on one value: a plain value, a list (one of), or a mapping of operators."""
    if isinstance(spec, list):
        options = tuple(spec)
        return lambda v: any(equals(v, o) for o in options)
    if not isinstance(spec, Mapping):
        return lambda v: equals(v, spec)
    if not spec:
        raise MatcherError(path, "an empty matcher matches nothing; give an operator")
    tests: list[Callable[[Any], bool]] = []
    for op, arg in spec.items():
        where = (*path, op)
        if op == "eq":
            tests.append(lambda v, a=arg: equals(v, a))
        elif op == "ne":
            tests.append(lambda v, a=arg: not equals(v, a))
        elif op in ("in", "not_in"):
            if not isinstance(arg, list):
                raise MatcherError(where, f"{op} needs a list")
            options = tuple(arg)
            if op == "in":
                tests.append(lambda v, o=options: any(equals(v, x) for x in o))
            else:
                tests.append(lambda v, o=options: not any(equals(v, x) for x in o))
        elif op == "regex":
            try:
                pattern = re.compile(str(arg))
            except re.error as exc:
                raise MatcherError(where, f"invalid regex {arg!r}: {exc}") from None
            tests.append(
                lambda v, p=pattern: v is not _MISSING and v is not None
                and not isinstance(v, (Mapping, list)) and p.fullmatch(_text(v)) is not None
            )
        elif op in ("gt", "gte", "lt", "lte"):
            tests.append(_compare(op, arg, where))
        elif op == "exists":
            if not isinstance(arg, bool):
                raise MatcherError(where, "exists needs true or false")
            tests.append(lambda v, want=arg: (v is not _MISSING) == want)
        elif op == "not":
            inner = _compile_value_matcher(arg, where)
            tests.append(lambda v, f=inner: not f(v))
        else:
            raise MatcherError(where, f"unknown matcher {op!r}; use one of {', '.join(OPERATORS)}")
    return lambda v: all(t(v) for t in tests)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def compile_block(block: Mapping[str, Any] | None, path: tuple = ()) -> Matcher:
    """Compile a `match:` block: every key must hold (dotted paths, `any`, `all`, `not`)."""
    if not block:
        return lambda alert: True
    if not isinstance(block, Mapping):
        raise MatcherError(path, "a match block is a mapping of field paths to matchers")
    tests: list[Matcher] = []
    for key, spec in block.items():
        where = (*path, key)
        if key in ("any", "all"):
            if not isinstance(spec, list) or not spec:
                raise MatcherError(where, f"{key} needs a non-empty list of match blocks")
            parts = tuple(compile_block(b, (*where, i)) for i, b in enumerate(spec))
            combine = any if key == "any" else all
            tests.append(lambda a, ps=parts, c=combine: c(p(a) for p in ps))
        elif key == "not":
            inner = compile_block(spec, where)
            tests.append(lambda a, f=inner: not f(a))
        else:
            value_test = _compile_value_matcher(spec, where)
            tests.append(lambda a, k=key, f=value_test: f(lookup(a, k)))
    return lambda alert: all(t(alert) for t in tests)


@dataclass(frozen=True)
class Schedule:
    """A trading window: weekdays (0 = Monday) and minutes of the day, in a time zone."""

    timezone: str
    days: frozenset[int]
    start_minute: int
    end_minute: int


@dataclass(frozen=True)
class Limits:
    max_quantity: float | None = None
    max_notional: float | None = None


@dataclass(frozen=True)
class Route:
    """One compiled route. Settings not given on the route come from `defaults`."""

    name: str
    to: str
    matcher: Matcher = field(repr=False, compare=False)
    order: "OrderTemplate | None" = field(default=None, repr=False, compare=False)
    schema: "OrderValidator" = field(default=None, repr=False, compare=False)  # type: ignore[assignment]
    alert_schema: "AlertSchema | None" = field(default=None, repr=False, compare=False)
    continue_: bool = False
    enabled: bool = True
    min_confidence: float | None = None
    ack: str = "sync"
    dedup_window: timedelta = timedelta(seconds=60)
    dedup_key: "Template | None" = field(default=None, repr=False, compare=False)
    max_age: timedelta | None = None
    time_field: str = "time"
    schedule: Schedule | None = None
    limits: Limits | None = None

    def matches(self, alert: Mapping[str, Any]) -> bool:
        """A disabled route still matches, so that its alerts are skipped, not sent elsewhere."""
        return self.matcher(alert)


@dataclass(frozen=True)
class PluginSpec:
    """A plugin entry of routes.yaml: its name, type and settings (secrets substituted)."""

    name: str
    type: str
    settings: Mapping[str, Any] = field(repr=False)
    fingerprint: str = ""  # a hash of the settings: an unchanged plugin is reused on reload


@dataclass(frozen=True)
class RoutingTable:
    """The immutable table in force: built by `fksroute.config.load`, swapped whole on reload."""

    version: str
    source: str
    routes: tuple[Route, ...]
    plugins: Mapping[str, PluginSpec]
    unmatched: str = "reject"
    enabled: bool = True
    server: Any = None
    security: Any = None
    defaults: Route | None = None
    symbols: Mapping[str, str] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    secrets: frozenset[str] = field(default=frozenset(), repr=False)
    document: Mapping[str, Any] = field(default_factory=dict, repr=False)  # as written, secrets unsubstituted

    @cached_property
    def stored_secrets(self) -> tuple[str, ...]:
        """What a journaled alert must never hold: the webhook's secret, the path token and every
        substituted secret, longest first (a secret holding another is redacted whole)."""
        found = {*self.secrets, *((self.security.secret, self.security.path_token) if self.security else ())}
        return tuple(sorted((s for s in found if s), key=len, reverse=True))

    def match(self, alert: Mapping[str, Any]) -> list[Route]:
        """The routes that take `alert`: the first match, and more while they say `continue`."""
        matched: list[Route] = []
        for route in self.routes:
            if route.matches(alert):
                matched.append(route)
                if not route.continue_:
                    break
        return matched
