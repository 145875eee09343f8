"""The one interface every execution plugin implements, and the values it trades in."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Collection, Mapping, NamedTuple, Protocol, TypeVar, runtime_checkable

# Result statuses a plugin may return; `skipped` and `queued` are set by the dispatcher only.
FILLED = "filled"
PLACED = "placed"
DRY_RUN = "dry_run"
FAILED = "failed"
UNKNOWN = "unknown"
SUCCESS_STATUSES = frozenset({FILLED, PLACED, DRY_RUN, "skipped", "queued"})

Settings = TypeVar("Settings")


# The two values made once per order are named tuples: as immutable as a frozen dataclass, and
# built in half its time (a frozen dataclass sets each field through object.__setattr__).
class OrderRequest(NamedTuple):
    """One validated order on its way to a plugin.

    `order` is the canonical order (symbol, side, type, quantity, price, stop_price,
    stop_loss, take_profit, time_in_force, account, ...), already rendered and checked
    against the order schemas. `client_order_id` is derived from the alert and route and
    is the same on every retry and after a restart: send it to the venue.
    """

    client_order_id: str
    alert_id: str
    route: str
    plugin: str
    order: Mapping[str, Any]


class OrderResult(NamedTuple):
    """What became of one order. `detail` holds plain JSON data only (it is journaled); change
    a result with `result._replace(...)`."""

    status: str
    order_id: str | None = None
    error: str | None = None
    filled_quantity: float | None = None
    average_price: float | None = None
    detail: Mapping[str, Any] = MappingProxyType({})  # shared by every result without one: read-only

    @property
    def ok(self) -> bool:
        return self.status in SUCCESS_STATUSES


@dataclass(frozen=True)
class PluginContext:
    """What a plugin may know about its surroundings."""

    base_dir: Path  # the directory of routes.yaml: relative paths in settings start here
    logger: logging.Logger


@runtime_checkable
class Plugin(Protocol):
    """An execution venue. Built as `Cls(name, settings, context)`.

    `start` must not raise because a venue is unreachable: it reports that through
    `health` and retries on its own. `execute` never raises for venue errors; it returns
    a failed `OrderResult` whose `error` is safe to show (no secrets). A plugin may set
    `resend_safe = True` when it never executes a client order id twice, even across
    restarts: after a crash, an order it cannot find is then sent again, not left unknown.
    A plugin whose orders involve no I/O (a simulation) may also offer `execute_now(request)`,
    the same as `execute` but plain: the dispatcher then runs the order as soon as its alert is
    journaled and its lane is free, without a task of its own.
    """

    name: str

    async def start(self) -> None: ...

    async def execute(self, request: OrderRequest) -> OrderResult: ...

    async def lookup(self, request: OrderRequest) -> OrderResult | None:
        """Find an order already sent, by its client order id; None when this venue cannot tell."""
        ...

    async def health(self) -> dict[str, Any]:
        """At least {"healthy": bool}; plain JSON data."""
        ...

    async def close(self) -> None: ...


def market_symbols(plugin: object) -> Collection[str]:
    """The venue's own symbols, where the plugin knows them (ccxt after load_markets)."""
    getter = getattr(plugin, "market_symbols", None)
    return getter() if callable(getter) else ()


def settings_from_mapping(cls: type[Settings], settings: Mapping[str, Any]) -> Settings:
    """The settings dataclass `cls` built from the entries of `settings` that name its fields (the
    routes.yaml mapping, already validated against the plugin's schema; `type` and the like are dropped)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in settings.items() if k in names})


def backoff_delay(retry: int, base: float, cap: float) -> float:
    """The pause before retry number `retry` (1, 2, ...): `base`, doubled on each retry, at most `cap`."""
    return min(base * 2.0 ** min(retry - 1, 64), cap)  # the bound keeps a long outage from overflowing


async def back_off(retry: int, base: float, cap: float, deadline: float) -> bool:
    """Sleep the backoff before retry `retry`; False, without sleeping, when that would reach `deadline`
    (a time.monotonic() value)."""
    delay = backoff_delay(retry, base, cap)
    if time.monotonic() + delay >= deadline:
        return False
    await asyncio.sleep(delay)
    return True
